"""The grouped-query forward of a few rows (``attnc_fwd_grouped``, ``runtime.backends.triton.grouped``), under the
interpreter: a decode step (1 query) and a short prefill after a KV cache (3 queries) with the query heads of each
K/V head packed into one tile, against the float64 reference, for masks and biases that read the head; which
kernel ran and with what grid; split-KV over groups; the group's tile lists; where the one-head forward stays."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.compiler.cost.decode_cost import PACKED_ROWS, packed_rows, split_kv

pytest.importorskip("triton")

from attnc.runtime.backends.triton import grouped  # noqa: E402
from attnc.runtime.backends.triton import kernel_launch as KL  # noqa: E402
from attnc.runtime.backends.triton import split_kv as SK  # noqa: E402

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
#: a mask whose window differs per head: heads 0 and 1 reach 100 keys back, the others 3 (a group of 4 heads
#: mixes them: a KV tile FULL for some of its heads and EMPTY for the others)
PER_HEAD = "pattern per_head\n  tokens seq\n  mask q - k <= (if h > 1 then 3 else 100) and k <= q\n"
PATTERNS = [
    ("causal", CAUSAL, {}),
    ("sliding_window", "stdlib:sliding_window", {"window": 40}),
    ("alibi", "stdlib:alibi", {}),  # a bias whose slope is the head's
    ("per_head", PER_HEAD, {}),
    ("softcap", "stdlib:softcap", {}),  # a per-head constant loaded by the head
]
#: (query heads, K/V heads, queries, dtype): every group of 2/2, 8/2, 6/3 and 4/1, decode and a short prefill, fp32
#: and fp16 (a call under the interpreter costs seconds: each case once)
CASES = [(2, 2, 1, torch.float16), (8, 2, 1, torch.float32), (6, 3, 3, torch.float16), (4, 1, 3, torch.float32),
         (4, 1, 1, torch.float16)]
#: keys: 3 KV tiles of 64, the last part-filled (the per-head mask's tile 1 FULL for heads 0 and 1, EMPTY for 2, 3)
NK, D = 140, 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}


def qkv(heads: int, kv_heads: int, nk: int = NK, batch: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 10 * heads + kv_heads)
    q = torch.randn(batch, heads, nk, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(batch, kv_heads, nk, D, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


def spy(monkeypatch) -> list[tuple[str, tuple, dict]]:
    """Every kernel launch of the Triton runner: (name, grid, meta)."""
    seen = []
    real = KL.launch_kernel

    def launch(lch, kernel, grid, args, meta, *, backward):
        seen.append((kernel.fn.__name__, tuple(grid), dict(meta)))
        return real(lch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", launch)
    return seen


@pytest.mark.versions
@pytest.mark.parametrize(("name", "spec", "params"), PATTERNS, ids=[p[0] for p in PATTERNS])
def test_packed_rows_equal_the_reference(monkeypatch, name, spec, params):
    """1 and 3 queries after a cache of 140 keys, query heads over K/V heads 2/2, 8/2, 6/3 and 4/1, fp32 and fp16
    (``CASES``): out and lse equal the float64 reference's last rows (on the inputs rounded to the dtype). With a
    group the grouped forward ran, one program per (Q tile, batch x K/V head) with the group's rows packed
    (``packed_rows``); with none, the one-head forward."""
    launched = spy(monkeypatch)
    monkeypatch.setattr(SK, "FORCE_SPLITS", 1)
    ref = attnc.compile_attention(spec, backend="reference", **params)
    tri = attnc.compile_attention(spec, backend="triton", **params)
    for heads, kv_heads, n, dtype in CASES:
        q, k, v = (t.to(dtype) for t in qkv(heads, kv_heads))
        want, want_lse = ref(q.double(), k.double(), v.double(), return_lse=True)
        launched.clear()
        out, lse = tri(q[:, :, -n:], k, v, return_lse=True)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), want[:, :, -n:], rtol=TOL[dtype], atol=TOL[dtype])
        torch.testing.assert_close(lse.double(), want_lse[:, :, -n:], rtol=TOL[dtype], atol=TOL[dtype])
        assert len(launched) == 1, launched
        kernel, grid, meta = launched[0]
        if heads == kv_heads:
            assert kernel == "attnc_fwd" and grid == (1, heads), launched
        else:
            assert kernel == "attnc_fwd_grouped" and grid == (1, kv_heads), launched
            assert meta["BLOCK_M"] == packed_rows(heads // kv_heads, n) == 16


def test_packed_decode_steps_as_the_cache_grows(monkeypatch):
    """A per-head mask decoded step after step (its lists per query head made on the device for each range of
    lengths, grouped per K/V head at each step): every step equals the reference and runs a forward that packs the
    query heads of a K/V head: the grouped one at the first step, the paged one (``cache_pages``, its lists grouped
    the same way) at the steps after it, as the cache grows."""
    launched = spy(monkeypatch)
    monkeypatch.setattr(SK, "FORCE_SPLITS", 1)
    ref = attnc.compile_attention(PER_HEAD, backend="reference")
    tri = attnc.compile_attention(PER_HEAD, backend="triton")
    q, k, v = qkv(4, 1, nk=140, batch=1)
    want = ref(q, k, v)
    for nk in (60, 64, 65, 129, 140):
        out = tri(q[:, :, nk - 1:nk].float(), k[:, :, :nk].float(), v[:, :, :nk].float())
        torch.testing.assert_close(out.double(), ref(q[:, :, :nk], k[:, :, :nk], v[:, :, :nk])[:, :, -1:],
                                   rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.double(), want[:, :, -1:], rtol=2e-5, atol=2e-5)
    kernels = [kernel for kernel, _, _ in launched]
    assert kernels[0] == "attnc_fwd_grouped" and set(kernels[1:]) == {"attnc_fwd_paged"}


@pytest.mark.versions
def test_split_kv_counts_groups(monkeypatch):
    """Split-KV on the grouped forward, batch 2: each (Q tile, batch x K/V head) program's KV tiles split over 1,
    5 and 2 programs (1 and 3 queries), merged by one combine launch over the query heads' rows, equal the
    reference; the runner's own choice is the decode rule on the groups' programs, not the query heads'."""
    launched = spy(monkeypatch)
    ref = attnc.compile_attention("stdlib:alibi", backend="reference")
    tri = attnc.compile_attention("stdlib:alibi", backend="triton")
    q, k, v = qkv(8, 2, nk=200, batch=2)
    want, want_lse = ref(q, k, v, return_lse=True)
    for n, splits in ((1, 1), (1, 5), (3, 2)):
        monkeypatch.setattr(SK, "FORCE_SPLITS", splits)
        launched.clear()
        out, lse = tri(*(t.float() for t in (q[:, :, -n:], k, v)), return_lse=True)
        torch.testing.assert_close(out.double(), want[:, :, -n:], rtol=2e-5, atol=2e-5)
        torch.testing.assert_close(lse.double(), want_lse[:, :, -n:], rtol=2e-5, atol=2e-5)
        names = [kernel for kernel, _, _ in launched]
        fwd = launched[0][1]
        if splits == 1:
            assert names == ["attnc_fwd_grouped"] and fwd == (1, 2 * 2), launched
        else:
            assert names == ["attnc_fwd_grouped", "attnc_fwd_combine"] and fwd == (1, 2 * 2, splits), launched
            assert launched[1][1][1] == 2 * 8  # the merge: batch x query heads
    monkeypatch.setattr(SK, "FORCE_SPLITS", None)
    launched.clear()
    out = tri(*(t.float() for t in (q[:, :, -1:], k, v)))
    torch.testing.assert_close(out.double(), want[:, :, -1:], rtol=2e-5, atol=2e-5)
    sched = tri.runner.last_schedule
    tiles = (sched.full_count + sched.partial_count).reshape(-1).tolist()
    expected = split_kv(tiles, 2 * 2, KL.CPU_SMS).splits  # batch x K/V heads programs
    assert launched[0][0] == "attnc_fwd_grouped" and launched[0][1] == (1, 4, expected) and expected > 1


def test_group_lists_are_the_union_and_the_intersection():
    """``grouped.group_lists``: per K/V head, a KV tile FULL where FULL for every query head of the group,
    PARTIAL where listed for some otherwise, nothing where listed for none; in tile order."""
    full = torch.tensor([[[1, 1, 0, 0, 0]], [[1, 0, 0, 0, 1]], [[0, 0, 0, 0, 0]], [[0, 0, 1, 0, 0]]], dtype=torch.bool)
    part = torch.tensor([[[0, 0, 1, 0, 0]], [[0, 1, 0, 0, 0]], [[0, 0, 0, 0, 0]], [[0, 0, 0, 1, 0]]], dtype=torch.bool)
    index = torch.arange(5).expand(4, 1, 5)
    lists = {}
    for name, keep in (("FULL", full), ("PART", part)):
        lists[f"{name}_N"], lists[f"{name}_I"] = grouped.compact(index, keep)
    out = grouped.group_lists(lists, 2, 5)
    assert out["FULL_N"].tolist() == [[1], [0]] and out["FULL_I"][0, 0, :1].tolist() == [0]
    assert out["PART_N"].tolist() == [[3], [2]]
    assert out["PART_I"][0, 0, :3].tolist() == [1, 2, 4] and out["PART_I"][1, 0, :2].tolist() == [2, 3]
    assert out["FULL_I"].dtype == torch.int32 and out["FULL_I"].is_contiguous()


@pytest.mark.parametrize(("name", "params"), [("moba", {"block": 8, "topk": 2}),
                                              ("quest", {"token_budget": 16, "page": 4})])
def test_routed_decode_keeps_the_one_head_forward(monkeypatch, name, params):
    """A route's selection and lists are per query head: its decode steps with K/V heads shared run the one-head
    forward and equal the reference."""
    launched = spy(monkeypatch)
    monkeypatch.setattr(SK, "FORCE_SPLITS", 1)
    q, k, v = qkv(4, 2, nk=96, batch=1)
    want = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)(q, k, v)
    out = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)(*(t.float() for t in (q[:, :, -1:], k, v)))
    torch.testing.assert_close(out.double(), want[:, :, -1:], rtol=2e-5, atol=2e-5)
    assert "attnc_fwd" in [kernel for kernel, _, _ in launched]
    assert "attnc_fwd_grouped" not in [kernel for kernel, _, _ in launched]


def test_rows_past_the_packed_tile_and_gradients(monkeypatch):
    """More rows than a packed tile holds (40 queries of 4 heads: 160 > ``PACKED_ROWS``) run the one-head forward;
    a short prefill whose inputs need gradients runs the grouped forward and the backward kernels, and every
    gradient equals the reference's."""
    launched = spy(monkeypatch)
    monkeypatch.setattr(SK, "FORCE_SPLITS", 1)
    ref = attnc.compile_attention("stdlib:alibi", backend="reference")
    tri = attnc.compile_attention("stdlib:alibi", backend="triton")
    q, k, v = qkv(4, 1, nk=100)
    assert packed_rows(4, 40) is None and 4 * 40 > PACKED_ROWS
    out = tri(*(t.float() for t in (q[:, :, -40:], k, v)))
    torch.testing.assert_close(out.double(), ref(q, k, v)[:, :, -40:], rtol=2e-5, atol=2e-5)
    assert [kernel for kernel, _, _ in launched] == ["attnc_fwd"]
    w = torch.randn(1, 4, 3, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(backend, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (q, k, v)]
        o = attnc.compile_attention("stdlib:alibi", backend=backend)(leaves[0][:, :, -3:], leaves[1], leaves[2])
        (o.double() * w).sum().backward()
        return [t.grad.double() for t in leaves]

    launched.clear()
    for got, want in zip(grads("triton", torch.float32), grads("reference", torch.float64), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert launched[0][0] == "attnc_fwd_grouped" and "attnc_bwd_dkdv" in [kernel for kernel, _, _ in launched]


@pytest.mark.parametrize("spec", [CAUSAL, PER_HEAD], ids=["causal", "per_head"])
def test_a_warm_grouped_decode_step_reads_nothing_on_the_host(monkeypatch, spec):
    """The grouped forward's lists (the group's, made from per-head lists at each step where the mask reads the
    head) and its split count ask nothing of the device: a warm decode step reads nothing on the host."""
    from test_host_reads import HostReads

    launched = spy(monkeypatch)
    tri = attnc.compile_attention(spec, backend="triton")
    q, k, v = (t.float() for t in qkv(4, 1, nk=100))
    tri(q[:, :, -1:], k, v)
    with HostReads() as reads:
        tri(q[:, :, -1:], k, v)
    assert reads.total == 0, dict(reads.seen)
    assert launched[-1][0] in ("attnc_fwd_grouped", "attnc_fwd_combine")
    assert "attnc_fwd_grouped" in [kernel for kernel, _, _ in launched]
