"""FlashInfer's page layout (``kv_indptr``, ``kv_indices``, ``kv_last_page_len``) as a block table
(``attnc.block_table_from_indptr``): the table and lengths a loop over the layout's rule builds, a paged call on them
equal to each row's keys gathered by hand from the flat page list, nothing read on the host, bad values named."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads

import attnc
from attnc.core.errors import SpecError


def _by_hand(indptr: list[int], indices: list[int], last: list[int], page: int, width: int):
    """The layout's rule as a loop: row b's pages in order, -1 past them; its keys (pages - 1) * page + last."""
    table = torch.full((len(last), width), -1, dtype=torch.int32)
    lengths = []
    for b in range(len(last)):
        ids = indices[indptr[b]:indptr[b + 1]]
        table[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        lengths.append((len(ids) - 1) * page + last[b] if ids else 0)
    return table, torch.tensor(lengths, dtype=torch.int32)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=6), st.integers(1, 16), st.integers(0, 3), st.data())
def test_the_table_is_the_layouts_rule(pages, page, spare, data):
    indptr = [0]
    for n in pages:
        indptr.append(indptr[-1] + n)
    indices = data.draw(st.permutations(range(indptr[-1] + spare)))[: indptr[-1]]
    last = [data.draw(st.integers(1, page)) if n else 0 for n in pages]
    width = max(pages) + spare + 1
    table, lengths = attnc.block_table_from_indptr(
        torch.tensor(indptr, dtype=torch.int32), torch.tensor(indices, dtype=torch.int32),
        torch.tensor(last, dtype=torch.int32), page_size=page, max_pages=width)
    want_table, want_lengths = _by_hand(indptr, indices, last, page, width)
    assert table.dtype == torch.int32 and lengths.dtype == torch.int32
    assert torch.equal(table, want_table) and torch.equal(lengths, want_lengths)


def test_a_paged_call_on_the_layout_equals_each_rows_keys_gathered_from_the_flat_list():
    """Rows of 3, 1 and 0 pages of 4 keys (the last ones holding 2, 4 and no key), shuffled page ids, one decode query
    per row (a row of no key, no query: cu_seqlens_q): each row equals the float64 reference over its keys gathered
    page by page from ``kv_indices``; nothing is read on the host."""
    g = torch.Generator().manual_seed(0)
    page, hkv = 4, 2
    k_pool, v_pool = (torch.randn(9, page, hkv, 8, generator=g) for _ in range(2))
    indptr = torch.tensor([0, 3, 4, 4], dtype=torch.int32)
    indices = torch.tensor([7, 2, 5, 0], dtype=torch.int32)
    last = torch.tensor([2, 4, 0], dtype=torch.int32)
    q = torch.randn(1, 4, 2, 8, generator=g)
    cu = torch.tensor([0, 1, 2, 2], dtype=torch.int32)
    attn = attnc.compile_attention("stdlib:sliding_window", window=6, backend="triton", layout="bhnd")
    table, lengths = attnc.block_table_from_indptr(indptr, indices, last, page_size=page, max_pages=4)
    out = attn(q, k_pool, v_pool, block_table=table, cache_seqlens=lengths, cu_seqlens_q=cu)
    with HostReads() as reads:
        table, lengths = attnc.block_table_from_indptr(indptr, indices, last, page_size=page, max_pages=4)
    assert reads.total == 0, dict(reads.seen)
    ref = attnc.compile_attention("stdlib:sliding_window", window=6, backend="reference")
    for b, (lo, hi) in enumerate(((0, 3), (3, 4))):
        n = (hi - lo - 1) * page + int(last[b])
        ids = indices[lo:hi].long()
        k_b = k_pool[ids].flatten(0, 1)[:n].transpose(0, 1)[None].double()
        v_b = v_pool[ids].flatten(0, 1)[:n].transpose(0, 1)[None].double()
        want = ref(q[:, :, b : b + 1].double(), k_b, v_b)
        torch.testing.assert_close(out[:, :, b : b + 1].double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("change, where, says", [
    ({"indptr": [1, 3, 4, 4]}, "kv_indptr", "must start at 0"),
    ({"indptr": [0, 3, 2, 4]}, "kv_indptr", "non-decreasing"),
    ({"indptr": [0, 3, 4, 6]}, "kv_indptr", "past kv_indices' 4 page ids"),
    ({"max_pages": 2}, "max_pages", "row 0 has 3 pages, more than max_pages = 2"),
    ({"last": [5, 4, 0]}, "kv_last_page_len", r"kv_last_page_len\[0\] = 5: a last page holds 1 to 4 keys"),
    ({"last": [2, 0, 0]}, "kv_last_page_len", r"kv_last_page_len\[1\] = 0"),
    ({"last": [2, 4, 1]}, "kv_last_page_len", "for a row of no page"),
    ({"dtype": torch.int64}, "kv_indptr", "expected a 1-D int32 tensor"),
    ({"last": [2, 4]}, "kv_last_page_len", "B \\+ 1 and B"),
    ({"max_pages": 0}, "max_pages", "a positive int"),
    ({"indptr": [], "last": []}, "kv_indptr", "kv_indptr is empty"),
])
def test_bad_layouts_are_named(change, where, says):
    indptr = torch.tensor(change.get("indptr", [0, 3, 4, 4]), dtype=change.get("dtype", torch.int32))
    indices = torch.tensor([7, 2, 5, 0], dtype=torch.int32)
    last = torch.tensor(change.get("last", [2, 4, 0]), dtype=torch.int32)
    with pytest.raises(SpecError, match=says) as err:
        attnc.block_table_from_indptr(indptr, indices, last, page_size=4, max_pages=change.get("max_pages", 4))
    assert err.value.where == f"argument {where}"
