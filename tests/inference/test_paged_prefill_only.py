"""Paged calls of the stdlib patterns that choose across a block's queries (``anchor``'s stripes, ``xattention``'s
top-p, ``combiner``'s max summaries): they are prefill methods, refused after a KV cache by their semantics, so a
paged batch serves rows whose queries are all their keys. Such a batch (rows of different lengths, each with its
own query count, shuffled pages, GQA, packed or per row) equals the float64 reference row by row on every backend
that runs it; a row with cached keys before its queries gets the contiguous call's error. These calls take the path
by length (``frontends.paged_gather``): their selection reads every query of a block."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_paged_kv import HQ, D
from test_paged_one_launch import pool

import attnc
from attnc.core.errors import SpecError

os.environ.setdefault("TRITON_INTERPRET", "1")

#: each pattern at small sizes: blocks of a few queries, so rows of a few blocks choose
PREFILL_ONLY = {
    "anchor": {"block": 3, "step": 2, "init": 4, "theta": 0.5},
    "xattention": {"block": 4, "stride": 2, "threshold": 0.8, "chunk": 8},
    "combiner": {"block": 5},
}


def _reference_rows(name, q, rows, cu):
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **PREFILL_ONLY[name])
    return [ref(q[:, :, int(cu[b]):int(cu[b + 1])].double(), kb.double(), vb.double()) for b, (kb, vb) in
            enumerate(rows)]


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(sorted(PREFILL_ONLY)),
    backend=st.sampled_from(["triton", "cpu"]),
    lengths=st.lists(st.integers(1, 26), min_size=1, max_size=3),
    page=st.sampled_from([3, 8]),
    seed=st.integers(0, 2**16),
)
def test_packed_prefill_rows_equal_the_reference_row_by_row(name, backend, lengths, page, seed):
    """Packed rows (``cu_seqlens_q``), each holding all its keys' queries, over shuffled pages, 4 query heads on
    2 K/V heads: each row is the reference's call on its own keys."""
    k, v, table, seqlens, rows = pool(lengths, page, seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=torch.Generator().manual_seed(seed + 1))
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, **PREFILL_ONLY[name])
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    for b, want in enumerate(_reference_rows(name, q, rows, cu)):
        torch.testing.assert_close(out[:, :, int(cu[b]):int(cu[b + 1])], want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(PREFILL_ONLY))
def test_rows_of_one_length_in_the_bnhd_layout(name):
    """q ``[B, n, Hq, D]`` (flash-attn's order), every row's n queries all its n keys, on the Triton backend."""
    lengths = [13, 13]
    k, v, table, seqlens, rows = pool(lengths, 8, 3)
    q = torch.randn(2, 13, HQ, D, generator=torch.Generator().manual_seed(4))
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", layout="bnhd", **PREFILL_ONLY[name])
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens)
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **PREFILL_ONLY[name])
    for b, (kb, vb) in enumerate(rows):
        want = ref(q[b:b + 1].transpose(1, 2).double(), kb.double(), vb.double())
        torch.testing.assert_close(out[b:b + 1].transpose(1, 2), want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", sorted(PREFILL_ONLY))
def test_a_row_with_cached_keys_before_its_queries_gets_the_contiguous_calls_error(name):
    """Row 1's 4 queries after 5 cached keys: refused as the contiguous call of that row is, naming the argument."""
    lengths = [9, 9]
    k, v, table, seqlens, rows = pool(lengths, 4, 5)
    cu = torch.tensor([0, 9, 13], dtype=torch.int32)
    q = torch.randn(1, HQ, 13, D, generator=torch.Generator().manual_seed(6))
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **PREFILL_ONLY[name])
    with pytest.raises(SpecError) as paged:
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    with pytest.raises(SpecError) as plain:
        attn(q[:, :, 9:13], rows[1][0], rows[1][1], layout="bhnd")
    assert (paged.value.message, paged.value.where) == (plain.value.message, plain.value.where)
    assert "KV cache" in paged.value.message
