"""The score tile's lines: from ``qk`` (q.k) to the scores ``s`` in log2 units, as the three
kernels compute them on a (Q tile, KV tile) pair: scale, softcap, bias, FoX decay, then on PARTIAL
tiles the pattern's mask and the routing selection (FULL tiles mask padded slots only); and the
per-head and per-query constants those terms read.
"""

from __future__ import annotations

from ...analysis.route_blocks import WORD_BITS
from . import paged_lines
from .exprs import INT32_MAX, LN2, LOG2E
from .tiles import block_size, edge_padded


def broadcast_axes(tr: bool) -> tuple[str, str]:
    """How a query vector and a key vector broadcast to a score tile: queries down the rows and keys
    along the columns, or (``tr``, the dK/dV kernel's S^T) the other way round."""
    return ("[None, :]", "[:, None]") if tr else ("[:, None]", "[None, :]")


def scale_in_exponent(pat) -> bool:
    """Whether the forward's scores are q.k times the scale and nothing else (no softcap, bias or decay
    term; a mask only takes scores out). Its kernel then takes ``POS_SCALE``: for a positive scale, the
    scores stay in q.k units through the tile's mask and row max, and the scale enters with the
    exponent, one FMA a score (``exp2(qk * c - m)``) rather than a multiply and a subtraction. The row
    max is the same number either way: a positive factor keeps the order, and rounding is monotone."""
    return pat.softcap is None and pat.bias is None and pat.decay is None and pat.weights is None


#: ``weights F(s) ** P``: the logarithm of F of ``wx`` (the score in natural units) and its derivative, as Triton
#: expressions (``compiler.analysis.weights`` holds the same formulas in torch). The sigmoid's log1p is log(1 + .), exact to
#: float32's rounding of 1 + e^-|x| (a term next to min(x, 0)); softplus takes the lines of ``WEIGHT_PRELUDE``.
WEIGHT_LINES = {
    "exp": ("wx", "1.0"),
    "sigmoid": ("tl.minimum(wx, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(wx)))", "1.0 / (1.0 + tl.exp(wx))"),
    "softplus": ("tl.where(wx < -80.0, wx, tl.log(tl.where(wx < -80.0, 1.0, wsp)))",
                 "tl.where(wx < -80.0, 1.0, 1.0 / ((1.0 + tl.exp(-wx)) * wsp))"),
    "relu": ('tl.where(wx > 0.0, tl.log(tl.where(wx > 0.0, wx, 1.0)), float("-inf"))',
             "tl.where(wx > 1e-30, 1.0 / tl.where(wx > 1e-30, wx, 1.0), 0.0)"),
}


#: Lines a weight function's expressions read. softplus(x) = max(x, 0) + log1p(e^-|x|), with log1p(u) as
#: log(1 + u) * u / ((1 + u) - 1) (u where 1 + u rounds to 1): exact to float32's rounding where e^x is the whole
#: of it, below x = -17 (log(1 + u) there is 0, and the weight's logarithm and derivative were -inf and a NaN).
WEIGHT_PRELUDE = {
    "softplus": ["we = tl.exp(-tl.abs(wx))",
                 "w1 = 1.0 + we",
                 "wsp = tl.maximum(wx, 0.0) + tl.where(w1 == 1.0, we, tl.log(w1) * (we / (w1 - 1.0)))  # softplus(wx)"],
}


class ScoreLines:
    """Lines of the score terms, a part of ``compiler.codegen.triton.source.KernelSource``: reads its pattern
    (``pat``), shape, inputs, printed mask and bias (``mask_inputs``, ``bias_text``,
    ``bias_coef``, ``bias_head_text``, ``checks``...) and routing words."""

    # ------------------------------------------------------------ arguments of _mask and _bias
    def _call_args(self, which: list[int], tr: bool = False) -> str:
        """Arguments of ``_mask``/``_bias``: positions broadcast to the tile (queries down the rows,
        keys along the columns; ``tr``: the transposed tile of the dK/dV kernel), head, inputs."""
        cast = ".to(tl.int64)" if self.wide_math else ""
        qx, kx = broadcast_axes(tr)
        pos = [f"q_tok{cast}{qx}", f"k_tok{cast}{kx}"]
        pos += [f"q_c{i}{cast}{'' if i in self.q_uniform else qx}" for i in range(len(self.q_axes))]
        pos += [f"k_c{i}{cast}{'' if i in self.k_uniform else kx}" for i in range(len(self.k_axes))]
        return ", ".join(pos + [self._head_call_args(which)])

    def _head_call_args(self, which: list[int]) -> str:
        """The head and the inputs ``which`` (pointers at this batch element, strides)."""
        args = ["h.to(tl.int64)" if self.wide_math else "h"]
        for slot in self.inputs.values():
            if slot.index in which:
                args += [f"IN{slot.index} + batch.to(tl.int64) * in{slot.index}_sb", *slot.strides(), *slot.extents()]
        return ", ".join(args)

    # ------------------------------------------------------------ the terms
    def _k_padding(self) -> bool:
        """Whether some KV tile has padded slots (past the block's slots or the grid's edge)."""
        s = self.shape
        return (block_size(s.kv_slots) != s.kv_slots or self.block  # a block's keys: any length
                or any(L % t for L, t in zip(s.kv_extents, s.kv_tile, strict=True)))

    def _terms(self, masked: bool, grad: bool, tr: bool = False, paged: bool = False) -> list[str]:
        """The scores ``s`` from ``qk`` (q.k), in log2 units (times log2(e): the softmax takes exp2):
        scale, softcap, bias, decay; then the mask (PARTIAL tiles). ``tr``: the transposed tile of the
        dK/dV kernel (keys down the rows). With checked bias indices the attended pairs are computed
        first: the bias checks them there. The forward of a pattern whose scores are the scaled q.k
        alone (``scale_in_exponent``) scales by ``s_now``: 1 under ``POS_SCALE``, its exponent applies
        the scale (``s_exp``)."""
        p = self.pat
        qx, kx = broadcast_axes(tr)
        lines = []
        mask_lines = []
        if masked:
            mask_lines += ["# PARTIAL tile: the pattern's mask",
                           f"allowed = k_ok{kx} & _mask({self._call_args(self.mask_inputs, tr)}"
                           f"{self.mask_extra_args()})"]
            if p.route is not None:  # (``paged``: attnc_fwd_paged's selection, each packed row its own)
                mask_lines += paged_lines.route_lines(self.paged_route()) if paged else self._route_query_lines(tr)
        if self.checks:
            lines += mask_lines
            lines.append(f"pairs = allowed & q_ok{qx}  # the attended pairs" if masked else
                         f"pairs = q_ok{qx} & k_ok{kx}  # FULL tile: every valid pair is attended")
        if p.softcap is not None:
            lines += ["# softcap: cap * tanh(scale * qk / cap), in log2 units (cap_l2, tanh_c: per head)",
                      "t = _softcap_tanh(qk * tanh_c)",
                      "s = cap_l2 * t"]
        elif not grad and scale_in_exponent(p):
            lines.append("s = qk * s_now  # log2 units, or q.k units where the exponent applies the scale")
        else:
            lines.append("s = qk * scale_l2  # scale * log2(e): scores in log2 units")
        if self.bias_text is not None:
            check = f", pairs, ERR, {not grad}" if self.checks else ""
            q_pk = ""  # a table of the present queries' rows: read at the query's row in q
            if self.bias_reads_query_rows():
                q_pk = f", (q_first + q_row){qx}" if paged else f", q_tok{qx}"
            lines += [f"# bias term, times log2(e){' and its head-only factor' if self.bias_head_text else ''}",
                      f"s = s + {self.bias_coef} * _bias({self._call_args(self.bias_inputs, tr)}{q_pk}{check})"]
        if p.decay is not None and paged:  # each packed row its own head: its head's sums at the tile's keys
            lines += ["# FoX decay sum(g[k+1 .. q]) of each row's head: prefix sums split as hi + lo (exact at any",
                      "# length), -inf for keys before the query's last reset (a gate of -inf)",
                      "at_k = dc_row[:, None] + k_tok[None, :]",
                      "kc_hi = tl.load(DC + at_k, mask=q_ok[:, None] & k_ok[None, :], other=0.0)",
                      "kc_lo = tl.load(DC + at_k + dc_lo, mask=q_ok[:, None] & k_ok[None, :], other=0.0)",
                      "fox = (dc_q[:, None] - kc_hi) + (dl_q[:, None] - kc_lo)",
                      f's = s + {LOG2E!r} * tl.where(k_tok[None, :] >= dr_q[:, None], fox, float("-inf"))']
        elif p.decay is not None:
            lines += ["# FoX decay sum(g[k+1 .. q]): prefix sums split as hi + lo (exact at any length),",
                      "# -inf for keys before the query's last reset (a gate of -inf)",
                      "kc_hi = tl.load(DC + dc_base + k_tok, mask=k_ok, other=0.0)",
                      "kc_lo = tl.load(DC + dc_base + dc_lo + k_tok, mask=k_ok, other=0.0)",
                      f"fox = (dc_q{qx} - kc_hi{kx}) + (dl_q{qx} - kc_lo{kx})",
                      f's = s + {LOG2E!r} * tl.where(k_tok{kx} >= dr_q{qx}, fox, float("-inf"))']
        if p.weights is not None:
            lines += self._weight_lines(grad)
        if masked and not self.checks:
            lines += mask_lines
        keep = self._kept(masked, tr)
        if keep is None:
            lines.append("# FULL tile: no mask code")
        elif grad:  # P = exp2(s - lse) is recomputed: 0 where not kept (``recomputed_p``), one select a score
            lines.append(f"# pairs not in {keep}: P = 0, selected after the exponential" if masked or not tr else
                         "# this KV tile's padded keys: rows not stored (P^T = 0 below where dQ sums over them)")
        elif masked or not self._k_edge_only():
            if not masked:
                lines.append("# FULL tile: only the padded slots are masked")
            lines.append(f's = tl.where({keep}, s, float("-inf"))')
        else:
            lines += ["if k_edge:  # FULL tile at the grid's edge: its padded slots masked (the others branch past)",
                      f'    s = tl.where({keep}, s, float("-inf"))']
        return lines

    def _weight_lines(self, grad: bool) -> list[str]:
        """``weights F(s) ** P``: the scores become ``log2(F(x) ** P)`` of the natural-unit score ``x``, the softmax of
        which the kernels take; the backward also keeps ``wd``, their derivative (in log2 units on both sides, the
        same number as P (log F)'(x)), which dS is multiplied by."""
        w = self.pat.weights
        power = float(w.power)
        log_f, dlog_f = WEIGHT_LINES[w.function]
        lines = [f"# weights {w.describe()}: the scores become their base-2 logarithms (wx: the score in natural units)",
                 f"wx = s * {LN2!r}", *WEIGHT_PRELUDE.get(w.function, ()),
                 f"s = {power * LOG2E!r} * ({log_f})"]
        if grad:
            lines.append(f"wd = {power!r} * ({dlog_f})  # d s / d(score before the weights)")
        return lines

    def _k_edge_only(self) -> bool:
        """Whether only KV tiles at the grid's far edges have padded slots (``k_edge`` says which)."""
        if self.block:  # a block's keys, any length: its last tile may be part-filled
            return block_size(self.shape.kv_slots) == self.shape.kv_slots
        return edge_padded(self.shape.kv_extents, self.shape.kv_tile)

    def _kept(self, masked: bool, tr: bool = False) -> str | None:
        """The pairs whose scores a tile keeps: the pattern's mask on PARTIAL tiles (``allowed``), the keys
        inside the grid on FULL tiles with padded slots; None: every pair."""
        if masked:
            return "allowed"
        return f"k_ok{broadcast_axes(tr)[1]}" if self._k_padding() else None

    def recomputed_p(self, name: str, masked: bool, lse: str, tr: bool = False) -> list[str]:
        """Lines recomputing the backward's P (or P^T, ``tr``) as ``name`` from the scores ``s`` and the row's
        ``lse`` in log2 units, 0 where the tile does not keep a pair. Selecting after the exponential (not -inf
        before it) leaves the score's scale and subtraction one FMA. Every padded FULL tile of the dQ kernel
        selects: a branch around the select (the forward's ``k_edge``) had Triton move the P tile through shared
        memory (sm_90: fewer wgmma, a barrier per step). The dK/dV kernel's padded keys are its own tile's rows,
        which it never stores: it selects only where dQ sums over them (``ATOMIC_DQ``, a constant)."""
        keep = self._kept(masked, tr)
        p = f"tl.exp2(s - {lse})"
        what = "P^T" if tr else "P"
        if keep is None:
            return [f"{name} = {p}  # {what}, recomputed"]
        if tr and not masked:
            return [f"{name} = {p}  # {what}, recomputed",
                    "if ATOMIC_DQ:  # dQ sums over this tile's keys: 0 on its padded ones",
                    f"    {name} = tl.where({keep}, {name}, 0.0)"]
        return [f"{name} = tl.where({keep}, {p}, 0.0)  # {what}, recomputed"]

    # ------------------------------------------------------------ routing
    def _route_key_lines(self) -> list[str]:
        """Routing, per KV tile: each key's block, and where the tile's blocks are in a query's
        selection words (``runtime.plan.routing.selection_words``: bit b % 32 of word b // 32)."""
        # a block's selection and key blocks are its own rows' (codegen: ``sel_q``, ``sel_k``)
        lines = [f"kb = tl.load(KEY_BLOCK + {self.sel_k}, mask=k_ok, other=0)  # each key's block"]
        if self.route_one_block:
            lines += ["# the tile lies in one block: bit b0 % 32 of word b0 // 32",
                      f"b0 = tl.reduce(tl.where(k_ok, kb, {INT32_MAX}), 0, _minimum)"]
        elif self.route_words:
            lines += [f"# the tile's blocks span at most {WORD_BITS + 1}: they lie in the words w0 and w0 + 1",
                      f"w0 = tl.reduce(tl.where(k_ok, kb, {INT32_MAX}), 0, _minimum) // {WORD_BITS}",
                      f"kbit = tl.where(k_ok, kb - {WORD_BITS} * w0, 0)  # bit of the key's block in (w0, w0 + 1)"]
        return lines

    def _route_query_lines(self, tr: bool) -> list[str]:
        """Routing on a PARTIAL tile: only the key blocks the query selected."""
        qx, kx = broadcast_axes(tr)
        if self.route_one_block:
            return ["# routing: only the key blocks this query selected (one bit per query for this tile)",
                    f"sel = tl.load(SEL + sel_base + {self.sel_q} * sel_n + b0 // {WORD_BITS}, mask=q_ok, other=0)",
                    f"allowed = allowed & (((sel >> (b0 % {WORD_BITS})) & 1) != 0){qx}"]
        if self.route_words:
            return ["# routing: only the key blocks this query selected (two words of its selection)",
                    f"sel_lo = tl.load(SEL + sel_base + {self.sel_q} * sel_n + w0, mask=q_ok, other=0)",
                    f"sel_hi = tl.load(SEL + sel_base + {self.sel_q} * sel_n + w0 + 1, mask=q_ok, other=0)",
                    f"word = tl.where(kbit{kx} < {WORD_BITS}, sel_lo{qx}, sel_hi{qx})",
                    f"allowed = allowed & (((word >> (kbit{kx} & {WORD_BITS - 1})) & 1) != 0)"]
        return ["# routing: only the key blocks this query selected (the word of each key's block: the",
                f"# blocks of a KV tile spread over more than {WORD_BITS + 1} here)",
                f"word = tl.load(SEL + sel_base + {self.sel_q}{qx} * sel_n + kb{kx} // {WORD_BITS},",
                f"               mask=q_ok{qx} & k_ok{kx}, other=0)",
                f"allowed = allowed & (((word >> (kb{kx} % {WORD_BITS})) & 1) != 0)"]

    # ------------------------------------------------------------ constants per head and per query
    def _head_setup(self) -> list[str]:
        """Per head, once: the constants of the score terms."""
        lines = []
        if self.pat.softcap is not None:
            lines += ["cap = tl.load(SOFTCAP + h)  # this head's softcap",
                      f"cap_l2 = cap * {LOG2E!r}  # cap * tanh(x) in log2 units",
                      "tanh_c = scale / cap  # tanh(scale * qk / cap) = _softcap_tanh(qk * tanh_c)"]
        if self.bias_head_text is not None:
            lines.append(f"bias_c = _bias_head({self._head_call_args(self.head_inputs)})")
        return lines

    def _per_query_setup(self) -> list[str]:
        """Per (batch, head) of a Q tile's program (forward, dQ): the head's constants, the bases
        of the FoX sums and routing selections, and the Q tile's own FoX values."""
        lines = self._head_setup()
        p = self.pat
        if p.decay is not None:
            lines += ["dc_base = batch.to(tl.int64) * dc_b + h.to(tl.int64) * dc_h",
                      "dr_base = batch.to(tl.int64) * dr_b + h.to(tl.int64) * dr_h",
                      *self._per_query_setup_q()]
        if p.route is not None:
            lines.append("sel_base = batch.to(tl.int64) * sel_b + h.to(tl.int64) * sel_h")
        return lines

    def _per_query_setup_k(self) -> list[str]:
        """Per query head of a KV tile's program (dK/dV): as ``_per_query_setup`` but for the Q
        tiles' FoX values, loaded per Q tile (``_per_query_setup_q``)."""
        lines = self._head_setup()
        if self.pat.decay is not None:
            lines += ["dc_base = batch.to(tl.int64) * dc_b + h.to(tl.int64) * dc_h",
                      "dr_base = batch.to(tl.int64) * dr_b + h.to(tl.int64) * dr_h"]
        if self.pat.route is not None:
            lines.append("sel_base = batch.to(tl.int64) * sel_b + h.to(tl.int64) * sel_h")
        return lines

    def _per_query_setup_q(self) -> list[str]:
        """The Q tile's FoX values: prefix sums (hi, lo) and last reset of each query."""
        if self.pat.decay is not None:
            return ["dc_q = tl.load(DC + dc_base + q_tok, mask=q_ok, other=0.0)  # FoX prefix sums (hi, lo)",
                    "dl_q = tl.load(DC + dc_base + dc_lo + q_tok, mask=q_ok, other=0.0)",
                    "dr_q = tl.load(DR + dr_base + q_tok, mask=q_ok, other=-1)  # the query's last reset"]
        return []
