"""Top-k tokens: ``route topk(K) tokens by q @ k | QI @ KI | indexer(QI, KI, W)`` (HiP, Quest per token,
DeepSeek's indexer): every key its own unit, the K of highest score per query among those the mask allows, a run
of queries at a time over the span of keys the mask lets the run reach (nothing n x nk is held but the
selection)."""

from __future__ import annotations

import dataclasses

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.route_blocks import route_sizes
from ....core import ir, route_kinds
from ....core import symbols as S
from .. import device_choice
from ..route_scores import (
    SELECT_ELEMENTS,
    TOKEN_ROWS,
    _key_slice,
    allowed_span,
    block_scores,
    choose,
    keep_blocks,
    score_sides,
)
from .base import RouteForm, serves


def run_rows(q: torch.Tensor, sq: torch.Tensor, nk: int) -> int:
    """Queries scored at once: short runs (a causal run's keys end where it does), an indexer's J heads each."""
    return max(1, min(TOKEN_ROWS, SELECT_ELEMENTS // max(1, q.shape[0] * max(q.shape[1], sq.shape[1]) * nk)))


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, _allowed
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The mask and ``keep`` evaluated densely for each run of rows, on the CPU where the inputs live."""
    _, topk = route_sizes(pat, bound)
    nk = k.shape[2]
    key_block = torch.arange(nk)
    dev = q.device
    sq, sk = score_sides(pat, bound, q, k, inputs)
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    selected = torch.empty(max(B, sq.shape[0]), Hq, Nq, nk, dtype=torch.bool, device=dev)
    rows = run_rows(q, sq, nk)
    tensors, batch = E.bind_inputs(pat, bound, inputs) if inputs else ({}, None)
    with torch.no_grad():
        for start in range(0, Nq, rows):
            part = torch.arange(start, min(Nq, start + rows))
            rows_here = slice(start, start + len(part))
            allowed = E.mask_tensor(pat, bound, tensors, batch=batch, q_index=part).to(dev)
            keep = keep_blocks(pat, bound, tensors, B, key_block, nk, q_index=part)
            # only the keys from the first to the last one the mask allows these rows
            lo, hi = allowed_span(allowed, nk)
            selected[:, :, rows_here, :lo] = False
            selected[:, :, rows_here, hi:] = False
            if lo == hi:
                continue
            span = slice(lo, hi)
            score = block_scores(pat, bound, sq[:, :, rows_here], sk[:, :, span], key_block[span], hi - lo)
            selected[:, :, rows_here, span] = choose(score, _key_slice(allowed, span),
                                                     None if keep is None else _key_slice(keep, span).to(dev), topk)
    return selected, key_block, nk


def select_on_device(pat: ir.PatternIR, bound: E.Bound, q, k, tensors: dict, c) -> torch.Tensor:
    """``select`` on q's device, the spans the host's (so the scores are the host's too), the mask and keep
    evaluated there."""
    sq, sk = score_sides(pat, bound, q, k, tensors)
    B, Hq, Nq = q.shape[0], q.shape[1], q.shape[2]
    nk = k.shape[2]
    selected = torch.zeros(max(B, sq.shape[0]), Hq, Nq, nk, dtype=torch.bool, device=q.device)
    for part, lo, hi in mask_spans(pat, bound, c, run_rows(q, sq, nk), Nq):
        if lo == hi:
            continue
        here = torch.arange(part.start, part.stop, device=q.device)
        keys = c.key_block[lo:hi]
        allowed = device_mask(c.exprs["mask"], pat, bound, here, keys)
        keep = None if c.exprs["keep"] is None else device_mask(c.exprs["keep"], pat, bound, here, keys)
        score = block_scores(pat, bound, sq[:, :, part], sk[:, :, lo:hi], keys, hi - lo)
        selected[:, :, part, lo:hi] = device_choice.choose(score, allowed, keep, c.topk)
    return selected


def device_mask(expr: sympy.Basic, pat, bound: E.Bound, rows: torch.Tensor, keys: torch.Tensor,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``expr`` (substituted, of positions and sizes alone) at query rows ``rows`` and key rows ``keys`` (device
    tensors) for every head: bool ``[1, Hq | 1, len(rows) | 1, len(keys) | 1]`` on their device. ``lengths``: each
    query row's sequence length (``n``, ``nk``), where ``expr`` names it (a paged row's own)."""
    heads = torch.arange(bound.heads, device=rows.device).view(1, -1, 1, 1)
    env = E.token_env(pat, bound, rows.view(1, 1, -1, 1), keys.view(1, 1, 1, -1), heads)
    if lengths is not None:
        env.update(dict.fromkeys((S.N, S.NK), lengths.view(1, 1, -1, 1)))
    value = E.as_tensor(E.Evaluator(env, {}, set(), None)(expr), torch.bool)
    value = torch.zeros((), dtype=torch.bool, device=rows.device) | value  # a constant made on the device
    return value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))


def mask_spans(pat, bound: E.Bound, c, rows: int, nq: int) -> list[tuple[slice, int, int]]:
    """Per run of ``rows`` queries, the first key and one past the last that the mask allows any query of it
    (``allowed_span``): the mask reads no input, so they are found once per run length, on the host. A decode
    step's (``every_key``: its length changes every step) are every key: the mask, on the device, keeps what it
    allows."""
    if c.exprs.get("every_key"):
        return [(slice(start, min(nq, start + rows)), 0, bound.nk) for start in range(0, nq, rows)]
    spans = c.exprs.setdefault("spans", {})
    if rows not in spans:
        spans[rows] = []
        unrouted = dataclasses.replace(pat, route=None)  # the mask alone (an indexer's inputs are not asked for)
        for start in range(0, nq, rows):
            part = torch.arange(start, min(nq, start + rows))
            lo, hi = allowed_span(E.mask_tensor(unrouted, bound, {}, q_index=part), bound.nk)
            spans[rows].append((slice(start, start + len(part)), lo, hi))
    return spans[rows]


FORM = RouteForm(route_kinds.TOPK_TOKENS.name, select, select_on_device, context_parallel_refusal=serves)
