"""Key summaries kept across decode steps (``attnc.KeySummary``, ``runtime.plan.kept_summary``): a step that passes
one chooses the same blocks and returns the same output as a step that summarises every key, on every backend;
it summarises only the keys after the kept blocks; it reads nothing on the host; misuse is one clear error."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads

import attnc
from attnc.core.errors import SpecError
from attnc.runtime.plan import kept_summary

os.environ.setdefault("TRITON_INTERPRET", "1")

ROUTES = {"quest": {"token_budget": 24, "page": 8}, "moba": {"block": 8, "topk": 2}}


def _cache(nk: int, dtype=torch.float64, heads=(4, 2), d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    return (torch.randn(2, Hkv, nk, d, generator=g, dtype=dtype), torch.randn(2, Hkv, nk, d, generator=g, dtype=dtype),
            lambda nq: torch.randn(2, Hq, nq, d, generator=g, dtype=dtype))


def _steps(attn, lengths, nq: int, dtype=torch.float64):
    """Each step's (out, selection) without and with a kept summary, and the summary."""
    k, v, queries = _cache(max(lengths), dtype)
    kept = attnc.KeySummary()
    pairs = []
    for nk in lengths:
        q = queries(nq)
        pairs.append((attn(q, k[:, :, :nk], v[:, :, :nk], return_selection=True),
                      attn(q, k[:, :, :nk], v[:, :, :nk], key_summary=kept, return_selection=True)))
    return pairs, kept


@pytest.mark.parametrize("name", sorted(ROUTES))
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "flex"])
def test_a_kept_summary_chooses_and_attends_as_every_key_does(name, backend):
    """A prefill, then steps of 1 and 3 queries over a cache growing by 1 to 9 keys (into new blocks and within
    one): the kept summary's selection equals the full summary's bit for bit, and so does the output."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, **ROUTES[name])
    dtype = torch.float32 if backend == "triton" else torch.float64
    lengths = [19, 20, 21, 24, 25, 33, 34, 40]
    pairs, kept = _steps(attn, lengths, 1, dtype)
    pairs += _steps(attn, [30, 31, 39, 40], 3, dtype)[0]
    for (out, chosen), (kept_out, kept_chosen) in pairs:
        assert torch.equal(chosen, kept_chosen)
        torch.testing.assert_close(kept_out, out, rtol=0, atol=0)
    assert kept.keys == 40  # blocks of 8: the last complete one ends at key 40


def test_a_step_summarises_only_the_keys_after_the_kept_blocks(monkeypatch):
    """Each step hands the summary maker the keys from its last complete block on (block - 1 kept keys at most,
    plus the new one): not the cache."""
    seen = []
    real = kept_summary.key_summary
    monkeypatch.setattr(kept_summary, "key_summary", lambda pat, k, *a: seen.append(k.shape[2]) or real(pat, k, *a))
    attn = attnc.compile_attention("stdlib:quest", backend="cpu", **ROUTES["quest"])
    k, v, queries = _cache(120)
    kept = attnc.KeySummary()
    for nk in range(100, 120):
        attn(queries(1), k[:, :, :nk], v[:, :, :nk], key_summary=kept)
    assert seen[0] == 100 and max(seen[1:]) <= 8 and kept.keys == 112


@settings(max_examples=15, deadline=None)
@given(page=st.integers(2, 9), start=st.integers(1, 30), grow=st.lists(st.integers(0, 11), min_size=1, max_size=6),
       nq=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_any_growth_keeps_the_selection(page, start, grow, nq, seed):
    """Random pages, prefill lengths and growths (by 0 keys too: a step repeated), on the host path."""
    attn = attnc.compile_attention("stdlib:quest", backend="cpu", token_budget=3 * page, page=page)
    lengths = [max(start, nq)]
    for g in grow:
        lengths.append(lengths[-1] + g)
    k, v, queries = _cache(lengths[-1], seed=seed)
    kept = attnc.KeySummary()
    for nk in lengths:
        q = queries(nq)
        want = attn(q, k[:, :, :nk], v[:, :, :nk], return_selection=True)[1]
        assert torch.equal(attn(q, k[:, :, :nk], v[:, :, :nk], key_summary=kept, return_selection=True)[1], want)
    assert kept.keys == lengths[-1] // page * page


def test_a_kept_decode_step_reads_nothing_on_the_host():
    """On the Triton backend (the interpreter: the call's device is the CPU), a step at a new length with a kept
    summary reads no value on the host (a cache longer than a KV tile: the step's template is the previous
    one's)."""
    attn = attnc.compile_attention("stdlib:quest", backend="triton", q_tile=16, **ROUTES["quest"])
    k, v, queries = _cache(42, torch.float32)
    kept = attnc.KeySummary()
    attn(queries(1), k[:, :, :40], v[:, :, :40], key_summary=kept)
    q = queries(1)
    with HostReads() as reads:
        attn(q, k[:, :, :41], v[:, :, :41], key_summary=kept)
    assert reads.total == 0, dict(reads.seen)


def test_misuse_is_one_clear_error():
    quest = attnc.compile_attention("stdlib:quest", backend="cpu", **ROUTES["quest"])
    k, v, queries = _cache(40)
    q = queries(1)
    cases = [
        (quest, dict(key_summary="bounds"), "expected an attnc.KeySummary"),
        (attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=4), {}, "has no route"),
        (attnc.compile_attention("stdlib:token_topk", backend="cpu"), {}, "single keys"),
        (attnc.compile_attention("stdlib:seer", backend="cpu", topk=2), {}, "scored from their keys"),
        (attnc.compile_attention("stdlib:gla", backend="cpu"), {}, "gla"),
        (quest, dict(selection=torch.ones(2, 4, 1, 5, dtype=torch.bool)), "given selection"),
    ]
    for attn, kwargs, words in cases:
        kwargs.setdefault("key_summary", attnc.KeySummary())
        with pytest.raises(SpecError, match=words) as err:
            attn(q, k, v, **kwargs)
        assert err.value.where == "argument key_summary"
    kept = attnc.KeySummary()
    quest(q, k, v, key_summary=kept)
    with pytest.raises(SpecError, match="covers 40 keys and the call has 33") as err:
        quest(q, k[:, :, :33], v[:, :, :33], key_summary=kept)
    with pytest.raises(SpecError, match=r"not bounds of blocks of 8 keys, k \[1, 2") as err:
        quest(q[:1], k[:1], v[:1], key_summary=kept)
    assert err.value.where == "argument key_summary" and kept.keys == 40
    kept.reset()
    quest(q[:1], k[:1, :, :33], v[:1, :, :33], key_summary=kept)
    assert kept.keys == 32


def test_a_call_again_at_a_blocks_end_reads_the_kept_blocks():
    """A second call on the same cache, its length a whole number of blocks: nothing after the kept blocks."""
    for name in sorted(ROUTES):
        attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu", **ROUTES[name])
        k, v, queries = _cache(24)
        kept = attnc.KeySummary()
        q = queries(1)
        first = attn(q, k, v, key_summary=kept, return_selection=True)
        again = attn(q, k, v, key_summary=kept, return_selection=True)
        assert kept.keys == 24 and torch.equal(first[1], again[1]) and torch.equal(first[0], again[0])


def _paged(lengths, page, seed, heads=(4, 2), d=8):
    """Rows of ``lengths`` keys in shuffled pages of ``page`` keys, a table with room for 24 keys more per row
    (float32, as the paged kernel runs): ``(k_pool, v_pool, table)``."""
    g = torch.Generator().manual_seed(seed)
    width = -(-(max(lengths) + 24) // page)
    pages = len(lengths) * width
    k = torch.randn(pages, page, heads[1], d, generator=g)
    v = torch.randn(pages, page, heads[1], d, generator=g)
    return k, v, torch.randperm(pages, generator=g).view(len(lengths), width).to(torch.int32)


def _row(pool, table, b: int, n: int) -> torch.Tensor:
    page = pool.shape[1]
    return pool[table[b, : -(-n // page)].long()].flatten(0, 1)[:n].transpose(0, 1)[None].double()


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_a_kept_summary_serves_a_paged_pool(name):
    """A decode loop over a paged pool (rows of their own lengths, each growing by one key a step) with one
    ``KeySummary``: every step equals the reference row by row; after each step the summary keeps each row's
    complete blocks; a kept block is read, not made again (keys changed under it after the fact, against the
    promise, leave its summary as it was); a row whose length falls below its kept blocks (a new sequence) and a
    row reset by ``reset_rows`` are summarised again."""
    params = ROUTES[name]
    block = params.get("block", params.get("page"))
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
    k, v, table = _paged([21, 9, 30], 4, seed=3)
    kept = attnc.KeySummary()
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([21, 9, 30], dtype=torch.int32)

    def step(check: bool = True):
        q = torch.randn(3, 4, 1, 8, generator=g)
        out = attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", key_summary=kept)
        for b in range(3 if check else 0):
            n = int(lengths[b])
            want = ref(q[b:b + 1].double(), _row(k, table, b, n), _row(v, table, b, n))
            torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)

    for _ in range(3):
        step()
        assert torch.equal(kept._pages[1], (lengths // block).to(torch.int32))
        lengths += 1
    summaries = kept._pages[0].clone()
    first = table[0, 0].long()
    k[first] += 100.0  # row 0's first block changes under its kept summary (the caller's promise broken)
    step(check=False)
    torch.testing.assert_close(kept._pages[0][:, 0, :, 0], summaries[:, 0, :, 0])  # read, not made again
    k[first] -= 100.0
    lengths[1] = 5  # row 1 starts a new, shorter sequence: summarised again by itself
    kept.reset_rows(torch.tensor([2]))  # row 2 is told so
    step()
    assert torch.equal(kept._pages[1], (lengths // block).to(torch.int32))
    # rows outside the table, of another kind, or a mask of another length: refused, nothing reset (-1 reset the
    # last row without a word; a float index raised torch's IndexError)
    before = kept._pages[1].clone()
    for rows, says in ((torch.tensor([-1]), "outside 0..2"), (torch.tensor([3]), "outside 0..2"),
                       (torch.tensor([1.0]), "expected row indices"), (torch.ones(2, dtype=torch.bool), "3 rows"),
                       ("1", "expected row indices")):
        with pytest.raises(SpecError, match=says) as err:
            kept.reset_rows(rows)
        assert err.value.where == "argument rows"
    assert torch.equal(kept._pages[1], before)
    kept.reset_rows([0, 1])
    assert torch.equal(kept._pages[1][:2], torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_a_kept_paged_summary_follows_rows_reordered_or_given_other_pages(name):
    """Serving stacks reorder and filter a batch's rows between steps (vLLM's persistent batch, SGLang's batches): the
    same table row then holds another sequence. Its kept blocks were used as they were, summaries of the other
    sequence's keys, without a word unless the caller said ``reset_rows``; the rows' answers were wrong. Each kept
    block now remembers its pages: a block whose pages the row does not hold now is summarised again. Rows swapped,
    then a row given a new sequence on other pages at a greater length: every step equals the reference."""
    params = ROUTES[name]
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
    k, v, table = _paged([33, 17, 40], 4, seed=8)
    lengths = torch.tensor([33, 17, 40], dtype=torch.int32)
    kept = attnc.KeySummary()
    g = torch.Generator().manual_seed(9)

    def step(table, lengths):
        q = torch.randn(3, 4, 1, 8, generator=g)
        out = attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", key_summary=kept)
        for b in range(3):
            n = int(lengths[b])
            want = ref(q[b:b + 1].double(), _row(k, table, b, n), _row(v, table, b, n))
            torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)

    step(table, lengths)
    order = torch.tensor([2, 0, 1])  # the batch reordered: row 0 now holds the sequence row 2 held
    table, lengths = table[order].contiguous(), lengths[order].contiguous()
    step(table, lengths)
    # row 1's sequence ends; a new one of 36 keys takes row 1, its pages handed out in another order
    table[1], lengths[1] = table[1].roll(3), 36
    step(table, lengths)
    # a table of another width with as many blocks (pages of 4, blocks of 8: 16 and 15 pages make 8 blocks): taken,
    # the kept blocks of the pages it keeps kept (it was refused, naming the width)
    step(table[:, :15].contiguous(), lengths)


def test_a_kept_summary_of_a_paged_call_is_refused_where_it_would_be_dropped():
    """A paged call the one launch does not serve (the CPU backend gathers the rows) refuses ``key_summary=`` by
    name rather than summarising each group of rows with one row's summary; a kept paged summary then called on a
    contiguous cache names both shapes."""
    k, v, table = _paged([21, 9], 4, seed=5)
    q = torch.randn(2, 4, 1, 8)
    lengths = torch.tensor([21, 9], dtype=torch.int32)
    cpu = attnc.compile_attention("stdlib:moba", backend="cpu", **ROUTES["moba"])
    with pytest.raises(SpecError, match="only where it runs in one launch") as err:
        cpu(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", key_summary=attnc.KeySummary())
    assert err.value.where == "argument key_summary"
    kept = attnc.KeySummary()
    tri = attnc.compile_attention("stdlib:moba", backend="triton", **ROUTES["moba"])
    tri(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", key_summary=kept)
    with pytest.raises(SpecError, match="of a paged pool") as err:
        tri(q, torch.randn(2, 2, 30, 8), torch.randn(2, 2, 30, 8), key_summary=kept)
    assert err.value.where == "argument key_summary"


def test_a_refused_paged_call_keeps_nothing_of_its_bad_values():
    """A paged call refused for a page id outside the pool (its rows' summaries made from clamped ids) leaves the
    open ``KeySummary`` keeping none of that row's blocks: the next call with the right table equals the
    reference."""
    params = ROUTES["moba"]
    attn = attnc.compile_attention("stdlib:moba", backend="triton", **params)
    ref = attnc.compile_attention("stdlib:moba", backend="reference", **params)
    k, v, table = _paged([21, 30], 4, seed=6)
    lengths = torch.tensor([21, 30], dtype=torch.int32)
    q = torch.randn(2, 4, 1, 8, generator=torch.Generator().manual_seed(7))
    kept = attnc.KeySummary()
    bad = table.clone()
    bad[0, 1] = 10_000
    with pytest.raises(SpecError, match="block_table"):
        attn(q, k, v, block_table=bad, cache_seqlens=lengths, layout="bhnd", key_summary=kept)
    assert int(kept._pages[1][0]) == 0  # the refused row keeps no block
    out = attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", key_summary=kept)
    for b in range(2):
        n = int(lengths[b])
        want = ref(q[b:b + 1].double(), _row(k, table, b, n), _row(v, table, b, n))
        torch.testing.assert_close(out[b:b + 1].double(), want, atol=2e-5, rtol=2e-5)
