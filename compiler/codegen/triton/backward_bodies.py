"""The backward kernels' bodies (the seam: what recomputes P and propagates dO): ``attnc_bwd_delta`` (the row term
``rowsum(dO * O) - dlse``, one read of each), ``attnc_bwd_dq`` (dQ over the forward's tile lists) and
``attnc_bwd_dkdv`` (dK, dV over the transposed lists; with ``ATOMIC_DQ`` also dQ, added by atomics, and no dQ kernel
runs): their parameters, program setup, loads, loops and epilogues. A mixin of ``KernelSource`` beside
``kernels.KernelBodies`` (the forward's), which it shares the loops and loads of."""

from __future__ import annotations

from .exprs import LOG2E
from .kernels import KV_LOADS, by_descriptor, kernel_def, kv_loads, list_loop, list_tile, nested
from .params import BLOCKS, GRID_Y0, ROW_TERMS, SIZES, K, Q, V, grid_y, run_params, tile_list
from .signature import Param, constexprs, group, tensor, value


class BackwardBodies:
    """The backward kernels of a module (mixed into ``KernelSource``)."""

    def _bwd_scores(self, masked: bool) -> list[str]:
        """Recompute P of one (Q tile, KV tile) pair and dS (the dQ kernel)."""
        lines = ["qk = _dot(q, tl.trans(kk), DOT)", *self._terms(masked, grad=True),
                 *self.recomputed_p("pr", masked, "lse_l2[:, None]"),
                 "dp = _dot(do, tl.trans(vv), DOT)",
                 "ds = pr * (dp - delta[:, None])  # dL/d(score after terms)"]
        if self.pat.weights is not None:
            lines.append("ds = ds * wd  # through the weights: dL/d(score before them)")
        if self.pat.softcap is not None:
            lines.append("ds_raw = ds * (1.0 - t * t)  # through the softcap")
        else:
            lines.append("ds_raw = ds")
        return lines

    def _bwd_scores_t(self, masked: bool) -> list[str]:
        """Recompute P^T and dS^T of one (KV tile, Q tile) pair and add P^T dO to dV (the dK/dV kernel):
        from S^T = K Q^T and dP^T = V dO^T, so that P^T and dS^T are the left operands of dV and dK as
        they are (no transpose in registers)."""
        lines = ["if QT_VIEW:  # Q^T, dO^T: transposed views of the tiles in shared memory (wgmma, sm_90+)",
                 "    q_t = tl.trans(q)",
                 "    do_t = tl.trans(do)",
                 "else:  # loaded on their own (mma.sync: a tile transposed in registers is held whole by every warp)",
                 "    q_t = tl.load(q_base + q_row[None, :] * sq_n + d[:, None], mask=q_ok[None, :] & (d[:, None] < D), other=0.0)",
                 "    do_t = tl.load(do_base + q_row[None, :] * sdo_n + dv[:, None], mask=q_ok[None, :] & (dv[:, None] < DV),",
                 "                   other=0.0)",
                 "# the transposed tile: this program's keys down the rows, the Q tile's queries along the columns",
                 "qk = _dot(kk, q_t, DOT)  # K Q^T", *self._terms(masked, grad=True, tr=True),
                 *self.recomputed_p("pt", masked, "lse_l2[None, :]", tr=True),
                 "dvacc += _dot(pt.to(do.dtype), do, DOT)  # dV += P^T dO",
                 "dpt = _dot(vv, do_t, DOT)  # dP^T = V dO^T",
                 "dst = pt * (dpt - delta[None, :])  # dS^T: dL/d(score after terms)"]
        if self.pat.weights is not None:
            lines.append("dst = dst * wd  # through the weights: dL/d(score before them)")
        if self.pat.softcap is not None:
            lines.append("dst_raw = dst * (1.0 - t * t)  # through the softcap")
        else:
            lines.append("dst_raw = dst")
        return lines

    def _load_q_side(self) -> list[str]:
        return [
            *by_descriptor([
                "q = tl.load(q_base + q_row[:, None] * sq_n + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)",
                "do = tl.load(do_base + q_row[:, None] * sdo_n + dv[None, :], mask=q_ok[:, None] & (dv[None, :] < DV),",
                "             other=0.0)"], [
                f"q = QD.load([{self._box('q', 'qt')}]).reshape(BLOCK_M, BLOCK_D)",
                f"do = DOD.load([{self._box('q', 'qt')}]).reshape(BLOCK_M, BLOCK_DV)"]),
            "# the lse in log2 units, +inf on rows with no allowed key (the row term's): P = 0 there and on padded rows",
            'lse_l2 = tl.load(LSE2 + batch.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + q_row, mask=q_ok,',
            '                 other=float("inf"))',
            "delta = tl.load(DELTA + batch.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + q_row, mask=q_ok, other=0.0)",
        ]

    def _backward_delta(self) -> str:
        """The backward's pre-pass, in token order (before any permutation into tiles): one read of O
        and dO each (any strides, any float dtype), fp32 sums; the gradient of a returned lse
        (``HAS_DLSE``) enters here. It also gives the lse in log2 units with +inf for rows without a key
        (``LSE2``), which the dQ and dK/dV kernels read as it is: the dK/dV kernel loads a Q tile's lse in
        every step of its loops, where converting it took three instructions a score."""
        params = [tensor("O", "so_b", "so_h", "so_n", "so_d"), tensor("DO", "sdo_b", "sdo_h", "sdo_n", "sdo_d"),
                  tensor("DLSE", "sdl_b", "sdl_h", "sdl_n"), group("ROW_TERMS", "LSE2", "DELTA", "sd_b", "sd_h"),
                  tensor("LSE", "sll_b", "sll_h", "sll_n"), value("N"), value("DV"),
                  *constexprs("HAS_DLSE", "BLOCK_R", "BLOCK_DV"), GRID_Y0]
        body = [
            "rb = tl.program_id(0)  # a block of rows",
            grid_y("bh"),
            f"batch = (bh // {self.bound.heads}).to(tl.int64)",
            f"h = (bh % {self.bound.heads}).to(tl.int64)",
            "r = (rb * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)",
            "dv = tl.arange(0, BLOCK_DV)",
            "ok = r < N",
            "tile_ok = ok[:, None] & (dv[None, :] < DV)",
            "# any strides (a gradient may come expanded: all zero); a unit feature stride is specialised by Triton",
            "o = tl.load(O + batch * so_b + h * so_h + r[:, None] * so_n + dv[None, :] * so_d, mask=tile_ok, other=0.0)",
            "do = tl.load(DO + batch * sdo_b + h * sdo_h + r[:, None] * sdo_n + dv[None, :] * sdo_d, mask=tile_ok,",
            "             other=0.0)",
            "delta = tl.reduce(o.to(tl.float32) * do.to(tl.float32), 1, _add)",
            "if HAS_DLSE:  # the lse's own gradient: d loss / d score gains + P * dlse",
            "    delta -= tl.load(DLSE + batch * sdl_b + h * sdl_h + r * sdl_n, mask=ok, other=0.0).to(tl.float32)",
            "tl.store(DELTA + batch * sd_b + h * sd_h + r, delta, mask=ok)",
            "lse = tl.load(LSE + batch * sll_b + h * sll_h + r * sll_n, mask=ok, other=0.0).to(tl.float32)",
            f'tl.store(LSE2 + batch * sd_b + h * sd_h + r, tl.where(lse == float("-inf"), float("inf"), lse) * {LOG2E!r},',
            "         mask=ok)",
        ]
        return kernel_def("attnc_bwd_delta", params,
                          "Backward pre-pass: delta = rowsum(dO * O) - dlse and lse * log2(e), fp32, per (row block, "
                          "batch x head).", body)

    def _row_sums(self) -> bool:
        """Whether a backward may sum dS per query and per key (``ROW_SUMS``: a FoX decay's gate gradient); else the
        kernels have no such lines (the constexpr would fold them away) and take no such buffers."""
        return self.pat.decay is not None

    @staticmethod
    def _bwd_params() -> list[Param]:
        """What both backward kernels stream: q, k, v, dO and the row terms."""
        return [Q, K, V, tensor("DO", "sdo_b", "sdo_h", "sdo_n"), ROW_TERMS]

    def _backward_dq(self) -> str:
        params = [*self._bwd_params(), tensor("DQ", "sdq_b", "sdq_h", "sdq_n"), tensor("DSQ", "sr_b", "sr_h"),
                  tensor("DS", "ds_w"), *self._grad_params(), *self._common_params(),
                  *(value(name) for name in ("ORDER", "QD", "KD", "VD", "DOD")), *SIZES, *BLOCKS,
                  *constexprs("ROW_SUMS", "STORE_DS", "ADD_GRADS = False", "ORDERED = False"),
                  *run_params("FULL", "PART"),
                  *constexprs("DESC = False"), GRID_Y0]
        first, ordered = self._q_tile_of_program()
        body = [
            *first,
            grid_y("bh"),
            f"batch = bh // {self.bound.heads}",
            f"h = bh % {self.bound.heads}",
            "cls = batch * cls_b + h * cls_h",
            "kvh = h // GROUP",
            *ordered,
            *self._tiles("q", "qt"),
            "d = tl.arange(0, BLOCK_D)",
            "dv = tl.arange(0, BLOCK_DV)",
            "q_base = Q + batch.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h",
            "do_base = DO + batch.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h",
            "k_base = K + batch.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h",
            "v_base = V + batch.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h",
            *self._load_q_side(),
            f"scale_l2 = scale * {LOG2E!r}  # scores in log2 units: P = exp2(s - lse_l2)",
            *self._per_query_setup(),
            "dq = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)",
            *(["ds_rows = tl.full([BLOCK_M], 0.0, tl.float32)  # sum over keys of dS (gradient of the decay gates)"]
              if self._row_sums() else []),
            *([f"ds_pair = (bh.to(tl.int64) * {self.shape_tiles_q()} + qt) * ds_w  # first dS slot of this Q tile"]
              if self._stores_ds() else []),
        ]
        for kind, masked, offset in (("FULL", False, "0"), ("PART", True, "full_w")):
            body += [
                "",
                f"# ---- {'FULL' if not masked else 'PARTIAL'} KV tiles",
                *list_loop(kind, self.shape_tiles_q(), "qt"),
            ]
            loop = [*list_tile(kind, "kt"), *self._tiles("k", "kt"),
                    *(self._route_key_lines() if masked and self.pat.route is not None else []),
                    *kv_loads(self._box("k", "kt")),
                    *self._bwd_scores(masked),
                    *(["if ROW_SUMS:",
                       "    ds_rows += tl.reduce(ds, 1, _add)"] if self._row_sums() else []),
                    *(["if STORE_DS:  # dS of this pair, for the bias inputs' gradients on the host (deterministic)",
                       f"    slot_ds = DS + (ds_pair + {offset} + j) * (BLOCK_M * BLOCK_N)",
                       "    tl.store(slot_ds + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], ds)"]
                      if self._stores_ds() else []),
                    *(["if ADD_GRADS:  # the pass of the bias inputs' gradients (fp32 atomics), no dQ: beside its",
                       "    # accumulator the scatter spilled (172 B at d 128 on sm_90, 1.6 KB on sm_100)",
                       f"    {self._grad_call()}",
                       "else:",
                       "    dq += _dot(ds_raw.to(kk.dtype), kk, DOT)"] if self._stores_ds() else
                      ["dq += _dot(ds_raw.to(kk.dtype), kk, DOT)"])]
            body += nested(loop)
        stores = [
            "dq = dq * scale",
            "dq_base = DQ + batch.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h",
            "tl.store(dq_base + q_row[:, None] * sdq_n + d[None, :], dq.to(DQ.dtype.element_ty),",
            "         mask=q_ok[:, None] & (d[None, :] < D))",
            *(["if ROW_SUMS:",
               "    tl.store(DSQ + batch.to(tl.int64) * sr_b + h.to(tl.int64) * sr_h + q_tok, ds_rows, mask=q_ok)"]
              if self._row_sums() else []),
        ]
        body += ["", *(["if not ADD_GRADS:  # (the gradients' pass stores no dQ)", *nested(stores)]
                       if self._stores_ds() else stores)]
        return kernel_def("attnc_bwd_dq", params,
                          "Backward, query side: one program per (Q tile, batch x query head).", body)

    def _backward_dkdv(self) -> str:
        params = [*self._bwd_params(), tensor("DK", "sdk_b", "sdk_h", "sdk_n", "sdk_s"),
                  tensor("DV_", "sdv_b", "sdv_h", "sdv_n", "sdv_s"), tensor("DSK", "sr_b", "sr_h"),
                  tensor("DQA", "sdqa_b", "sdqa_h", "sdqa_n"), tile_list("T_FULL"), tile_list("T_PART"),
                  *self._common_params(), value("ORDER"), value("QD"), value("DOD"), *SIZES, *BLOCKS,
                  *constexprs("ROW_SUMS", "QT_VIEW = False", "ORDERED = False"), *run_params("T_FULL", "T_PART"),
                  *constexprs("DESC = False", "SPLIT = 1", "SHARE = 1", "ATOMIC_DQ = False"), GRID_Y0]
        nk = self.shape_tiles_k()
        body = [
            "if ORDERED:  # launched longest first (compiler.cost.launch_order): KV tiles by their Q tile count",
            "    kt = tl.load(ORDER + tl.program_id(0))  # one order for every head (one list class)",
            "else:",
            "    kt = tl.program_id(0)  # the KV tile",
            "# SPLIT programs per (KV tile, K/V head), each over its share of the query heads sharing it;",
            "# with more than one, each stores fp32 partials of dK and dV at its share's offset (summed after)",
            grid_y("bkv_part"),
            "bkv = bkv_part // SPLIT",
            "part = bkv_part % SPLIT",
            f"batch = bkv // ({self.bound.heads} // GROUP)",
            f"kvh = bkv % ({self.bound.heads} // GROUP)",
            *self._tiles("k", "kt"),
            "d = tl.arange(0, BLOCK_D)",
            "dv = tl.arange(0, BLOCK_DV)",
            "k_base = K + batch.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h",
            "v_base = V + batch.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h",
            *KV_LOADS,
            f"scale_l2 = scale * {LOG2E!r}  # scores in log2 units: P^T = exp2(s - lse_l2)",
            *(self._route_key_lines() if self.pat.route is not None else []),
            "dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)",
            "dvacc = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)",
            "# the query heads sharing this K/V head (this program's share), one after the other (dK, dV: no atomics)",
            "for g_i in range(0, SHARE):  # SHARE = GROUP // SPLIT, a constant: with 1 no loop is left",
        ]
        inner = [
            "h = kvh * GROUP + part * SHARE + g_i",
            "cls = batch * cls_b + h * cls_h",
            "q_base = Q + batch.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h",
            "do_base = DO + batch.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h",
            *self._per_query_setup_k(),
            *(["ds_cols = tl.full([BLOCK_N], 0.0, tl.float32)  # sum over queries of dS (gradient of the decay gates)"]
              if self._row_sums() else []),
        ]
        for kind, masked in (("T_FULL", False), ("T_PART", True)):
            inner += [
                f"# ---- Q tiles for which this KV tile is {'FULL' if not masked else 'PARTIAL'}",
                *list_loop(kind, nk, "kt"),
            ]
            loop = [*list_tile(kind, "qt"), *self._tiles("q", "qt"), *self._load_q_side(),
                    *self._per_query_setup_q(),
                    *self._bwd_scores_t(masked),
                    "dk += _dot(dst_raw.to(q.dtype), q, DOT)  # dK += dS^T Q",
                    *(["if ROW_SUMS:",
                       "    ds_cols += tl.reduce(dst, 1, _add)"] if self._row_sums() else []),
                    "if ATOMIC_DQ:  # the backward in one kernel: dQ += dS K, added to the fp32 dQ (no dQ kernel)",
                    "    dqa = _dot(tl.trans(dst_raw).to(kk.dtype), kk, DOT) * scale",
                    "    dqa_base = DQA + batch.to(tl.int64) * sdqa_b + h.to(tl.int64) * sdqa_h",
                    "    tl.atomic_add(dqa_base + q_row[:, None] * sdqa_n + d[None, :], dqa,",
                    "                  mask=q_ok[:, None] & (d[None, :] < D), sem=\"relaxed\")"]
            inner += nested(loop)
        if self._row_sums():
            inner += ["if ROW_SUMS:",
                      "    tl.store(DSK + batch.to(tl.int64) * sr_b + h.to(tl.int64) * sr_h + k_tok, ds_cols, mask=k_ok)"]
        body += nested(inner)
        body += [
            "",
            "dk = dk * scale",
            "tl.store(DK + part.to(tl.int64) * sdk_s + batch.to(tl.int64) * sdk_b + kvh.to(tl.int64) * sdk_h",
            "         + k_row[:, None] * sdk_n + d[None, :],",
            "         dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (d[None, :] < D))",
            "tl.store(DV_ + part.to(tl.int64) * sdv_s + batch.to(tl.int64) * sdv_b + kvh.to(tl.int64) * sdv_h",
            "         + k_row[:, None] * sdv_n + dv[None, :],",
            "         dvacc.to(DV_.dtype.element_ty), mask=k_ok[:, None] & (dv[None, :] < DV))",
        ]
        return kernel_def("attnc_bwd_dkdv", params,
                          "Backward, key side: SPLIT programs per (KV tile, batch x K/V head).", body)
