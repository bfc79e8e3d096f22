"""IR expressions as Triton expressions, and the numeric rules the kernels' arithmetic follows.

- ``TritonPrinter``: the shared printer (``compiler.codegen.expr_printer``) for Triton, with the
  evaluator's semantics (``compiler.analysis.evaluate``): floored ``//`` and ``%`` (Triton truncates, so
  helpers are emitted), ``x // 0 == 0`` and ``x % 0 == x`` for ints, exact rational combinations
  of integers divided once, NATTEN windows as inline arithmetic, bit operations, input loads.
  Symbols and inputs are printed under fixed internal names (``q``, ``k``, ``h``, ``q_c0``,
  ``IN0``...): no name of the spec ever becomes a Python name of the kernel, and sizes and
  parameters are literals.
- the int/float rules: an int compared with a float as an int comparison with a bound
  (``int_float_sides``, ``int_bound_rule``; also ``compiler.codegen.tables``), bounds of integer
  magnitudes (``abs_bound``: the wrap-around rule, ``needs_int64``: int32 or int64 arithmetic),
  and the float32 range of constants (``check_fp32_constants``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import sympy

from ....core import ir
from ....core import symbols as S
from ....core.errors import SpecError
from ..expr_printer import ExprPrinter

INT32_MAX = (1 << 31) - 1
FP32_MAX = 3.4028234663852886e38
FP32_TINY = 1.1754943508222875e-38  # the smallest normal float32
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# ----------------------------------------------------------------- the printer
@dataclass(frozen=True)
class InputSlot:
    """A call-time input as the kernel sees it: pointer ``IN{i}``, strides ``in{i}_s{j}``; a block's inputs
    (``runtime_extents``) also their extents ``in{i}_n{j}``, given at run time: an input over the sequence
    grows with a decode step's cache, and its extent in the text would make a module per length."""

    index: int
    dtype: str
    dims: tuple[int, ...]
    runtime_extents: bool = False
    #: a table of the present queries' rows (a paged batch's ``relative()`` / ``landmark()`` table, laid out as q):
    #: read at the query's row in q (``q_pk``, which the kernel passes), not at its position
    query_rows: bool = False

    @property
    def pointer(self) -> str:
        return f"IN{self.index}"

    def strides(self) -> list[str]:
        return [f"in{self.index}_s{j}" for j in range(len(self.dims))]

    def extents(self) -> list[str]:
        """The run-time extents' parameter names (none where the extents are in the text)."""
        return [f"in{self.index}_n{j}" for j in range(len(self.dims))] if self.runtime_extents else []

    def extent(self, j: int) -> int | str:
        """Dimension ``j``'s extent: its value, or its parameter's name."""
        return f"in{self.index}_n{j}" if self.runtime_extents else self.dims[j]

    def grad_strides(self) -> list[str]:
        """The strides of its gradient buffer (``G{i}``, fp32, which the dQ kernel adds to) in ``_bias_grads``."""
        return [f"g{self.index}_s{j}" for j in range(len(self.dims))]

    def params(self) -> list[str]:
        return [self.pointer, *self.strides(), *self.extents()]


class TritonPrinter(ExprPrinter):
    """Prints bound IR expressions as Triton expressions.

    ``symbols`` maps sympy symbols to the internal names the kernel defines;
    ``inputs`` maps input names to their slots. ``helpers`` collects the
    helper functions the printed text calls."""

    LIB = "tl"
    ABS = "tl.abs"

    def __init__(self, symbols: dict, inputs: dict[str, InputSlot], ranges: dict | None = None,
                 scalars: frozenset = frozenset()):
        super().__init__(symbols, inputs)
        self.scalars = scalars  # position symbols with one value per tile (``uniform_axes``)
        self.ranges = ranges or {}  # symbol -> largest absolute value (for the wrap-around rule)
        self.used_inputs: set[int] = set()
        self.float_type = "tl.float32"

    # ------------------------------------------------------------ entry points
    def bool_expr(self, e: sympy.Basic) -> str:
        """A mask: its float arithmetic in float64, as the reference evaluates it, so that a comparison
        near a tie (``(q - k) * 0.1 < 0.3``) decides the same pairs; it runs on PARTIAL tiles only."""
        self.float_type = "tl.float64"
        try:
            return self.p(e)
        finally:
            self.float_type = "tl.float32"

    # ------------------------------------------------------------ numbers and floats
    def _float_constant(self, value: float) -> str:
        if math.isfinite(value) and abs(value) > FP32_MAX:  # e.g. folded from a size: check_fp32_constants
            raise SpecError(f"the constant {value:g} is beyond the float32 range of the triton backend",
                            where="code generation", hint="use backend='cpu' or 'reference' (float64 arithmetic)")
        return super()._float_constant(value)

    def _literal(self, value: float) -> str:
        """A finite float constant. In a mask's float64 arithmetic it is a float64 tensor: a bare
        Python float is rounded to float32 first by some Triton versions (3.6: ``0.1`` becomes
        0.100000001, so ``(q - k) * 0.1 < 0.3`` flips at q - k = 3), where the reference is exact."""
        if self.float_type == "tl.float64":
            return f"tl.full([], {value!r}, tl.float64)"
        return repr(value)

    def _float(self, e) -> str:
        """An expression forced to floating point."""
        if e is sympy.true or e is sympy.false:  # a literal: no cast
            return "1.0" if e is sympy.true else "0.0"
        if isinstance(e, sympy.Integer):
            return self._literal(float(int(e)))
        if e.is_Number:
            return self._number(e)
        text = self.p(e)
        if not (e.is_integer or e.is_Boolean):
            return text
        return f"({text} * 1.0)" if self.float_type == "tl.float32" else f"{text}.to(tl.float64)"

    # ------------------------------------------------------------ Triton's own rules
    def _int_comparison(self, e) -> str | None:
        """A mask's ``n <= x`` with ``n`` an int per score and ``x`` a float with one value per tile
        pair (radial's ``abs(q.s - k.s) <= w``) as an int comparison with a bound computed once
        (``_int_bound``): no float64 conversion per score. Exact: n converts to float64 exactly."""
        if self.float_type != "tl.float64":
            return None
        for n, x, op in int_float_sides(e):
            if self._per_pair(n) and not self._per_pair(x) and x.free_symbols:
                big = abs_bound(n, self.ranges, math.inf) + 1
                if big >= 2**30:
                    return None
                self.helpers.add("_int_bound")
                ceil, nan_high = int_bound_rule(op)
                return f"({self.p(n)} {op} _int_bound({self._float(x)}, {int(big)}, {ceil}, {nan_high}))"
        return None

    def _logic_term(self, a: sympy.Basic) -> str:
        # a term of the head or of one-value-per-tile coordinates alone is a scalar: made a bool Triton's
        # interpreter combines with a block (its scalar comparisons refuse `|` with one)
        return self.p(a) if self._per_pair(a) else self._as_bool(a)

    def _as_bool(self, e: sympy.Basic) -> str:
        self.helpers.add("_as_bool")
        return f"_as_bool({self.p(e)})"

    def _branch_values(self, values) -> list[str]:
        # the branches of a bool `if` are made bools (_as_bool) unless they are a tile of comparisons already: a
        # bool parameter is an int argument (int32 branches made the mask int32, which a store refuses as its
        # mask), and a comparison of the head alone is a scalar Triton's interpreter cannot broadcast beside a
        # block branch (it tags the scalar with its operands' dtype)
        texts = super()._branch_values(values)
        tests = (sympy.core.relational.Relational, sympy.logic.boolalg.BooleanFunction)
        if not any(isinstance(v, tests) or v in (sympy.true, sympy.false) for v in values):
            return texts  # an int or float `if` (a Symbol is a sympy Boolean too: not a test)
        return [t if v in (sympy.true, sympy.false) or (isinstance(v, tests) and self._per_pair(v)) else
                self._as_bool(v) for v, t in zip(values, texts, strict=True)]

    def _per_pair(self, e: sympy.Basic) -> bool:
        """Whether an expression is a tile of values (else a scalar: per head, or per tile pair)."""
        return S.per_pair(e, self.scalars)

    def _not(self, e: sympy.Not) -> str:
        return f"({self.p(e.args[0])} == 0)"

    def _min_max(self, e) -> str:
        fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
        args = self._promoted(e.args)
        out = args[0]
        for a in args[1:]:
            out = f"{fn}({out}, {a})"
        return out

    def _elementary(self, e) -> str:
        if isinstance(e, sympy.tanh):
            self.helpers.add("_tanh")
            return f"_tanh({self._float(e.args[0])})"
        return super()._elementary(e)

    def _pow(self, e: sympy.Pow) -> str:
        base, exp = e.base, e.exp
        if isinstance(exp, sympy.Integer):
            n = int(exp)
            if n == 0:
                return "1"
            if n > 0 and (base.is_integer or n <= 8):
                if n <= 8:
                    b = self.p(base)
                    return "(" + " * ".join([b] * n) + ")"
                self.helpers.add("_ipow")
                return f"_ipow({self.p(base)}, {n})"
            if n < 0 and -n <= 8:
                b = self._float(base)
                return "(1.0 / (" + " * ".join([b] * (-n)) + "))"
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt({self._float(base)})"
        if base.is_integer and exp.is_integer and exp.is_nonnegative:
            self.helpers.add("_ipow")
            return f"_ipow({self.p(base)}, {self.p(exp)})"
        if base.is_Number and float(base) > 0:
            lg = math.log2(float(base))
            if lg == 1.0:
                return f"tl.exp2({self._float(exp)})"
            return f"tl.exp2({self._float(exp)} * {lg!r})"
        self.helpers.add("_fpow")
        return f"_fpow({self._float(base)}, {self._float(exp)})"

    def _const_floordiv(self, a, b: int) -> str | None:
        if b < 0:
            return None
        if self._nonnegative(a):
            return f"({self.p(a)} // {b})"
        self.helpers.add("_floordiv_c")
        return f"_floordiv_c({self.p(a)}, {b})"

    def _float_mod(self, a, b) -> str:
        self.helpers.add("_fmod")
        return f"_fmod({self._float(a)}, {self._float(b)})"

    def _const_mod(self, a, b: int) -> str | None:
        if b < 0:
            return None
        if self._nonnegative(a):
            return f"({self.p(a)} % {b})"
        self.helpers.add("_mod_c")
        return f"_mod_c({self.p(a)}, {b})"

    def _nonnegative(self, a) -> bool:
        """``a >= 0`` at run time: non-negative as a number and too small to wrap around in
        64 bits (``q * 2**61`` is negative for q >= 4), so Triton's truncating ``//`` and
        ``%`` agree with the floored ones."""
        return bool(a.is_nonnegative) and abs_bound(a, self.ranges, math.inf) < 2.0 ** 62

    def _input(self, name: str, args) -> str:
        slot = self.inputs[name]
        self.used_inputs.add(slot.index)
        value = f"tl.load({slot.pointer} + {self.input_offset(slot, args, slot.strides())})"
        return value if slot.dtype == "int" else f"{value}.to({self.float_type})"

    def input_offset(self, slot: InputSlot, args, strides: list[str]) -> str:
        """The offset of input ``slot`` at ``args`` with ``strides`` (its own, or its gradient buffer's): literal
        indices checked at generation, others clamped to the extent (padded slots and masked pairs may compute any
        index)."""
        terms = []
        for j, (arg, dim, stride) in enumerate(zip(args, slot.dims, strides, strict=True)):
            if isinstance(arg, sympy.Integer):  # a literal index, checked in range at generation
                i = int(arg)
                if not 0 <= i < dim:
                    raise SpecError(f"an input is indexed at {i}, outside 0..{dim - 1}", where="code generation")
                terms.append(f"{i} * {stride}")
            else:  # clamped: padded slots and masked pairs may compute any index
                last = f"{slot.extent(j)} - 1" if slot.runtime_extents else dim - 1
                index = "q_pk" if slot.query_rows and arg == S.Q else self.p(arg)
                terms.append(f"tl.minimum(tl.maximum({index}, 0), {last}) * {stride}")
        return " + ".join(terms)


# ----------------------------------------------------------------- int compared with float
def int_float_sides(e: sympy.Basic):
    """(int side, float side, operator read from the int side) of an order comparison of an int
    with a float, each way round it can be read: ``x > n`` gives ``(n, x, "<")``."""
    flip = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
    if not isinstance(e, sympy.core.relational.Relational) or e.rel_op not in flip:
        return
    for n, x, op in ((e.lhs, e.rhs, e.rel_op), (e.rhs, e.lhs, flip[e.rel_op])):
        if n.is_integer and not x.is_integer:
            yield n, x, op


def int_bound_rule(op: str) -> tuple[bool, bool]:
    """(ceil, nan_high) of the int bound c of a float x with ``n op x == n op c`` for ints n (the
    ``_int_bound`` helper, and ``tables.tabulate``'s tables of bounds): ``<=`` and ``>`` take
    floor(x), ``<`` and ``>=`` ceil(x); a NaN x becomes a bound beyond every n on the side where
    ``op`` is False (high for ``>``, ``>=``, low for ``<``, ``<=``)."""
    return op in ("<", ">="), op in (">", ">=")


# ----------------------------------------------------------------- integer magnitudes
def needs_int64(exprs: list[sympy.Basic], ranges: dict) -> bool:
    """True when some integer subexpression may leave the int32 range, given
    ``ranges`` (symbol -> largest absolute value)."""
    worst = 0.0
    for e in exprs:
        if e is None:
            continue
        for node in sympy.preorder_traversal(e):
            if isinstance(node, sympy.Expr) and node.is_integer:
                worst = max(worst, abs_bound(node, ranges))
                if worst > INT32_MAX:
                    return True
    return False


def abs_bound(e: sympy.Basic, ranges: dict, input_bound: float = 0.0) -> float:
    """A bound of ``|e|`` given ``ranges``; an input read counts as ``input_bound`` (0 for the
    int32/int64 choice: loads are int64 already; infinity for the wrap-around rule)."""
    if isinstance(e, sympy.Integer):
        return abs(int(e))
    if isinstance(e, sympy.Symbol):
        return float(ranges.get(e, math.inf))
    if isinstance(e, sympy.Add):
        return sum(abs_bound(a, ranges, input_bound) for a in e.args)
    if isinstance(e, sympy.Mul):
        out = 1.0
        for a in e.args:
            out *= abs_bound(a, ranges, input_bound)
        return out
    if isinstance(e, sympy.Pow) and isinstance(e.exp, sympy.Integer) and int(e.exp) >= 0:
        b = abs_bound(e.base, ranges, input_bound)
        return b ** int(e.exp) if b < 1e30 else math.inf
    if isinstance(e, S.FloorDiv | S.ShiftRight | sympy.Abs):
        return abs_bound(e.args[0], ranges, input_bound)
    if isinstance(e, sympy.Mod):
        if isinstance(e.args[1], sympy.Integer) and e.args[1] != 0:  # floored: |a % b| < |b|, wrapped a or not
            return abs(int(e.args[1]))
        return max(abs_bound(a, ranges, input_bound) for a in e.args)
    if isinstance(e, sympy.Min | sympy.Max):
        return max(abs_bound(a, ranges, input_bound) for a in e.args)
    if isinstance(e, sympy.Piecewise):
        return max(abs_bound(v, ranges, input_bound) for v, _ in e.args)
    if isinstance(e, S.BitLength | S.Log2Floor):
        return 64.0
    if isinstance(e, S.BitAnd | S.BitOr | S.BitXor | S.BitNot):
        m = max(abs_bound(a, ranges, input_bound) for a in e.args)
        return 2.0 ** (math.floor(math.log2(m)) + 2) if 0 < m < 1e30 else (1.0 if m == 0 else math.inf)
    if S.input_name(getattr(e, "func", None)):
        return input_bound
    return math.inf


# ----------------------------------------------------------------- float32 constants
def check_fp32_constants(pat: ir.PatternIR, exprs: list | None = None) -> None:
    """The kernels compute floats in float32: refuse a finite constant of the mask, bias
    or softcap beyond its range (``1e39`` would become inf, and ``inf * 0`` NaN where the
    reference, in float64, stays finite). The error names the parameter it came from."""
    exprs = [pat.mask, pat.bias, pat.softcap] if exprs is None else exprs
    for e in exprs:
        if e is None:
            continue
        for node in sympy.preorder_traversal(e):
            if not (isinstance(node, sympy.Expr) and node.is_Number) or isinstance(node, sympy.Integer):
                continue
            value = float(node)
            if math.isfinite(value) and abs(value) > FP32_MAX:
                raise fp32_error(pat, value)


def fp32_error(pat: ir.PatternIR, value: float) -> SpecError:
    def beyond(v: float) -> bool:
        return math.isfinite(v) and abs(v) > FP32_MAX

    param = _parameter_where(pat, beyond)
    what = f"parameter '{param}' = {float(dict(pat.params)[param]):g}" if param else f"the constant {value:g}"
    return _constant_error(pat, value, beyond, param,
                           f"{what} is beyond the float32 range of the triton backend (|x| <= {FP32_MAX:.4g})",
                           "use a smaller value, or backend='cpu' / 'reference' (float64 arithmetic)",
                           " (it is folded from the pattern's constants)")


def softcap_too_small(pat: ir.PatternIR, value: float, head: int) -> SpecError:
    """The error of a softcap below float32's smallest normal number (``s / cap`` is inf in the kernels' float32, and
    its gradient NaN), at the parameter or the number in the file it comes from where there is one."""
    def same(v: float) -> bool:
        return v == value

    return _constant_error(pat, value, same, _parameter_where(pat, same),
                           f"softcap {value:g} (head {head}) is below float32's smallest normal number "
                           f"({FP32_TINY:.4g}), in which the triton backend computes it",
                           "use a larger cap, or backend='cpu' / 'reference' (float64 arithmetic)")


def _parameter_where(pat: ir.PatternIR, test) -> str | None:
    """The first numeric parameter of ``pat`` whose value passes ``test``, or None."""
    for name, v in pat.params:
        if isinstance(v, int | float | sympy.Number) and not isinstance(v, bool) and test(float(v)):
            return name
    return None


def _constant_error(pat: ir.PatternIR, value: float, test, param: str | None, message: str, hint: str,
                    folded: str = "") -> SpecError:
    """A constant's error where it comes from: the parameter ``param``, else the number written in the file that
    passes ``test`` (``value`` first), else the pattern (``folded`` added to the hint)."""
    if param:
        return SpecError(message, where=f"parameter {param}", hint=hint)
    literal = _written_number(pat, value, test)
    if literal is not None:  # written in the file: point at it
        return SpecError(message, literal, filename=pat.filename, source=pat.source, hint=hint)
    return SpecError(message, where=f"pattern '{pat.name}'", hint=hint + folded)


def _written_number(pat: ir.PatternIR, value: float, test):
    """The position of a float written in the pattern's file that passes ``test``, the one equal to ``value`` first,
    or None (no source, or the constant is folded from others: ``1e20 * 1e20``)."""
    if pat.source is None:
        return None
    from ....spec import ast  # the spec's syntax tree: parsed again only on this error's path
    from ....spec.parser import parse

    def nodes(x):
        if isinstance(x, ast.Num):
            yield x
        elif isinstance(x, tuple | list):
            for y in x:
                yield from nodes(y)
        elif dataclasses.is_dataclass(x) and not isinstance(x, type):
            for f in dataclasses.fields(x):
                yield from nodes(getattr(x, f.name))

    try:
        module = parse(pat.source, pat.filename)
    except SpecError:
        return None
    passing = [num for num in nodes(module) if isinstance(num.value, float) and test(num.value)]
    same = [num for num in passing if abs(num.value) == abs(value)]
    found = same or passing
    return found[0].pos if found else None
