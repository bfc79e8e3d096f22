"""Stripes by anchor (AnchorAttention): ``route stripes(THETA) blocks(B) groups(G) keep REGION``; single keys kept
per group of queries by ``plan/stripes.py``'s rule, the rows a run at a time over the span of keys the mask lets
the run reach (as a token top-k route's: the same runs, masks and spans)."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.route_blocks import stripes_sizes
from ....core import ir, route_kinds
from .. import stripes
from ..route_scores import _key_slice, allowed_span, keep_blocks
from .base import RouteForm
from .top_k_tokens import device_mask, mask_spans, run_rows


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, _allowed
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The mask and ``keep`` evaluated densely for each run of rows, on the CPU where the inputs live."""
    theta, block, group = stripes_sizes(pat, bound)
    nk, dev = k.shape[2], q.device
    key_block = torch.arange(nk)
    tensors, batch = E.bind_inputs(pat, bound, inputs) if inputs else ({}, None)
    rows, Nq = run_rows(q, q, nk), q.shape[2]

    def runs():
        for start in range(0, Nq, rows):
            part = torch.arange(start, min(Nq, start + rows))
            allowed = E.mask_tensor(pat, bound, tensors, batch=batch, q_index=part).to(dev)
            keep = keep_blocks(pat, bound, tensors, q.shape[0], key_block, nk, q_index=part)
            lo, hi = allowed_span(allowed, nk)
            span = slice(lo, hi)
            yield slice(start, start + len(part)), lo, hi, _key_slice(allowed, span), _key_slice(keep, span).to(dev)

    with torch.no_grad():
        return stripes.select(q.detach(), k.detach().to(dev), theta, block, group, runs), key_block, nk


def select_on_device(pat: ir.PatternIR, bound: E.Bound, q, k, _tensors: dict, c) -> torch.Tensor:
    """``select`` on q's device: the host's spans (found once per plan), the mask and keep evaluated there."""
    theta, block, group = stripes_sizes(pat, bound)

    def runs():
        for part, lo, hi in mask_spans(pat, bound, c, run_rows(q, q, k.shape[2]), q.shape[2]):
            here = torch.arange(part.start, part.stop, device=q.device)
            keys = c.key_block[lo:hi]
            yield (part, lo, hi, device_mask(c.exprs["mask"], pat, bound, here, keys),
                   device_mask(c.exprs["keep"], pat, bound, here, keys))

    return stripes.select(q, k, theta, block, group, runs)


def _decode(pat: ir.PatternIR) -> str:
    return (f"'{pat.name}' keeps key stripes per group of queries from its blocks' mean queries and anchors, which "
            "needs every query of a group: queries after a KV cache (nk > n) are not supported (AnchorAttention is "
            "a prefill method)")


def _context_parallel(pat: ir.PatternIR) -> str:
    return (f"'{pat.name}' tests every key column against its query blocks' mean queries (stripes by anchor), which "
            "context parallelism does not run in this version: a rank's blocks would read every rank's keys")


FORM = RouteForm(route_kinds.STRIPES.name, select, select_on_device, _decode, _context_parallel)
