"""The reference backend: dense, exact, differentiable, slow. The one source
of truth later backends are tested against.

Softmax patterns: ``softmax(scale * q.k -> softcap + bias + decay, masked) @ v``
on the full [B, H, Nq, Nk] score matrix; a query with no allowed key gives 0
and lse -inf. Recurrences: the step-by-step loop of spec/REFERENCE.md's Recurrences section.
Computation is in float64 for float64 inputs and float32 otherwise.
"""

from __future__ import annotations

import math

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.weights import log_weights
from ....core import ir
from ...numerics import accumulated, compute_dtype, expand_kv, fox_decay, row_weights, soft_capped
from ...plan import block_max, routing


def attention(
    pat: ir.PatternIR,
    bound: E.Bound,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: dict,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, Hq, Nq, Dv] in q's dtype, lse [B, Hq, Nq] in the compute dtype). Tensors on
    another device (CUDA) are evaluated on the CPU, the oracle every backend is tested against, and
    the results (and gradients, through the copies) come back on q's device."""
    if q.device.type != "cpu":
        host = {name: t.cpu() if isinstance(t, torch.Tensor) else t for name, t in inputs.items()}
        out, lse = attention(pat, bound, q.cpu(), k.cpu(), v.cpu(), host, scale)
        return out.to(q.device), lse.to(q.device)
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    dt = compute_dtype(q.dtype)
    qc, kc, vc = q.to(dt), expand_kv(k.to(dt), Hq), expand_kv(v.to(dt), Hq)
    ev = E.evaluator(pat, bound, {n: accumulated(t) for n, t in inputs.items()}, batch=B)
    mask = pair_mask(pat, bound, ev, Hq, Nq, Nk)
    if pat.route is not None:
        mask = routing.select_blocks(pat, bound, q, k, mask, inputs)
    scores = pair_scores(pat, bound, ev, qc, kc, scale, torch.arange(Nq) + bound.q_offset, torch.arange(Nk),
                         torch.arange(Hq), mask)
    # a row with no key of nonzero weight (masked, or every key behind a FoX reset): lse -inf, and
    # logsumexp never sees the all -inf row (its backward would give nan)
    empty = torch.isneginf(scores).all(-1)
    lse = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, -math.inf)
    p = row_weights(scores, mask, empty)
    size = block_max.requested(p.shape[-2], p.shape[-1])
    if size is not None:  # return_block_max: the map of these probabilities
        block_max.record(block_max.from_probabilities(p, size))
    out = attend_values(p, vc)
    return out.to(q.dtype), lse


#: Weights x value entries held at once when non-finite value rows are added one group at a time.
NONFINITE_SLAB = 1 << 24


def attend_values(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``p @ v``, except that a value row reaches only the queries that give it a nonzero weight: a
    non-finite value (NaN, inf) of a key a query does not attend never changes that query's output
    (in ``p @ v`` its weight 0 would multiply it into NaN). Rows with non-finite entries are few in
    practice; they are added apart, where their weight is nonzero."""
    bad = ~torch.isfinite(v).all(-1)  # [B, H, Nk]
    if not bad.any():
        return p @ v
    out = p @ torch.where(bad[..., None], torch.zeros((), dtype=v.dtype), v)
    keys = bad.flatten(0, -2).any(0).nonzero().flatten()
    B, H, Nq, D = *p.shape[:3], v.shape[-1]
    step = max(1, NONFINITE_SLAB // max(1, B * H * Nq * D))
    for i in range(0, len(keys), step):
        j = keys[i:i + step]
        w = p[..., j][..., None]  # [B, H, Nq, c, 1]
        rows = torch.where(bad[..., j, None], v[..., j, :], torch.zeros((), dtype=v.dtype))[:, :, None]
        out = out + torch.where(w != 0, w * rows, torch.zeros((), dtype=v.dtype)).sum(-2)
    return out


def pair_mask(pat: ir.PatternIR, bound: E.Bound, ev: E.Evaluator, heads: int, nq: int, nk: int) -> torch.Tensor:
    """The pattern's mask over the evaluator's positions, bool ``[B | 1, heads, nq, nk]``."""
    return torch.broadcast_to(E.as_tensor(ev(E.substitute(pat.mask, bound)), torch.bool), (ev.batch or 1, heads, nq, nk))


def pair_scores(pat: ir.PatternIR, bound: E.Bound, ev: E.Evaluator, q: torch.Tensor, k: torch.Tensor, scale: float,
                q_pos: torch.Tensor, k_pos: torch.Tensor, head_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The scores of queries at absolute positions ``q_pos`` against keys at ``k_pos`` (any subsets of
    the sequence, e.g. one rank's shards) for the heads ``head_index`` of the pattern, in q's dtype,
    ``[B, H, Nq, Nk]``, -inf where ``mask`` (``pair_mask``, route selection applied) is False.
    ``q``/``k`` ``[B, H, N, D]`` (k with H heads); ``ev``: an evaluator over these positions and heads
    (it may hold its tensors on the CPU while q, k are on a GPU: its terms are moved to q's device)."""
    scores = scale * (q @ k.transpose(-1, -2))
    if pat.softcap is not None:
        scores = soft_capped(scores, softcap_values(pat, bound, head_index, torch.float64))
    bias = E.score_bias(pat, bound, ev, mask)  # input indices read (and checked) on attended pairs only
    if bias is not None:
        scores = scores + (bias.to(scores) if isinstance(bias, torch.Tensor) else bias)
    if pat.decay is not None:  # gates are indexed by absolute position, and head (a Ulysses share's heads)
        gates = ev.inputs[pat.decay]
        gates = gates.index_select(-2, head_index.to(gates.device)) if gates.shape[-2] != len(head_index) else gates
        scores = scores + fox_decay(gates.to(q.dtype), q_pos, k_pos).to(scores.device)
    if pat.weights is not None:  # weights F(s) ** P: the softmax of their logarithms
        scores = log_weights(pat.weights, scores)
    return scores.masked_fill(~mask.to(scores.device), -math.inf)


def softcap_values(pat: ir.PatternIR, bound: E.Bound, head_index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The softcap of each head in ``head_index``, ``[1, H, 1, 1]``."""
    cap = E.head_values(pat.softcap, bound.subs, bound.heads).to(dtype)
    return cap[head_index.cpu()].view(1, -1, 1, 1)
