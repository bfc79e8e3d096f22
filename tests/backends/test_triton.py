"""The generated Triton kernels, run under Triton's interpreter on CPU tensors.

Every stdlib softmax pattern forward and backward against the reference
backend, a plain-torch dense attention written here for hand-checked cases,
random patterns / tiles / head dims (hypothesis), hostile names, bitwise
repeatability, and reviewed snapshots of the generated source. Sizes are
small: the interpreter runs each program instance in Python.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import tokenize
from pathlib import Path

import pytest
import torch
from cases import claimed
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis.tiles import classify_tiles
from attnc.compiler.codegen.triton import source as codegen
from attnc.compiler.codegen.triton.exprs import LOG2E
from attnc.compiler.cost.model import KernelConfig
from attnc.runtime.backends.triton import forward as FW
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton import runner as T

# the interpreter evaluates masked-out float branches too (e.g. radial's x % 0.0 -> nan), as numpy
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                        "ignore:invalid value:RuntimeWarning")

SNAPSHOTS = Path(__file__).resolve().parents[1] / "snapshots"
UPDATE = os.environ.get("ATTNC_UPDATE_SNAPSHOTS") == "1"


# ----------------------------------------------------------------- helpers
def qkv(B, Hq, Hkv, n, D, Dv=None, dtype=torch.float32, seed=0, nk=None):
    g = torch.Generator().manual_seed(seed)
    nk = n if nk is None else nk
    q = torch.randn(B, Hq, n, D, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, nk, D, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, nk, Dv or D, generator=g, dtype=torch.float32).to(dtype).requires_grad_()
    return q, k, v


def finite(x):
    return torch.where(torch.isinf(x), torch.zeros_like(x), x)


def compare(pat, q, k, v, *, sizes=None, inputs=None, q_tile=None, kv_tile=None, atol=2e-5, scale=None):
    """Triton (interpreter) against the reference backend: out, lse and every gradient."""
    inputs = inputs or {}
    tri = attnc.compile_attention(pat, backend="triton", sizes=sizes, q_tile=q_tile, kv_tile=kv_tile)
    ref = attnc.compile_attention(pat, backend="reference", sizes=sizes)
    o1, l1 = tri(q, k, v, return_lse=True, scale=scale, **inputs)
    o2, l2 = ref(q, k, v, return_lse=True, scale=scale, **inputs)
    assert o1.dtype == q.dtype and o1.shape == o2.shape
    torch.testing.assert_close(o1, o2.to(o1.dtype), atol=atol, rtol=atol)
    assert torch.equal(torch.isinf(l1), torch.isinf(l2)), "rows without allowed keys differ"
    torch.testing.assert_close(finite(l1), finite(l2).to(l1.dtype), atol=atol, rtol=atol)
    leaves = [q, k, v] + [t for t in inputs.values() if t.requires_grad]
    g = torch.Generator().manual_seed(7)
    w = torch.randn(o1.shape, generator=g)
    wl = torch.randn(l1.shape, generator=g)
    g1 = torch.autograd.grad((o1.float() * w).sum() + (finite(l1) * wl).sum(), leaves)
    g2 = torch.autograd.grad((o2.float() * w).sum() + (finite(l2) * wl).sum(), leaves)
    for a, b in zip(g1, g2, strict=True):
        assert not torch.isnan(a).any()
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 5, rtol=atol * 5)
    return tri


def spy_launches(monkeypatch, *keys: str) -> list[tuple]:
    """Every Triton kernel launch from here on, as (kernel name, the value of each of ``keys`` among its
    constants), in launch order."""
    launched = []
    launch = KL.launch_kernel

    def spy(lch, kernel, grid, args, meta, *, backward):
        launched.append((kernel.fn.__name__, *(meta.get(key) for key in keys)))
        return launch(lch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", spy)
    return launched


# ----------------------------------------------------------------- every stdlib softmax pattern
GRID2 = {"height": 6, "width": 8}
#: every stdlib softmax pattern as this file runs it (``tests/cases.py``: parameters, sizes, inputs, its q_tile)
STDLIB = claimed("triton")


def stdlib_inputs(case, n=None):
    """A case's call-time inputs as this file calls the kernels: 2 heads of 16 dims, float32."""
    return case.make_inputs(2, 16, dtype=torch.float32, n=n)


def test_stdlib_table_covers_every_softmax_pattern():
    from attnc.spec.library import stdlib_index

    softmax = {name for name, (_, decl) in stdlib_index().items() if decl.kind == "pattern"}
    # combined patterns (several attentions summed or merged, no single lse for compare()): tests/patterns/test_nsa.py
    # and tests/patterns/test_combiner.py run them on triton, forward and backward
    kinds = {name: attnc.load(f"stdlib:{name}", **(STDLIB[name].params if name in STDLIB else {})).kind
             for name in softmax}
    combined = {name for name, kind in kinds.items() if kind == "combined"}
    assert combined == {"nsa", "combiner"}
    # bucketed patterns (buckets attended in torch on every backend): tests/patterns/test_bucketed.py
    bucketed = {name for name, kind in kinds.items() if kind == "bucketed"}
    assert bucketed == {"routing_transformer"}
    assert softmax - combined - bucketed == set(STDLIB)


@pytest.mark.versions
@pytest.mark.parametrize("name", sorted(STDLIB))
def test_stdlib_forward_backward(name):
    case = STDLIB[name]
    pat = attnc.load(f"stdlib:{name}", **case.params)
    q, k, v = qkv(1, 2, 2, case.tokens, 16)
    compare(pat, q, k, v, sizes=case.sizes, inputs=stdlib_inputs(case), q_tile=case.tiles)


# ----------------------------------------------------------------- launch order tables (compiler.cost.launch_order)
@pytest.mark.parametrize("name,params,n,heads", [
    ("prefix_lm", {"prefix": 5}, 64, (2, 2, 1)),  # causal after a prefix, GQA: one list class, Q and K tables
    ("moba", {"block": 8, "topk": 2}, 48, (2, 2, 2)),  # routed: a Q table per (batch, head) list class
    ("neighborhood_2d", {"kernel_size_y": 3, "kernel_size_x": 5}, None, (1, 2, 2)),  # box tiles on a grid
])
def test_kernels_launched_longest_first(monkeypatch, name, params, n, heads):
    """Every kernel reads its tile from an order table (the longest-first one, forced here: at these
    sizes no order pays) and the answer is unchanged; each launch says it was ordered."""
    from attnc.compiler.cost import launch_order

    monkeypatch.setattr(KL, "choose_order", lambda full, partial, repeat, sms: launch_order.longest_first(full, partial))
    seen = {}
    launch = KL.launch_kernel
    B, Hq, Hkv = heads

    def spy(lch, kernel, grid, args, meta, *, backward):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
        seen[name] = meta.get("ORDERED")
        if name == "attnc_fwd":  # the table it reads: per list class, that class's tiles by visits, most first
            sched = lch.plan.schedule
            table = KL.launch_orders(lch, B, Hq, Hkv, torch.device("cpu"))["Q"]
            assert any(a is table for a in args)
            assert table.shape == (sched.heads_stored, sched.num_q_tiles)
            visits = (sched.full_count + sched.partial_count).long()
            for row, cls_visits in zip(table.long(), visits, strict=True):
                assert sorted(row.tolist()) == list(range(sched.num_q_tiles))
                got = cls_visits[row]
                assert bool((got[:-1] >= got[1:]).all())
            assert sched.heads_stored == (B * Hq if name_of_case == "moba" else 1)
        return launch(lch, kernel, grid, args, meta, backward=backward)

    name_of_case = name
    monkeypatch.setattr(KL, "launch_kernel", spy)
    sizes = GRID2 if n is None else None
    q, k, v = qkv(B, Hq, Hkv, n or math.prod(GRID2.values()), 16, seed=4)
    compare(attnc.load(f"stdlib:{name}", **params), q, k, v, sizes=sizes, q_tile=16 if n else (2, 4),
            kv_tile=16 if n else (2, 4))
    assert seen["attnc_fwd"] is True and seen["attnc_bwd_dq"] is True
    # the dK/dV kernel takes one table for every head: where the lists are per (batch, head), tile order
    assert seen["attnc_bwd_dkdv"] is (name != "moba")


# ----------------------------------------------------------------- lists that are runs of consecutive tiles
@pytest.mark.parametrize("name,params,runs", [
    # one run each: FULL and PARTIAL lists, and their transposes
    ("prefix_lm", {"prefix": 5}, {"FULL": True, "PART": True, "T_FULL": True, "T_PART": True}),
    # the sink tile before the window's diagonal tiles: PARTIAL lists by index
    ("streaming", {"window": 6, "sinks": 2}, {"FULL": True, "PART": False, "T_FULL": True, "T_PART": True}),
    # a route's lists, selected per call (on a GPU, there), are read by index whatever they hold
    ("moba", {"block": 8, "topk": 2}, {"FULL": False, "PART": False, "T_FULL": False, "T_PART": False}),
])
def test_kernels_step_through_runs_bitwise_as_through_indices(monkeypatch, name, params, runs):
    """A list that is one run of consecutive tiles is stepped through with no index load (``{kind}_RUN``):
    each kernel is told which of its lists are runs, and the answer, gradients included, is bitwise the one
    of the same kernels reading every index from the lists (the same tiles in the same order)."""
    seen = {}
    launch = KL.launch_kernel

    def spy(lch, kernel, grid, args, meta, *, backward):
        seen[kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)] = {
            k[:-4]: v for k, v in meta.items() if k.endswith("_RUN")}
        return launch(lch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", spy)
    pat = attnc.load(f"stdlib:{name}", **params)
    q, k, v = qkv(1, 2, 1, 72, 16, seed=3)
    results = []
    for forced in (False, True):
        if forced:
            monkeypatch.setattr(KL, "runs_meta", lambda lch, *kinds: {f"{kind}_RUN": False for kind in kinds})
        tri = attnc.compile_attention(pat, backend="triton", q_tile=16, kv_tile=16)
        out, lse = tri(q, k, v, return_lse=True)
        results.append((out, lse, *torch.autograd.grad(out.square().sum() + lse.sum(), (q, k, v))))
        if not forced:
            assert seen == {"attnc_fwd": {"FULL": runs["FULL"], "PART": runs["PART"]}, "attnc_bwd_delta": {},
                            "attnc_bwd_dq": {"FULL": runs["FULL"], "PART": runs["PART"]},
                            "attnc_bwd_dkdv": {"T_FULL": runs["T_FULL"], "T_PART": runs["T_PART"]}}
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    compare(pat, q, k, v, q_tile=16, kv_tile=16)


def test_backward_of_an_expanded_gradient():
    """``out.sum().backward()`` hands the backward an expanded dO (all strides 0): the row term's kernel
    reads it by its strides."""
    pat = attnc.load("stdlib:sliding_window", window=9)
    q, k, v = qkv(2, 2, 1, 40, 16, seed=5)
    tri = attnc.compile_attention(pat, backend="triton", q_tile=16)
    ref = attnc.compile_attention(pat, backend="reference")
    out, lse = tri(q, k, v, return_lse=True)
    g1 = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
    out2, lse2 = ref(q, k, v, return_lse=True)
    g2 = torch.autograd.grad(out2.sum() + lse2.sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------- an independent dense reference
def dense_attention(q, k, v, allowed, bias=None, scale=None):
    """softmax(scale q k^T + bias, masked) v in float64; rows with no key give zeros."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (1 / math.sqrt(q.shape[-1]) if scale is None else scale) * q @ k.transpose(-1, -2)
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(-1, keepdim=True).nan_to_num(neginf=0.0)
    p = torch.exp(s - m)
    total = p.sum(-1, keepdim=True)
    return (p / total.clamp(min=1e-300)) @ v


def test_against_plain_torch_gqa_odd_head_dim_and_empty_rows():
    # keys strictly in the future within 6, so the last query has no key at all
    n, w = 45, 6
    spec = f"pattern future\n tokens seq\n mask k > q and k - q <= {w}"
    q, k, v = qkv(2, 4, 2, n, 24, Dv=20)
    attn = attnc.compile_attention(spec, backend="triton", q_tile=16, kv_tile=32)
    out, lse = attn(q, k, v, return_lse=True)
    i = torch.arange(n)
    allowed = (i[None, :] > i[:, None]) & (i[None, :] - i[:, None] <= w)
    want = dense_attention(q, k, v, allowed)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, :, -1] == 0) and torch.all(torch.isneginf(lse[:, :, -1]))
    assert torch.isfinite(lse[:, :, :-1]).all()
    grads = torch.autograd.grad(out.sum() + finite(lse).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("scale", [0.7, -0.45, 0.0])
def test_any_scale_against_plain_torch(scale):
    """A positive scale enters the forward's exponent (``POS_SCALE``: the row max of q.k, scaled); zero and
    negative scales are applied to the scores first. Each against a float64 dense softmax, and every
    gradient against the reference backend, on FULL and PARTIAL tiles and rows with no key (the last)."""
    n, w = 70, 40
    spec = f"pattern future\n tokens seq\n mask k > q and k - q <= {w}"
    q, k, v = qkv(1, 2, 1, n, 16, seed=11)
    i = torch.arange(n)
    allowed = (i[None, :] > i[:, None]) & (i[None, :] - i[:, None] <= w)
    pat = attnc.compile_attention(spec).pattern
    schedule = classify_tiles(pat, E.bind_sizes(pat, n=n, heads=2), (16,), (16,))
    assert schedule.full_count.sum() > 0 and schedule.partial_count.sum() > 0
    tri = compare(spec, q, k, v, q_tile=16, kv_tile=16, scale=scale)
    out, lse = tri(q, k, v, return_lse=True, scale=scale)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, allowed, scale=scale), atol=1e-5, rtol=1e-5)
    assert torch.all(out[:, :, -1] == 0) and torch.all(torch.isneginf(lse[:, :, -1]))
    # the last KV tile (keys 64-79 of 70) is FULL for some Q tiles: the forward masks its padded slots on that
    # tile alone (a branch, k_edge); the backward selects P on every padded FULL tile as before
    forward, backward = tri.source.split("def attnc_bwd_delta(")
    assert "k_edge = (kt == 4)" in forward and forward.count("if k_edge:") == 1
    assert "k_edge" not in backward
    if scale == 0.0:  # every allowed key weighs the same: lse is log(count)
        count = allowed.sum(-1)[:-1].double()
        torch.testing.assert_close(lse[0, :, :-1].double(), count.log().expand(2, -1), atol=1e-6, rtol=1e-6)


def test_the_exponent_takes_only_scales_that_stay_normal_float32():
    """POS_SCALE only for a scale whose float32 ``scale * log2(e)`` is a normal number: one that rounds or
    flushes to 0 (or overflows to inf) would turn a masked slot's ``-inf * scale_l2`` into NaN on a GPU (the
    interpreter keeps the constant in float64 and hides it)."""
    launch = type("L", (), {"pattern": attnc.compile_attention("stdlib:sliding_window", window=4).pattern})()
    lo, hi = FW.EXPONENT_SCALES
    assert FW.scale_sign(launch, 1 / 8) == {"POS_SCALE": True}
    assert FW.scale_sign(launch, lo) == {"POS_SCALE": True} and FW.scale_sign(launch, hi) == {"POS_SCALE": True}
    for scale in (0.0, -0.5, 1e-50, lo * 0.999, hi * 1.001, 1e39):
        assert FW.scale_sign(launch, scale) == {"POS_SCALE": False}, scale
    assert torch.tensor(lo * LOG2E, dtype=torch.float32).item() >= 2.0**-126 > 0  # a normal float32
    assert math.isfinite(torch.tensor(hi * LOG2E, dtype=torch.float32).item())
    softcap = type("L", (), {"pattern": attnc.compile_attention("stdlib:softcap").pattern})()
    assert FW.scale_sign(softcap, 1 / 8) == {}  # its scores are more than the scaled q.k


def test_alibi_against_plain_torch():
    n, H = 33, 4
    q, k, v = qkv(1, H, H, n, 16)
    out = attnc.compile_attention("stdlib:alibi", backend="triton", q_tile=16)(q, k, v)
    i = torch.arange(n, dtype=torch.float64)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    bias = -slopes[:, None, None] * (i[:, None] - i[None, :])
    want = dense_attention(q, k, v, i[None, :] <= i[:, None], bias=bias)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.versions
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, atol):
    q, k, v = qkv(1, 2, 1, 40, 32, dtype=dtype)
    attn = attnc.compile_attention("stdlib:sliding_window", window=9, backend="triton", q_tile=16)
    out = attn(q, k, v)
    assert out.dtype == dtype
    i = torch.arange(40)
    want = dense_attention(q, k, v, (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < 9))
    torch.testing.assert_close(out.double(), want, atol=atol, rtol=atol)
    gq, gk, gv = torch.autograd.grad(out.float().sum(), (q, k, v))
    assert gq.dtype == dtype and torch.isfinite(gk.float()).all() and gv.abs().sum() > 0


PER_QUERY_BIAS = "pattern per_query\n  tokens seq\n  input w: float[n]\n  mask causal\n  bias 0.5 * w[q]\n"
PER_HEAD_BIAS = "pattern per_head\n  tokens seq\n  input s: float[heads]\n  mask causal\n  bias s[h] * (q - k) / 8\n"


@pytest.mark.parametrize("name", ["music_relative", "dma", "landmark", "per_query", "per_head"])
def test_bias_input_gradients_are_added_by_the_dq_kernel(monkeypatch, name):
    """The gradients of float inputs of the bias are added by the dQ kernel (``ADD_GRADS``, fp32 atomics at every
    place the bias reads them, summed first along the tile axes the place does not vary along: a per-query input's
    over the keys, a per-head input's over the tile), keeping no dS per visited pair (which took 8.6 GB for Music
    Transformer at 16K tokens on an H100, and ran out of memory beside it); under torch's deterministic mode dS goes
    to the host instead (``STORE_DS``); both paths' gradients equal the reference backend's."""
    g = torch.Generator().manual_seed(11)
    if name in STDLIB:
        case = STDLIB[name]
        pat, sizes, n, tile = attnc.load(f"stdlib:{name}", **case.params), case.sizes, case.n, case.tiles
        inputs = stdlib_inputs(case)
    else:
        pat, sizes, n, tile = attnc.load(PER_QUERY_BIAS if name == "per_query" else PER_HEAD_BIAS), None, 40, 16
        inputs = {"w": torch.randn(n, generator=g)} if name == "per_query" else {"s": torch.rand(2, generator=g)}
        inputs = {key: t.requires_grad_() for key, t in inputs.items()}
    q, k, v = qkv(1, 2, 2, n, 16, seed=3)
    launched = spy_launches(monkeypatch, "ADD_GRADS", "STORE_DS")
    for deterministic in (False, True):
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda d=deterministic: d)
        launched.clear()
        compare(pat, q, k, v, sizes=sizes, inputs=inputs, q_tile=tile)
        assert ("attnc_bwd_dq", not deterministic, deterministic) in launched


# ----------------------------------------------------------------- score inputs, layouts, int64
def test_float_bias_input_and_fox_gradients_batched():
    spec = """pattern biased
      tokens seq
      input b: float[heads, n]
      input g: float[heads, n]
      mask k <= q and q - k < 20
      bias 0.5 * b[h, k] * b[h, q] + (q - k) / 7
      decay g
    """
    n = 37
    gen = torch.Generator().manual_seed(5)
    b = torch.randn(2, 2, n, generator=gen).requires_grad_()  # batched: [B, heads, n]
    g = (-torch.rand(2, n, generator=gen)).requires_grad_()
    q, k, v = qkv(2, 2, 2, n, 16)
    compare(spec, q, k, v, inputs={"b": b, "g": g}, q_tile=16, kv_tile=16)


@pytest.mark.parametrize("cfg,name,sizes,params", [
    (KernelConfig((2, 4), (4, 2), "permute"), "neighborhood_2d", {"height": 6, "width": 7}, {"kernel_size_y": 3, "kernel_size_x": 3}),
    (KernelConfig((1, 2, 4), (1, 2, 4), "flat"), "neighborhood_3d", {"frames": 3, "height": 4, "width": 4},
     {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 3}),
    (KernelConfig((16,), (8,), "flat"), "neighborhood_2d", {"height": 5, "width": 7}, {"kernel_size_y": 3, "kernel_size_x": 5}),
])
def test_layouts_permute_flat_boxes_and_flat_tiles(cfg, name, sizes, params):
    old = T.TritonRunner.config_hook
    T.TritonRunner.config_hook = staticmethod(lambda pat, bound, q, inputs, kv_heads: cfg)
    try:
        n = math.prod(sizes.values())
        q, k, v = qkv(1, 2, 1, n, 20, Dv=12)
        tri = compare(attnc.load(f"stdlib:{name}", **params), q, k, v, sizes=sizes)
        assert ("permuted into tile order" in tri.source) == (cfg.layout == "permute")
        assert tri.schedule.q_tile == cfg.q_tile
    finally:
        T.TritonRunner.config_hook = old


# ----------------------------------------------------------------- tiles loaded by TMA (KernelConfig.tma)
@pytest.mark.versions
@pytest.mark.parametrize("cfg,name,sizes,params,D,Dv,desc", [
    # flat tiles; 72 tokens (the last tile half past the end), GQA, head dims padded to 32
    (KernelConfig((16,), (16,), "flat"), "sliding_window", None, {"window": 9}, 20, 24, True),
    # the backward and the dQ kernel on tiles of their own
    (KernelConfig((32,), (16,), "flat", bwd_q_tile=(16,), bwd_kv_tile=(32,), dq_q_tile=(16,), dq_kv_tile=(32,)),
     "sliding_window", None, {"window": 9}, 16, 16, True),
    # boxes permuted into tile order, tiling the 8 x 8 grid exactly
    (KernelConfig((4, 4), (2, 8), "permute"), "neighborhood_2d", {"height": 8, "width": 8},
     {"kernel_size_y": 3, "kernel_size_x": 5}, 16, 16, True),
    # boxes that pad the grid's edge (a padded slot copies a token there): loaded by pointer
    (KernelConfig((4, 4), (4, 4), "permute"), "neighborhood_2d", {"height": 6, "width": 8},
     {"kernel_size_y": 3, "kernel_size_x": 3}, 16, 16, False),
    # rows of 18 fp32 (72 B) are not 16-byte aligned: TMA cannot address them, loaded by pointer
    (KernelConfig((16,), (16,), "flat"), "sliding_window", None, {"window": 9}, 18, 16, False),
])
def test_tiles_loaded_by_tma_are_bitwise_the_pointer_loads(monkeypatch, cfg, name, sizes, params, D, Dv, desc):
    """A config with ``tma`` loads its streamed tiles as boxes of tensor descriptors where its tiles are whole
    runs of memory rows and the tensors allow it (``DESC``), else by pointer; the answer, gradients included,
    is bitwise the pointer loads' (boxes read 0 past the rows and the head dim, as the masked loads)."""
    seen = {}
    launch = KL.launch_kernel

    def spy(lch, kernel, grid, args, meta, *, backward):
        seen[kernel.fn.__name__] = meta.get("DESC")
        return launch(lch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", spy)
    pat = attnc.load(f"stdlib:{name}", **params)
    n = 72 if sizes is None else math.prod(sizes.values())
    q, k, v = qkv(2, 2, 1, n, D, Dv=Dv, seed=6)
    results = []
    for tma in (False, True):
        monkeypatch.setattr(T.TritonRunner, "config_hook",
                            staticmethod(lambda pat, bound, q, inputs, kv_heads, tma=tma: dataclasses.replace(cfg, tma=tma)))
        tri = attnc.compile_attention(pat, backend="triton", sizes=sizes)
        out, lse = tri(q, k, v, return_lse=True)
        results.append((out, lse, *torch.autograd.grad(out.square().sum() + lse.sum(), (q, k, v))))
        assert seen == {"attnc_fwd": tma and desc, "attnc_bwd_delta": None, "attnc_bwd_dq": tma and desc,
                        "attnc_bwd_dkdv": tma and desc}
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    seen.clear()
    compare(pat, q, k, v, sizes=sizes)  # the TMA config (the hook's last) against the reference backend
    assert seen["attnc_fwd"] == desc
    empty = attnc.compile_attention(pat, backend="triton", sizes=sizes)(q[:0], k[:0], v[:0])  # no box of nothing
    assert empty.shape == (0, *q.shape[1:3], Dv)


# ----------------------------------------------------------------- grouped-query dK/dV split over programs
PER_HEAD = "pattern per_head\n  tokens seq\n  mask q - k <= (if h > 1 then q // 2 else 5) and k <= q\n"


@pytest.mark.versions
@pytest.mark.parametrize("spec,params,make_inputs", [
    ("stdlib:sliding_window", {"window": 9}, None),  # one list class for every head
    (PER_HEAD, {}, None),  # lists per head: each program walks its share's own lists
    # the decay gate's gradient sums dS per key (ROW_SUMS): stored per query head, by exactly one program
    ("stdlib:forgetting", {}, lambda n: {"g": (-torch.rand(4, n, generator=torch.Generator().manual_seed(3)))
                                         .requires_grad_()}),
], ids=["shared lists", "per-head lists", "forgetting"])
def test_grouped_dkdv_split_over_programs(monkeypatch, spec, params, make_inputs):
    """The dK/dV kernel with ``SPLIT`` programs per (KV tile, K/V head), each over its share of the query
    heads and storing fp32 partials summed after, gives the gradients of one program per K/V head (the
    reference's, and one program's to fp32 rounding), repeatably; the grid has B x K/V heads x SPLIT
    columns. 4 query heads share 1 K/V head (splits 1, 2, 4) and 2 share each of 2 (splits 1, 2)."""
    grids = []
    launch = KL.launch_kernel

    def spy(lch, kernel, grid, args, meta, *, backward):
        if kernel.fn.__name__ == "attnc_bwd_dkdv":
            grids.append((grid[1], meta["SPLIT"]))
        return launch(lch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", spy)
    pat = attnc.load(spec, **params)
    n, B = 40, 2
    for kv_heads, splits in ((1, (1, 2, 4)), (2, (1, 2))):
        q, k, v = qkv(B, 4, kv_heads, n, 16, seed=11)
        inputs = make_inputs(n) if make_inputs else {}
        leaves = [q, k, v, *[t for t in inputs.values() if t.requires_grad]]
        grads = {}
        for split in splits:
            monkeypatch.setattr(KL, "_group_split", lambda *args, split=split: split)
            tri = attnc.compile_attention(pat, backend="triton", q_tile=16)
            runs = []
            for _ in range(2):
                out = tri(q, k, v, **inputs)
                runs.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(), leaves))
            for a, b in zip(*runs, strict=True):
                assert torch.equal(a, b)  # the partials are summed in a fixed order
            grads[split] = runs[0]
            assert grids[-1] == (B * kv_heads * split, split)
            if split == splits[-1]:  # the widest split against the reference backend
                compare(pat, q, k, v, inputs=inputs, q_tile=16)
        for split in splits[1:]:
            for a, b in zip(grads[split], grads[1], strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.versions
@pytest.mark.parametrize("name", ["sliding_window", "neighborhood_2d", "neighborhood_3d", "sliding_tile", "softcap",
                                  "alibi", "document", "forgetting", "moba", "token_topk", "longformer"])
def test_backward_in_one_kernel_adds_dq_by_atomics(monkeypatch, name):
    """``KernelConfig.atomic_dq``: no dQ kernel runs, the dK/dV kernel adds dS K into an fp32 dQ with atomics,
    and every gradient matches the reference backend; with GQA (2 query heads on 1 K/V head) and a split over
    programs; a call that needs the decay gates' gradient, or under torch's deterministic mode, runs the dQ
    kernel (bitwise that of a config without atomics)."""
    case = STDLIB[name]
    pat, sizes, n, tile = attnc.load(f"stdlib:{name}", **case.params), case.sizes, case.tokens, case.tiles
    launched = spy_launches(monkeypatch, "ATOMIC_DQ")
    real_config = T.default_config
    atomic = {"on": True}
    monkeypatch.setattr(T, "default_config", lambda *a, **kw: dataclasses.replace(
        real_config(*a, **kw), atomic_dq=atomic["on"], dq_q_tile=(), dq_kv_tile=()))
    q, k, v = qkv(1, 2, 1, n, 16, Dv=8, seed=5)
    inputs = stdlib_inputs(case)
    grad_gates = any(t.requires_grad for t in inputs.values())
    detached = {n_: t.detach() for n_, t in inputs.items()}
    monkeypatch.setattr(KL, "_group_split", lambda *args: 2)
    compare(pat, q, k, v, sizes=sizes, inputs=detached, q_tile=tile)  # dQ by atomics, split over 2 programs
    assert ("attnc_bwd_dq", None) not in launched and ("attnc_bwd_dkdv", True) in launched
    if grad_gates:  # the gates' gradient takes per-query sums of dS: the dQ kernel's
        launched.clear()
        compare(pat, q, k, v, sizes=sizes, inputs=inputs, q_tile=tile)
        assert ("attnc_bwd_dq", None) in launched and ("attnc_bwd_dkdv", False) in launched
    grads = []
    for on, deterministic in ((True, True), (False, False)):
        atomic["on"] = on
        launched.clear()
        monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda d=deterministic: d)
        out = attnc.compile_attention(pat, backend="triton", sizes=sizes, q_tile=tile)(q, k, v, **detached)
        grads.append(torch.autograd.grad(out.sum(), (q, k, v)))
        assert ("attnc_bwd_dq", None) in launched and ("attnc_bwd_dkdv", False) in launched
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cfg,name,sizes,params", [
    # permuted boxes that pad the grid's edge, the backward on tiles of its own
    (KernelConfig((2, 4), (4, 2), "permute", bwd_q_tile=(2, 2), bwd_kv_tile=(2, 2)), "neighborhood_2d",
     {"height": 6, "width": 7}, {"kernel_size_y": 3, "kernel_size_x": 5}),
    # tiles loaded by TMA (the interpreter loads the descriptors' boxes)
    (KernelConfig((16,), (16,), "flat", tma=True), "sliding_window", None, {"window": 9}),
])
def test_backward_in_one_kernel_on_permuted_tiles_own_backward_tiles_and_tma(monkeypatch, cfg, name, sizes, params):
    """dQ by atomics where the dK/dV kernel's tokens are permuted into boxes (padded at the grid's edge), where the
    backward runs tiles of its own, and with descriptor loads: every gradient matches the reference's, 4 query
    heads on 2 K/V heads."""
    launched = spy_launches(monkeypatch, "ATOMIC_DQ", "DESC")
    fused = dataclasses.replace(cfg, atomic_dq=True)
    monkeypatch.setattr(T.TritonRunner, "config_hook", staticmethod(lambda pat, bound, q, inputs, kv_heads: fused))
    n = math.prod(sizes.values()) if sizes else 40
    q, k, v = qkv(1, 4, 2, n, 16, Dv=8, seed=9)
    compare(attnc.load(f"stdlib:{name}", **params), q, k, v, sizes=sizes)
    kernels = {(kname, atomic) for kname, atomic, _ in launched}
    assert ("attnc_bwd_dkdv", True) in kernels and not any(kname == "attnc_bwd_dq" for kname, _ in kernels)
    if cfg.tma:  # the forward's K, V and the dK/dV kernel's Q, dO as descriptor boxes
        assert {kname: desc for kname, _, desc in launched if kname != "attnc_bwd_delta"} == {
            "attnc_fwd": True, "attnc_bwd_dkdv": True}


@pytest.mark.versions
@pytest.mark.parametrize("name,params,sizes,tile,b,heads", [
    # a 2-D grid's 4x4 boxes, its last row and column of tiles past the edge (6x7)
    ("neighborhood_2d", {"kernel_size_y": 3, "kernel_size_x": 5}, {"height": 6, "width": 7}, (4, 4), 2, (4, 2)),
    # a 3-D grid's 2x2x4 boxes past every edge (3x3x5), batch and head merged in the descriptor's first dimension
    ("neighborhood_3d", {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 3},
     {"frames": 3, "height": 3, "width": 5}, (2, 2, 4), 2, (2, 1)),
    # one head (its stride moves nothing) in each of two batches
    ("neighborhood_3d", {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 3},
     {"frames": 3, "height": 3, "width": 5}, (2, 2, 4), 2, (1, 1)),
])
def test_tma_boxes_of_a_grid(monkeypatch, name, params, sizes, tile, b, heads):
    """Tiles of a grid in token order (the ``address`` layout) loaded by TMA as boxes of the grid
    (``triton_tiles.box_tile``): the descriptor's zero fill past the grid's edge stands for the pointer loads'
    masks. Against the reference (output, lse, every gradient; query heads sharing K/V heads) and bitwise against
    the same config loading by pointer; every kernel loads by descriptor."""
    launched = spy_launches(monkeypatch, "DESC")
    monkeypatch.setattr(KL, "CPU_ARCH", "sm90")
    cfg = {"tma": True}
    config = KernelConfig(tile, tile, "address")
    monkeypatch.setattr(T.TritonRunner, "config_hook", staticmethod(
        lambda pat, bound, q, inputs, kv_heads: dataclasses.replace(config, **cfg)))
    q, k, v = qkv(b, *heads, math.prod(sizes.values()), 16, Dv=8, seed=5)
    pat = attnc.load(f"stdlib:{name}", **params)
    w = torch.randn(b, heads[0], q.shape[2], 8, generator=torch.Generator().manual_seed(1))

    def step(backend):
        attn = attnc.compile_attention(pat, backend=backend, sizes=sizes)
        out, lse = attn(q, k, v, return_lse=True)
        return (out, lse, *torch.autograd.grad((out * w).sum(), (q, k, v))), attn

    boxes, tri = step("triton")
    assert tri.runner.last_plan.schedule.q_tile == tile
    assert {desc for kname, desc in launched if kname != "attnc_bwd_delta"} == {True}
    ref, _ = step("reference")
    for a, r in zip(boxes, ref, strict=True):
        torch.testing.assert_close(finite(a), finite(r), atol=1e-4, rtol=1e-4)
    cfg["tma"] = False
    rows, _ = step("triton")
    assert all(torch.equal(a, r) for a, r in zip(boxes, rows, strict=True))


#: A causal window: FULL and PARTIAL tiles, not runs (a Q tile's PARTIAL tiles lie at both ends of its window);
#: strictly causal: both lists runs of consecutive tiles. The first query has no key in either.
WINDOW, CAUSAL = "mask k < q and q - k <= 40", "mask k < q"


@pytest.mark.versions
@pytest.mark.parametrize("arch,mask,expect", [
    # Hopper: one loop, descriptors of its own; both lists runs, then read by index
    ("sm90", CAUSAL, {"WARP_SPEC": True, "ONE_LOOP": True, "DESC": False, "FULL_RUN": True, "PART_RUN": True}),
    ("sm90", WINDOW, {"WARP_SPEC": True, "ONE_LOOP": True, "DESC": False, "FULL_RUN": True, "PART_RUN": False}),
    # Blackwell: the two loops on the host's descriptors; before Hopper (no TMA): not specialized
    ("sm100", WINDOW, {"WARP_SPEC": True, "ONE_LOOP": None, "DESC": True, "FULL_RUN": True, "PART_RUN": False}),
    ("sm80", WINDOW, {"WARP_SPEC": None, "ONE_LOOP": None, "DESC": False, "FULL_RUN": True, "PART_RUN": False}),
])
def test_warp_specialized_forward(monkeypatch, arch, mask, expect):
    """``KernelConfig.warp_specialize`` as each architecture launches it, against the reference (output, lse and
    every gradient) and bitwise against the same config unspecialized: 4 query heads on 2 K/V heads, 70 tokens
    in tiles of 16 (the last KV tile padded), FULL and PARTIAL tiles, a first query with no key. On Hopper the
    forward steps through both lists in one loop, every tile masked, Q, K and V loaded through descriptors the
    kernel makes."""
    launched = spy_launches(monkeypatch, *expect)
    monkeypatch.setattr(KL, "CPU_ARCH", arch)
    cfg = KernelConfig((16,), (16,), "flat", tma=True, warp_specialize=True)
    hook = staticmethod(lambda pat, bound, q, inputs, kv_heads: cfg)
    monkeypatch.setattr(T.TritonRunner, "config_hook", hook)
    q, k, v = qkv(1, 4, 2, 70, 16, Dv=8, seed=11)
    spec = f"pattern window\n tokens seq\n {mask}"
    tri = compare(spec, q, k, v)
    sched = tri.runner.last_plan.schedule
    assert int(sched.full_count.sum()) > 0 and int(sched.partial_count.sum()) > 0  # both lists in the loop
    forwards = [dict(zip(expect, meta, strict=True)) for name, *meta in launched if name == "attnc_fwd"]
    assert forwards and all(m == expect for m in forwards), forwards
    specialized = tri(q, k, v, return_lse=True)
    cfg = dataclasses.replace(cfg, warp_specialize=False)
    plain = attnc.compile_attention(spec, backend="triton")(q, k, v, return_lse=True)
    assert all(torch.equal(a, b) for a, b in zip(specialized, plain, strict=True))


@pytest.mark.versions
def test_scratch_allocator_is_set_for_the_launch_only():
    """A forward in one loop makes its own tensor descriptors, whose global memory Triton asks its allocator for at
    launch: ``_with_scratch`` gives torch memory on the launch's device inside, and leaves the caller's allocator
    as it was outside."""
    from triton.runtime import _allocation

    before = _allocation._allocator.get()
    got = []
    KL._with_scratch(lambda: got.append(_allocation._allocator.get()(256, 128, None)), torch.device("cpu"))
    assert len(got) == 1 and got[0].numel() == 256 and got[0].device.type == "cpu"
    assert _allocation._allocator.get() is before


@pytest.mark.parametrize("name", ["moba", "document", "forgetting"])
def test_warp_specialized_forward_leaves_two_loops_where_one_does_not_apply(monkeypatch, name):
    """On Hopper a forward is put in one loop only where it loads nothing but K and V in it and is not a route's
    (``one_loop_applies``: a route's FULL tiles skip the selection words its PARTIAL tiles read; Triton's pass
    refused a mask input's or a decay's loads): there no ``ONE_LOOP`` parameter is generated and the forward is
    not specialized."""
    launched = spy_launches(monkeypatch, "WARP_SPEC", "ONE_LOOP")
    cfg = KernelConfig((16,), (16,), "flat", tma=True, warp_specialize=True)
    monkeypatch.setattr(T.TritonRunner, "config_hook", staticmethod(lambda pat, bound, q, inputs, kv_heads: cfg))
    case = STDLIB[name]
    q, k, v = qkv(1, 2, 2, case.n, 16, seed=4)
    tri = compare(attnc.load(f"stdlib:{name}", **case.params), q, k, v, sizes=case.sizes, inputs=stdlib_inputs(case))
    assert ("attnc_fwd", None, None) in launched and "ONE_LOOP" not in tri.source


@pytest.mark.versions
@pytest.mark.parametrize("atomic", [False, True])
def test_dkdv_padded_keys_with_overflowing_p(monkeypatch, atomic):
    """The dK/dV kernel's FULL tiles with padded keys (70 keys in tiles of 16): their rows are never stored, so P^T
    is set to 0 there only where dQ sums over the keys (``ATOMIC_DQ``). Every score is -400 (lse about -397):
    a padded key's P^T, exp2(0 - lse), overflows to inf, and must reach no gradient either way."""
    spec = "pattern future\n tokens seq\n mask k > q and k - q <= 40"
    n = 70
    cfg = KernelConfig((16,), (16,), "flat", atomic_dq=atomic)
    monkeypatch.setattr(T.TritonRunner, "config_hook", staticmethod(lambda pat, bound, q, inputs, kv_heads: cfg))
    g = torch.Generator().manual_seed(3)
    # q and k on a grid of 1/64: every score is exact in fp32 (about 400 in magnitude, where one rounding
    # of a score is 2e-5, and the reference's fp32 scores and the kernel's would round apart)
    q = (-10 + torch.round(0.64 * torch.randn(1, 2, n, 16, generator=g)) / 64).requires_grad_()
    k = (10 + torch.round(0.64 * torch.randn(1, 1, n, 16, generator=g)) / 64).requires_grad_()
    v = torch.randn(1, 1, n, 16, generator=g).requires_grad_()
    tri = compare(spec, q, k, v, scale=0.25)
    dkdv = tri.source[tri.source.index("def attnc_bwd_dkdv("):]
    assert "if ATOMIC_DQ:  # dQ sums over this tile's keys: 0 on its padded ones" in dkdv


@pytest.mark.versions
def test_int64_arithmetic_where_int32_overflows():
    # (q - k) * (q + k) * 10**6 reaches 7e9 at n = 64: wrong in int32
    spec = "pattern big\n tokens seq\n mask k <= q and (q - k) * (q + k) * 1000000 % 7 < 4"
    pat = attnc.load(spec)
    ks = codegen.KernelSource(pat, E.bind_sizes(pat, n=64), codegen.ScheduleShape((64,), (64,), (16,), (16,)))
    assert ks.wide_math
    q, k, v = qkv(1, 1, 1, 64, 16)
    compare(pat, q, k, v, q_tile=16)
    small = attnc.load("stdlib:sliding_window", window=4)
    assert not codegen.KernelSource(small, E.bind_sizes(small, n=64),
                                    codegen.ScheduleShape((64,), (64,), (16,), (16,))).wide_math


@pytest.mark.versions
def test_floored_division_and_total_division_by_zero():
    spec = """pattern floors
      tokens seq
      input d: int[n]
      mask (q - k) // 3 >= -2 and (k - q) % 5 != 1 and d[q] // d[k] >= 0 and d[k] % d[q] != 1
        and -7 // (d[q] - 2) <= 3
    """
    n = 40
    d = torch.tensor([(i * 7) % 5 - 2 for i in range(n)])  # negatives and zeros
    q, k, v = qkv(1, 1, 1, n, 16)
    compare(spec, q, k, v, inputs={"d": d}, q_tile=16)


# ----------------------------------------------------------------- hostile names
def test_hostile_names_never_reach_the_kernel():
    spec = """pattern tl(torch = 3, exec = 2, __import__ = 1)
      tokens seq
      input triton: int[n]
      input eval: float[heads, n]
      let os = q - k
      let sys = exec * torch
      mask abs(os) <= sys and triton[q] + __import__ >= triton[k]
      bias eval[h, k]
    """
    n = 40
    ids = torch.arange(n) // 9
    ev = torch.randn(2, n).requires_grad_()
    q, k, v = qkv(1, 2, 2, n, 16)
    tri = compare(spec, q, k, v, inputs={"triton": ids, "eval": ev}, q_tile=16)
    src = tri.source
    names = [t.string for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.NAME]
    for word in ("torch", "exec", "__import__", "eval", "os", "sys"):
        assert word not in names, word
    # a parameter the kernels read at run time is named p_NAME there (``run_values.PREFIX``), never NAME
    assert "p_exec" in names and "p_torch" in names
    lines = [line for line in src.splitlines() if re.search(r"\btriton\b", line)]
    jit = r"@triton\.jit(\(do_not_specialize=\[('p_\w+'(, )?)+\]\))?"
    assert all(re.fullmatch(rf"\s*(import triton(\.language as tl)?|{jit})\s*", line) for line in lines), lines
    assert "def tl" not in src and "tl =" not in src


# ----------------------------------------------------------------- repeatability and backend selection
def test_identical_bits_on_repeated_runs():
    gen = torch.Generator().manual_seed(1)
    g = (-torch.rand(4, 48, generator=gen)).requires_grad_()
    results = []
    for _ in range(2):
        q, k, v = qkv(1, 4, 2, 48, 16, seed=4)
        attn = attnc.compile_attention("stdlib:forgetting", backend="triton", q_tile=16)
        out, lse = attn(q, k, v, return_lse=True, g=g)
        grads = torch.autograd.grad((out * out).sum() + finite(lse).sum(), (q, k, v, g))
        results.append((out, lse, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_repeated_calls_reuse_the_plan_state_and_shapes_interleave(monkeypatch):
    """A second call of the same shapes makes no new tile lists, kernel module or bound sizes (per call,
    each was a host-to-device copy or a sympy substitution); calls of other sizes, interleaved, give each
    its own answer, and a bad call after good ones is still refused."""
    attn = attnc.compile_attention("stdlib:neighborhood_2d", backend="triton", kernel_size_y=3, kernel_size_x=5)
    ref = attnc.compile_attention("stdlib:neighborhood_2d", backend="reference", kernel_size_y=3, kernel_size_x=5)
    made = {"lists": 0, "bind": 0}
    lists, bind = T._lists, E.bind_sizes
    monkeypatch.setattr(T, "_lists", lambda *a: (made.__setitem__("lists", made["lists"] + 1), lists(*a))[1])
    monkeypatch.setattr(E, "bind_sizes", lambda *a, **kw: (made.__setitem__("bind", made["bind"] + 1),
                                                          bind(*a, **kw))[1])
    shapes = [{"height": 4, "width": 6}, {"height": 6, "width": 5}, {"height": 4, "width": 6}]
    seen = []
    for i, sizes in enumerate(shapes):
        q, k, v = qkv(1, 2, 2, sizes["height"] * sizes["width"], 16, seed=i)
        out = attn(q, k, v, sizes=sizes)
        torch.testing.assert_close(out, ref(q, k, v, sizes=sizes), atol=2e-5, rtol=2e-5)
        seen.append((attn.runner.last_plan, dict(attn.runner.last_plan.device_state)))
    # each module binds each of the two shapes once (the third call is the first's shapes)
    assert made == {"lists": 2, "bind": 4}
    assert seen[2][0] is seen[0][0] and seen[2][1] == seen[0][1]
    with pytest.raises(attnc.SpecError, match="argument q"):
        attn(*qkv(1, 2, 2, 25, 16), sizes=shapes[0])
    with pytest.raises(attnc.SpecError, match="argument sizes"):
        attn(*qkv(1, 2, 2, 24, 16), sizes={**shapes[0], "depth": 2})


def test_auto_uses_cpu_executor_on_cpu_tensors_and_source_is_the_kernel():
    auto = attnc.compile_attention("stdlib:sliding_window", window=4)
    q, k, v = qkv(1, 1, 1, 32, 16)
    auto(q, k, v)
    assert "@triton.jit" not in auto.source
    tri = attnc.compile_attention("stdlib:sliding_window", window=4, backend="triton")
    assert "first call" in tri.source
    tri(q, k, v)
    assert tri.source.count("@triton.jit") >= 4 and "def attnc_fwd(" in tri.source
    assert tri.schedule is not None and tri.schedule.num_q_tiles >= 1


def test_float64_is_refused_with_a_clear_error():
    q, k, v = qkv(1, 1, 1, 16, 16, dtype=torch.float64)
    with pytest.raises(attnc.SpecError, match="float16, bfloat16 and float32"):
        attnc.compile_attention("stdlib:sliding_window", window=4, backend="triton")(q, k, v)


# ----------------------------------------------------------------- random patterns, tiles, head dims
TERMS_SEQ = ["k <= q", "abs(q - k) <= {a}", "q // {b} == k // {b}", "(q - k) % {c} == 0", "is_pow2(q - k)",
             "k < {a}", "(q ^ k) & {c} == 0", "log2(q - k + 1) <= {c}", "h * {a} <= q - k or k == q"]


@st.composite
def seq_patterns(draw):
    terms = draw(st.lists(st.sampled_from(TERMS_SEQ), min_size=1, max_size=3, unique=True))
    ops = draw(st.lists(st.sampled_from([" and ", " or "]), min_size=len(terms) - 1, max_size=len(terms) - 1))
    vals = {"a": draw(st.integers(1, 9)), "b": draw(st.integers(2, 9)), "c": draw(st.integers(1, 5))}
    mask = terms[0].format(**vals)
    for op, term in zip(ops, terms[1:], strict=True):
        mask = f"({mask}){op}({term.format(**vals)})"
    bias = draw(st.sampled_from(["", " bias (q - k) / 5", " bias -0.25 * abs(q - k) + h", " softcap 2.5"]))
    return f"pattern rnd\n tokens seq\n mask {mask}\n{bias}"


# ----------------------------------------------------------------- one value per tile
RADIAL = {"block": 4, "decay_factor": 0.5, "sink": True}


@pytest.mark.parametrize(("q_tile", "kv_tile", "q_scalar", "k_scalar"), [
    ((1, 10), (1, 5), True, True),  # boxes inside one frame
    (10, 5, True, True),  # flat tiles dividing the frame: each inside one frame
    (20, 5, False, True),  # a flat Q tile spanning two frames
    ((2, 8), (2, 4), False, False),
])
def test_frame_terms_are_computed_once_per_tile_pair(q_tile, kv_tile, q_scalar, k_scalar):
    """radial's frame terms (distance, bit_length, band, split test) read only the frame coordinate;
    where a tile lies in one frame that coordinate is a scalar and the terms are computed once per
    tile pair. The answer is the reference's either way (out, lse, dq, dk, dv)."""
    sizes = {"frames": 4, "per_frame": 10}
    q, k, v = qkv(1, 2, 2, 40, 16, seed=5)
    tri = compare(attnc.load("stdlib:radial", **RADIAL), q, k, v, sizes=sizes, q_tile=q_tile, kv_tile=kv_tile)
    call = re.search(r"_mask\(q_tok\[:, None\], k_tok\[None, :\], (.*?), h\)", tri.source).group(1)
    assert ("q_c0, " in call) == q_scalar and ("q_c0[:, None]" in call) != q_scalar, call
    assert ("k_c0, " in call) == k_scalar and ("k_c0[None, :]" in call) != k_scalar, call
    assert ("one value per tile" in tri.source) == (q_scalar or k_scalar)


@pytest.mark.parametrize("mask", [
    # an int per score against a float per tile pair: NaN (log, sqrt of a negative), +-inf (x / 0,
    # log 0), exact integers and fractions, each of <=, <, >=, > and both operand orders
    "q.x - k.x <= 3 * log(q.t - k.t) or k.x - q.x > 2.0 / (q.t - k.t)",
    "abs(q.x - k.x) < 2.5 * sqrt(q.t - k.t) and 1.0 * (k.t - q.t) <= q.x",
    "k.x >= q.x + (q.t - k.t) * 0.5 or q.x - k.x >= -1.0 / (k.t - q.t)",
    "(k.x - q.x > log(k.t - q.t + 0.5) * 2) == (q.x < k.x + 0.5 * (q.t + k.t))",
])
def test_int_against_per_tile_float_comparisons(mask):
    """Where the float side has one value per tile pair, the mask compares the int side with an int
    bound computed once (``_int_bound``): the same pairs as the float64 comparison of the reference."""
    spec = f"pattern p\n  tokens grid(t: frames, x: width)\n  mask {mask}\n"
    sizes = {"frames": 4, "width": 12}
    q, k, v = qkv(1, 1, 1, 48, 16, seed=11)
    tri = compare(spec, q, k, v, sizes=sizes, q_tile=(1, 12), kv_tile=(1, 6))
    assert "_int_bound(" in tri.source


def test_uniform_axes():
    from attnc.compiler.analysis.schedule import uniform_axes

    grid = [4, 6, 8]
    assert uniform_axes((4, 6, 8), (1, 2, 8), grid) == {0}
    assert uniform_axes((4, 6, 8), (1, 1, 8), grid) == {0, 1}
    assert uniform_axes((4, 6, 8), (1, 1, 1), grid) == set()  # one token: nothing to share
    assert uniform_axes((192,), (16,), grid) == {0}  # 48 (a frame) is a multiple of 16; a row (8) is not
    assert uniform_axes((192,), (8,), grid) == {0, 1}
    assert uniform_axes((192,), (12,), grid) == {0}
    assert uniform_axes((192,), (32,), grid) == set()  # 48 % 32: a tile straddles two frames
    assert uniform_axes((40,), (8,), []) == set()  # tokens seq: no coordinates


@settings(max_examples=6, deadline=None)
@given(spec=seq_patterns(), n=st.integers(17, 40), tq=st.sampled_from([8, 16, 13]), tk=st.sampled_from([8, 16, 24]),
       D=st.sampled_from([16, 24, 40]))
def test_random_seq_patterns(spec, n, tq, tk, D):
    q, k, v = qkv(1, 2, 1, n, D)
    compare(spec, q, k, v, q_tile=tq, kv_tile=tk)


@settings(max_examples=4, deadline=None)
@given(ky=st.sampled_from([1, 3]), kx=st.sampled_from([3, 5]), dy=st.integers(1, 2), cx=st.booleans(),
       tile=st.sampled_from([(2, 4), (3, 5), (4, 4), (16,)]), H=st.integers(3, 6), W=st.integers(5, 7))
def test_random_grid_tiles(ky, kx, dy, cx, tile, H, W):
    pat = attnc.load("stdlib:neighborhood_2d", kernel_size_y=ky, kernel_size_x=kx, dilation_y=dy, is_causal_x=cx)
    if ky * dy > H:
        return
    q, k, v = qkv(1, 1, 1, H * W, 16)
    compare(pat, q, k, v, sizes={"height": H, "width": W}, q_tile=tile)


# ----------------------------------------------------------------- generated source: deterministic, reviewed
SNAPSHOT_CASES = {
    "sliding_window": (dict(window=4), dict(n=64), 16),
    "neighborhood_2d": (dict(kernel_size_y=3, kernel_size_x=3), dict(sizes={"height": 8, "width": 8}), (4, 4)),
    "forgetting": ({}, dict(n=64, heads=2), 16),
}


def _emit(name):
    params, where, tile = SNAPSHOT_CASES[name]
    return T.emit(attnc.load(f"stdlib:{name}", **params), q_tile=tile, **where)


def test_source_is_deterministic_and_valid_python():
    a = _emit("sliding_window")
    b = T.emit(attnc.load("stdlib:sliding_window", window=4), n=64, q_tile=16)
    assert a == b
    compile(a, "<emitted>", "exec")


@pytest.mark.parametrize("name", sorted(SNAPSHOT_CASES))
def test_source_snapshot(name):
    path = SNAPSHOTS / f"{name}.triton.txt"
    text = _emit(name)
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"missing snapshot {path}: run ATTNC_UPDATE_SNAPSHOTS=1 pytest tests/backends/test_triton.py -k snapshot"
    assert text == path.read_text(encoding="utf-8"), (
        f"the generated source of {name} changed; review the diff and, if intended, regenerate with "
        "ATTNC_UPDATE_SNAPSHOTS=1 pytest tests/backends/test_triton.py -k snapshot")


def test_cli_emit(capsys):
    from attnc import cli

    assert cli.main(["emit", "stdlib:sliding_window", "-p", "window=4", "--n", "64", "--q-tile", "16"]) == 0
    assert capsys.readouterr().out == _emit("sliding_window")
    # a recurrence's kernels are its family's Triton files (tests/project/test_cli_rough_edges.py); a bucketed pattern
    # attends its buckets in torch: no kernel of its own, refused by name
    assert cli.main(["emit", "stdlib:routing_transformer"]) == 1
    assert "routing_transformer" in capsys.readouterr().err


# ----------------------------------------------------------------- input indices, int64 wrap-around, float32 range
BACKENDS = ("reference", "cpu", "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias,extra,value", [
    ("w[k + 1]", {}, 20),  # k = 19 is attended (causal): w has 20 elements
    ("w[idx[k]]", {"idx": torch.full((20,), 100)}, 100),
    ("w[idx[k]] + w[q]", {"idx": torch.tensor([0] * 19 + [-3])}, -3),  # only the last key is out of range
])
def test_bias_index_out_of_range_on_an_attended_pair_raises_on_every_backend(backend, bias, extra, value):
    spec = f"pattern p\n input w: float[n]\n input idx: int[n]\n mask causal\n bias {bias}"
    inputs = {"w": torch.randn(20), "idx": torch.zeros(20, dtype=torch.int64), **extra}
    q, k, v = qkv(1, 1, 1, 20, 16)
    attn = attnc.compile_attention(spec, backend=backend, q_tile=16 if backend != "reference" else None)
    with pytest.raises(attnc.SpecError, match=rf"input 'w' indexed out of range at a \(query, key\) pair the "
                                              rf"pattern attends: index {value} in dimension 0, valid 0\.\.19"):
        attn(q, k, v, **inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_relative_position_bias_is_read_on_attended_pairs_only(backend):
    # rpb is sized for the window: q - k + window is out of range on every masked-out pair
    n, window, H = 30, 3, 2
    spec = f"pattern rpb(window = {window})\n input rpb: float[heads, {2 * window + 1}]\n" \
           " mask abs(q - k) <= window\n bias rpb[h, q - k + window]"
    gen = torch.Generator().manual_seed(2)
    rpb = torch.randn(H, 2 * window + 1, generator=gen, dtype=torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in qkv(1, H, H, n, 16, dtype=torch.float64))
    r = rpb.to(dtype).requires_grad_()
    out = attnc.compile_attention(spec, backend=backend, q_tile=8 if backend != "reference" else None)(q, k, v, rpb=r)
    i = torch.arange(n)
    rel = i[:, None] - i[None, :]
    allowed = rel.abs() <= window
    bias = rpb[:, (rel + window).clamp(0, 2 * window)]  # [H, n, n]; clamped entries are masked out
    want = dense_attention(q, k, v, allowed, bias=bias)
    tol = 2e-5 if backend == "triton" else 1e-12
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    # the gradient of rpb against autograd through the dense float64 formula
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (g,) = torch.autograd.grad((out.double() * w).sum(), [r])
    leaf = rpb.clone().requires_grad_()
    b = leaf[:, (rel + window).clamp(0, 2 * window)]
    s = (q.detach().double() @ k.detach().double().transpose(-1, -2)) / 4.0 + b
    p = torch.softmax(s.masked_fill(~allowed, -math.inf), -1)
    (g_want,) = torch.autograd.grad(((p @ v.detach().double()) * w).sum(), [leaf])
    torch.testing.assert_close(g.double(), g_want, atol=tol * 5, rtol=tol * 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_indices_are_checked_on_every_pair(backend):
    # a mask is read everywhere (the reference evaluates it on the whole matrix): an index that is
    # out of range only where the mask's other term is false is still an error, on every backend
    spec = "pattern p\n input t: int[5]\n mask abs(q - k) <= 2 and t[q - k + 2] > 0"
    q, k, v = qkv(1, 1, 1, 24, 16)
    attn = attnc.compile_attention(spec, backend=backend, q_tile=8 if backend != "reference" else None)
    with pytest.raises(attnc.SpecError, match=r"input 't' indexed out of range in the mask \(evaluated on every "
                                              r"pair\): index (-?\d+) in dimension 0, valid 0\.\.4"):
        attn(q, k, v, t=torch.ones(5, dtype=torch.int64))
    # a mask reading an input through an input: idx = 100 is an error, in-range values match the reference
    spec = "pattern p\n input w: float[n]\n input idx: int[n]\n mask causal and w[idx[k]] > 0.0"
    w = torch.randn(24, generator=torch.Generator().manual_seed(4))
    attn = attnc.compile_attention(spec, backend=backend, q_tile=8 if backend != "reference" else None)
    with pytest.raises(attnc.SpecError, match=r"input 'w' indexed out of range in the mask .*index 100"):
        attn(q, k, v, w=w, idx=torch.full((24,), 100))
    idx = (torch.arange(24) * 5) % 24
    out = attnc.compile_attention(spec, backend=backend, q_tile=8 if backend != "reference" else None)(
        q, k, v, w=w, idx=idx)
    i = torch.arange(24)
    allowed = (i[None, :] <= i[:, None]) & (w[idx] > 0)[None, :]
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, allowed), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", ["(q * s) % 7 < 5", "(q * s) // 7 % 3 == 0 or k == q", "(k * s) % 6 >= 2 or k == 0"])
def test_int64_wrap_around_matches_materialize_mask(mask):
    # q * 2**61 wraps to negative values for q >= 4: floored // and % must see the wrapped value
    n = 40
    spec = f"pattern wrap(s = {2 ** 61})\n tokens seq\n mask {mask}"
    allowed = attnc.materialize_mask(spec, n=n)[0]
    assert 0 < int(allowed.sum()) < n * n
    q, k, v = qkv(1, 1, 1, n, 16)
    out = attnc.compile_attention(spec, backend="triton", q_tile=16)(q, k, v)
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, allowed), atol=2e-5, rtol=2e-5)


def test_float_parameter_beyond_float32_is_refused_when_compiling():
    spec = "pattern p(c = 1.0)\n mask causal\n bias -c * abs(q - k)"
    with pytest.raises(attnc.SpecError, match=r"parameter 'c' = 1e\+39 is beyond the float32 range") as err:
        attnc.compile_attention(attnc.load(spec, c=1e39), backend="triton")
    assert err.value.where == "parameter c"
    # a constant written in the file: its line and column, under a caret
    with pytest.raises(attnc.SpecError, match=r"the constant 2e\+39 is beyond the float32 range") as err:
        attnc.compile_attention("pattern p\n mask causal and (q - k) * 2e39 >= 0.0", backend="triton")
    assert (err.value.pos.line, err.value.pos.col) == (2, 28)
    assert str(err.value).startswith("<spec>:2:28: error:")
    # folded from constants within range: nothing in the file to point at, so the pattern and what happened
    with pytest.raises(attnc.SpecError, match=r"beyond the float32 range") as err:
        attnc.compile_attention("pattern p\n mask causal and (q - k) * 1e20 * 1e20 >= 0.0", backend="triton")
    assert err.value.pos is None and err.value.where == "pattern 'p'" and "folded" in err.value.hint
    # within range: the kernel's float32 bias equals the reference's float64 one rounded to float32
    q, k, v = qkv(1, 1, 1, 20, 16)
    pat = attnc.load(spec, c=3e38)
    out = attnc.compile_attention(pat, backend="triton", q_tile=16)(q, k, v)
    want = attnc.compile_attention(pat, backend="reference")(q, k, v)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("bias", [
    "abs(w[k] - 0.25) * w[q]",
    "min(w[q], w[k])",  # ties on the diagonal: autograd splits the gradient evenly
    "max(w[k], 0.1, 2.0 * w[q])",
    "clamp(w[k], -0.5, 0.5) + w[q]",
    "w[k] // 0.7 + w[q] % 0.7",
    "(w[q] - w[k]) % 1.3 - 2.5 // w[k]",
    "if w[k] > 0.0 then w[k] * w[q] else -abs(w[q])",
    "log(w[k] * w[k] + 5.0) - sqrt(abs(w[q]) + 0.5)",  # sqrt and log differentiate too
    "log(abs(w[q] - w[k]) + 1.0)",
])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bias_input_gradients_through_piecewise_functions(bias, backend):
    n = 24
    spec = f"pattern p\n input w: float[n]\n mask causal\n bias {bias}"
    gen = torch.Generator().manual_seed(11)
    q64, k64, v64 = (torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    w64 = torch.randn(n, generator=gen, dtype=torch.float64)
    weight = torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64)

    def grads(name, dtype, tile):
        leaves = [x.to(dtype).requires_grad_() for x in (q64, k64, v64, w64)]
        out = attnc.compile_attention(spec, backend=name, q_tile=tile)(*leaves[:3], w=leaves[3])
        return torch.autograd.grad((out.double() * weight).sum(), leaves)

    want = grads("reference", torch.float64, None)
    got = grads(backend, torch.float32 if backend == "triton" else torch.float64, 8)
    tol = 1e-4 if backend == "triton" else 1e-10
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol)


@pytest.mark.parametrize("bias", ["max(a[h, q], a[h, k], b[h])", "min(b[h], a[h, k], a[h, q])"])
def test_a_three_way_tie_gives_the_whole_gradient_to_the_tied_arguments(bias):
    # every value equal (constant-initialised parameters): raising a and b together by t raises every score by t,
    # so the gradients of a and b sum to dS's sum, and each backend splits the tie as the reference does (Triton
    # differentiated each read under another order of the arguments: its shares summed to 3/4)
    # sigmoid weights: under softmax a row's dS sums to 0, and a query-only argument's share would not show
    spec = (f"pattern p\n  tokens seq\n  input a: float[heads, n]\n  input b: float[heads]\n  mask causal\n  bias {bias}\n"
            "  weights sigmoid(s)")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 12, 8, generator=gen) for _ in range(3))
    weight = torch.randn(1, 2, 12, 8, generator=gen)

    def grads(backend, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v, torch.full((2, 12), 0.5), torch.full((2,), 0.5))]
        out = attnc.compile_attention(spec, backend=backend, q_tile=None if backend == "reference" else 8)(
            *leaves[:3], a=leaves[3], b=leaves[4])
        return torch.autograd.grad((out * weight.to(dtype)).sum(), leaves[3:])

    da, db = grads("reference", torch.float64)
    for backend in ("cpu", "triton"):
        got_a, got_b = grads(backend, torch.float32)
        torch.testing.assert_close(got_a.double(), da, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got_b.double(), db, atol=1e-5, rtol=1e-5)
    # the shift: a bias that is the same plain input on every pair takes dS's sum
    plain = attnc.compile_attention("pattern c\n  tokens seq\n  input b: float[heads]\n  mask causal\n  bias b[h]\n"
                                    "  weights sigmoid(s)", backend="reference")
    b = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    (ds,) = torch.autograd.grad((plain(q.double(), k.double(), v.double(), b=b) * weight.double()).sum(), [b])
    torch.testing.assert_close(da.sum(-1) + db, ds, atol=1e-10, rtol=1e-10)


def test_only_unproven_bias_indices_are_checked_in_the_kernel():
    def checks(spec, n=32):
        pat = attnc.load(spec)
        return [(str(site.func), j) for site, j in codegen.bias_index_checks(pat, E.bind_sizes(pat, n=n, heads=2))]

    # positions proven in range by intervals: no check code, no error buffer, no host sync
    assert checks("pattern a\n input b: float[heads, n]\n bias b[h, k] + b[h, q // 2]") == []
    src = T.emit(attnc.load("pattern a\n input b: float[heads, n]\n bias b[h, k]"), n=32, q_tile=16)
    assert "ERR" not in src
    # a window-sized table (in range on attended pairs only), an index read from an input
    assert len(checks("pattern r\n input rpb: float[heads, 7]\n mask abs(q - k) <= 3\n bias rpb[h, q - k + 3]")) == 1
    spec = "pattern w\n input w: float[n]\n input idx: int[n]\n bias w[idx[k]] + w[q + 1]"
    assert [j for _, j in checks(spec)] == [0, 0] and len(checks(spec)) == 2


def _mask_on_triton_equals_reference(mask: str, n: int, seed: int) -> None:
    """A one-line mask on Triton (float32) equals the reference on float64 copies of the same inputs."""
    spec = f"pattern p\n  tokens seq\n  mask {mask}\n"
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen) for _ in range(3))
    want = attnc.compile_attention(spec, backend="reference")(q.double(), k.double(), v.double())
    got = attnc.compile_attention(spec, backend="triton")(q, k, v)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", ["k > q or h > 1.5", "(h * 1.0 > 0.5) and causal", "not causal or h >= 0.75",
                                  "(q - k < 3) or (if k < q then false else -10 / (h // 2 + 1) != 11.0005)"])
def test_a_head_only_float_comparison_beside_a_block(mask):
    # a scalar comparison of h joined with a block by and/or, or a branch of an `if` beside a block branch,
    # crashed Triton's interpreter (found by the fuzzer)
    _mask_on_triton_equals_reference(mask, n=11, seed=0)


@pytest.mark.parametrize("flag", ["false", "true"])
def test_a_bool_parameter_or_head_test_as_an_ifs_branch_keeps_the_mask_a_bool(flag):
    # `if ... then flag else <a test of h>`: the int32 parameter (or the interpreter's tag of a scalar
    # comparison) made the mask int32, and the bias's index check stores under it as its mask (found by the fuzzer)
    spec = (f"pattern z(flag = {flag})\n  tokens seq\n  input t: float[heads, 20]\n"
            "  mask 0 <= q - k + 8 < 20 and ((q - k < 2) or (if k < q - 4 then flag else -10 / (h // 2 + 1) != 11.5))\n"
            "  bias t[h, q - k + 8]\n")
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 13, 8, generator=gen) for _ in range(3))
    t = torch.randn(2, 20, generator=gen)
    want = attnc.compile_attention(spec, backend="reference")(q.double(), k.double(), v.double(), t=t.double())
    got = attnc.compile_attention(spec, backend="triton")(q, k, v, t=t)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mask", ["(q - k) * 0.1 < 0.3", "q / 3 - k / 3 < 1.5", "h * 0.5 + q * 0.1 > k * 0.1"])
def test_float_mask_arithmetic_is_double_as_in_the_reference(mask):
    # the language's floats are doubles: in float32, 0.1 * 7 - 0.1 * 4 < 0.3 holds and flips whole rows
    _mask_on_triton_equals_reference(mask, n=23, seed=1)



def test_float_mask_constants_are_exact_doubles_in_the_sm90_ptx():
    # Triton 3.6 rounds a bare Python float to float32 before a float64 comparison (0.3 became
    # 0.30000001192, on the GPU as in the interpreter): the mask's constants must reach the PTX as
    # exact doubles. Offline compile of the forward kernel for sm_90 (no driver needed).
    from attnc.runtime import gpu_check as G

    if not G.targets_available(90):
        pytest.skip("this Triton cannot compile for sm_90 offline")
    pat = attnc.load("pattern p\n  tokens seq\n  mask (q - k) * 0.1 < 0.3\n")
    launches, _ = G.record_call(pat, arch=90, head_dim=64, dtype="fp16", n=256)
    ptx = G.compile_launch(launches[0], 90)[0].asm["ptx"]
    assert re.search(r"setp\.\w+\.f64\s+%p\d+, %rd\d+, 0d3FD3333333333333;", ptx)  # < 0.3, exact
    assert "0d3FB999999999999A" in ptx  # 0.1, exact
    assert "0d3FD3333340000000" not in ptx and "0d3FB99999A0000000" not in ptx  # no float32-rounded copy

# ----------------------------------------------------------------- cheaper score terms, routing words, dK/dV form
def test_softcap_tanh_matches_float64_tanh_over_a_wide_range():
    # _softcap_tanh (one exp2, one reciprocal) as the kernels run it, against float64 tanh: within a
    # few float32 ulp, relative, everywhere; exact +-1 where it saturates, nan stays nan
    src = "import triton\nimport triton.language as tl\n\n\n" + codegen.HELPERS["_softcap_tanh"] + '''

@triton.jit
def run(X, Y, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(Y + i, _softcap_tanh(tl.load(X + i)))
'''
    mod = T.load_kernels(T.write_source(src), interpret=True)
    mags = torch.logspace(-30, 3, 500, dtype=torch.float64)
    x64 = torch.cat([-mags.flip(0), torch.zeros(1, dtype=torch.float64), mags,
                     torch.tensor([1e30, -1e30, math.inf, -math.inf, math.nan], dtype=torch.float64)])
    x64 = torch.cat([x64, torch.zeros(1024 - len(x64), dtype=torch.float64)])
    x = x64.float()
    y = torch.empty_like(x)
    with T.interpreting(True):
        mod.run[(1,)](x, y, N=len(x))
    want = torch.tanh(x.double())
    ok = ~torch.isnan(want)
    assert torch.isnan(y[~ok]).all()
    err = (y[ok].double() - want[ok]).abs()
    assert float(err.max()) <= 4 * 2.0 ** -24, float(err.max())
    big = x.abs() >= 10
    assert torch.equal(y[big], torch.sign(x[big])), "tanh saturates to exactly +-1"
    rel = err / want[ok].abs().clamp(min=1e-300)
    assert float(rel.max()) <= 1.5e-6, float(rel.max())
    assert float(rel[x[ok].abs() < 0.25].max()) <= 3 * 2.0 ** -24


@pytest.mark.parametrize("cap,gain", [(0.05, 4.0), (3.0, 1.0), (1e4, 2.0)])
def test_softcap_saturated_and_linear_regimes(cap, gain):
    # cap 0.05: every score saturates (tanh near +-1); 1e4: tanh(x) ~ x, where cancellation would show
    q, k, v = qkv(1, 2, 1, 24, 16, seed=5)
    q = (q.detach() * gain).requires_grad_()
    compare(attnc.load("stdlib:softcap", cap=cap), q, k, v, q_tile=16, kv_tile=8)


@pytest.mark.parametrize("H", [3, 6])
def test_alibi_slopes_once_per_head_at_any_head_count(H):
    # a head count that is no power of two takes get_slopes' interleaved slopes; the slope is
    # folded per head (_bias_head): the per-score bias has no division, power or exp2 left
    src = T.emit(attnc.load("stdlib:alibi"), n=32, heads=H, q_tile=16)
    per_score = src.split("def _bias(")[1].split("@triton.jit")[0]
    assert "def _bias_head(" in src and "bias_c = _bias_head(h)" in src
    assert not re.search(r"/|exp2|\*\*", per_score.split('"""')[-1]), per_score
    n = 21
    q, k, v = qkv(1, H, H, n, 16, seed=H)
    compare(attnc.load("stdlib:alibi"), q, k, v, q_tile=8)
    out = attnc.compile_attention("stdlib:alibi", backend="triton", q_tile=8)(q, k, v)
    p = 1 << (H.bit_length() - 1)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / p) if h < p else 2 ** (-8 * (2 * (h - p) + 1) / (2 * p))
                           for h in range(H)], dtype=torch.float64)
    i = torch.arange(n, dtype=torch.float64)
    bias = -slopes[:, None, None] * (i[:, None] - i[None, :])
    want = dense_attention(q, k, v, i[None, :] <= i[:, None], bias=bias)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_a_rational_bias_is_one_multiply_per_score():
    spec = "pattern r\n  tokens seq\n  mask causal\n  bias q / 3 - k / 3 - h * (q - k) / 7"
    src = T.emit(attnc.load(spec), n=32, heads=2, q_tile=16)
    assert "/" not in src.split("def _bias(")[1].split('"""')[2].split("@triton.jit")[0]
    q, k, v = qkv(1, 2, 2, 29, 16, seed=9)
    compare(spec, q, k, v, q_tile=16, kv_tile=8)


@pytest.mark.parametrize("block,topk,n,kv_tile,path", [
    (16, 2, 48, 16, "one"),      # each KV tile inside one block: one bit per query
    (8, 2, 40, 16, "words"),     # one word per query
    (1, 6, 72, 24, "words"),     # 72 blocks: tiles straddle words (blocks 24..47 of tile 1)
    (1, 5, 80, 64, "gather"),    # a 64-key tile spreads over 64 blocks: one word per key
])
def test_moba_selection_words_forward_and_gradients(block, topk, n, kv_tile, path):
    pat = attnc.load("stdlib:moba", block=block, topk=topk)
    src = T.emit(pat, n=n, q_tile=16, kv_tile=kv_tile)
    assert ("sel_hi = tl.load(" in src) == (path == "words")
    assert ("sel = tl.load(" in src) == (path == "one")
    assert ("word = tl.load(SEL" in src) == (path == "gather")
    q, k, v = qkv(1, 2, 1, n, 16, seed=block)
    compare(pat, q, k, v, q_tile=16, kv_tile=kv_tile)


def test_selection_words_pack_bits_little_endian_with_a_zero_word():
    from attnc.runtime.plan import routing

    gen = torch.Generator().manual_seed(2)
    sel = torch.rand(2, 3, 5, 70, generator=gen) < 0.4
    words = routing.selection_words(sel)
    assert words.dtype == torch.int32 and words.shape == (2, 3, 5, 4) and (words[..., -1] == 0).all()
    b = torch.arange(70)
    bits = (words[..., b // 32].long() >> (b % 32)) & 1  # arithmetic shift: bit 31 reads back too
    assert torch.equal(bits.bool(), sel)


def test_dkdv_transposed_views_and_separate_loads_agree(monkeypatch):
    # QT_VIEW (sm_90+: Q^T, dO^T as views) and the separate loads (mma.sync GPUs) give the same bits
    pat = attnc.load("stdlib:softcap", cap=2.0)
    q, k, v = qkv(1, 2, 1, 40, 16, seed=4)
    load = T.load_kernels

    class Forced:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *a, **kw: self.fn[grid](*a, **{**kw, "QT_VIEW": True})

    def forced_view(path, interpret=False):
        mod = load(path, interpret=interpret)
        return type("M", (), {"attnc_fwd": mod.attnc_fwd, "attnc_bwd_delta": mod.attnc_bwd_delta,
                              "attnc_bwd_dq": mod.attnc_bwd_dq, "attnc_bwd_dkdv": Forced(mod.attnc_bwd_dkdv)})

    def grads():
        out = attnc.compile_attention(pat, backend="triton", q_tile=16, kv_tile=8)(q, k, v)
        return torch.autograd.grad((out * out).sum(), (q, k, v))

    separate = grads()
    monkeypatch.setattr(T, "load_kernels", forced_view)
    view = grads()
    for a, b in zip(separate, view, strict=True):
        assert torch.equal(a, b)
    compare(pat, q, k, v, q_tile=16, kv_tile=8)


@pytest.mark.parametrize("doc", [[2, 3, 0, 0, 0, 1, 2, 0], [8] * 8])
def test_the_schedule_of_a_mask_reading_inputs_is_the_calls(doc):
    """``attn.schedule`` after a call of a mask reading an input is the tile lists that call ran (made on the device
    from its values), not the candidates' upper bound: here a tile some of whose rows attend nothing is PARTIAL, and
    FULL only where every pair is allowed (differential fuzzing found a FULL tile holding masked pairs)."""
    spec = "pattern p\n  tokens seq\n  input doc: int[n]\n  mask q < doc[q]\n"
    attn = attnc.compile_attention(spec, backend="triton", q_tile=16, kv_tile=16)
    q = torch.randn(1, 1, 8, 16, generator=torch.Generator().manual_seed(0))
    doc = torch.tensor(doc)
    attn(q, q, q, doc=doc)
    want = 2 if bool((torch.arange(8) < doc).all()) else 1  # FULL, else PARTIAL
    assert attn.schedule.classes().flatten().tolist() == [want]
    # the call's lists count no pairs: its density is not a number, never the 0 it read before
    assert math.isnan(attn.schedule.density) and math.isnan(attn.schedule.allowed_total)


def test_a_mask_of_the_head_alone_through_a_float_comparison_runs_in_a_compiled_cache_call():
    """``mask h > 0.5``: the kernel's ``_mask`` is a scalar per head, a float comparison, which Triton's interpreter
    typed so that ``&`` with the tile's bools failed (the compiled KV-cache call, whose block kernel evaluates the
    mask per tile: differential fuzzing found it). Each head equals the reference: head 0 attends nothing."""
    spec = "pattern p\n  tokens seq\n  mask h > 0.5\n"
    attn = attnc.compile_attention(spec, backend="triton")
    ref = attnc.compile_attention(spec, backend="reference")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g) for n in (1, 17, 17))
    torch._dynamo.reset()
    try:
        out = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True, backend="aot_eager")(q, k, v)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, ref(q.double(), k.double(), v.double()).float(), rtol=2e-5, atol=2e-5)
    assert not out[:, 0].any()


@pytest.mark.parametrize("b", [2, 3])
def test_a_mask_condition_on_a_run_time_value_combines_with_the_tiles_pairs(b):
    """``causal and is_pow2(b)``, ``b`` read at run time: the condition is one value per tile, which Triton's
    interpreter typed so that the attended pairs failed as a store's mask (found by the differential fuzz, with a
    bias whose index the kernel checks). Equal to the reference; with ``b`` no power of two, nothing attended."""
    spec = ("pattern p(b = 2, off = 9)\n  tokens seq\n  input rpb: float[heads, 12]\n"
            "  mask 0 <= q - k + off < 12 and causal and is_pow2(b)\n  bias rpb[h, q - k + off]\n")
    attn = attnc.compile_attention(spec, backend="triton", b=b)
    ref = attnc.compile_attention(spec, backend="reference", b=b)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, 14, 8, generator=g) for _ in range(3))
    rpb = torch.randn(1, 12, generator=g)
    out = attn(q, k, v, rpb=rpb)
    torch.testing.assert_close(out, ref(q.double(), k.double(), v.double(), rpb=rpb.double()).float(),
                               rtol=2e-5, atol=2e-5)
    assert bool(out.any()) == (b == 2)


def test_a_bias_input_whose_factor_folds_to_zero_at_the_sizes_has_a_zero_gradient():
    # `w[k] * (4 // n)` reads w in the pattern, but at n > 4 the bound bias reads nothing: the dQ kernel's pass of
    # the bias inputs' gradients called a helper it never defined (found by the fuzzer)
    spec = "pattern z\n  tokens seq\n  input w: float[n]\n  mask abs(q - k) < 4\n  bias w[k] * (4 // n)\n"
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=gen).requires_grad_() for _ in range(3))
    w = torch.randn(9, generator=gen).requires_grad_()
    out = attnc.compile_attention(spec, backend="triton")(q, k, v, w=w)
    out.sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, w)]
    want = attnc.compile_attention(spec, backend="reference")(*leaves[:3], w=leaves[3])
    want.sum().backward()
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    for got, ref in zip((q, k, v), leaves[:3], strict=True):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=2e-5, rtol=2e-5)
    # w's gradient is 0 (the reference's graph does not reach w at all: None)
    assert leaves[3].grad is None and bool((w.grad == 0).all())
