"""Key blocks of a ``route`` clause: which block each key token belongs to.

One definition for the runtime's selection (``runtime.plan.routing``) and for the
kernels' selection words (``compiler.codegen.triton.source``, which needs the spread of block
indices within a KV tile at generation time): keys are partitioned into
flat runs of SIZE tokens (``tokens seq``) or into grid tiles, numbered
row-major over the tile grid.
"""

from __future__ import annotations

import math

import sympy
import torch

from ...core import ir, route_kinds
from ...core import symbols as S
from ...core.errors import SpecError
from . import evaluate as E
from .schedule import tile_grid, tile_tokens

#: Blocks per word of a query's selection as the kernels read it (``runtime.plan.routing.selection_words``).
WORD_BITS = 32


def block_ids(layout: ir.Layout, block: tuple[int, ...], bound: E.Bound, count: int) -> tuple[torch.Tensor, int]:
    """Block index of each of ``count`` tokens (row-major over the tiles) and the number of blocks."""
    index = torch.arange(count)
    if layout.kind == "seq":
        (size,) = block
        return index // size, -(-count // size)
    extents = [int(s.subs(bound.subs)) for _, s in layout.axes]
    ids = torch.zeros_like(index)
    total = 1
    rest = index
    coords = []
    for extent in reversed(extents):
        coords.append(rest % extent)
        rest = rest // extent
    coords.reverse()
    for c, extent, b in zip(coords, extents, block, strict=True):
        tiles = -(-extent // b)
        ids = ids * tiles + c // b
        total *= tiles
    return ids, total


def block_count(layout: ir.Layout, block: tuple) -> sympy.Expr:
    """``block_ids``' number of blocks as an expression of the sizes (the keys' ``nk`` on a sequence, the axes'
    sizes on a grid): the declared extent of a selection passed to a call (``runtime.plan.given``)."""
    if layout.kind == "seq":
        return -sympy.floor(-S.NK / block[0])
    count = sympy.Integer(1)
    for (_, extent), size in zip(layout.axes, block, strict=True):
        count *= -sympy.floor(-extent / size)
    return count


def block_sizes(route: ir.Route, bound: E.Bound) -> tuple[int, ...]:
    """The block extents of a route at bound sizes."""
    return tuple(int(b.subs(bound.subs)) for b in route.block)


def _size_argument(expr, bound: E.Bound) -> str:
    """The call argument whose shape sets the sizes ``expr`` depends on: a grid size comes from
    ``sizes``, ``nk`` from k (and ``n`` too after a KV cache), ``n`` and ``heads`` from q."""
    free = expr.free_symbols
    if free - set(S.BUILTIN_SIZES.values()):
        return "argument sizes"
    if S.NK in free or (bound.q_offset and S.N in free):
        return "argument k"
    return "argument q"


def route_sizes(pat: ir.PatternIR, bound: E.Bound) -> tuple[tuple[int, ...], int]:
    """The route's block extents and its K at this call's sizes. A constant below 1 is refused when
    loading; an expression of the sizes (``blocks(n // 64)``, ``topk(heads - 1)``) is checked here, at
    every call, with a ``SpecError`` naming the argument whose shape made it too small (a block of 0
    keys would divide by zero, a K below 1 would silently select nothing)."""
    route = pat.route
    blocks = tuple(_at_least_one("a block size", b, bound) for b in route.block)
    count = route_kinds.kind_of(route).count(route.params)
    if count is not None:
        return blocks, _at_least_one("topk", count, bound)
    # a route without a count (a threshold's): the keys' (more than any number of blocks: the simulator's model
    # then visits every block the mask reaches, an upper bound of what it keeps)
    if route.kind == route_kinds.TOPP_ANTIDIAGONAL.name:
        stride = _at_least_one("the antidiagonal stride", route.params.stride, bound)
        if blocks[0] % stride:
            expr = route.block[0] + route.params.stride
            raise SpecError(f"the antidiagonal stride {stride} does not divide the route's block size {blocks[0]}"
                            + _at(expr, bound), where=_size_argument(expr, bound),
                            hint="call with sizes where the stride divides the block")
    return blocks, bound.nk


def stripes_sizes(pat: ir.PatternIR, bound: E.Bound) -> tuple[float, int, int]:
    """``(THETA, B, G)`` of a stripes route at this call's sizes: B and G at least 1 and G a multiple of B (a group
    holds whole query blocks), checked here for sizes that depend on the call (a constant is checked when
    loading), naming the argument whose shape broke it."""
    p = pat.route.params
    theta, block, group = p.theta, p.query_block, p.group
    b, g = _at_least_one("the query block", block, bound), _at_least_one("the query group", group, bound)
    if g % b:
        raise SpecError(f"the stripes route's group of {g} queries does not hold whole blocks of {b}"
                        + _at(block + group, bound), where=_size_argument(block + group, bound),
                        hint="call with sizes where the block divides the group")
    return float(theta.subs(bound.subs)), b, g


def route_stride(pat: ir.PatternIR, bound: E.Bound) -> int:
    """The antidiagonal stride of a top-p route at this call's sizes (checked by ``route_sizes``)."""
    return int(pat.route.params.stride.subs(bound.subs))


def _at(expr, bound: E.Bound) -> str:
    at = ", ".join(f"{sym.name.removeprefix('size_')} = {bound.subs[sym]}" for sym in sorted(expr.free_symbols, key=str))
    return f" at {at}" if at else ""


def _at_least_one(what: str, expr, bound: E.Bound) -> int:
    value = int(expr.subs(bound.subs))
    if value < 1:
        raise SpecError(f"{what} of the route is {value}{_at(expr, bound)}; it must be at least 1",
                        where=_size_argument(expr, bound), hint="call with sizes where it is at least 1")
    return value


def tile_block_spread(layout: ir.Layout, block: tuple[int, ...], bound: E.Bound, extents: tuple[int, ...],
                      tile: tuple[int, ...]) -> int:
    """The largest ``max - min + 1`` of the block indices of the keys of one KV tile, over
    all tiles of ``tile`` over ``extents`` (flat 1-D tiles of a grid: ``extents`` is one entry)."""
    count = math.prod(extents)
    ids, _ = block_ids(layout, block, bound, count)
    tokens, valid = tile_tokens(extents, tile, torch.arange(math.prod(tile_grid(extents, tile))))
    kb = ids[tokens.clamp(max=count - 1)]
    hi = torch.where(valid, kb, -1).amax(-1)
    lo = torch.where(valid, kb, count).amin(-1)
    return int((hi - lo).max()) + 1
