"""A routing pattern's selection as the simulator models it, at token level, apart from any schedule.

The algorithm is not the schedule: which (query, key) pairs a route attends is the pattern's answer and
cannot depend on the tiles a kernel walks. So the selection is modelled per query on the route's own
units (its key blocks, or single keys for a token route) exactly as spec/REFERENCE.md states the rule:

- a unit with no key the mask allows for the query is never selected;
- the units ``keep`` holds for (k bound to the unit's first key) are always selected and count towards K,
  all of them even where they are more than K (NSA with ``selected < 3``, SeerAttention's dense last query
  blocks);
- the remaining places go to the best of the rest, ties to the lower unit.

"The best" needs the data. Where the scores are a call-time input the caller gave (``by NAME``: a gate of
SeerAttention) they are used, and the selection is the call's. Otherwise the nearest units stand in for the
best (``nearest``): the distance of the query (of its query block where the score is the block mean's, so
that a block's queries choose alike) to the unit's first key, per grid axis. The attended pairs are then
``mask & selected`` counted over every query: the density. The count is exact where it cannot depend on
which units the data would pick (each query's candidates all hold as many allowed keys, or it takes them
all: MoBA, token top-k, BiFormer on whole regions), or where the given scores made the choice.

The work of a schedule comes from these pairs (``tile_schedule``): a (Q tile, KV tile) pair is visited
where some query of the Q tile attends some key of the KV tile, and FULL where it attends all of them.

Above ``SELECT_PAIRS`` (query, key) pairs per head class the queries are sampled: every ``stride``-th query
is modelled, standing for itself and the ``stride - 1`` after it, for the density and the tiles alike."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...core import ir, route_kinds
from ...core import symbols as S
from ..analysis import evaluate as E
from ..analysis import route_blocks
from ..analysis import tiles as T
from ..analysis.schedule import TileSchedule, tile_grid, tile_tokens

#: (query, key) pairs modelled per head class at most (a bool each): above, every stride-th query stands for a run.
SELECT_PAIRS = 1 << 26
#: (query, key) pairs evaluated at once.
CHUNK_PAIRS = 1 << 22


@dataclass
class RouteSelection:
    """The modelled selection: ``attended[c, r, k]`` (bool) whether query ``rows[r]`` attends key ``k`` (flat
    token order) in head class ``c``; query i is stood for by row ``i // stride``. ``allowed_pairs[c]``: the
    attended pairs of the class over every query (an estimate where ``stride > 1``). ``exact``: that count does
    not depend on data the model stands in for. ``given``: the choice was made from given scores."""

    attended: torch.Tensor
    stride: int
    num_queries: int
    num_heads: int
    allowed_pairs: torch.Tensor
    exact: bool
    given: bool

    @property
    def classes(self) -> int:
        return self.attended.shape[0]


def _score_input(pat: ir.PatternIR, inputs: dict | None) -> torch.Tensor | None:
    """The given block scores of a ``by NAME`` route (``float[heads, n, blocks]``), or None."""
    route = pat.route
    if route.kind != route_kinds.TOPK_BLOCKS.name or not route.params.scores or not inputs:
        return None
    scores = inputs.get(route.params.scores)
    return None if scores is None else scores.to(torch.float64)


def _coords(layout: ir.Layout, bound: E.Bound, flat: torch.Tensor) -> list[torch.Tensor]:
    """Per axis of ``layout`` the coordinate of each flat token (one on a sequence)."""
    if layout.kind == "seq":
        return [flat]
    out, rest = [], flat
    for _, size in reversed(layout.axes):
        extent = int(size.subs(bound.subs))
        out.append(rest % extent)
        rest = rest // extent
    return out[::-1]


def choose(score: torch.Tensor, reachable: torch.Tensor, forced: torch.Tensor, topk: int) -> torch.Tensor:
    """The route rule per row: ``forced`` units (reachable ones) always, then the highest ``score``s of the
    other reachable units, K places in all, ties to the lower unit. ``score``: float, or int64 ranks (lower
    first, distinct within a row: the nearest model's), cut at the remaining-th smallest."""
    forced = forced & reachable
    candidates = reachable & ~forced
    remaining = (topk - forced.sum(-1, keepdim=True)).clamp(min=0)
    if score.dtype == torch.int64:  # distinct ranks: the places taken are those up to the remaining-th smallest
        most = int(remaining.max()) if remaining.numel() else 0
        if most == 0:
            return forced
        ranked = torch.where(candidates, score, torch.iinfo(torch.int64).max)
        kth = torch.topk(ranked, min(most, ranked.shape[-1]), dim=-1, largest=False, sorted=True).values
        last = kth.gather(-1, (remaining.clamp(max=kth.shape[-1]) - 1).clamp(min=0))
        return forced | (candidates & (ranked <= last) & (remaining > 0))
    ranked = torch.where(candidates, score, torch.full_like(score, -math.inf))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    # candidates before every other unit even at a score of -inf (a stable sort keeps the score order)
    order = order.gather(-1, torch.sort(candidates.gather(-1, order).to(torch.int8), dim=-1, descending=True,
                                        stable=True).indices)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
    return forced | (candidates & (rank < remaining))


def select(pat: ir.PatternIR, bound: E.Bound, inputs: dict | None = None) -> RouteSelection:
    """The selection of ``pat``'s route at ``bound`` (see the module docstring)."""
    route = pat.route
    kind = route_kinds.kind_of(route)
    block, topk = route_blocks.route_sizes(pat, bound)  # topk: the keys' count for a threshold (every unit)
    n, nk = math.prod(T.layout_extents(pat.queries, bound, bound.n)), math.prod(
        T.layout_extents(pat.keys, bound, bound.nk))
    keys = torch.arange(nk)
    if route.tokens:
        unit, units = keys, nk
    else:
        unit, units = route_blocks.block_ids(pat.keys, block, bound, nk)
    first_key = torch.full((units,), nk, dtype=torch.int64).scatter_reduce(0, unit, keys, reduce="amin")
    scores = _score_input(pat, inputs)
    if scores is not None and route.params.shared:
        scores = scores.mean(0, keepdim=True)
    per_head = scores is not None and scores.shape[0] > 1
    classes = bound.heads if per_head else T.head_classes(pat, bound)
    if route.keep is not None and S.H in route.keep.free_symbols:
        classes = bound.heads
    mask, keep = E.substitute(pat.mask, bound), None if route.keep is None else E.substitute(route.keep, bound)
    read = frozenset(E.input_names(mask)) | (frozenset(E.input_names(keep)) if keep is not None else frozenset())
    tensors, _ = E.bind_inputs(pat, bound, {k: v for k, v in (inputs or {}).items() if k in read}, required=read)
    stride = max(1, -(-classes * n * nk // SELECT_PAIRS))
    rows = torch.arange(0, n, stride)
    weight = torch.clamp(n - rows, max=stride).to(torch.float64)  # the queries each modelled row stands for
    # the nearest units: distance per axis from the query (its block's first query for a block-mean score)
    by_block = isinstance(route.params, route_kinds.TopK) and route.params.score == "block" and not route.tokens
    unit_at = _coords(pat.keys, bound, first_key.clamp(max=nk - 1) + bound.k_offset)
    attended = torch.zeros(classes, len(rows), nk, dtype=torch.bool)
    allowed = torch.zeros(classes, dtype=torch.float64)
    exact = kind.count(route.params) is not None
    step = max(1, CHUNK_PAIRS // max(nk, units))
    for c in range(classes):
        for start in range(0, len(rows), step):
            r = rows[start:start + step]
            env = E.token_env(pat, bound, r[:, None], keys[None, :], c)
            ok = torch.broadcast_to(E.as_tensor(E.Evaluator(env, tensors, set(), None)(mask), torch.bool),
                                    (len(r), nk))
            if route.tokens:
                count = ok.to(torch.int64)
            else:
                count = torch.zeros(len(r), units, dtype=torch.int64).index_add_(1, unit, ok.to(torch.int64))
            reachable = count > 0
            forced = torch.zeros_like(reachable)
            if keep is not None:
                env = E.token_env(pat, bound, r[:, None], first_key.clamp(max=nk - 1)[None, :], c)
                forced = reachable & torch.broadcast_to(
                    E.as_tensor(E.Evaluator(env, tensors, set(), None)(keep), torch.bool), reachable.shape)
            if scores is not None:
                at = (r + bound.q_offset).clamp(max=scores.shape[1] - 1)
                score = scores[c if per_head else 0][at][:, :units]
            else:
                q_at = r + bound.q_offset
                q_rep = first_key[unit[q_at.clamp(max=nk - 1)]] if by_block else q_at
                q_at = _coords(pat.queries, bound, q_rep)
                distance = sum((qa[:, None] - ka[None, :]).abs() for qa, ka in zip(q_at, unit_at, strict=True))
                score = distance * units + torch.arange(units)  # nearest first, ties to the lower unit
            chosen = choose(score, reachable, forced, topk)
            hit = ok & chosen[:, unit]
            attended[c, start:start + len(r)] = hit
            allowed[c] += float((hit.sum(-1).to(torch.float64) * weight[start:start + step]).sum())
            if exact and scores is None and not route.tokens:  # a key holds one allowed key or none
                exact = not _count_depends_on_choice(count, reachable & ~forced, forced, topk)
    return RouteSelection(attended, stride, n, bound.heads, allowed, exact and stride == 1, scores is not None)


def _count_depends_on_choice(count: torch.Tensor, candidates: torch.Tensor, forced: torch.Tensor, topk: int) -> bool:
    """Whether another choice among ``candidates`` could attend another number of keys: some row has more
    candidates than places left, and not all of them hold as many allowed keys."""
    places = (topk - forced.sum(-1)).clamp(min=0)
    choosing = (candidates.sum(-1) > places) & (places > 0)
    if not bool(choosing.any()):
        return False
    c, cand = count[choosing], candidates[choosing]
    hi = torch.where(cand, c, torch.full_like(c, -1)).amax(-1)
    lo = torch.where(cand, c, torch.full_like(c, torch.iinfo(torch.int64).max)).amin(-1)
    return bool((hi != lo).any())


def tile_schedule(sel: RouteSelection, q_extents: tuple[int, ...], kv_extents: tuple[int, ...],
                  q_tile: tuple[int, ...], kv_tile: tuple[int, ...]) -> TileSchedule:
    """The tiles a schedule of ``q_tile`` x ``kv_tile`` visits to attend ``sel``'s pairs: a pair of tiles where
    some query of the Q tile attends some key of the KV tile, FULL where every query attends every key.
    Extents and tiles over the flat token order or the grid's axes alike (tokens are flat row-major)."""
    nq, nkv = math.prod(tile_grid(q_extents, q_tile)), math.prod(tile_grid(kv_extents, kv_tile))
    q_tok, q_ok = tile_tokens(q_extents, q_tile, torch.arange(nq))
    k_tok, k_ok = tile_tokens(kv_extents, kv_tile, torch.arange(nkv))
    # a padded slot stands in for its tile's first token (always one of its own): any/all then need no mask
    q_row = torch.where(q_ok, q_tok, q_tok[:, :1]) // sel.stride
    k_tok = torch.where(k_ok, k_tok, k_tok[:, :1])
    step = max(1, CHUNK_PAIRS // max(1, q_tok.shape[1] * sel.attended.shape[-1]))
    heads, qs, ks, fulls = [], [], [], []
    for c in range(sel.classes):
        for start in range(0, nq, step):
            hit = sel.attended[c][q_row[start:start + step]].view(torch.uint8)  # [tiles, Tq, nk]
            # byte max / min over the rows (any() / all() over a middle dimension are many times slower)
            some, every = hit.amax(1), hit.amin(1)
            visit = some[:, k_tok].amax(-1).bool()  # [tiles, KV tiles]
            full = visit & every[:, k_tok].amin(-1).bool()
            qi, ki = visit.nonzero(as_tuple=True)
            heads.append(torch.full_like(qi, c))
            qs.append(qi + start)
            ks.append(ki)
            fulls.append(full[qi, ki])
    return TileSchedule.from_pairs(q_extents, kv_extents, q_tile, kv_tile, sel.num_heads, sel.classes,
                                   torch.cat(heads), torch.cat(qs), torch.cat(ks), torch.cat(fulls),
                                   sel.allowed_pairs.clone(), exact=sel.stride == 1, density_exact=sel.exact)


__all__ = ["CHUNK_PAIRS", "RouteSelection", "SELECT_PAIRS", "choose", "select", "tile_schedule"]
