"""The recurrence kernels compiled for Ampere / Hopper without a GPU (issue 10, item 3), through
``runtime.gpu_check`` (the launches the CUDA path makes, Triton's own ptxas flags): the backward kernels
run their dots on the tensor cores (wgmma / mma.sync in the PTX) and keep everything in registers, and
GLA's per-channel in-chunk product is on the tensor cores too (its sub-chunk factorisation), at Dk = Dv = 128."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

import attnc  # noqa: E402
from attnc.runtime import gpu_check  # noqa: E402
from attnc.runtime.recurrences.decay import triton as triton_recurrence

CHUNK_PARALLEL = ("out_kernel", "bwd_dv_kernel", "bwd_dqk_kernel")


def _launches(pattern: str, arch: int, head_dim: int):
    records, _ = gpu_check.record_call(attnc.load(pattern), arch=arch, head_dim=head_dim, dtype="bf16", n=4096)
    return records


def _check(rec, arch, pattern, head_dim):
    rep = gpu_check.check_launch(rec, arch, pattern=pattern, head_dim=head_dim, dtype="bf16")
    assert rep.error is None and rep.spill_bytes == 0 and rep.stack == 0, rep
    assert 0 < rep.regs <= 255 and rep.shared <= gpu_check.SMEM_LIMIT[arch], rep
    return rep


def test_scalar_gate_backward_uses_tensor_cores_without_spills_sm90():
    records = _launches("stdlib:mamba2", 90, 64)
    backward = [r for r in records if r.name in ("_bwd_dv_kernel", "_bwd_dqk_kernel")]
    backward += [r for r in records if r.name == "_state_kernel" and r.kwargs["REVERSE"]]
    assert len(backward) == 3
    for rec in backward:
        rep = _check(rec, 90, "mamba2", 64)
        assert rep.wgmma + rep.mma > 0, rep  # tensor-core instructions, no fp32 FMA fallback


@pytest.mark.parametrize("arch", [80, 90])
def test_scalar_gate_gradient_does_not_spill_at_d128(arch):
    """The mamba2 gate-gradient launch at Dk = 128: the fp64 sweep over [C, BK] slices stays in registers
    (it spilled 12 B on sm_90 with BK = 64 on Triton 3.9)."""
    gate = [r for r in _launches("stdlib:mamba2", arch, 128) if "gate" in r.name]
    assert len(gate) == 1 and gate[0].kwargs["BK"] == triton_recurrence.SCALAR_GATE_BLOCK
    _check(gate[0], arch, "mamba2", 128)


@pytest.mark.parametrize("arch", [80, 90])
def test_gla_in_chunk_products_on_tensor_cores_without_spills_at_d128(arch):
    """GLA's chunk-parallel kernels at Dk = Dv = 128: no spill, and the sub-chunk factorisation puts the
    in-chunk product on the tensor cores: the same kernel without it (one sub-chunk spanning the chunk, so
    the whole product is the exact elementwise loop) has fewer tensor-core instructions."""
    records = _launches("stdlib:gla", arch, 128)
    par = {gpu_check._kernel_name(r.name): r for r in records if gpu_check._kernel_name(r.name) in CHUNK_PARALLEL}
    assert set(par) == set(CHUNK_PARALLEL)
    for name, rec in par.items():
        assert rec.kwargs["C"] == triton_recurrence.VECTOR_CHUNK and rec.kwargs["SUB"] < rec.kwargs["C"]
        rep = _check(rec, arch, "gla", 128)
        tensor_core = rep.wgmma if arch >= 90 else rep.mma
        assert tensor_core > 0, rep
        if name == "bwd_dqk_kernel":  # the one whose in-chunk part (dq and dk) was all elementwise before
            plain = gpu_check.Recorded(rec.name, rec.fn, rec.grid, rec.args, dict(rec.kwargs, SUB=rec.kwargs["C"]))
            base = gpu_check.check_launch(plain, arch, pattern="gla", head_dim=128, dtype="bf16")
            assert base.error is None, base
            assert tensor_core > (base.wgmma if arch >= 90 else base.mma), (rep, base)
