"""Which ranks' keys each rank's queries need, decided at plan time from the tile classification.

The sequence is cut into chunks (``sharding``); every (query chunk, key chunk) pair is classified
with the chunk as the tile (``compiler.analysis.tiles.classify_tiles``: interval bounds, so EMPTY is proven).
A rank needs another rank's keys when any pair of their chunks is not EMPTY for any head or batch
element; the keys of the others never travel to it. The shard order (contiguous or zigzag) is the
one with the least work on the busiest rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.tiles import classify_tiles, layout_extents
from ...core import ir
from ...core.errors import SpecError
from .sharding import ShardOrder

#: Tokens per classified tile along a sequence (a chunk is classified as the union of its tiles:
#: the classifier's density sampling costs tile^2 per sampled pair, so chunks thousands of tokens wide
#: are never one tile).
SEQ_TILE = 1024
#: Tile extent along each inner axis of a grid (the outermost axis: one position per tile).
GRID_TILE = 16


def chunk_pairs(pat: ir.PatternIR, bound: E.Bound, tensors: dict, batch: int | None, chunks: int) -> torch.Tensor:
    """bool ``[chunks, chunks]``: (query chunk, key chunk) pairs with an allowed token pair (or not
    proven EMPTY). Classified on tiles inside the chunks, one outermost position (a sequence: up to
    ``SEQ_TILE`` tokens) deep, then united per chunk."""
    ext = layout_extents(pat.queries, bound, bound.n)
    if pat.queries.kind == "grid":
        tile = (1, *(min(e, GRID_TILE) for e in ext[1:]))
        per_outer = 1
        for e, t in zip(ext[1:], tile[1:], strict=True):
            per_outer *= -(-e // t)
        outer_per_chunk = ext[0] // chunks
        chunk_of = lambda i: i // per_outer // outer_per_chunk  # noqa: E731
    else:
        length = ext[0] // chunks
        t = max(1, length // -(-length // SEQ_TILE))
        while length % t:
            t -= 1
        tile = (t,)
        chunk_of = lambda i: i // (length // t)  # noqa: E731
    per_batch = [tensors] if batch is None else [
        {n: (t[b] if t.dim() > len(pat.input(n).dims) else t) for n, t in tensors.items()} for b in range(batch)]
    need = torch.zeros(chunks, chunks, dtype=torch.bool)
    for inputs in per_batch:
        # EMPTY is proven by interval bounds; PARTIAL pairs need no token-by-token refinement here
        sched = classify_tiles(pat, bound, tile, tile, {n: v.cpu() for n, v in inputs.items()},
                               refine_budget=0, witness=False)
        _, qi, ki, _ = sched.pairs()
        need[chunk_of(qi), chunk_of(ki)] = True
    return need


@dataclass(frozen=True)
class PairPlan:
    """``order``: the tokens of each rank; ``need[i, j]``: ring position i's queries read ring
    position j's keys."""

    order: ShardOrder
    need: torch.Tensor

    def sources(self, i: int) -> list[int]:
        return [j for j in range(self.order.ring) if bool(self.need[i, j])]

    def targets(self, j: int) -> list[int]:
        return [i for i in range(self.order.ring) if bool(self.need[i, j])]


def rank_need(order: ShardOrder, chunk_need: torch.Tensor) -> torch.Tensor:
    """bool ``[ring, ring]`` from the chunk pairs: position i's chunks against position j's."""
    need = torch.zeros(order.ring, order.ring, dtype=torch.bool)
    for i in range(order.ring):
        for j in range(order.ring):
            need[i, j] = chunk_need[order.chunks_of(i)][:, order.chunks_of(j)].any()
    return need


def choose_order(pat: ir.PatternIR, bound: E.Bound, ring: int, ulysses: int) -> ShardOrder:
    """The shard order of ``bound.n`` tokens over ``ring`` x ``ulysses`` ranks: a grid's outermost
    axis in ``ring`` runs; a sequence in ``2 * ring`` chunks, contiguous or zigzag, whichever leaves
    the busiest rank less work under the mask (contiguous on ties; a mask that reads call-time inputs
    is not known yet: contiguous). Sizes that do not split evenly are refused (the message names the
    argument and the sizes)."""
    n = bound.n
    if pat.queries.kind == "grid":
        ext = layout_extents(pat.queries, bound, n)
        axis = pat.queries.axis_names[0]
        if ext[0] % ring:
            raise SpecError(f"the outermost axis '{axis}' has {ext[0]} positions, not divisible by the {ring} "
                            "ring positions it is sharded over", where="argument q",
                            hint="pick a ring degree that divides it, or pad the grid")
        chunks = ring
    else:
        chunks = 2 * ring if ring > 1 else 1
        if n % chunks:
            raise SpecError(f"{n} tokens do not split into {chunks} equal chunks ({ring} ring positions, "
                            f"{'2 chunks each' if ring > 1 else 'one chunk'})", where="argument q",
                            hint=f"pad the sequence to a multiple of {chunks * ulysses}")
    if (n // ring) % ulysses:
        raise SpecError(f"{n // ring} tokens per ring position do not split over {ulysses} Ulysses ranks",
                        where="argument q", hint=f"pad the sequence to a multiple of {chunks * ulysses}")
    contiguous = ShardOrder(n, chunks, ring, ulysses, False)
    if pat.queries.kind == "grid" or ring == 1 or E.input_names(pat.mask):
        return contiguous
    chunk_need = chunk_pairs(pat, bound, {}, None, chunks)
    zigzag = ShardOrder(n, chunks, ring, ulysses, True)
    return zigzag if work(zigzag, chunk_need) < work(contiguous, chunk_need) else contiguous


def work(order: ShardOrder, chunk_need: torch.Tensor) -> int:
    """Non-empty chunk pairs on the busiest ring position."""
    return max(int(chunk_need[order.chunks_of(i)].sum()) for i in range(order.ring))


def plan_pairs(pat: ir.PatternIR, bound: E.Bound, tensors: dict, batch: int | None, order: ShardOrder) -> PairPlan:
    """Which ring positions exchange keys under ``order``, from the classification with the call's inputs."""
    return PairPlan(order, rank_need(order, chunk_pairs(pat, bound, tensors, batch, order.chunks)))
