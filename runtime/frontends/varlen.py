"""Packed variable-length batches: ``attn(q, k, v, cu_seqlens=...)`` (the FlashAttention / fla convention).

q, k, v hold ``num_seqs`` sequences packed along the tokens of a batch of one (``[1, H, total, D]``;
``[1, total, H, D]`` under layout ``"bnhd"``); ``cu_seqlens`` is the 1-D integer tensor of cumulative
lengths ``[0, n_0, n_0 + n_1, ..., total]``. The result is exactly what running each sequence alone
gives: on a softmax pattern every sequence has its own positions (``q`` and ``k`` restart at 0, and
``n`` is the sequence's length); on a recurrence the state restarts at each boundary, from
``initial_state[i]`` (``[num_seqs, H, Dk, Dv]``, zeros when None), and ``return_state=True`` returns
one final state per sequence.

The schedule comes from the boundaries alone, without any work over token pairs: sequences of equal
length are gathered into one batch (``[count, H, length, D]``) and the module's ordinary forward runs
once per distinct length, so each length's plan is built once and cached per shape as usual. The
results are scattered back into the packed order (differentiable: gathers and one permutation).
Grid patterns are refused (a packed sequence has no grid extents). The offsets are read on the host
(one copy per call); under ``torch.compile`` (``fullgraph=True`` included) the packed call runs inside
the ``attnc::varlen_attention`` custom op (``runtime.varlen_op``), where that read is not traced.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from ...core import ir
from ...core.errors import SpecError
from ...core.recurrence_rules import RULES
from ..numerics import tied_to


@dataclass(frozen=True)
class Packing:
    """The sequences of a packed batch: their starts and lengths, and the groups of equal length."""

    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    groups: tuple[tuple[int, tuple[int, ...]], ...]  # (length, sequence indices), lengths > 0

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)


def check_cu_seqlens(cu_seqlens, pat, q: torch.Tensor, k: torch.Tensor) -> Packing:
    """Validate ``cu_seqlens`` against q, k (already ``[B, H, N, D]``) and return the packing; refused
    before any work with a ``SpecError`` naming ``cu_seqlens`` (or the tensor at fault)."""
    where = "argument cu_seqlens"
    if not isinstance(cu_seqlens, torch.Tensor):
        raise SpecError(f"expected a 1-D integer tensor, got {type(cu_seqlens).__name__}", where=where,
                        hint="torch.tensor([0, n0, n0 + n1, ...], dtype=torch.int32)")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise SpecError(f"expected an int32 or int64 tensor, got {cu_seqlens.dtype}", where=where)
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise SpecError(f"expected a 1-D tensor of at least 2 offsets, got shape {list(cu_seqlens.shape)}",
                        where=where)
    if cu_seqlens.device != q.device:
        raise SpecError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}", where=where)
    if isinstance(pat, ir.PatternIR) and (pat.queries.kind != "seq" or pat.keys.kind != "seq"):
        raise SpecError(f"'{pat.name}' lays its tokens on a grid; packed sequences have no grid extents",
                        where=where, hint="run each grid as its own batch entry instead")
    if isinstance(pat, ir.PatternIR) and (pat.queries.segments or pat.keys.segments):
        raise SpecError(f"'{pat.name}' concatenates segments ({pat.queries.describe()}) whose sizes fix the token "
                        "count; packed sequences have their own lengths", where=where,
                        hint="run each sequence as its own batch entry instead")
    if q.shape[0] != 1:
        raise SpecError(f"packed sequences come as a batch of 1, got batch {q.shape[0]}", where=where,
                        hint="concatenate the sequences along the tokens of one batch entry")
    total = int(q.shape[2])
    if k.shape[2] != total:
        raise SpecError(f"q has {total} tokens but k has {k.shape[2]}; one cu_seqlens splits both", where=where)
    offsets = [int(x) for x in cu_seqlens.tolist()]  # one device-to-host copy
    if offsets[0] != 0:
        raise SpecError(f"must start at 0, starts at {offsets[0]}", where=where)
    if offsets[-1] != total:
        raise SpecError(f"must end at the packed token count {total}, ends at {offsets[-1]}", where=where)
    for i, (a, b) in enumerate(pairwise(offsets)):
        if b < a:
            raise SpecError(f"must be non-decreasing: cu_seqlens[{i}] = {a} > cu_seqlens[{i + 1}] = {b}",
                            where=where)
    starts, lengths = tuple(offsets[:-1]), tuple(b - a for a, b in pairwise(offsets))
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        if n > 0:
            by_length.setdefault(n, []).append(i)
    return Packing(starts, lengths, tuple((n, tuple(ix)) for n, ix in sorted(by_length.items())))


def check_packed_inputs(pat, inputs: dict, total: int) -> None:
    """Call-time inputs of a packed call: a declared input's token dimensions (``n``, ``nk``) hold every
    packed token (``total``), with an optional leading batch of 1; errors name the input and the
    shape expected, before anything is cut."""
    for name, t in inputs.items():
        decl = next((d for d in pat.inputs if d.name == name), None)
        if decl is None or not isinstance(t, torch.Tensor):
            continue  # unknown names and non-tensors: the ordinary forward names them
        token_dims = decl.token_dims
        if not token_dims:
            continue
        rank = len(decl.dims)
        if t.dim() not in (rank, rank + 1):
            raise SpecError(f"input '{name}' is declared [{', '.join(decl.dim_names)}]: with cu_seqlens that is "
                            f"{_packed_shape(decl, total)} over the {total} packed tokens (or a batch of 1 of it); got shape "
                            f"{list(t.shape)}", where=f"argument {name}")
        lead = t.dim() - rank
        if lead and t.shape[0] != 1:
            raise SpecError(f"input '{name}' of shape {list(t.shape)} has batch {t.shape[0]}; packed sequences come "
                            f"as a batch of 1: {_packed_shape(decl, total)} (or [1, ...] of it)", where=f"argument {name}")
        for d in token_dims:
            if t.shape[lead + d] != total:
                raise SpecError(f"input '{name}' has {t.shape[lead + d]} entries along its token dimension "
                                f"({decl.dim_names[d]}); with cu_seqlens it holds every packed token: expected "
                                f"{_packed_shape(decl, total)}, got {list(t.shape)}", where=f"argument {name}")


def _packed_shape(decl, total) -> str:
    """An input's expected shape in a packed call, as text: written only on an error's path (under torch.compile
    ``total`` may be symbolic, and dynamo cannot trace str() of it)."""
    return "[" + ", ".join(str(total) if i in decl.token_dims else d for i, d in enumerate(decl.dim_names)) + "]"


def _gather_tokens(x: torch.Tensor, index: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """``[1, H, total, D]`` -> ``[count, H, length, D]``: the tokens of ``count`` sequences of one length."""
    return x[0].index_select(1, index).unflatten(1, (count, length)).transpose(0, 1)


def _gather_input(pat, name: str, t, packing: Packing, seqs: tuple[int, ...], length: int):
    """A call-time input for one group: its token dimensions (declared ``n`` or ``nk``) cut to each
    sequence and stacked along a new batch dimension; inputs without token dimensions pass unchanged."""
    decl = next((d for d in pat.inputs if d.name == name), None)
    if decl is None or not isinstance(t, torch.Tensor):
        return t  # unknown names and bad values: the ordinary forward names them
    token_dims = decl.token_dims
    batched = t.dim() == len(decl.dims) + 1
    if batched:
        if t.shape[0] != 1:
            raise SpecError(f"input '{name}' has batch {t.shape[0]}; packed sequences come as a batch of 1",
                            where=f"argument {name}")
        t = t[0]
    if not token_dims:
        return t
    if t.dim() != len(decl.dims):
        return t  # wrong rank: bind_inputs reports it
    pieces = []
    for s in seqs:
        piece = t
        for d in token_dims:
            piece = piece.narrow(d, packing.starts[s], length)
        pieces.append(piece)
    return torch.stack(pieces)


def run(forward, pat, packing: Packing, q, k, v, *, scale, return_lse: bool, initial_state, return_state: bool,
        sizes, **inputs):
    """The packed call: ``forward`` (the module's ``_forward``) once per group of equal lengths, the
    results put back in packed order. Returns what ``forward`` returns for the packed batch of one."""
    recurrence = isinstance(pat, ir.RecurrenceIR)
    if recurrence and initial_state is not None:
        rows = RULES[pat.rule].state_rows * q.shape[3]  # Titans: the memory's rows, then its momentum's
        want = (packing.num_seqs, max(q.shape[1], v.shape[1]), rows, v.shape[3])  # GVA: v's heads
        if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
            got = list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
            raise SpecError(f"with cu_seqlens, initial_state is one state per sequence, {list(want)}; got {got}",
                            where="argument initial_state")
    outs, lses, states, positions, order = [], [], [], [], []
    for length, seqs in packing.groups:
        count = len(seqs)
        index = (torch.tensor([packing.starts[s] for s in seqs], device=q.device).unsqueeze(1)
                 + torch.arange(length, device=q.device)).flatten()
        gq, gk, gv = (_gather_tokens(x, index, count, length) for x in (q, k, v))
        ginputs = {name: _gather_input(pat, name, t, packing, seqs, length) for name, t in inputs.items()}
        s0 = None if initial_state is None else initial_state[list(seqs)]
        result = forward(gq, gk, gv, scale=scale, return_lse=return_lse, initial_state=s0,
                         return_state=return_state, sizes=sizes, **ginputs)
        out = result[0] if (return_lse or return_state) else result
        outs.append(out.transpose(0, 1).flatten(1, 2))  # [H, count * length, Dv]
        if return_lse:
            lses.append(result[1].transpose(0, 1).flatten(1, 2))
        if return_state:
            states.append(result[1])
            order.extend(seqs)
        positions.append(index)
    H, total = max(q.shape[1], v.shape[1]), q.shape[2]
    if outs:
        inverse = torch.empty(total, dtype=torch.long, device=q.device)
        inverse[torch.cat(positions)] = torch.arange(total, device=q.device)
        out = torch.cat(outs, dim=1)[:, inverse].unsqueeze(0)
        lse = torch.cat(lses, dim=1)[:, inverse].unsqueeze(0) if return_lse else None
    else:  # every sequence is empty: empty results, differentiable as any call's (zero gradients)
        out = tied_to(q.new_zeros(1, H, 0, v.shape[3]), q, k, v, initial_state, *inputs.values())
        lse = q.new_zeros(1, H, 0, dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
    if return_lse:
        return out, lse
    if not (recurrence and return_state):
        return out
    return out, _final_states(packing, states, order, initial_state, q, v)


def _final_states(packing: Packing, states: list, order: list, initial_state, q, v) -> torch.Tensor:
    """One final state per sequence, in sequence order; an empty sequence keeps its initial state."""
    from ..numerics import compute_dtype

    dtype = states[0].dtype if states else compute_dtype(q.dtype)
    empty = [i for i, n in enumerate(packing.lengths) if n == 0]
    if empty:
        kept = (q.new_zeros(len(empty), max(q.shape[1], v.shape[1]), q.shape[3], v.shape[3], dtype=dtype) if initial_state is None
                else initial_state[empty].to(dtype))
        states, order = [*states, kept], [*order, *empty]
    stacked = torch.cat(states)
    inverse = torch.empty(len(order), dtype=torch.long, device=stacked.device)
    inverse[torch.tensor(order, device=stacked.device)] = torch.arange(len(order), device=stacked.device)
    return stacked[inverse]
