"""The pages a paged call reads on the host's side of the kernels (the seam: the path by length): the rows of one
length (and query count) gathered into a batch for the module's ordinary forward (``by_length``, ``by_rows``), after
the new tokens are written (``paged_appends``). ``frontends.paged`` chooses the path."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .layouts import Restore
from .paged_appends import NewTokens
from .paged_checks import Pages, check_pages
from .paged_inputs import check_inputs, group_input


def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """``[num_pages, page_size, H, D]`` and a group's page ids ``[G, pages]`` -> its rows' first ``length``
    keys ``[G, H, length, D]`` (only the listed pages are read)."""
    count, reach = pages.shape
    rows = cache.index_select(0, pages.flatten()).view(
        count, reach * cache.shape[1], *cache.shape[2:]
    )
    return rows[:, :length].transpose(1, 2)


@torch.compiler.disable  # host reads of cache_seqlens and block_table: eager under torch.compile
def by_length(
    forward: Callable,
    pat,
    layout: str,
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    new: NewTokens | None,
    *,
    scale,
    return_lse: bool,
    initial_state,
    return_state: bool,
    sizes,
    inputs: dict,
    rows=None,
):
    """The paged call on the module's ordinary forward: ``forward`` once per group of rows of equal length on
    their gathered keys and values (q ``[B, Hq, n, D]``, oriented and checked by ``run``); with ``rows``
    (``cu_seqlens_q``: q ``[1, Hq, total, D]``), once per group of equal length and query count (``by_rows``)."""
    restore = Restore(layout)
    batch = block_table.shape[0] if rows is not None else q.shape[0]
    if rows is not None:
        rows.diagnose(q.shape[2])
    counts = rows.host_counts() if rows is not None else q.shape[2]
    pages = check_pages(pat, batch, counts, k_cache, block_table, cache_seqlens, new)
    inputs = check_inputs(pat, inputs, layout, batch, max(pages.lengths, default=0))
    if new is not None:  # flash_attn_with_kvcache's k=, v=: written before attending, in place
        new.write(k_cache, v_cache, block_table, cache_seqlens)
    call = dict(scale=scale, return_lse=return_lse, initial_state=initial_state, return_state=return_state,
                sizes=sizes, layout="bhnd")
    if rows is not None:
        out, lse = by_rows(forward, pat, q, k_cache, v_cache, block_table, pages, counts, inputs, call)
        return restore.result((out, lse) if return_lse else out, return_lse, False)
    out = lse = None
    for length, group in pages.groups:
        rows = torch.tensor(group, device=q.device)
        ids = block_table.index_select(0, rows)[:, : -(-length // pages.page_size)].long()
        result = forward(
            q.index_select(0, rows),
            _gather(k_cache, ids, length),
            _gather(v_cache, ids, length),
            scale=scale,
            return_lse=return_lse,
            initial_state=initial_state,
            return_state=return_state,
            sizes=sizes,
            layout="bhnd",
            **{name: group_input(pat, name, t, rows, length) for name, t in inputs.items()},
        )
        part = result[0] if return_lse else result
        if out is None:
            out = part.new_empty(q.shape[0], *part.shape[1:])
        out.index_copy_(0, rows, part)
        if return_lse:
            if lse is None:
                lse = result[1].new_empty(q.shape[0], *result[1].shape[1:])
            lse.index_copy_(0, rows, result[1])
    if out is None:  # an empty batch: empty results of the call's shapes
        out = q.new_empty(0, q.shape[1], q.shape[2], v_cache.shape[-1])
        lse = q.new_empty(
            0,
            q.shape[1],
            q.shape[2],
            dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
        )
    return restore.result((out, lse) if return_lse else out, return_lse, False)


def by_rows(forward: Callable, pat, q, k_cache, v_cache, block_table, pages: Pages, counts: list[int],
            inputs: dict, call: dict):
    """``(out, lse)`` ``[1, Hq, total, ...]`` of a packed paged call on the ordinary forward: the rows of one
    (length, query count) gathered into one batch (their queries from q's packed rows, their keys from their
    pages), their results written back into the packed rows. Rows of no query give nothing."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    groups: dict[tuple[int, int], list[int]] = {}
    for b, (length, count) in enumerate(zip(pages.lengths, counts, strict=True)):
        if count:
            groups.setdefault((length, count), []).append(b)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    heads = q.shape[1]
    out = q.new_zeros(1, heads, q.shape[2], v_cache.shape[-1])
    lse = q.new_full((1, heads, q.shape[2]), float("-inf"), dtype=dtype)
    for (length, count), group in sorted(groups.items()):
        where = torch.tensor([starts[b] + i for b in group for i in range(count)], device=q.device)
        rows = torch.tensor(group, device=q.device)
        ids = block_table.index_select(0, rows)[:, : -(-length // pages.page_size)].long()
        q_g = q[0].index_select(1, where).view(heads, len(group), count, q.shape[3]).transpose(0, 1)
        part, part_lse = forward(q_g, _gather(k_cache, ids, length), _gather(v_cache, ids, length),
                                 **{**call, "return_lse": True},
                                 **{name: group_input(pat, name, t, rows, length) for name, t in inputs.items()})
        out[0].index_copy_(1, where, part.transpose(0, 1).reshape(heads, -1, part.shape[-1]).to(out.dtype))
        lse[0].index_copy_(1, where, part_lse.transpose(0, 1).reshape(heads, -1).to(dtype))
    return out, lse
