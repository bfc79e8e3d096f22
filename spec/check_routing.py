"""Routing: a pattern's ``route`` clause (topk, blocks per axis, the routing score
and ``keep``) checked and lowered to ``ir.Route``."""

from __future__ import annotations

import sympy

from ..core import ir
from ..core.errors import did_you_mean
from . import ast
from .check_types import BOOL, INT


class RoutingChecks:
    """Checker methods for the route clause."""

    def _route(self, c: ast.Route) -> ir.Route:
        topk = self.expect(c.topk, INT, "topk").expr
        self._no_positions(topk, c.topk.pos, "topk", allow_head=False)
        if topk.is_number and topk < 1:
            raise self.error(f"topk must be at least 1, got {topk}", c.topk.pos)
        keys = self.frame.keys
        if keys.kind == "seq":
            if len(c.blocks) != 1 or c.blocks[0].axis is not None:
                raise self.error("'tokens seq' has no axes: write blocks(SIZE)", c.blocks[0].pos)
            blocks = (self._block_size(c.blocks[0].size),)
        else:
            if c.blocks[0].axis is None:
                raise self.error(
                    "a grid layout needs per-axis blocks",
                    c.blocks[0].pos,
                    hint="write blocks(" + ", ".join(f"{a}: SIZE" for a in keys.axis_names) + ")",
                )
            given: dict[str, sympy.Expr] = {}
            for b in c.blocks:
                if b.axis not in keys.axis_names:
                    raise self.error(f"unknown axis '{b.axis}'", b.pos, hint=did_you_mean(b.axis, keys.axis_names))
                if b.axis in given:
                    raise self.error(f"axis '{b.axis}' is given twice", b.pos)
                given[b.axis] = self._block_size(b.size)
            blocks = tuple(given.get(a, sympy.Integer(1)) for a in keys.axis_names)
        left, right = c.left, c.right
        if left.arg != "q" or left.func not in (None, "mean"):
            raise self.error("the routing score's left side must be 'q' or 'mean(q)'", left.pos)
        if right.arg != "k" or right.func != "mean":
            raise self.error("the routing score's right side must be 'mean(k)'", right.pos)
        score = "token" if left.func is None else "block"
        if score == "block" and self.frame.queries != keys:
            raise self.error("'mean(q)' needs the same layout for queries and keys", left.pos)
        keep = None
        if c.keep is not None:
            keep = self.expect(c.keep, BOOL, "keep").expr
        return ir.Route(topk, blocks, score, keep, c.shared)

    def _block_size(self, node: ast.Expr) -> sympy.Expr:
        size = self.expect(node, INT, "a block size").expr
        self._no_positions(size, node.pos, "a block size", allow_head=False)
        if size.is_number and size < 1:
            raise self.error(f"a block size must be at least 1, got {size}", node.pos)
        return size
