"""backend="flex": every lowerable stdlib softmax pattern against the reference backend.

Outputs, lse and gradients (q, k, v and float inputs) in float64 through Flex's
dense implementation (cheap: no compilation), plus the BlockMask itself: Flex's
dense implementation reads only the mask_mod, its fused kernel also the block
lists, so the lists are checked against the exact mask (every allowed pair in a
listed block, FULL blocks without a masked pair). One test runs the fused kernel
(``torch.compile(fullgraph=True)``) end to end at a tiny size.
"""

from __future__ import annotations

import math

import pytest
import torch
from cases import claimed
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.core.errors import SpecError
from attnc.runtime.backends.flex.runner import FlexRunner

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def qkv(B, Hq, Hkv, N, D, seed, nk=None, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    nk = N if nk is None else nk
    shapes = ((B, Hq, N, D), (B, Hkv, nk, D), (B, Hkv, nk, D + 2))  # Dv != D
    return tuple((scale * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_() for s in shapes)


def flex_module(spec, **kw):
    attn = attnc.compile_attention(spec, backend="flex", **kw)
    attn.runner.compiled = False  # Flex's dense implementation: no compilation in the normal test run
    return attn


def compare(spec, q, k, v, inputs=None, grad_inputs=(), sizes=None, q_tile=None, kv_tile=None, **params):
    """out, lse and gradients of backend='flex' equal the reference backend's; returns the flex module."""
    inputs = dict(inputs or {})
    ref = attnc.compile_attention(spec, backend="reference", sizes=sizes, **params)
    fx = flex_module(spec, sizes=sizes, q_tile=q_tile, kv_tile=kv_tile, **params)
    o1, l1 = ref(q, k, v, return_lse=True, **inputs)
    o2, l2 = fx(q, k, v, return_lse=True, **inputs)
    torch.testing.assert_close(o2, o1, **TIGHT)
    torch.testing.assert_close(l2, l1, **TIGHT)
    wrt = (q, k, v, *(inputs[n] for n in grad_inputs))
    g = torch.randn_like(o1)
    finite = torch.isfinite(l1)
    loss1 = (o1 * g).sum() + (l1[finite] * 0.3).sum()
    loss2 = (o2 * g).sum() + (l2[finite] * 0.3).sum()
    for a, b in zip(torch.autograd.grad(loss1, wrt), torch.autograd.grad(loss2, wrt), strict=True):
        torch.testing.assert_close(b, a, **TIGHT)
    check_block_mask(fx, exact_mask(spec, sizes, inputs, params, q, k))
    return fx


def exact_mask(spec, sizes, inputs, params, q, k):
    """The exact mask ``[B | 1, H, Nq, Nk]`` from attnc's evaluator; routing applied (``routing.select_blocks``)."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.plan import clusters, routing

    n, nk, heads = q.shape[2], k.shape[2], q.shape[1]
    pat = attnc.load(spec, **params)
    vectors = {"q": q.detach(), "k": k.detach()} if clusters.derived_inputs(pat) else {}  # cluster(q | k, C)
    mask = attnc.materialize_mask(spec, n=n, nk=nk if nk != n else None, heads=heads, sizes=sizes,
                                  inputs=inputs or None, **vectors, **params)
    mask = mask if mask.dim() == 4 else mask[None]
    if pat.route is not None:
        bound = E.bind_sizes(pat, n=n, nk=nk if nk != n else None, heads=heads, sizes=sizes)
        mask = routing.select_blocks(pat, bound, q.detach(), k.detach(), mask, inputs)
    return mask


def check_block_mask(fx, mask):
    """The BlockMask of the latest call (what Flex's fused kernel reads besides the mask_mod) agrees
    with the exact mask: every allowed pair lies in a listed block, no FULL block holds a masked pair."""
    plan, bm = fx.runner.last, fx.runner.last_block_mask
    Bm, Hm = bm.kv_num_blocks.shape[:2]
    # lists broadcast over the batch serve every element: listed if any needs it, FULL if all allow it
    mask_any, mask_all = (mask.any(0, keepdim=True), mask.all(0, keepdim=True)) if Bm == 1 else (mask, mask)
    C, H = mask_any.shape[:2]
    Lq, Lk = plan.q_map.length, plan.k_map.length
    qo, ko = plan.q_order, plan.k_order
    q_tok = torch.arange(Lq) if qo.token is None else qo.token
    k_tok = torch.arange(Lk) if ko.token is None else ko.token
    q_valid = torch.ones(Lq, dtype=torch.bool) if qo.position is None else torch.zeros(Lq, dtype=torch.bool).index_fill(
        0, qo.position, True)
    k_valid = torch.ones(Lk, dtype=torch.bool) if ko.position is None else torch.zeros(Lk, dtype=torch.bool).index_fill(
        0, ko.position, True)
    any_pos = mask_any[:, :, q_tok][:, :, :, k_tok] & q_valid[:, None] & k_valid[None, :]
    all_pos = mask_all[:, :, q_tok][:, :, :, k_tok] & k_valid[None, :]
    bq, bk = plan.block_size
    nqb, nkb = -(-Lq // bq), -(-Lk // bk)
    pad_any = torch.zeros(C, H, nqb * bq, nkb * bk, dtype=torch.bool)
    pad_any[:, :, :Lq, :Lk] = any_pos
    # beyond Lq / Lk: outside the sequences (Flex bounds them itself); padded slots inside are real positions
    pad_all = torch.ones(C, H, nqb * bq, nkb * bk, dtype=torch.bool)
    pad_all[:, :, :Lq, :Lk] = all_pos | ~q_valid[:, None]
    blocks_any = pad_any.view(C, H, nqb, bq, nkb, bk).any(5).any(3)
    blocks_all = pad_all.view(C, H, nqb, bq, nkb, bk).all(5).all(3)

    def dense(num, idx):
        out = torch.zeros(Bm, Hm, nqb, nkb, dtype=torch.bool)
        for b in range(Bm):
            for h in range(Hm):
                for r in range(nqb):
                    out[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = True
        return out.expand(C, H, nqb, nkb)

    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    assert not (blocks_any & ~(partial | full)).any(), "an allowed pair lies in an unlisted block"
    assert not (full & ~blocks_all).any(), "a FULL block holds a masked pair"
    assert bm.BLOCK_SIZE == (bq, bk) and bm.seq_lengths == (Lq, Lk)


# ================================================================ 1-D stdlib patterns
SEQ_CASES = [
    ("sliding_window", {"window": 7}, 40, 1, None),
    ("sliding_window", {"window": 5}, 37, 4, None),
    ("streaming", {"window": 5, "sinks": 3}, 37, 1, None),
    ("a_shape", {"local": 6, "sinks": 3}, 29, 2, None),
    ("power", {"block": 4, "local": 2}, 40, 1, None),
    ("logsparse", {}, 33, 1, None),
    ("prefix_lm", {"prefix": 4}, 17, 1, None),
    ("dilated", {"segment": 8, "dilation": 2, "is_causal": True}, 32, 1, None),
    ("longnet", {"segment": 8, "dilation": 2, "is_causal": False}, 32, 4, None),
    ("s2", {"block": 4, "local": 2, "vert": 4, "offset": 1}, 40, 4, None),
    ("neighborhood_1d", {"kernel_size": 5, "dilation": 2, "stride": 2, "is_causal": False}, 30, 2, None),
    ("neighborhood_1d", {"kernel_size": 4, "dilation": 1, "stride": 1, "is_causal": True}, 21, 1, None),
    ("alibi", {}, 23, 4, None),
    ("softcap", {"cap": 2.0}, 19, 2, None),
]


@pytest.mark.parametrize("name,params,n,heads,_", SEQ_CASES)
@pytest.mark.parametrize("tiles", [(8, 4), (16, 16), None])
def test_seq_patterns(name, params, n, heads, _, tiles):
    q, k, v = qkv(2, heads, heads, n, 8, seed=n, scale=3.0 if name == "softcap" else 1.0)
    q_tile, kv_tile = tiles or (None, None)
    compare(f"stdlib:{name}", q, k, v, q_tile=q_tile, kv_tile=kv_tile, **params)


@pytest.mark.parametrize("batched", [False, True])
def test_document_data_dependent_mask(batched):
    n = 25
    g = torch.Generator().manual_seed(3)
    doc = torch.sort(torch.randint(0, 4, (2, n) if batched else (n,), generator=g), dim=-1).values
    q, k, v = qkv(2, 2, 2, n, 8, seed=4)
    fx = compare("stdlib:document", q, k, v, {"doc": doc}, q_tile=8, kv_tile=4)
    # new ids on the same module: new block lists, the same generated mods; equal ids: the same plan
    doc2 = torch.sort(torch.randint(0, 2, (2, n) if batched else (n,), generator=g), dim=-1).values
    before = fx.runner.last
    out = fx(q, k, v, doc=doc2)
    torch.testing.assert_close(out, attnc.compile_attention("stdlib:document", backend="reference")(q, k, v, doc=doc2),
                               **TIGHT)
    after = fx.runner.last
    assert after is not before and after.source is before.source
    check_block_mask(fx, exact_mask("stdlib:document", None, {"doc": doc2}, {}, q, k))
    fx(q, k, v, doc=doc2.clone())
    assert fx.runner.last is after


def test_longformer_global_tokens():
    n = 30
    glob = torch.zeros(n, dtype=torch.int64)
    glob[[0, 17]] = 1
    q, k, v = qkv(1, 2, 2, n, 8, seed=5)
    compare("stdlib:longformer", q, k, v, {"is_global": glob}, window=6, q_tile=8, kv_tile=8)


@pytest.mark.parametrize("batched", [False, True])
def test_forgetting_decay_gates(batched):
    B, H, n = 2, 3, 21
    q, k, v = qkv(B, H, H, n, 8, seed=6)
    g = torch.Generator().manual_seed(7)
    gates = torch.nn.functional.logsigmoid(torch.randn((B, H, n) if batched else (H, n), generator=g,
                                                       dtype=torch.float64)).requires_grad_()
    compare("stdlib:forgetting", q, k, v, {"g": gates}, grad_inputs=("g",), q_tile=8, kv_tile=4)


def test_gqa_and_head_dependent_terms():
    # 4 query heads over 2 K/V heads; the ALiBi slope and the LongNet mask depend on the query head
    q, k, v = qkv(2, 4, 2, 24, 8, seed=8)
    compare("stdlib:alibi", q, k, v, q_tile=8, kv_tile=8)
    compare("stdlib:longnet", q, k, v, segment=8, dilation=2, is_causal=True, q_tile=8, kv_tile=4)


# ================================================================ grids
GRID_CASES = [
    ("neighborhood_2d", {"height": 9, "width": 7}, {"kernel_size_y": 3, "kernel_size_x": 5, "dilation_y": 1, "dilation_x": 1, "stride_y": 1, "stride_x": 2}),
    ("neighborhood_2d", {"height": 8, "width": 10},
     {"kernel_size_y": 3, "kernel_size_x": 5, "dilation_y": 2, "dilation_x": 2, "stride_y": 1, "stride_x": 5, "is_causal_y": True}),
    ("neighborhood_3d", {"frames": 4, "height": 5, "width": 6}, {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 3}),
    ("sliding_tile", {"frames": 5, "height": 7, "width": 8},
     {"tile_t": 2, "tile_y": 3, "tile_x": 2, "wt": 3, "wy": 3, "wx": 1}),
    ("radial", {"frames": 6, "per_frame": 12}, {"block": 3, "sink": True}),
]


def _grid_tiles(sizes, kind):
    axes = len(sizes)
    if kind == "box":  # non-contiguous boxes with padding: the tile-major permutation
        return ((2,) * (axes - 1) + (4,), (2,) * axes)
    if kind == "flat":  # 1-D tiles of the row-major order
        return (16,), (8,)
    return None, None


@pytest.mark.parametrize("name,sizes,params", GRID_CASES)
@pytest.mark.parametrize("kind", ["box", "flat", "auto"])
def test_grid_patterns(name, sizes, params, kind):
    n = math.prod(sizes.values())
    q, k, v = qkv(1, 2, 2, n, 8, seed=n)
    q_tile, kv_tile = _grid_tiles(sizes, kind)
    fx = compare(f"stdlib:{name}", q, k, v, sizes=sizes, q_tile=q_tile, kv_tile=kv_tile, **params)
    if kind == "box":
        plan = fx.runner.last
        assert plan.q_map.permuted and plan.k_map.permuted
        assert plan.k_map.padded == any(L % t for L, t in zip(sizes.values(), kv_tile, strict=True))
        assert "tile-major" in fx.source


@pytest.mark.parametrize("kind", ["box", "flat"])
@pytest.mark.parametrize("mask", [
    "(k.x - q.x) * 0.5 <= log(q.t + 1) * (k.t + 2) - bit_length(q.t * 3 + k.t) and (q.t * 5 + k.t) % 3 != 1"
    " or k.t ** 2 == q.t + 1",
    # an int per pair against a float of the frames: a table of int bounds (NaN, +-inf, exact ints)
    "q.x - k.x <= 3 * log(q.t - k.t) or k.x - q.x > 2.0 / (q.t - k.t) or q.x < k.x + sqrt(k.t - q.t) - 0.5"
    " or k.x >= q.x + (q.t - k.t) * 1.5",
])
def test_coordinate_terms_become_exact_tables(kind, mask, monkeypatch):
    """A mask term of grid coordinates alone is read from a table of the reference evaluator's
    values (``tables.tabulate``): not symmetric in q and k, floats, ints and bools, padded
    edge tiles; the same output and gradients as the reference (float64). Tables are capped at 30
    entries here, so only the frame terms (5 x 5) are tabulated, not the whole mask."""
    from attnc.compiler.codegen import tables as TB

    monkeypatch.setattr(TB, "TABLE_ENTRIES", 30)
    spec = f"pattern p\n  tokens grid(t: frames, x: width)\n  mask {mask}\n"
    sizes = {"frames": 5, "width": 7}
    q, k, v = qkv(1, 2, 2, 35, 8, seed=4)
    q_tile, kv_tile = ((2, 4), (2, 3)) if kind == "box" else ((16,), (8,))
    fx = compare(spec, q, k, v, sizes=sizes, q_tile=q_tile, kv_tile=kv_tile)
    tables = fx.runner.last.source.tables
    assert tables and all(t.shape == (5, 5) for t in tables.values())
    body = fx.source.split("def mask_mod")[1]
    assert "TAB0[" in body and "bit_length" not in body and "torch.log" not in body
    if "log(q.t - k.t)" in mask:  # q.x - k.x <= 3 * log(...): an int compared with a table of int bounds
        assert "(q_c1 - k_c1) <= TAB" in body and "(k_c1 - q_c1) > TAB" in body


def test_tables_follow_the_call_sizes():
    """Plans of two sizes may share generated mods (equal text: radial's tables are read without
    clamps, so the frame count is not in the text); each call reads its own plan's tables."""
    attn = attnc.compile_attention(attnc.load("stdlib:radial", block=2), backend="flex", q_tile=(8,), kv_tile=(8,))
    ref = attnc.compile_attention(attnc.load("stdlib:radial", block=2), backend="reference")
    for frames in (3, 6, 3):
        sizes = {"frames": frames, "per_frame": 8}
        q, k, v = qkv(1, 1, 1, 8 * frames, 4, seed=frames)
        torch.testing.assert_close(attn(q, k, v, sizes=sizes), ref(q, k, v, sizes=sizes))
        assert attn.runner.last.source.tables["#table0"].shape[0] == frames


@pytest.mark.parametrize("backend", ["cpu", "flex"])
@pytest.mark.parametrize("spec", [
    # a Piecewise branch of frame terms alone: its value and condition are tabulated, never the pair
    "pattern p\n  tokens grid(t: frames, x: width)\n"
    "  mask abs(q.x - k.x) <= (if abs(q.t - k.t) >= 2 then 8 // abs(q.t - k.t) else q.x + h)\n",
    # an input named like a table: tables are named so that no input can be (``tables.TABLE_PREFIX``)
    "pattern p\n  tokens grid(t: frames, x: width)\n  input __table0: int[n]\n"
    "  mask __table0[q.t * width + q.x] == __table0[k.t * width + k.x]"
    " or abs(q.x - k.x) <= bit_length(abs(q.t - k.t)) * 2 + h\n",
])
def test_tables_beside_branches_and_inputs(backend, spec):
    sizes = {"frames": 4, "width": 8}
    q, k, v = qkv(1, 2, 2, 32, 8, seed=6)
    inputs = {"__table0": torch.arange(32) % 3} if "input" in spec else {}
    attn = attnc.compile_attention(spec, backend=backend, q_tile=(1, 8), kv_tile=(1, 8))
    ref = attnc.compile_attention(spec, backend="reference")
    torch.testing.assert_close(attn(q, k, v, sizes=sizes, **inputs), ref(q, k, v, sizes=sizes, **inputs))


def test_grid_box_tiles_are_flex_blocks():
    """On a grid, a Flex block is an attnc box tile: 8x8 Q tiles and 2x2 KV tiles on 24x24."""
    sizes = {"height": 24, "width": 24}
    q, k, v = qkv(1, 1, 1, 576, 4, seed=9)
    fx = compare("stdlib:neighborhood_2d", q, k, v, sizes=sizes, q_tile=(8, 8), kv_tile=(2, 2), kernel_size=13)
    plan = fx.runner.last
    assert plan.block_size == (64, 4) and plan.schedule.q_tile == (8, 8)
    # neither box is a run of the row-major order: both sides are permuted, without padding
    assert plan.q_map.permuted and plan.k_map.permuted and not plan.k_map.padded
    assert plan.schedule.full > 0 and plan.schedule.empty > 0


def _flex_gpu_kernel_blocks() -> set[int]:
    """The token blocks of FlexAttention's GPU kernels for d = 128 in bf16 and fp16 on sm80, sm90 and
    sm100, as torch's own heuristics pick them (forward BLOCK_M, BLOCK_N; backward BLOCK_M1, BLOCK_N1,
    BLOCK_M2, BLOCK_N2): a BlockMask block must be a multiple of each (``torch/_inductor/kernel/flex``
    refuses it otherwise). torch's sm90 values where its heuristics cannot be read."""
    from unittest import mock

    try:
        from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

        heuristics, blocks = CUDAConfigHeuristic(), set()
        for capability in ((8, 0), (9, 0), (10, 0)):
            with mock.patch.object(torch.cuda, "get_device_capability", return_value=capability):
                for dtype in (torch.bfloat16, torch.float16):
                    for c in heuristics.get_flex_attn_fwd_configs(128, dtype):
                        blocks |= {c.block_m, c.block_n}
                    for c in heuristics.get_flex_attn_bwd_configs(128, dtype):
                        blocks |= {c.block_m1, c.block_n1, c.block_m2, c.block_n2}
        return blocks
    except (ImportError, AttributeError, TypeError):  # torch's private heuristics moved
        return {128, 64}


#: The grid cases of the GPU conformance run (benchmarks/gpu_conformance.py, 64 x 64, 4 heads): window_2d
#: and halo_2d failed there with Flex's kernel over the GPU's shared memory, neighborhood_2d passed.
GPU_GRID_CASES = {
    "window_2d": {"window": 8, "shift": 4},
    "halo_2d": {"block": 8, "halo": 3},
    "neighborhood_2d": {"kernel_size_y": 13, "kernel_size_x": 13},
}


@pytest.mark.parametrize("name", sorted(GPU_GRID_CASES))
def test_cuda_plans_fit_flex_gpu_kernels(name):
    """What a CUDA call at the GPU run's size hands FlexAttention: BlockMask blocks of 128 tokens (Flex's
    own default), multiples of every kernel block torch picks, and a mask_mod that reads no table. A table
    read is a gather per token pair that Triton stages through shared memory (BLOCK_M x BLOCK_N int64 per
    table: ``runner.CUDA_TABLES``); window_2d's and halo_2d's tables put their kernels over an H200's."""
    from attnc.compiler.analysis import evaluate as E

    sizes = {"height": 64, "width": 64}
    runner = attnc.compile_attention(f"stdlib:{name}", backend="flex", sizes=sizes, **GPU_GRID_CASES[name]).runner
    bound = E.bind_sizes(runner.pattern, n=4096, nk=4096, heads=4, sizes=sizes, dk=128)
    plan = runner.plan(bound, {}, frozenset(), cuda=True)
    kernel_blocks = _flex_gpu_kernel_blocks()
    assert kernel_blocks and all(b >= 16 and b & (b - 1) == 0 for b in kernel_blocks)
    assert plan.block_size == (128, 128)
    assert all(size % b == 0 for size in plan.block_size for b in kernel_blocks)
    assert plan.source.tables == {} and plan.source.mask_inputs == ()
    assert "TAB" not in plan.source.body
    # the CPU plan keeps its tables (a CPU speed-up) where the mask has terms of coordinates alone
    cpu = runner.plan(bound, {}, frozenset(), cuda=False)
    assert bool(cpu.source.tables) == (name != "neighborhood_2d")


@pytest.mark.parametrize("name, params, sizes", [
    ("window_2d", {"window": 8, "shift": 4}, {"height": 16, "width": 24}),
    ("halo_2d", {"block": 8, "halo": 3}, {"height": 16, "width": 24}),
    ("neighborhood_2d", {"kernel_size_y": 5, "kernel_size_x": 7}, {"height": 16, "width": 24}),
    ("radial", {"block": 4}, {"frames": 6, "per_frame": 32}),
])
def test_cuda_plans_are_exact(name, params, sizes, monkeypatch):
    """The mods and BlockMask a CUDA call gets (terms computed in the mask_mod, not read from tables;
    128-token blocks) equal the reference: run here through Flex's dense implementation with the CUDA
    plan, outputs, lse and gradients in float64, and the BlockMask lists against the exact mask."""
    plan = FlexRunner.plan
    monkeypatch.setattr(FlexRunner, "plan", lambda self, bound, tensors, batched, cuda=False:
                        plan(self, bound, tensors, batched, True))
    n = math.prod(sizes.values())
    q, k, v = qkv(1, 4, 2, n, 8, seed=n)
    fx = compare(f"stdlib:{name}", q, k, v, sizes=sizes, **params)
    assert fx.runner.last.block_size == (128, 128) and fx.runner.last.source.tables == {}


# ================================================================ other shapes and terms
def test_cross_attention_and_empty_rows():
    spec = "pattern x\n  queries seq\n  keys seq\n  mask 2 * k <= 3 * q + 1 and k < nk - 1 + q and q % 3 != 1\n"
    q, k, v = qkv(2, 2, 2, 13, 8, seed=10, nk=21)
    fx = compare(spec, q, k, v, q_tile=4, kv_tile=8)
    o, lse = fx(q, k, v, return_lse=True)
    rows = torch.arange(13) % 3 == 1
    assert torch.equal(o[:, :, rows], torch.zeros_like(o[:, :, rows]))
    assert torch.isneginf(lse[:, :, rows]).all()


def test_bias_input_gradient_and_integer_semantics():
    # floored // and % on negative operands, a symbolic divisor that is 0 for h = 0 (x // 0 == 0,
    # x % 0 == x), an exact rational, bit operations and a float input in the bias
    spec = """pattern x
  tokens seq
  input w: float[heads, n]
  mask (q - k) // 3 >= -2 and (k - q) % (h + 2) != 1 and (q - k) // h <= 4 and ((q - 2 * k) % h) != 3 and bit_length(q ^ k) <= 4
  bias w[h, k] * (q - k) / 3 - abs(q - k) // 2
"""
    q, k, v = qkv(2, 3, 3, 26, 8, seed=11)
    w = torch.randn(3, 26, dtype=torch.float64, requires_grad=True)
    compare(spec, q, k, v, {"w": w}, grad_inputs=("w",), q_tile=8, kv_tile=4)


@settings(max_examples=12, deadline=None)
@given(st.integers(3, 9), st.integers(3, 9), st.integers(1, 4), st.integers(1, 4),
       st.sampled_from([(2, 2), (2, 4), (4, 2), (1, 4), (4, 4)]), st.booleans())
def test_neighborhood_2d_hypothesis(hh, ww, ky, kx, tile, causal):
    ky, kx = min(ky, hh), min(kx, ww)
    q, k, v = qkv(1, 1, 1, hh * ww, 4, seed=hh * 10 + ww)
    compare("stdlib:neighborhood_2d", q, k, v, sizes={"height": hh, "width": ww}, q_tile=tile,
            kv_tile=(min(tile[0], 2), min(tile[1], 2)), kernel_size=(ky, kx), is_causal_x=causal)


def test_source_is_generated_not_copied():
    spec = "pattern secret_name(magic = 37)\n  tokens seq\n  input mydocs: int[n]\n  mask causal and mydocs[q] == mydocs[k] and q - k < magic\n"
    fx = flex_module(spec)
    n = 40
    doc = torch.arange(n) // 10
    q, k, v = qkv(1, 1, 1, n, 4, seed=12)
    fx(q.detach(), k.detach(), v.detach(), mydocs=doc)
    src = fx.runner.last.source.text
    assert "mydocs" not in src and "magic" not in src and "secret_name" not in src
    assert "37" in src and "def mask_mod(b, h, q_idx, kv_idx, IN0)" in src
    assert "def mask_mod" in fx.source and "BlockMask from attnc's tile lists" in fx.source


# ================================================================ refusals
# ================================================================ routing
@pytest.mark.parametrize("B,H,Hkv,N,block,topk,tiles", [(2, 2, 2, 32, 4, 3, (8, 4)), (1, 4, 2, 30, 5, 2, (16, 8))])
def test_moba_routing(B, H, Hkv, N, block, topk, tiles):
    q, k, v = qkv(B, H, Hkv, N, 8, seed=N + topk)
    fx = compare("stdlib:moba", q, k, v, block=block, topk=topk, q_tile=tiles[0], kv_tile=tiles[1])
    routed = fx.runner.last_routed
    assert routed.heads_stored == B * H  # lists per (batch element, head)
    # the routed lists drop blocks the static schedule visits
    assert routed.visited < fx.runner.last.schedule.visited * B * (H if fx.runner.last.schedule.heads_stored == 1 else 1)


@pytest.mark.parametrize("tiles", [((2, 4), (2, 2)), (None, None)])
def test_biformer_routing(tiles):
    q, k, v = qkv(2, 2, 2, 48, 8, seed=15)
    compare("stdlib:biformer", q, k, v, sizes={"height": 6, "width": 8}, region=2, topk=3, q_tile=tiles[0],
            kv_tile=tiles[1])


@pytest.mark.parametrize("name", ["retention", "gla"])
def test_recurrences_are_refused(name):
    with pytest.raises(SpecError, match="no softmax to lower to FlexAttention"):
        attnc.compile_attention(f"stdlib:{name}", backend="flex")


def test_unknown_backend_lists_flex():
    with pytest.raises(SpecError) as err:
        attnc.compile_attention("stdlib:sliding_window", backend="flexx")
    assert "flex" in err.value.hint


def test_bad_inputs_name_the_argument():
    fx = flex_module("stdlib:document")
    q, k, v = qkv(1, 1, 1, 8, 4, seed=13)
    with pytest.raises(SpecError) as err:
        fx(q, k, v, doc=torch.zeros(9, dtype=torch.int64))
    assert err.value.where == "argument doc"


# ================================================================ the fused kernel
def test_fused_kernel_compiled_fullgraph():
    """torch.compile(flex_attention, fullgraph=True) over attnc's BlockMask: box tiles with padding,
    empty rows, a captured float input; new input values reuse the compiled kernel."""
    from torch._dynamo.utils import counters

    spec = """pattern x
  tokens grid(y: height, x: width)
  input w: float[heads]
  mask window(y, 3) and window(x, 5) and (q.y * width + q.x) % 7 != 3
  bias w[h] * abs(q.x - k.x)
"""
    sizes = {"height": 6, "width": 10}
    attn = attnc.compile_attention(spec, backend="flex", sizes=sizes, q_tile=(4, 4), kv_tile=(4, 4))
    ref = attnc.compile_attention(spec, backend="reference", sizes=sizes)
    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(1, 2, 60, 16, generator=g) for _ in range(3))
    empty = torch.arange(60) % 7 == 3
    for seed in (0, 1):
        w = torch.randn(2, generator=torch.Generator().manual_seed(seed))
        out = attn(q, k, v, w=w)
        assert attn.runner.last_path == "fused"
        torch.testing.assert_close(out, ref(q, k, v, w=w), rtol=1e-5, atol=1e-5)
        assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty]))
        if seed == 0:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs  # no recompilation for new input values
    assert attn.runner.last.q_map.padded and attn.runner.last.k_map.padded
    # unequal Q and KV blocks: Flex's fused CPU kernel is wrong there (torch 2.13), the dense path serves
    unequal = attnc.compile_attention(spec, backend="flex", sizes=sizes, q_tile=(4, 4), kv_tile=(2, 4))
    torch.testing.assert_close(unequal(q, k, v, w=w), ref(q, k, v, w=w), rtol=1e-5, atol=1e-5)
    assert unequal.runner.last_path == "dense"


def test_runner_refuses_recurrence_patterns_only():
    FlexRunner(attnc.load("stdlib:moba"))  # routing is lowered
    with pytest.raises(SpecError):
        attnc.compile_attention("stdlib:mamba2", backend="flex")


def test_plan_and_block_mask_are_cached_per_shapes():
    fx = flex_module("stdlib:sliding_window", window=6)
    q, k, v = (t.detach() for t in qkv(1, 2, 2, 40, 4, seed=16))
    fx(q, k, v)
    plan, bm = fx.runner.last, fx.runner.last_block_mask
    fx(q * 2, k, v)
    assert fx.runner.last is plan and fx.runner.last_block_mask is bm
    q2, k2, v2 = (t.detach() for t in qkv(1, 2, 2, 48, 4, seed=17))
    fx(q2, k2, v2)  # new shapes: a new plan
    assert fx.runner.last is not plan and len(fx.runner.plans) == 2


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs(dtype, tol):
    """fp32 and bf16 inputs: out in the input dtype, lse in fp32, as the reference (fp32 compute)."""
    B, H, n = 2, 2, 21
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in qkv(B, H, H, n, 8, seed=18))
    gates = torch.nn.functional.logsigmoid(torch.randn(H, n, generator=torch.Generator().manual_seed(19)))
    ref = attnc.compile_attention("stdlib:forgetting", backend="reference")
    fx = flex_module("stdlib:forgetting", q_tile=8, kv_tile=8)
    o1, l1 = ref(q, k, v, return_lse=True, g=gates)
    o2, l2 = fx(q, k, v, return_lse=True, g=gates)
    assert o2.dtype == dtype and l2.dtype == torch.float32
    torch.testing.assert_close(o2, o1, rtol=tol, atol=tol)
    torch.testing.assert_close(l2, l1, rtol=tol, atol=tol)
    g1 = torch.autograd.grad(o1.float().sum(), (q, k, v))
    g2 = torch.autograd.grad(o2.float().sum(), (q, k, v))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


# ================================================================ conformance: the whole stdlib
#: every stdlib softmax pattern as this file runs it (``tests/cases.py``): GQA (Hq > Hkv) everywhere, tiles small
#: enough that the lists hold FULL, PARTIAL and EMPTY blocks
CONFORMANCE = claimed("flex")

#: values for the parameters without a default
BARE = {"prefix_lm": {"prefix": 1}, "grid": {"vision_end": 100}, "seer": {"topk": 2}}


def _load(name: str):
    """stdlib pattern ``name`` with its conformance parameters (its defaults where it has no entry)."""
    return attnc.load(f"stdlib:{name}", **(CONFORMANCE[name].params if name in CONFORMANCE else BARE.get(name, {})))


def _stdlib_softmax_patterns() -> set[str]:
    from attnc.spec.library import stdlib_index

    return {name for name in stdlib_index() if isinstance(_load(name), attnc.core.ir.PatternIR)}


def test_conformance_covers_the_stdlib():
    """A new stdlib softmax pattern must get a conformance entry (recurrences are refused by flex). Combined
    patterns (several attentions summed or merged: no single mask or lse to compare here) are listed by name;
    tests/patterns/test_nsa.py and tests/patterns/test_combiner.py run them on flex, forward and backward."""
    from attnc.spec.library import stdlib_index

    assert set(CONFORMANCE) == _stdlib_softmax_patterns()
    assert {name for name in stdlib_index() if _load(name).kind == "combined"} == {"nsa", "combiner"}
    assert {name for name in stdlib_index() if _load(name).kind == "bucketed"} == {"routing_transformer"}


@pytest.mark.parametrize("name", sorted(CONFORMANCE))
def test_stdlib_conformance(name):
    """backend='flex' equals backend='reference' on every stdlib softmax pattern: outputs, lse and the
    gradients of q, k, v and of differentiable inputs, float64, GQA, random inputs; and the BlockMask
    lists agree with the exact mask (what the fused kernel reads)."""
    case = CONFORMANCE[name]
    params, sizes, n, (hq, hkv), grads, (q_tile, kv_tile) = (case.params, case.sizes, case.tokens, case.heads,
                                                            case.grads, case.tiles)
    q, k, v = qkv(2, hq, hkv, n, 8, seed=n + hq, scale=3.0 if name == "softcap" else 1.0)
    inputs = case.make_inputs(hq, 8, seed=sum(map(ord, name)))
    compare(f"stdlib:{name}", q, k, v, inputs, grad_inputs=grads, sizes=sizes, q_tile=q_tile, kv_tile=kv_tile,
            **params)
