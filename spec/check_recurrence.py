"""Recurrences: the clauses a ``recurrence`` may have and its decay (a per-head
expression or an input gate), lowered to ``ir.RecurrenceIR``."""

from __future__ import annotations

import sympy

from ..core import ir
from ..core import symbols as S
from . import ast


class RecurrenceChecks:
    """Checker methods for a recurrence declaration."""

    def _recurrence(self, layouts: dict[str, ast.LayoutClause]) -> ir.RecurrenceIR:
        for c in self.decl.clauses:
            bad = None
            if isinstance(c, ast.ExprClause) and c.keyword != "decay":
                bad = c.keyword
            elif isinstance(c, ast.Route):
                bad = "route"
            elif isinstance(c, ast.LayoutClause) and (c.role != "tokens" or c.layout.kind != "seq"):
                kind = " + ".join(seg.kind for seg in c.layout.segments) or c.layout.kind
                bad = f"{c.role} {kind}"
            if bad:
                raise self.error(f"'{bad}' is not allowed in a recurrence", c.pos,
                                 hint="a recurrence has a decay, lets and inputs over 'tokens seq'")
        decay_clause = self._single("decay")
        if decay_clause is None:
            raise self.error(f"recurrence '{self.decl.name}' needs a 'decay' clause", self.decl.name_pos)
        node = decay_clause.value
        if isinstance(node, ast.Name) and node.id in self.inputs:
            decl = self._input_gate(node, (("heads", "n"), ("heads", "n", "dk")), "a recurrence's decay")
            gate = "scalar" if len(decl.dims) == 2 else "vector"
            decay: sympy.Expr | str = decl.name
        else:
            typed = self.expect_number(node, "a decay")
            free = typed.expr.free_symbols - {S.H, S.HEADS}
            if any(not str(s).startswith("param_") for s in free):
                raise self.error(
                    "a recurrence's decay may depend only on the head h and parameters",
                    node.pos,
                    hint="for a data-dependent gate declare 'input g: float[heads, n]' and write 'decay g'",
                )
            gate, decay = "head", typed.expr
        return ir.RecurrenceIR(
            name=self.decl.name,
            gate=gate,
            decay=decay,
            inputs=tuple(self.inputs.values()),
            params=tuple((k, v.expr) for k, v in self.env_params.items()),
            filename=self.module.filename,
            source=self.module.source,
        )
