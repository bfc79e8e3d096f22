"""Tile lists of a decode step made on the device: queries after a KV cache whose cache grows by a key every
step cost what they visit, not a host plan per length.

A decode step is a block of the whole sequence (``evaluate.block_bound``): its ``n`` queries are the last
rows of ``nk`` tokens and they attend keys ``[0, nk)``. Its kernels take the lengths at run time (one module
for every length, ``compiler.triton_codegen.source``), and where the pattern's mask, bias and softcap name
no size (``applies``) everything else of its plan is the same at every length too: the template
(``DecodeLists`` on a ``Plan``, made at the first step) is kept per query count and tiles, and each step's
lists are made on the call's device from the step's positions alone. Each (Q tile, KV tile) pair is
classified by interval reasoning over its two tiles (``device_intervals``, the host classifier's rules:
sound, EMPTY only where no pair is allowed, FULL only where every one is; the kernels evaluate the mask on
PARTIAL tiles, so the answer is exact whatever the classes), and the lists are compacted in tile order at
the widths of the step's tiles: torch ops on the device, nothing read back, no tile classified on the host.

Only forward-only calls take these lists (``TritonRunner.__call__``): the backward's launch orders are
decided once per plan, on the counts of its first call."""

from __future__ import annotations

import dataclasses

import torch

from ...compiler import evaluate as E
from ...compiler.intervals import Num
from ...compiler.tiles import head_classes
from ...core import ir
from ...core import symbols as S
from . import call_plan
from .cache import PlanCache
from .device_intervals import DeviceIntervals
from .device_tiles import compact

#: The symbols a mask, bias or softcap may name for one plan to serve every length: positions, the head and
#: the sizes a template is kept for (heads, head dim).
LENGTH_FREE = frozenset({S.Q, S.K, S.H, S.HEADS, S.DK})


def applies(pat: ir.PatternIR) -> bool:
    """Whether the decode steps of ``pat`` take their lists from ``DecodeLists``: a mask, bias and softcap
    that name no size that grows with the cache, no call-time input (their shapes follow the length) and no
    route (its selection is made per step by its own form, ``device_routes``)."""
    if pat.route is not None or pat.inputs or pat.decay is not None:
        return False
    syms: set = set()
    for expr in (pat.mask, pat.bias, pat.softcap):
        if expr is not None:
            syms |= expr.free_symbols
    return syms <= LENGTH_FREE


@dataclasses.dataclass
class DecodeLists:
    """Makes each decode step's tile lists on its device (the module docstring). ``mask``: the pattern's mask
    with the template's sizes bound (it names none that changes with the length); ``classes``: the list
    classes (every head where the mask reads it, else one)."""

    mask: object
    classes: int
    heads: int
    windows: dict = dataclasses.field(default_factory=dict)  # window bounds per device (device_intervals)
    #: the latest lengths' schedules, kept: a call again at a length (a CUDA graph's warm-up and its capture,
    #: a step replayed) makes nothing, as a plan per length did
    steps: PlanCache = dataclasses.field(default_factory=PlanCache)

    @classmethod
    def of(cls, pat: ir.PatternIR, bound: E.Bound) -> DecodeLists:
        return cls(E.substitute(pat.mask, bound), head_classes(pat, bound), bound.heads)

    def _classes(self, bound: E.Bound, q_tile: int, kv_tile: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(FULL, PARTIAL) of every (class, Q tile, KV tile) pair of the step ``bound``, bool on ``device``."""
        nq, nkv = -(-bound.n // q_tile), -(-bound.nk // kv_tile)

        def span(tiles: int, tile: int, length: int, offset: int, shape) -> Num:
            start = torch.arange(tiles, device=device, dtype=torch.int64) * tile
            end = (start + tile).clamp(max=length) - 1
            return Num((start + offset).to(torch.float64).view(shape), (end + offset).to(torch.float64).view(shape))

        env = {S.Q: span(nq, q_tile, bound.n, bound.q_offset, (1, -1, 1)),
               S.K: span(nkv, kv_tile, bound.nk, bound.k_offset, (1, 1, -1))}
        if self.classes > 1:  # the mask reads the head: the class is the head
            env[S.H] = torch.arange(self.classes, device=device).view(-1, 1, 1)
        elif self.heads == 1:  # one head: a mask that reads h reads head 0
            env[S.H] = 0
        result = DeviceIntervals(env, {}, {S.Q, S.K}, self.windows, {}).boolean(self.mask)
        shape = (self.classes, nq, nkv)
        may_t = torch.zeros(shape, dtype=torch.bool, device=device) | result.t
        may_f = torch.zeros(shape, dtype=torch.bool, device=device) | result.f
        full = ~may_f
        return full, may_t & ~full

    def call_plan(self, plan, bound: E.Bound, device: torch.device):
        """``plan`` (the template of these tiles) as the step ``bound``: its bound, and the step's lists made on
        ``device`` (``call_plan.for_call``)."""
        key = (bound.n, bound.nk, bound.q_offset, bound.k_offset, torch.device(device))
        schedule = self.steps.get(key)
        if schedule is None:
            schedule = self.steps[key] = self._schedule(plan.schedule, bound, device)
        return call_plan.for_call(plan, schedule, bound=bound)

    def _schedule(self, sched, bound: E.Bound, device) -> call_plan.DeviceSchedule:
        """The step's schedule: ``sched``'s tiles over the step's rows, its lists made on ``device``."""
        tq, tk = sched.q_tile[0], sched.kv_tile[0]
        full, part = self._classes(bound, tq, tk, device)
        classes, nq, nkv = full.shape
        lists = {}
        for prefix, keeps, count in (("", (full, part), nkv), ("T_", (full.mT, part.mT), nq)):
            index = torch.arange(count, device=device, dtype=torch.int64).expand(*keeps[0].shape)
            for name, keep in zip(("FULL", "PART"), keeps, strict=True):
                lists[f"{prefix}{name}_N"], lists[f"{prefix}{name}_I"] = compact(index, keep)
        zeros = torch.zeros(classes, dtype=torch.float64, device=device)
        return call_plan.DeviceSchedule(
            (bound.n,), (bound.nk,), sched.q_tile, sched.kv_tile, sched.num_heads,
            lists["FULL_N"], lists["FULL_I"], lists["PART_N"], lists["PART_I"], lists["T_FULL_N"],
            lists["T_FULL_I"], lists["T_PART_N"], lists["T_PART_I"], zeros, False, False)
