"""The forward kernels' bodies (the seam: what computes out and lse): ``attnc_fwd`` (FlashAttention-2 online softmax
over the FULL and PARTIAL KV tiles of each Q tile; with ``SPLIT_KV``, a share of them per split, whose partial out and
lse ``attnc_fwd_combine`` merges), ``attnc_fwd_grouped`` (a block's few rows with K/V heads shared: the query heads of
a K/V head packed in one tile, each K/V tile read once per group) and ``attnc_fwd_paged`` (the same over a paged
cache): their parameters, program setup, loads, the loops over each tile list and their epilogues; with the loop and
load helpers the backward's bodies share (``backward_bodies``). The score lines inside the loops are
``compiler.codegen.triton.scores``'s, the tile addressing ``compiler.codegen.triton.tiles``'s.
"""

from __future__ import annotations

import math

from ....core import ir
from . import paged_lines
from .exprs import LN2, LOG2E
from .params import (
    BLOCK_PARAMS,
    BLOCKS,
    FWD_OUT,
    GRID_Y0,
    SIZES,
    K,
    Q,
    V,
    grid_y,
    run_params,
    tile_list,
)
from .scores import scale_in_exponent
from .signature import Param, constexprs, group, opening, taken, tensor, value


def indent(lines: list[str], n: int) -> str:
    """Lines indented by ``n`` spaces, one per line (empty lines stay empty)."""
    pad = " " * n
    return "".join(pad + line + "\n" if line else "\n" for line in lines)


def kernel_def(name: str, params: list[Param], doc: str, body: list[str]) -> str:
    """A ``@triton.jit`` kernel's text (``signature``): the parameters its body reads, packed on lines of at most 110
    characters, a one-line docstring, its groups opened, the body. A run-time size (``Param.fixed``: a block's, a
    paged batch's, a block input's extent) is not specialized on: Triton would compile a kernel for each new value's
    divisibility by 16 (a decode step's length changes at every step)."""
    params = taken(params, body)
    fixed = [p.name for p in params if p.fixed]
    jit = f"@triton.jit(do_not_specialize={fixed})" if fixed else "@triton.jit"
    rows: list[str] = []
    for param in (p.text() for p in params):
        if rows and len(rows[-1]) + len(param) + 6 <= 110:
            rows[-1] += f" {param},"
        else:
            rows.append(f"{param},")
    return (f"\n\n{jit}\ndef {name}(\n" + indent(rows, 4) + "):\n"
            + f'    """{doc}"""\n' + indent([*opening(params), *body], 4))


def list_loop(kind: str, tiles: int, tile_var: str, warp_spec: bool = False, split: bool = False) -> list[str]:
    """The head of a loop over one tile list (``FULL``, ``PART``, ``T_FULL``, ``T_PART``) of the
    (batch, head) class ``cls`` and tile ``tile_var`` of ``tiles``: its length, its base, the first tile
    of a run (``{kind}_RUN``), ``for j``; ``warp_spec``: a loop Triton warp-specializes under ``WARP_SPEC``;
    ``split``: under ``SPLIT_KV`` the loop walks this program's share of the list (``split_share``)."""
    first = "j_lo" if split else "0"
    loop = (f"for j in tl.range({first}, n_list, warp_specialize=WARP_SPEC):" if warp_spec else
            f"for j in range({first}, n_list):")
    return [*list_bounds(kind, tiles, tile_var, "n_list", "list_base"),
            f"if {kind}_RUN:  # every list of this launch is one run of consecutive tiles",
            "    run_start = tl.load(list_base)",
            *(split_share() if split else []),
            loop]


def paged_list_loop(kind: str) -> list[str]:
    """The head of a loop over one tile list of ``attnc_fwd_paged``: the list of the Q tile's range (or pair of
    ranges) of query positions and class (``lrow``, made by the program's setup), cut at the row's KV tiles
    (``kv_limit``: its entries below it, by a binary search of the ascending list, ``_entries_below``), none for a
    Q tile past the row's queries; then its split share, as ``list_loop``'s."""
    return [f"list_base = {kind}_I + lrow.to(tl.int64) * {kind.lower()}_w",
            f"n_list = _entries_below(list_base, tl.load({kind}_N + lrow), kv_limit, {kind}_STEPS)",
            "n_list = tl.where(q_any, n_list, 0)  # a Q tile past the row's queries visits nothing",
            f"if {kind}_RUN:  # every list of this launch is one run of consecutive tiles",
            "    run_start = tl.load(list_base)",
            *split_share(),
            "for j in range(j_lo, n_list):"]


def split_share() -> list[str]:
    """The forward's split-KV share of a list (``SPLIT_KV``): split ``split`` of ``splits`` walks entries
    ``[n * split // splits, n * (split + 1) // splits)``, a contiguous range of nearly equal length, so the
    shares of every split cover the list once. The loop starts at the share's first entry (``j_lo``) and the
    body reads the list as before: moving the list's base and a run's first tile instead kept one more value
    live over the loop, which ptxas spilled (8 B, sm_80, d 64, Triton 3.9). Without ``SPLIT_KV``, ``j_lo`` is
    the constant 0 and the loop the one-program forward's."""
    return ["j_lo = 0  # the first entry walked",
            "if SPLIT_KV:  # flash decoding: this program's share of the list, a contiguous range of it",
            "    j_lo = n_list * split // splits",
            "    n_list = n_list * (split + 1) // splits  # the share's end"]


def list_bounds(kind: str, tiles: int, tile_var: str, count: str, base: str) -> list[str]:
    """``count``, the length of one tile list of class ``cls`` and tile ``tile_var`` of ``tiles``, and ``base``,
    the address of its first entry."""
    return [f"{count} = tl.load({kind}_N + cls * {tiles} + {tile_var})",
            f"{base} = {kind}_I + (cls * {tiles} + {tile_var}).to(tl.int64) * {kind.lower()}_w"]


def one_loop_applies(pat) -> bool:
    """Whether the forward may step through its FULL and PARTIAL KV tiles in one loop (``ONE_LOOP``), every
    tile masked as a PARTIAL one, for Triton's Hopper warp specialization: the same scores, since a FULL tile's
    mask holds on every pair of it. Not for a route, whose FULL tiles skip the selection words its PARTIAL tiles
    read; and only where the loop loads nothing but K and V, as that pass takes it (a decay's, a mask's or a bias
    input's loads in the loop failed to compile for sm_90: "unsupported load type for producer commit")."""
    return pat.route is None and pat.decay is None and not pat.inputs


def warp_specialized_form(pat, cc: int) -> str | None:
    """How the forward's KV loop is warp-specialized on compute capability ``cc`` (``KernelConfig.warp_specialize``,
    on TMA loads): ``"two loops"`` on Blackwell and later, its FULL and PARTIAL loops as they are, but for a softcap
    or a decay term (compiled for sm_100 on Triton 3.9, those forwards spilled 44-316 B at their fitted rung);
    ``"one loop"`` on Hopper, where ``one_loop_applies``; else None (not specialized)."""
    if cc >= 100:
        return "two loops" if pat.softcap is None and pat.decay is None else None
    if cc >= 90 and one_loop_applies(pat):
        return "one loop"
    return None


def list_tile(kind: str, tile_var: str, comment: str = "") -> list[str]:
    """The tile ``j`` of a list (the first line of a ``list_loop``'s body): ``run_start + j`` in a run, with
    no load in the loop, so that its K/V (or Q/dO) loads are affine and Triton's pipeline keeps its depth
    (offline, sm_90, Triton 3.6: a tile index loaded in the loop went through shared memory itself and
    left one K/V buffer fewer); else the index loaded from the list."""
    note = f"  # {comment}" if comment else ""
    return [f"if {kind}_RUN:",
            f"    {tile_var} = run_start + j{note}",
            "else:",
            f"    {tile_var} = tl.load(list_base + j){note}"]


KV_LOADS = [
    "kk = tl.load(k_base + k_row[:, None] * sk_n + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)",
    "vv = tl.load(v_base + k_row[:, None] * sv_n + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)"]


def by_descriptor(loads: list[str], boxes: list[str]) -> list[str]:
    """``loads`` (pointer loads of whole tiles), or with ``DESC`` the same tiles as boxes of their tensors'
    descriptors (TMA on Hopper and later: no address arithmetic, no masks; rows past the end, slots past the
    grid's edge and columns past the head dim read 0, as the masked loads' ``other``). A ``DESC`` launch has
    tiles of exactly ``BLOCK`` slots (``search.tma_fits``), each one box (``triton_tiles.box_tile``): a run of
    ``BLOCK`` memory rows, or a box of the grid in token order, read in the slots' row-major order."""
    return ["if DESC:  # TMA: each tile a box of its tensor's descriptor", *nested(boxes), "else:", *nested(loads)]


def kv_loads(box: str) -> list[str]:
    """The K and V tiles of ``kt`` (forward and dQ kernels); ``box``: the tile's descriptor coordinates."""
    return by_descriptor(KV_LOADS, [
        f"kk = KD.load([{box}]).reshape(BLOCK_N, BLOCK_D)",
        f"vv = VD.load([{box}]).reshape(BLOCK_N, BLOCK_DV)"])


def nested(lines: list[str]) -> list[str]:
    """Lines one level deeper (a loop's body); empty lines stay empty."""
    return ["    " + line if line else line for line in lines]


class KernelBodies:
    """The kernels, a part of ``compiler.codegen.triton.source.KernelSource``: reads its pattern, bound sizes,
    shape and inputs, and calls its tile lines (``_tiles``) and score lines (``ScoreLines``)."""

    # ------------------------------------------------------------ parameters and tile lists
    def _all_input_params(self) -> list[Param]:
        """Each call-time input: its pointer and strides (its batch stride first), and a block's run-time extents."""
        out = []
        for slot in self.inputs.values():
            out += [tensor(slot.pointer, f"in{slot.index}_sb", *slot.strides()),
                    *(value(e, fixed=True) for e in slot.extents())]
        return out

    def _common_params(self) -> list[Param]:
        """The lists, their (batch, head) class strides, a route's selection and key blocks, a decay's prefix sums
        and resets, the softcap, the inputs, the index check's slots, a block's sizes and the mask's run-time
        parameters (``run_values``)."""
        return [tile_list("FULL"), tile_list("PART"), group("CLS", "cls_b", "cls_h"),
                tensor("SEL", "sel_b", "sel_h", "sel_n"), value("KEY_BLOCK"),
                group("DECAY", "DC", "dc_b", "dc_h", "dc_lo", "DR", "dr_b", "dr_h"), value("SOFTCAP"),
                *self._all_input_params(), *([value("ERR")] if self.checks else []),
                *(value(p, fixed=True) for p in (BLOCK_PARAMS if self.block else [])),
                # the mask's run-time parameters: an int, or a pointer to one int per head
                *(value(p, fixed=not isinstance(v, tuple)) for p, v in self.run_values.items())]

    def shape_tiles_q(self) -> int | str:
        """The number of Q tiles (a tile list's row stride); a block's: the run-time ``TILES_Q``."""
        s = self.shape
        return "TILES_Q" if self.block else math.prod(-(-L // t) for L, t in zip(s.q_extents, s.q_tile, strict=True))

    def shape_tiles_k(self) -> int | str:
        """The number of KV tiles (a tile list's row stride); a block's: the run-time ``TILES_K``."""
        s = self.shape
        return "TILES_K" if self.block else math.prod(-(-L // t) for L, t in zip(s.kv_extents, s.kv_tile,
                                                                                 strict=True))

    def rows_q(self) -> int | str:
        """The query rows a descriptor spans; a block's: the run-time ``Q_EXT``."""
        return "Q_EXT" if self.block else math.prod(self.shape.q_extents)

    def rows_k(self) -> int | str:
        """The key rows a descriptor spans; a block's: the run-time ``K_EXT``."""
        return "K_EXT" if self.block else math.prod(self.shape.kv_extents)

    def _q_tile_of_program(self) -> tuple[list[str], list[str]]:
        """``qt``, the Q tile of this program, as (lines before the program's head and list class, lines
        after them): its place in the launch, first, as before order tables (the statement order moves
        ptxas's register allocation: a dQ kernel at its 128-register cap spilled 8 B on sm_80 with it
        after), or its place in the class's launch order, once the class is known."""
        return (["if not ORDERED:",
                 "    qt = tl.program_id(0)  # the Q tile"],
                ["if ORDERED:  # launched longest first (compiler.cost.launch_order): Q tiles by their KV tile count",
                 f"    qt = tl.load(ORDER + cls * {self.shape_tiles_q()} + tl.program_id(0))"])

    # ------------------------------------------------------------ forward
    def _forward(self) -> str:
        one_loop = one_loop_applies(self.pat)
        # WARP_SPEC only where some architecture specializes this pattern's forward (``warp_specialized_form``)
        specializable = any(warp_specialized_form(self.pat, cc) for cc in (90, 100))
        params = [Q, K, V, *FWD_OUT, *self._common_params(), value("ORDER"), value("KD"), value("VD"), *SIZES,
                  tensor("BM", "sbm_b", "sbm_h", "sbm_n"), *BLOCKS,
                  *constexprs("ORDERED = False"), *run_params("FULL", "PART"), *constexprs("DESC = False"),
                  *(constexprs("WARP_SPEC = False") if specializable else []),
                  *constexprs("SPLIT_KV = False", "BLOCK_MAX = False", "BMAX_G = 1", "BMAX_C = 1"), GRID_Y0]
        if one_loop:
            params += constexprs("ONE_LOOP = False")
        in_exp = scale_in_exponent(self.pat)
        if in_exp:
            params += constexprs("POS_SCALE = False")
        first, ordered = self._q_tile_of_program()
        body = [
            *first,
            grid_y("bh"),
            f"batch = bh // {self.bound.heads}",
            f"h = bh % {self.bound.heads}  # query head; its K/V head is h // GROUP",
            "cls = batch * cls_b + h * cls_h  # which tile lists serve this (batch, head)",
            "kvh = h // GROUP",
            "if SPLIT_KV:  # flash decoding: few programs fill few SMs, so the launch's third axis splits each",
            "    # program's KV tiles; each split writes a partial out and lse, which attnc_fwd_combine merges",
            "    split = tl.program_id(2)",
            "    splits = tl.num_programs(2)",
            *ordered,
            *self._tiles("q", "qt"),
            "d = tl.arange(0, BLOCK_D)",
            "dv = tl.arange(0, BLOCK_DV)",
            "q_base = Q + batch.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h",
            "k_base = K + batch.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h",
            "v_base = V + batch.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h",
        ]
        q_load = "q = tl.load(q_base + q_row[:, None] * sq_n + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)"
        if one_loop:
            body += ["if ONE_LOOP:  # Q, K and V by TMA through descriptors made here (see the loop below)",
                     f"    qd = tl.make_tensor_descriptor(q_base, [{self.rows_q()}, D], [sq_n, 1], "
                     "[BLOCK_M, BLOCK_D])",
                     "    q = qd.load([qt * BLOCK_M, 0])",
                     "else:", "    " + q_load]
        else:
            body.append(q_load)
        body.append(f"scale_l2 = scale * {LOG2E!r}  # scores in log2 units: the softmax takes exp2")
        body += _scale_split(in_exp)
        body += self._per_query_setup()
        body += [
            "m_i = tl.full([BLOCK_M], float(\"-inf\"), tl.float32)  # running row max",
            "l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running row sum of exp",
            "acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)",
        ]
        # a block's forward never pools block maxima (``forward._row_maxima`` refuses one): no BM to take
        update = self._softmax_update(in_exp, block_max=not self.block)
        loops: list[str] = []
        for kind, masked in (("FULL", False), ("PART", True)):
            loops += [
                "",
                f"# ---- {'FULL KV tiles (no masked pair)' if not masked else 'PARTIAL KV tiles (mask evaluated)'}",
                *list_loop(kind, self.shape_tiles_q(), "qt", warp_spec=specializable, split=True),
            ]
            loops += nested([*list_tile(kind, "kt", "the KV tile"), *self._tiles("k", "kt", edge=not masked),
                             *(self._route_key_lines() if masked and self.pat.route is not None else []),
                             *kv_loads(self._box("k", "kt")),
                             "qk = _dot(q, tl.trans(kk), DOT)",
                             *self._terms(masked, grad=False),
                             *update])
        if one_loop:
            body += ["", "if ONE_LOOP:", *nested(self._one_kv_loop(update)), "else:", *nested(loops[1:])]
        else:
            body += loops
        body += self._forward_epilogue()
        return kernel_def("attnc_fwd", params,
                          "Forward: one program per (Q tile, batch x query head) (x split, with SPLIT_KV).", body)

    def grouped_forward_applies(self) -> bool:
        """Whether the module has ``attnc_fwd_grouped``: a block's (queries after a KV cache, whose few rows a
        program of one query head leaves mostly empty) of a pattern with no route (its selection and lists are
        per query head) and no FoX decay (its gates are per query head)."""
        return self.block and self.pat.route is None and self.pat.decay is None

    def paged_forward_applies(self) -> bool:
        """Whether the module has ``attnc_fwd_paged`` (``paged_lines.applies``)."""
        return self.block and not self.checks and paged_lines.applies(self.pat, self.bound)

    def paged_route(self) -> int | None:
        """The key block of the route ``attnc_fwd_paged`` serves (``paged_lines.route_block``)."""
        return paged_lines.route_block(self.pat, self.bound)

    def _forward_grouped(self, paged: bool = False) -> str:
        """The forward of a few query rows with K/V heads shared (``attnc_fwd_grouped``): one program per (Q tile,
        batch x K/V head), the rows of the GROUP query heads sharing that K/V head packed into one tile (row r:
        query r % T of the Q tile, for query head r // T of the group; T the Q tile's rows), so each K/V tile is
        read once per group rather than once per query head, and one dot gives the scores of every head. The
        score terms read each row's own head (``h``, a column: a per-head mask, bias factor or softcap), the lists
        are the group's (``runtime.backends.triton.grouped``: FULL where FULL for every head of the group), and
        out and lse go to each row's own head. FlashDecoding's and FlashInfer's grouped decode.

        ``paged``: ``attnc_fwd_paged``, the same program over a paged KV cache and a batch of rows of their own
        lengths (``runtime.backends.triton.paged``): K and V ``[num_pages, PAGE, Hkv, D]`` read through row
        ``batch``'s block table ``BT`` (each key's page looked up, clamped into the pool); the row's key count
        ``SEQ[batch]``, query count ``QN[batch]`` and first query row ``QS[batch]`` read on the device (its
        queries the last ``QN`` positions of its ``SEQ`` keys), so one launch serves a batch of any lengths."""
        in_exp = scale_in_exponent(self.pat)
        tile = self.shape.q_tile[0]
        params = self._grouped_params(paged, in_exp)
        if paged:
            least = ir.least_length(self.pat, self.bound.subs) if self.row_lengths else 1
            routed = self.pat.route is not None
            row_setup = paged_lines.row_setup(tile, self.shape.kv_tile[0], self.pat.self_attention, least, routed)
            q_rows, bases, kv_loads = "(q_first + q_row)", paged_lines.BASES, paged_lines.KV_LOADS
        else:
            row_setup, q_rows = [], "q_row"
            bases = ["k_base = K + batch.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h",
                     "v_base = V + batch.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h"]
            kv_loads = KV_LOADS
        body = [
            "qt = tl.program_id(0)  # the Q tile",
            grid_y("bkv"),
            f"batch = bkv // ({self.bound.heads} // GROUP)",
            f"kvh = bkv % ({self.bound.heads} // GROUP)  # the K/V head; its query heads kvh * GROUP + g",
            "cls = batch * cls_b + kvh * cls_h  # which tile lists serve this (batch, group)",
            "if SPLIT_KV:  # flash decoding: a share of the group's KV tiles per split (see attnc_fwd)",
            "    split = tl.program_id(2)",
            "    splits = tl.num_programs(2)",
            *row_setup,
            f"# packed rows: row r holds query r % {tile} of the Q tile for query head r // {tile} of the group",
            "q_pack = tl.arange(0, BLOCK_M)",
            f"q_g = tl.minimum(q_pack // {tile}, GROUP - 1)  # padded rows take the last head: in range, never stored",
            f"q_tok = qt * {tile} + q_pack % {tile}",
            f"q_ok = (q_pack < GROUP * {tile}) & (q_tok < Q_EXT)",
            "q_row = q_tok" + (".to(tl.int64)  # token offsets exceed int32 at these sizes" if self.wide_rows else ""),
            *(["q_ok = q_ok & (q_first + q_row < Q_ROWS)  # within q whatever QS and QN hold"] if paged else []),
            "q_tok = q_tok + Q_OFF  # the block's rows -> absolute positions",
            *self._packed_coordinates(),
            "h_row = kvh * GROUP + q_g  # each row's query head",
            "h = h_row[:, None]  # as the score terms read it: a column, each row its own head",
            "d = tl.arange(0, BLOCK_D)",
            "dv = tl.arange(0, BLOCK_DV)",
            f"q_at = batch.to(tl.int64) * sq_b + h_row.to(tl.int64) * sq_h + {q_rows} * sq_n",
            *bases,
            "q = tl.load(Q + q_at[:, None] + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)",
            *(paged_lines.route_setup(q_rows) if paged and self.pat.route is not None else []),
            f"scale_l2 = scale * {LOG2E!r}  # scores in log2 units: the softmax takes exp2",
        ]
        body += _scale_split(in_exp)
        if paged and self.pat.decay is not None:  # each row's head's FoX sums and last reset at its query
            body += ["dc_row = batch.to(tl.int64) * dc_b + h_row.to(tl.int64) * dc_h",
                     "dr_row = batch.to(tl.int64) * dr_b + h_row.to(tl.int64) * dr_h",
                     "dc_q = tl.load(DC + dc_row + q_tok, mask=q_ok, other=0.0)  # FoX prefix sums (hi, lo)",
                     "dl_q = tl.load(DC + dc_row + dc_lo + q_tok, mask=q_ok, other=0.0)",
                     "dr_q = tl.load(DR + dr_row + q_tok, mask=q_ok, other=-1)  # the query's last reset"]
        body += [
            *self._head_setup(),
            "m_i = tl.full([BLOCK_M], float(\"-inf\"), tl.float32)  # running row max",
            "l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running row sum of exp",
            "acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)",
        ]
        update = self._softmax_update(in_exp, block_max=False)
        for kind, masked in (("FULL", False), ("PART", True)):
            body += [
                "",
                f"# ---- {'FULL KV tiles of every head of the group' if not masked else 'PARTIAL KV tiles (mask evaluated per row, at its head)'}",
                *(paged_list_loop(kind) if paged else list_loop(kind, self.shape_tiles_q(), "qt", split=True)),
            ]
            body += nested([*list_tile(kind, "kt", "the KV tile, read once for the whole group"),
                            *self._tiles("k", "kt", edge=not masked), *kv_loads,
                            "qk = _dot(q, tl.trans(kk), DOT)",
                            *self._terms(masked, grad=False, paged=paged),
                            *update])
        body += self._grouped_epilogue(q_rows)
        if paged:
            body += paged_lines.row_check()
            return kernel_def("attnc_fwd_paged", params,
                              "Forward over a paged KV cache: one program per (Q tile, row x K/V head) (x split), each "
                              "row its own lengths, its query heads' rows packed in one tile.", body)
        return kernel_def("attnc_fwd_grouped", params,
                          "Forward of a few rows: one program per (Q tile, batch x K/V head) (x split), its query "
                          "heads' rows packed in one tile.", body)

    def _grouped_params(self, paged: bool, in_exp: bool) -> list[Param]:
        """The grouped forward's parameters; ``paged``: ``attnc_fwd_paged``'s, a row's offsets and extents read
        from the device rather than given (``paged_lines.runtime_params``)."""
        common = self._common_params()
        if paged:
            common = paged_lines.runtime_params(common)
        return [Q, K, V, *FWD_OUT, *common, *SIZES, *BLOCKS, *(paged_lines.CONSTEXPRS if paged else []),
                *run_params("FULL", "PART"), *constexprs("SPLIT_KV = False"),
                *(constexprs("POS_SCALE = False") if in_exp else []), GRID_Y0]

    @staticmethod
    def _grouped_epilogue(q_rows: str) -> list[str]:
        """The grouped forward's last lines: normalise; each row's out and lse (at ``q_rows``) to its own head."""
        return [
            "",
            "# ---- epilogue: normalise; each row's out and lse to its own head (a split's partials with SPLIT_KV)",
            "empty = l_i == 0.0",
            "out = acc / tl.where(empty, 1.0, l_i)[:, None]",
            f'lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * {LN2!r})  # natural log',
            f"o_at = batch.to(tl.int64) * so_b + h_row.to(tl.int64) * so_h + {q_rows} * so_n",
            f"l_at = batch.to(tl.int64) * sl_b + h_row.to(tl.int64) * sl_h + {q_rows}",
            "if SPLIT_KV:  # this split's partials: O and LSE are fp32 buffers [splits, B, H, rows (, DV)]",
            "    o_at += split.to(tl.int64) * so_s",
            "    l_at += split.to(tl.int64) * sl_s",
            "tl.store(O + o_at[:, None] + dv[None, :], out.to(O.dtype.element_ty), mask=q_ok[:, None] & (dv[None, :] < DV))",
            "tl.store(LSE + l_at, lse, mask=q_ok)",
        ]

    def _packed_coordinates(self) -> list[str]:
        """A grid layout's coordinates of the packed rows' queries (``q_c{i}``, from their absolute tokens in
        row-major order), as ``triton_tiles.tile_code`` gives a block's."""
        coords, stride = [], 1
        for i in reversed(range(len(self.q_axes))):
            coords.append(f"q_c{i} = (q_tok // {stride}) % {self.q_axes[i]}" if stride > 1 else
                          f"q_c{i} = q_tok % {self.q_axes[i]}")
            stride *= self.q_axes[i]
        return coords[::-1]

    def _softmax_update(self, in_exp: bool, block_max: bool = True) -> list[str]:
        """The lines after a KV tile's scores ``s``: the online softmax update of ``m_i``, ``l_i`` and ``acc``, in
        log2 units; ``block_max``: first ``BLOCK_MAX``'s store of the tile's row maxima (the one-head forward)."""
        to_l2 = " * s_exp" if in_exp else ""
        lines = []
        if block_max:
            lines += [
                "if BLOCK_MAX:  # return_block_max: each row's largest score (log2 units) per BMAX_G keys of this tile",
                "    # the buffer holds the tile's own BMAX_C groups (KV tile // BMAX_G), not BLOCK_N's: a tile that is",
                "    # no power of two is padded to BLOCK_N slots, whose groups past the tile are not stored",
                "    bm_row = BM + batch.to(tl.int64) * sbm_b + h.to(tl.int64) * sbm_h + q_row.to(tl.int64) * sbm_n "
                "+ kt * BMAX_C",
                "    if BLOCK_N % BMAX_G == 0:  # a power-of-two group: the tile's slots as [groups, BMAX_G]",
                f"        bm = tl.reduce(tl.reshape(s, [BLOCK_M, BLOCK_N // BMAX_G, BMAX_G]), 2, _maximum){to_l2}",
                "        bm_col = tl.arange(0, BLOCK_N // BMAX_G)",
                "        tl.store(bm_row[:, None] + bm_col[None, :], bm, mask=q_ok[:, None] & (bm_col[None, :] < BMAX_C))",
                "    else:  # a group of another size has no power-of-two shape to reshape to: one group at a time",
                "        for bm_c in tl.static_range(BMAX_C):",
                "            bm_in = (k_slot >= bm_c * BMAX_G) & (k_slot < (bm_c + 1) * BMAX_G)",
                "            bm = tl.reduce(tl.where(bm_in[None, :], s, float(\"-inf\")), 1, _maximum)" + to_l2,
                "            tl.store(bm_row + bm_c, bm, mask=q_ok)"]
        return lines + [
            "# online softmax update, in log2 units (rows with no allowed key so far stay at zero)",
            "m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum)" + (" * s_exp)" if in_exp else ")"),
            'm_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
            "alpha = tl.exp2(m_i - m_use)",
            "pr = tl.exp2(s" + to_l2 + " - m_use[:, None])",
            "l_i = l_i * alpha + tl.reduce(pr, 1, _add)",
            "acc = acc * alpha[:, None] + _dot(pr.to(vv.dtype), vv, DOT)",
            "m_i = m_new"]

    @staticmethod
    def _forward_epilogue() -> list[str]:
        """The forward's last lines: normalise and store out and lse (a split's partials with SPLIT_KV)."""
        return [
            "",
            "# ---- epilogue: normalise; a query with no allowed key gives zeros and lse = -inf (so does a split",
            "# with no key of the query: it weighs nothing in the merge)",
            "empty = l_i == 0.0",
            "out = acc / tl.where(empty, 1.0, l_i)[:, None]",
            f'lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * {LN2!r})  # natural log',
            "o_base = O + batch.to(tl.int64) * so_b + h.to(tl.int64) * so_h",
            "if SPLIT_KV:  # this split's partials: O and LSE are fp32 buffers [splits, B, H, rows (, DV)]",
            "    o_base += split.to(tl.int64) * so_s",
            "    LSE += split.to(tl.int64) * sl_s",
            "tl.store(o_base + q_row[:, None] * so_n + dv[None, :], out.to(O.dtype.element_ty),",
            "         mask=q_ok[:, None] & (dv[None, :] < DV))",
            "tl.store(LSE + batch.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + q_row, lse, mask=q_ok)",
        ]

    def _forward_combine(self) -> str:
        """The split-KV forward's merge (``attnc_fwd_combine``): per row, the splits' partial outputs weighed by
        ``exp(lse_s - lse)``, ``lse = log(sum_s exp(lse_s))``, in two passes over the splits (their max, then
        the weighted sums: no rescaling). A split without a key of the row (lse -inf) weighs 0; a row without
        any keeps out = 0 and lse = -inf, as the one-program forward gives it."""
        params = [tensor("PO", "sp_s", "sp_b", "sp_h", "sp_n"), tensor("PL", "spl_s", "spl_b", "spl_h"),
                  tensor("O", "so_b", "so_h", "so_n"), tensor("LSE", "sl_b", "sl_h"), value("ROWS"), value("DV"),
                  value("SPLITS"), *constexprs("BLOCK_R", "BLOCK_DV"), GRID_Y0]
        body = [
            "rb = tl.program_id(0)  # a block of rows",
            grid_y("bh"),
            f"batch = (bh // {self.bound.heads}).to(tl.int64)",
            f"h = (bh % {self.bound.heads}).to(tl.int64)",
            "r = rb * BLOCK_R + tl.arange(0, BLOCK_R)",
            "dv = tl.arange(0, BLOCK_DV)",
            "ok = r < ROWS",
            "pl_base = PL + batch * spl_b + h * spl_h + r",
            "po_base = PO + batch * sp_b + h * sp_h + r[:, None] * sp_n + dv[None, :]",
            "tile_ok = ok[:, None] & (dv[None, :] < DV)",
            'm = tl.full([BLOCK_R], float("-inf"), tl.float32)',
            "for s in range(0, SPLITS):  # the largest lse of each row: the weights below are at most 1",
            '    m = tl.maximum(m, tl.load(pl_base + s * spl_s, mask=ok, other=float("-inf")))',
            'm_use = tl.where(m == float("-inf"), 0.0, m)',
            "total = tl.full([BLOCK_R], 0.0, tl.float32)",
            "acc = tl.full([BLOCK_R, BLOCK_DV], 0.0, tl.float32)",
            "for s in range(0, SPLITS):",
            '    w = tl.exp(tl.load(pl_base + s * spl_s, mask=ok, other=float("-inf")) - m_use)  # 0: no key',
            "    total += w",
            "    acc += w[:, None] * tl.load(po_base + s * sp_s, mask=tile_ok, other=0.0)",
            "empty = total == 0.0",
            "out = acc / tl.where(empty, 1.0, total)[:, None]",
            'lse = tl.where(empty, float("-inf"), m_use + tl.log(tl.where(empty, 1.0, total)))',
            "tl.store(O + batch * so_b + h * so_h + r[:, None] * so_n + dv[None, :], out.to(O.dtype.element_ty),",
            "         mask=tile_ok)",
            "tl.store(LSE + batch * sl_b + h * sl_h + r, lse, mask=ok)",
        ]
        return kernel_def("attnc_fwd_combine", params,
                          "Split-KV merge: the splits' partial out and lse by log-sum-exp, per (row block, batch x "
                          "head).", body)

    def _one_kv_loop(self, update: list[str]) -> list[str]:
        """The forward's KV tiles in one loop (``ONE_LOOP``, where ``one_loop_applies``): the FULL list's, then
        the PARTIAL list's, all masked, loaded by TMA. Triton's Hopper warp specialization (``WARP_SPEC``) takes
        a kernel with one loop and no branch in it, its loads all from descriptors made in the kernel (it splits
        their boxes between its consumer warp groups: Triton 3.9 refused a descriptor made on the host). The
        runner launches it only where the tiles are runs of memory rows (``search.tma_fits``, ``box_tile``) and the
        tensors are TMA-addressable, as the host's descriptors (``DESC``)."""
        tiles = self.shape_tiles_q()
        rows = self.rows_k()
        return [
            "# ---- every KV tile in one loop, the FULL list's then the PARTIAL list's, each masked as a PARTIAL",
            "# one (a FULL tile's mask holds on all its pairs): Triton's Hopper warp specialization takes one loop",
            'tl.static_assert(not SPLIT_KV, "a split-KV forward runs the two loops")  # no share of one loop',
            f"kd = tl.make_tensor_descriptor(k_base, [{rows}, D], [sk_n, 1], [BLOCK_N, BLOCK_D])",
            f"vd = tl.make_tensor_descriptor(v_base, [{rows}, DV], [sv_n, 1], [BLOCK_N, BLOCK_DV])",
            *list_bounds("FULL", tiles, "qt", "n_full", "full_base"),
            *list_bounds("PART", tiles, "qt", "n_part", "part_base"),
            "if FULL_RUN and PART_RUN:  # both lists runs of consecutive tiles",
            "    full_start = tl.load(full_base)",
            "    part_start = tl.load(part_base) - n_full",
            "for j in tl.range(0, n_full + n_part, warp_specialize=WARP_SPEC):",
            *nested(["if FULL_RUN and PART_RUN:",
                     "    kt = tl.where(j < n_full, full_start, part_start) + j  # the KV tile",
                     "else:",
                     "    kt = tl.load(tl.where(j < n_full, full_base + j, part_base + (j - n_full)))  # the KV tile",
                     *self._tiles("k", "kt"),
                     "kk = kd.load([kt * BLOCK_N, 0])",
                     "vv = vd.load([kt * BLOCK_N, 0])",
                     "qk = _dot(q, tl.trans(kk), DOT)",
                     *self._terms(True, grad=False),
                     *update])]


def _scale_split(in_exp: bool) -> list[str]:
    """The forwards' lines splitting the scale between the scores and the exponent (``in_exp``: a positive scale
    applied in the exponent's FMA, ``POS_SCALE`` at run time), or none."""
    if not in_exp:
        return []
    return ["if POS_SCALE:  # scale > 0: scores in q.k units, the scale applied in the exponent's FMA",
            "    s_now = 1.0",
            "    s_exp = scale_l2",
            "else:",
            "    s_now = scale_l2",
            "    s_exp = 1.0"]
