"""Every stdlib softmax pattern on a sequence, down the three inference paths, against the float64 reference:
queries after a KV cache (a decode step and a few rows), packed sequences (``cu_seqlens``) and paged KV
caches (``block_table``, ``cache_seqlens``), on the CPU tile executor and the Flex lowering (float64).

The reference of a path is the reference backend's ordinary call on the same rows: the same queries after the
same contiguous cache, each packed sequence alone, each paged row's keys gathered by hand. (Its KV-cache call
equals the last rows of the whole sequence's: ``test_decode``; the Triton kernels run the decode step of every
stdlib pattern in ``test_host_reads``.) Routes scored from whole query blocks (BiFormer, XAttention) refuse
the cache and the pages alike, with the error that names ``k``."""

from __future__ import annotations

import pytest
import torch
from test_triton import STDLIB

import attnc

#: Patterns on a sequence (a grid has no paged cache); their parameters and inputs are test_triton's.
SEQUENCE = sorted(name for name, case in STDLIB.items() if case.sizes is None)
NO_CACHE = {"xattention", "anchor"}  # score blocks of queries: refused after a cache
GIVEN_BLOCK_SCORES = {"seer"}  # block scores per call, one column per key block of one sequence: not packed; paged
# only in one launch (on the CPU backend: refused)
HQ, HKV, D = 4, 2, 8


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _inputs(name: str, n: int) -> dict:
    """The pattern's call-time inputs over ``n`` tokens (``tests/cases.py``), float64 and detached (paged calls are
    forward only); per-head inputs sized for HQ heads."""
    return {key: t.detach() for key, t in STDLIB[name].make_inputs(HQ, D, seed=9, n=n).items()}


def _cut(name: str, inputs: dict, start: int, stop: int) -> dict:
    """The inputs of tokens ``[start, stop)``: every token dimension (declared n or nk) cut."""
    pat = attnc.load(f"stdlib:{name}", **PER_HEAD.get(name, STDLIB[name].params))
    out = {}
    for key, t in inputs.items():
        index = [slice(None)] * t.dim()
        for dim in pat.input(key).token_dims:
            index[dim] = slice(start, stop)
        out[key] = t[tuple(index)]
    return out


#: Parameters for HQ heads where the table's hold one value per head of its 2.
PER_HEAD = {"moa": {"alpha": [-6, 9, 20, 3], "beta": [0.5, 0.1, 0.0, 0.25], "max_new_tokens": 4, "block": 4,
                    "minimum": 8}}


def _modules(name: str, backend: str):
    params = PER_HEAD.get(name, STDLIB[name].params)
    return (attnc.compile_attention(f"stdlib:{name}", backend=backend, **params),
            attnc.compile_attention(f"stdlib:{name}", backend="reference", **params))


def _qkv(batch: int, n: int, nk: int, seed: int) -> tuple:
    g = _gen(seed)
    return (torch.randn(batch, HQ, n, D, generator=g, dtype=torch.float64),
            torch.randn(batch, HKV, nk, D, generator=g, dtype=torch.float64),
            torch.randn(batch, HKV, nk, D, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpu", "flex"])
@pytest.mark.parametrize("name", SEQUENCE)
def test_queries_after_a_kv_cache(name, backend):
    attn, ref = _modules(name, backend)
    nk = 37
    inputs = _inputs(name, nk)
    for rows in (1, 3):
        q, k, v = _qkv(2, rows, nk, seed=rows)
        if name in NO_CACHE:
            with pytest.raises(attnc.SpecError, match="not supported") as err:
                attn(q, k, v, **inputs)
            assert err.value.where == "argument k"
            continue
        torch.testing.assert_close(attn(q, k, v, **inputs), ref(q, k, v, **inputs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "flex"])
@pytest.mark.parametrize("name", SEQUENCE)
def test_packed_sequences(name, backend):
    """Three sequences packed along the tokens of a batch of one: each equals its own call."""
    attn, ref = _modules(name, backend)
    lengths = (17, 11, 23)
    total = sum(lengths)
    cu = torch.tensor([0, 17, 28, total], dtype=torch.int32)
    q, k, v = _qkv(1, total, total, seed=4)
    inputs = _inputs(name, total)
    if name in GIVEN_BLOCK_SCORES:
        with pytest.raises(attnc.SpecError, match="not with packed sequences") as err:
            attn(q, k, v, cu_seqlens=cu, **inputs)
        assert err.value.where == "argument cu_seqlens"
        return
    got = attn(q, k, v, cu_seqlens=cu, **inputs)
    for start, stop in zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True):
        part = slice(start, stop)
        want = ref(q[:, :, part], k[:, :, part], v[:, :, part], **_cut(name, inputs, start, stop))
        torch.testing.assert_close(got[:, :, part], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", SEQUENCE)
def test_paged_kv_caches(name):
    """Rows of three lengths in shuffled pages of 4 keys (the table padded with -1): each row equals the
    reference's call on its own keys, gathered by hand; the CPU backend (the paged frontend is the same for
    every backend: it gathers the rows and calls the ordinary forward)."""
    attn, ref = _modules(name, "cpu")
    lengths, page, n = (21, 37, 21), 4, 2
    g = _gen(5)
    reach = [-(-x // page) for x in lengths]
    pool = sum(reach) + 2
    k_cache = torch.randn(pool, page, HKV, D, generator=g, dtype=torch.float64)
    v_cache = torch.randn(pool, page, HKV, D, generator=g, dtype=torch.float64)
    order = torch.randperm(pool, generator=g)
    table = torch.full((len(lengths), max(reach)), -1, dtype=torch.int32)
    used = 0
    for b, r in enumerate(reach):
        table[b, :r] = order[used:used + r].to(torch.int32)
        used += r
    q = torch.randn(len(lengths), HQ, n, D, generator=g, dtype=torch.float64)
    inputs = _inputs(name, max(reach) * page)  # token dimensions at absolute positions: the table's capacity
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    if name in NO_CACHE:
        with pytest.raises(attnc.SpecError, match="not supported") as err:
            attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, layout="bhnd", **inputs)
        assert err.value.where == "argument k"
        return
    if name in GIVEN_BLOCK_SCORES:
        with pytest.raises(attnc.SpecError, match="only where it runs in one launch") as err:
            attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, layout="bhnd", **inputs)
        assert err.value.where == "argument block_table"
        return
    got = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, layout="bhnd", **inputs)
    for b, length in enumerate(lengths):
        ids = table[b, :reach[b]].long()
        k_b = k_cache[ids].flatten(0, 1)[:length].transpose(0, 1)[None]
        v_b = v_cache[ids].flatten(0, 1)[:length].transpose(0, 1)[None]
        want = ref(q[b:b + 1], k_b, v_b, **_cut(name, inputs, 0, length))
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-12, atol=1e-12)
