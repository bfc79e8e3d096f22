"""Triton kernels of the chunked decay-gated recurrence in flash-linear-attention's structure, specialised on
the IR's gate kind (``GATE``: 0 a constant per head, 1 a scalar per token and head, 2 a vector per token,
head and key channel). The math is that of ``runtime.recurrences.runner`` (in-chunk cumulative log gates, so every
exponent is a sum of gates over a span inside one chunk and never positive for log decays):

- ``_state_kernel``, one program per (batch x head, Dk block, Dv block), is the only sequential part: it
  walks the chunks and stores the state entering each chunk, ``h_n`` (forward), or, walking backwards,
  the gradient of the state leaving each chunk, ``dh_n`` (backward), plus the final state / the initial
  state's gradient;
- ``_out_kernel``, one program per (Dv block, chunk, batch x head): ``o = scale (exp(b) q h_n + (q k^T * D) v)``
  with the intra-chunk decays ``D_tj = exp(b_t - b_j)`` (j <= t), looping over Dk blocks;
- ``_bwd_dv_kernel`` (Dv block, chunk, batch x head): ``dv = scale (q k^T * D)^T do + (k exp(b_last - b)) dh_n``;
- ``_bwd_dqk_kernel`` (Dk block, chunk, batch x head): ``dq``, ``dk`` from ``dP = do v^T``, ``do h_n^T``
  and ``v dh_n^T``, looping over Dv blocks;
- ``_gate_grad_kernel``: ``dg_t = sum_{s >= t} (q dq - k dk)_s + sum_e dS_T S_T`` (reverse sweep), the terms
  ``q dq - k dk`` taken by ``_bwd_dqk_kernel`` before it adds a token's own pair (which cancels in them exactly).

Dots run on the tensor cores in the input dtype (bf16 / fp16) with fp32 accumulation; fp32 inputs keep
``input_precision="ieee"`` (no TF32) and fp64 inputs fp64, so they stay as accurate as the torch path.
GQA reads k / v head ``h // G`` by index; dk and dv are accumulated per query head in fp32 and summed over
the group on the host. Per-channel (vector, GLA) gates run chunks of 64 split into sub-chunks of 16, as
flash-linear-attention does: the in-chunk product's off-diagonal sub-chunk blocks are tensor-core dots of q
and k rescaled against the sub-chunk boundary (both exponents <= 0), its diagonal blocks are exact
elementwise sums (``vec_intra`` forward, ``_vec_intra_grad`` for dq / dk; dv and the gate gradient follow).
The offline compile check of these kernels (registers, spills, tensor-core instructions) is
``runtime.gpu_check`` (``attnc check-gpu stdlib:gla``), on the launches this module makes.

The kernels are plain functions here; ``kernels(interpret)`` wraps them (and their helpers) with
``triton.jit`` for CUDA or with the interpreter for CPU tensors. Triton decides between the two when a
function is decorated (``triton.jit`` reads ``TRITON_INTERPRET`` at that moment), so both wrappings are
built explicitly, the jitted kernels over a copy of this module's globals holding the jitted helpers.
"""


import torch

from ....compiler.cost.recurrence_cost import VECTOR_CHUNK, VECTOR_SUB_CHUNK
from ....core.errors import SpecError
from ..library.device import (
    acc_zeros,
    block_chunk_program,
    chunk_rows,
    dim_tile,
    gate_rows,
    gate_span,
    head_gate,
    in_dim,
    kv_head,
    load_gates,
    load_rows,
    load_state,
    mm,
    state_tiles_t,
    store_rows,
    tile_sum,
    tl,
    triton,
    vec_gate_factor,
    vec_intra,
)
from ..library.host import (
    VECTOR_BLOCK,
    ChunkedFunction,
    KernelTable,
    available,
    block_size,
    gate_arrays,
    interprets,
)

GATE_CODES = {"head": 0, "scalar": 1, "vector": 2}
#: Largest Dk / Dv block of a program (the state block is BK x BV fp32 registers).
MAX_BLOCK = 64
#: Dk slice the scalar-gate gradient sweeps per step: it holds four [C, BK] fp64 tiles (q, dq, k, dk). At 64
#: the sweep spilled on sm_90 at Dk = 128 (Triton 3.9: 12 B, 96 registers); slices of 16 keep it at 48
#: registers, no spill, on sm_80 / sm_90, Dk 64 / 128, Triton 3.6 and 3.9 (``check-gpu stdlib:mamba2``).
SCALAR_GATE_BLOCK = 16


def _gate_pairs(GH, GL, GR, i_bh, h, c0, T, TP, t_off, DK: tl.constexpr, GATE: tl.constexpr, F64: tl.constexpr):
    """The intra-chunk decays ``exp(b_t - b_j)`` of head / scalar gates for ``j <= t`` (0 above and across a
    reset), ``[C(t), C(j)]``; each exponent is a span inside the chunk."""
    causal = t_off[:, None] >= t_off[None, :]
    if GATE == 0:
        gh = head_gate(GH, h, F64)
        nt = tl.minimum(t_off + 1, T - c0)
        steps = nt[:, None] - nt[None, :]
        E = tl.exp(tl.where(causal, tl.where(steps == 0, 0.0, gh * steps.to(gh.dtype)), float("-inf")))
    else:
        hi, lo, rs = load_gates(GH, GL, GR, i_bh, c0, TP, t_off, t_off, t_off >= 0, DK, GATE)
        span = gate_span(hi[:, None], lo[:, None], hi[None, :], lo[None, :])
        E = tl.exp(tl.where(causal & (rs[:, None] <= t_off[None, :]), span, float("-inf")))
    return E


def _vec_intra_grad(dq, dk, dA, q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok,
                    DK: tl.constexpr, C: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr):
    """``dq``, ``dk`` (``[C, BK]``) plus the gradients of the in-chunk product through ``dA`` (``[C(t), C(j)]``,
    fp32): ``dq_t += sum_j dA_tj exp(b_t - b_j) k_j`` and ``dk_j += sum_t dA_tj exp(b_t - b_j) q_t`` over
    ``j < t`` (a token's own pair is the caller's: ``_bwd_dqk_kernel``), with the sub-chunk factorisation (dq: reference at the first row of the query's sub-chunk;
    dk: at the last row of the key's sub-chunk, so that ``t > r >= j``)."""
    hi, lo, rs = load_gates(GH, GL, GR, i_bh, c0, TP, t_off, k_off, k_ok, DK, 2)
    dAc = dA.to(q.dtype)
    for i in range(1, C // SUB):  # dq of sub-chunk i from the keys before it
        r = i * SUB
        hr, lr, rr = load_gates(GH, GL, GR, i_bh, c0, TP, tl.full([1], r, tl.int32), k_off, k_ok, DK, 2)
        ek = vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, 0, r, r, False)
        part = mm(dAc, (k * ek).to(k.dtype), DOT)
        dq += vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r, r + SUB, r, True) * part
    for i in range(0, C // SUB - 1):  # dk of sub-chunk i from the queries after it
        r = i * SUB + SUB - 1
        hr, lr, rr = load_gates(GH, GL, GR, i_bh, c0, TP, tl.full([1], r, tl.int32), k_off, k_ok, DK, 2)
        eq = vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r + 1, C, r, True)
        part = mm(tl.trans(dAc), (q * eq).to(q.dtype), DOT)
        dk += vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r + 1 - SUB, r + 1, r, False) * part
    # the diagonal blocks, exact: per row, the row p = (row // SUB) * SUB + u of its own sub-chunk
    for u in range(0, SUB):  # dq_t += dA[t, p] exp(b_t - b_p) k_p for p < t (no reset in (p, t]; p = t: the caller)
        pl = (t_off // SUB) * SUB + u
        rows_p = c0 + pl
        hp, lp, rp = load_gates(GH, GL, GR, i_bh, c0, TP, pl, k_off, k_ok, DK, 2)
        kp = tl.load(k_base + rows_p[:, None] * DK + k_off[None, :], mask=(rows_p < T)[:, None] & k_ok[None, :],
                     other=0.0)
        w = tile_sum(tl.where(t_off[None, :] == pl[:, None], dA, 0.0), 1)
        e = tl.exp(tl.where((pl < t_off)[:, None] & (rs <= pl[:, None]), gate_span(hi, lo, hp, lp), float("-inf")))
        dq += (w[:, None] * e) * kp.to(e.dtype)
    for u in range(0, SUB):  # dk_j += dA[p, j] exp(b_p - b_j) q_p for p > j (no reset in (j, p]; p = j: the caller)
        pl = (t_off // SUB) * SUB + u
        rows_p = c0 + pl
        hp, lp, rp = load_gates(GH, GL, GR, i_bh, c0, TP, pl, k_off, k_ok, DK, 2)
        qp = tl.load(q_base + rows_p[:, None] * DK + k_off[None, :], mask=(rows_p < T)[:, None] & k_ok[None, :],
                     other=0.0)
        w = tile_sum(tl.where(t_off[:, None] == pl[None, :], dA, 0.0), 0)
        e = tl.exp(tl.where((pl > t_off)[:, None] & (rp <= t_off[:, None]), gate_span(hp, lp, hi, lo), float("-inf")))
        dk += (w[:, None] * e) * qp.to(e.dtype)
    return dq, dk


# ======================================================================= kernels (undecorated)
def _state_kernel(X, Y, GH, GL, GR, S0, HS, ST, T, TP, NT, scale, H: tl.constexpr, GX: tl.constexpr,
                  GY: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                  C: tl.constexpr, GATE: tl.constexpr, REVERSE: tl.constexpr, HAS_S0: tl.constexpr,
                  STORE_ST: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """The sequential pass over chunks, one program per (Dk block, Dv block, batch x head).

    Forward (X = k, Y = v): stores ``h_n`` (the state entering chunk n) in ``HS[bh, n]`` and the final
    state in ST; ``S <- exp(b_last) S + (k exp(b_last - b))^T v``. Reverse (X = q, Y = do, REVERSE): stores
    ``dh_n`` (the gradient of the state leaving chunk n) and the initial state's gradient;
    ``dS <- exp(b_last) dS + scale (q exp(b))^T do``. X / Y of head ``h // GX`` / ``h // GY`` (GQA)."""
    i_k = tl.program_id(0)
    i_v = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    h = i_bh % H
    b = i_bh // H
    t_off = tl.arange(0, C)
    k_off = i_k * BK + tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = in_dim(k_off, DK, BK)
    v_ok = in_dim(v_off, DV, BV)
    sv_off = k_off[:, None] * DV + v_off[None, :]
    sv_ok = k_ok[:, None] & v_ok[None, :]
    x_base = X + (b * (H // GX) + h // GX) * T * DK
    y_base = Y + (b * (H // GY) + h // GY) * T * DV
    S = acc_zeros([BK, BV], F64)
    if HAS_S0:
        S += tl.load(S0 + i_bh * DK * DV + sv_off, mask=sv_ok, other=0.0).to(S.dtype)
    for i in range(0, NT):
        if REVERSE:
            n = NT - 1 - i
        else:
            n = i
        c0, _, rows, r_ok = chunk_rows(n, C, T)
        tl.store(HS + (i_bh * NT + n) * DK * DV + sv_off, S.to(HS.dtype.element_ty), mask=sv_ok)
        x = tl.load(x_base + rows[:, None] * DK + k_off[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        y = tl.load(y_base + rows[:, None] * DV + v_off[None, :], mask=r_ok[:, None] & v_ok[None, :], other=0.0)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, h, c0, T, TP, t_off, k_off, k_ok, DK, C, GATE, F64)
        if REVERSE:
            w = eb * scale
        else:
            w = ebl
        if GATE == 2:
            xw = x * w
            S = S * dec[:, None]
        else:
            xw = x * w[:, None]
            S = S * dec
        S += mm(tl.trans(xw.to(x.dtype)), y, DOT)
    if STORE_ST:
        tl.store(ST + i_bh * DK * DV + sv_off, S.to(ST.dtype.element_ty), mask=sv_ok)


def _chunk_products(Q, K, HX, GH, GL, GR, i_bh, kv_bh, h, c0, rows, r_ok, t_off, v_off, v_ok, T, TP,
                    DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                    GATE: tl.constexpr, KEYS: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr, SUB: tl.constexpr):
    """A chunk's two products, over the Dk blocks, with their decays: ``(exp(b) q) HX`` and ``q k^T * D``
    (``[C(t), C(j)]``), or with ``KEYS`` ``(exp(b_last - b) k) HX`` and ``(q k^T * D)^T`` (``[C(j), C(t)]``); ``HX``
    the chunk's ``[Dk, Dv]`` state (its Dv block ``v_off``), ``D`` the in-chunk decays (``_gate_pairs``, or
    ``vec_intra`` for vector gates)."""
    q_base = Q + i_bh * T * DK
    k_base = K + kv_bh * T * DK
    xs = acc_zeros([C, BV], F64)
    A = acc_zeros([C, C], F64)
    for k0 in range(0, DK, BK):
        k_off, k_ok = dim_tile(k0, DK, BK)
        # q and k under one mask, loaded here: as two load_rows (a mask each) the sm_80 d 128 kernels took 30-50
        # registers more (benchmarks/results/recurrence-library-offline-2026-11-28.md)
        qk_ok = r_ok[:, None] & k_ok[None, :]
        q = tl.load(q_base + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0)
        k = tl.load(k_base + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0)
        hx = load_state(HX, k_off, k_ok, v_off, v_ok, DV)
        if GATE == 2:
            eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, h, c0, T, TP, t_off, k_off, k_ok, DK, C, GATE, F64)
            if KEYS:
                xs += mm((k * ebl).to(k.dtype), hx.to(k.dtype), DOT)
            else:
                xs += mm((q * eb).to(q.dtype), hx.to(q.dtype), DOT)
            A += vec_intra(q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok, DK, C, SUB, DOT,
                           F64)
        elif KEYS:
            xs += mm(k, hx.to(k.dtype), DOT)
            A += mm(k, tl.trans(q), DOT)
        else:
            xs += mm(q, hx.to(q.dtype), DOT)
            A += mm(q, tl.trans(k), DOT)
    if GATE != 2:
        t0 = tl.arange(0, 1)
        eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, h, c0, T, TP, t_off, t0, t0 < 1, DK, C, GATE, F64)
        E = _gate_pairs(GH, GL, GR, i_bh, h, c0, T, TP, t_off, DK, GATE, F64)
        if KEYS:
            xs = xs * ebl[:, None]
            A = A * tl.trans(E)
        else:
            xs = xs * eb[:, None]
            A = A * E
    elif KEYS:
        A = tl.trans(A)
    return xs, A


def _out_kernel(Q, K, V, GH, GL, GR, HS, OUT, T, TP, NT, scale, H: tl.constexpr, G: tl.constexpr,
                DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                GATE: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
                SUB: tl.constexpr):
    """One program per (Dv block, chunk, batch x head): ``o = scale (exp(b) q h_n + (q k^T * D) v)``."""
    i_v, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, G, C, T)
    v_off, v_ok = dim_tile(i_v * BV, DV, BV)
    o, A = _chunk_products(Q, K, HS + (i_bh * NT + n) * DK * DV, GH, GL, GR, i_bh, kv_bh, i_bh % H, c0, rows, r_ok,
                           t_off, v_off, v_ok, T, TP, DK, DV, BK, BV, C, GATE, False, F64, DOT, SUB)
    v = load_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    store_rows(OUT + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, (o + mm(A.to(v.dtype), v, DOT)) * scale)


def _bwd_dv_kernel(Q, K, GH, GL, GR, DO, DHS, DV_, T, TP, NT, scale, H: tl.constexpr, G: tl.constexpr,
                   DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, C: tl.constexpr,
                   GATE: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr, SUB: tl.constexpr):
    """One program per (Dv block, chunk, batch x head), per query head (summed over the GQA group on the
    host): ``dv = scale (q k^T * D)^T do + (k exp(b_last - b)) dh_n``."""
    i_v, n, i_bh, kv_bh, c0, t_off, rows, r_ok = block_chunk_program(H, G, C, T)
    v_off, v_ok = dim_tile(i_v * BV, DV, BV)
    dv, At = _chunk_products(Q, K, DHS + (i_bh * NT + n) * DK * DV, GH, GL, GR, i_bh, kv_bh, i_bh % H, c0, rows,
                             r_ok, t_off, v_off, v_ok, T, TP, DK, DV, BK, BV, C, GATE, True, F64, DOT, SUB)
    do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    dv += mm((At * scale).to(do.dtype), do, DOT)
    store_rows(DV_ + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, dv)


def _bwd_dqk_kernel(Q, K, V, GH, GL, GR, DO, HS, DHS, DQ, DK_, DB, T, TP, NT, scale, H: tl.constexpr,
                    G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                    C: tl.constexpr, GATE: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr,
                    SUB: tl.constexpr, STORE_DB: tl.constexpr):
    """One program per (Dk block, chunk, batch x head): with ``W = scale (do v^T) * D``,
    ``dq = scale exp(b) do h_n^T + W k`` and ``dk = exp(b_last - b) v dh_n^T + W^T q`` (dk per query head).
    With ``STORE_DB``, also the gates' term ``dL/db = q dq - k dk`` without a token's own pair (``W_tt k_t`` in dq,
    ``W_tt q_t`` in dk: they cancel exactly, and under strong decay they are all there is of size in dq and dk,
    so taken from the sums their rounding was the whole gradient): ``DB [Dk blocks, B*H, T]`` summed over the
    block's channels for scalar gates, ``[B*H, T, Dk]`` per channel for vector gates."""
    i_k = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    h = i_bh % H
    b = i_bh // H
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    k_off = i_k * BK + tl.arange(0, BK)
    k_ok = in_dim(k_off, DK, BK)
    qk_ok = r_ok[:, None] & k_ok[None, :]
    kv_bh = b * (H // G) + h // G
    do_base = DO + i_bh * T * DV
    v_base = V + kv_bh * T * DV
    hs_off = (i_bh * NT + n) * DK * DV
    dP = acc_zeros([C, C], F64)
    dq = acc_zeros([C, BK], F64)
    dk = acc_zeros([C, BK], F64)
    for v0 in range(0, DV, BV):
        v_off = v0 + tl.arange(0, BV)
        v_ok = in_dim(v_off, DV, BV)
        rv_ok = r_ok[:, None] & v_ok[None, :]
        do = tl.load(do_base + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0)
        v = tl.load(v_base + rows[:, None] * DV + v_off[None, :], mask=rv_ok, other=0.0)
        hT, dhT = state_tiles_t(HS, DHS, hs_off, k_off, k_ok, v_off, v_ok, DV)
        dP += mm(do, tl.trans(v), DOT)
        dq += mm(do, hT.to(do.dtype), DOT)
        dk += mm(v, dhT.to(v.dtype), DOT)
    q_base = Q + i_bh * T * DK
    k_base = K + kv_bh * T * DK
    q = tl.load(q_base + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0)
    k = tl.load(k_base + rows[:, None] * DK + k_off[None, :], mask=qk_ok, other=0.0)
    eb, ebl, dec = gate_rows(GH, GL, GR, i_bh, h, c0, T, TP, t_off, k_off, k_ok, DK, C, GATE, F64)
    own = tile_sum(tl.where(t_off[:, None] == t_off[None, :], dP, 0.0), 1) * scale  # W_tt (its decay exp(0) = 1)
    if GATE == 2:
        dq = dq * (eb * scale)
        dk = dk * ebl
        dq, dk = _vec_intra_grad(dq, dk, dP * scale, q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off,
                                 k_ok, DK, C, SUB, DOT)
    else:
        E = _gate_pairs(GH, GL, GR, i_bh, h, c0, T, TP, t_off, DK, GATE, F64)
        dq = dq * (eb * scale)[:, None]
        dk = dk * ebl[:, None]
        W = tl.where(t_off[:, None] > t_off[None, :], dP * E * scale, 0.0)  # the pairs of an earlier key
        dq += mm(W.to(k.dtype), k, DOT)
        dk += mm(tl.trans(W.to(q.dtype)), q, DOT)
    qf, kf = q.to(dq.dtype), k.to(dq.dtype)
    if STORE_DB:
        db = qf * dq - kf * dk
        if GATE == 2:
            tl.store(DB + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], db.to(DB.dtype.element_ty), mask=qk_ok)
        else:
            tl.store(DB + (i_k * tl.num_programs(2) + i_bh) * T + rows, tile_sum(db, 1).to(DB.dtype.element_ty),
                     mask=r_ok)
    dq += own[:, None] * kf
    dk += own[:, None] * qf
    tl.store(DQ + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], dq.to(DQ.dtype.element_ty), mask=qk_ok)
    tl.store(DK_ + i_bh * T * DK + rows[:, None] * DK + k_off[None, :], dk.to(DK_.dtype.element_ty), mask=qk_ok)


def _gate_grad_kernel(DB, LAST, DG, T, DK: tl.constexpr, BK: tl.constexpr, NKB: tl.constexpr, C: tl.constexpr,
                      VECTOR: tl.constexpr, HAS_LAST: tl.constexpr):
    """``dg_t = sum_{s >= t} DB_s + LAST`` per (Dk block, batch x head), ``DB`` the gates' term of
    ``_bwd_dqk_kernel`` (scalar gates: its ``NKB`` Dk blocks' sums added here); a reverse sweep with an in-chunk
    reverse cumsum and a carry, in float64."""
    i_k = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    t_off = tl.arange(0, C)
    n_chunks = (T + C - 1) // C
    if VECTOR:
        k_off = i_k * BK + tl.arange(0, BK)
        k_ok = in_dim(k_off, DK, BK)
        carry = tl.full([BK], 0.0, tl.float64)  # float64 always: the rounding of the sum must not grow with T
        if HAS_LAST:
            carry += tl.load(LAST + i_bh * DK + k_off, mask=k_ok, other=0.0).to(carry.dtype)
    else:
        carry = tl.full([1], 0.0, tl.float64)
        if HAS_LAST:
            for k0 in range(0, DK, BK):
                k_off = k0 + tl.arange(0, BK)
                last = tl.load(LAST + i_bh * DK + k_off, mask=k_off < DK, other=0.0).to(carry.dtype)
                carry += tile_sum(last, 0)
    for i in range(0, n_chunks):
        c0 = (n_chunks - 1 - i) * C
        rows = c0 + t_off
        r_ok = rows < T
        if VECTOR:
            m = r_ok[:, None] & k_ok[None, :]
            off = rows[:, None] * DK + k_off[None, :]
            db = tl.load(DB + i_bh * T * DK + off, mask=m, other=0.0).to(tl.float64)
        else:  # a 1-D scan (Triton 3.6's scan lowering failed on a [C, 1] block)
            db = tl.full([C], 0.0, tl.float64)
            for kb in range(0, NKB):
                db += tl.load(DB + (kb * tl.num_programs(1) + i_bh) * T + rows, mask=r_ok, other=0.0).to(tl.float64)
        if VECTOR:
            dg = tl.associative_scan(db, 0, tl.standard._sum_combine, reverse=True) + carry[None, :]
            tl.store(DG + i_bh * T * DK + off, dg.to(DG.dtype.element_ty), mask=m)
        else:
            dg = tl.associative_scan(db, 0, tl.standard._sum_combine, reverse=True) + carry
            tl.store(DG + i_bh * T + rows, dg.to(DG.dtype.element_ty), mask=r_ok)
        carry += tile_sum(db, 0)


# ======================================================================= wrapping
_HELPERS = (acc_zeros, tile_sum, in_dim, mm, head_gate, load_gates, gate_span, gate_rows, _gate_pairs,
            vec_gate_factor, vec_intra, _vec_intra_grad, _chunk_products, chunk_rows, kv_head,
            block_chunk_program, dim_tile, load_rows, load_state, store_rows, state_tiles_t)
_KERNELS = (_state_kernel, _out_kernel, _bwd_dv_kernel, _bwd_dqk_kernel, _gate_grad_kernel)


#: The kernels jitted for the GPU (``kernels(False)``) or wrapped by Triton's interpreter (``kernels(True)``).
kernels = KernelTable(_HELPERS, _KERNELS, globals())
_launch = kernels.launch


def configs(Dk: int, Dv: int, gate: int, C: int, dtype: torch.dtype, interpret: bool = False) -> dict:
    """Per-kernel compile-time constants and launch options (``num_warps``, ``num_stages``): what the
    launches use (``runtime.gpu_check`` compiles those launches offline). The state block is at most 64 x 64
    fp32 (32 registers a thread at 4 warps); per-channel gates take Dk blocks of ``VECTOR_BLOCK`` in the
    chunk-parallel kernels and sub-chunks of ``SUB`` rows for their in-chunk product."""
    if Dk > 256:
        raise SpecError(f"the Triton recurrence kernels support a key head dim up to 256, got {Dk}",
                        where="argument q", hint="use backend='cpu'")
    f64 = dtype == torch.float64
    dot = 1 if dtype not in (torch.bfloat16, torch.float16) else (2 if interpret and dtype == torch.bfloat16 else 0)
    BK, BV = block_size(Dk, MAX_BLOCK), block_size(Dv, MAX_BLOCK)
    BKc = block_size(Dk, VECTOR_BLOCK) if gate == 2 else BK  # Dk block of the chunk-parallel kernels
    common = dict(DK=Dk, DV=Dv, C=C, GATE=gate, F64=f64, DOT=dot)
    opts = dict(num_warps=4, num_stages=2)
    # chunks of 64 hold three [64, 64] fp32 tiles (accumulators and decays) per program: 8 warps keep
    # them in registers (4 warps spilled 0.7-1.5 KiB at Dk = Dv = 128 on sm_90, more on sm_80)
    # Per-channel gates add [C, BK] gate tiles and the sub-chunk loops: software pipelining of their loads
    # (num_stages=2) took the dq/dk kernel to 255 registers and a 20 B spill on sm_80 at Dk = 128 (Triton 3.6);
    # one stage keeps it at 234 (out 214, dv 201), no spill
    par = dict(num_warps=8 if C >= 64 else 4, num_stages=1 if gate == 2 else 2, SUB=min(VECTOR_SUB_CHUNK, C))
    return {
        "_state_kernel": dict(common, BK=BK, BV=BV, **opts),
        "_out_kernel": dict(common, BK=BKc, BV=BV, **par),
        "_bwd_dv_kernel": dict(common, BK=BKc, BV=BV, **par),
        "_bwd_dqk_kernel": dict(common, BK=BKc, BV=BV, **par),
        # vector gates: one program per Dk block of VECTOR_BLOCK (blocks of 64 took 244 registers at C = 64, its
        # fp64 [C, BK] tiles); scalar gates: one program sweeping Dk in slices
        "_gate_grad_kernel": dict(DK=Dk, BK=block_size(Dk, VECTOR_BLOCK if gate == 2 else SCALAR_GATE_BLOCK), C=C,
                                  num_warps=4, num_stages=1),
    }


def _states(x, y, gates, s0, H: int, G: int, T: int, C: int, gate: int, scale: float, reverse: bool,
            store_last: bool, cfg: dict, interp: bool):
    """The sequential pass: per-chunk states ``[B*H, NT, Dk, Dv]`` (in the input dtype for bf16 / fp16,
    else the compute dtype) and the last state (final state, or the initial state's gradient)."""
    B = x.shape[0]
    Dk, Dv = cfg["DK"], cfg["DV"]
    NT = triton.cdiv(T, C)
    acc = torch.float64 if cfg["F64"] else torch.float32
    store_dt = acc if cfg["DOT"] == 1 else x.dtype
    hs = torch.empty(B * H, NT, Dk, Dv, dtype=store_dt, device=x.device)
    last = torch.empty(B, H, Dk, Dv, dtype=acc, device=x.device)
    grid = (triton.cdiv(Dk, cfg["BK"]), triton.cdiv(Dv, cfg["BV"]), B * H)
    gh, gl, gr, tp = gates
    _launch("_state_kernel", grid, interp, x, y, gh, gl, gr, s0 if s0 is not None else last, hs, last, T, tp, NT,
            float(scale), H=H, GX=1 if reverse else G, GY=1 if reverse else G, REVERSE=reverse,
            HAS_S0=s0 is not None, STORE_ST=store_last, **cfg)
    return hs, last


def triton_forward(q, k, v, g, scale: float, initial_state, C: int, gate: int, interpret: bool | None = None):
    """``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]`` (contiguous; query head h reads
    kv head ``h // (H // Hkv)``), ``g`` ``[H]`` (head gates), ``[B, H, T]`` (scalar) or ``[B, H, T, Dk]``
    (vector) in the compute dtype. Returns (out in q's dtype, final state in the compute dtype).
    ``interpret``: run the kernels in Triton's interpreter (None: for CPU tensors or TRITON_INTERPRET=1)."""
    B, H, T, Dk = q.shape
    Dv, G = v.shape[-1], H // k.shape[1]
    interp = interprets(q) if interpret is None else interpret
    cfg = configs(Dk, Dv, gate, C, q.dtype, interp)
    gates = gate_arrays(g, C, gate)
    s0 = initial_state.contiguous() if initial_state is not None else None
    hs, final = _states(k, v, gates, s0, H, G, T, C, gate, 1.0, False, True, cfg["_state_kernel"], interp)
    out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
    oc = cfg["_out_kernel"]
    grid = (triton.cdiv(Dv, oc["BV"]), triton.cdiv(T, C), B * H)
    _launch("_out_kernel", grid, interp, q, k, v, *gates[:3], hs, out, T, gates[3], hs.shape[1], float(scale), H=H,
            G=G, **oc)
    return out, final


def triton_backward(q, k, v, g, scale: float, initial_state, final_state, do, dS_T, C: int, gate: int,
                    need_gate: bool, need_s0: bool, interpret: bool | None = None):
    """Gradients ``(dq, dk, dv, dg | None, dS0 | None)`` in the compute dtype; dk / dv per kv head."""
    B, H, T, Dk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    interp = interprets(q) if interpret is None else interpret
    cfg = configs(Dk, Dv, gate, C, q.dtype, interp)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    gates = gate_arrays(g, C, gate)
    gh, gl, gr, tp = gates
    do = do.to(q.dtype).contiguous()  # the tensor-core dots take do in the input dtype
    s0 = initial_state.contiguous() if initial_state is not None else None
    if dS_T is not None and cfg["_state_kernel"]["DOT"] != 1:
        # the final state's gradient enters in the input dtype, as do does: every use of it (the state
        # gradients the tensor-core dots read, the gate gradient's final-state term sum_e dS_T S_T, which
        # cancels against k dk at the last steps) must see the same value; the bf16 rounding of dS_T in only
        # some of them shifted every dg by up to 0.06 (GLA, gates -5..-10 per step)
        dS_T = dS_T.to(q.dtype).to(acc)
    dst = dS_T.contiguous() if dS_T is not None else None
    sc = cfg["_state_kernel"]
    hs, _ = _states(k, v, gates, s0, H, G, T, C, gate, 1.0, False, False, sc, interp)
    dhs, ds0 = _states(q, do, gates, dst, H, G, T, C, gate, scale, True, need_s0, sc, interp)
    NT = hs.shape[1]
    dq = torch.empty(B, H, T, Dk, dtype=acc, device=q.device)
    dk = torch.empty(B, H, T, Dk, dtype=acc, device=q.device)  # per query head
    dv = torch.empty(B, H, T, Dv, dtype=acc, device=q.device)
    vc, kc = cfg["_bwd_dv_kernel"], cfg["_bwd_dqk_kernel"]
    vector = gate == 2
    blocks = triton.cdiv(Dk, kc["BK"])
    # the gates' term per token (dqk kernel: q dq - k dk without a token's own pair), [Dk blocks, B*H, T] for scalar
    # gates, [B*H, T, Dk] for vector ones
    db = (torch.empty(*((B * H, T, Dk) if vector else (blocks, B * H, T)), dtype=acc, device=q.device)
          if need_gate else dq)
    _launch("_bwd_dv_kernel", (triton.cdiv(Dv, vc["BV"]), NT, B * H), interp, q, k, gh, gl, gr, do, dhs, dv, T, tp,
            NT, float(scale), H=H, G=G, **vc)
    _launch("_bwd_dqk_kernel", (blocks, NT, B * H), interp, q, k, v, gh, gl, gr, do, hs, dhs, dq, dk, db, T, tp, NT,
            float(scale), H=H, G=G, STORE_DB=need_gate, **kc)
    dg = None
    if need_gate:
        dg = torch.empty(B, H, T, *((Dk,) if vector else ()), dtype=acc, device=q.device)
        last = (dS_T * final_state).sum(-1).contiguous() if dS_T is not None else dq  # [B, H, Dk]
        gc = cfg["_gate_grad_kernel"]
        grid = (triton.cdiv(Dk, gc["BK"]) if vector else 1, B * H)
        _launch("_gate_grad_kernel", grid, interp, db, last, dg, T, NKB=1 if vector else blocks, VECTOR=vector,
                HAS_LAST=dS_T is not None, **gc)
        dg = dg.masked_fill(torch.isneginf(g), 0.0)  # a reset gate: exactly 0, the limit (see recurrence.py)
    if G > 1:  # GQA: a kv head's gradient is the sum over the query heads reading it
        dk = dk.view(B, Hkv, G, T, Dk).sum(2)
        dv = dv.view(B, Hkv, G, T, Dv).sum(2)
    return dq, dk, dv, dg, (ds0 if need_s0 else None)


class _DecayPasses:
    """This family's forward and backward as ``ChunkedFunction`` runs them: the inputs q, k, v, the gates and the
    initial state; its backward reads the final state (the gates' gradient through ``dS_T``)."""

    reads_final = True

    @staticmethod
    def forward(q, k, v, g, initial_state, scale: float, C: int, gate: int, interpret: bool | None):
        return triton_forward(q, k, v, g, scale, initial_state, C, gate, interpret)

    @staticmethod
    def backward(q, k, v, g, initial_state, final, do, dS_T, needs, scale: float, C: int, gate: int,
                 interpret: bool | None):
        return triton_backward(q, k, v, g, scale, initial_state, final, do, dS_T, C, gate, gate != 0 and needs[3],
                               needs[4], interpret)


def run(q, k, v, g, scale: float, initial_state, C: int, gate: str, interpret: bool | None = None):
    """The recurrence on the Triton kernels (the interpreter for CPU tensors, unless ``interpret`` says
    otherwise: the offline GPU check compiles them natively). ``g``: ``[H]`` for head gates, ``[B, H, T]``
    scalar, ``[B, H, T, Dk]`` vector, in the compute dtype; k, v with Hkv heads (H a multiple of Hkv:
    query head h reads kv head h // (H // Hkv))."""
    code = GATE_CODES[gate]
    if code == 2:
        C = VECTOR_CHUNK
    q, k, v, g = (x.contiguous() for x in (q, k, v, g))
    options = dict(scale=scale, C=C, gate=code, interpret=interpret)
    return ChunkedFunction.apply(_DecayPasses, options, q, k, v, g, initial_state)


__all__ = ["GATE_CODES", "MAX_BLOCK", "VECTOR_CHUNK", "VECTOR_SUB_CHUNK", "available", "configs",
           "kernels", "run", "triton_backward", "triton_forward"]
