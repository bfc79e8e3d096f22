"""Routing: a pattern's ``route`` clause (topk, blocks per axis, the routing score
and ``keep``) checked and lowered to ``ir.Route``."""

from __future__ import annotations

import dataclasses

import sympy

from ..core import ir, route_kinds
from ..core.errors import did_you_mean
from . import ast
from .check_types import BOOL, FLOAT, INT

#: The dimension ``blocks`` of an input declaration: the number of key blocks of the route it scores, known once the
#: route is checked (``RoutingChecks._given_block_scores``).
ROUTE_BLOCKS = sympy.Symbol("route_blocks", integer=True, positive=True)


class RoutingChecks:
    """Checker methods for the route clause."""

    def _route(self, c: ast.Route) -> ir.Route:
        topk = self._positive_int(c.topk, "topk")
        keys = self.frame.keys
        if c.unit == "tokens":
            return self._token_route(c, topk)
        blocks = self._route_blocks(c.blocks)
        if c.indexer is not None and c.indexer.func == "blocks":
            return self._given_block_scores(c, topk, blocks)
        left, right = c.left, c.right
        if left.arg != "q" or left.func not in (None, "mean"):
            raise self.error("the routing score's left side must be 'q' or 'mean(q)'", left.pos)
        if right.arg != "k" or right.func not in ("mean", "bound"):
            raise self.error("the routing score's right side must be 'mean(k)' or 'bound(k)'", right.pos)
        score = "token" if left.func is None else "block"
        if right.func == "bound":  # Quest: the upper bound of q . k over the block, from its keys' min and max
            if left.func is not None:
                raise self.error("bound(k) bounds a query's own dot products: score by 'q @ bound(k)'", left.pos)
            score = "bound"
        if score == "block" and self.frame.queries != keys:
            raise self.error("'mean(q)' needs the same layout for queries and keys", left.pos)
        keep = None
        if c.keep is not None:
            keep = self.expect(c.keep, BOOL, "keep").expr
        return ir.top_k_route(topk, blocks, score, keep, c.shared)

    def _route_of_kind(self, c: ast.KindRoute) -> ir.Route:
        """``route WORD(ARGS) blocks(...) | tokens [keep EXPR]``: a route of a kind registered in ``core.route_kinds``
        whose ``check`` makes its values from the arguments."""
        kind = route_kinds.KINDS.get(c.word)
        if kind is None or kind.check is None:
            general = sorted(name for name, k in route_kinds.KINDS.items() if k.check is not None)
            raise self.error(f"unknown route kind '{c.word}'", c.word_pos,
                             hint=did_you_mean(c.word, [*general, "topk", "topp", "stripes", "buckets"])
                             or "route topk(K) ..., topp(P) ..., stripes(...), "
                             "buckets(...) or a kind registered in core.route_kinds"
                             + (f" ({', '.join(general)})" if general else ""))
        ones = tuple(sympy.Integer(1) for _ in range(max(1, len(self.frame.keys.axis_names))))
        block = ones if not c.blocks else self._route_blocks(c.blocks)
        keep = self.expect(c.keep, BOOL, "keep").expr if c.keep is not None else None
        args = tuple(self.expect_number(a, f"argument {i + 1} of route {c.word}(...)").expr
                     for i, a in enumerate(c.args))
        clause = route_kinds.RouteClause(c.word, args, tuple(a.pos for a in c.args), block, keep, c.pos)
        return ir.Route(kind.name, kind.check(self, clause))

    def _route_blocks(self, given_blocks: tuple[ast.BlockAxis, ...]) -> tuple[sympy.Expr, ...]:
        """A route's ``blocks(...)``: one extent per key-layout axis (an axis not given is 1)."""
        keys = self.frame.keys
        if keys.kind == "seq":
            if len(given_blocks) != 1 or given_blocks[0].axis is not None:
                raise self.error("'tokens seq' has no axes: write blocks(SIZE)", given_blocks[0].pos)
            blocks = (self._block_size(given_blocks[0].size),)
        else:
            if given_blocks[0].axis is None:
                raise self.error(
                    "a grid layout needs per-axis blocks",
                    given_blocks[0].pos,
                    hint="write blocks(" + ", ".join(f"{a}: SIZE" for a in keys.axis_names) + ")",
                )
            given: dict[str, sympy.Expr] = {}
            for b in given_blocks:
                if b.axis not in keys.axis_names:
                    raise self.error(f"unknown axis '{b.axis}'", b.pos, hint=did_you_mean(b.axis, keys.axis_names))
                if b.axis in given:
                    raise self.error(f"axis '{b.axis}' is given twice", b.pos)
                given[b.axis] = self._block_size(b.size)
            blocks = tuple(given.get(a, sympy.Integer(1)) for a in keys.axis_names)
        return blocks

    def _token_route(self, c: ast.Route, topk: sympy.Expr) -> ir.Route:
        """``route topk(K) tokens by q @ k | QI @ KI | indexer(QI, KI, W)``: every key is its own unit (blocks of
        one key per axis); the score is the attention's own ``q . k``, an indexer's ``QI . KI`` or DeepSeek's
        lightning indexer."""
        ones = tuple(sympy.Integer(1) for _ in range(max(1, len(self.frame.keys.axis_names))))  # seq: (1,)
        if c.indexer is not None:
            keep = self.expect(c.keep, BOOL, "keep").expr if c.keep is not None else None
            if c.indexer.func == "key":  # `by NAME`: the score of key k for every query of head h is NAME[h, k]
                return ir.top_k_route(topk, ones, "key", keep, c.shared, (self._key_scores(c.indexer),))
            if c.shared:
                raise self.error("an indexer(...) score is one per query for every head already: 'shared' adds "
                                 "nothing", c.pos)
            return ir.top_k_route(topk, ones, "indexer", keep, False, self._lightning_indexer(c.indexer))
        left, right = c.left, c.right
        for side in (left, right):
            if side.func is not None:
                raise self.error(f"a token route scores single keys: '{side.func}(...)' is not taken here",
                                 side.pos, hint="route topk(K) tokens by q @ k, or by QI @ KI (indexer inputs)")
        indexer = None
        if (left.arg, right.arg) != ("q", "k"):
            if "q" in (left.arg, right.arg) or "k" in (left.arg, right.arg):
                bad = left if left.arg in ("q", "k") else right
                raise self.error("a token route scores by 'q @ k' or by two indexer inputs, not a mix",
                                 bad.pos, hint="route topk(K) tokens by qi @ ki")
            self._indexer_input(left, "n")
            self._indexer_input(right, "nk")
            if self.inputs[left.arg].dims[2] != self.inputs[right.arg].dims[2]:
                raise self.error(f"the indexer inputs '{left.arg}' and '{right.arg}' have different last "
                                 "dimensions", right.pos, hint="declare both [heads, n | nk, DI] with one DI")
            indexer = (left.arg, right.arg)
        keep = self.expect(c.keep, BOOL, "keep").expr if c.keep is not None else None
        return ir.top_k_route(topk, ones, "token", keep, c.shared, indexer)

    def _given_block_scores(self, c: ast.Route, topk: sympy.Expr, blocks: tuple) -> ir.Route:
        """``route topk(K) blocks(B) by NAME``: the score of each key block for each query given at call time in an
        input declared ``float[heads, n, blocks]`` (``blocks``: ceil(nk / B), this route's key blocks), e.g. a
        SeerAttention gate's block scores repeated over each query block's rows. Keys of ``tokens seq`` only."""
        (name,) = c.indexer.names
        decl = self.inputs.get(name)
        shape = "float[heads, n, blocks]"
        if decl is None:
            raise self.error(f"unknown name '{name}' in a block route's score", c.indexer.pos,
                             hint=did_you_mean(name, list(self.inputs)) or f"declare 'input {name}: {shape}' (block "
                             "scores per query), or score by 'q @ mean(k)'")
        if decl.dtype != FLOAT or decl.dim_names != ("heads", "n", "blocks"):
            raise self.error(f"block scores must be declared {shape} (blocks: the route's key blocks), got "
                             f"{decl.dtype}[{', '.join(decl.dim_names)}]", c.indexer.pos)
        if self.frame.keys.kind != "seq" or self.frame.queries != self.frame.keys:
            raise self.error("block scores given at call time need 'tokens seq' (self-attention over a sequence)",
                             c.indexer.pos)
        nblocks = -sympy.floor(-self.frame.nk / blocks[0])
        self.inputs[name] = dataclasses.replace(decl, dims=tuple(d.subs(ROUTE_BLOCKS, nblocks) for d in decl.dims))
        keep = self.expect(c.keep, BOOL, "keep").expr if c.keep is not None else None
        return ir.top_k_route(topk, blocks, "token", keep, c.shared, scores=name)

    def _key_scores(self, score: ast.IndexerScore) -> str:
        """``by NAME``: an input declared ``float[heads, nk]``, the score of every key per head (DMA's importance)."""
        (name,) = score.names
        decl = self.inputs.get(name)
        if decl is None:
            raise self.error(f"unknown name '{name}' in a token route's score", score.pos,
                             hint=did_you_mean(name, list(self.inputs))
                             or f"score by 'q @ k', or declare 'input {name}: float[heads, nk]' (a score per key)")
        if decl.dtype != FLOAT or decl.dim_names != ("heads", "nk"):
            raise self.error(f"a score per key must be declared float[heads, nk], got "
                             f"{decl.dtype}[{', '.join(decl.dim_names)}]", score.pos)
        return name

    def _lightning_indexer(self, score: ast.IndexerScore) -> tuple[str, str, str]:
        """``indexer(QI, KI, W)``: inputs ``QI: float[n, J, DI]``, ``KI: float[nk, DI]`` and ``W: float[n, J]``
        (J indexer heads of DI channels, shared by every attention head), the same J and DI in all three."""
        want = {0: ("n", 3), 1: ("nk", 2), 2: ("n", 2)}
        shapes = ("float[n, J, DI]", "float[nk, DI]", "float[n, J]")
        decls = []
        for i, name in enumerate(score.names):
            decl = self.inputs.get(name)
            if decl is None:
                raise self.error(f"unknown name '{name}' in indexer(...)", score.pos,
                                 hint=did_you_mean(name, list(self.inputs)) or f"declare 'input {name}: {shapes[i]}'")
            tokens, rank = want[i]
            if decl.dtype != FLOAT or len(decl.dims) != rank or decl.dim_names[0] != tokens:
                raise self.error(f"indexer(QI, KI, W): '{name}' must be declared {shapes[i]}, got "
                                 f"{decl.dtype}[{', '.join(decl.dim_names)}]", score.pos)
            decls.append(decl)
        qi, ki, w = decls
        if sympy.simplify(qi.dims[2] - ki.dims[1]) != 0 or sympy.simplify(qi.dims[1] - w.dims[1]) != 0:
            raise self.error(f"indexer(QI, KI, W): '{qi.name}' [n, J, DI], '{ki.name}' [nk, DI] and '{w.name}' [n, J] "
                             "must agree on J and DI", score.pos)
        return score.names

    def _indexer_input(self, side: ast.ScoreSide, tokens: str) -> None:
        """An indexer input: declared ``float[heads, n | nk, DI]``."""
        decl = self.inputs.get(side.arg)
        want = f"float[heads, {tokens}, DI]"
        if decl is None:
            raise self.error(f"unknown name '{side.arg}' in a token route's score", side.pos,
                             hint=did_you_mean(side.arg, list(self.inputs))
                             or f"score by 'q @ k', or declare 'input {side.arg}: {want}'")
        if decl.dtype != FLOAT or len(decl.dim_names) != 3 or decl.dim_names[:2] != ("heads", tokens):
            raise self.error(f"the indexer input '{side.arg}' must be declared {want}, got "
                             f"{decl.dtype}[{', '.join(decl.dim_names)}]", side.pos)

    def _block_size(self, node: ast.Expr) -> sympy.Expr:
        return self._positive_int(node, "a block size")

    def _positive_int(self, node: ast.Expr, what: str) -> sympy.Expr:
        """An int of the sizes and parameters (no q, k or h), at least 1 where it is a number: a route's
        counts, block sizes and strides."""
        value = self.expect(node, INT, what).expr
        self._no_positions(value, node.pos, what, allow_head=False)
        if value.is_number and value < 1:
            raise self.error(f"{what} must be at least 1, got {value}", node.pos)
        return value
