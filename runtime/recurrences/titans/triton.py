"""Triton kernels of Titans' neural memory in chunks, forward and backward. The math is that of
``runtime.recurrences.titans.chunk`` (its docstring); in a chunk of C tokens (rows 0..C-1, token t the row
t - 1) entered with memory ``S0`` and momentum ``M0``, with ``b`` the in-chunk cumulative log gates and ``ce``
the cumulative log momenta:

    A[t, r] = exp(b_t - b_r)  (r <= t),   E[r, s] = exp(ce_r - ce_s)  (s <= r)
    Gam = A E  (gamma(t, s)),  c = A exp(ce)  (gamma(t, 0)),  d = exp(b)  (the decay from the chunk's start)
    Gp, cp, dp: the same one row earlier (gamma(t - 1, s); row 0: 0, 0 and 1)
    L = strict_tril(Gp * (K K^T) diag(theta)),  U = (I + L)^-1 (V - diag(dp) K S0 - diag(cp) K M0),  W = diag(theta) U
    O = scale (diag(d) Q S0 + diag(c) Q M0 + tril(Gam * Q K^T) W)
    S' = d_L S0 + c_L M0 + (diag(Gam[L]) K)^T W,   M' = exp(ce_L) M0 + (diag(E[L]) K)^T W

with L the chunk's last row (C - 1, or the last token's in a last, shorter chunk: its padded rows never reach
the final state). Gam is one exact product per chunk (a [C, C] dot), not the torch form's [C+1]^3 sum. The
kernels:

- ``_fwd_kernel``, one program per (Dv block, batch x head), sequential over the chunks: stores the state
  entering each chunk (``HS``: S0 and M0, for the backward), ``O`` and the final state;
- ``_bwd_state_kernel`` (Dv block, batch x head), sequential in reverse: the gradient of the state leaving each
  chunk (``DHS``), from ``dW = scale tril(Gam * Q K^T)^T dO + diag(Gam[L]) K dS' + diag(E[L]) K dM'``,
  ``dY = (I + L)^-T diag(theta) dW`` and ``dS0 = scale Q^T diag(d) dO - K^T diag(dp) dY + d_L dS'``,
  ``dM0 = scale Q^T diag(c) dO - K^T diag(cp) dY + c_L dS' + exp(ce_L) dM'`` (its last value is the initial
  state's gradient);
- ``_bwd_kernel`` (Dv block, chunk, batch x head): every other gradient of the chunk from its S0, M0, dS', dM':
  dq, dk, dv, dtheta and the gradients of ``b`` and ``ce`` (through Gam = A E, c, d, the shifted rows and row L).
  dq, dk, dtheta, db and dce are sums over Dv, stored per Dv block and summed on the host.

The gradients of ``b`` and ``ce`` go back to the gates and momenta through torch (the cumulative sums, the
logarithm), outside the kernels. A gate of -inf (a hard reset) counts 0 in ``b``; with ``RESETS`` every decay
across it is 0, as in the delta rule's kernels (``delta.triton._decays``). The momenta are in (0, 1]
(``rule.check_rates``): their logarithms are finite and every exponent is at most 0. Dots of q, k with states
run in the input dtype on the tensor cores (fp32 accumulation); the [C, C] products and the triangular solve in
fp32 (fp64 in the interpreter's fp64 runs). GQA: k, v are read from kv head ``h // (H // Hkv)``; dk, dv are
per query head and summed over the group on the host. Offline compile check: ``attnc check-gpu stdlib:titans``.
"""

import functools

import torch
import torch.nn.functional as F

from ....compiler.recurrence_cost import titans_value_block
from ....core.errors import SpecError
from ..decay.triton import (
    _acc_zeros,
    _block,
    _in_dim,
    _mm,
    _sum,
    available,
    jit_table,
    launch,
    tl,
    triton,
)
from ..delta.triton import _acc, _decays, _interpret, _rows, _unit_lower_inverse

#: Largest key head dim: the sequential passes hold [Dk, BV] blocks of the memory and its momentum in registers.
MAX_DK = 256


# ======================================================================= helpers (undecorated)
def _mmf(a, b, F64: tl.constexpr):
    """A product of two fp32 tiles in fp32 accuracy on the tensor cores (three TF32 products), exact fp64 in the
    interpreter's fp64 runs. (In the kernels that hold state blocks, fp32 products stay on the FMA units: the
    split operands took more registers than they saved.)"""
    if F64:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


def _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr):
    """``(A, E, Gam, d, c, e0)`` of the chunk at ``c0``: the memory's in-chunk decays ``A[t, r]``, the momentum's
    ``E[r, s]``, ``Gam = A E`` (gamma(t, s)), ``d = exp(b)`` (0 after a reset), ``c = A exp(ce)`` (gamma(t, 0)) and
    ``e0 = exp(ce)``."""
    b = _acc(tl.load(GB + i_bh * TP + c0 + t_off), F64)
    ce = _acc(tl.load(CE + i_bh * TP + c0 + t_off), F64)
    if RESETS:
        rs = tl.load(R + i_bh * TP + c0 + t_off)
        d = tl.exp(tl.where(rs >= 0, float("-inf"), b))
    else:
        rs = t_off
        d = tl.exp(b)
    A = _decays(b, rs, t_off, False, RESETS)
    E = _decays(ce, t_off, t_off, False, False)
    e0 = tl.exp(ce)
    return A, E, _mm(A, E, 1), d, _sum(A * e0[None, :], 1), e0


def _shift_rows(X, t_off):
    """``X`` one row down (row t holds row t - 1; row 0 zeros), an exact product with a 0/1 matrix."""
    down = (t_off[:, None] == t_off[None, :] + 1).to(X.dtype)
    return _mm(down, X, 1)


def _shift(x, t_off, UP: tl.constexpr):
    """A vector one place down (``y_t = x_(t-1)``, ``y_0 = 0``) or, ``UP``, up (``y_t = x_(t+1)``, last 0)."""
    if UP:
        m = t_off[:, None] + 1 == t_off[None, :]
    else:
        m = t_off[:, None] == t_off[None, :] + 1
    return _sum(tl.where(m, x[None, :], 0.0), 1)


def _row(X, at):
    """Row ``at`` (``[C]`` mask) of ``X`` ``[C, N]``."""
    return _sum(tl.where(at[:, None], X, 0.0), 0)


def _at(x, at):
    """Entry ``at`` (``[C]`` mask) of ``x`` ``[C]``."""
    return _sum(tl.where(at, x, 0.0), 0)


def _solve_terms(k, th, Gam, t_off, C: tl.constexpr, DOT: tl.constexpr):
    """``(I + L)^-1`` with ``L = strict_tril(Gp * K K^T diag(theta))``, and ``(Gp, K K^T)``."""
    Gp = _shift_rows(Gam, t_off)
    kk = _mm(k, tl.trans(k), DOT).to(Gam.dtype)
    low = tl.where(t_off[:, None] > t_off[None, :], Gp * kk * th[None, :], 0.0)
    return _unit_lower_inverse(low, t_off, C), Gp, kk


def _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK: tl.constexpr, F64: tl.constexpr):
    q = _rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    k = _rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    th = _acc(tl.load(TH + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    return q, k, th


# ======================================================================= kernels (undecorated)
def _fwd_kernel(
    Q, K, V, TH, GB, CE, R, S0, HS, OUT, ST, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    RESETS: tl.constexpr, HAS_S0: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks: stores S0 and M0 entering each chunk
    (``HS[bh, n]``), the chunk's output, then moves the memory and momentum to the chunk's last row; the final
    state (S's rows, then M's) in ``ST``."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    kv_bh = (i_bh // H) * (H // GQ) + (i_bh % H) // GQ
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = _in_dim(k_off, DK, BK)
    v_ok = _in_dim(v_off, DV, BV)
    sv_off = k_off[:, None] * DV + v_off[None, :]
    sv_ok = k_ok[:, None] & v_ok[None, :]
    S = _acc_zeros([BK, BV], F64)
    M = _acc_zeros([BK, BV], F64)
    if HAS_S0:
        S += _acc(tl.load(S0 + i_bh * 2 * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)
        M += _acc(tl.load(S0 + (i_bh * 2 + 1) * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)
    for n in range(0, NT):
        c0 = n * C
        rows = c0 + t_off
        r_ok = rows < T
        tl.store(HS + (i_bh * NT + n) * 2 * DK * DV + sv_off, S.to(HS.dtype.element_ty), mask=sv_ok)
        tl.store(HS + ((i_bh * NT + n) * 2 + 1) * DK * DV + sv_off, M.to(HS.dtype.element_ty), mask=sv_ok)
        q, k, th = _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK, F64)
        v = _acc(_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV), F64)
        A, E, Gam, d, c, e0 = _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C, RESETS, F64)
        Ti, Gp, kk = _solve_terms(k, th, Gam, t_off, C, DOT)
        dp = _shift(d, t_off, False) + (t_off == 0).to(d.dtype)
        cp = _shift(c, t_off, False)
        Sd, Md = S.to(k.dtype), M.to(k.dtype)
        U = _mm(Ti, v - dp[:, None] * _mm(k, Sd, DOT) - cp[:, None] * _mm(k, Md, DOT), 1)
        W = th[:, None] * U
        P = tl.where(t_off[:, None] >= t_off[None, :], Gam * _mm(q, tl.trans(k), DOT), 0.0)
        o = scale * (d[:, None] * _mm(q, Sd, DOT) + c[:, None] * _mm(q, Md, DOT) + _mm(P, W, 1))
        tl.store(OUT + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], o.to(OUT.dtype.element_ty),
                 mask=r_ok[:, None] & v_ok[None, :])
        last = t_off == tl.minimum(T - c0, C) - 1
        Wd = W.to(k.dtype)
        S_end = (_at(d, last) * S + _at(c, last) * M
                 + _mm(tl.trans((k * _row(Gam, last)[:, None]).to(k.dtype)), Wd, DOT))
        M = _at(e0, last) * M + _mm(tl.trans((k * _row(E, last)[:, None]).to(k.dtype)), Wd, DOT)
        S = S_end
    tl.store(ST + i_bh * 2 * DK * DV + sv_off, S.to(ST.dtype.element_ty), mask=sv_ok)
    tl.store(ST + (i_bh * 2 + 1) * DK * DV + sv_off, M.to(ST.dtype.element_ty), mask=sv_ok)


def _bwd_state_kernel(
    Q, K, TH, GB, CE, R, DO, DST, DHS, DS0, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    RESETS: tl.constexpr, HAS_DST: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks in reverse: stores the gradient of the memory
    and momentum leaving each chunk (``DHS[bh, n]``); the last, the initial state's, in ``DS0``."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    kv_bh = (i_bh // H) * (H // GQ) + (i_bh % H) // GQ
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = _in_dim(k_off, DK, BK)
    v_ok = _in_dim(v_off, DV, BV)
    sv_off = k_off[:, None] * DV + v_off[None, :]
    sv_ok = k_ok[:, None] & v_ok[None, :]
    dS = _acc_zeros([BK, BV], F64)
    dM = _acc_zeros([BK, BV], F64)
    if HAS_DST:
        dS += _acc(tl.load(DST + i_bh * 2 * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)
        dM += _acc(tl.load(DST + (i_bh * 2 + 1) * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)
    for i in range(0, NT):
        n = NT - 1 - i
        c0 = n * C
        rows = c0 + t_off
        r_ok = rows < T
        tl.store(DHS + (i_bh * NT + n) * 2 * DK * DV + sv_off, dS.to(DHS.dtype.element_ty), mask=sv_ok)
        tl.store(DHS + ((i_bh * NT + n) * 2 + 1) * DK * DV + sv_off, dM.to(DHS.dtype.element_ty), mask=sv_ok)
        q, k, th = _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK, F64)
        do = _acc(_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV), F64)
        A, E, Gam, d, c, e0 = _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C, RESETS, F64)
        Ti, Gp, kk = _solve_terms(k, th, Gam, t_off, C, DOT)
        dp = _shift(d, t_off, False) + (t_off == 0).to(d.dtype)
        cp = _shift(c, t_off, False)
        P = tl.where(t_off[:, None] >= t_off[None, :], Gam * _mm(q, tl.trans(k), DOT), 0.0)
        last = t_off == tl.minimum(T - c0, C) - 1
        dW = (scale * _mm(tl.trans(P), do, 1) + _row(Gam, last)[:, None] * _mm(k, dS.to(k.dtype), DOT)
              + _row(E, last)[:, None] * _mm(k, dM.to(k.dtype), DOT))
        dY = _mm(tl.trans(Ti), th[:, None] * dW, 1)
        dS_in = (_mm(tl.trans(q), (scale * d[:, None] * do).to(q.dtype), DOT)
                 - _mm(tl.trans(k), (dp[:, None] * dY).to(k.dtype), DOT) + _at(d, last) * dS)
        dM = (_mm(tl.trans(q), (scale * c[:, None] * do).to(q.dtype), DOT)
              - _mm(tl.trans(k), (cp[:, None] * dY).to(k.dtype), DOT) + _at(c, last) * dS + _at(e0, last) * dM)
        dS = dS_in
    tl.store(DS0 + i_bh * 2 * DK * DV + sv_off, dS.to(DS0.dtype.element_ty), mask=sv_ok)
    tl.store(DS0 + (i_bh * 2 + 1) * DK * DV + sv_off, dM.to(DS0.dtype.element_ty), mask=sv_ok)


def _bwd_kernel(
    Q, K, V, TH, GB, CE, R, DO, HS, DHS, DQ, DK_, DV_, DTH, DGAM, DD, DC, DEL, DE0, T, TP, NT, scale, H: tl.constexpr,
    GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): the chunk's gradients from the state entering it (``HS``)
    and the gradient of the state leaving it (``DHS``). dv is whole; dq, dk, dtheta and the gate terms are this
    Dv block's part (``[NV, ...]``; the host sums dq, dk and dtheta, ``_bwd_gates_kernel`` the gate terms)."""
    i_v, n = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    kv_bh = (i_bh // H) * (H // GQ) + (i_bh % H) // GQ
    t_off = tl.arange(0, C)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = _in_dim(k_off, DK, BK)
    v_ok = _in_dim(v_off, DV, BV)
    sv_off = k_off[:, None] * DV + v_off[None, :]
    sv_ok = k_ok[:, None] & v_ok[None, :]
    c0 = n * C
    rows = c0 + t_off
    r_ok = rows < T
    at = (i_bh * NT + n) * 2 * DK * DV + sv_off
    S0 = _acc(tl.load(HS + at, mask=sv_ok, other=0.0), F64)
    M0 = _acc(tl.load(HS + at + DK * DV, mask=sv_ok, other=0.0), F64)
    dS = _acc(tl.load(DHS + at, mask=sv_ok, other=0.0), F64)
    dM = _acc(tl.load(DHS + at + DK * DV, mask=sv_ok, other=0.0), F64)
    q, k, th = _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK, F64)
    v = _acc(_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV), F64)
    do = _acc(_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV), F64)
    A, E, Gam, d, c, e0 = _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C, RESETS, F64)
    Ti, Gp, kk = _solve_terms(k, th, Gam, t_off, C, DOT)
    dp = _shift(d, t_off, False) + (t_off == 0).to(d.dtype)
    cp = _shift(c, t_off, False)
    # the forward, again: U, W and the products with the entering state
    kS, kM = _mm(k, S0.to(k.dtype), DOT), _mm(k, M0.to(k.dtype), DOT)
    U = _mm(Ti, v - dp[:, None] * kS - cp[:, None] * kM, 1)
    W = th[:, None] * U
    lower = t_off[:, None] >= t_off[None, :]
    qk = _mm(q, tl.trans(k), DOT).to(Gam.dtype)
    P = tl.where(lower, Gam * qk, 0.0)
    last = t_off == tl.minimum(T - c0, C) - 1
    gL, eL = _row(Gam, last), _row(E, last)
    kdS, kdM = _mm(k, dS.to(k.dtype), DOT), _mm(k, dM.to(k.dtype), DOT)
    # through O = scale (...) + scale P W, S' and M' to W, then through the solve
    dW = scale * _mm(tl.trans(P), do, 1) + gL[:, None] * kdS + eL[:, None] * kdM
    dY = _mm(tl.trans(Ti), th[:, None] * dW, 1)
    tl.store(DV_ + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], dY.to(DV_.dtype.element_ty),
             mask=r_ok[:, None] & v_ok[None, :])
    dL = tl.where(t_off[:, None] > t_off[None, :], -_mm(dY, tl.trans(U), 1), 0.0)
    dth = _sum(U * dW, 1) + _sum(dL * Gp * kk, 0)
    dkk = dL * Gp * th[None, :]
    dP = _mm(do, tl.trans(W), 1)
    dqk = tl.where(lower, scale * dP * Gam, 0.0)
    # products with the entering state, each made once: dO S0^T, dO M0^T, dY S0^T, dY M0^T ([C, Dk])
    Sd, Md = S0.to(k.dtype), M0.to(k.dtype)
    doS, doM = _mm(do.to(k.dtype), tl.trans(Sd), DOT), _mm(do.to(k.dtype), tl.trans(Md), DOT)
    dyS, dyM = _mm(dY.to(k.dtype), tl.trans(Sd), DOT), _mm(dY.to(k.dtype), tl.trans(Md), DOT)
    dq = _mm(dqk.to(k.dtype), k, DOT) + scale * (d[:, None] * doS + c[:, None] * doM)
    Wd = W.to(k.dtype)
    dk = (_mm(tl.trans(dqk).to(q.dtype), q, DOT) + _mm((dkk + tl.trans(dkk)).to(k.dtype), k, DOT)
          - dp[:, None] * dyS - cp[:, None] * dyM
          + gL[:, None] * _mm(Wd, tl.trans(dS.to(k.dtype)), DOT) + eL[:, None] * _mm(Wd, tl.trans(dM.to(k.dtype)), DOT))
    qk_off = rows[:, None] * DK + k_off[None, :]
    qk_ok = r_ok[:, None] & k_ok[None, :]
    part = (i_v * tl.num_programs(2) + i_bh) * T
    tl.store(DQ + part * DK + qk_off, dq.to(DQ.dtype.element_ty), mask=qk_ok)
    tl.store(DK_ + part * DK + qk_off, dk.to(DK_.dtype.element_ty), mask=qk_ok)
    tl.store(DTH + part + rows, dth.to(DTH.dtype.element_ty), mask=r_ok)
    # the gate terms, this Dv block's part: the gradients of Gam (its shifted rows and row L included), d and c
    # (theirs too), row L of E and exp(ce_L); ``_bwd_gates_kernel`` takes them to b and ce
    up = (t_off[:, None] + 1 == t_off[None, :]).to(dL.dtype)
    dGam = (tl.where(lower, scale * dP * qk, 0.0) + _mm(up, dL * th[None, :] * kk, 1)
            + tl.where(last[:, None], _sum(W * kdS, 1)[None, :], 0.0))
    tl.store(DGAM + ((i_v * tl.num_programs(2) + i_bh) * NT + n) * C * C + t_off[:, None] * C + t_off[None, :],
             dGam.to(DGAM.dtype.element_ty))
    dd = (scale * _sum(q * doS, 1) + _shift(-_sum(k * dyS, 1), t_off, True)
          + tl.where(last, _sum(_sum(dS * S0, 1), 0), 0.0))
    dc = (scale * _sum(q * doM, 1) + _shift(-_sum(k * dyM, 1), t_off, True)
          + tl.where(last, _sum(_sum(dS * M0, 1), 0), 0.0))
    pad = (i_v * tl.num_programs(2) + i_bh) * TP + c0 + t_off
    tl.store(DD + pad, dd.to(DD.dtype.element_ty))
    tl.store(DC + pad, dc.to(DC.dtype.element_ty))
    tl.store(DEL + pad, _sum(W * kdM, 1).to(DEL.dtype.element_ty))
    tl.store(DE0 + pad, tl.where(last, _sum(_sum(dM * M0, 1), 0), 0.0).to(DE0.dtype.element_ty))


def _bwd_gates_kernel(
    GB, CE, R, DGAM, DD, DC, DEL, DE0, DB, DCE, T, TP, NT, NV, C: tl.constexpr, RESETS: tl.constexpr,
    F64: tl.constexpr,
):
    """One program per (chunk, batch x head): the gradients of ``b`` and ``ce`` in the chunk, from the gate
    terms of ``_bwd_kernel`` summed over its Dv blocks, through ``Gam = A E``, ``c = A exp(ce)``, ``d = exp(b)``,
    row L of ``E`` and ``exp(ce_L)``."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1)
    t_off = tl.arange(0, C)
    c0 = n * C
    dGam = _acc_zeros([C, C], F64)
    dd = _acc_zeros([C], F64)
    dc = _acc_zeros([C], F64)
    dEL = _acc_zeros([C], F64)
    de0 = _acc_zeros([C], F64)
    for i_v in range(0, NV):
        dGam += tl.load(DGAM + ((i_v * BH + i_bh) * NT + n) * C * C + t_off[:, None] * C + t_off[None, :])
        pad = (i_v * BH + i_bh) * TP + c0 + t_off
        dd += tl.load(DD + pad)
        dc += tl.load(DC + pad)
        dEL += tl.load(DEL + pad)
        de0 += tl.load(DE0 + pad)
    A, E, Gam, d, c, e0 = _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C, RESETS, F64)
    last = t_off == tl.minimum(T - c0, C) - 1
    dE = tl.where(last[:, None], dEL[None, :], 0.0) + _mmf(tl.trans(A), dGam, F64)
    de0 += _sum(A * dc[:, None], 0)
    X = (_mmf(dGam, tl.trans(E), F64) + dc[:, None] * e0[None, :]) * A
    Z = dE * E
    tl.store(DB + i_bh * TP + c0 + t_off, (_sum(X, 1) - _sum(X, 0) + dd * d).to(DB.dtype.element_ty))
    tl.store(DCE + i_bh * TP + c0 + t_off, (_sum(Z, 1) - _sum(Z, 0) + de0 * e0).to(DCE.dtype.element_ty))


# ======================================================================= wrapping
_HELPERS = (_acc_zeros, _sum, _in_dim, _mm, _mmf, _acc, _decays, _unit_lower_inverse, _rows, _chunk_decays, _shift_rows,
            _shift, _row, _at, _solve_terms, _load_chunk)
_KERNELS = (_fwd_kernel, _bwd_state_kernel, _bwd_kernel, _bwd_gates_kernel)


@functools.cache
def kernels(interpret: bool) -> dict:
    """The kernels jitted for the GPU (``interpret=False``) or wrapped by Triton's interpreter (True)."""
    return jit_table(_HELPERS, _KERNELS, globals(), interpret)


def _launch(name: str, grid, interpret: bool, *args, **meta):
    launch(kernels(interpret)[name], grid, interpret, *args, **meta)


def configs(Dk: int, Dv: int, C: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Per-kernel compile-time constants and launch options: what the launches use (``runtime.gpu_check``
    compiles those launches offline). Each program holds two [Dk, BV] state blocks (four in ``_bwd_kernel``)."""
    if Dk > MAX_DK:
        raise SpecError(f"Titans' Triton kernels support a key head dim up to {MAX_DK}, got {Dk}",
                        where="argument q", hint="use backend='cpu'")
    dot = 1 if dtype not in (torch.bfloat16, torch.float16) else (2 if interpret and dtype == torch.bfloat16 else 0)
    BK = _block(Dk, MAX_DK)
    BV = titans_value_block(Dk, Dv)
    common = dict(DK=Dk, DV=Dv, BK=BK, BV=BV, C=C, F64=dtype == torch.float64, DOT=dot)
    warps = 8 if BK > 64 or C >= 64 else 4
    cfg = {name: dict(common, num_warps=warps, num_stages=1) for name in ("_fwd_kernel", "_bwd_state_kernel",
                                                                          "_bwd_kernel")}
    cfg["_bwd_gates_kernel"] = dict(C=C, F64=common["F64"], num_warps=4, num_stages=1)
    return cfg


def _chunk_sums(x: torch.Tensor, C: int, TP: int) -> torch.Tensor:
    """In-chunk cumulative sums of ``x`` ``[B, H, T]`` padded with zeros to TP: ``[B*H, TP]`` (differentiable)."""
    B, H, T = x.shape
    return F.pad(x, (0, TP - T)).reshape(B * H, TP // C, C).cumsum(-1).reshape(B * H, TP)


def titans_forward(q, k, v, theta, b, ce, R, initial_state, scale: float, C: int, interpret: bool):
    """``(out, final state, HS)``: HS the states entering every chunk (the backward reads them)."""
    B, H, T, Dk = q.shape
    Dv, TP = v.shape[-1], b.shape[-1]
    cfg = configs(Dk, Dv, C, q.dtype, interpret)["_fwd_kernel"]
    acc = torch.float64 if cfg["F64"] else torch.float32
    NT = TP // C
    HS = torch.empty(B * H, NT, 2, Dk, Dv, dtype=acc, device=q.device)
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    final = torch.empty(B, H, 2 * Dk, Dv, dtype=acc, device=q.device)
    s0 = initial_state.contiguous() if initial_state is not None else final
    _launch("_fwd_kernel", (triton.cdiv(Dv, cfg["BV"]), B * H), interpret, q, k, v, theta, b, ce,
            b if R is None else R, s0, HS, out, final, T, TP, NT, float(scale), H=H, GQ=H // k.shape[1],
            RESETS=R is not None, HAS_S0=initial_state is not None, **cfg)
    return out, final, HS


def titans_backward(q, k, v, theta, b, ce, R, HS, do, dS_T, scale: float, C: int, interpret: bool):
    """``(dq, dk, dv, dtheta, db, dce, dS0)`` in the compute dtype; dk, dv per kv head."""
    B, H, T, Dk = q.shape
    Hkv, Dv, TP = k.shape[1], v.shape[-1], b.shape[-1]
    GQ, NT = H // Hkv, TP // C
    cfg = configs(Dk, Dv, C, q.dtype, interpret)
    acc = HS.dtype
    NV = triton.cdiv(Dv, cfg["_bwd_kernel"]["BV"])
    do = do.to(q.dtype).contiguous()  # the tensor-core dots take dO in the input dtype
    dst = dS_T.to(acc).contiguous() if dS_T is not None else None
    DHS = torch.empty_like(HS)
    DS0 = torch.empty(B, H, 2 * Dk, Dv, dtype=acc, device=q.device)
    rs = b if R is None else R
    _launch("_bwd_state_kernel", (NV, B * H), interpret, q, k, theta, b, ce, rs, do, DS0 if dst is None else dst,
            DHS, DS0, T, TP, NT, float(scale), H=H, GQ=GQ, RESETS=R is not None, HAS_DST=dst is not None,
            **cfg["_bwd_state_kernel"])
    dq, dk = (torch.empty(NV, B * H, T, Dk, dtype=acc, device=q.device) for _ in range(2))
    dv = torch.empty(B, H, T, Dv, dtype=acc, device=q.device)
    dth = torch.empty(NV, B * H, T, dtype=acc, device=q.device)
    dgam = torch.empty(NV, B * H, NT, C, C, dtype=acc, device=q.device)
    terms = torch.empty(4, NV, B * H, TP, dtype=acc, device=q.device)  # d, c, row L of E, exp(ce_L)
    _launch("_bwd_kernel", (NV, NT, B * H), interpret, q, k, v, theta, b, ce, rs, do, HS, DHS, dq, dk, dv, dth, dgam,
            *terms, T, TP, NT, float(scale), H=H, GQ=GQ, RESETS=R is not None, **cfg["_bwd_kernel"])
    db, dce = (torch.empty(B * H, TP, dtype=acc, device=q.device) for _ in range(2))
    _launch("_bwd_gates_kernel", (NT, B * H), interpret, b, ce, rs, dgam, *terms, db, dce, T, TP, NT, NV,
            RESETS=R is not None, **cfg["_bwd_gates_kernel"])
    dq, dk = (x.sum(0).view(B, H, T, Dk) for x in (dq, dk))
    if GQ > 1:  # a kv head's gradient is the sum over the query heads reading it
        dk = dk.view(B, Hkv, GQ, T, Dk).sum(2)
        dv = dv.view(B, Hkv, GQ, T, Dv).sum(2)
    return dq, dk, dv, dth.sum(0).view(B, H, T), db, dce, DS0


class TritonTitans(torch.autograd.Function):
    """Titans' kernels as one autograd node over the in-chunk cumulative log gates ``b`` and log momenta ``ce``
    (torch takes their gradients back to the gates and momenta); saves the states entering the chunks."""

    @staticmethod
    def forward(ctx, q, k, v, theta, b, ce, initial_state, R, scale: float, C: int, interpret: bool):
        out, final, HS = titans_forward(q, k, v, theta, b, ce, R, initial_state, scale, C, interpret)
        ctx.save_for_backward(q, k, v, theta, b, ce, R, HS)
        ctx.scale, ctx.C, ctx.interpret = scale, C, interpret
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, theta, b, ce, R, HS = ctx.saved_tensors
        if do is None:
            do = torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        dq, dk, dv, dth, db, dce, ds0 = titans_backward(q, k, v, theta, b, ce, R, HS, do, dS_T, ctx.scale, ctx.C,
                                                        ctx.interpret)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dth.to(theta.dtype), db.to(b.dtype),
                dce.to(ce.dtype), ds0 if ctx.needs_input_grad[6] else None, None, None, None, None)


def run(q, k, v, g, theta, eta, scale: float, initial_state, C: int, interpret: bool | None = None):
    """Titans' memory on the Triton kernels (the interpreter for CPU tensors, unless ``interpret`` says otherwise:
    the offline GPU check compiles them natively). ``q`` ``[B, H, T, Dk]``, ``k``, ``v`` with Hkv heads (H a
    multiple of Hkv), one dtype; ``g`` ``[B, H, T]`` log gates (<= 0 or -inf), ``theta``, ``eta`` ``[B, H, T]``
    (eta in (0, 1]), the initial state ``[B, H, 2 Dk, Dv]`` or None, all in the compute dtype. Returns (out,
    final state)."""
    configs(q.shape[-1], v.shape[-1], C, q.dtype)  # a key head dim over the limit: the SpecError naming it
    interp = _interpret(q) if interpret is None else interpret
    B, H, T, _ = q.shape
    TP = triton.cdiv(T, C) * C
    reset = torch.isneginf(g)
    R = None
    if bool(reset.any()):  # the last reset at or before each token, in its chunk (-1: none)
        pos = torch.arange(C, device=g.device, dtype=torch.int32)
        R = torch.where(F.pad(reset, (0, TP - T)).reshape(B * H, TP // C, C), pos, -1).cummax(-1).values
        R = R.to(torch.int32).reshape(B * H, TP).contiguous()
    b = _chunk_sums(g.masked_fill(reset, 0.0), C, TP).contiguous()
    ce = _chunk_sums(torch.log(eta), C, TP).contiguous()
    q, k, v, theta = (x.contiguous() for x in (q, k, v, theta))
    s0 = initial_state.contiguous() if initial_state is not None else None
    return TritonTitans.apply(q, k, v, theta, b, ce, s0, R, scale, C, interp)


__all__ = ["MAX_DK", "TritonTitans", "available", "configs", "kernels", "run"]
