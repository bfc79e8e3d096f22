"""The reference backend against dense torch computations written here.

Every expected value below is computed independently of attnc: masks from
explicit position arithmetic, softmax attention as plain float64 torch,
routing by a per-query Python selection that follows spec/REFERENCE.md's ``route`` section,
recurrences in closed form ((Q K^T) * D) V or by an explicit loop.
Inputs are random (never zeros); truth is float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc

F64 = torch.float64
TIGHT = {"rtol": 1e-9, "atol": 1e-10}
GRAD = {"rtol": 1e-8, "atol": 1e-9}

_COMPILED: dict = {}


def compiled(text: str, **kw) -> attnc.Attention:
    key = (text, tuple(sorted((k, repr(v)) for k, v in kw.items())))
    if key not in _COMPILED:
        _COMPILED[key] = attnc.compile_attention(text, backend="reference", **kw)
    return _COMPILED[key]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g, *shape, dtype=F64, scale=1.0, grad=False):
    x = (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)
    return x.requires_grad_(grad)


def qkv(g, B, Hq, Hkv, Nq, Nk, D, Dv=None, dtype=F64, scale=1.0, grad=False):
    Dv = D if Dv is None else Dv
    return (
        randn(g, B, Hq, Nq, D, dtype=dtype, scale=scale, grad=grad),
        randn(g, B, Hkv, Nk, D, dtype=dtype, scale=scale, grad=grad),
        randn(g, B, Hkv, Nk, Dv, dtype=dtype, scale=scale, grad=grad),
    )


def log_gates(g, *shape, grad=False):
    """Log forget gates in (-3, -0.02): random, never zero."""
    x = -(0.02 + 3 * torch.rand(*shape, generator=g, dtype=F64))
    return x.requires_grad_(grad)


# ----------------------------------------------------------------- dense truth
def kv_of_head(Hq: int, Hkv: int) -> torch.Tensor:
    """GQA: query head h reads key/value head h // (Hq // Hkv)."""
    return torch.tensor([h // (Hq // Hkv) for h in range(Hq)])


def dense(q, k, v, mask, *, scale=None, bias=None, softcap=None):
    """softmax(scale q.k -> softcap + bias, masked) @ v in float64; (out, lse).

    A row with no allowed key gives 0 and lse -inf; differentiable everywhere
    (masked entries are replaced, not subtracted from)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    Hq, D = q.shape[1], q.shape[-1]
    heads = kv_of_head(Hq, k.shape[1])
    k, v = k[:, heads], v[:, heads]
    scale = D**-0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    mask = torch.broadcast_to(mask, s.shape)
    rows = mask.any(-1)
    s_safe = torch.where(mask, s, torch.full_like(s, -1e300))
    p = torch.softmax(s_safe, dim=-1) * rows[..., None]
    out = torch.einsum("bhqk,bhkd->bhqd", p, v)
    lse = torch.where(
        rows, torch.logsumexp(s_safe, dim=-1), torch.full_like(rows, -math.inf, dtype=F64)
    )
    return out, lse


def causal_mask(Nq: int, Nk: int | None = None) -> torch.Tensor:
    Nk = Nq if Nk is None else Nk
    return torch.tensor([[kk <= qq for kk in range(Nk)] for qq in range(Nq)])


def fox_term(gates: torch.Tensor, N: int) -> torch.Tensor:
    """sum(g[h, k+1 .. q]) as [B|1, H, N, N] via an explicit indicator (no cumsum)."""
    ind = torch.zeros(N, N, N, dtype=F64)
    for qq in range(N):
        for kk in range(qq + 1):
            ind[qq, kk, kk + 1 : qq + 1] = 1.0
    if gates.dim() == 2:
        gates = gates.unsqueeze(0)
    return torch.einsum("bhj,qkj->bhqk", gates, ind)


def alibi_bias(H: int, N: int) -> torch.Tensor:
    slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=F64)
    dist = torch.tensor([[qq - kk for kk in range(N)] for qq in range(N)], dtype=F64)
    return (-slopes.view(H, 1, 1) * dist).unsqueeze(0)


def loss_of(out, lse=None, seed=99):
    """A random linear functional of out (and of the finite part of lse)."""
    g = gen(seed)
    w = torch.randn(out.shape, generator=g, dtype=F64)
    total = (out.to(F64) * w).sum()
    if lse is not None:
        wl = torch.randn(lse.shape, generator=g, dtype=F64)
        total = (
            total
            + (torch.where(torch.isfinite(lse), lse.to(F64), torch.zeros((), dtype=F64)) * wl).sum()
        )
    return total


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=False)


def assert_grads_match(tensors, run_attnc, run_ref, tol=GRAD):
    """Compare gradients of the same random loss through attnc and the reference."""
    got = grads(loss_of(*run_attnc()), tensors)
    want = grads(loss_of(*run_ref()), tensors)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.to(F64), b, **tol)


CAUSAL = "pattern p\n  tokens seq\n  mask causal\n"
ALIBI = (
    "pattern alibi\n  tokens seq\n  mask causal\n  bias -(2 ** (-8 * (h + 1) / heads)) * (q - k)\n"
)
FOX = "pattern fox\n  tokens seq\n  input g: float[heads, n]\n  mask causal\n  decay g\n"
DOCS = "pattern docs\n  tokens seq\n  input doc: int[n]\n  mask causal and doc[q] == doc[k]\n"
DENSE_MASK = "pattern dm\n  tokens seq\n  input m: int[n, n]\n  mask m[q, k] != 0\n"
HEAD_MASK = "pattern hm\n  tokens seq\n  input m: int[heads, n, n]\n  mask m[h, q, k] != 0\n"


# ----------------------------------------------------------------- forward: masks
@pytest.mark.parametrize(
    "B,Hq,Hkv,N,D,Dv", [(2, 3, 3, 13, 8, 8), (1, 4, 2, 17, 16, 5), (2, 4, 1, 9, 4, 6)]
)
def test_causal(B, Hq, Hkv, N, D, Dv):
    q, k, v = qkv(gen(N), B, Hq, Hkv, N, N, D, Dv)
    out, lse = compiled(CAUSAL)(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, causal_mask(N))
    assert out.shape == (B, Hq, N, Dv) and out.dtype == F64
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    # lse really is the log-sum-exp of the masked, scaled scores
    s = (q[0, 0] @ k[0, 0].T) / math.sqrt(D)
    row = N - 1
    assert (
        abs(float(lse[0, 0, row]) - math.log(sum(math.exp(float(s[row, j])) for j in range(N))))
        < 1e-10
    )
    assert abs(float(lse[0, 0, 0]) - float(s[0, 0])) < 1e-12
    plain = compiled(CAUSAL)(q, k, v)
    torch.testing.assert_close(plain, out, rtol=0, atol=0)


def test_spec_mask_vs_position_arithmetic():
    """A mask written as spec text vs the same rule evaluated on Python ints."""
    text = (
        "pattern p(w = 3, s = 2)\n  tokens seq\n  let d = q - k\n"
        "  mask causal and (d < w or k < s or (q + k) % 5 == 0 or is_pow2(d))\n"
    )
    N = 21
    want_mask = torch.tensor(
        [
            [
                kk <= qq
                and (
                    qq - kk < 3
                    or kk < 2
                    or (qq + kk) % 5 == 0
                    or (qq - kk > 0 and (qq - kk) & (qq - kk - 1) == 0)
                )
                for kk in range(N)
            ]
            for qq in range(N)
        ]
    )
    got_mask = attnc.materialize_mask(text, n=N, heads=2)
    assert torch.equal(got_mask, want_mask.expand(2, N, N))
    q, k, v = qkv(gen(1), 2, 2, 2, N, N, 8)
    torch.testing.assert_close(compiled(text)(q, k, v), dense(q, k, v, want_mask)[0], **TIGHT)


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(1, 12),
    B=st.integers(1, 3),
    batched=st.booleans(),
    density=st.floats(0.05, 0.95),
)
def test_dense_boolean_mask_input(seed, N, B, batched, density):
    """A mask given as a dense int tensor computed here, with and without a batch dim."""
    g = gen(seed)
    shape = (B, N, N) if batched else (N, N)
    m = (torch.rand(*shape, generator=g) < density).to(torch.int32) * torch.randint(
        1, 5, shape, generator=g, dtype=torch.int32
    )
    q, k, v = qkv(g, B, 2, 2, N, N, 4, 3)
    out, lse = compiled(DENSE_MASK)(q, k, v, m=m, return_lse=True)
    mask = (m != 0).unsqueeze(-3) if batched else (m != 0)
    want, want_lse = dense(q, k, v, mask)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()


def test_head_dependent_dense_mask_and_gqa():
    g = gen(7)
    B, Hq, Hkv, N = 2, 4, 2, 11
    m = (torch.rand(Hq, N, N, generator=g) < 0.5).to(torch.int64)
    q, k, v = qkv(g, B, Hq, Hkv, N, N, 8, grad=True)
    mask = (m != 0).unsqueeze(0)
    out = compiled(HEAD_MASK)(q, k, v, m=m)
    torch.testing.assert_close(out, dense(q, k, v, mask)[0], **TIGHT)
    assert_grads_match(
        (q, k, v), lambda: (compiled(HEAD_MASK)(q, k, v, m=m),), lambda: (dense(q, k, v, mask)[0],)
    )


@pytest.mark.parametrize("batched", [False, True])
def test_document_ids(batched):
    g = gen(3)
    B, H, N = 3, 2, 16
    if batched:
        doc = torch.sort(torch.randint(0, 4, (B, N), generator=g), dim=-1).values
        mask = causal_mask(N) & (doc[:, :, None] == doc[:, None, :])
        mask = mask.unsqueeze(1)
    else:
        doc = torch.sort(torch.randint(0, 4, (N,), generator=g)).values
        mask = causal_mask(N) & (doc[:, None] == doc[None, :])
    q, k, v = qkv(g, B, H, H, N, N, 8, grad=True)
    out, lse = compiled(DOCS)(q, k, v, doc=doc, return_lse=True)
    want, want_lse = dense(q, k, v, mask)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    if batched:  # the batches really differ: a shared doc would give another answer
        other = dense(q, k, v, causal_mask(N) & (doc[0][:, None] == doc[0][None, :]))[0]
        assert not torch.allclose(out[1:], other[1:]) or torch.equal(
            doc[1:], doc[:1].expand(B - 1, N)
        )
    assert_grads_match(
        (q, k, v),
        lambda: compiled(DOCS)(q, k, v, doc=doc, return_lse=True),
        lambda: dense(q, k, v, mask),
    )


def test_int_input_accepts_int32():
    g = gen(4)
    N = 10
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3], dtype=torch.int32)
    q, k, v = qkv(g, 1, 2, 2, N, N, 4)
    mask = causal_mask(N) & (doc[:, None] == doc[None, :])
    torch.testing.assert_close(compiled(DOCS)(q, k, v, doc=doc), dense(q, k, v, mask)[0], **TIGHT)


# ----------------------------------------------------------------- forward: score terms
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_alibi_bias_gqa(Hq, Hkv):
    B, N, D = 2, 14, 8
    q, k, v = qkv(gen(Hkv), B, Hq, Hkv, N, N, D, grad=True)
    bias = alibi_bias(Hq, N)
    out, lse = compiled(ALIBI)(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, causal_mask(N), bias=bias)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    # the head mapping matters: reading kv head h % Hkv instead would differ
    if Hkv not in (1, Hq):
        wrong = dense(
            q, k[:, torch.arange(Hq) % Hkv], v[:, torch.arange(Hq) % Hkv], causal_mask(N), bias=bias
        )[0]
        assert not torch.allclose(out, wrong)
    assert_grads_match(
        (q, k, v),
        lambda: compiled(ALIBI)(q, k, v, return_lse=True),
        lambda: dense(q, k, v, causal_mask(N), bias=bias),
    )


def test_float_input_in_bias_and_its_gradient():
    text = (
        "pattern sb\n  tokens seq\n  input slope: float[heads]\n  input pos: float[n]\n"
        "  mask causal\n  bias -slope[h] * (q - k) + pos[k]\n"
    )
    g = gen(5)
    B, H, N = 2, 3, 9
    q, k, v = qkv(g, B, H, H, N, N, 4, grad=True)
    slope = (0.1 + torch.rand(H, generator=g, dtype=F64)).requires_grad_()
    pos = randn(g, N, grad=True)

    def ref_bias():
        dist = torch.tensor([[qq - kk for kk in range(N)] for qq in range(N)], dtype=F64)
        return -slope.view(1, H, 1, 1) * dist + pos.view(1, 1, 1, N)

    attn = compiled(text)
    torch.testing.assert_close(
        attn(q, k, v, slope=slope, pos=pos),
        dense(q, k, v, causal_mask(N), bias=ref_bias())[0],
        **TIGHT,
    )
    assert_grads_match(
        (q, k, v, slope, pos),
        lambda: attn(q, k, v, slope=slope, pos=pos, return_lse=True),
        lambda: dense(q, k, v, causal_mask(N), bias=ref_bias()),
    )
    small = [t.detach()[:1, :, :4].clone().requires_grad_() for t in (q, k, v)]
    sl, ps = slope.detach().clone().requires_grad_(), pos.detach()[:4].clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c, s, p: attn(a, b, c, slope=s, pos=p), (*small, sl, ps)
    )


@pytest.mark.parametrize("cap", [0.5, 3.0])
def test_softcap_before_bias_and_mask(cap):
    text = f"pattern sc\n  tokens seq\n  mask causal\n  softcap {cap}\n  bias -(2 ** (-8 * (h + 1) / heads)) * (q - k)\n"
    B, H, N, D = 2, 2, 12, 8
    q, k, v = qkv(gen(11), B, H, H, N, N, D, scale=3.0, grad=True)  # large scores: tanh saturates
    bias = alibi_bias(H, N)
    out, lse = compiled(text)(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, causal_mask(N), bias=bias, softcap=cap)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    # capping after the bias would be a different function
    after = dense(q, k, v, causal_mask(N), softcap=cap, bias=None)
    assert not torch.allclose(out, after[0])
    assert_grads_match(
        (q, k, v),
        lambda: compiled(text)(q, k, v, return_lse=True),
        lambda: dense(q, k, v, causal_mask(N), bias=bias, softcap=cap),
    )


def test_head_dependent_softcap():
    text = "pattern sc\n  tokens seq\n  softcap 1.0 + h\n"
    B, H, N = 1, 3, 7
    q, k, v = qkv(gen(12), B, H, H, N, N, 4, scale=3.0)
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) / 2.0
    caps = torch.tensor([1.0, 2.0, 3.0], dtype=F64).view(1, H, 1, 1)
    s = caps * torch.tanh(s / caps)
    want = torch.softmax(s, -1) @ v
    torch.testing.assert_close(compiled(text)(q, k, v), want, **TIGHT)


@pytest.mark.parametrize("batched,Hkv", [(False, 4), (True, 4), (False, 2)])
def test_fox_decay(batched, Hkv):
    g = gen(13)
    B, H, N = 2, 4, 10
    q, k, v = qkv(g, B, H, Hkv, N, N, 8, grad=True)
    gates = log_gates(g, *((B, H, N) if batched else (H, N)), grad=True)
    out, lse = compiled(FOX)(q, k, v, g=gates, return_lse=True)
    want, want_lse = dense(q, k, v, causal_mask(N), bias=fox_term(gates, N))
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    # spot check one entry of the decay term by hand
    gg = (gates[0] if batched else gates).detach()
    assert abs(float(fox_term(gg, N)[0, 1, 7, 3]) - float(gg[1, 4:8].sum())) < 1e-12
    assert_grads_match(
        (q, k, v, gates),
        lambda: compiled(FOX)(q, k, v, g=gates, return_lse=True),
        lambda: dense(q, k, v, causal_mask(N), bias=fox_term(gates, N)),
    )


def test_fox_gradcheck():
    g = gen(14)
    q, k, v = qkv(g, 1, 2, 2, 5, 5, 3, grad=True)
    gates = log_gates(g, 2, 5, grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c, d: compiled(FOX)(a, b, c, g=d, return_lse=True), (q, k, v, gates)
    )


@pytest.mark.parametrize("scale", [0.3, 1.7, -0.5])
def test_explicit_scale(scale):
    q, k, v = qkv(gen(15), 2, 2, 2, 8, 8, 16, grad=True)
    out, lse = compiled(ALIBI)(q, k, v, scale=scale, return_lse=True)
    want, want_lse = dense(q, k, v, causal_mask(8), scale=scale, bias=alibi_bias(2, 8))
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    default = compiled(ALIBI)(q, k, v)
    assert not torch.allclose(out, default)
    assert_grads_match(
        (q, k, v),
        lambda: compiled(ALIBI)(q, k, v, scale=scale, return_lse=True),
        lambda: dense(q, k, v, causal_mask(8), scale=scale, bias=alibi_bias(2, 8)),
    )


def test_bidirectional_default_mask():
    text = "pattern full\n  tokens seq\n"
    q, k, v = qkv(gen(16), 2, 2, 2, 9, 9, 4)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    torch.testing.assert_close(compiled(text)(q, k, v), want, **TIGHT)


# ----------------------------------------------------------------- cross attention and grids
@pytest.mark.parametrize("Nq,Nk", [(6, 11), (13, 4), (1, 7), (5, 5)])
def test_cross_attention(Nq, Nk):
    text = "pattern x\n  queries seq\n  keys seq\n  mask 2 * k <= 3 * q + 1 and k < nk - 1 + q\n"
    g = gen(Nq * 100 + Nk)
    q, k, v = qkv(g, 2, 4, 2, Nq, Nk, 8, 3, grad=True)
    mask = torch.tensor(
        [[2 * kk <= 3 * qq + 1 and kk < Nk - 1 + qq for kk in range(Nk)] for qq in range(Nq)]
    )
    out, lse = compiled(text)(q, k, v, return_lse=True)
    assert out.shape == (2, 4, Nq, 3)
    want, want_lse = dense(q, k, v, mask)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    assert torch.equal(attnc.materialize_mask(text, n=Nq, nk=Nk, heads=2), mask.expand(2, Nq, Nk))
    assert_grads_match(
        (q, k, v), lambda: compiled(text)(q, k, v, return_lse=True), lambda: dense(q, k, v, mask)
    )


def test_cross_attention_without_mask():
    text = "pattern x\n  queries seq\n  keys seq\n"
    q, k, v = qkv(gen(17), 1, 2, 2, 3, 8, 4)
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v
    torch.testing.assert_close(compiled(text)(q, k, v), want, **TIGHT)


def grid_coords(*extents):
    """Row-major coordinates of every flat position: list of tuples."""
    coords = [()]
    for e in extents:
        coords = [c + (i,) for c in coords for i in range(e)]
    return coords


@pytest.mark.parametrize("height,width,at_call", [(3, 5, False), (4, 4, True), (2, 7, False)])
def test_grid_2d(height, width, at_call):
    text = (
        "pattern nb\n  tokens grid(y: height, x: width)\n"
        "  mask abs(q.y - k.y) <= 1 and abs(q.x - k.x) <= 1 and not (q.y == k.y and k.x > q.x)\n"
    )
    N = height * width
    cs = grid_coords(height, width)
    mask = torch.tensor(
        [
            [
                abs(a[0] - b[0]) <= 1
                and abs(a[1] - b[1]) <= 1
                and not (a[0] == b[0] and b[1] > a[1])
                for b in cs
            ]
            for a in cs
        ]
    )
    q, k, v = qkv(gen(N), 2, 2, 1, N, N, 8, grad=True)
    sizes = {"height": height, "width": width}
    attn = compiled(text) if at_call else compiled(text, sizes=sizes)
    call = (
        (lambda: attn(q, k, v, sizes=sizes, return_lse=True))
        if at_call
        else (lambda: attn(q, k, v, return_lse=True))
    )
    out, lse = call()
    want, want_lse = dense(q, k, v, mask)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    assert_grads_match((q, k, v), call, lambda: dense(q, k, v, mask))


def test_grid_3d_one_size_inferred_from_n():
    text = (
        "pattern vid\n  tokens grid(t: frames, y: height, x: width)\n"
        "  mask k.t <= q.t and abs(q.y - k.y) + abs(q.x - k.x) <= 2\n"
    )
    T, Y, X = 3, 2, 4
    N = T * Y * X
    cs = grid_coords(T, Y, X)
    mask = torch.tensor(
        [[b[0] <= a[0] and abs(a[1] - b[1]) + abs(a[2] - b[2]) <= 2 for b in cs] for a in cs]
    )
    q, k, v = qkv(gen(18), 1, 2, 2, N, N, 4)
    out = compiled(text, sizes={"height": Y, "width": X})(q, k, v)  # frames = N / (Y * X)
    torch.testing.assert_close(out, dense(q, k, v, mask)[0], **TIGHT)


def test_grid_with_window():
    text = "pattern w\n  tokens grid(y: height, x: width)\n  mask window(y, 3) and window(x, 3)\n"
    Y, X = 5, 6
    cs = grid_coords(Y, X)

    def win(i, L, size):  # centred, shifted inward at the borders, exactly `size` keys
        lo = min(max(i - size // 2, 0), L - size)
        return range(lo, lo + size)

    mask = torch.tensor(
        [[b[0] in win(a[0], Y, 3) and b[1] in win(a[1], X, 3) for b in cs] for a in cs]
    )
    assert (mask.sum(-1) == 9).all()
    q, k, v = qkv(gen(19), 1, 2, 2, Y * X, Y * X, 4)
    out = compiled(text, sizes={"height": Y, "width": X})(q, k, v)
    torch.testing.assert_close(out, dense(q, k, v, mask)[0], **TIGHT)


# ----------------------------------------------------------------- rows with no allowed key
@pytest.mark.parametrize(
    "text,inputs",
    [
        ("pattern e\n  tokens seq\n  mask k > q\n", None),
        ("pattern e\n  tokens seq\n  mask k < q and k > 2\n", None),
        (DENSE_MASK, "m"),
    ],
)
def test_rows_without_keys(text, inputs):
    g = gen(21)
    B, H, N = 2, 2, 9
    kw = {}
    if inputs == "m":
        m = (torch.rand(B, N, N, generator=g) < 0.4).to(torch.int64)
        m[:, 2] = 0
        m[1, 5] = 0
        kw = {"m": m}
        mask = (m != 0).unsqueeze(1)
    elif "k > q" in text:
        mask = torch.tensor([[kk > qq for kk in range(N)] for qq in range(N)])
    else:
        mask = torch.tensor([[kk < qq and kk > 2 for kk in range(N)] for qq in range(N)])
    q, k, v = qkv(g, B, H, H, N, N, 4, grad=True)
    out, lse = compiled(text)(q, k, v, return_lse=True, **kw)
    empty = ~torch.broadcast_to(mask, (B, H, N, N)).any(-1)
    assert empty.any() and (~empty).any()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[empty] == 0).all()
    assert torch.isneginf(lse[empty]).all() and torch.isfinite(lse[~empty]).all()
    want, want_lse = dense(q, k, v, mask)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    dq, dk, dv = grads(loss_of(out, lse), (q, k, v))
    for d in (dq, dk, dv):
        assert torch.isfinite(d).all()
    assert (dq[empty] == 0).all()
    assert_grads_match(
        (q, k, v),
        lambda: compiled(text)(q, k, v, return_lse=True, **kw),
        lambda: dense(q, k, v, mask),
    )
    # the plain sum of the output (lse unused) as well
    (dq2,) = grads(compiled(text)(q, k, v, **kw).sum(), (q,))
    assert torch.isfinite(dq2).all() and (dq2[empty] == 0).all()


def test_everything_masked():
    text = "pattern none\n  tokens seq\n  mask k > n\n"
    q, k, v = qkv(gen(22), 1, 2, 2, 5, 5, 4, grad=True)
    out, lse = compiled(text)(q, k, v, return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = grads(out.sum(), (q, k, v))
    assert all((d == 0).all() for d in (dq, dk, dv))


@pytest.mark.parametrize("big", [1e20, 1e30, 1e300])
def test_tied_keys_at_huge_scores_share_the_weight(big):
    """Scores so large that a row's lse cannot hold log(sum) (-1e30 + log 2 is -1e30): the keys tied at the
    row's largest score share its weight, so the output is their mean, not their sum (exp(s - lse) would weigh
    each 1). Every key but the query's own, with a bias of -big * |q - k|: a row's two neighbours tie, and
    q . k (of order 1) is lost beside big."""
    text = f"pattern far(big = {big})\n  tokens seq\n  mask q != k\n  bias -big * abs(q - k)\n"
    q, k, v = qkv(gen(27), 1, 1, 1, 7, 7, 4)
    out = compiled(text)(q, k, v)
    n = torch.arange(7)
    dist = (n[:, None] - n[None, :]).abs()
    nearest = (dist == 1).to(F64)  # each row's tied keys: its neighbours
    want = (nearest / nearest.sum(-1, keepdim=True)) @ v[0, 0]
    torch.testing.assert_close(out[0, 0], want, **TIGHT)


def test_merges_by_lse_weigh_tied_parts_by_their_share_at_huge_scores():
    """Two attentions over disjoint keys, merged by their lse: at lse 1e30 each part's share is exp(lse_i - top)
    over the shares' sum (1/2 each when tied), not exp(lse_i - lse), which weighs each 1 there; an empty part
    weighs 0, a row empty in both is 0 / -inf; ordinary rows match the softmax over every key."""
    from attnc.runtime.numerics import merge_lse_parts

    g = gen(28)
    a, b = randn(g, 3, 4), randn(g, 3, 4)
    lse_a = torch.tensor([1e30, 0.3, -math.inf], dtype=F64)
    lse_b = torch.tensor([1e30, -math.inf, -math.inf], dtype=F64)
    out, lse = merge_lse_parts([a, b], [lse_a, lse_b])
    torch.testing.assert_close(out[0], (a[0] + b[0]) / 2, **TIGHT)
    torch.testing.assert_close(out[1], a[1], **TIGHT)
    assert (out[2] == 0).all() and lse[1] == 0.3 and torch.isneginf(lse[2])
    s = randn(g, 2, 9)  # ordinary scores split into two key sets
    v = randn(g, 9, 4)
    parts = [(torch.softmax(s[:, c], -1) @ v[c], torch.logsumexp(s[:, c], -1)) for c in (slice(0, 4), slice(4, 9))]
    out, lse = merge_lse_parts([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, **TIGHT)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), **TIGHT)


def test_the_cpu_decode_rows_weigh_tied_keys_as_the_reference_at_huge_scores():
    """Queries after a cache with a softcap take the CPU backend's decode rows: at scores of 1e30 a row's tied
    neighbours share its weight there too."""
    text = "pattern far(big = 1e30)\n  tokens seq\n  mask q != k\n  bias -big * abs(q - k)\n  softcap 1e300\n"
    g = gen(29)
    q, k, v = randn(g, 1, 1, 2, 8), randn(g, 1, 1, 7, 8), randn(g, 1, 1, 7, 8)
    want = compiled(text)(q, k, v)
    torch.testing.assert_close(attnc.compile_attention(text, backend="cpu")(q, k, v), want, **TIGHT)


# ----------------------------------------------------------------- dtypes
@pytest.mark.parametrize(
    "dtype,tol",
    [(torch.float32, {"rtol": 1e-5, "atol": 1e-5}), (torch.bfloat16, {"rtol": 1e-2, "atol": 1e-2})],
)
@pytest.mark.parametrize("text", [ALIBI, FOX, DENSE_MASK])
def test_low_precision_inputs(dtype, tol, text):
    g = gen(23)
    B, Hq, Hkv, N, D = 2, 4, 2, 12, 16
    q, k, v = qkv(g, B, Hq, Hkv, N, N, D, dtype=dtype)
    kw, bias, mask = {}, None, causal_mask(N)
    if text is FOX:
        kw["g"] = log_gates(g, Hq, N).to(dtype)
        bias = fox_term(kw["g"].to(F64), N)
    elif text is ALIBI:
        bias = alibi_bias(Hq, N)
    else:
        m = (torch.rand(N, N, generator=g) < 0.5).to(torch.int64)
        m[3] = 0
        kw["m"] = m
        mask = m != 0
    out, lse = compiled(text)(q, k, v, return_lse=True, **kw)
    assert out.dtype == dtype and out.shape == (B, Hq, N, D)
    assert lse.dtype.is_floating_point and lse.shape == (B, Hq, N)
    want, want_lse = dense(
        q, k, v, mask, bias=bias
    )  # truth from the same (rounded) inputs, in float64
    torch.testing.assert_close(out.to(F64), want, **tol)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.to(F64)[finite], want_lse[finite], **tol)
    assert not torch.isnan(out).any()


def test_float32_gradients():
    g = gen(24)
    q, k, v = qkv(g, 2, 4, 2, 10, 10, 8, dtype=torch.float32, grad=True)
    gates = log_gates(g, 4, 10).float().requires_grad_()
    out = compiled(FOX)(q, k, v, g=gates)
    assert out.dtype == torch.float32
    got = grads(loss_of(out), (q, k, v, gates))
    assert all(d.dtype == torch.float32 for d in got)
    q64, k64, v64, g64 = (t.detach().to(F64).requires_grad_() for t in (q, k, v, gates))
    want = grads(
        loss_of(dense(q64, k64, v64, causal_mask(10), bias=fox_term(g64, 10))[0]),
        (q64, k64, v64, g64),
    )
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.to(F64), b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- gradcheck
@pytest.mark.parametrize(
    "text", [CAUSAL, ALIBI, "pattern s\n  tokens seq\n  mask causal\n  softcap 2.0\n"]
)
def test_gradcheck(text):
    q, k, v = qkv(gen(25), 1, 2, 1, 5, 5, 3, 2, grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: compiled(text)(a, b, c, return_lse=True), (q, k, v)
    )


def test_gradcheck_cross_and_empty_rows():
    text = "pattern x\n  queries seq\n  keys seq\n  mask k < q\n"
    q, k, v = qkv(gen(26), 1, 2, 2, 4, 6, 3, grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: compiled(text)(a, b, c), (q, k, v))


# ----------------------------------------------------------------- routing
def block_select(score_fn, allowed_fn, keep_fn, nblocks: int, K: int) -> list[int]:
    """spec/REFERENCE.md, ``route``: never a block with no allowed key; keep blocks always (counted in K);
    the rest by highest score, ties to the lower index."""
    allowed = [j for j in range(nblocks) if allowed_fn(j)]
    forced = [j for j in allowed if keep_fn(j)]
    rest = sorted((j for j in allowed if j not in forced), key=lambda j: (-score_fn(j), j))
    return forced + rest[: max(0, K - len(forced))]


def moba_mask(q, k, mask, K: int, bs: int):
    """MoBA selection with `keep q // bs == k // bs`; returns the routed token mask [B, Hq, Nq, Nk]."""
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    heads = kv_of_head(Hq, k.shape[1])
    nb = -(-Nk // bs)
    mask = torch.broadcast_to(mask, (B, Hq, Nq, Nk))
    out = torch.zeros(B, Hq, Nq, Nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kk = k[b, heads[h]].detach().to(F64)
            means = [kk[j * bs : (j + 1) * bs].mean(0) for j in range(nb)]
            for i in range(Nq):
                qi = q[b, h, i].detach().to(F64)
                chosen = block_select(
                    lambda j, qi=qi, means=means: float(qi @ means[j]),
                    lambda j, b=b, h=h, i=i: bool(mask[b, h, i, j * bs : (j + 1) * bs].any()),
                    lambda j, i=i: i // bs == (j * bs) // bs,
                    nb,
                    K,
                )
                for j in chosen:
                    out[b, h, i, j * bs : (j + 1) * bs] = mask[b, h, i, j * bs : (j + 1) * bs]
    return out


def moba_text(K, bs, mask="causal"):
    return f"pattern moba\n  tokens seq\n  mask {mask}\n  route topk({K}) blocks({bs}) by q @ mean(k) keep q // {bs} == k // {bs}\n"


MOBA_MASKS = {
    "causal": lambda qq, kk: kk <= qq,
    # the own block (kept) may have no allowed key: it must then not use up a place
    "k < q": lambda qq, kk: kk < qq,
    "k < q and (k // 2) % 3 != 1": lambda qq, kk: kk < qq and (kk // 2) % 3 != 1,
}


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    N=st.integers(2, 20),
    bs=st.integers(1, 6),
    K=st.integers(1, 5),
    Hkv=st.sampled_from([1, 2, 4]),
    mask_text=st.sampled_from(sorted(MOBA_MASKS)),
)
def test_moba_routing(seed, N, bs, K, Hkv, mask_text):
    g = gen(seed)
    q, k, v = qkv(g, 2, 4, Hkv, N, N, 4)
    rule = MOBA_MASKS[mask_text]
    mask = torch.tensor([[rule(qq, kk) for kk in range(N)] for qq in range(N)])
    routed = moba_mask(q, k, mask, K, bs)
    out, lse = compiled(moba_text(K, bs, mask_text))(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, routed)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)


def test_moba_selection_is_real_and_differentiable():
    g = gen(31)
    N, bs, K = 24, 4, 2
    q, k, v = qkv(g, 2, 4, 2, N, N, 8, grad=True)
    routed = moba_mask(q, k, causal_mask(N), K, bs)
    assert not torch.equal(routed, causal_mask(N).expand_as(routed))  # some blocks were dropped
    # every query keeps its own block, and at most K blocks
    per_block = routed.view(2, 4, N, N // bs, bs).any(-1)
    assert (per_block.sum(-1) <= K).all()
    assert all(per_block[:, :, i, i // bs].all() for i in range(N))
    text = moba_text(K, bs)
    torch.testing.assert_close(compiled(text)(q, k, v), dense(q, k, v, routed)[0], **TIGHT)
    assert_grads_match(
        (q, k, v), lambda: compiled(text)(q, k, v, return_lse=True), lambda: dense(q, k, v, routed)
    )


def test_moba_ties_go_to_lower_block():
    """Every key block has the same mean (exact small integers): ties everywhere."""
    g = gen(32)
    N, bs, K = 16, 4, 2
    base = torch.randint(1, 4, (1, 2, bs, 4), generator=g).to(F64) * torch.where(
        torch.rand(1, 2, bs, 4, generator=g) < 0.5, -1.0, 1.0
    ).to(F64)
    k = base.repeat(1, 1, N // bs, 1)
    q = torch.randint(1, 4, (1, 2, N, 4), generator=g).to(F64)
    v = randn(g, 1, 2, N, 4)
    routed = moba_mask(q, k, causal_mask(N), K, bs)
    # the tie rule by hand: own block plus block 0 (the lowest other allowed one)
    want_mask = torch.tensor(
        [
            [kk <= qq and (kk // bs == qq // bs or kk // bs == 0) for kk in range(N)]
            for qq in range(N)
        ]
    )
    assert torch.equal(routed, want_mask.expand(1, 2, N, N))
    out = compiled(moba_text(K, bs))(q, k, v)
    torch.testing.assert_close(out, dense(q, k, v, want_mask)[0], **TIGHT)


def test_moba_wasted_keep_block():
    """Mask k < q, K = 2, blocks of 4: query 8 has no allowed key in its own block 8..11,
    so it takes both earlier blocks; query 9 keeps its block and takes the better one."""
    g = gen(35)
    N, bs = 12, 4
    q, k, v = qkv(g, 1, 1, 1, N, N, 4)
    mask = torch.tensor([[kk < qq for kk in range(N)] for qq in range(N)])
    routed = moba_mask(q, k, mask, 2, bs)
    assert torch.equal(routed[0, 0, 8], mask[8])  # both of blocks 0 and 1
    assert routed[0, 0, 9].sum() == 1 + 4  # key 8 of its own block, plus one whole block
    out, lse = compiled(moba_text(2, bs, "k < q"))(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, routed)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)


def test_moba_topk_exceeds_blocks():
    q, k, v = qkv(gen(33), 2, 2, 2, 10, 10, 4)
    out, lse = compiled(moba_text(9, 3))(q, k, v, return_lse=True)  # 4 blocks < 9
    want, want_lse = dense(q, k, v, causal_mask(10))
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)


def test_route_never_picks_a_block_without_allowed_keys():
    """Without a keep, K=1: the best-scoring block is chosen among those the mask allows;
    future blocks (no allowed key) score highest but must never take the place."""
    g = gen(34)
    N, bs = 12, 3
    c = randn(g, 4)
    q = randn(g, 1, 2, N, 4) + 3 * c
    k, v = randn(g, 1, 2, N, 4), randn(g, 1, 2, N, 4)
    k[:, :, 6:] = k[:, :, 6:] * 0.1 + 4 * c  # later blocks align with every query
    text = "pattern r\n  tokens seq\n  mask causal\n  route topk(1) blocks(3) by q @ mean(k)\n"
    routed = torch.zeros(1, 2, N, N, dtype=torch.bool)
    cm = causal_mask(N)
    for h in range(2):
        means = [k[0, h, j * bs : (j + 1) * bs].mean(0) for j in range(N // bs)]
        for i in range(N):

            def score(j, i=i, h=h, means=means):
                return float(q[0, h, i] @ means[j])

            # the setup is sensitive: ignoring the mask, a future block would win
            assert max(range(N // bs), key=lambda j, score=score: (score(j), -j)) >= 2
            best = max(range(i // bs + 1), key=lambda j, score=score: (score(j), -j))
            routed[0, h, i, best * bs : (best + 1) * bs] = cm[i, best * bs : (best + 1) * bs]
    out, lse = compiled(text)(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, routed)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    assert torch.isfinite(lse).all()


def biformer_mask(q, k, Y, X, by, bx, K):
    """BiFormer: tiles of by x bx (row-major over tiles, partial at the edges), score
    mean(q_tile) . mean(k_tile) averaged over query heads, no mask."""
    B, Hq, N, _ = q.shape
    heads = kv_of_head(Hq, k.shape[1])
    cs = grid_coords(Y, X)
    tx = -(-X // bx)
    tile = torch.tensor([(y // by) * tx + x // bx for y, x in cs])
    nt = int(tile.max()) + 1
    out = torch.zeros(B, Hq, N, N, dtype=torch.bool)
    for b in range(B):
        qm = torch.stack(
            [
                torch.stack([q[b, h, tile == t].detach().mean(0) for t in range(nt)])
                for h in range(Hq)
            ]
        )
        km = torch.stack(
            [
                torch.stack([k[b, heads[h], tile == t].detach().mean(0) for t in range(nt)])
                for h in range(Hq)
            ]
        )
        score = torch.einsum("hid,hjd->hij", qm, km).mean(0)  # shared over heads
        for t in range(nt):
            chosen = block_select(
                lambda j, t=t, score=score: float(score[t, j]),
                lambda j: True,
                lambda j: False,
                nt,
                K,
            )
            rows = tile == t
            for j in chosen:
                out[b][:, rows[:, None] & (tile == j)[None, :]] = True
    return out


def biformer_text(K, by, bx):
    return f"pattern bi\n  tokens grid(y: height, x: width)\n  route topk({K}) blocks(y: {by}, x: {bx}) by mean(q) @ mean(k) shared\n"


@pytest.mark.parametrize(
    "Y,X,by,bx,K,Hkv",
    [(4, 4, 2, 2, 2, 2), (6, 4, 4, 2, 3, 1), (5, 6, 2, 3, 1, 4), (4, 6, 2, 2, 20, 2)],
)
def test_biformer_routing(Y, X, by, bx, K, Hkv):
    g = gen(Y * 10 + X)
    N = Y * X
    q, k, v = qkv(g, 2, 4, Hkv, N, N, 8, grad=True)
    routed = biformer_mask(q, k, Y, X, by, bx, K)
    text = biformer_text(K, by, bx)
    attn = compiled(text, sizes={"height": Y, "width": X})
    out, lse = attn(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, routed)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(lse, want_lse, **TIGHT)
    # shared: every head picks the same tiles
    assert torch.equal(routed, routed[:, :1].expand_as(routed))
    if K >= -(-Y // by) * -(-X // bx):
        assert routed.all()
    assert_grads_match(
        (q, k, v), lambda: attn(q, k, v, return_lse=True), lambda: dense(q, k, v, routed)
    )


def test_biformer_ties():
    """All key tiles identical (exact integers): each query tile takes the lowest K tiles."""
    g = gen(41)
    Y, X, by, bx, K = 4, 4, 2, 2, 2
    cs = grid_coords(Y, X)
    tile = torch.tensor([(y // by) * 2 + x // bx for y, x in cs])
    within = torch.tensor([(y % by) * bx + x % bx for y, x in cs])
    base = torch.randint(1, 4, (1, 2, by * bx, 4), generator=g).to(F64)
    k = base[:, :, within]
    q = torch.randint(-3, 4, (1, 2, Y * X, 4), generator=g).to(F64)
    q = torch.where(q == 0, torch.ones_like(q), q)
    v = randn(g, 1, 2, Y * X, 4)
    want_mask = (tile[None, :] < K).expand(Y * X, Y * X)
    assert torch.equal(biformer_mask(q, k, Y, X, by, bx, K), want_mask.expand(1, 2, -1, -1))
    out = compiled(biformer_text(K, by, bx), sizes={"height": Y, "width": X})(q, k, v)
    torch.testing.assert_close(out, dense(q, k, v, want_mask)[0], **TIGHT)


# ----------------------------------------------------------------- recurrences
RETNET = "recurrence ret\n  decay log(1 - 2 ** (-5 - h))\n"
SCALAR = "recurrence mamba\n  input g: float[heads, n]\n  decay g\n"
VECTOR = "recurrence gla\n  input g: float[heads, n, dk]\n  decay g\n"


def segment_sums(g: torch.Tensor) -> torch.Tensor:
    """seg[..., t, s] = sum(g[..., s+1 .. t]) for s <= t (0 above), via an indicator."""
    T = g.shape[-1]
    ind = torch.zeros(T, T, T, dtype=F64)
    for t in range(T):
        for s in range(t + 1):
            ind[t, s, s + 1 : t + 1] = 1.0
    return torch.einsum("...j,tsj->...ts", g, ind)


def scalar_recurrence_ref(q, k, v, g, scale, S0):
    """Closed form: o = scale ((Q K^T) * D) V + scale exp(sum g[0..t]) q_t S0; g [B|1, H, T]."""
    B, H, T, Dk = q.shape
    heads = kv_of_head(H, k.shape[1])
    k, v = k[:, heads].to(F64), v[:, heads].to(F64)
    g = torch.broadcast_to(g, (B, H, T))
    seg = segment_sums(g)
    causal = causal_mask(T)
    Dm = torch.where(causal, torch.exp(seg), torch.zeros((), dtype=F64))
    out = scale * ((q @ k.transpose(-1, -2)) * Dm) @ v
    total = g.sum(-1)  # [B, H]
    tail = torch.exp(total[..., None] - torch.cumsum(g, -1))  # decay from step s+1 to T-1
    final = torch.einsum("bhs,bhsd,bhse->bhde", tail, k, v)
    if S0 is not None:
        upto = torch.exp(torch.cumsum(g, -1))  # prod of decays 0..t
        out = out + scale * upto[..., None] * (q @ S0)
        final = final + torch.exp(total)[..., None, None] * S0
    return out, final


def vector_recurrence_ref(q, k, v, g, scale, S0):
    """An explicit loop over time; g [B|1, H, T, Dk]."""
    B, H, T, Dk = q.shape
    heads = kv_of_head(H, k.shape[1])
    k, v = k[:, heads], v[:, heads]
    g = torch.broadcast_to(g, (B, H, T, Dk))
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=F64) if S0 is None else S0
    outs = []
    for t in range(T):
        S = torch.exp(g[:, :, t]).unsqueeze(-1) * S + torch.einsum(
            "bhd,bhe->bhde", k[:, :, t], v[:, :, t]
        )
        outs.append(scale * torch.einsum("bhd,bhde->bhe", q[:, :, t], S))
    return torch.stack(outs, dim=2), S


def retnet_gates(H, T):
    return (
        torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(H)], dtype=F64)
        .view(1, H, 1)
        .expand(1, H, T)
    )


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("Hkv", [3, 1])
def test_retnet_recurrence(with_state, Hkv):
    g = gen(51)
    B, H, T, Dk, Dv = 2, 3, 11, 4, 5
    q, k, v = qkv(g, B, H, Hkv, T, T, Dk, Dv, grad=True)
    S0 = randn(g, B, H, Dk, Dv, grad=True) if with_state else None
    attn = compiled(RETNET)
    out, state = attn(q, k, v, initial_state=S0, return_state=True)
    assert out.shape == (B, H, T, Dv) and state.shape == (B, H, Dk, Dv)
    want, want_state = scalar_recurrence_ref(q, k, v, retnet_gates(H, T), Dk**-0.5, S0)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(state, want_state, **TIGHT)
    torch.testing.assert_close(attn(q, k, v, initial_state=S0), out, rtol=0, atol=0)
    ts = (q, k, v) if S0 is None else (q, k, v, S0)
    assert_grads_match(
        ts,
        lambda: (attn(q, k, v, initial_state=S0, return_state=True)[0],),
        lambda: (scalar_recurrence_ref(q, k, v, retnet_gates(H, T), Dk**-0.5, S0)[0],),
    )


def assert_state_grads_match(got, want, leaves, seed: int):
    """The gradients of ``leaves`` through (out, final state) equal the reference's, under one random
    weighting of the state (and ``loss_of`` of the output)."""
    (out, state), (want_out, want_state) = got, want
    w = randn(gen(seed), *state.shape)
    got_grads = grads(loss_of(out) + (state * w).sum(), leaves)
    want_grads = grads(loss_of(want_out) + (want_state * w).sum(), leaves)
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, **GRAD)


@pytest.mark.parametrize("batched", [False, True])
def test_scalar_gate_recurrence(batched):
    g = gen(52)
    B, H, T, Dk, Dv = 2, 2, 9, 6, 3
    q, k, v = qkv(g, B, H, H, T, T, Dk, Dv, grad=True)
    gates = log_gates(g, *((B, H, T) if batched else (H, T)), grad=True)
    S0 = randn(g, B, H, Dk, Dv, grad=True)
    attn = compiled(SCALAR)
    out, state = attn(q, k, v, g=gates, initial_state=S0, return_state=True)
    want, want_state = scalar_recurrence_ref(
        q, k, v, gates if batched else gates.unsqueeze(0), Dk**-0.5, S0
    )
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(state, want_state, **TIGHT)
    # the loop agrees with the closed form (a check on the references themselves)
    g4 = (gates if batched else gates.unsqueeze(0)).unsqueeze(-1).expand(-1, -1, -1, Dk)
    loop, loop_state = vector_recurrence_ref(q, k, v, g4, Dk**-0.5, S0)
    torch.testing.assert_close(loop, want, **TIGHT)
    torch.testing.assert_close(loop_state, want_state, **TIGHT)
    assert_state_grads_match((out, state), (want, want_state), (q, k, v, gates, S0), seed=5)


@pytest.mark.parametrize("batched,scale", [(False, None), (True, 0.7)])
def test_vector_gate_recurrence(batched, scale):
    g = gen(53)
    B, H, T, Dk, Dv = 2, 2, 8, 4, 5
    q, k, v = qkv(g, B, H, H, T, T, Dk, Dv, grad=True)
    gates = log_gates(g, *((B, H, T, Dk) if batched else (H, T, Dk)), grad=True)
    S0 = randn(g, B, H, Dk, Dv, grad=True)
    attn = compiled(VECTOR)
    out, state = attn(q, k, v, g=gates, initial_state=S0, return_state=True, scale=scale)
    sc = Dk**-0.5 if scale is None else scale
    want, want_state = vector_recurrence_ref(
        q, k, v, gates if batched else gates.unsqueeze(0), sc, S0
    )
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(state, want_state, **TIGHT)
    # the channels of the gate matter: a gate averaged over dk gives another answer
    flat = vector_recurrence_ref(
        q,
        k,
        v,
        (gates if batched else gates.unsqueeze(0)).mean(-1, keepdim=True).expand(-1, -1, -1, Dk),
        sc,
        S0,
    )[0]
    assert not torch.allclose(out, flat)
    assert_state_grads_match((out, state), (want, want_state), (q, k, v, gates, S0), seed=6)


def test_recurrence_without_state_starts_from_zero():
    g = gen(54)
    q, k, v = qkv(g, 1, 2, 2, 6, 6, 3, 2)
    gates = log_gates(g, 2, 6, 3)
    out, state = compiled(VECTOR)(q, k, v, g=gates, return_state=True)
    want, want_state = vector_recurrence_ref(q, k, v, gates.unsqueeze(0), 3**-0.5, None)
    torch.testing.assert_close(out, want, **TIGHT)
    torch.testing.assert_close(state, want_state, **TIGHT)
    # chunking: running the second half from the first half's state gives the same tail
    _, mid = compiled(VECTOR)(
        q[:, :, :3], k[:, :, :3], v[:, :, :3], g=gates[:, :3], return_state=True
    )
    tail, end = compiled(VECTOR)(
        q[:, :, 3:], k[:, :, 3:], v[:, :, 3:], g=gates[:, 3:], initial_state=mid, return_state=True
    )
    torch.testing.assert_close(tail, want[:, :, 3:], **TIGHT)
    torch.testing.assert_close(end, want_state, **TIGHT)


def test_recurrence_low_precision():
    g = gen(55)
    q, k, v = qkv(g, 1, 2, 2, 10, 10, 8, dtype=torch.bfloat16)
    gates = log_gates(g, 2, 10)
    out = compiled(SCALAR)(q, k, v, g=gates.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    want, _ = scalar_recurrence_ref(
        q.to(F64),
        k.to(F64),
        v.to(F64),
        gates.to(torch.bfloat16).to(F64).unsqueeze(0),
        8**-0.5,
        None,
    )
    torch.testing.assert_close(out.to(F64), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("text", [RETNET, SCALAR, VECTOR])
def test_recurrence_gradcheck(text):
    g = gen(56)
    B, H, T, Dk, Dv = 1, 2, 4, 2, 3
    q, k, v = qkv(g, B, H, H, T, T, Dk, Dv, grad=True)
    S0 = randn(g, B, H, Dk, Dv, grad=True)
    if text is RETNET:

        def fn(a, b, c, s):
            out, st_ = compiled(text)(a, b, c, initial_state=s, return_state=True)
            return out, st_

        assert torch.autograd.gradcheck(fn, (q, k, v, S0))
        return
    gates = log_gates(g, *((H, T) if text is SCALAR else (H, T, Dk)), grad=True)

    def fn(a, b, c, d, s):
        return compiled(text)(a, b, c, g=d, initial_state=s, return_state=True)

    assert torch.autograd.gradcheck(fn, (q, k, v, gates, S0))


# ----------------------------------------------------------------- API errors
def _err(fn, *needles):
    with pytest.raises(attnc.SpecError) as info:
        fn()
    text = str(info.value)
    for needle in needles:
        assert needle in text, (needle, text)
    return info.value


def test_error_wrong_rank():
    q, k, v = qkv(gen(60), 1, 2, 2, 5, 5, 4)
    attn = compiled(CAUSAL)
    _err(lambda: attn(q[0], k, v), "argument q", "4 dimensions")
    _err(lambda: attn(q, k[0], v), "argument k")
    _err(lambda: attn(q, k, v[..., None]), "argument v")
    _err(lambda: compiled(RETNET)(q, k, v[0]), "argument v")


def test_error_dtype_mismatch():
    q, k, v = qkv(gen(61), 1, 2, 2, 5, 5, 4)
    attn = compiled(CAUSAL)
    e = _err(lambda: attn(q, k.float(), v), "dtype")
    assert "argument" in str(e)
    _err(lambda: attn(q, k, v.to(torch.bfloat16)), "dtype")
    _err(
        lambda: attn(q.to(torch.int64), k.to(torch.int64), v.to(torch.int64)),
        "argument q",
        "floating",
    )


def test_error_heads_not_multiple():
    g = gen(62)
    q = randn(g, 1, 3, 5, 4)
    k, v = randn(g, 1, 2, 5, 4), randn(g, 1, 2, 5, 4)
    _err(lambda: compiled(CAUSAL)(q, k, v), "argument k", "multiple")
    q4 = randn(g, 1, 4, 5, 4)
    _err(lambda: compiled(CAUSAL)(q4, randn(g, 1, 3, 5, 4), randn(g, 1, 3, 5, 4)), "multiple")


def test_error_inputs():
    q, k, v = qkv(gen(63), 2, 2, 2, 6, 6, 4)
    doc = torch.zeros(6, dtype=torch.int64) + 1
    attn = compiled(DOCS)
    _err(lambda: attn(q, k, v), "argument doc", "missing input")
    _err(lambda: attn(q, k, v, doc=doc[:5]), "argument doc", "[5]")
    _err(lambda: attn(q, k, v, doc=doc.view(2, 3)), "argument doc")
    _err(lambda: attn(q, k, v, doc=doc.expand(3, 6)), "argument doc", "batch")  # batch 3 vs q's 2
    _err(lambda: attn(q, k, v, doc=doc.float()), "argument doc", "int")
    _err(lambda: attn(q, k, v, doc=[1] * 6), "argument doc", "tensor")
    e = _err(lambda: attn(q, k, v, doc=doc, dco=doc), "argument dco", "no input 'dco'")
    assert "did you mean" in str(e) and "doc" in e.hint
    _err(lambda: compiled(CAUSAL)(q, k, v, doc=doc), "argument doc")
    gates = log_gates(gen(1), 2, 6)
    _err(lambda: compiled(VECTOR)(q, k, v, g=gates), "argument g")  # needs [heads, n, dk]
    _err(lambda: compiled(FOX)(q, k, v, g=gates.to(torch.int64)), "argument g", "float")


def test_error_backend_and_sizes():
    _err(
        lambda: attnc.compile_attention(CAUSAL, backend="cuda_magic"),
        "argument backend",
        "cuda_magic",
    )
    grid = "pattern gr\n  tokens grid(y: height, x: width)\n  mask q.y >= k.y\n"
    e = _err(
        lambda: attnc.compile_attention(grid, backend="reference", sizes={"heigth": 4, "width": 4}),
        "argument sizes",
        "heigth",
    )
    assert "height" in (e.hint or "")
    _err(
        lambda: attnc.compile_attention(CAUSAL, backend="reference", sizes={"n2": 4}),
        "argument sizes",
        "n2",
    )
    attn = compiled(grid, sizes={"height": 4, "width": 4})
    q, k, v = qkv(gen(64), 1, 2, 2, 10, 10, 4)
    _err(lambda: attn(q, k, v), "argument q", "10 queries", "16")
    _err(
        lambda: compiled(grid)(q, k, v, sizes={"height": 3, "width": 3}),
        "argument q",
        "10 queries",
        "9",
    )
    _err(lambda: compiled(grid)(q, k, v, sizes={"hieght": 2}), "argument sizes", "hieght")
    _err(lambda: compiled(grid)(q, k, v), "argument sizes", "missing")
    _err(lambda: attn(q, k, v, sizes={"height": 0}), "sizes['height']")


def test_error_other_call_arguments():
    q, k, v = qkv(gen(65), 1, 2, 2, 5, 5, 4)
    _err(lambda: compiled(CAUSAL)(q, k, v, scale=float("nan")), "argument scale")
    _err(lambda: compiled(CAUSAL)(q, k, v, return_state=True), "argument")
    _err(lambda: compiled(RETNET)(q, k, v, return_lse=True), "argument return_lse")
    _err(
        lambda: compiled(RETNET)(q, k, v, initial_state=torch.ones(1, 2, 4, 3)),
        "argument initial_state",
    )
    # self-attention: the queries are the last n of nk keys, so nk < n is refused
    _err(lambda: compiled(CAUSAL)(q, k[:, :, :4], v[:, :, :4]), "argument k", "4 keys", "5 queries")
    _err(lambda: compiled(CAUSAL)(q, k, v[:, :, :4]), "argument v")
    _err(lambda: compiled(CAUSAL)(q, k[..., :3], v), "argument k", "head dim")
    assert issubclass(attnc.SpecError, ValueError)
