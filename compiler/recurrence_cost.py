"""Simulator of the chunked recurrences (``runtime.recurrence`` / ``runtime.triton_recurrence``).

The kernels run one program per (batch x head, block of ``BV`` value columns); each program walks the
``N = ceil(T / C)`` chunks in order. Per chunk (``Dk`` key and ``Dv`` value dims, head and scalar gates):

- forward tensor-core work: ``q k^T`` and ``A v`` (``2 C^2 Dk + 2 C^2 Dv``), the inter-chunk product
  ``(q * exp(b)) S`` and the state update ``(k * exp(b_last - b))^T v`` (``4 C Dk Dv``);
- backward (a forward sweep for dq with the state recomputed, a backward sweep for dk, dv and the state
  gradient): ``2 C^2 (3 Dk + 3 Dv) + 10 C Dk Dv`` (the state recomputed once);
- per-channel (GLA) gates compute the in-chunk product elementwise on the non-tensor ALUs:
  ``C^2 Dk`` (forward; 3x backward) times ``VECTOR_OPS`` operations (subtract, exp, two multiplies, add),
  which is why they run in chunks of 16;
- HBM traffic: q, k, v, g read and o written (forward); q, k, v, do, g read twice and dq, dk (fp32, one
  partial per value block), dv and dg written (backward);
- a fixed latency per sequential chunk step (the dependency on the state).

A program's time is its chunks' time (tensor work at the attainable per-SM rate of ``cost.Calibration``
for tiles of C tokens, overlapped with its share of the bandwidth) and the kernel time is the makespan of
the programs on the SMs plus launches. The chunk size (16, 32 or 64) minimising forward + backward is
chosen. The softmax baseline is causal flash-style attention modelled by ``cost.predict_counts`` (tiles of
128 x 128, the diagonal tiles masked), and the crossover is the shortest sequence (a multiple of 64) from
which the recurrence's predicted forward time is below it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from .cost import DEFAULT_CALIBRATION, Calibration, KernelConfig, makespan, predict_counts
from .hardware import Hardware
from .simulator import ReportView

#: The chunk sizes searched.
CHUNKS = (16, 32, 64)
#: Elementwise operations per (t, j, d) of the per-channel in-chunk product.
VECTOR_OPS = 5


# =====================================================================
# GUESSWORK: estimates, to be calibrated on a GPU (like cost.Calibration).
# =====================================================================
@dataclass(frozen=True)
class RecurrenceCalibration:
    #: Latency of one sequential chunk step (load, dependent matmuls, store), seconds.
    step_latency_s: float = 1.0e-6
    #: Fraction of the fp32 vector rate the elementwise gate arithmetic attains.
    vector_fraction: float = 0.5
    #: Fraction of the L2/HBM traffic of re-read q, k (one per value block) served by L2.
    l2_hit: float = 0.6


DEFAULT_RECURRENCE_CALIBRATION = RecurrenceCalibration()
# =====================================================================


@dataclass
class ChunkCost:
    """Predicted cost of the chunked recurrence at one chunk size."""

    chunk: int
    forward_s: float
    backward_s: float
    forward_flops: float
    backward_flops: float
    forward_bytes: float
    backward_bytes: float
    programs: int

    def to_dict(self) -> dict:
        return asdict(self)


def value_block(head_dim_v: int, head_dim_k: int) -> int:
    """The value block of a program (as the Triton launcher picks it on a GPU)."""
    bk = max(16, 1 << max(0, head_dim_k - 1).bit_length())
    bv = max(16, 1 << max(0, head_dim_v - 1).bit_length())
    return min(bv, 64 if bk <= 64 else 32)


def chunk_cost(gate: str, n: int, heads: int, head_dim: int, batch: int, chunk: int, hw: Hardware, *,
               nbytes: int = 2, head_dim_v: int | None = None, calibration: Calibration | None = None,
               rcal: RecurrenceCalibration | None = None) -> ChunkCost:
    """Forward and backward cost of the chunked recurrence with chunks of ``chunk`` tokens."""
    cal = calibration or DEFAULT_CALIBRATION
    rc = rcal or DEFAULT_RECURRENCE_CALIBRATION
    Dk, Dv, C = head_dim, head_dim_v or head_dim, chunk
    N = -(-n // C)
    BV = value_block(Dv, Dk)
    NV = -(-Dv // BV)
    programs = batch * heads * NV
    # per program and chunk (a program holds BV of the Dv columns; intra scores are recomputed per block)
    qk = 2.0 * C * C * Dk if gate != "vector" else 0.0
    f_mma = qk + 2.0 * C * C * BV + 4.0 * C * Dk * BV
    b_mma = 3 * qk + 2.0 * C * C * 3 * BV + 10.0 * C * Dk * BV
    f_vec = VECTOR_OPS * C * C * Dk if gate == "vector" else 3.0 * C * C
    b_vec = 3 * VECTOR_OPS * C * C * Dk if gate == "vector" else 6.0 * C * C
    gate_w = Dk if gate == "vector" else 1
    f_bytes = C * ((2 * Dk + BV) * nbytes + gate_w * 4 + BV * nbytes)
    b_bytes = C * (2 * (2 * Dk + 2 * BV) * nbytes + 2 * gate_w * 4 + 2 * Dk * 4 + BV * 4)
    fit = cal.fit(hw)  # the per-architecture fractions fitted to published FA2-class throughput
    eff = fit.forward * min(1.0, C / 128) ** (cal.q_tile_exponent + cal.kv_tile_exponent)
    share = max(1.0, programs / hw.sms)  # programs sharing an SM share its rates
    per_sm_bw = hw.bytes_per_s / hw.sms
    vec_rate = hw.vector_flops_per_sm * rc.vector_fraction

    def per_chunk(mma, vec, by, eff_):
        t_mma = mma / (hw.flops_per_sm * eff_) + vec / vec_rate
        t_mem = by / per_sm_bw
        return max(t_mma, t_mem) * share + rc.step_latency_s

    t_f = per_chunk(f_mma, f_vec, f_bytes, eff)
    t_b = per_chunk(b_mma, b_vec, b_bytes, eff * fit.backward / fit.forward)
    # each SM runs ceil(programs / sms) programs concurrently (already in `share`); the busiest SM decides
    fwd = N * t_f + cal.launch_s
    bwd = N * t_b + 3 * cal.launch_s + (4 * Dk * 4 + Dk * 4) * n * batch * heads / hw.bytes_per_s  # gate kernel
    if programs > hw.sms:  # uneven waves: LPT on equal programs
        waves = makespan(torch.full((programs,), 1.0, dtype=torch.float64), hw.sms) / (programs / hw.sms)
        fwd *= waves
        bwd *= waves
    total = batch * heads
    return ChunkCost(
        chunk=C, forward_s=fwd, backward_s=bwd,
        forward_flops=total * NV * N * (f_mma + f_vec),
        backward_flops=total * NV * N * (b_mma + b_vec),
        forward_bytes=total * NV * N * f_bytes, backward_bytes=total * NV * N * b_bytes, programs=programs)


def best_chunk(gate: str, n: int, heads: int, head_dim: int, batch: int, hw: Hardware, **kw) -> ChunkCost:
    """The chunk size (16/32/64) with the smallest predicted forward + backward time."""
    costs = [chunk_cost(gate, n, heads, head_dim, batch, C, hw, **kw) for C in CHUNKS]
    return min(costs, key=lambda c: (c.forward_s + c.backward_s, c.chunk))


def softmax_causal(n: int, heads: int, head_dim: int, batch: int, hw: Hardware, *, nbytes: int = 2,
                   calibration: Calibration | None = None, tile: int = 128):
    """Causal flash-style softmax attention (tiles of ``tile`` x ``tile``, diagonal tiles masked):
    the cost model's ``Prediction``."""
    nt = -(-n // tile)
    i = torch.arange(nt, dtype=torch.int64).view(1, nt)
    full_f, part_f = i, torch.ones_like(i)  # Q tile i: i full KV tiles and the diagonal one
    full_b, part_b = nt - 1 - i, torch.ones_like(i)  # KV tile j: Q tiles after it, and the diagonal one
    cfg = KernelConfig((tile,), (tile,), "flat", 8 if tile >= 128 else 4, 2)
    return predict_counts(full_f, part_f, full_b, part_b, batch * heads, cfg, hw, head_dim=head_dim,
                          tokens=(n, n), batch_heads=batch * heads, nbytes=nbytes, ops=1, calibration=calibration)


def crossover(gate: str, heads: int, head_dim: int, batch: int, hw: Hardware, chunk: int | None = None, *,
              nbytes: int = 2, backward: bool = False, limit: int = 1 << 22) -> int | None:
    """The sequence length (a multiple of 64) past which the recurrence's predicted time (forward, or
    forward + backward) stays below causal softmax attention's: the last length that loses on a doubling
    grid of lengths from 64 to ``limit``, refined by bisection. None if it still loses at ``limit``."""

    def wins(n: int) -> bool:
        rec = (chunk_cost(gate, n, heads, head_dim, batch, chunk, hw, nbytes=nbytes) if chunk
               else best_chunk(gate, n, heads, head_dim, batch, hw, nbytes=nbytes))
        sm = softmax_causal(n, heads, head_dim, batch, hw, nbytes=nbytes)
        r = rec.forward_s + (rec.backward_s if backward else 0.0)
        s = sm.forward.time_s + (sm.backward.time_s if backward else 0.0)
        return r < s

    # the last losing length on a doubling grid (softmax grows as n^2 and the recurrence as n, so three
    # wins in a row past 16K tokens settle it; both are launch-bound at tiny lengths), then bisection up
    # to the next grid point
    losing, streak, n = [], 0, 64
    while (streak < 3 or n <= 16384) and n <= limit:
        if wins(n):
            streak += 1
        else:
            losing.append(n)
            streak = 0
        n *= 2
    if streak == 0:
        return None
    if not losing:
        return 64
    lo, hi = losing[-1], losing[-1] * 2  # loses at lo, wins at hi and at every grid point after it
    while hi - lo > 64:
        mid = (lo + hi) // 2 // 64 * 64
        if mid <= lo:
            break
        lo, hi = (lo, mid) if wins(mid) else (mid, hi)
    return hi


# ----------------------------------------------------------------- the report
@dataclass
class RecurrenceReport(ReportView):
    """What ``attnc.simulate`` returns for a recurrence. ``to_dict()`` holds every figure."""

    pattern: str
    gate: str
    n: int
    heads: int
    head_dim: int
    batch: int
    dtype: str
    hardware: Hardware
    best: ChunkCost
    candidates: list[ChunkCost]
    softmax_forward_s: float
    softmax_backward_s: float
    crossover_n: int | None
    crossover_n_training: int | None
    chunk_forced: bool = False
    assumptions: list[str] = field(default_factory=list)

    @property
    def chunk(self) -> int:
        return self.best.chunk

    @property
    def predicted_speedup(self) -> float:
        """Causal softmax forward time over the recurrence's, at this length."""
        return self.softmax_forward_s / self.best.forward_s

    @property
    def predicted_speedup_backward(self) -> float:
        return self.softmax_backward_s / self.best.backward_s

    def to_dict(self) -> dict:
        b = self.best
        return {
            "pattern": self.pattern,
            "kind": "recurrence",
            "gate": self.gate,
            "n": self.n,
            "heads": self.heads,
            "head_dim": self.head_dim,
            "batch": self.batch,
            "dtype": self.dtype,
            "chunk": b.chunk,
            "chunk_forced": self.chunk_forced,
            "flops": {"forward": b.forward_flops, "backward": b.backward_flops},
            "bytes": {"forward": b.forward_bytes, "backward": b.backward_bytes},
            "predicted": {"forward_s": b.forward_s, "backward_s": b.backward_s,
                          "softmax_forward_s": self.softmax_forward_s,
                          "softmax_backward_s": self.softmax_backward_s},
            "predicted_speedup": self.predicted_speedup,
            "predicted_speedup_backward": self.predicted_speedup_backward,
            "crossover_n": self.crossover_n,
            "crossover_n_training": self.crossover_n_training,
            "candidates": [c.to_dict() for c in self.candidates],
            "hardware": self.hardware.to_dict(),
            "assumptions": list(self.assumptions),
        }

    def format_table(self) -> str:
        return format_recurrence_report(self)


def simulate_recurrence(name: str, gate: str, n: int, hw: Hardware, *, heads: int, head_dim: int, batch: int,
                        dtype: str, nbytes: int, chunk: int | None = None) -> RecurrenceReport:
    candidates = [chunk_cost(gate, n, heads, head_dim, batch, C, hw, nbytes=nbytes) for C in CHUNKS]
    if chunk is None:
        best = min(candidates, key=lambda c: (c.forward_s + c.backward_s, c.chunk))
    else:
        best = next(c for c in candidates if c.chunk == chunk)
    sm = softmax_causal(n, heads, head_dim, batch, hw, nbytes=nbytes)
    cross = crossover(gate, heads, head_dim, batch, hw, chunk, nbytes=nbytes)
    cross_t = crossover(gate, heads, head_dim, batch, hw, chunk, nbytes=nbytes, backward=True)
    notes = ["cost model constants are guesses to be calibrated on a GPU (compiler/recurrence_cost.py, "
             "RecurrenceCalibration; compiler/cost.py, Calibration)",
             "softmax baseline: causal flash-style attention, 128 x 128 tiles, diagonal tiles masked",
             "crossover: the length (multiple of 64) past which the recurrence's predicted forward "
             "(training: forward + backward) time stays below the baseline's"]
    if gate == "vector":
        notes.append("per-channel gates: the in-chunk product is elementwise (non-tensor ALUs); "
                     "the Triton kernels use chunks of 16")
    return RecurrenceReport(name, gate, n, heads, head_dim, batch, dtype, hw, best, candidates,
                            sm.forward.time_s, sm.backward.time_s, cross, cross_t, chunk is not None, notes)


def _t(s: float) -> str:
    return f"{s * 1e6:,.1f} us" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def _n(x) -> str:
    return "never (within 4M tokens)" if x is None else f"{x:,} tokens"


def format_recurrence_report(rep: RecurrenceReport) -> str:
    hw = rep.hardware
    b = rep.best
    lines = [
        f"{rep.pattern}: recurrence ({rep.gate} gate), n={rep.n}, heads {rep.heads}, head_dim {rep.head_dim}, "
        f"batch {rep.batch}, {rep.dtype}",
        f"hardware: {hw.name} ({hw.sms} SMs, {hw.tensor_tflops:g} TFLOP/s dense, {hw.hbm_gbps:g} GB/s)",
        "",
        f"  chunk size           {b.chunk}" + (" (forced)" if rep.chunk_forced else " (chosen of 16/32/64)"),
        f"  FLOPs                forward {b.forward_flops:.3e}, backward {b.backward_flops:.3e}",
        f"  bytes                forward {b.forward_bytes:.3e}, backward {b.backward_bytes:.3e}",
        f"  predicted time       forward {_t(b.forward_s)}, backward {_t(b.backward_s)}",
        f"  causal softmax       forward {_t(rep.softmax_forward_s)}, backward {_t(rep.softmax_backward_s)}",
        f"  predicted speedup    forward {rep.predicted_speedup:.2f}x, backward {rep.predicted_speedup_backward:.2f}x",
        f"  beats softmax from   {_n(rep.crossover_n)} (forward), {_n(rep.crossover_n_training)} (forward + backward)",
        "",
        "  chunk sizes:",
        f"  {'chunk':>5} {'forward':>12} {'backward':>12} {'fwd FLOPs':>11} {'fwd bytes':>11}",
    ]
    for c in rep.candidates:
        lines.append(f"  {c.chunk:>5} {_t(c.forward_s):>12} {_t(c.backward_s):>12} {c.forward_flops:>11.3e} "
                     f"{c.forward_bytes:>11.3e}")
    lines.append("")
    lines += [f"  note: {a}" for a in rep.assumptions]
    return "\n".join(lines)


__all__ = ["CHUNKS", "ChunkCost", "RecurrenceCalibration", "RecurrenceReport", "best_chunk", "chunk_cost",
           "crossover", "format_recurrence_report", "simulate_recurrence", "softmax_causal", "value_block"]
