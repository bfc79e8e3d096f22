"""``weights F(s) ** P [/ sum]``: attention weights other than softmax. Every function and power, normalised or
not, against the formula in float64 (``F(s) ** P`` of the scores, masked, optionally divided by the row sums),
on every backend, forward and backward (q, k, v and a bias input), queries after a KV cache and the returned lse
(the log of the row's sum of weights); stdlib ``sigmoid`` against a transcription of Apple's code; the clause's
checks and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc

FUNCTIONS = {"exp": torch.exp, "sigmoid": torch.sigmoid, "relu": torch.relu,
             "softplus": lambda x: torch.log1p(torch.exp(x))}


def dense_weights(q, k, v, function, power, normalized, bias, allowed, scale):
    """out and lse of weights F(s) ** P over the allowed pairs, from the formula (float64)."""
    s = scale * (q @ k.transpose(-1, -2)) + bias
    w = torch.where(allowed, FUNCTIONS[function](s) ** power, torch.zeros((), dtype=s.dtype))
    total = w.sum(-1)
    if normalized:
        w = w / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    return w @ v, torch.log(total)


def _source(function, power, normalized):
    return ("pattern w\n  tokens seq\n  input b: float[heads, n]\n  mask k <= q and q - k < 9\n  bias b[h, k]\n"
            f"  weights {function}(s) ** {power}" + (" / sum" if normalized else "") + "\n")


CASES = [("sigmoid", 1, False), ("relu", 2, False), ("softplus", 3, True), ("exp", 1, False), ("sigmoid", 2.5, True),
         ("relu", 1, True), ("softplus", 0.5, False)]


def _inputs(seed, B=2, H=4, Hkv=2, N=29, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v, torch.randn(H, N, generator=g, dtype=torch.float64) * 0.5


def _reference(q, k, v, b, function, power, normalized, scale, rows=None):
    N = k.shape[2]
    pos = torch.arange(N)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 9)
    kk, vv = (x.repeat_interleave(q.shape[1] // x.shape[1], 1) for x in (k, v))
    out, lse = dense_weights(q, kk, vv, function, power, normalized, b[None, :, None, :], allowed, scale)
    return (out, lse) if rows is None else (out[:, :, -rows:], lse[:, :, -rows:])


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
@pytest.mark.parametrize("function,power,normalized", CASES)
def test_every_backend_matches_the_formula_forward_and_backward(backend, function, power, normalized):
    q, k, v, b = _inputs(sum(map(ord, function)) + int(power * 10))
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    ref = [x.clone().requires_grad_() for x in (q, k, v, b)]
    mine = [x.detach().to(dtype).requires_grad_() for x in ref]
    want, want_lse = _reference(*ref, function, power, normalized, 0.4)
    attn = attnc.compile_attention(_source(function, power, normalized), backend=backend)
    out, lse = attn(*mine[:3], b=mine[3], scale=0.4, return_lse=True)
    torch.testing.assert_close(out.double(), want, **tol)
    torch.testing.assert_close(lse.double(), want_lse, **tol)
    g = torch.Generator().manual_seed(1)
    dout, dlse = torch.randn(want.shape, generator=g, dtype=torch.float64), torch.randn(want_lse.shape, generator=g,
                                                                                       dtype=torch.float64)
    finite = torch.isfinite(want_lse)  # a relu row of no positive score: lse -inf, no gradient through it
    ((want * dout).sum() + (torch.where(finite, want_lse, 0) * dlse).sum()).backward()
    ((out.double() * dout).sum() + (torch.where(finite, lse.double(), 0) * dlse).sum()).backward()
    for name, a, r in zip(("q", "k", "v", "b"), mine, ref, strict=True):
        torch.testing.assert_close(a.grad.double(), r.grad, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_softplus_far_below_zero_keeps_its_digits_and_gradients(backend):
    """Scores from about -90 to 90 (scale 12): softplus(s) below s = -17 is e^s to float32's rounding, and its
    logarithm and derivative stay finite (the kernels' log(1 + e^s) was 0 there: a weight of 0 and NaN gradients)."""
    q, k, v, b = _inputs(3)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    ref = [x.clone().requires_grad_() for x in (q, k, v, b)]
    mine = [x.detach().to(dtype).requires_grad_() for x in ref]
    want, _ = _reference(*ref, "softplus", 2, True, 12.0)
    assert float((12.0 * (q @ k.repeat_interleave(2, 1).transpose(-1, -2))).min()) < -80
    out = attnc.compile_attention(_source("softplus", 2, True), backend=backend)(*mine[:3], b=mine[3], scale=12.0)
    torch.testing.assert_close(out.double(), want, **tol)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (want * dout).sum().backward()
    (out.double() * dout).sum().backward()
    for name, a, r in zip(("q", "k", "v", "b"), mine, ref, strict=True):
        torch.testing.assert_close(a.grad.double(), r.grad, **tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_queries_after_a_kv_cache(backend):
    q, k, v, b = _inputs(3)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-11)
    for function, power, normalized in [("sigmoid", 1, False), ("softplus", 2, True)]:
        attn = attnc.compile_attention(_source(function, power, normalized), backend=backend)
        out = attn(q[:, :, -3:].to(dtype), k.to(dtype), v.to(dtype), b=b.to(dtype), scale=0.4)
        want, _ = _reference(q, k, v, b, function, power, normalized, 0.4, rows=3)
        torch.testing.assert_close(out.double(), want, **tol)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.sampled_from(sorted(FUNCTIONS)), st.floats(0.25, 4.0), st.booleans(), st.integers(1, 30),
       st.floats(0.05, 3.0), st.integers(0, 10**6))
def test_the_reference_is_the_formula_on_random_inputs(function, power, normalized, N, scale, seed):
    """Scores spread wide (scale up to 3 on unit vectors of 8): the logarithms' stable forms at large |s|."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    src = f"pattern w\n  tokens seq\n  mask k <= q\n  weights {function}(s) ** {power!r}" + (" / sum" if normalized else "")
    out, lse = attnc.compile_attention(src, backend="reference")(q, k, v, scale=scale, return_lse=True)
    allowed = torch.ones(N, N, dtype=torch.bool).tril()
    want, want_lse = dense_weights(q, k, v, function, power, normalized, 0.0, allowed, scale)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_a_relu_row_of_no_positive_score_outputs_zero():
    q = torch.ones(1, 1, 4, 2, dtype=torch.float64)
    k = -torch.ones(1, 1, 4, 2, dtype=torch.float64)
    v = torch.randn(1, 1, 4, 2, dtype=torch.float64)
    for backend in ("reference", "cpu", "flex", "triton"):
        attn = attnc.compile_attention("pattern r\n  tokens seq\n  weights relu(s) ** 2 / sum", backend=backend)
        dtype = torch.float32 if backend == "triton" else torch.float64
        out, lse = attn(q.to(dtype), k.to(dtype), v.to(dtype), return_lse=True)
        assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all()), backend


# ----------------------------------------------------------------- stdlib sigmoid: Apple's code
def apple_sigmoid_attention(q, k, v, mask, attn_bias, temp=0.0):
    """``Attention.forward`` of apple/ml-sigmoid-attention (9273b493) from q, k, v on: q scaled by head_dim^-1/2,
    q @ k^T, masked logits filled with -finfo.max (``softmax_masking_fn``), times exp(temp), plus attn_bias,
    ``unnormalized_sigmoid_attention`` (sigmoid), @ v."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        attn = attn.masked_fill(~mask, -torch.finfo(attn.dtype).max)
    attn = attn * math.exp(temp) + attn_bias
    return torch.sigmoid(attn) @ v


@settings(max_examples=10, deadline=None, derandomize=True)
@given(st.integers(1, 40), st.integers(1, 4096), st.booleans(), st.integers(0, 10**6))
def test_sigmoid_matches_apples_code(N, length, causal, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, N, 16, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(N, N, dtype=torch.bool).tril() if causal else None
    want = apple_sigmoid_attention(q, k, v, mask, -math.log(length))
    attn = attnc.compile_attention("stdlib:sigmoid", length=length, is_causal=causal, backend="reference")
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_sigmoid_temperature_is_a_scale():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    want = apple_sigmoid_attention(q, k, v, None, -math.log(64), temp=0.3)
    attn = attnc.compile_attention("stdlib:sigmoid", length=64, backend="cpu")
    torch.testing.assert_close(attn(q, k, v, scale=8 ** -0.5 * math.exp(0.3)), want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------- the clause's checks
@pytest.mark.parametrize("clause,message,col", [
    ("weights relu(s) ** 0", "must be positive, got 0", 22),
    ("weights relu(s) ** -1", "must be positive", 22),
    ("weights tanh(s)", "'tanh' is not a weight function", 11),
    ("weights sigmoid(q)", "takes the score 's'", 11),
    ("weights relu(s) ** q", "must not depend on q", 22),
    ("weights sigmoid(s) / total", "is not a weight function", 11),
])
def test_bad_weights_are_refused_with_their_place(clause, message, col):
    with pytest.raises(attnc.SpecError, match=message) as err:
        attnc.load("pattern p\n  tokens seq\n  mask causal\n  " + clause)
    assert (err.value.pos.line, err.value.pos.col) == (4, col)


def test_softmax_written_out_is_the_default():
    plain = attnc.load("pattern p\n  tokens seq\n  mask causal")
    written = attnc.load("pattern p\n  tokens seq\n  mask causal\n  weights exp(s) / sum")
    assert written == plain and written.key() == plain.key()


@pytest.mark.parametrize("source,message", [
    ("pattern a\n  tokens seq\n  input g: float[heads, n]\n  branch x\n    mask causal\n    weights sigmoid(s)\n"
     "  combine g * x", "not taken in a combined pattern"),
    ("pattern b(clusters = 2)\n  tokens seq\n  input centroids: float[heads, clusters, dk]\n  weights sigmoid(s)\n"
     "  route buckets(2) by nearest(centroids)", "takes a mask only"),
    ("recurrence r\n  tokens seq\n  weights sigmoid(s)", "not allowed in a recurrence"),
])
def test_weights_are_refused_where_they_are_not_built(source, message):
    with pytest.raises(attnc.SpecError, match=message):
        attnc.load(source)
