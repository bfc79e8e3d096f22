"""One block of context parallelism (queries at absolute positions against keys at absolute positions
of a pattern bound at the whole sequence) on the CPU executor (``CpuRunner.block_forward`` /
``block_backward`` through ``runtime.parallel.blocks``; float64) and on the Triton kernels (under
the interpreter; float32, within its rounding) against the reference scores (``pair_scores``) of
the same block in float64, forward and the backward from merged statistics; offsets that are not
multiples of the tile, runs of a zigzag rank, all-EMPTY blocks, inputs, FoX gates, a grid, a
routing selection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.core.errors import SpecError
from attnc.runtime.parallel.blocks import (
    BlockProblem,
    block_backward,
    block_forward,
    block_runner,
    runs,
)
from attnc.runtime.plan.routing import block_ids, route_sizes

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
B, H, D = 2, 2, 8


#: (backend, dtype it runs, tolerance against float64)
BACKENDS = [("cpu", torch.float64, 1e-12), ("triton", torch.float32, 1e-5)]


def problems(spec: str, n: int, sizes=None, inputs=None, heads: int = H, selection=None, backend: str = "cpu",
             **params):
    """(reference problem, runner problem) of one call's whole-sequence binding."""
    attn = attnc.compile_attention(spec, sizes=sizes, backend=backend, **params)
    pat = attn.pattern
    bound = E.bind_sizes(pat, n=n, nk=n, heads=heads, sizes=sizes or {}, dk=D)
    tensors, batch = E.bind_inputs(pat, bound, inputs or {}, batch=B)
    ref = BlockProblem(pat, bound, tensors, batch, 0.35, torch.arange(heads))
    if selection is not None:
        ref = BlockProblem(pat, bound, tensors, batch, 0.35, torch.arange(heads), *selection)
    runner = block_runner(attn.runner, torch.device("cpu"), heads, heads, pat)
    assert runner is attn.runner
    return ref, BlockProblem(**{**ref.__dict__, "runner": runner})


def compare(ref, run, q_pos, k_pos, gen, hkv: int = H, dtype=torch.float64, tol: float = 1e-12):
    """The block's (out, lse) and the gradients from made-up merged statistics, both ways (the runner
    in ``dtype``, the reference in float64)."""
    q = torch.randn(B, ref.bound.heads, len(q_pos), D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, hkv, len(k_pos), D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, hkv, len(k_pos), D, generator=gen, dtype=torch.float64)
    low = [t.to(dtype) for t in (q, k, v)]
    want = block_forward(ref, q, k, v, q_pos, k_pos)
    got = block_forward(run, *low, q_pos, k_pos)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)
    # merged statistics of a longer row: this block's lse raised (other keys), out from elsewhere
    lse = torch.where(torch.isneginf(want[1]), torch.zeros_like(want[1]), want[1]) + 0.4
    out = torch.randn(want[0].shape, generator=gen, dtype=torch.float64)
    dout = torch.randn(want[0].shape, generator=gen, dtype=torch.float64)
    delta = (dout * out).sum(-1)
    g_want = block_backward(ref, q, k, v, q_pos, k_pos, lse, dout, delta, out)
    g_got = block_backward(run, *low, q_pos, k_pos, lse.to(dtype), dout.to(dtype), delta.to(dtype), out.to(dtype))
    for a, b, name in zip(g_got, g_want, ("dq", "dk", "dv"), strict=True):
        torch.testing.assert_close(a.double(), b, rtol=max(tol, 1e-11), atol=max(tol, 1e-11), msg=name)
    return want


def span(a: int, b: int) -> torch.Tensor:
    return torch.arange(a, b)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
@settings(max_examples=10, deadline=None)
@given(q0=st.integers(0, 60), lq=st.integers(1, 40), k0=st.integers(0, 60), lk=st.integers(1, 40),
       window=st.integers(1, 20))
def test_a_window_block_at_any_offsets_equals_the_reference(backend, dtype, tol, q0, lq, k0, lk, window):
    ref, run = problems("stdlib:sliding_window", 100, window=window, backend=backend)
    compare(ref, run, span(q0, q0 + lq), span(k0, k0 + lk), torch.Generator().manual_seed(q0 * 97 + k0),
            dtype=dtype, tol=tol)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_zigzag_runs_and_an_all_empty_block(backend, dtype, tol):
    ref, run = problems(CAUSAL, 128, backend=backend)
    gen = torch.Generator().manual_seed(0)
    # a zigzag rank of a ring of 2: chunks 0 and 3 of 4 (two runs), against chunks 1 and 2
    compare(ref, run, torch.cat([span(0, 32), span(96, 128)]), torch.cat([span(32, 64), span(64, 96)]), gen,
            dtype=dtype, tol=tol)
    # offsets that are no multiple of any tile, keys after every query: every row empty
    out, lse = compare(ref, run, span(3, 40), span(45, 90), gen, dtype=dtype, tol=tol)
    assert torch.isneginf(lse).all() and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_grid_document_fox_softcap_gqa_blocks(backend, dtype, tol):
    gen = torch.Generator().manual_seed(1)
    opts = dict(dtype=dtype, tol=tol)
    ref, run = problems("stdlib:neighborhood_2d", 80, sizes={"height": 10, "width": 8}, kernel_size=3,
                        backend=backend)
    compare(ref, run, span(13, 51), span(5, 70), gen, **opts)  # rows cut mid grid row
    doc = torch.tensor([0] * 17 + [1] * 30 + [2] * 33)
    ref, run = problems("stdlib:document", 80, inputs={"doc": doc}, backend=backend)
    compare(ref, run, span(20, 61), span(9, 50), gen, **opts)
    gates = F.logsigmoid(torch.randn(H, 80, generator=gen, dtype=torch.float64) + 2)
    ref, run = problems("stdlib:forgetting", 80, inputs={"g": gates}, backend=backend)
    compare(ref, run, span(33, 79), span(7, 50), gen, **opts)
    ref, run = problems("stdlib:softcap", 80, heads=4, cap=2.0, backend=backend)  # the executor's unfused path
    compare(ref, run, span(11, 40), span(30, 77), gen, hkv=2, **opts)
    ref, run = problems("stdlib:alibi", 80, heads=4, backend=backend)
    compare(ref, run, span(11, 40), span(30, 77), gen, hkv=1, **opts)


@pytest.mark.parametrize("backend,dtype,tol", BACKENDS)
def test_a_routing_selection_is_applied_as_given(backend, dtype, tol):
    """MoBA: a random selection of this rank's queries over every block (blocks made by the ranks
    together) reads the same in both paths."""
    gen = torch.Generator().manual_seed(2)
    attn = attnc.compile_attention("stdlib:moba", backend="reference", block=8, topk=2)
    bound = E.bind_sizes(attn.pattern, n=64, nk=64, heads=H, dk=D)
    key_block, nblocks = block_ids(attn.pattern.keys, route_sizes(attn.pattern, bound)[0], bound, 64)
    q_pos, k_pos = torch.cat([span(5, 20), span(40, 64)]), span(3, 61)
    selected = torch.rand(B, H, len(q_pos), nblocks, generator=gen) < 0.5
    ref, run = problems("stdlib:moba", 64, selection=(selected, key_block), block=8, topk=2, backend=backend)
    compare(ref, run, q_pos, k_pos, gen, dtype=dtype, tol=tol)


def test_block_bounds_are_checked_and_plans_are_bounded():
    attn = attnc.compile_attention(CAUSAL, backend="cpu")
    whole = E.bind_sizes(attn.pattern, n=64, nk=64, heads=1)
    with pytest.raises(SpecError, match="not inside the 64 tokens"):
        E.block_bound(whole, 60, 8, 0, 8)
    assert runs(torch.tensor([4, 5, 6, 20, 21, 9])) == [(0, 4, 3), (3, 20, 2), (5, 9, 1)]
    runner = attn.runner
    runner.block_plans.limit = 3
    q = torch.randn(1, 1, 8, D, dtype=torch.float64)
    for k0 in range(0, 48, 8):
        runner.block_forward(E.block_bound(whole, 40, 8, k0, 8), q, q, q, {}, 1.0)
    assert len(runner.block_plans) == 3 and runner.last is None  # the module's own plans untouched
    # the reference and Flex runners run no blocks: the reference scores serve them
    causal = attn.pattern
    assert block_runner(attnc.compile_attention(CAUSAL, backend="reference").runner, torch.device("cpu"), 1, 1,
                        causal) is None
    auto = attnc.compile_attention(CAUSAL).runner
    assert block_runner(auto, torch.device("cpu"), 1, 1, causal) is auto
    assert block_runner(auto, torch.device("cuda"), 1, 1, causal) is auto  # its Triton kernels there
    triton = attnc.compile_attention(CAUSAL, backend="triton").runner
    assert block_runner(triton, torch.device("cuda"), 1, 1, causal) is triton
    assert block_runner(attnc.compile_attention(CAUSAL, backend="flex").runner, torch.device("cpu"), 1, 1,
                        causal) is None
    # a Ulysses share of the heads: the runner where no value reads the head, else the reference scores
    assert block_runner(runner, torch.device("cpu"), 1, 2, causal) is runner
    alibi = attnc.compile_attention("stdlib:alibi", backend="cpu")
    assert block_runner(alibi.runner, torch.device("cpu"), 2, 2, alibi.pattern) is alibi.runner
    assert block_runner(alibi.runner, torch.device("cpu"), 1, 2, alibi.pattern) is None


def test_a_float32_block_is_within_float32_rounding_of_float64():
    """The executor's block in float32 (torch's fused CPU kernel) against the reference in float64."""
    gen = torch.Generator().manual_seed(3)
    ref, run = problems("stdlib:sliding_window", 300, window=40)
    q_pos, k_pos = torch.cat([span(0, 75), span(225, 300)]), span(150, 300)
    q, k, v = (torch.randn(B, H, len(p), D, generator=gen, dtype=torch.float64) for p in (q_pos, k_pos, k_pos))
    out64, lse64 = block_forward(ref, q, k, v, q_pos, k_pos)
    out32, lse32 = block_forward(run, q.float(), k.float(), v.float(), q_pos, k_pos)
    assert out32.dtype == torch.float32 and torch.isneginf(lse64).any()  # rows 0..74 read no key here
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse32.double(), lse64, rtol=1e-5, atol=1e-5)
    dout = torch.randn(out64.shape, generator=gen, dtype=torch.float64)
    delta = (dout * out64).sum(-1)
    g64 = block_backward(ref, q, k, v, q_pos, k_pos, lse64, dout, delta, out64)
    g32 = block_backward(run, q.float(), k.float(), v.float(), q_pos, k_pos, lse32, dout.float(), delta.float(),
                         out32)
    for a, b, name in zip(g32, g64, ("dq", "dk", "dv"), strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows,cols", [(4, 6), (1, 1), (3, 1), (1, 5)])
def test_selected_pairs_reads_the_selection_at_every_pair(transposed, rows, cols):
    """tile_plan.selected_pairs equals advanced indexing of the selection, in both orientations and with
    one-row or one-column tiles."""
    from attnc.runtime.plan.tile_plan import selected_pairs

    g = torch.Generator().manual_seed(rows * 10 + cols)
    selection = torch.rand(2, 3, 9, 7, generator=g) < 0.5  # [B, H, Nq, blocks]
    C = 2
    own_q = torch.randint(0, 9, (C, rows, 1), generator=g)
    other_b = torch.randint(0, 7, (C, 1, cols), generator=g)
    if transposed:  # rows are keys: queries along the columns
        q_tok, k_block = torch.randint(0, 9, (C, 1, cols), generator=g), torch.randint(0, 7, (C, rows, 1), generator=g)
    else:
        q_tok, k_block = own_q, other_b
    want = selection[:, :, q_tok, k_block]
    assert torch.equal(selected_pairs(selection, q_tok, k_block, transposed), want)


@pytest.mark.parametrize("backend, want", [("auto", "cpu"), ("cpu", "cpu"), ("reference", "reference"),
                                           ("flex", "reference")])
def test_last_blocks_names_the_backend_that_ran_the_blocks(tmp_path, backend, want):
    """``ContextParallel.last_blocks`` on CPU tensors (one rank): backend "auto" runs its blocks on the
    CPU executor and says so ("auto" named no backend); Flex has no offsets: the reference scores."""
    import torch.distributed as dist

    from attnc.distributed import ContextParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        attn = attnc.compile_attention(CAUSAL, backend=backend)
        cp = ContextParallel(attn)
        q, k, v = (torch.randn(1, 2, 16, 8, dtype=torch.float64) for _ in range(3))
        out = cp(q, k, v)
        assert cp.last_blocks == want
        torch.testing.assert_close(out, attnc.compile_attention(CAUSAL, backend="reference")(q, k, v))
    finally:
        dist.destroy_process_group()


def test_the_auto_runners_blocks_on_cuda_are_the_triton_kernels():
    from attnc.runtime.parallel.blocks import blocks_backend

    auto = attnc.compile_attention(CAUSAL, backend="auto").runner
    assert blocks_backend(auto, torch.device("cuda")) == "triton"  # what its block_forward takes there
    assert blocks_backend(auto, torch.device("cpu")) == "cpu"
    assert blocks_backend(None, torch.device("cpu")) == "reference"
