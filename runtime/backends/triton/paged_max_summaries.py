"""Combiner's max summaries over a paged pool (``keys pooled(max, SIZE)``): for every row of a prefill batch, each
run of ``SIZE`` keys summarised as ``combined.pool_summary`` summarises a contiguous call's, on the device.

- Each run's query, the elementwise maximum of the queries at the run's positions (``run_max_queries``: the batch's
  queries scattered by their row and position, a prefill row's queries being all its keys' queries; made with torch
  ops on the device, so a CUDA graph replays it).
- Each run's key, the elementwise maximum of its cached keys, and per query head its value, the run's attention over
  its own keys by the run's query, ``softmax(scale * qmax . k_j) v_j``: one ``attnc_paged_max_summary`` launch
  (``paged_lines.MAX_SUMMARY_KERNEL``) that reads each key and value once through the row's block table, no copy of
  the cache. Its products run on tensor cores in the cache's dtype (a run's query, a max of queries, is exact in it;
  the probabilities are rounded to it, as the attention kernels round theirs), exact fp32 for fp32.

Sized by the table's capacity (``ceil(capacity / SIZE)`` runs per row), so no shape depends on a length.
"""

from __future__ import annotations

import torch

from ...tritonenv import interpreting
from .kernel_launch import dot_mode_of
from .paged_queries import PagedQueries, pow2

#: Keys a program reads at once (at most; a run of fewer keys reads fewer).
MAX_CHUNK = 32
#: ``tl.dot``'s least operand dimension.
LEAST_DOT = 16
#: The query heads a program's products hold, padded: Blackwell's tcgen05.mma takes no fewer rows (the padded rows
#: are zero; the kernel reads each key and value once whatever their count, so they cost products alone).
LEAST_HEADS = 64


def run_max_queries(qs: PagedQueries, rows: int, runs: int, size: int) -> torch.Tensor:
    """``[rows, Hq, runs, D]`` fp32: the elementwise maximum of the valid queries at each run's positions of each
    row (0 where a run holds none: no query reads such a run's value)."""
    heads, d = qs.flat.shape[1:]
    slot = torch.where(qs.valid, qs.row * runs + qs.pos // size, rows * runs)  # an invalid query: a slot dropped
    top = torch.full((rows * runs + 1, heads, d), float("-inf"), dtype=torch.float32, device=qs.flat.device)
    top.scatter_reduce_(0, slot.view(-1, 1, 1).expand(-1, heads, d), qs.flat.float(), "amax")
    top = torch.where(torch.isneginf(top), 0.0, top)
    return top[:-1].view(rows, runs, heads, d).transpose(1, 2)


def max_summaries(kernel, interpret: bool, qmax: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_table: torch.Tensor, seqlens: torch.Tensor, size: int, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys [rows, Hkv, runs, D], values [rows, Hq, runs, Dv])`` fp32 of every row's runs of ``size`` keys by their
    queries ``qmax`` (``run_max_queries``), in one ``attnc_paged_max_summary`` launch."""
    rows, heads, runs, head_dim = qmax.shape
    kv_heads, value_dim = k_cache.shape[2], v_cache.shape[3]
    capacity = block_table.shape[1] * k_cache.shape[1]
    keys = torch.empty(rows, kv_heads, runs, head_dim, dtype=torch.float32, device=k_cache.device)
    values = torch.empty(rows, heads, runs, value_dim, dtype=torch.float32, device=k_cache.device)
    table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
    group = heads // kv_heads
    with interpreting(interpret):
        kernel[(runs * rows * kv_heads,)](
            k_cache, k_cache.stride(0), k_cache.stride(2), k_cache.stride(1),
            v_cache, v_cache.stride(0), v_cache.stride(2), v_cache.stride(1),
            table, table.stride(0), seqlens, qmax, qmax.stride(0), qmax.stride(1), qmax.stride(2),
            keys, keys.stride(0), keys.stride(1), keys.stride(2), values, values.stride(0), values.stride(1),
            values.stride(2), k_cache.shape[0], capacity, kv_heads, runs, group, head_dim, value_dim, float(scale),
            PAGE=k_cache.shape[1], BLOCK=size, CHUNK=max(LEAST_DOT, min(MAX_CHUNK, pow2(size))),
            BLOCK_D=max(LEAST_DOT, pow2(head_dim)), BLOCK_DV=max(LEAST_DOT, pow2(value_dim)),
            BLOCK_G=max(LEAST_HEADS, pow2(group)), DOT=dot_mode_of(interpret, k_cache.dtype))
    return keys, values


__all__ = ["max_summaries", "run_max_queries"]
