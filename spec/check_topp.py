"""Top-p routing: ``route topp(P) blocks(SIZE) by antidiagonal(STRIDE) [keep EXPR]`` (XAttention)
checked and lowered to ``ir.Route`` (score 'antidiagonal', ``topp`` and ``stride`` set)."""

from __future__ import annotations

import sympy

from ..core import ir
from . import ast
from .check_types import BOOL


class TopPChecks:
    """Checker methods for the top-p route clause."""

    def _route_topp(self, c: ast.RouteTopP) -> ir.Route:
        p = self.expect_number(c.p, "topp").expr
        if not p.is_number and (self.strict or p.free_symbols - set(self._unbound_params())):
            raise self.error("topp must be a constant (a number or a parameter)", c.p.pos,
                             hint="P is the share of attention mass to keep, in (0, 1]")
        if p.is_number and not (0 < p <= 1):
            raise self.error(f"topp must be in (0, 1], got {p}", c.p.pos,
                             hint="P is the share of attention mass to keep: 0.9 keeps the fewest blocks "
                                  "holding 90% of it")
        keys, queries = self.frame.keys, self.frame.queries
        if keys.kind != "seq" or queries != keys:
            what = "a grid" if "grid" in (keys.kind, queries.kind) else "different query and key layouts"
            raise self.error(f"antidiagonal scoring needs one sequence layout for queries and keys, not {what}",
                             c.pos, hint="use 'tokens seq' (the stride runs along the sequence)")
        block = self._block_size(c.block)
        stride = self._positive_int(c.stride, "the antidiagonal stride")
        if stride.is_number and block.is_number and block % stride != 0:
            raise self.error(f"the antidiagonal stride {stride} does not divide the block size {block}",
                             c.stride.pos, hint="a block holds a whole number of strides (XAttention: "
                                                "block 128, stride 8 or 16)")
        keep = None
        if c.keep is not None:
            keep = self.expect(c.keep, BOOL, "keep").expr
        return ir.Route(None, (block,), "antidiagonal", keep, False, topp=p, stride=stride)

    def _unbound_params(self) -> list[sympy.Symbol]:
        """The symbols of parameters left without a value (``attnc check`` of a pattern whose
        parameter has no default)."""
        return [t.expr for t in self.env_params.values() if isinstance(t.expr, sympy.Symbol)]
