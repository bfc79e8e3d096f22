"""The stripes route checked and lowered to ``ir.Route`` (kind ``stripes``, ``route_kinds.Stripes``):
``route stripes(THETA) blocks(B) groups(G) keep REGION`` (AnchorAttention). Its rule is
``runtime.plan.stripes``'; its semantics are spec/REFERENCE.md's."""

from __future__ import annotations

import sympy

from ..core import ir, route_kinds
from . import ast
from .check_types import BOOL

_FORM = "route stripes(THETA) blocks(B) groups(G) keep REGION"


class StripesChecks:
    """Checker methods for the stripes route clause."""

    def _route_stripes(self, c: ast.StripesRoute) -> ir.Route:
        queries, keys = self.frame.queries, self.frame.keys
        if keys.kind != "seq" or queries != keys:
            what = "a grid" if "grid" in (keys.kind, queries.kind) else "different query and key layouts"
            raise self.error(f"a stripes route needs one sequence layout for queries and keys, not {what}", c.pos,
                             hint="use 'tokens seq' (query blocks and key columns run along the sequence)")
        theta = self.expect_number(c.theta, "the stripes margin").expr
        if not theta.is_number and (self.strict or theta.free_symbols - set(self._unbound_params())):
            raise self.error("the stripes margin must be a constant (a number or a parameter)", c.theta.pos,
                             hint="THETA is how far below the anchor a kept column may score (AnchorAttention: 12)")
        if theta.is_number and not sympy.Float(theta).is_finite:
            raise self.error(f"the stripes margin must be finite, got {theta}", c.theta.pos)
        block = self._positive_int(c.block, "the query block")
        group = self._positive_int(c.group, "the query group")
        if block.is_number and group.is_number and group % block:
            raise self.error(f"groups({group}) does not hold whole blocks of {block} queries", c.group.pos,
                             hint="G is a multiple of B (AnchorAttention: 16 blocks of 128 queries, groups(2048))")
        if c.keep is None:
            raise self.error("a stripes route needs its anchor region: 'keep REGION'", c.pos,
                             hint=f"{_FORM}, e.g. keep k < 2048 or q // 2048 == k // 2048 (the initial keys and "
                                  "the query's own group)")
        keep = self.expect(c.keep, BOOL, "keep").expr
        ones = (sympy.Integer(1),)
        return ir.Route(route_kinds.STRIPES.name, route_kinds.Stripes(ones, keep, theta, block, group))
