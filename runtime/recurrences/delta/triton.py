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
  and the gate terms ``sum_c (q dq - k dk)`` (plus the chunk's last-gate terms), taken before a token's own pair
  is added to dq and dk (it cancels in them exactly);
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
    block_chunk_program,
    chunk_program,
    chunk_rows,
    chunk_square,
    decay_matrix,
    dim_tile,
    enter_chunk,
    in_dim,
    kv_head,
    load_rows,
    load_state,
    mm,
    state_block,
    state_tiles_t,
    store_rows,
    store_state,
    tile_sum,
    tl,
    to_acc,
    triton,
    unit_lower_inverse,
    value_block,
    value_program,
    value_sums,
)
from ..library.host import ChunkedFunction, KernelTable, available, block_size
from ..library.wy import wy_corrected, wy_state_dh, wy_state_du, wy_value_grads, wy_values
from . import wy_launch

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


def _qk_products(A, B, a_bh, b_bh, rows, r_ok, T, DK: tl.constexpr, BK: tl.constexpr, C: tl.constexpr,
                 F64: tl.constexpr, DOT: tl.constexpr):
    """``A B^T`` of a chunk (``[C, C]``; rows of ``A`` at head ``a_bh``, of ``B`` at ``b_bh``) over the Dk blocks:
    ``Q K^T`` as ``_qk_products(Q, K, i_bh, kv_bh, ...)``, ``K Q^T`` with the two swapped."""
    P = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        a = load_rows(A + a_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        b = load_rows(B + b_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        P += mm(a, tl.trans(b), DOT)
    return P


# ======================================================================= kernels (undecorated)
def _wy_fwd_kernel(
    K, V, BETA, G, R, W, U0, TI, T, TP, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr,
    STORE_T: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head): ``T = (I + A)^-1``, ``W = T diag(beta e) K``, ``U0 = T diag(beta) V``
    (stored per query head in W's dtype; T in the compute dtype when ``STORE_T``)."""
    i_bh, kv_bh, c0, t_off, rows, r_ok = chunk_program(H, GQ, C, T)
    k_base = K + kv_bh * T * DK
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    KK = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
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
        k_off, k_ok = dim_tile(k0, DK, BK)
        k = load_rows(k_base, rows, r_ok, k_off, k_ok, DK)
        store_rows(W + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, mm(Xc, (k * kw[:, None]).to(k.dtype), DOT))
    wy_values(V, U0, Xc, beta, i_bh, kv_bh, rows, r_ok, T, DV, BV, DOT)


def _state_fwd_kernel(
    K, W, U0, G, R, S0, HS, UN, ST, T, TP, NT, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BKD: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr,
    RESETS: tl.constexpr, HAS_S0: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, batch x head) walking the chunks: stores ``h_n`` (the state entering chunk n,
    ``HS[bh, n]``), ``U = U0 - W h_n`` (``UN``), then ``S <- exp(b_last) S + (diag(el) K)^T U``; the final state
    in ``ST``. The state block is ``[BKD, BV]`` with BKD covering the whole key head dim."""
    i_bh, t_off, kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_program(H, GQ, DK, DV, BKD, BV, C)
    S = state_block(S0, i_bh, sv_off, sv_ok, HAS_S0, DK, DV, BKD, BV, F64)
    for n in range(0, NT):
        c0, rows, r_ok = enter_chunk(HS, S, i_bh, n, NT, sv_off, sv_ok, C, T, DK, DV, False)
        u = wy_corrected(W, U0, UN, S, i_bh, rows, r_ok, k_off, k_ok, v_off, v_ok, T, DK, DV, F64, DOT)
        b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        kel = (k * el[:, None]).to(k.dtype)
        S = S * d + mm(tl.trans(kel), u.to(k.dtype), DOT)
    store_state(ST, i_bh, S, sv_off, sv_ok, DK, DV)


def _out_kernel(
    Q, K, UN, G, R, HS, OUT, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr,
    RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): ``O = scale (diag(e) Q h_n + tril(Q K^T * E) U)``."""
    i_v, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, GQ, C, T)
    v_off, v_ok = dim_tile(i_v * BV, DV, BV)
    h_base = HS + (i_bh * NT + n) * DK * DV
    o = acc_zeros([C, BV], F64)
    P = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        o += mm(q, load_state(h_base, k_off, k_ok, v_off, v_ok, DV).to(q.dtype), DOT)
        P += mm(q, tl.trans(k), DOT)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    u = load_rows(UN + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    P = P * decay_matrix(b, rs, t_off, False, RESETS)
    o = (o * e[:, None] + mm(P.to(Q.dtype.element_ty), u.to(Q.dtype.element_ty), DOT)) * scale
    store_rows(OUT + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, o)


def _bwd_du_local_kernel(
    Q, K, G, R, DO, DU, T, TP, scale, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dv block, chunk, batch x head): the chunk-local part of dU, ``scale tril(Q K^T * E)^T dO``,
    into ``DU`` (out of the sequential pass, which held Q K^T besides its state at Dk = 128 and spilled)."""
    i_v, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, GQ, C, T)
    v_off, v_ok = dim_tile(i_v * BV, DV, BV)
    Pt = _qk_products(K, Q, kv_bh, i_bh, rows, r_ok, T, DK, BK, C, F64, DOT)  # [s, t]
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    Pt = Pt * tl.trans(decay_matrix(b, rs, t_off, False, RESETS)) * scale
    do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    store_rows(DU + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, mm(Pt.to(do.dtype), do, DOT))


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
    i_bh, t_off, kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_program(H, GQ, DK, DV, BKD, BV, C)
    dh = state_block(DST, i_bh, sv_off, sv_ok, HAS_DST, DK, DV, BKD, BV, F64)
    for i in range(0, NT):
        c0, rows, r_ok = enter_chunk(DHS, dh, i_bh, i, NT, sv_off, sv_ok, C, T, DK, DV, True)
        q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
        kel = (k * el[:, None]).to(k.dtype)
        du = wy_state_du(DU, dh, kel, i_bh, rows, r_ok, v_off, v_ok, T, DV, DOT)
        qe = (q * (e * scale)[:, None]).to(q.dtype)
        dh = wy_state_dh(W, dh * d, qe, do, du, i_bh, rows, r_ok, k_off, k_ok, T, DK, DOT)
    if STORE_DS0:
        store_state(DS0, i_bh, dh, sv_off, sv_ok, DK, DV)


def _bwd_dqk_kernel(
    Q, K, UN, G, R, DO, HS, DHS, DU, DQ, DKP, DW, DG, T, TP, NT, scale, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
    GATED: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (Dk block, chunk, batch x head), with ``dP = scale (dO U^T) * E`` (causal):
    ``dq = scale diag(e) dO h_n^T + dP K``, ``dk = diag(el) U dh_n^T + dP^T Q`` (through O and S'; per query
    head), ``dW = -dU h_n^T``, and the cumulative gates' gradient ``sum_c (q dq - k dk)``, plus on the chunk's last
    row ``sum (k diag(el) U dh_n^T) + exp(b_last) sum(h_n dh_n)`` (per Dk block: ``DG[i_k]``)."""
    i_k, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, GQ, C, T)
    k_off, k_ok = dim_tile(i_k * BK, DK, BK)
    hs_off = (i_bh * NT + n) * DK * DV
    dP, dq, dks, dw, hdh = value_sums(DO, UN, DU, HS, DHS, i_bh, hs_off, rows, r_ok, k_off, k_ok, T, DV, BV, C,
                                      BK, GATED, F64, DOT)
    q = load_rows(Q + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    dP = dP * decay_matrix(b, rs, t_off, False, RESETS) * scale
    # a token's own pair (dP_tt k_t in dq, dP_tt q_t in dk, its decay exp(0) = 1) cancels exactly in the gates' term
    # q dq - k dk; under strong decay it is all there is of size in dq and dk, so the term is taken without it (its
    # rounding in the sums was the whole gradient) and the pair added after
    own = tile_sum(tl.where(t_off[:, None] == t_off[None, :], dP, 0.0), 1)
    dP = tl.where(t_off[:, None] > t_off[None, :], dP, 0.0)
    dks = dks * el[:, None]
    dq = dq * (e * scale)[:, None] + mm(dP.to(k.dtype), k, DOT)
    dk = dks + mm(tl.trans(dP.to(q.dtype)), q, DOT)
    qf = to_acc(q, F64)
    kf = to_acc(k, F64)
    if GATED:
        dg = tile_sum(qf * dq - kf * dk, 1)
        last = tile_sum(tile_sum(kf * dks, 1), 0) + d * tile_sum(hdh, 0)
        dg += tl.where(t_off == C - 1, last, 0.0)
        tl.store(DG + (i_k * tl.num_programs(2) + i_bh) * TP + c0 + t_off, dg.to(DG.dtype.element_ty))
    dq += own[:, None] * kf
    dk += own[:, None] * qf
    store_rows(DQ + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, dq)
    store_rows(DKP + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, dk)
    store_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK, dw)


def _wy_bwd_da_kernel(
    K, V, BETA, G, R, TI, DW, DU, DA, DV_, DBETA, T, TP, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr,
    DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, RB: tl.constexpr,
    GATED: tl.constexpr, RESETS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head), through the WY form (``dU0 = dU``): ``dT = dW (diag(beta e) K)^T +
    dU (diag(beta) V)^T`` and ``dA = -strict(T^T dT T^T) * E`` (stored, ``[C, C]`` per chunk); ``dv = diag(beta)
    T^T dU`` and the rate's term ``sum_c (T^T dU)_tc v_tc``."""
    i_bh, kv_bh, c0, t_off, rows, r_ok = chunk_program(H, GQ, C, T)
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    kw = beta * e
    cc_base = (i_bh * TP + c0) * C
    # T^T loaded transposed: both products with it take it as it is (no register transposes)
    Xt = chunk_square(TI, cc_base, t_off, t_off, C, True).to(K.dtype.element_ty)
    dT = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        dw = load_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK).to(k.dtype)
        dT += mm(dw, tl.trans((k * kw[:, None]).to(k.dtype)), DOT)
    dT, dbeta = wy_value_grads(V, DU, DV_, Xt, beta, dT, i_bh, kv_bh, rows, r_ok, T, DV, BV, C, F64, DOT)
    # dA in blocks of RB rows (whole-chunk products of three [C, C] tiles spilled on sm_80): rows r of T^T, loaded
    # transposed from memory, times dT times T^T
    dTc = dT.to(Xt.dtype)
    for r0 in range(0, C, RB):
        r_off = r0 + tl.arange(0, RB)
        Xr = chunk_square(TI, cc_base, r_off, t_off, C, True).to(Xt.dtype)
        dA = mm(mm(Xr, dTc, DOT).to(Xt.dtype), Xt, DOT)
        if GATED:
            br = to_acc(tl.load(G + i_bh * TP + c0 + r_off), F64)
        else:
            br = acc_zeros([RB], F64)
        m = r_off[:, None] > t_off[None, :]
        if RESETS:  # no reset in (s, r]
            m = m & (tl.load(R + i_bh * TP + c0 + r_off)[:, None] <= t_off[None, :])
        E = tl.exp(tl.where(m, br[:, None] - b[None, :], float("-inf")))
        tl.store(DA + cc_base + (r_off[:, None] * C + t_off[None, :]), (-dA * E).to(DA.dtype.element_ty))
    tl.store(DBETA + i_bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=r_ok)


def _wy_bwd_dk_kernel(
    K, BETA, G, R, TI, DW, DA, DKP, DBETA, DG, T, TP, NKB, H: tl.constexpr, GQ: tl.constexpr,
    DK: tl.constexpr, BK: tl.constexpr, C: tl.constexpr, GATED: tl.constexpr, RESETS: tl.constexpr,
    F64: tl.constexpr, DOT: tl.constexpr,
):
    """One program per (chunk, batch x head), with ``dA`` of ``_wy_bwd_da_kernel`` and ``Z = dA diag(beta)`` (rows):
    adds ``diag(beta e) T^T dW + Z K + Z^T K`` to dk, the rate's terms ``e_t sum_c (T^T dW)_tc k_tc + sum_c k_tc
    (dA K)_tc`` to dbeta, and stores the gates' terms (``DG[NKB]``)."""
    i_bh, kv_bh, c0, t_off, rows, r_ok = chunk_program(H, GQ, C, T)
    beta = to_acc(tl.load(BETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    b, rs, e, el, d = _chunk_gates(G, R, i_bh, c0, TP, t_off, C, GATED, RESETS, F64)
    kw = beta * e
    cc_base = (i_bh * TP + c0) * C  # a scalar 64-bit base, 32-bit offsets within the chunk's [C, C]
    Xc = chunk_square(TI, cc_base, t_off, t_off, C, False).to(K.dtype.element_ty)
    dA = chunk_square(DA, cc_base, t_off, t_off, C, False)
    dAc = dA.to(Xc.dtype)
    Zc = (dA * beta[:, None]).to(Xc.dtype)
    dbeta = to_acc(tl.load(DBETA + i_bh * T + rows, mask=r_ok, other=0.0), F64)
    dg = acc_zeros([C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        k = load_rows(K + kv_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
        dw = load_rows(DW + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK).to(k.dtype)
        dkb = mm(tl.trans(Xc), dw, DOT)
        dak = mm(dAc, k, DOT)
        ztk = mm(tl.trans(Zc), k, DOT)
        kf = to_acc(k, F64)
        s = tile_sum(dkb * kf, 1)
        dbeta += e * s + tile_sum(kf * dak, 1)
        dg += kw * s + tile_sum(kf * (dak * beta[:, None] - ztk), 1)
        dk_at = DKP + i_bh * T * DK
        dk = load_rows(dk_at, rows, r_ok, k_off, k_ok, DK) + dkb * kw[:, None] + dak * beta[:, None] + ztk
        store_rows(dk_at, rows, r_ok, k_off, k_ok, DK, dk)
    tl.store(DBETA + i_bh * T + rows, dbeta.to(DBETA.dtype.element_ty), mask=r_ok)
    if GATED:
        tl.store(DG + (NKB * tl.num_programs(1) + i_bh) * TP + rows, dg.to(DG.dtype.element_ty))


# ======================================================================= wrapping
_HELPERS = (acc_zeros, tile_sum, in_dim, mm, to_acc, _chunk_gates, _qk_products, decay_matrix, unit_lower_inverse,
            load_rows, store_rows, load_state, dim_tile, chunk_square, value_block, value_program, state_block,
            store_state, value_sums, state_tiles_t, kv_head, chunk_rows, chunk_program, block_chunk_program, wy_values,
            wy_corrected, wy_state_du, wy_state_dh,
            wy_value_grads, enter_chunk)
#: The kernel of each of ``wy_launch.PASSES``, in that order.
PASS_KERNELS = dict(wy=_wy_fwd_kernel, state=_state_fwd_kernel, out=_out_kernel, du_local=_bwd_du_local_kernel,
                    state_bwd=_state_bwd_kernel, dqk=_bwd_dqk_kernel, wy_da=_wy_bwd_da_kernel, wy_dk=_wy_bwd_dk_kernel)
_KERNELS = tuple(PASS_KERNELS.values())


#: The kernels jitted for the GPU (``kernels(False)``) or wrapped by Triton's interpreter (``kernels(True)``).
kernels = KernelTable(_HELPERS, _KERNELS, globals())


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


def _gates(g: torch.Tensor | None, beta: torch.Tensor, C: int) -> wy_launch.Gates:
    """The kernels' ``G, R`` (``_cumulative_gates``; ``R`` is ``G`` where no gate is -inf, unread) and their
    ``GATED`` / ``RESETS``; the gates' gradient terms per Dk block of the dq/dk pass and one for the WY pass
    (``[NKB + 1, B*H, TP]``), summed, then turned into the gates' gradient by a reverse cumulative sum in each
    chunk (``db_t / dg_s = 1`` for s <= t in the chunk)."""
    b, R, TP = _cumulative_gates(g, beta, C)

    def grad_buffer(B: int, H: int, Dk: int, NKB: int, acc, device):
        buffer = torch.empty(NKB + 1, B * H, TP, dtype=acc, device=device) if g is not None else None
        return buffer, (NKB,)

    def gate_grad(dG, g, B: int, H: int, T: int, C: int):
        dg = dG.sum(0).view(B, H, TP // C, C).flip(-1).cumsum(-1).flip(-1).reshape(B, H, TP)[:, :, :T]
        return dg.masked_fill(torch.isneginf(g), 0.0) if R is not None else dg  # a reset's gate (-inf): gradient 0

    return wy_launch.Gates((b, b if R is None else R), dict(GATED=g is not None, RESETS=R is not None), TP, grad_buffer,
                           gate_grad)


#: This form's kernels by pass, for ``wy_launch``.
WY_KERNELS = wy_launch.WYKernels(kernels, {step: fn.__name__ for step, fn in PASS_KERNELS.items()}, configs, _gates)


def run(q, k, v, g, beta, scale: float, initial_state, C: int, interpret: bool | None = None):
    """The delta rule on the Triton kernels (the interpreter for CPU tensors, unless ``interpret`` says otherwise:
    the offline GPU check compiles them natively). ``q`` ``[B, H, T, Dk]``, ``k``, ``v`` with Hkv heads (H a
    multiple of Hkv), one dtype; ``g`` ``[B, H, T]`` log gates or None (no gate), ``beta`` ``[B, H, T]``, the
    initial state ``[B, H, Dk, Dv]`` or None, all three in the compute dtype. Returns (out, final state)."""
    if q.shape[-1] > MAX_DK:
        configs(q.shape[-1], v.shape[-1], C, q.dtype)  # raises the SpecError naming the limit
    q, k, v, beta = (x.contiguous() for x in (q, k, v, beta))
    g = g.contiguous() if g is not None else None
    options = dict(scale=scale, C=C, interpret=interpret)
    return ChunkedFunction.apply(WY_KERNELS, options, q, k, v, g, beta, initial_state)


__all__ = [
    "MAX_DK",
    "WY_KERNELS",
    "available",
    "configs",
    "kernels",
    "run",
]
