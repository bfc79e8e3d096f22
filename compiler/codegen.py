"""Code generation: Triton source for a softmax pattern, from the IR.

Two parts:

- ``TritonPrinter``: a sympy printer from IR expressions to Triton
  expressions with the evaluator's semantics (``compiler.evaluate``): floored
  ``//`` and ``%`` (Triton truncates, so helpers are emitted), ``x // 0 == 0``
  and ``x % 0 == x`` for ints, exact rational combinations of integers divided
  once, NATTEN windows as inline arithmetic, bit operations, input loads.
  Symbols and inputs are printed under fixed internal names (``q``, ``k``,
  ``h``, ``q_c0``, ``IN0``...): no name of the spec ever becomes a Python
  name of the kernel, and sizes and parameters are literals.
- ``generate_source``: the kernel module for one pattern, bound sizes and
  schedule shape: a forward kernel (FlashAttention-2 online softmax over the
  FULL and PARTIAL KV lists of each Q tile), a dQ kernel over the same lists
  and a dK/dV kernel over the transposed lists. Same inputs, same text.

The kernels address multi-dimensional tiles in the kernel: a tile index and a
slot give the token's grid coordinates by integer arithmetic with literal
extents (``address`` and ``flat`` layouts), or the host permutes q/k/v into
tile order beforehand (``permute`` layout) and only the memory row changes.

Only Triton builtins are called (``tl.full``, ``tl.reduce``, ...) and no
``@triton.jit`` function of ``triton.language`` (``tl.zeros``, ``tl.sum``,
``tl.max`` are such functions): those are interpreted only when
``TRITON_INTERPRET`` was set before Triton was imported, while these kernels
must run in the interpreter in a process that imported Triton natively.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import sympy
import torch

from ..core import ir
from ..core import symbols as S
from ..core.errors import SpecError
from . import evaluate as E
from .route_blocks import WORD_BITS, block_sizes, tile_block_spread
from .schedule import uniform_axes

INT32_MAX = (1 << 31) - 1
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# ----------------------------------------------------------------- helpers emitted into kernels
#: name -> source of each @triton.jit helper the printer may call (emitted in this order when used).
HELPERS: dict[str, str] = {
    "_floordiv": '''
@triton.jit
def _floordiv(a, b):
    """Floored integer division (Python's //); a // 0 == 0."""
    safe = tl.where(b == 0, 1, b)
    t = a // safe
    t = t - ((a % safe != 0) & ((a < 0) != (safe < 0))).to(t.dtype)
    return tl.where(b == 0, 0, t)
''',
    "_floordiv_c": '''
@triton.jit
def _floordiv_c(a, B: tl.constexpr):
    """Floored integer division by a positive constant."""
    t = a // B
    return t - ((a % B != 0) & (a < 0)).to(t.dtype)
''',
    "_mod": '''
@triton.jit
def _mod(a, b):
    """Floored integer modulo (Python's %, the sign of b); a % 0 == a."""
    safe = tl.where(b == 0, 1, b)
    r = a % safe
    r = tl.where((r != 0) & ((r < 0) != (safe < 0)), r + safe, r)
    return tl.where(b == 0, a, r)
''',
    "_mod_c": '''
@triton.jit
def _mod_c(a, B: tl.constexpr):
    """Floored integer modulo by a positive constant."""
    r = a % B
    return tl.where(r < 0, r + B, r)
''',
    "_fmod": '''
@triton.jit
def _fmod(a, b):
    """Floored float modulo: a - b * floor(a / b)."""
    return a - b * tl.floor(a / b)
''',
    "_ipow": '''
@triton.jit
def _ipow(base, e):
    """Integer power base ** e for 0 <= e < 64 (binary exponentiation)."""
    out = base * 0 + 1
    b = base
    for _bit in tl.static_range(6):
        out = tl.where((e & 1) != 0, out * b, out)
        b = b * b
        e = e >> 1
    return out
''',
    "_fpow": '''
@triton.jit
def _fpow(x, y):
    """Float power x ** y (negative bases only for integral y)."""
    ax = tl.abs(x)
    r = tl.exp2(y * tl.log2(ax))
    odd = (y - 2.0 * tl.floor(y * 0.5)) == 1.0
    integral = tl.floor(y) == y
    r = tl.where(x < 0, tl.where(integral, tl.where(odd, -r, r), float("nan")), r)
    return tl.where((x == 0) & (y == 0), 1.0, r)
''',
    "_tanh": '''
@triton.jit
def _tanh(x):
    """tanh, overflow-free: sign(x) * (1 - e) / (1 + e) with e = exp(-2|x|)."""
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)
''',
    "_softcap_tanh": '''
@triton.jit
def _softcap_tanh(x):
    """tanh(x) in float32 with one exp2 and one approximate reciprocal (div.full.f32 on the GPU, a
    plain division in the interpreter): 2 / (1 + 2^(-2 log2(e) x)) - 1, exactly -1 or 1 where the
    power overflows or underflows; for |x| < 0.25, where 1 + 2^(...) cancels, the odd Taylor
    polynomial to x^9 (relative error below 1e-8 there)."""
    wide = tl.fdiv(2.0, 1.0 + tl.exp2(-2.8853900817779268 * x), ieee_rounding=False) - 1.0
    x2 = x * x
    near0 = x + x * x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
                                                                                 + x2 * 0.021869488536155203)))
    return tl.where(tl.abs(x) < 0.25, near0, wide)
''',
    "_minimum": '''
@triton.jit
def _minimum(a, b):
    """Combine function of minima (tl.reduce)."""
    return tl.minimum(a, b)
''',
    "_int_bound": '''
@triton.jit
def _int_bound(x, BIG: tl.constexpr, CEIL: tl.constexpr, NAN_HIGH: tl.constexpr):
    """An int32 c such that, for every int n with |n| < BIG, n <= x == n <= c and n > x == n > c
    (floor: CEIL false), or n < x == n < c and n >= x == n >= c (ceil: CEIL true); a NaN x gives
    -BIG (NAN_HIGH false: for <=, <) or BIG (for >=, >), where every such comparison is False."""
    y = tl.ceil(x) if CEIL else tl.floor(x)
    y = tl.minimum(tl.maximum(y, -BIG), BIG)
    y = tl.where(x == x, y, BIG if NAN_HIGH else -BIG)
    return y.to(tl.int32)
''',
    "_bit_length": '''
@triton.jit
def _bit_length(x):
    """Python's int.bit_length of |x|."""
    y = tl.abs(x)
    out = y * 0
    for i in tl.static_range(6):
        s = 32 >> i
        big = (y >> s) != 0
        out = out + tl.where(big, s, 0)
        y = tl.where(big, y >> s, y)
    return out + (y > 0).to(out.dtype)
''',
    "_window": '''
@triton.jit
def _window(qa, ka, L: tl.constexpr, SIZE: tl.constexpr, DIL: tl.constexpr, STRIDE: tl.constexpr,
            CAUSAL: tl.constexpr):
    """NATTEN neighborhood along one axis of length L: may query coordinate qa attend key coordinate ka?"""
    g = qa % DIL
    same = g == ka % DIL
    lg = (L - g + DIL - 1) // DIL
    iq = qa // DIL
    ik = ka // DIL
    if CAUSAL:
        leader = tl.minimum((iq // STRIDE) * STRIDE + STRIDE - 1, lg - 1)
        lo = tl.maximum(leader - SIZE + 1, 0)
        hi = iq
    else:
        leader = tl.minimum((iq // STRIDE) * STRIDE + STRIDE // 2, lg - 1)
        centre = tl.minimum(tl.maximum(leader, SIZE // 2), lg - 1 - (SIZE // 2 + SIZE % 2 - 1))
        lo = centre - SIZE // 2
        hi = centre + (SIZE // 2 + SIZE % 2 - 1)
    return same & (ik >= lo) & (ik <= hi)
''',
}


# ----------------------------------------------------------------- the printer
@dataclass(frozen=True)
class InputSlot:
    """A call-time input as the kernel sees it: pointer ``IN{i}``, strides ``in{i}_s{j}``."""

    index: int
    dtype: str
    dims: tuple[int, ...]

    @property
    def pointer(self) -> str:
        return f"IN{self.index}"

    def strides(self) -> list[str]:
        return [f"in{self.index}_s{j}" for j in range(len(self.dims))]

    def params(self) -> list[str]:
        return [self.pointer, *self.strides()]


class TritonPrinter:
    """Prints bound IR expressions as Triton expressions.

    ``symbols`` maps sympy symbols to the internal names the kernel defines;
    ``inputs`` maps input names to their slots. ``helpers`` collects the
    helper functions the printed text calls."""

    def __init__(self, symbols: dict, inputs: dict[str, InputSlot], ranges: dict | None = None,
                 scalars: frozenset = frozenset()):
        self.symbols = symbols
        self.scalars = scalars  # position symbols with one value per tile (``uniform_axes``)
        self.inputs = inputs
        self.ranges = ranges or {}  # symbol -> largest absolute value (for the wrap-around rule)
        self.helpers: set[str] = set()
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

    def float_expr(self, e: sympy.Basic) -> str:
        """A float term (the bias): an integer-valued expression is converted once, at the end."""
        return self._float(e)

    # ------------------------------------------------------------ dispatch
    def p(self, e: sympy.Basic) -> str:
        if e is sympy.true or e is sympy.false:
            return "True" if e is sympy.true else "False"
        if isinstance(e, sympy.Integer):
            return str(int(e))
        if e.is_Number or isinstance(e, sympy.NumberSymbol) or (
                isinstance(e, sympy.Expr) and not e.free_symbols and not _has_input(e) and e.is_number):
            return self._number(e)
        if isinstance(e, sympy.Symbol):
            if e not in self.symbols:
                shown = str(e).removeprefix("param_").removeprefix("size_")
                raise SpecError(f"'{shown}' has no value at code generation",
                                where="code generation", hint="give every parameter and size a value")
            return self.symbols[e]
        if isinstance(e, sympy.Add | sympy.Mul):
            exact = self._exact_ratio(e)
            if exact is not None:
                return exact
            return self._add(e) if isinstance(e, sympy.Add) else self._mul(e)
        if isinstance(e, sympy.Pow):
            return self._pow(e)
        if isinstance(e, S.FloorDiv):
            return self._floordiv(*e.args)
        if isinstance(e, sympy.Mod):
            return self._mod(*e.args)
        if isinstance(e, sympy.Min | sympy.Max):
            fn = "tl.minimum" if isinstance(e, sympy.Min) else "tl.maximum"
            args = self._promoted(e.args)
            out = args[0]
            for a in args[1:]:
                out = f"{fn}({out}, {a})"
            return out
        if isinstance(e, sympy.Abs):
            return f"tl.abs({self.p(e.args[0])})"
        if isinstance(e, sympy.floor | sympy.ceiling):
            a = e.args[0]
            if a.is_integer:
                return self.p(a)
            return f"tl.{'floor' if isinstance(e, sympy.floor) else 'ceil'}({self._float(a)})"
        if isinstance(e, sympy.Piecewise):
            *rest, (last, _) = e.args
            vals = self._promoted([v for v, _ in rest] + [last])
            out = vals[-1]
            for (_, cond), val in zip(reversed(rest), reversed(vals[:-1]), strict=True):
                out = f"tl.where({self.p(cond)}, {val}, {out})"
            return out
        if isinstance(e, sympy.ITE):
            c, a, b = e.args
            va, vb = self._promoted([a, b])
            return f"tl.where({self.p(c)}, {va}, {vb})"
        if isinstance(e, sympy.core.relational.Relational):
            op = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "==": "==", "!=": "!="}[e.rel_op]
            bounded = self._int_comparison(e)
            if bounded is not None:
                return bounded
            a, b = self._promoted([e.lhs, e.rhs])
            return f"({a} {op} {b})"
        if isinstance(e, sympy.And | sympy.Or | sympy.Xor):
            op = {sympy.And: " & ", sympy.Or: " | ", sympy.Xor: " ^ "}[type(e)]
            # a term of the head or of one-value-per-tile coordinates alone is a scalar: `!= 0` makes
            # it a bool Triton's interpreter combines with a block (its scalar comparisons refuse `|` with one)
            return "(" + op.join(self.p(a) if self._per_pair(a) else f"({self.p(a)} != 0)"
                                 for a in _sorted_args(e)) + ")"
        if isinstance(e, sympy.Not):
            return f"({self.p(e.args[0])} == 0)"
        if isinstance(e, sympy.Equivalent):
            args = [self.p(a) for a in _sorted_args(e)]
            return "(" + " & ".join(f"({args[0]} == {a})" for a in args[1:]) + ")"
        if isinstance(e, S.Sqrt):
            return f"tl.sqrt({self._float(e.args[0])})"
        if isinstance(e, sympy.exp | S.Log | sympy.tanh):
            arg = self._float(e.args[0])
            if isinstance(e, sympy.tanh):
                self.helpers.add("_tanh")
                return f"_tanh({arg})"
            return f"tl.{'exp' if isinstance(e, sympy.exp) else 'log'}({arg})"
        if isinstance(e, S.IsPow2):
            x = self.p(e.args[0])
            return f"(({x} > 0) & (({x} & ({x} - 1)) == 0))"
        if isinstance(e, S.BitLength):
            self.helpers.add("_bit_length")
            return f"_bit_length({self.p(e.args[0])})"
        if isinstance(e, S.Log2Floor):
            self.helpers.add("_bit_length")
            x = self.p(e.args[0])
            return f"tl.where({x} >= 1, _bit_length({x}) - 1, -1)"
        if isinstance(e, S.BitAnd | S.BitOr | S.BitXor | S.ShiftLeft | S.ShiftRight):
            op = {S.BitAnd: "&", S.BitOr: "|", S.BitXor: "^", S.ShiftLeft: "<<", S.ShiftRight: ">>"}[type(e)]
            return f"({self.p(e.args[0])} {op} {self.p(e.args[1])})"
        if isinstance(e, S.BitNot):
            return f"(~{self.p(e.args[0])})"
        if isinstance(e, S.Window):
            qa, ka, L, size, dil, stride, causal = e.args
            consts = [x for x in (L, size, dil, stride) if isinstance(x, sympy.Integer)]
            if len(consts) != 4:
                raise SpecError("window() sizes must be known numbers at code generation", where="code generation")
            self.helpers.add("_window")
            return (f"_window({self.p(qa)}, {self.p(ka)}, {int(L)}, {int(size)}, {int(dil)}, {int(stride)}, "
                    f"{bool(causal)})")
        name = S.input_name(e.func)
        if name is not None:
            return self._input(name, e.args)
        raise SpecError(f"cannot generate code for {type(e).__name__}", where="code generation")

    # ------------------------------------------------------------ pieces
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

    def _per_pair(self, e: sympy.Basic) -> bool:
        """Whether an expression is a tile of values (else a scalar: per head, or per tile pair)."""
        return S.per_pair(e, self.scalars)

    def _number(self, e) -> str:
        if isinstance(e, sympy.Integer):
            return str(int(e))
        value = float(e.evalf(30))
        if math.isfinite(value) and abs(value) > FP32_MAX:  # e.g. folded from a size: check_fp32_constants
            raise SpecError(f"the constant {value:g} is beyond the float32 range of the triton backend",
                            where="code generation", hint="use backend='cpu' or 'reference' (float64 arithmetic)")
        if math.isnan(value):
            return 'float("nan")'
        if math.isinf(value):
            return 'float("inf")' if value > 0 else 'float("-inf")'
        return self._literal(value)

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

    def _promoted(self, args) -> list[str]:
        """Python's int/float promotion over sibling operands."""
        if all(a.is_integer or isinstance(a, sympy.logic.boolalg.Boolean) for a in args):
            return [self.p(a) for a in args]
        return [self._float(a) for a in args]

    def _add(self, e: sympy.Add) -> str:
        args = _sorted_args(e)
        floats = not all(a.is_integer for a in args)
        plus = [a for a in args if not a.could_extract_minus_sign()]
        minus = [-a for a in args if a.could_extract_minus_sign()]
        text = (lambda a: self._float(a)) if floats else self.p
        out = " + ".join(text(a) for a in plus) if plus else ""
        for a in minus:
            out = f"{out} - {text(a)}" if out else f"-{text(a)}"
        return f"({out})"

    def _mul(self, e: sympy.Mul) -> str:
        args = _sorted_args(e)
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

    def _floordiv(self, a, b) -> str:
        if not (a.is_integer and b.is_integer):
            return f"tl.floor({self._float(a)} / {self._float(b)})"
        if isinstance(b, sympy.Integer) and int(b) > 0:
            if self._nonnegative(a):
                return f"({self.p(a)} // {int(b)})"
            self.helpers.add("_floordiv_c")
            return f"_floordiv_c({self.p(a)}, {int(b)})"
        self.helpers.add("_floordiv")
        return f"_floordiv({self.p(a)}, {self.p(b)})"

    def _mod(self, a, b) -> str:
        if not (a.is_integer and b.is_integer):
            self.helpers.add("_fmod")
            return f"_fmod({self._float(a)}, {self._float(b)})"
        if isinstance(b, sympy.Integer) and int(b) > 0:
            if self._nonnegative(a):
                return f"({self.p(a)} % {int(b)})"
            self.helpers.add("_mod_c")
            return f"_mod_c({self.p(a)}, {int(b)})"
        self.helpers.add("_mod")
        return f"_mod({self.p(a)}, {self.p(b)})"

    def _nonnegative(self, a) -> bool:
        """``a >= 0`` at run time: non-negative as a number and too small to wrap around in
        64 bits (``q * 2**61`` is negative for q >= 4), so Triton's truncating ``//`` and
        ``%`` agree with the floored ones."""
        return bool(a.is_nonnegative) and abs_bound(a, self.ranges, math.inf) < 2.0 ** 62

    def _input(self, name: str, args) -> str:
        slot = self.inputs[name]
        self.used_inputs.add(slot.index)
        terms = []
        for arg, dim, stride in zip(args, slot.dims, slot.strides(), strict=True):
            if isinstance(arg, sympy.Integer):  # a literal index, checked in range at generation
                i = int(arg)
                if not 0 <= i < dim:
                    raise SpecError(f"an input is indexed at {i}, outside 0..{dim - 1}", where="code generation")
                terms.append(f"{i} * {stride}")
            else:  # clamped: padded slots and masked pairs may compute any index
                terms.append(f"tl.minimum(tl.maximum({self.p(arg)}, 0), {dim - 1}) * {stride}")
        value = f"tl.load({slot.pointer} + " + " + ".join(terms) + ")"
        return value if slot.dtype == "int" else f"{value}.to({self.float_type})"


def bias_index_checks(pat: ir.PatternIR, bound: E.Bound) -> list[tuple[sympy.Basic, int]]:
    """(input read, dimension) of every index of the bias that is not proven in range
    on all valid (head, query, key): the forward kernel checks those on the attended
    pairs and reports an offending index (``ERR``), in this order. A literal index
    is checked at generation; an index of positions only is proven by intervals over
    the whole matrix; an index that reads an input is always checked."""
    if pat.bias is None:
        return []
    out = []
    for site in E.input_sites(E.substitute(pat.bias, bound)):
        dims = [int(sympy.sympify(d).subs(bound.subs)) for d in pat.input(S.input_name(site.func)).dims]
        for j, arg in enumerate(site.args):
            if not isinstance(arg, sympy.Integer) and not _proven_in_range(pat, bound, arg, dims[j]):
                out.append((site, j))
    return out


def _proven_in_range(pat: ir.PatternIR, bound: E.Bound, index: sympy.Basic, size: int) -> bool:
    """Whether an index of positions only lies in ``0..size - 1`` at every valid position,
    by interval bounds over the whole matrix with no intermediate integer near 2**63
    (where int64 would wrap and the bounds would not hold)."""
    from .intervals import IntervalEvaluator, Num

    if _has_input(index):
        return False

    def box(hi: int) -> Num:
        return Num(torch.tensor(0.0, dtype=torch.float64), torch.tensor(float(hi), dtype=torch.float64))

    env = {S.Q: box(bound.n - 1), S.K: box(bound.nk - 1), S.H: box(bound.heads - 1)}
    for role, layout in (("q", pat.queries), ("k", pat.keys)):
        for axis, extent in layout.axes:
            env[S.coord(role, axis)] = box(int(extent.subs(bound.subs)) - 1)
    try:
        ev = IntervalEvaluator(env)
        for node in sympy.preorder_traversal(index):
            if isinstance(node, sympy.Expr) and node.is_integer and not node.is_Number:
                b = ev(node)
                if not (float(b.lo) > -(2.0 ** 62) and float(b.hi) < 2.0 ** 62):
                    return False
        b = ev(index)
        return float(b.lo) >= 0 and float(b.hi) <= size - 1
    except (SpecError, TypeError, ValueError, KeyError):  # no interval rule: check at run time
        return False


# ----------------------------------------------------------------- float32 constants
FP32_MAX = 3.4028234663852886e38


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
    def number(v) -> float | None:
        ok = isinstance(v, int | float) and not isinstance(v, bool) or isinstance(v, sympy.Number)
        return float(v) if ok else None

    values = {name: number(v) for name, v in pat.params}
    params = [name for name, v in values.items() if v is not None and math.isfinite(v) and abs(v) > FP32_MAX]
    what = f"parameter '{params[0]}' = {values[params[0]]:g}" if params else f"the constant {value:g}"
    return SpecError(f"{what} is beyond the float32 range of the triton backend (|x| <= {FP32_MAX:.4g})",
                     where=f"parameter {params[0]}" if params else f"pattern '{pat.name}'",
                     hint="use a smaller value, or backend='cpu' / 'reference' (float64 arithmetic)")


# ----------------------------------------------------------------- derivatives of the bias
def derivative(expr: sympy.Basic, u: sympy.Symbol) -> sympy.Basic:
    """d expr / d u with the evaluator's (torch autograd's) rules at the kinks, in terms
    the evaluator computes: abs' = sign (0 at 0); min/max follow the active argument and
    split evenly on a tie; floor, ceiling and ``//`` have derivative 0; ``a % b`` is
    ``a - b * (a // b)``. ``u`` must be a real symbol."""
    frozen: dict = {}

    def freeze(node):
        d = sympy.Dummy("c", real=True)
        frozen[d] = node
        return d

    def rewrite(e):
        if not e.has(u):
            return e
        args = [rewrite(a) for a in e.args]
        if isinstance(e, sympy.floor | sympy.ceiling | S.FloorDiv):
            return freeze(e.func(*args))
        if isinstance(e, sympy.Mod):
            a, b = args
            return a - b * freeze(S.FloorDiv(a, b))
        if isinstance(e, sympy.Abs):
            (a,) = args
            return sympy.Piecewise((a, a > 0), (-a, a < 0), (0, True))
        if isinstance(e, sympy.Min | sympy.Max):
            out = args[0]
            for b in args[1:]:
                first, second = (out < b, out > b) if isinstance(e, sympy.Min) else (out > b, out < b)
                out = sympy.Piecewise((out, first), (b, second), ((out + b) / 2, True))
            return out
        if not args:
            return e
        return e.func(*args)

    d = sympy.diff(rewrite(expr), u)
    return d.xreplace(frozen) if frozen else d


# ----------------------------------------------------------------- the bias, split per head
def head_factor(bias: sympy.Basic) -> tuple[sympy.Basic, sympy.Basic]:
    """``bias = coef * rest`` with ``coef`` the factors of a top-level product that depend on the
    head alone (numbers included, inputs not): the kernels compute it once per head, times
    log2(e), and multiply each score's ``rest`` by it (ALiBi's slope: no power or division per
    score). An integer-valued bias stays whole (its integer arithmetic, wrap-around
    included, is the evaluator's); an integer combination with rational coefficients gives its
    rational content (``q/3 - k/3``: ``1/3`` and ``q - k``). Float products are reordered only."""
    one = sympy.Integer(1)
    if bias.is_integer or not isinstance(bias, sympy.Expr):
        return one, bias
    if isinstance(bias, sympy.Add):
        coef, rest = bias.primitive()
        return (coef, rest) if coef != 1 and rest.is_integer else (one, bias)
    if not isinstance(bias, sympy.Mul):
        return (bias, one) if _head_only(bias) else (one, bias)
    head = [a for a in bias.args if _head_only(a)]
    rest = [a for a in bias.args if not _head_only(a)]
    if not head:
        return one, bias
    return sympy.Mul(*head), (sympy.Mul(*rest) if rest else one)


def _fits_log2_units(coef: sympy.Basic, bound: E.Bound) -> bool:
    """Whether log2(e) times the coefficient stays a finite float32 on every head (a coefficient
    near the float32 limit is not folded: log2(e) * rest is then computed per score)."""
    values = E.head_values(coef, bound.subs, bound.heads) if not coef.is_Number else torch.tensor([float(coef)])
    return bool(torch.isfinite(values).all()) and float(values.abs().max()) * LOG2E <= FP32_MAX


def _head_only(e: sympy.Basic) -> bool:
    """Whether an expression is a value per head known at generation: no position, no input."""
    return isinstance(e, sympy.Expr) and e.free_symbols <= {S.H} and not _has_input(e)


def _has_input(e: sympy.Basic) -> bool:
    return any(S.input_name(f.func) for f in e.atoms(sympy.Function))


def _sorted_args(e: sympy.Basic) -> list:
    """Arguments in a deterministic order (sympy's canonical sort key)."""
    return sorted(e.args, key=sympy.default_sort_key)


def helper_sources(names: set[str]) -> str:
    return "\n\n".join(HELPERS[n].strip("\n") for n in HELPERS if n in names)


# ----------------------------------------------------------------- int64 where sizes need it
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


# ----------------------------------------------------------------- the kernel module
@dataclass(frozen=True)
class ScheduleShape:
    """The shape of a tile schedule as the kernels see it: tile grids (extents
    tiled, one per tile axis) and tile extents. One tile axis on a grid layout
    means flat tiles of the row-major token order."""

    q_extents: tuple[int, ...]
    kv_extents: tuple[int, ...]
    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]

    @classmethod
    def of(cls, schedule) -> ScheduleShape:
        return cls(tuple(schedule.q_extents), tuple(schedule.kv_extents), tuple(schedule.q_tile),
                   tuple(schedule.kv_tile))

    @property
    def q_slots(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_slots(self) -> int:
        return math.prod(self.kv_tile)

    @property
    def block_m(self) -> int:
        return block_size(self.q_slots)

    @property
    def block_n(self) -> int:
        return block_size(self.kv_slots)


def block_size(slots: int) -> int:
    """The power-of-two block holding a tile's slots (at least 16, what tl.dot needs)."""
    return max(16, 1 << (max(1, slots) - 1).bit_length())


def layout_of(config) -> str:
    return getattr(config, "layout", "address") if config is not None else "address"


def _tile_code(role: str, tile_var: str, extents, tile, layout_axes: list[int], permuted: bool, block: str,
               wide: bool, uniform: frozenset[int]) -> list[str]:
    """Lines computing, for tile ``tile_var`` of ``role`` ('q' or 'k'): the flat token
    ``{role}_tok``, grid coordinates ``{role}_c{i}`` (scalars on ``uniform_axes``), validity
    ``{role}_ok`` and the memory row ``{role}_row`` of every slot."""
    r = role
    slots = math.prod(tile)
    grid = [-(-L // t) for L, t in zip(extents, tile, strict=True)]
    sl = f"{r}_slot"  # per role: a loop may not rebind a variable of another shape
    lines = [f"{sl} = tl.arange(0, {block})"]
    if len(extents) == 1:
        lines.append(f"{r}_tok = {tile_var} * {tile[0]} + {sl}")
        ok = [f"({sl} < {slots})"] if block_size(slots) != slots else []
        if extents[0] % tile[0]:
            ok.append(f"({r}_tok < {extents[0]})")
        lines.append(f"{r}_ok = " + (" & ".join(ok) if ok else f"{sl} < {block}"))
    else:
        lines.append(f"# tile coordinates in the tile grid {tuple(grid)}, slot coordinates in the tile {tuple(tile)}")
        ok = [f"({sl} < {slots})"] if block_size(slots) != slots else []
        flat_terms = []
        for a, (L, t) in enumerate(zip(extents, tile, strict=True)):
            g_stride = math.prod(grid[a + 1:])
            s_stride = math.prod(tile[a + 1:])
            tc = f"({tile_var} // {g_stride})" if g_stride > 1 else tile_var
            tc = f"({tc} % {grid[a]})" if a > 0 else tc
            sc = f"({sl} // {s_stride})" if s_stride > 1 else sl
            sc = f"({sc} % {t})" if a > 0 else sc
            lines.append(f"{r}_a{a} = {tc}  # one value per tile" if a in uniform else f"{r}_a{a} = {tc} * {t} + {sc}")
            if L % t:
                ok.append(f"({r}_a{a} < {L})")
            flat_terms.append((f"{r}_a{a}", math.prod(extents[a + 1:])))
        lines.append(f"{r}_ok = " + (" & ".join(ok) if ok else f"{sl} < {block}"))
        lines.append(f"{r}_tok = " + " + ".join(f"{v} * {s}" if s > 1 else v for v, s in flat_terms))
    if permuted:
        lines.append(f"{r}_row = {tile_var} * {slots} + {sl}  # q/k/v were permuted into tile order on the host")
    else:
        lines.append(f"{r}_row = {r}_tok")
    if wide:
        lines.append(f"{r}_row = {r}_row.to(tl.int64)  # token offsets exceed int32 at these sizes")
    # grid coordinates of the pattern's layout
    if len(layout_axes) and len(extents) == 1:
        stride = 1
        coords = []
        for i in reversed(range(len(layout_axes))):
            L = layout_axes[i]
            if i in uniform:  # the tile lies inside one stretch of `stride` tokens
                per = stride // tile[0]
                coords.append((i, f"({tile_var} // {per}) % {L}  # one value per tile" if per > 1 else
                               f"{tile_var} % {L}  # one value per tile"))
            else:
                coords.append((i, f"({r}_tok // {stride}) % {L}" if stride > 1 else f"{r}_tok % {L}"))
            stride *= L
        for i, text in sorted(coords):
            lines.append(f"{r}_c{i} = {text}")
    elif len(layout_axes):
        for a in range(len(layout_axes)):
            lines.append(f"{r}_c{a} = {r}_a{a}")
    return lines


def _axes(tr: bool) -> tuple[str, str]:
    """How a query vector and a key vector broadcast to a score tile: queries down the rows and keys
    along the columns, or (``tr``, the dK/dV kernel's S^T) the other way round."""
    return ("[None, :]", "[:, None]") if tr else ("[:, None]", "[None, :]")


def _indent(lines: list[str], n: int) -> str:
    pad = " " * n
    return "".join(pad + line + "\n" if line else "\n" for line in lines)


class KernelSource:
    """Builds the kernel module text for one pattern, bound sizes and schedule shape."""

    def __init__(self, pat: ir.PatternIR, bound: E.Bound, shape: ScheduleShape, config=None):
        self.pat, self.bound, self.shape = pat, bound, shape
        self.layout = layout_of(config)
        self.permuted = self.layout == "permute"
        self.q_axes = _axis_extents(pat.queries, bound)
        self.k_axes = _axis_extents(pat.keys, bound)
        if self.q_axes and len(shape.q_extents) not in (1, len(self.q_axes)):
            raise SpecError("the Q tile needs one extent per grid axis, or one for flat tiles", where="q_tile")
        if self.k_axes and len(shape.kv_extents) not in (1, len(self.k_axes)):
            raise SpecError("the KV tile needs one extent per grid axis, or one for flat tiles", where="kv_tile")
        self.q_uniform = uniform_axes(shape.q_extents, shape.q_tile, self.q_axes)
        self.k_uniform = uniform_axes(shape.kv_extents, shape.kv_tile, self.k_axes)
        self.mask = E.substitute(pat.mask, bound)
        self.bias = E.substitute(pat.bias, bound) if pat.bias is not None else None
        symbols = {S.Q: "q", S.K: "k", S.H: "h"}
        for i, axis in enumerate(pat.queries.axis_names):
            symbols[S.coord("q", axis)] = f"q_c{i}"
        for i, axis in enumerate(pat.keys.axis_names):
            symbols[S.coord("k", axis)] = f"k_c{i}"
        self.inputs: dict[str, InputSlot] = {}
        for i, decl in enumerate(pat.inputs):
            dims = tuple(int(sympy.sympify(d).subs(bound.subs)) for d in decl.dims)
            self.inputs[decl.name] = InputSlot(i, decl.dtype, dims)
        ranges = {S.Q: bound.n, S.K: bound.nk, S.H: bound.heads}
        for sym in symbols:
            ranges.setdefault(sym, max(bound.n, bound.nk))
        scalars = frozenset([S.coord("q", pat.queries.axis_names[i]) for i in self.q_uniform]
                            + [S.coord("k", pat.keys.axis_names[i]) for i in self.k_uniform])
        self.printer = TritonPrinter(symbols, self.inputs, ranges, scalars)
        # the bias as coef * rest: coef once per head (times log2(e): scores are in log2 units), rest per score
        coef, rest = head_factor(self.bias) if self.bias is not None else (sympy.Integer(1), None)
        if not _fits_log2_units(coef, bound):
            coef, rest = sympy.Integer(1), self.bias
        self.wide_math = needs_int64([self.mask, self.bias, rest], ranges)
        max_d = 512
        self.wide_rows = max(bound.n, bound.nk) * max_d > INT32_MAX
        self.mask_text = self.printer.bool_expr(self.mask)
        self.mask_inputs = sorted(self.printer.used_inputs)
        self.printer.used_inputs = set()
        self.bias_text = self.printer.float_expr(rest) if rest is not None else None
        # input indices of the bias not proven in range: checked in the forward kernel (see _bias_fn)
        self.checks = [(site, j, self.inputs[S.input_name(site.func)].dims[j], self.printer.p(site.args[j]))
                       for site, j in bias_index_checks(pat, bound)]
        self.bias_inputs = sorted(self.printer.used_inputs)
        self.printer.used_inputs = set()
        if coef.is_Number:
            self.bias_head_text = None
            self.bias_coef = repr(float(coef) * LOG2E)
        else:
            self.bias_head_text = f"{LOG2E!r} * {self.printer.float_expr(coef)}"
            self.bias_coef = "bias_c"
        self.head_inputs = sorted(self.printer.used_inputs)
        # routing: a query's selection is read as words of WORD_BITS blocks; when the keys of every
        # KV tile span at most WORD_BITS + 1 block indices, two words per query and tile hold them all
        spread = tile_block_spread(pat.keys, block_sizes(pat.route, bound), bound, shape.kv_extents,
                                   shape.kv_tile) if pat.route is not None else 0
        self.route_words = 0 < spread <= WORD_BITS + 1
        self.route_one_block = spread == 1  # every KV tile inside one block: one bit per query and tile

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

    def _call_args(self, which: list[int], tr: bool = False) -> str:
        """Arguments of ``_mask``/``_bias``: positions broadcast to the tile (queries down the rows,
        keys along the columns; ``tr``: the transposed tile of the dK/dV kernel), head, inputs."""
        cast = ".to(tl.int64)" if self.wide_math else ""
        qx, kx = _axes(tr)
        pos = [f"q_tok{cast}{qx}", f"k_tok{cast}{kx}"]
        pos += [f"q_c{i}{cast}{'' if i in self.q_uniform else qx}" for i in range(len(self.q_axes))]
        pos += [f"k_c{i}{cast}{'' if i in self.k_uniform else kx}" for i in range(len(self.k_axes))]
        return ", ".join(pos + [self._head_call_args(which)])

    def _head_call_args(self, which: list[int]) -> str:
        args = ["h.to(tl.int64)" if self.wide_math else "h"]
        for slot in self.inputs.values():
            if slot.index in which:
                args += [f"IN{slot.index} + batch.to(tl.int64) * in{slot.index}_sb", *slot.strides()]
        return ", ".join(args)

    def _all_input_params(self) -> list[str]:
        out = []
        for slot in self.inputs.values():
            out += [slot.pointer, f"in{slot.index}_sb", *slot.strides()]
        return out

    def _tiles(self, role: str, var: str) -> list[str]:
        if role == "q":
            return _tile_code("q", var, self.shape.q_extents, self.shape.q_tile, self.q_axes, self.permuted,
                              "BLOCK_M", self.wide_rows, self.q_uniform)
        return _tile_code("k", var, self.shape.kv_extents, self.shape.kv_tile, self.k_axes, self.permuted,
                          "BLOCK_N", self.wide_rows, self.k_uniform)

    def _k_padding(self) -> bool:
        s = self.shape
        return block_size(s.kv_slots) != s.kv_slots or any(L % t for L, t in zip(s.kv_extents, s.kv_tile, strict=True))

    def _terms(self, masked: bool, grad: bool, tr: bool = False) -> list[str]:
        """The scores ``s`` from ``qk`` (q.k), in log2 units (times log2(e): the softmax takes exp2):
        scale, softcap, bias, decay; then the mask (PARTIAL tiles). ``tr``: the transposed tile of the
        dK/dV kernel (keys down the rows). With checked bias indices the attended pairs are computed
        first: the bias checks them there."""
        p = self.pat
        qx, kx = _axes(tr)
        lines = []
        mask_lines = []
        if masked:
            mask_lines += ["# PARTIAL tile: the pattern's mask",
                           f"allowed = k_ok{kx} & _mask({self._call_args(self.mask_inputs, tr)})"]
            if p.route is not None:
                mask_lines += self._route_query_lines(tr)
        if self.checks:
            lines += mask_lines
            lines.append(f"pairs = allowed & q_ok{qx}  # the attended pairs" if masked else
                         f"pairs = q_ok{qx} & k_ok{kx}  # FULL tile: every valid pair is attended")
        if p.softcap is not None:
            lines += ["# softcap: cap * tanh(scale * qk / cap), in log2 units (cap_l2, tanh_c: per head)",
                      "t = _softcap_tanh(qk * tanh_c)",
                      "s = cap_l2 * t"]
        else:
            lines.append("s = qk * scale_l2  # scale * log2(e): scores in log2 units")
        if self.bias_text is not None:
            check = f", pairs, ERR, {not grad}" if self.checks else ""
            lines += [f"# bias term, times log2(e){' and its head-only factor' if self.bias_head_text else ''}",
                      f"s = s + {self.bias_coef} * _bias({self._call_args(self.bias_inputs, tr)}{check})"]
        if p.decay is not None:
            lines += ["# FoX decay sum(g[k+1 .. q]): prefix sums split as hi + lo (exact at any length),",
                      "# -inf for keys before the query's last reset (a gate of -inf)",
                      "kc_hi = tl.load(DC + dc_base + k_tok, mask=k_ok, other=0.0)",
                      "kc_lo = tl.load(DC + dc_base + dc_lo + k_tok, mask=k_ok, other=0.0)",
                      f"fox = (dc_q{qx} - kc_hi{kx}) + (dl_q{qx} - kc_lo{kx})",
                      f's = s + {LOG2E!r} * tl.where(k_tok{kx} >= dr_q{qx}, fox, float("-inf"))']
        if masked:
            if not self.checks:
                lines += mask_lines
            lines.append('s = tl.where(allowed, s, float("-inf"))')
        elif self._k_padding():
            lines += ["# FULL tile: only the padded slots of edge tiles are masked",
                      f's = tl.where(k_ok{kx}, s, float("-inf"))']
        else:
            lines.append("# FULL tile: no mask code")
        return lines

    def _route_key_lines(self) -> list[str]:
        """Routing, per KV tile: each key's block, and where the tile's blocks are in a query's
        selection words (``runtime.plan.routing.selection_words``: bit b % 32 of word b // 32)."""
        lines = ["kb = tl.load(KEY_BLOCK + k_tok, mask=k_ok, other=0)  # each key's block"]
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
        qx, kx = _axes(tr)
        if self.route_one_block:
            return ["# routing: only the key blocks this query selected (one bit per query for this tile)",
                    f"sel = tl.load(SEL + sel_base + q_tok * sel_n + b0 // {WORD_BITS}, mask=q_ok, other=0)",
                    f"allowed = allowed & (((sel >> (b0 % {WORD_BITS})) & 1) != 0){qx}"]
        if self.route_words:
            return ["# routing: only the key blocks this query selected (two words of its selection)",
                    "sel_lo = tl.load(SEL + sel_base + q_tok * sel_n + w0, mask=q_ok, other=0)",
                    "sel_hi = tl.load(SEL + sel_base + q_tok * sel_n + w0 + 1, mask=q_ok, other=0)",
                    f"word = tl.where(kbit{kx} < {WORD_BITS}, sel_lo{qx}, sel_hi{qx})",
                    f"allowed = allowed & (((word >> (kbit{kx} & {WORD_BITS - 1})) & 1) != 0)"]
        return ["# routing: only the key blocks this query selected (the word of each key's block: the",
                f"# blocks of a KV tile spread over more than {WORD_BITS + 1} here)",
                f"word = tl.load(SEL + sel_base + q_tok{qx} * sel_n + kb{kx} // {WORD_BITS},",
                f"               mask=q_ok{qx} & k_ok{kx}, other=0)",
                f"allowed = allowed & (((word >> (kb{kx} % {WORD_BITS})) & 1) != 0)"]

    # ------------------------------------------------------------ module
    def module(self) -> str:
        p = self.pat
        helpers = set(self.printer.helpers)
        if p.softcap is not None:
            helpers.add("_softcap_tanh")
        if self.route_words:
            helpers.add("_minimum")
        parts = [self._header(), helper_sources(helpers), _DOT, self._mask_fn()]
        if self.bias_text is not None:
            if self.bias_head_text is not None:
                parts.append(self._bias_head_fn())
            parts.append(self._bias_fn())
        parts += [self._forward(), self._backward_dq(), self._backward_dkdv()]
        return "\n\n\n".join(p.strip("\n") for p in parts if p.strip()) + "\n"

    def _header(self) -> str:
        s = self.shape
        lines = [
            '"""attnc generated Triton kernels (do not edit: regenerated from the pattern).',
            "",
            f"pattern key {self.pat.key()[:16]}; tokens {self.bound.n} queries x {self.bound.nk} keys, "
            f"{self.bound.heads} heads",
            f"Q tiles {s.q_tile} over {s.q_extents} (BLOCK_M {s.block_m}), KV tiles {s.kv_tile} over "
            f"{s.kv_extents} (BLOCK_N {s.block_n}), layout {self.layout}",
            "",
            "attnc_fwd      online softmax over each Q tile's FULL then PARTIAL KV tiles",
            "attnc_bwd_dq   dQ (and per-query sums of dS) over the same lists",
            "attnc_bwd_dkdv dK, dV (and per-key sums of dS) over the transposed lists; no atomics",
            '"""',
            "",
            "import triton",
            "import triton.language as tl",
            "",
        ]
        return "\n".join(lines)

    def _mask_fn(self) -> str:
        body = self.mask_text
        return (f"\n\n@triton.jit\ndef _mask({self._helper_args(self.mask_inputs)}):\n"
                f'    """The pattern\'s mask: True where query q may attend key k (head h)."""\n'
                f"    return {body}\n")

    def _bias_head_fn(self) -> str:
        params = ", ".join(["h", *self._slot_params(self.head_inputs)])
        return (f"\n\n@triton.jit\ndef _bias_head({params}):\n"
                f'    """log2(e) times the bias\'s factor of head h alone (once per head; see _bias)."""\n'
                f"    return {self.bias_head_text}\n")

    def _bias_fn(self) -> str:
        params = self._helper_args(self.bias_inputs)
        checks = ""
        if self.checks:
            params += ", pairs, ERR, CHECK: tl.constexpr"
            lines = ["if CHECK:  # an input index out of range on an attended pair: its value goes to ERR[slot]",
                     "    # (the loads of the bias clamp it; the host raises the error after the launch)"]
            for slot, (_, _, size, text) in enumerate(self.checks):
                lines += [f"    ix = tl.where(pairs, {text}, 0)",
                          f"    tl.store(ERR + {slot} + ix * 0, ix.to(tl.int64), mask=pairs & ((ix < 0) | (ix >= {size})))"]
            checks = _indent(lines, 4)
        return (f"\n\n@triton.jit\ndef _bias({params}):\n"
                f'    """The pattern\'s bias term{" but for its head-only factor (_bias_head)" if self.bias_head_text else ""}, '
                f'added to the scaled (soft-capped) scores."""\n'
                f"{checks}"
                f"    return {self.bias_text}\n")

    def _common_params(self) -> list[str]:
        return ["FULL_N", "FULL_I", "PART_N", "PART_I", "full_w", "part_w", "cls_b", "cls_h",
                "SEL", "KEY_BLOCK", "sel_b", "sel_h", "sel_n", "DC", "dc_b", "dc_h", "dc_lo",
                "DR", "dr_b", "dr_h", "SOFTCAP",
                *self._all_input_params(), *(["ERR"] if self.checks else [])]

    def _forward(self) -> str:
        params = ["Q", "K", "V", "O", "LSE", "sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n", "sv_b", "sv_h", "sv_n",
                  "so_b", "so_h", "so_n", "sl_b", "sl_h", *self._common_params(),
                  "scale", "GROUP", "D", "DV",
                  "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_D: tl.constexpr",
                  "BLOCK_DV: tl.constexpr", "DOT: tl.constexpr"]
        body = [
            "qt = tl.program_id(0)  # the Q tile",
            "bh = tl.program_id(1)",
            f"batch = bh // {self.bound.heads}",
            f"h = bh % {self.bound.heads}  # query head; its K/V head is h // GROUP",
            "cls = batch * cls_b + h * cls_h  # which tile lists serve this (batch, head)",
            "kvh = h // GROUP",
            *self._tiles("q", "qt"),
            "d = tl.arange(0, BLOCK_D)",
            "dv = tl.arange(0, BLOCK_DV)",
            "q_base = Q + batch.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h",
            "k_base = K + batch.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h",
            "v_base = V + batch.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h",
            "q = tl.load(q_base + q_row[:, None] * sq_n + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)",
            f"scale_l2 = scale * {LOG2E!r}  # scores in log2 units: the softmax takes exp2",
        ]
        body += self._per_query_setup()
        body += [
            "m_i = tl.full([BLOCK_M], float(\"-inf\"), tl.float32)  # running row max",
            "l_i = tl.full([BLOCK_M], 0.0, tl.float32)  # running row sum of exp",
            "acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)",
        ]
        for kind, masked in (("FULL", False), ("PART", True)):
            body += [
                "",
                f"# ---- {'FULL KV tiles (no masked pair)' if not masked else 'PARTIAL KV tiles (mask evaluated)'}",
                f"n_list = tl.load({kind}_N + cls * {self.shape_tiles_q()} + qt)",
                f"list_base = {kind}_I + (cls * {self.shape_tiles_q()} + qt).to(tl.int64) * {kind.lower()}_w",
                "for j in range(0, n_list):",
            ]
            loop = ["kt = tl.load(list_base + j)  # the KV tile", *self._tiles("k", "kt"),
                    *(self._route_key_lines() if masked and self.pat.route is not None else []),
                    "kk = tl.load(k_base + k_row[:, None] * sk_n + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)",
                    "vv = tl.load(v_base + k_row[:, None] * sv_n + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)",
                    "qk = _dot(q, tl.trans(kk), DOT)",
                    *self._terms(masked, grad=False),
                    "# online softmax update, in log2 units (rows with no allowed key so far stay at zero)",
                    "m_new = tl.maximum(m_i, tl.reduce(s, 1, _maximum))",
                    'm_use = tl.where(m_new == float("-inf"), 0.0, m_new)',
                    "alpha = tl.exp2(m_i - m_use)",
                    "pr = tl.exp2(s - m_use[:, None])",
                    "l_i = l_i * alpha + tl.reduce(pr, 1, _add)",
                    "acc = acc * alpha[:, None] + _dot(pr.to(vv.dtype), vv, DOT)",
                    "m_i = m_new"]
            body += ["    " + line for line in loop]
        body += [
            "",
            "# ---- epilogue: normalise; a query with no allowed key gives zeros and lse = -inf",
            "empty = l_i == 0.0",
            "out = acc / tl.where(empty, 1.0, l_i)[:, None]",
            f'lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * {LN2!r})  # natural log',
            "o_base = O + batch.to(tl.int64) * so_b + h.to(tl.int64) * so_h",
            "tl.store(o_base + q_row[:, None] * so_n + dv[None, :], out.to(O.dtype.element_ty),",
            "         mask=q_ok[:, None] & (dv[None, :] < DV))",
            "tl.store(LSE + batch.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + q_row, lse, mask=q_ok)",
        ]
        return ("\n\n@triton.jit\ndef attnc_fwd(\n" + _indent([", ".join(params[i:i + 6]) + ","
                                                               for i in range(0, len(params), 6)], 4)
                + "):\n"
                + '    """Forward: one program per (Q tile, batch x query head)."""\n'
                + _indent(body, 4))

    def shape_tiles_q(self) -> int:
        s = self.shape
        return math.prod(-(-L // t) for L, t in zip(s.q_extents, s.q_tile, strict=True))

    def shape_tiles_k(self) -> int:
        s = self.shape
        return math.prod(-(-L // t) for L, t in zip(s.kv_extents, s.kv_tile, strict=True))

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
        lines = self._head_setup()
        p = self.pat
        if p.decay is not None:
            lines += ["dc_base = batch.to(tl.int64) * dc_b + h.to(tl.int64) * dc_h",
                      "dr_base = batch.to(tl.int64) * dr_b + h.to(tl.int64) * dr_h",
                      *self._per_query_setup_q()]
        if p.route is not None:
            lines.append("sel_base = batch.to(tl.int64) * sel_b + h.to(tl.int64) * sel_h")
        return lines

    # ------------------------------------------------------------ backward
    def _bwd_scores(self, masked: bool) -> list[str]:
        """Recompute P of one (Q tile, KV tile) pair and dS (the dQ kernel)."""
        lines = ["qk = _dot(q, tl.trans(kk), DOT)", *self._terms(masked, grad=True),
                 "pr = tl.exp2(s - lse_l2[:, None])  # P, recomputed",
                 "dp = _dot(do, tl.trans(vv), DOT)",
                 "ds = pr * (dp - delta[:, None])  # dL/d(score after terms)"]
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
                 "pt = tl.exp2(s - lse_l2[None, :])  # P^T, recomputed",
                 "dvacc += _dot(pt.to(do.dtype), do, DOT)  # dV += P^T dO",
                 "dpt = _dot(vv, do_t, DOT)  # dP^T = V dO^T",
                 "dst = pt * (dpt - delta[None, :])  # dS^T: dL/d(score after terms)"]
        if self.pat.softcap is not None:
            lines.append("dst_raw = dst * (1.0 - t * t)  # through the softcap")
        else:
            lines.append("dst_raw = dst")
        return lines

    def _load_q_side(self) -> list[str]:
        return [
            "q = tl.load(q_base + q_row[:, None] * sq_n + d[None, :], mask=q_ok[:, None] & (d[None, :] < D), other=0.0)",
            "do = tl.load(do_base + q_row[:, None] * sdo_n + dv[None, :], mask=q_ok[:, None] & (dv[None, :] < DV), other=0.0)",
            'lse = tl.load(LSE + batch.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + q_row, mask=q_ok, other=float("inf"))',
            "# in log2 units; P = 0 on rows with no allowed key (lse = -inf) and on padded rows",
            f'lse_l2 = tl.where(lse == float("-inf"), float("inf"), lse) * {LOG2E!r}',
            "delta = tl.load(DELTA + batch.to(tl.int64) * sl_b + h.to(tl.int64) * sl_h + q_row, mask=q_ok, other=0.0)",
        ]

    def _bwd_params(self) -> list[str]:
        return ["Q", "K", "V", "DO", "LSE", "DELTA", "sq_b", "sq_h", "sq_n", "sk_b", "sk_h", "sk_n",
                "sv_b", "sv_h", "sv_n", "sdo_b", "sdo_h", "sdo_n", "sl_b", "sl_h"]

    def _backward_dq(self) -> str:
        params = [*self._bwd_params(), "DQ", "sdq_b", "sdq_h", "sdq_n", "DSQ", "sr_b", "sr_h", "DS", "ds_w",
                  *self._common_params(), "scale", "GROUP", "D", "DV",
                  "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_D: tl.constexpr",
                  "BLOCK_DV: tl.constexpr", "DOT: tl.constexpr", "ROW_SUMS: tl.constexpr",
                  "STORE_DS: tl.constexpr"]
        body = [
            "qt = tl.program_id(0)",
            "bh = tl.program_id(1)",
            f"batch = bh // {self.bound.heads}",
            f"h = bh % {self.bound.heads}",
            "cls = batch * cls_b + h * cls_h",
            "kvh = h // GROUP",
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
            "ds_rows = tl.full([BLOCK_M], 0.0, tl.float32)  # sum over keys of dS (gradient of the decay gates)",
            f"ds_pair = (bh.to(tl.int64) * {self.shape_tiles_q()} + qt) * ds_w  # first dS slot of this Q tile",
        ]
        for kind, masked, offset in (("FULL", False, "0"), ("PART", True, "full_w")):
            body += [
                "",
                f"# ---- {'FULL' if not masked else 'PARTIAL'} KV tiles",
                f"n_list = tl.load({kind}_N + cls * {self.shape_tiles_q()} + qt)",
                f"list_base = {kind}_I + (cls * {self.shape_tiles_q()} + qt).to(tl.int64) * {kind.lower()}_w",
                "for j in range(0, n_list):",
            ]
            loop = ["kt = tl.load(list_base + j)", *self._tiles("k", "kt"),
                    *(self._route_key_lines() if masked and self.pat.route is not None else []),
                    "kk = tl.load(k_base + k_row[:, None] * sk_n + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)",
                    "vv = tl.load(v_base + k_row[:, None] * sv_n + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)",
                    *self._bwd_scores(masked),
                    "if ROW_SUMS:",
                    "    ds_rows += tl.reduce(ds, 1, _add)",
                    "if STORE_DS:  # dS of this pair, for the gradients of bias inputs (host side)",
                    f"    slot_ds = DS + (ds_pair + {offset} + j) * (BLOCK_M * BLOCK_N)",
                    "    tl.store(slot_ds + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :], ds)",
                    "dq += _dot(ds_raw.to(kk.dtype), kk, DOT)"]
            body += ["    " + line for line in loop]
        body += [
            "",
            "dq = dq * scale",
            "dq_base = DQ + batch.to(tl.int64) * sdq_b + h.to(tl.int64) * sdq_h",
            "tl.store(dq_base + q_row[:, None] * sdq_n + d[None, :], dq.to(DQ.dtype.element_ty),",
            "         mask=q_ok[:, None] & (d[None, :] < D))",
            "if ROW_SUMS:",
            "    tl.store(DSQ + batch.to(tl.int64) * sr_b + h.to(tl.int64) * sr_h + q_tok, ds_rows, mask=q_ok)",
        ]
        return ("\n\n@triton.jit\ndef attnc_bwd_dq(\n" + _indent([", ".join(params[i:i + 6]) + ","
                                                                 for i in range(0, len(params), 6)], 4)
                + "):\n"
                + '    """Backward, query side: one program per (Q tile, batch x query head)."""\n'
                + _indent(body, 4))

    def _backward_dkdv(self) -> str:
        params = [*self._bwd_params(), "DK", "DV_", "sdk_b", "sdk_h", "sdk_n", "sdv_b", "sdv_h", "sdv_n", "DSK", "sr_b", "sr_h",
                  "T_FULL_N", "T_FULL_I", "T_PART_N", "T_PART_I", "t_full_w", "t_part_w",
                  *self._common_params(), "scale", "GROUP", "D", "DV",
                  "BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_D: tl.constexpr",
                  "BLOCK_DV: tl.constexpr", "DOT: tl.constexpr", "ROW_SUMS: tl.constexpr",
                  "QT_VIEW: tl.constexpr = False"]
        nk = self.shape_tiles_k()
        body = [
            "kt = tl.program_id(0)  # the KV tile",
            "bkv = tl.program_id(1)",
            f"batch = bkv // ({self.bound.heads} // GROUP)",
            f"kvh = bkv % ({self.bound.heads} // GROUP)",
            *self._tiles("k", "kt"),
            "d = tl.arange(0, BLOCK_D)",
            "dv = tl.arange(0, BLOCK_DV)",
            "k_base = K + batch.to(tl.int64) * sk_b + kvh.to(tl.int64) * sk_h",
            "v_base = V + batch.to(tl.int64) * sv_b + kvh.to(tl.int64) * sv_h",
            "kk = tl.load(k_base + k_row[:, None] * sk_n + d[None, :], mask=k_ok[:, None] & (d[None, :] < D), other=0.0)",
            "vv = tl.load(v_base + k_row[:, None] * sv_n + dv[None, :], mask=k_ok[:, None] & (dv[None, :] < DV), other=0.0)",
            f"scale_l2 = scale * {LOG2E!r}  # scores in log2 units: P^T = exp2(s - lse_l2)",
            *(self._route_key_lines() if self.pat.route is not None else []),
            "dk = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)",
            "dvacc = tl.full([BLOCK_N, BLOCK_DV], 0.0, tl.float32)",
            "# the query heads sharing this K/V head, one after the other (deterministic, no atomics)",
            "for g in range(0, GROUP):",
        ]
        inner = [
            "h = kvh * GROUP + g",
            "cls = batch * cls_b + h * cls_h",
            "q_base = Q + batch.to(tl.int64) * sq_b + h.to(tl.int64) * sq_h",
            "do_base = DO + batch.to(tl.int64) * sdo_b + h.to(tl.int64) * sdo_h",
            *self._per_query_setup_k(),
            "ds_cols = tl.full([BLOCK_N], 0.0, tl.float32)  # sum over queries of dS (gradient of the decay gates)",
        ]
        for kind, masked in (("T_FULL", False), ("T_PART", True)):
            inner += [
                f"# ---- Q tiles for which this KV tile is {'FULL' if not masked else 'PARTIAL'}",
                f"n_list = tl.load({kind}_N + cls * {nk} + kt)",
                f"list_base = {kind}_I + (cls * {nk} + kt).to(tl.int64) * {kind.lower()}_w",
                "for j in range(0, n_list):",
            ]
            loop = ["qt = tl.load(list_base + j)", *self._tiles("q", "qt"), *self._load_q_side(),
                    *self._per_query_setup_q(),
                    *self._bwd_scores_t(masked),
                    "dk += _dot(dst_raw.to(q.dtype), q, DOT)  # dK += dS^T Q",
                    "if ROW_SUMS:",
                    "    ds_cols += tl.reduce(dst, 1, _add)"]
            inner += ["    " + line for line in loop]
        inner += ["if ROW_SUMS:",
                  "    tl.store(DSK + batch.to(tl.int64) * sr_b + h.to(tl.int64) * sr_h + k_tok, ds_cols, mask=k_ok)"]
        body += ["    " + line for line in inner]
        body += [
            "",
            "dk = dk * scale",
            "tl.store(DK + batch.to(tl.int64) * sdk_b + kvh.to(tl.int64) * sdk_h + k_row[:, None] * sdk_n + d[None, :],",
            "         dk.to(DK.dtype.element_ty), mask=k_ok[:, None] & (d[None, :] < D))",
            "tl.store(DV_ + batch.to(tl.int64) * sdv_b + kvh.to(tl.int64) * sdv_h + k_row[:, None] * sdv_n + dv[None, :],",
            "         dvacc.to(DV_.dtype.element_ty), mask=k_ok[:, None] & (dv[None, :] < DV))",
        ]
        return ("\n\n@triton.jit\ndef attnc_bwd_dkdv(\n" + _indent([", ".join(params[i:i + 6]) + ","
                                                                   for i in range(0, len(params), 6)], 4)
                + "):\n"
                + '    """Backward, key side: one program per (KV tile, batch x K/V head)."""\n'
                + _indent(body, 4))

    def _per_query_setup_k(self) -> list[str]:
        lines = self._head_setup()
        if self.pat.decay is not None:
            lines += ["dc_base = batch.to(tl.int64) * dc_b + h.to(tl.int64) * dc_h",
                      "dr_base = batch.to(tl.int64) * dr_b + h.to(tl.int64) * dr_h"]
        if self.pat.route is not None:
            lines.append("sel_base = batch.to(tl.int64) * sel_b + h.to(tl.int64) * sel_h")
        return lines

    def _per_query_setup_q(self) -> list[str]:
        if self.pat.decay is not None:
            return ["dc_q = tl.load(DC + dc_base + q_tok, mask=q_ok, other=0.0)  # FoX prefix sums (hi, lo)",
                    "dl_q = tl.load(DC + dc_base + dc_lo + q_tok, mask=q_ok, other=0.0)",
                    "dr_q = tl.load(DR + dr_base + q_tok, mask=q_ok, other=-1)  # the query's last reset"]
        return []


_DOT = '''

@triton.jit
def _add(a, b):
    """Combine function of row sums (tl.reduce; not tl.sum, see the module docstring)."""
    return a + b


@triton.jit
def _maximum(a, b):
    """Combine function of row maxima."""
    return tl.maximum(a, b)


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """a @ b with fp32 accumulation. DOT 0: native (fp16/bf16 tensor cores); 1: fp32 inputs,
    exact products (no tf32); 2: operands widened to fp32 first (bf16 under the interpreter)."""
    if DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)
'''


def _axis_extents(layout: ir.Layout, bound: E.Bound) -> list[int]:
    if layout.kind == "seq":
        return []
    return [int(size.subs(bound.subs)) for _, size in layout.axes]


def generate_source(pattern: ir.PatternIR, bound: E.Bound, schedule_shape: ScheduleShape, config=None) -> str:
    """The Triton module text (forward, dQ and dK/dV kernels) for a pattern at
    bound sizes and a schedule shape. ``config`` (``compiler.cost.KernelConfig``)
    gives the token layout ('flat', 'address' or 'permute'); warps and stages
    are launch parameters and do not change the text."""
    if not isinstance(pattern, ir.PatternIR):
        raise SpecError(f"'{pattern.name}' is a recurrence: no softmax kernel to generate", where="argument pattern")
    return KernelSource(pattern, bound, schedule_shape, config).module()
