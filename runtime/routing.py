"""Content-dependent block selection (the ``route`` clause), exactly as
DESIGN.md section 2 states it:

- keys are partitioned into blocks (flat runs of SIZE tokens, or grid tiles);
- the score of a block is ``q . mean(k_block)`` per query token (MoBA) or
  ``mean(q_block) . mean(k_block)`` per query block (BiFormer), unscaled, in
  fp32 (fp64 for fp64 inputs); ``shared`` averages it over heads;
- a block with no key the mask allows is never selected; blocks where
  ``keep`` holds (k bound to the block's first key) always are, and count
  towards K; the remaining places go to the highest scores, ties to the lower
  block index.
"""

from __future__ import annotations

import torch

from ..compiler import evaluate as E
from ..compiler import ir


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
    return tuple(int(b.subs(bound.subs)) for b in route.block)


def select_blocks(
    pat: ir.PatternIR,
    bound: E.Bound,
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor,
    inputs: dict | None,
) -> torch.Tensor:
    """The token mask restricted to the selected blocks: bool ``[B, Hq, Nq, Nk]``.

    ``q`` is ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, Nk, D]``; ``mask`` the pattern's
    mask broadcastable to ``[B, Hq, Nq, Nk]``. The selection is not differentiated.
    """
    route = pat.route
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    topk = int(route.topk.subs(bound.subs))
    sizes = block_sizes(route, bound)
    key_block, nblocks = block_ids(pat.keys, sizes, bound, Nk)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(key_block, nblocks).to(dtype)  # [Nk, nb]
        counts = onehot.sum(0)
        k_mean = (k.to(dtype).transpose(-1, -2) @ onehot).transpose(-1, -2) / counts[:, None]  # [B, Hkv, nb, D]
        k_mean = k_mean.repeat_interleave(Hq // Hkv, dim=1)
        if route.score == "token":
            score = q.to(dtype) @ k_mean.transpose(-1, -2)  # [B, Hq, Nq, nb]
        else:
            q_block, _ = block_ids(pat.queries, sizes, bound, Nq)
            q_onehot = torch.nn.functional.one_hot(q_block, nblocks).to(dtype)
            q_mean = (q.to(dtype).transpose(-1, -2) @ q_onehot).transpose(-1, -2) / q_onehot.sum(0).clamp(min=1)[:, None]
            block_score = q_mean @ k_mean.transpose(-1, -2)  # [B, Hq, nb, nb]
            score = block_score[:, :, q_block, :]
        if route.shared:
            score = score.mean(dim=1, keepdim=True).expand(B, Hq, Nq, nblocks)
        full_mask = torch.broadcast_to(mask, (B, Hq, Nq, Nk))
        allowed = (full_mask.to(dtype) @ onehot) > 0  # [B, Hq, Nq, nb]
        if route.keep is not None:
            first_key = torch.full((nblocks,), Nk, dtype=torch.int64).scatter_reduce(
                0, key_block, torch.arange(Nk), reduce="amin")
            keep_pat = ir.PatternIR(pat.name, pat.queries, pat.keys, route.keep, None, None, None, None,
                                    pat.inputs, pat.params)
            keep = E.mask_tensor(keep_pat, bound, inputs, batch=B, k_index=first_key)
            forced = allowed & torch.broadcast_to(keep, allowed.shape)
        else:
            forced = torch.zeros_like(allowed)
        candidates = allowed & ~forced
        remaining = (topk - forced.sum(-1, keepdim=True)).clamp(min=0)
        ranked = torch.where(candidates, score, torch.full_like(score, -torch.inf))
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nblocks).expand_as(order).contiguous())
        selected = forced | (candidates & (rank < remaining))
        return full_mask & selected[..., key_block]
