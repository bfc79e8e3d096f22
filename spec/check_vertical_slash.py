"""Vertical-slash routing (MInference): ``route topk(V) columns and topk(S) diagonals by last(L)``
with an optional ``keep columns(EXPR) diagonals(EXPR)``, checked and lowered into the mask.

The selection is made once per call from q and k (``runtime.plan.vertical_slash``) into two derived
int inputs: a column flag ``[heads, n]`` read at ``[h, k]`` and a diagonal flag ``[heads, 2n - 1]``
read at ``[h, q - k + n - 1]`` (the offset shifted to be an index at every pair). The pattern's mask
becomes ``MASK and (col[h, k] == 1 or diag[h, q - k + n - 1] == 1)``: an ordinary mask over call-time
inputs, which every backend classifies (per-tile min/max of the flags over the tile's key range and
offset range: a tile crossed by no selected column or diagonal is EMPTY) and runs unchanged."""

from __future__ import annotations

import sympy

from ..core import ir
from ..core import symbols as S
from . import ast
from .check_types import BOOL, INT

#: The names of the two derived inputs (a pattern has at most one route clause).
COLUMNS_INPUT = "__vs_columns"
DIAGONALS_INPUT = "__vs_diagonals"


class VerticalSlashChecks:
    """Checker methods for the vertical-slash route clause."""

    def _vertical_slash(self, c: ast.VerticalSlashRoute, mask: sympy.Basic) -> sympy.Basic:
        """``mask`` with the vertical-slash selection ANDed in; declares the two derived inputs."""
        frame = self.frame
        if frame.queries != frame.keys or frame.queries.kind != "seq" or frame.queries.segments:
            raise self.error("vertical-slash routing needs self-attention over one sequence ('tokens seq')",
                             c.pos, hint="declare 'tokens seq'")
        if not self._implies_causal(mask):
            raise self.error("vertical-slash routing needs a causal mask (its scores are those of the last "
                             "queries under causality)", c.pos, hint="add 'causal and ...' to the mask")
        sizes = [self._vs_count(node, what) for node, what in
                 ((c.vertical, "the column count (topk)"), (c.slash, "the diagonal count (topk)"),
                  (c.last, "last(L)"))]
        keep_columns = keep_diagonals = None
        if c.keep_columns is not None:
            keep_columns = self.expect(c.keep_columns, BOOL, "keep columns").expr
            self._vs_keep_reads(keep_columns, c.keep_columns.pos, "keep columns")
            if S.Q in keep_columns.free_symbols:
                raise self.error("keep columns(...) is a condition on the key k (and the head h), not on q",
                                 c.keep_columns.pos, hint="e.g. keep columns(k < 30)")
        if c.keep_diagonals is not None:
            expr = self.expect(c.keep_diagonals, BOOL, "keep diagonals").expr
            self._vs_keep_reads(expr, c.keep_diagonals.pos, "keep diagonals")
            offset = sympy.Symbol("vs_offset", integer=True)
            by_offset = expr.subs(S.Q, S.K + offset)
            if S.K in sympy.simplify(by_offset).free_symbols:
                raise self.error("keep diagonals(...) is a condition on the offset q - k (and the head h)",
                                 c.keep_diagonals.pos, hint="e.g. keep diagonals(q - k < 100)")
            keep_diagonals = by_offset.subs(S.K, 0).subs(offset, S.Q)
        rule = ir.VerticalSlash(*sizes, keep_columns, keep_diagonals)
        n = frame.n
        columns = ir.InputDecl(COLUMNS_INPUT, INT, (S.HEADS, n), ("heads", "n"),
                               ("vertical_slash", "columns", rule))
        diagonals = ir.InputDecl(DIAGONALS_INPUT, INT, (S.HEADS, 2 * n - 1), ("heads", "2n - 1"),
                                 ("vertical_slash", "diagonals", rule))
        for decl in (columns, diagonals):
            if decl.name in self.inputs:
                raise self.error(f"the input name '{decl.name}' is taken: the vertical-slash route needs it",
                                 self.input_pos.get(decl.name, c.pos))
            self.inputs[decl.name] = decl
        q, k = frame.q_flat, frame.k_flat
        chosen = sympy.Or(sympy.Eq(columns.function(S.H, k), 1),
                          sympy.Eq(diagonals.function(S.H, q - k + n - 1), 1))
        return sympy.And(mask, chosen)

    def _vs_count(self, node: ast.Expr, what: str) -> sympy.Expr:
        """A count of the rule: an int constant or parameter, at least 1."""
        value = self._positive_int(node, what)
        if not value.is_number and (self.strict or any(s in (S.N, S.NK, S.HEADS, S.DK) for s in value.free_symbols)):
            raise self.error(f"{what} must be an int constant or a parameter", node.pos)
        return value

    def _vs_keep_reads(self, expr: sympy.Basic, pos, what: str) -> None:
        if any(S.input_name(f.func) for f in expr.atoms(sympy.Function)):
            raise self.error(f"{what} must not read inputs", pos)
        if any(str(s).startswith(("q_", "k_")) for s in expr.free_symbols):
            raise self.error(f"{what} must not use grid coordinates", pos)
