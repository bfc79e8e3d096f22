"""NATTEN windows on boxes of positions (the seam: the window's own exact interval rule, which makes tile
classification of neighborhoods exact, apart from the general rules of ``interval_numbers``)."""

from __future__ import annotations

import torch

from .evaluate import window_range
from .interval_numbers import INF, Bool, F, Num, as_t


class WindowBounds:
    """Per-axis arrays of NATTEN's window (first and last key of each query's
    window, in axis coordinates), for exact interval rules."""

    def __init__(self, L: int, size: int, dilation: int, stride: int, causal: bool):
        self.L, self.size, self.d, self.causal = L, size, dilation, causal
        first, last = window_range(torch.arange(L), L, size, dilation, stride, causal)
        self.lo_flat = first.to(F)  # first key of query i's window
        self.hi_flat = last.to(F)  # last key
        # Range minimum of lo / maximum of hi over query intervals: both are
        # non-decreasing within a dilation group, so per group the extreme is
        # at the group's first / last member inside the interval.

    def range_lo_min(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._extreme(self.lo_flat, a, b, first=True)

    def range_hi_max(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._extreme(self.hi_flat, a, b, first=False)

    def _extreme(self, arr, a, b, first: bool):
        d = self.d
        a = a.clamp(0, self.L - 1).to(torch.int64)
        b = b.clamp(0, self.L - 1).to(torch.int64)
        if d == 1:
            return arr[a] if first else arr[b]
        out = None
        for g in range(d):
            # first member >= a in group g, last member <= b in group g
            f = a + (g - a) % d
            last = b - (b - g) % d
            has = f <= last
            idx = (f if first else last).clamp(0, self.L - 1)
            val = torch.where(has, arr[idx], torch.full_like(arr[idx], INF if first else -INF))
            out = val if out is None else (torch.minimum(out, val) if first else torch.maximum(out, val))
        return out

    def classify(self, qa: Num, ka: Num) -> Bool:
        q0, q1, k0, k1 = (as_t(x).to(F) for x in (qa.lo, qa.hi, ka.lo, ka.hi))
        q0, q1, k0, k1 = torch.broadcast_tensors(q0, q1, k0, k1)
        lo_min = self.range_lo_min(q0, q1)
        hi_max = self.range_hi_max(q0, q1)
        may_true = (k1 >= lo_min) & (k0 <= hi_max)
        if self.d == 1:
            lo_max = self.lo_flat[q1.clamp(0, self.L - 1).to(torch.int64)]
            hi_min = self.hi_flat[q0.clamp(0, self.L - 1).to(torch.int64)]
            all_true = (lo_max <= k0) & (k1 <= hi_min)
        else:
            # a dilated window is FULL on a box only for a single (query, key)
            qi = q0.clamp(0, self.L - 1).to(torch.int64)
            single = (q0 == q1) & (k0 == k1)
            same_group = (k0.to(torch.int64) - qi) % self.d == 0
            all_true = single & same_group & (self.lo_flat[qi] <= k0) & (k0 <= self.hi_flat[qi])
            # a single query sees only its group: no key of the group in range -> EMPTY
            q_single = q0 == q1
            g = qi % self.d
            first_in_group = k0.to(torch.int64) + (g - k0.to(torch.int64)) % self.d
            may_true = may_true & ~(q_single & (first_in_group > k1.to(torch.int64)))
        return Bool(may_true, ~all_true)


def window_envelope(qa: Num, ka: Num, size: int, dilation: int, stride: int, causal: bool) -> Bool:
    """NATTEN's window (``WindowBounds``) on an axis whose length is not one number (a paged batch's rows, each its
    own): whatever the length, a query's window lies within ``(size + stride) * dilation`` of it (its centre is the
    query's stride leader, at most ``stride`` away in its dilation group, moved inward by at most ``size`` at the
    axis's ends), and never after it where causal. Keys that near may be in it; no box is sure to be (the kernels
    evaluate the window there, at the row's length)."""
    reach = (size + stride) * dilation
    q0, q1, k0, k1 = (as_t(x).to(F) for x in (qa.lo, qa.hi, ka.lo, ka.hi))
    may = (k1 >= q0 - reach) & (k0 <= q1 + (0 if causal else reach))
    return Bool(may, torch.ones_like(may))
