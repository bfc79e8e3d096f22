"""Decay gates (issue 9, items 2.4 and 2.7): a log gate of -inf is a hard reset (weight exactly 0, forward
and backward, never NaN) for FoX decay (softmax patterns) and for chunked recurrences; the decay stays at
float32 rounding at any length (prefix sums split hi + lo, in-chunk spans exact). Everything is compared
with independent naive float64 loops (a per-pair sum of the gates; the step-by-step recurrence)."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.runtime.numerics import fox_decay

F64 = torch.float64
INF = math.inf
# the interpreter evaluates both branches of tl.where (e.g. -inf * 0 in an unselected branch), as numpy
pytestmark = pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")

STRICT = "pattern strict\n  input g: float[heads, n]\n  mask k < q\n  decay g\n"  # no diagonal: rows can empty


# ----------------------------------------------------------------- independent references
def naive_fox(q, k, v, g, strict: bool, scale: float):
    """Softmax attention with FoX decay by loops in float64: the decay of (q, k) is the plain sum
    ``g[h, k+1 .. q]`` (a -inf gate in the span makes it -inf, i.e. weight 0); a row with no key of
    nonzero weight gives 0 and lse -inf. Differentiable in q, k, v, g."""
    n = q.shape[2]
    q, k, v, g = q.to(F64), k.to(F64), v.to(F64), g.to(F64)
    zero = torch.zeros(g.shape[:-1], dtype=F64)
    rows = []
    for i in range(n):
        rows.append(torch.stack([g[..., j + 1:i + 1].sum(-1) if j <= i else zero for j in range(n)], -1))
    decay = torch.stack(rows, -2)  # [H, n, n]
    allowed = torch.ones(n, n, dtype=torch.bool).tril(-1 if strict else 0)
    s = (scale * q @ k.transpose(-1, -2) + decay).masked_fill(~allowed, -INF)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    out = (e @ v) / torch.where(den == 0, torch.ones_like(den), den)
    lse = torch.where(den == 0, -INF, m + torch.log(den)).squeeze(-1)
    return out, lse


def naive_recurrence(q, k, v, g4, scale: float, S0=None):
    """``S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t`` step by step in float64."""
    B, H, T, Dk = q.shape
    q, k, v, g4 = q.to(F64), k.to(F64), v.to(F64), g4.to(F64)
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=F64) if S0 is None else S0.to(F64)
    outs = []
    for t in range(T):
        S = torch.exp(g4[:, :, t]).unsqueeze(-1) * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append(scale * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    return torch.stack(outs, 2), S


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def _fox_inputs(n, H, D, dtype, seed, resets):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, n, D, generator=gen, dtype=F64).to(dtype) for _ in range(3))
    g = torch.nn.functional.logsigmoid(2 * torch.randn(H, n, generator=gen, dtype=F64)).to(dtype)
    for h, t in resets:
        g[h, t] = -INF
    return q, k, v, g


# ----------------------------------------------------------------- FoX: -inf gates
@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "flex"])
def test_fox_reset_gate_weight_zero(backend, strict):
    # resets at the first token, two in a row, mid-sequence and the last token; with a strict mask a reset
    # at the query itself leaves it no key of nonzero weight (out 0, lse -inf)
    n = 24 if backend == "triton" else 40
    dtype = torch.float32 if backend == "triton" else F64
    q, k, v, g = _fox_inputs(n, 2, 8, dtype, 0, [(0, 0), (0, 5), (0, 6), (1, 11), (1, n - 1), (0, 17)])
    w = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    spec = STRICT if strict else "stdlib:forgetting"
    lq, lk, lv, lg = _leaves(q, k, v, g)
    out, lse = attnc.compile_attention(spec, backend=backend)(lq, lk, lv, g=lg, return_lse=True)
    got = torch.autograd.grad((out.to(F64) * w).sum(), (lq, lk, lv, lg))
    rq, rk, rv, rg = _leaves(q.to(F64), k.to(F64), v.to(F64), g.to(F64))
    want, want_lse = naive_fox(rq, rk, rv, rg, strict, 8 ** -0.5)
    ref = torch.autograd.grad((want * w).sum(), (rq, rk, rv, rg))
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in got)
    torch.testing.assert_close(out.to(F64), want, atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))
    fin = torch.isfinite(want_lse)
    torch.testing.assert_close(lse.to(F64)[fin], want_lse[fin], atol=tol, rtol=tol)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.to(F64), b, atol=tol, rtol=tol)
    assert torch.all(got[3][torch.isneginf(g)] == 0)  # the limit as the gate goes to -inf


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "flex"])
@pytest.mark.parametrize("big", [-1e16, float(torch.finfo(torch.float32).min)])
def test_fox_finite_gates_far_below_any_score_weigh_as_resets_do(backend, big):
    # a gate of -1e16 took the decay of the keys on one side of it into its sum's rounding (0.94 off), and two of
    # float32's lowest overflowed the prefix sum to -inf (NaN rows): every backend, the reference too
    n = 24
    dtype = torch.float32 if backend == "triton" else F64
    q, k, v, g = _fox_inputs(n, 2, 8, dtype, 3, [])
    for h, t in ((0, 2), (0, 7), (1, 13)):
        g[h, t] = big
    w = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    lq, lk, lv, lg = _leaves(q, k, v, g)
    out = attnc.compile_attention("stdlib:forgetting", backend=backend)(lq, lk, lv, g=lg)
    got = torch.autograd.grad((out.to(F64) * w).sum(), (lq, lk, lv, lg))
    rq, rk, rv, rg = _leaves(q.to(F64), k.to(F64), v.to(F64), g.to(F64))
    want, _ = naive_fox(rq, rk, rv, rg, False, 8 ** -0.5)  # each pair's own sum: exact on either side
    ref = torch.autograd.grad((want * w).sum(), (rq, rk, rv, rg))
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.to(F64), want, atol=tol, rtol=tol)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.to(F64), b, atol=tol, rtol=tol)
    assert torch.all(got[3][g == big] == 0)


# ----------------------------------------------------------------- FoX: precision with length
@pytest.mark.parametrize("resets", [False, True], ids=["logsigmoid", "resets-1e4"])
def test_fox_decay_term_float32_rounding_at_32k(resets):
    # the decay term itself at n = 32768 against float64 sums of the same fp32 gates, on the pairs
    # nearest the end (largest prefix sums): a plain fp32 cumsum difference is off by 3.5e-3 (4e-1 with
    # resets of -1e4 every 64 tokens)
    n = 32768
    gen = torch.Generator().manual_seed(2)
    g = torch.nn.functional.logsigmoid(2 * torch.randn(2, n, generator=gen))
    if resets:
        g[:, ::64] = -1e4
    qi, ki = torch.arange(n - 200, n), torch.arange(n - 400, n)
    got = fox_decay(g, qi, ki)[0].to(F64)
    c = torch.cumsum(g.to(F64), -1)
    want = c[:, qi, None] - c[:, None, ki]
    keep = (ki[None, :] <= qi[:, None]).expand_as(want)
    err = (got - want).abs()[keep]
    assert (err / want.abs()[keep].clamp(min=1)).max() <= 1e-6  # fp32 rounding of the term's own size
    assert (got.exp() - want.exp()).abs()[keep].max() <= 1e-6  # the weights: <= 1e-5 asked, 2e-8 seen


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_fox_attention_float32_accuracy_long(backend):
    # fp32 inputs at n = 2048 with gates of -1e4 every 64 tokens (prefix sums near -3e5): against the
    # float64 reference; fp32 cumsum differences gave errors of ~1e-2 here
    n, D = 2048, 16
    q, k, v, g = _fox_inputs(n, 1, D, torch.float32, 3, [])
    g[:, ::64] = -1e4
    out = attnc.compile_attention("stdlib:forgetting", backend=backend)(q, k, v, g=g)
    want = attnc.compile_attention("stdlib:forgetting", backend="reference")(q.to(F64), k.to(F64), v.to(F64),
                                                                             g=g.to(F64))
    torch.testing.assert_close(out.to(F64), want, atol=1e-5, rtol=1e-5)


@pytest.mark.versions
def test_fox_triton_float32_accuracy_large_gates():
    # the same effect at interpreter size: gates of -1e4 every 8 tokens put the prefix sums near -8e4
    n = 64
    q, k, v, g = _fox_inputs(n, 2, 8, torch.float32, 4, [])
    g[:, 3::8] = -1e4
    w = torch.randn(1, 2, n, 8, generator=torch.Generator().manual_seed(5), dtype=F64)
    lq, lk, lv, lg = _leaves(q, k, v, g)
    out = attnc.compile_attention("stdlib:forgetting", backend="triton")(lq, lk, lv, g=lg)
    got = torch.autograd.grad((out.to(F64) * w).sum(), (lq, lk, lv, lg))
    rq, rk, rv, rg = _leaves(q.to(F64), k.to(F64), v.to(F64), g.to(F64))
    want = attnc.compile_attention("stdlib:forgetting", backend="reference")(rq, rk, rv, g=rg)
    ref = torch.autograd.grad((want * w).sum(), (rq, rk, rv, rg))
    torch.testing.assert_close(out.to(F64), want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.to(F64), b, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------- recurrences
HEAD_RESET = "recurrence rr\n  decay log(1 - 2 ** (-h))\n"  # head 0: log(0) = -inf, a reset at every step


def _rec_case(kind, B, H, T, D, dtype, seed, gate_fn):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=F64).to(dtype) for _ in range(3))
    S0 = torch.randn(B, H, D, D, generator=gen, dtype=F64).to(dtype)
    if kind == "head":
        return "stdlib:retention", q, k, v, S0, None
    shape = (H, T) if kind == "scalar" else (H, T, D)
    g = gate_fn(torch.nn.functional.logsigmoid(2 * torch.randn(*shape, generator=gen, dtype=F64))).to(dtype)
    return ("stdlib:mamba2" if kind == "scalar" else "stdlib:gla"), q, k, v, S0, g


def _g4(spec, g, B, H, T, D):
    if g is None:  # HEAD_RESET: log(1 - 2^-h)
        logs = torch.tensor([math.log(1 - 2.0 ** -h) if h else -INF for h in range(H)], dtype=F64)
        return logs.view(1, H, 1, 1).expand(B, H, T, D)
    g = g.to(F64)
    g = g.unsqueeze(-1) if g.dim() == 2 else g
    return g.unsqueeze(0).expand(B, H, T, D)


def _check_recurrence(spec, q, k, v, S0, g, backend, tol, C=None):
    B, H, T, D = q.shape
    leaves = _leaves(q, k, v, S0) + ([] if g is None else _leaves(g))
    gates = {} if g is None else {"g": leaves[4]}
    out, fin = attnc.compile_attention(spec, backend=backend, q_tile=C)(*leaves[:3], initial_state=leaves[3],
                                                                        return_state=True, **gates)
    wo = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    ws = torch.randn(fin.shape, generator=torch.Generator().manual_seed(8), dtype=F64)
    got = torch.autograd.grad((out.to(F64) * wo).sum() + (fin.to(F64) * ws).sum(), leaves)
    refs = _leaves(*(x.to(F64) for x in (q, k, v, S0))) + ([] if g is None else _leaves(g.to(F64)))
    want, want_fin = naive_recurrence(*refs[:3], _g4(spec, refs[4] if g is not None else None, B, H, T, D),
                                      D ** -0.5, refs[3])
    ref = torch.autograd.grad((want * wo).sum() + (want_fin * ws).sum(), refs)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in got)
    torch.testing.assert_close(out.to(F64), want, atol=tol, rtol=tol)
    torch.testing.assert_close(fin.to(F64), want_fin, atol=tol, rtol=tol)
    for a, b in zip(got, ref, strict=True):
        # relative to the gradient's scale: the gate gradient is a reverse sum over the sequence of terms
        # that cancel (q dq - k dk), so its fp32 rounding is that of the terms, not of the result
        torch.testing.assert_close(a.to(F64), b, atol=tol * max(1.0, float(b.abs().max())), rtol=tol)
    if g is not None:
        assert torch.all(got[4][torch.isneginf(g)] == 0)  # the limit as the gate goes to -inf


def _with_resets(g):
    g = g.clone()
    g[0, 0] = g[0, 5] = g[0, 6] = g[1, 20] = g[1, -1] = -INF  # first, consecutive, mid-chunk, last
    return g


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_recurrence_reset_gates_weight_zero(backend, kind):
    dtype = torch.float32 if backend == "triton" else F64
    spec, q, k, v, S0, g = _rec_case(kind, 1, 2, 37, 8, dtype, 10, _with_resets)
    _check_recurrence(spec, q, k, v, S0, g, backend, 2e-5 if dtype == torch.float32 else 1e-9, C=16)


@pytest.mark.versions
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_recurrence_head_gate_of_minus_inf(backend):
    # a constant head gate of -inf (log(1 - 2^-h) at h = 0): the state keeps only the current token
    dtype = torch.float32 if backend == "triton" else F64
    _, q, k, v, S0, _ = _rec_case("head", 1, 2, 21, 8, dtype, 11, None)
    _check_recurrence(HEAD_RESET, q, k, v, S0, None, backend, 2e-5 if dtype == torch.float32 else 1e-9, C=16)


@pytest.mark.parametrize("kind", ["scalar", "vector"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_recurrence_large_gate_inside_chunk_float32(backend, kind):
    # gates of -1e4 inside chunks (fp32): in-chunk spans used to lose eps * 1e4 (2.8e-4 and worse);
    # small gates after them so the states keep attending across many tokens
    def gates(g):
        g = g * 0.05
        g[:, 3::32] = -1e4
        return g

    spec, q, k, v, S0, g = _rec_case(kind, 1, 2, 80, 16, torch.float32, 12, gates)
    _check_recurrence(spec, q, k, v, S0, g, backend, 1e-5, C=32 if kind == "scalar" else 16)
