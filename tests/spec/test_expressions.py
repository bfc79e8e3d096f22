"""Expressions of the .attn language against a direct Python evaluation.

hypothesis builds random typed expression trees over q, k, h, n, heads and
small parameters, renders them as .attn source (with Python's precedence, so
the parser's precedence is tested too; parentheses only where needed plus a
few redundant ones), and evaluates the same tree with Python's own operators.
attnc evaluates the text through ``attnc.materialize_mask``:

* a bool expression is the mask itself: ``mask EXPR``; compared exactly;
* an int or exactly representable (dyadic) float expression is compared
  exactly with the Python values, passed in as a call-time input:
  ``mask (EXPR) == t[h, q, k]``;
* an expression with rounded floats (``/`` by a non-power of two, ``exp``,
  ``log``, ``sqrt``, ``tanh``, float powers, decimal literals) is checked
  against a window ``lo[h, q, k] <= (EXPR) <= hi[h, q, k]`` around the Python
  value. The half-width is twice a propagated bound on the rounding error of
  float64 evaluation in any order: every float operation may be off by
  ``U = 2**-50`` (8 units in the last place) relative to its magnitude bound,
  and errors propagate through each operation with its derivative bound.

So that a mask of all True cannot pass by accident, about a third of the
cells of ``t`` (or of the window) are deliberately wrong, and exactly those
cells must come back False.

Division: ``/`` never gets a zero divisor; int ``//`` and ``%`` get arbitrary
int divisors (negative and zero included) and the reference follows attnc's
documented total rule ``x // 0 == 0``, ``x % 0 == x``; a float ``//`` or ``%``
gets a nonzero power-of-two divisor (so that it is exact). Ints stay far
below 2**63 (every node's magnitude is bounded and clamped when it grows).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from fuzz_budget import examples
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import attnc

# ----------------------------------------------------------------- precedence (Python's)
IF, OR, AND, NOT, CMP, BOR, BXOR, BAND, SHIFT, ADD, MUL, UNARY, POW, ATOM = range(14)
BINARY_PREC = {"|": BOR, "^": BXOR, "&": BAND, "<<": SHIFT, ">>": SHIFT, "+": ADD, "-": ADD,
               "*": MUL, "/": MUL, "//": MUL, "%": MUL, "and": AND, "or": OR}

#: Relative rounding allowance per float operation (8 ulps of the magnitude bound).
U = 2.0**-50

NMAX, HMAX, PMAX = 6, 3, 6  # largest n, heads and |int parameter| drawn
DYADIC = ["0.5", "0.25", "1.5", "2.0", "0.125", "3.75", "1e0", "2.5e-1", ".5", "6.", "10.25"]
DYADIC_PARAMS = [0.5, -0.75, 1.25, 2.0, -3.5]
DECIMAL = ["0.1", "2.7", "1e-3", "3.14159", "6.02e1", "0.3"]
POW2_DIVISORS = ["1", "2", "4", "8", "16", "0.5", "0.25", "2.0", "-2", "-0.5", "-4.0"]


@dataclass(frozen=True)
class Node:
    kind: str  # 'int', 'exact' (a float that is exactly a dyadic rational), 'real', 'bool'
    text: str
    prec: int
    fn: Callable[[dict], object]  # env -> Python value
    mag: float = 0.0  # bound on |value|
    den: int = 0  # value * 2**den is an integer (int and exact)
    err: float = 0.0  # bound on the rounding error of any float64 evaluation (real)
    divisors: tuple = ()  # (divisor node) of every int // and %, for the constant-zero check


def par(node: Node, need: int) -> str:
    return node.text if node.prec >= need else f"({node.text})"


def num_kind(*nodes: Node) -> str:
    kinds = {n.kind for n in nodes}
    if "real" in kinds:
        return "real"
    if "exact" in kinds:
        return "exact"
    return "int"


def divs(*nodes: Node) -> tuple:
    return tuple(d for n in nodes for d in n.divisors)


def lit_int(v: int) -> Node:
    if v < 0:
        return Node("int", f"-{-v}", UNARY, lambda env, v=v: v, abs(v))
    return Node("int", str(v), ATOM, lambda env, v=v: v, abs(v))


# ----------------------------------------------------------------- Python semantics
def py_floordiv(a, b):
    if isinstance(a, int) and isinstance(b, int) and b == 0:
        return 0  # attnc's total rule for ints
    return a // b


def py_mod(a, b):
    if isinstance(a, int) and isinstance(b, int) and b == 0:
        return a  # attnc's total rule for ints
    return a % b


def py_log2(x):
    return x.bit_length() - 1 if x >= 1 else -1


def py_is_pow2(x):
    return x > 0 and x & (x - 1) == 0


BIN_FN = {
    "+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
    "/": lambda a, b: a / b, "//": py_floordiv, "%": py_mod, "**": lambda a, b: a**b,
    "<<": lambda a, b: a << b, ">>": lambda a, b: a >> b, "&": lambda a, b: a & b,
    "|": lambda a, b: a | b, "^": lambda a, b: a ^ b,
}
CMP_FN = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
          ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


# ----------------------------------------------------------------- node builders
def binary(op: str, a: Node, b: Node, kind: str, mag: float, den: int = 0, err: float = 0.0,
           extra_divs: tuple = ()) -> Node:
    if op == "**":
        text, prec = f"{par(a, ATOM)} ** {par(b, UNARY)}", POW
    else:
        p = BINARY_PREC[op]
        text, prec = f"{par(a, p)} {op} {par(b, p + 1)}", p
    f = BIN_FN[op]
    return Node(kind, text, prec, lambda env: f(a.fn(env), b.fn(env)), mag, den, err,
                divs(a, b) + extra_divs)


def unary(op: str, a: Node, mag: float, kind: str | None = None) -> Node:
    fn = {"-": lambda v: -v, "+": lambda v: +v, "~": lambda v: ~v}[op]
    return Node(kind or a.kind, f"{op}{par(a, UNARY)}", UNARY, lambda env: fn(a.fn(env)),
                mag, a.den, a.err, a.divisors)


def call(name: str, args: list[Node], kind: str, fn: Callable, mag: float = 0.0, den: int = 0,
         err: float = 0.0) -> Node:
    text = f"{name}({', '.join(a.text for a in args)})"
    return Node(kind, text, ATOM, lambda env: fn(*(a.fn(env) for a in args)), mag, den, err,
                divs(*args))


def clamp(x: Node, lo: Node, hi: Node) -> Node:
    mag = max(x.mag, lo.mag, hi.mag) if x.kind != "bool" else 0
    return call("clamp", [x, lo, hi], num_kind(x, lo, hi), lambda v, a, b: min(max(v, a), b),
                mag, max(x.den, lo.den, hi.den), x.err)


def if_node(c: Node, a: Node, b: Node) -> Node:
    kind = "bool" if a.kind == "bool" else num_kind(a, b)
    return Node(kind, f"if {c.text} then {a.text} else {b.text}", IF,
                lambda env: a.fn(env) if c.fn(env) else b.fn(env),
                max(a.mag, b.mag), max(a.den, b.den), max(a.err, b.err), divs(c, a, b))


def maybe_paren(draw, node: Node) -> Node:
    if node.prec < ATOM and draw(st.integers(0, 7)) == 0:
        return Node(node.kind, f"({node.text})", ATOM, node.fn, node.mag, node.den, node.err,
                    node.divisors)
    return node


def fit(draw, x: Node, mag: float, den: int = 60) -> Node:
    """x, made small enough (exactly: floor and clamp) for the operation it feeds."""
    if x.den > den:
        x = binary("//", x, lit_int(1), x.kind, x.mag + 1, 0, x.err)
    if x.mag > mag:
        c = draw(st.integers(1, int(min(mag, 1000))))
        x = clamp(x, lit_int(-c), lit_int(c))
        x = Node(x.kind, x.text, x.prec, x.fn, c, x.den, x.err, x.divisors)
    return x


# ----------------------------------------------------------------- generators
LEAVES_INT = {"q": NMAX - 1, "k": NMAX - 1, "h": HMAX - 1, "n": NMAX, "heads": HMAX,
              "a": PMAX, "b": PMAX}


def g_int(draw, depth: int) -> Node:
    if depth <= 0 or draw(st.integers(0, 4)) == 0:
        choice = draw(st.integers(0, 9))
        if choice < 6:
            name = draw(st.sampled_from(sorted(LEAVES_INT)))
            return Node("int", name, ATOM, lambda env, name=name: env[name], LEAVES_INT[name])
        v = draw(st.integers(-9, 20))
        if v > 0 and choice == 9:  # hex and binary literals
            text = draw(st.sampled_from([hex(v), bin(v), hex(v).upper().replace("0X", "0x")]))
            return Node("int", text, ATOM, lambda env, v=v: v, v)
        return lit_int(v)
    d = depth - 1
    op = draw(st.sampled_from(["+", "-", "*", "//", "%", "**", "<<", ">>", "&", "|", "^",
                               "neg", "~", "pos", "abs", "min", "max", "clamp", "log2",
                               "bit_length", "if"]))
    if op in ("+", "-"):
        a, b = fit(draw, g_int(draw, d), 2**30), fit(draw, g_int(draw, d), 2**30)
        node = binary(op, a, b, "int", a.mag + b.mag)
    elif op == "*":
        a, b = fit(draw, g_int(draw, d), 2**20), fit(draw, g_int(draw, d), 2**20)
        node = binary(op, a, b, "int", a.mag * b.mag)
    elif op in ("//", "%"):
        a, b = fit(draw, g_int(draw, d), 2**40), fit(draw, g_int(draw, d), 2**40)
        if b.text in ("0", "-0"):
            b = lit_int(draw(st.sampled_from([-3, -1, 1, 2, 7])))
        mag = a.mag if op == "//" else max(a.mag, b.mag)
        node = binary(op, a, b, "int", mag, extra_divs=(b,))
    elif op == "**":
        a = fit(draw, g_int(draw, d), 2**12)
        e = draw(st.integers(0, 3))
        node = binary(op, a, lit_int(e), "int", a.mag**e)
    elif op in ("<<", ">>"):
        a = fit(draw, g_int(draw, d), 2**30)
        if draw(st.booleans()):
            count = lit_int(draw(st.integers(0, 62 if op == ">>" else 8)))
        else:  # a computed count, floored into 0..7
            count = binary("%", g_int(draw, d - 1), lit_int(8), "int", 7)
        node = binary(op, a, count, "int", a.mag * (2**8 if op == "<<" else 1))
    elif op in ("&", "|", "^"):
        a, b = fit(draw, g_int(draw, d), 2**40), fit(draw, g_int(draw, d), 2**40)
        node = binary(op, a, b, "int", 2 * max(a.mag, b.mag) + 1)
    elif op in ("neg", "~", "pos"):
        a = g_int(draw, d)
        node = unary({"neg": "-", "~": "~", "pos": "+"}[op], a, a.mag + 1)
    elif op == "abs":
        a = g_int(draw, d)
        node = call("abs", [a], "int", abs, a.mag)
    elif op in ("min", "max"):
        args = [g_int(draw, d) for _ in range(draw(st.integers(2, 3)))]
        node = call(op, args, "int", min if op == "min" else max, max(x.mag for x in args))
    elif op == "clamp":
        node = clamp(g_int(draw, d), g_int(draw, d), g_int(draw, d))
    elif op == "log2":
        node = call("log2", [g_int(draw, d)], "int", py_log2, 64)
    elif op == "bit_length":
        node = call("bit_length", [g_int(draw, d)], "int", lambda v: abs(v).bit_length(), 64)
    else:
        node = if_node(g_bool(draw, d), g_int(draw, d), g_int(draw, d))
    return maybe_paren(draw, fit(draw, node, 2**40))


def g_exact(draw, depth: int) -> Node:
    """An int or a float that float64 holds exactly whatever the evaluation order."""
    if draw(st.integers(0, 2)) == 0:
        return g_int(draw, depth)
    if depth <= 0 or draw(st.integers(0, 4)) == 0:
        if draw(st.booleans()):
            return Node("exact", "f", ATOM, lambda env: env["f"], 4, 2)
        text = draw(st.sampled_from(DYADIC))
        v = float(text)
        return Node("exact", text, ATOM, lambda env, v=v: v, abs(v), 3)
    d = depth - 1
    op = draw(st.sampled_from(["+", "-", "*", "/", "//", "%", "**", "neg", "abs", "min", "max",
                               "clamp", "if"]))
    if op in ("+", "-"):
        a, b = fit(draw, g_exact(draw, d), 2**24, 12), fit(draw, g_exact(draw, d), 2**24, 12)
        node = binary(op, a, b, num_kind(a, b), a.mag + b.mag, max(a.den, b.den))
    elif op == "*":
        a, b = fit(draw, g_exact(draw, d), 2**12, 8), fit(draw, g_exact(draw, d), 2**12, 8)
        node = binary(op, a, b, num_kind(a, b), a.mag * b.mag, a.den + b.den)
    elif op in ("/", "//", "%"):
        a = fit(draw, g_exact(draw, d), 2**24, 8)
        text = draw(st.sampled_from(POW2_DIVISORS))
        v = float(text)
        b = Node("int" if "." not in text else "exact", text, UNARY if v < 0 else ATOM,
                 lambda env, v=(int(v) if "." not in text else v): v, abs(v), 2)
        shift = max(0, round(math.log2(abs(v))))  # dividing by 2**shift adds shift bits
        if op == "/":
            node = binary(op, a, b, "exact", a.mag / abs(v), a.den + shift)
        elif op == "//":
            node = binary(op, a, b, num_kind(a, b), a.mag / abs(v) + 1, 0)
        else:
            node = binary(op, a, b, num_kind(a, b), abs(v), max(a.den, 2))
    elif op == "**":
        a = fit(draw, g_exact(draw, d), 2**6, 4)
        e = draw(st.integers(0, 3))
        node = binary(op, a, lit_int(e), a.kind, a.mag**e, a.den * e)
    elif op == "neg":
        a = g_exact(draw, d)
        node = unary("-", a, a.mag)
    elif op == "abs":
        a = g_exact(draw, d)
        node = call("abs", [a], a.kind, abs, a.mag, a.den)
    elif op in ("min", "max"):
        args = [g_exact(draw, d) for _ in range(draw(st.integers(2, 3)))]
        node = call(op, args, num_kind(*args), min if op == "min" else max,
                    max(x.mag for x in args), max(x.den for x in args))
    elif op == "clamp":
        node = clamp(g_exact(draw, d), g_exact(draw, d), g_exact(draw, d))
    else:
        node = if_node(g_bool(draw, d), g_exact(draw, d), g_exact(draw, d))
    return maybe_paren(draw, fit(draw, node, 2**24, 12))


def g_real(draw, depth: int) -> Node:
    """Any number, possibly rounded; err bounds the rounding of any evaluation order."""
    if draw(st.integers(0, 2)) == 0:
        return g_exact(draw, depth)
    if depth <= 0 or draw(st.integers(0, 4)) == 0:
        text = draw(st.sampled_from(DECIMAL))
        v = float(text)
        return Node("real", text, ATOM, lambda env, v=v: v, abs(v), 0, U * abs(v))
    d = depth - 1
    op = draw(st.sampled_from(["+", "-", "*", "/", "**", "exp", "log", "sqrt", "tanh", "neg",
                               "abs", "min", "max", "clamp", "if"]))
    if op in ("+", "-"):
        a, b = fit(draw, g_real(draw, d), 2**20), fit(draw, g_real(draw, d), 2**20)
        mag = a.mag + b.mag
        node = binary(op, a, b, num_kind(a, b), mag, max(a.den, b.den), a.err + b.err + U * mag)
    elif op == "*":
        a, b = fit(draw, g_real(draw, d), 2**10), fit(draw, g_real(draw, d), 2**10)
        mag = a.mag * b.mag
        err = a.err * b.mag + b.err * a.mag + a.err * b.err + U * mag
        node = binary(op, a, b, num_kind(a, b), mag, a.den + b.den, err)
    elif op == "/":
        a = fit(draw, g_real(draw, d), 2**20)
        if draw(st.booleans()):
            b = lit_int(draw(st.sampled_from([3, -7, 5, 6, -3, 10])))
        else:  # a computed divisor in 1..5
            b = binary("+", binary("%", g_int(draw, d - 1), lit_int(5), "int", 4), lit_int(1),
                       "int", 5)
        node = binary("/", a, b, "real", a.mag, 0, a.err + U * a.mag)
    elif op == "**":
        base_text = draw(st.sampled_from(["2", "3", "0.5", "1.5"]))
        base = float(base_text)
        y = fit(draw, g_real(draw, d), 8)
        mag = max(base, 1 / base) ** y.mag
        b = Node("int" if "." not in base_text else "exact", base_text, ATOM,
                 lambda env, v=(int(base) if "." not in base_text else base): v, base)
        err = mag * (abs(math.log(base)) * y.err * 1.01 + 2 * U)
        node = binary("**", b, y, "real", mag, 0, err)
    elif op == "exp":
        x = fit(draw, g_real(draw, d), 8)
        mag = math.exp(x.mag)
        node = call("exp", [x], "real", math.exp, mag, 0, mag * (2 * x.err + U))
    elif op == "log":  # log(abs(x) + 1): the argument is at least 1
        x = fit(draw, g_real(draw, d), 2**20)
        inner = binary("+", call("abs", [x], x.kind, abs, x.mag, x.den, x.err), lit_int(1),
                       num_kind(x), x.mag + 1, x.den, x.err + U * (x.mag + 1))
        mag = math.log(x.mag + 1)
        node = call("log", [inner], "real", math.log, mag, 0, inner.err + U * (mag + 1))
    elif op == "sqrt":  # sqrt(abs(x)) of an exact x (sqrt magnifies an error near 0)
        x = fit(draw, g_exact(draw, d), 2**20)
        inner = call("abs", [x], x.kind, abs, x.mag, x.den)
        mag = math.sqrt(x.mag)
        node = call("sqrt", [inner], "real", math.sqrt, mag, 0, U * (mag + 1))
    elif op == "tanh":
        x = g_real(draw, d)
        node = call("tanh", [x], "real", math.tanh, 1.0, 0, x.err + U)
    elif op == "neg":
        a = g_real(draw, d)
        node = unary("-", a, a.mag)
    elif op == "abs":
        a = g_real(draw, d)
        node = call("abs", [a], a.kind, abs, a.mag, a.den, a.err)
    elif op in ("min", "max"):
        args = [g_real(draw, d) for _ in range(draw(st.integers(2, 3)))]
        node = call(op, args, num_kind(*args), min if op == "min" else max,
                    max(x.mag for x in args), max(x.den for x in args), max(x.err for x in args))
    elif op == "clamp":
        node = clamp(g_real(draw, d), g_exact(draw, d), g_exact(draw, d))
    else:
        node = if_node(g_bool(draw, d), g_real(draw, d), g_real(draw, d))
    return maybe_paren(draw, fit(draw, node, 2**20))


def g_bool(draw, depth: int) -> Node:
    if depth <= 0 or draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from(["true", "false", "causal"]))
        fn = {"true": lambda env: True, "false": lambda env: False,
              "causal": lambda env: env["k"] <= env["q"]}[text]
        return Node("bool", text, ATOM, fn)
    d = depth - 1
    op = draw(st.sampled_from(["cmp", "cmp", "cmp", "booleq", "and", "or", "not", "is_pow2", "if"]))
    if op == "cmp":
        count = draw(st.integers(1, 3))
        operands = [g_exact(draw, d) for _ in range(count + 1)]
        ops = [draw(st.sampled_from(sorted(CMP_FN))) for _ in range(count)]
    elif op == "booleq":
        count = draw(st.integers(1, 2))
        operands = [g_bool(draw, d) for _ in range(count + 1)]
        ops = [draw(st.sampled_from(["==", "!="])) for _ in range(count)]
    if op in ("cmp", "booleq"):
        def fn(env, operands=operands, ops=ops):
            vals = [o.fn(env) for o in operands]
            return all(CMP_FN[o](x, y) for o, x, y in zip(ops, vals, vals[1:], strict=False))
        parts = [par(operands[0], BOR)]
        for o, x in zip(ops, operands[1:], strict=True):
            parts += [o, par(x, BOR)]
        node = Node("bool", " ".join(parts), CMP, fn, divisors=divs(*operands))
    elif op in ("and", "or"):
        a, b = g_bool(draw, d), g_bool(draw, d)
        p = BINARY_PREC[op]
        fn = (lambda env: a.fn(env) and b.fn(env)) if op == "and" else (lambda env: a.fn(env) or b.fn(env))
        node = Node("bool", f"{par(a, p)} {op} {par(b, p + 1)}", p, fn, divisors=divs(a, b))
    elif op == "not":
        a = g_bool(draw, d)
        node = Node("bool", f"not {par(a, NOT)}", NOT, lambda env: not a.fn(env), divisors=a.divisors)
    elif op == "is_pow2":
        node = call("is_pow2", [g_int(draw, d)], "bool", py_is_pow2)
    else:
        node = if_node(g_bool(draw, d), g_bool(draw, d), g_bool(draw, d))
    return maybe_paren(draw, node)


# ----------------------------------------------------------------- running both sides
HEADER = "pattern e(a = 1, b = 1, f = 0.5)\n  tokens seq\n"


@st.composite
def environments(draw):
    n = draw(st.integers(1, NMAX))
    heads = draw(st.integers(1, HMAX))
    nonzero = st.sampled_from([v for v in range(-PMAX, PMAX + 1) if v])  # 0 would be a constant divisor
    return {"n": n, "heads": heads, "a": draw(nonzero), "b": draw(nonzero),
            "f": draw(st.sampled_from(DYADIC_PARAMS))}


def cells(env):
    for h in range(env["heads"]):
        for q in range(env["n"]):
            for k in range(env["n"]):
                yield h, q, k, {**env, "h": h, "q": q, "k": k}


def reference(node: Node, env: dict) -> list:
    return [(h, q, k, node.fn(cell)) for h, q, k, cell in cells(env)]


def materialize(node: Node, env: dict, body: str, inputs: dict | None = None) -> torch.Tensor | None:
    src = HEADER + body
    try:
        return attnc.materialize_mask(src, n=env["n"], heads=env["heads"], inputs=inputs,
                                      a=env["a"], b=env["b"], f=env["f"])
    except attnc.SpecError as err:
        # The one legitimate refusal: an int divisor that sympy folds to the constant 0
        # (e.g. `q // (k - k)`); the checker rejects a constant zero divisor.
        if err.message == "division by zero":
            zero = [dv for dv in node.divisors
                    if all(dv.fn(cell) == 0 for *_, cell in cells(env))]
            assert zero, f"'division by zero' but no divisor is identically zero:\n{src}"
            assume(False)
        raise AssertionError(f"attnc refused a valid expression:\n{src}\n{err}") from None
    except Exception as err:
        raise AssertionError(f"attnc crashed ({type(err).__name__}: {err}) on\n{src}\nwith {env}") from err


def perturbation(draw, env) -> torch.Tensor:
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(env["heads"], env["n"], env["n"], generator=gen, dtype=torch.float64) < 0.35


def check_numeric(draw, node: Node, env: dict) -> None:
    ref = reference(node, env)
    shape = (env["heads"], env["n"], env["n"])
    wrong = perturbation(draw, env)
    if node.kind == "int":
        assert all(isinstance(v, int) and abs(v) < 2**62 for *_, v in ref)
        t = torch.zeros(shape, dtype=torch.int64)
        for h, q, k, v in ref:
            t[h, q, k] = v + (1 + (q + k) % 3 if wrong[h, q, k] else 0)
        body = f"  input t: int[heads, n, n]\n  mask ({node.text}) == t[h, q, k]\n"
        got = materialize(node, env, body, {"t": t})
    elif node.kind == "exact":
        t = torch.zeros(shape, dtype=torch.float64)
        for h, q, k, v in ref:
            assert float(v) * 2.0**node.den == int(float(v) * 2.0**node.den)  # really dyadic
            t[h, q, k] = float(v) + (0.5 if wrong[h, q, k] else 0.0)
        body = f"  input t: float[heads, n, n]\n  mask ({node.text}) == t[h, q, k]\n"
        got = materialize(node, env, body, {"t": t})
    else:
        tol = 2 * node.err + 1e-300
        assert tol <= 1e-6 * (1 + node.mag), f"error bound too loose to be a test: {tol}"
        lo = torch.zeros(shape, dtype=torch.float64)
        hi = torch.zeros(shape, dtype=torch.float64)
        for h, q, k, v in ref:
            assert math.isfinite(v)
            shift = (2 * tol + 1e-9 * (1 + abs(v))) if wrong[h, q, k] else 0.0
            lo[h, q, k] = v - tol + 2 * shift
            hi[h, q, k] = v + tol + 2 * shift
        body = (f"  input lo: float[heads, n, n]\n  input hi: float[heads, n, n]\n"
                f"  mask lo[h, q, k] <= ({node.text}) <= hi[h, q, k]\n")
        got = materialize(node, env, body, {"lo": lo, "hi": hi})
    expected = ~wrong
    if not torch.equal(got, expected):
        bad = (got != expected).nonzero()[0].tolist()
        h, q, k = bad
        value = node.fn({**env, "h": h, "q": q, "k": k})
        raise AssertionError(
            f"mismatch at h={h} q={q} k={k} (python value {value!r}, "
            f"cell deliberately wrong: {bool(wrong[h, q, k])}) for\n{node.text}\nenv {env}"
        )


SETTINGS = settings(max_examples=examples(100), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@SETTINGS
@given(env=environments(), data=st.data())
def test_bool_expressions(env, data):
    node = g_bool(data.draw, 4)
    got = materialize(node, env, f"  mask {node.text}\n")
    expected = torch.tensor([v for *_, v in reference(node, env)], dtype=torch.bool)
    expected = expected.view(env["heads"], env["n"], env["n"])
    if not torch.equal(got, expected):
        h, q, k = (got != expected).nonzero()[0].tolist()
        raise AssertionError(f"mismatch at h={h} q={q} k={k}: attnc {bool(got[h, q, k])}, "
                             f"python {bool(expected[h, q, k])} for\n{node.text}\nenv {env}")


@SETTINGS
@given(env=environments(), data=st.data())
def test_int_expressions(env, data):
    node = g_int(data.draw, 4)
    check_numeric(data.draw, node, env)


@SETTINGS
@given(env=environments(), data=st.data())
def test_exact_float_expressions(env, data):
    node = g_exact(data.draw, 4)
    check_numeric(data.draw, node, env)


@SETTINGS
@given(env=environments(), data=st.data())
def test_rounded_float_expressions(env, data):
    node = g_real(data.draw, 4)
    check_numeric(data.draw, node, env)


# ----------------------------------------------------------------- the same text through Python's eval
# Expressions that mean the same in Python and in .attn: Python's own parser and
# operators are the reference (precedence, associativity, floored division).
PYTHON_TEXT = [
    "-q ** 2", "(-q) ** 2", "2 ** 3 ** 2 - q", "2 ** -1 * q", "-2 ** -2 + k",
    "q - k - 1 - h", "q // 2 // 2 * k", "(q - 7) // 3", "(q - 7) % 3", "(q - 7) // -3",
    "(q - 7) % -3", "(3 - k * q) // (k - 6)", "(3 - k * q) % (k - 6)", "-q // 2 * 3 % 5 ** 2",
    "q + k << 1 | h", "q | k & 3 ^ h", "~q & 7 ^ -k", "1 << q >> 1", "-k >> 1", "q * 1.5 // 1",
    "(q - 4.5) // 2", "(q - 4.5) % 2", "(q - 4.5) % -0.5", "(k - 3) // 0.5", "q / 4 - k / 8",
    "q * -k + -(h - 2) * +3", "q - -k", "abs(k - q) - min(q, k, 2) + max(q - 5, -1)",
    "(q < k) == (k > q)", "q < k < 4", "q <= k == h", "0 <= q - k < 2 != h",
    "not q < k", "not q == k or h == 0 and q != 0",
]


@pytest.mark.parametrize("text", PYTHON_TEXT)
def test_same_as_python_eval(text):
    n, heads = 6, 2
    values = {}
    for h in range(heads):
        for q in range(n):
            for k in range(n):
                values[h, q, k] = eval(text, {"__builtins__": {"abs": abs, "min": min, "max": max}},
                                       {"q": q, "k": k, "h": h})
    kinds = {type(v) for v in values.values()}
    if kinds == {bool}:
        got = attnc.materialize_mask(f"pattern e tokens seq mask {text}", n=n, heads=heads)
        for (h, q, k), v in values.items():
            assert bool(got[h, q, k]) == v, (text, h, q, k)
        return
    dtype = torch.float64 if float in kinds else torch.int64
    t = torch.zeros(heads, n, n, dtype=dtype)
    for (h, q, k), v in values.items():
        t[h, q, k] = v
    src = (f"pattern e tokens seq input t: {'float' if dtype == torch.float64 else 'int'}[heads, n, n]"
           f" mask ({text}) == t[h, q, k]")
    got = attnc.materialize_mask(src, n=n, heads=heads, inputs={"t": t})
    assert got.all(), (text, (~got).nonzero()[:3].tolist())
    t2 = t + 1
    assert not attnc.materialize_mask(src, n=n, heads=heads, inputs={"t": t2}).any()


def test_total_division_rule_at_runtime():
    """A divisor that is zero only at some positions: x // 0 == 0, x % 0 == x."""
    src = """pattern e
      tokens seq
      input t: int[n, n]
      input r: int[n, n]
      mask (q - 5) // (k - 2) == t[q, k] and (q - 5) % (k - 2) == r[q, k]
    """
    n = 6
    t = torch.tensor([[(q - 5) // (k - 2) if k != 2 else 0 for k in range(n)] for q in range(n)])
    r = torch.tensor([[(q - 5) % (k - 2) if k != 2 else q - 5 for k in range(n)] for q in range(n)])
    assert attnc.materialize_mask(src, n=n, inputs={"t": t, "r": r}).all()
    # and the rule really is exercised: a different value at k == 2 fails there only
    t[:, 2] = 7
    got = attnc.materialize_mask(src, n=n, inputs={"t": t, "r": r})[0]
    assert not got[:, 2].any() and got[:, [0, 1, 3, 4, 5]].all()


@pytest.mark.parametrize(("expr", "value"), [
    ("-7 // 2", -4), ("7 // -2", -4), ("-7 % 3", 2), ("7 % -3", -2), ("-7 % -3", -1),
    ("-7.5 // 2", -4.0), ("-7.5 % 2", 0.5), ("7.5 % -2", -0.5), ("-1 // 7", -1), ("-1 % 7", 6),
])
def test_negative_floor_division_constants(expr, value):
    assert eval(expr) == value  # the table itself is Python's rule
    assert attnc.materialize_mask(f"pattern e tokens seq mask ({expr}) == {value}", n=2).all()
    assert not attnc.materialize_mask(f"pattern e tokens seq mask ({expr}) == {value} + 1", n=2).any()


@pytest.mark.parametrize(("expr", "value"), [
    ("q % (heads - 1)", lambda q, k: q), ("q // (heads - 1)", lambda q, k: 0),
    ("min(k - 9, (k - 9) // (heads // 2))", lambda q, k: min(k - 9, 0)),
    ("max((q - 4) % (n - 3), k) + (heads - 1) * q", lambda q, k: max(q - 4, k)),
    ("abs(min(-6, -6 // (heads // 2)))", lambda q, k: 6),
])
def test_divisor_zero_only_at_these_sizes(expr, value):
    """A divisor that is 0 because of the sizes (heads = 1, n = 3): the total rule holds."""
    n = 3
    t = torch.tensor([[value(q, k) for k in range(n)] for q in range(n)])
    src = f"pattern e tokens seq input t: int[n, n] mask ({expr}) == t[q, k]"
    assert attnc.materialize_mask(src, n=n, heads=1, inputs={"t": t}).all()
    assert not attnc.materialize_mask(src, n=n, heads=1, inputs={"t": t + 1}).any()


def test_float_divisor_zero_at_these_sizes_is_a_clean_error():
    for expr in ("min(q, 2.5 // (heads - 1)) > 0", "min(q, 2.5 % (heads - 1)) > 0",
                 "q / (heads - 1) > 0", "(heads - 1) ** -1 > q"):
        with pytest.raises(attnc.SpecError):
            attnc.materialize_mask(f"pattern e tokens seq mask {expr}", n=3, heads=1)
        attnc.materialize_mask(f"pattern e tokens seq mask {expr}", n=3, heads=2)  # fine


def test_nested_if_on_is_pow2():
    """An if whose condition compares another if on is_pow2 (sympy folds the Piecewise)."""
    src = """pattern e(a = -6)
      tokens seq
      mask (if (if is_pow2(h + q) then a else h) != a then 1 else 0) == 1
    """
    got = attnc.materialize_mask(src, n=4, heads=3)
    want = [[[(a if py_is_pow2(h + q) else h) != -6 for k in range(4)] for q in range(4)]
            for h in range(3) for a in [-6]]
    assert torch.equal(got, torch.tensor(want))


def test_nested_min_max_simplification():
    """sympy 1.14 collapses Min(Max(1, Min(x, Max(y, Min(1/2, z)))), 6) to 6; attnc must not."""
    src = ("pattern e(f = 0.5) tokens seq input t: float[heads, n, n] "
           "mask clamp(-6, 2, clamp(1, min(clamp(h, k, heads), max(h, f), heads), 6.)) == t[h, q, k]")
    n, heads = 3, 2
    want = torch.tensor([[[float(min(max(-6, 2), min(max(1, min(min(max(h, k), heads), max(h, 0.5), heads)), 6.0)))
                           for k in range(n)] for q in range(n)] for h in range(heads)], dtype=torch.float64)
    assert attnc.materialize_mask(src, n=n, heads=heads, inputs={"t": want}).all()
    assert not attnc.materialize_mask(src, n=n, heads=heads, inputs={"t": want + 0.5}).any()
    src = "pattern e tokens seq input t: int[n, n] mask min(max(1, min(q, max(k, min(2, h)))), 6) == t[q, k]"
    want = torch.tensor([[min(max(1, min(q, max(k, 0))), 6) for k in range(5)] for q in range(5)])
    assert attnc.materialize_mask(src, n=5, inputs={"t": want}).all()


def test_mod_of_a_multiple_of_mod():
    """sympy 1.14 rewrites Mod(2*Mod(x, -6), 8) as 2*Mod(Mod(x, -6)**2, 4); attnc must not."""
    src = "pattern e(a = -6) tokens seq input t: int[n, n] mask (2 * (q % a) + k) % 8 + (a * (heads % a)) % 8 == t[q, k]"
    n, heads = 6, 1
    want = torch.tensor([[(2 * (q % -6) + k) % 8 + (-6 * (heads % -6)) % 8 for k in range(n)] for q in range(n)])
    assert attnc.materialize_mask(src, n=n, heads=heads, inputs={"t": want}).all()
    assert not attnc.materialize_mask(src, n=n, heads=heads, inputs={"t": want + 1}).any()


def test_bit_length_tensor_is_exact_on_both_paths():
    """Python's int.bit_length on int64 tensors: the double-exponent path (every |x| below 2**53)
    and the shifting path (larger values present), including the values around 2**53."""
    import random

    from attnc.compiler.analysis.evaluate import bit_length_tensor

    rng = random.Random(5)
    edges = [0, 1, -1, 2, 3, 7, 8, 2**52 - 1, 2**52, 2**53 - 1, -(2**53 - 1)]
    small = edges + [rng.randrange(-2**53 + 1, 2**53) for _ in range(3000)]
    large = small + [2**53, 2**53 + 1, 2**62, 2**63 - 1, -(2**63 - 1)] + [rng.randrange(-2**63 + 1, 2**63)
                                                                            for _ in range(3000)]
    for vals in (small, large):
        assert bit_length_tensor(torch.tensor(vals)).tolist() == [abs(v).bit_length() for v in vals]


@pytest.mark.parametrize("mask,rule", [
    ("sqrt(-1.5 * q + 2.0 * k) >= 1.0 or k == q",
     lambda q, k: k == q or (2.0 * k - 1.5 * q >= 0 and math.sqrt(2.0 * k - 1.5 * q) >= 1.0)),
    ("log((q - k) - q) + q < q or k == q",  # log(-k): -inf at k = 0, NaN beyond
     lambda q, k: k == q or k == 0),
    ("sqrt(-1.5 * q) >= 0.0 or k <= q - 3", lambda q, k: q == 0 or k <= q - 3),
])
def test_log_and_sqrt_of_negative_expressions_are_ieee_on_every_backend(mask, rule):
    """sqrt and log of expressions sympy knows to be negative stay real-valued nodes (sympy's own
    rewrote them with I, which was refused or could not be compared): NaN where IEEE gives NaN,
    the mask a naive loop computes, and every backend's output equal to the reference's."""
    src = f"pattern p\n  tokens seq\n  mask {mask}\n"
    pat = attnc.load(src)
    n = 24
    want = torch.tensor([[bool(rule(q, k)) for k in range(n)] for q in range(n)])
    assert torch.equal(attnc.materialize_mask(pat, n=n, heads=1)[0], want)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    ref = attnc.compile_attention(src, backend="reference")(q, k, v)
    for backend in ("cpu", "flex"):
        got = attnc.compile_attention(src, backend=backend, q_tile=8, kv_tile=8)(q, k, v)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    tri = attnc.compile_attention(src, backend="triton", q_tile=16, kv_tile=16)(q.float(), k.float(), v.float())
    torch.testing.assert_close(tri.double(), ref, rtol=2e-5, atol=2e-5)
