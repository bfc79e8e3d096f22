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

from ...core.errors import SpecError
from ..numerics import compute_dtype
from ..recurrences.common import bind, gate_tensor


def token_dim(pat, name: str, t) -> int | None:
    """The token dimension of call-time input ``name`` as given (a leading batch dimension counted),
    or None (not a tensor, not declared, or no token dimension)."""
    decl = {d.name: d for d in pat.inputs}.get(name)
    if decl is None or not isinstance(t, torch.Tensor):
        return None
    return decl.token_dims[0] + (t.dim() - len(decl.dims)) if decl.token_dims else None


def refuse_gva(q, v) -> None:
    if v.shape[1] > q.shape[1]:
        raise SpecError(f"v has {v.shape[1]} heads and q {q.shape[1]}: grouped value attention (GVA) does not run "
                        "across ranks yet", where="argument v",
                        hint="repeat q and k per value head, or run on one device")


def check_parts(pat, inputs: dict, n: int, world: int, device) -> None:
    """The call-time inputs of one rank, before the ranks agree (what only this rank's tensors can get
    wrong): each tensor on q's device and holding data, and along its token dimension either this
    rank's ``n // world`` tokens or all ``n``."""
    part = n // world
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and (t.is_meta or t.device != device):
            raise SpecError(f"input '{name}' is on {t.device}, q on {device}"
                            + (": a meta tensor holds no data" if t.is_meta else ""), where=f"argument {name}",
                            hint="pass every input on q's device")
        dim = token_dim(pat, name, t)
        if dim is not None and 0 <= dim < t.dim() and t.shape[dim] not in (n, part):
            raise SpecError(f"has {t.shape[dim]} tokens along dimension {dim}; expected this rank's {part} "
                            f"or all {n}", where=f"argument {name}")


def local_inputs(rec, inputs: dict, n: int, rank: int, world: int) -> dict:
    """Each gate input as this rank's part: given whole (sliced here) or already its part (``check_parts``)."""
    out = {}
    part = n // world
    for name, t in inputs.items():
        dim = token_dim(rec, name, t)
        if dim is not None and 0 <= dim < t.dim() and t.shape[dim] == n and part != n:
            t = t.narrow(dim, rank * part, part)
        out[name] = t
    return out


def local_call(attn, q, v, inputs: dict, sizes: dict, rank: int, world: int) -> dict:
    """This rank's part of a recurrence call, checked before the ranks agree (``ContextParallel`` puts
    the error in its agreement record, so that every rank raises it before any collective): grouped
    value attention (refused), each input's part, and the call bound as every backend binds it
    (``recurrences.common.bind``: sizes, inputs and the delta rule's gates). Returns the local inputs."""
    rec = attn.pattern
    B, H, T, Dk = q.shape
    refuse_gva(q, v)
    n = T * world
    check_parts(rec, inputs, n, world, q.device)
    local = local_inputs(rec, inputs, n, rank, world)
    bind(rec, sizes, local, n=T, heads=H, dk=Dk, batch=B, device=q.device)
    return local


def chained_recurrence(attn, group, rank: int, world: int, q, k, v, inputs: dict, sizes: dict, scale: float):
    """(this rank's output, bytes it sent) of the recurrence ``attn`` over the ranks of ``group``. The
    call was checked on every rank (``local_call``) before the ranks agreed: nothing that can fail on
    one rank only is left between its collectives."""
    rec = attn.pattern
    B, H, T, Dk = q.shape
    refuse_gva(q, v)
    local = local_inputs(rec, inputs, T * world, rank, world)
    out0, state0, _ = attn.runner.run(q, k, v, local, sizes, scale, None)
    if world == 1:
        return out0, 0
    dt = compute_dtype(q.dtype)
    if rec.rule == "delta":  # A from the identity entering with zero values: S_out = A I + 0
        eye = torch.eye(Dk, dtype=dt, device=q.device).expand(B, H, Dk, Dk).contiguous()
        zeros = torch.zeros(B, k.shape[1], T, Dk, dtype=v.dtype, device=v.device)
        _, decay, _ = attn.runner.run(q, k, zeros, local, sizes, scale, eye)  # [B, H, Dk, Dk]
    else:
        bound, tensors = bind(rec, sizes, local, n=T, heads=H, dk=Dk, batch=B, device=q.device)
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
