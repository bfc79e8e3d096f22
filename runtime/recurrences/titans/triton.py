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
kernels (seven, so that none spills a register at Dk <= 128 on sm_80 and sm_90, Triton 3.6 and 3.9, with bf16
or fp16 inputs; fp32 inputs take exact products on the FMA units, whose operands spill up to 2 KiB at Dk = 128):

- ``_chunk_kernel``, one program per (chunk, batch x head): what does not depend on the state: ``(I + L)^-1``,
  Gam, Gp and the vectors ``d, c, dp, cp, exp(ce), Gam[L], E[L]``;
- ``_state_fwd_kernel`` (Dv block, batch x head), the only sequential part of the forward: stores the state
  entering each chunk (``HS``: S0 and M0) and ``U``, the final state;
- ``_out_kernel`` (Dv block, chunk, batch x head): ``O``;
- ``_bwd_local_kernel`` (Dv block, chunk, batch x head): ``scale tril(Gam * Q K^T)^T dO``, dW's part that does
  not depend on the state;
- ``_state_bwd_kernel`` (Dv block, batch x head), sequential in reverse: the gradient of the state leaving each
  chunk (``DHS``), from ``dW = scale tril(Gam * Q K^T)^T dO + diag(Gam[L]) K dS' + diag(E[L]) K dM'``,
  ``dY = (I + L)^-T diag(theta) dW`` (dv) and ``dS0 = scale Q^T diag(d) dO - K^T diag(dp) dY + d_L dS'``,
  ``dM0 = scale Q^T diag(c) dO - K^T diag(cp) dY + c_L dS' + exp(ce_L) dM'`` (its last value is the initial
  state's gradient); dtheta through W and the row-L gate terms;
- ``_bwd_dqk_kernel`` (Dv block, chunk, batch x head): dq, dk, dtheta through the solve, the gate terms of Gam
  (its shifted rows included), d and c;
- ``_bwd_gates_kernel`` (chunk, batch x head): the gate terms summed over the Dv blocks, taken to ``b`` and
  ``ce`` through ``Gam = A E``, ``c = A exp(ce)``, ``d = exp(b)`` and row L.

dq, dk, dtheta and the gate terms are sums over Dv, stored per Dv block (16 columns:
``compiler.cost.recurrence_cost.TITANS_VALUE_BLOCK``) and summed on the host or by the gates kernel. The gradients
of ``b`` and ``ce`` go back to the gates and momenta through torch (the cumulative sums, the logarithm), outside
the kernels. A gate of -inf (a hard reset) counts 0 in ``b``; with ``RESETS`` every decay across it is 0, as in
the delta rule's kernels (``library.device.decay_matrix``). The momenta are in (0, 1] (``rule.check_rates``): their
logarithms are finite and every exponent is at most 0. Dots of q, k with states run in the input dtype on the
tensor cores (fp32 accumulation); the [C, C] products and the triangular solve in fp32 (fp64 in the
interpreter's fp64 runs). GQA: k, v are read from kv head ``h // (H // Hkv)``; dk, dv are per query head and
summed over the group on the host. Offline compile check: ``attnc check-gpu stdlib:titans``.
"""


import torch
import torch.nn.functional as F

from ....compiler.cost.recurrence_cost import TITANS_VALUE_BLOCK
from ....core.errors import SpecError
from ..library.device import (
    acc_zeros,
    chunk_rows,
    decay_matrix,
    in_dim,
    kv_head,
    load_rows,
    mm,
    tile_sum,
    tl,
    to_acc,
    triton,
    unit_lower_inverse,
    value_block,
)
from ..library.host import KernelTable, available, block_size, interprets

#: Largest key head dim: the programs hold [C, Dk] tiles of q and k and [Dk, BV] blocks of the memory and its
#: momentum in registers (at 256 every kernel spilled 0.3-4 KiB on sm_80 and sm_90 in bf16, at 8 warps or 16).
MAX_DK = 128


# ======================================================================= helpers (undecorated)
def _mm_tf32x3(a, b, F64: tl.constexpr):
    """A product of two fp32 tiles in fp32 accuracy on the tensor cores (three TF32 products), exact fp64 in the
    interpreter's fp64 runs. (In the kernels that hold state blocks, fp32 products stay on the FMA units: the
    split operands took more registers than they saved.)"""
    if F64:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision="tf32x3")


def _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr):
    """``(A, E, d, e0)`` of the chunk at ``c0``: the memory's in-chunk decays ``A[t, r]``, the momentum's ``E[r, s]``,
    ``d = exp(b)`` (0 after a reset) and ``e0 = exp(ce)``; ``_chunk_kernel`` forms ``Gam = A E`` (gamma(t, s)) and
    ``c = A e0`` (gamma(t, 0)) from them, once per chunk."""
    b = to_acc(tl.load(GB + i_bh * TP + c0 + t_off), F64)
    ce = to_acc(tl.load(CE + i_bh * TP + c0 + t_off), F64)
    if RESETS:
        rs = tl.load(R + i_bh * TP + c0 + t_off)
        d = tl.exp(tl.where(rs >= 0, float("-inf"), b))
    else:
        rs = t_off
        d = tl.exp(b)
    A = decay_matrix(b, rs, t_off, False, RESETS)
    E = decay_matrix(ce, t_off, t_off, False, False)
    e0 = tl.exp(ce)
    return A, E, d, e0


def _shift_rows(X, t_off):
    """``X`` one row down (row t holds row t - 1; row 0 zeros), an exact product with a 0/1 matrix."""
    down = (t_off[:, None] == t_off[None, :] + 1).to(X.dtype)
    return mm(down, X, 1)


def _shift(x, t_off, UP: tl.constexpr):
    """A vector one place down (``y_t = x_(t-1)``, ``y_0 = 0``) or, ``UP``, up (``y_t = x_(t+1)``, last 0)."""
    if UP:
        m = t_off[:, None] + 1 == t_off[None, :]
    else:
        m = t_off[:, None] == t_off[None, :] + 1
    return tile_sum(tl.where(m, x[None, :], 0.0), 1)


def _row_at(X, at):
    """Row ``at`` (``[C]`` mask) of ``X`` ``[C, N]``."""
    return tile_sum(tl.where(at[:, None], X, 0.0), 0)


def _entry_at(x, at):
    """Entry ``at`` (``[C]`` mask) of ``x`` ``[C]``."""
    return tile_sum(tl.where(at, x, 0.0), 0)


def _solve_terms(k, th, Gam, t_off, C: tl.constexpr, DOT: tl.constexpr):
    """``(I + L)^-1`` with ``L = strict_tril(Gp * K K^T diag(theta))``, and ``(Gp, K K^T)``."""
    Gp = _shift_rows(Gam, t_off)
    kk = mm(k, tl.trans(k), DOT).to(Gam.dtype)
    low = tl.where(t_off[:, None] > t_off[None, :], Gp * kk * th[None, :], 0.0)
    return unit_lower_inverse(low, t_off, C), Gp, kk


def _vectors(VEC, i_bh, BH, TP, rows):
    """``(d, c, dp, cp, exp(ce), Gam[L], E[L])`` of the chunk's rows, as ``_chunk_kernel`` stored them."""
    at = VEC + i_bh * TP + rows
    return (tl.load(at), tl.load(at + BH * TP), tl.load(at + 2 * BH * TP), tl.load(at + 3 * BH * TP),
            tl.load(at + 4 * BH * TP), tl.load(at + 5 * BH * TP), tl.load(at + 6 * BH * TP))


def _load_pair(X, at, sv_off, sv_ok, DK: tl.constexpr, DV: tl.constexpr, F64: tl.constexpr):
    """The memory's and the momentum's blocks (or their gradients) of state ``at`` of ``X`` ``[..., 2, Dk, Dv]``."""
    first = to_acc(tl.load(X + at * 2 * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)
    return first, to_acc(tl.load(X + (at * 2 + 1) * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)


def _start_pair(X, at, sv_off, sv_ok, GIVEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, F64: tl.constexpr):
    """A sequential pass's first state pair: ``_load_pair`` of ``X`` where ``GIVEN``, zeros otherwise."""
    S = acc_zeros([BK, BV], F64)
    M = acc_zeros([BK, BV], F64)
    if GIVEN:
        S_given, M_given = _load_pair(X, at, sv_off, sv_ok, DK, DV, F64)
        S += S_given
        M += M_given
    return S, M


def _store_pair(X, at, S, M, sv_off, sv_ok, DK: tl.constexpr, DV: tl.constexpr):
    """``_load_pair``'s store."""
    tl.store(X + at * 2 * DK * DV + sv_off, S.to(X.dtype.element_ty), mask=sv_ok)
    tl.store(X + (at * 2 + 1) * DK * DV + sv_off, M.to(X.dtype.element_ty), mask=sv_ok)


def _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK: tl.constexpr, F64: tl.constexpr):
    q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    th = to_acc(tl.load(TH + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    return q, k, th


# ======================================================================= kernels (undecorated)
def _chunk_kernel(
    K, TH, GB, CE, R, TI, GAM, GP, VEC, T, TP, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    BK: tl.constexpr, C: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head): the chunk's terms that do not depend on the state. Stores ``(I +
    L)^-1`` (``TI``), ``Gam`` and ``Gp`` (``[BH, TP, C]`` each) and the vectors ``d, c, dp, cp, exp(ce), Gam[L],
    E[L]`` (``VEC [7, BH, TP]``)."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    t_off = tl.arange(0, C)  # BH in int64: offsets of BH x TP rows pass 2^31 at small head dims
    k_off = tl.arange(0, BK)
    k_ok = in_dim(k_off, DK, BK)
    c0, _, rows, r_ok = chunk_rows(n, C, T)
    k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    th = to_acc(tl.load(TH + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    A, E, d, e0 = _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C, RESETS, F64)
    Gam, c = mm(A, E, 1), tile_sum(A * e0[None, :], 1)
    Ti, Gp, kk = _solve_terms(k, th, Gam, t_off, C, DOT)
    last = t_off == tl.minimum(T - c0, C) - 1
    tile_off = (i_bh * TP + rows)[:, None] * C + t_off[None, :]
    tl.store(TI + tile_off, Ti.to(TI.dtype.element_ty))
    tl.store(GAM + tile_off, Gam.to(GAM.dtype.element_ty))
    tl.store(GP + tile_off, Gp.to(GP.dtype.element_ty))
    at = VEC + i_bh * TP + rows
    tl.store(at, d)
    tl.store(at + BH * TP, c)
    tl.store(at + 2 * BH * TP, _shift(d, t_off, False) + (t_off == 0).to(d.dtype))
    tl.store(at + 3 * BH * TP, _shift(c, t_off, False))
    tl.store(at + 4 * BH * TP, e0)
    tl.store(at + 5 * BH * TP, _row_at(Gam, last))
    tl.store(at + 6 * BH * TP, _row_at(E, last))


def _state_fwd_kernel(
    K, V, TH, TI, VEC, S0, HS, UN, ST, T, TP, NT, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_S0: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks: stores S0 and M0 entering each chunk
    (``HS[bh, n]``), ``U = (I + L)^-1 (V - diag(dp) K S0 - diag(cp) K M0)`` (``UN``), then moves the memory and
    momentum to the chunk's last row; the final state (S's rows, then M's) in ``ST``."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(i_v, i_bh, H, GQ, DK, DV, BK, BV)
    t_off = tl.arange(0, C)
    S, M = _start_pair(S0, i_bh, sv_off, sv_ok, HAS_S0, DK, DV, BK, BV, F64)
    for n in range(0, NT):
        c0, _, rows, r_ok = chunk_rows(n, C, T)
        _store_pair(HS, i_bh * NT + n, S, M, sv_off, sv_ok, DK, DV)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        v = to_acc(load_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV), F64)
        th = to_acc(tl.load(TH + i_bh * T + rows, mask=r_ok, other=0.0), F64)
        d, c, dp, cp, e0, gL, eL = _vectors(VEC, i_bh, BH, TP, rows)
        Ti = tl.load(TI + (i_bh * TP + rows)[:, None] * C + t_off[None, :])
        U = mm(Ti, v - dp[:, None] * mm(k, S.to(k.dtype), DOT) - cp[:, None] * mm(k, M.to(k.dtype), DOT), 1)
        uv_off = i_bh * T * DV + rows[:, None] * DV + v_off[None, :]
        tl.store(UN + uv_off, U.to(UN.dtype.element_ty), mask=r_ok[:, None] & v_ok[None, :])
        W = th[:, None] * U
        last = t_off == tl.minimum(T - c0, C) - 1
        kt = tl.trans(k)
        S_end = _entry_at(d, last) * S + _entry_at(c, last) * M + mm(kt, (gL[:, None] * W).to(k.dtype), DOT)
        M = _entry_at(e0, last) * M + mm(kt, (eL[:, None] * W).to(k.dtype), DOT)
        S = S_end
    _store_pair(ST, i_bh, S, M, sv_off, sv_ok, DK, DV)


def _out_kernel(
    Q, K, TH, GAM, VEC, HS, UN, OUT, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): ``O = scale (diag(d) Q S0 + diag(c) Q M0 + tril(Gam * Q
    K^T) diag(theta) U)``."""
    i_v, n = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    BH = tl.num_programs(2).to(tl.int64)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(i_v, i_bh, H, GQ, DK, DV, BK, BV)
    t_off = tl.arange(0, C)
    rows = n * C + t_off
    r_ok = rows < T
    q, k, th = _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK, F64)
    d, c, dp, cp, e0, gL, eL = _vectors(VEC, i_bh, BH, TP, rows)
    Gam = tl.load(GAM + (i_bh * TP + rows)[:, None] * C + t_off[None, :])
    S0, M0 = _load_pair(HS, i_bh * NT + n, sv_off, sv_ok, DK, DV, F64)
    S0, M0 = S0.to(q.dtype), M0.to(q.dtype)
    uv_off = i_bh * T * DV + rows[:, None] * DV + v_off[None, :]
    uv_ok = r_ok[:, None] & v_ok[None, :]
    W = th[:, None] * tl.load(UN + uv_off, mask=uv_ok, other=0.0)
    P = tl.where(t_off[:, None] >= t_off[None, :], Gam * mm(q, tl.trans(k), DOT).to(Gam.dtype), 0.0)
    o = scale * (d[:, None] * mm(q, S0, DOT) + c[:, None] * mm(q, M0, DOT) + mm(P, W, 1))
    tl.store(OUT + uv_off, o.to(OUT.dtype.element_ty), mask=uv_ok)


def _bwd_local_kernel(
    Q, K, GAM, DO, DWL, T, TP, scale, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): the part of ``dW`` that does not depend on the state,
    ``scale tril(Gam * Q K^T)^T dO`` (``DWL``), so that the reverse state pass holds no [C, C] product of q and k."""
    i_v, n = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    kv_bh, k_off, k_ok, v_off, v_ok, _, _ = value_block(i_v, i_bh, H, GQ, DK, DV, BK, BV)
    t_off = tl.arange(0, C)
    rows = n * C + t_off
    r_ok = rows < T
    q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    Gam = tl.load(GAM + (i_bh * TP + rows)[:, None] * C + t_off[None, :])
    P = tl.where(t_off[:, None] >= t_off[None, :], Gam * mm(q, tl.trans(k), DOT).to(Gam.dtype), 0.0)
    uv_off = i_bh * T * DV + rows[:, None] * DV + v_off[None, :]
    uv_ok = r_ok[:, None] & v_ok[None, :]
    do = to_acc(tl.load(DO + uv_off, mask=uv_ok, other=0.0), F64)
    tl.store(DWL + uv_off, (scale * mm(tl.trans(P), do, 1)).to(DWL.dtype.element_ty), mask=uv_ok)


def _state_bwd_kernel(
    Q, K, TH, TI, DWL, VEC, DO, UN, DST, DHS, DY, DTH, DGL, DS0, T, TP, NT, scale, H: tl.constexpr,
    GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks in reverse: stores the gradient of the memory
    and momentum leaving each chunk (``DHS[bh, n]``), ``dY`` (``DY``: dv), this Dv block's part of ``dtheta``
    through ``W = diag(theta) U`` and of the gate terms of row L (``DGL``); the initial state's gradient in
    ``DS0``."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(i_v, i_bh, H, GQ, DK, DV, BK, BV)
    t_off = tl.arange(0, C)
    dS, dM = _load_pair(DST, i_bh, sv_off, sv_ok, DK, DV, F64)
    for i in range(0, NT):
        n = NT - 1 - i
        c0, _, rows, r_ok = chunk_rows(n, C, T)
        _store_pair(DHS, i_bh * NT + n, dS, dM, sv_off, sv_ok, DK, DV)
        q, k, th = _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK, F64)
        uv_off = i_bh * T * DV + rows[:, None] * DV + v_off[None, :]
        uv_ok = r_ok[:, None] & v_ok[None, :]
        do = to_acc(tl.load(DO + uv_off, mask=uv_ok, other=0.0), F64)
        U = tl.load(UN + uv_off, mask=uv_ok, other=0.0)
        d, c, dp, cp, e0, gL, eL = _vectors(VEC, i_bh, BH, TP, rows)
        kdS = mm(k, dS.to(k.dtype), DOT)
        kdM = mm(k, dM.to(k.dtype), DOT)
        dW = tl.load(DWL + uv_off, mask=uv_ok, other=0.0) + gL[:, None] * kdS + eL[:, None] * kdM
        dY = mm(tl.trans(tl.load(TI + (i_bh * TP + rows)[:, None] * C + t_off[None, :])), th[:, None] * dW, 1)
        tl.store(DY + uv_off, dY.to(DY.dtype.element_ty), mask=uv_ok)
        W = th[:, None] * U
        row_off = (i_v * BH + i_bh) * T + rows
        tl.store(DTH + row_off, tile_sum(U * dW, 1).to(DTH.dtype.element_ty), mask=r_ok)
        gl_off = (i_v * BH + i_bh) * TP + rows
        tl.store(DGL + gl_off, tile_sum(W * kdS, 1).to(DGL.dtype.element_ty))
        tl.store(DGL + tl.num_programs(0) * BH * TP + gl_off, tile_sum(W * kdM, 1).to(DGL.dtype.element_ty))
        last = t_off == tl.minimum(T - c0, C) - 1
        qt, kt = tl.trans(q), tl.trans(k)
        dS_in = (mm(qt, (scale * d[:, None] * do).to(q.dtype), DOT) - mm(kt, (dp[:, None] * dY).to(k.dtype), DOT)
                 + _entry_at(d, last) * dS)
        dM = (mm(qt, (scale * c[:, None] * do).to(q.dtype), DOT) - mm(kt, (cp[:, None] * dY).to(k.dtype), DOT)
              + _entry_at(c, last) * dS + _entry_at(e0, last) * dM)
        dS = dS_in
    _store_pair(DS0, i_bh, dS, dM, sv_off, sv_ok, DK, DV)


def _bwd_dqk_kernel(
    Q, K, TH, GAM, GP, VEC, DO, UN, DY, HS, DHS, DQ, DK_, DTH, DGAM, DD, DC, T, TP, NT, scale,
    H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    C: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): this Dv block's part of dq, dk, dtheta through the solve
    (added to ``_state_bwd_kernel``'s) and of the gate terms (``DGAM``, ``DD``, ``DC``; ``[NV, ...]``), from the
    states entering (``HS``) and the gradients of those leaving the chunk (``DHS``)."""
    i_v, n = tl.program_id(0), tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    BH = tl.num_programs(2).to(tl.int64)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(i_v, i_bh, H, GQ, DK, DV, BK, BV)
    t_off = tl.arange(0, C)
    c0, _, rows, r_ok = chunk_rows(n, C, T)
    q, k, th = _load_chunk(Q, K, TH, i_bh, kv_bh, rows, r_ok, k_off, k_ok, T, DK, F64)
    d, c, dp, cp, e0, gL, eL = _vectors(VEC, i_bh, BH, TP, rows)
    tile_off = (i_bh * TP + rows)[:, None] * C + t_off[None, :]
    Gam = tl.load(GAM + tile_off)
    Gp = tl.load(GP + tile_off)
    uv_off = i_bh * T * DV + rows[:, None] * DV + v_off[None, :]
    uv_ok = r_ok[:, None] & v_ok[None, :]
    do = to_acc(tl.load(DO + uv_off, mask=uv_ok, other=0.0), F64)
    U = tl.load(UN + uv_off, mask=uv_ok, other=0.0)
    dY = tl.load(DY + uv_off, mask=uv_ok, other=0.0)
    W = th[:, None] * U
    lower = t_off[:, None] >= t_off[None, :]
    kk = mm(k, tl.trans(k), DOT).to(Gam.dtype)
    qk = mm(q, tl.trans(k), DOT).to(Gam.dtype)
    # through the solve: L = strict_tril(Gp * K K^T diag(theta)), dL = -dY U^T
    dL = tl.where(t_off[:, None] > t_off[None, :], -mm(dY, tl.trans(U), 1), 0.0)
    row_off = (i_v * BH + i_bh) * T + rows
    dth = tl.load(DTH + row_off, mask=r_ok, other=0.0) + tile_sum(dL * Gp * kk, 0)
    tl.store(DTH + row_off, dth.to(DTH.dtype.element_ty), mask=r_ok)
    dkk = dL * Gp * th[None, :]
    # through O's tril(Gam * Q K^T) W
    dP = mm(do, tl.trans(W), 1)
    dqk = tl.where(lower, scale * dP * Gam, 0.0)
    up = (t_off[:, None] + 1 == t_off[None, :]).to(dL.dtype)
    dGam = tl.where(lower, scale * dP * qk, 0.0) + mm(up, dL * th[None, :] * kk, 1)
    tl.store(DGAM + ((i_v * BH + i_bh) * NT + n) * C * C + t_off[:, None] * C + t_off[None, :],
             dGam.to(DGAM.dtype.element_ty))
    # products with the states entering (dq, dk, the gate terms of d, c, dp, cp) and leaving (dk through S', M')
    S0, M0 = _load_pair(HS, i_bh * NT + n, sv_off, sv_ok, DK, DV, F64)
    S0t, M0t = tl.trans(S0.to(k.dtype)), tl.trans(M0.to(k.dtype))
    doS, doM = mm(do.to(k.dtype), S0t, DOT), mm(do.to(k.dtype), M0t, DOT)
    dq = mm(dqk.to(k.dtype), k, DOT) + scale * (d[:, None] * doS + c[:, None] * doM)
    dd = scale * tile_sum(q * doS, 1)
    dc = scale * tile_sum(q * doM, 1)
    dyS, dyM = mm(dY.to(k.dtype), S0t, DOT), mm(dY.to(k.dtype), M0t, DOT)
    vec_off = (i_v * BH + i_bh) * TP + rows
    tl.store(DD + vec_off, (dd + _shift(-tile_sum(k * dyS, 1), t_off, True)).to(DD.dtype.element_ty))
    tl.store(DC + vec_off, (dc + _shift(-tile_sum(k * dyM, 1), t_off, True)).to(DC.dtype.element_ty))
    Wd = W.to(k.dtype)
    dS, dM = _load_pair(DHS, i_bh * NT + n, sv_off, sv_ok, DK, DV, F64)
    dk = (mm(tl.trans(dqk).to(q.dtype), q, DOT) + mm((dkk + tl.trans(dkk)).to(k.dtype), k, DOT)
          - dp[:, None] * dyS - cp[:, None] * dyM
          + gL[:, None] * mm(Wd, tl.trans(dS.to(k.dtype)), DOT) + eL[:, None] * mm(Wd, tl.trans(dM.to(k.dtype)), DOT))
    qk_off = (i_v * BH + i_bh) * T * DK + rows[:, None] * DK + k_off[None, :]
    qk_ok = r_ok[:, None] & k_ok[None, :]
    tl.store(DQ + qk_off, dq.to(DQ.dtype.element_ty), mask=qk_ok)
    tl.store(DK_ + qk_off, dk.to(DK_.dtype.element_ty), mask=qk_ok)


def _bwd_gates_kernel(
    GB, CE, R, DGAM, DD, DC, DGL, LS, DB, DCE, T, TP, NT, NV, C: tl.constexpr, RESETS: tl.constexpr,
    F64: tl.constexpr,
):
    """One program per (chunk, batch x head): the gradients of ``b`` and ``ce`` in the chunk, from the gate terms
    summed over the Dv blocks, the row-L terms (``DGL``: Gam's and E's rows; ``LS``: ``<dS', S0>``, ``<dS', M0>``,
    ``<dM', M0>``, the gradients of ``d_L``, ``c_L`` and ``exp(ce_L)``), through ``Gam = A E``, ``c = A exp(ce)``
    and ``d = exp(b)``."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    BH = tl.num_programs(1).to(tl.int64)
    t_off = tl.arange(0, C)
    c0 = n * C
    dGam = acc_zeros([C, C], F64)
    dd = acc_zeros([C], F64)
    dc = acc_zeros([C], F64)
    dGL = acc_zeros([C], F64)
    dEL = acc_zeros([C], F64)
    for i_v in range(0, NV):
        dGam += tl.load(DGAM + ((i_v * BH + i_bh) * NT + n) * C * C + t_off[:, None] * C + t_off[None, :])
        vec_off = (i_v * BH + i_bh) * TP + c0 + t_off
        dd += tl.load(DD + vec_off)
        dc += tl.load(DC + vec_off)
        dGL += tl.load(DGL + vec_off)
        dEL += tl.load(DGL + NV * BH * TP + vec_off)
    A, E, d, e0 = _chunk_decays(GB, CE, R, i_bh, c0, TP, t_off, C, RESETS, F64)
    last = t_off == tl.minimum(T - c0, C) - 1
    ls_off = (i_bh * NT + n) * 3
    dGam += tl.where(last[:, None], dGL[None, :], 0.0)
    dd += tl.where(last, tl.load(LS + ls_off), 0.0)
    dc += tl.where(last, tl.load(LS + ls_off + 1), 0.0)
    de0 = tl.where(last, tl.load(LS + ls_off + 2), 0.0) + tile_sum(A * dc[:, None], 0)
    dE = tl.where(last[:, None], dEL[None, :], 0.0) + _mm_tf32x3(tl.trans(A), dGam, F64)
    X = (_mm_tf32x3(dGam, tl.trans(E), F64) + dc[:, None] * e0[None, :]) * A
    Z = dE * E
    tl.store(DB + i_bh * TP + c0 + t_off, (tile_sum(X, 1) - tile_sum(X, 0) + dd * d).to(DB.dtype.element_ty))
    tl.store(DCE + i_bh * TP + c0 + t_off, (tile_sum(Z, 1) - tile_sum(Z, 0) + de0 * e0).to(DCE.dtype.element_ty))


# ======================================================================= wrapping
#: This module's helpers (``Attention.source`` shows them with the kernels), after those it shares with the delta rule.
_HELPERS = (acc_zeros, tile_sum, in_dim, mm, to_acc, decay_matrix, unit_lower_inverse, load_rows, value_block,
            kv_head, chunk_rows,
            _mm_tf32x3, _chunk_decays, _shift_rows, _shift, _row_at, _entry_at, _solve_terms, _load_pair,
            _start_pair, _store_pair, _load_chunk, _vectors)
_KERNELS = (_chunk_kernel, _state_fwd_kernel, _out_kernel, _bwd_local_kernel, _state_bwd_kernel, _bwd_dqk_kernel,
            _bwd_gates_kernel)


#: The kernels jitted for the GPU (``kernels(False)``) or wrapped by Triton's interpreter (``kernels(True)``).
kernels = KernelTable(_HELPERS, _KERNELS, globals())
_launch = kernels.launch


def configs(Dk: int, Dv: int, C: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Per-kernel compile-time constants and launch options: what the launches use (``runtime.gpu_check``
    compiles those launches offline). The state programs hold two [Dk, BV] state blocks."""
    if Dk > MAX_DK:
        raise SpecError(f"Titans' Triton kernels support a key head dim up to {MAX_DK}, got {Dk}",
                        where="argument q", hint="use backend='cpu'")
    dot = 1 if dtype not in (torch.bfloat16, torch.float16) else (2 if interpret and dtype == torch.bfloat16 else 0)
    f64 = dtype == torch.float64
    BK = block_size(Dk, MAX_DK)
    common = dict(DK=Dk, DV=Dv, BK=BK, BV=TITANS_VALUE_BLOCK, C=C, F64=f64, DOT=dot)
    warps = 8 if BK > 64 or C >= 64 else 4
    cfg = {name: dict(common, num_warps=warps, num_stages=1)
           for name in ("_state_fwd_kernel", "_out_kernel", "_bwd_local_kernel", "_state_bwd_kernel", "_bwd_dqk_kernel")}
    cfg["_chunk_kernel"] = dict(DK=Dk, BK=BK, C=C, F64=f64, DOT=dot, num_warps=warps, num_stages=1)
    cfg["_bwd_gates_kernel"] = dict(C=C, F64=f64, num_warps=4, num_stages=1)
    return cfg


def _chunk_sums(x: torch.Tensor, C: int, TP: int) -> torch.Tensor:
    """In-chunk cumulative sums of ``x`` ``[B, H, T]`` padded with zeros to TP: ``[B*H, TP]`` (differentiable)."""
    B, H, T = x.shape
    return F.pad(x, (0, TP - T)).reshape(B * H, TP // C, C).cumsum(-1).reshape(B * H, TP)


def _chunk_terms(k, theta, b, ce, R, C: int, cfg: dict, interpret: bool):
    """``_chunk_kernel``'s ``(TI, GAM, GP, VEC)``."""
    B, H, T = theta.shape
    TP = b.shape[-1]
    acc = torch.float64 if cfg["F64"] else torch.float32
    TI, GAM, GP = (torch.empty(B * H, TP, C, dtype=acc, device=k.device) for _ in range(3))
    VEC = torch.empty(7, B * H, TP, dtype=acc, device=k.device)
    _launch("_chunk_kernel", (TP // C, B * H), interpret, k, theta, b, ce, b if R is None else R, TI, GAM, GP, VEC,
            T, TP, H=H, GQ=H // k.shape[1], RESETS=R is not None, **cfg)
    return TI, GAM, GP, VEC


def titans_forward(q, k, v, theta, b, ce, R, initial_state, scale: float, C: int, interpret: bool):
    """``(out, final state, HS, UN)``: HS the states entering every chunk, UN the corrected values ``U`` (the
    backward reads both)."""
    B, H, T, Dk = q.shape
    Dv, TP = v.shape[-1], b.shape[-1]
    cfg = configs(Dk, Dv, C, q.dtype, interpret)
    TI, GAM, _, VEC = _chunk_terms(k, theta, b, ce, R, C, cfg["_chunk_kernel"], interpret)
    acc, NT, GQ = TI.dtype, TP // C, H // k.shape[1]
    # the states entering the chunks in the input dtype where the dots take them so (bf16 / fp16: half the memory
    # the backward keeps), exact otherwise
    store = acc if cfg["_state_fwd_kernel"]["DOT"] == 1 else q.dtype
    HS = torch.empty(B * H, NT, 2, Dk, Dv, dtype=store, device=q.device)
    UN = torch.empty(B * H, T, Dv, dtype=acc, device=q.device)
    final = torch.empty(B, H, 2 * Dk, Dv, dtype=acc, device=q.device)
    s0 = initial_state.contiguous() if initial_state is not None else final
    sc = cfg["_state_fwd_kernel"]
    _launch("_state_fwd_kernel", (triton.cdiv(Dv, sc["BV"]), B * H), interpret, k, v, theta, TI, VEC, s0, HS, UN,
            final, T, TP, NT, H=H, GQ=GQ, HAS_S0=initial_state is not None, **sc)
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    oc = cfg["_out_kernel"]
    _launch("_out_kernel", (triton.cdiv(Dv, oc["BV"]), NT, B * H), interpret, q, k, theta, GAM, VEC, HS, UN, out, T,
            TP, NT, float(scale), H=H, GQ=GQ, **oc)
    return out, final, HS, UN


def titans_backward(q, k, v, theta, b, ce, R, HS, UN, do, dS_T, scale: float, C: int, interpret: bool):
    """``(dq, dk, dv, dtheta, db, dce, dS0)`` in the compute dtype; dk, dv per kv head."""
    B, H, T, Dk = q.shape
    Hkv, Dv, TP = k.shape[1], v.shape[-1], b.shape[-1]
    GQ, NT, BH = H // Hkv, TP // C, B * H
    cfg = configs(Dk, Dv, C, q.dtype, interpret)
    TI, GAM, GP, VEC = _chunk_terms(k, theta, b, ce, R, C, cfg["_chunk_kernel"], interpret)
    acc = TI.dtype
    NV = triton.cdiv(Dv, cfg["_state_bwd_kernel"]["BV"])
    do = do.to(q.dtype).contiguous()  # the tensor-core dots take dO in the input dtype
    dst = dS_T.to(acc).contiguous()  # autograd hands zeros for a final state no loss reads
    DHS = torch.empty_like(HS)
    DS0 = torch.empty(B, H, 2 * Dk, Dv, dtype=acc, device=q.device)
    dv = torch.empty(B, H, T, Dv, dtype=acc, device=q.device)  # dY, per query head
    dth = torch.empty(NV, BH, T, dtype=acc, device=q.device)
    DGL = torch.empty(2, NV, BH, TP, dtype=acc, device=q.device)
    dWl = torch.empty(BH, T, Dv, dtype=acc, device=q.device)
    _launch("_bwd_local_kernel", (NV, NT, BH), interpret, q, k, GAM, do, dWl, T, TP, float(scale), H=H, GQ=GQ,
            **cfg["_bwd_local_kernel"])
    _launch("_state_bwd_kernel", (NV, BH), interpret, q, k, theta, TI, dWl, VEC, do, UN, dst,
            DHS, dv, dth, DGL, DS0, T, TP, NT, float(scale), H=H, GQ=GQ,
            **cfg["_state_bwd_kernel"])
    dq, dk = (torch.empty(NV, BH, T, Dk, dtype=acc, device=q.device) for _ in range(2))
    dgam = torch.empty(NV, BH, NT, C, C, dtype=acc, device=q.device)
    dd, dc = (torch.empty(NV, BH, TP, dtype=acc, device=q.device) for _ in range(2))
    _launch("_bwd_dqk_kernel", (NV, NT, BH), interpret, q, k, theta, GAM, GP, VEC, do, UN, dv, HS, DHS, dq, dk, dth,
            dgam, dd, dc, T, TP, NT, float(scale), H=H, GQ=GQ, **cfg["_bwd_dqk_kernel"])
    # the gradients of d_L, c_L and exp(ce_L): <dS', S0>, <dS', M0>, <dM', M0> per chunk
    LS = torch.stack([(DHS[:, :, i].to(acc) * HS[:, :, j].to(acc)).sum((-1, -2)) for i, j in ((0, 0), (0, 1), (1, 1))],
                     -1)
    db, dce = (torch.empty(BH, TP, dtype=acc, device=q.device) for _ in range(2))
    _launch("_bwd_gates_kernel", (NT, BH), interpret, b, ce, b if R is None else R, dgam, dd, dc, DGL,
            LS.contiguous(), db, dce, T, TP, NT, NV, RESETS=R is not None, **cfg["_bwd_gates_kernel"])
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
        out, final, HS, UN = titans_forward(q, k, v, theta, b, ce, R, initial_state, scale, C, interpret)
        ctx.save_for_backward(q, k, v, theta, b, ce, R, HS, UN)
        ctx.scale, ctx.C, ctx.interpret = scale, C, interpret
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, theta, b, ce, R, HS, UN = ctx.saved_tensors
        dq, dk, dv, dth, db, dce, ds0 = titans_backward(q, k, v, theta, b, ce, R, HS, UN, do, dS_T, ctx.scale, ctx.C,
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
    interp = interprets(q) if interpret is None else interpret
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
