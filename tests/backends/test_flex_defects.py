"""backend="flex" against the reference backend (float64) where differential fuzzing found them apart:
gradients of min / max / clamp at a tie, bias indices out of range on attended pairs, a float mask
input that requires grad, ``%`` of a number by an input, and a non-finite value in v."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.core.errors import SpecError

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def qkv(B, H, N, D, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, D, generator=g, dtype=dtype).requires_grad_() for _ in range(3))


def flex_module(spec, **kw):
    attn = attnc.compile_attention(spec, backend="flex", **kw)
    attn.runner.compiled = False  # Flex's dense implementation: no compilation
    return attn


def compare(spec, q, k, v, inputs, grad_inputs=(), **kw):
    """out, lse and the gradients of q, k, v and ``grad_inputs`` of flex equal the reference's."""
    ref = attnc.compile_attention(spec, backend="reference", **kw)
    fx = flex_module(spec, **kw)
    o1, l1 = ref(q, k, v, return_lse=True, **inputs)
    o2, l2 = fx(q, k, v, return_lse=True, **inputs)
    torch.testing.assert_close(o2, o1, **TIGHT)
    torch.testing.assert_close(l2, l1, **TIGHT)
    g = torch.randn(o1.shape, generator=torch.Generator().manual_seed(99), dtype=o1.dtype)
    wrt = (q, k, v, *(inputs[n] for n in grad_inputs))
    for a, b in zip(torch.autograd.grad((o1 * g).sum(), wrt), torch.autograd.grad((o2 * g).sum(), wrt), strict=True):
        torch.testing.assert_close(b, a, **TIGHT)
    return fx


def _error(fn) -> str:
    with pytest.raises(SpecError) as info:
        fn()
    return str(info.value)


# ----------------------------------------------------------------- min, max, clamp at a tie
@pytest.mark.parametrize("bias", [
    "max(b[h, q], b[h, k])",
    "min(b[h, q], b[h, k], 0.5)",
    "clamp(b[h, k], 0.0, 1.0)",
    "clamp(b[h, q] - b[h, k], -0.5, 0.5) * (q - k)",
])
def test_min_max_clamp_split_the_gradient_evenly_at_a_tie(bias):
    """REFERENCE.md: min / max / clamp follow the active argument and split evenly on a tie."""
    spec = f"pattern p\n  tokens seq\n  input b: float[heads, n]\n  mask causal\n  bias {bias}\n"
    g = torch.Generator().manual_seed(3)
    b = (torch.randint(-2, 4, (2, 24), generator=g).to(torch.float64) / 2).requires_grad_()  # many ties
    compare(spec, *qkv(2, 2, 24, 8, seed=1), {"b": b}, grad_inputs=("b",))


# ----------------------------------------------------------------- bias indices
RPB = "pattern p(W = 3)\n  tokens seq\n  input rpb: float[heads, 7]\n  mask abs(q - k) <= {reach}\n  bias rpb[h, q - k + W]\n"


def test_a_bias_index_out_of_range_on_an_attended_pair_raises_the_reference_error():
    """``rpb[h, q - k + W]`` beside ``abs(q - k) <= W + 1``: -1 and 7 on attended pairs, the
    reference's ``SpecError`` (Flex's generated reads clamp: the runner checks apart)."""
    spec = RPB.format(reach="W + 1")
    q, k, v = qkv(1, 2, 40, 8, seed=2)
    rpb = torch.randn(2, 7, dtype=torch.float64)
    ref = attnc.compile_attention(spec, backend="reference")
    expected = _error(lambda: ref(q, k, v, rpb=rpb))
    assert "input 'rpb' indexed out of range at a (query, key) pair the pattern attends" in expected
    fx = flex_module(spec, q_tile=16, kv_tile=16)
    assert _error(lambda: fx(q, k, v, rpb=rpb)) == expected
    assert _error(lambda: fx(q, k, v, rpb=rpb)) == expected  # and at every later call


def test_a_bias_index_out_of_range_on_masked_pairs_only_is_checked_once_per_plan(monkeypatch):
    """``rpb[h, q - k + W]`` beside ``abs(q - k) <= W``: out of range on masked pairs only (no error),
    not proven by intervals over the whole matrix, so checked at the plan's first call only."""
    spec = RPB.format(reach="W")
    q, k, v = qkv(2, 2, 40, 8, seed=4)
    rpb = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    # imported here: the other tests also run on a tree without the module (before the fix)
    from attnc.runtime.backends.flex import indices

    calls = []
    real = indices.first_error
    monkeypatch.setattr("attnc.runtime.backends.flex.runner.first_error",
                        lambda *a: calls.append(1) or real(*a))
    fx = compare(spec, q, k, v, {"rpb": rpb}, grad_inputs=("rpb",), q_tile=16, kv_tile=16)
    fx(q, k, v, rpb=rpb)
    assert len(calls) == 1


def test_proven_bias_indices_are_never_checked(monkeypatch):
    """Indices proven in range by intervals (``bias_index_checks``): no check, no host copy."""
    spec = "pattern p\n  tokens seq\n  input w: float[heads, n]\n  mask causal\n  bias w[h, k] + w[h, min(q + 1, n - 1)]\n"
    monkeypatch.setattr("attnc.runtime.backends.flex.runner.first_error", lambda *a: pytest.fail("checked"))
    w = torch.randn(2, 24, dtype=torch.float64, requires_grad=True)
    compare(spec, *qkv(1, 2, 24, 8, seed=5), {"w": w}, grad_inputs=("w",))


@pytest.mark.parametrize("bad_key,raises", [(5, True), (39, False)])
def test_a_bias_index_read_from_an_input_is_checked_on_attended_pairs(bad_key, raises):
    """``w[idx[k]]``: checked at every call; an out-of-range ``idx`` at a key no query attends
    (the last key under ``k < q``) is not an error."""
    spec = ("pattern p\n  tokens seq\n  input idx: int[n]\n  input w: float[heads, 8]\n"
            "  mask k < q and q - k <= 9\n  bias w[h, idx[k]]\n")
    q, k, v = qkv(2, 2, 40, 8, seed=6)
    idx = torch.arange(40) % 8
    idx[bad_key] = 8
    w = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    if not raises:
        compare(spec, q, k, v, {"idx": idx, "w": w}, grad_inputs=("w",), q_tile=16, kv_tile=16)
        return
    expected = _error(lambda: attnc.compile_attention(spec, backend="reference")(q, k, v, idx=idx, w=w))
    fx = flex_module(spec, q_tile=16, kv_tile=16)
    assert _error(lambda: fx(q, k, v, idx=idx, w=w)) == expected
    fine = torch.arange(40) % 8
    fx(q, k, v, idx=fine, w=w)  # the same plan, new inputs: checked again, in range
    assert _error(lambda: fx(q, k, v, idx=idx, w=w)) == expected


def test_bias_indices_on_a_grid_with_box_tiles():
    """Box tiles (Flex positions in tile-major order): the check reads attnc's tiles and names the
    first offending pair in token order, as the reference."""
    spec = ("pattern p\n  tokens grid(y: height, x: width)\n  input rx: float[heads, 5]\n"
            "  mask abs(q.y - k.y) <= 1 and abs(q.x - k.x) <= 2\n  bias rx[h, q.x - k.x + 2] + rx[h, q.y - k.y + {}]\n")
    sizes, tiles = {"height": 6, "width": 7}, {"q_tile": (2, 4), "kv_tile": (2, 4)}
    q, k, v = qkv(1, 2, 42, 8, seed=7)
    rx = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    compare(spec.format(1), q, k, v, {"rx": rx}, grad_inputs=("rx",), sizes=sizes, **tiles)
    bad = spec.format(3)  # q.y - k.y + 3 is 5 where q.y - k.y == 2: attended pairs never reach it
    compare(bad, q, k, v, {"rx": rx}, grad_inputs=("rx",), sizes=sizes, **tiles)
    bad = spec.format(4)  # 5 where q.y - k.y == 1: attended
    expected = _error(lambda: attnc.compile_attention(bad, backend="reference", sizes=sizes)(q, k, v, rx=rx))
    fx = flex_module(bad, sizes=sizes, **tiles)
    assert _error(lambda: fx(q, k, v, rx=rx)) == expected


@pytest.mark.parametrize("topk,raises", [(1, False), (2, True)])
def test_bias_indices_of_a_routed_pattern_are_checked_on_the_selected_blocks(topk, raises):
    """``rpb[h, q - k]`` (8 entries) under ``causal``, routed to blocks of 8 keeping the own block: with
    one block per query only the own block is attended (in range), with two an earlier block is."""
    spec = (f"pattern p\n  tokens seq\n  input rpb: float[heads, 8]\n  mask causal\n"
            f"  route topk({topk}) blocks(8) by q @ mean(k) keep q // 8 == k // 8\n  bias rpb[h, q - k]\n")
    q, k, v = qkv(2, 2, 32, 8, seed=8)
    rpb = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    if not raises:
        compare(spec, q, k, v, {"rpb": rpb}, grad_inputs=("rpb",), q_tile=8, kv_tile=8)
        return
    expected = _error(lambda: attnc.compile_attention(spec, backend="reference")(q, k, v, rpb=rpb))
    fx = flex_module(spec, q_tile=8, kv_tile=8)
    assert _error(lambda: fx(q, k, v, rpb=rpb)) == expected


# ----------------------------------------------------------------- a float mask input that requires grad
def test_a_float_input_read_by_the_mask_may_require_grad():
    """The mask is not differentiated: an input it alone reads gets no gradient, one the bias reads
    too gets the bias's, as on the reference."""
    shared = "pattern p\n  tokens seq\n  input w: float[n]\n  mask w[k] > -0.5 or q == k\n  bias w[k] * w[q]\n"
    w = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).requires_grad_()
    compare(shared, *qkv(1, 2, 20, 8, seed=8), {"w": w}, grad_inputs=("w",))
    spec = "pattern p\n  tokens seq\n  input x: float[n]\n  input w: float[n]\n  mask x[k] > 0 or q == k\n  bias w[k]\n"
    g = torch.Generator().manual_seed(9)
    x = torch.randn(20, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(20, dtype=torch.float64, generator=g).requires_grad_()
    q, k, v = qkv(1, 2, 20, 8, seed=9)
    compare(spec, q, k, v, {"x": x, "w": w}, grad_inputs=("w",))
    for backend in ("reference", "flex"):
        out = attnc.compile_attention(spec, backend=backend)(q, k, v, x=x, w=w)
        (grad,) = torch.autograd.grad(out.sum(), x, allow_unused=True)
        assert grad is None or not grad.any(), backend


# ----------------------------------------------------------------- % of a number by an input
@pytest.mark.parametrize("bias", ["2.5 % d[h, k]", "x[h, k] % d[h, k]", "(q - k) % d[h, k] + x[h, q] % 0.75"])
def test_float_mod_by_an_input_has_the_reference_gradient(bias):
    """REFERENCE.md: ``a % b`` differentiates as ``a - b * (a // b)``."""
    spec = f"pattern p\n  tokens seq\n  input x: float[heads, n]\n  input d: float[heads, n]\n  mask causal\n  bias {bias}\n"
    g = torch.Generator().manual_seed(10)
    x = (3 * torch.randn(2, 24, dtype=torch.float64, generator=g)).requires_grad_()
    d = (torch.rand(2, 24, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    used = [n for n in ("x", "d") if f"{n}[" in bias]
    compare(spec, *qkv(1, 2, 24, 8, seed=10), {"x": x, "d": d}, grad_inputs=used)


# ----------------------------------------------------------------- a non-finite value in v
NAN_SPEC = "pattern p\n  tokens seq\n  mask causal and q - k < 4\n"
N, BAD = 200, 100


def _bad_rows(out):
    return (~torch.isfinite(out)).any(-1)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("gqa", [False, True])
def test_dense_flex_lets_a_bad_value_reach_only_the_queries_that_attend_it(value, dtype, gqa):
    """Flex's dense implementation (CPU calls with gradients, the lse or float64) as the reference: a
    non-finite value row reaches the 4 queries that attend it, not every query; the finite entries
    and the gradients of q, k and v agree (with GQA: 2 query heads read the bad KV head)."""
    q, k, v = qkv(1, 2, N, 8, seed=11, dtype=dtype)
    if gqa:
        q = torch.randn(2, 4, N, 8, generator=torch.Generator().manual_seed(14), dtype=dtype).requires_grad_()
        k, v = (torch.cat([t.detach(), t.detach().flip(2)]).requires_grad_() for t in (k, v))  # batch 2
    with torch.no_grad():
        v[0, 1, BAD, 3] = value
    ref = attnc.compile_attention(NAN_SPEC, backend="reference")
    fx = flex_module(NAN_SPEC)
    o1, o2 = ref(q, k, v), fx(q, k, v)
    assert fx.runner.last_path == "dense"
    assert torch.equal(_bad_rows(o2), _bad_rows(o1)) and int(_bad_rows(o1).sum()) == (8 if gqa else 4)
    tol = TIGHT if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(o2, o1, equal_nan=True, **tol)
    g = torch.randn(o1.shape, generator=torch.Generator().manual_seed(12), dtype=dtype)
    g[_bad_rows(o1)] = 0  # gradients through finite outputs only (a NaN output's gradient is NaN)
    for a, b in zip(torch.autograd.grad((o1 * g).sum(), (q, k, v)), torch.autograd.grad((o2 * g).sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(b, a, equal_nan=True, **tol)


def test_fused_flex_keeps_a_bad_value_out_of_empty_block_pairs():
    """Flex's fused kernel (CPU inference here) as the tiled backends: a NaN value reaches every
    query that attends it and no query whose block pair with it is EMPTY (a visited block's
    weights multiply whole value rows)."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(1, 1, N, 16, generator=g) for _ in range(3))
    v[0, 0, BAD, 3] = math.nan
    ref = attnc.compile_attention(NAN_SPEC, backend="reference")(q, k, v)
    fx = attnc.compile_attention(NAN_SPEC, backend="flex")
    bad = _bad_rows(fx(q, k, v))[0, 0]
    assert fx.runner.last_path == "fused"
    assert bad[_bad_rows(ref)[0, 0]].all()
    sched = fx.runner.last.schedule
    tile = math.prod(sched.q_tile)
    visits = (sched.classes()[0][:, BAD // tile] != 0).repeat_interleave(tile)[:N]
    assert visits.any() and not bad[~visits].any()


@pytest.mark.parametrize("where", ["k", "q", "gate"])
def test_fused_flex_lets_a_nan_score_reach_every_row_that_attends_it(where):
    """Flex's compiled CPU kernel dropped a NaN score from its row: a NaN in k (or in a query, or a NaN FoX gate)
    left the rows that attend it finite and wrong (rows 5-15 of 20 with a NaN key 5; every row with a NaN gate),
    where the reference gives NaN. Through ``auto`` too, which picks this kernel on CPU."""
    g = torch.Generator().manual_seed(15)
    q, k, v = (torch.randn(2, 2, 20, 16, generator=g) for _ in range(3))
    gates = -torch.rand(2, 20, generator=g)
    if where == "gate":
        gates[0, 5] = math.nan
        spec, inputs = "stdlib:forgetting", {"g": gates}
    else:
        (k if where == "k" else q)[0, 0, 5, 0] = math.nan
        spec, inputs = "pattern c\n  tokens seq\n  mask causal\n", {}
    want = attnc.compile_attention(spec, backend="reference")(q.double(), k.double(), v.double(),
                                                               **{n: t.double() for n, t in inputs.items()})
    for backend in ("flex", "auto"):
        attn = attnc.compile_attention(spec, backend=backend)
        got = attn(q, k, v, **inputs)
        if backend == "flex":
            assert attn.runner.last_path == "fused"
        assert torch.equal(_bad_rows(got), _bad_rows(want)), backend
        assert int(_bad_rows(want).sum()) == {"k": 15, "q": 1, "gate": 30}[where]  # (the gate's head, both entries)
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5, equal_nan=True)


def test_flex_backward_takes_smaller_tiles_where_a_captured_tensor_is_differentiated_on_a_gpu():
    """Flex's own backward tiles did not fit the shared memory with a differentiated captured tensor at head
    dim 128 on an H100 (music_relative's table): those calls, and only those, name smaller backward tiles."""
    from attnc.runtime.backends.flex.kernels import BUFFER_GRAD_BACKWARD, kernel_options

    table, fixed = torch.zeros(3, requires_grad=True), torch.zeros(3)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernel_options(cuda, 128, (fixed, table)) == BUFFER_GRAD_BACKWARD
    assert all(k.startswith("bwd_") for k in BUFFER_GRAD_BACKWARD)  # the forward keeps Flex's own choice
    assert kernel_options(cuda, 64, (table,)) is None
    assert kernel_options(cuda, 128, (fixed,)) is None
    assert kernel_options(cpu, 128, (table,)) is None


# ----------------------------------------------------------------- a where of float constants
@pytest.mark.parametrize("clause", [
    "mask window(2, dilation = 2)\n  bias if causal then heads else 0.3",
    # in float32, 0.1 * 3 > 0.3 is false; in float64 (the evaluator's) it is true on the causal pairs
    "mask (if causal then 0.1 else 0.7) * 3 > 0.3",
])
def test_a_where_of_float_constants_is_float64(clause):
    """torch.where(c, 1.0, 0.3) is float32 (torch's default dtype): a branch of float constants alone is
    computed in float64, as the evaluator computes it (differential fuzzing found the bias 1e-8 off)."""
    spec = f"pattern p\n  tokens seq\n  {clause}\n"
    fx = compare(spec, *qkv(2, 1, 33, 8, seed=5), {})
    assert "dtype=torch.float64" in fx.source
