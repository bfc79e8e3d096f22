"""The few collectives context parallelism needs, on torch.distributed (NCCL, gloo): the agreement
check that runs before any transfer, point-to-point steps, and all-to-all.

Every call that could fail on one rank only (a bad shape, a different pattern) is decided from
``agree``'s records, which every rank sees: every rank raises the same error, none waits forever
in a transfer the others never start.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...core.errors import SpecError


def agree(group, record: dict, where: str, wheres: dict | None = None) -> list[dict]:
    """Every rank's ``record`` (small, picklable), after checking that all are equal except the keys
    starting with ``_`` (per-rank facts). A record may carry ``error``: the first rank's error is
    raised on every rank. Mismatches name the first differing rank and field, and ``wheres[field]``
    (else ``where``) as what is at fault."""
    records: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, record, group=group)
    for rank, r in enumerate(records):
        if r.get("error"):
            message, at = r["error"]
            raise SpecError(f"rank {rank}: {message}", where=at)
    first = {k: v for k, v in records[0].items() if not k.startswith("_")}
    for rank, r in enumerate(records[1:], start=1):
        for key, value in first.items():
            if r.get(key) != value:
                raise SpecError(f"ranks disagree on the {key}: rank 0 has {value}, rank {rank} has {r.get(key)}",
                                where=(wheres or {}).get(key, where),
                                hint="every rank calls with the same pattern, shapes and options")
    return records


def raise_any(group, err: SpecError | None, device: torch.device) -> None:
    """Raise on every rank the first rank's ``err`` where any rank has one (found after the transfers began:
    the ranks that did not find it would otherwise wait in the next collective until the group's timeout).
    One all-reduce of a flag when no rank has one; the messages travel only when one has."""
    flag = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if int(flag.item()):
        agree(group, {"error": None if err is None else (err.message, err.where)}, err.where if err else "")


def global_rank(group, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def post(group, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]]) -> list:
    """Non-blocking point-to-point transfers by group rank; returns the handles to ``wait`` on."""
    works = [dist.irecv(buf, global_rank(group, src), group=group) for src, buf in recvs]
    works += [dist.isend(t.contiguous(), global_rank(group, dst), group=group) for dst, t in sends]
    return works


def wait(works: list) -> None:
    for w in works:
        w.wait()


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """``x [P, ...]``: slice j goes to rank j; returns the slices received, slice j from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # contiguous like x: empty_like of a permuted view would keep its strides
    dist.all_to_all_single(out, x, group=group)
    return out


def all_gather(x: torch.Tensor, group) -> list[torch.Tensor]:
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return parts


class AllGather(torch.autograd.Function):
    """``AllGather.apply(x, group)``: every rank's ``x`` stacked, ``[P, ...]`` in group rank order;
    differentiable. The backward is a reduce-scatter written as an all-to-all and a sum (each rank gets
    its slice of every rank's gradient): gloo has no reduce-scatter, and torch.distributed.nn's
    all_gather emulates it with scatters that take group ranks for global ones, failing in a subgroup
    (a ring group under USP)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return torch.stack(all_gather(x, group))

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.group).sum(0), None
