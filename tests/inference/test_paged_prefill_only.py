"""Paged calls of the stdlib patterns that choose across a block's queries (``anchor``'s stripes, ``xattention``'s
top-p, ``combiner``'s max summaries): they are prefill methods, refused after a KV cache by their semantics, so a
paged batch serves rows whose queries are all their keys. Such a batch (rows of different lengths, each with its
own query count, shuffled pages, GQA, packed or per row) equals the float64 reference row by row on every backend
that runs it; a row with cached keys before its queries gets the contiguous call's error. Each pattern's batch is
the same launches whatever its rows' lengths (``backends.triton.paged_antidiagonal``, ``paged_stripes``: each row's
selection made on the device; ``runtime.combined_paged`` with ``paged_max_summaries``: Combiner's summaries of each
row's runs), reads nothing on the host and compiles with ``fullgraph=True``."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads
from test_paged_kv import HKV, HQ, D
from test_paged_one_launch import assert_fullgraph_is_eager, count_launches, pool

import attnc
from attnc.core.errors import SpecError
from attnc.runtime.backends.triton import paged_max_summaries

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


def _packed(lengths, page, seed):
    """A pool of rows of ``lengths`` and q packed with each row's queries, all its keys (``cu_seqlens_q``)."""
    k, v, table, seqlens, rows = pool(lengths, page, seed)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=torch.Generator().manual_seed(seed + 1))
    return q, k, v, table, seqlens, cu, rows


#: the prefill methods whose paged batch is one launch of each kernel, and those kernels
ONE_LAUNCH = {
    "anchor": ["attnc_fwd_paged"],
    "xattention": ["attnc_fwd_paged"],
    "combiner": ["attnc_fwd_paged", "attnc_paged_max_summary"],  # its own block's attention, then the summaries
}


def count_all_launches(monkeypatch) -> list:
    """The attention launches (``count_launches``) and the summary kernels' own, in order."""
    launched = count_launches(monkeypatch)
    real = paged_max_summaries.max_summaries

    def counting(kernel, *args, **kwargs):
        launched.append(kernel.__name__)
        return real(kernel, *args, **kwargs)

    monkeypatch.setattr(paged_max_summaries, "max_summaries", counting)
    return launched


@pytest.mark.parametrize("name", sorted(ONE_LAUNCH))
def test_a_prefill_batch_is_one_launch_whatever_its_lengths(name, monkeypatch):
    """Three rows of one length and three of three lengths, one capacity: one launch of each kernel, the same
    launches for both; each row the reference's."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **PREFILL_ONLY[name])
    seen = []
    for lengths in ([17, 17, 17], [5, 17, 26]):
        q, k, v, table, seqlens, cu, rows = _packed(lengths, 8, 7)
        table = torch.nn.functional.pad(table, (0, 4 - table.shape[1]), value=-1)  # one capacity for both
        launched = count_all_launches(monkeypatch)
        out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
        seen.append(launched)
        monkeypatch.undo()
        for b, want in enumerate(_reference_rows(name, q, rows, cu)):
            torch.testing.assert_close(out[:, :, int(cu[b]):int(cu[b + 1])], want.float(), rtol=2e-5, atol=2e-5)
    assert seen[0] == seen[1] == ONE_LAUNCH[name]


@pytest.mark.parametrize("name", sorted(ONE_LAUNCH))
def test_a_warm_prefill_batch_reads_nothing_on_the_host(name):
    """At its batch shape's second call and at new lengths (the rows' queries with them): no host read."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **PREFILL_ONLY[name])
    q, k, v, table, seqlens, cu, _ = _packed([9, 20, 4], 8, 3)
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    grown = torch.tensor([11, 19, 3], dtype=torch.int32)
    for lengths in (seqlens, grown):
        cu_now = torch.tensor([0, *lengths.cumsum(0).tolist()], dtype=torch.int32)
        with HostReads() as reads:
            attn(q, k, v, block_table=table, cache_seqlens=lengths, cu_seqlens_q=cu_now, layout="bhnd")
        assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("name", sorted(ONE_LAUNCH))
def test_a_prefill_batch_compiles_with_fullgraph(name):
    """Under ``torch.compile(fullgraph=True)``: the eager answer bit for bit, at a second set of lengths too."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **PREFILL_ONLY[name])
    q, k, v, table, seqlens, cu, _ = _packed([9, 20, 4], 8, 5)

    def call(q, k, v, table, seqlens, cu):
        return attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=20,
                    layout="bhnd")

    other = torch.tensor([12, 17, 4], dtype=torch.int32)
    args = (q, k, v, table, seqlens, cu)
    grown = (q, k, v, table, other, torch.tensor([0, *other.cumsum(0).tolist()], dtype=torch.int32))
    assert_fullgraph_is_eager(call, args, grown)


#: an antidiagonal route under a lagged band: a row's last, partial run reaches fewer stride tiles than the
#: capacity's (a query past the row's length would reach keys its row's queries do not)
BANDED = """pattern banded(block >= 1 = 6, stride >= 1 = 3, lag >= 0 = 1, band >= 1 = 7, threshold > 0 = 0.7)
  tokens seq
  mask q - k >= lag and q - k < band
  route topp(threshold) blocks(block) by antidiagonal(stride) keep q // block == k // block
"""


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), lag=st.integers(0, 2), band=st.integers(3, 12),
       page=st.sampled_from([3, 8]), per_row=st.booleans(), seed=st.integers(0, 2**16))
def test_a_banded_antidiagonal_route_equals_the_reference_row_by_row(lengths, lag, band, page, per_row, seed):
    """A mask other than causal (a lagged band), lengths that end inside a run: each row the reference's on its own
    keys, packed or one length per row (q ``[B, H, n, D]``, every row n keys)."""
    if per_row:
        lengths = [lengths[0]] * len(lengths)
    q, k, v, table, seqlens, cu, rows = _packed(lengths, page, seed)
    attn = attnc.compile_attention(BANDED, backend="triton", lag=lag, band=band)
    ref = attnc.compile_attention(BANDED, backend="reference", lag=lag, band=band)
    if per_row:
        n = lengths[0]
        q = q[0].view(HQ, len(lengths), n, D).transpose(0, 1)  # row b's n queries
        out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
        for b, (kb, vb) in enumerate(rows):
            want = ref(q[b:b + 1].double(), kb.double(), vb.double())
            torch.testing.assert_close(out[b:b + 1], want.float(), rtol=2e-5, atol=2e-5)
        return
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    for b, (kb, vb) in enumerate(rows):
        want = ref(q[:, :, int(cu[b]):int(cu[b + 1])].double(), kb.double(), vb.double())
        torch.testing.assert_close(out[:, :, int(cu[b]):int(cu[b + 1])], want.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=10, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), lag=st.integers(0, 2), band=st.integers(3, 12),
       seed=st.integers(0, 2**16))
def test_each_rows_stride_tiles_and_mass_are_the_contiguous_estimates_at_its_length(lengths, lag, band, seed):
    """The batch's pieces against ``plan/antidiagonal.py`` at each row's own length: the stride tiles its mask
    reaches (a row's last, partial run: its pairs below the length only) exactly, its (query block, key block) mass
    to float32 rounding."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.backends.triton import paged_antidiagonal as PA
    from attnc.runtime.backends.triton.paged_queries import queries_of
    from attnc.runtime.plan import antidiagonal

    q, k, v, table, seqlens, cu, rows = _packed(lengths, 4, seed)
    attn = attnc.compile_attention(BANDED, backend="triton", lag=lag, band=band)
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    t = next(made for key, made in attn.runner.block_plans.items() if key[0] == "paged")
    pat, stride, block, cap = attn.pattern, 3, 6, t.capacity
    qs = queries_of(q, seqlens, cu[:-1], cu[1:] - cu[:-1], True, cap)
    reach = PA._stride_reach(t, qs.lengths, stride, HQ, q.device)
    qr, kr = PA._row_vectors(qs, k, table, cap, stride, len(lengths), HQ)
    mass = PA._block_mass(qr, kr, reach, qs.lengths, block, stride, -(-cap // block))
    for b, (n, (kb, _)) in enumerate(zip(lengths, rows, strict=True)):
        bound = E.bind_sizes(pat, n=n, nk=n, heads=HQ, dk=D)
        runs, nb = -(-n // stride), -(-n // block)
        want = antidiagonal.stride_tiles(pat, bound, None, 1, stride, range(runs))[0]  # [H, runs, runs]
        got = reach[b].expand(HQ, -1, -1)
        assert torch.equal(got[:, :runs, :runs], want) and not got[:, runs:].any() and not got[:, :, runs:].any()
        rows_q = q[:, :, int(cu[b]):int(cu[b + 1])]
        want_mass = antidiagonal.block_mass(pat, bound, rows_q, kb, None, block, stride)[0]
        torch.testing.assert_close(mass[b, :, :nb, :nb], want_mass, rtol=1e-5, atol=1e-6)
        assert not mass[b, :, nb:].any() and not mass[b, :, :, nb:].any()


@pytest.mark.parametrize("keep", ["k // block >= q // block - 1", "q // block == k // block or k >= n - block"])
def test_a_keep_reaching_past_a_row_forces_none_of_the_capacitys_other_blocks(keep):
    """A ``keep`` that holds at blocks past a row's length (the table has spare pages): only the row's own blocks
    count as forced in its top-p rule, as the contiguous call of the row counts them."""
    spec = BANDED.replace("keep q // block == k // block", f"keep {keep}").replace("mask q - k >= lag and q - k < band",
                                                                                    "mask causal")
    q, k, v, table, seqlens, cu, rows = _packed([16, 9], 4, 1)
    table = torch.nn.functional.pad(table, (0, 2), value=-1)
    attn = attnc.compile_attention(spec, backend="triton", block=4, stride=2, threshold=0.5)
    ref = attnc.compile_attention(spec, backend="reference", block=4, stride=2, threshold=0.5)
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    for b, (kb, vb) in enumerate(rows):
        want = ref(q[:, :, int(cu[b]):int(cu[b + 1])].double(), kb.double(), vb.double())
        torch.testing.assert_close(out[:, :, int(cu[b]):int(cu[b + 1])], want.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 23), min_size=1, max_size=3),
    size=st.sampled_from([1, 4, 5, 17]),
    page=st.sampled_from([3, 8]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_each_rows_max_summaries_are_the_contiguous_ones(lengths, size, page, dtype, seed):
    """Combiner's summaries made from the pages (``paged_max_summaries``: each run's max query from the packed rows,
    then one launch) equal ``combined.pool_summary`` of each row's own contiguous queries, keys and values, run by
    run, the last run of a row shorter than ``size`` included; a run past a row is zeros."""
    from attnc.runtime.backends.triton.paged_queries import queries_of
    from attnc.runtime.backends.triton.runner import TritonRunner
    from attnc.runtime.combined import pool_summary

    k, v, table, seqlens, rows = pool(lengths, page, seed)
    k, v = k.to(dtype), v.to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    capacity = table.shape[1] * k.shape[1]
    runs = -(-capacity // size)
    qs = queries_of(q, seqlens, cu[:-1], cu[1:] - cu[:-1], True, capacity)
    qmax = paged_max_summaries.run_max_queries(qs, len(lengths), runs, size)
    runner = TritonRunner(attnc.load("stdlib:combiner", block=size).branches[1].pattern)
    keys, values = runner.paged_max_summaries(qmax, k, v, table, seqlens, size, 0.35)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for b, n in enumerate(lengths):
        kb, vb = rows[b][0].to(dtype), rows[b][1].to(dtype)
        want_k, want_v = pool_summary(q[:, :, int(cu[b]):int(cu[b + 1])], kb, vb, size, 0.35)
        held = -(-n // size)
        torch.testing.assert_close(keys[b, :, :held], want_k[0, ::HQ // HKV].float(), rtol=0, atol=0)
        torch.testing.assert_close(values[b, :, :held], want_v[0].float(), **tol)
        assert not keys[b, :, held:].any() and not values[b, :, held:].any()


def test_combiners_paged_call_returns_its_log_sum_exp():
    """``return_lse=True`` on a paged Combiner call (a merge into one softmax) returns each row's log-sum-exp, the
    reference's on its own keys (the paged call used to drop the flag)."""
    params = PREFILL_ONLY["combiner"]
    q, k, v, table, seqlens, cu, rows = _packed([12, 3, 21], 8, 9)
    attn = attnc.compile_attention("stdlib:combiner", backend="triton", **params)
    out, lse = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd",
                    return_lse=True)
    ref = attnc.compile_attention("stdlib:combiner", backend="reference", **params)
    for b, (kb, vb) in enumerate(rows):
        cut = slice(int(cu[b]), int(cu[b + 1]))
        want, want_lse = ref(q[:, :, cut].double(), kb.double(), vb.double(), return_lse=True)
        torch.testing.assert_close(out[:, :, cut], want.float(), rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse[:, :, cut], want_lse.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["anchor", "xattention"])
def test_a_selection_made_a_few_elements_at_a_time_is_the_same(name, monkeypatch):
    """The selections bound their memory by working a chunk at a time (AnchorAttention's groups' columns,
    XAttention's blocks each query reaches, the estimate's runs): with chunks of a few elements, many chunks, the
    batch's answer is the same bit for bit."""
    from attnc.runtime.backends.triton import paged_antidiagonal, paged_stripes

    # AnchorAttention with a narrow keep and a margin that passes some columns only, so that they count
    params = {"block": 2, "step": 2, "init": 1, "theta": -0.3} if name == "anchor" else PREFILL_ONLY[name]
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    q, k, v, table, seqlens, cu, _ = _packed([9, 26, 4], 8, 11)
    whole = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    monkeypatch.setattr(paged_stripes, "SCORE_CHUNK", 64)
    monkeypatch.setattr(paged_antidiagonal, "CHUNK_ELEMENTS", 64)
    chunked = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    assert torch.equal(chunked, whole)


@pytest.mark.parametrize("name, params", [("vertical_slash", {"vertical": 3, "slash": 2, "last_q": 4, "sinks": 1, "local": 2, "slash_min": 1}), ("landmark", {"block": 4})])
def test_query_scores_past_a_grids_second_axis_are_launched_in_parts(name, params, monkeypatch):
    """``attnc_paged_token_scores`` puts the queries on the grid's second axis, which CUDA caps at 65,535: more are
    scored in several launches (``paged_tokens.pool_scores``). With the cap at 2 queries, the batch's answer is the
    same bit for bit, from more launches."""
    from attnc.runtime.backends.triton import paged_tokens

    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    q, k, v, table, seqlens, cu, _ = _packed([9, 6, 4], 8, 13)
    grids = []
    real = paged_tokens.interpreting

    def watching(flag):  # each launch of the score kernel enters the interpreter's context once
        grids.append(flag)
        return real(flag)

    monkeypatch.setattr(paged_tokens, "interpreting", watching)
    whole = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    once = len(grids)
    monkeypatch.setattr(paged_tokens, "MAX_GRID_Y", 2)
    parts = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    assert once >= 1 and len(grids) - once > once
    assert torch.equal(parts, whole)
