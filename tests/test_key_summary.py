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
