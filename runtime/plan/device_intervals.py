"""Interval reasoning (``compiler.analysis.intervals``) over tensors on the call's device, with no value read back on
the host: what classifies the tile pairs of a mask that reads call-time inputs at every call
(``runtime.plan.device_tiles``).

``IntervalEvaluator`` bounds an input read over a box of indices from a sparse table, which it queries by
the levels present (read on the host) and whose varying indices it finds by comparing bounds. Here an index
varies where its expression names a position of the boxes (decided from the expression, once), the table is
one stacked tensor per statistic queried by one gather, inputs carry a leading batch dimension (a batch
element's bounds apart), and window arrays are kept on the device. The arithmetic rules are the host
evaluator's, so the bounds are as sound: an interval holds every value the exact evaluator computes."""

from __future__ import annotations

import sympy
import torch

from ...compiler.analysis.interval_numbers import EXACT, INF, WRAP, F, Num
from ...compiler.analysis.intervals import IntervalEvaluator
from ...compiler.analysis.window_intervals import WindowBounds, window_envelope


def int_bounds(lo: torch.Tensor, hi: torch.Tensor) -> Num:
    """The bounds of int64 values given as float64 ``lo``/``hi``: rounded outwards above 2**53, any int64 beyond
    2**63 (as ``compiler.analysis.intervals`` bounds an int64 result)."""
    lo = torch.where(lo.abs() > EXACT, torch.nextafter(lo, torch.full_like(lo, -INF)), lo)
    hi = torch.where(hi.abs() > EXACT, torch.nextafter(hi, torch.full_like(hi, INF)), hi)
    wrap = (lo < -WRAP) | (hi >= WRAP)
    return Num(torch.where(wrap, torch.full_like(lo, -WRAP), lo), torch.where(wrap, torch.full_like(hi, WRAP), hi))


class RangeTable:
    """Min, max (over numbers) and whether any NaN, of ``values`` ``[B, ...]`` over index ranges along ``dim``:
    a sparse table whose levels are stacked in one tensor per statistic (``[levels, B, ..., L]``, level ``j``
    spanning ``2**j`` entries, its tail past the last full span left at the statistic's neutral value), so that
    a query is one gather of fixed shape. An integer tensor has no NaN (no third table)."""

    def __init__(self, values: torch.Tensor, dim: int):
        x = values.movedim(dim, -1).to(F)
        length = x.shape[-1]
        levels = max(1, length.bit_length())  # spans of 1, 2, 4, ... up to the longest within the length
        floating = values.dtype.is_floating_point
        nan = torch.isnan(x) if floating else None
        tables = [(torch.minimum, INF, x if nan is None else torch.where(nan, INF, x)),
                  (torch.maximum, -INF, x if nan is None else torch.where(nan, -INF, x))]
        if nan is not None:
            tables.append((torch.logical_or, False, nan))
        stacked = []
        for combine, neutral, first in tables:
            out = torch.full((levels, *x.shape), neutral, dtype=first.dtype, device=x.device)
            out[0] = first
            for j in range(1, levels):
                half, count = 1 << (j - 1), length - (1 << j) + 1
                out[j, ..., :count] = combine(out[j - 1, ..., :count], out[j - 1, ..., half:half + count])
            stacked.append(out)
        self.mins, self.maxs = stacked[0], stacked[1]
        self.nans = stacked[2] if nan is not None else None

    def query(self, others: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor):
        """(min, max, any NaN: None for an integer tensor) over ``[a, b]`` (int64, ``a <= b``, in range), the batch
        and the other dimensions at ``others`` (broadcast index tensors, the batch's first)."""
        level = torch.floor(torch.log2((b - a + 1).to(F))).to(torch.int64)
        start = b - torch.bitwise_left_shift(torch.ones_like(level), level) + 1
        first, second = (level, *others, a), (level, *others, start)
        nan = None if self.nans is None else self.nans[first] | self.nans[second]
        return torch.minimum(self.mins[first], self.mins[second]), torch.maximum(self.maxs[first], self.maxs[second]), nan


class DeviceIntervals(IntervalEvaluator):
    """``IntervalEvaluator`` whose inputs are device tensors with a leading batch dimension (``inputs``: name ->
    ``[B, *dims]``, in their own dtype) and whose ``box`` symbols (the positions) are the ones that vary over
    the boxes; ``windows``: a cache of window bounds per device, kept by the caller across calls; ``tables``: the
    range tables of these inputs, shared by the evaluators of one call."""

    def __init__(self, env: dict, inputs: dict[str, torch.Tensor], box: set, windows: dict, tables: dict,
                 unknown: dict[str, str] | None = None):
        super().__init__(env, inputs)
        #: inputs whose values are not given (name -> "int" | "float"): any value (a paged template's lists, made
        #: once for every call, whatever the call's inputs hold)
        self.unknown = unknown or {}
        self.box = box
        self.windows = windows
        self.tables = tables  # range tables per (input, dimension): one call's, shared by its evaluators
        # the rank of the boxes' bounds: an input read's batch dimension goes in front of them all
        self.rank = max(self.env[s].lo.dim() for s in box if s in self.env)

    def _window(self, e):
        qa, ka, L, size, dil, stride, causal = e.args
        if not isinstance(L, sympy.Integer):  # a length read at run time (a paged row's)
            return window_envelope(self.number(qa), self.number(ka), int(size), int(dil), int(stride), bool(causal))
        device = next(iter(self.env[s].lo.device for s in self.box if s in self.env))
        key = (int(L), int(size), int(dil), int(stride), bool(causal), device)
        if key not in self.windows:  # the first call on this device: its arrays moved there once
            bounds = WindowBounds(*key[:5])
            bounds.lo_flat, bounds.hi_flat = bounds.lo_flat.to(device), bounds.hi_flat.to(device)
            self.windows[key] = bounds
        return self.windows[key].classify(self.number(qa), self.number(ka))

    @staticmethod
    def _index(bounds: Num, size: int, shape, device) -> torch.Tensor:
        """A point index: its value (the lower bound) clamped in range, int64 of ``shape`` on ``device`` (a
        constant's bound, a CPU scalar, is added to device zeros: made there, not copied)."""
        lo = torch.zeros(shape, dtype=F, device=device) + bounds.lo
        return lo.clamp(0, size - 1).to(torch.int64)

    def _input(self, name: str, args) -> Num:
        if name in self.unknown:  # any value: a number of its type, NaN too where it is a float
            if self.unknown[name] == "int":
                return Num(torch.tensor(-WRAP, dtype=F), torch.tensor(WRAP, dtype=F))
            return Num(torch.tensor(-INF, dtype=F), torch.tensor(INF, dtype=F), True, torch.float32)
        raw = self.inputs[name]
        values = raw.to(F)
        device, sizes = raw.device, raw.shape[1:]
        idx = [self.number(a) for a in args]
        varying = [d for d, a in enumerate(args) if a.free_symbols & self.box]
        shape = torch.broadcast_shapes(*(x.lo.shape for x in idx), *(x.hi.shape for x in idx))
        shape = (1,) * (self.rank - len(shape)) + tuple(shape)  # a constant index too: the batch in front
        batch = torch.arange(raw.shape[0], device=device).view(-1, *([1] * len(shape)))
        shape = (1, *shape)
        if len(varying) <= 1:
            points = [self._index(x, size, shape, device) if d not in varying else None
                      for d, (x, size) in enumerate(zip(idx, sizes, strict=True))]
        if not varying:
            v = values[(batch, *points)]
            nan = torch.isnan(v)
            lo, hi = torch.where(nan, INF, v), torch.where(nan, -INF, v)
        elif len(varying) == 1:
            d = varying[0]
            if (name, d) not in self.tables:
                self.tables[(name, d)] = RangeTable(raw, d + 1)
            a = idx[d].lo.expand(shape[1:]).clamp(0, sizes[d] - 1).to(torch.int64)[None]
            b = idx[d].hi.expand(shape[1:]).clamp(0, sizes[d] - 1).to(torch.int64)[None]
            lo, hi, nan = self.tables[(name, d)].query([batch, *(p for p in points if p is not None)], a,
                                                       torch.maximum(a, b))
        else:  # several indices vary: the whole input (per batch element)
            flat = values.flatten(1)
            isnan = torch.isnan(flat)
            view = (-1, *([1] * (len(shape) - 1)))
            lo = torch.where(isnan, INF, flat).amin(1).view(view)
            hi = torch.where(isnan, -INF, flat).amax(1).view(view)
            nan = isnan.any(1).view(view)
        if not raw.dtype.is_floating_point:
            return int_bounds(lo, hi)
        return Num(lo, hi, nan, raw.dtype)
