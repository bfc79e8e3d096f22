"""Triton kernels of Kimi Delta Attention (the delta rule with one log gate per token, head and key
channel), forward and backward, in the structure of flash-linear-attention's ``chunk_kda``. The math
is that of ``runtime.recurrences.delta.chunk`` with a per-channel gate: per chunk of C tokens, ``b``
the in-chunk cumulative log gates ``[C, Dk]``, ``e = exp(b)``, ``el = exp(b_last - b)``,
``d = exp(b_last)`` (``[Dk]``) and the in-chunk products with per-channel decays

    M_ts = sum_c k_tc k_sc exp(b_tc - b_sc) (s < t),   P_ts = sum_c q_tc k_sc exp(b_tc - b_sc) (s <= t)
    A = diag(beta) M,  T = (I + A)^-1,  W = T diag(beta) (K * e),  U0 = T diag(beta) V
    U = U0 - W S,  O = scale ((Q * e) S + P U),  S' = diag(d) S + (K * el)^T U

with S the state entering the chunk. M and P are those of per-channel (GLA) gates in
``runtime.recurrences.library.device`` (``vec_intra``): sub-chunks of ``SUB`` rows, the off-diagonal
sub-chunk blocks tensor-core dots of rows rescaled against a sub-chunk boundary (both exponents spans
of log decays, never positive), the diagonal blocks exact elementwise sums; the gates are that
``library.gates.ChunkGates`` arrays (split prefix sums and the last hard reset), so a gate of -inf (a
hard reset of that key channel) is exact and its gradient 0. The kernels, in the order of
``runtime.recurrences.delta.triton``'s (whose docstring gives the backward's algebra):

- ``_kda_wy_fwd_kernel`` (chunk, batch x head): M, the inverse T (stored for the backward), W, U0;
- ``_kda_state_fwd_kernel`` (Dv block, batch x head), sequential: ``h_n``, ``U``, the final state;
- ``_kda_out_kernel`` (Dv block, chunk, batch x head): O;
- ``_kda_du_local_kernel`` (Dv block, chunk, batch x head): ``dU = scale P^T dO`` (chunk-local part);
- ``_kda_state_bwd_kernel`` (Dv block, batch x head), sequential in reverse: ``dh_n``, the rest of
  ``dU`` (``(K * el) dh_n``), ``dh <- diag(d) dh + scale (Q * e)^T dO - W^T dU``, the initial state's
  gradient;
- ``_kda_dqk_kernel`` (Dk block, chunk, batch x head): dq, dk through O and S', ``dW = -dU h_n^T`` and
  the cumulative gates' gradient ``q dq - k dk`` (plus the last row's terms of ``d`` and ``el``);
- ``_kda_wy_da_kernel`` (chunk, batch x head): ``dT``, ``dA = -strict(T^T dT T^T)``, dv, the rate's
  value term; ``_kda_wy_dk_kernel`` (chunk, batch x head): through ``W`` and ``M`` into dk, dbeta and
  the gates (``dM = diag(beta) dA``, both of M's factors being k).

The gradient of the cumulative gates (per channel, no sum over Dk blocks) becomes the gates' by a
reverse cumulative sum inside each chunk on the host. Dots run on the tensor cores in the input dtype
(bf16 / fp16) with fp32 accumulation, fp32 inputs exact (no TF32), fp64 in the interpreter; GQA
reads k, v of kv head ``h // (H // Hkv)`` by index. The offline compile check is ``attnc check-gpu
stdlib:kda`` (``runtime.gpu_check``).
"""


import torch

from ....compiler.cost.recurrence_cost import VECTOR_CHUNK, VECTOR_SUB_CHUNK
from ....core.errors import SpecError
from ..library.device import (
    acc_zeros,
    block_chunk_program,
    chunk_program,
    chunk_rows,
    chunk_square,
    dim_tile,
    enter_chunk,
    gate_rows,
    gate_span,
    head_gate,
    in_dim,
    kv_head,
    load_gates,
    load_rows,
    load_state,
    mm,
    own_pairs,
    state_block,
    state_tiles_t,
    store_rows,
    store_state,
    tile_sum,
    tl,
    to_acc,
    unit_lower_inverse,
    value_block,
    value_program,
    value_sums,
    vec_gate_factor,
    vec_intra,
)
from ..library.host import VECTOR_BLOCK, ChunkedFunction, KernelTable, block_size, gate_arrays
from ..library.wy import wy_corrected, wy_state_dh, wy_state_du, wy_value_grads, wy_values
from . import wy_launch
from .triton import MAX_DK

#: The chunk of the kernels (sub-chunks of ``VECTOR_SUB_CHUNK`` rows inside), as flash-linear-attention's.
KDA_CHUNK = VECTOR_CHUNK


# ======================================================================= helpers (undecorated)
def _kda_intra_grad(dq, dk, dAq, dAk, q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off,
                    k_ok, DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr):
    """``dq_t += sum_j dAq_tj exp(b_t - b_j) k_j`` and ``dk_j += sum_t dAk_tj exp(b_t - b_j) q_t`` over
    ``j <= t`` (``[C, BK]``; ``dAq``, ``dAk`` ``[C(t), C(j)]``, their entries above the diagonal unread):
    the gradients of ``A_tj = sum_c q_tc k_jc exp(b_tc - b_jc)`` when ``dAq = dAk = dA``, as
    ``decay.triton._vec_intra_grad``; two matrices, because ``M = K K^T`` takes ``dA`` for its rows and
    ``diag(beta) dA`` for its columns. Off-diagonal sub-chunk blocks on the tensor cores (dq: reference at
    the first row of the query's sub-chunk; dk: at the last row of the key's), diagonal ones exact."""
    hi, lo, rs = load_gates(GH, GL, GR, i_bh, c0, TP, t_off, k_off, k_ok, DK, 2)
    for i in range(1, C // SUB):  # dq of sub-chunk i from the keys before it
        r = i * SUB
        hr, lr, rr = load_gates(GH, GL, GR, i_bh, c0, TP, tl.full([1], r, tl.int32), k_off, k_ok, DK, 2)
        ek = vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, 0, r, r, False)
        part = mm(dAq.to(k.dtype), (k * ek).to(k.dtype), DOT)
        dq += vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r, r + SUB, r, True) * part
    for i in range(0, C // SUB - 1):  # dk of sub-chunk i from the queries after it
        r = i * SUB + SUB - 1
        hr, lr, rr = load_gates(GH, GL, GR, i_bh, c0, TP, tl.full([1], r, tl.int32), k_off, k_ok, DK, 2)
        eq = vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r + 1, C, r, True)
        part = mm(tl.trans(dAk.to(q.dtype)), (q * eq).to(q.dtype), DOT)
        dk += vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r + 1 - SUB, r + 1, r, False) * part
    for u in range(0, SUB):  # the diagonal blocks: per row, the row p of its own sub-chunk
        pl = (t_off // SUB) * SUB + u
        rows_p = c0 + pl
        p_ok = (rows_p < T)[:, None] & k_ok[None, :]
        hp, lp, rp = load_gates(GH, GL, GR, i_bh, c0, TP, pl, k_off, k_ok, DK, 2)
        kp = tl.load(k_base + rows_p[:, None] * DK + k_off[None, :], mask=p_ok, other=0.0)
        w = tile_sum(tl.where(t_off[None, :] == pl[:, None], dAq, 0.0), 1)  # dAq[t, p]
        e = tl.exp(tl.where((pl <= t_off)[:, None] & (rs <= pl[:, None]), gate_span(hi, lo, hp, lp),
                            float("-inf")))
        dq += (w[:, None] * e) * kp.to(e.dtype)
        qp = tl.load(q_base + rows_p[:, None] * DK + k_off[None, :], mask=p_ok, other=0.0)
        w = tile_sum(tl.where(t_off[:, None] == pl[None, :], dAk, 0.0), 0)  # dAk[p, t]
        e = tl.exp(tl.where((pl >= t_off)[:, None] & (rp <= t_off[:, None]), gate_span(hp, lp, hi, lo),
                            float("-inf")))
        dk += (w[:, None] * e) * qp.to(e.dtype)
    return dq, dk


def _kda_gated_products(Q, K, GH, GL, GR, i_bh, kv_bh, c0, rows, r_ok, t_off, T, TP, DK: tl.constexpr,
                        BK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """``P_ts = sum_c q_tc k_sc exp(b_tc - b_sc)`` (s <= t) of a chunk over the Dk blocks (``vec_intra``)."""
    q_base = Q + i_bh * T * DK
    k_base = K + kv_bh * T * DK
    P = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        q = load_rows(q_base, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        P += vec_intra(q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok, DK, C, SUB, DOT, F64)
    return P


# ======================================================================= kernels (undecorated)
def _kda_wy_fwd_kernel(K, V, BETA, GH, GL, GR, W, U0, TI, T, TP, H: tl.constexpr, GQ: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                       C: tl.constexpr, SUB: tl.constexpr, STORE_T: tl.constexpr, F64: tl.constexpr,
                       DOT: tl.constexpr):
    """One program per (chunk, batch x head): ``T = (I + diag(beta) M)^-1``, ``W = T diag(beta) (K * e)``,
    ``U0 = T diag(beta) V`` (per query head, in W's dtype; T in the compute dtype when ``STORE_T``)."""
    i_bh, kv_bh, c0, t_off, rows, r_ok = chunk_program(H, GQ, C, T)
    k_base = K + kv_bh * T * DK
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    M = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        M += vec_intra(k, k, k_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok, DK, C,
                        SUB, DOT, F64)
    A = tl.where(t_off[:, None] > t_off[None, :], M, 0.0) * beta[:, None]
    X = unit_lower_inverse(A, t_off, C)
    if STORE_T:
        tl.store(TI + (i_bh * TP + c0) * C + (t_off[:, None] * C + t_off[None, :]),
                 X.to(TI.dtype.element_ty))
    Xc = X.to(K.dtype.element_ty)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
        store_rows(W + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, mm(Xc, (k * (eb * beta[:, None])).to(k.dtype), DOT))
    wy_values(V, U0, Xc, beta, i_bh, kv_bh, rows, r_ok, T, DV, BV, DOT)


def _kda_state_fwd_kernel(K, W, U0, GH, GL, GR, S0, HS, UN, ST, T, TP, NT, H: tl.constexpr,
                          GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BKD: tl.constexpr,
                          BV: tl.constexpr, C: tl.constexpr, HAS_S0: tl.constexpr, F64: tl.constexpr,
                          DOT: tl.constexpr):
    """One program per (Dv block, batch x head) walking the chunks: stores ``h_n`` (``HS[bh, n]``),
    ``U = U0 - W h_n`` (``UN``), then ``S <- diag(d) S + (K * el)^T U``; the final state in ``ST``."""
    i_bh, t_off, kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_program(H, GQ, DK, DV, BKD, BV, C)
    S = state_block(S0, i_bh, sv_off, sv_ok, HAS_S0, DK, DV, BKD, BV, F64)
    for n in range(0, NT):
        c0, rows, r_ok = enter_chunk(HS, S, i_bh, n, NT, sv_off, sv_ok, C, T, DK, DV, False)
        u = wy_corrected(W, U0, UN, S, i_bh, rows, r_ok, k_off, k_ok, v_off, v_ok, T, DK, DV, F64, DOT)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
        S = S * dec[:, None] + mm(tl.trans((k * ebl).to(k.dtype)), u.to(k.dtype), DOT)
    store_state(ST, i_bh, S, sv_off, sv_ok, DK, DV)


def _kda_out_kernel(Q, K, UN, GH, GL, GR, HS, OUT, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, SUB: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """One program per (Dv block, chunk, batch x head): ``O = scale ((Q * e) h_n + P U)``."""
    i_v, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, GQ, C, T)
    v_off, v_ok = dim_tile(i_v * BV, DV, BV)
    q_base = Q + i_bh * T * DK
    k_base = K + kv_bh * T * DK
    h_base = HS + (i_bh * NT + n) * DK * DV
    o = acc_zeros([C, BV], F64)
    P = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        q = load_rows(q_base, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        hn = load_state(h_base, k_off, k_ok, v_off, v_ok, DV)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
        o += mm((q * eb).to(q.dtype), hn.to(q.dtype), DOT)
        P += vec_intra(q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok, DK, C,
                        SUB, DOT, F64)
    u = load_rows(UN + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    o = (o + mm(P.to(Q.dtype.element_ty), u.to(Q.dtype.element_ty), DOT)) * scale
    store_rows(OUT + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, o)


def _kda_du_local_kernel(Q, K, GH, GL, GR, DO, DU, T, TP, scale, H: tl.constexpr, GQ: tl.constexpr,
                         DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                         C: tl.constexpr, SUB: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """One program per (Dv block, chunk, batch x head): the chunk-local part of dU, ``scale P^T dO``."""
    i_v, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, GQ, C, T)
    v_off, v_ok = dim_tile(i_v * BV, DV, BV)
    P = _kda_gated_products(Q, K, GH, GL, GR, i_bh, kv_bh, c0, rows, r_ok, t_off, T, TP, DK, BK, C, SUB, F64, DOT)
    do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    store_rows(DU + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, mm(tl.trans((P * scale).to(do.dtype)), do, DOT))


def _kda_state_bwd_kernel(Q, K, W, GH, GL, GR, DO, DST, DHS, DU, DS0, T, TP, NT, scale,
                          H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                          BKD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, HAS_DST: tl.constexpr,
                          STORE_DS0: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """One program per (Dv block, batch x head) walking the chunks backwards from ``dh = dS_T``: stores
    ``dh_n`` (the gradient of the state leaving chunk n) and ``dU`` (``DU`` holds its chunk-local part; adds
    ``(K * el) dh_n``), then ``dh <- diag(d) dh + scale (Q * e)^T dO - W^T dU``; the initial state's
    gradient in ``DS0``."""
    i_bh, t_off, kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_program(H, GQ, DK, DV, BKD, BV, C)
    dh = state_block(DST, i_bh, sv_off, sv_ok, HAS_DST, DK, DV, BKD, BV, F64)
    for i in range(0, NT):
        c0, rows, r_ok = enter_chunk(DHS, dh, i_bh, i, NT, sv_off, sv_ok, C, T, DK, DV, True)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
        du = wy_state_du(DU, dh, (k * ebl).to(k.dtype), i_bh, rows, r_ok, v_off, v_ok, T, DV, DOT)
        q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        qe = (q * (eb * scale)).to(q.dtype)
        dh = wy_state_dh(W, dh * dec[:, None], qe, do, du, i_bh, rows, r_ok, k_off, k_ok, T, DK, DOT)
    if STORE_DS0:
        store_state(DS0, i_bh, dh, sv_off, sv_ok, DK, DV)


def _kda_dqk_kernel(Q, K, UN, GH, GL, GR, DO, HS, DHS, DU, DQ, DKP, DW, DG, T, TP, NT, scale,
                    H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr,
                    F64: tl.constexpr, DOT: tl.constexpr):
    """One program per (Dk block, chunk, batch x head), with ``dP = scale dO U^T`` (causal): ``dq = scale
    (dO h_n^T) * e + dP through P``, ``dk = (U dh_n^T) * el + dP^T through P`` (per query head), ``dW =
    -dU h_n^T``, and the cumulative gates' gradient ``q dq - k dk``, plus on the chunk's last row
    ``sum_t k (U dh_n^T) el + d sum_v h_n dh_n`` (``DG``, ``[B*H, TP, Dk]``)."""
    i_k, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, GQ, C, T)
    k_off, k_ok = dim_tile(i_k * BK, DK, BK)
    hs_off = (i_bh * NT + n) * DK * DV
    own = own_pairs(DO, UN, i_bh, rows, r_ok, T, DV, BV, C, F64) * scale
    dP, dq, dks, dw, hdh = value_sums(DO, UN, DU, HS, DHS, i_bh, hs_off, rows, r_ok, k_off, k_ok, T, DV, BV, C,
                                      BK, True, F64, DOT)
    q_base = Q + i_bh * T * DK
    k_base = K + kv_bh * T * DK
    q = load_rows(q_base, rows, r_ok, k_off, k_ok, DK)
    k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
    # dW and the last row's gate terms first: fewer tiles live through the in-chunk gradient
    store_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, dw)
    eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
    kf = to_acc(k, F64)
    dks = dks * ebl
    last = tile_sum(kf * dks, 0) + dec * hdh
    # a token's own pair (dP_tt k_t in dq, dP_tt q_t in dk, its decay exp(0) = 1) cancels exactly in the gates' term
    # q dq - k dk; under strong decay it is all there is of size in dq and dk, so the term is taken without it (its
    # rounding in the sums was the whole gradient) and the pair added after (its weight ``own``, summed from dO and
    # U on its own: taken from dP's diagonal here, the sm_80 d 128 kernel spilled 40 B)
    dP = tl.where(t_off[:, None] > t_off[None, :], dP * scale, 0.0)
    dq, dk = _kda_intra_grad(dq * eb * scale, dks, dP, dP, q, k, q_base, k_base, GH, GL, GR, i_bh, c0,
                             T, TP, t_off, k_off, k_ok, DK, C, SUB, DOT)
    qf = to_acc(q, F64)
    db = qf * dq - kf * dk
    db += tl.where((t_off == C - 1)[:, None], last[None, :], 0.0)
    tl.store(DG + (i_bh * TP + c0) * DK + t_off[:, None] * DK + k_off[None, :],
             db.to(DG.dtype.element_ty), mask=k_ok[None, :])
    store_rows(DQ + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, dq + own[:, None] * kf)
    store_rows(DKP + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, dk + own[:, None] * qf)


def _kda_wy_da_kernel(K, V, BETA, GH, GL, GR, TI, DW, DU, DA, DV_, DBETA, T, TP, H: tl.constexpr,
                      GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, C: tl.constexpr, RB: tl.constexpr, F64: tl.constexpr,
                      DOT: tl.constexpr):
    """One program per (chunk, batch x head), through the WY form (``dU0 = dU``): ``dT = dW (diag(beta)
    (K * e))^T + dU (diag(beta) V)^T``, ``dA = -strict(T^T dT T^T)`` (stored, ``[C, C]`` per chunk),
    ``dv = diag(beta) T^T dU`` and the rate's term ``sum_c (T^T dU)_tc v_tc``."""
    i_bh, kv_bh, c0, t_off, rows, r_ok = chunk_program(H, GQ, C, T)
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    cc_base = (i_bh * TP + c0) * C
    # T^T loaded transposed: both products with it take it as it is (no register transposes)
    Xt = chunk_square(TI, cc_base, t_off, t_off, C, True).to(K.dtype.element_ty)
    dT = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        dw = load_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK).to(k.dtype)
        dT += mm(dw, tl.trans((k * (eb * beta[:, None])).to(k.dtype)), DOT)
    dT, dbeta = wy_value_grads(V, DU, DV_, Xt, beta, dT, i_bh, kv_bh, rows, r_ok, T, DV, BV, C, F64, DOT)
    # dA in blocks of RB rows (as the gated rule's kernel: whole-chunk products of three [C, C] tiles
    # spill): rows r of T^T, loaded transposed, times dT times T^T
    dTc = dT.to(Xt.dtype)
    for r0 in range(0, C, RB):
        r_off = r0 + tl.arange(0, RB)
        Xr = chunk_square(TI, cc_base, r_off, t_off, C, True).to(Xt.dtype)
        dA = mm(mm(Xr, dTc, DOT).to(Xt.dtype), Xt, DOT)
        tl.store(DA + cc_base + (r_off[:, None] * C + t_off[None, :]),
                 tl.where(r_off[:, None] > t_off[None, :], -dA, 0.0).to(DA.dtype.element_ty))
    tl.store(DBETA + i_bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=r_ok)


def _kda_wy_dk_kernel(K, BETA, GH, GL, GR, TI, DW, DA, DKP, DBETA, DG, T, TP, H: tl.constexpr,
                      GQ: tl.constexpr, DK: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                      SUB: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """One program per (chunk, batch x head), with ``dA`` of ``_kda_wy_da_kernel``: ``dKb = T^T dW`` adds
    ``dKb * e * beta`` to dk; through ``M`` (``dM = diag(beta) dA``) ``X = dA through M's rows`` and
    ``Y = dM through its columns`` add ``beta X + Y`` to dk; the rate gains ``sum_c (dKb k e + k X)``, the
    cumulative gates ``beta (dKb k e + k X) - k Y`` (added to ``DG``)."""
    i_bh, kv_bh, c0, t_off, rows, r_ok = chunk_program(H, GQ, C, T)
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    cc_base = (i_bh * TP + c0) * C
    Xc = chunk_square(TI, cc_base, t_off, t_off, C, False).to(K.dtype.element_ty)
    dA = chunk_square(DA, cc_base, t_off, t_off, C, False)
    dM = dA * beta[:, None]
    dbeta = to_acc(tl.load(DBETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    k_base = K + kv_bh * T * DK
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, 0, c0, T, TP, t_off, k_off, k_ok, DK, C, 2, F64)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        dw = load_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK).to(k.dtype)
        dkb = mm(tl.trans(Xc), dw, DOT)
        X, Y = _kda_intra_grad(acc_zeros([C, BK], F64), acc_zeros([C, BK], F64), dA, dM, k, k, k_base, k_base, GH,
                               GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok, DK, C, SUB, DOT)
        kf = to_acc(k, F64)
        s = dkb * eb * kf + kf * X
        dbeta += tile_sum(s, 1)
        dk_at = DKP + i_bh * T * DK
        dk = load_rows(dk_at, rows, r_ok, k_off, k_ok, DK) + (dkb * eb + X) * beta[:, None] + Y
        store_rows(dk_at, rows, r_ok, k_off, k_ok, DK, dk)
        g_off = DG + (i_bh * TP + c0) * DK + t_off[:, None] * DK + k_off[None, :]
        db = tl.load(g_off, mask=k_ok[None, :], other=0.0) + s * beta[:, None] - kf * Y
        tl.store(g_off, db.to(DG.dtype.element_ty), mask=k_ok[None, :])
    tl.store(DBETA + i_bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=r_ok)


# ======================================================================= wrapping
_HELPERS = (acc_zeros, tile_sum, in_dim, mm, to_acc, head_gate, load_gates, gate_span, gate_rows, vec_gate_factor,
            vec_intra, _kda_intra_grad, _kda_gated_products, unit_lower_inverse, load_rows, store_rows, load_state,
            dim_tile, chunk_square, value_block, value_program, state_block, store_state, value_sums, state_tiles_t,
            kv_head, chunk_rows, chunk_program, block_chunk_program, wy_values, wy_corrected, wy_state_du, wy_state_dh,
            wy_value_grads, enter_chunk, own_pairs)
#: The kernel of each of ``wy_launch.PASSES``, in that order.
PASS_KERNELS = dict(wy=_kda_wy_fwd_kernel, state=_kda_state_fwd_kernel, out=_kda_out_kernel,
                    du_local=_kda_du_local_kernel, state_bwd=_kda_state_bwd_kernel, dqk=_kda_dqk_kernel,
                    wy_da=_kda_wy_da_kernel, wy_dk=_kda_wy_dk_kernel)
_KERNELS = tuple(PASS_KERNELS.values())


#: The kernels jitted for the GPU (``kernels(False)``) or wrapped by Triton's interpreter (``kernels(True)``).
kernels = KernelTable(_HELPERS, _KERNELS, globals())


def configs(Dk: int, Dv: int, C: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Per-kernel compile-time constants and launch options: what the launches use (``runtime.gpu_check``
    compiles those launches offline). The chunk-parallel kernels take Dk blocks of ``VECTOR_BLOCK`` (they
    hold ``[C, BK]`` gate tiles besides q and k, as the per-channel decay kernels do), the sequential ones
    the whole key head dim."""
    if Dk > MAX_DK:
        raise SpecError(f"the delta rule's Triton kernels support a key head dim up to {MAX_DK}, got {Dk}",
                        where="argument q", hint="use backend='cpu'")
    dot = 1 if dtype not in (torch.bfloat16, torch.float16) else (
        2 if interpret and dtype == torch.bfloat16 else 0)
    BKD = block_size(Dk, MAX_DK)
    BK, BV, BVs = block_size(Dk, VECTOR_BLOCK), block_size(Dv, 64), block_size(Dv, 32)
    common = dict(DK=Dk, DV=Dv, C=C, F64=dtype == torch.float64, DOT=dot)
    sub = dict(SUB=min(VECTOR_SUB_CHUNK, C))
    warps = 8 if C >= 64 else 4
    wide = BKD > 64
    par = dict(num_warps=warps, num_stages=1)
    return {
        "_kda_wy_fwd_kernel": dict(common, BK=BK, BV=BV, **sub, **par),
        "_kda_state_fwd_kernel": dict(common, BKD=BKD, BV=BVs, num_warps=8 if wide else 4, num_stages=1),
        "_kda_out_kernel": dict(common, BK=BK, BV=BV, **sub, **par),
        "_kda_du_local_kernel": dict(common, BK=BK, BV=BV, **sub, **par),
        "_kda_state_bwd_kernel": dict(common, BKD=BKD, BV=block_size(Dv, 16 if wide else 32), num_warps=warps,
                                      num_stages=1),
        "_kda_dqk_kernel": dict(common, BK=block_size(Dk, 16), BV=block_size(Dv, 32), **sub, **par),
        "_kda_wy_da_kernel": dict(common, BK=BK, BV=block_size(Dv, 32), RB=min(C, 16), **par),
        "_kda_wy_dk_kernel": dict(DK=Dk, C=C, F64=common["F64"], DOT=dot, BK=BK, **sub, **par),
    }


def _gates(g: torch.Tensor, beta: torch.Tensor, C: int) -> wy_launch.Gates:
    """The kernels' ``GH, GL, GR`` (``library.host.gate_arrays``: split prefix sums and the last reset per channel);
    the cumulative gates' gradient terms ``[B*H, TP, Dk]``, turned into the gates' gradient by a reverse cumulative
    sum in each chunk (``db_t / dg_s = 1`` for s <= t in the chunk; a reset's gate, -inf, has gradient 0)."""
    GH, GL, GR, TP = gate_arrays(g, C, 2)

    def grad_buffer(B: int, H: int, Dk: int, NKB: int, acc, device):
        return torch.empty(B * H, TP, Dk, dtype=acc, device=device), ()

    def gate_grad(DG, g, B: int, H: int, T: int, C: int):
        Dk = DG.shape[-1]
        dg = DG.view(B, H, TP // C, C, Dk).flip(-2).cumsum(-2).flip(-2).reshape(B, H, TP, Dk)[:, :, :T]
        return dg.masked_fill(torch.isneginf(g), 0.0)

    return wy_launch.Gates((GH, GL, GR), {}, TP, grad_buffer, gate_grad)


#: This form's kernels by pass, for ``wy_launch``.
WY_KERNELS = wy_launch.WYKernels(kernels, {step: fn.__name__ for step, fn in PASS_KERNELS.items()}, configs, _gates)


def run(q, k, v, g, beta, scale: float, initial_state, C: int = KDA_CHUNK, interpret: bool | None = None):
    """Kimi Delta Attention on the Triton kernels (the interpreter for CPU tensors unless ``interpret`` says
    otherwise). ``q`` ``[B, H, T, Dk]``, ``k``, ``v`` with Hkv heads (H a multiple of Hkv), one dtype; ``g``
    ``[B, H, T, Dk]`` log gates (finite or -inf), ``beta`` ``[B, H, T]``, the initial state ``[B, H, Dk, Dv]``
    or None, all three in the compute dtype. Returns (out, final state)."""
    configs(q.shape[-1], v.shape[-1], C, q.dtype)  # raises the SpecError naming a key head dim too large
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    options = dict(scale=scale, C=C, interpret=interpret)
    return ChunkedFunction.apply(WY_KERNELS, options, q, k, v, g, beta, initial_state)


__all__ = ["KDA_CHUNK", "WY_KERNELS", "configs", "kernels", "run"]
