"""Random concatenated layouts against a naive loop and the brute-force tile classification.

Layouts: 1-3 ``seq(SIZE)`` segments (a size name, an int parameter or a literal) and at most one
``grid`` of 1-3 axes, in a random order (at least two segments: one alone is not a concatenation);
sometimes ``queries`` and ``keys`` list the same segments in different orders (cross attention).
Masks mix ``q in NAME``, clamped grid coordinates, flat positions, size names as values, heads and
NATTEN windows (on a grid axis or on flat positions).

References written here, not taken from attnc's lowering:

* ``naive_tokens`` walks the segments in the order written and gives every flat index its segment
  and the coordinates of its grid index clamped to the grid (spec/REFERENCE.md), by ``divmod``;
* every mask leaf is also a Python function of two such tokens; a window leaf reads a table of the
  same window materialised on a plain ``tokens seq`` of the axis' extent (or of the whole
  concatenation for a flat window), indexed by the tokens' clamped coordinates (or flat
  positions): the window rule itself is tested elsewhere, here only where it is applied;
* tile classes are checked with ``test_tiles.check_schedule`` (soundness always, equality with
  ``classify_tiles_dense`` when exact) for random 1-D tile sizes, with the exact refinement and the
  per-axis exact counting each switched on and off; sometimes after a KV cache (the queries are the
  last rows of the concatenation, ``nk > n``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from unittest import mock

import torch
from fuzz_budget import examples
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tiles import check_schedule

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis import tiles as T
from attnc.compiler.analysis.tiles import classify_tiles, classify_tiles_dense

AXES = (("t", "frames"), ("y", "height"), ("x", "width"))
SEQ_NAMES = ("text", "tail", "extra")


# ----------------------------------------------------------------- the independent reference
@dataclass(frozen=True)
class Tok:
    flat: int
    seg: int  # index of the segment in the order written
    coords: tuple[int, ...]  # clamped grid coordinates (empty without a grid)


@dataclass(frozen=True)
class Seg:
    kind: str  # 'seq' | 'grid'
    name: str | None  # what `q in NAME` tests (None: a literal-size seq segment)
    text: str  # as written in the layout
    size: int  # tokens
    axes: tuple[tuple[str, int], ...] = ()  # (axis, extent) of the grid


def naive_tokens(segs: list[Seg]) -> list[Tok]:
    """Every token, in flat order, with its segment and the coordinates of its clamped grid index."""
    grid_at = next((i for i, s in enumerate(segs) if s.kind == "grid"), None)
    start = sum(s.size for s in segs[:grid_at]) if grid_at is not None else 0
    cells = segs[grid_at].size if grid_at is not None else 1
    out, flat = [], 0
    for i, seg in enumerate(segs):
        for _ in range(seg.size):
            coords = []
            if grid_at is not None:
                local = min(max(flat - start, 0), cells - 1)
                for _, L in reversed(segs[grid_at].axes):
                    local, c = divmod(local, L)
                    coords.append(c)
            out.append(Tok(flat, i, tuple(reversed(coords))))
            flat += 1
    return out


@cache
def window_table(n: int, w: int, d: int, s: int, causal: bool) -> torch.Tensor:
    """NATTEN's window on a plain sequence of n tokens, bool ``[n, n]``."""
    text = f"pattern w\n  tokens seq\n  mask window({w}, dilation = {d}, stride = {s}, causal = {str(causal).lower()})\n"
    return attnc.materialize_mask(text, n=n)[0]


# ----------------------------------------------------------------- random layouts and masks
@st.composite
def layouts(draw):
    """(segments in the order written, int parameters, segment names usable in `in`, size values)."""
    n_seq = draw(st.integers(1, 3))
    has_grid = n_seq == 1 or draw(st.booleans())
    params: dict[str, int] = {}
    values: dict[str, int] = {}  # size names and size parameters: ints in expressions
    segs = []
    for name in SEQ_NAMES[:n_seq]:
        size = draw(st.integers(1, 6))
        how = draw(st.sampled_from(["name", "name", "param", "literal"]))
        if how == "literal":
            segs.append(Seg("seq", None, f"seq({size})", size))
            continue
        if how == "param":
            params[name] = size
        values[name] = size
        segs.append(Seg("seq", name, f"seq({name})", size))
    if has_grid:
        ndim = draw(st.integers(1, 3))
        hi = {1: 8, 2: 4, 3: 3}[ndim]
        axes, parts = [], []
        for a, size_name in AXES[3 - ndim:]:
            L = draw(st.integers(1, hi))
            axes.append((a, L))
            if draw(st.integers(0, 3)) == 0:
                parts.append(f"{a}: {L}")
            else:
                parts.append(f"{a}: {size_name}")
                values[size_name] = L
        segs.append(Seg("grid", "grid", "grid(" + ", ".join(parts) + ")", math.prod(L for _, L in axes), tuple(axes)))
    order = draw(st.permutations(range(len(segs))))
    return [segs[i] for i in order], params, values


@st.composite
def cases(draw):
    segs, params, values = draw(layouts())
    key_segs = [segs[i] for i in draw(st.permutations(range(len(segs))))] if draw(st.integers(0, 3)) == 0 else segs
    cross = key_segs != segs  # the same concatenation on both sides is self-attention
    q_tokens, k_tokens = naive_tokens(segs), naive_tokens(key_segs)
    N = len(q_tokens)
    grid = next((s for s in segs if s.kind == "grid"), None)
    grid_axes = list(grid.axes) if grid else []
    names = [s.name for s in segs if s.name is not None]
    heads = draw(st.integers(1, 2))

    def seg_of(tok: Tok, side: list[Seg]) -> str | None:
        return side[tok.seg].name

    def position():
        """(query text, key text, query value, key value, extent) of a grid axis or the flat index."""
        choices = [("q", "k", lambda t: t.flat, N)]
        choices += [(f"q.{a}", f"k.{a}", lambda t, i=i: t.coords[i], L) for i, (a, L) in enumerate(grid_axes)]
        qa, ka, val, L = draw(st.sampled_from(choices))
        return qa, ka, val, L

    def leaf():
        """(mask text, Python rule of (query token, key token, head))."""
        kind = draw(st.integers(0, 14))
        qa, ka, val, L = position()
        c = draw(st.integers(-2, max(2, L)))
        b = draw(st.integers(1, 4))
        if kind in (0, 1) and names:  # membership
            name = draw(st.sampled_from(names))
            side = draw(st.sampled_from(["q", "k"]))
            neg = draw(st.booleans())
            text = f"{'not ' if neg else ''}{side} in {name}"
            if side == "q":
                return text, lambda q, k, h: (seg_of(q, segs) == name) != neg
            return text, lambda q, k, h: (seg_of(k, key_segs) == name) != neg
        if kind == 2 and len(names) >= 1:  # segments compared
            a, bn = draw(st.sampled_from(names)), draw(st.sampled_from(names))
            return (f"(q in {a}) == (k in {bn})",
                    lambda q, k, h: (seg_of(q, segs) == a) == (seg_of(k, key_segs) == bn))
        if kind == 3:
            return f"{qa} - {ka} < {c}", lambda q, k, h: val(q) - val(k) < c
        if kind == 4:
            return f"abs({qa} - {ka}) <= {c}", lambda q, k, h: abs(val(q) - val(k)) <= c
        if kind == 5:
            return f"{qa} // {b} == {ka} // {b}", lambda q, k, h: val(q) // b == val(k) // b
        if kind == 6:
            return f"({qa} + 2 * {ka}) % {b + 1} != 1", lambda q, k, h: (val(q) + 2 * val(k)) % (b + 1) != 1
        if kind == 7 and values:  # a size name (or size parameter) as a value
            name = draw(st.sampled_from(sorted(values)))
            off = draw(st.integers(-2, 1))
            v = values[name] + off
            return f"{ka} < {name} + {off}", lambda q, k, h: val(k) < v
        if kind == 8 and grid_axes and not cross:  # a window on a grid axis, at the clamped coordinates
            i = draw(st.integers(0, len(grid_axes) - 1))
            a, La = grid_axes[i]
            w = draw(st.integers(1, La))
            d = draw(st.integers(1, La // w))
            s = draw(st.integers(1, w))
            causal = draw(st.booleans())
            table = window_table(La, w, d, s, causal)
            return (f"window({a}, {w}, dilation = {d}, stride = {s}, causal = {str(causal).lower()})",
                    lambda q, k, h: bool(table[q.coords[i], k.coords[i]]))
        if kind == 9 and not cross:  # a window over flat positions (window() needs one layout)
            w = draw(st.integers(1, N))
            d = draw(st.integers(1, N // w))
            s = draw(st.integers(1, w))
            causal = draw(st.booleans())
            table = window_table(N, w, d, s, causal)
            return (f"window({w}, dilation = {d}, stride = {s}, causal = {str(causal).lower()})",
                    lambda q, k, h: bool(table[q.flat, k.flat]))
        if kind == 10:
            return "causal", lambda q, k, h: k.flat <= q.flat
        if kind == 11:
            m = draw(st.integers(0, 3))
            return f"{qa} - {ka} < {m} * (h + 1)", lambda q, k, h: val(q) - val(k) < m * (h + 1)
        if kind == 12:
            flag = draw(st.booleans())
            return str(flag).lower(), lambda q, k, h: flag
        if kind == 13:  # min / max of a query and a key position
            return f"max({qa}, {ka}) - min({qa}, {ka}) <= {c}", lambda q, k, h: max(val(q), val(k)) - min(val(q), val(k)) <= c
        if kind == 14:
            return (f"clamp({qa} - {ka}, 0, {b}) == {b}",
                    lambda q, k, h: min(max(val(q) - val(k), 0), b) == b)
        return f"{ka} <= {qa}", lambda q, k, h: val(k) <= val(q)

    def expr(depth: int):
        if depth == 0 or draw(st.integers(0, 2)) == 0:
            return leaf()
        op = draw(st.sampled_from(["and", "or", "not", "if"]))
        if op == "not":
            text, fn = expr(depth - 1)
            return f"not ({text})", lambda q, k, h: not fn(q, k, h)
        if op == "if" and names:  # a per-segment rule: if q in NAME then ... else ...
            name, side = draw(st.sampled_from(names)), draw(st.sampled_from(["q", "k"]))
            (ta, fa), (tb, fb) = expr(depth - 1), expr(depth - 1)

            def pick(q, k, h):
                inside = seg_of(q, segs) == name if side == "q" else seg_of(k, key_segs) == name
                return fa(q, k, h) if inside else fb(q, k, h)
            return f"(if {side} in {name} then ({ta}) else ({tb}))", pick
        (ta, fa), (tb, fb) = expr(depth - 1), expr(depth - 1)
        if op == "and":
            return f"({ta}) and ({tb})", lambda q, k, h: fa(q, k, h) and fb(q, k, h)
        return f"({ta}) or ({tb})", lambda q, k, h: fa(q, k, h) or fb(q, k, h)

    mask_text, rule = expr(2)
    head = "pattern p" + ("(" + ", ".join(f"{k} = {v}" for k, v in params.items()) + ")" if params else "")
    q_layout = " + ".join(s.text for s in segs)
    if cross:
        layout = f"  queries {q_layout}\n  keys {' + '.join(s.text for s in key_segs)}\n"
    else:
        layout = f"  tokens {q_layout}\n"
    text = f"{head}\n{layout}  mask {mask_text}\n"
    sizes = {k: v for k, v in values.items() if k not in params}
    q_tile = (draw(st.integers(1, N + 1)),)
    kv_tile = (draw(st.integers(1, N + 1)),)
    want = torch.tensor([[[rule(q, k, h) for k in k_tokens] for q in q_tokens] for h in range(heads)])
    # after a KV cache (self-attention, nk = N > n): the queries are the last `rows` tokens
    rows = draw(st.integers(1, N - 1)) if not cross and N > 1 and draw(st.integers(0, 3)) == 0 else N
    # `n` given with one size left out: the checker solves it from the sum of the segments
    solved = draw(st.sampled_from(sorted(sizes))) if sizes and not cross and draw(st.booleans()) else None
    return text, sizes, N, rows, heads, q_tile, kv_tile, want, solved


def classify(pat, bound, q_tile, kv_tile, refine: bool, intervals: bool):
    """``refine=False``: no exact token-level refinement; ``intervals=True``: no exact per-axis counting
    (test_tiles.classify's switches), so the interval rules over ``//``, ``%``, ``min``, ``max`` decide."""
    kwargs = {} if refine else {"refine_budget": 0}
    if intervals:
        with mock.patch.object(T, "AXIS_EXACT_MAX", 0):
            return classify_tiles(pat, bound, q_tile, kv_tile, **kwargs)
    return classify_tiles(pat, bound, q_tile, kv_tile, **kwargs)


@settings(max_examples=examples(75), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.booleans(), st.booleans())
def test_random_concatenations_against_naive_loop_and_brute_force(case, refine, intervals):
    text, sizes, N, rows, heads, q_tile, kv_tile, want, solved = case
    pat = attnc.load(text)
    mask = attnc.materialize_mask(pat, heads=heads, sizes=sizes or None)
    assert mask.shape == (heads, N, N), text
    assert torch.equal(mask, want), text
    if solved is not None:
        others = {k: v for k, v in sizes.items() if k != solved}
        assert E.bind_sizes(pat, n=N, sizes=others).axis_sizes[solved] == sizes[solved]
        assert torch.equal(attnc.materialize_mask(pat, n=N, heads=heads, sizes=others), want), text
    n = None if rows == N else rows  # a KV cache: the last `rows` queries against all N keys
    if n is not None:
        mask = attnc.materialize_mask(pat, n=n, nk=N, heads=heads, sizes=sizes or None)
        assert torch.equal(mask, want[:, N - rows:]), text
    bound = E.bind_sizes(pat, n=n, nk=N if n else None, heads=heads, sizes=sizes or None, offset_ok=True)
    assert (bound.n, bound.nk, bound.q_offset) == (rows, N, N - rows)
    sched = classify(pat, bound, q_tile, kv_tile, refine, intervals)
    dense = classify_tiles_dense(pat, bound, q_tile, kv_tile)
    qt, kt = (min(q_tile[0], rows),), (min(kv_tile[0], N),)
    assert sched.q_tile == qt and sched.kv_tile == kt
    check_schedule(sched, mask, (rows,), (N,), qt, kt, heads, dense)
