"""window(): exhaustively against NATTEN's published per-axis rule.

The reference below is written from NATTEN's published formula (NATTEN /
Faster NA / GNA), not from attnc's code:

* dilation d: group g = x mod d, in-group coordinate x // d, group length
  Lg = ceil((L - g) / d); query and key must share the group;
* non-causal: leader = min((i // s) * s + s // 2, Lg - 1), wl = w // 2,
  wr = w // 2 + (w mod 2) - 1,
  start = max(leader - wl, 0) + (Lg - wr - leader - 1 if leader + wr >= Lg else 0),
  keys start .. start + w - 1;
* causal: leader = min((i // s) * s + s - 1, Lg - 1), keys
  max(leader - w + 1, 0) .. i.

Every axis length L up to 16, every window size, dilation and stride valid
for it, causal and not, goes through ``attnc.materialize_mask`` on
``tokens seq``; grids are checked as the product of the per-axis rules.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc

LMAX = 16


def natten_axis(L: int, w: int, d: int, s: int, causal: bool) -> torch.Tensor:
    """keep[i, j] along one axis of length L (bool [L, L])."""
    keep = torch.zeros(L, L, dtype=torch.bool)
    for i in range(L):
        g = i % d
        lg = math.ceil((L - g) / d)
        x = i // d
        if causal:
            leader = min((x // s) * s + s - 1, lg - 1)
            first, last = max(leader - w + 1, 0), x
        else:
            leader = min((x // s) * s + s // 2, lg - 1)
            wl, wr = w // 2, w // 2 + (w % 2) - 1
            first = max(leader - wl, 0) + (lg - wr - leader - 1 if leader + wr >= lg else 0)
            last = first + w - 1
        for y in range(first, last + 1):
            keep[i, y * d + g] = True
    return keep


def valid_combos(L: int):
    for w in range(1, L + 1):
        for d in range(1, L // w + 1):
            for s in range(1, w + 1):
                for causal in (False, True):
                    yield w, d, s, causal


def window_call(axis: str | None, w: int, d: int, s: int, causal: bool) -> str:
    args = [axis] if axis else []
    args.append(str(w))
    # vary the spelling: defaults omitted, keywords in any order
    kws = []
    if d != 1 or (w + s) % 2:
        kws.append(f"dilation = {d}")
    if s != 1 or w % 3 == 0:
        kws.append(f"stride = {s}")
    if causal or w % 2:
        kws.append(f"causal = {'true' if causal else 'false'}")
    if w % 2:
        kws.reverse()
    return "window(" + ", ".join(args + kws) + ")"


def test_reference_invariants():
    """The reference itself: exact window sizes, groups, causality (so it can be trusted)."""
    for L in range(1, LMAX + 1):
        for w, d, s, causal in valid_combos(L):
            keep = natten_axis(L, w, d, s, causal)
            for i in range(L):
                keys = keep[i].nonzero().flatten().tolist()
                assert i in keys  # a query always sees itself
                assert all(j % d == i % d for j in keys)
                if causal:
                    assert all(j <= i for j in keys) and len(keys) <= w
                else:
                    assert len(keys) == w
            if s == 1 and d == 1 and not causal and w % 2 == 1 and L >= w:
                centre = [i for i in range(L) if w // 2 <= i < L - w // 2]
                for i in centre:  # away from the borders: the symmetric band
                    assert keep[i].nonzero().flatten().tolist() == list(range(i - w // 2, i + w // 2 + 1))


@pytest.mark.parametrize("L", range(1, LMAX + 1))
def test_window_seq_exhaustive(L):
    count = 0
    for w, d, s, causal in valid_combos(L):
        src = f"pattern w\n  tokens seq\n  mask {window_call(None, w, d, s, causal)}\n"
        got = attnc.materialize_mask(src, n=L)
        assert got.shape == (1, L, L)
        expected = natten_axis(L, w, d, s, causal)
        if not torch.equal(got[0], expected):
            bad = (got[0] != expected).nonzero()[0].tolist()
            raise AssertionError(f"L={L} size={w} dilation={d} stride={s} causal={causal}: "
                                 f"first difference at (q, k) = {bad}\n{src}")
        count += 1
    assert count > 0


def test_window_parameters_and_expressions():
    """Sizes given by parameters and constant expressions mean the same as literals."""
    src = """pattern w(size, dil = 1, st = 1, c = false)
      tokens seq
      mask window(size, dilation = dil, stride = st, causal = c)
    """
    for L, w, d, s, causal in [(12, 3, 2, 2, False), (12, 4, 3, 3, True), (9, 9, 1, 4, False),
                               (7, 2, 3, 1, True), (10, 5, 1, 5, False)]:
        got = attnc.materialize_mask(src, n=L, size=w, dil=d, st=s, c=causal)[0]
        assert torch.equal(got, natten_axis(L, w, d, s, causal)), (L, w, d, s, causal)
    got = attnc.materialize_mask(
        "pattern w(r = 2) tokens seq mask window(2 * r + 1, stride = r // 2 + 1)", n=11)[0]
    assert torch.equal(got, natten_axis(11, 5, 1, 2, False))


def grid_expected(sizes: list[int], rules: list[torch.Tensor | None]) -> torch.Tensor:
    """Product of per-axis rules on a row-major grid (None: the axis is unconstrained)."""
    total = math.prod(sizes)
    coords = torch.cartesian_prod(*[torch.arange(s) for s in sizes]).view(total, len(sizes))
    keep = torch.ones(total, total, dtype=torch.bool)
    for axis, rule in enumerate(rules):
        if rule is not None:
            keep &= rule[coords[:, axis]][:, coords[:, axis]]
    return keep


@st.composite
def axis_windows(draw, name: str):
    L = draw(st.integers(1, 7))
    w = draw(st.integers(1, L))
    d = draw(st.integers(1, L // w))
    s = draw(st.integers(1, w))
    causal = draw(st.booleans())
    return name, L, w, d, s, causal


@settings(max_examples=150, deadline=None)
@given(y=axis_windows("y"), x=axis_windows("x"), literal=st.booleans(), skip_y=st.integers(0, 5))
def test_window_grid_2d(y, x, literal, skip_y):
    (_, H, wy, dy, sy, cy), (_, W, wx, dx, sx, cx) = y, x
    layout = f"grid(y: {H}, x: {W})" if literal else "grid(y: height, x: width)"
    clauses = [window_call("x", wx, dx, sx, cx)]
    rules = [None, natten_axis(W, wx, dx, sx, cx)]
    if skip_y:  # sometimes only one axis is windowed
        clauses.insert(0, window_call("y", wy, dy, sy, cy))
        rules[0] = natten_axis(H, wy, dy, sy, cy)
    src = f"pattern g\n  tokens {layout}\n  mask {' and '.join(clauses)}\n"
    sizes = None if literal else {"height": H, "width": W}
    got = attnc.materialize_mask(src, sizes=sizes)
    assert got.shape == (1, H * W, H * W)
    expected = grid_expected([H, W], rules)
    assert torch.equal(got[0], expected), src


@pytest.mark.parametrize("case", [
    ((3, 4, 5), ((3, 1, 1, False), (2, 2, 2, True), (5, 1, 3, False))),
    ((2, 6, 3), ((1, 2, 1, True), (3, 2, 3, False), (3, 1, 2, True))),
    ((4, 3, 4), ((2, 2, 2, False), (3, 1, 1, True), (2, 2, 1, False))),
])
def test_window_grid_3d(case):
    sizes, windows = case
    axes = ("t", "y", "x")
    src = ("pattern g\n  tokens grid(t: frames, y: height, x: width)\n  mask "
           + " and ".join(window_call(a, *wd) for a, wd in zip(axes, windows, strict=True)))
    got = attnc.materialize_mask(src, sizes=dict(zip(("frames", "height", "width"), sizes, strict=True)))
    rules = [natten_axis(L, *wd) for L, wd in zip(sizes, windows, strict=True)]
    assert torch.equal(got[0], grid_expected(list(sizes), rules))
