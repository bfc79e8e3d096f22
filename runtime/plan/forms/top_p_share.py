"""Top-p blocks by their share of min-max normalised scores (VMoBA): ``route topp(P) blocks(...) by minmax(q @
mean(k)) over GROUP``; the rule is ``plan/share.py``'s, every query's scores at once (a group may span all of a
head's queries)."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.route_blocks import block_ids, route_sizes
from ....core import ir, route_kinds
from .. import share
from ..route_scores import block_scores, keep_blocks
from .base import RouteForm


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed):
    block, _ = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, k.shape[2])
    dev = q.device
    with torch.no_grad():
        dtype = torch.float64 if torch.float64 in (q.dtype, k.dtype) else torch.float32
        reachable = allowed(key_block, nblocks, dtype).to(dev)
        keep = keep_blocks(pat, bound, inputs, q.shape[0], key_block, nblocks)
        score = block_scores(pat, bound, q, k.to(dev), key_block, nblocks)
        chosen = share.threshold(score, reachable, None if keep is None else keep.to(dev),
                                 float(pat.route.params.topp), pat.route.params.group)
    return chosen, key_block, nblocks


def select_on_device(pat: ir.PatternIR, bound: E.Bound, q, k, _tensors: dict, c) -> torch.Tensor:
    score = block_scores(pat, bound, q, k, c.key_block, c.nblocks)
    return share.threshold(score, c.allowed, c.keep, float(pat.route.params.topp), pat.route.params.group)


def _decode(pat: ir.PatternIR) -> str | None:
    if pat.route.params.group == "query":  # one query's row: any offset
        return None
    return (f"'{pat.name}' ranks its block scores over the {pat.route.params.group} group (min-max share), which spans "
            "queries: queries after a KV cache (nk > n) are not supported (a pattern ranking 'over query' decodes)")


def _context_parallel(pat: ir.PatternIR) -> str:
    return (f"'{pat.name}' selects blocks by their min-max share over the {pat.route.params.group} group (VMoBA), which "
            "context parallelism does not run in this version: the group's scores are normalised and ranked across "
            "the ranks' shards")


FORM = RouteForm(route_kinds.TOPP_SHARE.name, select, select_on_device, _decode, _context_parallel)
