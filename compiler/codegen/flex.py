"""Code generation for FlexAttention: ``mask_mod`` and ``score_mod`` as Python
source over torch operations, from the IR.

The same guarantees as the Triton generator (``compiler.codegen.triton.source``), with the
evaluator's semantics (``compiler.analysis.evaluate``): int64 integers, floored ``//``
and ``%`` (torch's ``//`` and ``%`` on integer tensors floor like Python's;
``x // 0 == 0`` and ``x % 0 == x`` through helpers where a divisor may be 0),
float arithmetic in float64, exact rational combinations of integers divided
once, NATTEN windows inline, bit operations, input loads with clamped indices
(the runner checks bias indices apart: ``runtime.backends.flex.indices``).
Float inputs of the score terms get the evaluator's gradients (torch's autograd
of the same operations): ``min``/``max``/``clamp`` split evenly on a tie
(``torch.minimum``/``torch.maximum``), ``%`` differentiates as
``a - b * (a // b)`` (``torch.remainder`` of two tensors).
Symbols and inputs are printed under fixed internal names (``q``, ``k``,
``h``, ``b``, ``q_c0``, ``IN0``...): no text of the spec becomes code, and
sizes and parameters are literals.
The printer is ``compiler.codegen.expr_printer``'s, with torch's operations where
the targets differ (``FlexPrinter``).

FlexAttention passes its own positions (``q_idx``, ``kv_idx``). A ``TokenMap``
says how such a position becomes a token: the identity (``seq`` layouts and
flat tiles of a grid: the row-major order), or tile-major order (box tiles of
a grid: Flex block ``t`` is attnc tile ``t``, its slots row-major inside the
box; the runtime permutes q, k and v into that order and the output back).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import sympy
import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from ..analysis import evaluate as E
from .expr_printer import ExprPrinter, has_input, internal_names
from .tables import TABLE_PREFIX, tabulate

F64 = "torch.float64"

#: name -> source of each helper the printer may call (emitted in this order when used).
HELPERS: dict[str, str] = {
    "_floordiv": '''
def _floordiv(a, b):
    """Floored integer division (Python's //); a // 0 == 0."""
    safe = torch.where(b == 0, 1, b)
    return torch.where(b == 0, 0, a // safe)
''',
    "_mod": '''
def _mod(a, b):
    """Floored integer modulo (Python's %, the sign of b); a % 0 == a."""
    safe = torch.where(b == 0, 1, b)
    return torch.where(b == 0, a, a % safe)
''',
    "_minimum": '''
def _minimum(a, b):
    """min(a, b), one of them a number: torch.minimum's gradient (split evenly on a tie)."""
    a = a if isinstance(a, torch.Tensor) else torch.full_like(b, a)
    return torch.minimum(a, b if isinstance(b, torch.Tensor) else torch.full_like(a, b))
''',
    "_maximum": '''
def _maximum(a, b):
    """max(a, b), one of them a number: torch.maximum's gradient (split evenly on a tie)."""
    a = a if isinstance(a, torch.Tensor) else torch.full_like(b, a)
    return torch.maximum(a, b if isinstance(b, torch.Tensor) else torch.full_like(a, b))
''',
    "_remainder": '''
def _remainder(a, b):
    """Floored float a % b of a number a (torch.remainder's gradient, -floor(a / b) for b)."""
    return torch.remainder(torch.full_like(b, a), b)
''',
    "_bit_length": '''
def _bit_length(x):
    """Python's int.bit_length of |x|."""
    y = abs(x)
    out = y * 0
    for s in (32, 16, 8, 4, 2, 1):
        big = y >= (1 << s)
        out = out + big * s
        y = torch.where(big, y >> s, y)
    return out + (y > 0)
''',
    "_window": '''
def _window(qa, ka, L, SIZE, DIL, STRIDE, CAUSAL):
    """NATTEN neighborhood along one axis of length L: may query coordinate qa attend key coordinate ka?"""
    g = qa % DIL
    lg = (L - g + DIL - 1) // DIL
    iq = qa // DIL
    if CAUSAL:
        leader = torch.minimum((iq // STRIDE) * STRIDE + STRIDE - 1, lg - 1)
        lo = torch.clamp(leader - SIZE + 1, min=0)
        hi = iq
    else:
        leader = torch.minimum((iq // STRIDE) * STRIDE + STRIDE // 2, lg - 1)
        centre = torch.minimum(torch.clamp(leader, min=SIZE // 2), lg - 1 - (SIZE // 2 + SIZE % 2 - 1))
        lo = centre - SIZE // 2
        hi = centre + (SIZE // 2 + SIZE % 2 - 1)
    return ((ka - qa) % DIL == 0) & (ka >= lo * DIL + g) & (ka <= hi * DIL + g)
''',
}


#: The score_mod's FoX buffers after the inputs: prefix sums hi and lo, and the last reset.
#: FoX prefix sums (hi, lo), resets, and the key-side copies of hi and lo: Flex's CUDA backward
#: refuses a score_mod that indexes one gradient-carrying tensor twice (torch 2.11)
DECAY_BUFFERS = ("__decay_hi", "__decay_lo", "__decay_reset", "__decay_hi_k", "__decay_lo_k")

@dataclass(frozen=True)
class TokenMap:
    """How a Flex position of one role becomes a token of the pattern's layout.

    ``extents``: the layout's axis extents (one entry for ``seq``);
    ``tile``: the box tile when the order is tile-major, None for the identity."""

    extents: tuple[int, ...]
    tile: tuple[int, ...] | None = None

    @property
    def permuted(self) -> bool:
        return self.tile is not None

    @property
    def slots(self) -> int:
        return math.prod(self.tile) if self.tile is not None else 1

    @property
    def length(self) -> int:
        """Flex's sequence length for this role (padded to whole tiles when permuted)."""
        if self.tile is None:
            return math.prod(self.extents)
        return math.prod(-(-L // t) for L, t in zip(self.extents, self.tile, strict=True)) * self.slots

    @property
    def padded(self) -> bool:
        return self.tile is not None and any(L % t for L, t in zip(self.extents, self.tile, strict=True))


@dataclass(frozen=True)
class FlexSource:
    """The generated module text and what its functions take."""

    text: str
    mask_inputs: tuple[str, ...]  # input names and tables, then "__sel", "__kb" (routing), for mask_mod
    score_inputs: tuple[str, ...]  # input names, then DECAY_BUFFERS (FoX prefix sums), for score_mod
    has_score_mod: bool
    body: str = ""  # the text without its header: equal bodies are the same functions (shared compiles)
    #: the mask's tables (``tabulate``): name in ``mask_inputs`` -> its values, read like an input
    tables: dict = dataclasses.field(default_factory=dict, compare=False)

    @functools.cached_property  # (once per plan: auto reads it at every call of a data-dependent mask)
    def mask_ops(self) -> int:
        """Operators in the generated mask functions (``mask_mod`` and its helpers, comments and
        docstrings left out): a proxy for the mask's cost per token pair, which ``auto``'s time
        model charges on PARTIAL pairs (``runtime.auto.cpu``)."""
        mask = self.body.split("def score_mod")[0]
        code = "\n".join(ln.split("#")[0] for ln in mask.splitlines() if '"""' not in ln)
        return len(_MASK_OPS.findall(code))


#: What ``FlexSource.mask_ops`` counts: arithmetic, comparisons, logic, and torch's elementwise calls.
_MASK_OPS = re.compile(r"//|%|\*|\+|-|<=|>=|==|!=|<|>|&|\||~|torch\.(?:minimum|maximum|clamp|where)")


class FlexPrinter(ExprPrinter):
    """Prints bound IR expressions as torch expressions (the evaluator's semantics).

    ``symbols`` maps sympy symbols to internal names; ``inputs`` maps input
    names to (internal name, dims, dtype, batched). ``strict=False`` prints
    unbound symbols as ``_`` (the compile-time check, before sizes are known)."""

    LIB = "torch"
    ABS = "abs"
    UNSUPPORTED = "cannot lower {} to FlexAttention"

    def __init__(self, symbols: dict, inputs: dict, strict: bool = True, in_range: frozenset = frozenset()):
        super().__init__(symbols, inputs)
        self.strict = strict
        self.in_range = in_range  # coordinates always inside their axis (row-major, wrapped): tables need no clamp
        self.used_inputs: list[str] = []

    def _float(self, e) -> str:
        """An expression forced to float64 (the evaluator's float type)."""
        text = self.p(e)
        if isinstance(e, sympy.Integer):
            return f"{float(int(e))!r}"
        if isinstance(e, sympy.Float):  # already a float (sympy counts Float(0.0) as an integer)
            return text
        if e.is_integer or e.is_Boolean:
            return f"{text}.to({F64})"
        return text

    def _branch_values(self, values) -> list[str]:
        texts = super()._branch_values(values)
        if not any(map(_is_tensor, values)) and not all(v.is_integer or v.is_Boolean for v in values):
            # torch.where of Python floats alone gives the default dtype (float32), rounding a branch
            # such as 0.3; a float64 fallback makes every enclosing where float64, as the evaluator is
            texts[-1] = f"torch.tensor({texts[-1]}, dtype={F64})"
        return texts

    def _const_floordiv(self, a, b: int) -> str:
        return f"({self.p(a)} // {b})"  # torch's // on integer tensors floors like Python's

    def _float_mod(self, a, b) -> str:
        if not _is_tensor(a):  # a number dividend: torch.remainder(number, tensor) has no derivative
            self.helpers.add("_remainder")
            return f"_remainder({self._float(a)}, {self._float(b)})"
        return f"torch.remainder({self._float(a)}, {self._float(b)})"

    def _const_mod(self, a, b: int) -> str:
        return f"({self.p(a)} % {b})"

    def _min_max(self, e) -> str:
        # torch.minimum / torch.maximum, pairwise in the evaluator's order: their autograd splits the
        # gradient evenly on a tie, as REFERENCE.md says (torch.where gave it all to one argument);
        # a number operand goes through a helper, which makes it a tensor (they take two tensors)
        fn = "minimum" if isinstance(e, sympy.Min) else "maximum"
        args = self._promoted(e.args)
        out, tensor = args[0], _is_tensor(e.args[0])
        for a, arg in zip(args[1:], e.args[1:], strict=True):
            if tensor and _is_tensor(arg):
                out = f"torch.{fn}({out}, {a})"
            else:
                self.helpers.add(f"_{fn}")
                out = f"_{fn}({out}, {a})"
            tensor = True
        return out

    def _not(self, e: sympy.Not) -> str:
        return f"(~{self.p(e.args[0])})"

    def _pow(self, e: sympy.Pow) -> str:
        base, exp = e.base, e.exp
        if base.is_integer and exp.is_integer and exp.is_nonnegative:
            if isinstance(exp, sympy.Integer):
                return f"({self.p(base)} ** {int(exp)})" if int(exp) else "1"
            return f"torch.pow({self.p(base)}, {self.p(exp)})"
        if exp == sympy.Rational(1, 2):
            return f"torch.sqrt({self._float(base)})"
        return f"torch.pow({self._float(base)}, {self._float(exp)})"

    def _input(self, name: str, args) -> str:
        internal, dims, dtype, batched = self.inputs[name]
        if name not in self.used_inputs:
            self.used_inputs.append(name)
        index = ["b"] if batched else []
        for arg, dim in zip(args, dims, strict=True):
            if isinstance(arg, sympy.Integer):
                i = int(arg)
                if not 0 <= i < dim:
                    raise SpecError(f"an input is indexed at {i}, outside 0..{dim - 1}", where="code generation")
                index.append(str(i))
            elif name.startswith(TABLE_PREFIX) and arg in self.in_range:  # a coordinate of its own axis
                index.append(self.p(arg))
            else:  # clamped: padded slots and masked pairs may compute any index (as in the Triton kernels)
                index.append(f"torch.clamp({self.p(arg)}, 0, {dim - 1})")
        value = f"{internal}[{', '.join(index)}]"
        return value if dtype == "int" or name.startswith(TABLE_PREFIX) else f"{value}.to({F64})"  # tables: float64


# ----------------------------------------------------------------- the module
def _token_lines(role: str, index: str, layout: ir.Layout, tmap: TokenMap, offset: int = 0) -> list[str]:
    """Lines turning Flex position ``index`` into the token ``{role}``, its grid
    coordinates ``{role}_c{i}`` and (padded tile-major orders) ``{role}_ok``. ``offset``: the position of
    Flex's first row (the queries after a KV cache: row i is token ``offset + i``; a sequence only)."""
    r = role
    lines = [f"{r}i = {index}.to(torch.int64)"]
    ext = tmap.extents
    if offset:
        if tmap.tile is not None or layout.kind == "grid":
            raise SpecError("FlexAttention takes queries after a KV cache on a sequence only", where="argument k",
                            hint="use backend='cpu' or 'triton' for a grid's decoding")
        return [*lines, f"{r} = {r}i + {offset}  # row {r}i is token {offset} + {r}i (after the KV cache)"]
    if tmap.tile is None:
        lines.append(f"{r} = {r}i")
        if layout.kind == "grid":
            stride = 1
            coords = []
            for i in reversed(range(len(ext))):
                coords.append((i, f"({r} // {stride}) % {ext[i]}" if stride > 1 else f"{r} % {ext[i]}"))
                stride *= ext[i]
            lines += [f"{r}_c{i} = {text}" for i, text in sorted(coords)]
        return lines
    tile = tmap.tile
    grid = [-(-L // t) for L, t in zip(ext, tile, strict=True)]
    lines += [f"# tile-major order: tile {r}i // {tmap.slots} of the tile grid {tuple(grid)}, "
              f"slot {r}i % {tmap.slots} of the box {tuple(tile)}",
              f"{r}t = {r}i // {tmap.slots}", f"{r}s = {r}i % {tmap.slots}"]
    ok = []
    flat = []
    for a, (L, t) in enumerate(zip(ext, tile, strict=True)):
        g_stride, s_stride = math.prod(grid[a + 1:]), math.prod(tile[a + 1:])
        tc = f"({r}t // {g_stride})" if g_stride > 1 else f"{r}t"
        tc = f"({tc} % {grid[a]})" if a > 0 else tc
        sc = f"({r}s // {s_stride})" if s_stride > 1 else f"{r}s"
        sc = f"({sc} % {t})" if a > 0 else sc
        lines.append(f"{r}_c{a} = {tc} * {t} + {sc}")
        if L % t:
            ok.append(f"({r}_c{a} < {L})")
        flat.append((f"{r}_c{a}", math.prod(ext[a + 1:])))
    if ok:
        lines.append(f"{r}_ok = " + " & ".join(ok) + "  # padded slots of edge tiles")
    lines.append(f"{r} = " + " + ".join(f"{v} * {s}" if s > 1 else v for v, s in flat))
    return lines


def check_lowerable(pat: ir.PatternIR) -> None:
    """Compile-time check: every construct of the mask and score terms has a Flex lowering."""
    inputs = {d.name: (f"IN{i}", tuple(10**9 for _ in d.dims), d.dtype, False) for i, d in enumerate(pat.inputs)}
    printer = FlexPrinter(internal_names(pat), inputs, strict=False)
    for expr in (pat.mask, pat.bias, pat.softcap):
        if expr is not None:
            printer.p(expr)


def generate(pat: ir.PatternIR, bound: E.Bound, q_map: TokenMap, k_map: TokenMap, batched: frozenset[str],
             decay_batched: bool = False, tables: bool = True) -> FlexSource:
    """The module text defining ``mask_mod(b, h, q_idx, kv_idx, *mask_inputs)`` and (when the pattern
    has score terms) ``score_mod(score, b, h, q_idx, kv_idx, *score_inputs)``. ``tables``: terms of grid
    coordinates alone read from exact tables (``tabulate``); False computes them in the mask_mod (the
    GPU kernels: a table read there is a gather per token pair, ``runtime.backends.flex.runner.CUDA_TABLES``)."""
    check_lowerable(pat)
    mask = E.substitute(pat.mask, bound)
    mask, tables = tabulate(mask, pat, bound) if tables else (mask, {})
    bias = E.substitute(pat.bias, bound) if pat.bias is not None else None
    softcap = E.substitute(pat.softcap, bound) if pat.softcap is not None else None
    inputs = {}
    for i, decl in enumerate(pat.inputs):
        dims = tuple(int(sympy.sympify(d).subs(bound.subs)) for d in decl.dims)
        inputs[decl.name] = (f"IN{i}", dims, decl.dtype, decl.name in batched)
    for i, (name, values) in enumerate(tables.items()):
        inputs[name] = (f"TAB{i}", tuple(values.shape), "int" if values.dtype == torch.int64 else "float", False)
    symbols = internal_names(pat)
    # coordinates of the row-major order wrap into their axis at any position (a Flex index past the
    # sequence included): tables read with them need no clamp; tile-major ones may leave it
    in_range = frozenset(S.coord(role, axis) for role, layout, tmap in (("q", pat.queries, q_map), ("k", pat.keys, k_map))
                         if tmap.tile is None for axis in layout.axis_names)
    mask_printer = FlexPrinter(symbols, inputs, in_range=in_range)
    mask_text = mask_printer.p(mask)
    score_printer = FlexPrinter(symbols, inputs)
    cap_text = score_printer.float_expr(softcap) if softcap is not None else None
    bias_text = score_printer.float_expr(bias) if bias is not None else None
    helpers = mask_printer.helpers | score_printer.helpers

    def prologue() -> list[str]:
        return ["b = b.to(torch.int64)", "h = h.to(torch.int64)",
                *_token_lines("q", "q_idx", pat.queries, q_map, bound.q_offset),
                *_token_lines("k", "kv_idx", pat.keys, k_map)]

    mask_args = [inputs[n][0] for n in mask_printer.used_inputs]
    allowed = f"({mask_text})" if mask_text not in ("True", "False") else f"(qi >= 0) & {mask_text}"
    if k_map.padded:
        allowed += " & k_ok"
    route_lines = []
    if pat.route is not None:
        # routing: SEL[b, h, q, block] is this call's selection, KB[k] the block of key k (runtime.plan.routing)
        mask_args += ["SEL", "KB"]
        row = f"q - {bound.q_offset}" if bound.q_offset else "q"  # the selection's rows are the query rows
        route_lines = ["# routing: only the key blocks this query selected",
                       f"chosen = SEL[b, h, torch.clamp({row}, 0, {bound.n - 1}), KB[torch.clamp(k, 0, {bound.nk - 1})]]"]
        allowed += " & chosen"
    mask_fn = ["def mask_mod(" + ", ".join(["b", "h", "q_idx", "kv_idx", *mask_args]) + "):",
               '    """True where query q may attend key k (head h, batch element b)."""',
               *("    " + ln for ln in prologue()), *("    " + ln for ln in route_lines), f"    return {allowed}"]
    parts = ["\n\n".join(HELPERS[n].strip("\n") for n in HELPERS if n in helpers), "\n".join(mask_fn)]
    score_args = [inputs[n][0] for n in score_printer.used_inputs]
    has_score = cap_text is not None or bias_text is not None or pat.decay is not None or pat.weights is not None
    if has_score:
        body = [*prologue(), "s = score"]
        if cap_text is not None:
            caps = E.head_values(pat.softcap, bound.subs, bound.heads)
            # a cap past float32's range (inf there: inf * tanh(s / inf) is NaN) is applied in float64
            wide = ".double()" if bool((caps.abs() > torch.finfo(torch.float32).max).any()) else ""
            body += [f"cap = {cap_text}", f"s = (cap * torch.tanh(s{wide} / cap)).to(score.dtype)  # softcap"]
        if bias_text is not None:
            body.append(f"s = s + ({bias_text}).to(score.dtype)  # bias" if _is_tensor(bias)
                        else f"s = s + {bias_text}  # bias")
        if pat.decay is not None:
            n_k = bound.nk - 1
            bi = "b" if decay_batched else "0"
            body += ["# FoX decay sum(g[k+1 .. q]): prefix sums split as hi + lo (exact at any length),",
                     "# -inf for keys before the query's last reset (a gate of -inf)",
                     f"qd, kd = torch.clamp(q, 0, {bound.q_offset + bound.n - 1}), torch.clamp(k, 0, {n_k})",
                     f"fox = (DC[{bi}, h, qd] - DCK[{bi}, h, kd]) + (DL[{bi}, h, qd] - DLK[{bi}, h, kd])",
                     f's = s + torch.where(kd >= DR[{bi}, h, qd], fox, float("-inf")).to(score.dtype)']
            score_args += ["DC", "DL", "DR", "DCK", "DLK"]
        if pat.weights is not None:  # compiler.analysis.weights' function, by name (the module's globals hold them)
            w = pat.weights
            body.append(f"s = log_{w.function}_weight(s, {float(w.power)!r})  # weights {w.describe()}: "
                        "Flex's softmax of their logarithms")
        body.append("return s")
        parts.append("\n".join(["def score_mod(" + ", ".join(["score", "b", "h", "q_idx", "kv_idx", *score_args]) + "):",
                                '    """The score terms after scale * q.k: softcap, bias, decay, the logarithm of the weights."""',
                                *("    " + ln for ln in body)]))
    body = "\n\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"
    text = _header(pat, bound, q_map, k_map) + "\n\n\n" + body
    score_names = tuple(score_printer.used_inputs) + (DECAY_BUFFERS if pat.decay is not None else ())
    mask_names = tuple(mask_printer.used_inputs) + (("__sel", "__kb") if pat.route is not None else ())
    return FlexSource(text, mask_names, score_names, has_score, body, tables)


def _is_tensor(e: sympy.Basic) -> bool:
    return bool(e.free_symbols) or has_input(e)


def _header(pat: ir.PatternIR, bound: E.Bound, q_map: TokenMap, k_map: TokenMap) -> str:
    def order(m: TokenMap) -> str:
        if m.tile is None:
            return f"row-major over {m.extents}"
        return f"tile-major, box tiles {m.tile} over {m.extents} ({m.length} positions)"

    return "\n".join([
        '"""attnc generated FlexAttention mods (do not edit: regenerated from the pattern).',
        "",
        f"pattern key {pat.key()[:16]}; {bound.n} queries x {bound.nk} keys, {bound.heads} heads",
        f"query positions: {order(q_map)}",
        f"key positions: {order(k_map)}",
        '"""',
        "",
        "import torch",
    ])
