"""The checker's values: the types ``int``, ``float`` and ``bool``, a typed expression
(``Typed``), the names and builtins every expression knows, and the conversions of
Python numbers and sympy constants shared by the other checker modules."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..core.errors import did_you_mean

INT, FLOAT, BOOL = "int", "float", "bool"

#: Names with a fixed meaning in every expression; no param, let or input may take them.
FIXED_NAMES = frozenset({"q", "k", "h", "heads", "n", "nk", "dk", "causal"})
#: Builtin functions and their argument counts (min, max).
BUILTINS = {
    "abs": (1, 1),
    "min": (2, 64),
    "max": (2, 64),
    "clamp": (3, 3),
    "log2": (1, 1),
    "bit_length": (1, 1),
    "is_pow2": (1, 1),
    "exp": (1, 1),
    "log": (1, 1),
    "sqrt": (1, 1),
    "tanh": (1, 1),
    "window": (1, 2),
    "cluster": (2, 2),
    "relative": (2, 2),
    "landmark": (1, 1),
}
WINDOW_KEYWORDS = ("dilation", "stride", "causal")
#: Functions of other languages the language spells otherwise: name -> how.
OTHER_FUNCTIONS = {
    "floor": "ints divide down with '//' (floor(a / b) is a // b); there is no float-to-int conversion",
    "ceil": "ints divide up with -(-a // b); there is no float-to-int conversion",
    "int": "ints divide with '//'; there is no float-to-int conversion",
    "round": "there is no float-to-int conversion; ints divide with '//'",
    "pow": "powers: 2 ** x for x an int, exp(x * log(b)) for floats ('^' is the bitwise xor of ints)",
    "len": "the sizes are names: n (queries), nk (keys), heads, and a grid's axes",
}


def unknown_function_hint(name: str, known) -> str:
    """The hint for an unknown function: how the language says another language's function, else the closest known
    name, else the list."""
    return OTHER_FUNCTIONS.get(name) or did_you_mean(name, known) or "functions: " + ", ".join(sorted(BUILTINS))
INT64_LIMIT = 2**63


@dataclass(frozen=True)
class Typed:
    type: str
    expr: sympy.Basic


def kind_of_value(value) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    return FLOAT


def plain_number(value):
    """numpy scalars (``np.int64(3)``, ``np.float32(0.5)``, ``np.bool_``) as the Python
    bool, int or float they hold; anything else unchanged (and judged by the caller)."""
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        item = value.item()
        return item if isinstance(item, bool | int | float) else value
    return value


def sympy_value(value) -> sympy.Basic:
    if isinstance(value, bool):
        return sympy.true if value else sympy.false
    if isinstance(value, int):
        return sympy.Integer(value)
    return sympy.Float(value)


def fold(expr: sympy.Basic) -> sympy.Basic:
    """Exact constants like log(31/32) become floats, so the IR holds plain numbers."""
    if not expr.free_symbols and not isinstance(expr, sympy.Number) and expr.is_number:
        value = expr.evalf(30)
        if value.is_real and value.is_finite:
            return sympy.Float(value, 30)
    return expr


def article_of(what: str) -> str:
    return ("an " if what[0] in "aeiou" else "a ") + what


def article(kind: str) -> str:
    return {"int": "an int", "float": "a float", "bool": "a bool"}[kind]
