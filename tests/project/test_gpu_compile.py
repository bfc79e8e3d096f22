"""The CUDA kernels compiled offline (no GPU) for sm_80 and sm_90 through attnc's own launch
path, at the configs the schedule search picks on CUDA (``runtime.gpu_check``): every kernel
must compile, fit the per-block shared-memory limit and not spill a register.

A representative subset runs on every CI run (causal, sliding_window, streaming, softcap, alibi,
forgetting, moba, neighborhood_2d, radial, a decay recurrence, the gated delta rule, KDA and Titans; d 64 and 128;
sm_80 and sm_90: ``PAIRS``); the full matrix is ``benchmarks/gpu_compile_matrix.py``. Works on Triton 3.6 and 3.9.
"""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

import attnc
from attnc.compiler.cost import search as SR
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.model import KernelConfig
from attnc.core.errors import SpecError
from attnc.runtime import gpu_check as G
from attnc.runtime.gpu_paged_check import check_paged

# compiled kernels and their register model can differ between Triton versions: CI runs these
# on the GPU machines' Triton too
pytestmark = pytest.mark.versions

pytest.importorskip("triton")  # a dependency of attnc; absent only in a CPU-only install

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
N = 4096
#: (name, spec, params, sizes, n)
SUBSET = [
    ("causal", CAUSAL, {}, None, N),
    ("sliding_window", "stdlib:sliding_window", {"window": 1024}, None, N),
    # at its default window and n = 8192 the search picks 128/64 tiles, whose dK/dV at d = 64 spilled
    # 32-60 B (sm_80 on Triton 3.6 and 3.9, sm_90 on 3.6) before the register model weighed score tiles
    ("sliding_window_8k", "stdlib:sliding_window", {}, None, 8192),
    ("streaming_8k", "stdlib:streaming", {}, None, 8192),
    ("softcap", "stdlib:softcap", {}, None, N),
    ("alibi", "stdlib:alibi", {}, None, N),
    ("forgetting", "stdlib:forgetting", {}, None, N),
    ("moba", "stdlib:moba", {"block": 512, "topk": 3}, None, N),
    ("neighborhood_2d", "stdlib:neighborhood_2d", {}, {"height": 32, "width": 32}, None),
    ("mamba2", "stdlib:mamba2", {}, None, N),
    # the delta rule's eight kernels (WY form, state pass, output; five more in the backward); sm_80 spilled
    # 0.4-1.7 KiB in its WY backward until that was split in two (benchmarks/results/gpu-compile-delta-2026-11-23.md)
    ("gated_delta_net", "stdlib:gated_delta_net", {}, None, N),
    # KDA's eight (per-channel gates, sub-chunks of 16): its dq/dk kernel spilled 320 B on sm_80 (255 registers,
    # Dk blocks of 32) until it took Dk blocks of 16 (benchmarks/results/gpu-compile-kda-2026-11-23.md)
    ("kda", "stdlib:kda", {}, None, N),
    # its frame terms (bit_length, a float band, a split test) spilled 236-1,460 B per kernel until the
    # kernels held per-tile coordinates as scalars (benchmarks/results/gpu-compile-radial-2026-11-22.md)
    ("radial", "stdlib:radial", {}, {"frames": 16, "per_frame": 256}, None),
    # Titans' seven: its first kernels (a fused forward, a fused gradient kernel) spilled 0.4-38 KiB; split so
    # that no program holds both q, k tiles and four state blocks, with Dv blocks of 16 and chunks of at most 32
    ("titans", "stdlib:titans", {}, None, N),
]
#: (arch, d) per pattern: every pair covered, the issue's failures (sm_90, d = 128) most, and the d = 64
#: dK/dV spills the register model used to admit (sliding_window / streaming at 128/64, forgetting's
#: decay at 64/64: 16-60 B). Measured: the whole module, cold caches, Triton 3.6: 110 s of CPU (15.5 min of
#: wall time on a 2-core machine loaded ~10x by other jobs).
PAIRS = {"causal": [(90, 128), (80, 64)], "sliding_window": [(90, 128)], "sliding_window_8k": [(80, 64), (90, 64)],
         "streaming_8k": [(90, 64)], "softcap": [(90, 128)], "alibi": [(80, 128)],
         "forgetting": [(90, 128), (80, 64)], "moba": [(90, 128), (80, 64)], "neighborhood_2d": [(90, 64)],
         "mamba2": [(90, 128)], "radial": [(90, 128), (80, 64)], "gated_delta_net": [(90, 128), (80, 64)],
         "kda": [(90, 128), (80, 128)], "titans": [(90, 128), (80, 128)]}
CASES = [(name, spec, params, sizes, n, arch, d) for name, spec, params, sizes, n in SUBSET for arch, d in PAIRS[name]]


@pytest.mark.parametrize(("name", "spec", "params", "sizes", "n", "arch", "d"), CASES,
                         ids=[f"{c[0]}-sm{c[5]}-d{c[6]}" for c in CASES])
def test_default_config_compiles_fits_and_does_not_spill(name, spec, params, sizes, n, arch, d):
    pat = attnc.load(spec, **params)
    reports = G.check_pattern(pat, archs=(arch,), head_dims=(d,), dtypes=("bf16",), n=n, sizes=sizes, label=name)
    kernels = {r.kernel for r in reports}
    assert len(reports) >= 3, kernels  # forward and at least two backward kernels were launched
    bad = [r for r in reports if not r.ok]
    assert not bad, "\n" + G.table(reports)
    # the search's own pick fits: no kernel needs the fit ladder's lower rungs (a register-model regression)
    assert not [r for r in reports if r.fell_back], "\n" + G.table(reports)
    for r in reports:
        assert r.shared <= r.smem_limit and 0 < r.regs <= 255
        assert r.shared > 0 or not r.dots  # the dots stage their operands in shared memory
    if name == "causal" and arch == 90:  # counted from the kernel's cubin when read: one count per loop with dots
        fwd = next(r for r in reports if r.kernel == "fwd")
        assert fwd.loop_counts is None and len(fwd.loop_instructions) >= 1 and fwd.loop_counts
    if name == "kda" and arch == 90:  # every dot on wgmma but dA's 16-row blocks (wgmma takes 64 rows)
        assert all(r.wgmma > 0 and (r.mma == 0) == ("wy_da" not in r.kernel) for r in reports), G.table(reports)
    if arch == 90 and pat.kind == "pattern":
        # every softmax kernel's dots on wgmma, none on mma.sync: FoX's dQ too, on 64-row tiles of its own
        # where its dK/dV fits only at 32 (KernelConfig.dq_q_tile; it ran on mma.sync before)
        # (the backward's row-term pre-pass has no dot)
        assert all(r.wgmma > 0 and r.mma == 0 for r in reports if r.kernel != "bwd_delta"), "\n" + G.table(reports)
        assert all(r.dots == 0 for r in reports if r.kernel == "bwd_delta")


def test_register_model_separates_the_compiled_spills():
    """The search's register model (``search.pass_registers``) against what ptxas did with the
    kernels (``runtime.gpu_check``, bf16, Triton 3.6 and 3.9, 8 warps): the passes that compiled
    spill-free at their tiles fit ``REG_BUDGET``; those that spilled do not, so the search gives
    their backward smaller tiles."""
    fits = lambda kind, tq, tk, d, tiles=2, w=8: SR.pass_registers(kind, tq, tk, d, w, tiles) <= SR.REG_BUDGET  # noqa: E731
    route = 2 + SR.ROUTE_SELECT_TILES  # S/P, dP/dS and a routing pattern's selection mask
    # spill-free: forward 128/64 at d = 128; dK/dV at 64/64, d = 128 (moba's with its selection too); moba's
    # forward at 64/64 w4, d = 64; forgetting's dK/dV at 32/64, d = 128 (decay: 5 score tiles)
    assert fits("fwd", 128, 64, 128) and fits("bwd_dkdv", 64, 64, 128) and fits("bwd_dkdv", 64, 64, 128, route)
    assert fits("fwd", 64, 64, 64, route, w=4) and fits("bwd_dkdv", 32, 64, 128, 2 + SR.DECAY_BWD_TILES)
    # spilled: dK/dV at 128/64, d = 64 (sliding_window, streaming: 32-60 B); forgetting's at 64/64, d = 64 (16 B)
    assert not fits("bwd_dkdv", 128, 64, 64) and not fits("bwd_dkdv", 64, 64, 64, 2 + SR.DECAY_BWD_TILES)
    # ... which the plain fp32 value count put at the same 128 a thread as the spill-free forward at d = 128
    assert SR.pass_values("bwd_dkdv", 128, 64, 64) == SR.pass_values("fwd", 128, 64, 128) == 128 * 256
    for arch in ("a100", "h100"):
        cfg = SR.sized(KernelConfig((128,), (64,), "flat", 8, 3), 64, 2, get_hardware(arch))
        b = cfg.backward_config()
        assert cfg.own_backward_tiles and (b.q_tokens, b.kv_tokens) == (64, 64) and cfg.bwd_warps == 8


def test_launch_path_is_recorded_with_the_runtime_arguments():
    """The softmax launches are the runtime's own: three kernels, the search's tiles as BLOCK_M /
    BLOCK_N, each pass's warps and stages, and bf16 pointers for bf16 tensors."""
    pat = attnc.load(CAUSAL)
    cfg = KernelConfig((128,), (64,), "flat", 8, 3, 4, 2)
    records, described = G.record_call(pat, arch=90, head_dim=64, dtype="bf16", n=512, config=cfg)
    assert [r.name for r in records] == ["attnc_fwd", "attnc_bwd_delta", "attnc_bwd_dq", "attnc_bwd_dkdv"]
    assert described == "128/64 flat w8 s3 | bwd w4 s2"
    fwd, delta, dq, dkdv = records
    assert delta.grid == (512 // delta.kwargs["BLOCK_R"], G.BATCH * G.HEADS) and delta.kwargs["BLOCK_DV"] == 64
    assert delta.kwargs["BLOCK_R"] * delta.kwargs["BLOCK_DV"] == 8192  # 8K elements of each of O and dO a program
    assert delta.kwargs["num_warps"] == 4  # its own warps (at 8, ptxas spilled it on sm_100)
    assert fwd.grid == (4, G.BATCH * G.HEADS) and dkdv.grid == (8, G.BATCH * G.HEADS)
    assert fwd.kwargs["BLOCK_M"] == 128 and fwd.kwargs["BLOCK_N"] == 64 and fwd.kwargs["DOT"] == 0
    assert (fwd.kwargs["num_warps"], fwd.kwargs["num_stages"]) == (8, 3)
    assert (dq.kwargs["num_warps"], dq.kwargs["num_stages"]) == (4, 2) == (dkdv.kwargs["num_warps"],
                                                                            dkdv.kwargs["num_stages"])
    assert fwd.args[0][0].dtype == torch.bfloat16  # the group Q: its pointer first, then its strides
    rep = G.check_launch(fwd, 90, pattern="causal", head_dim=64, dtype="bf16")
    assert rep.error is None and (rep.num_warps, rep.num_stages) == (8, 3)
    assert rep.constexprs["BLOCK_M"] == 128 and rep.wgmma > 0 and rep.mma == 0
    # smem: Q resident + 3 stages of K and V (the search's model, exact for the forward)
    assert rep.shared == 128 * 64 * 2 + 3 * 2 * 64 * 64 * 2
    a100 = G.check_launch(fwd, 80, pattern="causal", head_dim=64, dtype="bf16")
    assert a100.error is None and a100.wgmma == 0 and a100.mma > 0


def test_an_over_limit_kernel_is_passed_over_and_reported(monkeypatch):
    """The check walks the ladder a GPU walks (``runtime.kernel_fit``): a forward over the block's shared
    memory at its 3 stages (a limit set between its 3- and 2-stage pipelines) is reported at the 2 stages
    it launches with, the rungs passed over named (its lists by index at 3 stages among them); with no rung
    within the limit, the recorded launch is reported with its problem."""
    pat = attnc.load(CAUSAL)
    records, _ = G.record_call(pat, arch=80, head_dim=64, dtype="fp16", n=256,
                               config=KernelConfig((64,), (64,), "flat", 4, 3))
    fwd = G.check_launch(records[0], 80, pattern="causal", head_dim=64, dtype="fp16")
    assert fwd.ok and not fwd.fell_back and fwd.num_stages == 3
    monkeypatch.setitem(G.SMEM_LIMIT, 80, fwd.shared - 1024)
    fitted = G.check_launch(records[0], 80, pattern="causal", head_dim=64, dtype="fp16")
    assert (fitted.num_warps, fitted.num_stages) == (4, 2) and fitted.ok and fitted.shared < fwd.shared
    # a causal mask's lists are runs: the same stages with the lists by index are tried (and are over too)
    assert records[0].kwargs["FULL_RUN"] and fitted.fell_back == [
        f"w4 s3{suffix}: shared memory {fwd.shared / 1024:.1f} KiB > {fwd.shared // 1024 - 1} KiB"
        for suffix in ("", " indexed")] and not fitted.indexed
    assert "launched at w4 s2; w4 s3: shared memory" in G.table([fitted])
    monkeypatch.setitem(G.SMEM_LIMIT, 80, 1024)
    over = G.check_launch(records[0], 80, pattern="causal", head_dim=64, dtype="fp16")
    assert (over.num_warps, over.num_stages) == (4, 3) and not over.fell_back
    assert any("shared memory" in p for p in over.problems) and not over.ok
    assert "shared memory" in G.table([over]) and "1 with problems" in G.summary([over])


def test_tensor_core_instructions_are_counted_with_their_guards():
    """wgmma, mma.sync and Blackwell's tcgen05.mma, the last issued by one thread behind a predicate."""
    ptx = "\n".join(["\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {...};",
                     "\twgmma.fence.sync.aligned;",
                     "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {...};",
                     "\t@%p7 tcgen05.mma.cta_group::1.kind::f16 [%r1], %rd2, %rd3, %r4, %p8;",
                     "\t@!%p7 tcgen05.mma.cta_group::1.kind::f16 [%r1], %rd2, %rd3, %r4, %p8;",
                     "\ttcgen05.ld.sync.aligned.16x32bx2.x32.b32 {...};",
                     "// tcgen05.mma in a comment"])
    assert G.tensor_core_counts(ptx) == (1, 1, 2)


def test_dots_off_the_architectures_tensor_cores_are_flagged():
    """A 16-bit dot on FMA is a problem everywhere; on sm_100 so is one on mma.sync instead of tcgen05.mma
    (a B200 report used to say "ok" with no tensor-core instruction at all); sm_90's mma.sync is a note."""
    rep = lambda arch, **kw: G.KernelReport("p", "k", arch, 128, "bf16", smem_limit=1 << 20, dots=4, **kw)  # noqa: E731
    assert rep(100, tcgen05=8).ok and rep(90, wgmma=8).ok and rep(80, mma=8).ok
    assert rep(100, mma=8).problems == ["4 dots, none on tcgen05.mma"]
    assert rep(80).problems == ["4 dots, none on tensor cores (FMA)"] == rep(90).problems
    assert rep(90, mma=8).ok and rep(90, mma=8).notes == ["4 dots on mma.sync, not wgmma"]
    assert "note: 4 dots on mma.sync" in G.table([rep(90, mma=8)])
    assert G.KernelReport("p", "k", 100, 64, "fp32", smem_limit=1 << 20, dots=2).ok  # fp32 dots may be exact FMA
    # a kernel compiled to a trap at entry (no instruction but the trap: no tensor-core counts either) says so
    assert rep(100, traps=True).problems == ["compiles to a trap at entry (the kernel would abort on launch)"]
    assert rep(100, traps=True).to_dict()["traps"] is True


@pytest.mark.skipif(not G.targets_available(100), reason="the installed Triton does not target sm_100")
def test_blackwell_kernels_run_their_dots_on_tcgen05():
    """sm_100 (B200) offline: every softmax kernel compiles, fits, and issues tcgen05.mma for its dots."""
    reports = G.check_pattern(attnc.load(CAUSAL), archs=(100,), head_dims=(64,), dtypes=("bf16",), n=1024)
    assert len(reports) == 4 and all(r.ok for r in reports), "\n" + G.table(reports)
    assert all(r.dots > 0 and r.tcgen05 > 0 and r.wgmma == 0 for r in reports if r.kernel != "bwd_delta"), \
        "\n" + G.table(reports)


def test_tensor_memory_keeps_blackwells_accumulators_out_of_the_register_model():
    """On tensor memory (sm_100) tcgen05's accumulators are not registers: dK/dV on 64 Q x 128 KV tokens at
    d 128 (compiled spill-free on sm_100, Triton 3.9) fits there and not on Hopper, the forward on 128 x 128
    at d 128 (it spilled) fits neither; and tensor memory's 512 columns bound the accumulators."""
    b200, h100 = get_hardware("b200"), get_hardware("h100")
    assert SR.tensor_memory(b200) and not SR.tensor_memory(h100)
    fits = lambda kind, q, kv, hw, stages=3: SR.pass_fits(kind, q, kv, 128, 2, 8, stages, hw, in_tmem=True)  # noqa: E731
    assert fits("bwd_dkdv", 64, 128, b200) and not fits("bwd_dkdv", 64, 128, h100)
    assert not fits("fwd", 128, 128, b200, 2)
    # asked without: accumulators counted, as for every kernel but the checked backward
    assert not SR.pass_fits("bwd_dkdv", 64, 128, 128, 2, 8, 3, b200)
    # S/P, dP/dS and the transposed operand: three score tiles, 1.5 registers an element, no accumulator
    assert SR.pass_registers("bwd_dkdv", 64, 128, 128, 8, tmem=True) == 1.5 * 3 * 64 * 128 / 256
    # dK/dV holds S^T, dP^T (64 columns each at 64 Q tokens), dK and dV (128 each at d 128) on 128 KV rows
    assert SR.tmem_columns("bwd_dkdv", 64, 128, 128) == 384 <= SR.TMEM_COLUMNS
    assert SR.tmem_columns("bwd_dkdv", 64, 128, 256) == 640 > SR.TMEM_COLUMNS
    assert SR.tmem_columns("fwd", 256, 64, 128) == 2 * (64 + 128)  # two 128-row halves of M


def _blackwell_window(n: int = 8192):
    from attnc.compiler.analysis import evaluate as E

    pat = attnc.load("stdlib:sliding_window", window=1024)
    return pat, E.bind_sizes(pat, n=n, heads=G.HEADS)


def test_blackwells_backward_runs_dkdv_on_128_kv_rows():
    """The B200 search weighs dK/dV on 128 KV rows (tcgen05's M: the dK/dV products' rows are KV tokens,
    64-row MMAs modelled at half rate) with dQ on the forward's 128-row tiles, and picks it for a sliding
    window at 8K tokens (predicted faster than the same forward's 64-row backward); Hopper's pick keeps 64
    KV rows; at d 192 (kernels at 256: 640 tensor-memory columns) B200's does too."""
    # at 4K tokens and 2 heads 128-row KV tiles fill half of B200's 148 SMs: the model keeps 64 there
    pat, bound = _blackwell_window()
    search = SR.ScheduleSearch(pat, bound, get_hardware("b200"), head_dim=128)
    found = search.run(top=0)
    pick = found[0].config
    assert (pick.backward_config().q_tile, pick.backward_config().kv_tile) == ((64,), (128,)) and SR.is_wide_kv(pick)
    assert pick.dq_config().q_tile == pick.q_tile == (128,) and pick.bwd_warps == 8 and search.fits(pick)
    forward = lambda c: (c.q_tile, c.kv_tile, c.layout, c.num_warps, c.num_stages)  # noqa: E731
    narrow = [c for c in found if forward(c.config) == forward(pick) and c.config.backward_config().kv_tokens == 64]
    assert narrow and all(c.backward_s > found[0].backward_s for c in narrow)
    hopper = SR.ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=128).run(top=1)[0].config
    assert hopper.backward_config().kv_tokens == 64
    wide192 = SR.ScheduleSearch(pat, bound, get_hardware("b200"), head_dim=192).run(top=1)[0].config
    assert not SR.is_wide_kv(wide192) and SR.padded_head_dim(192) == 256
    assert SR.tmem_columns("bwd_dkdv", 64, 128, 256) > SR.TMEM_COLUMNS


def test_the_128_row_backward_stays_within_the_keys():
    """Doubling the KV tile's innermost axis must not pass the keys' extent (half the tile would be
    padding): a box whose innermost axis is the grid's whole width, a flat tile on a small grid, a short
    sequence take none."""
    b200 = get_hardware("b200")
    box = KernelConfig((8, 8), (8, 8), "address", 8, 3)
    assert SR.wide_kv_backward(box, 128, 2, b200, kv_ext=(64, 8)) is None
    assert SR.wide_kv_backward(box, 128, 2, b200, kv_ext=(64, 64)).backward_config().kv_tile == (8, 16)
    flat = KernelConfig((128,), (64,), "flat", 8, 3)
    assert SR.wide_kv_backward(flat, 128, 2, b200, kv_ext=(8, 8)) is None  # 64 keys on an 8 x 8 grid
    assert SR.wide_kv_backward(flat, 128, 2, b200, kv_ext=(100,)) is None
    assert SR.wide_kv_backward(flat, 128, 2, b200, kv_ext=(4096,)) is not None


def test_the_tuner_times_both_of_blackwells_backwards():
    """On B200 the tuner's trials hold the search's 128-KV-row backward and the same forward's 64-row one,
    so the GPU decides what the model assumed (64-row MMAs at half rate)."""
    from attnc.runtime.tuning import autotune as A

    pat, bound = _blackwell_window()
    trials = A.candidates(SR.ScheduleSearch(pat, bound, get_hardware("b200"), head_dim=128), top=1)
    kv_rows = {t.config.backward_config().kv_tokens for t in trials}
    assert SR.is_wide_kv(trials[0].config) and kv_rows == {64, 128}
    assert all(math.isfinite(t.predicted_ms) for t in trials if t.config.backward_config().kv_tokens == 64)


@pytest.mark.skipif(not G.targets_available(100), reason="the installed Triton does not target sm_100")
def test_blackwells_128_row_backward_compiles_on_tcgen05():
    """sm_100 offline: the B200 pick's dK/dV on 64 Q x 128 KV tokens and dQ on 128 x 64, spill-free and
    within shared memory at their picked stages, their dots on tcgen05.mma."""
    pat, _ = _blackwell_window()
    records, described = G.record_call(pat, arch=100, head_dim=128, dtype="bf16", n=8192)
    assert "bwd 64/128" in described
    reports = [G.check_launch(r, 100, pattern="sliding_window", head_dim=128, dtype="bf16") for r in records
               if r.name in ("attnc_bwd_dq", "attnc_bwd_dkdv")]
    # at their picked stages: as picked, or (the dQ kernel on Triton 3.6, 24 B spilled with runs) with the lists
    # read by index
    assert len(reports) == 2 and all(r.ok and (not r.fell_back or r.indexed) and r.tcgen05 > 0
                                     and r.num_stages == rec.kwargs["num_stages"]
                                     for r, rec in zip(reports, [x for x in records if x.name in (
                                         "attnc_bwd_dq", "attnc_bwd_dkdv")], strict=True)), "\n" + G.table(reports)
    assert {r.kernel: (r.constexprs["BLOCK_M"], r.constexprs["BLOCK_N"]) for r in reports} == {
        "bwd_dq": (128, 64), "bwd_dkdv": (64, 128)}


def test_a_clustering_pattern_is_recorded_with_its_centroids():
    """cluster(q, C) == cluster(k, C): the recorded call passes centroids of the declared [heads, C, dk]
    (dk bound to the head dim) and lets the call derive the ids; every kernel compiles and fits."""
    reports = G.check_pattern(attnc.load("stdlib:cluster_mask"), archs=(90,), head_dims=(64,),
                              dtypes=("bf16",), n=1024)
    assert {r.kernel for r in reports} == {"fwd", "bwd_delta", "bwd_dq", "bwd_dkdv"}
    assert all(r.ok and (r.wgmma > 0 or r.kernel == "bwd_delta") for r in reports), "\n" + G.table(reports)


def test_a_vertical_slash_pattern_is_recorded_with_its_selection():
    """The vertical-slash flags are derived by the recorded call from its q and k (no input to pass);
    every kernel compiles and fits."""
    reports = G.check_pattern(attnc.load("stdlib:vertical_slash", vertical=64, slash=64), archs=(90,),
                              head_dims=(64,), dtypes=("bf16",), n=1024)
    assert {r.kernel for r in reports} == {"fwd", "bwd_delta", "bwd_dq", "bwd_dkdv"}
    assert all(r.ok and (r.wgmma > 0 or r.kernel == "bwd_delta") for r in reports), "\n" + G.table(reports)


def test_context_parallel_block_kernels_compile_fit_and_run_on_wgmma():
    """A context-parallel block's kernels (offsets as run-time arguments; the backward with the lse's
    gradient and the score inputs' gradients) compile for sm_90 at the launch parameters a block gets
    there, fit, do not spill and issue wgmma (FoX: its backward fits only at 32-row tiles, so its forward
    and dQ run mma.sync, as the whole sequence's FoX dQ); routes and recurrences are refused by name."""
    reports = G.check_pattern(attnc.load("stdlib:softcap"), archs=(90,), head_dims=(128,), dtypes=("bf16",),
                              n=1024, block=True)
    assert {r.kernel for r in reports} == {"fwd", "bwd_delta", "bwd_dq", "bwd_dkdv"}
    assert all(r.ok and r.spill_bytes == 0 and (r.wgmma > 0 or r.kernel == "bwd_delta")
               and r.config.startswith("block 512+512 x 256+512")
               for r in reports), "\n" + G.table(reports)
    fox = G.check_pattern(attnc.load("stdlib:forgetting"), archs=(90,), head_dims=(128,), dtypes=("bf16",),
                          n=1024, block=True)
    assert all(r.ok and r.spill_bytes == 0 for r in fox) and fox[-1].wgmma > 0, "\n" + G.table(fox)
    for name, words in (("stdlib:moba", "routes"), ("stdlib:mamba2", "recurrence")):
        with pytest.raises(SpecError, match=words):
            G.check_pattern(attnc.load(name), archs=(90,), head_dims=(64,), n=1024, block=True)


@pytest.mark.parametrize("name, params", [("stdlib:moba", {"block": 512, "topk": 4}),
                                          ("stdlib:neighborhood_1d", {"kernel_size": 7, "dilation": 2}),
                                          ("stdlib:token_topk", {"topk": 256}), ("stdlib:forgetting", {})])
def test_paged_kernels_compile_fit_and_run_on_tensor_cores(name, params):
    """One launch over a paged KV cache (``--paged``: a decode batch of rows of their own lengths, 4 query heads per
    K/V head): the paged forward (a mask naming the length: the row's, read at run time; a route: each row's
    selection read per key), its split merge, a block route's summaries and a token route's scores compile for
    sm_80 and sm_90, fit and do not spill, the forward's dots on tensor cores; a pattern the paged kernel does not
    serve is refused by name."""
    reports = check_paged(attnc.load(name, **params), archs=(80, 90), head_dims=(128,), dtypes=("bf16",), n=4096)
    kernels = {r.kernel for r in reports}
    assert "attnc_fwd_paged" in kernels, kernels
    assert ("attnc_paged_summary" in kernels) is (name == "stdlib:moba")
    assert ("attnc_paged_token_scores" in kernels) is (name == "stdlib:token_topk")
    assert all(r.ok and r.spill_bytes == 0 for r in reports), "\n" + G.table(reports)
    assert all(r.mma > 0 for r in reports if r.kernel == "attnc_fwd_paged")
    with pytest.raises(SpecError, match="not served by the one-launch paged kernel"):
        check_paged(attnc.load("stdlib:mamba2"), archs=(80,), head_dims=(64,), n=1024)


def test_combiners_paged_kernels_compile_on_tensor_cores():
    """Combiner's paged prefill batch (packed rows, each all its queries): its own block's ``attnc_fwd_paged`` and
    the runs' ``attnc_paged_max_summary`` compile for sm_80, sm_90 and sm_100, fit and do not spill, every dot on
    tensor cores (tcgen05.mma on sm_100: the summary's query heads padded to 64 rows)."""
    reports = check_paged(attnc.load("stdlib:combiner", block=64), archs=(80, 90, 100), head_dims=(128,),
                          dtypes=("bf16",), n=2048)
    assert {r.kernel for r in reports} == {"attnc_fwd_paged", "attnc_paged_max_summary"}
    assert all(r.ok and r.spill_bytes == 0 for r in reports), "\n" + G.table(reports)
    assert all(r.tcgen05 > 0 if r.arch == 100 else r.mma + r.wgmma > 0 for r in reports), "\n" + G.table(reports)


def test_nsa_paged_kernels_compile_one_launch_per_branch():
    """nsa over a paged KV cache (``--paged``): the runs' means of keys and values (``attnc_paged_summary``, its own
    module) and one ``attnc_fwd_paged`` for each of the selected and window branches compile for sm_90, fit and do
    not spill, the forwards' dots on tensor cores."""
    reports = check_paged(attnc.load("stdlib:nsa"), archs=(90,), head_dims=(128,), dtypes=("bf16",), n=4096)
    kernels = [r.kernel for r in reports]
    assert kernels.count("attnc_paged_summary") == 2 and kernels.count("attnc_fwd_paged") == 2, kernels
    assert all(r.ok and r.spill_bytes == 0 for r in reports), "\n" + G.table(reports)
    assert all(r.mma > 0 for r in reports if r.kernel == "attnc_fwd_paged")


def test_kernels_with_launch_order_tables_compile_fit_and_run_on_wgmma(monkeypatch):
    """The forward, dQ and dK/dV kernels reading their tile from an order table (``ORDERED``, forced: at
    the recorded size no order pays) compile for sm_90 at d 128 as the tile-order ones do."""
    from attnc.compiler.cost import launch_order
    from attnc.runtime.backends.triton import kernel_launch as KL

    monkeypatch.setattr(KL, "choose_order", lambda full, partial, repeat, sms: launch_order.longest_first(full, partial))
    records, _ = G.record_call(attnc.load("stdlib:sliding_window", window=1024), arch=90, head_dim=128, dtype="bf16",
                               n=N)
    ordered = {r.name: r.kwargs.get("ORDERED") for r in records}
    assert ordered == {"attnc_fwd": True, "attnc_bwd_delta": None, "attnc_bwd_dq": True, "attnc_bwd_dkdv": True}
    reports = [G.check_launch(r, 90, pattern="sliding_window", head_dim=128, dtype="bf16") for r in records]
    assert all(r.ok for r in reports), "\n" + G.table(reports)
    assert all(r.wgmma > 0 and r.mma == 0 for r in reports if r.kernel != "bwd_delta"), "\n" + G.table(reports)


@pytest.mark.parametrize("arch,d", [(90, 128), (80, 64)])
@pytest.mark.parametrize("split", [1, 2])
def test_grouped_query_kernels_compile_fit_and_run_on_tensor_cores(arch, d, split):
    """With K/V heads shared (a group of 2 query heads), the forward, dQ and dK/dV kernels at the search's
    pick compile, fit and do not spill, the dK/dV kernel with its group split over 2 programs too (``SPLIT``,
    fp32 partials), the dots on wgmma (sm_90) / mma. Its loop over the group's heads had a trip count known
    only at run time, and on Triton 3.6 sm_80 d 64 spilled 12 B at every rung of the fit ladder; the
    constant ``SHARE`` does not."""
    records, _ = G.record_call(attnc.load("stdlib:sliding_window", window=1024), arch=arch, head_dim=d, dtype="bf16",
                               n=N, kv_heads=1, group_split=split)
    # SPLIT programs per K/V head, each looping over SHARE query heads (a constant: the loop is not folded away)
    assert [(r.kwargs["SPLIT"], r.kwargs["SHARE"]) for r in records if r.name == "attnc_bwd_dkdv"] == [(split, 2 // split)]
    assert {r.name: dict(zip(r.fn.arg_names, r.args, strict=False))["HEADS"][0] for r in records
            if r.name != "attnc_bwd_delta"} == dict.fromkeys(("attnc_fwd", "attnc_bwd_dq", "attnc_bwd_dkdv"), G.HEADS)
    reports = [G.check_launch(r, arch, pattern="sliding_window", head_dim=d, dtype="bf16") for r in records]
    assert all(r.ok for r in reports), "\n" + G.table(reports)
    on_cores = (lambda r: r.wgmma > 0) if arch == 90 else (lambda r: r.mma > 0)
    assert all(on_cores(r) for r in reports if r.kernel != "bwd_delta"), "\n" + G.table(reports)


def test_a_group_split_that_does_not_divide_the_group_is_refused():
    """``record_call``'s ``group_split`` divides the query heads sharing a K/V head (with none shared, only 1:
    a split of 2 would record a dK/dV kernel looping over no head)."""
    pat = attnc.load("stdlib:sliding_window", window=64)
    for kv, split in ((None, 2), (1, 3), (1, 0)):
        with pytest.raises(SpecError, match="argument group_split"):
            G.record_call(pat, arch=90, head_dim=64, dtype="bf16", n=256, kv_heads=kv, group_split=split)


def test_the_tuners_wide_kv_backward_compiles_on_hopper():
    """The tuner's Hopper trial (``autotune.wide_kv_backward``: dK/dV on 64 Q x 128 KV tokens, dQ on
    the forward's tiles, 8 warps: FlexAttention's sm_90 backward) compiles for sm_90 at d 128, fits, runs on
    wgmma, spill-free for a sliding window (the register model, which refuses it, is not asked)."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.tuning import autotune as A

    pat = attnc.load("stdlib:sliding_window", window=1024)
    search = SR.ScheduleSearch(pat, E.bind_sizes(pat, n=N, heads=G.HEADS), get_hardware("h100"), head_dim=128)
    pick = search.run(top=1)[0].config
    wide = A.wide_kv_backward(pick, search)
    assert (wide.backward_config().q_tile, wide.backward_config().kv_tile) == ((64,), (128,))
    assert (wide.dq_config().q_tile, wide.dq_config().kv_tile) == (pick.q_tile, pick.kv_tile) and pick.kv_tile == (64,)
    records, _ = G.record_call(pat, arch=90, head_dim=128, dtype="bf16", n=N, config=wide)
    reports = [G.check_launch(r, 90, pattern="sliding_window", head_dim=128, dtype="bf16") for r in records
               if r.name in ("attnc_bwd_dq", "attnc_bwd_dkdv")]
    assert len(reports) == 2 and all(r.ok and r.wgmma > 0 and r.mma == 0 for r in reports), "\n" + G.table(reports)
    assert {r.kernel: r.constexprs["BLOCK_N"] for r in reports} == {"bwd_dq": 64, "bwd_dkdv": 128}


def test_the_tuners_backward_in_one_kernel_compiles_on_hopper():
    """The tuner's trial with dQ added by atomics (``autotune.atomic_dq_backward``) records no dQ kernel; its
    dK/dV kernel compiles for sm_90 at d 64 and 128, fits, does not spill, runs its five dots on wgmma and adds
    dQ with four-wide fp32 atomics."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.tuning import autotune as A

    pat = attnc.load("stdlib:sliding_window", window=1024)
    for d in (64, 128):
        search = SR.ScheduleSearch(pat, E.bind_sizes(pat, n=N, heads=G.HEADS), get_hardware("h100"), head_dim=d)
        fused = A.atomic_dq_backward(search.run(top=1)[0].config, pat, search.hw)
        records, described = G.record_call(pat, arch=90, head_dim=d, dtype="bf16", n=N, config=fused)
        assert described.endswith("| dQ by atomics")
        assert [r.name for r in records] == ["attnc_fwd", "attnc_bwd_delta", "attnc_bwd_dkdv"]
        dkdv = records[-1]
        assert dkdv.kwargs["ATOMIC_DQ"] is True
        report = G.check_launch(dkdv, 90, pattern="sliding_window", head_dim=d, dtype="bf16")
        assert report.ok and report.wgmma > 0 and report.mma == 0 and report.dots == 10, "\n" + G.table([report])
        ptx = G.compile_launch(dkdv, 90)[0].asm["ptx"]
        assert re.search(r"\b(?:atom|red)\.global\.[\w.]*add\.v4\.f32", ptx)


def test_recurrence_kernels_are_captured_natively():
    """The recurrence's launch path records its forward, backward and gate-gradient kernels as the
    CUDA path launches them (the GPU's block sizes, not the interpreter's)."""
    records, described = G.record_call(attnc.load("stdlib:mamba2"), arch=90, head_dim=64, dtype="bf16", n=256)
    names = [r.name for r in records]
    assert len(names) >= 3 and any("gate" in n for n in names), names
    assert described.startswith("chunk ")
    from triton.runtime.jit import JITFunction

    assert all(isinstance(G.native_kernel(r.fn), JITFunction) for r in records)


def test_a_combined_pattern_is_checked_branch_by_branch():
    """NSA's three branches (pooled keys, routed blocks, a window), each on its own kernels and config, from
    one recorded call of the combined pattern, forward and backward; labelled by branch."""
    # 4,096 tokens: 64 pooled runs, a 64-key tile (on 16 keys cmp's dK/dV, 16 rows, is off wgmma's 64-row minimum)
    reports = G.check_pattern("stdlib:nsa", archs=(90,), head_dims=(64,), dtypes=("bf16",), n=4096)
    by_branch = {}
    for r in reports:
        by_branch.setdefault(r.pattern, []).append(r)
    assert sorted(by_branch) == ["nsa/cmp", "nsa/slc", "nsa/swa"], G.table(reports)
    for rows in by_branch.values():
        assert sorted(r.kernel for r in rows) == ["bwd_delta", "bwd_dkdv", "bwd_dq", "fwd"]
        assert len({r.config for r in rows}) == 1 and rows[0].config
    assert all(r.ok for r in reports), G.table(reports)
    assert all(r.wgmma > 0 and r.mma == 0 for r in reports if r.kernel != "bwd_delta"), G.table(reports)
    assert by_branch["nsa/cmp"][0].config.split()[0].endswith("/64")  # pooled keys, tiled as any keys
    with pytest.raises(SpecError, match="offline check of blocks"):
        G.check_pattern("stdlib:nsa", archs=(90,), head_dims=(64,), n=1024, block=True)


def test_bad_arguments_are_one_clear_error():
    with pytest.raises(SpecError, match="unknown architecture 70"):
        G.check_pattern(attnc.load(CAUSAL), archs=(70,), n=256)
    with pytest.raises(SpecError, match="head dims"):
        G.check_pattern(attnc.load(CAUSAL), archs=(90,), head_dims=(0,), n=256)
    with pytest.raises(SpecError, match="unknown dtype"):
        G.check_pattern(attnc.load(CAUSAL), archs=(90,), dtypes=("fp8",), n=256)


def test_cli_check_gpu(capsys, tmp_path):
    from attnc import cli

    spec = tmp_path / "c.attn"
    spec.write_text(CAUSAL)
    assert cli.main(["check-gpu", str(spec), "--n", "256", "--arch", "90", "--head-dim", "64",
                     "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "| causal | fwd | sm_90 | 64 | bf16 |" in out and "0 with problems" in out
    assert cli.main(["check-gpu", str(spec), "--arch", "9x"]) == 1
    err = capsys.readouterr().err
    assert "argument --arch" in err and "Traceback" not in err
    assert cli.main(["check-gpu", str(spec), "--arch", "90", "--dtype", "fp8"]) == 1
    assert "unknown dtype" in capsys.readouterr().err


def test_offline_compile_ignores_triton_interpret(monkeypatch):
    """``TRITON_INTERPRET=1`` in the environment (as set to run kernels on CPU) must not turn the offline
    compile into the interpreter: the target probe and the kernels compile natively all the same."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(G, "_TARGETS", {})  # probe again, under the variable
    assert G.targets_available(80)
    reports = G.check_pattern(CAUSAL, archs=(80,), head_dims=(64,), dtypes=("bf16",), n=256, label="causal")
    assert {r.kernel for r in reports} == {"fwd", "bwd_delta", "bwd_dq", "bwd_dkdv"}
    assert all(r.ok for r in reports), [r for r in reports if not r.ok]


def test_runs_of_consecutive_tiles_keep_the_pipelines_depth(monkeypatch):
    """A sliding window's FULL lists are runs of consecutive KV tiles: its forward steps through them with no
    index load (``FULL_RUN``), and Triton's sm_90 pipeline starts its loop with ``stages - 1`` K and V tiles in
    flight. Reading every index from the lists instead, the index itself went through shared memory and the
    pipeline held fewer K/V tiles ahead (one fewer at 3 stages, on Triton 3.6 and 3.9)."""
    from attnc.runtime.backends.triton import kernel_launch as KL

    pat = attnc.load("stdlib:sliding_window", window=1024)

    def prologue(records) -> tuple[bool, int, int, int]:
        """(FULL_RUN, stages, 16-bit tiles and int32 indices copied to shared memory before the first loop)"""
        rec = next(r for r in records if r.name == "attnc_fwd")
        kernel, _, consts = G.compile_launch(rec, 90)
        ttgir = kernel.asm["ttgir"]
        head = [line for line in ttgir[:ttgir.index("scf.for")].splitlines() if "async_copy_global_to_local" in line]
        return (consts["FULL_RUN"], rec.kwargs["num_stages"], sum("xbf16" in line for line in head),
                sum("xi32" in line for line in head))

    runs, stages, tiles, indices = prologue(G.record_call(pat, arch=90, head_dim=128, dtype="bf16", n=N)[0])
    assert runs and stages == 3 and (tiles, indices) == (2 * (stages - 1), 0)
    monkeypatch.setattr(KL, "runs_meta", lambda launch, *kinds: {f"{kind}_RUN": False for kind in kinds})
    runs, stages, tiles, indices = prologue(G.record_call(pat, arch=90, head_dim=128, dtype="bf16", n=N)[0])
    assert not runs and stages == 3 and tiles == 2 * (stages - 2) and indices > 0


@pytest.mark.parametrize("arch", [90, pytest.param(100, marks=pytest.mark.skipif(
    not G.targets_available(100), reason="the installed Triton does not target sm_100"))])
def test_warp_specialized_forward_compiles_to_producer_and_consumers(arch):
    """The tuner's warp-specialized trial (``autotune.warp_specialized_forward``) of a 1-D window's 128-token Q tile,
    compiled for Hopper (its FULL and PARTIAL tiles in one loop, descriptors made in the kernel) and Blackwell (its
    two loops): Triton splits the kernel into warp groups of their own (more warps than launched, registers moved
    between them by ``setmaxnreg``), the dots on the tensor cores, nothing spilled. Without the trial the same
    launch is not split."""
    from attnc.runtime.tuning.autotune import warp_specialized_forward

    pat = attnc.load("stdlib:sliding_window", window=1024)
    pick = KernelConfig((128,), (64,), "flat", num_warps=8, num_stages=2)
    hw = get_hardware(G.ARCH_HARDWARE[arch])
    for cfg, split in ((warp_specialized_forward(pick, pat, hw, (N,), (N,)), True), (dataclasses.replace(pick, tma=True), False)):
        records, _ = G.record_call(pat, arch=arch, head_dim=128, dtype="bf16", n=N, config=cfg)
        rec = next(r for r in records if r.name == "attnc_fwd")
        kernel, options, consts = G.compile_launch(rec, arch)
        assert consts["WARP_SPEC"] is split and consts.get("ONE_LOOP", False) is (split and arch == 90)
        assert (kernel.metadata.num_warps > options.num_warps) is split
        assert ("setmaxnreg" in kernel.asm["ptx"]) is split
        report = G.check_launch(rec, arch, pattern="sliding_window", head_dim=128, dtype="bf16")
        assert report.ok and not report.fell_back and report.spill_bytes == 0, report
        assert (report.wgmma if arch == 90 else report.tcgen05) > 0


def test_loop_instructions_counts_innermost_tensor_core_loops():
    """``loop_instructions``: each innermost loop (a branch back and what lies between) that issues a tensor-core
    instruction, in program order, by the fewest instructions a step runs; an outer loop around one, and a loop
    without one, are not counted."""
    def code(lines):
        return [(16 * i, text) for i, text in enumerate(lines)]

    sass = code(["MOV R1, R2",  # 0
                 "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",  # 1: inner loop A starts (outer loop too)
                 "FMUL R3, R3, R4",
                 "@P0 BRA 0x10",  # 3: back to 1 (A: 3 instructions)
                 "IADD3 R5, R5, 0x1, RZ",  # 4: a loop without matmuls
                 "@P1 BRA 0x40",  # 5: back to 4
                 "HMMA.16816.F32.BF16 R8, R12, R16, R8",  # 6: inner loop B
                 "FFMA R3, R3, R4, R5",
                 "MUFU.EX2 R3, R3",
                 "@P2 BRA 0x60",  # 9: back to 6 (B: 4 instructions)
                 "@P3 BRA 0x0",  # 10: the outer loop, back to 0
                 "UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8], tmem[UR10], idesc[UR12], UPT",  # 11
                 "BRA 0xb0",  # 12: back to 11 (C: Blackwell's tensor-core issue)
                 "EXIT"])
    assert G.loop_instructions(sass) == [3, 4, 2]
    # a branch forward inside a loop: the step that takes it runs 3 of its 6 instructions; an unguarded one
    # never falls through, and one out of the loop is not a way through it
    sass = code(["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",  # 0
                 "@!P0 BRA 0x40",  # 1: past the two selects
                 "FSEL R3, R3, -INF, !P3",
                 "FSEL R4, R4, -INF, !P3",
                 "@P1 BRA 0x0",  # 4: back to 0
                 "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",  # 5
                 "BRA 0x80",  # 6: on to 8 unguarded, past 7
                 "FADD R1, R1, R2",
                 "@P2 BRA 0x100",  # 8: out of the loop
                 "FMUL R1, R1, R2",
                 "@P1 BRA 0x50",  # 10: back to 5
                 "EXIT"])
    assert G.loop_instructions(sass) == [3, 5]
    # two branches back to one header end one loop (the nearer gives the fewest); a loop without matmuls inside
    # one with them is run once through; a branch with a predicate operand (BRA.U !UP0) may fall through
    sass = code(["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",  # 0
                 "BRA.U !UP0, 0x30",  # 1: past 2
                 "FADD R1, R1, R2",
                 "@P0 BRA 0x0",  # 3: back to 0 (0, 1, 3: 3)
                 "FMUL R1, R1, R2",
                 "@P1 BRA 0x0",  # 5: back to 0 as well
                 "EXIT"])
    assert G.loop_instructions(sass) == [3]
    sass = code(["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ",  # 0
                 "IADD3 R5, R5, 0x1, RZ",  # 1: a loop without matmuls
                 "@P1 BRA 0x10",  # 2: back to 1
                 "@P0 BRA 0x0",  # 3: back to 0
                 "EXIT"])
    assert G.loop_instructions(sass) == [4]
    assert G.loop_instructions(code(["HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ", "BRA 0x20", "EXIT"])) == []


def test_loop_instruction_comparison_of_two_matrices(tmp_path):
    """``benchmarks/loop_instructions.py``: per architecture and kernel the median ratio of a step's instructions,
    every kernel's counts, and the kernels only one matrix compiled (or with other loops) named as not compared."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "loop_instructions.py"
    spec = importlib.util.spec_from_file_location("loop_instructions", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def row(pattern, kernel, loops, regs=100, arch=90):
        return {"pattern": pattern, "kernel": kernel, "arch": arch, "head_dim": 128, "dtype": "bf16",
                "loop_instructions": loops, "regs": regs, "error": None}

    before = [row("a", "fwd", [400, 500]), row("b", "fwd", [300, 600]), row("a", "bwd_dq", [200]),
              row("c", "fwd", [100]), row("a", "bwd_delta", [])]
    after = [row("a", "fwd", [360, 450], 110), row("b", "fwd", [300, 540]), row("a", "bwd_dq", [200, 10]),
             row("d", "fwd", [90])]
    for name, rows in (("before", before), ("after", after)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp.md"
    assert bench.main([str(tmp_path / "before.jsonl"), str(tmp_path / "after.jsonl"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| sm_90 | fwd | 4 | 0.900 | 0.900 | 1.000 |" in text  # 0.9, 0.9, 1.0, 0.9
    assert "| a | fwd | sm_90 | 128 | bf16 | 400+500 | 360+450 | 100 / 110 |" in text
    assert "bwd_dq" not in text.split("\n\n")[0]  # its loops differ in number: not compared
    assert "3 kernels in only one matrix, or with a different number of loops, not compared." in text
    # rows of one kernel with other options (here the old search's configs) are told apart, and a kernel launched
    # twice (a recurrence's forward and backward) is two rows in launch order
    (tmp_path / "both.jsonl").write_text(json.dumps(before[0]) + "\n" + json.dumps({**before[0], "before": True}) + "\n")
    assert len(bench.load(str(tmp_path / "both.jsonl"))) == 2
    (tmp_path / "twice.jsonl").write_text(json.dumps(before[0]) + "\n" + json.dumps(after[0]) + "\n")
    assert [r["loop_instructions"] for r in bench.load(str(tmp_path / "twice.jsonl")).values()] == [[400, 500],
                                                                                                    [360, 450]]


def test_positive_scale_enters_the_forwards_exponent():
    """A pattern whose scores are the scaled q.k alone (a sliding window): with a positive scale the forward
    keeps its scores in q.k units and applies the scale in the exponent, ``exp2(qk * c - m)`` one FMA a score,
    where a zero or negative scale multiplies every score first and then subtracts the row max. Compiled for
    sm_90 at 64/64 tiles of 4 warps (32 scores a thread, two loops: FULL and PARTIAL), the positive-scale
    kernel's PTX has at least 64 multiplies and subtractions fewer (a score's two in each loop), as many
    exponentials, and no spill."""
    pat = attnc.load("stdlib:sliding_window", window=1024)
    records, _ = G.record_call(pat, arch=90, head_dim=64, dtype="bf16", n=N)
    rec = next(r for r in records if r.name == "attnc_fwd")
    assert rec.kwargs["POS_SCALE"] is True  # the recorded call's default scale, 1/sqrt(64)

    def counts(pos: bool) -> tuple[int, int, int, list[int]]:
        rec.kwargs["POS_SCALE"] = pos
        kernel, _, _ = G.compile_launch(rec, 90)
        ptx = kernel.asm["ptx"]
        mul, sub, ex2 = (len(re.findall(r"^\s*(?:@%\w+\s+)?" + re.escape(op), ptx, re.M))
                         for op in ("mul.f32", "sub.f32", "ex2.approx"))
        return mul + sub, ex2, G.ptxas_usage(ptx, 90)[1], G.loop_instructions(G.sass(kernel.asm["cubin"]))

    ops_pos, ex2_pos, spill_pos, loops_pos = counts(True)
    ops_neg, ex2_neg, spill_neg, loops_neg = counts(False)
    # the FULL and the PARTIAL step, each shorter in SASS too
    assert len(loops_pos) == len(loops_neg) == 2 and all(a < b for a, b in zip(loops_pos, loops_neg, strict=True))
    scores_per_thread = rec.kwargs["BLOCK_M"] * rec.kwargs["BLOCK_N"] // (32 * rec.kwargs["num_warps"])
    assert scores_per_thread == 32
    assert ops_neg - ops_pos >= 2 * scores_per_thread, (ops_pos, ops_neg)
    assert ex2_pos == ex2_neg and spill_pos == spill_neg == 0


@pytest.mark.parametrize("name,params,sizes,tile,rank", [
    ("sliding_window", {"window": 1024}, None, None, 4),  # runs of memory rows: [B, H, rows, d]
    # boxes of a 3-D grid in token order, past its edge along every axis: [B * H, T, Y, X, d]
    ("neighborhood_3d", {"kernel_size_t": 5, "kernel_size_y": 7, "kernel_size_x": 7},
     {"frames": 10, "height": 18, "width": 22}, (4, 4, 4), 5),
])
def test_tma_configs_compile_fit_and_load_by_tensor_descriptor(name, params, sizes, tile, rank):
    """The search's pick with its streamed tiles loaded by TMA (``KernelConfig.tma``: what the tuner times on
    Hopper) compiles for sm_90 at d 128: each of the forward, dQ and dK/dV kernels issues TMA copies
    (``cp.async.bulk.tensor`` of the box's rank), fits, does not spill and runs its dots on wgmma; for sm_80,
    which has no TMA, the same config records pointer loads (``DESC`` False)."""
    import dataclasses
    import re

    from attnc.compiler.analysis import evaluate as E

    pat = attnc.load(f"stdlib:{name}", **params)
    n = None if sizes else N
    bound = E.bind_sizes(pat, n=n, heads=G.HEADS, sizes=sizes)
    pick = SR.ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=128).run(tile, tile, top=1)[0].config
    assert (pick.layout == "address" and len(pick.q_tile) == 3) is (rank == 5)  # the search's pick (or the tile's)
    cfg = dataclasses.replace(pick, tma=True)
    records, described = G.record_call(pat, arch=90, head_dim=128, dtype="bf16", n=n, sizes=sizes, config=cfg)
    assert described.endswith("| tma")
    for rec in records:
        if rec.name == "attnc_bwd_delta":
            continue
        report = G.check_launch(rec, 90, pattern=name, head_dim=128, dtype="bf16")
        kernel, _, consts = G.compile_launch(rec, 90)
        copies = re.findall(r"cp\.async\.bulk\.tensor\.(\d)d", kernel.asm["ptx"])
        assert consts["DESC"] and copies and report.ok and not report.fell_back, (rec.name, G.table([report]))
        assert set(copies) == {str(rank)}, (rec.name, copies)
        assert report.wgmma > 0 and report.mma == 0, G.table([report])
    records, _ = G.record_call(pat, arch=80, head_dim=128, dtype="bf16", n=n, sizes=sizes, config=cfg)
    assert {r.kwargs.get("DESC") for r in records} == {False, None}


def test_compile_matrix_resume_knows_a_combined_patterns_cells():
    """``gpu_compile_matrix.py --resume`` skips the cells its log holds, a combined pattern's too (its rows
    name their branch, ``nsa/cmp``; the cell is ``nsa``)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_compile_matrix.py"
    spec = importlib.util.spec_from_file_location("gpu_compile_matrix_mod", path)
    matrix = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(matrix)
    common = {"arch": 90, "head_dim": 128, "dtype": "bf16", "before": False, "ordered": False, "tma": False}
    rows = [{"pattern": "nsa/cmp", "cell": "nsa", **common}, {"pattern": "nsa/slc", "cell": "nsa", **common},
            {"pattern": "causal", **common}]  # a row of a run before ``cell``: its pattern names it
    done = matrix.done_cells(rows)
    assert done == {("nsa", 90, 128, "bf16", False, False, False, None, 1, False, False),
                    ("causal", 90, 128, "bf16", False, False, False, None, 1, False, False)}
    gqa = [{"pattern": "causal", "cell": "causal", **common, "kv_heads": 1, "group_split": 2, "atomic_dq": True}]
    assert matrix.done_cells(gqa) == {("causal", 90, 128, "bf16", False, False, False, 1, 2, True, False)}
    ws = [{"pattern": "causal", "cell": "causal", **common, "tma": True, "warp_specialize": True}]
    assert matrix.done_cells(ws) == {("causal", 90, 128, "bf16", False, False, True, None, 1, False, True)}


def _record_decode(pat, arch: int, d: int, n: int, nk: int, heads: int = 8, kv_heads: int = 2) -> list:
    """The launches of ``n`` queries after a KV cache of ``nk`` keys (forward only: the split-KV path), 8 query
    heads on 2 K/V heads, as a GPU of ``arch`` would launch them (its SMs, its hardware model's block sizing)."""
    from attnc.runtime.backends.triton import runner as TB

    class Native(TB.TritonRunner):
        native = True
        hardware = get_hardware(G.ARCH_HARDWARE[arch])

    attn = attnc.compile_attention(pat, backend="triton")
    attn.runner = Native(attn.pattern)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, d, generator=g).bfloat16()
    k, v = (torch.randn(1, kv_heads, nk, d, generator=g).bfloat16() for _ in range(2))
    with G.capture_launches() as records, G.launching_for(arch), torch.no_grad():
        attn(q, k, v)
    return records


@pytest.mark.parametrize("arch", [80, 90])
def test_grouped_forward_of_few_rows_compiles_fits_and_runs_on_tensor_cores(arch):
    """A decode step and 3 and 8 queries after a sliding window's cache of 8192 keys, 16 query heads on 2 K/V heads:
    the grouped forward (``attnc_fwd_grouped``, the 8 query heads of a K/V head packed in 16, 32 and 64 rows) and
    the merge of its splits compile for the arch at d 128, fit at their recorded launch parameters and do not
    spill; its dots on tensor cores (the 64-row tile on sm_90's wgmma)."""
    pat = attnc.load("stdlib:sliding_window", window=1024)
    for n, rows in ((1, 16), (3, 32), (8, 64)):
        records = _record_decode(pat, arch, 128, n, 8192, heads=16, kv_heads=2)
        assert [r.name for r in records] == ["attnc_fwd_grouped", "attnc_fwd_combine"]
        fwd = records[0]
        assert fwd.kwargs["BLOCK_M"] == rows and fwd.grid[:2] == (1, 2) and fwd.kwargs["SPLIT_KV"], fwd.grid
        reports = [G.check_launch(r, arch, pattern=f"sliding_window_gqa_decode_{n}", head_dim=128, dtype="bf16")
                   for r in records]
        assert all(r.ok and not r.fell_back and r.spill_bytes == 0 for r in reports), "\n" + G.table(reports)
        assert reports[0].mma + reports[0].wgmma > 0, "\n" + G.table(reports)
        if arch == 90 and rows == 64:
            assert reports[0].wgmma > 0, "\n" + G.table(reports)


@pytest.mark.parametrize("arch", [80, 90])
def test_split_kv_forward_compiles_fits_and_runs_on_tensor_cores(arch):
    """A decode step (1 query after a causal cache of 8192 keys) and a chunk of 64 queries after one: the runner
    splits their KV tiles (a third launch axis, ``SPLIT_KV``) and merges the partials (``attnc_fwd_combine``).
    Both kernels compile for the arch at d 128, fit at their recorded launch parameters and do not spill; the
    split forward's dots run on tensor cores (a 16-row Q tile on mma.sync, a 64-row one on sm_90's wgmma)."""
    pat = attnc.load(CAUSAL)
    for n in (1, 64):
        records = _record_decode(pat, arch, 128, n, 8192)
        # one query: the 4 query heads of a K/V head packed in one program (attnc_fwd_grouped)
        assert [r.name for r in records] == ["attnc_fwd_grouped" if n == 1 else "attnc_fwd", "attnc_fwd_combine"]
        fwd, combine = records
        assert fwd.kwargs["SPLIT_KV"] and len(fwd.grid) == 3 and fwd.grid[2] > 1, fwd.grid
        reports = [G.check_launch(r, arch, pattern=f"causal_decode_{n}", head_dim=128, dtype="bf16")
                   for r in records]
        assert all(r.ok and not r.fell_back and r.spill_bytes == 0 for r in reports), "\n" + G.table(reports)
        f, c = reports
        assert f.mma + f.wgmma > 0 and c.dots == 0, "\n" + G.table(reports)
        if arch == 90 and n == 64:
            assert f.wgmma > 0 and f.mma == 0, "\n" + G.table(reports)


@pytest.mark.parametrize("arch", [80, 90])
def test_paged_forward_of_a_mixed_batch_compiles_fits_and_runs_on_tensor_cores(arch):
    """A paged batch of 3 decode rows and a 5-query chunk (``cu_seqlens_q``, at most 8 a row) over pages of 16 keys
    of a sliding window's cache, 16 query heads on 2 K/V heads, d 128: its one forward (``attnc_fwd_paged``, each
    key's page looked up in the kernel) and the merge of its splits compile for the arch, fit at their recorded
    launch parameters, do not spill, and the forward's dots run on tensor cores."""
    from attnc.runtime.backends.triton import runner as TB

    class Native(TB.TritonRunner):
        native = True
        hardware = get_hardware(G.ARCH_HARDWARE[arch])

    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=1024)
    attn.runner = Native(attn.pattern)
    g = torch.Generator().manual_seed(0)
    pages, page, d = 64, 16, 128
    k, v = (torch.randn(pages, page, 2, d, generator=g).bfloat16() for _ in range(2))
    table = torch.randperm(pages, generator=g)[:4 * 16].view(4, 16).to(torch.int32)
    seqlens = torch.tensor([100, 256, 17, 200], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2, 3, 8], dtype=torch.int32)
    q = torch.randn(1, 16, 8, d, generator=g).bfloat16()
    with G.capture_launches() as records, G.launching_for(arch), torch.no_grad():
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=8, layout="bhnd")
    assert records[0].name == "attnc_fwd_paged" and {r.name for r in records[1:]} <= {"attnc_fwd_combine"}
    reports = [G.check_launch(r, arch, pattern="sliding_window_paged", head_dim=d, dtype="bf16") for r in records]
    assert all(r.ok and not r.fell_back and r.spill_bytes == 0 for r in reports), "\n" + G.table(reports)
    assert reports[0].mma + reports[0].wgmma > 0, "\n" + G.table(reports)
