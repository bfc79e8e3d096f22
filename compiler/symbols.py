"""The sympy vocabulary of the IR: symbols for positions and sizes, and the
integer functions sympy lacks (floored division, bit operations, NATTEN windows).

Every function here evaluates itself when its arguments are numbers, with
Python's semantics, so constant folding is exact.
"""

from __future__ import annotations

import sympy
from sympy.logic.boolalg import BooleanFunction

# ----------------------------------------------------------------- symbols
Q = sympy.Symbol("q", integer=True, nonnegative=True)
K = sympy.Symbol("k", integer=True, nonnegative=True)
H = sympy.Symbol("h", integer=True, nonnegative=True)
HEADS = sympy.Symbol("heads", integer=True, positive=True)
N = sympy.Symbol("n", integer=True, positive=True)
NK = sympy.Symbol("nk", integer=True, positive=True)
DK = sympy.Symbol("dk", integer=True, positive=True)

BUILTIN_SIZES = {"heads": HEADS, "n": N, "nk": NK, "dk": DK}


def coord(role: str, axis: str) -> sympy.Symbol:
    """The grid coordinate ``q.AXIS`` (role 'q') or ``k.AXIS`` (role 'k')."""
    return sympy.Symbol(f"{role}_{axis}", integer=True, nonnegative=True)


def size_symbol(name: str) -> sympy.Symbol:
    """A size bound from the tensors or at compile time (an axis extent)."""
    return sympy.Symbol(f"size_{name}", integer=True, positive=True)


def param_symbol(name: str) -> sympy.Symbol:
    """A parameter with no value yet (checked, not yet compiled): a size-like int."""
    return sympy.Symbol(f"param_{name}", integer=True, nonnegative=True)


def input_function(name: str, dtype: str) -> sympy.FunctionClass:
    """``NAME[i, ...]`` of a call-time input, as an undefined sympy function."""
    if dtype == "int":
        return sympy.Function(f"input_{name}", integer=True)
    return sympy.Function(f"input_{name}", real=True)


def input_name(func) -> str | None:
    """The spec name of an input function application, or None."""
    name = getattr(func, "__name__", "") or ""
    return name[len("input_") :] if name.startswith("input_") else None


# ----------------------------------------------------------------- helpers
def _ints(*args) -> bool:
    return all(isinstance(a, sympy.Integer) for a in args)


def _numbers(*args) -> bool:
    return all(isinstance(a, sympy.Number) for a in args)


def _py(a):
    return int(a) if isinstance(a, sympy.Integer) else float(a)


def bit_length(x: int) -> int:
    return abs(int(x)).bit_length()


# ----------------------------------------------------------------- integer functions
class FloorDiv(sympy.Function):
    """``a // b``, floored as in Python (also for negative operands and floats)."""

    @classmethod
    def eval(cls, a, b):
        if b.is_zero:  # only once sizes are substituted (a constant 0 is a checker error)
            if a.is_integer:
                return sympy.Integer(0)  # the evaluator's total rule: x // 0 == 0 for ints
            if a.is_number:
                raise ZeroDivisionError("float floor division by zero")
            return None
        if _numbers(a, b) and b != 0:
            result = _py(a) // _py(b)
            return sympy.Integer(result) if _ints(a, b) else sympy.Float(result)
        if b == 1 and a.is_integer:
            return a
        if a == 0 and b.is_nonzero:
            return sympy.Integer(0)
        return None

    def _eval_is_integer(self):
        a, b = self.args
        if a.is_integer and b.is_integer:
            return True
        return None


class Mod(sympy.Mod):
    """``a % b``, floored as in Python. Total like the evaluator when a divisor
    becomes 0 only once sizes are substituted: ``x % 0 == x`` for ints (sympy's
    own Mod raises ZeroDivisionError).

    Only numbers and trivial cases are folded: sympy's symbolic Mod rewriting
    is wrong in places (sympy 1.14: ``Mod(2*Mod(x, -6), 8)`` becomes
    ``2*Mod(Mod(x, -6)**2, 4)``)."""

    @classmethod
    def eval(cls, p, q):
        if q.is_zero:
            if p.is_integer:
                return p
            if p.is_number:
                raise ZeroDivisionError("float modulo by zero")
            return None
        if p.is_Number and q.is_Number:
            return super().eval(p, q)
        if p.is_integer and (p.is_zero or q in (1, -1) or p in (q, -q)):
            return sympy.Integer(0)  # also right when q later becomes 0 (then p is 0)
        return None


class _NoCollapse:
    """sympy's Min/Max without their argument collapsing, which is wrong for nested
    Min/Max (sympy 1.14: ``Min(Max(1, Min(x, Max(y, Min(1/2, z)))), 6)`` becomes 6).
    Pairwise comparison of the arguments (``_find_localzeros``) still simplifies."""

    @classmethod
    def _collapse_arguments(cls, args, **assumptions):
        return args

    @classmethod
    def _is_connected(cls, x, y):  # sympy answers with its own classes; map them to ours
        con = super()._is_connected(x, y)
        return Max if con is sympy.Max else Min if con is sympy.Min else con


class Min(_NoCollapse, sympy.Min):
    """``min``: sympy's Min, minus the wrong collapsing (see ``_NoCollapse``)."""


class Max(_NoCollapse, sympy.Max):
    """``max``: sympy's Max, minus the wrong collapsing (see ``_NoCollapse``)."""


def _int_function(name: str, impl, nargs: int):
    def eval(cls, *args):  # noqa: ARG001
        if _ints(*args):
            return sympy.Integer(impl(*(int(a) for a in args)))
        return None

    return type(
        name,
        (sympy.Function,),
        {"nargs": nargs, "eval": classmethod(eval), "is_integer": True, "__module__": __name__},
    )


BitAnd = _int_function("BitAnd", lambda a, b: a & b, 2)
BitOr = _int_function("BitOr", lambda a, b: a | b, 2)
BitXor = _int_function("BitXor", lambda a, b: a ^ b, 2)
BitNot = _int_function("BitNot", lambda a: ~a, 1)
ShiftLeft = _int_function("ShiftLeft", lambda a, b: a << b, 2)
ShiftRight = _int_function("ShiftRight", lambda a, b: a >> b, 2)
BitLength = _int_function("BitLength", bit_length, 1)
# floor(log2(x)) for x >= 1; -1 for x <= 0 (documented in the reference).
Log2Floor = _int_function("Log2Floor", lambda a: bit_length(a) - 1 if a >= 1 else -1, 1)


class IsPow2(BooleanFunction):
    """``is_pow2(x)``: x > 0 and a power of two."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if isinstance(x, sympy.Integer):
            v = int(x)
            return sympy.true if v > 0 and v & (v - 1) == 0 else sympy.false
        return None

    def _eval_as_set(self):  # sympy's Piecewise folding asks; an unknown set is allowed
        raise NotImplementedError("is_pow2 has no set form")


# ----------------------------------------------------------------- NATTEN windows
def window_keys(i: int, L: int, size: int, dilation: int, stride: int, causal: bool) -> range:
    """The keys (axis coordinates) query coordinate ``i`` may attend under
    ``window(axis, size, dilation, stride, causal)`` on an axis of length ``L``.

    The scalar definition the vectorised evaluator and the tests follow.
    """
    d = dilation
    g = i % d
    Lg = (L - g + d - 1) // d
    iq = i // d
    if causal:
        leader = min((iq // stride) * stride + stride - 1, Lg - 1)
        lo, hi = max(leader - size + 1, 0), iq
    else:
        leader = min((iq // stride) * stride + stride // 2, Lg - 1)
        wl, wr = size // 2, size // 2 + size % 2 - 1
        centre = min(max(leader, wl), Lg - 1 - wr)
        lo, hi = centre - wl, centre + wr
    return range(lo * d + g, hi * d + g + 1, d)


class Window(BooleanFunction):
    """``window(axis, size, dilation, stride, causal)`` between query coordinate
    ``qa`` and key coordinate ``ka`` on an axis of length ``L`` (NATTEN semantics).

    Arguments: (qa, ka, L, size, dilation, stride, causal) with causal a sympy bool.
    """

    nargs = 7

    @classmethod
    def eval(cls, qa, ka, L, size, dilation, stride, causal):
        if _ints(qa, ka, L, size, dilation, stride) and causal in (sympy.true, sympy.false):
            keys = window_keys(int(qa), int(L), int(size), int(dilation), int(stride), bool(causal))
            return sympy.true if int(ka) in keys else sympy.false
        return None
