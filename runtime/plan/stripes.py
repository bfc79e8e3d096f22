"""AnchorAttention's stripes by anchor (``route stripes(THETA) blocks(B) groups(G) keep REGION``): one function for
the host's selection and the device's (``forms/stripes_by_anchor.py``), no host read.

Per batch row and query head, with scores ``q . k / sqrt(dk)`` (K/V heads read by their query heads), fp32 (fp64
for fp64 inputs):

1. a query's anchor is its largest score over its region, the keys the mask allows and ``keep`` holds (-inf where
   it has none);
2. a block of B queries (``q // B``; the last may be shorter) scores every key column with its mean query; a column
   passes where that score plus THETA is at least the block's mean anchor (over its queries that have one; a
   block where none has one passes no column);
3. the G queries of a group (``q // G``, G a multiple of B) share the columns any of their blocks passed;
4. a query keeps the keys the mask allows where ``keep`` holds or its group's column passed.

The rows are taken a run at a time (``runs``), so nothing ``Nq x nk`` is held but the selection; the columns' test
a run of groups at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .route_scores import SELECT_ELEMENTS, head_dots

#: ``() -> ((rows, lo, hi, allowed, keep), ...)``: the runs of query rows (a slice), the span of keys ``[lo, hi)``
#: that holds every key the mask allows them, and the mask and keep over that span, bool, broadcastable to
#: ``[B, Hq, rows, hi - lo]`` on q's device
Runs = Callable[[], Iterator[tuple[slice, int, int, torch.Tensor, torch.Tensor]]]


def score_dtype(q: torch.Tensor, k: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32


def scores(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q . k / sqrt(dk)`` ``[B, Hq, R, S]`` in ``dtype`` (``route_scores.head_dots``)."""
    return head_dots(q.to(dtype), k.to(dtype)) * q.shape[-1] ** -0.5


def select(q: torch.Tensor, k: torch.Tensor, theta: float, block: int, group: int, runs: Runs) -> torch.Tensor:
    """The selection bool ``[B, Hq, Nq, nk]`` of the module docstring's rule, on q's device."""
    B, Hq, Nq, D = q.shape
    nk, dev = k.shape[2], q.device
    dtype = score_dtype(q, k)
    anchor = torch.full((B, Hq, Nq), float("-inf"), dtype=dtype, device=dev)
    for rows, lo, hi, allowed, keep in runs():
        if lo < hi:
            region = allowed & keep
            anchor[:, :, rows] = scores(q[:, :, rows], k[:, :, lo:hi], dtype).masked_fill(~region, float("-inf")
                                                                                         ).amax(-1)
    stripe = _columns(q, k, anchor, theta, block, group, dtype)
    selected = torch.zeros(B, Hq, Nq, nk, dtype=torch.bool, device=dev)
    for rows, lo, hi, allowed, keep in runs():
        if lo < hi:
            groups = torch.arange(rows.start, rows.stop, device=dev) // group
            selected[:, :, rows, lo:hi] = allowed & (keep | stripe[:, :, groups, lo:hi])
    return selected


def _columns(q: torch.Tensor, k: torch.Tensor, anchor: torch.Tensor, theta: float, block: int, group: int,
             dtype: torch.dtype) -> torch.Tensor:
    """Steps 2 and 3: the columns each group keeps, bool ``[B, Hq, groups, nk]``."""
    B, Hq, Nq, D = q.shape
    nk, dev = k.shape[2], q.device
    nb, steps = -(-Nq // block), group // block
    pad = nb * block - Nq
    count = (Nq - torch.arange(nb, device=dev) * block).clamp(max=block).to(dtype)  # the last block may be shorter
    q_mean = torch.nn.functional.pad(q.to(dtype), (0, 0, 0, pad)).view(B, Hq, nb, block, D).sum(3) / count[:, None]
    finite = anchor.isfinite()
    present = torch.nn.functional.pad(finite, (0, pad)).view(B, Hq, nb, block).sum(-1)
    total = torch.nn.functional.pad(torch.where(finite, anchor, 0), (0, pad)).view(B, Hq, nb, block).sum(-1)
    anchor_mean = torch.where(present > 0, total / present.clamp(min=1), float("inf"))
    ng = -(-Nq // group)
    stripe = torch.empty(B, Hq, ng, nk, dtype=torch.bool, device=dev)
    at_once = max(1, SELECT_ELEMENTS // max(1, B * Hq * steps * nk))  # groups tested at once
    for first in range(0, ng, at_once):
        last = min(ng, first + at_once)
        blocks = slice(first * steps, min(nb, last * steps))
        passed = scores(q_mean[:, :, blocks], k, dtype) + theta >= anchor_mean[:, :, blocks, None]
        short = (last - first) * steps - passed.shape[2]  # the last group's missing blocks pass nothing
        passed = torch.cat([passed, passed.new_zeros(B, Hq, short, nk)], 2) if short else passed
        stripe[:, :, first:last] = passed.view(B, Hq, last - first, steps, nk).any(3)
    return stripe
