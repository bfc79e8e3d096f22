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
