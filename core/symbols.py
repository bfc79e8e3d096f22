"""The sympy vocabulary of the IR: symbols for positions and sizes, and the
integer functions sympy lacks (floored division, bit operations, NATTEN windows).

Every function here evaluates itself when its arguments are numbers, with
Python's semantics, so constant folding is exact.
"""

from __future__ import annotations

import hashlib
import math

import sympy
from sympy.core.operations import ShortCircuit
from sympy.functions.elementary.piecewise import ExprCondPair
from sympy.logic.boolalg import BooleanFunction

# ----------------------------------------------------------------- symbols
Q = sympy.Symbol("q", integer=True, nonnegative=True)
K = sympy.Symbol("k", integer=True, nonnegative=True)
H = sympy.Symbol("h", integer=True, nonnegative=True)
HEADS = sympy.Symbol("heads", integer=True, positive=True)
N = sympy.Symbol("n", integer=True, positive=True)
NK = sympy.Symbol("nk", integer=True, positive=True)
DK = sympy.Symbol("dk", integer=True, positive=True)
#: The query rows of a call: ``n``, or the present queries after a KV cache (where ``n`` is the whole
#: sequence). Not a name of the language: the shape of inputs made for the call's rows alone (a combined
#: pattern's route scores).
NQ = sympy.Symbol("nq", integer=True, positive=True)

BUILTIN_SIZES = {"heads": HEADS, "n": N, "nk": NK, "dk": DK}


def coord(role: str, axis: str) -> sympy.Symbol:
    """The grid coordinate ``q.AXIS`` (role 'q') or ``k.AXIS`` (role 'k')."""
    return sympy.Symbol(f"{role}_{axis}", integer=True, nonnegative=True)


def is_position(sym: sympy.Symbol) -> bool:
    """``q``, ``k`` or a grid coordinate of either (every other symbol is one value per head)."""
    return sym.name in ("q", "k") or sym.name.startswith(("q_", "k_"))


def per_pair(expr: sympy.Basic, scalars=frozenset(), free=None) -> bool:
    """Whether ``expr`` varies over the (query, key) pairs of a tile: it reads a position that is
    not in ``scalars`` (coordinates with one value per tile, ``schedule.uniform_axes``). ``free``:
    its free symbols where already known (``FreeSymbols``)."""
    return any(is_position(sym) and sym not in scalars for sym in (expr.free_symbols if free is None else free))


class FreeSymbols:
    """``node.free_symbols`` of the sub-expressions of one expression, memoised per node: sympy
    recomputes them over the expanded tree, exponential in nested ``let``s."""

    def __init__(self):
        self.memo: dict[int, frozenset] = {}

    def __call__(self, node: sympy.Basic) -> frozenset:
        stack = [(node, False)]
        while stack:
            n, ready = stack.pop()
            if id(n) in self.memo:
                continue
            if isinstance(n, sympy.Symbol):
                self.memo[id(n)] = frozenset([n])
            elif not n.args:
                self.memo[id(n)] = frozenset()
            elif ready:
                self.memo[id(n)] = frozenset().union(*(self.memo[id(a)] for a in n.args))
            else:
                stack.append((n, True))
                stack.extend((a, False) for a in n.args if id(a) not in self.memo)
        return self.memo[id(node)]


def pair_part(expr: sympy.Basic, scalars=frozenset()) -> sympy.Basic:
    """``expr`` with each largest sub-expression that is not ``per_pair`` (computed once per tile
    pair or per head) replaced by a placeholder symbol: what a kernel evaluates per score. A
    ``Piecewise`` branch is never replaced whole (its value and condition may be)."""
    memo: dict = {}
    syms = FreeSymbols()

    def walk(node):
        if node.is_Atom or not node.args:
            return node
        if id(node) in memo:
            return memo[id(node)]
        free = syms(node)
        if not isinstance(node, ExprCondPair) and free and not per_pair(node, scalars, free):
            out = sympy.Dummy(integer=bool(node.is_integer)) if not isinstance(node, sympy.logic.boolalg.Boolean) \
                else sympy.Dummy()
        else:
            args = [walk(a) for a in node.args]
            out = node if all(a is b for a, b in zip(args, node.args, strict=True)) else rebuild(node, args)
        memo[id(node)] = out
        return out

    return walk(expr)


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


# ----------------------------------------------------------------- sharing
# A let used twice makes the IR a DAG: the same sympy object appears in several
# places, and nested lets double the size of the expanded tree at each level.
# The node classes below never rewrite their arguments beyond folding numbers,
# because sympy's rewriting walks the expanded tree (signsimp, piecewise_fold,
# xreplace), which is exponential in the nesting.


def _unevaluated_abs(x: sympy.Basic) -> sympy.Basic:
    """``abs(x)`` without sympy's sign simplification (sympy's internals take the
    absolute value of integer factors when they ask whether a product is an int)."""
    if x.is_Number:
        return abs(x)
    return sympy.Abs(x, evaluate=False)


#: Expressions whose expanded tree is larger than this are not compared by sympy.
SIMPLIFY_LIMIT = 200


def tree_size(expr: sympy.Basic, cap: int = SIMPLIFY_LIMIT + 1) -> int:
    """The number of nodes of ``expr`` as a tree (shared ones counted each time
    they occur), at most ``cap``: linear in the DAG (memoised, capped, no recursion)."""
    memo: dict[int, int] = {}
    stack = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        if ready:
            memo[id(node)] = min(cap, 1 + sum(memo[id(a)] for a in node.args))
        else:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if id(a) not in memo)
    return memo[id(expr)]


def digest(expr: sympy.Basic) -> str:
    """A structural hash of ``expr``, the same in every process (sympy's hash is
    salted per process); linear in the DAG. Nodes are memoised by identity: looking
    a node up by equality would compare structurally equal copies of a shared DAG
    node by node, which is exponential in its depth."""
    memo: dict[int, str] = {}
    stack = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in memo:
            continue
        if not node.args:
            memo[id(node)] = hashlib.sha256(sympy.srepr(node).encode()).hexdigest()
        elif ready:
            parts = [type(node).__name__, *(memo[id(a)] for a in node.args)]
            memo[id(node)] = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
        else:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if id(a) not in memo)
    return memo[id(expr)]


def dag_size(expr: sympy.Basic) -> int:
    """The number of distinct sub-expressions of ``expr`` (shared ones once)."""
    seen: set[int] = set()
    stack = [expr]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.args)
    return len(seen)


# ----------------------------------------------------------------- float factors of a sum
def float_factored(terms) -> list[sympy.Basic]:
    """The terms of a sum, in their order, where sympy distributed a float over a sum of integers put back as the
    text wrote it: terms with the same float coefficient (up to sign) over integer factors become one product, that
    float times their exact integer sum. ``0.1*q - 0.1*k + 0.2`` (the text ``(q - k) * 0.1 + 0.2``) is computed as
    ``0.1 * (q - k)`` plus ``0.2``: one rounding per pair, the same at every distance, as IEEE evaluates the text,
    where ``q * 0.1 - k * 0.1`` rounds each position apart (a window ``(q - k) * 0.1 < 0.3`` held 3 keys on some
    rows and 4 on others). The evaluator, the interval rules and the code printers all fold a sum's terms through
    this, so every backend and the tile classification decide the same pairs. A term of its own stays as it is."""
    groups: dict = {}
    for i, term in enumerate(terms):
        coeff, rest = term.as_coeff_Mul()
        if isinstance(coeff, sympy.Float) and coeff != 0 and rest.is_integer:
            groups.setdefault(abs(coeff), []).append((i, rest if coeff > 0 else -rest))
    factored = {members[0][0]: sympy.Mul(coeff, sympy.Add(*(m for _, m in members)), evaluate=False)
                for coeff, members in groups.items() if len(members) > 1}
    if not factored:
        return list(terms)
    absorbed = {i for coeff, members in groups.items() if len(members) > 1 for i, _ in members[1:]}
    return [factored.get(i, term) for i, term in enumerate(terms) if i not in absorbed]


# ----------------------------------------------------------------- integer functions
def float_floordiv(a: float, b: float) -> float:
    """``a // b`` for floats, computed by torch in float64 as the evaluator does for
    tensors, so that a folded constant is bit for bit the run-time value: Python's
    floored division, and for ``b == 0`` IEEE's +-inf (NaN for ``0 // 0.0``)."""
    import torch  # the compiler's numbers are torch's; imported late, as only folding needs it

    t = torch.tensor([a, b], dtype=torch.float64)
    return torch.div(t[0], t[1], rounding_mode="floor").item()


def float_remainder(a, b):
    """Floored float ``a % b`` on tensors, exact as in IEEE (Python's float ``%``; NaN
    for ``b == 0`` or infinite ``a``), the same in every element.

    ``torch.remainder`` alone is not: its vectorised CPU path returns NaN where the
    quotient ``a / b`` overflows (``24.0 % 1e-310``) while its scalar tail returns the
    exact value, so a mask's answer would depend on the token's position in the
    tensor. Such lanes are first reduced exactly by a power-of-two multiple of ``b``
    (``fmod(a, b * 2**k)`` differs from ``a`` by an integer multiple of ``b`` and keeps
    its sign), which leaves a quotient below ``2**1000``. Narrower floats are computed in float64
    (their quotients cannot overflow there) and rounded once to their promoted dtype."""
    import torch

    dtype = torch.promote_types(a.dtype, b.dtype)
    if dtype != torch.float64:
        return float_remainder(a.double(), b.double()).to(dtype)

    def overflows(x):  # (b == 0: NaN either way, no reduction needed)
        return torch.isinf(x / b) & torch.isfinite(x) & (b != 0)

    if not bool(overflows(a).any()):  # the common case: one pass
        return torch.remainder(a, b)
    r = a
    for big in (b * 2.0**1000 * 2.0**1000, b * 2.0**1000):  # the first is finite for small |b| only
        step = overflows(r) & torch.isfinite(big)
        if bool(step.any()):
            r = torch.where(step, torch.fmod(r, torch.where(step, big, torch.ones_like(big))), r)
    return torch.remainder(r, b)


def float_mod(a: float, b: float) -> float:
    """``a % b`` for floats, exactly as the evaluator computes it for tensors."""
    import torch

    t = torch.tensor([a, b], dtype=torch.float64)
    return float_remainder(t[0], t[1]).item()


class FloorDiv(sympy.Function):
    """``a // b``, floored as in Python (also for negative operands and floats).

    Numbers fold exactly as the evaluator computes them. A divisor that becomes
    0 only once sizes are substituted (a constant 0 is a checker error) folds
    for ints to the evaluator's total rule ``x // 0 == 0``; for floats the
    node stays, and the evaluator gives IEEE's +-inf or NaN."""

    @classmethod
    def eval(cls, a, b):
        if _numbers(a, b):
            if _ints(a, b):
                return sympy.Integer(0 if b == 0 else int(a) // int(b))
            return None if b.is_zero else sympy.Float(float_floordiv(_py(a), _py(b)))
        if b.is_zero:
            return sympy.Integer(0) if isinstance(b, sympy.Integer) and a.is_integer else None
        if b == 1 and a.is_integer:
            return a
        if a == 0 and tree_size(b) <= SIMPLIFY_LIMIT and b.is_nonzero:  # sympy's is_nonzero walks the tree
            return sympy.Integer(0)
        return None

    def _eval_is_integer(self):
        a, b = self.args
        if a.is_integer and b.is_integer:
            return True
        return None

    def _eval_Abs(self):
        return _unevaluated_abs(self)


class Mod(sympy.Mod):
    """``a % b``, floored as in Python. Numbers fold exactly as the evaluator
    computes them (sympy's own Float modulo is not Python's: it gives
    ``1.0 % 0.1 == 0``). A divisor that becomes 0 only once sizes are
    substituted folds for ints to the evaluator's total rule ``x % 0 == x``;
    for floats the node stays (the evaluator gives NaN).

    Only numbers and trivial cases are folded: sympy's symbolic Mod rewriting
    is wrong in places (sympy 1.14: ``Mod(2*Mod(x, -6), 8)`` becomes
    ``2*Mod(Mod(x, -6)**2, 4)``)."""

    @classmethod
    def eval(cls, p, q):
        if p.is_Number and q.is_Number:
            if _ints(p, q):
                return p if q == 0 else sympy.Integer(int(p) % int(q))
            return None if q.is_zero else sympy.Float(float_mod(_py(p), _py(q)))
        if q.is_zero:
            return p if isinstance(q, sympy.Integer) and p.is_integer else None
        # the cheap structural tests first: asking a deep shared DAG is_integer walks its expanded tree
        if (q in (1, -1) or p in (q, -q) or (tree_size(p) <= SIMPLIFY_LIMIT and p.is_zero)) and p.is_integer:
            return sympy.Integer(0)  # also right when q later becomes 0 (then p is 0)
        return None

    def _eval_is_integer(self):
        # sympy's Mod asks for a nonzero divisor; the total rule x % 0 == x keeps ints ints
        p, q = self.args
        if p.is_integer and q.is_integer:
            return True
        return None

    def _eval_Abs(self):
        return _unevaluated_abs(self)


class _NoCollapse:
    """sympy's Min/Max without their argument collapsing, which is wrong for nested
    Min/Max (sympy 1.14: ``Min(Max(1, Min(x, Max(y, Min(1/2, z)))), 6)`` becomes 6).
    Pairwise comparison of the arguments (``_find_localzeros``) still simplifies."""

    def __new__(cls, *args, **assumptions):
        evaluate = assumptions.pop("evaluate", True)
        args = [sympy.sympify(a) for a in args]
        if evaluate:
            try:
                args = frozenset(cls._new_args_filter(args))
            except ShortCircuit:
                return cls.zero
            args = cls._find_localzeros(args, **assumptions)
        args = frozenset(args)
        if not args:
            return cls.identity
        if len(args) == 1:
            return next(iter(args))
        # sympy orders the arguments by their expanded node count, which is
        # exponential in nested lets; large arguments are ordered by a digest.
        if all(tree_size(a) <= SIMPLIFY_LIMIT for a in args):
            ordered_args = list(sympy.ordered(args))
        else:
            ordered_args = sorted(args, key=digest)
        obj = sympy.Expr.__new__(cls, *ordered_args, **assumptions)
        obj._argset = args
        return obj

    @classmethod
    def _collapse_arguments(cls, args, **assumptions):
        return args

    @classmethod
    def _is_connected(cls, x, y):  # sympy answers with its own classes; map them to ours
        if x == y:
            return True
        if tree_size(x) + tree_size(y) > SIMPLIFY_LIMIT:
            return False  # sympy's comparison (factor_terms) walks the expanded tree
        con = super()._is_connected(x, y)
        return Max if con is sympy.Max else Min if con is sympy.Min else con


class _Branch(ExprCondPair):
    """One (value, condition) pair of ``Piecewise``, kept as given (sympy's pair
    folds a Piecewise inside its condition, also when sympy rebuilds it)."""

    def __new__(cls, expr, cond):
        return sympy.Tuple.__new__(cls, sympy.sympify(expr), sympy.sympify(cond))


class Piecewise(sympy.Piecewise):
    """``if c then a else b``: sympy's Piecewise, built without sympy's folding.

    sympy flattens a Piecewise inside a condition (``ExprCondPair`` calls
    ``piecewise_fold``, then ``simplify_logic``), which is exponential in the
    nesting: eight nested lets ``if a > 0 then a else -a`` took minutes. Here
    the branches stay shared sub-expressions (the IR is a DAG, linear in the
    source); only constant conditions are folded."""

    def __new__(cls, *args, **options):
        options.pop("evaluate", None)
        pairs = []
        for pair in args:
            expr, cond = (sympy.sympify(x) for x in getattr(pair, "args", pair))
            if cond is sympy.false:
                continue
            pairs.append(_Branch(expr, cond))
            if cond is sympy.true:
                break
        if not pairs:
            return sympy.nan  # no branch applies (sympy's rule)
        if pairs[0].cond is sympy.true:
            return pairs[0].expr
        if len(pairs) > 1 and pairs[-1].cond is sympy.true and all(p.expr == pairs[-1].expr for p in pairs):
            return pairs[-1].expr  # both branches alike: `if c then a else a`
        return sympy.Basic.__new__(cls, *pairs, **options)

    @classmethod
    def eval(cls, *_args):
        return None

    def _eval_Abs(self):
        return _unevaluated_abs(self)


class Min(_NoCollapse, sympy.Min):
    """``min``: sympy's Min, minus the wrong collapsing (see ``_NoCollapse``)."""

    def _eval_Abs(self):
        return _unevaluated_abs(self)


class Max(_NoCollapse, sympy.Max):
    """``max``: sympy's Max, minus the wrong collapsing (see ``_NoCollapse``)."""

    def _eval_Abs(self):
        return _unevaluated_abs(self)


def _lattice(base: type, args) -> sympy.Basic:
    """``base(*args)`` (sympy's And or Or) for large shared arguments: sympy orders
    the arguments by their expanded node count and compares every pair of
    relations, both exponential in nested lets. Large arguments are only
    flattened, and ordered by a digest (canonical, as sympy's order is). The
    node is a plain sympy And/Or, so every pass reads it as usual."""
    args = [sympy.sympify(a) for a in args]
    if all(tree_size(a) <= SIMPLIFY_LIMIT for a in args):
        return base(*args)
    flat = []
    for a in args:
        if a == base.zero:
            return base.zero
        if a != base.identity:
            flat.extend(a.args if isinstance(a, base) else (a,))
    unique = frozenset(flat)
    if len(unique) <= 1:
        return next(iter(unique)) if unique else base.identity
    obj = sympy.Basic.__new__(base, *sorted(unique, key=digest))
    obj._argset = unique
    return obj


def rebuild(node: sympy.Basic, args) -> sympy.Basic:
    """``node`` with new arguments, evaluated as the checker builds it: large
    relations and and/or stay unevaluated (see ``_lattice``)."""
    if isinstance(node, sympy.And | sympy.Or):
        return _lattice(type(node), args)
    if isinstance(node, sympy.core.relational.Relational) and not all(a.is_Number for a in args):
        small = sum(tree_size(a) for a in args) <= SIMPLIFY_LIMIT
        return node.func(*args, evaluate=small)
    return node.func(*args)


def substitute(expr: sympy.Basic, mapping: dict) -> sympy.Basic:
    """``expr.subs(mapping)`` for symbols -> values, each shared sub-expression
    rebuilt once (sympy's subs walks the expanded tree: exponential in nested lets)."""
    memo: dict[int, sympy.Basic] = {}
    mapping = {sympy.sympify(k): sympy.sympify(v) for k, v in mapping.items()}
    stack = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        key = id(node)
        if key in memo:
            continue
        if node in mapping:
            memo[key] = mapping[node]
        elif not node.args or not (node.free_symbols & mapping.keys() if tree_size(node) <= SIMPLIFY_LIMIT else True):
            memo[key] = node
        elif ready:
            args = [memo[id(a)] for a in node.args]
            changed = any(new is not old for new, old in zip(args, node.args, strict=True))
            memo[key] = rebuild(node, args) if changed else node
        else:
            stack.append((node, True))
            stack.extend((a, False) for a in node.args if id(a) not in memo)
    return memo[id(expr)]


def logic_and(*args) -> sympy.Basic:
    """``a and b and ...`` (see ``_lattice``)."""
    return _lattice(sympy.And, args)


def logic_or(*args) -> sympy.Basic:
    """``a or b or ...`` (see ``_lattice``)."""
    return _lattice(sympy.Or, args)


class Abs(sympy.Abs):
    """``abs``: sympy's Abs folding numbers only (see ``_unevaluated_abs``)."""

    @classmethod
    def eval(cls, arg):
        if arg.is_Number:
            return abs(arg)
        if isinstance(arg, sympy.Abs):
            return arg
        return None

    def _eval_Abs(self):
        return self


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


def _ieee_function(name: str, fold, doc: str, derivative):
    """A one-argument real function as IEEE computes it, folded for numbers only (``fold``: float ->
    sympy number); printed as ``name(x)``. sympy's own sqrt and log rewrite a negative argument with
    ``I`` (``sqrt(-c * x)`` as ``I * sqrt(c * x)``, ``log(-x)`` as ``log(x) + I * pi``), which no
    evaluator takes and which cannot be compared. ``derivative(f, x)``: f'(x) as an expression (what
    torch's autograd computes), so that a bias through it differentiates on every backend."""

    def eval(cls, x):  # noqa: ARG001
        return fold(float(x)) if x.is_Number else None

    def _sympystr(self, printer):
        return f"{name.lower()}({printer._print(self.args[0])})"

    def fdiff(self, argindex=1):  # noqa: ARG001
        return derivative(self, self.args[0])

    return type(name, (sympy.Function,), {"nargs": 1, "eval": classmethod(eval), "_sympystr": _sympystr,
                                          "fdiff": fdiff, "__doc__": doc, "__module__": __name__})


Sqrt = _ieee_function("Sqrt", lambda v: sympy.Float(math.sqrt(v)) if v >= 0 else sympy.nan,
                      "``sqrt(x)``: NaN below 0.", lambda f, x: 1 / (2 * f))
Log = _ieee_function("Log", lambda v: sympy.Float(math.log(v)) if v > 0 else (-sympy.oo if v == 0 else sympy.nan),
                     "``log(x)``: NaN below 0, -inf at 0.", lambda f, x: 1 / x)


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
