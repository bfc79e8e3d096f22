"""Tile lists of a mask that reads call-time inputs (a document's ids, Longformer's global flags, cluster ids,
vertical-slash flags), made on the call's device at every call: a warm call of such a pattern on the Triton
backend reads nothing on the host (issue 42), where a plan keyed by the inputs' values read them all.

Once per shapes, on the host (``input_plan``): the mask is relaxed at every condition that reads an input
(``relaxed``). Its upper bound, every such condition true where it is not negated, is classified as a static
mask is: its tile pairs are the *candidates*, the only pairs any inputs can make the mask allow, listed per
Q tile and per KV tile at fixed widths. Its lower bound, every such condition false, is classified too: the
pairs it makes FULL are FULL whatever the inputs.

At every call, on the device (``InputLists.call_plan``): each candidate pair is classified by interval
reasoning over its two tiles (``device_intervals``: positions as ranges, an input read over a range of
indices as that range's min and max), sound as the host's classifier: EMPTY only where no token pair is
allowed, FULL only where every one is. The kernels evaluate the mask itself on PARTIAL tiles, so the answer
is exact whatever the classes; a class only decides the work. The lists are the candidates of each class,
compacted in tile order into the candidates' widths: fixed shapes, torch ops, nothing read back. Inputs
with a batch dimension get one set of lists for the batch (a pair visited where some element visits it,
FULL where it is FULL for every one), as the host classification does.

Where the host's classification counts the PARTIAL pairs exactly and finds some FULL or EMPTY, the interval
classes may keep them PARTIAL: for a document mask a Q tile's pair with a KV tile is FULL where both lie in
one document, EMPTY where their id ranges do not meet, as on the host for sorted ids."""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.interval_numbers import Num
from ...compiler.analysis.schedule import TileSchedule
from ...compiler.analysis.tiles import classify_tiles, head_classes
from ...core import ir
from ...core import symbols as S
from . import call_plan
from .device_intervals import DeviceIntervals
from .route_scores import placed

#: Candidate pairs (x batch elements) classified at once: bounds the device memory of the interval temporaries.
CHUNK_PAIRS = 1 << 21


def relaxed(mask: sympy.Basic) -> tuple[sympy.Basic, sympy.Basic]:
    """(upper, lower) bounds of a mask over its input reads: every condition reading an input (a node
    other than ``and``, ``or``, ``not`` that reads one) replaced by True (upper) or False (lower) where it is
    not negated, the other way where it is. Every occurrence is bounded apart, so both hold whatever values
    the inputs take: ``lower <= mask <= upper`` at every pair."""

    def bound(e: sympy.Basic, up: bool) -> sympy.Basic:
        if not E.input_names(e):
            return e
        if isinstance(e, sympy.And | sympy.Or):
            return type(e)(*(bound(a, up) for a in e.args))
        if isinstance(e, sympy.Not):
            return sympy.Not(bound(e.args[0], not up))
        return sympy.true if up else sympy.false

    return bound(mask, True), bound(mask, False)


def listed_on_device(pat: ir.PatternIR) -> bool:
    """Whether a call's lists of ``pat`` are made on the device (``input_plan``): a mask reading call-time
    inputs, no route, token sequences on both sides, every input read at an index of positions and sizes
    (an index read from an input is checked against its values on the host, ``blocks.checked_inputs``)."""
    return (bool(E.input_names(pat.mask)) and pat.route is None and pat.queries.kind == "seq"
            and pat.keys.kind == "seq" and not E.value_indexed_sites(pat.mask))


def _pairs(sched: TileSchedule, classes: int) -> tuple[torch.Tensor, ...]:
    """``sched.pairs()`` with its head classes spread over ``classes`` (a schedule of one class serves each)."""
    h, qi, ki, full = sched.pairs()
    if sched.heads_stored == classes:
        return h, qi, ki, full
    reps = len(h)
    h = torch.arange(classes).repeat_interleave(reps)
    return h, qi.repeat(classes), ki.repeat(classes), full.repeat(classes)


def _with_classes(sched: TileSchedule, classes: int) -> TileSchedule:
    """``sched`` with ``classes`` head classes (its one class repeated where it has one)."""
    if sched.heads_stored == classes:
        return sched
    h, qi, ki, full = _pairs(sched, classes)
    return TileSchedule.from_pairs(sched.q_extents, sched.kv_extents, sched.q_tile, sched.kv_tile, sched.num_heads,
                                   classes, h, qi, ki, full, sched.allowed_pairs.to(torch.float64).repeat(classes),
                                   sched.exact, sched.density_exact)


@dataclasses.dataclass
class Side:
    """Candidate pairs of one side's tiles (Q tiles for the forward's lists, KV tiles for the backward's):
    ``index [classes, tiles, W]`` (the other side's tiles, ascending, -1 padded; W at least 1) and a flag per
    candidate (``flagged``: the lower bound's FULL pairs; a route's: the mask's)."""

    index: torch.Tensor
    flag: torch.Tensor


def pair_keys(sched: TileSchedule, classes: int, full_only: bool = False) -> torch.Tensor:
    """The pairs of ``sched`` (its FULL ones where ``full_only``) as sorted int64 keys
    ``(class * Q tiles + Q tile) * KV tiles + KV tile`` over ``classes`` head classes."""
    h, qi, ki, full = _pairs(sched, classes)
    keys = (h * sched.num_q_tiles + qi) * sched.num_kv_tiles + ki
    return torch.sort(keys[full] if full_only else keys).values


def candidates(sched: TileSchedule, flagged: torch.Tensor, transposed: bool) -> Side:
    """Every pair of ``sched`` per Q tile (per KV tile where ``transposed``), ascending, and whether its key is
    among ``flagged`` (``pair_keys``)."""
    h, qi, ki, _ = sched.pairs()
    every = TileSchedule.from_pairs(sched.q_extents, sched.kv_extents, sched.q_tile, sched.kv_tile, sched.num_heads,
                                    sched.heads_stored, h, qi, ki, torch.ones(len(h), dtype=torch.bool),
                                    sched.allowed_pairs, False, False)
    index = (every.t_full_index if transposed else every.full_index).to(torch.int64)
    if index.shape[-1] == 0:  # no pair: one column of -1 (a valid pointer and row stride)
        index = torch.full((*index.shape[:-1], 1), -1, dtype=torch.int64)
    own = torch.arange(index.shape[1]).view(1, -1, 1)
    cls = torch.arange(index.shape[0]).view(-1, 1, 1)
    qt, kt = (index, own) if transposed else (own, index)
    keys = (cls * sched.num_q_tiles + qt) * sched.num_kv_tiles + kt
    if len(flagged):
        at = torch.searchsorted(flagged, keys).clamp(max=len(flagged) - 1)
        flag = (flagged[at] == keys) & (index >= 0)
    else:
        flag = torch.zeros(index.shape, dtype=torch.bool)
    return Side(index, flag)


class InputLists:
    """Makes each call's tile lists of a mask that reads call-time inputs on the device (the module
    docstring): the candidates and their static classes, kept on each device the first time it is asked."""

    def __init__(self, pat: ir.PatternIR, bound: E.Bound, upper: TileSchedule, lower: TileSchedule | None):
        self.pattern, self.bound = pat, bound
        self.mask = E.substitute(pat.mask, bound)
        self.classes = upper.heads_stored
        self.schedule = upper
        lower_full = torch.zeros(0, dtype=torch.int64) if lower is None else pair_keys(lower, self.classes, True)
        self.sides = {"q": candidates(upper, lower_full, False), "k": candidates(upper, lower_full, True)}
        self._on: dict = {}  # device -> the sides there
        self.windows: dict = {}  # window bounds per device (device_intervals)

    def _sides_on(self, device: torch.device) -> dict:
        if device not in self._on:  # the first call on this device: its constants moved there once
            self._on[device] = {k: Side(s.index.to(device), s.flag.to(device)) for k, s in self.sides.items()}
        return self._on[device]

    def _box(self, own_side: str, index: torch.Tensor, rows: slice) -> tuple[Num, Num]:
        """Bounds of the query and key positions of the candidates ``index[:, rows]`` of ``own_side``'s tiles."""
        sched, b = self.schedule, self.bound
        own = torch.arange(rows.start, rows.stop, device=index.device).view(1, -1, 1)
        other = index.clamp(min=0)
        qt, kt = (own, other) if own_side == "q" else (other, own)
        tq, tk = sched.q_tile[0], sched.kv_tile[0]

        def span(t, tile, length, offset):
            start = t * tile
            return Num((start + offset).to(torch.float64), ((start + tile).clamp(max=length) - 1 + offset)
                       .to(torch.float64))

        return span(qt, tq, b.n, b.q_offset), span(kt, tk, b.nk, b.k_offset)

    def _classes(self, own_side: str, side: Side, inputs: dict, tables: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(FULL, PARTIAL) of every candidate of ``side`` (bool ``[classes, tiles, W]``), a chunk of tiles at a
        time (``tables``: the call's range tables of its inputs, made once for both sides)."""
        index = side.index
        classes, tiles, width = index.shape
        batch = max(t.shape[0] for t in inputs.values())
        step = max(1, CHUNK_PAIRS // max(1, classes * width * batch))
        full, part = [], []
        env = {sym: int(v) for sym, v in self.bound.subs.items()}
        if classes > 1:  # the mask reads the head: the class is the head
            env[S.H] = torch.arange(classes, device=index.device).view(-1, 1, 1)
        elif self.bound.heads == 1:  # one head: a mask that reads h reads head 0
            env[S.H] = 0
        for start in range(0, tiles, step):
            rows = slice(start, min(tiles, start + step))
            qb, kb = self._box(own_side, index[:, rows], rows)
            result = DeviceIntervals({**env, S.Q: qb, S.K: kb}, inputs, {S.Q, S.K}, self.windows,
                                     tables).boolean(self.mask)
            present = index[:, rows] >= 0
            shape = (batch, *present.shape)
            may_t = torch.zeros(shape, dtype=torch.bool, device=index.device) | result.t
            may_f = torch.zeros(shape, dtype=torch.bool, device=index.device) | result.f
            always = side.flag[:, rows]  # FULL by the lower bound
            is_full = present & ((~may_f).all(0) | always)
            full.append(is_full)
            part.append(present & (may_t.any(0) | always) & ~is_full)
        return torch.cat(full, 1), torch.cat(part, 1)

    def call_plan(self, plan, tensors: dict, batched, device: torch.device):
        """``plan`` (this lister's) with the lists of this call's inputs ``tensors`` (``batched``: the names
        with a batch dimension), made on ``device`` (``call_plan.for_call``)."""
        inputs = {}
        for name in E.input_names(self.mask):
            t = tensors[name].detach()
            t = placed(t, device)
            inputs[name] = t if name in batched else t.unsqueeze(0)
        lists, tables = {}, {}
        for own, prefix in (("q", ""), ("k", "T_")):
            side = self._sides_on(device)[own]
            full, part = self._classes(own, side, inputs, tables)
            for name, keep in (("FULL", full), ("PART", part)):
                lists[f"{prefix}{name}_N"], lists[f"{prefix}{name}_I"] = compact(side.index, keep)
        return call_plan.for_call(plan, call_plan.device_schedule(self.schedule, self.classes, lists))


def compact(index: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count ``[..., tiles]``, list ``[..., tiles, W]``) int32 of the entries of ``index`` where ``keep``
    holds, in their order, -1 after: a stable sort of the kept ones first (fixed shapes)."""
    order = torch.sort((~keep).to(torch.int8), dim=-1, stable=True).indices
    kept = keep.gather(-1, order)
    listed = torch.where(kept, index.gather(-1, order), -1).to(torch.int32)
    return keep.sum(-1, dtype=torch.int32), listed


def input_plan(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile):
    """The plan of a mask reading call-time inputs (``listed_on_device``) at these sizes and tiles, whatever
    the inputs: its schedule the upper bound's candidates (in the mask's head classes), its ``call_lists``
    the ``InputLists`` that make each call's lists."""
    from .tile_plan import Plan

    upper_mask, lower_mask = relaxed(pat.mask)
    classes = head_classes(pat, bound)
    upper = _with_classes(classify_tiles(dataclasses.replace(pat, mask=upper_mask), bound, q_tile, kv_tile), classes)
    lower = None
    if lower_mask is not sympy.false:
        lower = classify_tiles(dataclasses.replace(pat, mask=lower_mask), bound, q_tile, kv_tile)
    plan = Plan.build(pat, bound, upper)
    plan.call_lists = InputLists(pat, bound, upper, lower)
    return plan
