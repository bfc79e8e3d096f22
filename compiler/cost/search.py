"""Schedule search: candidate tile sizes and shapes, token permutation or
in-kernel multi-dimensional addressing, warps and stages, ranked by the cost
model's predicted forward time. The top few go to the autotuner.

Candidates:

- Q tiles of ``Q_TOKENS`` tokens, KV tiles of ``KV_TOKENS`` (at most the Q
  tile's);
- on a ``tokens seq`` layout, 1-D tiles;
- on a grid, "flat" 1-D tiles of the row-major token order (no permutation,
  no addressing: the tiles straddle rows; square ones only, Tq == Tk), and multi-dimensional box tiles:
  every factorisation of the token count into per-axis powers of two that
  fit the axes (128 as 2x8x8, 4x4x8, 1x8x16, ... in 3-D), run either after a
  token permutation that makes the boxes contiguous or with in-kernel
  multi-dimensional addressing. KV boxes divide the Q box per axis;
- ``num_warps`` in ``WARPS``, ``num_stages`` in ``STAGES`` (configurations
  whose shared memory or registers do not fit the hardware are dropped: ``pass_sizing``).

The search is staged to keep classification work small: every Q shape
(at most ``MAX_SHAPES`` per token count, the most cube-like first) with an
equal KV shape, then smaller KV shapes for the ``REFINE`` best Q shapes.
Each (Q tile, KV tile, flat) classification happens once per search.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import sympy

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from ..analysis import evaluate as E
from ..analysis import tiles as T
from ..analysis.schedule import (
    TileSchedule,
    tile_grid,
    tile_token_counts,
    uniform_axes,
)
from ..analysis.tile_args import parse_tiles
from ..analysis.tile_summary import summarize_tiles
from . import route_selection
from .calibration import Calibration
from .hardware import Hardware
from .model import KernelConfig, Prediction, checked_kv_heads, mask_ops, predict
from .pass_sizing import (  # the names beside the search's own are re-exported: callers import them from here
    BWD_LAUNCH,
    BWD_WARPS_MMA,
    DECAY_BWD_TILES,
    MAX_BWD_STAGES_MMA,
    MIN_TMA_ARCH,
    PASSES,
    REG_BUDGET,
    ROUTE_SELECT_TILES,
    TMA_BOX,
    TMEM_COLUMNS,
    backward_launch,
    backward_tiles,
    forward_fits,
    halved,
    has_tma,
    is_wide_kv,
    min_kv_tokens,
    padded_head_dim,
    pass_fits,
    pass_registers,
    pass_smem,
    pass_tiles,
    pass_values,
    score_tiles_of,
    sized,
    tensor_memory,
    tma_fits,
    tmem_columns,
    wide_kv_backward,
)

Q_TOKENS = (64, 128)
KV_TOKENS = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3)
MAX_SHAPES = 6
REFINE = 3
#: With only the brute-force classifier, token pairs classified at most per schedule.
DENSE_CLASSIFY_LIMIT = 1 << 26
#: Above this many tokens a grid gets one flat candidate tile size (the largest).
FLAT_GRID_SMALL = 1 << 16
#: Above this many tile pairs a `tokens seq` schedule is summarised from sampled tiles
#: (``tile_summary.summarize_tiles``) instead of listed.
SUMMARY_TILE_PAIRS = 1 << 24
#: Tile pairs a listed schedule (a grid, a routing pattern) may have at most.
MAX_LISTED_TILE_PAIRS = 1 << 28
#: Token positions are int64 and bounded in float64 intervals: exact below this.
MAX_TOKENS = 1 << 53
#: Head classes classified one by one when the mask depends on the head.
MAX_HEAD_CLASSES = 4096


def check_simulation_size(pat: ir.PatternIR, bound: E.Bound) -> None:
    """Refuse, before any work, sizes the simulator cannot model: one SpecError naming
    the argument and what it would need."""
    for what, count in (("n", bound.n), ("nk", bound.nk)):
        if count > MAX_TOKENS:
            raise SpecError(f"{count} tokens: positions are exact 64-bit ints bounded in float64, so at most "
                            f"2**53 = {MAX_TOKENS} tokens can be modelled", where=f"argument {what}")
    if T.head_dependent(pat) and bound.heads > MAX_HEAD_CLASSES:
        raise SpecError(f"the mask depends on h, so each of the {bound.heads} heads is classified on its own; "
                        f"at most {MAX_HEAD_CLASSES} heads can be", where="argument heads",
                        hint="simulate fewer heads: the speedup of a head-dependent mask is per head")


def classifier() -> Callable:
    """``tiles.classify_tiles`` (the fast one) when present, else the brute-force one."""
    return getattr(T, "classify_tiles", None) or T.classify_tiles_dense


# ----------------------------------------------------------------- tile shapes
def tile_shapes(tokens: int, extents: tuple[int, ...], limit: int | None = MAX_SHAPES) -> list[tuple[int, ...]]:
    """Per-axis powers of two with product ``tokens``, each at most its axis
    extent; the most cube-like first (then larger extents on later, faster
    axes). Empty when the grid is too small."""
    if tokens < 1 or tokens & (tokens - 1):
        raise SpecError(f"tile token counts are powers of two, got {tokens}", where="argument tokens")
    bits = tokens.bit_length() - 1
    caps = [max(0, int(L).bit_length() - 1) for L in extents]  # largest 2**e <= L
    out = []
    for exps in itertools.product(*(range(c + 1) for c in caps)):
        if sum(exps) == bits:
            out.append(tuple(1 << e for e in exps))
    free = [i for i, L in enumerate(extents) if L > 1] or [0]

    def rank(shape):
        logs = [math.log2(shape[i]) for i in free]
        return (max(logs) - min(logs), tuple(-shape[i] for i in reversed(range(len(shape)))))

    out.sort(key=rank)
    return out[:limit] if limit else out


def kv_shapes(q_shape: tuple[int, ...], tokens: int, limit: int = 2) -> list[tuple[int, ...]]:
    """KV box shapes of ``tokens`` tokens dividing the Q box per axis, most cube-like first."""
    return tile_shapes(tokens, q_shape, limit)


def contiguous(tile: tuple[int, ...], extents: tuple[int, ...]) -> bool:
    """A box is a run of the row-major order: after its first axis of extent > 1, it spans whole axes."""
    started = False
    for t, L in zip(tile, extents, strict=True):
        if started and t != L:
            return False
        if t > 1:
            started = True
    return True


# ----------------------------------------------------------------- a context-parallel block's launch
def block_config(pat: ir.PatternIR, bound: E.Bound, config: KernelConfig, head_dim: int, nbytes: int,
                 hw: Hardware) -> KernelConfig:
    """A context-parallel block's fixed tiles with launch parameters under which every pass fits on
    ``hw``: the forward's as given if it fits there, else the first of ``WARPS`` x ``STAGES`` that does;
    the backward's by ``backward_launch`` (as the search sizes a whole sequence's). Where the backward
    fits at no launch, the block takes the largest of ``backward_tiles`` where it does, for both passes
    (a block has one plan). As given where nothing fits."""
    fwd_tiles, bwd_tiles = score_tiles_of(pat, E.substitute(pat.mask, bound), hw)
    bwd = None
    for q_tile, kv_tile in backward_tiles(config.q_tile, config.kv_tile, hw):  # the block's own tiles first
        bwd = backward_launch(math.prod(q_tile), math.prod(kv_tile), head_dim, nbytes, hw, bwd_tiles)
        if bwd is not None:
            config = dataclasses.replace(config, q_tile=q_tile, kv_tile=kv_tile)
            break
    if not forward_fits(config, head_dim, nbytes, hw, fwd_tiles):
        for warps, stages in itertools.product(WARPS, STAGES):
            candidate = dataclasses.replace(config, num_warps=warps, num_stages=stages)
            if forward_fits(candidate, head_dim, nbytes, hw, fwd_tiles):
                config = candidate
                break
    return config if bwd is None else dataclasses.replace(config, bwd_num_warps=bwd[0], bwd_num_stages=bwd[1])


# ----------------------------------------------------------------- flat view of a grid pattern
def flat_view(pat: ir.PatternIR, bound: E.Bound) -> tuple[ir.PatternIR, E.Bound]:
    """The grid pattern as a ``tokens seq`` pattern over row-major flat indices
    (for 1-D tiles that straddle grid rows)."""
    subs = {}
    for role, flat_sym, layout in (("q", S.Q, pat.queries), ("k", S.K, pat.keys)):
        stride = 1
        for axis, size in reversed(layout.axes):
            extent = int(size.subs(bound.subs))
            subs[S.coord(role, axis)] = S.Mod(S.FloorDiv(flat_sym, stride), extent)
            stride *= extent
    mask = E.substitute(pat.mask, bound).xreplace(subs)
    seq = ir.Layout("seq")
    view = dataclasses.replace(pat, queries=seq, keys=ir.Layout("seq", cross=not pat.self_attention), mask=mask,
                               route=None, windows=())
    return view, dataclasses.replace(bound)


def flat_box(extents: tuple[int, ...], tile) -> tuple[int, ...] | None:
    """The box tile whose tiles are the flat tiles of ``tile[0]`` tokens over a grid of ``extents``
    (the same tokens, in the same order): whole rows (frames) of the grid, or an equal piece of one;
    None where a flat tile straddles a row it does not cover whole."""
    size, inner = tile[0], 1
    for j in reversed(range(len(extents))):
        if size % inner == 0 and extents[j] % (size // inner) == 0:
            return (1,) * j + (size // inner,) + tuple(extents[j + 1:])
        inner *= extents[j]
    return None


def classify_flat(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile, inputs: dict | None = None,
                  classify: Callable | None = None, **options) -> TileSchedule:
    """The schedule of flat tiles over a grid pattern: classified as the equal box tiles where there
    are some (``flat_box``: per-axis reasoning, and terms of a coordinate with one value per tile
    evaluated once per tile pair), else on the flat view. The schedule is the flat one either way."""
    classify = classify or T.classify_tiles
    q_ext = T.layout_extents(pat.queries, bound, bound.n)
    kv_ext = T.layout_extents(pat.keys, bound, bound.nk)
    boxes = (flat_box(q_ext, tuple(q_tile)), flat_box(kv_ext, tuple(kv_tile)))
    if pat.queries.kind == "grid" and pat.keys.kind == "grid" and not bound.q_offset and not bound.is_block \
            and all(boxes):
        sched = classify(pat, bound, boxes[0], boxes[1], inputs=inputs, **options)
        return dataclasses.replace(sched, q_extents=(math.prod(q_ext),), kv_extents=(math.prod(kv_ext),),
                                   q_tile=(min(q_tile[0], math.prod(q_ext)),), kv_tile=(min(kv_tile[0], math.prod(kv_ext)),))
    view, vbound = flat_view(pat, bound)
    return classify(view, vbound, q_tile, kv_tile, inputs=inputs, **options)


# ----------------------------------------------------------------- routing model
def route_schedule(pat: ir.PatternIR, bound: E.Bound, sched: TileSchedule, inputs: dict | None = None,
                   selection: route_selection.RouteSelection | None = None) -> TileSchedule:
    """The schedule of a routing pattern at ``sched``'s tiles: the tiles holding a pair the route's selection
    attends (``route_selection``: modelled per query on the route's own blocks or keys, whatever the tiles),
    with that selection's count of attended pairs. ``selection``: made once per search (else here)."""
    if selection is None:
        selection = route_selection.select(pat, bound, inputs)
    return route_selection.tile_schedule(selection, sched.q_extents, sched.kv_extents, sched.q_tile, sched.kv_tile)


# ----------------------------------------------------------------- the search
@dataclass
class Candidate:
    """One ranked schedule: the kernel configuration, its tile schedule and prediction."""

    config: KernelConfig
    schedule: TileSchedule
    prediction: Prediction

    @property
    def forward_s(self) -> float:
        return self.prediction.forward.time_s

    @property
    def backward_s(self) -> float:
        return self.prediction.backward.time_s

    def to_dict(self) -> dict:
        s = self.schedule
        total = s.num_heads * s.num_q_tiles * s.num_kv_tiles
        return {**self.prediction.to_dict(), "full": s.full, "partial": s.partial, "empty": s.empty,
                "tile_bound": total / s.visited if s.visited else math.inf}


class ScheduleSearch:
    """Candidate schedules of one pattern at one size on one hardware model."""

    def __init__(self, pat: ir.PatternIR, bound: E.Bound, hw: Hardware, *, head_dim: int = 128, batch: int = 1,
                 nbytes: int = 2, inputs: dict | None = None, calibration: Calibration | None = None,
                 classify: Callable | None = None, kv_heads: int | None = None):
        self.pat, self.bound, self.hw = pat, bound, hw
        self.head_dim, self.batch, self.nbytes = head_dim, batch, nbytes
        #: K/V heads shared by the query heads (grouped-query attention; ``cost.predict``)
        self.kv_heads = checked_kv_heads(bound.heads, kv_heads)
        self.inputs, self.calibration = inputs, calibration
        self.classify = classify or classifier()
        self.q_ext = T.layout_extents(pat.queries, bound, bound.n)
        self.kv_ext = T.layout_extents(pat.keys, bound, bound.nk)
        #: more than one axis somewhere: flat 1-D tiles need the flat view of the pattern
        self.grid = len(self.q_ext) > 1 or len(self.kv_ext) > 1
        #: multi-dimensional box tiles: both layouts are grids with the same number of axes
        self.boxes = pat.queries.kind == "grid" and pat.keys.kind == "grid" and len(self.q_ext) == len(self.kv_ext)
        self.mask = E.substitute(pat.mask, bound)
        self.min_kv = min_kv_tokens(hw)
        #: score-shaped register tiles per pass (``pass_tiles``): S/P and dP/dS, and a routing pattern's selection
        #: and a long mask's temporaries (``mask_score_tiles``, of the whole mask: the float64 work of terms with
        #: one value per tile pair, radial's exp2, division and fmod, also raises the register peak)
        #: the backward's: a FoX decay's kernels also hold the pair decay weights, the row-sum products
        #: and the gate prefixes (``DECAY_BWD_TILES`` more)
        self.score_tiles, self.bwd_score_tiles = score_tiles_of(pat, self.mask, hw)
        self._pair_masks: dict = {}
        self._cache: dict = {}
        self._flat: tuple | None = None
        #: a route's selection (``route_selection.select``): one per search, whatever the tiles
        self._selection: route_selection.RouteSelection | None = None
        self.classifications = 0

    # ------------------------------------------------------------ schedules (cached)
    def schedule(self, q_tile: tuple[int, ...], kv_tile: tuple[int, ...], flat: bool = False) -> TileSchedule:
        key = (tuple(q_tile), tuple(kv_tile), flat)
        if key not in self._cache:
            pat, bound = self.pat, self.bound
            if flat and self.grid:
                if self._flat is None:
                    self._flat = flat_view(pat, bound)
                pat, bound = self._flat
            if self.classify is T.classify_tiles_dense and bound.n * bound.nk > DENSE_CLASSIFY_LIMIT:
                raise SpecError(f"{bound.n} x {bound.nk} token pairs are too many for brute-force tile classification",
                                where="argument sizes", hint="the fast classifier (tiles.classify_tiles) is needed")
            pairs = math.prod(tile_grid(T.layout_extents(pat.queries, bound, bound.n), tuple(q_tile))) * math.prod(
                tile_grid(T.layout_extents(pat.keys, bound, bound.nk), tuple(kv_tile)))
            seq = pat.queries.kind == "seq" and pat.keys.kind == "seq"
            if pairs > SUMMARY_TILE_PAIRS and seq and self.pat.route is None and self.classify is not T.classify_tiles_dense:
                # too many tile pairs to list: per-CTA counts of sampled tiles stand for them
                sched = summarize_tiles(pat, bound, q_tile, kv_tile, inputs=self.inputs)
                self.classifications += 1
                self._cache[key] = sched
                return sched
            if pairs > MAX_LISTED_TILE_PAIRS:
                raise SpecError(f"{pairs} tile pairs at tiles {tuple(q_tile)} x {tuple(kv_tile)}: listing them needs "
                                f"about {pairs * 8 // 2**30} GiB; at most {MAX_LISTED_TILE_PAIRS} tile pairs"
                                + (" for a routing pattern" if self.pat.route is not None else " on a grid"),
                                where="argument sizes" if self.grid else "argument n",
                                hint="larger tiles (q_tile=, kv_tile=) or a smaller size")
            if flat and self.grid:
                sched = classify_flat(self.pat, self.bound, q_tile, kv_tile, self.inputs, self.classify)
            else:
                sched = self.classify(pat, bound, q_tile, kv_tile, inputs=self.inputs)
            self.classifications += 1
            if self.pat.route is not None:
                sched = route_schedule(self.pat, self.bound, sched, selection=self.selection())
            self._cache[key] = sched
        return self._cache[key]

    def selection(self) -> route_selection.RouteSelection:
        """The route's selection at token level (``route_selection.select``), made once."""
        if self._selection is None:
            self._selection = route_selection.select(self.pat, self.bound, self.inputs)
        return self._selection

    # ------------------------------------------------------------ what a kernel evaluates per score
    def _pair(self, q_tile, kv_tile) -> tuple[sympy.Basic, int]:
        scalars = []
        for role, layout, ext, tile in (("q", self.pat.queries, self.q_ext, q_tile),
                                        ("k", self.pat.keys, self.kv_ext, kv_tile)):
            axes = ext if layout.kind == "grid" else ()
            extents = ext if len(tile) > 1 else (math.prod(ext),)
            scalars += [S.coord(role, layout.axis_names[i]) for i in uniform_axes(extents, tuple(tile), axes)]
        key = frozenset(scalars)
        if key not in self._pair_masks:
            part = S.pair_part(self.mask, key)
            self._pair_masks[key] = part, mask_ops(part, self.calibration or Calibration())
        return self._pair_masks[key]

    def pair_mask(self, q_tile, kv_tile) -> sympy.Basic:
        """The mask as the kernels at these tiles evaluate it per score: terms of coordinates with
        one value per tile (``schedule.uniform_axes``) are computed once per tile pair."""
        return self._pair(q_tile, kv_tile)[0]

    def pair_ops(self, q_tile, kv_tile) -> int:
        """Elementwise operations per score of ``pair_mask`` (``cost.mask_ops``)."""
        return self._pair(q_tile, kv_tile)[1]

    def evaluate(self, config: KernelConfig, flat: bool, ordered: bool = True) -> Candidate:
        """``config`` ranked on this search's schedules (``ordered``: as ``cost.predict``'s)."""
        sched = self.schedule(config.q_tile, config.kv_tile, flat)
        # the backward walks its own tiles' lists where it has some (the runtime re-plans at them)
        bwd, dq = config.backward_config(), config.dq_config()
        bsched = self.schedule(bwd.q_tile, bwd.kv_tile, flat) if config.own_backward_tiles else None
        dsched = self.schedule(dq.q_tile, dq.kv_tile, flat) if config.own_dq_tiles else None
        pred = predict(sched, config, self.hw, head_dim=self.head_dim, batch=self.batch, nbytes=self.nbytes,
                       ops=self.pair_ops(config.q_tile, config.kv_tile),
                       grid_axes=len(self.q_ext) if self.grid else 1, calibration=self.calibration,
                       backward_schedule=bsched, dq_schedule=dsched, ordered=ordered,
                       routed=self.pat.route is not None, kv_heads=self.kv_heads)
        return Candidate(config, sched, pred)

    def _configs(self, q_tile, kv_tile, layouts) -> list[KernelConfig]:
        """The launch parameters under which both passes fit (per pass: the forward's warps and
        stages, the backward's chosen by ``backward_launch``)."""
        out = []
        for layout, warps, stages in itertools.product(layouts, WARPS, STAGES):
            # a routing pattern selects per plan: one more plan for the dQ kernel would select again
            cfg = sized(KernelConfig(tuple(q_tile), tuple(kv_tile), layout, warps, stages), self.head_dim,
                        self.nbytes, self.hw, self.score_tiles, self.bwd_score_tiles, dq_tiles=self.pat.route is None)
            if cfg is not None:
                out.append(cfg)
                # on tensor memory, dK/dV on 128 KV rows where it fits (tcgen05's M; the cost model weighs it)
                wide = self.wide_backward(cfg) if tensor_memory(self.hw) else None
                if wide is not None and wide != cfg:
                    out.append(wide)
        if not out:  # nothing fits: keep the smallest pipeline so a prediction exists (``fits`` says no)
            out.append(KernelConfig(tuple(q_tile), tuple(kv_tile), layouts[0], max(WARPS), 1, max(WARPS), 1))
        return out

    def wide_backward(self, config: KernelConfig, *, registers: bool = True,
                      nbytes: int | None = None) -> KernelConfig | None:
        """``wide_kv_backward`` of ``config`` on this search's keys and hardware (``registers``: as there);
        None for a route (its selection is one plan per call) or a FoX decay (its dK/dV fits at 32 rows)."""
        if self.pat.route is not None or self.pat.decay is not None:
            return None
        return wide_kv_backward(config, self.head_dim, self.nbytes if nbytes is None else nbytes, self.hw,
                                self.bwd_score_tiles, registers=registers, kv_ext=self.kv_ext)

    def fits(self, config: KernelConfig) -> bool:
        """Both passes of ``config`` fit this hardware (shared memory and registers): its forward and a
        backward at some tiles (``sized``), and the backward's and dQ kernel's own tiles where it has them,
        at its backward launch (tensor memory asked for a ``wide_kv_backward`` dK/dV on tcgen05)."""
        if sized(config, self.head_dim, self.nbytes, self.hw, self.score_tiles, self.bwd_score_tiles) is None:
            return False
        if not (config.own_backward_tiles or config.own_dq_tiles):
            return True
        b, dq, d = config.backward_config(), config.dq_config(), self.head_dim
        launch = (config.bwd_warps, config.bwd_stages, self.hw, self.bwd_score_tiles)
        return (pass_fits("bwd_dkdv", b.q_tokens, b.kv_tokens, d, self.nbytes, *launch,
                          in_tmem=is_wide_kv(config) and tensor_memory(self.hw))
                and pass_fits("bwd_dq", dq.q_tokens, dq.kv_tokens, d, self.nbytes, *launch))

    def _box_layouts(self, q_tile, kv_tile) -> tuple[str, ...]:
        if contiguous(q_tile, self.q_ext) and contiguous(kv_tile, self.kv_ext):
            return ("flat",)
        return ("permute", "address")

    def _all(self, q_tile, kv_tile, flat: bool) -> list[Candidate]:
        layouts = ("flat",) if flat or not self.boxes else self._box_layouts(q_tile, kv_tile)
        return [self.evaluate(cfg, flat) for cfg in self._configs(q_tile, kv_tile, layouts)]

    # ------------------------------------------------------------ search
    def run(self, q_tile=None, kv_tile=None, top: int = 5) -> list[Candidate]:
        """The ``top`` candidates, fastest predicted forward first. ``q_tile``/``kv_tile``
        force the tile shapes (an int, or one entry on a grid, means flat 1-D tiles)."""
        if q_tile is not None or kv_tile is not None:
            found = self._forced(q_tile, kv_tile)
        else:
            found = self._search()
        # a candidate whose passes do not fit only stands in when nothing fits (a prediction still exists)
        found = [c for c in found if self.fits(c.config)] or found
        found.sort(key=lambda c: (c.forward_s, c.backward_s))
        return found[:top] if top else found

    def _forced(self, q_tile, kv_tile) -> list[Candidate]:
        qt, kt, flat = parse_tiles(self.pat, q_tile, kv_tile).fit(self.q_ext, self.kv_ext)  # the one convention
        if self.grid and not flat and not self.boxes:  # boxes on layouts of different ranks: addressed tiles
            return [self.evaluate(cfg, False) for cfg in self._configs(qt, kt, ("address",))]
        return self._all(qt, kt, flat)

    def _search(self) -> list[Candidate]:
        found: list[Candidate] = []
        n_q, n_k = math.prod(self.q_ext), math.prod(self.kv_ext)
        if not self.boxes or (self.grid and self.pat.route is None):
            for tq, tk in itertools.product(Q_TOKENS, KV_TOKENS):
                if tk < self.min_kv and tk < n_k:
                    continue
                # flat tiles on a grid: square ones only, and only 128 on large grids (their
                # classification, through floored division of the flat index, is the slow kind)
                if tk <= tq and not (self.grid and (tk != tq or (n_q > FLAT_GRID_SMALL and tq != max(Q_TOKENS)))):
                    found += self._all((min(tq, n_q),), (min(tk, n_k),), self.grid)
        if self.boxes:
            stage1: list[tuple[float, tuple]] = []
            for tq in Q_TOKENS:
                for shape in tile_shapes(tq, self.q_ext):
                    kv = tuple(min(t, L) for t, L in zip(shape, self.kv_ext, strict=True))
                    cands = self._all(shape, kv, False)
                    found += cands
                    stage1.append((min(c.forward_s for c in cands), shape))
            stage1.sort()
            for _, shape in stage1[:REFINE]:
                for tk in KV_TOKENS:
                    if tk < math.prod(shape) and (tk >= self.min_kv or tk >= n_k):
                        for kv in kv_shapes(shape, tk):
                            found += self._all(shape, tuple(min(t, L) for t, L in zip(kv, self.kv_ext, strict=True)),
                                               False)
        if not found:  # a grid smaller than any candidate tile: one tile per axis
            found += self._all(self.q_ext, self.kv_ext, False) if self.boxes else self._all((n_q,), (n_k,), self.grid)
        return found

    def exactly_counted(self) -> TileSchedule | None:
        """Any schedule classified so far whose allowed pairs are counted exactly."""
        for sched in self._cache.values():
            if sched.density_exact:
                return sched
        return None

    def exact_density(self) -> float | None:
        """The density from any exactly counted schedule classified so far."""
        sched = self.exactly_counted()
        return None if sched is None else sched.density


__all__ = ["BWD_LAUNCH", "BWD_WARPS_MMA", "Candidate", "DECAY_BWD_TILES", "MAX_BWD_STAGES_MMA", "MIN_TMA_ARCH",
           "PASSES", "REG_BUDGET", "ROUTE_SELECT_TILES", "TMA_BOX", "TMEM_COLUMNS", "ScheduleSearch", "backward_launch",
           "backward_tiles",
           "classifier", "classify_flat", "contiguous", "flat_box", "flat_view", "forward_fits", "halved", "is_wide_kv",
           "kv_shapes", "min_kv_tokens", "padded_head_dim", "pass_fits", "pass_registers", "pass_smem", "pass_tiles",
           "pass_values", "route_schedule", "sized", "tensor_memory", "tile_grid", "tile_shapes", "tile_token_counts",
           "has_tma", "tma_fits", "tmem_columns", "wide_kv_backward"]
