"""Simulator of the chunked recurrences (``runtime.recurrences.runner`` / ``runtime.recurrences.decay.triton``).

The Triton kernels follow flash-linear-attention's structure (``N = ceil(T / C)`` chunks, ``Dk`` / ``Dv``
in blocks of ``BK``/``BV`` = up to 64, ``NK``/``NV`` blocks):

- a sequential state pass, one program per (batch x head, Dk block, Dv block), ``N`` dependent steps of
  ``2 C BK BV`` tensor-core work (the state update) plus a store of the chunk's state: the forward runs it
  once (states h_n), the backward twice (h_n recomputed, and the reverse pass for dh_n);
- chunk-parallel kernels, one program per (chunk, batch x head, value or key block), spread over all SMs:
  forward output ``NV 2 C^2 Dk`` (q k^T, once per value block) ``+ 2 C Dk Dv`` (q h_n) ``+ 2 C^2 Dv``
  (A v); backward dv ``NV 2 C^2 Dk + 2 C Dk Dv + 2 C^2 Dv`` and dq/dk ``NK 2 C^2 Dv + 4 C Dk Dv + 4 C^2 Dk``;
- per-channel (GLA) gates run in chunks of ``VECTOR_CHUNK`` = 64 split into sub-chunks of ``S`` = 16
  (flash-linear-attention's factorisation): each of the ``C / S - 1`` off-diagonal sub-chunk products is one
  tensor-core dot over the whole chunk (rows outside the sub-chunk zeroed), ``2 C^2 Dk`` each, per value
  block; the diagonal sub-chunk blocks are exact and elementwise on the non-tensor ALUs, ``C S Dk`` times
  ``VECTOR_OPS`` (subtract, exp, two multiplies, add); the backward does both for dq and for dk; head /
  scalar gates pay ``2 C^2 Dk`` for q k^T and ``3 C^2`` for the decays;
- HBM traffic: q, k, v, g read, the states written and read back, o written (forward); the backward reads
  q, k, v, do, g and both state sets, and writes dq, dk, dv (fp32) and dg;
- a fixed latency per sequential chunk step (the dependency on the state).

A sequential pass takes ``N`` steps of its per-SM work (programs sharing an SM share its rates) plus the
step latency; a chunk-parallel kernel takes its total work at the attainable rate of ``cost.Calibration``
for tiles of C tokens over all SMs, in whole waves. The chunk size (16, 32 or 64) minimising forward +
backward is chosen. The softmax baseline is causal flash-style attention modelled by
``cost.predict_counts`` (tiles of 128 x 128, the diagonal tiles masked), and the crossover is the shortest
sequence (a multiple of 64) from which the recurrence's predicted forward time stays below it at every length
checked (``crossover``).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import torch

from ...core.recurrence_rules import RULES
from .calibration import DEFAULT_CALIBRATION, Calibration
from .hardware import Hardware
from .model import KernelConfig, predict_counts
from .simulator import ReportView

#: The chunk sizes searched.
CHUNKS = (16, 32, 64)
#: Elementwise operations per (t, j, d) of the per-channel in-chunk product's diagonal sub-chunk blocks.
VECTOR_OPS = 5
#: Chunk size of per-channel gates in the Triton kernels, and the sub-chunks their in-chunk product is
#: factorised into (off-diagonal sub-chunk blocks on the tensor cores, diagonal ones exact):
#: flash-linear-attention's 64 / 16. ``runtime.recurrences.decay.triton`` reads them from here.
VECTOR_CHUNK = 64
VECTOR_SUB_CHUNK = 16


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


def _block(dim: int) -> int:
    """A Dk / Dv block of the kernels (``triton_recurrence.configs``: a power of two in 16..64)."""
    return min(64, max(16, 1 << max(0, dim - 1).bit_length()))


def chunk_cost(gate: str, n: int, heads: int, head_dim: int, batch: int, chunk: int, hw: Hardware, *,
               nbytes: int = 2, head_dim_v: int | None = None, calibration: Calibration | None = None,
               rcal: RecurrenceCalibration | None = None) -> ChunkCost:
    """Forward and backward cost of the chunked recurrence with chunks of ``chunk`` tokens."""
    cal = calibration or DEFAULT_CALIBRATION
    rc = rcal or DEFAULT_RECURRENCE_CALIBRATION
    Dk, Dv, C = head_dim, head_dim_v or head_dim, chunk
    N = -(-n // C)
    BK, BV = _block(Dk), _block(Dv)
    NK, NV = -(-Dk // BK), -(-Dv // BV)
    bh = batch * heads
    vector = gate == "vector"
    gate_w = Dk if vector else 1
    fit = cal.fit(hw)  # the per-architecture fractions fitted to published FA2-class throughput
    eff = fit.forward * min(1.0, C / 128) ** (cal.q_tile_exponent + cal.kv_tile_exponent)
    vec_rate = hw.vector_flops_per_sm * rc.vector_fraction

    # sequential state pass: per program and step, the state update and the state's store
    seq_programs = bh * NK * NV
    s_mma = 2.0 * C * BK * BV
    s_bytes = C * (BK + BV) * nbytes + C * gate_w * 4 + BK * BV * nbytes

    def seq_pass() -> float:
        share = max(1.0, seq_programs / hw.sms)  # programs sharing an SM share its rates
        step = max(s_mma / (hw.flops_per_sm * eff), s_bytes / (hw.bytes_per_s / hw.sms))
        return N * (step * share + rc.step_latency_s) + cal.launch_s

    def parallel(mma: float, vec: float, by: float, programs: int, eff_: float) -> float:
        """A chunk-parallel kernel: its whole work over all SMs, in whole waves of programs."""
        t = max(mma / (hw.sms * hw.flops_per_sm * eff_) + vec / (hw.sms * vec_rate), by / hw.bytes_per_s)
        waves = -(-programs // hw.sms) / (programs / hw.sms)
        return t * waves + cal.launch_s

    S = min(VECTOR_SUB_CHUNK, C)
    # in-chunk work per value block: elementwise (diagonal sub-chunk blocks, or the decay matrix) and on
    # the tensor cores (q k^T, or one whole-chunk dot per sub-chunk after the first)
    intra = VECTOR_OPS * C * S * Dk if vector else 3.0 * C * C
    # (per-channel gates: sub-chunks 1 .. C/S - 1 each take one dot against the keys before them)
    qk = 2.0 * (C // S - 1) * C * C * Dk if vector else 2.0 * C * C * Dk
    chunks = bh * N
    # forward: state pass + output kernel
    f_mma = chunks * (NK * NV * s_mma + NV * qk + 2.0 * C * Dk * Dv + 2.0 * C * C * Dv)
    f_vec = chunks * NV * intra
    f_bytes = chunks * (NK * NV * s_bytes + NV * (2 * C * Dk * nbytes + C * gate_w * 4) + Dk * Dv * nbytes
                        + 2 * C * Dv * nbytes)
    fwd = seq_pass() + parallel(chunks * (NV * qk + 2.0 * C * Dk * Dv + 2.0 * C * C * Dv), f_vec,
                                f_bytes - chunks * NK * NV * s_bytes, chunks * NV, eff)
    # backward: the state pass twice (h_n recomputed, dh_n), dv, dq/dk and the gate gradient
    beff = eff * fit.backward / fit.forward
    dv_mma = NV * qk + 2.0 * C * Dk * Dv + 2.0 * C * C * Dv
    dqk_mma = NK * 2.0 * C * C * Dv + 4.0 * C * Dk * Dv + 2.0 * qk
    dv_vec = NV * intra
    dqk_vec = NK * 2 * intra if vector else NK * intra
    dv_bytes = NV * (2 * C * Dk * nbytes + C * gate_w * 4) + Dk * Dv * nbytes + C * Dv * (nbytes + 4)
    dqk_bytes = NK * C * 2 * Dv * nbytes + 2 * Dk * Dv * nbytes + 2 * C * Dk * (nbytes + 4) + C * gate_w * 4
    gate_bytes = (2 * C * Dk * nbytes + 2 * C * Dk * 4 + C * gate_w * 4) if gate != "head" else 0
    b_mma = chunks * (2 * NK * NV * s_mma + dv_mma + dqk_mma)
    b_vec = chunks * (dv_vec + dqk_vec)
    b_bytes = chunks * (2 * NK * NV * s_bytes + dv_bytes + dqk_bytes + gate_bytes)
    bwd = (2 * seq_pass() + parallel(chunks * dv_mma, chunks * dv_vec, chunks * dv_bytes, chunks * NV, beff)
           + parallel(chunks * dqk_mma, chunks * dqk_vec, chunks * dqk_bytes, chunks * NK, beff)
           + (chunks * gate_bytes / hw.bytes_per_s + cal.launch_s if gate != "head" else 0.0))
    return ChunkCost(chunk=C, forward_s=fwd, backward_s=bwd, forward_flops=f_mma + f_vec,
                     backward_flops=b_mma + b_vec, forward_bytes=f_bytes, backward_bytes=b_bytes,
                     programs=chunks * NV)


# ----------------------------------------------------------------- the delta rule
@dataclass(frozen=True)
class ChunkKernel:
    """One kernel of a rule's chunked form (the delta rule's WY form, Titans'): its work per chunk of one
    (batch, head), its programs per chunk (value or key blocks), and whether it is a sequential pass over the
    chunks."""

    name: str
    mma: float  # tensor-core FLOPs
    vec: float  # elementwise operations (non-tensor ALUs)
    bytes: float  # HBM bytes read and written
    programs: int = 1
    sequential: bool = False


def _decayed_product(gate: str, C: int, D: int) -> tuple[float, float]:
    """(tensor-core FLOPs, elementwise ops) of one decayed ``C x C`` product over ``D`` channels (``K K^T``,
    ``Q K^T`` and their gradients): a dot of ``2 C^2 D`` and the ``C x C`` decay matrix (subtract, exp,
    multiply: ``3 C^2``), or for a per-channel gate the ``C x C x D`` elementwise product (``VECTOR_OPS``
    per entry, the decay differs per channel)."""
    if gate == "vector":
        return 0.0, float(VECTOR_OPS * C * C * D)
    return 2.0 * C * C * D, 3.0 * C * C


def delta_kernels(gate: str, chunk: int, head_dim: int, head_dim_v: int | None = None, *,
                  nbytes: int = 2) -> tuple[list[ChunkKernel], list[ChunkKernel]]:
    """The delta rule's chunked WY form as kernels (forward, backward), each with its work per chunk of one
    (batch, head), following flash-linear-attention's ``chunk_gated_delta_rule`` / ``chunk_kda``.

    Forward, per chunk of C tokens (``G``: the gates' cumulative sum in the chunk):
      kkt     ``A = strict_tril(diag(beta) K K^T, decayed)`` (fp32)                 one decayed product
      solve   ``T = (I + A)^-1``: ``(C^3 - C) / 3`` FLOPs, the diagonal 16 x 16 blocks by forward
              substitution (elementwise), the rest as dots (fla's ``solve_tril``)
      wu      ``W = T diag(beta) (K e^G)``, ``U = T diag(beta) V``                    ``2 C^2 (Dk + Dv)``
      state   sequential, per value block: ``V' = U - W S``, ``S = e^(G_C) S + (K e^(G_C - G))^T V'``
                                                                                    ``4 C Dk Dv``
      output  per value block: ``O = scale (Q e^G S + tril(Q K^T, decayed) V')``      one decayed product per
              value block ``+ 2 C Dk Dv + 2 C^2 Dv``
    Backward, recomputing (fla saves only q, k, v, g, beta, T and the initial state): wu and state again,
      dv      ``dV' = tril(Q K^T, decayed)^T dO``                                      one product ``+ 2 C^2 Dv``
      dstate  sequential, reverse, per value block: ``dV'' = dV' + K e^(..) dS``, ``dS = e^(G_C) dS +
              scale (Q e^G)^T dO - W^T dV''``                                        ``6 C Dk Dv``
      dqkw    per key block: ``dP = dO V'^T`` (``2 C^2 Dv`` each), ``dq = dP K``, ``dk = dP^T Q`` (two
              decayed products), ``dq += dO S^T``, ``dk += V' dS^T``, ``dW = -dV'' S^T``  ``+ 6 C Dk Dv``
      wy      through W, U and T: ``dT`` (``2 C^2 (Dk + Dv)``), ``T^T dW``, ``T^T dU`` (``2 C^2 (Dk + Dv)``),
              ``dA = -T^T dT T^T`` (``4 C^3``), ``dk`` through ``K K^T`` (two decayed products)
    Bytes: q, k, v, w, u, v', T, the states and the outputs in ``nbytes``, A, gates and gradients of
    q, k, w, beta, g in fp32; k and q re-read per value block where a kernel runs per value block. Left
    out: elementwise work of O(C D) per chunk (beta scalings, ``U - W S``, the gates' cumulative sums)."""
    C, Dk = chunk, head_dim
    Dv = head_dim_v or head_dim
    b = nbytes
    NK, NV = -(-Dk // _block(Dk)), -(-Dv // _block(Dv))
    gw = {"head": 0, "scalar": 1, "vector": Dk}[gate] * 4  # gate bytes per token (a head gate is a constant)
    pk_mma, pk_vec = _decayed_product(gate, C, Dk)
    S = min(VECTOR_SUB_CHUNK, C)
    diag = (C // S) * (S ** 3 - S) / 3.0  # forward substitution inside the diagonal S x S blocks
    solve = (C ** 3 - C) / 3.0
    wu = ChunkKernel("wu", 2.0 * C * C * (Dk + Dv), 0.0,
                     C * C * b + C * Dk * b + C * Dv * b + C * b + C * gw + C * (Dk + Dv) * b)
    state = ChunkKernel("state", 4.0 * C * Dk * Dv, 0.0,
                        NV * (2 * C * Dk * b + C * gw) + 2 * C * Dv * b + Dk * Dv * b, NV, True)
    forward = [
        ChunkKernel("kkt", pk_mma, pk_vec, C * Dk * b + C * b + C * gw + C * C * 4),
        ChunkKernel("solve", solve - diag, diag, C * C * 4 + C * C * b),
        wu,
        state,
        ChunkKernel("output", NV * pk_mma + 2.0 * C * Dk * Dv + 2.0 * C * C * Dv, NV * pk_vec,
                    NV * (2 * C * Dk * b + C * gw) + C * Dv * b + Dk * Dv * b + C * Dv * b, NV),
    ]
    backward = [
        wu,
        state,
        ChunkKernel("dv", pk_mma + 2.0 * C * C * Dv, pk_vec, 2 * C * Dk * b + C * gw + 2 * C * Dv * b),
        ChunkKernel("dstate", 6.0 * C * Dk * Dv, 0.0,
                    NV * (3 * C * Dk * b + C * gw) + 3 * C * Dv * b + Dk * Dv * b, NV, True),
        ChunkKernel("dqkw", NK * 2.0 * C * C * Dv + 2 * pk_mma + 6.0 * C * Dk * Dv, 2 * pk_vec,
                    NK * 3 * C * Dv * b + 2 * C * Dk * b + 2 * Dk * Dv * b + 2 * C * gw + 3 * C * Dk * 4, NK),
        ChunkKernel("wy", 4.0 * C * C * (Dk + Dv) + 4.0 * C ** 3 + 2 * pk_mma, 2 * pk_vec,
                    C * Dk * b + 2 * C * Dv * b + C * b + C * gw + C * C * b + C * Dk * 4
                    + C * (Dk + Dv) * 4 + C * 4 + C * gw),
    ]
    return forward, backward


def kernels_chunk_cost(kernels: tuple[list[ChunkKernel], list[ChunkKernel]], n: int, heads: int, batch: int,
                       chunk: int, hw: Hardware, *, calibration: Calibration | None = None,
                       rcal: RecurrenceCalibration | None = None) -> ChunkCost:
    """Forward and backward cost of a chunked form given as kernels (forward, backward) with chunks of ``chunk``
    tokens: FLOPs and bytes summed over the kernels and chunks; time as the decay recurrences' model
    (sequential passes: N dependent steps of their per-program work plus the step latency; chunk-parallel
    kernels: their whole work over all SMs in whole waves)."""
    cal = calibration or DEFAULT_CALIBRATION
    rc = rcal or DEFAULT_RECURRENCE_CALIBRATION
    C = chunk
    N = -(-n // C)
    bh = batch * heads
    chunks = bh * N
    fit = cal.fit(hw)
    eff = fit.forward * min(1.0, C / 128) ** (cal.q_tile_exponent + cal.kv_tile_exponent)
    beff = eff * fit.backward / fit.forward
    vec_rate = hw.vector_flops_per_sm * rc.vector_fraction

    def kernel_s(kern: ChunkKernel, eff_: float) -> float:
        if kern.sequential:  # one program per (batch x head, value block), N dependent steps
            programs = bh * kern.programs
            share = max(1.0, programs / hw.sms)
            step = max(kern.mma / kern.programs / (hw.flops_per_sm * eff_) + kern.vec / kern.programs / vec_rate,
                       kern.bytes / kern.programs / (hw.bytes_per_s / hw.sms))
            return N * (step * share + rc.step_latency_s) + cal.launch_s
        programs = chunks * kern.programs
        t = max(chunks * kern.mma / (hw.sms * hw.flops_per_sm * eff_) + chunks * kern.vec / (hw.sms * vec_rate),
                chunks * kern.bytes / hw.bytes_per_s)
        return t * (-(-programs // hw.sms) / (programs / hw.sms)) + cal.launch_s

    fwd, bwd = kernels
    return ChunkCost(chunk=C, forward_s=sum(kernel_s(k, eff) for k in fwd),
                     backward_s=sum(kernel_s(k, beff) for k in bwd),
                     forward_flops=chunks * sum(k.mma + k.vec for k in fwd),
                     backward_flops=chunks * sum(k.mma + k.vec for k in bwd),
                     forward_bytes=chunks * sum(k.bytes for k in fwd),
                     backward_bytes=chunks * sum(k.bytes for k in bwd),
                     programs=chunks * max(k.programs for k in fwd))


def delta_chunk_cost(gate: str, n: int, heads: int, head_dim: int, batch: int, chunk: int, hw: Hardware, *,
                     nbytes: int = 2, head_dim_v: int | None = None, calibration: Calibration | None = None,
                     rcal: RecurrenceCalibration | None = None) -> ChunkCost:
    """Forward and backward cost of the delta rule's chunked WY form (``delta_kernels``) with chunks of
    ``chunk`` tokens (``kernels_chunk_cost``)."""
    return kernels_chunk_cost(delta_kernels(gate, chunk, head_dim, head_dim_v, nbytes=nbytes), n, heads, batch,
                              chunk, hw, calibration=calibration, rcal=rcal)


# ----------------------------------------------------------------- Titans' neural memory
#: The Dv block of Titans' Triton kernels (``runtime.recurrences.titans.triton`` reads it from here): 16 columns,
#: the smallest dot; each program holds two [Dk, BV] state blocks and [C, Dk] tiles in registers (32 columns
#: spilled 24-104 B in the reverse state pass at Dk = 32 and 64 on sm_90).
TITANS_VALUE_BLOCK = 16


def titans_kernels(chunk: int, head_dim: int, head_dim_v: int | None = None, *,
                   nbytes: int = 2) -> tuple[list[ChunkKernel], list[ChunkKernel]]:
    """Titans' Triton kernels (``runtime.recurrences.titans.triton``) as (forward, backward), each with its work
    per chunk of one (batch, head); NV = Dv / BV programs per chunk where a kernel runs per value block.

      chunk      one program: the decays (``6 C^2`` exp and products), ``Gam = A E``, the shifted rows and the
                 forward substitution (``2 C^3`` each, fp32 on the FMA units), ``c`` (``2 C^2``), ``K K^T``
                 (``2 C^2 Dk``, tensor cores); stores ``(I + L)^-1``, Gam, Gp and seven vectors
      state      sequential, per value block: ``K S0``, ``K M0`` and the two state updates (``8 C Dk Dv`` in
                 all), the solve's product ``(I + L)^-1 (...)`` (``2 C^2 Dv``, fp32)
      output     per value block: ``Q K^T`` (``2 C^2 Dk`` each), ``Q S0``, ``Q M0`` (``4 C Dk Dv``), ``P W``
                 (``2 C^2 Dv``, fp32)
    Backward (the chunk kernel again):
      local      per value block: ``Q K^T`` (``2 C^2 Dk`` each) and ``P^T dO`` (``2 C^2 Dv``, fp32)
      dstate     sequential, reverse, per value block: ``K dS'``, ``K dM'`` and four products into dS0, dM0
                 (``12 C Dk Dv``), ``T^T dU`` (``2 C^2 Dv``, fp32)
      dqk        per value block: ``K K^T``, ``Q K^T`` and three ``[C, C] x [C, Dk]`` products (``10 C^2 Dk``
                 each), six ``[C, BV] x [BV, Dk]`` products (``12 C Dk Dv``), ``dY U^T``, ``dO W^T``
                 (``4 C^2 Dv``) and the row shift (``2 C^3`` each, fp32)
      gates      one program: the value blocks' gate terms summed, the decays again, ``A^T dGam`` and
                 ``dGam E^T`` (``4 C^3``)
    Bytes: q, k read in the input dtype by every program that reads them; the chunk terms, states, U, dY,
    dq, dk and the gate terms in fp32 (the host sums dq, dk, dtheta over the value blocks and reads the states
    once more for three inner products per chunk). Left out: elementwise work of O(C BV)."""
    C, Dk = chunk, head_dim
    Dv = head_dim_v or head_dim
    b = nbytes
    NV = -(-Dv // TITANS_VALUE_BLOCK)
    vecs = 7 * C * 4  # d, c, dp, cp, exp(ce), Gam[L], E[L]
    rows = C * 4 + vecs  # theta and the vectors, per program
    chunk_k = ChunkKernel("chunk", 2.0 * C * C * Dk, 6.0 * C ** 3 + 10.0 * C * C,
                          C * Dk * b + 3 * C * 4 + 3 * C * C * 4 + vecs)
    forward = [
        chunk_k,
        ChunkKernel("state", 8.0 * C * Dk * Dv, 2.0 * C * C * Dv,
                    NV * (C * Dk * b + rows + C * C * 4) + C * Dv * b + C * Dv * 4 + 2 * Dk * Dv * 4, NV, True),
        ChunkKernel("output", NV * 2.0 * C * C * Dk + 4.0 * C * Dk * Dv, 2.0 * C * C * Dv,
                    NV * (2 * C * Dk * b + rows + C * C * 4) + 2 * Dk * Dv * 4 + C * Dv * (4 + b), NV),
    ]
    backward = [
        chunk_k,
        ChunkKernel("local", NV * 2.0 * C * C * Dk, 2.0 * C * C * Dv,
                    NV * (2 * C * Dk * b + C * C * 4) + C * Dv * (b + 4), NV),
        ChunkKernel("dstate", 12.0 * C * Dk * Dv, 2.0 * C * C * Dv,
                    NV * (2 * C * Dk * b + rows + C * C * 4 + 3 * C * 4) + C * Dv * (b + 12) + 2 * Dk * Dv * 4,
                    NV, True),
        ChunkKernel("dqk", NV * 10.0 * C * C * Dk + 12.0 * C * Dk * Dv, 4.0 * C * C * Dv + NV * 2.0 * C ** 3,
                    NV * (2 * C * Dk * b + rows + 2 * C * C * 4 + 2 * C * Dk * 4 + 2 * C * 4 + C * C * 4 + 2 * C * 4)
                    + C * Dv * (b + 8) + 4 * Dk * Dv * 4, NV),
        ChunkKernel("gates", 0.0, 4.0 * C ** 3 + 16.0 * C * C,
                    NV * (C * C + 4 * C) * 4 + 3 * 4 + 4 * C * 4 + 4 * Dk * Dv * 4),
    ]
    return forward, backward


def titans_chunk_cost(gate: str, n: int, heads: int, head_dim: int, batch: int, chunk: int, hw: Hardware, *,
                      nbytes: int = 2, head_dim_v: int | None = None, calibration: Calibration | None = None,
                      rcal: RecurrenceCalibration | None = None) -> ChunkCost:
    """Forward and backward cost of Titans' Triton kernels (``titans_kernels``) with chunks of ``chunk`` tokens
    (the gate's kind changes nothing: one log gate per token and head, or a constant per head)."""
    return kernels_chunk_cost(titans_kernels(chunk, head_dim, head_dim_v, nbytes=nbytes), n, heads, batch, chunk, hw,
                              calibration=calibration, rcal=rcal)


@dataclass(frozen=True)
class RuleCost:
    """A recurrence rule's cost model: ``chunk_cost(gate, n, heads, head_dim, batch, C, hw, **kw) -> ChunkCost``,
    the chunk sizes its per-channel gates run in where they are fixed (None: every one of ``CHUNKS``), the
    chunk sizes the simulator chooses from (a forced ``q_tile`` may name any of ``CHUNKS``), and the report's
    note on the rule's kernels (None: none)."""

    chunk_cost: object
    vector_chunks: tuple[int, ...] | None = None
    note: str | None = None
    chunks: tuple[int, ...] = CHUNKS
    #: The largest key head dim its kernels take (None: any): beyond it the torch form runs, which is not modelled.
    max_head_dim: int | None = None


#: Each recurrence rule's cost entry, by its word (``core.recurrence_rules``).
RULE_COSTS: dict[str, RuleCost] = {
    "decay": RuleCost(chunk_cost, vector_chunks=(VECTOR_CHUNK,)),
    "delta": RuleCost(delta_chunk_cost, note=(
        "the delta rule: fla's chunked WY form (per chunk K K^T, the triangular inverse, W and U, the state pass "
        "with W S, the output; the backward recomputes W, U and the states), compiler/cost/recurrence_cost.py "
        "delta_kernels; attnc's Triton kernels run chunks of 64 (per-channel gates, KDA's: chunks of 64 in "
        "sub-chunks of 16, runtime/recurrences/delta/triton_kda.py), its torch form chunks of 64 (16 for "
        "per-channel gates)")),
    "titans": RuleCost(titans_chunk_cost, note=(
        "Titans' neural memory: attnc's Triton kernels (the chunk's terms and triangular solve, a sequential state "
        "pass, the output; backward: the state-free part of dW, a reverse state pass, dq/dk per value block, the "
        "gate terms), "
        "compiler/cost/recurrence_cost.py titans_kernels; the Triton kernels run the chosen chunk, the torch form "
        "chunks of 32; chunks of 64 are not chosen: their [64, 64] fp32 tiles spill registers on sm_80 and sm_90"),
        chunks=(16, 32), max_head_dim=128),
}


def best_chunk(gate: str, n: int, heads: int, head_dim: int, batch: int, hw: Hardware, *, rule: str = "decay",
               **kw) -> ChunkCost:
    """The chunk size (16/32/64) with the smallest predicted forward + backward time; per-channel gates
    of the decay rule run in chunks of ``VECTOR_CHUNK`` whatever is asked (the factorised kernels are
    written for it). ``rule``: the rule's entry in ``RULE_COSTS`` (the delta rule: every chunk size; Titans: 16
    and 32, ``RuleCost.chunks``)."""
    entry = RULE_COSTS[rule]
    chunks = entry.vector_chunks if gate == "vector" and entry.vector_chunks else entry.chunks
    costs = [entry.chunk_cost(gate, n, heads, head_dim, batch, C, hw, **kw) for C in chunks]
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


#: The crossover's fine scan: every multiple of 64 from the last length that loses on the doubling grid to 4x
#: it, in at most ``CROSSOVER_FINE_STEPS`` steps.
CROSSOVER_FINE_STEPS = 1024


@functools.lru_cache(maxsize=4096)
def _times(gate: str, n: int, heads: int, head_dim: int, batch: int, hw: Hardware, chunk: int | None, nbytes: int,
           rule: str) -> tuple[float, float, float, float]:
    """(recurrence forward, backward, causal softmax forward, backward) predicted at ``n`` tokens: what the
    crossovers compare (cached: the forward's and the training crossover read the same lengths)."""
    rec = (RULE_COSTS[rule].chunk_cost(gate, n, heads, head_dim, batch, chunk, hw, nbytes=nbytes) if chunk
           else best_chunk(gate, n, heads, head_dim, batch, hw, nbytes=nbytes, rule=rule))
    sm = softmax_causal(n, heads, head_dim, batch, hw, nbytes=nbytes)
    return rec.forward_s, rec.backward_s, sm.forward.time_s, sm.backward.time_s


def crossover(gate: str, heads: int, head_dim: int, batch: int, hw: Hardware, chunk: int | None = None, *,
              nbytes: int = 2, backward: bool = False, limit: int = 1 << 22, rule: str = "decay") -> int | None:
    """The sequence length (a multiple of 64) from which the recurrence's predicted time (forward, or
    forward + backward) stays below causal softmax attention's at every length checked: a doubling grid from 64
    to ``limit`` (ended by three wins in a row past 16K tokens: softmax grows as n^2, the recurrence as n), and
    every multiple of 64 from the grid's last losing length to 4x it (wider steps where that is more than
    ``CROSSOVER_FINE_STEPS`` of them): the first length checked after the last one that loses. The predicted
    times are not monotone in n (whole waves, chunk choices): a length between two that win can lose, so the
    first win of a bisection would not be the claim. None if the longest length checked loses."""

    def wins(n: int) -> bool:
        rf, rb, sf, sb = _times(gate, n, heads, head_dim, batch, hw, chunk, nbytes, rule)
        return (rf + rb if backward else rf) < (sf + sb if backward else sf)

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
    top = min(limit, 4 * losing[-1] if losing else 0)
    step = 64 * max(1, -(-top // 64 // CROSSOVER_FINE_STEPS))
    checked = {64 << i for i in range((n // 64).bit_length() - 1)}  # the doubling grid, 64 to n / 2
    last = losing[-1] if losing else 0  # lengths below the grid's last loss cannot move the answer
    for m in range(step, top + 1, step):
        checked.add(m)
        if m > last and not wins(m):
            last = m
    return min((m for m in checked if m > last), default=None)  # None: the longest length checked loses


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
    rule: str = "decay"

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
            "rule": self.rule,
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
                        dtype: str, nbytes: int, chunk: int | None = None, rule: str = "decay") -> RecurrenceReport:
    """The report of a recurrence (``rule`` 'decay', 'delta' or 'titans') at length ``n``: every chunk size's cost,
    the best (or the forced ``chunk``), causal softmax's time and the crossover lengths."""
    candidates = [RULE_COSTS[rule].chunk_cost(gate, n, heads, head_dim, batch, C, hw, nbytes=nbytes) for C in CHUNKS]
    if chunk is None:
        best = min((c for c in candidates if c.chunk in RULE_COSTS[rule].chunks),
                   key=lambda c: (c.forward_s + c.backward_s, c.chunk))
    else:
        best = next(c for c in candidates if c.chunk == chunk)
    sm = softmax_causal(n, heads, head_dim, batch, hw, nbytes=nbytes)
    cross = crossover(gate, heads, head_dim, batch, hw, chunk, nbytes=nbytes, rule=rule)
    cross_t = crossover(gate, heads, head_dim, batch, hw, chunk, nbytes=nbytes, backward=True, rule=rule)
    notes = ["cost model constants are guesses to be calibrated on a GPU (compiler/cost/recurrence_cost.py, "
             "RecurrenceCalibration; compiler/cost/model.py, Calibration)",
             "softmax baseline: causal flash-style attention, 128 x 128 tiles, diagonal tiles masked",
             "crossover: the length (multiple of 64) from which the recurrence's predicted forward "
             "(training: forward + backward) time stays below the baseline's at every length checked: each "
             "multiple of 64 from the last length that loses on a doubling grid to 4x it, and the doubling lengths "
             "past that (softmax's time grows as n^2, the recurrence's as n)"]
    if RULE_COSTS[rule].note:
        notes.append(RULE_COSTS[rule].note)
    elif gate == "vector":
        notes.append("per-channel gates: the model counts the in-chunk product as elementwise (non-tensor ALUs); "
                     "the Triton kernels use chunks of 64 in sub-chunks of 16, off-diagonal blocks on the tensor cores")
    return RecurrenceReport(name, gate, n, heads, head_dim, batch, dtype, hw, best, candidates,
                            sm.forward.time_s, sm.backward.time_s, cross, cross_t, chunk is not None, notes, rule)


def _t(s: float) -> str:
    return f"{s * 1e6:,.1f} us" if s < 1e-2 else f"{s * 1e3:,.2f} ms"


def _n(x) -> str:
    return "never (within 4M tokens)" if x is None else f"{x:,} tokens"


def format_recurrence_report(rep: RecurrenceReport) -> str:
    hw = rep.hardware
    b = rep.best
    lines = [
        f"{rep.pattern}: recurrence ({rep.gate} gate{', ' + RULES[rep.rule].title if RULES[rep.rule].rates else ''}) simulated on the {hw.name} model in {rep.dtype} (a "
        f"prediction, not a measurement): n={rep.n}, heads {rep.heads}, head_dim {rep.head_dim}, batch {rep.batch}",
        f"hardware: {hw.name} ({hw.sms} SMs, {hw.tensor_tflops:g} TFLOP/s dense, {hw.hbm_gbps:g} GB/s)",
        "",
        f"  chunk size           {b.chunk}" + (" (forced)" if rep.chunk_forced
                                                  else f" (chosen of {'/'.join(map(str, RULE_COSTS[rep.rule].chunks))})"),
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


__all__ = ["CHUNKS", "ChunkCost", "ChunkKernel", "RecurrenceCalibration", "RecurrenceReport", "best_chunk",
           "chunk_cost", "crossover", "delta_chunk_cost", "delta_kernels", "format_recurrence_report",
           "kernels_chunk_cost", "simulate_recurrence", "softmax_causal", "titans_chunk_cost", "titans_kernels",
           "TITANS_VALUE_BLOCK"]
