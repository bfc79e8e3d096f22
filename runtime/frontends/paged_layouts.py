"""Other page layouts as the block table a paged call takes.

FlashInfer (and SGLang over it) gives each row's pages as one flat list: ``kv_indices`` holds every row's page ids
one row after another, row b's from ``kv_indptr[b]`` to ``kv_indptr[b + 1] - 1``, its last page holding
``kv_last_page_len[b]`` keys. ``block_table_from_indptr`` turns that into flash-attn's and vLLM's ``block_table``
``[B, max_pages]`` (-1 past a row's pages) and ``cache_seqlens`` ``[B]``, on the device, reading nothing on the host:
``max_pages`` is the caller's bound (a plan's, fixed across the steps a CUDA graph replays), not this step's."""

from __future__ import annotations

import numbers

import torch

from ...core.errors import SpecError
from ..compiling import compiling

HINT = "FlashInfer's paged layout: int32 kv_indptr [B + 1], kv_indices [kv_indptr[-1]], kv_last_page_len [B]"


def block_table_from_indptr(kv_indptr: torch.Tensor, kv_indices: torch.Tensor, kv_last_page_len: torch.Tensor, *,
                            page_size: int, max_pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(block_table, cache_seqlens)`` (int32 ``[B, max_pages]`` and ``[B]``, on the tensors' device) of FlashInfer's
    page layout: row b's pages ``kv_indices[kv_indptr[b] : kv_indptr[b + 1]]`` in order, -1 past them; its key count
    ``(pages - 1) * page_size + kv_last_page_len[b]``, 0 for a row of no page. ``max_pages`` bounds every row's pages
    (the table's width). The values are checked on the device (offsets from 0, never decreasing, within
    ``kv_indices``; at most ``max_pages`` pages a row; a last page of 1 to ``page_size`` keys, 0 for a row of no
    page): a device assert on a GPU, at once on a CPU with the argument and the row named."""
    for name, t, rank in (("kv_indptr", kv_indptr, 1), ("kv_indices", kv_indices, 1),
                          ("kv_last_page_len", kv_last_page_len, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != rank:
            got = f"{t.dtype} of shape {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise SpecError(f"expected a 1-D int32 tensor, got {got}", where=f"argument {name}", hint=HINT)
        if t.device != kv_indptr.device:
            raise SpecError(f"{name} is on {t.device}, kv_indptr on {kv_indptr.device}", where=f"argument {name}")
    if kv_indptr.shape[0] < 1:
        raise SpecError("kv_indptr is empty: it holds B + 1 offsets, 0 first", where="argument kv_indptr", hint=HINT)
    if kv_last_page_len.shape[0] != kv_indptr.shape[0] - 1:
        raise SpecError(f"kv_indptr has {kv_indptr.shape[0]} entries and kv_last_page_len {kv_last_page_len.shape[0]}"
                        ": B + 1 and B", where="argument kv_last_page_len", hint=HINT)
    for name, value in (("page_size", page_size), ("max_pages", max_pages)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise SpecError(f"expected a positive int, got {value!r}", where=f"argument {name}")
    page_size, max_pages = int(page_size), int(max_pages)
    ptr = kv_indptr.long()
    pages = ptr[1:] - ptr[:-1]
    last = kv_last_page_len.long()
    good = ((ptr[0] == 0) & (ptr[-1] <= kv_indices.shape[0]) & (pages >= 0).all() & (pages <= max_pages).all()
            & torch.where(pages > 0, (last >= 1) & (last <= page_size), last == 0).all())
    failed = "attnc: block_table_from_indptr: the page layout's values are out of range"
    if compiling():  # traced: the assert goes into the graph
        torch._assert_async(good, failed)
    else:
        try:  # a device assert on a GPU; on the CPU at once, and the host rules name the argument and the row
            torch._assert_async(good, failed)
        except RuntimeError:
            _diagnose(ptr, kv_indices.shape[0], last, page_size, max_pages)
            raise
    column = torch.arange(max_pages, device=ptr.device)
    at = (ptr[:-1, None] + column).clamp(max=max(kv_indices.shape[0] - 1, 0))
    ids = kv_indices[at] if kv_indices.shape[0] else torch.zeros_like(at, dtype=torch.int32)
    table = torch.where(column < pages[:, None], ids, -1).to(torch.int32)
    seqlens = torch.where(pages > 0, (pages - 1) * page_size + last, 0).to(torch.int32)
    return table, seqlens


def _diagnose(ptr: torch.Tensor, count: int, last: torch.Tensor, page_size: int, max_pages: int) -> None:
    """The layout's rules on the host, raising the first one broken (after the device check failed)."""
    ptr, last = [int(x) for x in ptr.tolist()], [int(x) for x in last.tolist()]
    if ptr[0] != 0:
        raise SpecError(f"must start at 0, starts at {ptr[0]}", where="argument kv_indptr", hint=HINT)
    for b in range(len(ptr) - 1):
        if ptr[b + 1] < ptr[b]:
            raise SpecError(f"must be non-decreasing: kv_indptr[{b}] = {ptr[b]} > kv_indptr[{b + 1}] = {ptr[b + 1]}",
                            where="argument kv_indptr", hint=HINT)
        if ptr[b + 1] - ptr[b] > max_pages:
            raise SpecError(f"row {b} has {ptr[b + 1] - ptr[b]} pages, more than max_pages = {max_pages}",
                            where="argument max_pages")
    if ptr[-1] > count:
        raise SpecError(f"ends at {ptr[-1]}, past kv_indices' {count} page ids", where="argument kv_indptr", hint=HINT)
    for b, n in enumerate(last):
        pages = ptr[b + 1] - ptr[b]
        if pages and not 1 <= n <= page_size:
            raise SpecError(f"kv_last_page_len[{b}] = {n}: a last page holds 1 to {page_size} keys",
                            where="argument kv_last_page_len")
        if not pages and n:
            raise SpecError(f"kv_last_page_len[{b}] = {n} for a row of no page (0 keys)",
                            where="argument kv_last_page_len")


__all__ = ["block_table_from_indptr"]
