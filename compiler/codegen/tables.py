"""Exact tables of mask terms over grid coordinates (``tabulate``).

A term of grid coordinates alone (radial's frame distance, its ``bit_length``, float band and
split test) takes few distinct values: a table of them, computed once by the reference
evaluator, replaces the term by a lookup per token pair (as the radial-attention code tabulates
its mask by frame distance). The FlexAttention lowering and the CPU executor read such tables as
they read call-time inputs.
"""

from __future__ import annotations

import math

import sympy
import torch
from sympy.functions.elementary.piecewise import ExprCondPair

from ...core import ir
from ...core import symbols as S
from ..analysis import evaluate as E
from .triton.exprs import abs_bound, int_bound_rule, int_float_sides

#: Entries a mask table may hold (``tabulate``): 64K, e.g. every pair of 256 rows.
TABLE_ENTRIES = 1 << 16
#: Operations a sub-expression needs before a table lookup replaces it (``tabulate``).
TABLE_MIN_OPS = 4
#: Table names, read as inputs are: ``#`` starts a comment in the language, so no input is named so.
TABLE_PREFIX = "#table"


def tabulate(mask: sympy.Basic, pat: ir.PatternIR, bound: E.Bound) -> tuple[sympy.Basic, dict]:
    """``mask`` with each largest sub-expression of grid coordinates alone (no ``q``/``k``, head
    or input) whose coordinates take at most ``TABLE_ENTRIES`` combinations replaced by a lookup
    in a table of its values, and the tables (name -> tensor, one dimension per coordinate). The
    values come from the reference evaluator, so the lookup is exact: radial's frame terms
    (``bit_length``, the float band, the split test) become two lookups per token pair, as the
    radial-attention code tabulates them by frame distance. Tables are read as inputs are."""
    extents = {}
    for role, layout in (("q", pat.queries), ("k", pat.keys)):
        if layout.kind == "grid":
            for axis, size in layout.axes:
                extents[S.coord(role, axis)] = int(size.subs(bound.subs))
    tables: dict = {}
    memo: dict = {}
    ranges = {c: L - 1 for c, L in extents.items()} | {S.Q: bound.n - 1, S.K: bound.nk - 1}
    free = S.FreeSymbols()
    reads: dict[int, bool] = {}  # node -> whether it reads an input (memoised: the DAG, not the tree)

    def reads_input(node) -> bool:
        if id(node) not in reads:
            reads[id(node)] = bool(S.input_name(getattr(node, "func", None))) or any(reads_input(a) for a in node.args)
        return reads[id(node)]

    ops: dict[int, int] = {}

    def operations(node) -> int:
        """Operations of ``node`` as a tree (a function call such as a NATTEN window counts one), at
        most ``TABLE_MIN_OPS``: memoised, so linear in the DAG (sympy's count_ops is not)."""
        if id(node) not in ops:
            own = 0 if node.is_Atom or not node.args else 1
            ops[id(node)] = min(TABLE_MIN_OPS, own + sum(operations(a) for a in node.args))
        return ops[id(node)]

    def tabulable(node) -> bool:  # (a Piecewise branch is a pair, not a value: never itself)
        syms = free(node)
        return (bool(syms) and syms <= extents.keys() and not isinstance(node, ExprCondPair)
                and math.prod(extents[c] for c in syms) <= TABLE_ENTRIES and not reads_input(node))

    def table_of(node, int_bound=None) -> sympy.Basic:
        coords = sorted(free(node), key=lambda sym: sym.name)
        shape = [extents[c] for c in coords]
        env: dict = {sym: int(v) for sym, v in bound.subs.items()}
        for i, c in enumerate(coords):
            env[c] = torch.arange(shape[i]).view([-1 if j == i else 1 for j in range(len(coords))])
        values = E.as_tensor(E.Evaluator(env, {}, set(), None)(node), None)
        boolean = isinstance(node, sympy.logic.boolalg.Boolean)
        if int_bound is not None:  # triton_exprs.int_bound_rule, once per entry
            big, ceil, nan_high = int_bound
            rounded = torch.ceil(values) if ceil else torch.floor(values)
            values = torch.where(torch.isnan(values), float(big if nan_high else -big), rounded.clamp(-big, big))
        dtype = torch.int64 if boolean or node.is_integer or int_bound is not None else torch.float64
        name = f"{TABLE_PREFIX}{len(tables)}"
        tables[name] = torch.broadcast_to(values.to(dtype), shape).contiguous()
        read = S.input_function(name, "int" if dtype == torch.int64 else "float")(*coords)
        return sympy.Eq(read, 1) if boolean else read

    def int_comparison(node) -> sympy.Basic | None:
        """``n <= x`` (an int per pair against a tabulable float) as ``n <= table`` of int bounds."""
        for n, x, op in int_float_sides(node):
            if not tabulable(n) and free(n) and tabulable(x):
                big = abs_bound(n, ranges, math.inf) + 1
                if big < 2**53:  # exact in float64
                    bound_read = table_of(x, (int(big), *int_bound_rule(op)))
                    return sympy.core.relational.Relational(walk(n), bound_read, op, evaluate=False)
        return None

    def walk(node):
        if node.is_Atom or not node.args:
            return node
        if id(node) in memo:
            return memo[id(node)]
        if tabulable(node) and operations(node) >= TABLE_MIN_OPS:
            out = table_of(node)
        else:
            out = int_comparison(node)
            if out is None:
                args = [walk(a) for a in node.args]
                out = node if all(a is b for a, b in zip(args, node.args, strict=True)) else S.rebuild(node, args)
        memo[id(node)] = out
        return out

    return walk(mask), tables
