"""The CPU backend: picks a tile shape, builds and caches the executor plan per
shapes, and runs ``executor.TiledAttention``."""

from __future__ import annotations

import math

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.tile_args import parse_tiles
from ....compiler.analysis.tiles import (
    RANK_REFINE_BUDGET,
    classify_tiles,
    head_classes,
    layout_extents,
)
from ....compiler.cost.search import classify_flat, flat_box, flat_view, tile_shapes
from ....core import ir
from ....core.errors import SpecError
from ...compiling import compiling
from ...ops import common as ops
from ...ops.common import Registered
from ...plan import routing, tile_plan
from ...plan.cache import (
    PLAN_CACHE_SIZE,
    PlanCache,
    block_key,
    mask_input_names,
    mask_uses_inputs,
    ranked_schedule,
    same_tensors,
)
from ...runner import Call, Support
from . import executor, fused
from . import rows as decode

#: Tile token counts tried for the CPU executor.
CPU_TILE_TOKENS = (32, 64, 128)
#: Relative cost of one visited tile pair beyond its token pairs (gathers, small matmuls).
PAIR_OVERHEAD_TOKENS = 2048
#: Extra cost of a PARTIAL token pair (mask evaluation) relative to a FULL one.
PARTIAL_EXTRA = 0.5
#: Cost of a token pair of the whole-sequence tile (``whole_tile_fits``), in the units of
#: ``_cpu_cost``: torch's fused kernel on q, k and v as they are (no gathers, no padded lists) with
#: the plan's cached float mask, as SDPA with a dense mask. Measured on this project's 2-core CPU
#: (fp32, d 64, quiet, interleaved medians): the whole tile runs 1.73e-6 ms per token pair and head
#: (radial 16 x 512 tokens, 4 heads: 465 ms forward, 1,620 ms forward + backward; SDPA with the
#: same mask 464 / 1,577), the tiled plans 2.1-3.1e-6 ms per ``_cpu_cost`` unit (radial 3.05,
#: sliding window 512 @ 8K 2.5, streaming 3.0, 3-D neighborhood 2.1): 0.6 of a unit.
WHOLE_PAIR_COST = 0.6
#: Block plans a ``CpuRunner`` keeps for context parallelism (least recently used dropped first):
#: one per (sizes, heads, offsets, rows); a rank of a ring of r positions meets at most 4r blocks
#: (2 chunks of its queries against 2r chunks of keys), the same at every call.
BLOCK_PLANS = 64
#: Tokens a side needs for the whole-sequence tile to be considered: below, either runs in
#: milliseconds and the tiled plans stay (their schedules are what the tests exercise).
WHOLE_MIN_TOKENS = 2048


def _cpu_cost(sched) -> float:
    h, qi, ki, full = sched.pairs()
    area = (sched.q_tile_tokens()[qi] * sched.kv_tile_tokens()[ki]).to(torch.float64)
    return float((area * torch.where(full, 1.0, 1.0 + PARTIAL_EXTRA)).sum()) + PAIR_OVERHEAD_TOKENS * len(h)


def whole_tile_fits(pat: ir.PatternIR, bound: E.Bound, mask_itemsize: int = 4) -> bool:
    """Whether one tile of the whole sequence per side may serve the call (the caller also needs
    the fused kernel: ``fused.fused_shapes``): a mask alone (no input, routing, bias, decay or
    softcap: the fused backward then serves every gradient, and the mask is evaluated once), both
    sides at least ``WHOLE_MIN_TOKENS``, and its float mask (``mask_itemsize`` bytes a pair: 8 for
    float64 calls), allowed and valid pairs per head class within ``tile_plan.WHOLE_CACHE_BYTES``
    (less 1 MiB for the rest its cache keeps)."""
    if pat.route is not None or pat.bias is not None or pat.decay is not None or pat.softcap is not None or \
            pat.weights is not None:
        return False
    if pat.inputs or min(bound.n, bound.nk) < WHOLE_MIN_TOKENS or bound.q_offset or bound.is_block:
        return False
    return (mask_itemsize + 2) * bound.n * bound.nk * head_classes(pat, bound) <= tile_plan.WHOLE_CACHE_BYTES - (1 << 20)


def choose_tiles(pat: ir.PatternIR, bound: E.Bound, inputs: dict,
                 classified: dict | None = None, whole: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The (Q tile, KV tile) with the least estimated CPU work: visited token pairs
    (PARTIAL ones dearer) plus a fixed cost per visited tile pair; with ``whole`` (the call runs
    the fused kernel and ``whole_tile_fits``), also one tile of the whole sequence per side at
    ``WHOLE_PAIR_COST`` a token pair (dense-like masks: radial). ``classified``: a dict
    (q_tile, kv_tile, flat) -> exact schedules to reuse (masks that read no input)."""
    q_ext = layout_extents(pat.queries, bound, bound.n)
    kv_ext = layout_extents(pat.keys, bound, bound.nk)
    best = None
    if whole:
        best = (WHOLE_PAIR_COST * bound.n * bound.nk * head_classes(pat, bound), tuple(q_ext), tuple(kv_ext))
    for tokens in CPU_TILE_TOKENS:
        q_shapes = tile_shapes(tokens, q_ext, limit=3) or [tuple(min(tokens, L) for L in q_ext)]
        row = flat_box(q_ext, (tokens,)) if len(q_ext) > 1 else None
        if row is not None and row not in q_shapes:  # whole rows or a piece of one (radial's in-frame tiles)
            q_shapes.append(row)
        for shape in q_shapes:
            kv_shape = shape if q_ext == kv_ext else (tile_shapes(tokens, kv_ext, limit=1) or [kv_ext])[0]
            key = (shape, kv_shape, False)
            sched = ranked_schedule(classified, key)
            if sched is None:  # ranked on a bounded refinement; the plan classifies its pick exactly
                sched = classify_tiles(pat, bound, shape, kv_shape, inputs, refine_budget=RANK_REFINE_BUDGET, witness=False)
                if classified is not None:
                    classified[("ranked", *key)] = sched
            cost = _cpu_cost(sched)
            if best is None or cost < best[0]:
                best = (cost, shape, kv_shape)
    return best[1], best[2]


class CpuRunner(Registered):
    """The tile executor. Plans per (sizes, n, nk, heads, whole tile allowed), kept in a bounded LRU cache (``PLAN_CACHE_SIZE``);
    data-dependent masks are classified per call; a few queries after a KV cache take the
    decoding-rows path (``runtime.backends.cpu.rows``: no tile classification per step)."""

    def __init__(self, pat: ir.PatternIR, q_tile=None, kv_tile=None, max_plans: int | None = None):
        self.pattern = pat
        self.tiles = parse_tiles(pat, q_tile, kv_tile)  # the one convention (compiler.analysis.tile_args)
        self.register_op()  # under torch.compile: attnc::tiled_attention
        self.plans = PlanCache(PLAN_CACHE_SIZE if max_plans is None else E.positive_int("max_plans", max_plans))
        self.last: tile_plan.Plan | None = None
        #: data-dependent masks: the latest plan with the inputs it was built for
        #: (a later call, or the backward, with equal inputs reuses it)
        self._dynamic_last: tuple | None = None
        #: schedules of static masks classified for the latest shapes, by (q_tile, kv_tile, flat)
        #: (exact) and ("ranked", q_tile, kv_tile, flat) (bounded, to rank candidates by); shared
        #: with the Flex lowering under backend="auto" (runtime.auto.cpu), so that planning
        #: both backends classifies each tile shape once
        self.classified: dict = {}
        self._classified_key = None
        self._substituted: dict = {}  # decoding rows: mask and bias at the sizes they read
        #: blocks of context parallelism: (mask inputs the plan was built for, plan) by
        #: (sizes, heads, q_offset, n, k_offset, nk); apart from ``plans`` so that a module's own
        #: plans are not pushed out
        self.block_plans = PlanCache(BLOCK_PLANS)

    @property
    def max_plans(self) -> int:
        """How many plans this runner keeps (LRU)."""
        return self.plans.limit

    @max_plans.setter
    def max_plans(self, value: int) -> None:
        self.plans.limit = E.positive_int("max_plans", value)
        self.plans.trim()

    def plan(self, bound: E.Bound, inputs: dict, fused: bool = False,
             mask_itemsize: int = 4) -> tile_plan.Plan | decode.RowPlan:
        """The plan for these sizes, cached by (sizes, n, nk, heads, whole tile allowed); ``fused``:
        the call runs torch's fused kernel (``fused.fused_shapes``), so the whole-sequence tile is
        a candidate where it fits (``whole_tile_fits`` with the call's float mask ``mask_itemsize``)."""
        pat = self.pattern
        dynamic = mask_uses_inputs(pat)
        whole = fused and not self.tiles.forced and whole_tile_fits(pat, bound, mask_itemsize)
        key = (tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk, bound.heads, whole)
        if decode.applies(bound):
            # decoding rows: the rows' exact mask, no tile classification (runtime.backends.cpu.rows)
            plan = None if dynamic else self.plans.get(key)
            if plan is None:
                batched = {n for n, t in inputs.items() if t.dim() > len(pat.input(n).dims)}
                plan = decode.RowPlan.build(pat, bound, inputs, batched, self._substituted)
                if not dynamic:
                    self.plans[key] = plan
            self.last = plan
            return plan
        if not dynamic and key in self.plans:
            self.last = self.plans.get(key)
            return self.last
        used = {n: t for n, t in inputs.items() if n in mask_input_names(pat)} if dynamic else {}
        if dynamic and self._dynamic_last is not None and self._dynamic_last[0] == key:
            seen = self._dynamic_last[1]
            if seen.keys() == used.keys() and all(
                    seen[n].shape == t.shape and seen[n].dtype == t.dtype and torch.equal(seen[n], t)
                    for n, t in used.items()):
                self.last = self._dynamic_last[2]
                return self.last
        if bound.q_offset and pat.queries.kind == "grid":
            # queries after a KV cache are a suffix of the grid's token order, not a box:
            # 1-D tiles classified on the flat view (the executor evaluates the grid pattern)
            view, view_bound = flat_view(pat, bound)
            if self.tiles.forced:  # a forced box counts as its number of tokens
                q_tile = (min(math.prod(self.tiles.q), bound.n),)
                kv_tile = (min(math.prod(self.tiles.kv), bound.nk),)
            else:
                q_tile, kv_tile = choose_tiles(view, view_bound, inputs)
            return self._store(key, dynamic, tile_plan.Plan.build(
                pat, bound, classify_tiles(view, view_bound, q_tile, kv_tile, inputs)), inputs)
        q_ext = layout_extents(pat.queries, bound, bound.n)
        kv_ext = layout_extents(pat.keys, bound, bound.nk)
        flat = False
        memo = None if dynamic else self.schedules_for(key[:-1])  # tiled schedules serve either key
        if self.tiles.forced:
            q_tile, kv_tile, flat = self.tiles.fit(q_ext, kv_ext)
        elif dynamic and key in self.plans:
            q_tile, kv_tile = self.plans[key].schedule.q_tile, self.plans[key].schedule.kv_tile
        else:
            q_tile, kv_tile = choose_tiles(pat, bound, inputs, memo, whole=whole)
        if memo is not None and (q_tile, kv_tile, flat) in memo:
            schedule = memo[(q_tile, kv_tile, flat)]
        elif flat:  # 1-D tiles of a grid's token order: classified on the flat view; the
            # executor evaluates the pattern itself on the flat tokens of those tiles
            schedule = classify_flat(pat, bound, q_tile, kv_tile, inputs)
        else:
            schedule = classify_tiles(pat, bound, q_tile, kv_tile, inputs)
        if memo is not None:  # the Flex lowering may plan the same tiles (auto)
            memo[(q_tile, kv_tile, flat)] = schedule
        return self._store(key, dynamic, tile_plan.Plan.build(pat, bound, schedule), inputs)

    def call_plan(self, bound: E.Bound, inputs: dict, q: torch.Tensor, v: torch.Tensor | None = None):
        """``plan`` for a call on ``q`` and ``v``: the whole-sequence tile is a candidate where the fused
        kernel takes them, its float mask in the call's precision."""
        return self.plan(bound, inputs, fused=v is not None and fused.fused_shapes(q, v),
                         mask_itemsize=8 if q.dtype == torch.float64 else 4)

    def _store(self, key, dynamic: bool, plan: tile_plan.Plan, inputs: dict) -> tile_plan.Plan:
        if plan.whole:  # modules of the same mask and sizes share its masks (tile_plan.share_whole_cache)
            plan = tile_plan.share_whole_cache(plan)
        self.plans[key] = plan
        self.last = plan
        if dynamic:  # this plan only ever runs with these mask inputs (``plan`` compares them)
            plan.inputs_fixed = True
            used = {n: t for n, t in inputs.items() if n in mask_input_names(self.pattern)}
            self._dynamic_last = (key, {n: t.detach().clone() for n, t in used.items()}, plan)
        return plan

    def schedules_for(self, key) -> dict:
        """``classified`` for the shapes ``key``, emptied when the shapes change."""
        if self._classified_key != key:
            self.classified.clear()
            self._classified_key = key
        return self.classified

    def prepare(self, bound: E.Bound, q, k, inputs: dict, v=None) -> tuple[tile_plan.Plan, dict, frozenset]:
        """(plan for this call, checked inputs, names of batched inputs). Routing
        lists depend on q and k and are rebuilt per call (the backward rebuilds
        the same ones from the saved q and k). ``v``: where given, the plan may take the
        whole-sequence tile when the fused kernel takes q and v."""
        tensors, _ = E.bind_inputs(self.pattern, bound, inputs, batch=q.shape[0])
        E.check_mask_indices(self.pattern, bound, tensors, batch=q.shape[0])  # the tiles read the mask only in part
        plan = self.call_plan(bound, tensors, q, v)
        batched = frozenset(n for n, t in tensors.items() if t.dim() > len(self.pattern.input(n).dims))
        if self.pattern.route is not None and not isinstance(plan, decode.RowPlan):  # data-dependent lists
            plan = routing.route_plan(plan, q, k, tensors, set(batched))
        return plan, tensors, batched

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float):
        plan, tensors, batched = self.prepare(bound, q, k, inputs, v)
        names = tuple(tensors)
        return executor.TiledAttention.apply(plan, scale, batched, names, q, k, v, *(tensors[n] for n in names))

    # ------------------------------------------------------------ blocks (runtime.runner.BlockRunner)
    def block_plan(self, bound: E.Bound, tensors: dict) -> tile_plan.Plan:
        """The plan of a block (``evaluate.block_bound``): 1-D tiles of its rows (a grid's on the flat
        view, as queries after a KV cache), classified with both offsets; cached in ``block_plans`` per
        (sizes, heads, offsets, rows) and, for a mask that reads inputs, per those inputs' values."""
        pat = self.pattern
        key = block_key(bound)
        used = {n: t for n, t in tensors.items() if n in mask_input_names(pat)}
        entry = self.block_plans.get(key)
        if entry is not None and same_tensors(entry[0], used):
            return entry[1]
        view, view_bound = (pat, bound) if pat.queries.kind == "seq" else flat_view(pat, bound)
        if self.tiles.forced:  # a forced box counts as its number of tokens
            q_tile = (min(math.prod(self.tiles.q), bound.n),)
            kv_tile = (min(math.prod(self.tiles.kv), bound.nk),)
        elif entry is not None:  # new mask inputs, the same sizes: the tiles chosen before
            q_tile, kv_tile = entry[1].schedule.q_tile, entry[1].schedule.kv_tile
        else:
            q_tile, kv_tile = choose_tiles(view, view_bound, tensors)
        plan = tile_plan.Plan.build(pat, bound, classify_tiles(view, view_bound, q_tile, kv_tile, tensors))
        plan.inputs_fixed = bool(used)  # this plan only ever runs with these mask inputs
        self.block_plans[key] = ({n: t.detach().clone() for n, t in used.items()}, plan)
        return plan

    def _block(self, bound: E.Bound, q, inputs: dict, selection, key_block):
        if not bound.is_block:
            raise SpecError("expected a block bound (evaluate.block_bound)", where="argument bound")
        tensors, _ = E.bind_inputs(self.pattern, bound, inputs, batch=q.shape[0])
        E.check_mask_indices(self.pattern, bound, tensors, batch=q.shape[0])
        plan = self.block_plan(bound, tensors)
        if selection is not None:  # routing: the selection made over the whole sequence
            plan = routing.selected_plan(plan, selection.cpu(), key_block.cpu())
        batched = {n for n, t in tensors.items() if t.dim() > len(self.pattern.input(n).dims)}
        return plan, tensors, batched

    def block_forward(self, bound: E.Bound, q, k, v, inputs: dict, scale: float, selection=None, key_block=None):
        """``(out, lse)`` of a block in the compute dtype (``runtime.runner.BlockRunner``)."""
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        plan, tensors, batched = self._block(bound, q, inputs, selection, key_block)
        out, lse = executor.forward(plan, q.to(dt), k.to(dt), v.to(dt), tensors, batched, scale)
        return out, lse.to(dt)

    def block_backward(self, bound: E.Bound, q, k, v, out, lse, dout, inputs: dict, scale: float,
                       selection=None, key_block=None, dlse=None, wrt: tuple = ()):
        """``(dq share, dk, dv, {input: gradient})`` of a block from the rows' merged ``out`` and ``lse``
        (flash attention's backward: P from the merged lse, delta = rowsum(dout * out) - dlse of the whole
        row); the inputs' gradients through the score terms, read at absolute positions."""
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        plan, tensors, batched = self._block(bound, q, inputs, selection, key_block)
        return executor.backward(plan, q.to(dt), k.to(dt), v.to(dt), out.to(dt), lse.to(dt), dout.to(dt),
                                 None if dlse is None else dlse.to(dt), tensors, batched, scale, list(wrt))

    # ------------------------------------------------------------ the Runner protocol (runtime.runner)
    name = "cpu"
    op = "tiled"
    support = Support(query_offset="native", key_offset=frozenset({"cpu"}))

    @property
    def last_schedule(self):
        return None if self.last is None else self.last.schedule

    def forward(self, call: Call, q, k, v):
        """Through ``attnc::tiled_attention`` where autograd records the call or dynamo traces it; an
        eager inference call runs its implementation directly (the op's dispatch imports
        torch._dynamo at its first call: seconds of a first call, for no autograd to record)."""
        args = (q, k, v, list(call.inputs.values()), self.op_key, ",".join(call.inputs),
                ops.encode_sizes(call.sizes), float(call.scale))
        if not call.grad and not compiling():
            return ops._forward_impl(*args)
        return ops.tiled_attention(*args)

    def traced_forward(self, bound: E.Bound, q, k, v, inputs: dict, scale: float):
        """The op's forward: ``(out, lse)`` of the executor, no autograd."""
        plan, tensors, batched = self.prepare(bound, q, k, inputs, v)
        return executor.forward(plan, q, k, v, tensors, set(batched), scale)

    def traced_backward(self, bound: E.Bound, q, k, v, out, lse, dout, dlse, inputs: dict, scale: float,
                        wrt: list[str]):
        """The op's backward: ``(dq, dk, dv, {input: gradient})`` for the inputs named in ``wrt``."""
        plan, tensors, batched = self.prepare(bound, q, k, inputs, v)
        return executor.backward(plan, q, k, v, out, lse, dout, dlse, tensors, set(batched), scale, wrt)

    def describe(self) -> str:
        return describe_plan(self.last, self.pattern)


def describe_plan(plan: tile_plan.Plan | None, pat: ir.PatternIR) -> str:
    """A readable account of what the CPU backend runs."""
    lines = [f"# cpu backend: tile executor for '{pat.name}'", *pat.describe_terms()]
    if plan is None:
        lines.append("# no call yet: the tile schedule is built at the first call (per shapes)")
        return "\n".join(lines) + "\n"
    if isinstance(plan, decode.RowPlan):
        lines += [f"decoding rows: {plan.bound.n} queries after a KV cache of {plan.bound.nk} keys "
                  f"(positions {plan.bound.q_offset}..{plan.bound.nk - 1}); the rows' exact mask, no tile schedule",
                  "  (runtime.backends.cpu.rows): the visited keys a view of the cache when contiguous, else gathered"]
        return "\n".join(lines) + "\n"
    s = plan.schedule
    lines += [
        f"q_tile = {s.q_tile}  kv_tile = {s.kv_tile}  tiles {s.num_q_tiles} x {s.num_kv_tiles}",
        f"visited pairs: {s.full} FULL (no mask work), {s.partial} PARTIAL (mask evaluated), {s.empty} EMPTY (skipped)",
        f"density {s.density:.4g}  tile-wise bound {s.num_heads * s.num_q_tiles * s.num_kv_tiles / max(1, s.visited):.3g}x",
        "Q tiles in chunks of similar list widths; per chunk: gather K/V of each tile's FULL then PARTIAL",
        "  tiles; the mask is evaluated on PARTIAL columns only (once per plan, with the chunk layout, for a",
        "  static mask or fixed mask inputs); bias and decay join it as a float mask; torch's fused CPU",
        "  attention kernel runs the chunk (softcap: scores, softmax and @ v unfused)",
        "backward: torch's fused CPU attention backward per chunk (P recomputed from the saved lse; dK/dV",
        "  added to their keys; the lse's gradient through one extra feature) when no score input needs a",
        "  gradient; else recompute P,",
        "  dQ over the Q tiles' lists, dK/dV over the transposed lists",
    ]
    return "\n".join(lines) + "\n"
