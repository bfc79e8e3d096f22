"""Top-k blocks: ``route topk(K) blocks(...) by q @ mean(k) | mean(q) @ mean(k) | q @ bound(k)`` (MoBA, BiFormer,
Quest) and a combined pattern's ``by probs(BRANCH)`` (the scores given): the K blocks of highest score per query
(``route_scores.choose``), ``keep`` forced, a run of queries at a time."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.route_blocks import block_ids, route_sizes
from ....core import ir, route_kinds
from .. import device_choice, kept_summary
from ..route_scores import (
    SELECT_ELEMENTS,
    block_scores,
    choose,
    keep_blocks,
    score_sides,
)
from .base import RouteForm


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    block, topk = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, k.shape[2])
    sq, sk = score_sides(pat, bound, q, k, inputs)
    dev = q.device
    with torch.no_grad():
        dtype = torch.float64 if torch.float64 in (sq.dtype, sk.dtype) else torch.float32
        reachable = allowed(key_block, nblocks, dtype).to(dev)
        keep = keep_blocks(pat, bound, inputs, q.shape[0], key_block, nblocks)
        keep = None if keep is None else keep.to(dev)
        return (_choose_by_runs(pat, bound, q.shape, sq, sk, key_block, nblocks, reachable, keep, topk, choose),
                key_block, nblocks)


def select_on_device(pat: ir.PatternIR, bound: E.Bound, q, k, tensors: dict, c) -> torch.Tensor:
    sq, sk = score_sides(pat, bound, q, k, tensors)
    return _choose_by_runs(pat, bound, q.shape, sq, sk, c.key_block, c.nblocks, c.allowed, c.keep, c.topk,
                           device_choice.choose, q_block=c.q_block)


def _choose_by_runs(pat, bound: E.Bound, shape, sq, sk, key_block, nblocks: int, reachable, keep, topk: int, rule,
                    q_block=None) -> torch.Tensor:
    """``rule(scores, reachable, keep, topk)`` over runs of queries (all of them for block-mean scores, whose
    query blocks span runs): ``[B, Hq, Nq, nblocks]`` for q of ``shape``."""
    B, Hq, Nq = shape[0], shape[1], shape[2]
    rows = Nq if pat.route.params.score == "block" else max(1, SELECT_ELEMENTS // max(1, B * Hq * nblocks))
    dtype = torch.float64 if torch.float64 in (sq.dtype, sk.dtype) else torch.float32
    summary = (None if pat.route.scores_input is not None
               else kept_summary.summaries(pat, bound, sk, key_block, nblocks, Hq, dtype))
    reach = torch.broadcast_to(reachable, (*reachable.shape[:2], Nq, nblocks))
    keep = None if keep is None else torch.broadcast_to(keep, (*keep.shape[:2], Nq, nblocks))
    if rows >= Nq:
        return rule(block_scores(pat, bound, sq, sk, key_block, nblocks, q_block=q_block, summary=summary), reach,
                    keep, topk)
    selected = torch.empty(max(B, sq.shape[0]), Hq, Nq, nblocks, dtype=torch.bool, device=sq.device)
    for start in range(0, Nq, rows):
        part = slice(start, min(Nq, start + rows))
        score = block_scores(pat, bound, sq[:, :, part], sk, key_block, nblocks, q_block=q_block, summary=summary)
        selected[:, :, part] = rule(score, reach[:, :, part], None if keep is None else keep[:, :, part], topk)
    return selected


def _decode(pat: ir.PatternIR) -> str | None:
    if pat.route.params.score != "block":
        return None
    return (f"'{pat.name}' routes by the mean of query blocks, which needs every query of a block: queries after a "
            "KV cache (nk > n) are not supported")


def _context_parallel(pat: ir.PatternIR) -> str | None:
    if pat.route.params.score != "bound":
        return None
    return (f"'{pat.name}' scores blocks by its keys' bounds (q @ bound(k), Quest), which context parallelism does "
            "not run in this version: a block's bound reads every key of the block")


FORM = RouteForm(route_kinds.TOPK_BLOCKS.name, select, select_on_device, _decode, _context_parallel)
