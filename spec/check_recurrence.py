"""Recurrences: the clauses a ``recurrence`` may have and its decay (a per-head
expression or an input gate), lowered to ``ir.RecurrenceIR``."""

from __future__ import annotations

import sympy

from ..core import ir
from ..core import symbols as S
from ..core.errors import SpecError, did_you_mean
from ..core.recurrence_rules import RULES, UPDATE_RULES
from . import ast
from .check_types import BOOL


class RecurrenceChecks:
    """Checker methods for a recurrence declaration."""

    def _recurrence(self, layouts: dict[str, ast.LayoutClause]) -> ir.RecurrenceIR:
        for c in self.decl.clauses:
            bad = None
            if isinstance(c, ast.ExprClause) and c.keyword != "decay":
                bad = c.keyword
            elif isinstance(c, ast.ROUTE_CLAUSES):
                bad = "route"
            elif isinstance(c, ast.Update) and c.rule not in UPDATE_RULES:
                raise self.error(f"unknown update rule '{c.rule}'", c.rule_pos,
                                 hint=did_you_mean(c.rule, tuple(UPDATE_RULES))
                                 or "rules: " + ", ".join(f"{r}(rate)" for r in UPDATE_RULES))
            elif isinstance(c, ast.LayoutClause) and (c.role != "tokens" or c.layout.kind != "seq"):
                kind = " + ".join(seg.kind for seg in c.layout.segments) or c.layout.kind
                bad = f"{c.role} {kind}"
            if bad:
                raise self.error(f"'{bad}' is not allowed in a recurrence", c.pos,
                                 hint="a recurrence has a decay, lets and inputs over 'tokens seq'")
        updates = [c for c in self.decl.clauses if isinstance(c, ast.Update)]
        if len(updates) > 1:
            raise self.error(f"'update' is given twice (first at line {updates[0].pos.line})", updates[1].pos)
        rates, options, rule = (), {}, "decay"
        if updates:
            update = updates[0]
            rule = update.rule
            facts = UPDATE_RULES[rule]
            if len(update.args) != len(facts.rates):
                at = update.args[len(facts.rates)].pos if len(update.args) > len(facts.rates) else update.rule_pos
                count = {1: "one rate input", 2: "two rate inputs"}.get(len(facts.rates), f"{len(facts.rates)} rate inputs")
                raise self.error(f"'{rule}' takes {count} ({', '.join(facts.rates)}), got {len(update.args)}", at)
            rates = tuple(self._input_gate(a, (("heads", "n"),), what).name
                          for a, what in zip(update.args, facts.rates, strict=True))
            options = self._update_options(update)
        decay_clause = self._single("decay")
        if decay_clause is None and not updates:
            raise self.error(f"recurrence '{self.decl.name}' needs a 'decay' clause", self.decl.name_pos,
                             hint="or an 'update delta(beta)' clause (the delta rule, decay 0 by default)")
        if decay_clause is None:  # DeltaNet: the delta rule without a decay
            return self._recurrence_ir("head", sympy.Integer(0), rule, rates, **options)
        node = decay_clause.value
        if isinstance(node, ast.Name) and node.id in self.inputs:
            shapes = (("heads", "n"), ("heads", "n", "dk")) if RULES[rule].channel_gates else (("heads", "n"),)
            decl = self._input_gate(node, shapes, "a recurrence's decay" if RULES[rule].channel_gates
                                    else f"{RULES[rule].title}'s decay (one value per token and head)")
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
        return self._recurrence_ir(gate, decay, rule, rates, **options)

    def _update_options(self, update: ast.Update) -> dict:
        """The keyword options of ``update RULE(rate, ...)`` (``core.recurrence_rules``), each a constant bool (a
        literal or a parameter), default false: the delta rule's ``qk_l2norm``."""
        options = {}
        known = UPDATE_RULES[update.rule].options
        for kw in update.options:
            if kw.name not in known:
                raise self.error(f"'{update.rule}' has no option '{kw.name}'", kw.pos,
                                 hint=did_you_mean(kw.name, known) or ("options: " + ", ".join(known) if known
                                                                       else f"'{update.rule}' takes no options"))
            if kw.name in options:
                raise self.error(f"option '{kw.name}' is given twice", kw.pos)
            value = self.expect(kw.value, BOOL, f"option {kw.name}").expr
            if value not in (sympy.true, sympy.false):
                raise self.error(f"option {kw.name} must be a constant bool (true, false or a bool parameter)",
                                 kw.value.pos)
            options[kw.name] = value is sympy.true
        return options

    def _recurrence_ir(self, gate: str, decay, rule: str, rates: tuple[str, ...], qk_l2norm: bool = False
                       ) -> ir.RecurrenceIR:
        for name in self.head_params:
            raise SpecError("one value per head is taken by softmax patterns; a recurrence's per-head values "
                            "come from its gate inputs", where=f"argument {name}")
        return ir.RecurrenceIR(
            name=self.decl.name,
            gate=gate,
            decay=decay,
            inputs=tuple(self.inputs.values()),
            params=tuple((k, v.expr) for k, v in self.env_params.items()),
            rule=rule,
            rates=rates,
            qk_l2norm=qk_l2norm,
            filename=self.module.filename,
            source=self.module.source,
        )
