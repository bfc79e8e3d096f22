"""Launch parameters that fit (``runtime.kernel_fit``): the ladder, the choice on it, the memo a GPU keeps,
and the launch paths (softmax and recurrence kernels) that take the chosen rung.

Without a GPU the loader's probe is a fake here; the launches are recorded (``runtime.gpu_check``), not
run. The offline probe (ptxas, compiled for sm_80) is tested in ``test_gpu_compile.py``."""

from __future__ import annotations

import weakref

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.cost.model import KernelConfig
from attnc.runtime import gpu_check as G
from attnc.runtime import kernel_fit as KF

# compiled kernels and their register model can differ between Triton versions: CI runs these
# on the GPU machines' Triton too
pytestmark = pytest.mark.versions

pytest.importorskip("triton")

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"


@given(st.sampled_from([1, 2, 4, 8, 16]), st.integers(1, 5))
def test_the_ladder_lowers_stages_then_changes_warps(warps, stages):
    ladder = KF.rungs(warps, stages)
    assert ladder[0] == KF.Rung(warps, stages) and len(set(ladder)) == len(ladder)
    lowered = [r for r in ladder if r.num_warps == warps]
    assert [r.num_stages for r in lowered] == list(range(stages, 0, -1)) and ladder[: len(lowered)] == lowered
    others = ladder[len(lowered):]
    assert all(r.num_stages == stages and r.num_warps in KF.WARPS for r in others)
    assert bool(others) == (warps in KF.WARPS)


@given(st.sampled_from([1, 4, 8]), st.integers(1, 5))
def test_a_kernel_stepping_through_runs_tries_its_lists_by_index_at_each_rung(warps, stages):
    """With runs, every rung of the ladder is followed by the same warps and stages with every set run flag
    off; a rung's options turn off only the run flags the launch set."""
    ladder = KF.rungs(warps, stages, runs=True)
    assert ladder == [KF.Rung(r.num_warps, r.num_stages, indexed) for r in KF.rungs(warps, stages)
                      for indexed in (False, True)]
    meta = {"FULL_RUN": True, "PART_RUN": False, "BLOCK_M": 64, "ORDERED": True}
    assert KF.Rung(warps, stages, indexed=True).options(meta) == {"num_warps": warps, "num_stages": stages,
                                                                  "FULL_RUN": False}
    assert KF.Rung(warps, stages).options(meta) == {"num_warps": warps, "num_stages": stages}
    assert KF.steps_runs(meta) and not KF.steps_runs({"FULL_RUN": False, "BLOCK_M": 64})
    assert str(KF.Rung(warps, stages, indexed=True)) == f"w{warps} s{stages} indexed"


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])  # draws stall on a loaded CI machine
@given(st.data())
def test_the_first_clean_rung_is_chosen_else_the_least_local_memory(data):
    ladder = KF.rungs(data.draw(st.sampled_from([4, 8])), data.draw(st.integers(1, 4)))
    fits = [KF.Fit(data.draw(st.booleans()), data.draw(st.sampled_from([0, 0, 8, 16, 32]))) for _ in ladder]
    probed = []

    def probe(rung):
        probed.append(rung)
        return fits[ladder.index(rung)]

    rung, tried = KF.choose(ladder, probe)
    assert [r for r, _ in tried] == probed == ladder[: len(probed)]  # in order, each once
    clean = [i for i, f in enumerate(fits) if f.clean]
    fitting = [(f.local_bytes, i) for i, f in enumerate(fits) if f.fits]
    if clean:
        assert rung == ladder[clean[0]] and len(probed) == clean[0] + 1
    elif fitting:
        assert rung == ladder[min(fitting)[1]] and len(probed) == len(ladder)
    else:
        assert rung is None and len(probed) == len(ladder)


class _Compiled:
    def __init__(self, spills: int, over: bool):
        self.n_spills, self.over = spills, over

    def _init_handles(self):
        if self.over:
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(240 * 1024, 227 * 1024, "shared memory")


class _Kernel:
    """Compiles (``warmup``) to a kernel that spills or is refused as ``rule(num_warps, num_stages)`` says
    (a rule that raises: the compile fails)."""

    def __init__(self, rule):
        self.rule, self.compiled = rule, []

    def warmup(self, *args, grid, num_warps, num_stages, **meta):
        self.compiled.append((num_warps, num_stages))
        return _Compiled(*self.rule(num_warps, num_stages))


class _Tensor:
    dtype = "bf16"

    class device:  # noqa: N801 - torch's attribute
        type = "cuda"

    def __init__(self, ptr: int = 1024):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


def test_a_gpu_launch_walks_the_ladder_once_per_kernel_and_constants(monkeypatch):
    monkeypatch.setattr(KF, "FITTED", weakref.WeakKeyDictionary())
    kernel = _Kernel(lambda w, s: (4 if s > 1 else 0, s > 2))  # over shared memory at 3, spilling at 2
    picked = {"num_warps": 8, "num_stages": 3}
    assert KF.fitted_options(kernel, (1,), [_Tensor()], {"BLOCK": 64}, picked) == {"num_warps": 8, "num_stages": 1}
    assert kernel.compiled == [(8, 3), (8, 2), (8, 1)]
    assert KF.fitted_options(kernel, (1,), [_Tensor()], {"BLOCK": 64}, picked) == {"num_warps": 8, "num_stages": 1}
    assert len(kernel.compiled) == 3  # remembered
    KF.fitted_options(kernel, (1,), [_Tensor()], {"BLOCK": 32}, picked)  # other constants: another kernel
    assert len(kernel.compiled) == 6


def test_a_gpu_launch_nothing_fits_is_the_loaders_refusal(monkeypatch):
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(KF, "FITTED", weakref.WeakKeyDictionary())
    kernel = _Kernel(lambda w, s: (0, True))
    for _ in range(2):  # not remembered: the runner plans smaller tiles, or the next call asks again
        with pytest.raises(OutOfResources, match="shared memory"):
            KF.fitted_options(kernel, (1,), [_Tensor()], {}, {"num_warps": 4, "num_stages": 2})
    assert kernel.compiled == [(4, 2), (4, 1), (8, 2)] * 2


TRAP_PTX = """.visible .entry attnc_bwd_dkdv(
	.param .u64 .ptr .global .align 1 attnc_bwd_dkdv_param_0,
	.param .u32 attnc_bwd_dkdv_param_1
)
.reqntid 256
{
$L__func_begin0:

// %bb.0:
	.loc	1 307 1                         // attnc.py:307:1
	trap;
$L__tmp0:
}
"""


def test_a_kernel_compiled_to_a_trap_never_launches(monkeypatch):
    """A rung whose PTX begins with ``trap`` (Triton 3.9 lowers a sm_100 kernel over tensor memory so, with
    no compile error) does not fit: a lower rung that does not trap launches, and where every rung traps the
    call gets ``OutOfResources`` (the runner then plans smaller tiles) rather than an aborted CUDA context."""
    from triton.runtime.errors import OutOfResources

    assert KF.traps_at_entry(TRAP_PTX)
    declared = TRAP_PTX.replace("{\n", "{\n\t.reg .pred \t%p<2>;\n\t.reg .b32 \t%r<4>;\n\t.shared .align 16 .b8 "
                                "global_smem[];\n", 1)
    assert declared != TRAP_PTX and KF.traps_at_entry(declared)  # declarations before the trap
    working = TRAP_PTX.replace("\ttrap;\n", "\tmov.u32 %r1, 0;\n\ttrap;\n")  # a trap later (an assert's)
    assert not KF.traps_at_entry(working) and not KF.traps_at_entry("")

    class Compiled(_Compiled):
        def __init__(self, traps: bool):
            super().__init__(0, False)
            self.asm = {"ptx": TRAP_PTX if traps else working}

    class Kernel(_Kernel):
        def warmup(self, *args, grid, num_warps, num_stages, **meta):
            self.compiled.append((num_warps, num_stages))
            return Compiled(self.rule(num_warps, num_stages))

    monkeypatch.setattr(KF, "FITTED", weakref.WeakKeyDictionary())
    picked = {"num_warps": 8, "num_stages": 3}
    assert KF.fitted_options(Kernel(lambda w, s: s > 2), (1,), [_Tensor()], {}, picked) == {"num_warps": 8,
                                                                                             "num_stages": 2}
    with pytest.raises(OutOfResources, match="trap at entry"):
        KF.fitted_options(Kernel(lambda w, s: True), (1,), [_Tensor()], {}, picked)


def _on_a_fake_gpu(monkeypatch, spills):
    """Launches taken for a GPU's (``kernel_fit.on_gpu``), probed by ``spills(kernel name, rung)``."""
    monkeypatch.setattr(KF, "FITTED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(KF, "UNCLEAN", weakref.WeakKeyDictionary())
    monkeypatch.setattr(KF, "on_gpu", lambda args: True)

    def probe(kernel, grid, args, meta, picked=None):
        name = kernel.fn.__name__
        return lambda rung: KF.Fit(True, spills(name, rung))

    monkeypatch.setattr(KF, "native_probe", probe)


def test_softmax_kernels_launch_at_their_own_fitted_rungs(monkeypatch):
    """The dK/dV kernel spilling at its pass's 2 stages launches at 1; the dQ kernel of the same pass and
    the forward keep theirs."""
    cfg = KernelConfig((128,), (64,), "flat", 8, 3, 4, 2)
    _on_a_fake_gpu(monkeypatch, lambda name, rung: 16 if name == "attnc_bwd_dkdv" and rung.num_stages > 1 else 0)
    records, _ = G.record_call(attnc.load(CAUSAL), arch=90, head_dim=64, dtype="bf16", n=512, config=cfg)
    launched = {r.name: (r.kwargs["num_warps"], r.kwargs["num_stages"]) for r in records}
    assert launched == {"attnc_fwd": (8, 3), "attnc_bwd_delta": (4, 2), "attnc_bwd_dq": (4, 2),
                        "attnc_bwd_dkdv": (4, 1)}
    assert KF.lowered() == ["attnc_bwd_dkdv: w4 s2 -> w4 s1"]


def test_a_kernel_spilling_with_runs_launches_its_lists_by_index_at_its_stages(monkeypatch):
    """The dQ kernel spilling only where it steps through its runs (as a window's did on sm_100, Triton 3.6)
    launches at its pass's warps and stages with its lists read by index; the forward keeps its runs."""
    cfg = KernelConfig((128,), (64,), "flat", 8, 3, 8, 3)
    _on_a_fake_gpu(monkeypatch, lambda name, rung: 24 if name == "attnc_bwd_dq" and not rung.indexed else 0)
    records, _ = G.record_call(attnc.load(CAUSAL), arch=90, head_dim=64, dtype="bf16", n=512, config=cfg)
    launched = {r.name: (r.kwargs["num_warps"], r.kwargs["num_stages"],
                         r.kwargs.get("FULL_RUN", r.kwargs.get("T_FULL_RUN"))) for r in records}
    assert launched == {"attnc_fwd": (8, 3, True), "attnc_bwd_delta": (4, 3, None), "attnc_bwd_dq": (8, 3, False),
                        "attnc_bwd_dkdv": (8, 3, True)}
    assert KF.lowered() == ["attnc_bwd_dq: w8 s3 -> w8 s3 indexed"]


def test_recurrence_kernels_launch_at_their_fitted_rungs(monkeypatch):
    """Every recurrence kernel spilling at 8 warps, whatever its stages, launches at 4 with its stages."""
    pat = attnc.load("stdlib:mamba2")
    before, _ = G.record_call(pat, arch=90, head_dim=64, dtype="bf16", n=256)
    _on_a_fake_gpu(monkeypatch, lambda name, rung: 8 if rung.num_warps == 8 else 0)
    after, _ = G.record_call(pat, arch=90, head_dim=64, dtype="bf16", n=256)
    assert [r.name for r in after] == [r.name for r in before]
    assert any(r.kwargs["num_warps"] == 8 for r in before)
    for b, a in zip(before, after, strict=True):
        assert (a.kwargs["num_warps"], a.kwargs["num_stages"]) == (4, b.kwargs["num_stages"])


def test_a_gpu_launch_walks_again_where_triton_compiles_another_kernel(monkeypatch):
    """Triton specialises a compiled kernel on its arguments (an int equal to 1 or divisible by 16, a
    pointer's 16-byte alignment): a call it compiles apart is probed apart."""
    monkeypatch.setattr(KF, "FITTED", weakref.WeakKeyDictionary())
    kernel = _Kernel(lambda w, s: (0, False))
    picked = {"num_warps": 4, "num_stages": 2}
    for args in ([_Tensor(), 1], [_Tensor(), 2], [_Tensor(), 3], [_Tensor(), 32], [_Tensor(1032), 3], [_Tensor(64), 3]):
        KF.fitted_options(kernel, (1,), args, {}, picked)
    # 1, 2 and 32 each apart, 3 as 2 (neither 1 nor a multiple of 16); the pointer at 1032 misaligned apart,
    # the one at 64 aligned as at 1024
    assert len(kernel.compiled) == 4
    assert KF.specialization([_Tensor(), 1])[1] != KF.specialization([_Tensor(), 2])[1]
    assert KF.specialization([_Tensor(), 2**40])[1] != KF.specialization([_Tensor(), 2])[1]


def test_a_lower_rung_that_does_not_compile_is_passed_over(monkeypatch):
    monkeypatch.setattr(KF, "FITTED", weakref.WeakKeyDictionary())

    def rule(w, s):
        if s == 2:
            raise RuntimeError("ptxas failed")
        return (8 if s == 3 else 0, False)

    kernel = _Kernel(rule)  # spills at its picked 3 stages, fails to compile at 2, fits at 1
    assert KF.fitted_options(kernel, (1,), [_Tensor()], {}, {"num_warps": 8, "num_stages": 3}) == {
        "num_warps": 8, "num_stages": 1}
    broken = _Kernel(lambda w, s: (_ for _ in ()).throw(RuntimeError("ptxas failed")))
    with pytest.raises(RuntimeError, match="ptxas failed"):  # the picked rung's failure is the kernel's
        KF.fitted_options(broken, (1,), [_Tensor()], {}, {"num_warps": 8, "num_stages": 3})
    assert broken.compiled == [(8, 3)]


@pytest.mark.parametrize("loop_spills", [True, False])  # a spilling loop first: its flag must not outlive it
def test_a_grouped_dkdv_loop_that_spills_runs_one_program_per_query_head(monkeypatch, loop_spills):
    """Grouped-query attention: the dK/dV kernel whose programs loop over a share of the group's query heads
    (``SHARE`` > 1) launches only where it fits clean at its picked rung; where every rung of that kernel spills
    (as the compile matrices found on some), the call runs one program per query head (``SPLIT`` = the group,
    ``SHARE`` 1: no loop), whose partials are summed."""
    _on_a_fake_gpu(monkeypatch, lambda name, rung: 0)

    def probe(kernel, grid, args, meta, picked=None):
        spills = 16 if loop_spills and kernel.fn.__name__ == "attnc_bwd_dkdv" and meta["SHARE"] > 1 else 0
        return lambda rung: KF.Fit(True, spills)

    monkeypatch.setattr(KF, "native_probe", probe)
    records, _ = G.record_call(attnc.load(CAUSAL), arch=90, head_dim=64, dtype="bf16", n=512, kv_heads=1,
                               group_split=1)  # the cost model's split: 1 program per K/V head of 2 query heads
    dkdv = [r for r in records if r.name == "attnc_bwd_dkdv"]
    assert len(dkdv) == 1
    want = (2, 1, G.BATCH * 2) if loop_spills else (1, 2, G.BATCH * 1)
    assert (dkdv[0].kwargs["SPLIT"], dkdv[0].kwargs["SHARE"], dkdv[0].grid[1]) == want
    # the partials (fp32) where split, the gradients' own tensors where not
    dk = dict(zip(dkdv[0].fn.arg_names, dkdv[0].args, strict=False))["DK"][0]  # the group DK: its pointer first
    assert dk.dtype == (torch.float32 if loop_spills else torch.bfloat16)
