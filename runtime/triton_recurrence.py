"""Triton kernels of the chunked decay-gated recurrence: forward, backward (dq, dk, dv, initial state) and the
gate gradient, specialised on the IR's gate kind (``GATE``: 0 a constant per head, 1 a scalar per token and
head, 2 a vector per token, head and key channel).

One program per (batch x head, block of Dv columns) walks the chunks in order, keeping its ``[Dk, BV]``
slice of the state in fp32 registers (fp64 for fp64 inputs); the math is that of ``runtime.recurrence``
(in-chunk cumulative log gates, so every exponent is a sum of gates over a span and never positive for
log decays). The backward is two sweeps: forward in time for dq (the state recomputed), backward in time
for dk and dv (the state gradient carried); then ``dg_t = sum_{s>=t} (q dq - k dk)_s + sum_e dS_T S_T``.

Per-channel (vector) gates use chunks of 16: their in-chunk product is an elementwise ``[C, C, Dk]`` tensor.

The kernels are plain functions here; ``kernels(interpret)`` wraps them with ``triton.jit`` for CUDA or with
the interpreter (``TRITON_INTERPRET=1``) for CPU tensors. Triton decides between the two when a function is
decorated (``triton.jit`` reads ``triton.knobs.runtime.interpret``, i.e. the environment variable, at that
moment), so both wrappings are built explicitly and the variable is set while interpreted kernels run.
"""

import contextlib
import functools
import os

import torch

try:  # the CPU path runs without Triton; any other import failure is a real error
    import triton
    import triton.language as tl
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only without triton
    if _err.name != "triton":
        raise
    import types

    triton = None
    tl = types.SimpleNamespace(constexpr="constexpr")

from ..spec.errors import SpecError
from .triton_support import require_triton

GATE_CODES = {"head": 0, "scalar": 1, "vector": 2}
#: Chunk size of per-channel gates in the kernels (their in-chunk product is C x C x Dk elementwise).
VECTOR_CHUNK = 16


def available() -> bool:
    return triton is not None


# ======================================================================= kernels (undecorated)
def _fwd_kernel(Q, K, V, GH, GL, GR, S0, OUT, ST, T, TP, scale,
                H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr, HAS_S0: tl.constexpr,
                STORE_ST: tl.constexpr, F64: tl.constexpr, LOW: tl.constexpr):
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    h = i_bh % H
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = k_off < DK
    v_ok = v_off < DV
    sv_ok = k_ok[:, None] & v_ok[None, :]
    causal = t_off[:, None] >= t_off[None, :]
    if F64:
        S = tl.full([BK, BV], 0.0, tl.float64)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
    if HAS_S0:
        S += tl.load(S0 + i_bh * DK * DV + k_off[:, None] * DV + v_off[None, :], mask=sv_ok, other=0.0).to(S.dtype)
    if GATE == 0:
        gh = tl.load(GH + h).to(S.dtype)
    for c0 in range(0, T, C):
        rows = c0 + t_off
        r_ok = rows < T
        qk_ok = r_ok[:, None] & k_ok[None, :]
        rv_ok = r_ok[:, None] & v_ok[None, :]
        q = tl.load(Q + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0)
        k = tl.load(K + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0)
        v = tl.load(V + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0)
        in_dt = q.dtype
        q = q.to(S.dtype)
        k = k.to(S.dtype)
        v = v.to(S.dtype)
        if GATE == 2:
            # in-chunk gates (ChunkGates, precomputed on the host): prefix sums hi + lo, last reset
            g_off = i_bh * TP * DK + rows[:, None] * DK + k_off[None, :]
            hi = tl.load(GH + g_off, mask=k_ok[None, :], other=0.0).to(S.dtype)
            lo = tl.load(GL + g_off, mask=k_ok[None, :], other=0.0).to(S.dtype)
            rs = tl.load(GR + g_off, mask=k_ok[None, :], other=-1)
            last = (t_off == C - 1)[:, None]
            hl = tl.reduce(tl.where(last, hi, 0.0), 0, tl.standard._sum_combine)  # [BK]
            ll = tl.reduce(tl.where(last, lo, 0.0), 0, tl.standard._sum_combine)
            rl = tl.reduce(tl.where(last, rs, 0), 0, tl.standard._sum_combine)
            eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))  # exp(b_t): no reset in [c0, t]
            ebl = tl.exp(tl.where(rl[None, :] > t_off[:, None], float("-inf"), (hl[None, :] - hi) + (ll[None, :] - lo)))
            dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))[:, None]
            span = (hi[:, None, :] - hi[None, :, :]) + (lo[:, None, :] - lo[None, :, :])  # [t, j, d]
            E = tl.exp(tl.where(causal[:, :, None] & (rs[:, None, :] <= t_off[None, :, None]), span, float("-inf")))
            qe = q * eb
            ke = k * ebl
            A = tl.reduce(q[:, None, :] * k[None, :, :] * E, 2, tl.standard._sum_combine)
        else:
            if GATE == 0:
                # a constant gate: spans are gh times a count of steps (a count of 0 is 0, also for gh = -inf)
                nt = tl.minimum(t_off + 1, T - c0)
                nl = tl.minimum(C, T - c0)
                eb = tl.exp(gh * nt.to(S.dtype))
                ebl = tl.exp(tl.where(nt == nl, 0.0, gh * (nl - nt).to(S.dtype)))
                dec = tl.exp(gh * nl.to(S.dtype))
                steps = nt[:, None] - nt[None, :]
                E = tl.exp(tl.where(causal, tl.where(steps == 0, 0.0, gh * steps.to(S.dtype)), float("-inf")))
            else:
                g_off = i_bh * TP + rows
                hi = tl.load(GH + g_off).to(S.dtype)
                lo = tl.load(GL + g_off).to(S.dtype)
                rs = tl.load(GR + g_off)
                last = t_off == C - 1
                hl = tl.reduce(tl.where(last, hi, 0.0), 0, tl.standard._sum_combine)
                ll = tl.reduce(tl.where(last, lo, 0.0), 0, tl.standard._sum_combine)
                rl = tl.reduce(tl.where(last, rs, 0), 0, tl.standard._sum_combine)
                eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))
                ebl = tl.exp(tl.where(rl > t_off, float("-inf"), (hl - hi) + (ll - lo)))
                dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))
                span = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
                E = tl.exp(tl.where(causal & (rs[:, None] <= t_off[None, :]), span, float("-inf")))
            qe = q * eb[:, None]
            ke = k * ebl[:, None]
            if LOW:
                A = tl.dot(q.to(in_dt), tl.trans(k.to(in_dt)))
            else:
                A = tl.dot(q, tl.trans(k), input_precision="ieee")
            A = A * E
        if LOW:
            o = tl.dot(qe.to(in_dt), S.to(in_dt)) + tl.dot(A.to(in_dt), v.to(in_dt))
            S = S * dec + tl.dot(tl.trans(ke.to(in_dt)), v.to(in_dt))
        else:
            o = tl.dot(qe, S, input_precision="ieee") + tl.dot(A, v, input_precision="ieee")
            S = S * dec + tl.dot(tl.trans(ke), v, input_precision="ieee")
        tl.store(OUT + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], (o * scale).to(OUT.dtype.element_ty),
                 mask=rv_ok)
    if STORE_ST:
        tl.store(ST + i_bh * DK * DV + k_off[:, None] * DV + v_off[None, :], S.to(ST.dtype.element_ty), mask=sv_ok)


def _bwd_dq_kernel(K, V, GH, GL, GR, S0, DO, DQ, T, TP, scale, NBH,
                   H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                   BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr, HAS_S0: tl.constexpr,
                   F64: tl.constexpr):
    """Forward sweep: dq (a partial sum per Dv block, in DQ[i_v]) with the state recomputed."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    h = i_bh % H
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = k_off < DK
    v_ok = v_off < DV
    sv_ok = k_ok[:, None] & v_ok[None, :]
    causal = t_off[:, None] >= t_off[None, :]
    if F64:
        S = tl.full([BK, BV], 0.0, tl.float64)
    else:
        S = tl.full([BK, BV], 0.0, tl.float32)
    if HAS_S0:
        S += tl.load(S0 + i_bh * DK * DV + k_off[:, None] * DV + v_off[None, :], mask=sv_ok, other=0.0).to(S.dtype)
    if GATE == 0:
        gh = tl.load(GH + h).to(S.dtype)
    dq_base = DQ + (i_v * NBH + i_bh) * T * DK
    for c0 in range(0, T, C):
        rows = c0 + t_off
        r_ok = rows < T
        qk_ok = r_ok[:, None] & k_ok[None, :]
        rv_ok = r_ok[:, None] & v_ok[None, :]
        k = tl.load(K + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0).to(S.dtype)
        v = tl.load(V + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0).to(S.dtype)
        do = tl.load(DO + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0).to(S.dtype)
        dP = tl.dot(do, tl.trans(v), input_precision="ieee")  # [C(t), C(j)]
        if GATE == 2:
            # in-chunk gates (ChunkGates, precomputed on the host): prefix sums hi + lo, last reset
            g_off = i_bh * TP * DK + rows[:, None] * DK + k_off[None, :]
            hi = tl.load(GH + g_off, mask=k_ok[None, :], other=0.0).to(S.dtype)
            lo = tl.load(GL + g_off, mask=k_ok[None, :], other=0.0).to(S.dtype)
            rs = tl.load(GR + g_off, mask=k_ok[None, :], other=-1)
            last = (t_off == C - 1)[:, None]
            hl = tl.reduce(tl.where(last, hi, 0.0), 0, tl.standard._sum_combine)  # [BK]
            ll = tl.reduce(tl.where(last, lo, 0.0), 0, tl.standard._sum_combine)
            rl = tl.reduce(tl.where(last, rs, 0), 0, tl.standard._sum_combine)
            eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))  # exp(b_t): no reset in [c0, t]
            ebl = tl.exp(tl.where(rl[None, :] > t_off[:, None], float("-inf"), (hl[None, :] - hi) + (ll[None, :] - lo)))
            dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))[:, None]
            span = (hi[:, None, :] - hi[None, :, :]) + (lo[:, None, :] - lo[None, :, :])  # [t, j, d]
            E = tl.exp(tl.where(causal[:, :, None] & (rs[:, None, :] <= t_off[None, :, None]), span, float("-inf")))
            dq = tl.reduce(dP[:, :, None] * E * k[None, :, :], 1, tl.standard._sum_combine)
            dq += tl.dot(do, tl.trans(S), input_precision="ieee") * eb
            ke = k * ebl
        else:
            if GATE == 0:
                # a constant gate: spans are gh times a count of steps (a count of 0 is 0, also for gh = -inf)
                nt = tl.minimum(t_off + 1, T - c0)
                nl = tl.minimum(C, T - c0)
                eb = tl.exp(gh * nt.to(S.dtype))
                ebl = tl.exp(tl.where(nt == nl, 0.0, gh * (nl - nt).to(S.dtype)))
                dec = tl.exp(gh * nl.to(S.dtype))
                steps = nt[:, None] - nt[None, :]
                E = tl.exp(tl.where(causal, tl.where(steps == 0, 0.0, gh * steps.to(S.dtype)), float("-inf")))
            else:
                g_off = i_bh * TP + rows
                hi = tl.load(GH + g_off).to(S.dtype)
                lo = tl.load(GL + g_off).to(S.dtype)
                rs = tl.load(GR + g_off)
                last = t_off == C - 1
                hl = tl.reduce(tl.where(last, hi, 0.0), 0, tl.standard._sum_combine)
                ll = tl.reduce(tl.where(last, lo, 0.0), 0, tl.standard._sum_combine)
                rl = tl.reduce(tl.where(last, rs, 0), 0, tl.standard._sum_combine)
                eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))
                ebl = tl.exp(tl.where(rl > t_off, float("-inf"), (hl - hi) + (ll - lo)))
                dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))
                span = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
                E = tl.exp(tl.where(causal & (rs[:, None] <= t_off[None, :]), span, float("-inf")))
            W = dP * E
            dq = tl.dot(W, k, input_precision="ieee")
            dq += tl.dot(do, tl.trans(S), input_precision="ieee") * eb[:, None]
            ke = k * ebl[:, None]
        tl.store(dq_base + rows[:, None] * DK + k_off[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=qk_ok)
        S = S * dec + tl.dot(tl.trans(ke), v, input_precision="ieee")


def _bwd_dkdv_kernel(Q, K, V, GH, GL, GR, DO, DST, DK_, DV_, DS0, T, TP, scale, NBH,
                     H: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, C: tl.constexpr, GATE: tl.constexpr, HAS_DST: tl.constexpr,
                     STORE_DS0: tl.constexpr, F64: tl.constexpr):
    """Backward sweep: dv, dk (a partial sum per Dv block, in DK_[i_v]) and the initial state's gradient,
    carrying the state gradient from the last chunk to the first."""
    i_bh = tl.program_id(0)
    i_v = tl.program_id(1)
    h = i_bh % H
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = k_off < DK
    v_ok = v_off < DV
    sv_ok = k_ok[:, None] & v_ok[None, :]
    causal = t_off[:, None] >= t_off[None, :]
    if F64:
        dS = tl.full([BK, BV], 0.0, tl.float64)
    else:
        dS = tl.full([BK, BV], 0.0, tl.float32)
    if HAS_DST:
        dS += tl.load(DST + i_bh * DK * DV + k_off[:, None] * DV + v_off[None, :], mask=sv_ok, other=0.0).to(dS.dtype)
    if GATE == 0:
        gh = tl.load(GH + h).to(dS.dtype)
    dk_base = DK_ + (i_v * NBH + i_bh) * T * DK
    n_chunks = (T + C - 1) // C
    for i in range(0, n_chunks):
        c0 = (n_chunks - 1 - i) * C
        rows = c0 + t_off
        r_ok = rows < T
        qk_ok = r_ok[:, None] & k_ok[None, :]
        rv_ok = r_ok[:, None] & v_ok[None, :]
        q = tl.load(Q + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0).to(dS.dtype)
        k = tl.load(K + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0).to(dS.dtype)
        v = tl.load(V + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0).to(dS.dtype)
        do = tl.load(DO + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0).to(dS.dtype)
        dPt = tl.dot(v, tl.trans(do), input_precision="ieee")  # [C(j), C(t)] = (do_t . v_j)
        if GATE == 2:
            # in-chunk gates (ChunkGates, precomputed on the host): prefix sums hi + lo, last reset
            g_off = i_bh * TP * DK + rows[:, None] * DK + k_off[None, :]
            hi = tl.load(GH + g_off, mask=k_ok[None, :], other=0.0).to(dS.dtype)
            lo = tl.load(GL + g_off, mask=k_ok[None, :], other=0.0).to(dS.dtype)
            rs = tl.load(GR + g_off, mask=k_ok[None, :], other=-1)
            last = (t_off == C - 1)[:, None]
            hl = tl.reduce(tl.where(last, hi, 0.0), 0, tl.standard._sum_combine)  # [BK]
            ll = tl.reduce(tl.where(last, lo, 0.0), 0, tl.standard._sum_combine)
            rl = tl.reduce(tl.where(last, rs, 0), 0, tl.standard._sum_combine)
            eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))  # exp(b_t): no reset in [c0, t]
            ebl = tl.exp(tl.where(rl[None, :] > t_off[:, None], float("-inf"), (hl[None, :] - hi) + (ll[None, :] - lo)))
            dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))[:, None]
            span = (hi[:, None, :] - hi[None, :, :]) + (lo[:, None, :] - lo[None, :, :])  # [t, j, d]
            E = tl.exp(tl.where(causal[:, :, None] & (rs[:, None, :] <= t_off[None, :, None]), span, float("-inf")))
            A = tl.reduce(q[:, None, :] * k[None, :, :] * E, 2, tl.standard._sum_combine)  # [t, j]
            dk = tl.reduce(tl.trans(dPt)[:, :, None] * E * q[:, None, :], 0, tl.standard._sum_combine)  # [j, d]
            qe = q * eb
            ke = k * ebl
            dk = dk * scale + tl.dot(v, tl.trans(dS), input_precision="ieee") * ebl
        else:
            if GATE == 0:
                # a constant gate: spans are gh times a count of steps (a count of 0 is 0, also for gh = -inf)
                nt = tl.minimum(t_off + 1, T - c0)
                nl = tl.minimum(C, T - c0)
                eb = tl.exp(gh * nt.to(dS.dtype))
                ebl = tl.exp(tl.where(nt == nl, 0.0, gh * (nl - nt).to(dS.dtype)))
                dec = tl.exp(gh * nl.to(dS.dtype))
                steps = nt[:, None] - nt[None, :]
                E = tl.exp(tl.where(causal, tl.where(steps == 0, 0.0, gh * steps.to(dS.dtype)), float("-inf")))
            else:
                g_off = i_bh * TP + rows
                hi = tl.load(GH + g_off).to(dS.dtype)
                lo = tl.load(GL + g_off).to(dS.dtype)
                rs = tl.load(GR + g_off)
                last = t_off == C - 1
                hl = tl.reduce(tl.where(last, hi, 0.0), 0, tl.standard._sum_combine)
                ll = tl.reduce(tl.where(last, lo, 0.0), 0, tl.standard._sum_combine)
                rl = tl.reduce(tl.where(last, rs, 0), 0, tl.standard._sum_combine)
                eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))
                ebl = tl.exp(tl.where(rl > t_off, float("-inf"), (hl - hi) + (ll - lo)))
                dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))
                span = (hi[:, None] - hi[None, :]) + (lo[:, None] - lo[None, :])
                E = tl.exp(tl.where(causal & (rs[:, None] <= t_off[None, :]), span, float("-inf")))
            Dm_t = tl.trans(E)  # [j, t]
            At = tl.dot(k, tl.trans(q), input_precision="ieee") * Dm_t  # [j, t]
            A = tl.trans(At)
            Wt = dPt * Dm_t
            qe = q * eb[:, None]
            ke = k * ebl[:, None]
            dk = (tl.dot(Wt, q, input_precision="ieee") * scale
                  + tl.dot(v, tl.trans(dS), input_precision="ieee") * ebl[:, None])
        dv = tl.dot(tl.trans(A), do, input_precision="ieee") * scale + tl.dot(ke, dS, input_precision="ieee")
        tl.store(DV_ + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], dv.to(DV_.dtype.element_ty), mask=rv_ok)
        tl.store(dk_base + rows[:, None] * DK + k_off[None, :], dk.to(DK_.dtype.element_ty), mask=qk_ok)
        dS = dS * dec + tl.dot(tl.trans(qe), do, input_precision="ieee") * scale
    if STORE_DS0:
        tl.store(DS0 + i_bh * DK * DV + k_off[:, None] * DV + v_off[None, :], dS.to(DS0.dtype.element_ty), mask=sv_ok)


def _gate_grad_kernel(Q, K, DQ, DK_, LAST, DG, T, DK: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                      VECTOR: tl.constexpr, HAS_LAST: tl.constexpr):
    """``dg_t = sum_{s >= t} (q dq - k dk)_s + LAST`` per (batch x head), summed over channels for scalar
    gates; a reverse sweep with an in-chunk reverse cumsum and a carry."""
    i_bh = tl.program_id(0)
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    k_ok = k_off < DK
    carry = tl.full([BK], 0.0, tl.float64)  # float64 always: the rounding of the sum must not grow with T
    if HAS_LAST:
        carry += tl.load(LAST + i_bh * DK + k_off, mask=k_ok, other=0.0).to(carry.dtype)
    n_chunks = (T + C - 1) // C
    for i in range(0, n_chunks):
        c0 = (n_chunks - 1 - i) * C
        rows = c0 + t_off
        r_ok = rows < T
        m = r_ok[:, None] & k_ok[None, :]
        off = i_bh * T * DK + rows[:, None] * DK + k_off[None, :]
        db = (tl.load(Q + off, mask=m, other=0.0).to(carry.dtype) * tl.load(DQ + off, mask=m, other=0.0).to(carry.dtype)
              - tl.load(K + off, mask=m, other=0.0).to(carry.dtype) * tl.load(DK_ + off, mask=m, other=0.0).to(carry.dtype))
        dg = tl.associative_scan(db, 0, tl.standard._sum_combine, reverse=True) + carry[None, :]
        carry += tl.reduce(db, 0, tl.standard._sum_combine)
        if VECTOR:
            tl.store(DG + off, dg.to(DG.dtype.element_ty), mask=m)
        else:
            tl.store(DG + i_bh * T + rows, tl.reduce(dg, 1, tl.standard._sum_combine).to(DG.dtype.element_ty), mask=r_ok)


# ======================================================================= wrapping
_KERNELS = (_fwd_kernel, _bwd_dq_kernel, _bwd_dkdv_kernel, _gate_grad_kernel)


@functools.cache
def kernels(interpret: bool) -> dict:
    """The kernels jitted for the GPU (``interpret=False``) or wrapped by Triton's interpreter (True)."""
    require_triton(interpret)
    out = {}
    for fn in _KERNELS:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            out[fn.__name__] = InterpretedFunction(fn)
        else:
            with _env("TRITON_INTERPRET", None):
                out[fn.__name__] = triton.jit(fn)
    return out


@contextlib.contextmanager
def _env(key: str, value: str | None):
    """Set (or unset) an environment variable for the duration; Triton's knobs read it lazily."""
    old = os.environ.get(key)
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _launch(name: str, grid, interpret: bool, *args, **meta):
    fn = kernels(interpret)[name]
    if interpret:
        with _env("TRITON_INTERPRET", "1"):
            fn[grid](*args, **meta)
    else:
        fn[grid](*args, **meta)


def _blocks(Dk: int, Dv: int, interpret: bool) -> tuple[int, int]:
    BK = max(16, triton.next_power_of_2(Dk))
    BV = max(16, triton.next_power_of_2(Dv))
    if not interpret:
        BV = min(BV, 64 if BK <= 64 else 32)
    if BK > 256:
        raise SpecError(f"the Triton recurrence kernels support a key head dim up to 256, got {Dk}",
                        where="argument q", hint="use backend='cpu'")
    return BK, BV


def _meta(q: torch.Tensor, gate: int, C: int, Dk: int, Dv: int, interpret: bool) -> dict:
    BK, BV = _blocks(Dk, Dv, interpret)
    return dict(DK=Dk, DV=Dv, BK=BK, BV=BV, C=C, GATE=gate, F64=q.dtype == torch.float64)


def _interpret(t: torch.Tensor) -> bool:
    """CPU tensors run in the interpreter; so does everything when TRITON_INTERPRET=1 was set."""
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gate_arrays(g: torch.Tensor, C: int, gate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """What the kernels read for the gates: ``(GH, GL, GR, TP)``. Head gates: the ``[H]`` values (GL, GR
    unused). Scalar / vector gates: ``runtime.recurrence.ChunkGates`` of chunks of C, flattened to
    ``[B, H, TP, 1 | Dk]`` with TP the padded length: prefix sums ``hi``, ``lo`` and the last reset (int32)."""
    if gate == 0:
        return g, g, torch.zeros(1, dtype=torch.int32, device=g.device), 0
    from .recurrence import ChunkGates, _chunked

    gc = _chunked(g.unsqueeze(-1) if gate == 1 else g, C)  # [B, H, N, C, Dg]
    gates = ChunkGates(gc)
    B, H, N = gc.shape[:3]
    lo = gates.lo if gates.lo is not None else torch.zeros_like(gates.hi)
    flat = [x.reshape(B, H, N * C, -1).contiguous() for x in (gates.hi, lo, gates.reset.to(torch.int32))]
    return flat[0], flat[1], flat[2], N * C


def triton_forward(q, k, v, g, scale: float, initial_state, C: int, gate: int, store_state: bool = True):
    """``q/k [B, H, T, Dk]``, ``v [B, H, T, Dv]`` (k, v expanded, contiguous), ``g`` ``[H]`` (head gates),
    ``[B, H, T]`` (scalar) or ``[B, H, T, Dk]`` (vector) in the compute dtype. Returns (out in q's dtype,
    final state in the compute dtype)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    interp = _interpret(q)
    meta = _meta(q, gate, C, Dk, Dv, interp)
    acc = torch.float64 if meta["F64"] else torch.float32
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    final = torch.empty(B, H, Dk, Dv, dtype=acc, device=q.device)
    s0 = initial_state.contiguous() if initial_state is not None else final
    low = q.dtype in (torch.bfloat16, torch.float16)
    grid = (B * H, triton.cdiv(Dv, meta["BV"]))
    gh, gl, gr, tp = _gate_arrays(g, C, gate)
    _launch("_fwd_kernel", grid, interp, q, k, v, gh, gl, gr, s0, out, final, T, tp, float(scale), H=H,
            HAS_S0=initial_state is not None, STORE_ST=store_state, LOW=low, **meta)
    return out, final


def triton_backward(q, k, v, g, scale: float, initial_state, final_state, do, dS_T, C: int, gate: int,
                    need_gate: bool, need_s0: bool):
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    interp = _interpret(q)
    meta = _meta(q, gate, C, Dk, Dv, interp)
    acc = torch.float64 if meta["F64"] else torch.float32
    NV = triton.cdiv(Dv, meta["BV"])
    grid = (B * H, NV)
    do = do.contiguous()
    dq_part = torch.empty(NV, B, H, T, Dk, dtype=acc, device=q.device)
    dk_part = torch.empty(NV, B, H, T, Dk, dtype=acc, device=q.device)
    dv = torch.empty(B, H, T, Dv, dtype=acc, device=q.device)
    ds0 = torch.empty(B, H, Dk, Dv, dtype=acc, device=q.device)
    s0 = initial_state.contiguous() if initial_state is not None else ds0
    dst = dS_T.contiguous() if dS_T is not None else ds0
    gh, gl, gr, tp = _gate_arrays(g, C, gate)
    _launch("_bwd_dq_kernel", grid, interp, k, v, gh, gl, gr, s0, do, dq_part, T, tp, float(scale), B * H, H=H,
            HAS_S0=initial_state is not None, **meta)
    _launch("_bwd_dkdv_kernel", grid, interp, q, k, v, gh, gl, gr, do, dst, dk_part, dv, ds0, T, tp, float(scale),
            B * H, H=H, HAS_DST=dS_T is not None, STORE_DS0=need_s0, **meta)
    dq = dq_part.sum(0) if NV > 1 else dq_part[0]
    dk = dk_part.sum(0) if NV > 1 else dk_part[0]
    dg = None
    if need_gate:
        vector = gate == 2
        dg = torch.empty(B, H, T, Dk, dtype=acc, device=q.device) if vector else torch.empty(B, H, T, dtype=acc,
                                                                                            device=q.device)
        last = (dS_T * final_state).sum(-1).contiguous() if dS_T is not None else dq  # [B, H, Dk]
        _launch("_gate_grad_kernel", (B * H,), interp, q, k, dq, dk, last, dg, T, DK=Dk, BK=meta["BK"], C=C,
                VECTOR=vector, HAS_LAST=dS_T is not None)
        dg = dg.masked_fill(torch.isneginf(g), 0.0)  # a reset gate: exactly 0, the limit (see recurrence.py)
    return dq, dk, dv, dg, (ds0 if need_s0 else None)


class TritonRecurrence(torch.autograd.Function):
    """The Triton recurrence as one autograd node; saves q, k, v, g, the initial and the final state."""

    @staticmethod
    def forward(ctx, q, k, v, g, initial_state, scale: float, C: int, gate: int):
        out, final = triton_forward(q, k, v, g, scale, initial_state, C, gate)
        ctx.save_for_backward(q, k, v, g, initial_state, final)
        ctx.scale, ctx.C, ctx.gate = scale, C, gate
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, g, s0, final = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        need_g = ctx.gate != 0 and ctx.needs_input_grad[3]
        dq, dk, dv, dg, ds0 = triton_backward(q, k, v, g, ctx.scale, s0, final, do, dS_T, ctx.C, ctx.gate,
                                              need_g, ctx.needs_input_grad[4])
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype) if dg is not None else None,
                ds0, None, None, None)


def run(q, k, v, g, scale: float, initial_state, C: int, gate: str):
    """The recurrence on the Triton kernels (the interpreter for CPU tensors). ``g``: ``[H]`` for head
    gates, ``[B, H, T]`` scalar, ``[B, H, T, Dk]`` vector, in the compute dtype; k, v expanded."""
    code = GATE_CODES[gate]
    if code == 2:
        C = VECTOR_CHUNK
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    return TritonRecurrence.apply(q, k, v, g, initial_state, scale, C, code)


__all__ = ["GATE_CODES", "TritonRecurrence", "VECTOR_CHUNK", "available", "kernels", "run", "triton_backward",
           "triton_forward"]
