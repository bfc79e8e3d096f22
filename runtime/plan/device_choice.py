"""The routing rule's choice (``routing.choose``) in fixed shapes on the scores' device: no value is read
back on the host, so a route's selection can run inside a CUDA graph.

``routing.choose`` takes per row the ``remaining`` best candidates by score, ties to the lower block index,
a NaN score above every other and a -inf one above every block that is no candidate; it asks the host
whether a row has NaN or -inf scores, whether the places are the same on every row, and cuts ties on the
rows that have some. Here every row goes the same way: scores are mapped to int64 keys of the same total
order (``order_keys``: NaN the largest, -0.0 equal to 0.0, no candidate below every candidate), ``torch.topk``
of the most places any row can have finds each row's last place taken, and the candidates tied with it are
taken in index order by a running count, as many as the row has places left."""

from __future__ import annotations

import torch


def order_keys(score: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered as ``choose`` ranks the scores of candidates, the lowest integer elsewhere: the
    float bit patterns (float32 scores in int32, others in float64 and int64), negatives' magnitude bits
    flipped; NaN the highest integer; -0.0 made 0.0 first (the two zeros tie, as they compare)."""
    wide = score.dtype != torch.float32
    x = (score.to(torch.float64) if wide else score) + 0.0
    itype = torch.int64 if wide else torch.int32
    info = torch.iinfo(itype)
    bits = x.view(itype)
    keys = torch.where(bits >= 0, bits, bits ^ info.max)
    keys = torch.where(torch.isnan(x), info.max, keys)
    return torch.where(candidates, keys, info.min)


def choose(score: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor | None,
           topk: int | torch.Tensor) -> torch.Tensor:
    """``routing.choose`` (the same selection, bit for bit) with no host read: never a block with no allowed
    key; ``keep`` blocks always (counted in ``topk``); the rest by highest score, ties to the lower index.
    ``topk``: one K, or each row's (an int64 tensor broadcastable to ``score``'s shape but its last dimension, 1)."""
    nblocks = score.shape[-1]
    shape = torch.broadcast_shapes(score.shape, allowed.shape, *(() if keep is None else (keep.shape,)))
    score, allowed = score.expand(shape), allowed.expand(shape)
    if keep is None:
        forced, candidates = torch.zeros(shape, dtype=torch.bool, device=score.device), allowed
        remaining = (torch.broadcast_to(topk, (*shape[:-1], 1)) if isinstance(topk, torch.Tensor)
                     else torch.full((*shape[:-1], 1), topk, dtype=torch.int64, device=score.device))
    else:
        forced = allowed & torch.broadcast_to(keep, shape)
        candidates = allowed & ~forced
        remaining = (topk - forced.sum(-1, keepdim=True)).clamp(min=0)
    places = nblocks if isinstance(topk, torch.Tensor) else min(topk, nblocks)  # (each row's K: every place)
    if places == 0 or nblocks == 0:
        return forced.clone()
    keys = order_keys(score, candidates)
    take = torch.minimum(remaining, candidates.sum(-1, keepdim=True))  # [..., 1]
    last = torch.topk(keys, places, dim=-1, sorted=True).values.gather(-1, (take - 1).clamp(min=0))
    above = candidates & (keys > last)
    tied = candidates & (keys == last)
    need = take - above.sum(-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, -1) <= need))
    return forced | (chosen & (take > 0))
