"""A contiguous KV cache read as pages by ``attnc_fwd_paged`` (``triton.paged``): a decode step over a cache that
grows by a key every step plans nothing per length.

A decode loop over a contiguous cache (``[B, Hkv, nk, D]``, nk one more at every step, as transformers' caches grow)
calls with a new shape at every step, so no launch bound for one signature is ever replayed, and the ordinary call
plans its tile lists again at each length (274 us of host work a step on a 2-core CPU, 46x one tiny SDPA call;
0.6-0.9 ms a step on an H100 against SDPA's 0.14-0.21). The paged kernel reads each key through a block table and
takes each row's length from a device tensor, its lists made once per capacity: so the cache is given to it as pages
of ``P`` consecutive keys of a row, its block table ``table[b, j] = b * (batch stride / (P * key stride)) + j`` (made
once per batch shape and capacity, ``_table``), its lengths ``nk`` for every row (``view``). The pages are views of the
cache's own memory (``as_strided`` with the page's stride ``P`` keys): nothing is copied. A cache kept in one buffer
(sliced at each step) gives the same pools at every step, so the paged launch bound at its second step is replayed
after (``WarmCalls``); a cache grown by ``torch.cat`` gives new pools at every step, each run by the paged kernel
unbound, which plans nothing per length either. ``P`` is the largest power of two
up to ``PAGE`` that divides a row's stride in keys and keeps every page a row may read inside the cache's storage
(one key where nothing larger does).

It serves a call where the paged kernel answers exactly what the ordinary call answers: a pattern it serves
(``TritonRunner.pages_in_one_launch``) with no ``scale`` clause (the module's call has folded it into q already), at most ``MAX_QUERIES`` queries after a cache of more keys (the queries are
the last of the keys, the KV-cache convention of both), q, k, v of the same batch and device, k and v of one shape
(contiguous head dim). The capacity is ``nk`` rounded up to a power of two (at least ``MIN_CAPACITY``): a template
and its lists serve every length up to it.
"""

from __future__ import annotations

import dataclasses

import torch

from ....compiler.cost.decode_cost import PACKED_ROWS
from ....core import ir
from ...plan.cache import PlanCache

#: The most queries of a call served as pages (decode steps, speculative tokens, short chunks after the cache).
MAX_QUERIES = PACKED_ROWS
#: The largest page (keys) a cache is read in.
PAGE = 64
#: The smallest capacity a template is made for (its lists), in keys.
MIN_CAPACITY = 1024


def applies(runner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``q`` after the cache ``k``, ``v`` (``[B, H, n, D]``) is served as pages (module docstring)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        return False
    if getattr(runner.pattern, "score_scale", None) is not None:  # the module's call folded it into q: not twice
        return False
    rows, keys = q.shape[2], k.shape[2]
    return (0 < rows <= MAX_QUERIES and max(rows + 1, _least_keys(runner)) <= keys and q.shape[0] == k.shape[0] > 0
            and q.device == k.device == v.device and runner.pages_in_one_launch(q, k.transpose(1, 2), v.transpose(1, 2)))


def _least_keys(runner) -> int:
    """The fewest keys the runner's pattern takes (its windows fit them: ``ir.least_length``), found once: a cache
    shorter than that takes the ordinary call, which names the window that does not fit."""
    least = runner.__dict__.get("_least_keys")
    if least is None:
        pat = runner.pattern
        least = runner.__dict__["_least_keys"] = ir.least_length(pat) if isinstance(pat, ir.PatternIR) else 1
    return least


@dataclasses.dataclass(frozen=True)
class CachePages:
    """A contiguous cache read as pages (``view``): the pools, block table and lengths of the paged call, and what
    lets a later step of the same buffer reuse them (``serves``): the caches' first keys' addresses and strides, and
    the most keys the pools and table hold (the capacity, and the last page a row may read inside the storage)."""

    k_pool: torch.Tensor
    v_pool: torch.Tensor
    table: torch.Tensor
    lengths: torch.Tensor
    where: tuple  # (k's data pointer, v's, k's strides, v's strides)
    most_keys: int
    least_keys: int  # the pattern's fewest (``applies``)

    def serves(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether a step whose caches ``k``, ``v`` differ from this one's in their keys' count only (the caller
        checked their other dimensions, and that they hold more keys than the step's queries) reads the same pools
        and table: the same first keys and strides, and from ``least_keys`` to ``most_keys`` keys, as many in v as
        in k."""
        return (self.least_keys <= k.shape[2] <= self.most_keys and v.shape[2] == k.shape[2]
                and (k.data_ptr(), v.data_ptr(), k.stride(), v.stride()) == self.where)

    def at(self, keys: int, device) -> torch.Tensor:
        """The lengths of a step of ``keys`` keys (a new int32 tensor: a launch may still read the last one)."""
        return _lengths(self.table.shape[0], keys, device)


def view(runner, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> CachePages | None:
    """The paged call that reads ``q`` ``[B, Hq, rows, D]`` after the contiguous cache ``k``, ``v`` ``[B, Hkv, nk,
    D | Dv]`` as ``attnc_fwd_paged`` takes it (``CachePages``), or None where the cache's strides make no pages (a
    key stride that does not divide the batch stride, page ids past int32). The pools hold every page that fits in
    the caches' storage, so a cache kept in one buffer gives the same pools, and table, at every step: a launch
    bound for them is replayed as it grows."""
    batch, keys = k.shape[0], k.shape[2]
    kl, vl = _layout(k), _layout(v)  # read once: a step's host work is counted in microseconds
    page = _page(kl, vl, keys)
    if page is None:
        return None
    capacity = max(MIN_CAPACITY, 1 << (keys - 1).bit_length())
    per_row = kl[1][0] // (page * kl[1][2])  # pages between two rows' first keys
    if (batch - 1) * per_row + -(-capacity // page) >= 2**31:  # page ids past int32 (the table's type)
        return None
    table = _table(runner, batch, per_row, -(-capacity // page), q.device)
    most = min(capacity, _most_keys(kl, page), _most_keys(vl, page))
    return CachePages(_pages(k, kl, page), _pages(v, vl, page), table, _lengths(batch, keys, q.device),
                      (k.data_ptr(), v.data_ptr(), kl[1], vl[1]), most, _least_keys(runner))


def _lengths(rows: int, keys: int, device) -> torch.Tensor:
    """Every row's length, ``keys`` (int32 ``[rows]``: a new tensor, as a launch may still read the last one)."""
    return torch.full((rows,), keys, dtype=torch.int32, device=device)


def _layout(t: torch.Tensor) -> tuple:
    """``(shape, strides, storage offset, storage elements)`` of ``t``."""
    return t.shape, t.stride(), t.storage_offset(), t.untyped_storage().nbytes() // t.element_size()


def _page(kl: tuple, vl: tuple, keys: int) -> int | None:
    """The largest power of two up to ``PAGE`` that divides both caches' row strides in keys and keeps the last
    row's pages in their storage; None where a row's stride is not a whole number of keys (``kl``, ``vl``: the
    caches' ``_layout``)."""
    ks, vs = kl[1], vl[1]
    if ks[2] <= 0 or vs[2] <= 0 or ks[0] % ks[2] or vs[0] % vs[2] or ks[0] // ks[2] != vs[0] // vs[2]:
        return None
    page = PAGE
    while page > 1 and not (_fits(kl, page, keys) and _fits(vl, page, keys)):
        page //= 2
    return page


def _fits(layout: tuple, page: int, keys: int) -> bool:
    """Whether pages of ``page`` keys of a cache's rows tile its row stride and the last page a row reads (its keys
    rounded up to the page) lies inside its storage."""
    stride = layout[1]
    return (stride[0] // stride[2]) % page == 0 and keys <= _most_keys(layout, page)


def _most_keys(layout: tuple, page: int) -> int:
    """The most keys a row may hold for its last page of ``page`` keys to lie inside the cache's storage (a whole
    number of pages)."""
    shape, stride, offset, stored = layout
    rest = offset + (shape[0] - 1) * stride[0] + (shape[1] - 1) * stride[1] + (shape[3] - 1) * stride[3]
    reach = (stored - 1 - rest) // stride[2] + 1  # the keys up to the last one inside the storage
    return reach // page * page


def _pages(t: torch.Tensor, layout: tuple, page: int) -> torch.Tensor:
    """``t`` ``[B, H, n, D]`` as the pool ``[pages, page, H, D]`` its block table reads (a view): every page of
    ``page`` keys from its first whose reach (its heads and head dim) lies inside its storage."""
    shape, stride, offset, stored = layout
    reach = (shape[1] - 1) * stride[1] + (shape[3] - 1) * stride[3] + (page - 1) * stride[2]
    pages = (stored - offset - reach - 1) // (page * stride[2]) + 1
    return t.as_strided((pages, page, shape[1], shape[3]), (page * stride[2], stride[2], stride[1], stride[3]))


def _table(runner, batch: int, per_row: int, width: int, device) -> torch.Tensor:
    """The block table of ``batch`` rows ``per_row`` pages apart, ``width`` pages each (int32), kept per shape."""
    tables = runner.__dict__.setdefault("_cache_tables", PlanCache(8))
    key = (batch, per_row, width, device)
    made = tables.get(key)
    if made is None:
        rows = torch.arange(batch, dtype=torch.int64).view(-1, 1) * per_row
        made = (rows + torch.arange(width, dtype=torch.int64)).to(torch.int32).to(device)
        tables[key] = made
    return made


__all__ = ["MAX_QUERIES", "CachePages", "applies", "view"]
