"""Tile classification (``classify_tiles``) against brute force and a dense mask.

References written here, not taken from attnc's classification code:

* ``tile_pair_counts``: allowed token pairs per (head, Q tile, KV tile) summed
  from the dense mask of ``attnc.materialize_mask`` with a tile index computed
  from grid coordinates (row-major tokens, row-major tiles, edge tiles smaller);
* ``natten_axis_ranges``: NATTEN's published per-axis window rule
  (neighborhood_1d.attn's header) as a closed-form [first, last] key range per query, used to
  build the tile-pair counts of 1-D/2-D/3-D neighborhood attention at the
  published sizes as an outer product over axes (a NATTEN mask is a
  conjunction of per-axis windows, so per-tile counts multiply).

Checked: FULL pairs have no masked token pair, EMPTY pairs no allowed one
(always); classes equal brute force (``classify_tiles_dense``) when the
schedule says ``exact``; allowed pairs / density equal the dense mask's when
``density_exact``; the transposed (backward) lists hold exactly the forward
pairs; full/partial/empty counts are over heads x Q tiles x KV tiles.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import sympy
import torch
from cases import claimed
from fuzz_budget import examples
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis import tiles as T
from attnc.compiler.analysis.tiles import classify_tiles, classify_tiles_dense
from attnc.core.errors import SpecError
from attnc.spec.library import stdlib_index

AXES = (("t", "frames"), ("y", "height"), ("x", "width"))


# ----------------------------------------------------------------- independent references
def token_tiles(extents: tuple[int, ...], tile: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flat tile index of every token (row-major tokens and tiles), tokens per tile, number of tiles."""
    idx = torch.zeros(1, dtype=torch.int64)
    n_tiles = 1
    for L, t in zip(extents, tile, strict=True):
        g = -(-L // t)
        per = torch.arange(L) // t
        idx = (idx[:, None] * g + per[None, :]).reshape(-1)
        n_tiles *= g
    size = torch.bincount(idx, minlength=n_tiles)
    return idx, size, n_tiles


def tile_pair_counts(mask: torch.Tensor, q_ext, kv_ext, q_tile, kv_tile) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed pairs ``[H, nq, nk]``, tokens in the pair ``[nq, nk]``), float64 exact integers."""
    qi, qs, nq = token_tiles(q_ext, q_tile)
    ki, ks, nk = token_tiles(kv_ext, kv_tile)
    q1 = torch.nn.functional.one_hot(qi, nq).to(torch.float64)
    k1 = torch.nn.functional.one_hot(ki, nk).to(torch.float64)
    counts = q1.T @ mask.to(torch.float64) @ k1
    return counts, (qs[:, None] * ks[None, :]).to(torch.float64)


def expected_classes(counts: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
    return torch.where(counts == 0, 0, torch.where(counts == area, 2, 1)).to(torch.int8)


def per_head(classes: torch.Tensor, heads: int) -> torch.Tensor:
    return classes.expand(heads, -1, -1) if classes.shape[0] == 1 else classes


def list_pairs(count: torch.Tensor, index: torch.Tensor) -> set[tuple[int, int, int]]:
    """The pairs of a padded CSR list; also checks the padding and ordering invariants."""
    out = set()
    H, rows = count.shape
    for h in range(H):
        for r in range(rows):
            c = int(count[h, r])
            row = index[h, r].tolist()
            assert all(x == -1 for x in row[c:]), (h, r, row, c)
            members = row[:c]
            assert all(x >= 0 for x in members)
            assert members == sorted(set(members)), members  # sorted, no duplicates
            out.update((h, r, m) for m in members)
    return out


def check_schedule(sched, mask: torch.Tensor, q_ext, kv_ext, q_tile, kv_tile, heads: int, dense=None) -> None:
    """Every invariant of a schedule against the dense mask ``[heads, Nq, Nk]``."""
    counts, area = tile_pair_counts(mask, q_ext, kv_ext, q_tile, kv_tile)
    want = expected_classes(counts, area)
    got = sched.classes()
    assert got.shape[0] in (1, heads)
    got_h = per_head(got, heads)
    assert got_h.shape == want.shape
    # soundness, always
    assert bool((counts[got_h == 2] == area.expand_as(counts)[got_h == 2]).all()), "FULL pair with a masked token pair"
    assert bool((counts[got_h == 0] == 0).all()), "EMPTY pair with an allowed token pair"
    assert int(counts[got_h == 0].sum()) == 0 and float(counts.sum()) == float(counts[got_h != 0].sum())
    if sched.exact:
        assert torch.equal(got_h, want)
    if dense is not None:
        assert torch.equal(per_head(dense.classes(), heads), want)  # the brute force itself
        if sched.exact:
            assert torch.equal(got_h, per_head(dense.classes(), heads))
    # counts over heads x Q tiles x KV tiles
    nq, nk = area.shape
    assert (sched.num_q_tiles, sched.num_kv_tiles) == (nq, nk)
    assert sched.full == int((got_h == 2).sum())
    assert sched.partial == int((got_h == 1).sum())
    assert sched.empty == int((got_h == 0).sum())
    assert sched.full + sched.partial + sched.empty == heads * nq * nk
    if sched.exact:
        assert (sched.full, sched.partial, sched.empty) == tuple(int((want == c).sum()) for c in (2, 1, 0))
    # allowed pairs and density
    if sched.density_exact:
        per = mask.reshape(heads, -1).sum(1).to(torch.float64)
        stored = sched.allowed_pairs.to(torch.float64)
        assert torch.equal(stored.expand(heads) if stored.numel() == 1 else stored, per)
        assert sched.density == pytest.approx(float(mask.to(torch.float64).mean()), rel=1e-12, abs=0)
    # forward and transposed lists hold the same pairs
    for fwd, bwd in (((sched.full_count, sched.full_index), (sched.t_full_count, sched.t_full_index)),
                     ((sched.partial_count, sched.partial_index), (sched.t_partial_count, sched.t_partial_index))):
        f = list_pairs(*fwd)
        b = {(h, q, k) for (h, k, q) in list_pairs(*bwd)}
        assert f == b
    full = {(h, q, k) for h, q, k in zip(*torch.nonzero(got == 2, as_tuple=True), strict=True)}
    assert len(full) == len(list_pairs(sched.full_count, sched.full_index))


# ----------------------------------------------------------------- random patterns
def bool_combination(draw, leaf, depth: int) -> str:
    """``leaf()`` terms joined by and/or/not, at most ``depth`` levels deep."""
    if depth == 0 or draw(st.integers(0, 2)) == 0:
        return leaf()
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        return f"not ({bool_combination(draw, leaf, depth - 1)})"
    return f"({bool_combination(draw, leaf, depth - 1)}) {op} ({bool_combination(draw, leaf, depth - 1)})"


@st.composite
def cases(draw):
    ndim = draw(st.integers(0, 3))  # 0: tokens seq
    if ndim == 0:
        extents = (draw(st.integers(1, 48)),)
        axes = [("", "n")]
        layout = "tokens seq"
    else:
        hi = {1: 40, 2: 10, 3: 5}[ndim]
        extents = tuple(draw(st.integers(1, hi)) for _ in range(ndim))
        axes = list(AXES[3 - ndim:])
        layout = "tokens grid(" + ", ".join(f"{a}: {s}" for a, s in axes) + ")"
    N = math.prod(extents)
    heads = draw(st.integers(1, 3))
    uses_doc = [False]

    def coords():
        """(query expr, key expr, extent) of an axis or of the flat index."""
        choices = [("q", "k", N)]
        if ndim:
            choices += [(f"q.{a}", f"k.{a}", L) for (a, _), L in zip(axes, extents, strict=True)]
        return draw(st.sampled_from(choices))

    def leaf() -> str:
        kind = draw(st.integers(0, 13))
        qa, ka, L = coords()
        c = draw(st.integers(-2, max(2, L)))
        b = draw(st.integers(1, 6))
        m = draw(st.integers(1, 5))
        if kind == 0:  # NATTEN window
            i = draw(st.integers(0, len(extents) - 1))
            La = extents[i]
            w = draw(st.integers(1, La))
            d = draw(st.integers(1, La // w))
            s = draw(st.integers(1, w))
            causal = draw(st.booleans())
            ax = "" if ndim == 0 else f"{axes[i][0]}, "
            return f"window({ax}{w}, dilation = {d}, stride = {s}, causal = {str(causal).lower()})"
        if kind == 1:
            return f"{qa} - {ka} < {c}"
        if kind == 2:
            return draw(st.sampled_from([f"{ka} <= {qa}", "causal", f"{ka} > {qa}"]))
        if kind == 3:
            return f"{qa} // {b} - {ka} // {b} < {draw(st.integers(0, 4))}"
        if kind == 4:
            return f"{qa} // {b} == {ka} // {b}"
        if kind == 5:
            return draw(st.sampled_from([f"{qa} % {m} == {ka} % {m}", f"({qa} - {ka}) % {m} == 0",
                                         f"{ka} % {m} == {draw(st.integers(0, m - 1))}"]))
        if kind == 6:
            return draw(st.sampled_from([f"is_pow2({qa} // {b} - {ka} // {b})", f"is_pow2({qa} - {ka})"]))
        if kind == 7:
            return f"abs({qa} - {ka}) <= {c}"
        if kind == 8:
            return f"{qa} - {ka} < {draw(st.integers(0, 3))} * (h + 1)"
        if kind == 9:
            return f"({ka} // {b} + h) % {m} == 0"
        if kind == 10:
            uses_doc[0] = True
            return draw(st.sampled_from(["doc[q] == doc[k]", "doc[q] >= doc[k]", "doc[k] != 0"]))
        if kind == 11:
            return draw(st.sampled_from([f"{ka} < {c}", f"{qa} >= {c}"]))
        if kind == 12:
            return draw(st.sampled_from(["true", "false"]))
        return f"{qa} // {b} - {ka} // {b} == {draw(st.integers(-1, 2))}"

    mask = bool_combination(draw, leaf, 2)
    text = f"pattern p\n  {layout}\n"
    if uses_doc[0]:
        text += "  input doc: int[n]\n"
    text += f"  mask {mask}\n"
    inputs = None
    if uses_doc[0]:
        doc = torch.randint(0, draw(st.integers(1, 4)), (N,), generator=torch.Generator().manual_seed(draw(st.integers(0, 9999))))
        if draw(st.booleans()):
            doc = torch.sort(doc).values  # packed documents
        inputs = {"doc": doc}
    q_tile = tuple(draw(st.integers(1, L + 1)) for L in extents)
    kv_tile = tuple(draw(st.integers(1, L + 1)) for L in extents)
    sizes = {s: L for (_, s), L in zip(axes, extents, strict=True)} if ndim else None
    return text, extents, sizes, heads, q_tile, kv_tile, inputs


def classify(pat, bound, q_tile, kv_tile, inputs, refine: bool, intervals: bool):
    """``refine=False``: no exact token-level refinement, so the interval reasoning alone must be sound.
    ``intervals=True``: no exact per-axis counting of separable masks (used up to ``AXIS_EXACT_MAX``
    tokens per axis, so every 1-D mask at these sizes), so interval reasoning decides every pair."""
    kwargs = {} if refine else {"refine_budget": 0}
    if intervals:
        with mock.patch.object(T, "AXIS_EXACT_MAX", 0):
            return classify_tiles(pat, bound, q_tile, kv_tile, inputs, **kwargs)
    return classify_tiles(pat, bound, q_tile, kv_tile, inputs, **kwargs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.booleans(), st.booleans())
def test_random_patterns_against_brute_force(case, refine, intervals):
    text, extents, sizes, heads, q_tile, kv_tile, inputs = case
    pat = attnc.load(text)
    n = extents[0] if sizes is None else None
    bound = E.bind_sizes(pat, n=n, heads=heads, sizes=sizes)
    mask = attnc.materialize_mask(pat, n=n, heads=heads, sizes=sizes, inputs=inputs)
    sched = classify(pat, bound, q_tile, kv_tile, inputs, refine, intervals)
    dense = classify_tiles_dense(pat, bound, q_tile, kv_tile, inputs)
    clamp = tuple(min(t, L) for t, L in zip(q_tile, extents, strict=True))
    kclamp = tuple(min(t, L) for t, L in zip(kv_tile, extents, strict=True))
    assert sched.q_tile == clamp and sched.kv_tile == kclamp
    assert sched.num_heads == heads
    check_schedule(sched, mask, extents, extents, clamp, kclamp, heads, dense)


# ----------------------------------------------------------------- float expressions: NaN, inf, rounding
@st.composite
def float_cases(draw):
    """Masks over float arithmetic that can give NaN (log or sqrt of a negative, 0 * inf,
    inf - inf, x % 0.0, 0 / 0, inf // y), +-inf (x / 0, exp overflow) or rounding at
    boundaries, optionally reading a float input holding NaN and infinities (float32 or 64)."""
    n = draw(st.integers(1, 40))
    uses_w = [False]

    def atom() -> str:
        return draw(st.sampled_from([
            "q", "k", "(q - k)", "(k - q)", "h", "(q * 1.0)", "(k * 1.0)", "(q - k - 0.5)", "(q % 3)", "(k // 4)",
            str(draw(st.integers(-3, 5))), draw(st.sampled_from(["0.5", "-1.5", "2.0", "1e308", "-1e308", "1e-300"])),
            "exp(q * 30.0)", "exp(k * 30.0)", "w[q]", "w[k]"]))

    def num(depth: int) -> str:
        if depth == 0 or draw(st.integers(0, 3)) == 0:
            a = atom()
            uses_w[0] |= a.startswith("w[")
            return a
        a, b = num(depth - 1), num(depth - 1)
        op = draw(st.integers(0, 15))
        if op <= 7:
            return f"({a} {['+', '-', '*', '/', '%', '//', '**', '-'][op]} {b})"
        if op <= 11:
            return f"{['log', 'sqrt', 'exp', 'tanh'][op - 8]}({a})"
        if op == 12:
            return f"{draw(st.sampled_from(['min', 'max']))}({a}, {b})"
        if op == 13:
            return f"abs({a})"
        if op == 14:
            return f"(if {a} < {b} then {a} else {num(0)})"
        return f"({a} ** {draw(st.sampled_from(['0.5', '-1', '2', '3', '-0.5']))})"

    def leaf() -> str:
        cmp = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        rhs = draw(st.sampled_from([num(1), str(draw(st.integers(-5, 10))), "0.5", "10.0", "-1e308"]))
        return f"{num(3)} {cmp} {rhs}"

    mask = bool_combination(draw, leaf, 1)
    inputs = None
    text = "pattern p\n  tokens seq\n"
    if uses_w[0]:
        text += "  input w: float[n]\n"
        special = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-310, 3e38, -2.5]
        values = [draw(st.one_of(st.sampled_from(special), st.floats(-50, 50))) for _ in range(n)]
        inputs = {"w": torch.tensor(values, dtype=draw(st.sampled_from([torch.float64, torch.float32])))}
    text += f"  mask {mask}\n"
    heads = draw(st.integers(1, 2))
    q_tile = (draw(st.integers(1, n + 1)),)
    kv_tile = (draw(st.integers(1, n + 1)),)
    return text, n, heads, q_tile, kv_tile, inputs


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(float_cases(), st.booleans(), st.booleans())
def test_random_float_masks_against_brute_force(case, refine, intervals):
    """The exact evaluator is the truth (NaN compares false); tile classes must be sound
    w.r.t. it whatever the float arithmetic does."""
    text, n, heads, q_tile, kv_tile, inputs = case
    try:
        pat = attnc.load(text)
    except SpecError:  # e.g. a constant log(-1.5) or 1 / 0: refused at load, nothing to classify
        assume(False)
    except (TypeError, ValueError):
        # A checker gap outside tile classification: `x ** 0.5` of an expression sympy knows to be
        # negative becomes sympy's I, which cannot be compared (sqrt() and log() are IEEE nodes)
        assume(False)
    bound = E.bind_sizes(pat, n=n, heads=heads)
    try:
        mask = attnc.materialize_mask(pat, n=n, heads=heads, inputs=inputs)
    except SpecError as err:
        # the same gap, refused with an error (never a wrong mask): `(-1.5 * q) ** 0.5` becomes
        # 1.22 * I * q ** 0.5, and no evaluator takes I. Nothing to classify.
        if "cannot evaluate ImaginaryUnit" not in str(err):
            raise
        assume(False)
    sched = classify(pat, bound, q_tile, kv_tile, inputs, refine, intervals)
    clamp, kclamp = (min(q_tile[0], n),), (min(kv_tile[0], n),)
    check_schedule(sched, mask, (n,), (n,), clamp, kclamp, heads, classify_tiles_dense(pat, bound, q_tile, kv_tile, inputs))


NAN_MASKS = ["log(q - k - 0.5) < 10.0", "q / k < 5", "(q * 1.0) % (k * 1.0) < 100.0"]


@pytest.mark.parametrize("mask_text", NAN_MASKS)
@pytest.mark.parametrize("tile", [1, 5, 24])
def test_nan_masks_by_interval_reasoning(mask_text, tile):
    """Issue 9, 2.1: NaN compares false, so a tile where the mask's arithmetic can be NaN is
    never FULL by interval reasoning (``log(q - k - 0.5) < 10.0`` was 1 FULL tile of 576 pairs)."""
    pat = attnc.load(f"pattern p\n  tokens seq\n  mask {mask_text}\n")
    bound = E.bind_sizes(pat, n=24)
    mask = attnc.materialize_mask(pat, n=24)
    for refine in (False, True):
        sched = classify(pat, bound, (tile,), (tile,), None, refine, intervals=True)
        check_schedule(sched, mask, (24,), (24,), (tile,), (tile,), 1)
        counts, area = tile_pair_counts(mask, (24,), (24,), (tile,), (tile,))
        want = expected_classes(counts, area)
        if refine:  # refined exactly: the classes and the allowed pairs are the brute force's
            assert (sched.full, sched.partial) == (int((want == 2).sum()), int((want == 1).sum()))
            assert sched.allowed_total == int(mask.sum())
    if mask_text.startswith("log"):
        assert int(mask.sum()) == 276  # 0 + 1 + ... + 23: only q > k gives a number


@pytest.mark.parametrize("mask_text", NAN_MASKS)
def test_nan_masks_beyond_exact_axis_counting(mask_text):
    """Issue 9, 2.1: above ``AXIS_EXACT_MAX`` tokens a 1-D mask is classified by interval
    reasoning (that is why ``tokens seq`` with n > 4096 went wrong): FULL/PARTIAL counts and
    the allowed pairs equal the dense mask's."""
    n, tile = T.AXIS_EXACT_MAX + 4, (128,)
    pat = attnc.load(f"pattern p\n  tokens seq\n  mask {mask_text}\n")
    bound = E.bind_sizes(pat, n=n)
    mask = attnc.materialize_mask(pat, n=n)
    sched = classify_tiles(pat, bound, tile, tile)
    counts, area = tile_pair_counts(mask, (n,), (n,), tile, tile)
    want = expected_classes(counts, area)
    assert (sched.full, sched.partial) == (int((want == 2).sum()), int((want == 1).sum()))
    assert torch.equal(sched.classes()[0], want[0])
    assert sched.density_exact and sched.allowed_total == int(mask.sum())
    # the pairs the schedule lets through (FULL tiles whole, PARTIAL tiles masked) are the mask's
    h, qi, ki, full = sched.pairs()
    visit = torch.zeros(n, n, dtype=torch.bool)
    for a, b, f in zip(qi.tolist(), ki.tolist(), full.tolist(), strict=True):
        block = (slice(a * 128, (a + 1) * 128), slice(b * 128, (b + 1) * 128))
        visit[block] = True if f else mask[0][block]
    assert torch.equal(visit, mask[0])


def test_nan_mask_cpu_backend_matches_reference():
    """End to end: the CPU tile executor attends exactly the pairs the reference does."""
    n = T.AXIS_EXACT_MAX + 4
    text = "pattern p\n  tokens seq\n  mask log(q - k - 0.5) < 10.0\n"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 4, dtype=torch.float64, generator=gen) for _ in range(3))
    ref = attnc.compile_attention(text, backend="reference")(q, k, v)
    out = attnc.compile_attention(text, backend="cpu", q_tile=128, kv_tile=128)(q, k, v)
    assert torch.isfinite(ref[:, :, 1:]).all()
    torch.testing.assert_close(out[:, :, 1:], ref[:, :, 1:], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- NATTEN's published figures
def natten_axis_ranges(L: int, w: int, s: int = 1, causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last key of every query on one axis (dilation 1), NATTEN's rule."""
    i = torch.arange(L)
    if causal:
        leader = torch.clamp((i // s) * s + s - 1, max=L - 1)
        return torch.clamp(leader - w + 1, min=0), i
    leader = torch.clamp((i // s) * s + s // 2, max=L - 1)
    wl, wr = w // 2, w // 2 + (w % 2) - 1
    start = torch.clamp(leader - wl, min=0) + torch.where(leader + wr >= L, L - wr - leader - 1, 0)
    return start, start + w - 1


def natten_tile_counts(extents, windows, strides, q_tile, kv_tile) -> tuple[torch.Tensor, torch.Tensor]:
    """Allowed pairs and tokens per (Q tile, KV tile) of a NATTEN window on a grid, ``[nq, nk]`` float64."""
    counts = torch.ones(1, 1, dtype=torch.float64)
    area = torch.ones(1, 1, dtype=torch.float64)
    for L, w, s, tq, tk in zip(extents, windows, strides, q_tile, kv_tile, strict=True):
        first, last = natten_axis_ranges(L, w, s)
        nkt = -(-L // tk)
        lo = torch.arange(nkt) * tk
        hi = torch.clamp(lo + tk, max=L) - 1
        overlap = (torch.minimum(last[:, None], hi[None, :]) - torch.maximum(first[:, None], lo[None, :]) + 1).clamp(min=0)
        qt = torch.arange(L) // tq
        axis = torch.zeros(-(-L // tq), nkt, dtype=torch.float64).index_add_(0, qt, overlap.to(torch.float64))
        qs = torch.bincount(qt).to(torch.float64)
        ks = (hi - lo + 1).to(torch.float64)
        counts = (counts[:, None, :, None] * axis[None, :, None, :]).reshape(counts.shape[0] * axis.shape[0], -1)
        a = qs[:, None] * ks[None, :]
        area = (area[:, None, :, None] * a[None, :, None, :]).reshape(counts.shape)
    return counts, area


def test_natten_reference_matches_dense_mask():
    """The closed-form reference itself, against the dense mask at a small size."""
    ext, win, stride, qt, kt = (5, 7, 9), (3, 5, 4), (2, 1, 3), (2, 3, 4), (3, 2, 4)
    pat = attnc.load("stdlib:neighborhood_3d", kernel_size_t=3, kernel_size_y=5, kernel_size_x=4, stride_t=2, stride_y=1, stride_x=3)
    mask = attnc.materialize_mask(pat, sizes=dict(zip(("frames", "height", "width"), ext, strict=True)))
    counts, area = tile_pair_counts(mask, ext, ext, qt, kt)
    ref_counts, ref_area = natten_tile_counts(ext, win, stride, qt, kt)
    assert torch.equal(counts[0], ref_counts) and torch.equal(area, ref_area)


NATTEN = [
    # (stdlib name, sizes, params, extents, window, stride, q_tile, kv_tile, published bound)
    ("neighborhood_1d", None, dict(kernel_size=2048), (32768,), (2048,), (1,), (128,), (128,), 16.0),
    ("neighborhood_2d", {"height": 256, "width": 256}, dict(kernel_size_y=80, kernel_size_x=80), (256, 256), (80, 80), (1, 1),
     (16, 8), (16, 8), 10.24),
    ("neighborhood_3d", {"frames": 30, "height": 48, "width": 80}, dict(kernel_size_t=18, kernel_size_y=24, kernel_size_x=24), (30, 48, 80),
     (18, 24, 24), (1, 1, 1), (2, 8, 8), (2, 8, 8), 11.11),
]


@pytest.mark.parametrize("case", NATTEN, ids=["1d-32k", "2d-256", "3d-30x48x80"])
def test_natten_published_flop_bounds(case):
    name, sizes, params, ext, win, stride, qt, kt, published = case
    pat = attnc.load(f"stdlib:{name}", **params)
    bound = E.bind_sizes(pat, n=ext[0] if sizes is None else None, heads=2, sizes=sizes)
    sched = classify_tiles(pat, bound, qt, kt)
    assert sched.density_exact
    assert float(sched.allowed_pairs.sum()) * (2 if sched.heads_stored == 1 else 1) == 2 * math.prod(ext) * math.prod(win)
    assert round(1 / sched.density, 2) == published
    counts, area = natten_tile_counts(ext, win, stride, qt, kt)
    want = expected_classes(counts, area)
    got = per_head(sched.classes(), 2)
    assert bool((counts[got[0] == 2] == area[got[0] == 2]).all()) and bool((counts[got[0] == 0] == 0).all())
    if sched.exact:
        assert torch.equal(got[0], want) and torch.equal(got[1], want)
    assert sched.partial > 0  # unstrided windows do not align with tiles


@pytest.mark.parametrize("stride,block_sparse", [((16, 8, 8), True), ((1, 1, 1), False)])
def test_natten_strided_3d_is_fully_block_sparse(stride, block_sparse):
    ext, win, tile = (30, 48, 80), (18, 24, 24), (2, 8, 8)
    pat = attnc.load("stdlib:neighborhood_3d", kernel_size_t=18, kernel_size_y=24, kernel_size_x=24, stride_t=stride[0], stride_y=stride[1], stride_x=stride[2])
    bound = E.bind_sizes(pat, sizes={"frames": 30, "height": 48, "width": 80})
    sched = classify_tiles(pat, bound, tile, tile)
    counts, area = natten_tile_counts(ext, win, stride, tile, tile)
    want = expected_classes(counts, area)
    assert (int((want == 1).sum()) == 0) == block_sparse  # the reference agrees with NATTEN's claim
    got = sched.classes()[0]
    assert bool((counts[got == 2] == area[got == 2]).all()) and bool((counts[got == 0] == 0).all())
    assert (sched.partial == 0) == block_sparse
    if block_sparse:
        assert torch.equal(got, want)
        assert sched.full == int((want == 2).sum()) > 0
    assert sched.density_exact and float(sched.allowed_pairs[0]) == float(counts.sum())


# ----------------------------------------------------------------- the stdlib at small sizes
#: every stdlib pattern with a static mask, as this file classifies it (``tests/cases.py``: its heads, (q_tile,
#: kv_tile))
STDLIB = claimed("tiles")
#: Patterns whose mask is chosen at run time by routing or clustering (their classification from the
#: call's selection is tested against the reference in tests/patterns/test_cluster_route.py,
#: tests/patterns/test_vertical_slash.py and the routing tests), and recurrences: no static tile classification. nsa and
#: combiner combine several attentions (no single mask; their branches are ordinary patterns, nsa's selection
#: routed at run time: tests/patterns/test_nsa.py, tests/patterns/test_combiner.py).
NOT_CLASSIFIED = {"anchor", "combiner", "biformer", "moba", "quest", "vmoba", "dsa", "dma", "sparsifiner", "seer", "cluster_mask", "routing_transformer", "vertical_slash", "token_topk", "xattention", "nsa", "gla", "lightning", "lightning_fla", "mamba2", "retention", "delta_net",
                  "gated_delta_net", "kda", "titans"}


def test_stdlib_table_is_complete():
    assert set(stdlib_index()) == set(STDLIB) | NOT_CLASSIFIED


@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_pattern_classification(name):
    case = STDLIB[name]
    params, n, sizes, heads, (qt, kt) = case.params, case.n, case.sizes, case.heads, case.tiles
    pat = attnc.load(f"stdlib:{name}", **params)
    read = E.input_names(pat.mask) if isinstance(pat.mask, sympy.Basic) else set()
    inputs = {key: t for key, t in case.make_inputs(heads, 8, seed=1).items() if key in read} or None
    bound = E.bind_sizes(pat, n=n, heads=heads, sizes=sizes)
    ext = (bound.n,) if sizes is None else tuple(sizes.values())
    mask = attnc.materialize_mask(pat, n=n, heads=heads, sizes=sizes, inputs=inputs)
    assert 0 < int(mask.sum()) < mask.numel()  # the sizes make a non-trivial mask
    sched = classify_tiles(pat, bound, qt, kt, inputs)
    dense = classify_tiles_dense(pat, bound, qt, kt, inputs)
    check_schedule(sched, mask, ext, ext, qt, kt, heads, dense)
    if inputs is None:  # static masks are small enough here to be classified exactly
        assert sched.exact and sched.density_exact


def test_static_mask_needs_no_unused_inputs():
    """A schedule is built before the call: the FoX decay gates ``g`` are not read by the mask
    (``causal``), so classifying it must not require them."""
    pat = attnc.load("stdlib:forgetting")
    bound = E.bind_sizes(pat, n=40, heads=2)
    sched = classify_tiles(pat, bound, (8,), (8,))
    mask = attnc.materialize_mask("stdlib:alibi", n=40, heads=2)  # the same mask: causal
    check_schedule(sched, mask, (40,), (40,), (8,), (8,), 2)


@pytest.mark.parametrize("refine", [False, True])
@pytest.mark.parametrize("intervals", [False, True])
def test_infinite_float32_input_keeps_its_bound(refine, intervals):
    """A float32 input of -inf: widening its bounds for float32 rounding gave -inf + inf = NaN, and the
    pair of a mask that holds (-inf < 0) was classified EMPTY (found by the fuzz test above)."""
    text = "pattern p\n  tokens seq\n  input w: float[n]\n  mask (((q + q) + (q + w[q])) < q) and (q <= q)\n"
    inputs = {"w": torch.tensor([-math.inf, math.inf, 1.0], dtype=torch.float32)}
    pat = attnc.load(text)
    bound = E.bind_sizes(pat, n=3, heads=1)
    mask = attnc.materialize_mask(pat, n=3, heads=1, inputs=inputs)
    assert mask[0, :, :].any(-1).tolist() == [True, False, False]
    sched = classify(pat, bound, (1,), (1,), inputs, refine, intervals)
    check_schedule(sched, mask, (3,), (3,), (1,), (1,), 1, classify_tiles_dense(pat, bound, (1,), (1,), inputs))


# ----------------------------------------------------------------- runs of consecutive tiles
def naive_runs(count: torch.Tensor, index: torch.Tensor) -> bool:
    """Every list its first tile and the ones after it, one by one (a plain loop over the entries)."""
    for c in range(count.shape[0]):
        for t in range(count.shape[1]):
            entries = [int(index[c, t, j]) for j in range(int(count[c, t]))]
            if any(tile != entries[0] + j for j, tile in enumerate(entries)):
                return False
    return True


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([("stdlib:sliding_window", {"window": 7}), ("pattern causal\n  tokens seq\n  mask causal\n", {}),
                        ("stdlib:neighborhood_1d", {"kernel_size": 5, "dilation": 3}),
                        ("stdlib:dilated", {"segment": 12, "dilation": 2}),
                        ("stdlib:streaming", {"window": 6, "sinks": 2})]),
       st.integers(20, 70), st.sampled_from([4, 8, 16]), st.sampled_from([4, 8, 16]))
def test_list_runs_are_the_naive_loops(case, n, q_tile, kv_tile):
    """``TileSchedule.runs`` says of each list kind what a loop over its entries says, and it is not
    vacuous: a causal mask's lists are runs; streaming's PARTIAL lists past the sinks (the sink tile, then
    the window's diagonal tiles) are not."""
    name, params = case
    pat = attnc.load(name, **params)
    sched = T.classify_tiles(pat, E.bind_sizes(pat, n=n, heads=1), (q_tile,), (kv_tile,))
    runs = sched.runs()
    for kind, count, index in (("FULL", sched.full_count, sched.full_index),
                               ("PART", sched.partial_count, sched.partial_index),
                               ("T_FULL", sched.t_full_count, sched.t_full_index),
                               ("T_PART", sched.t_partial_count, sched.t_partial_index)):
        assert runs[kind] == naive_runs(count, index), kind
    if name.startswith("pattern causal"):
        assert all(runs.values())
    if name == "stdlib:streaming" and n > 48:
        assert not runs["PART"]


def test_a_float32_input_beside_a_huge_constant_classifies_as_its_mask():
    """Found by the hypothesis search above: ``w[q] - sqrt(h) - 1e308 > q`` with a float32 ``w = [nan, inf]``
    allows row 1. The evaluator kept ``w`` in float32 beside the Python float 1e308 (-inf, then NaN) where h
    was an int, and not where h was a tensor: tile classification called row 1's tiles EMPTY."""
    text = "pattern p\n  tokens seq\n  input w: float[n]\n  mask (4 * q > q) and (q + w[q] - (1e308 + q + sqrt(h)) > q)\n"
    inputs = {"w": torch.tensor([float("nan"), float("inf")])}
    pat = attnc.load(text)
    bound = E.bind_sizes(pat, n=2, heads=1)
    mask = attnc.materialize_mask(pat, n=2, heads=1, inputs=inputs)
    assert mask[0].tolist() == [[False, False], [True, True]]
    for refine in (False, True):
        for intervals in (False, True):
            sched = classify(pat, bound, (1,), (1,), inputs, refine, intervals)
            check_schedule(sched, mask, (2,), (2,), (1,), (1,), 1, classify_tiles_dense(pat, bound, (1,), (1,), inputs))


def _pair_by_pair(pat, bound, inputs) -> torch.Tensor:
    """The mask evaluated one (query, key) pair at a time, ``[heads, Nq, Nk]``: the evaluator's scalar path."""
    return torch.stack([torch.stack([E.mask_tensor(pat, bound, inputs, q_index=torch.tensor([i]), k_index=torch.tensor([j]))[0, :, 0, 0]
                                     for j in range(bound.nk)], -1) for i in range(bound.n)], -2)


def _classifies_as_its_mask(text: str, n: int, heads: int, tiles, inputs=None) -> torch.Tensor:
    """Every classification (refined or not, interval reasoning or exact counting) of every tile size
    in ``tiles`` is sound for the mask, and the mask is the same evaluated pair by pair."""
    pat = attnc.load(text)
    bound = E.bind_sizes(pat, n=n, heads=heads)
    mask = attnc.materialize_mask(pat, n=n, heads=heads, inputs=inputs)
    assert torch.equal(_pair_by_pair(pat, bound, inputs), mask)
    for tile in tiles:
        dense = classify_tiles_dense(pat, bound, (1,), tile, inputs)
        for refine in (False, True):
            for intervals in (False, True):
                sched = classify(pat, bound, (1,), tile, inputs, refine, intervals)
                check_schedule(sched, mask, (n,), (n,), (1,), (min(tile[0], n),), heads, dense)
    return mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_float_power_modulo_classifies_as_its_mask(dtype):
    """Found by the hypothesis search above: ``(q * q) ** k % (q * q ** 0.5)`` (sympy: ``q ** (2 * k) %
    q ** 1.5``) at q = 7, k = 10. torch's float ``pow`` differs by an ulp between its vector lanes and its
    scalar tail (7 ** 1.5), and the remainder of 7 ** 20 by it is then another number (0.61 or 15.9): the
    whole mask allowed (7, 10), the classifier's evaluation of it among other pairs did not (EMPTY)."""
    text = ("pattern p\n  tokens seq\n  input w: float[n]\n"
            "  mask (q < (q + q)) and ((((q * q) ** k) % (q * (q ** 0.5))) < q)\n")
    mask = _classifies_as_its_mask(text, 11, 1, [(1,)], {"w": torch.full((11,), float("nan"), dtype=dtype)})
    assert mask[0, 7, 10]  # 7.0 ** 20 % 7.0 ** 1.5 == 0.61 with libm's pow (Python's), in every position


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_text", ["1.0 / max(w[q], 0.0) > 0", "1.0 / min(w[k], -0.0 * w[q]) < 0",
                                       "q < k + 100 and max(w[k], 0.0) ** -1 < 0"])
def test_min_max_of_signed_zeros_classify_as_their_mask(dtype, mask_text):
    """``max(-0.0, 0.0)``: torch's ``maximum`` gave -0.0 in its vector lanes and 0.0 in its scalar tail,
    and ``1.0 /`` turns the zero's sign into an infinity's: the mask depended on the token's position.
    The evaluator orders -0.0 below 0.0 (IEEE's minimum and maximum) in every element."""
    w = torch.tensor([-0.0, 0.0, -0.0] * 7, dtype=dtype)
    _classifies_as_its_mask(f"pattern p\n  tokens seq\n  input w: float[n]\n  mask {mask_text}\n", 21, 1,
                            [(1,), (2,), (5,), (21,)], {"w": w})


@pytest.mark.parametrize("mask_text", ["w[k] ** -0.5 < 0", "w[k] ** -0.5 > 0", "w[k] ** (q * 1.0 - 1.0) > 0",
                                       "w[k] ** (q * 1.0 - 1.0) < 0"])
def test_a_zero_base_of_either_sign_under_a_negative_power_classifies_as_its_mask(mask_text):
    """``-0.0 ** -0.5`` (rsqrt) and ``-0.0 ** -1.0`` are -inf, ``0.0 ** -0.5`` inf: the interval of a base
    holding zero says nothing of the zero's sign (a range's min and max of -0.0 and 0.0 may be either),
    so a negative power of it may be either infinity (it was one: FULL or EMPTY tiles with the other)."""
    for vals in ([0.0, -0.0] * 3, [-0.0, 0.0, 0.0, -0.0, 0.0, 0.0]):
        for dtype in (torch.float64, torch.float32):
            _classifies_as_its_mask(f"pattern p\n  tokens seq\n  input w: float[n]\n  mask {mask_text}\n", 6, 1,
                                    [(1,), (2,), (3,), (6,)], {"w": torch.tensor(vals, dtype=dtype)})


@pytest.mark.parametrize("mask_text", ["((h + 6) ** 25) % 7 == 6 or q > k", "(3 ** (h + 40)) % 7 == 1 or q > k",
                                       "(h + 6) ** 25 > q"])
def test_an_int64_power_of_the_head_wraps_as_in_the_mask(mask_text):
    """Integers are int64 and wrap around: the whole mask's ``h`` is a tensor, and tile classification
    evaluated one head with ``h`` a Python int, whose powers do not wrap (another remainder: a FULL tile
    with masked pairs; or an overflow error converting it)."""
    _classifies_as_its_mask(f"pattern p\n  tokens seq\n  mask {mask_text}\n", 8, 2, [(1,), (3,), (8,)])


@pytest.mark.parametrize("mask_text", ["((q - (q + q)) < q) and ((w[q] // h) < -1e308)",
                                       "((q - (q + q)) < q) and ((w[q] // h) >= -1e308)",
                                       "(min(q, (q + (q + w[k]))) < q) or ((w[q] // h) < -1e308)"])
def test_a_float32_input_over_the_head_classifies_as_its_mask(mask_text):
    """Found by the hypothesis search above: the whole mask's ``h`` is a tensor, so float32 ``w[q] // h``
    is float64 there (-2.5 // 0 is -inf < -1e308); with ``h`` a Python int it stayed float32, where -1e308
    rounds to -inf too, and tile classification called row 1 EMPTY (or FULL for ``>=``)."""
    _classifies_as_its_mask(f"pattern p\n  tokens seq\n  input w: float[n]\n  mask {mask_text}\n", 2, 1,
                            [(1,), (3,)], {"w": torch.tensor([float("nan"), -2.5])})


@pytest.mark.parametrize("spec, params, read", [
    ("stdlib:quest", {}, "n"),  # topk = max(3, min(nk, budget) // page): of the keys' count
    ("stdlib:anchor", {}, "n"),  # the stripes' groups and the anchor region
    ("stdlib:xattention", {}, None),
])
def test_the_symbols_a_route_reads_are_the_patterns(spec, params, read):
    """Every value of a route (block, keep, count, threshold, stride, ...) counts among what the pattern reads: the
    kernel cache keeps a size a route reads exact (``shape_bucket``), Ulysses asks ``reads_heads``."""
    pat = attnc.load(spec, **params)
    assert pat.route.free_symbols <= T.mentioned_symbols(pat)
    if read is not None:
        assert any(s.name in (read, "nk") for s in pat.route.free_symbols)


def test_a_route_reading_the_head_makes_the_pattern_read_heads():
    src = "pattern r(K = 2)\n  tokens seq\n  mask causal\n  route topk(K) blocks(4) by q @ mean(k) keep k // 4 == h\n"
    pat = attnc.load(src)
    assert sympy.Symbol("h") in {sympy.Symbol(s.name) for s in T.mentioned_symbols(pat)} and T.reads_heads(pat)
    assert not T.reads_heads(attnc.load(src.replace(" keep k // 4 == h", "")))
