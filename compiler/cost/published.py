"""Published attention throughput the cost model is fitted to and validated on.

One table per use, each row naming its source (paper, figure, the value read
off it). ``DENSE`` is what ``compiler.cost.calibration.ARCH_FITS`` is fitted to (by
``benchmarks/calibration.py --fit``); ``SPARSE`` (NATTEN / GNA speedups on
H100, from the GNA paper) is used only to *validate* the fitted
model, never to fit it. ``MEASURED`` is attnc's own GPU suite on a lent H100: SDPA's
dense timings fit ``compiler.cost.calibration.SDPA_FITS``, attnc's the sm90 ``mask_exposed``.

Throughput convention (FlashAttention's benchmark): forward 4 B H N^2 D flops,
backward 2.5 x that, whatever the kernel actually executes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .calibration import ARCH_FITS, Calibration


@dataclass(frozen=True)
class DensePoint:
    """Published dense (unmasked) attention throughput, BF16/FP16.

    ``kernel``: "triton" (a Triton FA2-class kernel: 2 forward matmuls, its
    backward recomputing like attnc's) or "fa2" (FlashAttention-2's CUDA
    kernel: 5 backward matmuls in one kernel, dQ by atomics), which decides
    how many matmuls the fit charges. Sizes follow the FlashAttention papers'
    benchmark: batch x seqlen = 16k tokens, hidden = heads x head_dim = 2048."""

    arch: str  # "sm80" (A100 SXM4 80GB), "sm90" (H100 SXM5 80GB)
    hardware: str
    passname: str  # "forward" | "backward"
    kernel: str  # "triton" | "fa2"
    head_dim: int
    seqlen: int
    tflops: float
    source: str

    @property
    def heads(self) -> int:
        return 2048 // self.head_dim

    @property
    def batch(self) -> int:
        return max(1, 16384 // self.seqlen)


_FA3 = "FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608)"
_FA2 = "FlashAttention-2 paper (Dao 2023, arXiv:2307.08691)"
_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


def _series(arch, hw, passname, kernel, d, values, source, lengths=_LENGTHS):
    return [DensePoint(arch, hw, passname, kernel, d, n, float(v), source) for n, v in zip(lengths, values, strict=False)]


DENSE: list[DensePoint] = [
    # H100 forward, no causal mask: the "Triton" bars (a Triton FA2-class kernel).
    *_series("sm90", "H100", "forward", "triton", 64, (340, 382, 396, 400, 401, 403),
             _FA3 + ", Fig. 5a (forward, head dim 64), Triton bars"),
    *_series("sm90", "H100", "forward", "triton", 128, (323, 372, 389, 389, 392, 395),
             _FA3 + ", Fig. 5b (forward, head dim 128), Triton bars"),
    # H100 backward, no causal mask: no Triton bars in the paper; FlashAttention-2's.
    *_series("sm90", "H100", "backward", "fa2", 64, (198, 238, 264),
             _FA3 + ", Fig. 6a (backward, head dim 64), FlashAttention-2 bars", lengths=_LENGTHS[:3]),
    *_series("sm90", "H100", "backward", "fa2", 128, (214, 260, 291, 310, 318, 322),
             _FA3 + ", Fig. 6b (backward, head dim 128), FlashAttention-2 bars"),
    # A100: the paper's text (the figure bars were not at hand): forward up to 73 %
    # and backward up to 63 % of 312 TFLOP/s, reached at long sequences, head dim 128.
    DensePoint("sm80", "A100", "forward", "fa2", 128, 16384, round(0.73 * 312, 1),
               _FA2 + ", abstract and Sec. 4.1: forward up to 73% of the A100 peak"),
    DensePoint("sm80", "A100", "backward", "fa2", 128, 16384, round(0.63 * 312, 1),
               _FA2 + ", Sec. 4.1: backward up to 63% of the A100 peak"),
]

def calibration_for(point: DensePoint, fits: dict | None = None) -> Calibration:
    """The cost-model calibration that models the kernel a published point was
    measured on: FlashAttention-2's one backward kernel of 5 matmuls (dQ by
    atomics) for "fa2" points, attnc's two kernels of 3 + 4 otherwise."""
    cal = Calibration(arch=dict(fits if fits is not None else ARCH_FITS))
    return dataclasses.replace(cal, bwd_matmuls=(0, 5)) if point.kernel == "fa2" else cal


#: The published range of FA2-class dense forward throughput on H100 (TFLOP/s):
#: FlashAttention-2 282-370 and Triton 323-403 (FA3 paper Fig. 5a/5b).
H100_FA2_CLASS_FORWARD = (282.0, 403.0)


@dataclass(frozen=True)
class SparsePoint:
    """A published sparse-over-dense forward speedup (kernel only) on H100."""

    pattern: str
    sizes: dict
    params: dict
    speedup: float
    flop_bound: float
    source: str


_GNA = ("GNA paper (Hassani et al. 2025, 'Generalized Neighborhood Attention'): "
        "H100, kernel only, against cuDNN dense")
SPARSE: list[SparsePoint] = [
    SparsePoint("neighborhood_1d", {"seq": 32768}, {"kernel_size": 2048}, 8.3, 16.0, _GNA),
    SparsePoint("neighborhood_1d", {"seq": 32768}, {"kernel_size": 2048, "stride": 256}, 12.6, 16.0, _GNA),
    SparsePoint("neighborhood_2d", {"height": 256, "width": 256}, {"kernel_size_y": 80, "kernel_size_x": 80},
                6.0, 10.24, _GNA),
    SparsePoint("neighborhood_2d", {"height": 256, "width": 256},
                {"kernel_size_y": 80, "kernel_size_x": 80, "stride_y": 16, "stride_x": 16}, 12.3, 10.24, _GNA),
    SparsePoint("neighborhood_3d", {"frames": 30, "height": 48, "width": 80},
                {"kernel_size_t": 18, "kernel_size_y": 24, "kernel_size_x": 24}, 3.6, 11.1, _GNA),
    SparsePoint("neighborhood_3d", {"frames": 30, "height": 48, "width": 80},
                {"kernel_size_t": 18, "kernel_size_y": 24, "kernel_size_x": 24, "stride_t": 16, "stride_y": 8,
                 "stride_x": 8}, 12.1, 11.1, _GNA),
]



@dataclass(frozen=True)
class MeasuredCase:
    """A case of attnc's GPU suite (``benchmarks/gpu_suite.py``) measured on a lent GPU: attnc's Triton
    kernels at the schedule that ran and SDPA's dense kernel, side by side in one process (bf16, batch 1,
    milliseconds, medians of ``triton.testing.do_bench``).

    ``host_bound``: the attnc timings of this case were set by the host, not the kernels: that build
    copied the tile lists to the GPU at every call (a pageable copy, which waits for the queued work) and
    re-bound the sizes through sympy: 0.44-0.59 ms a forward call on a 2-core CPU with the kernels
    stubbed, before the copies' waits; the 1-D and 2-D kernels are predicted at 0.3-0.9 ms. Fixed since (the plan keeps its lists on the device); these
    timings are kept as measured, and predictions are judged only on the cases that are not host-bound.
    """

    name: str
    pattern: str
    sizes: dict
    params: dict
    heads: int
    head_dim: int
    hardware: str
    q_tile: tuple
    kv_tile: tuple
    attnc_forward_ms: float
    attnc_fwd_bwd_ms: float
    sdpa_forward_ms: float
    sdpa_fwd_bwd_ms: float
    host_bound: bool
    source: str

    @property
    def tokens(self) -> int:
        return math.prod(self.sizes.values())


_SUITE = ("benchmarks/results/gpu-suite-h100-2026-11-22.md (H100 80GB HBM3, torch 2.11.0+cu130, Triton 3.6.0; "
          "attnc's forward at the search's pick, its backward at 64/64 w8 s3)")
MEASURED: list[MeasuredCase] = [
    MeasuredCase("1-D", "neighborhood_1d", {"seq": 32768}, {"kernel_size": 2048}, 8, 128, "h100",
                 (64,), (64,), 1.220, 5.997, 6.885, 26.920, True, _SUITE),
    MeasuredCase("2-D", "neighborhood_2d", {"height": 128, "width": 128}, {"kernel_size_y": 33, "kernel_size_x": 33},
                 8, 128, "h100", (8, 8), (8, 8), 0.904, 3.075, 1.794, 7.144, True, _SUITE),
    MeasuredCase("3-D", "neighborhood_3d", {"frames": 30, "height": 48, "width": 80},
                 {"kernel_size_t": 18, "kernel_size_y": 24, "kernel_size_x": 24}, 8, 128, "h100",
                 (4, 4, 4), (4, 4, 4), 19.830, 136.687, 86.163, 329.876, False, _SUITE),
]

__all__ = ["DENSE", "H100_FA2_CLASS_FORWARD", "MEASURED", "SPARSE", "DensePoint", "MeasuredCase", "SparsePoint",
           "calibration_for"]
