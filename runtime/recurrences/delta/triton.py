"""Triton kernels of the chunked delta rule (DeltaNet, Gated DeltaNet: no gate or one log gate per token and
head), forward and backward, in the structure of flash-linear-attention's chunked gated delta rule. The math is
that of ``runtime.recurrences.delta.chunk`` (its docstring): per chunk of C tokens, with ``b`` the in-chunk
cumulative log gate, ``E_ts = exp(b_t - b_s)`` (s <= t), ``e = exp(b)``, ``el = exp(b_last - b)``:

    A = strict_tril(diag(beta) (K K^T * E)),  T = (I + A)^-1         (unit lower triangular)
    W = T diag(beta e) K,  U0 = T diag(beta) V                       (the WY representation)
    U = U0 - W S,  O = scale (diag(e) Q S + tril(Q K^T * E) U),  S' = exp(b_last) S + (diag(el) K)^T U

with S the state entering the chunk. Every exponent is a sum of log gates over a span inside the chunk (never
positive for log decays). The kernels:

- ``_wy_fwd_kernel``, one program per (chunk, batch x head): ``K K^T``, the inverse ``T`` by forward
  substitution in registers (fp32; fp64 in the interpreter), then ``W`` and ``U0``; stores ``T`` for the
  backward;
- ``_state_fwd_kernel``, one program per (Dv block, batch x head), the only sequential part of the forward: walks
  the chunks, stores the state entering each (``h_n``) and ``U`` (the corrected values), and the final state;
- ``_out_kernel`` (Dv block, chunk, batch x head): ``O``;
- ``_bwd_du_local_kernel`` (Dv block, chunk, batch x head): the chunk-local part of ``dU`` below;
- ``_state_bwd_kernel`` (Dv block, batch x head), sequential in reverse: stores the gradient of the state leaving
  each chunk (``dh_n``) and ``dU = scale tril(Q K^T * E)^T dO + diag(el) K dh_n``, updates
  ``dh <- exp(b_last) dh + scale (diag(e) Q)^T dO - W^T dU``; its last value is the initial state's gradient;
- ``_bwd_dqk_kernel`` (Dk block, chunk, batch x head): ``dq``, the part of ``dk`` through O and S', ``dW = -dU h^T``
  and the gate terms ``sum_c (q dq - k dk)`` (plus the chunk's last-gate terms);
- ``_wy_bwd_da_kernel`` (chunk, batch x head): through the WY form, ``dT = dW (diag(beta e) K)^T + dU (diag(beta)
  V)^T``, ``dA = -strict(T^T dT T^T)`` (stored), ``dv`` and the rate's value term; ``_wy_bwd_dk_kernel`` (chunk,
  batch x head): the rest of ``dk``, ``dbeta`` and the gate terms (two kernels: together they spilled on sm_80).

A gate of -inf (a hard reset) counts 0 in ``b``; the host passes the last reset at or before each token in its
chunk (``R``, int32) and, with ``RESETS``, every decay across a reset is 0 (``exp(b)`` where one lies in the chunk
up to t, ``exp(b_last - b)`` where one lies after t, ``E_ts`` where one lies in (s, t]); its gradient is 0.
The gradient of the cumulative gates is summed over Dk blocks and turned into the gates' gradient by a reverse
cumulative sum inside each chunk on the host. Dots run on the tensor cores in the input dtype (bf16 / fp16)
with fp32 accumulation; fp32 inputs keep exact products (no TF32), fp64 inputs fp64 (the interpreter).
GQA: k, v (and so K K^T) are read from kv head ``h // (H // Hkv)`` by index; beta and the gates are per query
head, so W, U and the gradients are per query head, dk and dv summed over the group on the host.
The offline compile check of these kernels is ``runtime.gpu_check`` (``attnc check-gpu stdlib:gated_delta_net``).
Per-channel gates (Kimi Delta Attention) have their own kernels in ``runtime.recurrences.delta.triton_kda``.
"""


import torch
import torch.nn.functional as F

from ....core.errors import SpecError
from ..library.device import (
    acc_zeros,
    chunk_rows,
    decay_matrix,
    in_dim,
    kv_head,
    load_rows,
    mm,
    state_block,
    tile_sum,
    tl,
    to_acc,
    triton,
    unit_lower_inverse,
    value_block,
    value_sums,
)
from ..library.host import KernelTable, available, block_size, interprets, output_grad

#: Largest Dk / Dv block of the chunk-parallel programs.
MAX_BLOCK = 64
#: Largest key head dim: the sequential passes hold the whole [Dk, BV] state block of a program in registers.
MAX_DK = 256


def _chunk_gates(
    G, R, i_bh, c0, TP, t_off, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr
):
    """``(b, rs, e, el, d)`` of the chunk at ``c0``: the in-chunk cumulative log gates ``b`` (``[C]``, from the
    host's padded ``[B*H, TP]`` array; zeros without a gate; a -inf gate counts 0), with ``RESETS`` the last hard
    reset at or before each row (``rs``, int32, -1 if none; the host's ``R``), and the decays ``e = exp(b)``,
    ``el = exp(b_last - b)``, ``d = exp(b_last)`` (a scalar), each 0 across a reset."""
    if GATED:
        b = to_acc(tl.load(G + i_bh * TP + c0 + t_off), F64)
    else:
        b = acc_zeros([C], F64)
    bl = tile_sum(tl.where(t_off == C - 1, b, 0.0), 0)
    if RESETS:
        rs = tl.load(R + i_bh * TP + c0 + t_off)
        rl = tile_sum(tl.where(t_off == C - 1, rs, 0), 0)
        e = tl.exp(tl.where(rs >= 0, float("-inf"), b))
        el = tl.exp(tl.where(rl > t_off, float("-inf"), bl - b))
        d = tl.exp(tl.where(rl >= 0, float("-inf"), bl))
    else:
        rs = t_off
        e = tl.exp(b)
        el = tl.exp(bl - b)
        d = tl.exp(bl)
    return b, rs, e, el, d


# ======================================================================= kernels (undecorated)
def _wy_fwd_kernel(
    K, V, BETA, G, R, W, U0, TI, T, TP, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr,
    STORE_T: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head): ``T = (I + A)^-1``, ``W = T diag(beta e) K``, ``U0 = T diag(beta) V``
    (stored per query head in W's dtype; T in the compute dtype when ``STORE_T``)."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    k_base = K + kv_bh * T * DK
    v_base = V + kv_bh * T * DV
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    KK = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off = k0 + tl.arange(0, BK)
        k = load_rows(k_base, rows, r_ok, k_off, in_dim(k_off, DK, BK), DK)
        KK += mm(k, tl.trans(k), DOT)
    A = KK * decay_matrix(b, rs, t_off, True, RESETS) * beta[:, None]
    X = unit_lower_inverse(A, t_off, C)
    if STORE_T:
        tl.store(
            TI + (i_bh * TP + c0) * C + (t_off[:, None] * C + t_off[None, :]), X.to(TI.dtype.element_ty),
        )
    Xc = X.to(K.dtype.element_ty)
    kw = beta * e
    for k0 in range(0, DK, BK):
        k_off = k0 + tl.arange(0, BK)
        k_ok = in_dim(k_off, DK, BK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        w = mm(Xc, (k * kw[:, None]).to(k.dtype), DOT)
        tl.store(
            W + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], w.to(W.dtype.element_ty),
            mask=r_ok[:, None] & k_ok[None, :],
        )
    for v0 in range(0, DV, BV):
        v_off = v0 + tl.arange(0, BV)
        v_ok = in_dim(v_off, DV, BV)
        v = load_rows(v_base, rows, r_ok, v_off, v_ok, DV)
        u = mm(Xc, (v * beta[:, None]).to(v.dtype), DOT)
        tl.store(
            U0 + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], u.to(U0.dtype.element_ty),
            mask=r_ok[:, None] & v_ok[None, :],
        )


def _state_fwd_kernel(
    K, W, U0, G, R, S0, HS, UN, ST, T, TP, NT, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BKD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr,
    RESETS: tl.constexpr, HAS_S0: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks: stores ``h_n`` (the state entering chunk n,
    ``HS[bh, n]``), ``U = U0 - W h_n`` (``UN``), then ``S <- exp(b_last) S + (diag(el) K)^T U``; the final state
    in ``ST``. The state block is ``[BKD, BV]`` with BKD covering the whole key head dim."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    t_off = tl.arange(0, C)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(i_v, i_bh, H, GQ, DK, DV, BKD, BV)
    S = state_block(S0, i_bh, sv_off, sv_ok, HAS_S0, DK, DV, BKD, BV, F64)
    for n in range(0, NT):
        c0, _, rows, r_ok = chunk_rows(n, C, T)
        tl.store(HS + (i_bh * NT + n) * DK * DV + sv_off, S.to(HS.dtype.element_ty), mask=sv_ok)
        w = load_rows(W + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        u0 = load_rows(U0 + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        u = to_acc(u0, F64) - mm(w, S.to(w.dtype), DOT)
        tl.store(
            UN + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], u.to(UN.dtype.element_ty),
            mask=r_ok[:, None] & v_ok[None, :],
        )
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
        kel = (k * el[:, None]).to(k.dtype)
        S = S * d + mm(tl.trans(kel), u.to(k.dtype), DOT)
    tl.store(ST + i_bh * DK * DV + sv_off, S.to(ST.dtype.element_ty), mask=sv_ok)


def _out_kernel(
    Q, K, UN, G, R, HS, OUT, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr,
    RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): ``O = scale (diag(e) Q h_n + tril(Q K^T * E) U)``."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    v_off = i_v * BV + tl.arange(0, BV)
    v_ok = in_dim(v_off, DV, BV)
    h_base = HS + (i_bh * NT + n) * DK * DV
    o = acc_zeros([C, BV], F64)
    P = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off = k0 + tl.arange(0, BK)
        k_ok = in_dim(k_off, DK, BK)
        q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        hn = tl.load(
            h_base + k_off[:, None] * DV + v_off[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0,
        )
        o += mm(q, hn.to(q.dtype), DOT)
        P += mm(q, tl.trans(k), DOT)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    u = load_rows(UN + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    P = P * decay_matrix(b, rs, t_off, False, RESETS)
    o = (
        o * e[:, None] + mm(P.to(Q.dtype.element_ty), u.to(Q.dtype.element_ty), DOT)
    ) * scale
    tl.store(
        OUT + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], o.to(OUT.dtype.element_ty),
        mask=r_ok[:, None] & v_ok[None, :],
    )


def _bwd_du_local_kernel(
    Q, K, G, R, DO, DU, T, TP, scale, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): the chunk-local part of dU, ``scale tril(Q K^T * E)^T dO``,
    into ``DU`` (out of the sequential pass, which held Q K^T besides its state at Dk = 128 and spilled)."""
    i_v = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    v_off = i_v * BV + tl.arange(0, BV)
    v_ok = in_dim(v_off, DV, BV)
    Pt = acc_zeros([C, C], F64)  # [s, t]
    for k0 in range(0, DK, BK):
        k_off = k0 + tl.arange(0, BK)
        k_ok = in_dim(k_off, DK, BK)
        q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        Pt += mm(k, tl.trans(q), DOT)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    Pt = Pt * tl.trans(decay_matrix(b, rs, t_off, False, RESETS)) * scale
    do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    du = mm(Pt.to(do.dtype), do, DOT)
    tl.store(
        DU + i_bh * T * DV + rows[:, None] * DV + v_off[None, :], du.to(DU.dtype.element_ty),
        mask=r_ok[:, None] & v_ok[None, :],
    )


def _state_bwd_kernel(
    Q, K, W, G, R, DO, DST, DHS, DU, DS0, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BKD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GATED: tl.constexpr, RESETS: tl.constexpr, HAS_DST: tl.constexpr, STORE_DS0: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks backwards from ``dh = dS_T``: stores ``dh_n``
    (the gradient of the state leaving chunk n) and ``dU = scale tril(Q K^T * E)^T dO + diag(el) K dh_n`` (the first
    term already in ``DU``, from ``_bwd_du_local_kernel``), then
    ``dh <- exp(b_last) dh + scale (diag(e) Q)^T dO - W^T dU``; the initial state's gradient in ``DS0``."""
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    t_off = tl.arange(0, C)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(i_v, i_bh, H, GQ, DK, DV, BKD, BV)
    dh = state_block(DST, i_bh, sv_off, sv_ok, HAS_DST, DK, DV, BKD, BV, F64)
    for i in range(0, NT):
        n = NT - 1 - i
        c0, _, rows, r_ok = chunk_rows(n, C, T)
        tl.store(DHS + (i_bh * NT + n) * DK * DV + sv_off, dh.to(DHS.dtype.element_ty), mask=sv_ok)
        q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
        kel = (k * el[:, None]).to(k.dtype)
        du_off = DU + i_bh * T * DV + rows[:, None] * DV + v_off[None, :]
        du_ok = r_ok[:, None] & v_ok[None, :]
        # the chunk-local part of dU (``_bwd_du_local_kernel``) plus the state's
        du = tl.load(du_off, mask=du_ok, other=0.0) + mm(kel, dh.to(k.dtype), DOT)
        tl.store(du_off, du.to(DU.dtype.element_ty), mask=du_ok)
        w = load_rows(W + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        qe = (q * (e * scale)[:, None]).to(q.dtype)
        dh = dh * d + mm(tl.trans(qe), do, DOT) - mm(tl.trans(w), du.to(w.dtype), DOT)
    if STORE_DS0:
        tl.store(DS0 + i_bh * DK * DV + sv_off, dh.to(DS0.dtype.element_ty), mask=sv_ok)


def _bwd_dqk_kernel(
    Q, K, UN, G, R, DO, HS, DHS, DU, DQ, DKP, DW, DG, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GATED: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dk block, chunk, batch x head), with ``dP = scale (dO U^T) * E`` (causal):
    ``dq = scale diag(e) dO h_n^T + dP K``, ``dk = diag(el) U dh_n^T + dP^T Q`` (through O and S'; per query
    head), ``dW = -dU h_n^T``, and the cumulative gates' gradient ``sum_c (q dq - k dk)``, plus on the chunk's last
    row ``sum (k diag(el) U dh_n^T) + exp(b_last) sum(h_n dh_n)`` (per Dk block: ``DG[i_k]``)."""
    i_k = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    k_off = i_k * BK + tl.arange(0, BK)
    k_ok = in_dim(k_off, DK, BK)
    hs_off = (i_bh * NT + n) * DK * DV
    dP, dq, dks, dw, hdh = value_sums(DO, UN, DU, HS, DHS, i_bh, hs_off, rows, r_ok, k_off, k_ok, T, DV, BV, C,
                                      BK, GATED, F64, DOT)
    q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    dP = dP * decay_matrix(b, rs, t_off, False, RESETS) * scale
    dks = dks * el[:, None]
    dq = dq * (e * scale)[:, None] + mm(dP.to(k.dtype), k, DOT)
    dk = dks + mm(tl.trans(dP.to(q.dtype)), q, DOT)
    qk_ok = r_ok[:, None] & k_ok[None, :]
    off = rows[:, None] * DK + k_off[None, :]
    tl.store(DQ + i_bh * T * DK + off, dq.to(DQ.dtype.element_ty), mask=qk_ok)
    tl.store(DKP + i_bh * T * DK + off, dk.to(DKP.dtype.element_ty), mask=qk_ok)
    tl.store(DW + i_bh * T * DK + off, dw.to(DW.dtype.element_ty), mask=qk_ok)
    if GATED:
        qf = to_acc(q, F64)
        kf = to_acc(k, F64)
        dg = tile_sum(qf * dq - kf * dk, 1)
        last = tile_sum(tile_sum(kf * dks, 1), 0) + d * tile_sum(hdh, 0)
        dg += tl.where(t_off == C - 1, last, 0.0)
        tl.store(
            DG + (i_k * tl.num_programs(2) + i_bh) * TP + c0 + t_off, dg.to(DG.dtype.element_ty)
        )


def _wy_bwd_da_kernel(
    K, V, BETA, G, R, TI, DW, DU, DA, DV_, DBETA, T, TP, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
    GATED: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head), through the WY form (``dU0 = dU``): ``dT = dW (diag(beta e) K)^T +
    dU (diag(beta) V)^T`` and ``dA = -strict(T^T dT T^T) * E`` (stored, ``[C, C]`` per chunk); ``dv = diag(beta)
    T^T dU`` and the rate's term ``sum_c (T^T dU)_tc v_tc``."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    kw = beta * e
    # T^T loaded transposed: both products with it take it as it is (no register transposes)
    Xt = tl.load(TI + (i_bh * TP + c0) * C + (t_off[None, :] * C + t_off[:, None])).to(
        K.dtype.element_ty
    )
    dT = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off = k0 + tl.arange(0, BK)
        k_ok = in_dim(k_off, DK, BK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        dw = load_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK).to(k.dtype)
        dT += mm(dw, tl.trans((k * kw[:, None]).to(k.dtype)), DOT)
    dbeta = acc_zeros([C], F64)
    for v0 in range(0, DV, BV):
        v_off = v0 + tl.arange(0, BV)
        v_ok = in_dim(v_off, DV, BV)
        v = load_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        du = load_rows(DU + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV).to(v.dtype)
        dT += mm(du, tl.trans((v * beta[:, None]).to(v.dtype)), DOT)
        dvb = mm(Xt, du, DOT)
        tl.store(
            DV_ + i_bh * T * DV + rows[:, None] * DV + v_off[None, :],
            (dvb * beta[:, None]).to(DV_.dtype.element_ty), mask=r_ok[:, None] & v_ok[None, :],
        )
        dbeta += tile_sum(dvb * to_acc(v, F64), 1)
    # dA in blocks of RB rows (whole-chunk products of three [C, C] tiles spilled on sm_80): rows r of T^T, loaded
    # transposed from memory, times dT times T^T
    dTc = dT.to(Xt.dtype)
    for r0 in range(0, C, RB):
        r_off = r0 + tl.arange(0, RB)
        Xr = tl.load(TI + (i_bh * TP + c0) * C + (t_off[None, :] * C + r_off[:, None])).to(Xt.dtype)
        dA = mm(mm(Xr, dTc, DOT).to(Xt.dtype), Xt, DOT)
        if GATED:
            br = to_acc(tl.load(G + i_bh * TP + c0 + r_off), F64)
        else:
            br = acc_zeros([RB], F64)
        m = r_off[:, None] > t_off[None, :]
        if RESETS:  # no reset in (s, r]
            m = m & (tl.load(R + i_bh * TP + c0 + r_off)[:, None] <= t_off[None, :])
        E = tl.exp(tl.where(m, br[:, None] - b[None, :], float("-inf")))
        tl.store(
            DA + (i_bh * TP + c0) * C + (r_off[:, None] * C + t_off[None, :]),
            (-dA * E).to(DA.dtype.element_ty),
        )
    tl.store(DBETA + i_bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=r_ok)


def _wy_bwd_dk_kernel(
    K, BETA, G, R, TI, DW, DA, DKP, DBETA, DG, T, TP, NKB, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head), with ``dA`` of ``_wy_bwd_da_kernel`` and ``Z = dA diag(beta)`` (rows):
    adds ``diag(beta e) T^T dW + Z K + Z^T K`` to dk, the rate's terms ``e_t sum_c (T^T dW)_tc k_tc + sum_c k_tc
    (dA K)_tc`` to dbeta, and stores the gates' terms (``DG[NKB]``)."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    kv_bh = kv_head(i_bh, H, GQ)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    kw = beta * e
    cc_base = (i_bh * TP + c0) * C  # a scalar 64-bit base, 32-bit offsets within the chunk's [C, C]
    cc_off = t_off[:, None] * C + t_off[None, :]
    Xc = tl.load(TI + cc_base + cc_off).to(K.dtype.element_ty)
    dA = tl.load(DA + cc_base + cc_off)
    dAc = dA.to(Xc.dtype)
    Zc = (dA * beta[:, None]).to(Xc.dtype)
    dbeta = to_acc(tl.load(DBETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    dg = acc_zeros([C], F64)
    for k0 in range(0, DK, BK):
        k_off = k0 + tl.arange(0, BK)
        k_ok = in_dim(k_off, DK, BK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        dw = load_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK).to(k.dtype)
        dkb = mm(tl.trans(Xc), dw, DOT)
        dak = mm(dAc, k, DOT)
        ztk = mm(tl.trans(Zc), k, DOT)
        kf = to_acc(k, F64)
        s = tile_sum(dkb * kf, 1)
        dbeta += e * s + tile_sum(kf * dak, 1)
        dg += kw * s + tile_sum(kf * (dak * beta[:, None] - ztk), 1)
        off = i_bh * T * DK + rows[:, None] * DK + k_off[None, :]
        m = r_ok[:, None] & k_ok[None, :]
        dk = tl.load(DKP + off, mask=m, other=0.0) + dkb * kw[:, None] + dak * beta[:, None] + ztk
        tl.store(DKP + off, dk.to(DKP.dtype.element_ty), mask=m)
    tl.store(DBETA + i_bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=r_ok)
    if GATED:
        tl.store(DG + (NKB * tl.num_programs(1) + i_bh) * TP + rows, dg.to(DG.dtype.element_ty))


# ======================================================================= wrapping
_HELPERS = (acc_zeros, tile_sum, in_dim, mm, to_acc, _chunk_gates, decay_matrix, unit_lower_inverse, load_rows,
            value_block, state_block, value_sums, kv_head, chunk_rows)
_KERNELS = (
    _wy_fwd_kernel, _state_fwd_kernel, _out_kernel, _bwd_du_local_kernel, _state_bwd_kernel, _bwd_dqk_kernel,
    _wy_bwd_da_kernel, _wy_bwd_dk_kernel,
)


#: The kernels jitted for the GPU (``kernels(False)``) or wrapped by Triton's interpreter (``kernels(True)``).
kernels = KernelTable(_HELPERS, _KERNELS, globals())
_launch = kernels.launch


def configs(Dk: int, Dv: int, C: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Per-kernel compile-time constants and launch options: what the launches use (``runtime.gpu_check``
    compiles those launches offline)."""
    if Dk > MAX_DK:
        raise SpecError(
            f"the delta rule's Triton kernels support a key head dim up to {MAX_DK}, got {Dk}",
            where="argument q", hint="use backend='cpu'",
        )
    f64 = dtype == torch.float64
    dot = (
        1
        if dtype not in (torch.bfloat16, torch.float16)
        else (2 if interpret and dtype == torch.bfloat16 else 0)
    )
    BK, BV = block_size(Dk, MAX_BLOCK), block_size(Dv, MAX_BLOCK)
    BKD = block_size(Dk, MAX_DK)
    # the sequential passes hold [BKD, BVs] fp32 state blocks and [C, BKD] tiles of q / k / w
    BVs = block_size(Dv, 32)
    common = dict(DK=Dk, DV=Dv, C=C, F64=f64, DOT=dot)
    warps = 8 if C >= 64 else 4
    wide = BKD > 64  # Dk = 128 (256): twice the [C, BKD] tiles of the sequential passes
    return {
        "_wy_fwd_kernel": dict(common, BK=BK, BV=BV, num_warps=warps if wide else 4, num_stages=1),
        "_state_fwd_kernel": dict(
            common, BKD=BKD, BV=BVs, num_warps=8 if wide else 4, num_stages=2
        ),
        "_out_kernel": dict(common, BK=BK, BV=BV, num_warps=warps, num_stages=2),
        "_bwd_du_local_kernel": dict(common, BK=BK, BV=BV, num_warps=warps, num_stages=2),
        "_state_bwd_kernel": dict(common, BKD=BKD, BV=BVs, num_warps=warps, num_stages=2),
        "_bwd_dqk_kernel": dict(
            common, BK=block_size(Dk, 32 if wide else 64), BV=block_size(Dv, 32), num_warps=warps, num_stages=2,
        ),
        "_wy_bwd_da_kernel": dict(
            common, BK=block_size(Dk, 32), BV=block_size(Dv, 32), RB=min(C, 16), num_warps=warps, num_stages=1,
        ),
        "_wy_bwd_dk_kernel": dict(
            DK=Dk, C=C, F64=f64, DOT=dot, BK=block_size(Dk, 32), num_warps=warps, num_stages=1
        ),
    }


def _cumulative_gates(
    g: torch.Tensor | None, beta: torch.Tensor, C: int
) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """``(b, R, TP)``: the in-chunk cumulative log gates ``[B*H, TP]`` (TP the length padded to chunks of C; padded
    tokens have gate 0; a gate of -inf, a hard reset, counts 0), or ``beta`` as a placeholder when there is no
    gate (the kernels do not read it); ``R`` the position in its chunk of the last reset at or before each token
    (int32, -1 if none), or None when no gate is -inf."""
    B, H, T = beta.shape
    TP = triton.cdiv(T, C) * C
    if g is None:
        return beta, None, TP
    gc = F.pad(g, (0, TP - T)).reshape(B * H, TP // C, C)
    R = None
    neg = torch.isneginf(gc)
    if bool(neg.any()):
        pos = torch.arange(C, device=g.device, dtype=torch.int32)
        R = torch.where(neg, pos, -1).cummax(-1).values.to(torch.int32).reshape(B * H, TP).contiguous()
        gc = gc.masked_fill(neg, 0.0)
    return gc.cumsum(-1).reshape(B * H, TP).contiguous(), R, TP


def _wy_and_states(
    q, k, v, b, R, beta, s0, C: int, TP: int, gated: bool, cfg: dict, interp: bool, store_t: bool
):
    """The WY form (W, U0, and T when ``store_t``) and the forward state pass: ``(T, h_n, U, final state)``."""
    B, H, T, Dk = q.shape
    Dv, GQ = v.shape[-1], H // k.shape[1]
    NT = TP // C
    acc = torch.float64 if cfg["_wy_fwd_kernel"]["F64"] else torch.float32
    store = acc if cfg["_wy_fwd_kernel"]["DOT"] == 1 else q.dtype
    W = torch.empty(B * H, T, Dk, dtype=store, device=q.device)
    U0 = torch.empty(B * H, T, Dv, dtype=store, device=q.device)
    TI = torch.empty(B * H, TP, C, dtype=acc, device=q.device) if store_t else W
    _launch(
        "_wy_fwd_kernel", (NT, B * H), interp, k, v, beta, b, b if R is None else R, W, U0, TI, T, TP, H=H,
        GQ=GQ, GATED=gated, RESETS=R is not None, STORE_T=store_t, **cfg["_wy_fwd_kernel"],
    )
    HS = torch.empty(B * H, NT, Dk, Dv, dtype=store, device=q.device)
    UN = torch.empty(B * H, T, Dv, dtype=store, device=q.device)
    ST = torch.empty(B, H, Dk, Dv, dtype=acc, device=q.device)
    sc = cfg["_state_fwd_kernel"]
    _launch(
        "_state_fwd_kernel", (triton.cdiv(Dv, sc["BV"]), B * H), interp, k, W, U0, b, b if R is None else R,
        s0 if s0 is not None else ST, HS, UN, ST, T, TP, NT, H=H, GQ=GQ, GATED=gated, RESETS=R is not None,
        HAS_S0=s0 is not None, **sc,
    )
    return TI, W, HS, UN, ST


def delta_forward(
    q, k, v, g, beta, scale: float, initial_state, C: int, interpret: bool | None = None
):
    """``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]`` (contiguous, one dtype; query head h reads
    kv head ``h // (H // Hkv)``), ``g`` ``[B, H, T]`` log gates or None, ``beta`` ``[B, H, T]`` (compute dtype).
    Returns (out in q's dtype, final state in the compute dtype). ``interpret``: Triton's interpreter (None: for
    CPU tensors or under TRITON_INTERPRET=1)."""
    B, H, T, Dk = q.shape
    Dv = v.shape[-1]
    interp = interprets(q) if interpret is None else interpret
    cfg = configs(Dk, Dv, C, q.dtype, interp)
    b, R, TP = _cumulative_gates(g, beta, C)
    s0 = initial_state.contiguous() if initial_state is not None else None
    _, _, HS, UN, final = _wy_and_states(
        q, k, v, b, R, beta, s0, C, TP, g is not None, cfg, interp, False
    )
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    oc = cfg["_out_kernel"]
    _launch(
        "_out_kernel", (triton.cdiv(Dv, oc["BV"]), TP // C, B * H), interp, q, k, UN, b,
        b if R is None else R, HS, out, T, TP, TP // C, float(scale), H=H, GQ=H // k.shape[1],
        GATED=g is not None, RESETS=R is not None, **oc,
    )
    return out, final


def delta_backward(
    q, k, v, g, beta, scale: float, initial_state, do, dS_T, C: int, need_g: bool, need_s0: bool,
    interpret: bool | None = None,
):
    """Gradients ``(dq, dk, dv, dg | None, dbeta, dS0 | None)`` in the compute dtype; dk, dv per kv head."""
    B, H, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    GQ = H // Hkv
    interp = interprets(q) if interpret is None else interpret
    cfg = configs(Dk, Dv, C, q.dtype, interp)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    gated = g is not None
    b, R, TP = _cumulative_gates(g, beta, C)
    NT = TP // C
    s0 = initial_state.contiguous() if initial_state is not None else None
    TI, W, HS, UN, _ = _wy_and_states(q, k, v, b, R, beta, s0, C, TP, gated, cfg, interp, True)
    do = do.to(q.dtype).contiguous()  # the tensor-core dots take dO in the input dtype
    if dS_T is not None and cfg["_state_bwd_kernel"]["DOT"] != 1:
        dS_T = dS_T.to(q.dtype).to(
            acc
        )  # entering in the input dtype, as dO does (see decay.triton)
    dst = dS_T.contiguous() if dS_T is not None else None
    store = HS.dtype
    DHS = torch.empty(B * H, NT, Dk, Dv, dtype=store, device=q.device)
    DU = torch.empty(B * H, T, Dv, dtype=acc, device=q.device)
    DS0 = torch.empty(B, H, Dk, Dv, dtype=acc, device=q.device)
    lc = cfg["_bwd_du_local_kernel"]
    _launch(
        "_bwd_du_local_kernel", (triton.cdiv(Dv, lc["BV"]), NT, B * H), interp, q, k, b,
        b if R is None else R, do, DU, T, TP, float(scale), H=H, GQ=GQ, GATED=gated, RESETS=R is not None,
        **lc,
    )
    sc = cfg["_state_bwd_kernel"]
    _launch(
        "_state_bwd_kernel", (triton.cdiv(Dv, sc["BV"]), B * H), interp, q, k, W, b, b if R is None else R,
        do, dst if dst is not None else DS0, DHS, DU, DS0, T, TP, NT, float(scale), H=H, GQ=GQ, GATED=gated,
        RESETS=R is not None, HAS_DST=dst is not None, STORE_DS0=need_s0, **sc,
    )
    kc = cfg["_bwd_dqk_kernel"]
    NKB = triton.cdiv(Dk, kc["BK"])
    dq = torch.empty(B, H, T, Dk, dtype=acc, device=q.device)
    dk = torch.empty(B, H, T, Dk, dtype=acc, device=q.device)  # per query head
    dW = torch.empty(B * H, T, Dk, dtype=acc, device=q.device)
    dG = torch.empty(NKB + 1, B * H, TP, dtype=acc, device=q.device) if gated else dq
    _launch(
        "_bwd_dqk_kernel", (NKB, NT, B * H), interp, q, k, UN, b, b if R is None else R, do, HS, DHS, DU, dq,
        dk, dW, dG, T, TP, NT, float(scale), H=H, GQ=GQ, GATED=gated, RESETS=R is not None, **kc,
    )
    dv = torch.empty(B, H, T, Dv, dtype=acc, device=q.device)  # per query head
    dbeta = torch.empty(B, H, T, dtype=acc, device=q.device)
    DA = torch.empty(B * H, TP, C, dtype=acc, device=q.device)
    _launch(
        "_wy_bwd_da_kernel", (NT, B * H), interp, k, v, beta, b, b if R is None else R, TI, dW, DU, DA, dv,
        dbeta, T, TP, H=H, GQ=GQ, GATED=gated, RESETS=R is not None, **cfg["_wy_bwd_da_kernel"],
    )
    _launch(
        "_wy_bwd_dk_kernel", (NT, B * H), interp, k, beta, b, b if R is None else R, TI, dW, DA, dk, dbeta,
        dG, T, TP, NKB, H=H, GQ=GQ, GATED=gated, RESETS=R is not None, **cfg["_wy_bwd_dk_kernel"],
    )
    dg = None
    if gated and need_g:
        # dL/db summed over the Dk blocks and the WY terms, then db_t/dg_s = 1 for s <= t in the chunk
        db = dG.sum(0).view(B, H, NT, C)
        dg = db.flip(-1).cumsum(-1).flip(-1).reshape(B, H, TP)[:, :, :T]
        if R is not None:  # a reset's gate (-inf) has gradient 0
            dg = dg.masked_fill(torch.isneginf(g), 0.0)
    if GQ > 1:  # a kv head's gradient is the sum over the query heads reading it
        dk = dk.view(B, Hkv, GQ, T, Dk).sum(2)
        dv = dv.view(B, Hkv, GQ, T, Dv).sum(2)
    return dq, dk, dv, dg, dbeta, (DS0 if need_s0 else None)


class TritonDelta(torch.autograd.Function):
    """The delta rule's Triton kernels as one autograd node; saves the inputs (the WY form and the per-chunk
    states are recomputed by the backward)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale: float, C: int, interpret: bool | None):
        out, final = delta_forward(q, k, v, g, beta, scale, initial_state, C, interpret)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.scale, ctx.C, ctx.interpret = scale, C, interpret
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        q, k, v, g, beta, s0 = ctx.saved_tensors
        do = output_grad(do, q, v)
        need_g = g is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dg, dbeta, ds0 = delta_backward(
            q, k, v, g, beta, ctx.scale, s0, do, dS_T, ctx.C, need_g, ctx.needs_input_grad[5], ctx.interpret,
        )
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype) if dg is not None else None,
            dbeta.to(beta.dtype), ds0, None, None, None,
        )


def run(q, k, v, g, beta, scale: float, initial_state, C: int, interpret: bool | None = None):
    """The delta rule on the Triton kernels (the interpreter for CPU tensors, unless ``interpret`` says otherwise:
    the offline GPU check compiles them natively). ``q`` ``[B, H, T, Dk]``, ``k``, ``v`` with Hkv heads (H a
    multiple of Hkv), one dtype; ``g`` ``[B, H, T]`` log gates or None (no gate), ``beta`` ``[B, H, T]``, the
    initial state ``[B, H, Dk, Dv]`` or None, all three in the compute dtype. Returns (out, final state)."""
    if q.shape[-1] > MAX_DK:
        configs(q.shape[-1], v.shape[-1], C, q.dtype)  # raises the SpecError naming the limit
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = g.contiguous() if g is not None else None
    return TritonDelta.apply(q, k, v, g, beta, initial_state, scale, C, interpret)


__all__ = [
    "MAX_DK",
    "TritonDelta",
    "available",
    "configs",
    "delta_backward",
    "delta_forward",
    "kernels",
    "run",
]
