"""Routing patterns (``route``: MoBA, BiFormer) across ranks: the selection of each rank's queries
equals the one-device selection (``plan.routing``'s rules) without moving the keys.

A block's mean key is a sum over tokens that several ranks hold: each rank sums its own tokens per
block and one all-reduce of those sums (``[B, H, blocks, D]``: small) gives every rank every block's
mean; BiFormer's query-block means likewise. Each rank then scores its queries against every block,
finds per query the blocks the mask allows (the mask over its queries and every key, a key chunk at
a time, never the whole N x N), applies ``keep`` and the top-k rule. The blocks read the selection
as a further mask.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ...compiler.analysis.route_blocks import block_ids, route_sizes
from ...core.errors import SpecError
from ..backends.reference.dense import pair_mask
from ..plan.forms import refuse_context_parallel
from ..plan.route_scores import block_scores, choose, keep_blocks, score_vectors


def _block_means(x: torch.Tensor, block_of: torch.Tensor, nblocks: int, group, ring: int) -> torch.Tensor:
    """Mean of ``x [B, H, L, D]`` per block over the tokens of every ring position (``block_of``: the
    blocks of this one's; ``group``: the ring's process group)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    onehot = torch.nn.functional.one_hot(block_of.to(x.device), nblocks).to(dtype)  # [L, nb]
    sums = (x.to(dtype).transpose(-1, -2) @ onehot).transpose(-1, -2).contiguous()  # [B, H, nb, D]
    counts = onehot.sum(0).contiguous()
    if ring > 1:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(counts, group=group)
    return sums / counts.clamp(min=1)[:, None]


def _scores(prob, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, key_block: torch.Tensor, nblocks: int,
            inputs: dict, group, ring: int) -> torch.Tensor:
    """The routing scores of this rank's queries against every block ``[B, h, L, blocks]``."""
    pat, bound = prob.pattern, prob.bound
    B, h, L, _ = q.shape
    refuse_context_parallel(pat, "argument pattern")  # the forms it does not run (ContextParallel refused them)
    if pat.route.scores_input is not None:
        raise SpecError(f"'{pat.name}' routes by scores a combined pattern computes (by probs(...)): context "
                        "parallelism does not run it in this version", where="argument pattern")
    if pat.route.params.score in ("indexer", "key"):  # DeepSeek's indexer, a score per key: every rank holds them whole
        sq, sk = score_vectors(pat, q, k, inputs, rows=q_pos)  # this rank's rows of the whole sequence's inputs
        if pat.route.params.score == "key":  # per head: this rank's heads (Ulysses)
            sk = sk[:, prob.head_index]
        score = block_scores(pat, bound, sq.to(q.device), sk.to(q.device), key_block, nblocks)
        return score.expand(B, h, L, nblocks)
    if pat.route.params.indexer is not None:  # a token route's indexer inputs: every rank holds them whole
        qi, ki = score_vectors(pat, q, k, inputs, rows=q_pos)  # this rank's rows of the whole sequence's inputs
        qi, ki = qi[:, prob.head_index].to(q.device), ki[:, prob.head_index].to(q.device)
        dtype = torch.float64 if torch.float64 in (qi.dtype, ki.dtype) else torch.float32
        return (qi.to(dtype) @ ki.to(dtype).transpose(-1, -2)).expand(B, h, L, nblocks)
    k_mean = _block_means(k, key_block[q_pos], nblocks, group, ring)
    k_mean = k_mean.repeat_interleave(h // k.shape[1], dim=1)
    if pat.route.params.score == "token":
        return q.to(k_mean.dtype) @ k_mean.transpose(-1, -2)  # [B, h, L, nb]
    q_block, nqb = block_ids(pat.queries, route_sizes(pat, bound)[0], bound, bound.n)
    q_mean = _block_means(q, q_block[q_pos], nqb, group, ring)
    return (q_mean @ k_mean.transpose(-1, -2))[:, :, q_block[q_pos], :]


def select(prob, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, key_chunks: list[torch.Tensor],
           inputs: dict, group, ring: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(selected bool [B, h, L, blocks] of this rank's queries, block of every key position)``.
    ``q`` ``[B, h, L, D]`` and ``k`` ``[B, hkv, L, D]`` at positions ``q_pos`` (a ring position's tokens);
    ``key_chunks``: the positions of every ring position (the keys of the whole sequence); ``group``
    the ring's process group and ``ring`` its size."""
    pat, bound = prob.pattern, prob.bound
    route = pat.route
    if route.params.shared and len(prob.head_index) != bound.heads:
        raise SpecError(f"'{pat.name}' averages its routing scores over every head (shared), which Ulysses "
                        "splits across ranks", where="argument ulysses_degree", hint="use ulysses_degree=1")
    block, topk = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, bound.n)
    B, h, L, _ = q.shape
    with torch.no_grad():
        score = _scores(prob, q, k, q_pos, key_block, nblocks, inputs, group, ring)
        dtype = score.dtype
        if route.params.shared:
            score = score.mean(dim=1, keepdim=True).expand(B, h, L, nblocks)
        reachable = torch.zeros(B, h, L, nblocks, dtype=torch.bool, device=q.device)
        for k_pos in key_chunks:
            ev = prob.evaluator(q_pos, k_pos)
            allowed = pair_mask(pat, bound, ev, h, L, len(k_pos))
            if route.tokens:  # single keys: the mask itself
                reachable[..., key_block[k_pos]] |= allowed.to(reachable.device)
                continue
            onehot = torch.nn.functional.one_hot(key_block[k_pos], nblocks).to(dtype)
            reachable |= ((allowed.to(dtype) @ onehot) > 0).to(reachable.device)
        keep = keep_blocks(pat, bound, inputs, B, key_block, nblocks)
        if keep is not None:
            keep = keep[:, prob.head_index][:, :, q_pos].to(score.device)
        return choose(score, reachable, keep, topk), key_block

