"""Device helpers of the recurrence kernels, undecorated: each family's ``kernels(interpret)`` jits them with
its own kernels (``host.jit_table``) or lets the interpreter call them as plain Python. Tiles and dots in the
compute dtype (``to_acc``, ``acc_zeros``, ``mm``); what a program reads by (``chunk_program``,
``block_chunk_program``, ``value_program``: its head, chunk rows and blocks) and the tiles it loads and stores
(``load_rows``, ``store_rows``, ``dim_tile``, ``chunk_square``; states: ``state_block``, ``load_state``,
``store_state``, ``enter_chunk``, ``state_tiles_t``); the delta rule's decays and triangular inverse (also
Titans'), and per-channel (GLA) gates as split prefix sums (``load_gates``, ``gate_rows``, ``vec_intra``: the decay
and KDA kernels)."""

import types

try:  # the CPU path runs without Triton; any other import failure is a real error
    import triton
    import triton.language as tl
except ModuleNotFoundError as _err:  # pragma: no cover - exercised only without triton
    if _err.name != "triton":
        raise

    triton = None
    tl = types.SimpleNamespace(constexpr="constexpr")


# ======================================================================= helpers (undecorated)
def acc_zeros(shape, F64: tl.constexpr):
    if F64:
        return tl.full(shape, 0.0, tl.float64)
    else:
        return tl.full(shape, 0.0, tl.float32)


# ======================================================================= helpers (undecorated)
def to_acc(x, F64: tl.constexpr):
    """``x`` in the compute dtype (fp64 in the fp64 interpreter runs, else fp32)."""
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


def tile_sum(x, axis: tl.constexpr):
    """``tl.sum`` through ``tl.reduce``: the standard library's jitted ``sum`` cannot be called from an
    interpreted kernel when the module was imported without TRITON_INTERPRET."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


def in_dim(off, D: tl.constexpr, BLOCK: tl.constexpr):
    """``off < D`` for a block of a head dim; all true (a splat, so loads stay vectorised along the dim)
    when the blocks tile the dim exactly."""
    if D % BLOCK == 0:
        return tl.full(off.shape, 1, tl.int1)
    else:
        return off < D


def mm(a, b, DOT: tl.constexpr):
    """A dot with fp32 (fp64) accumulation. ``DOT`` 0: tensor cores on bf16 / fp16 operands; 1: exact
    products (no TF32) on fp32 / fp64 ones; 2: bf16 operands upcast to fp32 (the interpreter's bf16 dot
    is wrong; a bf16 product is exact in fp32, so this is what the tensor cores compute)."""
    if DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


def load_rows(base, rows, r_ok, off, ok, D: tl.constexpr):
    """The ``[C, BD]`` tile of rows ``rows`` and columns ``off`` of a ``[T, D]`` matrix at ``base`` (0 outside)."""
    return tl.load(
        base + rows[:, None] * D + off[None, :], mask=r_ok[:, None] & ok[None, :], other=0.0
    )


def decay_matrix(b, rs, t_off, STRICT: tl.constexpr, RESETS: tl.constexpr):
    """``exp(b_t - b_s)`` for ``s <= t`` (``s < t`` if ``STRICT``), 0 elsewhere and, with ``RESETS``, where a
    reset lies in ``(s, t]`` (``rs_t > s``): ``[C(t), C(s)]``. The span is masked before the exponential, so the
    entries above the diagonal never overflow."""
    if STRICT:
        m = t_off[:, None] > t_off[None, :]
    else:
        m = t_off[:, None] >= t_off[None, :]
    if RESETS:
        m = m & (rs[:, None] <= t_off[None, :])
    return tl.exp(tl.where(m, b[:, None] - b[None, :], float("-inf")))


def unit_lower_inverse(A, t_off, C: tl.constexpr):
    """``(I + A)^-1`` for a strictly lower-triangular ``A`` (``[C, C]``) by forward substitution: row i of the
    inverse X is ``e_i - sum_{m < i} A_im X_m`` (rows m < i final, A_im = 0 for m >= i), one row per step,
    elementwise in A's dtype (no tensor-core rounding in the inverse)."""
    X = (t_off[:, None] == t_off[None, :]).to(A.dtype)
    for i in range(1, C):
        a = tile_sum(tl.where(t_off[:, None] == i, A, 0.0), 0)  # A[i, :], indexed by m
        row = -tile_sum(a[:, None] * X, 0)
        X = tl.where(t_off[:, None] == i, row[None, :] + (t_off[None, :] == i).to(A.dtype), X)
    return X


def head_gate(GH, h, F64: tl.constexpr):
    """The constant log gate of head ``h`` in the compute dtype."""
    if F64:
        return tl.load(GH + h).to(tl.float64)
    else:
        return tl.load(GH + h).to(tl.float32)


def load_gates(GH, GL, GR, i_bh, c0, TP, t_idx, k_off, k_ok, DK: tl.constexpr, GATE: tl.constexpr):
    """The ``ChunkGates`` of rows ``t_idx`` (chunk-local positions, any 1-D block) of the chunk starting at
    ``c0``: ``(hi, lo, reset)``, ``[len]`` for scalar gates, ``[len, BK]`` for vector gates (Dk block
    ``k_off``). ``hi + lo`` is the in-chunk cumulative log gate ``b``; ``reset`` the last reset at or before
    the row (-1 if none)."""
    if GATE == 1:
        g_off = i_bh * TP + c0 + t_idx
        hi = tl.load(GH + g_off)
        lo = tl.load(GL + g_off)
        rs = tl.load(GR + g_off)
    else:
        g_off = (i_bh * TP + c0) * DK + t_idx[:, None] * DK + k_off[None, :]
        hi = tl.load(GH + g_off, mask=k_ok[None, :], other=0.0)
        lo = tl.load(GL + g_off, mask=k_ok[None, :], other=0.0)
        rs = tl.load(GR + g_off, mask=k_ok[None, :], other=-1)
    return hi, lo, rs


def gate_span(hi_t, lo_t, hi_j, lo_j):
    """``b_t - b_j`` from the split prefix sums: exact to a few ulps of the span itself (see ``ChunkGates``)."""
    return (hi_t - hi_j) + (lo_t - lo_j)


def gate_rows(GH, GL, GR, i_bh, h, c0, T, TP, t_off, k_off, k_ok, DK: tl.constexpr, C: tl.constexpr,
               GATE: tl.constexpr, F64: tl.constexpr):
    """``(exp(b_t), exp(b_last - b_t), exp(b_last))`` of the chunk starting at ``c0``: ``[C]``, ``[C]``,
    a scalar for head / scalar gates; ``[C, BK]``, ``[C, BK]``, ``[BK]`` for vector gates. ``b`` is the
    in-chunk cumulative log gate (``hi + lo`` of ``ChunkGates``); a reset (-inf) zeroes every decay across it."""
    if GATE == 0:
        # a constant gate: spans are gh times a count of steps (a count of 0 is 0, also for gh = -inf)
        gh = head_gate(GH, h, F64)
        nt = tl.minimum(t_off + 1, T - c0)
        nl = tl.minimum(C, T - c0)
        eb = tl.exp(gh * nt.to(gh.dtype))
        ebl = tl.exp(tl.where(nt == nl, 0.0, gh * (nl - nt).to(gh.dtype)))
        dec = tl.exp(gh * nl.to(gh.dtype))
    else:
        hi, lo, rs = load_gates(GH, GL, GR, i_bh, c0, TP, t_off, k_off, k_ok, DK, GATE)
        if GATE == 1:
            last = t_off == C - 1
            t_col = t_off
        else:
            last = (t_off == C - 1)[:, None]
            t_col = t_off[:, None]
        hl = tile_sum(tl.where(last, hi, 0.0), 0)  # the chunk's last row: a scalar, or [BK]
        ll = tile_sum(tl.where(last, lo, 0.0), 0)
        rl = tile_sum(tl.where(last, rs, 0), 0)
        eb = tl.exp(tl.where(rs < 0, hi + lo, float("-inf")))  # exp(b_t): no reset in [c0, t]
        ebl = tl.exp(tl.where(rl > t_col, float("-inf"), gate_span(hl, ll, hi, lo)))  # no reset in (t, last]
        dec = tl.exp(tl.where(rl < 0, hl + ll, float("-inf")))
    return eb, ebl, dec


# Per-channel (GLA) gates: the in-chunk product A_tj = sum_d q_td k_jd exp(b_td - b_jd) (j <= t) as
# flash-linear-attention factorises it. The chunk is split into sub-chunks of SUB rows. For t in sub-chunk
# i and j before it, with the reference r = i * SUB (the sub-chunk's first row, j < r <= t),
#     exp(b_t - b_j) = exp(b_t - b_r) * exp(b_r - b_j),
# both exponents spans of log decays (<= 0: no overflow, whatever the gates), so the block is one
# tensor-core dot of q exp(b - b_r) (rows of sub-chunk i) and k exp(b_r - b) (rows before r). A reset in
# (j, t] lies in (r, t] (the q factor is 0) or in (j, r] (the k factor is 0). The diagonal sub-chunk blocks
# stay exact: SUB steps, each pairing every row t with the row j = (t // SUB) * SUB + u of its own
# sub-chunk (a [C, BK] elementwise product, the causal mask j <= t). The off-diagonal dots run over the
# whole chunk with the rows outside sub-chunk i zeroed: one [C, BK] x [BK, C] dot per sub-chunk.
def vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, lo_row, hi_row, r, AFTER: tl.constexpr):
    """The factor of rows ``lo_row <= t < hi_row`` against the reference row ``r`` (gates ``hr, lr, rr``,
    ``[1, BK]``), 0 elsewhere: ``exp(b_t - b_r)`` for rows after r (``AFTER``: 0 if a reset lies in (r, t]),
    ``exp(b_r - b_t)`` for rows before it (0 if a reset lies in (t, r])."""
    rows = ((t_off >= lo_row) & (t_off < hi_row))[:, None]
    if AFTER:
        ok = rows & (rs <= r)
        span = gate_span(hi, lo, hr, lr)
    else:
        ok = rows & (rr <= t_off[:, None])
        span = gate_span(hr, lr, hi, lo)
    return tl.exp(tl.where(ok, span, float("-inf")))


def vec_intra(q, k, q_base, k_base, GH, GL, GR, i_bh, c0, T, TP, t_off, k_off, k_ok, DK: tl.constexpr,
               C: tl.constexpr, SUB: tl.constexpr, DOT: tl.constexpr, F64: tl.constexpr):
    """``A_tj = sum_d q_td k_jd exp(b_td - b_jd)`` (``j <= t``, 0 above and across a reset), ``[C(t), C(j)]``,
    over the Dk block ``k_off`` of the chunk at ``c0`` (q, k its ``[C, BK]`` tiles): off-diagonal sub-chunk
    blocks on the tensor cores, diagonal ones exact (see above)."""
    hi, lo, rs = load_gates(GH, GL, GR, i_bh, c0, TP, t_off, k_off, k_ok, DK, 2)
    A = acc_zeros([C, C], F64)
    for i in range(1, C // SUB):
        r = i * SUB
        hr, lr, rr = load_gates(GH, GL, GR, i_bh, c0, TP, tl.full([1], r, tl.int32), k_off, k_ok, DK, 2)
        eq = vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, r, r + SUB, r, True)
        ek = vec_gate_factor(hi, lo, rs, hr, lr, rr, t_off, 0, r, r, False)
        A += mm((q * eq).to(q.dtype), tl.trans((k * ek).to(k.dtype)), DOT)
    for u in range(0, SUB):
        jl = (t_off // SUB) * SUB + u  # per row t: the row j of its own sub-chunk
        rows_j = c0 + jl
        kj = tl.load(k_base + rows_j[:, None] * DK + k_off[None, :], mask=(rows_j < T)[:, None] & k_ok[None, :],
                     other=0.0)
        hj, lj, rj = load_gates(GH, GL, GR, i_bh, c0, TP, jl, k_off, k_ok, DK, 2)
        e = tl.exp(tl.where((jl <= t_off)[:, None] & (rs <= jl[:, None]), gate_span(hi, lo, hj, lj), float("-inf")))
        a = tile_sum(q.to(e.dtype) * kj.to(e.dtype) * e, 1)
        A += tl.where(t_off[None, :] == jl[:, None], a[:, None], 0.0)
    return A


def kv_head(i_bh, H: tl.constexpr, GQ: tl.constexpr):
    """The K/V head (times batch) that query head ``i_bh`` (batch x head) reads: GQ query heads share one."""
    return (i_bh // H) * (H // GQ) + (i_bh % H) // GQ


def chunk_rows(n, C: tl.constexpr, T):
    """Chunk ``n``'s first token, its rows' offsets in the chunk and in the sequence, and which rows lie before
    ``T``: ``(c0, t_off, rows, r_ok)``."""
    c0 = n * C
    t_off = tl.arange(0, C)
    rows = c0 + t_off
    return c0, t_off, rows, rows < T


def chunk_program(H: tl.constexpr, GQ: tl.constexpr, C: tl.constexpr, T):
    """What a program of a (chunk, batch x head) grid reads by: ``(i_bh, kv_bh, c0, t_off, rows, r_ok)``, its query
    head (batch x head, int64), the K/V head it reads (GQA) and its chunk's rows (``chunk_rows``)."""
    n = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    return i_bh, kv_head(i_bh, H, GQ), c0, t_off, rows, r_ok


def block_chunk_program(H: tl.constexpr, GQ: tl.constexpr, C: tl.constexpr, T):
    """What a program of a (Dk or Dv block, chunk, batch x head) grid reads by: ``(i_x, n, i_bh, kv_bh, c0, t_off,
    rows, r_ok)``, its block and chunk, then as ``chunk_program``."""
    i_x = tl.program_id(0)
    n = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    c0, t_off, rows, r_ok = chunk_rows(n, C, T)
    return i_x, n, i_bh, kv_head(i_bh, H, GQ), c0, t_off, rows, r_ok


def dim_tile(start, D: tl.constexpr, BLOCK: tl.constexpr):
    """The block ``[start, start + BLOCK)`` of a head dim of size ``D``: ``(off, ok)`` (``in_dim``)."""
    off = start + tl.arange(0, BLOCK)
    return off, in_dim(off, D, BLOCK)


def store_rows(base, rows, r_ok, off, ok, D: tl.constexpr, x):
    """Stores the ``[C, BD]`` tile ``x`` at rows ``rows`` and columns ``off`` of a ``[T, D]`` matrix at ``base``, in
    its element type (``load_rows``' inverse)."""
    tl.store(base + rows[:, None] * D + off[None, :], x.to(base.dtype.element_ty), mask=r_ok[:, None] & ok[None, :])


def load_state(base, k_off, k_ok, v_off, v_ok, DV: tl.constexpr):
    """The ``[BK, BV]`` block (Dk offsets ``k_off``, Dv offsets ``v_off``) of a ``[Dk, Dv]`` state at ``base``."""
    return tl.load(base + k_off[:, None] * DV + v_off[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)


def chunk_square(X, base, r_off, t_off, C: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Rows ``r_off`` of a chunk's ``[C, C]`` matrix at ``X + base`` (``[len(r_off), C]``), or with ``TRANSPOSED``
    those rows of its transpose, loaded transposed from memory (no register transposes)."""
    if TRANSPOSED:
        return tl.load(X + base + (t_off[None, :] * C + r_off[:, None]))
    else:
        return tl.load(X + base + (r_off[:, None] * C + t_off[None, :]))


def value_block(i_v, i_bh, H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr):
    """What a program of one Dv block reads by: ``(kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok)``, the K/V head
    of query head ``i_bh`` (GQA), its Dk block ``[0, BK)`` and Dv block ``i_v``, the last two the offsets and mask
    of its ``[BK, BV]`` block of a ``[Dk, Dv]`` state."""
    kv_bh = kv_head(i_bh, H, GQ)
    k_off = tl.arange(0, BK)
    v_off = i_v * BV + tl.arange(0, BV)
    k_ok = in_dim(k_off, DK, BK)
    v_ok = in_dim(v_off, DV, BV)
    return kv_bh, k_off, k_ok, v_off, v_ok, k_off[:, None] * DV + v_off[None, :], k_ok[:, None] & v_ok[None, :]


def value_program(H: tl.constexpr, GQ: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                  BV: tl.constexpr, C: tl.constexpr):
    """What a program of a (Dv block, batch x head) grid, a sequential pass over the chunks, reads by: ``(i_bh, t_off,
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok)``, its query head (batch x head, int64), a chunk's row offsets,
    then as ``value_block``."""
    i_bh = tl.program_id(1).to(tl.int64)
    kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok = value_block(tl.program_id(0), i_bh, H, GQ, DK, DV, BK, BV)
    return i_bh, tl.arange(0, C), kv_bh, k_off, k_ok, v_off, v_ok, sv_off, sv_ok


def store_state(X, at, S, sv_off, sv_ok, DK: tl.constexpr, DV: tl.constexpr):
    """Stores the state block ``S`` at ``sv_off`` of state ``at`` of ``X`` ``[..., Dk, Dv]``, in its element type."""
    tl.store(X + at * DK * DV + sv_off, S.to(X.dtype.element_ty), mask=sv_ok)


def enter_chunk(X, S, i_bh, i, NT, sv_off, sv_ok, C: tl.constexpr, T, DK: tl.constexpr, DV: tl.constexpr,
                REVERSE: tl.constexpr):
    """Step ``i`` of a sequential pass over the chunks, which enters chunk ``n = i`` (``NT - 1 - i`` with
    ``REVERSE``): stores its state block ``S`` as chunk n's of ``X`` ``[B*H, NT, Dk, Dv]`` and returns the chunk's
    ``(c0, rows, r_ok)`` (``chunk_rows``)."""
    if REVERSE:
        n = NT - 1 - i
    else:
        n = i
    store_state(X, i_bh * NT + n, S, sv_off, sv_ok, DK, DV)
    c0, _, rows, r_ok = chunk_rows(n, C, T)
    return c0, rows, r_ok


def state_tiles_t(HS, DHS, at, k_off, k_ok, v_off, v_ok, DV: tl.constexpr):
    """The ``[BV, BK]`` blocks of ``h_n^T`` and ``dh_n^T`` (states ``HS + at``, ``DHS + at`` ``[Dk, Dv]``), loaded
    transposed."""
    hT_off = v_off[:, None] + k_off[None, :] * DV
    hT_ok = v_ok[:, None] & k_ok[None, :]
    return tl.load(HS + at + hT_off, mask=hT_ok, other=0.0), tl.load(DHS + at + hT_off, mask=hT_ok, other=0.0)


def state_block(X, at, sv_off, sv_ok, GIVEN: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BK: tl.constexpr,
                BV: tl.constexpr, F64: tl.constexpr):
    """A sequential pass's first state block: block ``sv_off`` of state ``at`` of ``X`` ``[..., Dk, Dv]`` in the
    compute dtype where ``GIVEN``, zeros otherwise."""
    S = acc_zeros([BK, BV], F64)
    if GIVEN:
        S += to_acc(tl.load(X + at * DK * DV + sv_off, mask=sv_ok, other=0.0), F64)
    return S


def own_pairs(DO, UN, i_bh, rows, r_ok, T, DV: tl.constexpr, BV: tl.constexpr, C: tl.constexpr, F64: tl.constexpr):
    """The diagonal of ``value_sums``' ``dO U^T``, ``sum_v dO_tv U_tv`` per row (``[C]``), summed on its own: a
    kernel short of registers takes it so rather than reduce it out of the ``[C, C]`` tile (KDA's dq/dk kernel spilled
    that way on sm_80)."""
    own = acc_zeros([C], F64)
    for v0 in range(0, DV, BV):
        v_off = v0 + tl.arange(0, BV)
        v_ok = in_dim(v_off, DV, BV)
        do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        u = load_rows(UN + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV).to(do.dtype)
        own += tile_sum(to_acc(do, F64) * to_acc(u, F64), 1)
    return own


def value_sums(DO, UN, DU, HS, DHS, i_bh, hs_off, rows, r_ok, k_off, k_ok, T, DV: tl.constexpr, BV: tl.constexpr,
               C: tl.constexpr, BK: tl.constexpr, HDH: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """The delta rule's dq/dk sums over the Dv blocks of a chunk (rows ``rows``) and Dk block ``k_off``:
    ``(dO U^T, dO h_n^T, U dh_n^T, -dU h_n^T, sum_v h_n dh_n)``, the last only with ``HDH`` (zeros otherwise)."""
    dP = acc_zeros([C, C], F64)
    dq = acc_zeros([C, BK], F64)
    dks = acc_zeros([C, BK], F64)
    dw = acc_zeros([C, BK], F64)
    hdh = acc_zeros([BK], F64)
    for v0 in range(0, DV, BV):
        v_off = v0 + tl.arange(0, BV)
        v_ok = in_dim(v_off, DV, BV)
        do = load_rows(DO + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        u = load_rows(UN + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV).to(do.dtype)
        du = load_rows(DU + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV).to(do.dtype)
        hT, dhT = state_tiles_t(HS, DHS, hs_off, k_off, k_ok, v_off, v_ok, DV)
        dP += mm(do, tl.trans(u), DOT)
        dq += mm(do, hT.to(do.dtype), DOT)
        dks += mm(u, dhT.to(do.dtype), DOT)
        dw -= mm(du, hT.to(do.dtype), DOT)
        if HDH:
            hdh += tile_sum(to_acc(hT, F64) * to_acc(dhT, F64), 0)
    return dP, dq, dks, dw, hdh
