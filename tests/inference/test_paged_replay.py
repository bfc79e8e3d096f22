"""Warm paged calls replayed (``runtime.warm_calls``: ``paged_key``, ``paged_call``; ``backends.triton.paged.bind``):
a signature of tensors' shapes seen twice binds its launches, and every later call of it (a decode loop over a
growing cache, offsets of other query counts) replays them with no host check and no host read. Each replayed step
equals a dense float64 reference row by row; rows past the last offset stay zeros with an lse of -inf at every
replay; a bad value at a replayed call is still one SpecError naming the argument (the kernel's row check)."""

import os

import pytest
import torch
from test_host_reads import HostReads
from test_paged_kv import HQ, D, paged_cache

import attnc
from attnc.core.errors import SpecError
from attnc.runtime.backends.triton import paged as triton_paged
from attnc.runtime.backends.triton import split_kv

os.environ.setdefault("TRITON_INTERPRET", "1")

WINDOW = 7


def reference(q, k, v):
    ref = attnc.compile_attention("stdlib:sliding_window", backend="reference", window=WINDOW)
    return ref(q.double(), k.double(), v.double(), return_lse=True)


def count_ordinary_launches(monkeypatch) -> list:
    """The paged forward's ordinary launches (a replay launches the bound kernels without them)."""
    made = []
    real = triton_paged._launch

    def counting(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_paged, "_launch", counting)
    return made


@pytest.mark.parametrize("splits", [None, 3])
def test_a_decode_loop_over_a_growing_cache_replays_one_bound_launch(splits, monkeypatch):
    """Rows of three lengths growing by one key a step (lengths in a device tensor incremented in place): the
    first two steps take the ordinary path (the second binds), the next ones replay it, reading nothing on the
    host; every step's out and lse are the reference's. With split-KV forced, the merge is replayed too."""
    monkeypatch.setattr(split_kv, "FORCE_SPLITS", splits)
    final = [18, 31, 9]
    k, v, table, _, rows = paged_cache(final, 4, dtype=torch.float32, seed=3)
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=WINDOW)
    lengths = torch.tensor([x - 5 for x in final], dtype=torch.int32)
    g = torch.Generator().manual_seed(8)
    ordinary = count_ordinary_launches(monkeypatch)
    for step in range(5):
        q = torch.randn(3, HQ, 1, D, generator=g)
        if step < 2:
            out, lse = attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", return_lse=True)
        else:
            with HostReads() as reads:
                out, lse = attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", return_lse=True)
            assert reads.total == 0, dict(reads.seen)
        for b, (kb, vb) in enumerate(rows):
            n = final[b] - 5 + step
            want, want_lse = reference(q[b:b + 1], kb[:, :, :n], vb[:, :, :n])
            torch.testing.assert_close(out[b:b + 1], want.float(), rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(lse[b:b + 1], want_lse.float(), rtol=2e-5, atol=2e-5)
        lengths.add_(1)
    assert len(ordinary) == 2 + 2  # two ordinary calls, and the binding's two recordings; no launch since
    assert attn._warm.bound() == 1


def test_packed_rows_of_other_counts_replay_with_their_padding_filled():
    """``cu_seqlens_q`` of other query counts at each step under one ``max_seqlen_q`` (flash-attn's layout, q
    ``[1, total, H, D]``): replays whose rows equal the reference, and whose rows past the last offset are zeros
    with an lse of -inf though each replay allocates its outputs anew."""
    final = [14, 27, 11]
    k, v, table, seqlens, rows = paged_cache(final, 8, dtype=torch.float32, seed=5)
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=WINDOW)
    g = torch.Generator().manual_seed(9)
    for offsets in ([0, 1, 3, 4], [0, 2, 3, 5], [0, 1, 2, 3], [0, 3, 4, 6]):
        cu = torch.tensor(offsets, dtype=torch.int32)
        q = torch.randn(1, 7, HQ, D, generator=g)
        out, lse = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=3,
                        layout="bnhd", return_lse=True)
        assert out.shape == (1, 7, HQ, D) and lse.shape == (1, 7, HQ)
        end = offsets[-1]
        assert bool((out[:, end:] == 0).all()) and bool((lse[:, end:] == float("-inf")).all())
        for b, (kb, vb) in enumerate(rows):
            lo, hi = offsets[b], offsets[b + 1]
            if lo == hi:
                continue
            want, want_lse = reference(q[:, lo:hi].transpose(1, 2), kb, vb)
            torch.testing.assert_close(out[:, lo:hi].transpose(1, 2), want.float(), rtol=2e-5, atol=2e-5)
            torch.testing.assert_close(lse[:, lo:hi].transpose(1, 2), want_lse.float(), rtol=2e-5, atol=2e-5)
    assert attn._warm.bound() == 1


@pytest.mark.parametrize("bad, where", [
    ({"table_at": (1, 2), "value": 999}, "block_table"),
    ({"table_at": (0, 0), "value": -3}, "block_table"),
    ({"seqlen": (2, 99)}, "cache_seqlens"),
    ({"seqlen": (1, 0)}, "cache_seqlens"),
])
def test_a_bad_value_at_a_replayed_call_is_named(bad, where):
    """After the signature is bound, a page id outside the pool on a reached page or a length outside the table
    fails the kernel's row check at the replay, and the call raises the SpecError naming the argument."""
    k, v, table, seqlens, _ = paged_cache([12, 30, 7], 8, dtype=torch.float32, seed=2)
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=WINDOW)
    q = torch.randn(3, HQ, 1, D)
    for _ in range(3):
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert attn._warm.bound() == 1
    if "table_at" in bad:
        table[bad["table_at"]] = bad["value"]
    else:
        seqlens[bad["seqlen"][0]] = bad["seqlen"][1]
    with pytest.raises(SpecError) as err:
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert f"argument {where}" in str(err.value)
