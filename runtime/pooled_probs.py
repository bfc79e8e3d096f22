"""The attention probabilities of a combined pattern's pooled branch (``keys pooled(mean, SIZE)`` with only a
mask): what scores another branch's route ``by probs(NAME)``, and, after a KV cache, the branch itself (its
probabilities times the pooled values). The seam: the combined call (``combined``) and its paged batch
(``combined_paged``) both read them."""

from __future__ import annotations

import dataclasses
import math

import torch

from ..compiler.analysis import evaluate as E
from ..core import ir
from ..core import symbols as S


def mask_only(pat: ir.PatternIR) -> bool:
    """Whether a branch is its mask alone (no bias, softcap, decay or route): what ``pooled_probs`` computes."""
    return pat.bias is None and pat.softcap is None and pat.decay is None and pat.route is None


def pooled_probs(source: ir.PatternIR, q: torch.Tensor, k: torch.Tensor, scale: float, inputs: dict,
                 sizes: dict, nk: int, bounds: dict | None = None) -> torch.Tensor:
    """The attention probabilities of a mask-only branch over pooled keys, per query head ``[B, Hq, Nq, R]``:
    softmax of ``scale * q . k`` over the runs its mask allows, the queries at their absolute positions (the
    last Nq of the ``nk`` tokens: a KV cache when ``nk > Nq``); 0 on a row with no allowed run. Made on q's
    device (no value read on the host for a mask of positions), fp32 (fp64 for fp64 inputs), differentiable.
    ``bounds``: a cache of the bound sizes by shape (binding is sympy work)."""
    B, Hq, Nq, D = q.shape
    Hkv, R = k.shape[1], k.shape[2]
    key = (source.name, Nq, nk, R, Hq, D, tuple(sorted(sizes.items())))
    bound = None if bounds is None else bounds.get(key)
    if bound is None:
        # n is the whole sequence (as in a self-attention branch's KV-cache call); the rows its last Nq
        whole = E.bind_sizes(source, n=nk, nk=R, heads=Hq, sizes=sizes, dk=D)
        bound = dataclasses.replace(whole, n=Nq, q_offset=nk - Nq, subs={**whole.subs, S.NQ: Nq})
        if bounds is not None:
            bounds[key] = bound
    tensors, batch = E.bind_inputs(source, bound, {d.name: inputs[d.name] for d in source.inputs}, batch=B,
                                   device=q.device)
    batched = {name for name, t in tensors.items() if t.dim() > len(source.input(name).dims)}
    dev = q.device
    env = E.token_env(source, bound, torch.arange(Nq, device=dev).view(1, 1, -1, 1),
                      torch.arange(R, device=dev).view(1, 1, 1, -1), torch.arange(Hq, device=dev).view(1, -1, 1, 1))
    allowed = E.as_tensor(E.Evaluator(env, tensors, batched, batch)(E.substitute(source.mask, bound)), torch.bool)
    allowed = torch.zeros((), dtype=torch.bool, device=dev) | allowed  # a constant made on the device
    dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
    score = (q.to(dtype) @ k.to(dtype).repeat_interleave(Hq // Hkv, 1).transpose(-1, -2)) * scale
    return masked_probs(score, allowed)


def masked_probs(score: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The softmax of ``score`` over the last dimension where ``allowed``, 0 on a row with none allowed."""
    return torch.softmax(score.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(nan=0.0)


def group_mean(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Probabilities ``[B, Hq, Nq, R]`` averaged over the query heads of each GQA group, broadcast back to every
    head of the group, not differentiated (a route's scores: one selection per KV head)."""
    B, Hq, Nq, R = probs.shape
    group = Hq // kv_heads
    return probs.detach().view(B, kv_heads, group, Nq, R).mean(2).repeat_interleave(group, 1)


__all__ = ["group_mean", "mask_only", "masked_probs", "pooled_probs"]
