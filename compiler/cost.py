"""Cost model: predicted forward and backward time of a ``TileSchedule`` on a
hardware model, and the dense baseline modelled the same way.

The model, per kernel (forward: one CTA per (batch, head, Q tile) walking its
KV tiles; backward: one CTA per (batch, head, KV tile) walking its Q tiles):

- each visited tile pair costs its tensor-core work, ``4 Tq Tk D`` flops
  forward and ``BWD_FLOP_RATIO`` times that backward, at an attainable
  fraction of the per-SM peak, overlapped with the HBM traffic it causes
  (K/V tiles forward; Q, dO and the dQ accumulation backward);
- a PARTIAL pair also evaluates the mask elementwise on ``Tq x Tk`` pairs:
  ``mask_ops`` operations (sympy's operation count of the mask, custom
  functions weighted) on the non-tensor ALUs;
- each CTA has a fixed prologue/epilogue (load its resident tile, write the
  output) and the uneven per-CTA work is placed on the SMs longest first
  (LPT); the kernel time is the makespan plus a launch;
- token permutation (multi-dimensional tiles made contiguous) reads and
  writes q, k, v and o once (forward) or do, dq, dk, dv (backward);
  in-kernel multi-dimensional addressing instead pays a little per KV tile.

Every constant that is guesswork sits in ``Calibration`` below; they are
educated guesses from published FlashAttention-2/3 and FlexAttention figures
and MUST be calibrated on a GPU (the autotuner's measurements will do it).
Data-sheet figures live in ``compiler.hardware``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import sympy
import torch

from ..spec.errors import SpecError
from .hardware import Hardware
from .schedule import TileSchedule

#: Backward over forward tensor-core flops (5 matmuls against 2), FlashAttention's count.
BWD_FLOP_RATIO = 2.5

LAYOUTS = ("flat", "permute", "address")
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


# =====================================================================
# GUESSWORK: every constant below is an estimate, to be calibrated on a GPU.
# =====================================================================
@dataclass(frozen=True)
class Calibration:
    """The cost model's guessed constants (all of them). Replace with measured
    values: ``predict(..., calibration=Calibration(mma_efficiency=0.62))``."""

    #: Attainable fraction of the dense tensor peak in the forward inner loop at
    #: the best tile configuration (FA2 reaches ~0.7 on A100, FA3 ~0.75 on
    #: H100; a Triton kernel without warp specialisation rather ~0.55).
    mma_efficiency: float = 0.55
    #: Backward attains this fraction of the forward efficiency.
    bwd_efficiency_ratio: float = 0.85
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
    #: Fixed cost per CTA (prologue, pipeline fill, epilogue latency), seconds.
    cta_overhead_s: float = 1.5e-6
    #: Fixed cost per kernel launch, seconds.
    launch_s: float = 4e-6
    #: HBM efficiency of the permutation copy kernels.
    permute_bw_efficiency: float = 0.8


DEFAULT_CALIBRATION = Calibration()
# =====================================================================


@dataclass(frozen=True)
class KernelConfig:
    """One candidate kernel: tile shapes, how tokens are laid out, warps and stages.

    ``layout``: "flat" (tiles are runs of the flat token order; no
    permutation), "permute" (multi-dimensional tiles made contiguous by a
    token permutation) or "address" (multi-dimensional tiles gathered by
    in-kernel addressing).
    """

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    layout: str = "flat"
    num_warps: int = 4
    num_stages: int = 2
    #: The backward kernels' launch parameters (0: the forward's), as FlexAttention's per-pass configs.
    bwd_num_warps: int = 0
    bwd_num_stages: int = 0

    @property
    def bwd_warps(self) -> int:
        return self.bwd_num_warps or self.num_warps

    @property
    def bwd_stages(self) -> int:
        return self.bwd_num_stages or self.num_stages

    @property
    def q_tokens(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tokens(self) -> int:
        return math.prod(self.kv_tile)

    def to_dict(self) -> dict:
        return {"q_tile": list(self.q_tile), "kv_tile": list(self.kv_tile), "layout": self.layout,
                "permute": self.layout == "permute", "num_warps": self.num_warps, "num_stages": self.num_stages,
                **({"bwd_num_warps": self.bwd_warps, "bwd_num_stages": self.bwd_stages}
                   if self.bwd_num_warps or self.bwd_num_stages else {})}


@dataclass
class PassCost:
    """Predicted time of one pass (forward or backward) and where it goes."""

    time_s: float
    kernel_s: float
    permute_s: float
    makespan_s: float
    ideal_s: float  # total work / SMs: the makespan with perfect balance
    mma_s: float  # summed over SMs
    mask_s: float
    memory_s: float
    ctas: int

    @property
    def balance(self) -> float:
        """ideal / makespan: 1.0 is a perfectly balanced launch."""
        return self.ideal_s / self.makespan_s if self.makespan_s > 0 else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["balance"] = self.balance
        return d


@dataclass
class Prediction:
    config: KernelConfig
    forward: PassCost
    backward: PassCost

    def to_dict(self) -> dict:
        return {**self.config.to_dict(), "forward_s": self.forward.time_s, "backward_s": self.backward.time_s,
                "forward": self.forward.to_dict(), "backward": self.backward.to_dict()}


# ----------------------------------------------------------------- mask operation count
def mask_ops(mask: sympy.Basic, calibration: Calibration = DEFAULT_CALIBRATION) -> int:
    """Elementwise operations to evaluate the mask on one (query, key) pair:
    sympy's ``count_ops`` with custom functions weighted (at least 1)."""
    if mask in (sympy.true, sympy.false):
        return 0
    visual = sympy.count_ops(mask, visual=True)
    if visual == 0:
        return 1
    weights = {s: calibration.op_weights.get(str(s), 1) for s in visual.free_symbols}
    return max(1, int(visual.subs(weights)))


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    key = str(dtype).lower()
    if key not in DTYPE_BYTES:
        raise SpecError(f"unsupported dtype {dtype!r}", where="argument dtype",
                        hint="the cost model covers the tensor-core types: bf16, fp16")
    return DTYPE_BYTES[key]


def smem_fits(config: KernelConfig, head_dim: int, nbytes: int, hw: Hardware) -> bool:
    """The forward kernel's shared memory (resident Q tile + stages x (K, V) tiles) fits one SM."""
    need = config.q_tokens * head_dim * nbytes + config.num_stages * 2 * config.kv_tokens * head_dim * nbytes
    return need <= hw.smem_bytes - 1024


# ----------------------------------------------------------------- load balance
#: Beyond this many CTAs per SM the sorted CTAs are merged into buckets first.
MAX_ROUNDS = 256


def makespan(work: torch.Tensor, sms: int, repeat: int | float = 1) -> float:
    """Longest-first placement of CTA work (seconds, any shape), each CTA
    launched ``repeat`` times, on ``sms`` SMs: the finishing time of the
    busiest SM. Vectorised LPT: the CTAs, sorted longest first, are placed a
    wave of ``sms`` at a time, the longest of the wave on the least-loaded SM
    (exactly LPT for the first wave; within a few per cent of it after). Above
    ``MAX_ROUNDS`` waves, consecutive sorted CTAs are merged into one
    placement unit (the total is kept). The repeated CTAs are never
    materialised, so ``repeat`` may be huge (a batch of 10**18)."""
    w = torch.sort(work.reshape(-1).to(torch.float64), descending=True).values
    if w.numel() == 0 or repeat == 0:
        return 0.0
    count = w.numel() * repeat  # CTAs in all (a Python number: never overflows)
    if count <= sms:
        return float(w[0])
    rounds = math.ceil(count / sms)
    if bool(w[0] == w[-1]):  # identical CTAs (dense attention): LPT is exact in closed form
        return rounds * float(w[0])
    if rounds > MAX_ROUNDS or repeat != 1:
        # Units of `group` consecutive CTAs of the sorted, repeated sequence, summed from its
        # prefix sums: CTA j of that sequence is w[j // repeat].
        group = max(1, math.ceil(rounds / MAX_ROUNDS)) if rounds > MAX_ROUNDS else 1
        units = math.ceil(count / group)
        bounds = torch.arange(units + 1, dtype=torch.float64) * group
        bounds[-1] = float(count)
        prefix = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])

        def upto(j: torch.Tensor) -> torch.Tensor:
            i = torch.clamp(torch.floor(j / repeat), max=w.numel() - 1).to(torch.int64)
            return prefix[i] * repeat + (j - i.to(torch.float64) * repeat) * w[i]

        w = upto(bounds[1:]) - upto(bounds[:-1])
        w = torch.sort(w, descending=True).values
        if w.numel() <= sms:
            return float(w[0])
        rounds = -(-w.numel() // sms)
    pad = rounds * sms - w.numel()
    waves = torch.cat([w, w.new_zeros(pad)]).view(rounds, sms)
    load = torch.zeros(sms, dtype=torch.float64)
    for wave in waves:
        load = torch.sort(load).values + wave  # ascending loads + descending work
    return float(load.max())


# ----------------------------------------------------------------- one pass
def _efficiency(config: KernelConfig, cal: Calibration) -> float:
    tq, tk = config.q_tokens, config.kv_tokens
    near = min((abs(math.log2(max(tq, 1)) - math.log2(q)), q) for q, _ in cal.warp_factor)[1]
    warp = cal.warp_factor.get((near, config.num_warps), min(cal.warp_factor.values()))
    shape = min(1.0, tq / 128) ** cal.q_tile_exponent * min(1.0, tk / 128) ** cal.kv_tile_exponent
    return cal.mma_efficiency * warp * shape


def _overlap(mma: float, mem: float, stages: int, cal: Calibration) -> float:
    exposed = cal.two_stage_exposed if stages <= 2 else 0.0
    return max(mma, mem) + exposed * min(mma, mem)


def _pass(full: torch.Tensor, partial: torch.Tensor, repeat: int | float, *, t_full: float, t_partial: float,
          t_cta: float, mma_pair: float, mask_pair: float, mem_pair: float, hw: Hardware,
          cal: Calibration, permute_s: float) -> PassCost:
    """One kernel: CTA ``i`` of a head class visits ``full[c, i]`` FULL and
    ``partial[c, i]`` PARTIAL tiles; every class row is launched ``repeat`` times."""
    full = full.to(torch.float64)
    partial = partial.to(torch.float64)
    work = t_cta + full * t_full + partial * t_partial
    per_class = work.reshape(-1)
    total_pairs_full = float(full.sum()) * repeat
    total_pairs_partial = float(partial.sum()) * repeat
    ctas = round(per_class.numel() * repeat)
    span = makespan(per_class, hw.sms, repeat)
    ideal = float(per_class.sum()) * repeat / hw.sms
    kernel = span + cal.launch_s
    return PassCost(
        time_s=kernel + permute_s, kernel_s=kernel, permute_s=permute_s, makespan_s=span, ideal_s=ideal,
        mma_s=(total_pairs_full + total_pairs_partial) * mma_pair,
        mask_s=total_pairs_partial * mask_pair,
        memory_s=(total_pairs_full + total_pairs_partial) * mem_pair, ctas=ctas)


def _axes_of(config: KernelConfig) -> int:
    return len(config.q_tile)


def predict_counts(full_fwd: torch.Tensor, partial_fwd: torch.Tensor, full_bwd: torch.Tensor,
                   partial_bwd: torch.Tensor, repeat: int, config: KernelConfig, hw: Hardware, *,
                   head_dim: int, tokens: tuple[int, int], batch_heads: int, nbytes: int = 2,
                   ops: int = 1, grid_axes: int = 1, calibration: Calibration | None = None,
                   repeat_bwd: int | float | None = None) -> Prediction:
    """Forward and backward cost from per-CTA tile counts (``[classes, CTAs]``),
    every CTA launched ``repeat`` times (``repeat_bwd`` in the backward, if given).

    ``tokens``: (queries, keys) per head; ``batch_heads``: batch x heads (for
    the permutation and pre/post-processing traffic); ``ops``: the mask's
    per-pair operation count; ``grid_axes``: axes of the token grid (flat
    tiles on a grid decode coordinates per pair).
    """
    cal = calibration or DEFAULT_CALIBRATION
    if config.layout not in LAYOUTS:
        raise SpecError(f"unknown layout {config.layout!r}", where="argument layout", hint="one of " + ", ".join(LAYOUTS))
    D, b = head_dim, nbytes
    tq, tk = config.q_tokens, config.kv_tokens
    eff = _efficiency(config, cal)
    per_sm_bw = hw.bytes_per_s / hw.sms
    bw_eff = cal.address_bw_efficiency if config.layout == "address" else 1.0
    miss = 1.0 - cal.l2_hit
    ops_pair = ops + cal.mask_fixed_ops
    if config.layout == "flat" and grid_axes > 1:
        ops_pair += cal.flat_decode_ops_per_axis * grid_axes
    mask_pair = tq * tk * ops_pair / (hw.vector_flops_per_sm * cal.mask_alu_fraction) if ops else 0.0
    address_fwd = (tk * cal.address_ops_per_axis * _axes_of(config) / (hw.vector_flops_per_sm * cal.mask_alu_fraction)
                   if config.layout == "address" else 0.0)
    address_bwd = (tq * cal.address_ops_per_axis * _axes_of(config) / (hw.vector_flops_per_sm * cal.mask_alu_fraction)
                   if config.layout == "address" else 0.0)

    # forward: CTA per Q tile; K and V tiles stream in
    mma_f = 4.0 * tq * tk * D / (hw.flops_per_sm * eff)
    mem_f = 2.0 * tk * D * b * miss / (per_sm_bw * bw_eff)
    t_full_f = _overlap(mma_f, mem_f, config.num_stages, cal) + address_fwd
    t_part_f = t_full_f + mask_pair
    cta_f = cal.cta_overhead_s + 2.0 * tq * D * b / (per_sm_bw * bw_eff)  # load Q, store O
    nq_tok, nk_tok = tokens
    perm_bytes = 4 * 2 * batch_heads * max(nq_tok, nk_tok) * D * b  # 4 tensors read + written
    perm = perm_bytes / (hw.bytes_per_s * cal.permute_bw_efficiency) + cal.launch_s if config.layout == "permute" else 0.0
    fwd = _pass(full_fwd, partial_fwd, repeat, t_full=t_full_f, t_partial=t_part_f, t_cta=cta_f,
                mma_pair=mma_f, mask_pair=mask_pair, mem_pair=mem_f, hw=hw, cal=cal, permute_s=perm)

    # backward: CTA per KV tile; Q, dO stream in, dQ accumulates in fp32
    eff_b = eff * cal.bwd_efficiency_ratio
    mma_b = BWD_FLOP_RATIO * 4.0 * tq * tk * D / (hw.flops_per_sm * eff_b)
    mem_b = (2.0 * tq * D * b + 2.0 * tq * D * 4) * miss / (per_sm_bw * bw_eff)  # Q, dO; dQ fp32 accumulate
    t_full_b = _overlap(mma_b, mem_b, config.num_stages, cal) + address_bwd
    t_part_b = t_full_b + mask_pair
    cta_b = cal.cta_overhead_s + 4.0 * tk * D * b / (per_sm_bw * bw_eff)  # load K, V; store dK, dV
    pre = 2.0 * batch_heads * nq_tok * D * b / hw.bytes_per_s + cal.launch_s  # delta = rowsum(dO * O)
    bwd = _pass(full_bwd, partial_bwd, repeat if repeat_bwd is None else repeat_bwd, t_full=t_full_b, t_partial=t_part_b, t_cta=cta_b,
                mma_pair=mma_b, mask_pair=mask_pair, mem_pair=mem_b, hw=hw, cal=cal, permute_s=perm)
    bwd.time_s += pre
    bwd.kernel_s += pre
    return Prediction(config, fwd, bwd)


def predict(schedule: TileSchedule, config: KernelConfig, hw: Hardware, *, head_dim: int, batch: int = 1,
            nbytes: int = 2, ops: int = 1, grid_axes: int = 1, calibration: Calibration | None = None) -> Prediction:
    """Forward and backward cost of a schedule run with ``config`` (whose tile
    token counts are those of the schedule's tiles)."""
    H = schedule.num_heads
    repeat = batch * (H if schedule.heads_stored == 1 else 1)
    # a TileSummary holds sampled CTAs, each standing for `weight` CTAs
    q_weight, kv_weight = getattr(schedule, "q_weight", 1), getattr(schedule, "kv_weight", 1)
    return predict_counts(
        schedule.full_count, schedule.partial_count, schedule.t_full_count, schedule.t_partial_count,
        repeat * q_weight, config, hw, head_dim=head_dim, tokens=(schedule.num_queries, schedule.num_keys),
        batch_heads=batch * H, nbytes=nbytes, ops=ops, grid_axes=grid_axes, calibration=calibration,
        repeat_bwd=repeat * kv_weight)


def predict_dense(num_queries: int, num_keys: int, heads: int, config: KernelConfig, hw: Hardware, *,
                  head_dim: int, batch: int = 1, nbytes: int = 2, calibration: Calibration | None = None) -> Prediction:
    """Dense attention modelled the same way: flat tiles of the config's token
    counts, every tile pair FULL, no mask, no permutation."""
    tq, tk = config.q_tokens, config.kv_tokens
    nq, nk = -(-num_queries // tq), -(-num_keys // tk)
    flat = KernelConfig((tq,), (tk,), "flat", config.num_warps, config.num_stages)
    # Every CTA is alike: one of each, repeated (no tensor as long as the tile grid).
    fwd = predict_counts(torch.tensor([[float(nk)]]), torch.zeros(1, 1), torch.tensor([[float(nq)]]), torch.zeros(1, 1),
                         batch * heads * nq, flat, hw, head_dim=head_dim, tokens=(num_queries, num_keys),
                         batch_heads=batch * heads, nbytes=nbytes, ops=0, calibration=calibration)
    bwd = predict_counts(torch.tensor([[float(nk)]]), torch.zeros(1, 1), torch.tensor([[float(nq)]]), torch.zeros(1, 1),
                         batch * heads * nk, flat, hw, head_dim=head_dim, tokens=(num_queries, num_keys),
                         batch_heads=batch * heads, nbytes=nbytes, ops=0, calibration=calibration)
    return Prediction(flat, fwd.forward, bwd.backward)


__all__ = ["BWD_FLOP_RATIO", "Calibration", "DEFAULT_CALIBRATION", "KernelConfig", "PassCost", "Prediction",
           "dtype_bytes", "makespan", "mask_ops", "predict", "predict_counts", "predict_dense", "smem_fits"]
