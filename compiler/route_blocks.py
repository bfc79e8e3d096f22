"""Key blocks of a ``route`` clause: which block each key token belongs to.

One definition for the runtime's selection (``runtime.routing``) and for the
kernels' selection words (``compiler.codegen``, which needs the spread of block
indices within a KV tile at generation time): keys are partitioned into
flat runs of SIZE tokens (``tokens seq``) or into grid tiles, numbered
row-major over the tile grid.
"""

from __future__ import annotations

import math

import torch

from . import evaluate as E
from . import ir
from .schedule import tile_grid, tile_tokens

#: Blocks per word of a query's selection as the kernels read it (``runtime.routing.selection_words``).
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


def block_sizes(route: ir.Route, bound: E.Bound) -> tuple[int, ...]:
    """The block extents of a route at bound sizes."""
    return tuple(int(b.subs(bound.subs)) for b in route.block)


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
