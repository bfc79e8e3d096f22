"""Device passes of the WY representation that the delta rule's kernels share, with a gate per token and head
(``delta.triton``) or per key channel (``delta.triton_kda``): the values through the WY form ``U0 = T diag(beta)
V``, the corrected values ``U = U0 - W h_n``, the reverse state pass's ``dU`` and state gradient, and the Dv blocks
of the WY backward. Each takes its gates already applied (their decays differ by rule), undecorated as
``device``'s helpers are."""

from .device import acc_zeros, dim_tile, load_rows, mm, store_rows, tile_sum, tl, to_acc


def wy_values(V, U0, Xc, beta, i_bh, kv_bh, rows, r_ok, T, DV: tl.constexpr, BV: tl.constexpr, DOT: tl.constexpr):
    """Stores ``U0 = T diag(beta) V`` of a chunk (rows ``rows``; ``Xc`` its inverse ``T`` in the input dtype), per
    query head, over the Dv blocks."""
    for v0 in range(0, DV, BV):
        v_off, v_ok = dim_tile(v0, DV, BV)
        v = load_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        store_rows(U0 + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, mm(Xc, (v * beta[:, None]).to(v.dtype), DOT))


def wy_corrected(W, U0, UN, S, i_bh, rows, r_ok, k_off, k_ok, v_off, v_ok, T, DK: tl.constexpr, DV: tl.constexpr,
                 F64: tl.constexpr, DOT: tl.constexpr):
    """``U = U0 - W h_n`` of a chunk against the state block ``S`` entering it: stored in ``UN`` and returned in the
    compute dtype."""
    w = load_rows(W + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    u0 = load_rows(U0 + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
    u = to_acc(u0, F64) - mm(w, S.to(w.dtype), DOT)
    store_rows(UN + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, u)
    return u


def wy_state_du(DU, dh, kel, i_bh, rows, r_ok, v_off, v_ok, T, DV: tl.constexpr, DOT: tl.constexpr):
    """The reverse state pass's ``dU`` of a chunk, ``dh`` the gradient of the state leaving it: adds the state's part,
    ``kel dh`` (``kel`` the keys times their decay to the chunk's end), to the chunk-local part in ``DU``; stored
    there and returned."""
    du_at = DU + i_bh * T * DV
    du = load_rows(du_at, rows, r_ok, v_off, v_ok, DV) + mm(kel, dh.to(kel.dtype), DOT)
    store_rows(du_at, rows, r_ok, v_off, v_ok, DV, du)
    return du


def wy_state_dh(W, dh_decayed, qe, do, du, i_bh, rows, r_ok, k_off, k_ok, T, DK: tl.constexpr, DOT: tl.constexpr):
    """The gradient of the state entering a chunk: ``dh_decayed + qe^T dO - W^T dU`` (``qe`` the queries times their
    decay from the chunk's start and the scale)."""
    w = load_rows(W + i_bh * T * DK, rows, r_ok, k_off, k_ok, DK)
    return dh_decayed + mm(tl.trans(qe), do, DOT) - mm(tl.trans(w), du.to(w.dtype), DOT)


def wy_value_grads(V, DU, DV_, Xt, beta, dT, i_bh, kv_bh, rows, r_ok, T, DV: tl.constexpr, BV: tl.constexpr,
                   C: tl.constexpr, F64: tl.constexpr, DOT: tl.constexpr):
    """The WY backward over the Dv blocks (``dU0 = dU``; ``Xt`` the chunk's ``T^T``): adds ``dU (diag(beta) V)^T`` to
    ``dT``, stores ``dv = diag(beta) T^T dU`` (per query head) and returns ``(dT, sum_c (T^T dU)_tc v_tc)``, the
    second the rate's value term."""
    dbeta = acc_zeros([C], F64)
    for v0 in range(0, DV, BV):
        v_off, v_ok = dim_tile(v0, DV, BV)
        v = load_rows(V + kv_bh * T * DV, rows, r_ok, v_off, v_ok, DV)
        du = load_rows(DU + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV).to(v.dtype)
        dT += mm(du, tl.trans((v * beta[:, None]).to(v.dtype)), DOT)
        dvb = mm(Xt, du, DOT)
        store_rows(DV_ + i_bh * T * DV, rows, r_ok, v_off, v_ok, DV, dvb * beta[:, None])
        dbeta += tile_sum(dvb * to_acc(v, F64), 1)
    return dT, dbeta
