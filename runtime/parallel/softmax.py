"""Softmax attention over a ring of ranks: each rank's queries against the keys of the ranks it
needs (``pairs.PairPlan``), merged by log-sum-exp; one autograd function, forward and backward.

``kv="ring"``: at step t rank i sends its keys and values to rank i + t and receives those of rank
i - t, only where the plan says the receiver needs them; step t + 1's transfer is in flight while
step t is computed. The backward sends the keys again the same way and each dk, dv share back to
its owner. ``kv="allgather"``: every rank gathers every rank's keys at once (one collective; the
backward reuses them) and computes only the needed pairs; the dk, dv shares go back by one
all-to-all that carries nothing between ranks that share no pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ...core.errors import SpecError
from ..numerics import compute_dtype, merge_by_lse
from . import collectives as C
from .blocks import BlockProblem, block_backward, block_forward
from .pairs import PairPlan


@dataclass
class RingCall:
    """One call's fixed facts: the block problem, the plan, this rank's ring position, the ring's
    process group (None: a ring of one), the mode, and the bytes this rank sent (filled in)."""

    problem: BlockProblem
    plan: PairPlan
    index: int
    group: object
    kv: str
    #: the whole context-parallel group (every ring and Ulysses rank): where a block's error is agreed on
    whole_group: object = None
    sent: dict = field(default_factory=lambda: {"forward": 0, "backward": 0})
    gathered_k: list | None = None  # all-gather mode: every ring position's keys and values
    gathered_v: list | None = None

    @property
    def need_self(self) -> bool:
        """This rank's queries read its own keys."""
        return bool(self.plan.need[self.index, self.index])

    @property
    def ring(self) -> int:
        return self.plan.order.ring

    def positions(self, j: int) -> torch.Tensor:
        return self.plan.order.positions(j)

    def steps(self):
        """(t, destination of my keys or None, source of keys I need or None) per ring step."""
        i, r = self.index, self.ring
        for t in range(1, r):
            dst, src = (i + t) % r, (i - t) % r
            yield t, (dst if self.plan.need[dst, i] else None), (src if self.plan.need[i, src] else None)


def _buffer(t: torch.Tensor) -> torch.Tensor:
    """A contiguous receive buffer for a tensor like ``t`` (``empty_like`` keeps a view's strides)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _post_kv(call: RingCall, k, v, dst, src, what: str):
    sends = [] if dst is None else [(dst, k), (dst, v)]
    bufs = None if src is None else (_buffer(k), _buffer(v))
    recvs = [] if src is None else [(src, bufs[0]), (src, bufs[1])]
    if dst is not None:
        call.sent[what] += k.nbytes + v.nbytes
    return C.post(call.group, sends, recvs), bufs


def _key_blocks(call: RingCall, k, v, what: str):
    """Yields (source ring position, its k, its v) for every source this rank needs, its own first;
    in ring mode the next step's transfer is posted before the current block is handed out."""
    i = call.index
    if call.need_self:
        yield i, k, v
    if call.ring == 1:
        return
    if call.kv == "allgather":
        for j in call.plan.sources(i):
            if j != i:
                yield j, call.gathered_k[j], call.gathered_v[j]
        return
    steps = list(call.steps())
    pending = _post_kv(call, k, v, steps[0][1], steps[0][2], what)
    for n, (_, _, src) in enumerate(steps):
        works, bufs = pending
        C.wait(works)
        if n + 1 < len(steps):
            pending = _post_kv(call, k, v, steps[n + 1][1], steps[n + 1][2], what)
        if src is not None:
            yield src, bufs[0], bufs[1]


class RingAttention(torch.autograd.Function):
    """``(out in q's dtype, lse in the compute dtype)`` of this rank's queries ``[B, H, L, D]``.
    ``RingAttention.apply(q, k, v, call, *inputs)``: ``inputs`` are the whole call-time inputs named by
    ``call.problem.grad_inputs`` (the problem holds detached copies), given so that their gradients
    (this rank's queries' share) flow back to them."""

    @staticmethod
    def forward(ctx, q, k, v, call: RingCall, *inputs):
        if call.kv == "allgather" and call.ring > 1:
            call.gathered_k, call.gathered_v = C.all_gather(k, call.group), C.all_gather(v, call.group)
            call.sent["forward"] += (call.ring - 1) * (k.nbytes + v.nbytes)
        dt = compute_dtype(q.dtype)
        B, H, L, _ = q.shape
        out = torch.zeros(B, H, L, v.shape[-1], dtype=dt, device=q.device)
        lse = torch.full((B, H, L), -math.inf, dtype=dt, device=q.device)
        q_pos = call.positions(call.index)
        found = None  # a block's error (an input indexed out of range at a pair only this rank's queries attend)
        for j, kj, vj in _key_blocks(call, k, v, "forward"):
            if found is not None:
                continue  # the ring's transfers still run, so that the other ranks are not left waiting
            try:
                part, part_lse = block_forward(call.problem, q, kj, vj, q_pos, call.positions(j))
            except SpecError as err:
                found = err
                continue
            out, lse = merge_by_lse(out, lse, part, part_lse)
        # one rank's error is every rank's: none goes on to the next collective (a Ulysses all-to-all, the
        # backward's ring) while another has raised
        C.raise_any(call.whole_group, found, q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call = call
        ctx.input_places = [(t.device, t.dtype) for t in inputs]
        ctx.set_materialize_grads(False)  # dlse is None unless the lse was used
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call: RingCall = ctx.call
        i, dt = call.index, compute_dtype(q.dtype)
        dout = torch.zeros(out.shape, dtype=q.dtype, device=q.device) if dout is None else dout
        delta = (dout.to(dt) * out).sum(-1)  # the lse's gradient (dlse) joins it in each block's backward
        q_pos = call.positions(i)
        dq = torch.zeros(q.shape, dtype=dt, device=q.device)
        dk, dv = torch.zeros(k.shape, dtype=dt, device=q.device), torch.zeros(v.shape, dtype=dt, device=q.device)
        shares: dict[int, tuple] = {}  # ring position -> (dk, dv) of its keys computed here
        d_inputs: dict = {}
        for j, kj, vj in _key_blocks(call, k, v, "backward"):
            dq_j, dk_j, dv_j = block_backward(call.problem, q, kj, vj, q_pos, call.positions(j), lse, dout, delta,
                                              out, d_inputs, dlse)
            dq += dq_j
            if j == i:
                dk += dk_j
                dv += dv_j
            else:
                shares[j] = (dk_j, dv_j)
        # the shares go back to their owners only after every key transfer finished: each pair of
        # ranks then carries one message sequence per phase, matched in order (NCCL has no tags)
        if call.ring > 1:
            back = _return_ring(call, shares, dk, dv) if call.kv == "ring" else _return_shares(call, shares, dk, dv)
            dk += back[0]
            dv += back[1]
        grads = [None if name not in d_inputs else d_inputs[name].to(device=device, dtype=dtype)
                 for name, (device, dtype) in zip(call.problem.grad_inputs, ctx.input_places, strict=True)]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, *grads


def _return_ring(call: RingCall, shares: dict, dk: torch.Tensor, dv: torch.Tensor):
    """Ring mode: at step t the share of ring position i - t's keys goes back to it, and the share of
    this rank's keys comes from i + t (where it needed them); returns the sum of the latter."""
    sends, recvs, bufs = [], [], []
    for _, dst, src in call.steps():
        if src is not None:
            sends += [(src, shares[src][0]), (src, shares[src][1])]
            call.sent["backward"] += shares[src][0].nbytes + shares[src][1].nbytes
        if dst is not None:
            bufs.append((_buffer(dk), _buffer(dv)))
            recvs += [(dst, bufs[-1][0]), (dst, bufs[-1][1])]
    C.wait(C.post(call.group, sends, recvs))
    return sum((a for a, _ in bufs), torch.zeros_like(dk)), sum((b for _, b in bufs), torch.zeros_like(dv))


def _return_shares(call: RingCall, shares: dict, dk: torch.Tensor, dv: torch.Tensor):
    """All-gather mode: each rank's dk, dv shares to their owners by one all-to-all whose splits are
    empty between ranks that share no pair; returns the sum of the shares of this rank's keys."""
    i, r = call.index, call.ring
    size = dk.numel() + dv.numel()
    send = [torch.cat([shares[j][0].flatten(), shares[j][1].flatten()]) for j in range(r) if j in shares]
    send_sizes = [size if j in shares else 0 for j in range(r)]
    recv_from = [j for j in range(r) if j != i and bool(call.plan.need[j, i])]
    recv_sizes = [size if j in recv_from else 0 for j in range(r)]
    flat = torch.cat(send) if send else dk.new_zeros(0)
    out = dk.new_empty(sum(recv_sizes))
    dist.all_to_all_single(out, flat, recv_sizes, send_sizes, group=call.group)
    call.sent["backward"] += flat.nbytes
    got = out.view(len(recv_from), size) if recv_from else out.view(0, size)
    total = got.sum(0) if recv_from else dk.new_zeros(size)
    return total[:dk.numel()].view_as(dk), total[dk.numel():].view_as(dv)
