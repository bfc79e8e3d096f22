"""A given selection (a call's ``selection=``, ``plan/given.py``): the blocks the input holds, those the mask lets
a query reach; nothing scored or chosen."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.route_blocks import block_ids, route_sizes
from ....core import ir, route_kinds
from ..route_scores import block_scores, score_sides
from .base import RouteForm


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed):
    block, _ = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, k.shape[2])
    sq, sk = score_sides(pat, bound, q, k, inputs)
    with torch.no_grad():
        reachable = allowed(key_block, nblocks, torch.float64 if sq.dtype == torch.float64 else torch.float32)
        return (block_scores(pat, bound, sq, sk, key_block, nblocks) > 0) & reachable.to(q.device), key_block, nblocks


def select_on_device(pat: ir.PatternIR, bound: E.Bound, q, k, tensors: dict, c) -> torch.Tensor:
    sq, sk = score_sides(pat, bound, q, k, tensors)
    return (block_scores(pat, bound, sq, sk, c.key_block, c.nblocks) > 0) & c.allowed


def _context_parallel(pat: ir.PatternIR) -> str:
    return f"'{pat.name}' with a given selection (selection=): context parallelism does not run it in this version"


FORM = RouteForm(route_kinds.GIVEN.name, select, select_on_device, context_parallel_refusal=_context_parallel)
