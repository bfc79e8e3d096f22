"""Tile classification: which (Q tile, KV tile) pairs of a pattern are EMPTY
(no allowed pair), FULL (no masked pair) or PARTIAL.

``classify_tiles`` never looks at every (query, key) pair for the stdlib's
static patterns:

1. Separable masks (a conjunction of terms each on one grid axis, e.g. a
   NATTEN window per axis) are classified per axis exactly and combined:
   a pair is FULL when FULL on every axis, EMPTY when EMPTY on one, and its
   allowed-pair count is the product of the per-axis counts.
2. Everything else goes through sound interval reasoning over tile boxes
   (``compiler.analysis.intervals``), hierarchically: a box pair proven FULL or EMPTY
   decides every tile pair inside it; only undecided boxes are split. Affine
   terms (bands, causal) and NATTEN windows have exact interval rules, so the
   KV range of a Q tile comes out in closed form.
3. PARTIAL pairs left by (2) are refined exactly, token by token, where the
   budget allows; beyond it they stay PARTIAL (sound: never a wrong FULL or
   EMPTY) and the density is estimated from sampled queries.

``classify_tiles_dense`` is the brute-force definition used by the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading

import sympy
import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from . import evaluate as E
from .schedule import TileSchedule, tile_axes, tile_grid, tile_token_counts, tile_tokens

#: Token pairs evaluated at most when refining PARTIAL tiles exactly.
REFINE_BUDGET = 1 << 26
#: The same when a planner only ranks candidate tile shapes (and then classifies its pick with
#: ``REFINE_BUDGET``): radial at 16 x 512 tokens ranks the executor's 13 candidates in 2.0 s instead
#: of 6.4 s, with the same pick.
RANK_REFINE_BUDGET = 1 << 22
#: Per-axis exact classification is used up to this axis length (L^2 work).
AXIS_EXACT_MAX = 4096
#: Token pairs evaluated to estimate the density when refinement is over budget.
DENSITY_SAMPLE = 1 << 21
#: Token pairs evaluated per chunk (memory bound of every exact evaluation).
CHUNK = 1 << 22


def layout_extents(layout: ir.Layout, bound: E.Bound, length: int) -> tuple[int, ...]:
    if layout.kind == "seq":
        return (length,)
    return tuple(int(size.subs(bound.subs)) for _, size in layout.axes)


def check_tile(what: str, tile, extents: tuple[int, ...]) -> tuple[int, ...]:
    """A tile shape: one positive int per axis of the layout."""
    if isinstance(tile, int) and not isinstance(tile, bool):
        tile = (tile,)
    if not isinstance(tile, tuple | list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tile):
        raise SpecError(f"expected a tuple of ints, got {tile!r}", where=f"argument {what}")
    if len(tile) != len(extents):
        raise SpecError(f"needs one extent per axis ({len(extents)}), got {len(tile)}", where=f"argument {what}")
    if any(t < 1 for t in tile):
        raise SpecError(f"tile extents must be positive, got {tuple(tile)}", where=f"argument {what}")
    return tuple(min(t, L) for t, L in zip(tile, extents, strict=True))


def head_classes(pat: ir.PatternIR, bound: E.Bound) -> int:
    """Head classes a schedule (and a mask) is stored for: every head where the mask reads it, else one."""
    return bound.heads if head_dependent(pat) else 1


def head_dependent(pat: ir.PatternIR) -> bool:
    return S.H in pat.mask.free_symbols


def mentioned_symbols(pat: ir.PatternIR) -> set:
    """The symbols the mask, bias, softcap and route read."""
    syms: set = set()
    for expr in (pat.mask, pat.bias, pat.softcap):
        if expr is not None:
            syms |= expr.free_symbols
    if pat.route is not None:
        syms |= pat.route.free_symbols
    return syms


def reads_heads(pat: ir.PatternIR) -> bool:
    """Whether any value of the pattern depends on which head it is or how many there are: ``h`` or
    ``heads`` read by the mask, bias, softcap or route, or an input sized by ``heads``. A pattern that
    does not runs the same on any share of the heads."""
    syms = mentioned_symbols(pat)
    return bool({S.H, S.HEADS} & syms) or any(
        S.HEADS in getattr(dim, "free_symbols", ()) for decl in pat.inputs for dim in decl.dims)


def _unbatched_inputs(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None) -> dict:
    tensors, batch = E.bind_inputs(pat, bound, inputs)
    if batch is not None:
        raise SpecError("tile classification takes inputs without a batch dimension (classify per batch element)",
                        where="argument inputs")
    return tensors


def _pair_evaluator(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, q_flat: torch.Tensor,
                    k_flat: torch.Tensor, head: int) -> E.Evaluator:
    """An evaluator whose q/k symbols are the given flat token tensors (any broadcastable shape)."""
    env = E.token_env(pat, bound, q_flat, k_flat, head)
    return E.Evaluator(env, _unbatched_inputs(pat, bound, inputs), set(), None)


def axis_env(pat: ir.PatternIR, bound: E.Bound, q_extents, kv_extents, q_tile, kv_tile, head: int,
              q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """Symbol values for every token pair of the given tile pairs, one dimension per grid axis of
    each side (``[P, q axes..., k axes...]``; a seq side has one): a mask term of some axes is
    evaluated over those axes only (radial's frame terms once per pair of frames, not per token
    pair). Padded slots are clamped in range; ``valid`` says which slots hold tokens."""
    env: dict = {sym: int(v) for sym, v in bound.subs.items()}
    # a 1-d int64 tensor, as in the whole mask: its powers wrap around (a Python int's do not), and a
    # float32 input meets it in float64 (a Python int or a 0-d tensor would leave w[q] // h in float32)
    env[S.H] = torch.tensor([head])
    sides = (("q", pat.queries, q_extents, q_tile, q_tiles, bound.q_offset),
             ("k", pat.keys, kv_extents, kv_tile, kv_tiles, bound.k_offset))
    ndim = 1 + len(q_extents) + len(kv_extents)
    valid = torch.ones((1,) * ndim, dtype=torch.bool)
    dim = 1
    for role, layout, ext, tile, tiles, shift in sides:
        for a, (pos, ok) in enumerate(tile_axes(ext, tuple(tile), tiles)):
            shape = [len(tiles)] + [1] * (ndim - 1)
            shape[dim] = pos.shape[1]
            value = torch.minimum(pos, torch.tensor(ext[a] - 1)).view(shape)
            if layout.kind == "seq":
                env[S.Q if role == "q" else S.K] = value + shift  # rows -> absolute positions
            else:
                env[S.coord(role, layout.axis_names[a])] = value
            valid = valid & ok.view(shape)
            dim += 1
    return env, valid


#: Token pairs of one slab of ``whole_mask`` (its int64 temporaries: 128 MiB each).
WHOLE_MASK_SLAB_PAIRS = 1 << 24


def whole_mask(pat: ir.PatternIR, bound: E.Bound, mask: sympy.Basic, head: int) -> torch.Tensor:
    """``mask`` (substituted, reading no input) over every token pair, bool ``[Nq, Nk]`` in token
    order, evaluated per grid axis (``axis_env`` on tiles of whole rows of the first query axis
    against one tile of every key: radial's frame terms once per pair of frames, not per token pair),
    in slabs of about ``WHOLE_MASK_SLAB_PAIRS`` pairs."""
    q_ext = layout_extents(pat.queries, bound, bound.n)
    kv_ext = layout_extents(pat.keys, bound, bound.nk)
    nq, nk = math.prod(q_ext), math.prod(kv_ext)
    rest = nq // q_ext[0]  # tokens per index of the first query axis
    step = max(1, min(q_ext[0], WHOLE_MASK_SLAB_PAIRS // max(1, rest * nk)))
    out = torch.empty(nq, nk, dtype=torch.bool)
    first_kv = torch.zeros(1, dtype=torch.int64)
    for t in range(-(-q_ext[0] // step)):
        slab = _axis_allowed(pat, bound, mask, {}, q_ext, kv_ext, (step, *q_ext[1:]), kv_ext, head,
                             torch.tensor([t]), first_kv)
        rows = min(step, q_ext[0] - t * step)  # the slab's indices along the first query axis
        out[t * step * rest:(t * step + rows) * rest] = slab[0, :rows].reshape(rows * rest, nk)
    return out


def _axis_allowed(pat: ir.PatternIR, bound: E.Bound, mask: sympy.Basic, tensors: dict, q_extents, kv_extents,
                  q_tile, kv_tile, head: int, q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
    """The allowed pairs of the given tile pairs, ``[P, q axes..., k axes...]`` (``axis_env``); False on
    padded slots."""
    env, valid = axis_env(pat, bound, q_extents, kv_extents, q_tile, kv_tile, head, q_tiles, kv_tiles)
    allowed = E.as_tensor(E.Evaluator(env, tensors, set(), None)(mask), torch.bool)
    return torch.broadcast_to(allowed, torch.broadcast_shapes(allowed.shape, valid.shape)) & valid


def count_allowed(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None, q_extents, kv_extents,
                  q_tile, kv_tile, head: int, q_tiles: torch.Tensor, kv_tiles: torch.Tensor) -> torch.Tensor:
    """Exact number of allowed token pairs of each given (Q tile, KV tile) pair, int64 ``[P]``."""
    out = torch.zeros(len(q_tiles), dtype=torch.int64)
    per_pair = math.prod(q_tile) * math.prod(kv_tile)
    step = max(1, CHUNK // per_pair)
    mask = E.substitute(pat.mask, bound)
    tensors = _unbatched_inputs(pat, bound, inputs)
    for start in range(0, len(q_tiles), step):
        qi, ki = q_tiles[start:start + step], kv_tiles[start:start + step]
        allowed = _axis_allowed(pat, bound, mask, tensors, q_extents, kv_extents, q_tile, kv_tile, head, qi, ki)
        out[start:start + step] = allowed.flatten(1).sum(1)
    return out


def mask_inputs(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None) -> tuple[ir.PatternIR, dict]:
    """The pattern restricted to the inputs its mask reads (not, e.g., FoX gates), and those inputs checked."""
    used = {S.input_name(f.func) for f in pat.mask.atoms(sympy.Function)} - {None}
    pat = dataclasses.replace(pat, inputs=tuple(d for d in pat.inputs if d.name in used))
    tensors, _ = E.bind_inputs(pat, bound, {n: t for n, t in (inputs or {}).items() if n in used})
    return pat, tensors


def classify_tiles_dense(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile, inputs: dict | None = None) -> TileSchedule:
    """Brute force over every tile pair and token pair: the definition the tests check against."""
    pat, inputs = mask_inputs(pat, bound, inputs)
    check_offset_layout(pat, bound)
    q_ext = layout_extents(pat.queries, bound, bound.n)
    kv_ext = layout_extents(pat.keys, bound, bound.nk)
    q_tile, kv_tile = check_tile("q_tile", q_tile, q_ext), check_tile("kv_tile", kv_tile, kv_ext)
    nq, nk = math.prod(tile_grid(q_ext, q_tile)), math.prod(tile_grid(kv_ext, kv_tile))
    stored = head_classes(pat, bound)
    qi = torch.arange(nq).repeat_interleave(nk)
    ki = torch.arange(nk).repeat(nq)
    heads, qs, ks, fulls, allowed = [], [], [], [], []
    area = tile_token_counts(q_ext, q_tile)[qi] * tile_token_counts(kv_ext, kv_tile)[ki]
    for h in range(stored):
        counts = count_allowed(pat, bound, inputs, q_ext, kv_ext, q_tile, kv_tile, h, qi, ki)
        keep = counts > 0
        heads.append(torch.full((int(keep.sum()),), h, dtype=torch.int64))
        qs.append(qi[keep])
        ks.append(ki[keep])
        fulls.append((counts == area)[keep])
        allowed.append(counts.sum())
    return TileSchedule.from_pairs(q_ext, kv_ext, q_tile, kv_tile, bound.heads, stored, torch.cat(heads),
                                   torch.cat(qs), torch.cat(ks), torch.cat(fulls), torch.stack(allowed).to(torch.float64),
                                   exact=True, density_exact=True)


# ----------------------------------------------------------------- the fast classifier
#: Calls of ``classify_tiles`` (the sympy/interval planning work) in this process; read by
#: tests to count how often a backend re-plans (e.g. per decoding step).
CLASSIFICATIONS = 0


def check_offset_layout(pat: ir.PatternIR, bound: E.Bound) -> None:
    """Query tiles of a KV-cache call (``q_offset``) are runs of query rows: a grid's queries
    are a suffix of its token order, not a box, and are classified on the flat view
    (``compiler.cost.search.flat_view``); a block's (``k_offset``) likewise on both sides."""
    if (bound.q_offset or bound.is_block) and (pat.queries.kind == "grid" or pat.keys.kind == "grid"):
        what = "a context-parallel block of a grid is" if bound.is_block else "queries after a KV cache on a grid are"
        raise SpecError(f"{what} tiled on the flat token order", where="argument q_tile",
                        hint="classify flat_view(pattern, bound)")


def classify_tiles(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile, inputs: dict | None = None,
                   refine_budget: int = REFINE_BUDGET, witness: bool = True) -> TileSchedule:
    """Classify every (Q tile, KV tile) pair of a bound pattern; see the module docstring.

    ``q_tile``/``kv_tile``: one extent per axis of the query/key layout
    (clipped to the axis). ``inputs``: call-time inputs of a data-dependent
    mask (without batch dimension). ``refine_budget``: token pairs the exact
    refinement of PARTIAL pairs may evaluate. ``witness=False``: PARTIAL pairs beyond the
    budget are not probed for proof (``exact`` is then False): for ranking candidate tiles.
    """
    check_offset_layout(pat, bound)
    global CLASSIFICATIONS
    CLASSIFICATIONS += 1
    with one_thread():
        return _classify(pat, bound, q_tile, kv_tile, inputs, refine_budget, witness)


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread for the duration (restored after): planning runs many small
    tensor operations, and each parallel one waits at a barrier for every thread of the pool; on a
    shared machine a waiting thread may not get a core for milliseconds. Measured (2 cores, load 9):
    classifying a sliding window of 512 at 8K in 64-token tiles took 0.8-1.0 s on 2 threads, 0.08-0.12 s
    on one. The setting is the process's: only where no other thread that runs torch ops may be alive (no other
    non-daemon thread): a compiled kernel running in another thread sizes its per-thread buffers by it, and
    a change under it corrupted the heap (two threads' first FlexAttention calls)."""
    before = torch.get_num_threads()
    if before == 1 or _other_threads():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _other_threads() -> bool:
    """Whether a thread other than this one, not a daemon (tqdm's monitor is one), is alive."""
    me = threading.current_thread()
    return any(t is not me and not t.daemon and t.is_alive() for t in threading.enumerate())


def _classify(pat: ir.PatternIR, bound: E.Bound, q_tile, kv_tile, inputs: dict | None,
              refine_budget: int, witness: bool = True) -> TileSchedule:
    q_ext = layout_extents(pat.queries, bound, bound.n)
    kv_ext = layout_extents(pat.keys, bound, bound.nk)
    q_tile, kv_tile = check_tile("q_tile", q_tile, q_ext), check_tile("kv_tile", kv_tile, kv_ext)
    mask = E.substitute(pat.mask, bound)
    pat, tensors = mask_inputs(pat, bound, inputs)
    batched = [name for name, t in tensors.items() if t.dim() > len(pat.input(name).dims)]
    if batched:
        # One schedule serves the whole batch: the union of the per-element ones.
        B = tensors[batched[0]].shape[0]
        parts = [classify_tiles(pat, bound, q_tile, kv_tile,
                                {n: (t[b] if n in batched else t) for n, t in tensors.items()}, refine_budget,
                                witness)
                 for b in range(B)]
        return merge_schedules(parts)
    stored = head_classes(pat, bound)
    axes = _separable_axes(pat, mask)
    # the separable path reads rows as positions (no offsets): a block's rows are not
    if axes is not None and all(L <= AXIS_EXACT_MAX for L in q_ext) and q_ext == kv_ext \
            and not bound.q_offset and not bound.is_block:
        return _classify_separable(pat, bound, mask, axes, q_ext, q_tile, kv_tile, stored, tensors)
    return _classify_hierarchical(pat, bound, mask, q_ext, kv_ext, q_tile, kv_tile, stored, tensors, refine_budget,
                                  witness)


def merge_schedules(parts: list[TileSchedule]) -> TileSchedule:
    """The schedule serving several masks at once (e.g. the elements of a batch):
    a pair is visited if any visits it, FULL only if FULL in all."""
    first = parts[0]
    nq, nk = first.num_q_tiles, first.num_kv_tiles
    keys, fulls = [], []
    for s in parts:
        h, qi, ki, full = s.pairs()
        keys.append((h * nq + qi) * nk + ki)
        fulls.append(full)
    key = torch.cat(keys)
    uniq, inverse, count = torch.unique(key, return_inverse=True, return_counts=True)
    full_votes = torch.zeros(len(uniq), dtype=torch.int64).index_add_(0, inverse, torch.cat(fulls).to(torch.int64))
    is_full = (count == len(parts)) & (full_votes == len(parts))
    h, rest = uniq // (nq * nk), uniq % (nq * nk)
    allowed = torch.stack([s.allowed_pairs for s in parts]).mean(0)
    return TileSchedule.from_pairs(first.q_extents, first.kv_extents, first.q_tile, first.kv_tile, first.num_heads,
                                   first.heads_stored, h, rest // nk, rest % nk, is_full, allowed,
                                   exact=False, density_exact=all(s.density_exact for s in parts))


def _axis_symbols(pat: ir.PatternIR) -> list[tuple[sympy.Symbol, sympy.Symbol]]:
    """(query symbol, key symbol) per axis: (q, k) for seq, the coordinates for grids."""
    if pat.queries.kind == "seq":
        return [(S.Q, S.K)]
    return [(S.coord("q", a), S.coord("k", a)) for a in pat.queries.axis_names]


def _separable_axes(pat: ir.PatternIR, mask: sympy.Basic) -> list[list[sympy.Basic]] | None:
    """Conjuncts of the mask grouped per axis ([axis 0 terms, ..., constant terms]),
    or None when some conjunct couples two axes."""
    if not pat.self_attention or pat.queries.kind != pat.keys.kind:
        return None
    syms = _axis_symbols(pat)
    groups: list[list[sympy.Basic]] = [[] for _ in range(len(syms) + 1)]
    for c in (mask.args if isinstance(mask, sympy.And) else (mask,)):
        free = c.free_symbols
        touched = [i for i, (qs, ks) in enumerate(syms) if qs in free or ks in free]
        if len(touched) > 1:
            return None
        groups[touched[0] if touched else -1].append(c)
    return groups


def _axis_counts(pat, bound, expr, qs, ks, L, tq, tk, head, tensors) -> torch.Tensor:
    """Exact allowed counts per (Q tile, KV tile) on one axis: int64 ``[Gq, Gk]``."""
    env: dict = {sym: int(v) for sym, v in bound.subs.items()}
    env[S.H] = torch.tensor([head])  # as in the whole mask (axis_env)
    gq, gk = -(-L // tq), -(-L // tk)
    out = torch.zeros(gq * tq, gk * tk, dtype=torch.int64)
    rows = max(1, CHUNK // L)
    for start in range(0, L, rows):
        i = torch.arange(start, min(L, start + rows))
        env[qs], env[ks] = i[:, None], torch.arange(L)[None, :]
        allowed = E.as_tensor(E.Evaluator(env, tensors, set(), None)(expr), torch.bool)
        out[start:start + len(i), :L] = torch.broadcast_to(allowed, (len(i), L)).to(torch.int64)
    return out.view(gq, tq, gk, tk).sum(dim=(1, 3))


def _classify_separable(pat, bound, mask, groups, ext, q_tile, kv_tile, stored, tensors) -> TileSchedule:
    syms = _axis_symbols(pat)
    heads, qs_all, ks_all, full_all, allowed = [], [], [], [], []
    for h in range(stored):
        const = sympy.And(*groups[-1])
        const_ok = True
        if const is not sympy.true:
            env = {sym: int(v) for sym, v in bound.subs.items()}
            env[S.H] = torch.tensor([h])  # as in the whole mask (axis_env)
            const_ok = bool(E.as_tensor(E.Evaluator(env, tensors, set(), None)(const), torch.bool).all())
        qi = torch.zeros(1, dtype=torch.int64)
        ki = torch.zeros(1, dtype=torch.int64)
        count = torch.ones(1, dtype=torch.int64)
        area = torch.ones(1, dtype=torch.int64)
        total = 1
        for a, ((qsym, ksym), L, tq, tk) in enumerate(zip(syms, ext, q_tile, kv_tile, strict=True)):
            expr = sympy.And(*groups[a])
            counts = _axis_counts(pat, bound, expr, qsym, ksym, L, tq, tk, h, tensors)
            gq, gk = counts.shape
            q_sizes = torch.tensor([min(tq, L - t * tq) for t in range(gq)])
            k_sizes = torch.tensor([min(tk, L - t * tk) for t in range(gk)])
            a_q, a_k = torch.nonzero(counts > 0, as_tuple=True)
            total *= int(counts.sum())
            qi = (qi[:, None] * gq + a_q[None, :]).reshape(-1)
            ki = (ki[:, None] * gk + a_k[None, :]).reshape(-1)
            count = (count[:, None] * counts[a_q, a_k][None, :]).reshape(-1)
            area = (area[:, None] * (q_sizes[a_q] * k_sizes[a_k])[None, :]).reshape(-1)
        if not const_ok:
            qi, ki, count, area, total = qi[:0], ki[:0], count[:0], area[:0], 0
        heads.append(torch.full_like(qi, h))
        qs_all.append(qi)
        ks_all.append(ki)
        full_all.append(count == area)
        allowed.append(float(total))
    return TileSchedule.from_pairs(ext, ext, q_tile, kv_tile, bound.heads, stored, torch.cat(heads), torch.cat(qs_all),
                                   torch.cat(ks_all), torch.cat(full_all), torch.tensor(allowed, dtype=torch.float64),
                                   exact=True, density_exact=True)


def _levels(grid: tuple[int, ...]) -> list[int]:
    return [max(0, math.ceil(math.log2(g))) for g in grid]


def _segment_arange(counts: torch.Tensor) -> torch.Tensor:
    """[0..c0-1, 0..c1-1, ...] for counts c."""
    total = int(counts.sum())
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(total) - torch.repeat_interleave(starts, counts)


def _expand_boxes(lo: torch.Tensor, hi: torch.Tensor, grid: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every tile of each box [lo, hi] (per-axis tile indices, inclusive) as flat
    tile indices, with the index of the box it came from."""
    owner = torch.arange(len(lo))
    flat = torch.zeros(len(lo), dtype=torch.int64)
    for a, g in enumerate(grid):
        n = (hi[owner, a] - lo[owner, a] + 1)
        offs = _segment_arange(n)
        owner = torch.repeat_interleave(owner, n)
        flat = torch.repeat_interleave(flat, n) * g + lo[owner, a] + offs
    return flat, owner


def _box_env(pat, bound, sup: torch.Tensor, levels: list[int], grid, tile, ext, role: str, offset: int, env: dict):
    """Interval bounds of the query (or key) symbols over super-tile boxes; returns tile ranges."""
    from .interval_numbers import Num

    n_axes = len(grid)
    t_lo = torch.stack([sup[:, offset + a] << levels[a] for a in range(n_axes)], 1)
    t_hi = torch.stack([torch.clamp(((sup[:, offset + a] + 1) << levels[a]) - 1, max=grid[a] - 1)
                        for a in range(n_axes)], 1)
    layout = pat.queries if role == "q" else pat.keys
    shift = bound.q_offset if role == "q" else bound.k_offset  # rows -> absolute positions (seq only: classify_tiles)
    for a in range(n_axes):
        lo = (t_lo[:, a] * tile[a] + shift).to(torch.float64)
        hi = (torch.clamp((t_hi[:, a] + 1) * tile[a], max=ext[a]) - 1 + shift).to(torch.float64)
        if layout.kind == "seq":
            env[S.Q if role == "q" else S.K] = Num(lo, hi)
        else:
            env[S.coord(role, layout.axis_names[a])] = Num(lo, hi)
    return t_lo, t_hi


def _classify_hierarchical(pat, bound, mask, q_ext, kv_ext, q_tile, kv_tile, stored, tensors,
                           refine_budget, witness: bool = True) -> TileSchedule:
    from .intervals import IntervalEvaluator

    q_grid, kv_grid = tile_grid(q_ext, q_tile), tile_grid(kv_ext, kv_tile)
    lq_top, lk_top = _levels(q_grid), _levels(kv_grid)
    aq, ak = len(q_grid), len(kv_grid)
    depth = max(lq_top + lk_top + [0])
    q_tokens = tile_token_counts(q_ext, q_tile)
    k_tokens = tile_token_counts(kv_ext, kv_tile)
    heads, qs_all, ks_all, full_all, allowed = [], [], [], [], []
    exact = density_exact = True
    gen = torch.Generator().manual_seed(0)
    for h in range(stored):
        full_q, full_k, part_q, part_k = [], [], [], []
        sup = torch.zeros(1, aq + ak, dtype=torch.int64)
        for it in range(depth + 1):
            lq = [max(L - it, 0) for L in lq_top]
            lk = [max(L - it, 0) for L in lk_top]
            env: dict = {sym: int(v) for sym, v in bound.subs.items()}  # ints, as evaluated
            env[S.H] = h
            q_lo, q_hi = _box_env(pat, bound, sup, lq, q_grid, q_tile, q_ext, "q", 0, env)
            k_lo, k_hi = _box_env(pat, bound, sup, lk, kv_grid, kv_tile, kv_ext, "k", aq, env)
            result = IntervalEvaluator(env, tensors).boolean(mask)
            may_t = torch.broadcast_to(result.t, (len(sup),))
            may_f = torch.broadcast_to(result.f, (len(sup),))
            full = may_t & ~may_f
            if bool(full.any()):
                qf, qo = _expand_boxes(q_lo[full], q_hi[full], q_grid)
                kf, ko = _expand_boxes(k_lo[full], k_hi[full], kv_grid)
                # every Q tile of a box pairs with every KV tile of the same box
                nk = torch.bincount(ko, minlength=int(full.sum()))
                k_start = torch.cumsum(nk, 0) - nk
                reps = nk[qo]
                qq = torch.repeat_interleave(qf, reps)
                kk = kf[torch.repeat_interleave(k_start[qo], reps) + _segment_arange(reps)]
                full_q.append(qq)
                full_k.append(kk)
            undecided = may_t & may_f
            if it == depth:
                flat_q = _flat(q_lo[undecided], q_grid)
                flat_k = _flat(k_lo[undecided], kv_grid)
                part_q.append(flat_q)
                part_k.append(flat_k)
                break
            sup = _children(sup[undecided], lq + lk, list(q_grid) + list(kv_grid))
            if len(sup) == 0:
                break
        fq = torch.cat(full_q) if full_q else torch.zeros(0, dtype=torch.int64)
        fk = torch.cat(full_k) if full_k else torch.zeros(0, dtype=torch.int64)
        pq = torch.cat(part_q) if part_q else torch.zeros(0, dtype=torch.int64)
        pk = torch.cat(part_k) if part_k else torch.zeros(0, dtype=torch.int64)
        full_area = (q_tokens[fq] * k_tokens[fk]).sum()
        part_area = q_tokens[pq] * k_tokens[pk]
        if int(part_area.sum()) <= refine_budget:
            counts = count_allowed(pat, bound, tensors, q_ext, kv_ext, q_tile, kv_tile, h, pq, pk)
            now_full = counts == part_area
            keep = (counts > 0) & ~now_full
            fq, fk = torch.cat([fq, pq[now_full]]), torch.cat([fk, pk[now_full]])
            pq, pk = pq[keep], pk[keep]
            total = float(full_area) + float(counts.sum())
        else:
            # Too many to refine: PARTIAL pairs proven partial by witnesses keep the
            # classes exact; the density is estimated from a sample of pairs.
            density_exact = False
            exact = exact and witness and bool(
                _witnessed_partial(pat, bound, tensors, q_ext, kv_ext, q_tile, kv_tile, h, pq, pk).all())
            per_pair = math.prod(q_tile) * math.prod(kv_tile)
            sample = torch.randperm(len(pq), generator=gen)[: max(1, min(refine_budget, DENSITY_SAMPLE) // per_pair)]
            counts = count_allowed(pat, bound, tensors, q_ext, kv_ext, q_tile, kv_tile, h, pq[sample], pk[sample])
            fraction = float(counts.sum()) / max(1.0, float(part_area[sample].sum()))
            total = float(full_area) + fraction * float(part_area.sum())
        heads.append(torch.full((len(fq) + len(pq),), h, dtype=torch.int64))
        qs_all.append(torch.cat([fq, pq]))
        ks_all.append(torch.cat([fk, pk]))
        full_all.append(torch.cat([torch.ones(len(fq), dtype=torch.bool), torch.zeros(len(pq), dtype=torch.bool)]))
        allowed.append(total)
    return TileSchedule.from_pairs(q_ext, kv_ext, q_tile, kv_tile, bound.heads, stored, torch.cat(heads),
                                   torch.cat(qs_all), torch.cat(ks_all), torch.cat(full_all),
                                   torch.tensor(allowed, dtype=torch.float64), exact=exact, density_exact=density_exact)


def _witnessed_partial(pat, bound, tensors, q_ext, kv_ext, q_tile, kv_tile, head, q_tiles, kv_tiles) -> torch.Tensor:
    """Whether each pair shows both an allowed and a masked token pair among a few
    probes (corners and centres of the two tile boxes): proof that it is PARTIAL."""
    if len(q_tiles) == 0:
        return torch.ones(0, dtype=torch.bool)
    q_flat, q_ok = tile_tokens(q_ext, q_tile, q_tiles[:1])
    probes_q = _probe_slots(q_ok[0])
    k_flat, k_ok = tile_tokens(kv_ext, kv_tile, kv_tiles[:1])
    probes_k = _probe_slots(k_ok[0])
    seen_t = torch.zeros(len(q_tiles), dtype=torch.bool)
    seen_f = torch.zeros(len(q_tiles), dtype=torch.bool)
    mask = E.substitute(pat.mask, bound)
    step = max(1, CHUNK // (len(probes_q) * len(probes_k)))
    for start in range(0, len(q_tiles), step):
        qi, ki = q_tiles[start:start + step], kv_tiles[start:start + step]
        qf, qok = tile_tokens(q_ext, q_tile, qi)
        kf, kok = tile_tokens(kv_ext, kv_tile, ki)
        qf, qok = qf[:, probes_q], qok[:, probes_q]
        kf, kok = kf[:, probes_k], kok[:, probes_k]
        qf = torch.minimum(qf, torch.tensor(math.prod(q_ext) - 1))
        kf = torch.minimum(kf, torch.tensor(math.prod(kv_ext) - 1))
        ev = _pair_evaluator(pat, bound, tensors, qf[:, :, None], kf[:, None, :], head)
        allowed = torch.broadcast_to(E.as_tensor(ev(mask), torch.bool), (len(qi), len(probes_q), len(probes_k)))
        valid = qok[:, :, None] & kok[:, None, :]
        seen_t[start:start + step] = (allowed & valid).flatten(1).any(1)
        seen_f[start:start + step] = (~allowed & valid).flatten(1).any(1)
    return seen_t & seen_f


def _probe_slots(valid: torch.Tensor) -> torch.Tensor:
    """A few token slots of a tile: first, last, middle and quarter points (by slot order)."""
    n = len(valid)
    slots = sorted({0, n - 1, n // 2, n // 4, (3 * n) // 4, 1 % n, max(0, n - 2)})
    return torch.tensor(slots)


def _flat(coords: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    flat = torch.zeros(len(coords), dtype=torch.int64)
    for a, g in enumerate(grid):
        flat = flat * g + coords[:, a]
    return flat


def _children(sup: torch.Tensor, levels: list[int], grid: list[int]) -> torch.Tensor:
    """Halve every undecided super-tile pair along each axis not yet at tile level."""
    for a, (level, g) in enumerate(zip(levels, grid, strict=True)):
        if level <= 0:
            continue
        child = torch.cat([sup, sup], 0)
        child[:, a] = torch.cat([sup[:, a] * 2, sup[:, a] * 2 + 1])
        sup = child[(child[:, a] << (level - 1)) < g]
    return sup
