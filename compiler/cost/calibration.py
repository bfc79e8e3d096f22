"""The cost model's constants (the seam: what is fitted, apart from the model that uses it): per GPU architecture,
the fractions of peak the attention kernels reach and a CTA's fixed cost (``ArchFit``, ``ARCH_FITS``, fitted to the
published throughput in ``published``; ``SDPA_FITS`` for torch's own kernels), and every constant of the model in one
overridable object (``Calibration``, ``DEFAULT_CALIBRATION``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .hardware import Hardware

#: Matmuls per visited tile pair that attnc's forward kernel executes
#: (compiler/codegen/triton/source.py ``attnc_fwd``): S = Q K^T and O += P V.
FWD_MATMULS = 2
#: ... and its two backward kernels (codegen.py ``attnc_bwd_dq``: S = Q K^T and
#: dP = dO V^T recomputed, dQ += dS K: 3; ``attnc_bwd_dkdv``: S and dP
#: recomputed, dV += P^T dO, dK += dS^T Q: 4). 7 in all, where FlashAttention-2's
#: one-kernel backward (dQ by atomics) executes 5.
BWD_MATMULS = (3, 4)
#: Backward over forward tensor-core flops that attnc's kernels execute (7 / 2).
BWD_FLOP_RATIO = sum(BWD_MATMULS) / FWD_MATMULS
#: The flop convention of published backward throughput (FlashAttention's
#: benchmark counts 2.5 x the forward's 4 N^2 D: 5 matmuls), used to report
#: TFLOP/s comparable with published figures.
PUBLISHED_BWD_FLOP_RATIO = 2.5


@dataclass(frozen=True)
class ArchFit:
    """What a Triton FlashAttention-2-class kernel attains on one architecture,
    fitted to published dense throughput (``compiler.cost.published``).

    ``forward`` / ``backward``: fraction of the data-sheet dense tensor peak
    that each *executed* matmul flop attains in the inner loop at the best
    tile configuration; ``cta_overhead_s``: fixed cost per CTA (prologue,
    pipeline fill, epilogue latency), which sets the fall-off at short
    sequences."""

    forward: float
    backward: float
    cta_overhead_s: float
    #: Fraction of a PARTIAL pair's mask arithmetic (CUDA cores) not hidden behind the tensor cores'
    #: work: 1 adds it whole, 0 hides it up to the pair's MMA time (``_partial_pair``).
    mask_exposed: float = 1.0
    #: Rows of the tensor cores' native MMA (0: no limit in the model): a pass whose MMAs run fewer rows
    #: (the Q tile forward and in dQ, the KV tile in dK/dV) attains that fraction of the fitted rate.
    mma_rows: int = 0


# =====================================================================
# FITTED (per architecture) and GUESSED constants of the cost model.
# =====================================================================
#: Fitted by ``benchmarks/calibration.py --fit`` (least squares on log
#: throughput over every point of ``compiler.cost.published.DENSE`` for the arch,
#: CTA overhead on a grid of 0.25-3 us; rms log error: sm80 0.000 (2 points,
#: 2 parameters), sm90 0.069 over 15 points);
#: the points, each with its source (paper, figure, value), are listed there.
#: sm90 forward: FlashAttention-3 paper (Shah et al. 2024, arXiv:2407.08608),
#:   Fig. 5a/5b, the "Triton" bars (Triton FA2-class, BF16, H100 SXM5, no mask):
#:   d=64: 340/382/396/400/401/403 TFLOP/s at 512..16k; d=128: 323/372/389/389/392/395.
#: sm90 backward: same paper, Fig. 6a/6b, "FlashAttention-2" bars (no Triton
#:   backward is published there): d=64: 198/238/264 at 512/1k/2k; d=128:
#:   214/260/291/310/318/322 at 512..16k (counted as 5 executed matmuls).
#: sm80: FlashAttention-2 paper (Dao 2023, arXiv:2307.08691), abstract / Sec. 4.1:
#:   forward up to 73% of the A100's 312 TFLOP/s (about 228 TFLOP/s, long
#:   sequences), backward up to 63% (about 197) -- two points only, and the
#:   paper's text rather than a figure's bars: the sm80 fit is the weaker one,
#:   and it is FlashAttention-2's CUDA kernel: a Triton kernel may attain less
#:   on A100 (no Triton A100 figure was at hand).
#: sm100 takes the sm90 fit with tcgen05's 128 MMA rows (an assumption, not a fit: no published
#: Triton FA2-class figure was at hand); unlisted archs fall back to the scalar fields below.
ARCH_FITS: dict[str, ArchFit] = {
    "sm80": ArchFit(forward=0.772, backward=0.666, cta_overhead_s=1.5e-6),
    # (the sm90 loss is flat below 0.5 us of CTA overhead: rms log error 0.069 at 0.25 us, 0.071 at 0.5)
    # mask_exposed 0: on the GPU suite's 3-D case (H100, 52% PARTIAL pairs, the one case not set by the host;
    # compiler.cost.published.MEASURED) the kernels ran at 0.38 of the peak forward and 0.23 backward per executed
    # matmul flop, as fast as the dense fit's MMA alone: the mask's arithmetic was hidden (the 3-D forward
    # predicted +38% with it added whole, +9% with it hidden; forward + backward +21% and +8%)
    "sm90": ArchFit(forward=0.435, backward=0.303, cta_overhead_s=0.25e-6, mask_exposed=0.0),
    # Blackwell: H100's fit (an assumption: no Blackwell measurement or published Triton figure at hand) with
    # tcgen05's 128-row MMAs (the PTX ISA's M is 64 or 128 per CTA, the accumulator in tensor memory's 128
    # lanes): a 64-row tile is modelled at half the rate, so the search gives Blackwell 128-row tiles where
    # they fit
    "sm100": ArchFit(forward=0.435, backward=0.303, cta_overhead_s=0.25e-6, mask_exposed=0.0, mma_rows=128),
}


#: What the dense kernel behind ``torch.nn.functional.scaled_dot_product_attention`` attains per
#: architecture: the baseline users compare with, and the one the simulator's speedups are over.
#: Same model as attnc's kernels (``predict_dense``) with one backward kernel of 5 matmuls, at
#: 128 x 128 tiles.
#: sm90: fitted by ``benchmarks/calibration.py --fit`` to SDPA measured on an H100 beside
#:   attnc's kernels (``compiler.cost.published.MEASURED_DENSE``: torch 2.11, bf16, d 128, 8 heads,
#:   16,384-115,200 tokens: 613-639 TFLOP/s forward, 514-558 backward, FlashAttention-3 / cuDNN
#:   class, about 1.6x a Triton FlashAttention-2-class kernel).
#: sm80: SDPA runs FlashAttention-2 there: the FA2 fit above (``ARCH_FITS["sm80"]``).
#: Other archs (sm100) take the sm90 fit: an assumption (no measurement at hand), said in reports.
SDPA_FITS: dict[str, ArchFit] = {
    "sm80": ARCH_FITS["sm80"],
    "sm90": ArchFit(forward=0.657, backward=0.564, cta_overhead_s=2e-6),
}
#: The tiles of the modelled SDPA kernel (its tile shape does not enter the fit: a factor of 1).
SDPA_TILES = 128


@dataclass(frozen=True)
class Calibration:
    """The cost model's constants. The per-architecture MMA fractions and CTA
    overheads are fitted to published measurements (``arch``, see
    ``ARCH_FITS``); the rest are estimates. Override any of them:
    ``predict(..., calibration=Calibration(arch={}, mma_efficiency=0.62))``
    (an empty ``arch`` makes every architecture use the scalar fields)."""

    #: Fitted fractions per architecture (``Hardware.arch``); archs not listed
    #: use ``mma_efficiency``, ``bwd_efficiency_ratio`` and ``cta_overhead_s``.
    arch: dict = field(default_factory=lambda: dict(ARCH_FITS))
    #: Matmuls per tile pair of the (dQ, dK/dV) backward kernels. (0, 5) models
    #: FlashAttention-2's single backward kernel (dQ accumulated by atomics),
    #: which is how its published figures are fitted.
    bwd_matmuls: tuple = BWD_MATMULS
    #: Fallback forward fraction of the dense tensor peak (archs without a
    #: fit): the H100 fit, the nearest published Triton FA2-class figure.
    mma_efficiency: float = 0.435
    #: Fallback backward fraction, relative to the forward one (H100 fit: 0.303 / 0.435).
    bwd_efficiency_ratio: float = 0.70
    #: Efficiency multiplier by Q-tile tokens and warps (nearest Tq is used).
    warp_factor: dict = field(default_factory=lambda: {(64, 4): 1.0, (64, 8): 0.85, (128, 4): 0.88, (128, 8): 1.0})
    #: Efficiency multiplier exponents for tiles smaller than 128 tokens:
    #: factor = (Tq/128) ** q_tile_exponent * (Tk/128) ** kv_tile_exponent.
    q_tile_exponent: float = 0.15
    kv_tile_exponent: float = 0.12
    #: With 2 pipeline stages this fraction of the shorter of (MMA, memory) is
    #: not hidden; with 3 or more stages everything overlaps.
    two_stage_exposed: float = 0.12
    #: Fraction of K/V (forward) and Q/dO/dQ (backward) tile traffic served by L2.
    l2_hit: float = 0.6
    #: Fraction of the fp32 vector rate the (mostly integer) mask arithmetic attains.
    mask_alu_fraction: float = 0.35
    #: Extra per-pair operations of a PARTIAL tile besides the mask (the select into -inf).
    mask_fixed_ops: int = 2
    #: Weights of custom functions in the mask's operation count (others count 1).
    op_weights: dict = field(default_factory=lambda: {
        "WINDOW": 5, "FLOORDIV": 3, "MOD": 3, "ISPOW2": 3, "LOG2": 4, "BITLENGTH": 4, "POW": 4,
        "EXP": 4, "LOG": 4, "SQRT": 4, "TANH": 6, "PIECEWISE": 2})
    #: Per-operation cost of in-kernel multi-dimensional addressing, per KV token and axis.
    address_ops_per_axis: int = 4
    #: HBM efficiency of gathered multi-dimensional tile loads (in-kernel addressing).
    address_bw_efficiency: float = 0.92
    #: Per-pair ops to decode grid coordinates of flat tiles on a grid (div + mod per axis).
    flat_decode_ops_per_axis: int = 2
    #: Fallback fixed cost per CTA (prologue, pipeline fill, epilogue latency), seconds.
    cta_overhead_s: float = 1.5e-6
    #: Fixed cost per kernel launch, seconds.
    launch_s: float = 4e-6
    #: HBM efficiency of the permutation copy kernels.
    permute_bw_efficiency: float = 0.8


    def fit(self, hw: Hardware) -> ArchFit:
        """The fractions and CTA overhead that apply on ``hw``."""
        found = self.arch.get(hw.arch)
        if found is not None:
            return found
        return ArchFit(self.mma_efficiency, self.mma_efficiency * self.bwd_efficiency_ratio, self.cta_overhead_s)


DEFAULT_CALIBRATION = Calibration()
