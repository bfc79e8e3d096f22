"""Vertical-slash flags of a paged batch (MInference's ``route topk(V) columns and topk(S) diagonals by last(L)``),
made at every call on the device for the one launch: each row's columns and diagonals chosen from the softmax of its
own last queries over its own keys, as flags over the table's capacity that ``attnc_fwd_paged`` reads as a mask's
inputs (the diagonal of offset ``o`` at ``o + n - 1``, ``n`` the row's key count, which the kernel reads).

The rule is the ordinary path's (``plan.vertical_slash``), per row: with ``L' = min(L, the row's queries)``, its last
``L'`` queries score every key of the row (``scale * q . k``, keys after the query at -inf, softmax over keys);
``vertical[j]`` sums their probabilities of key ``j``, ``slash[o]`` of the key ``o`` before each; the forced
columns and offsets score +inf, NaN -inf; the ``min(n, V)`` highest columns and ``min(n, S)`` highest offsets are
chosen, ties to the lower index. The scores come from ``attnc_paged_token_scores`` through the block table (no copy of
the cache), in fp32, a chunk of queries at a time; nothing is read on the host.
"""

from __future__ import annotations

import torch

from ...plan import vertical_slash
from ...plan.device_choice import choose
from .paged_queries import SCORE_CHUNK, PagedQueries
from .paged_tokens import pool_scores


def derive(t, qs: PagedQueries, k_cache, block_table, seqlens, inputs: dict, scale: float) -> dict:
    """``inputs`` with the pattern's vertical-slash flags added (columns ``[rows, Hq, capacity]``, diagonals ``[rows,
    Hq, 2 capacity - 1]``, int32) for a paged call of template ``t`` (``qs`` its queries; ``scale`` the call's)."""
    pat = t.launch.pattern
    rule = vertical_slash.rule_of(pat)
    if rule is None:
        return inputs
    rows, heads, cap = block_table.shape[0], qs.flat.shape[1], t.capacity
    lengths, device = qs.lengths, qs.flat.device
    with torch.no_grad():
        vertical, slash = _row_scores(t, qs, k_cache, block_table, seqlens, int(rule.last), scale)
        forced_cols, forced_diags = vertical_slash.kept_on(rule, cap, heads, qs.flat.shape[-1], device).unbind(0)
        keys = torch.arange(cap, device=device)
        in_row = (keys < lengths.view(-1, 1)).view(rows, 1, cap)  # a row's columns and offsets: its keys'
        cols = _top(vertical, forced_cols, in_row, lengths, int(rule.vertical))
        by_offset = _top(slash, forced_diags, in_row, lengths, int(rule.slash))
        at = (keys.view(1, 1, cap) + (lengths - 1).clamp(min=0).view(rows, 1, 1)).expand(rows, heads, cap)
        diags = torch.zeros(rows, heads, 2 * cap - 1, dtype=torch.int32, device=device).scatter_(-1, at, by_offset)
    names = {d.derived[1]: d.name for d in pat.inputs if d.derived is not None and d.derived[0] == "vertical_slash"}
    return {**inputs, names["columns"]: cols, names["diagonals"]: diags}


def _row_scores(t, qs: PagedQueries, k_cache, block_table, seqlens, last: int, scale: float):
    """(vertical, slash) ``[rows, Hq, capacity]``: each row's last ``min(last, its queries)`` queries' softmax over
    its keys, summed per key and per offset."""
    rows, heads, cap = block_table.shape[0], qs.flat.shape[1], t.capacity
    row, pos = qs.row, qs.pos
    scored = qs.valid & (pos >= qs.lengths[row] - qs.count.clamp(max=last))  # among its row's last queries
    keys = torch.arange(cap, device=pos.device)
    vertical = torch.zeros(rows, heads, cap, dtype=torch.float32, device=pos.device)
    slash = torch.zeros_like(vertical)
    step = max(1, SCORE_CHUNK // (heads * cap))
    for start in range(0, qs.flat.shape[0], step):
        part = slice(start, min(qs.flat.shape[0], start + step))
        s = scale * pool_scores(t, qs.flat[part], row[part], k_cache, block_table, seqlens)  # [P, Hq, cap]
        back = pos[part].view(-1, 1) - keys.view(1, -1)  # [P, cap]: the key of offset o on the query's row
        p = torch.softmax(s.masked_fill((back < 0).view(-1, 1, cap), -torch.inf), dim=-1)
        p = p * scored[part].view(-1, 1, 1)
        vertical.index_add_(0, row[part], p)
        along = p.gather(-1, back.clamp(min=0).view(-1, 1, cap).expand_as(p))
        slash.index_add_(0, row[part], torch.where((back >= 0).view(-1, 1, cap), along, 0.0))
    return vertical, slash


def _top(score, forced, in_row, lengths, count: int) -> torch.Tensor:
    """int32 flags of each row's ``min(its keys, count)`` highest scores among its keys (forced ones +inf, NaN
    -inf), ties to the lower index (``vertical_slash.top_flags``, per row)."""
    score = torch.where(forced, torch.inf, torch.nan_to_num(score, nan=-torch.inf))
    places = lengths.clamp(max=count).view(-1, 1, 1)
    return choose(score, in_row, None, places).to(torch.int32)


__all__ = ["derive"]
