"""Top-p routing checked and lowered to ``ir.Route``:

- ``route topp(P) blocks(SIZE) by antidiagonal(STRIDE) [keep EXPR]`` (XAttention): kind ``topp_antidiagonal``,
  ``route_kinds.TopPAntidiagonal`` (``runtime.plan.antidiagonal``);
- ``route topp(P) blocks(...) by minmax(q @ mean(k)) over GROUP [keep EXPR]`` (VMoBA): kind ``topp_share``,
  ``route_kinds.TopPShare`` (``runtime.plan.share``)."""

from __future__ import annotations

import sympy

from ..core import ir, route_kinds
from ..core.errors import did_you_mean
from . import ast
from .check_types import BOOL

#: The groups a min-max share route normalises and ranks its scores within (VMoBA's threshold types
#: query_head, head_global, block and overall)
SHARE_GROUPS = ("query", "head", "block", "all")


class TopPChecks:
    """Checker methods for the top-p route clause."""

    def _route_topp(self, c: ast.RouteTopP) -> ir.Route:
        p = self.expect_number(c.p, "topp").expr
        if not p.is_number and (self.strict or p.free_symbols - set(self._unbound_params())):
            raise self.error("topp must be a constant (a number or a parameter)", c.p.pos,
                             hint="P is the share to keep, in (0, 1]")
        if p.is_number and not (0 < p <= 1):
            raise self.error(f"topp must be in (0, 1], got {float(p):g}", c.p.pos,
                             hint="P is the share of the scores to keep (0.9: the blocks holding 90% of it)")
        keep = None
        if c.keep is not None:
            keep = self.expect(c.keep, BOOL, "keep").expr
        if c.minmax is not None:
            return self._route_share(c, p, keep)
        keys, queries = self.frame.keys, self.frame.queries
        if keys.kind != "seq" or queries != keys:
            what = "a grid" if "grid" in (keys.kind, queries.kind) else "different query and key layouts"
            raise self.error(f"antidiagonal scoring needs one sequence layout for queries and keys, not {what}",
                             c.pos, hint="use 'tokens seq' (the stride runs along the sequence)")
        (block,) = self._route_blocks(c.blocks)
        stride = self._positive_int(c.stride, "the antidiagonal stride")
        if stride.is_number and block.is_number and block % stride != 0:
            raise self.error(f"the antidiagonal stride {stride} does not divide the block size {block}",
                             c.stride.pos, hint="a block holds a whole number of strides (XAttention: "
                                                "block 128, stride 8 or 16)")
        return ir.Route(route_kinds.TOPP_ANTIDIAGONAL.name, route_kinds.TopPAntidiagonal((block,), keep, p, stride))

    def _route_share(self, c: ast.RouteTopP, p: sympy.Expr, keep: sympy.Basic | None) -> ir.Route:
        """``by minmax(q @ mean(k)) over GROUP``: blocks of any layout, scored per query token."""
        score = c.minmax
        left, right = score.left, score.right
        if (left.func, left.arg) != (None, "q"):
            raise self.error("a min-max share route scores each query: its left side must be 'q'", left.pos,
                             hint="route topp(P) blocks(...) by minmax(q @ mean(k)) over head")
        if (right.func, right.arg) != ("mean", "k"):
            raise self.error("a min-max share route scores a block by its mean key: its right side must be "
                             "'mean(k)'", right.pos, hint="route topp(P) blocks(...) by minmax(q @ mean(k)) over head")
        if score.group not in SHARE_GROUPS:
            raise self.error(f"unknown group '{score.group}' of a min-max share route", score.group_pos,
                             hint=did_you_mean(score.group, SHARE_GROUPS)
                             or "over query (each query's row), head (all of a head's query and block pairs), "
                                "block (all of a block's head and query pairs) or all")
        blocks = self._route_blocks(c.blocks)
        return ir.Route(route_kinds.TOPP_SHARE.name, route_kinds.TopPShare(blocks, keep, p, score.group))

    def _unbound_params(self) -> list[sympy.Symbol]:
        """The symbols of parameters left without a value (``attnc check`` of a pattern whose
        parameter has no default)."""
        return [t.expr for t in self.env_params.values() if isinstance(t.expr, sympy.Symbol)]
