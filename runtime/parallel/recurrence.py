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

With Ulysses (``ulysses_degree`` u > 1) the heads of a recurrence are independent: an all-to-all trades
each rank's tokens of every head for its Ulysses group's tokens of a share of the heads (``ulysses``),
the per-head gate inputs with them (``ulysses_inputs``), so that each rank holds whole sequences of its
heads (a head gate's expression is read at the share's absolute heads, ``share_runner``). With u equal
to the group's size nothing is chained; with u smaller (USP) the chain above runs across the ring
positions only, on each rank's share of the heads. ``kv=`` does not change a recurrence: no keys travel,
the states move in the one all-gather whatever the mode.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from ..checks import state_heads
from ..numerics import compute_dtype
from ..recurrences.common import bind
from ..recurrences.rules import apply_entering, rule_of
from .collectives import AllGather
from .ulysses import Swap


def token_dim(pat, name: str, t) -> int | None:
    """The token dimension of call-time input ``name`` as given (a leading batch dimension counted),
    or None (not a tensor, not declared, or no token dimension)."""
    decl = {d.name: d for d in pat.inputs}.get(name)
    if decl is None or not isinstance(t, torch.Tensor):
        return None
    return decl.token_dims[0] + (t.dim() - len(decl.dims)) if decl.token_dims else None


def head_dim(pat, name: str, t) -> int | None:
    """The head dimension of call-time input ``name`` as given (a leading batch dimension counted), or
    None (not a tensor, not declared, or no dimension sized ``heads``)."""
    decl = {d.name: d for d in pat.inputs}.get(name)
    if decl is None or not isinstance(t, torch.Tensor) or "heads" not in decl.dim_names:
        return None
    return decl.dim_names.index("heads") + (t.dim() - len(decl.dims))


def refuse_gva(q, v) -> None:
    """Grouped value attention (the delta rule's v with more heads than q) is not chained across ranks:
    the chain's transition is run from an identity of q's heads. Ulysses over the whole group (no chain)
    runs it."""
    if v.shape[1] > q.shape[1]:
        raise SpecError(f"v has {v.shape[1]} heads and q {q.shape[1]}: grouped value attention (GVA) is not "
                        "chained across ranks yet", where="argument v",
                        hint="pass ulysses_degree equal to the group's size (each rank then runs whole sequences "
                             "of its heads, no chain), repeat q and k per value head, or run on one device")


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


def local_call(attn, q, v, inputs: dict, sizes: dict, rank: int, world: int, ulysses: int = 1) -> dict:
    """This rank's part of a recurrence call, checked before the ranks agree (``ContextParallel`` puts
    the error in its agreement record, so that every rank raises it before any collective): grouped
    value attention (refused where a chain runs: ``world // ulysses`` ring positions), each input's
    part, and the call bound as every backend binds it (``recurrences.common.bind``: sizes, inputs
    with every head, and the delta rule's gates in this rank's tokens; under Ulysses the ranks of a
    group check their own tokens, which together are all the tokens the all-to-all brings). Returns
    the local inputs."""
    rec = attn.pattern
    B, _, T, Dk = q.shape
    if world // ulysses > 1:
        refuse_gva(q, v)
    n = T * world
    check_parts(rec, inputs, n, world, q.device)
    local = local_inputs(rec, inputs, n, rank, world)
    bind(rec, sizes, local, n=T, heads=state_heads(q, v), dk=Dk, batch=B, device=q.device)
    return local


def share_runner(runner, first: int, heads: int):
    """The runner of a Ulysses share of a recurrence's heads, numbered from 0 on the share: the same
    runner where the gate does not read the head, else a copy whose head-gate expression reads head
    ``h + first`` of ``heads`` (RetNet's and Lightning's decays depend on h and on the head count)."""
    rec = runner.pattern
    if rec.gate != "head" or not rec.decay.free_symbols & {S.H, S.HEADS}:
        return runner
    decay = rec.decay.subs({S.H: S.H + first, S.HEADS: heads}, simultaneous=True)
    share = copy.copy(runner)  # registers its own op key: the attention's runner is left untouched
    share.pattern = dataclasses.replace(rec, decay=decay)
    return share


def swap_input(t: torch.Tensor, hdim: int, tdim: int, group, u: int) -> torch.Tensor:
    """A per-head input's part (this rank's tokens, every head) as this rank's share of the heads over the
    Ulysses group's tokens: the all-to-all of q (``Swap``) on the tensor with its head and token
    dimensions first and everything else (batch, dk) flattened behind; differentiable."""
    x = t.movedim((hdim, tdim), (0, 1))
    rest = x.shape[2:]
    y = Swap.apply(x.reshape(1, x.shape[0], x.shape[1], -1), group, u, True)
    return y.reshape(y.shape[1], y.shape[2], *rest).movedim((0, 1), (hdim, tdim))


def ulysses_inputs(rec: ir.RecurrenceIR, inputs: dict, n: int, ring_index: int, ring: int, u: int, j: int,
                   group) -> tuple[dict, int]:
    """The call-time inputs of Ulysses rank ``j`` of ring position ``ring_index`` (``ring`` positions of
    ``u`` ranks over ``n`` tokens), and the bytes this rank sent for them. Each input covers the ring
    position's tokens and, where it has a head dimension (a gate or rate ``[heads, n]``), the rank's share
    of the heads, as q after the all-to-all: a part (this rank's tokens, ``check_parts``) with heads goes
    through the same all-to-all; a part without heads is gathered from the Ulysses group (every head reads
    it); a whole input is sliced here, nothing sent. All differentiable."""
    span = n // ring
    out, sent = {}, 0
    for name, t in inputs.items():
        tdim, hdim = token_dim(rec, name, t), head_dim(rec, name, t)
        if tdim is not None and not 0 <= tdim < t.dim():
            tdim = None
        if hdim is not None and not 0 <= hdim < t.dim():
            hdim = None
        if tdim is not None and t.shape[tdim] != n:  # this rank's part of the tokens
            if hdim is not None:
                sent += t.nbytes * (u - 1) // u
                t = swap_input(t, hdim, tdim, group, u)
            else:
                sent += t.nbytes * (u - 1)
                t = torch.cat(AllGather.apply(t, group).unbind(0), dim=tdim)
        else:
            if tdim is not None:
                t = t.narrow(tdim, ring_index * span, span)
            if hdim is not None:
                share = t.shape[hdim] // u
                t = t.narrow(hdim, j * share, share)
        out[name] = t
    return out, sent


def chained_recurrence(attn, group, rank: int, world: int, q, k, v, inputs: dict, sizes: dict, scale: float,
                       runner=None):
    """(this rank's output, bytes it sent) of the recurrence ``attn`` over the ranks of ``group``. The
    call was checked on every rank (``local_call``) before the ranks agreed: nothing that can fail on
    one rank only is left between its collectives. ``runner``: what runs the parts (a Ulysses share's,
    ``share_runner``), else the attention's; with ``world`` 1 the part is the whole sequence, no chain."""
    runner = attn.runner if runner is None else runner
    rec = runner.pattern
    B, H, T, Dk = q.shape
    if world > 1:
        refuse_gva(q, v)
    local = local_inputs(rec, inputs, T * world, rank, world)
    out0, state0, _ = runner.run(q, k, v, local, sizes, scale, None)
    if world == 1:
        return out0, 0
    dt = compute_dtype(q.dtype)
    # how this part's final state depends on the state it enters with: S_out = A(S_in) + state0
    kind, decay = rule_of(rec).entering_map(
        lambda k_, v_, s0: runner.run(q, k_, v_, local, sizes, scale, s0)[1],
        lambda: bind(rec, sizes, local, n=T, heads=H, dk=Dk, batch=B, device=q.device), rec, q, k, v, dt)
    states = AllGather.apply(state0.to(dt), group)  # [world, B, H, Dk, Dv]
    decays = AllGather.apply(decay, group)
    sent = (world - 1) * (state0.to(dt).nbytes + decay.nbytes)
    if rank == 0:
        # the first part enters from zeros; the zero-weight term keeps the all-gathers in its
        # autograd graph, so its backward joins the collectives the other ranks' backwards run
        tie = (states.sum() + decays.sum()) * 0
        return out0 + tie.to(out0.dtype), sent
    entering = torch.zeros_like(states[0])
    for j in range(rank):
        entering = apply_entering(kind, decays[j], entering) + states[j]
    out, _, _ = runner.run(q, k, v, local, sizes, scale, entering)
    return out, sent
