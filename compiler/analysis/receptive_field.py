"""Receptive field across stacked layers, at block granularity (networkx).

Stack L layers of the same self-attention pattern. Information moves from a
key block to a query block in one layer when the (Q tile, KV tile) pair is
visited by the tile schedule (FULL or PARTIAL) in at least one head (the
union over heads). The residual stream keeps what a block already has, so
a query block reaches a key block within L layers when the block graph has
a directed path KV -> ... -> Q of at most L edges (a block always has
itself).

Everything is at **block granularity**: a visited PARTIAL pair counts as a
connection even though only some of its token pairs are allowed, so the
token-level receptive field can be smaller (never larger) than reported.
Blocks are the tiles of the schedule (one box per grid axis; the Q and KV
tiles must be the same), ordered by their row-major flat index. On a
concatenated layout (``seq(text) + grid(...)``) the blocks are runs of flat
positions, as its tiles are: a block may hold text and video tokens.

``receptive_field(pat, bound, block, layers)`` returns, for L = 1..layers,
the fraction of the counted (query block, key block) pairs reached, and the
number of layers needed to reach all of them (``None`` if never). Which
pairs count follows the layout (:func:`counts_all_pairs`): on a plain
sequence the key blocks earlier or equal in flat order (a causal stack), on
a grid or a concatenation every pair (flat order means nothing there: text
tokens attend video tokens on either side of them, windows look both ways).
"""

from __future__ import annotations

import networkx as nx
import torch

from ...core import ir
from ...core.errors import SpecError
from . import evaluate as E
from .schedule import TileSchedule

#: Largest number of blocks analysed (all-pairs BFS is O(blocks * (blocks + edges))).
MAX_BLOCKS = 8192


def block_graph(sched: TileSchedule) -> nx.DiGraph:
    """Directed block graph of a self-attention schedule: edge KV block -> Q block
    for every visited pair of any head (self-loops kept)."""
    if sched.q_extents != sched.kv_extents or sched.q_tile != sched.kv_tile:
        raise SpecError("the receptive field needs self-attention with the same Q and KV tiles",
                        where="argument block",
                        hint=f"Q tiles {sched.q_tile} on {sched.q_extents}, KV tiles {sched.kv_tile} on {sched.kv_extents}")
    g = nx.DiGraph()
    g.add_nodes_from(range(sched.num_q_tiles))
    _, qi, ki, _ = sched.pairs()
    if len(qi):
        edge = torch.unique(ki * sched.num_q_tiles + qi)
        g.add_edges_from(zip((edge // sched.num_q_tiles).tolist(), (edge % sched.num_q_tiles).tolist(), strict=True))
    return g


def coverage(sched: TileSchedule, layers: int, *, all_pairs: bool = False) -> dict:
    """Receptive-field figures of a schedule (see :func:`receptive_field`)."""
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise SpecError(f"expected a positive number of layers, got {layers!r}", where="argument layers")
    nb = sched.num_q_tiles
    if nb > MAX_BLOCKS:
        raise SpecError(f"{nb} blocks is too many for the receptive-field analysis (at most {MAX_BLOCKS})",
                        where="argument block", hint="use a larger block")
    g = block_graph(sched)
    # hist[d]: number of counted (query block i, key block j) pairs at shortest distance d (j -> i)
    hist: dict[int, int] = {}
    for i, dist in nx.all_pairs_shortest_path_length(g.reverse(copy=False)):
        for j, d in dist.items():
            if all_pairs or j <= i:
                hist[d] = hist.get(d, 0) + 1
    total = nb * nb if all_pairs else nb * (nb + 1) // 2
    reached = sum(hist.values())
    deepest = max(hist) if hist else 0
    frac = []
    running = hist.get(0, 0)  # a block has its own tokens (residual stream)
    for L in range(1, layers + 1):
        running += hist.get(L, 0)
        frac.append(running / total)
    return {
        "granularity": "block",
        "block": sched.q_tile,
        "blocks": nb,
        "edges": g.number_of_edges(),
        "pairs": "all" if all_pairs else "earlier_or_equal",
        "num_pairs": total,
        "layers": list(range(1, layers + 1)),
        "coverage": frac,
        "layers_for_full": max(1, deepest) if reached == total else None,
    }


def counts_all_pairs(pat: ir.PatternIR) -> bool:
    """The pairs a receptive field counts by default: every (query block, key block) pair on a
    grid or a concatenation, key blocks earlier or equal in flat order on a plain sequence."""
    return pat.queries.kind == "grid" or bool(pat.queries.segments)


def receptive_field(pat: ir.PatternIR, bound: E.Bound, block, layers: int, *, inputs: dict | None = None,
                    all_pairs: bool | None = None) -> dict:
    """Receptive field of ``layers`` stacked layers of a self-attention pattern, at block granularity.

    ``block``: the tile shape (an int on ``tokens seq`` and on a
    concatenation, one extent per grid axis on a grid), used for both Q and
    KV tiles. ``inputs``: call-time inputs of a data-dependent mask.
    ``all_pairs``: count every (query block, key block) pair (True) or only
    key blocks earlier or equal in flat order (False); None (the default)
    picks by layout, :func:`counts_all_pairs`.

    Returns a dict: ``granularity`` ("block"), ``block`` (tile shape),
    ``blocks`` (number of blocks), ``edges`` (block-graph edges, self-loops
    included), ``pairs`` ("earlier_or_equal" or "all"), ``num_pairs``,
    ``layers`` ([1..layers]), ``coverage`` (fraction of the pairs reached
    within each L), ``layers_for_full`` (fewest layers reaching every pair,
    which may exceed ``layers``; ``None`` if never).
    """
    from .tiles import check_tile, classify_tiles, layout_extents

    if not isinstance(pat, ir.PatternIR) or not pat.self_attention:
        raise SpecError("the receptive field is defined for self-attention patterns", where="argument pattern")
    block = check_tile("block", block, layout_extents(pat.queries, bound, bound.n))  # blamed on `block`, not a tile
    sched = classify_tiles(pat, bound, block, block, inputs)
    return coverage(sched, layers, all_pairs=counts_all_pairs(pat) if all_pairs is None else all_pairs)


__all__ = ["MAX_BLOCKS", "block_graph", "counts_all_pairs", "coverage", "receptive_field"]
