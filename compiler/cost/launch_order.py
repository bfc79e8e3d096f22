"""The order a kernel launches its tiles in, and how long the GPU takes to run them in that order.

A GPU hands a grid's CTAs to its SMs in launch order, each to the first SM that frees up: greedy list
scheduling. Launched in tile order, a schedule whose tiles do uneven work (a causal triangle, a
routed selection, a grid's borders) can leave its longest CTAs for the last wave, where most SMs sit
idle; launched longest first (LPT), the last wave holds the shortest ones. A kernel reads its tile from
an order table (``ORDERED``) only where that pays: where the predicted makespan shortens by at least
``MIN_GAIN``. Elsewhere tile order is kept, which keeps neighbouring tiles (and the K/V tiles they
share in L2) running together; the model does not see that reuse, so it asks for a clear gain first.

The simulator (``compiler.cost.model``) and the runtime's launches (``runtime.backends.triton``) take the
decision from ``choose_order`` alike, so that what is predicted is the order that runs. Where there are
too many CTAs to place one by one, the order is longest first exactly where ``can_gain`` says some
order could gain ``MIN_GAIN``: there longest first is the safe one (within 4/3 of the best placement,
where tile order may leave a long CTA to the end), elsewhere both orders end within ``MIN_GAIN`` of
each other. A routed plan's lists are made at every call, and so is its decision: a few milliseconds
of host time at most (``EXACT_CTAS``), and none where the screen alone decides.

Under GQA the dK/dV kernel runs ``batch x kv_heads x split`` CTAs, each over ``heads // kv_heads // split``
query heads (``cost.grouped_kv_counts``); the runtime decides its order on one head's counts with those
rounds, the simulator on the counts times the share (the same order: a share scales every CTA alike).
"""

from __future__ import annotations

import functools
import heapq

import torch

from .hardware import compute_capability

#: The fraction of the predicted makespan a longest-first order must save to be taken.
MIN_GAIN = 0.03
#: Launches of at most this many CTAs are placed CTA by CTA (about 5 ms of host time at the most, twice
#: over: once per order); longer ones (over 120 waves on any modelled GPU) by ``can_gain`` alone.
EXACT_CTAS = 1 << 14
#: The first architecture whose kernels take order tables. Before Hopper the kernels stay in tile order:
#: compiled offline for sm_80 with their tables (Triton 3.6), sliding_tile's forward spilled 56 B and
#: softcap's d 64 dK/dV 8 B, where the same kernels in tile order did not (the tile index, a loaded value
#: instead of the block index, holds a register across the loops); sm_90 and sm_100 compiled clean.
MIN_ORDERED_ARCH = 90


def ordered_arch(arch: str) -> bool:
    """Whether kernels for this architecture (``"sm90"``, ``"sm_80"``...) take order tables."""
    return compute_capability(arch) >= MIN_ORDERED_ARCH


def visit_work(full: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """The work of each CTA in tile pairs (``[classes, tiles]``, float64): the pairs it visits, plus one
    for its prologue and epilogue (loading its resident tile, storing its output)."""
    return 1.0 + full.to(torch.float64) + partial.to(torch.float64)


def longest_first(full: torch.Tensor, partial: torch.Tensor) -> torch.Tensor:
    """Per class row, the tiles sorted by the tile pairs they visit, most first; ties in tile order
    (``[classes, tiles]`` int64: entry ``[c, r]`` is the tile launched ``r``-th in class ``c``)."""
    visited = full.to(torch.int64) + partial.to(torch.int64)
    return torch.sort(visited, dim=-1, descending=True, stable=True).indices


def greedy_makespan(work: torch.Tensor, sms: int, repeat: int = 1) -> float:
    """The finishing time of the busiest SM when the CTAs run in launch order, each on the SM that frees
    first: ``work`` (any shape) flattened is one round of the launch, repeated ``repeat`` times (the
    (batch, head) programs that share a class row)."""
    seq = work.reshape(-1).to(torch.float64).tolist()
    count = len(seq) * repeat
    if count == 0:
        return 0.0
    if count <= sms:
        return max(seq)
    free = [0.0] * sms  # a min-heap of the SMs' finishing times
    for _ in range(repeat):
        for w in seq:
            heapq.heapreplace(free, free[0] + w)
    return max(free)


def can_gain(work: torch.Tensor, sms: int, repeat: int) -> bool:
    """Whether any launch order could beat another by ``MIN_GAIN``: greedy scheduling in any order ends
    by ``total / sms + longest`` and none ends before ``max(total / sms, longest)``."""
    if work.numel() == 0:
        return False
    longest = float(work.max())
    ideal = float(work.sum()) * repeat / sms
    return (ideal + longest) / max(ideal, longest) - 1.0 >= MIN_GAIN


def exact(work: torch.Tensor, repeat) -> bool:
    """Whether a launch of these CTAs is placed CTA by CTA (``greedy_makespan``) by the model."""
    return float(repeat).is_integer() and work.numel() * repeat <= EXACT_CTAS


def choose_order(full: torch.Tensor, partial: torch.Tensor, repeat: int, sms: int) -> torch.Tensor | None:
    """The launch order of one kernel over a schedule's tile lists (``[classes, tiles]`` visit counts, each
    class row launched ``repeat`` times one after the other): ``longest_first``'s table where it
    shortens the makespan of ``visit_work`` on ``sms`` SMs by ``MIN_GAIN``, else None (tile order).
    Too many CTAs to place (not ``exact``): longest first wherever ``can_gain``."""
    work = visit_work(full, partial)
    if not can_gain(work, sms, repeat):
        return None
    if not exact(work, repeat):
        return longest_first(full, partial)
    return _placed_order(_Counts(full, partial), int(repeat), sms)


class _Counts:
    """Visit counts as a cache key: equal when their values are (the search asks again for every launch
    configuration of one schedule)."""

    def __init__(self, full: torch.Tensor, partial: torch.Tensor):
        self.full, self.partial = full, partial
        self._key = (tuple(full.shape), full.to(torch.int64).cpu().numpy().tobytes(),
                     partial.to(torch.int64).cpu().numpy().tobytes())

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Counts) and self._key == other._key


def _placements(full: torch.Tensor, partial: torch.Tensor, repeat: int, sms: int) -> tuple[float, float, torch.Tensor]:
    """(tile-order makespan, longest-first makespan, the longest-first table) of ``visit_work``."""
    work = visit_work(full, partial)
    order = longest_first(full, partial)
    return greedy_makespan(work, sms, repeat), greedy_makespan(torch.gather(work, -1, order), sms, repeat), order


@functools.lru_cache(maxsize=256)
def _placed_order(counts: _Counts, repeat: int, sms: int) -> torch.Tensor | None:
    natural, ordered, order = _placements(counts.full, counts.partial, repeat, sms)
    return order if ordered <= natural * (1.0 - MIN_GAIN) else None


def gain(full: torch.Tensor, partial: torch.Tensor, repeat: int, sms: int) -> float:
    """The fraction of the tile-order makespan (of ``visit_work``) that the longest-first order saves
    (negative where it loses); 0 where the launch is not placed CTA by CTA."""
    if not exact(visit_work(full, partial), repeat):
        return 0.0
    natural, ordered, _ = _placements(full, partial, int(repeat), sms)
    return 1.0 - ordered / natural if natural > 0 else 0.0


__all__ = ["EXACT_CTAS", "MIN_GAIN", "MIN_ORDERED_ARCH", "can_gain", "choose_order", "exact", "gain",
           "greedy_makespan", "longest_first", "ordered_arch", "visit_work"]
