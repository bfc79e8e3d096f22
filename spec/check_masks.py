"""A pattern's score terms: its ``mask``, ``bias``, ``softcap`` and ``decay`` clauses
checked and gathered, with its route, into the pattern's IR."""

from __future__ import annotations

import sympy

from ..core import ir
from ..core import symbols as S
from . import ast
from .check_routing import ROUTE_BLOCKS
from .check_types import BOOL, FLOAT


class PatternChecks:
    """Checker methods for the mask and score clauses of a pattern."""

    def _pattern(self) -> ir.PatternIR:
        for c in self.decl.clauses:
            if isinstance(c, ast.Update):
                raise self.error("'update' is a recurrence's clause (the delta rule)", c.pos,
                                 hint="declare it with 'recurrence NAME'")
        mask_clause = self._single("mask")
        mask = sympy.true
        if mask_clause is not None:
            mask = self.expect(mask_clause.value, BOOL, "a mask").expr
        bias = softcap = None
        bias_clause = self._single("bias")
        if bias_clause is not None:
            self.in_bias = True  # relative() is a score term: a bias may read it
            try:
                bias = self.expect_number(bias_clause.value, "a bias").expr
            finally:
                self.in_bias = False
        softcap_clause = self._single("softcap")
        if softcap_clause is not None:
            typed = self.expect_number(softcap_clause.value, "a softcap")
            self._no_positions(typed.expr, softcap_clause.value.pos, "a softcap")
            if typed.expr.is_number and not typed.expr > 0:
                raise self.error(f"softcap must be positive, got {typed.expr}", softcap_clause.value.pos)
            softcap = typed.expr
        decay = None
        decay_clause = self._single("decay")
        if decay_clause is not None:
            decay = self._input_gate(decay_clause.value, (("heads", "n"),), "a pattern's decay").name
            if not self._implies_causal(mask):
                raise self.error(
                    "'decay' (Forgetting Transformer gates) needs a causal mask",
                    decay_clause.pos,
                    hint="add 'causal and ...' to the mask",
                )
        weights_clause = self._single("weights")
        weights = self._weights(weights_clause) if weights_clause is not None else None
        scale_clause = self._single("scale")
        score_scale = self._score_scale(scale_clause) if scale_clause is not None else None
        route_clause = self._single("route")
        route = None
        if isinstance(route_clause, ast.RouteTopP):
            route = self._route_topp(route_clause)
        elif isinstance(route_clause, ast.StripesRoute):
            route = self._route_stripes(route_clause)
        elif isinstance(route_clause, ast.KindRoute):
            route = self._route_of_kind(route_clause)
        elif isinstance(route_clause, ast.VerticalSlashRoute):  # lowered into the mask (derived flags)
            mask = self._vertical_slash(route_clause, mask)
        elif route_clause is not None:
            route = self._route(route_clause)
        for d in self.inputs.values():
            if any(getattr(x, "has", None) and x.has(ROUTE_BLOCKS) for x in d.dims):
                raise self.error(f"input '{d.name}' has the dimension 'blocks', the key blocks of a route scored by it: "
                                 f"no 'route topk(K) blocks(B) by {d.name}' reads it", self.decl.name_pos)
        return ir.PatternIR(
            name=self.decl.name,
            queries=self.frame.queries,
            keys=self.frame.keys,
            mask=mask,
            bias=bias,
            softcap=softcap,
            decay=decay,
            route=route,
            inputs=tuple(self.inputs.values()),
            params=tuple((k, v.expr) for k, v in self.env_params.items()),
            windows=tuple(self.windows),
            filename=self.module.filename,
            source=self.module.source,
            head_params=tuple(self.head_params.items()),
            weights=weights,
            score_scale=score_scale,
        )

    def _score_scale(self, clause: ast.ExprClause) -> sympy.Expr:
        """``scale E``: each query's dot products times E (with the call's scale), E a number expression of the
        query's position, its head, parameters and sizes: not of k, and not of inputs."""
        typed = self.expect_number(clause.value, "a score scale")
        for sym in typed.expr.free_symbols:
            if sym == S.K or str(sym).startswith("k_"):
                raise self.error("a score scale is one number per query (and head): it must not depend on k",
                                 clause.value.pos, hint="a term of the key is a bias")
        if any(S.input_name(f.func) for f in typed.expr.atoms(sympy.Function)):
            raise self.error("a score scale must not depend on inputs in this version", clause.value.pos,
                             hint="scale q before the call")
        return typed.expr

    def _weights(self, clause: ast.ExprClause) -> ir.Weights | None:
        """``weights F(s) [** P] [/ sum]``: F one of ``ir.WEIGHT_FUNCTIONS`` of the score ``s``, P a positive
        number of parameters and sizes. ``exp(s) / sum`` is softmax, the default: None."""
        form = "weights F(s), F(s) ** P, F(s) / sum or F(s) ** P / sum, F one of " + ", ".join(ir.WEIGHT_FUNCTIONS)
        node = clause.value
        normalized = isinstance(node, ast.Binary) and node.op == "/" and isinstance(node.right, ast.Name) \
            and node.right.id == "sum"
        if normalized:
            node = node.left
        power = sympy.Integer(1)
        if isinstance(node, ast.Binary) and node.op == "**":
            typed = self.expect_number(node.right, "the power of the weights")
            self._no_positions(typed.expr, node.right.pos, "the power of the weights", allow_head=False)
            if typed.expr.is_number and not typed.expr > 0:
                raise self.error(f"the power of the weights must be positive, got {typed.expr}", node.right.pos)
            power, node = typed.expr, node.left
        if not isinstance(node, ast.Call) or node.func not in ir.WEIGHT_FUNCTIONS:
            shown = f"'{node.func}'" if isinstance(node, ast.Call) else "this"
            raise self.error(f"{shown} is not a weight function of the score", node.pos, hint=form)
        if node.kwargs or len(node.args) != 1 or not isinstance(node.args[0], ast.Name) or node.args[0].id != "s":
            raise self.error(f"{node.func}() takes the score 's' (the scaled q.k after softcap, bias and decay)",
                             node.func_pos, hint=form)
        if node.func == "exp" and power == 1 and normalized:
            return None  # softmax
        return ir.Weights(node.func, power, normalized)

    def _implies_causal(self, mask: sympy.Basic) -> bool:
        """Whether some top-level conjunct of the mask is q - k >= c with c >= 0."""
        if mask == sympy.false:  # `causal and q < 0` folds to false: no pair at all, so causal
            return True
        conjuncts = mask.args if isinstance(mask, sympy.And) else (mask,)
        diff_qk = self.frame.q_flat - self.frame.k_flat
        for c in conjuncts:
            if isinstance(c, sympy.GreaterThan | sympy.StrictGreaterThan):
                e = c.lhs - c.rhs
            elif isinstance(c, sympy.LessThan | sympy.StrictLessThan):
                e = c.rhs - c.lhs
            else:
                continue
            rest = sympy.expand(e - diff_qk)
            if rest.is_number:
                strict = isinstance(c, sympy.StrictGreaterThan | sympy.StrictLessThan)
                if (strict and rest <= 1) or (not strict and rest <= 0):
                    return True
        return False

    def _input_gate(self, node: ast.Expr, shapes: tuple[tuple[str, ...], ...], what: str) -> ir.InputDecl:
        if not isinstance(node, ast.Name) or node.id not in self.inputs:
            want = " or ".join("float[" + ", ".join(s) + "]" for s in shapes)
            raise self.error(f"{what} must name an input of shape {want}", node.pos)
        decl = self.inputs[node.id]
        if decl.dtype != FLOAT or decl.dim_names not in shapes:
            want = " or ".join("float[" + ", ".join(s) + "]" for s in shapes)
            got = f"{decl.dtype}[{', '.join(decl.dim_names)}]"
            raise self.error(f"{what} must be an input of shape {want}; '{node.id}' is {got}", node.pos)
        return decl
