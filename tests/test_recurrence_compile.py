"""The recurrence backward compiled for a Hopper GPU without one (issue 10, item 3): Triton's bundled
ptxas compiles the kernels at the configs the launches use; every backward kernel must run its dots on the
tensor cores (wgmma / mma.sync in the PTX) and keep everything in registers (no spill) at Dk = Dv = 64."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

from attnc.runtime import triton_recurrence  # noqa: E402

SM90_SHARED_LIMIT = 227 * 1024  # bytes of shared memory a block may use on sm_90


def test_backward_kernels_use_tensor_cores_without_spills_sm90():
    rows = triton_recurrence.compile_report(90, 64, 64, "scalar", torch.bfloat16, chunk=64,
                                            names=("_state_kernel(reverse)", "_bwd_dv_kernel", "_bwd_dqk_kernel"))
    names = {r["kernel"] for r in rows}
    assert names == {"_state_kernel(reverse)", "_bwd_dv_kernel", "_bwd_dqk_kernel"}
    for r in rows:
        assert r["wgmma"] + r["mma_sync"] > 0, r  # tensor-core instructions, no fp32 FMA fallback
        assert r["spill_bytes"] == 0 and r["stack"] == 0, r
        assert 0 < r["regs"] <= 255 and r["shared"] <= SM90_SHARED_LIMIT, r
    # chunks of 64 on Hopper: the warpgroup MMA (64-row tiles), not the Ampere-style mma.sync
    assert all(r["wgmma"] > 0 for r in rows)


@pytest.mark.parametrize("arch", [80, 90])
def test_scalar_gate_gradient_does_not_spill_at_d128(arch):
    """The mamba2 gate-gradient launch, as the CUDA path records it (``runtime.gpu_check``, Triton's own
    ptxas flags), at Dk = 128: the fp64 sweep over [C, BK] slices stays in registers (it spilled 12 B on
    sm_90 with BK = 64 on Triton 3.9)."""
    import attnc
    from attnc.runtime import gpu_check

    records, _ = gpu_check.record_call(attnc.load("stdlib:mamba2"), arch=arch, head_dim=128, dtype="bf16", n=4096)
    gate = [r for r in records if "gate" in r.name]
    assert len(gate) == 1 and gate[0].kwargs["BK"] == triton_recurrence.SCALAR_GATE_BLOCK
    rep = gpu_check.check_launch(gate[0], arch, pattern="mamba2", head_dim=128, dtype="bf16")
    assert rep.error is None and rep.spill_bytes == 0 and rep.stack == 0, rep
    assert 0 < rep.regs <= 255
