"""Cluster ids of a paged batch (``cluster(q | k, CENTROIDS)``, the Routing Transformer's mask), made at every call
on the device for the one launch: each cached key's id from its row's pages, each query's from q, both over the
table's capacity at their positions (``[rows, Hq, capacity]``, -1 where no vector of the side stands), read by
``attnc_fwd_paged`` as a mask's inputs are.

The rule is the ordinary path's (``plan.clusters.cluster_ids``): ``argmax_c x . centroids[h, c]``, ties to the lower
index, a NaN score no match; a query head's key vectors are its K/V head's. The keys' scores come from
``attnc_paged_token_scores`` (each row's centroids as its queries: every cached key read once per centroid through
the block table, no copy of the cache), in fp32; nothing is read on the host.
"""

from __future__ import annotations

import torch

from .paged_queries import PagedQueries
from .paged_tokens import pool_scores


def derive(t, qs: PagedQueries, k_cache, block_table, seqlens, inputs: dict, scale: float) -> dict:
    """``inputs`` with the pattern's cluster ids added (``[rows, Hq, capacity]`` int32) for a paged call of template
    ``t`` (``qs`` its queries; pools and rows as ``paged.forward`` takes them; ``scale`` unread)."""
    out = dict(inputs)
    for decl in t.launch.pattern.inputs:
        if decl.derived is None or decl.derived[0] != "cluster":
            continue
        _, side, name = decl.derived
        centroids = inputs[name]
        with torch.no_grad():
            if side == "k":
                out[decl.name] = _key_ids(t, centroids, k_cache, block_table, seqlens)
            else:
                out[decl.name] = _query_ids(t, qs, centroids, block_table.shape[0])
    return out


def _key_ids(t, centroids, k_cache, block_table, seqlens) -> torch.Tensor:
    """Each cached key's id per query head, at its position over the capacity (any id past a row's keys)."""
    rows, cap = block_table.shape[0], t.capacity
    heads, clusters, head_dim = centroids.shape[-3:]
    per_row = centroids if centroids.dim() == 4 else centroids[None].expand(rows, -1, -1, -1)  # [rows, H, C, D]
    as_queries = per_row.transpose(1, 2).reshape(rows * clusters, heads, head_dim)  # each row's centroids
    row = torch.arange(rows, device=k_cache.device).repeat_interleave(clusters)
    score = pool_scores(t, as_queries, row, k_cache, block_table, seqlens).view(rows, clusters, heads, cap)
    return torch.nan_to_num(score, nan=-torch.inf).argmax(1).to(torch.int32)


def _query_ids(t, qs: PagedQueries, centroids, rows: int) -> torch.Tensor:
    """Each query's id per head at its row and position over the capacity, -1 where no query stands."""
    cap, heads = t.capacity, qs.flat.shape[1]
    dtype = torch.float64 if torch.float64 in (qs.flat.dtype, centroids.dtype) else torch.float32
    cents = (centroids[qs.row] if centroids.dim() == 4 else centroids[None]).to(dtype)  # [X | 1, Hq, C, D]
    score = (cents @ qs.flat.to(dtype)[..., None])[..., 0]  # [X, Hq, C]
    ids = torch.full((rows, heads, cap + 1), -1, dtype=torch.int32, device=qs.flat.device)
    at = torch.where(qs.valid, qs.pos, cap)  # a padding query writes past the capacity, cut below
    ids[qs.row, :, at] = torch.nan_to_num(score, nan=-torch.inf).argmax(-1).to(torch.int32)
    return ids[:, :, :cap]


__all__ = ["derive"]
