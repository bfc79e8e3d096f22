"""The score tables a paged batch's bias reads (``relative(E, r)``: Music Transformer's ``q . E[r]``;
``landmark(BLOCK)``: each block's landmark gate), made at every call on the device for the one launch from the present
queries, laid out as q (``[B, Hq, n, ...]``, or a packed call's ``[Hq, total, ...]``): ``attnc_fwd_paged`` reads
them at each query's row in q (``KernelSource.query_rows``), not at its position, so nothing is sized by the table's
capacity.

The tables are the ordinary path's (``plan.clusters.relative_logits``, ``landmark_gates``): ``scale * q . E[r]``
between two zero columns; a block's ``s(q, landmark) - logsumexp_j s(q, j)`` over its other keys, ``s = scale * q .
k``, the keys read through the row's block table by ``attnc_paged_token_scores`` (no copy of the cache), a chunk of
queries at a time. Nothing is read on the host.
"""

from __future__ import annotations

import torch

from ....compiler.codegen.triton.paged_lines import QUERY_TABLES
from ...plan.clusters import relative_logits
from .paged_queries import SCORE_CHUNK, PagedQueries
from .paged_tokens import pool_scores


def derive(t, qs: PagedQueries, k_cache, block_table, seqlens, inputs: dict, scale: float) -> dict:
    """``inputs`` with the pattern's score tables added for a paged call of template ``t`` (``qs`` its queries; pools
    and rows as ``paged.forward`` takes them; ``scale`` the call's)."""
    out = dict(inputs)
    for decl in t.launch.pattern.inputs:
        if decl.derived is None or decl.derived[0] not in QUERY_TABLES:
            continue
        with torch.no_grad():
            if decl.derived[0] == "relative":
                table = _relative(qs.flat, qs.row, inputs[decl.derived[2]], scale)
            else:
                table = _landmark(t, qs.flat, qs.row, k_cache, block_table, seqlens, int(decl.derived[2]), scale)
        # as q lays its rows out: [Hq, total, ...] packed (every row's queries in one batch entry), else [B, Hq, n, ...]
        out[decl.name] = qs.as_q(table)[0] if qs.packed else qs.as_q(table)
    return out


def _relative(qf, row, embeddings, scale: float) -> torch.Tensor:
    """``relative()``'s table ``[X, Hq, R + 2]`` of queries ``qf`` ``[X, Hq, D]`` (each its row's embeddings where
    they are per row)."""
    per_query = embeddings[row] if embeddings.dim() == 4 else embeddings  # [X, Hq, R, D], or shared
    return relative_logits(qf[:, :, None], per_query, scale, 1)[:, :, 0]


def _landmark(t, qf, row, k_cache, block_table, seqlens, block: int, scale: float) -> torch.Tensor:
    """``landmark()``'s table ``[X, Hq, blocks]`` of queries ``qf`` over their rows' blocks of the table's capacity
    (a block past a row's whole blocks holds anything: the bias reads only blocks before the query's)."""
    count, heads = qf.shape[:2]
    cap = t.capacity
    whole, blocks = cap // block, -(-cap // block)
    dtype = torch.float64 if qf.dtype == torch.float64 else torch.float32
    table = torch.zeros(count, heads, blocks, dtype=dtype, device=qf.device)
    step = max(1, SCORE_CHUNK // (heads * cap))
    for start in range(0, count, step):
        part = slice(start, min(count, start + step))
        s = scale * pool_scores(t, qf[part], row[part], k_cache, block_table, seqlens).to(dtype)
        by_block = s[..., :whole * block].unflatten(-1, (whole, block))
        table[part, :, :whole] = by_block[..., -1] - torch.logsumexp(by_block[..., :-1], -1)
    return table


__all__ = ["derive"]
