"""Tile lists of a decode step made on the device: queries after a KV cache whose cache grows by a key every
step cost what they visit, not a host plan per length.

A decode step is a block of the whole sequence (``evaluate.block_bound``): its ``n`` queries are the last
rows of ``nk`` tokens and they attend keys ``[0, nk)``. Its kernels take the lengths at run time (one module
for every length, ``compiler.codegen.triton.source``), and where the pattern's mask, bias and softcap name
no size (``applies``) everything else of its plan is the same at every length too: the template
(``DecodeLists`` on a ``Plan``, made at the first step) is kept per query count and tiles, and the lists of
each range of ``LENGTHS_PER_LISTS`` lengths are made on the call's device at the range's first step, from
positions alone (a later step of the range makes none). Each (Q tile, KV tile) pair is
classified by interval reasoning over its two tiles (``device_intervals``, the host classifier's rules:
sound, EMPTY only where no pair is allowed, FULL only where every one is; the kernels evaluate the mask on
PARTIAL tiles, so the answer is exact whatever the classes), and the lists are compacted in tile order at
the widths of the range's tiles: torch ops on the device, nothing read back, no tile classified on the host.

Only forward-only calls take these lists (``TritonRunner.__call__``): the backward's launch orders are
decided once per plan, on the counts of its first call."""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.interval_numbers import Num
from ...compiler.analysis.tiles import head_classes
from ...core import ir
from ...core import symbols as S
from . import call_plan, forms
from .cache import PlanCache
from .device_intervals import DeviceIntervals
from .device_tiles import Side, compact

#: Cache lengths one set of lists serves: a decode step makes lists once every this many steps (a range's lists
#: visit at most one KV tile more than a step's own, its last, masked at each step by the step's length).
LENGTHS_PER_LISTS = 64

#: The symbols a mask, bias or softcap may name for one plan to serve every length: positions, the head and
#: the sizes a template is kept for (heads, head dim).
LENGTH_FREE = frozenset({S.Q, S.K, S.H, S.HEADS, S.DK})


def applies(pat: ir.PatternIR) -> bool:
    """Whether the decode steps of ``pat`` take their lists from ``DecodeLists``: a mask, bias and softcap
    that name no size that grows with the cache, a mask and softcap that read no call-time input (a bias's inputs
    and a route's scores follow the length in shape, the lists do not), no FoX gates; a route's keep and block
    sizes likewise (its selection is made per step on the device by its own form, among these lists'
    candidates: ``device_routes.decode_route_plan``; its K may grow with the cache: a route kind that selects on
    the host only has no such plan)."""
    if pat.decay is not None or E.input_names(pat.mask):
        return False
    if pat.route is not None and forms.form_of(pat.route).select_on_device is None:
        return False
    if isinstance(pat.softcap, sympy.Basic) and E.input_names(pat.softcap):
        return False
    if pat.route is not None and isinstance(pat.route.keep, sympy.Basic) and E.input_names(pat.route.keep):
        return False
    exprs = [pat.mask, pat.bias, pat.softcap]
    if pat.route is not None:
        if pat.queries.kind != "seq" or pat.keys.kind != "seq":
            return False
        exprs += [pat.route.keep, *pat.route.block]
    syms: set = set()
    for expr in exprs:
        if isinstance(expr, sympy.Basic):
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
    #: the lists of the latest ranges of lengths, kept (``LENGTHS_PER_LISTS`` each)
    ranges: PlanCache = dataclasses.field(default_factory=PlanCache)

    @classmethod
    def of(cls, pat: ir.PatternIR, bound: E.Bound) -> DecodeLists:
        return cls(E.substitute(pat.mask, bound), head_classes(pat, bound), bound.heads)

    def _classes(self, n: int, q_tile: int, kv_tile: int, lengths: tuple[int, int], k_offset: int,
                 device) -> tuple[torch.Tensor, torch.Tensor]:
        """(FULL, PARTIAL) of every (class, Q tile, KV tile) pair, bool on ``device``, that hold at every cache
        length in ``lengths`` (first, last): the n queries are the last n rows of the length, the KV tiles
        reach the last length, and a tile is FULL only where its keys are all cached at the first length (the
        others are masked, at each step by its length, ``K_EXT``)."""
        first, last = lengths
        nq, nkv = -(-n // q_tile), -(-last // kv_tile)

        def span(tiles: int, tile: int, length: int, lo: int, hi: int, shape) -> Num:
            start = torch.arange(tiles, device=device, dtype=torch.int64) * tile
            end = (start + tile).clamp(max=length) - 1
            return Num((start + lo).to(torch.float64).view(shape), (end + hi).to(torch.float64).view(shape))

        env = {S.Q: span(nq, q_tile, n, first - n, last - n, (1, -1, 1)),
               S.K: span(nkv, kv_tile, last, k_offset, k_offset, (1, 1, -1))}
        if self.classes > 1:  # the mask reads the head: the class is the head
            env[S.H] = torch.arange(self.classes, device=device).view(-1, 1, 1)
        elif self.heads == 1:  # one head: a mask that reads h reads head 0
            env[S.H] = 0
        result = DeviceIntervals(env, {}, {S.Q, S.K}, self.windows, {}).boolean(self.mask)
        shape = (self.classes, nq, nkv)
        may_t = torch.zeros(shape, dtype=torch.bool, device=device) | result.t
        may_f = torch.zeros(shape, dtype=torch.bool, device=device) | result.f
        whole = (torch.arange(nkv, device=device) + 1) * kv_tile <= first  # every key cached at every length
        full = ~may_f & whole
        return full, may_t & ~full

    def call_plan(self, plan, bound: E.Bound, device: torch.device):
        """``plan`` (the template of these tiles) as the step ``bound``: its bound, and the lists of the range of
        lengths the step's falls in, made on ``device`` at the range's first step (``call_plan.for_call``)."""
        sched = plan.schedule
        lists = self._range(bound, sched, device, "lists", self._lists)
        return call_plan.for_call(plan, step_schedule(bound, sched, lists), bound=bound)

    def sides(self, bound: E.Bound, sched, device: torch.device) -> dict[str, Side]:
        """The candidate pairs of the range of lengths the step ``bound`` falls in, per Q tile (``"q"``) and per
        KV tile (``"k"``), flagged where the pair is FULL (a route's selection is made among them:
        ``device_routes.decode_route_plan``); the KV side's tiles reach the range's last length."""
        return self._range(bound, sched, device, "sides", self._sides)

    def _range(self, bound: E.Bound, sched, device, what: str, make) -> dict:
        """``make(n, q_tile, kv_tile, lengths, k_offset, device)`` of the step's range of lengths, made at the
        range's first step and kept."""
        r = (bound.nk - 1) // LENGTHS_PER_LISTS
        lengths = (max(r * LENGTHS_PER_LISTS + 1, bound.n), (r + 1) * LENGTHS_PER_LISTS)
        key = (what, bound.n, lengths, bound.k_offset, torch.device(device))
        made = self.ranges.get(key)
        if made is None:
            made = self.ranges[key] = make(bound.n, sched.q_tile[0], sched.kv_tile[0], lengths, bound.k_offset,
                                           device)
        return made

    def _lists(self, n: int, q_tile: int, kv_tile: int, lengths: tuple[int, int], k_offset: int,
               device) -> dict[str, torch.Tensor]:
        """The kernels' lists (``FULL_N``, ``FULL_I``, ... and the transposed ``T_`` ones) of a range of lengths."""
        full, part = self._classes(n, q_tile, kv_tile, lengths, k_offset, device)
        _, nq, nkv = full.shape
        lists = {}
        for prefix, keeps, count in (("", (full, part), nkv), ("T_", (full.mT, part.mT), nq)):
            index = torch.arange(count, device=device, dtype=torch.int64).expand(*keeps[0].shape)
            for name, keep in zip(("FULL", "PART"), keeps, strict=True):
                lists[f"{prefix}{name}_N"], lists[f"{prefix}{name}_I"] = compact(index, keep)
        return lists

    def _sides(self, n: int, q_tile: int, kv_tile: int, lengths: tuple[int, int], k_offset: int,
               device) -> dict[str, Side]:
        full, part = self._classes(n, q_tile, kv_tile, lengths, k_offset, device)
        sides = {}
        for own, (f, p) in (("q", (full, part)), ("k", (full.mT, part.mT))):
            index = torch.arange(f.shape[-1], device=device, dtype=torch.int64).expand(*f.shape)
            listed = compact(index, f | p)[1].to(torch.int64)  # ascending, -1 padded
            sides[own] = Side(listed, f.gather(-1, listed.clamp(min=0)) & (listed >= 0))
        return sides


def step_schedule(bound: E.Bound, sched, lists: dict[str, torch.Tensor]) -> call_plan.DeviceSchedule:
    """The step ``bound``'s schedule from the lists of its range of lengths (the template ``sched``'s tiles): the
    KV side's lists cut at the step's KV tiles (the Q side's name later ones, masked by the step's length)."""
    nkv = -(-bound.nk // sched.kv_tile[0])
    step = {name: t[:, :nkv] if name.startswith("T_") else t for name, t in lists.items()}  # this step's tiles
    zeros = torch.zeros(1, dtype=torch.float64).expand(lists["FULL_N"].shape[0])
    return call_plan.DeviceSchedule(
        (bound.n,), (bound.nk,), sched.q_tile, sched.kv_tile, sched.num_heads,
        step["FULL_N"], step["FULL_I"], step["PART_N"], step["PART_I"], step["T_FULL_N"],
        step["T_FULL_I"], step["T_PART_N"], step["T_PART_I"], zeros, False, False)
