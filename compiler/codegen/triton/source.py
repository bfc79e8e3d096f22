"""Code generation: the Triton kernel module for a softmax pattern, from the IR.

``generate_source`` gives the module for one pattern, bound sizes and schedule shape: a header,
the helper functions it calls, the pattern's ``_mask`` (and ``_bias_head``, ``_bias``) functions,
a forward kernel (FlashAttention-2 online softmax over the FULL and PARTIAL KV lists of each Q
tile; with ``SPLIT_KV`` each program walks a share of the lists, and a merge kernel combines the
splits' partials: flash decoding), a dQ kernel over the same lists and a dK/dV kernel over the
transposed lists. Same inputs, same text. ``KernelSource`` binds the pattern (internal names, input slots, the printed mask and
bias) and assembles the module from the pieces beside this file, one job each:

- ``expr_printer``: the sympy printer shared with the FlexAttention generator;
- ``triton_exprs``: IR expressions as Triton expressions, and the int/float and range rules;
- ``triton_helpers``: the ``@triton.jit`` helper functions, as source text;
- ``triton_bias``: the bias's factor per head, its checked input indices, its derivatives;
- ``triton_tiles``: the schedule shape and the addressing of a tile's slots;
- ``triton_scores``: the score terms of a tile pair (scale, softcap, bias, decay, mask, routing);
- ``triton_kernels``: the forward, dQ and dK/dV kernels with their loops over the tile lists.

The public names of those modules that the runtime and the tests use are importable from here.
"""

from __future__ import annotations

import dataclasses

import sympy

from ....core import ir, route_kinds
from ....core import symbols as S
from ....core.errors import SpecError
from ...analysis import evaluate as E
from ...analysis.route_blocks import WORD_BITS, block_sizes, tile_block_spread
from ...analysis.schedule import uniform_axes
from ..expr_printer import internal_names
from . import paged_lines, run_values
from .backward_bodies import BackwardBodies
from .bias import bias_index_checks, derivative, head_factor, split_bias
from .bias_grads import BiasGradLines
from .exprs import (
    FP32_MAX,
    INT32_MAX,
    LN2,
    LOG2E,
    InputSlot,
    TritonPrinter,
    abs_bound,
    check_fp32_constants,
    fp32_error,
    int_bound_rule,
    int_float_sides,
    needs_int64,
)
from .helpers import DOT_HELPERS, HELPERS, helper_sources
from .kernels import KernelBodies, indent
from .paged_lines import ENTRIES_BELOW, QUERY_TABLES, SUMMARY_KERNEL, TOKEN_SCORE_KERNEL
from .scores import ScoreLines
from .tiles import ScheduleShape, axis_extents, block_size, box_coordinates, layout_of, tile_code

__all__ = [
    "FP32_MAX", "HELPERS", "INT32_MAX", "LN2", "LOG2E", "InputSlot", "KernelSource", "ScheduleShape",
    "TritonPrinter", "abs_bound", "bias_index_checks", "block_size", "check_fp32_constants", "derivative",
    "fp32_error", "generate_source", "head_factor", "helper_sources", "int_bound_rule", "int_float_sides",
    "layout_of", "needs_int64", "but_row_lengths", "QUERY_TABLES",
]

#: The sizes a row-lengths module (``KernelSource.row_lengths``) reads at run time: the row's keys (self-attention: its
#: tokens too).
ROW_LENGTHS = frozenset({S.N, S.NK})


def but_row_lengths(expr, bound: E.Bound):
    """``expr`` with ``bound``'s sizes put in but the row's length (``ROW_LENGTHS``), which a paged row reads."""
    return S.substitute(expr, {s: v for s, v in bound.subs.items() if s not in ROW_LENGTHS})

#: The widest head dimension the kernels address (for the int32/int64 choice of memory rows).
MAX_HEAD_DIM = 512


def _has_scalar_condition(mask, scalars: frozenset) -> bool:
    """Whether ``mask`` (not a constant) combines with logic (``and``, ``or``, ``not``, ``xor``, ``==`` of conditions) a
    condition that does not vary over a tile's pairs (reads no position outside ``scalars``)."""
    logic = (sympy.And, sympy.Or, sympy.Not, sympy.Xor, sympy.Equivalent, sympy.Implies)
    if not isinstance(mask, sympy.Basic) or isinstance(mask, sympy.logic.boolalg.BooleanAtom):
        return False
    free = S.FreeSymbols()
    stack = [mask]
    while stack:
        node = stack.pop()
        if isinstance(node, logic):
            stack.extend(node.args)
        elif not isinstance(node, sympy.logic.boolalg.BooleanAtom) and not S.per_pair(node, scalars, free(node)):
            return True
    return False


class KernelSource(ScoreLines, KernelBodies, BackwardBodies, BiasGradLines):
    """Builds the kernel module text for one pattern, bound sizes and schedule shape."""

    def __init__(self, pat: ir.PatternIR, bound: E.Bound, shape: ScheduleShape, config=None,
                 row_lengths: bool = False, query_rows: bool = False):
        self.pat, self.bound, self.shape = pat, bound, shape
        #: the mask's ``n`` (``nk``) is each row's own key count, ``K_EXT`` (a paged batch's rows, each of its own
        #: length: ``attnc_fwd_paged`` reads it on the device), not a size bound into the text
        self.row_lengths = row_lengths
        #: the score tables made per call from q (``relative()``, ``landmark()``) hold the present queries' rows, laid
        #: out as q (a paged batch's: its queries' positions are each row's own), read at the query's row ``q_pk``
        self.query_rows = query_rows
        self.layout = layout_of(config)
        self.permuted = self.layout == "permute"
        #: a block of a longer sequence (``evaluate.block_bound``): the kernels take its offsets
        #: ``Q_OFF``, ``K_OFF`` at run time (one module serves every block of its row counts); the
        #: routing selection and key blocks are read at its rows. Its row counts are run-time arguments
        #: too (``Q_EXT``, ``K_EXT``, and the tile counts ``TILES_Q``, ``TILES_K``): a decode step's cache
        #: grows by a key every step, and a module per length would compile kernels at every step
        self.block = bound.is_block
        self.sel_q, self.sel_k = ("q_row", "k_row") if self.block else ("q_tok", "k_tok")
        self._bind_tiles()
        # the parameters the kernels read at run time (``run_values``): symbols of the mask, ``p_NAME`` in the text
        lifted, self.run_values = run_values.lifted_mask(pat)
        self.mask = but_row_lengths(lifted, bound) if row_lengths else E.substitute(lifted, bound)
        self.family_key = (dataclasses.replace(pat, mask=lifted) if self.run_values else pat).key()
        self.bias = E.substitute(pat.bias, bound) if pat.bias is not None else None
        ranges = self._bind_printer()
        # the bias as coef * rest: coef once per head (times log2(e): scores are in log2 units), rest per score
        coef, rest = split_bias(self.bias, bound)
        self.wide_math = needs_int64([self.mask, self.bias, rest], ranges)
        self.wide_rows = max(bound.n, bound.nk) * MAX_HEAD_DIM > INT32_MAX
        self._print_terms(coef, rest)
        # routing: a query's selection is read as words of WORD_BITS blocks; when the keys of every
        # KV tile span at most WORD_BITS + 1 block indices, two words per query and tile hold them all
        spread = tile_block_spread(pat.keys, block_sizes(pat.route, bound), bound, shape.kv_extents,
                                   shape.kv_tile) if pat.route is not None else 0
        # (a block's tiles start at any offset: the spread is not known, so each key reads its word)
        self.route_words = 0 < spread <= WORD_BITS + 1 and not self.block
        self.route_one_block = spread == 1 and not self.block  # every KV tile inside one block: one bit per query and tile

    # ------------------------------------------------------------ binding
    def _bind_tiles(self) -> None:
        """The layouts' axis extents, checked against the tiles, and the axes with one value per tile."""
        pat, bound, shape = self.pat, self.bound, self.shape
        self.q_axes = axis_extents(pat.queries, bound)
        self.k_axes = axis_extents(pat.keys, bound)
        if self.q_axes and len(shape.q_extents) not in (1, len(self.q_axes)):
            raise SpecError("the Q tile needs one extent per grid axis, or one for flat tiles", where="q_tile")
        if self.k_axes and len(shape.kv_extents) not in (1, len(self.k_axes)):
            raise SpecError("the KV tile needs one extent per grid axis, or one for flat tiles", where="kv_tile")
        if bound.is_block:  # tiles at any offset: no coordinate is one value per tile
            if len(shape.q_extents) != 1 or len(shape.kv_extents) != 1:
                raise SpecError("a block's tiles are 1-D runs of its rows", where="argument q_tile")
            self.q_uniform = self.k_uniform = frozenset()
            return
        self.q_uniform = uniform_axes(shape.q_extents, shape.q_tile, self.q_axes)
        self.k_uniform = uniform_axes(shape.kv_extents, shape.kv_tile, self.k_axes)

    def _bind_printer(self) -> dict:
        """The input slots and the printer (internal names, ranges, per-tile scalars); returns the
        ranges (symbol -> largest absolute value)."""
        pat, bound = self.pat, self.bound
        symbols = internal_names(pat)
        if self.row_lengths:
            symbols.update(dict.fromkeys(ROW_LENGTHS, "K_EXT"))
        self.inputs: dict[str, InputSlot] = {}
        for i, decl in enumerate(pat.inputs):
            dims = tuple(int(sympy.sympify(d).subs(bound.subs)) for d in decl.dims)
            rows = self.query_rows and decl.derived is not None and decl.derived[0] in QUERY_TABLES
            self.inputs[decl.name] = InputSlot(i, decl.dtype, dims, runtime_extents=bound.is_block, query_rows=rows)
        # positions: a block's rows are absolute positions up to the whole sequence (``n``)
        seq = int(bound.subs[S.N]) if bound.is_block else max(bound.n, bound.nk)
        ranges = {S.Q: seq if bound.is_block else bound.n, S.K: seq if bound.is_block else bound.nk, S.H: bound.heads}
        texts = run_values.symbol_names(self.run_values)  # a run-time parameter: how the text reads it, its range
        for (sym, text), value in zip(texts.items(), self.run_values.values(), strict=True):
            symbols[sym], ranges[sym] = text, max(1, run_values.largest(value))
        for sym in symbols:
            ranges.setdefault(sym, seq)
        scalars = frozenset([S.coord("q", pat.queries.axis_names[i]) for i in self.q_uniform]
                            + [S.coord("k", pat.keys.axis_names[i]) for i in self.k_uniform])
        self.printer = TritonPrinter(symbols, self.inputs, ranges, scalars)
        return ranges

    def _print_terms(self, coef: sympy.Basic, rest: sympy.Basic | None) -> None:
        """The mask, the bias (``rest``) and its head factor (``coef``) as text, with the inputs each reads."""
        self.mask_text = self.printer.bool_expr(self.mask)
        if _has_scalar_condition(self.mask, self.printer.scalars):
            # a condition with one value per tile (of the head, a run-time value): Triton's interpreter (3.9) types
            # its combination with the tile's bools so that ``&`` or a store's mask refuses it; ``!= 0`` makes the
            # whole a plain bool (the same on a GPU)
            self.mask_text = f"(({self.mask_text}) != 0)"
        self.mask_inputs = sorted(self.printer.used_inputs)
        self.printer.used_inputs = set()
        self.bias_text = self.printer.float_expr(rest) if rest is not None else None
        # input indices of the bias not proven in range: checked in the forward kernel (see _bias_fn)
        self.checks = [(site, j, self.inputs[S.input_name(site.func)].extent(j), self.printer.p(site.args[j]))
                       for site, j in bias_index_checks(self.pat, self.bound)]
        self.bias_inputs = sorted(self.printer.used_inputs)
        self.printer.used_inputs = set()
        if coef.is_Number:
            self.bias_head_text = None
            self.bias_coef = repr(float(coef) * LOG2E)
        else:
            self.bias_head_text = f"{LOG2E!r} * {self.printer.float_expr(coef)}"
            self.bias_coef = "bias_c"
        self.head_inputs = sorted(self.printer.used_inputs)
        self.printer.used_inputs = set()
        self._print_grad_sites()

    # ------------------------------------------------------------ pieces
    def _slot_params(self, which: list[int]) -> list[str]:
        out = []
        for slot in self.inputs.values():
            if slot.index in which:
                out += slot.params()
        return out

    def _helper_args(self, which: list[int]) -> str:
        pos = ["q", "k"] + [f"q_c{i}" for i in range(len(self.q_axes))] + [f"k_c{i}" for i in range(len(self.k_axes))]
        return ", ".join(pos + ["h"] + self._slot_params(which))

    def _tiles(self, role: str, var: str, edge: bool = False) -> list[str]:
        """The tile's lines (``tile_code``); ``edge``: with ``k_edge`` where only the grid's edge tiles are padded
        (the forward's branch around their padding)."""
        if role == "q":
            return tile_code("q", var, self.shape.q_extents, self.shape.q_tile, self.q_axes, self.permuted,
                             "BLOCK_M", self.wide_rows, self.q_uniform, "Q_OFF" if self.block else None,
                             extent="Q_EXT" if self.block else None)
        return tile_code("k", var, self.shape.kv_extents, self.shape.kv_tile, self.k_axes, self.permuted,
                         "BLOCK_N", self.wide_rows, self.k_uniform, "K_OFF" if self.block else None, edge=edge,
                         extent="K_EXT" if self.block else None)

    def _box(self, role: str, var: str) -> str:
        """The descriptor coordinates of tile ``var``'s box (``triton_tiles.box_coordinates``): a Q tile's of query
        head ``h``, a KV tile's of K/V head ``kvh``."""
        s, heads = self.shape, self.bound.heads
        if role == "q":
            return box_coordinates(var, s.q_extents, s.q_tile, self.permuted, "BLOCK_M", "h", str(heads))
        return box_coordinates(var, s.kv_extents, s.kv_tile, self.permuted, "BLOCK_N", "kvh", f"({heads} // GROUP)")

    # ------------------------------------------------------------ module
    def module(self) -> str:
        p = self.pat
        helpers = set(self.printer.helpers)
        if p.softcap is not None:
            helpers.add("_softcap_tanh")
        if self.route_words:
            helpers.add("_minimum")
        parts = [self._header(), helper_sources(helpers), DOT_HELPERS, self._mask_fn()]
        if self.bias_text is not None:
            if self.bias_head_text is not None:
                parts.append(self._bias_head_fn())
            parts.append(self._bias_fn())
        if self.grad_sites:
            parts.append(self._bias_grads_fn())
        parts.append(self._forward())
        if self.grouped_forward_applies():
            parts.append(self._forward_grouped())
        if self.paged_forward_applies():
            parts += [ENTRIES_BELOW, self._forward_grouped(paged=True)]
            if paged_lines.scores_pool(self.pat):  # q . k over the pages (a token route's; clusters' c . k)
                parts.append(TOKEN_SCORE_KERNEL)
            route = self.pat.route
            if route is not None and route.kind == route_kinds.TOPK_BLOCKS.name and route.scores_input is None:
                # the block summaries it scores
                parts.append(SUMMARY_KERNEL)
        parts += [self._forward_combine(), self._backward_delta(), self._backward_dq(), self._backward_dkdv()]
        return "\n\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"

    def _header(self) -> str:
        s = self.shape
        if self.block:  # one module for every block of these tiles: no size of one block in its text
            sizes = [f"pattern key {self.family_key[:16]}; a block of a sequence, {self.bound.heads} heads: its rows",
                     "(Q_EXT, K_EXT), tile counts (TILES_Q, TILES_K) and offsets (Q_OFF, K_OFF) given at run time",
                     f"Q tiles {s.q_tile} (BLOCK_M {s.block_m}), KV tiles {s.kv_tile} (BLOCK_N {s.block_n}), "
                     f"layout {self.layout}"]
        else:
            sizes = [f"pattern key {self.family_key[:16]}; tokens {self.bound.n} queries x {self.bound.nk} keys, "
                     f"{self.bound.heads} heads",
                     f"Q tiles {s.q_tile} over {s.q_extents} (BLOCK_M {s.block_m}), KV tiles {s.kv_tile} over "
                     f"{s.kv_extents} (BLOCK_N {s.block_n}), layout {self.layout}"]
        lines = [
            '"""attnc generated Triton kernels (do not edit: regenerated from the pattern).',
            "",
            *sizes,
            "",
            "attnc_fwd        online softmax over each Q tile's FULL then PARTIAL KV tiles (SPLIT_KV: over a",
            "                 share of them, a partial out and lse per split)",
            *(["attnc_fwd_grouped  a few rows with K/V heads shared: a group's query heads packed in one tile,",
               "                 each K/V tile read once per group"] if self.grouped_forward_applies() else []),
            *(["attnc_fwd_paged  the grouped forward over a paged KV cache, each row of the batch its own key and",
               "                 query counts (read on the device): one launch for a mixed batch"]
              if self.paged_forward_applies() else []),
            *(["attnc_paged_summary  a block route's key summaries (means or bounds) over a paged KV cache"]
              if self.paged_forward_applies() and self.pat.route is not None else []),
            "attnc_fwd_combine  split-KV: the splits' partials merged by log-sum-exp",
            "attnc_bwd_delta  the backward's row term rowsum(dO * O) - dlse, in token order",
            "attnc_bwd_dq     dQ (and per-query sums of dS) over the same lists",
            "attnc_bwd_dkdv   dK, dV (and per-key sums of dS) over the transposed lists; with ATOMIC_DQ also",
            "                 dQ, added by atomics (the backward in one kernel, no dQ kernel)",
            "Each kernel takes its tile from its place in the launch, or from ORDER (ORDERED: longest first).",
            '"""',
            "",
            "import triton",
            "import triton.language as tl",
            "",
        ]
        return "\n".join(lines)

    def _mask_fn(self) -> str:
        body = self.mask_text
        params = self._helper_args(self.mask_inputs) + self.mask_extra_args()
        return (f"\n\n@triton.jit\ndef _mask({params}):\n"
                f'    """The pattern\'s mask: True where query q may attend key k (head h)."""\n'
                f"    return {body}\n")

    def mask_extra_args(self) -> str:
        """``_mask``'s arguments after the positions, head and inputs: a row's keys (``K_EXT``) where the mask reads
        each row's length, then the parameters it reads at run time (``run_values``), as its def and calls name
        them."""
        return (", K_EXT" if self.row_lengths else "") + "".join(f", {name}" for name in self.run_values)

    def _bias_head_fn(self) -> str:
        params = ", ".join(["h", *self._slot_params(self.head_inputs)])
        return (f"\n\n@triton.jit\ndef _bias_head({params}):\n"
                f'    """log2(e) times the bias\'s factor of head h alone (once per head; see _bias)."""\n'
                f"    return {self.bias_head_text}\n")

    def bias_reads_query_rows(self) -> bool:
        """Whether the bias reads a table at the query's row in q (``query_rows``): ``_bias`` then takes ``q_pk``."""
        return any(slot.query_rows for slot in self.inputs.values() if slot.index in self.bias_inputs)

    def _bias_fn(self) -> str:
        params = self._helper_args(self.bias_inputs) + (", q_pk" if self.bias_reads_query_rows() else "")
        checks = ""
        if self.checks:
            params += ", pairs, ERR, CHECK: tl.constexpr"
            lines = ["if CHECK:  # an input index out of range on an attended pair: its value goes to ERR[slot]",
                     "    # (the loads of the bias clamp it; the host raises the error after the launch)"]
            for slot, (_, _, size, text) in enumerate(self.checks):
                lines += [f"    ix = tl.where(pairs, {text}, 0)",
                          f"    tl.store(ERR + {slot} + ix * 0, ix.to(tl.int64), mask=pairs & ((ix < 0) | (ix >= {size})))"]
            checks = indent(lines, 4)
        return (f"\n\n@triton.jit\ndef _bias({params}):\n"
                f'    """The pattern\'s bias term{" but for its head-only factor (_bias_head)" if self.bias_head_text else ""}, '
                f'added to the scaled (soft-capped) scores."""\n'
                f"{checks}"
                f"    return {self.bias_text}\n")


def generate_source(pattern: ir.PatternIR, bound: E.Bound, schedule_shape: ScheduleShape, config=None,
                    row_lengths: bool = False, query_rows: bool = False) -> str:
    """The Triton module text (forward, dQ and dK/dV kernels) for a pattern at
    bound sizes and a schedule shape. ``config`` (``compiler.cost.model.KernelConfig``)
    gives the token layout ('flat', 'address' or 'permute'); warps and stages
    are launch parameters and do not change the text. ``row_lengths``: the mask's
    ``n`` and ``nk`` are each row's key count, read at run time (a paged template's)."""
    if not isinstance(pattern, ir.PatternIR):
        raise SpecError(f"'{pattern.name}' is a recurrence: no softmax kernel to generate", where="argument pattern")
    return KernelSource(pattern, bound, schedule_shape, config, row_lengths, query_rows).module()
