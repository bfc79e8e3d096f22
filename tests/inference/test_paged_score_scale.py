"""A pattern's ``scale E`` clause on a paged batch in one launch (``backends.triton.paged_queries.score_scaled``):
each query times E at its own absolute position, head and row (``n``, ``nk`` its row's keys, ``nq`` its row's
queries), made on the device. Every row equals the float64 reference's call on that row's own keys; a warm call
reads nothing on the host; the call compiles with ``fullgraph=True``; a scale that is not finite is refused by
name."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads
from test_paged_kv import HKV, HQ, D
from test_paged_one_launch import count_launches, pool

import attnc
from attnc.core.errors import SpecError

os.environ.setdefault("TRITON_INTERPRET", "1")

#: a scale that reads every size a paged row holds of its own, and the head
ROW_SIZES = (
    "pattern row_scaled\n  tokens seq\n  mask causal and q - k < 9\n"
    "  scale 1 + h / 4 + log(nk) / 3 + n / 64\n"
)
#: a scale that is -inf at the first position
NOT_FINITE = "pattern log_position\n  tokens seq\n  mask causal\n  scale log(q)\n"


def _rows_equal_the_reference(spec, params, lengths, counts, page, seed, layout, kv_heads=HKV):
    """Each row of a packed paged call (``counts`` queries per row) against the reference on its own keys."""
    k, v, table, seqlens, rows = pool(lengths, page, seed)
    if kv_heads != HKV:  # fewer K/V heads: the pools' first
        k, v = k[:, :, :kv_heads].contiguous(), v[:, :, :kv_heads].contiguous()
        rows = [(kb[:, :kv_heads], vb[:, :kv_heads]) for kb, vb in rows]
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=gen)
    attn = attnc.compile_attention(spec, backend="triton", layout=layout, **params)
    ref = attnc.compile_attention(spec, backend="reference", **params)
    given_q = q if layout == "bhnd" else q.transpose(1, 2)
    out, lse = attn(given_q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, return_lse=True)
    if layout == "bnhd":
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        want, want_lse = ref(q[:, :, lo:hi].double(), kb.double(), vb.double(), return_lse=True)
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse[:, :, lo:hi], want_lse.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 37), min_size=1, max_size=4),
    page=st.sampled_from([3, 8, 16]),
    causal=st.booleans(),
    p=st.sampled_from([0.5, 1.0, 2.0]),
    layout=st.sampled_from(["bhnd", "bnhd"]),
    kv_heads=st.sampled_from([1, HKV]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_softplus_rows_equal_the_reference_row_by_row(lengths, page, causal, p, layout, kv_heads, seed, data):
    """LSSA's scale, log(d) log(q + 1) causally and log(d) log(nk) otherwise: each query's at its own position and
    its own row's key count, over rows of any lengths and query counts, GQA and MQA, both layouts."""
    counts = [data.draw(st.integers(1, n)) for n in lengths]
    _rows_equal_the_reference("stdlib:softplus", {"is_causal": causal, "p": p}, lengths, counts, page, seed, layout,
                              kv_heads)


def test_a_scale_of_the_heads_and_the_rows_own_sizes_is_each_rows():
    """A scale reading h, n and nk: each row's own key count, not the table's capacity."""
    _rows_equal_the_reference(ROW_SIZES, {}, [5, 17, 40, 23], [1, 3, 2, 23], 8, 0, "bhnd")


#: routes scored by the scaled queries: a scale that changes sign per head reorders their choice
ROUTED = {
    "blocks": "pattern moba_neg(block >= 1 = 4, topk >= 1 = 2)\n  tokens seq\n  mask causal\n"
              "  route topk(topk) blocks(block) by q @ mean(k) keep q // block == k // block\n  scale 0 - 1 - h / 8\n",
    "tokens": "pattern topk_neg(topk >= 1 = 3)\n  tokens seq\n  mask causal\n  route topk(topk) tokens by q @ k\n"
              "  scale 0 - 1 - h / 8\n",
}


@pytest.mark.parametrize("route", sorted(ROUTED))
@pytest.mark.parametrize("packed", [False, True])
def test_a_route_chooses_by_the_scaled_queries(route, packed, monkeypatch):
    """A block route and a token route under a negative scale per head, packed rows and rows of q: one launch,
    each row the reference's (whose routes score q times the scale, as the contiguous call's do)."""
    lengths, counts = [20, 27, 9], [3, 5, 1]
    if packed:
        _rows_equal_the_reference(ROUTED[route], {}, lengths, counts, 4, 1, "bhnd")
        return
    k, v, table, seqlens, rows = pool(lengths, 4, 1)
    q = torch.randn(3, HQ, 1, D, generator=torch.Generator().manual_seed(2))
    attn = attnc.compile_attention(ROUTED[route], backend="triton")
    ref = attnc.compile_attention(ROUTED[route], backend="reference")
    launched = count_launches(monkeypatch)
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert "attnc_fwd_paged" in launched
    for b, (kb, vb) in enumerate(rows):
        want = ref(q[b:b + 1].double(), kb.double(), vb.double())
        torch.testing.assert_close(out[b:b + 1], want.float(), rtol=2e-5, atol=2e-5)


def test_a_scaled_batch_is_one_launch_and_reads_nothing_on_the_host(monkeypatch):
    """One ``attnc_fwd_paged`` launch, rows of per-row queries; a warm call, and one at new lengths, read nothing
    on the host."""
    attn = attnc.compile_attention("stdlib:softplus", backend="triton")
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    q = torch.randn(3, HQ, 2, D)
    launched = count_launches(monkeypatch)
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert [n for n in launched if n != "attnc_fwd_combine"] == ["attnc_fwd_paged"]
    for lengths in (seqlens, torch.tensor([13, 31, 8], dtype=torch.int32)):
        with HostReads() as reads:
            attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd")
        assert reads.total == 0, dict(reads.seen)


def test_a_scaled_paged_call_compiles_with_fullgraph():
    """Under ``torch.compile(fullgraph=True)`` the scaled call is the paged op: the eager answer bit for bit, at a
    second length too."""
    attn = attnc.compile_attention("stdlib:softplus", backend="triton", is_causal=False)
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    q = torch.randn(3, HQ, 1, D)

    def call(q, k, v, table, seqlens):
        return attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")

    grown = torch.tensor([13, 31, 8], dtype=torch.int32)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        got, got_grown = compiled(q, k, v, table, seqlens), compiled(q, k, v, table, grown)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, call(q, k, v, table, seqlens), rtol=0, atol=0)
    torch.testing.assert_close(got_grown, call(q, k, v, table, grown), rtol=0, atol=0)


def test_a_scale_that_is_not_finite_is_refused_by_name():
    """log(q) is -inf at position 0: the paged call names argument q, as the contiguous call does; a batch whose
    queries all stand past position 0 runs."""
    attn = attnc.compile_attention(NOT_FINITE, backend="triton")
    k, v, table, _, _ = pool([8, 8], 8)
    cu = torch.tensor([0, 8, 9], dtype=torch.int32)  # row 0's queries from position 0
    q = torch.randn(1, HQ, 9, D)
    with pytest.raises(SpecError) as info:
        attn(q, k, v, block_table=table, cache_seqlens=torch.tensor([8, 8], dtype=torch.int32), cu_seqlens_q=cu,
             layout="bhnd")
    assert info.value.where == "argument q" and "log(q)" in info.value.message
    with pytest.raises(SpecError) as plain:
        attn(q[:, :, :8], k[:1, :8].transpose(1, 2), v[:1, :8].transpose(1, 2), layout="bhnd")
    assert plain.value.where == "argument q"
    out = attn(q[0, :, :4].reshape(HQ, 2, 2, D).transpose(0, 1), k, v, block_table=table, cache_seqlens=torch.tensor([8, 8], dtype=torch.int32),
               layout="bhnd")
    assert torch.isfinite(out).all()
