"""Layouts: the ``tokens``/``queries``/``keys`` clauses, their axes, grids and
concatenated segments, the extents they name, and the ``Frame`` that says what q, k
and the sizes mean where a declaration is lowered."""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..core import ir
from ..core import symbols as S
from ..core.errors import Pos
from . import ast
from .check_types import FIXED_NAMES, INT, article_of


@dataclass
class Frame:
    """What q, k and the sizes mean where a declaration is lowered (its own
    layout at top level, the caller's when a pattern is called)."""

    queries: ir.Layout
    keys: ir.Layout
    sizes: dict[str, sympy.Expr]  # size names visible as values (axis extents)

    @property
    def q_flat(self) -> sympy.Expr:
        return self.queries.flat("q")

    @property
    def k_flat(self) -> sympy.Expr:
        return self.keys.flat("k")

    @property
    def n(self) -> sympy.Expr:
        return self.queries.length(S.N)

    @property
    def nk(self) -> sympy.Expr:
        if self.queries == self.keys:
            return self.n
        return self.keys.length(S.NK)


class LayoutChecks:
    """Checker methods for the layout clauses and the declaration's own frame."""

    def _layout_clauses(self) -> dict[str, ast.LayoutClause]:
        found: dict[str, ast.LayoutClause] = {}
        for c in self.decl.clauses:
            if isinstance(c, ast.LayoutClause):
                if c.role in found:
                    raise self.error(f"'{c.role}' is given twice", c.pos)
                found[c.role] = c
        if "tokens" in found and ("queries" in found or "keys" in found):
            other = found.get("queries") or found.get("keys")
            raise self.error("give either 'tokens' or 'queries' and 'keys', not both", other.pos)
        if ("queries" in found) != ("keys" in found):
            c = found.get("queries") or found.get("keys")
            raise self.error("'queries' and 'keys' must be given together", c.pos)
        for c in found.values():
            self._check_layout(c.layout)
        return found

    def _check_layout(self, layout: ast.Layout) -> None:
        """Distinct axis names, literal extents >= 1; a concatenation has at most one grid,
        distinct segment names, and no axis named like a segment."""
        axes: dict[str, ast.AxisDecl] = {}
        for a in (a for seg in layout.segments for a in seg.axes) if layout.segments else layout.axes:
            if a.name in axes:
                raise self.error(f"axis '{a.name}' is declared twice", a.pos)
            axes[a.name] = a
            if isinstance(a.size, int) and a.size < 1:
                raise self.error("an axis size must be at least 1", a.size_pos)
        grids = [seg for seg in layout.segments if seg.kind == "grid"]
        if len(grids) > 1:
            raise self.error("a concatenation has at most one grid segment", grids[1].pos,
                             hint="q.AXIS and 'q in grid' name the one grid")
        names: dict[str, Pos] = {"grid": grids[0].pos} if grids else {}
        for seg in layout.segments:
            if seg.kind != "seq":
                continue
            if isinstance(seg.size, int):
                if seg.size < 1:
                    raise self.error("a segment size must be at least 1", seg.size_pos)
                continue
            if seg.size in names:
                what = "the grid segment" if seg.size == "grid" else f"segment '{seg.size}'"
                raise self.error(f"{what} is already declared (line {names[seg.size].line}); "
                                 "segment names must differ", seg.size_pos)
            if seg.size in axes:
                raise self.error(f"segment '{seg.size}' has the name of an axis of the grid", seg.size_pos,
                                 hint="segment sizes and axes need distinct names (q in NAME, q.AXIS)")
            names[seg.size] = seg.pos

    def _extent(self, size: str | int, pos: Pos, what: str) -> sympy.Expr:
        """An axis or segment size: a literal, an int parameter, or a size name bound later."""
        if isinstance(size, int):
            return sympy.Integer(size)
        if size in self.env_params:
            typed = self.env_params[size]
            if typed.type != INT:
                raise self.error(f"{what} '{size}' must be an int parameter", pos)
            if isinstance(typed.expr, sympy.Integer) and typed.expr < 1:
                raise self.error(f"{what} '{size}' must be at least 1, got {typed.expr}", pos)
            return typed.expr
        if size in FIXED_NAMES:
            raise self.error(f"'{size}' is a builtin name and cannot be {article_of(what)}", pos)
        return S.size_symbol(size)

    def _layout(self, clause: ast.LayoutClause | None) -> ir.Layout:
        if clause is None or clause.layout.kind == "seq":
            return ir.Layout("seq")
        if clause.layout.kind == "concat":
            segments = []
            for seg in clause.layout.segments:
                if seg.kind == "seq":
                    size = self._extent(seg.size, seg.size_pos, "segment size")
                    name = seg.size if isinstance(seg.size, str) else None
                    segments.append(ir.Segment("seq", name, size))
                else:
                    axes = self._axes(seg.axes)
                    segments.append(ir.Segment("grid", "grid", sympy.Mul(*(e for _, e in axes)), axes))
            return ir.Layout("seq", segments=tuple(segments))
        return ir.Layout("grid", self._axes(clause.layout.axes))

    def _axes(self, axes: tuple[ast.AxisDecl, ...]) -> tuple[tuple[str, sympy.Expr], ...]:
        return tuple((a.name, self._extent(a.size, a.size_pos, "axis size")) for a in axes)

    def _own_frame(self, layouts: dict[str, ast.LayoutClause]) -> Frame:
        if "tokens" in layouts or not layouts:
            q = kv = self._layout(layouts.get("tokens"))
        else:
            q, kv = self._layout(layouts["queries"]), self._layout(layouts["keys"])
            if q == kv and kv.kind == "seq" and not kv.segments:  # cross attention: nk keys, independent of n
                kv = ir.Layout("seq", cross=True)
        sizes: dict[str, sympy.Expr] = {}
        for clause in layouts.values():
            for size in size_names(clause.layout):
                if size not in self.env_params:
                    sizes[size] = S.size_symbol(size)
        return Frame(q, kv, sizes)


def size_names(layout: ast.Layout) -> list[str]:
    """The size names a layout declares (axis extents and segment sizes), in order."""
    axes = [a for seg in layout.segments for a in seg.axes] if layout.segments else list(layout.axes)
    names = [a.size for a in axes if isinstance(a.size, str)]
    return names + [seg.size for seg in layout.segments if seg.kind == "seq" and isinstance(seg.size, str)]
