"""Paged KV caches: ``attn(q, k_cache, v_cache, block_table=..., cache_seqlens=...)`` (the convention of
FlashAttention's ``flash_attn_with_kvcache`` and vLLM).

The keys and values of every sequence live in fixed-size pages of one pool: ``k_cache``
``[num_pages, page_size, Hkv, D]`` and ``v_cache`` ``[num_pages, page_size, Hkv, Dv]`` (in either call
layout). Row b of the batch owns the pages ``block_table[b, 0], block_table[b, 1], ...`` (int32
``[B, max_pages]``) and holds ``cache_seqlens[b]`` keys (int32 ``[B]``): key j of row b is slot
``j % page_size`` of page ``block_table[b, j // page_size]``. ``cache_seqlens`` counts every key of the
row, the present queries' own included (the caller writes them into the pages first), so the ``n``
queries of row b (``q`` ``[B, Hq, n, D]``, ``[B, n, Hq, D]`` under ``"bnhd"``) sit at absolute positions
``cache_seqlens[b] - n + i``: exactly the module's call with a KV cache on the row's keys gathered into a
contiguous ``[1, Hkv, cache_seqlens[b], D]`` (spec/REFERENCE.md, "Positions with a KV cache"). A
cross-attention pattern reads the row's keys, its queries keep their own positions ``0 .. n-1``.

Every argument is checked on the host before any page is read (one copy of ``block_table`` and
``cache_seqlens``), and only the pages that a row's length reaches are read: entries of the block table
past them may hold anything (vLLM pads with -1). Rows of equal length are gathered into one batch and the
module's ordinary forward runs once per distinct length, as for packed sequences
(``frontends.varlen``); the results are written into their rows.

Call-time inputs: a leading batch dimension (``B``) is cut to each group's rows; a token dimension
(declared ``n`` or ``nk``; a cross-attention pattern's ``n`` is its queries and stays whole) is indexed by
absolute position and holds at least ``max(cache_seqlens)`` entries (the block table's capacity,
``max_pages * page_size``, always does): each group reads its first ``cache_seqlens[b]``.

Forward only (inference): a call that autograd would record is refused. Softmax patterns on a sequence
only: recurrences, grids and concatenations are refused. A combined pattern (``nsa``) takes its gates for
the present queries, ``[B, heads, n]`` (cut to each group's rows, not indexed by position). The host reads cannot be traced, so under
``torch.compile`` the paged call runs eagerly (``torch.compiler.disable``: a graph break, which
``fullgraph=True`` refuses with torch's own error).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...core import ir
from ...core.errors import SpecError
from ..checks import check_flag
from ..numerics import needs_grad
from .layouts import Restore

HINT_INT32 = "FlashAttention's and vLLM's convention: torch.int32 on the caches' device"


@dataclass(frozen=True)
class Pages:
    """A paged call's rows, checked: each row's length and the groups of rows of equal length."""

    lengths: tuple[int, ...]
    groups: tuple[tuple[int, tuple[int, ...]], ...]  # (length, row indices)
    page_size: int


def _check_index_tensor(
    t, name: str, shape: tuple[int, ...] | None, rank: int, device: torch.device
) -> None:
    where = f"argument {name}"
    if not isinstance(t, torch.Tensor):
        raise SpecError(
            f"expected an int32 tensor, got {type(t).__name__}", where=where, hint=HINT_INT32
        )
    if t.dtype != torch.int32:
        raise SpecError(f"expected an int32 tensor, got {t.dtype}", where=where, hint=HINT_INT32)
    if t.device != device:
        raise SpecError(
            f"{name} is on {t.device}, the caches on {device}", where=where, hint=HINT_INT32
        )
    if t.dim() != rank or (shape is not None and tuple(t.shape) != shape):
        want = "[B, max_pages]" if rank == 2 else "[B]"
        raise SpecError(
            f"expected shape {want} with B = q's batch, got {list(t.shape)}", where=where
        )


def check_caches(pat, q, k_cache, v_cache) -> None:
    """q (already ``[B, Hq, n, D]``) and the page pools: 4-D, one floating dtype and device, head dims and
    head counts that agree (GQA: Hq a multiple of Hkv); errors name ``q``, ``k`` or ``v``."""
    if not isinstance(pat, ir.PatternIR | ir.CombinedIR):
        raise SpecError(
            f"'{pat.name}' is a {pat.kind}: paged KV caches serve softmax patterns",
            where="argument block_table",
            hint="a recurrence decodes with attn.step",
        )
    for part in [b.pattern for b in pat.branches] if isinstance(pat, ir.CombinedIR) else [pat]:
        if (
            part.queries.kind != "seq"
            or part.keys.kind != "seq"
            or part.queries.segments
            or part.keys.segments
        ):
            raise SpecError(
                f"'{pat.name}' lays its tokens on {part.keys.describe()}: a paged KV cache is a sequence",
                where="argument block_table",
                hint="call with contiguous k, v instead",
            )
    for name, t, want in (
        ("q", q, "[B, Hq, n, D]"),
        ("k", k_cache, "[num_pages, page_size, Hkv, D]"),
        ("v", v_cache, "[num_pages, page_size, Hkv, Dv]"),
    ):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.dim() != 4 or (name != "q" and 0 in t.shape[:3]) or 0 in t.shape[-1:]:
            raise SpecError(
                f"expected a {want} tensor, got shape {list(t.shape)}", where=f"argument {name}"
            )
        if not t.dtype.is_floating_point:
            raise SpecError(
                f"expected a floating-point tensor, got {t.dtype}", where=f"argument {name}"
            )
    for name, t in (("k", k_cache), ("v", v_cache)):
        if t.dtype != q.dtype or t.device != q.device:
            raise SpecError(
                f"the cache is {t.dtype} on {t.device}, q {q.dtype} on {q.device}: they must agree",
                where=f"argument {name}",
            )
    if k_cache.shape[-1] != q.shape[-1]:
        raise SpecError(
            f"head dim of k ({k_cache.shape[-1]}) differs from q's ({q.shape[-1]})",
            where="argument k",
        )
    if tuple(v_cache.shape[:3]) != tuple(k_cache.shape[:3]):
        raise SpecError(
            f"v {list(v_cache.shape)} must match k {list(k_cache.shape)} in pages, page size and "
            "heads",
            where="argument v",
        )
    if q.shape[1] % k_cache.shape[2]:
        raise SpecError(
            f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k_cache.shape[2]})",
            where="argument k",
        )


def check_pages(pat, q, k_cache, block_table, cache_seqlens) -> Pages:
    """Validate ``block_table`` and ``cache_seqlens`` against q (``[B, Hq, n, D]``) and the pool; every
    page a row reaches must be a page of the pool. Returns the rows grouped by length."""
    batch, n = q.shape[0], q.shape[2]
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    _check_index_tensor(block_table, "block_table", None, 2, k_cache.device)
    if block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise SpecError(
            f"expected shape [B, max_pages] with B = {batch} (q's batch) and max_pages >= 1, got "
            f"{list(block_table.shape)}",
            where="argument block_table",
        )
    _check_index_tensor(cache_seqlens, "cache_seqlens", (batch,), 1, k_cache.device)
    capacity = block_table.shape[1] * page_size
    lengths = [int(x) for x in cache_seqlens.tolist()]  # one device-to-host copy
    # self-attention: the queries are the last n keys of the row
    least = max(n, 1) if pat.self_attention else 1
    for b, length in enumerate(lengths):
        if length > capacity:
            why = f"block_table holds {block_table.shape[1]} pages of {page_size} keys, at most {capacity}"
        elif length < least:
            why = (
                f"the {n} queries are the row's last keys (cache_seqlens counts them)"
                if least > 1
                else "every row holds a key"
            )
        else:
            continue
        raise SpecError(
            f"cache_seqlens[{b}] = {length} is outside [{least}, {capacity}]: {why}",
            where="argument cache_seqlens",
        )
    # one copy: the page ids that each row's length reaches are checked on the host
    table = block_table.cpu()
    reach = torch.tensor([-(-x // page_size) for x in lengths], dtype=torch.long)
    reached = torch.arange(table.shape[1]) < reach.unsqueeze(1)
    bad = reached & ((table < 0) | (table >= num_pages))
    if bool(bad.any()):
        b, j = (int(i) for i in bad.nonzero()[0])
        raise SpecError(
            f"block_table[{b}, {j}] = {int(table[b, j])} is not a page of the cache's {num_pages} "
            f"(row {b} reaches its page {j}: cache_seqlens[{b}] = {lengths[b]})",
            where="argument block_table",
            hint=f"page ids of reached pages lie in [0, {num_pages})",
        )
    by_length: dict[int, list[int]] = {}
    for b, length in enumerate(lengths):
        by_length.setdefault(length, []).append(b)
    return Pages(
        tuple(lengths),
        tuple((length, tuple(rows)) for length, rows in sorted(by_length.items())),
        page_size,
    )


def refuse_gradients(q, k_cache, v_cache, inputs: dict) -> None:
    """Paged calls are forward only: the first tensor autograd would record is named."""
    for name, t in (("q", q), ("k", k_cache), ("v", v_cache), *inputs.items()):
        if needs_grad(t):
            raise SpecError(
                f"{name} requires grad: paged KV caches are forward only (inference)",
                where=f"argument {name}",
                hint="call under torch.no_grad() or torch.inference_mode(), or train with contiguous k, v",
            )


def _cut_dims(pat, decl: ir.InputDecl) -> tuple[int, ...]:
    """The token dimensions of an input that a group cuts to its length (cross-attention: ``nk`` only; a
    combined pattern's gates are the present queries' ``[B, heads, n]``: none)."""
    if isinstance(pat, ir.CombinedIR) and any(g.name == decl.name for g in pat.gates):
        return ()
    return tuple(d for d in decl.token_dims if pat.self_attention or decl.dim_names[d] == "nk")


def _check_inputs(pat, inputs: dict, layout: str, batch: int, longest: int) -> dict:
    """Call-time inputs of a paged call, ``[heads, n, ...]`` ones in attnc's order (``"bnhd"`` takes them
    ``[n, heads, ...]``): a batch dimension of q's batch, token dimensions of at least ``longest``
    entries. Unknown names, ranks and other dimensions are left to the ordinary forward."""
    out = dict(inputs)
    for decl in pat.inputs:
        t = out.get(decl.name)
        if not isinstance(t, torch.Tensor) or t.dim() not in (len(decl.dims), len(decl.dims) + 1):
            continue
        lead = t.dim() - len(decl.dims)
        if layout == "bnhd" and decl.dim_names[:2] == ("heads", "n"):
            t = out[decl.name] = t.transpose(lead, lead + 1)
        where = f"argument {decl.name}"
        if lead and t.shape[0] != batch:
            raise SpecError(
                f"input '{decl.name}' has batch {t.shape[0]}, q {batch}: a batch dimension holds one "
                "entry per row of the block table",
                where=where,
            )
        for d in _cut_dims(pat, decl):
            if t.shape[lead + d] < longest:
                raise SpecError(
                    f"input '{decl.name}' has {t.shape[lead + d]} entries along "
                    f"{decl.dim_names[d]}; with a paged KV cache a token dimension is indexed by "
                    f"absolute position and needs max(cache_seqlens) = {longest} at least",
                    where=where,
                    hint="size it to the block table's capacity, max_pages * page_size",
                )
    return out


def _group_input(pat, name: str, t, rows: torch.Tensor, length: int):
    """An input for one group: its batch cut to the group's rows, its token dimensions to ``length``."""
    decl = next((d for d in pat.inputs if d.name == name), None)
    if (
        decl is None
        or not isinstance(t, torch.Tensor)
        or t.dim() not in (len(decl.dims), len(decl.dims) + 1)
    ):
        return t  # the ordinary forward names what is wrong
    lead = t.dim() - len(decl.dims)
    if lead:
        t = t.index_select(0, rows)
    for d in _cut_dims(pat, decl):
        t = t.narrow(lead + d, 0, length)
    return t


def _gather(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """``[num_pages, page_size, H, D]`` and a group's page ids ``[G, pages]`` -> its rows' first ``length``
    keys ``[G, H, length, D]`` (only the listed pages are read)."""
    count, reach = pages.shape
    rows = cache.index_select(0, pages.flatten()).view(
        count, reach * cache.shape[1], *cache.shape[2:]
    )
    return rows[:, :length].transpose(1, 2)


def check_pairing(block_table, cache_seqlens, cu_seqlens) -> None:
    """A paged call takes ``block_table`` and ``cache_seqlens`` together, and not ``cu_seqlens``."""
    for name, given, other in (
        ("block_table", block_table, "cache_seqlens"),
        ("cache_seqlens", cache_seqlens, "block_table"),
    ):
        if given is None:
            raise SpecError(
                f"{other} is given without {name}: a paged KV cache takes both",
                where=f"argument {name}",
            )
    if cu_seqlens is not None:
        raise SpecError(
            "cu_seqlens packs sequences along the tokens, a paged KV cache gives each row's keys by "
            "block_table and cache_seqlens: pass one or the other",
            where="argument cu_seqlens",
        )


@torch.compiler.disable  # host reads of cache_seqlens and block_table: eager under torch.compile
def run(
    forward: Callable,
    pat,
    layout: str,
    q,
    k_cache,
    v_cache,
    block_table,
    cache_seqlens,
    cu_seqlens=None,
    *,
    scale,
    return_lse: bool,
    initial_state,
    return_state: bool,
    sizes,
    inputs: dict,
):
    """The paged call: ``forward`` (the module's public forward, in ``"bhnd"``) once per group of rows of
    equal length on their gathered keys and values; returns what the module's call returns (``out``, or
    ``(out, lse)``) in ``layout``. Everything is checked before any page is read."""
    check_pairing(block_table, cache_seqlens, cu_seqlens)
    return_lse = check_flag("return_lse", return_lse)
    restore = Restore(layout)
    if layout == "bnhd" and isinstance(q, torch.Tensor) and q.dim() == 4:
        q = q.transpose(1, 2)
    check_caches(pat, q, k_cache, v_cache)
    refuse_gradients(q, k_cache, v_cache, inputs)
    pages = check_pages(pat, q, k_cache, block_table, cache_seqlens)
    inputs = _check_inputs(pat, inputs, layout, q.shape[0], max(pages.lengths, default=0))
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
            **{name: _group_input(pat, name, t, rows, length) for name, t in inputs.items()},
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
