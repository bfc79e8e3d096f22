"""The sympy printer the code generators share: IR expressions as the text of array code, with
the evaluator's semantics (``compiler.analysis.evaluate``).

``ExprPrinter`` walks a bound IR expression and prints what is the same in every target: Python's
int/float promotion over sibling operands, exact rational combinations of integers divided once,
``if``/``Piecewise`` as nested ``where``, relations, logic, bit operations, ``is_pow2``,
``bit_length``, ``log2``, floored ``//`` and ``%`` with ``x // 0 == 0`` and ``x % 0 == x``, and
NATTEN windows through named helpers. A target subclass (``compiler.codegen.triton.exprs.TritonPrinter``
for the Triton kernels, ``compiler.codegen.flex.FlexPrinter`` for FlexAttention's mods) names its
array library (``LIB``) and overrides what differs: float conversion and constants, powers,
``//`` and ``%`` by a constant and ``%`` of floats, ``min``/``max``, ``not``, input loads.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import sympy

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError

#: Operators of the bit functions, by node type.
BIT_OPS = {S.BitAnd: "&", S.BitOr: "|", S.BitXor: "^", S.ShiftLeft: "<<", S.ShiftRight: ">>"}
#: Joiners of the n-ary logic nodes, by node type.
LOGIC_OPS = {sympy.And: " & ", sympy.Or: " | ", sympy.Xor: " ^ "}


class ExprPrinter(ABC):
    """Prints bound IR expressions as array expressions of one target.

    ``symbols`` maps sympy symbols to the internal names the generated code defines; ``inputs``
    maps input names to what the target's ``_input`` needs. ``helpers`` collects the helper
    functions the printed text calls. ``strict`` false prints unbound symbols and unknown window
    sizes as ``_`` (a check before sizes are known) instead of raising."""

    #: The array library's module name in the generated code (``tl``, ``torch``).
    LIB = ""
    #: The absolute value function.
    ABS = "abs"
    #: The error for a node with no rule (``{}``: its type name).
    UNSUPPORTED = "cannot generate code for {}"
    strict = True

    def __init__(self, symbols: dict, inputs: dict):
        self.symbols = symbols
        self.inputs = inputs
        self.helpers: set[str] = set()

    def float_expr(self, e: sympy.Basic) -> str:
        """A float term (a bias, a softcap): an integer-valued expression is converted once, at the end."""
        return self._float(e)

    # ------------------------------------------------------------ dispatch
    def p(self, e: sympy.Basic) -> str:
        """The text of an expression (ints stay ints, as the evaluator computes them)."""
        atom = self._atom(e)
        if atom is not None:
            return atom
        for types, rule in self._RULES:
            if isinstance(e, types):
                return getattr(self, rule)(e)
        name = S.input_name(e.func)
        if name is not None:
            return self._input(name, e.args)
        raise SpecError(self.UNSUPPORTED.format(type(e).__name__), where="code generation")

    def _atom(self, e: sympy.Basic) -> str | None:
        """Booleans, numbers and symbols; None for any other node."""
        if e is sympy.true or e is sympy.false:
            return "True" if e is sympy.true else "False"
        if isinstance(e, sympy.Integer):
            return str(int(e))
        if e.is_Number or isinstance(e, sympy.NumberSymbol) or (
                isinstance(e, sympy.Expr) and not e.free_symbols and not has_input(e) and e.is_number):
            return self._number(e)
        if isinstance(e, sympy.Symbol):
            return self._symbol(e)
        return None

    def _symbol(self, e: sympy.Symbol) -> str:
        if e in self.symbols:
            return self.symbols[e]
        if not self.strict:
            return "_"
        shown = str(e).removeprefix("param_").removeprefix("size_")
        raise SpecError(f"'{shown}' has no value at code generation", where="code generation",
                        hint="give every parameter and size a value")

    # ------------------------------------------------------------ numbers and floats
    def _number(self, e) -> str:
        if isinstance(e, sympy.Integer):
            return str(int(e))
        return self._float_constant(float(e.evalf(30)))

    def _float_constant(self, value: float) -> str:
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return self._literal(value)

    def _literal(self, value: float) -> str:
        """A finite float constant."""
        return repr(value)

    @abstractmethod
    def _float(self, e) -> str:
        """An expression forced to the target's float type."""

    def _promoted(self, args) -> list[str]:
        """Python's int/float promotion over sibling operands."""
        if all(a.is_integer or isinstance(a, sympy.logic.boolalg.Boolean) for a in args):
            return [self.p(a) for a in args]
        return [self._float(a) for a in args]

    # ------------------------------------------------------------ arithmetic
    def _add_mul(self, e) -> str:
        exact = self._exact_ratio(e)
        if exact is not None:
            return exact
        return self._add(e) if isinstance(e, sympy.Add) else self._mul(e)

    def _add(self, e: sympy.Add) -> str:
        args = S.float_factored(sorted_args(e))  # the evaluator's grouping: (q - k) * 0.1 rounded once
        text = self.p if all(a.is_integer for a in args) else self._float
        plus = [a for a in args if not a.could_extract_minus_sign()]
        minus = [-a for a in args if a.could_extract_minus_sign()]
        out = " + ".join(text(a) for a in plus) if plus else ""
        for a in minus:
            out = f"{out} - {text(a)}" if out else f"-{text(a)}"
        return f"({out})"

    def _mul(self, e: sympy.Mul) -> str:
        args = sorted_args(e)
        if any(a == -1 for a in args):
            others = [a for a in args if a != -1]
            rest = sympy.Mul(*others, evaluate=False) if len(others) > 1 else others[0]
            return f"(-{self.p(rest)})"
        num = [a for a in args if not (isinstance(a, sympy.Pow) and a.exp.is_negative)]
        den = [a for a in args if isinstance(a, sympy.Pow) and a.exp.is_negative]
        texts = self._promoted(num) if num else ["1.0"]
        out = " * ".join(texts)
        for d in den:
            out = f"{out} / {self._float(sympy.Pow(d.base, -d.exp))}"
        return f"({out})"

    def _exact_ratio(self, e) -> str | None:
        """(q - k) / 3 as one exact integer combination divided once (the evaluator's rule)."""
        def rational(x):
            return isinstance(x, sympy.Rational) and not x.is_Integer

        if not any(rational(a) for a in e.args) and not any(
                isinstance(a, sympy.Mul) and any(rational(r) for r in a.args) for a in e.args) and not any(
                isinstance(a, sympy.Pow) and a.exp.is_negative for a in e.args):
            return None
        num, den = sympy.fraction(sympy.together(e))
        if den == 1 or not (num.is_integer and den.is_integer):
            return None
        den_text = f"{float(den)!r}" if isinstance(den, sympy.Integer) else self._float(den)
        return f"({self._float(num)} / {den_text})"

    @abstractmethod
    def _pow(self, e: sympy.Pow) -> str:
        """``base ** exp`` with Python's int/float rules."""

    def _floordiv(self, e: S.FloorDiv) -> str:
        """Floored ``//``: of floats, by a constant (``_const_floordiv``), else the ``_floordiv``
        helper (``x // 0 == 0``)."""
        a, b = e.args
        if not (a.is_integer and b.is_integer):
            return f"{self.LIB}.floor({self._float(a)} / {self._float(b)})"
        if isinstance(b, sympy.Integer) and int(b) != 0:
            text = self._const_floordiv(a, int(b))
            if text is not None:
                return text
        self.helpers.add("_floordiv")
        return f"_floordiv({self.p(a)}, {self.p(b)})"

    @abstractmethod
    def _const_floordiv(self, a, b: int) -> str | None:
        """An int ``a // b`` for a nonzero constant ``b``, or None for the general helper."""

    def _mod(self, e: sympy.Mod) -> str:
        """Floored ``%``: of floats (``_float_mod``), by a constant (``_const_mod``), else the
        ``_mod`` helper (``x % 0 == x``)."""
        a, b = e.args
        if not (a.is_integer and b.is_integer):
            return self._float_mod(a, b)
        if isinstance(b, sympy.Integer) and int(b) != 0:
            text = self._const_mod(a, int(b))
            if text is not None:
                return text
        self.helpers.add("_mod")
        return f"_mod({self.p(a)}, {self.p(b)})"

    @abstractmethod
    def _float_mod(self, a, b) -> str:
        """A floored float ``a % b`` (the sign of ``b``)."""

    @abstractmethod
    def _const_mod(self, a, b: int) -> str | None:
        """An int ``a % b`` for a nonzero constant ``b``, or None for the general helper."""

    @abstractmethod
    def _min_max(self, e) -> str:
        """``min``/``max`` of any number of promoted operands."""

    def _abs(self, e: sympy.Abs) -> str:
        return f"{self.ABS}({self.p(e.args[0])})"

    def _floor_ceil(self, e) -> str:
        a = e.args[0]
        if a.is_integer:
            return self.p(a)
        return f"{self.LIB}.{'floor' if isinstance(e, sympy.floor) else 'ceil'}({self._float(a)})"

    # ------------------------------------------------------------ choices, relations, logic
    def _branch_values(self, values) -> list[str]:
        """The texts of a ``where``'s branch values, the last one the innermost fallback."""
        return self._promoted(values)

    def _piecewise(self, e: sympy.Piecewise) -> str:
        *rest, (last, _) = e.args
        vals = self._branch_values([v for v, _ in rest] + [last])
        out = vals[-1]
        for (_, cond), val in zip(reversed(rest), reversed(vals[:-1]), strict=True):
            out = f"{self.LIB}.where({self.p(cond)}, {val}, {out})"
        return out

    def _ite(self, e: sympy.ITE) -> str:
        c, a, b = e.args
        va, vb = self._branch_values([a, b])
        return f"{self.LIB}.where({self.p(c)}, {va}, {vb})"

    def _relational(self, e) -> str:
        bounded = self._int_comparison(e)
        if bounded is not None:
            return bounded
        a, b = self._promoted([e.lhs, e.rhs])
        return f"({a} {e.rel_op} {b})"

    def _int_comparison(self, e) -> str | None:
        """A target's own text for an int/float comparison, or None."""
        return None

    def _logic(self, e) -> str:
        return "(" + LOGIC_OPS[type(e)].join(self._logic_term(a) for a in sorted_args(e)) + ")"

    def _logic_term(self, a: sympy.Basic) -> str:
        """One operand of ``&``, ``|``, ``^``."""
        return self.p(a)

    @abstractmethod
    def _not(self, e: sympy.Not) -> str:
        """Logical negation of a bool (or of a scalar the target treats as one)."""

    def _equivalent(self, e: sympy.Equivalent) -> str:
        args = [self.p(a) for a in sorted_args(e)]
        return "(" + " & ".join(f"({args[0]} == {a})" for a in args[1:]) + ")"

    # ------------------------------------------------------------ functions
    def _elementary(self, e) -> str:
        """``sqrt``, ``exp``, ``log``, ``tanh`` of the float argument."""
        if isinstance(e, S.Sqrt):
            fn = "sqrt"
        elif isinstance(e, sympy.exp):
            fn = "exp"
        elif isinstance(e, sympy.tanh):
            fn = "tanh"
        else:
            fn = "log"
        return f"{self.LIB}.{fn}({self._float(e.args[0])})"

    def _is_pow2(self, e: S.IsPow2) -> str:
        x = self.p(e.args[0])
        return f"(({x} > 0) & (({x} & ({x} - 1)) == 0))"

    def _bit_length(self, e) -> str:
        self.helpers.add("_bit_length")
        return f"_bit_length({self.p(e.args[0])})"

    def _log2_floor(self, e) -> str:
        self.helpers.add("_bit_length")
        x = self.p(e.args[0])
        return f"{self.LIB}.where({x} >= 1, _bit_length({x}) - 1, -1)"

    def _bit_op(self, e) -> str:
        return f"({self.p(e.args[0])} {BIT_OPS[type(e)]} {self.p(e.args[1])})"

    def _bit_not(self, e) -> str:
        return f"(~{self.p(e.args[0])})"

    def _window(self, e: S.Window) -> str:
        qa, ka, L, size, dil, stride, causal = e.args
        # the axis length may be a size the kernel reads at run time (a paged row's key count: a name it defines)
        length_known = isinstance(L, sympy.Integer) or bool(L.free_symbols) and L.free_symbols <= self.symbols.keys()
        if not (length_known and all(isinstance(x, sympy.Integer) for x in (size, dil, stride))):
            if not self.strict:
                return "_"
            raise SpecError("window() sizes must be known numbers at code generation", where="code generation")
        self.helpers.add("_window")
        return (f"_window({self.p(qa)}, {self.p(ka)}, {self.p(L)}, {int(size)}, {int(dil)}, {int(stride)}, "
                f"{bool(causal)})")

    @abstractmethod
    def _input(self, name: str, args) -> str:
        """A read of input ``name`` at ``args`` (literal indices checked, others clamped)."""

    #: (node types, name of the method that prints them), tried in this order after the atoms.
    _RULES = (
        (sympy.Add | sympy.Mul, "_add_mul"),
        (sympy.Pow, "_pow"),
        (S.FloorDiv, "_floordiv"),
        (sympy.Mod, "_mod"),
        (sympy.Min | sympy.Max, "_min_max"),
        (sympy.Abs, "_abs"),
        (sympy.floor | sympy.ceiling, "_floor_ceil"),
        (sympy.Piecewise, "_piecewise"),
        (sympy.ITE, "_ite"),
        (sympy.core.relational.Relational, "_relational"),
        (sympy.And | sympy.Or | sympy.Xor, "_logic"),
        (sympy.Not, "_not"),
        (sympy.Equivalent, "_equivalent"),
        (S.Sqrt | sympy.exp | S.Log | sympy.tanh, "_elementary"),
        (S.IsPow2, "_is_pow2"),
        (S.BitLength, "_bit_length"),
        (S.Log2Floor, "_log2_floor"),
        (S.BitAnd | S.BitOr | S.BitXor | S.ShiftLeft | S.ShiftRight, "_bit_op"),
        (S.BitNot, "_bit_not"),
        (S.Window, "_window"),
    )


def internal_names(pat: ir.PatternIR) -> dict:
    """The names the generated code gives the positions: ``q``, ``k``, ``h``, and ``q_c{i}``,
    ``k_c{i}`` for the grid coordinates (no name of the spec becomes a name of the code)."""
    symbols = {S.Q: "q", S.K: "k", S.H: "h"}
    for i, axis in enumerate(pat.queries.axis_names):
        symbols[S.coord("q", axis)] = f"q_c{i}"
    for i, axis in enumerate(pat.keys.axis_names):
        symbols[S.coord("k", axis)] = f"k_c{i}"
    return symbols


def has_input(e: sympy.Basic) -> bool:
    """Whether an expression reads a call-time input."""
    return any(S.input_name(f.func) for f in e.atoms(sympy.Function))


def sorted_args(e: sympy.Basic) -> list:
    """Arguments in a deterministic order (sympy's canonical sort key)."""
    return sorted(e.args, key=sympy.default_sort_key)
