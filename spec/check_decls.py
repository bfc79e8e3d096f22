"""Declarations: parameters bound to their values, inputs and their dimensions,
``let`` definitions (no name taken twice, no cycles) and the one-clause-per-keyword rule."""

from __future__ import annotations

import math

import networkx as nx
import sympy

from ..core import ir
from ..core import symbols as S
from ..core.errors import Pos, SpecError, did_you_mean
from . import ast
from .check_types import (
    BOOL,
    FIXED_NAMES,
    FLOAT,
    INT,
    Typed,
    kind_of_value,
    plain_number,
    sympy_value,
)


def _children(node: ast.Expr):
    if isinstance(node, ast.Index):
        return node.indices
    if isinstance(node, ast.Unary):
        return (node.operand,)
    if isinstance(node, ast.Binary):
        return (node.left, node.right)
    if isinstance(node, ast.Compare):
        return node.operands
    if isinstance(node, ast.IfExpr):
        return (node.cond, node.then, node.orelse)
    if isinstance(node, ast.Call):
        return node.args + tuple(k.value for k in node.kwargs)
    return ()


def names_used(node: ast.Expr) -> set[str]:
    """Every bare name an expression refers to."""
    out: set[str] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, ast.Name):
            out.add(cur.id)
        stack.extend(_children(cur))
    return out


#: What each bound of a parameter (``window >= 1``) requires, in words.
BOUND_WORDS = {">=": "at least", ">": "greater than", "<=": "at most", "<": "less than"}


def bound_violation(bound: tuple[str, int | float], value) -> str | None:
    """``"must be at least 1, got -5"`` when a parameter's value breaks its declared bound, else
    None (also for a value not known yet: a symbol)."""
    op, limit = bound
    if isinstance(value, sympy.Piecewise):  # one value per head (NAME[heads]): every head's value in bound
        for piece, _ in value.args:
            if broken := bound_violation(bound, piece):
                return broken
        return None
    if isinstance(value, sympy.Basic):
        if not value.is_number:
            return None
        value = int(value) if value.is_Integer else float(value)
    ok = {">=": value >= limit, ">": value > limit, "<=": value <= limit, "<": value < limit}[op]
    if ok:
        return None
    words = "positive" if (op, limit) == (">", 0) else f"{BOUND_WORDS[op]} {limit}"
    return f"must be {words}, got {value}"


class DeclarationChecks:
    """Checker methods for the parameters, inputs, lets and clauses of a declaration."""

    # ------------------------------------------------------------ params
    def _bind_params(self) -> None:
        seen: dict[str, ast.Param] = {}
        for p in self.decl.params:
            if p.name in seen:
                raise self.error(f"parameter '{p.name}' is declared twice", p.pos)
            if p.name in FIXED_NAMES:
                raise self.error(f"'{p.name}' is a builtin name and cannot be a parameter", p.pos)
            if p.bound is not None:
                if isinstance(p.default, bool):
                    raise self.error(f"'{p.name}' is a bool: it takes no bound", p.bound_pos)
                if p.default is not None and (broken := bound_violation(p.bound, p.default)):
                    op, limit = p.bound
                    raise self.error(f"the default of '{p.name}' {broken}", p.pos,
                                     hint=f"'{p.name}' is declared {p.name} {op} {limit}")
            seen[p.name] = p
        if self.param_exprs is None:
            for name in self.params:
                if name not in seen:
                    hint = did_you_mean(name, seen) or (
                        "parameters: " + ", ".join(seen) if seen else f"'{self.decl.name}' takes no parameters"
                    )
                    raise SpecError(f"'{self.decl.name}' has no parameter '{name}'", where=f"argument {name}", hint=hint)
        for p in self.decl.params:
            declared = None if p.default is None else kind_of_value(p.default)
            if self.param_exprs is not None and p.name in self.param_exprs:
                typed = self.param_exprs[p.name]
            elif self.param_exprs is None and p.name in self.symbolic and declared == INT:  # read at run time
                typed = Typed(INT, S.param_symbol(p.name))
            elif self.param_exprs is None and p.name in self.params:
                given = self.params[p.name]
                if p.per_head and isinstance(given, tuple | list):
                    typed = self._per_head_value(p, declared, given)
                else:
                    kind, value = self._param_value(p, declared, given, f"argument {p.name}")
                    typed = Typed(kind, sympy_value(value))
            elif p.default is not None:
                typed = Typed(declared, sympy_value(p.default))
            elif self.strict or self.param_exprs is not None:
                where = "a call of" if self.param_exprs is not None else "argument"
                raise SpecError(
                    f"parameter '{p.name}' of '{self.decl.name}' has no default and no value was given",
                    p.pos if self.param_exprs is not None else None,
                    filename=self.module.filename,
                    source=self.module.source,
                    where=f"{where} {p.name}",
                    hint=f"pass {p.name}=...",
                )
            else:  # `attnc check` of a bare parameter: an int whose value comes later
                typed = Typed(INT, S.param_symbol(p.name))
            if declared is not None and typed.type != declared:
                if not (declared == FLOAT and typed.type == INT):
                    raise self.error(f"parameter '{p.name}' is {declared}, got {typed.type}", p.pos)
                typed = Typed(FLOAT, typed.expr)
            self.env_params[p.name] = typed

    def _param_value(self, p: ast.Param, declared: str | None, given, where: str) -> tuple[str, object]:
        """A given value of ``p`` checked (a number or bool, finite, of the declared kind, in the bound):
        ``(kind, value)``; errors name ``where``."""
        value = plain_number(given)
        if isinstance(value, sympy.Basic) or not isinstance(value, bool | int | float):
            want = f"{declared} (the default of '{p.name}' is {p.default!r})" if declared is not None else "a number or bool"
            raise SpecError(f"expected {want}, got {type(value).__name__}", where=where)
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError("must be finite", where=where)
        kind = kind_of_value(value)
        if declared is not None and kind != declared and not (declared == FLOAT and kind == INT):
            raise SpecError(f"expected {declared} (the default of '{p.name}' is {p.default!r}), got {kind} {value!r}",
                            where=where)
        if declared == FLOAT:
            value, kind = float(value), FLOAT
        if p.bound is not None:
            broken = f"expected a number, got {value!r}" if kind == BOOL else bound_violation(p.bound, value)
            if broken:
                owner = self.decl.name.split(".")[0]  # a branch is checked as NAME.BRANCH
                op, limit = p.bound
                raise SpecError(broken, where=where, hint=f"'{owner}' declares {p.name} {op} {limit}")
        return kind, value

    def _per_head_value(self, p: ast.Param, declared: str | None, given) -> Typed:
        """One value per head (``NAME[heads]`` given a list): each checked as a value of ``p`` (errors name
        ``argument NAME[i]``), lowered to the expression of the head ``h`` that takes value i at head i; the
        count is kept (``head_params``) so that a call of another head count is refused."""
        if len(given) == 0:
            raise SpecError("expected one value per head, got an empty list", where=f"argument {p.name}")
        checked = [self._param_value(p, declared, v, f"argument {p.name}[{i}]") for i, v in enumerate(given)]
        kinds = {kind for kind, _ in checked}
        if BOOL in kinds:
            raise SpecError("one value per head is taken by number parameters; a bool takes one value for every "
                            "head", where=f"argument {p.name}", hint=f"a number parameter: {p.name}[heads] = 0")
        kind = FLOAT if FLOAT in kinds else kinds.pop()
        values = [sympy_value(float(v) if kind == FLOAT else v) for _, v in checked]
        self.head_params[p.name] = len(values)
        if len(set(values)) == 1:  # the same for every head: one value
            return Typed(kind, values[0])
        return Typed(kind, sympy.Piecewise(*[(v, sympy.Eq(S.H, i)) for i, v in enumerate(values[:-1])],
                                           (values[-1], True)))

    # ------------------------------------------------------------ inputs
    def _declare_inputs(self) -> None:
        for c in self.decl.clauses:
            if not isinstance(c, ast.Input):
                continue
            self._check_new_name(c.name, c.name_pos)
            if c.dtype not in (INT, FLOAT):
                raise self.error(f"input type must be 'int' or 'float', got '{c.dtype}'", c.dtype_pos)
            dims, names = [], []
            for d in c.dims:
                if isinstance(d.value, int):
                    if d.value < 1:
                        raise self.error("an input dimension must be at least 1", d.pos)
                    dims.append(sympy.Integer(d.value))
                    names.append(str(d.value))
                    continue
                dims.append(self._dim_size(d))
                names.append(d.value)
            self.inputs[c.name] = ir.InputDecl(c.name, c.dtype, tuple(dims), tuple(names))
            self.input_pos[c.name] = c.name_pos

    def _dim_size(self, d: ast.Dim) -> sympy.Expr:
        frame = self.frame
        if d.value == "heads":
            return S.HEADS
        if d.value == "dk":
            return S.DK
        if d.value == "n":
            return frame.n
        if d.value == "nk":
            return frame.nk
        if d.value in frame.sizes:
            return frame.sizes[d.value]
        if d.value in self.env_params and self.env_params[d.value].type == INT:
            return self.env_params[d.value].expr
        if d.value == "blocks":  # a block route's key blocks: resolved by the route that reads this input
            from .check_routing import ROUTE_BLOCKS

            return ROUTE_BLOCKS
        known = ["heads", "n", "nk", "dk", *frame.sizes]
        raise self.error(
            f"unknown dimension '{d.value}'",
            d.pos,
            hint=did_you_mean(d.value, known) or "dimensions: " + ", ".join(known),
        )

    def _check_new_name(self, name: str, pos: Pos) -> None:
        if name in FIXED_NAMES:
            raise self.error(f"'{name}' is a builtin name and cannot be redefined", pos)
        if name in self.env_params:
            raise self.error(f"'{name}' is already a parameter", pos)
        if name in self.inputs or name in self.env_lets:
            raise self.error(f"'{name}' is already defined", pos)
        if self.frame is not None and name in self.frame.sizes:
            if name in (*self.frame.queries.segment_names, *self.frame.keys.segment_names):
                raise self.error(f"'{name}' is already a segment size (seq({name}) in the layout)", pos,
                                 hint=f"it names the segment ('q in {name}') and its length")
            raise self.error(f"'{name}' is already an axis size", pos)

    # ------------------------------------------------------------ lets
    def _lower_lets(self) -> None:
        lets: dict[str, ast.Let] = {}
        for c in self.decl.clauses:
            if isinstance(c, ast.Let):
                self._check_new_name(c.name, c.name_pos)
                if c.name in lets:
                    raise self.error(f"'{c.name}' is already defined (line {lets[c.name].pos.line})", c.name_pos)
                lets[c.name] = c
        graph = nx.DiGraph()
        graph.add_nodes_from(lets)
        for name, let in lets.items():
            for used in names_used(let.value):
                if used in lets:
                    graph.add_edge(name, used)
        try:
            cycle = nx.find_cycle(graph)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            names = [a for a, _ in cycle] + [cycle[0][0]]
            first = min((lets[a] for a, _ in cycle), key=lambda c: (c.pos.line, c.pos.col))
            raise self.error(
                f"'{first.name}' is defined in terms of itself: " + " -> ".join(names),
                first.name_pos,
                hint="definitions may not be cyclic",
            )
        for name in reversed(list(nx.topological_sort(graph))):
            self.env_lets[name] = self.expr(lets[name].value)

    # ------------------------------------------------------------ clauses
    def _single(self, keyword: str) -> ast.Clause | None:
        found = None
        for c in self.decl.clauses:
            route = isinstance(c, ast.ROUTE_CLAUSES)
            kw = c.keyword if isinstance(c, ast.ExprClause) else ("route" if route else None)
            if kw == keyword:
                if found is not None:
                    raise self.error(f"'{keyword}' is given twice (first at line {found.pos.line})", c.pos)
                found = c
        return found
