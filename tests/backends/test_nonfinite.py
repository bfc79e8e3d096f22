"""Non-finite inputs (docs/limits.md): a NaN or inf value row reaches every query that attends it, on
every backend; the reference never lets it reach a query that does not attend it; the tiled backends
never let it reach a query whose tile pair with it is EMPTY (a visited tile multiplies whole rows)."""

import math

import pytest
import torch

import attnc

N, TILE, WINDOW, BAD = 64, 16, 4, 37


def _qkv(value):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g) for _ in range(3))
    v[:, :, BAD, 3] = value
    return q, k, v


def _attends_bad():
    mask = attnc.materialize_mask("stdlib:sliding_window", n=N, window=WINDOW)[0]
    return mask[:, BAD]  # [N]: queries that attend the bad key


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_the_reference_lets_a_bad_value_reach_only_the_queries_that_attend_it(value):
    out = attnc.compile_attention("stdlib:sliding_window", backend="reference", window=WINDOW)(*_qkv(value))
    bad_rows = ~torch.isfinite(out).all(-1).all(0).all(0)
    assert torch.equal(bad_rows, _attends_bad())
    assert bad_rows.sum() == WINDOW


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_tiled_backends_keep_a_bad_value_out_of_empty_tiles(backend):
    attn = attnc.compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW, q_tile=TILE, kv_tile=TILE)
    out = attn(*_qkv(math.nan))
    bad_rows = ~torch.isfinite(out).all(-1).all(0).all(0)
    assert bad_rows[_attends_bad()].all()  # every query that attends it
    classes = attn.schedule.classes()[0]  # [q tiles, kv tiles]: 0 EMPTY
    empty_rows = (classes[:, BAD // TILE] == 0).repeat_interleave(TILE)
    assert empty_rows.any() and not bad_rows[empty_rows].any()


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_a_softcap_past_float32s_range_over_float32_inputs_is_applied_not_nan(backend):
    """``softcap 1e39`` (the cpu and reference backends take a constant beyond float32's range: REFERENCE.md):
    over float32 q, k, v the cap would be inf in their dtype, and inf * tanh(s / inf) NaN. The answer and the
    gradients are dense float64 attention's with the softcap applied in float64 (at these scores, the scores)."""
    text = "pattern p\n  mask causal\n  softcap 1e39\n"
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 12, 16, generator=g, requires_grad=True) for _ in range(3))
    out = attnc.compile_attention(text, backend=backend)(q, k, v)
    out.backward(torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2)) / 4.0
    s = 1e39 * torch.tanh(s / 1e39)
    causal = torch.ones(12, 12, dtype=torch.bool).tril()
    want = torch.softmax(s.masked_fill(~causal, -math.inf), -1) @ v64
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------- score terms' inputs read by pairs not attended
_TABLE_SPEC = """pattern p(rows = 31, w = 3)
  tokens seq
  input t: float[heads, rows]
  input s: float[heads]
  mask abs(q - k) <= w
  bias s[h] * t[h, q - k + rows // 2]
"""


def _table_reference(q, k, v, t, s):
    """float64 autograd over the literal rule, reading ``t`` on attended pairs only."""
    n, d = q.shape[-2], q.shape[-1]
    i, j = torch.arange(n).view(n, 1), torch.arange(n).view(1, n)
    allowed = (i - j).abs() <= 3
    read = torch.where(allowed, t[:, i - j + 15], torch.zeros((), dtype=t.dtype))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d) + s.view(-1, 1, 1) * read).masked_fill(~allowed, -math.inf)
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("outside", [-math.inf, math.nan])
def test_a_table_value_read_only_by_pairs_not_attended_reaches_no_gradient(backend, outside):
    # t is -inf (or NaN) at every distance beyond the window: the pairs that read it are masked, their dS is 0,
    # and 0 * (d bias / d s = t) would make ds NaN where the gradient is finite
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    t, s = torch.randn(2, 31, generator=g), torch.tensor([0.5, 2.0])
    t[:, 19:], t[:, :12] = outside, outside
    leaves64 = [x.double().requires_grad_() for x in (q, k, v, t, s)]
    _table_reference(*leaves64).sum().backward()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, t, s)]
    attn = attnc.compile_attention(_TABLE_SPEC, backend=backend, q_tile=None if backend == "reference" else 16)
    attn(*leaves[:3], t=leaves[3], s=leaves[4]).sum().backward()
    for got, want in zip(leaves, leaves64, strict=True):
        expect = want.grad.float()
        if got is leaves[3]:  # entries beyond the window: no gradient at all
            assert torch.equal(got.grad[:, 19:], torch.zeros_like(got.grad[:, 19:]))
        torch.testing.assert_close(got.grad, expect, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_a_bfloat16_tables_gradient_is_summed_in_float32_then_rounded_once(backend):
    # q, k, v in float32, the table in bfloat16: its gradient, a sum over every pair that reads an element,
    # must be the float64 one rounded to bfloat16 (summed in bfloat16, the reference's was 5 ulp off)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g) for _ in range(3))
    spec = "pattern p\n tokens seq\n input t: float[heads, 95]\n mask causal\n bias t[h, q - k + 47]"
    t = (torch.randn(2, 95, generator=g) * 0.5).bfloat16()
    dout = torch.randn(1, 2, 48, 16, generator=g)
    t64 = t.double().requires_grad_()
    i, j = torch.arange(48).view(48, 1), torch.arange(48).view(1, 48)
    scores = (q.double() @ k.double().transpose(-1, -2) / 4 + t64[:, i - j + 47]).masked_fill(j > i, -math.inf)
    (torch.softmax(scores, -1) @ v.double()).backward(dout.double())
    tb = t.clone().requires_grad_()
    attnc.compile_attention(spec, backend=backend)(q, k, v, t=tb).backward(dout)
    assert tb.grad.dtype == torch.bfloat16
    ulp = torch.finfo(torch.bfloat16).eps * t64.grad.abs().clamp(min=2.0 ** -10)
    assert ((tb.grad.double() - t64.grad).abs() <= ulp).all()  # within one unit in the last place


def test_a_softcap_below_float32s_smallest_normal_is_refused_on_triton_where_it_was_nan():
    # s / cap is inf in float32 and the gradient 0 * inf: dq and dk came back NaN (the float64 backends give 0)
    q = torch.randn(1, 2, 12, 8, requires_grad=True)
    with pytest.raises(attnc.SpecError, match="below float32's smallest normal") as err:
        attnc.compile_attention("pattern p\n mask causal\n softcap 1e-39", backend="triton")(q, q, q)
    assert (err.value.pos.line, err.value.pos.col) == (3, 10)
    with pytest.raises(attnc.SpecError, match="below float32's smallest normal") as err:
        attnc.compile_attention(attnc.load("pattern p(c = 1.0)\n mask causal\n softcap c", c=1e-40),
                                backend="triton")(q, q, q)
    assert err.value.where == "parameter c"
    # the cap at float32's smallest normal runs, and so do the float64 backends below it
    out = attnc.compile_attention("pattern p\n mask causal\n softcap 1.2e-38", backend="triton")(q, q, q)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    for backend in ("reference", "cpu"):
        q.grad = None
        attnc.compile_attention("pattern p\n mask causal\n softcap 1e-39", backend=backend)(q, q, q).sum().backward()
        assert torch.isfinite(q.grad).all()
