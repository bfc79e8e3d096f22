"""The CPU tile executor (backend="cpu") against dense references.

Two kinds of reference:
- ``backend="reference"`` (attnc's exact dense implementation) for every
  stdlib softmax pattern, forward and backward;
- plain torch written here (a dense mask built by hand from the rule, a
  dense softmax) for random patterns, GQA, empty rows, FoX, ALiBi, 2-D
  neighborhoods, mixed precision and the memory bound.

Tolerances: float64 compares at 1e-9 (forward) / 1e-8 (gradients) absolute;
float32 at 2e-5 / 1e-4 (sums over up to ~100 keys in a different order);
bf16 at 3e-2 and fp16 at 4e-3 (one output rounding on values of size < 2,
accumulation in fp32) against a float64 computation on the same rounded inputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from cases import claimed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.runtime.backends.cpu import runner as cpu_backend
from attnc.spec.library import stdlib_index

F64 = dict(out=1e-9, grad=1e-8)
F32 = dict(out=2e-5, grad=1e-4)


# ------------------------------------------------------------ references
def dense_attention(q, k, v, allowed, scale, bias=None, softcap=None):
    """out, lse of softmax attention over ``allowed`` ([B|1, Hq|1, Nq, Nk] bool), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = scale * q @ k.transpose(-1, -2)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]).masked_fill(~allowed, 0.0)
    return p @ v, lse


def qkv(B, Hq, Hkv, N, D, dtype=torch.float64, Dv=None, Nk=None, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    Nk = N if Nk is None else Nk
    shapes = ((B, Hq, N, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv or D))
    return tuple(torch.randn(s, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad) for s in shapes)


def loss_of(out, lse, seed=1):
    """A random linear functional of out and of the finite lse entries."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w2 = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    return (out.double() * w).sum() + torch.where(torch.isfinite(lse), lse.double() * w2, 0.0).sum()


def close(a, b, atol, what=""):
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.isfinite(a).all() or torch.equal(torch.isinf(a), torch.isinf(b)), what
    err = (a.double() - b.double()).nan_to_num(0.0, 0.0, 0.0).abs().max().item() if a.numel() else 0.0
    assert err <= atol, f"{what}: max error {err:.3g} > {atol:.3g}"
    assert torch.equal(torch.isneginf(a), torch.isneginf(b)), f"{what}: -inf entries differ"


def grads(out, lse, tensors):
    return torch.autograd.grad(loss_of(out, lse), tensors)


# ------------------------------------------------------ stdlib patterns
#: every stdlib softmax pattern as this file runs it (``tests/cases.py``)
STDLIB = claimed("cpu")

#: Combined patterns (several attentions summed or merged: no single lse for this table's comparison);
#: tests/patterns/test_nsa.py and tests/patterns/test_combiner.py run them on every backend against float64 references, forward
#: and backward.
COMBINED = {"nsa", "combiner"}
#: Bucketed patterns (a token's output averages its buckets' attentions: no single lse); tests/patterns/test_bucketed.py
#: runs them against a naive float64 loop, forward and backward.
BUCKETED = {"routing_transformer"}


def test_stdlib_table_covers_every_softmax_pattern():
    softmax = {name for name, (_, decl) in stdlib_index().items() if decl.__class__.__name__ != "Recurrence"}
    kinds = {name: attnc.load(f"stdlib:{name}", **(STDLIB[name].params if name in STDLIB else {})).kind
             for name in softmax}
    assert {name for name, kind in kinds.items() if kind == "pattern"} == set(STDLIB)
    assert {name for name, kind in kinds.items() if kind == "combined"} == COMBINED
    assert {name for name, kind in kinds.items() if kind == "bucketed"} == BUCKETED


def _run_stdlib(name, dtype, B=2, H=4, Hkv=2, D=8, seed=0):
    case = STDLIB[name]
    params, sizes, n = case.params, case.sizes, case.tokens
    inputs = case.make_inputs(H, D, seed=seed + 7)
    q, k, v = qkv(B, H, Hkv, n, D, dtype=dtype, seed=seed)
    results = []
    for backend in ("cpu", "reference"):
        attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, sizes=sizes, **params)
        out, lse = attn(q, k, v, return_lse=True, **inputs)
        wrt = [q, k, v, *(t for t in inputs.values() if t.requires_grad)]
        results.append((out, lse, grads(out, lse, wrt)))
    return results


@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_forward_backward_float64(name):
    (out, lse, g), (r_out, r_lse, r_g) = _run_stdlib(name, torch.float64)
    assert out.dtype == torch.float64
    close(out, r_out, F64["out"], "out")
    close(lse, r_lse, F64["out"], "lse")
    for i, (a, b) in enumerate(zip(g, r_g, strict=True)):
        close(a, b, F64["grad"], f"grad {i}")


@pytest.mark.parametrize("name", ["sliding_window", "neighborhood_2d", "forgetting", "alibi", "moba", "biformer",
                                  "xattention"])
def test_stdlib_forward_backward_float32(name):
    (out, lse, g), (r_out, r_lse, r_g) = _run_stdlib(name, torch.float32, seed=3)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    close(out, r_out, F32["out"], "out")
    close(lse, r_lse, F32["out"], "lse")
    for i, (a, b) in enumerate(zip(g, r_g, strict=True)):
        assert a.dtype == (torch.float32 if i < 3 else b.dtype)  # q, k, v, then inputs in their own dtype
        close(a, b, F32["grad"], f"grad {i}")


# --------------------------------------------- random patterns (hypothesis)
# Each term: (spec text, dense rule on index tensors qi, ki, hh [H, 1, 1]).
def _terms(draw):
    w = draw(st.integers(0, 12))
    m = draw(st.integers(1, 6))
    r = draw(st.integers(0, 5))
    blk = draw(st.integers(1, 9))
    options = [
        ("k <= q", lambda qi, ki, hh: ki <= qi),
        (f"q - k < {w}", lambda qi, ki, hh: qi - ki < w),
        (f"abs(q - k) <= {w}", lambda qi, ki, hh: (qi - ki).abs() <= w),
        (f"(q - k) % {m} == {r % m}", lambda qi, ki, hh: (qi - ki) % m == r % m),
        (f"q // {blk} == k // {blk}", lambda qi, ki, hh: qi // blk == ki // blk),
        (f"k < {r}", lambda qi, ki, hh: ki < r),
        (f"q - k <= {w} + 2 * h", lambda qi, ki, hh: qi - ki <= w + 2 * hh),
        (f"(k + h) % {m} != 0", lambda qi, ki, hh: (ki + hh) % m != 0),
    ]
    return draw(st.lists(st.sampled_from(options), min_size=1, max_size=3))


@st.composite
def seq_patterns(draw):
    conj = _terms(draw)
    disj = _terms(draw) if draw(st.booleans()) else []
    text_and = " and ".join(f"({t})" for t, _ in conj)
    text = f"({text_and})" + ("" if not disj else " or (" + " and ".join(f"({t})" for t, _ in disj) + ")")

    def rule(qi, ki, hh):
        a = torch.ones(torch.broadcast_shapes(qi.shape, ki.shape, hh.shape), dtype=torch.bool)
        for _, f in conj:
            a = a & f(qi, ki, hh)
        if disj:
            b = torch.ones_like(a)
            for _, f in disj:
                b = b & f(qi, ki, hh)
            a = a | b
        return a

    return text, rule


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pat=seq_patterns(),
    n=st.integers(1, 70),
    heads=st.sampled_from([(1, 1), (2, 1), (3, 3), (4, 2)]),
    d=st.sampled_from([1, 3, 8]),
    dv=st.sampled_from([None, 5]),
    tiles=st.one_of(st.none(), st.tuples(st.integers(1, 40), st.integers(1, 40))),
    bias=st.booleans(),
    batch=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_random_seq_patterns_against_dense(pat, n, heads, d, dv, tiles, bias, batch, seed):
    text, rule = pat
    spec = f"pattern rnd\n  tokens seq\n  mask {text}\n" + ("  bias -0.25 * (h + 1) * abs(q - k) / n\n" if bias else "")
    Hq, Hkv = heads
    kw = {} if tiles is None else dict(q_tile=tiles[0], kv_tile=tiles[1])
    attn = attnc.compile_attention(spec, backend="cpu", **kw)
    q, k, v = qkv(batch, Hq, Hkv, n, d, Dv=dv, seed=seed)
    out, lse = attn(q, k, v, return_lse=True, scale=0.7)
    idx = torch.arange(n)
    hh = torch.arange(Hq).view(Hq, 1, 1)
    allowed = rule(idx.view(1, n, 1), idx.view(1, 1, n), hh).expand(Hq, n, n)
    b = -0.25 * (hh + 1).double() * (idx.view(n, 1) - idx.view(1, n)).abs() / n if bias else None
    r_out, r_lse = dense_attention(q, k, v, allowed[None], 0.7, bias=b)
    close(out, r_out, F64["out"], "out")
    close(lse, r_lse, F64["out"], "lse")
    if tiles is not None:  # forced tiles (clipped to the sequence)
        assert attn.schedule.q_tile == (min(tiles[0], n),) and attn.schedule.kv_tile == (min(tiles[1], n),)
    for i, (a, r) in enumerate(zip(grads(out, lse, (q, k, v)), grads(r_out, r_lse, (q, k, v)), strict=True)):
        close(a, r, F64["grad"], f"grad {i}")
        assert torch.isfinite(a).all()


def natten_window(L: int, size: int) -> torch.Tensor:
    """[L, L] bool: NATTEN's neighborhood (odd size, no dilation): the window of
    ``size`` keys centred on the query, shifted to stay inside [0, L)."""
    allowed = torch.zeros(L, L, dtype=torch.bool)
    size = min(size, L)
    for i in range(L):
        start = min(max(i - size // 2, 0), L - size)
        allowed[i, start:start + size] = True
    return allowed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hw=st.tuples(st.integers(1, 9), st.integers(1, 11)),
    ks=st.tuples(st.sampled_from([1, 3, 5]), st.sampled_from([1, 3, 7])),
    tile=st.one_of(st.none(), st.tuples(st.integers(1, 5), st.integers(1, 6))),
    kv_tile=st.one_of(st.none(), st.tuples(st.integers(1, 5), st.integers(1, 6))),
    at_call=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_neighborhood_2d_tiles_and_sizes_against_dense(hw, ks, tile, kv_tile, at_call, seed):
    (Hh, Ww), (ky, kx) = hw, ks
    ky, kx = min(ky, Hh - 1 + Hh % 2), min(kx, Ww - 1 + Ww % 2)  # the window must fit the grid
    sizes = {"height": Hh, "width": Ww}
    attn = attnc.compile_attention("stdlib:neighborhood_2d", backend="cpu", kernel_size_y=ky, kernel_size_x=kx, q_tile=tile,
                                   kv_tile=kv_tile, sizes=None if at_call else sizes)
    n = Hh * Ww
    q, k, v = qkv(1, 2, 2, n, 4, seed=seed)
    out, lse = attn(q, k, v, return_lse=True, sizes=sizes if at_call else None)
    wy, wx = natten_window(Hh, ky), natten_window(Ww, kx)
    allowed = (wy[:, None, :, None] & wx[None, :, None, :]).reshape(n, n)
    r_out, r_lse = dense_attention(q, k, v, allowed[None, None], 0.5)
    close(out, r_out, F64["out"], "out")
    close(lse, r_lse, F64["out"], "lse")
    if tile is not None:  # forced tiles, clipped to the grid
        assert attn.schedule.q_tile == (min(tile[0], Hh), min(tile[1], Ww))
    for i, (a, r) in enumerate(zip(grads(out, lse, (q, k, v)), grads(r_out, r_lse, (q, k, v)), strict=True)):
        close(a, r, F64["grad"], f"grad {i}")


@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_fused_backward_float64(name, monkeypatch):
    """A loss of the output alone (no lse gradient) and no float input to differentiate: the
    backward runs torch's fused CPU attention backward per chunk (where the forward ran the fused
    kernel); q, k, v gradients against the reference backend, float64, batch 2, grouped heads."""
    from attnc.runtime.backends.cpu import executor

    case = STDLIB[name]
    params, sizes, n = case.params, case.sizes, case.tokens
    g = torch.Generator().manual_seed(11)
    inputs = {key: t.detach() for key, t in case.make_inputs(4, 8, seed=12).items()}
    q, k, v = qkv(2, 4, 2, n, 8, seed=4)
    w = torch.randn(2, 4, n, 8, generator=g, dtype=torch.float64)
    calls = []
    real = executor._fused_backward
    monkeypatch.setattr(executor, "_fused_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = []
    for backend in ("cpu", "reference"):
        attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, sizes=sizes, **params)
        out = attn(q, k, v, **inputs)
        got.append((out, torch.autograd.grad((out * w).sum(), (q, k, v))))
    close(got[0][0], got[1][0], F64["out"], "out")
    for i, (a, b) in enumerate(zip(got[0][1], got[1][1], strict=True)):
        close(a, b, F64["grad"], f"grad {i}")
    # softcap, sigmoid and softplus (a tanh, the weights' logarithm): the unfused recomputation; music_relative and
    # landmark: their score tables (from q, and k) are differentiated
    assert bool(calls) == (name not in ("softcap", "sigmoid", "softplus", "music_relative", "landmark"))


def test_fused_backward_with_empty_rows_and_padded_tiles():
    attn = attnc.compile_attention("pattern e\n  tokens seq\n  mask q >= 6 and k <= q and q - k < 3\n", backend="cpu",
                                   q_tile=4, kv_tile=5)
    q, k, v = qkv(2, 3, 1, 30, 8, seed=5)
    out = attn(q, k, v)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gq, gk, gv = torch.autograd.grad((out * w).sum(), (q, k, v))
    assert torch.equal(gq[:, :, :6], torch.zeros_like(gq[:, :, :6]))
    idx = torch.arange(30)
    allowed = (idx[:, None] >= 6) & (idx[None] <= idx[:, None]) & (idx[:, None] - idx[None] < 3)
    r_out, _ = dense_attention(q, k, v, allowed[None, None], 1 / math.sqrt(8))
    close(out, r_out, F64["out"], "out")
    for a, r in zip((gq, gk, gv), torch.autograd.grad((r_out * w).sum(), (q, k, v)), strict=True):
        close(a, r, F64["grad"])


# ----------------------------------------------------- specific behaviours
def test_empty_rows_give_zero_and_minus_inf_with_finite_gradients():
    # queries < 6 see nothing; query 20's only key is itself when w == 1
    attn = attnc.compile_attention("pattern e\n  tokens seq\n  mask q >= 6 and k <= q and q - k < 3\n", backend="cpu",
                                   q_tile=4, kv_tile=5)
    q, k, v = qkv(2, 3, 1, 30, 8, seed=5)
    out, lse = attn(q, k, v, return_lse=True)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[:, :, :6], torch.zeros_like(out[:, :, :6]))
    assert torch.isneginf(lse[:, :, :6]).all() and torch.isfinite(lse[:, :, 6:]).all()
    gq, gk, gv = grads(out, lse, (q, k, v))
    assert all(torch.isfinite(t).all() for t in (gq, gk, gv))
    assert torch.equal(gq[:, :, :6], torch.zeros_like(gq[:, :, :6]))
    idx = torch.arange(30)
    allowed = (idx[:, None] >= 6) & (idx[None] <= idx[:, None]) & (idx[:, None] - idx[None] < 3)
    r_out, r_lse = dense_attention(q, k, v, allowed[None, None], 1 / math.sqrt(8))
    close(out, r_out, F64["out"], "out")
    for a, r in zip((gq, gk, gv), grads(r_out, r_lse, (q, k, v)), strict=True):
        close(a, r, F64["grad"])


def test_lse_shape_when_heads_tiles_and_slots_coincide():
    # 2 heads, 2 Q tiles of 2 slots: lse [B, H, tiles, slots] must not be taken for [B, tiles, slots, D]
    attn = attnc.compile_attention("stdlib:sliding_window", window=2, backend="cpu", q_tile=2)
    q, k, v = qkv(1, 2, 2, 3, 4)
    out, lse = attn(q, k, v, return_lse=True)
    assert out.shape == (1, 2, 3, 4) and lse.shape == (1, 2, 3)
    idx = torch.arange(3)
    allowed = (idx[None] <= idx[:, None]) & (idx[:, None] - idx[None] < 2)
    r_out, r_lse = dense_attention(q, k, v, allowed[None, None], 0.5)
    close(out, r_out, F64["out"], "out")
    close(lse, r_lse, F64["out"], "lse")


def test_all_empty_mask():
    attn = attnc.compile_attention("pattern none\n  tokens seq\n  mask k > q + 100\n", backend="cpu")
    q, k, v = qkv(1, 2, 2, 17, 4)
    out, lse = attn(q, k, v, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    gq, gk, gv = torch.autograd.grad(out.sum() + torch.where(torch.isinf(lse), 0.0, lse).sum(), (q, k, v),
                                     allow_unused=True, materialize_grads=True)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in (gq, gk, gv))


def test_lse_gradient_alone_and_scale():
    attn = attnc.compile_attention("stdlib:sliding_window", window=5, backend="cpu", q_tile=6)
    q, k, v = qkv(1, 2, 1, 33, 8, seed=11)
    out, lse = attn(q, k, v, return_lse=True, scale=1.7)
    idx = torch.arange(33)
    allowed = (idx[None] <= idx[:, None]) & (idx[:, None] - idx[None] < 5)
    r_out, r_lse = dense_attention(q, k, v, allowed[None, None], 1.7)
    close(lse, r_lse, F64["out"])
    a = torch.autograd.grad(lse.sum(), (q, k), retain_graph=True)
    r = torch.autograd.grad(r_lse.sum(), (q, k), retain_graph=True)
    for x, y in zip(a, r, strict=True):
        close(x, y, F64["grad"])
    # the output alone (lse unused) also differentiates
    a = torch.autograd.grad((out ** 2).sum(), (q, k, v))
    r = torch.autograd.grad((r_out ** 2).sum(), (q, k, v))
    for x, y in zip(a, r, strict=True):
        close(x, y, F64["grad"])


def fox_reference(q, k, v, g, scale):
    """Forgetting attention: causal, score + sum of log-gates g over (k, q]."""
    n = q.shape[2]
    c = torch.cumsum(g.double(), -1)  # [B|1, H, n]
    decay = c[..., :, None] - c[..., None, :]
    idx = torch.arange(n)
    causal = idx[None] <= idx[:, None]
    return dense_attention(q, k, v, causal[None, None], scale, bias=decay.masked_fill(~causal, 0.0))


@pytest.mark.parametrize("batched", [False, True])
def test_forgetting_gates_with_and_without_batch_dimension(batched):
    B, H, n = 2, 2, 29
    attn = attnc.compile_attention("stdlib:forgetting", backend="cpu", q_tile=8)
    q, k, v = qkv(B, H, H, n, 8, seed=4)
    shape = (B, H, n) if batched else (H, n)
    g = (-torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).requires_grad_()
    out, lse = attn(q, k, v, g=g, return_lse=True)
    r_out, r_lse = fox_reference(q, k, v, g if batched else g[None], 1 / math.sqrt(8))
    close(out, r_out, F64["out"], "out")
    close(lse, r_lse, F64["out"], "lse")
    for i, (a, r) in enumerate(zip(grads(out, lse, (q, k, v, g)), grads(r_out, r_lse, (q, k, v, g)), strict=True)):
        assert a.shape == r.shape
        close(a, r, F64["grad"], f"grad {i}")


@pytest.mark.parametrize("batched", [False, True])
def test_document_ids_with_and_without_batch_dimension(batched):
    B, n = 2, 37
    gen = torch.Generator().manual_seed(9)
    doc = torch.sort(torch.randint(0, 5, (B, n) if batched else (n,), generator=gen), dim=-1).values.to(torch.int32)
    attn = attnc.compile_attention("stdlib:document", backend="cpu", q_tile=8)
    q, k, v = qkv(B, 4, 2, n, 8, seed=2)
    out, lse = attn(q, k, v, doc=doc, return_lse=True)
    d = doc if batched else doc[None].expand(B, n)
    idx = torch.arange(n)
    allowed = (d[:, :, None] == d[:, None, :]) & (idx[None] <= idx[:, None])
    r_out, r_lse = dense_attention(q, k, v, allowed[:, None], 1 / math.sqrt(8))
    close(out, r_out, F64["out"], "out")
    close(lse, r_lse, F64["out"], "lse")
    for i, (a, r) in enumerate(zip(grads(out, lse, (q, k, v)), grads(r_out, r_lse, (q, k, v)), strict=True)):
        close(a, r, F64["grad"], f"grad {i}")


def test_alibi_bias_and_softcap_against_dense():
    n, H = 41, 4
    q, k, v = qkv(1, H, H, n, 8, seed=6)
    idx = torch.arange(n)
    causal = (idx[None] <= idx[:, None])[None, None]
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64).view(1, H, 1, 1)
    out = attnc.compile_attention("stdlib:alibi", backend="cpu", q_tile=16)(q, k, v)
    r_out, _ = dense_attention(q, k, v, causal, 1 / math.sqrt(8), bias=-slopes * (idx[:, None] - idx[None]))
    close(out, r_out, F64["out"], "alibi")
    out = attnc.compile_attention("stdlib:softcap", cap=0.5, backend="cpu", q_tile=16)(q, k, v, scale=2.0)
    r_out, _ = dense_attention(q, k, v, causal, 2.0, softcap=0.5)
    close(out, r_out, F64["out"], "softcap")


@pytest.mark.parametrize("dtype,atol", [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_half_precision_inputs(dtype, atol):
    attn = attnc.compile_attention("stdlib:sliding_window", window=12, backend="cpu")
    q, k, v = qkv(2, 4, 2, 70, 16, dtype=dtype, seed=8)
    out, lse = attn(q, k, v, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    idx = torch.arange(70)
    allowed = ((idx[None] <= idx[:, None]) & (idx[:, None] - idx[None] < 12))[None, None]
    r_out, r_lse = dense_attention(q, k, v, allowed, 0.25)  # float64 on the same rounded inputs
    close(out, r_out, atol, "out")
    close(lse, r_lse, 1e-4, "lse (fp32 accumulation)")
    gq, gk, gv = torch.autograd.grad(out.float().pow(2).sum(), (q, k, v))
    assert gq.dtype == gk.dtype == gv.dtype == dtype
    rq, rk, rv = torch.autograd.grad(r_out.pow(2).sum(), (q, k, v))
    for a, r in ((gq, rq), (gk, rk), (gv, rv)):
        close(a, r, 8 * atol)


@pytest.mark.parametrize("name,spec,kw,inputs", [
    ("window", "stdlib:sliding_window", dict(window=3, q_tile=4, kv_tile=3), {}),
    ("fox", "stdlib:forgetting", dict(q_tile=3), {"g": (2, 9)}),
    ("alibi-gqa", "stdlib:alibi", dict(q_tile=5), {}),
    ("softcap", "stdlib:softcap", dict(cap=0.7, q_tile=4), {}),
])
def test_gradcheck_float64(name, spec, kw, inputs):
    attn = attnc.compile_attention(spec, backend="cpu", **kw)
    Hkv = 1 if name == "alibi-gqa" else 2
    q, k, v = qkv(1, 2, Hkv, 9, 3, seed=12)
    gen = torch.Generator().manual_seed(1)
    extra = {n: (-torch.rand(s, generator=gen, dtype=torch.float64)).requires_grad_() for n, s in inputs.items()}
    names = list(extra)

    def f(q, k, v, *xs):
        return attn(q, k, v, return_lse=True, **dict(zip(names, xs, strict=True)))

    assert torch.autograd.gradcheck(f, (q, k, v, *extra.values()), eps=1e-6, atol=1e-8)


def test_schedule_is_cached_per_shapes(monkeypatch):
    calls = []
    real = cpu_backend.classify_tiles

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_backend, "classify_tiles", counting)
    attn = attnc.compile_attention("stdlib:sliding_window", window=9, backend="cpu")
    q, k, v = qkv(1, 2, 2, 64, 8)
    out = attn(q, k, v)
    first = len(calls)
    assert first >= 1  # the analysis (tile choice and classification) ran
    sched = attn.schedule
    out2 = attn(q, k, v)
    torch.autograd.grad(out2.sum(), (q, k, v))
    assert len(calls) == first and attn.schedule is sched and torch.equal(out, out2)
    attn(*qkv(3, 2, 1, 64, 16, seed=1))  # other batch, heads of k/v and head dim: same schedule
    assert len(calls) == first
    attn(*qkv(1, 2, 2, 65, 8))  # another length: a new analysis
    assert len(calls) > first


def test_data_dependent_mask_reuses_the_schedule_for_equal_inputs(monkeypatch):
    calls = []
    real = cpu_backend.classify_tiles
    monkeypatch.setattr(cpu_backend, "classify_tiles", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    attn = attnc.compile_attention("stdlib:document", backend="cpu")
    q, k, v = qkv(1, 2, 2, 40, 8)
    doc1 = torch.repeat_interleave(torch.arange(4), 10)
    doc2 = torch.repeat_interleave(torch.arange(2), 20)
    out1 = attn(q, k, v, doc=doc1)
    n1 = len(calls)
    torch.autograd.grad(attn(q, k, v, doc=doc1.clone()).sum(), (q, k, v))  # equal ids: no new analysis
    assert len(calls) == n1
    out2 = attn(q, k, v, doc=doc2)
    assert len(calls) > n1
    idx = torch.arange(40)
    for out, doc in ((out1, doc1), (out2, doc2)):
        allowed = (doc[:, None] == doc[None]) & (idx[None] <= idx[:, None])
        close(out, dense_attention(q, k, v, allowed[None, None], 1 / math.sqrt(8))[0], F64["out"])


def test_eager_errors_name_the_argument():
    attn = attnc.compile_attention("stdlib:document", backend="cpu")
    q, k, v = qkv(1, 2, 2, 16, 8, grad=False)
    with pytest.raises(attnc.SpecError, match="missing input 'doc'"):
        attn(q, k, v)
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k, v, doc=torch.zeros(15, dtype=torch.int64))
    assert err.value.where == "argument doc"
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k, v, doc=torch.rand(16))
    assert err.value.where == "argument doc"
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k[:, :, :15], v[:, :, :15], doc=torch.zeros(16, dtype=torch.int64))
    assert err.value.where == "argument k"
    grid = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size_y=3, kernel_size_x=3, backend="cpu")
    with pytest.raises(attnc.SpecError):
        grid(q, k, v)  # grid sizes missing


def test_module_copy_runs_and_report_source():
    attn = attnc.compile_attention("stdlib:sliding_window", window=4, backend="cpu")
    q, k, v = qkv(1, 1, 1, 20, 4, grad=False)
    out = attn(q, k, v)
    twin = copy.deepcopy(attn)
    del attn
    assert torch.equal(twin(q, k, v), out)
    assert "q_tile" in twin.source and twin.schedule is not None


def test_memory_stays_far_below_n_squared():
    """A 65,536-token sliding-window forward: no allocation (and no op) holds an
    N x N tensor. The profiler records every allocation; the largest must stay
    far below N * N bytes (4 GiB for a bool mask, 16 GiB for fp32 scores)."""
    from torch.profiler import ProfilerActivity, profile

    N = 65536
    attn = attnc.compile_attention("stdlib:sliding_window", window=64, backend="cpu", q_tile=64)
    q, k, v = (torch.randn(1, 1, N, 16, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = attn(q, k, v)
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= N * N // 32, f"largest allocation {largest} bytes"
    # spot-check a few rows against a dense computation on their keys
    rows = torch.tensor([0, 63, 64, 40000, N - 1])
    for r in rows.tolist():
        lo = max(0, r - 63)
        s = (q[0, 0, r] @ k[0, 0, lo:r + 1].T) / 4
        ref = torch.softmax(s.double(), -1) @ v[0, 0, lo:r + 1].double()
        assert (out[0, 0, r].double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("spec, params", [("stdlib:sliding_window", {"window": 24}), ("stdlib:alibi", {}),
                                          ("stdlib:document", {})])
def test_fused_kernel_and_unfused_path_agree(monkeypatch, spec, params):
    """The executor runs blocks through torch's fused CPU kernel when it exists; without it
    (older torch, unsupported shapes) the unfused path must give the same answer."""
    from attnc.runtime.backends.cpu import fused as cpu_fused

    torch.manual_seed(3)
    n = 80
    q, k, v = (torch.randn(2, 2, n, 16, dtype=torch.float64) for _ in range(3))
    extra = {"doc": torch.sort(torch.randint(0, 4, (n,))).values} if spec == "stdlib:document" else {}
    fused = attnc.compile_attention(spec, backend="cpu", q_tile=(16,), kv_tile=(16,), **params)
    real, calls = cpu_fused.flash_op(), []
    assert real is not None
    monkeypatch.setattr(cpu_fused, "flash_op", lambda: lambda *a, **kw: calls.append(1) or real(*a, **kw))
    out_f, lse_f = fused(q, k, v, return_lse=True, **extra)
    assert calls  # the fused kernel ran
    monkeypatch.setattr(cpu_fused, "flash_op", lambda: None)
    plain = attnc.compile_attention(spec, backend="cpu", q_tile=(16,), kv_tile=(16,), **params)
    out_p, lse_p = plain(q, k, v, return_lse=True, **extra)
    torch.testing.assert_close(out_f, out_p, rtol=1e-12, atol=1e-12)
    finite = torch.isfinite(lse_p)
    assert torch.equal(finite, torch.isfinite(lse_f))
    torch.testing.assert_close(lse_f[finite], lse_p[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec, params", [
    ("stdlib:biformer", {"region": 2, "topk": 3}),
    ("pattern b\ntokens grid(y: height, x: width)\nmask abs(q.y - k.y) <= 2\nbias -0.3 * abs(q.x - k.x) + 0.1 * h\n",
     {}),
])
@pytest.mark.parametrize("tile", [16, (5,)])
def test_flat_tiles_on_a_grid_against_the_reference(spec, params, tile):
    """One int on a grid means flat tiles of the row-major token order (compiler.analysis.tile_args),
    on the CPU as on Triton: routing and bias evaluated on the flat tokens of each tile."""
    sizes = {"height": 6, "width": 8}
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 48, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    cpu = attnc.compile_attention(spec, backend="cpu", sizes=sizes, q_tile=tile, **params)
    ref = attnc.compile_attention(spec, backend="reference", sizes=sizes, **params)
    o1, o2 = cpu(q, k, v), ref(q, k, v)
    assert cpu.schedule.q_tile == cpu.schedule.kv_tile == (tile if isinstance(tile, tuple) else (tile,))
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    w = torch.randn(o1.shape, generator=g, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((o1 * w).sum(), (q, k, v)), torch.autograd.grad((o2 * w).sum(), (q, k, v)),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("q_tile", [(1, 8), (2, 4), (12,)])
def test_frame_terms_read_from_tables(q_tile):
    """radial's frame terms are read from exact tables when the executor evaluates its mask
    (``compiler.codegen.tables``): out, lse and gradients equal the reference in float64, at box tiles
    inside one frame, across frames, and flat tiles straddling frames."""
    pat = attnc.load("stdlib:radial", block=3, decay_factor=0.5, sink=True)
    sizes = {"frames": 6, "per_frame": 8}
    q, k, v = qkv(1, 2, 2, 48, 8, seed=3)
    cpu = attnc.compile_attention(pat, backend="cpu", q_tile=q_tile, kv_tile=q_tile)
    ref = attnc.compile_attention(pat, backend="reference")
    o1, l1 = cpu(q, k, v, sizes=sizes, return_lse=True)
    o2, l2 = ref(q, k, v, sizes=sizes, return_lse=True)
    close(o1, o2, 1e-12, "out")
    close(l1, l2, 1e-12, "lse")
    for a, b in zip(grads(o1, l1, (q, k, v)), grads(o2, l2, (q, k, v)), strict=True):
        close(a, b, 1e-11, "grad")
    plan = cpu.runner.last
    assert plan.tables and plan.pair_mask is not None and plan.schedule.partial > 0


# ------------------------------------------------ whole-sequence tile, lse gradient
DENSE_LIKE = "pattern dense_like\n  tokens seq\n  mask (q + 2 * k) % 5 != 0 or q == k\n"


def test_dense_like_mask_runs_one_whole_tile_exact_with_lse_gradient():
    """A mask allowing 4/5 of all pairs at 2,048 tokens (>= WHOLE_MIN_TOKENS): the executor takes one
    tile of the whole sequence per side (torch's fused kernel on q, k, v as they are), and its output,
    lse and gradients (a loss of out and lse: the lse's gradient through the fused backward's extra
    feature) equal a dense float64 softmax built here, GQA included."""
    n = cpu_backend.WHOLE_MIN_TOKENS
    i = torch.arange(n)
    for text, batch, heads in ((DENSE_LIKE, 1, (4, 2)), (DENSE_LIKE.replace("% 5", "% (h + 4)"), 2, (3, 3))):
        attn = attnc.compile_attention(text, backend="cpu")
        q, k, v = qkv(batch, *heads, n, 8)
        out, lse = attn(q, k, v, return_lse=True)
        assert "tiles 1 x 1" in attn.source and attn.runner.last.whole
        h = torch.arange(heads[0])[:, None, None]
        modulus = h + 4 if "% (h + 4)" in text else 5
        allowed = (((i[:, None] + 2 * i[None, :]) % modulus != 0) | (i[:, None] == i[None, :]))[None]
        r_out, r_lse = dense_attention(q, k, v, allowed, 8 ** -0.5)
        close(out, r_out, F64["out"], "out")
        close(lse, r_lse, F64["out"], "lse")
        for what, a, r in zip("qkv", grads(out, lse, (q, k, v)), grads(r_out, r_lse, (q, k, v)), strict=True):
            close(a, r, F64["grad"], f"d{what}")
    # a second module of the same mask and sizes reads the same cached masks (every layer of a model)
    again = attnc.compile_attention(text, backend="cpu")
    again(*qkv(batch, *heads, n, 8, grad=False))
    assert again.runner.last.mask_cache is attn.runner.last.mask_cache


def test_whole_tile_only_where_the_fused_kernel_serves_every_pass():
    """The whole tile is not taken where the fused kernel cannot run (Dv != D), below
    ``WHOLE_MIN_TOKENS``, with a bias (its gradient needs the unfused backward) or forced tiles; the
    results there still match the float64 reference."""
    n = cpu_backend.WHOLE_MIN_TOKENS
    i = torch.arange(n)
    allowed = (((i[:, None] + 2 * i[None, :]) % 5 != 0) | (i[:, None] == i[None, :]))[None, None]
    attn = attnc.compile_attention(DENSE_LIKE, backend="cpu")
    q, k, v = qkv(1, 2, 2, n, 8, Dv=4)
    out = attn(q, k, v)
    assert not attn.runner.last.whole and "tiles 1 x 1" not in attn.source
    close(out, dense_attention(q, k, v, allowed, 8 ** -0.5)[0], F64["out"], "Dv != D")
    small = attnc.compile_attention(DENSE_LIKE, backend="cpu")
    small(*qkv(1, 2, 2, n // 2, 8, grad=False))
    assert not small.runner.last.whole
    biased = attnc.compile_attention(DENSE_LIKE + "  bias 0.25 * abs(q - k) / n\n",
                                     backend="cpu")
    biased(*qkv(1, 2, 2, n, 8, grad=False))
    assert not biased.runner.last.whole
    forced = attnc.compile_attention(DENSE_LIKE, backend="cpu", q_tile=64, kv_tile=64)
    forced(*qkv(1, 2, 2, n, 8, grad=False))
    assert not forced.runner.last.whole


def test_whole_mask_per_axis_equals_the_materialized_mask():
    """``tiles.whole_mask`` (a grid mask evaluated per axis, in slabs of rows) is the exact mask in token
    order: radial over 4 frames x 512 tokens, a 2-D neighborhood, a head-dependent 2-D mask, and a
    1-D mask in slabs that do not divide the sequence."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.compiler.analysis import tiles

    head_2d = "pattern hd\n  tokens grid(y: height, x: width)\n  mask abs(q.y - k.y) + abs(q.x - k.x) <= h + 2\n"
    cases = (("stdlib:radial", {"block": 64}, {"frames": 4, "per_frame": 512}, None, 1),
             ("stdlib:neighborhood_2d", {"kernel_size_y": 3, "kernel_size_x": 5}, {"height": 12, "width": 10}, None, 1),
             (head_2d, {}, {"height": 9, "width": 7}, None, 3),
             (DENSE_LIKE, {}, None, 1000, 1))
    slab = tiles.WHOLE_MASK_SLAB_PAIRS
    try:
        tiles.WHOLE_MASK_SLAB_PAIRS = 3 * 1000  # 1-D: slabs of 3 rows, the last one of 1
        for spec, params, sizes, n, heads in cases:
            pat = attnc.compile_attention(spec, backend="cpu", **params).pattern
            bound = E.bind_sizes(pat, n=n, heads=heads, sizes=sizes)
            want = attnc.materialize_mask(spec, n=n, sizes=sizes, heads=heads, **params)
            for h in range(heads):
                assert torch.equal(tiles.whole_mask(pat, bound, E.substitute(pat.mask, bound), h), want[h]), (spec, h)
            assert tiles.head_dependent(pat) == (heads > 1)
    finally:
        tiles.WHOLE_MASK_SLAB_PAIRS = slab


def test_lse_gradient_through_the_fused_backward_of_a_tiled_plan(monkeypatch):
    """A tiled plan (sliding window, 64-token tiles) with a loss of out and lse: the fused backward runs
    (with the lse feature) and equals the dense float64 reference; rows with no allowed key stay 0."""
    from attnc.runtime.backends.cpu import executor

    calls = []
    real = executor._lse_feature
    monkeypatch.setattr(executor, "_lse_feature", lambda *a: calls.append(1) or real(*a))
    attn = attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=40, q_tile=64, kv_tile=64)
    q, k, v = qkv(2, 2, 1, 300, 8)
    out, lse = attn(q, k, v, return_lse=True)
    i = torch.arange(300)
    allowed = ((i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < 40))[None, None]
    r_out, r_lse = dense_attention(q, k, v, allowed, 8 ** -0.5)
    for what, a, r in zip("qkv", grads(out, lse, (q, k, v)), grads(r_out, r_lse, (q, k, v)), strict=True):
        close(a, r, F64["grad"], f"d{what}")
    assert calls, "the lse gradient did not go through the fused backward"


@pytest.mark.parametrize("backend", ["cpu", "auto"])
@pytest.mark.parametrize("strided", ["q", "k", "v"])
@pytest.mark.parametrize("pattern,params,rule", [
    ("sliding_window", {"window": 4}, lambda qp, kp: (kp <= qp) & (qp - kp < 4)),
    ("prefix_lm", {"prefix": 3}, lambda qp, kp: (kp <= qp) | (kp < 3)),
])
def test_queries_after_a_cache_with_a_last_dimension_stride_equal_a_dense_softmax(backend, strided, pattern, params,
                                                                                  rule):
    # torch's fused CPU kernel reads rows as contiguous whatever their stride: a K^T cache's k (stride nk) or a
    # [..., ::2] view came out 0.4-1.9 off without an error (queries after a cache take the row path, which
    # called the kernel on the caller's tensors)
    g = torch.Generator().manual_seed(8)
    n, nk, D = 4, 16, 8
    q, k, v = torch.randn(1, 2, n, D, generator=g), torch.randn(1, 2, nk, D, generator=g), torch.randn(1, 2, nk, D, generator=g)
    given = {"q": q, "k": k, "v": v}
    if strided == "k":  # as a cache kept transposed, [B, H, D, nk]
        given["k"] = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    else:
        wide = torch.full((*given[strided].shape[:-1], 2 * D), 100.0)  # the skipped slots hold other values
        wide[..., ::2] = given[strided]
        given[strided] = wide[..., ::2]
    assert given[strided].stride(-1) != 1
    qp, kp = torch.arange(nk - n, nk)[:, None], torch.arange(nk)[None]
    scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(D)).masked_fill(~rule(qp, kp), -math.inf)
    want = torch.softmax(scores, -1) @ v.double()
    with torch.no_grad():
        out = attnc.compile_attention(f"stdlib:{pattern}", backend=backend, **params)(given["q"], given["k"], given["v"])
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
