"""Recurrences across ranks: each rank runs its contiguous part of the sequence; the state entering
it is the exclusive prefix, over the ranks before it, of their final states.

A part's final state is affine in the state entering it: ``S_out = A S_in + S_0`` where ``S_0`` is the
part's final state from zeros. Under the decay rule ``A = diag(exp(sum of its log gates))``; under
the delta rule ``A`` is a full ``[Dk, Dk]`` matrix (the product of the parts' ``(I - beta k^T k)``
and decays), obtained by running the part once more from the identity with zero values. Every rank
runs its part from zeros, the (``S_0``, ``A``) of all ranks are all-gathered
(differentiable: the backward sums each rank's gradient back to its owner), each rank folds those
before it into its entering state and runs its part again from that state. Two local passes on every
rank but the first, no serial chain: the ranks wait for one all-gather, not for each other.
"""

from __future__ import annotations

import torch
import torch.distributed.nn.functional as dist_fn

from ...compiler import evaluate as E
from ...core.errors import SpecError
from ..numerics import compute_dtype
from ..recurrences.common import gate_tensor


def token_dim(pat, name: str, t) -> int | None:
    """The token dimension of call-time input ``name`` as given (a leading batch dimension counted),
    or None (not a tensor, not declared, or no token dimension)."""
    decl = {d.name: d for d in pat.inputs}.get(name)
    if decl is None or not isinstance(t, torch.Tensor):
        return None
    return decl.token_dims[0] + (t.dim() - len(decl.dims)) if decl.token_dims else None


def local_inputs(rec, inputs: dict, n: int, rank: int, world: int) -> dict:
    """Each gate input as this rank's part: given whole (sliced here) or already its part."""
    out = {}
    part = n // world
    for name, t in inputs.items():
        dim = token_dim(rec, name, t)
        if dim is not None:
            if t.shape[dim] == n:
                t = t.narrow(dim, rank * part, part)
            elif t.shape[dim] != part:
                raise SpecError(f"has {t.shape[dim]} tokens along dimension {dim}; expected this rank's {part} "
                                f"or all {n}", where=f"argument {name}")
        out[name] = t
    return out


def chained_recurrence(attn, group, rank: int, world: int, q, k, v, inputs: dict, sizes: dict, scale: float):
    """(this rank's output, bytes it sent) of the recurrence ``attn`` over the ranks of ``group``."""
    rec = attn.pattern
    B, H, T, Dk = q.shape
    if v.shape[1] > H:
        raise SpecError(f"v has {v.shape[1]} heads and q {H}: grouped value attention (GVA) does not run across "
                        "ranks yet", where="argument v", hint="repeat q and k per value head, or run on one device")
    n = T * world
    local = local_inputs(rec, inputs, n, rank, world)
    out0, state0, _ = attn.runner.run(q, k, v, local, sizes, scale, None)
    if world == 1:
        return out0, 0
    dt = compute_dtype(q.dtype)
    if rec.rule == "delta":  # A from the identity entering with zero values: S_out = A I + 0
        eye = torch.eye(Dk, dtype=dt, device=q.device).expand(B, H, Dk, Dk).contiguous()
        zeros = torch.zeros(B, k.shape[1], T, Dk, dtype=v.dtype, device=v.device)
        _, decay, _ = attn.runner.run(q, k, zeros, local, sizes, scale, eye)  # [B, H, Dk, Dk]
    else:
        bound = E.bind_sizes(rec, n=T, heads=H, sizes=sizes, dk=Dk)
        tensors, _ = E.bind_inputs(rec, bound, local, batch=B, device=q.device)
        decay = torch.exp(gate_tensor(rec, bound, tensors, B, H, T, dt, q.device).sum(2))[..., None]  # [B,H,1|Dk,1]
    states = dist_fn.all_gather(state0.to(dt).contiguous(), group=group)
    decays = dist_fn.all_gather(decay.contiguous(), group=group)
    sent = (world - 1) * (state0.to(dt).nbytes + decay.nbytes)
    if rank == 0:
        # the first part enters from zeros; the zero-weight term keeps the all-gathers in its
        # autograd graph, so its backward joins the collectives the other ranks' backwards run
        tie = sum(t.sum() for t in (*states, *decays)) * 0
        return out0 + tie.to(out0.dtype), sent
    entering = torch.zeros_like(states[0])
    for j in range(rank):
        entering = (decays[j] @ entering if rec.rule == "delta" else decays[j] * entering) + states[j]
    out, _, _ = attn.runner.run(q, k, v, local, sizes, scale, entering)
    return out, sent
