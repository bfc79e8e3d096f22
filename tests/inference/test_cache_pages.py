"""A contiguous KV cache that grows by a key every step, read as pages by the paged kernel
(``runtime.backends.triton.cache_pages``): every step equals the reference, and no step plans its lists again."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc.runtime.backends.triton import cache_pages as CP
from attnc.runtime.backends.triton import runner as triton_runner

CAUSAL = "pattern causal_lm\n  tokens seq\n  mask causal\n"
PATTERNS = {"causal": (CAUSAL, {}), "sliding_window": ("stdlib:sliding_window", {"window": 23}),
            "alibi": ("stdlib:alibi", {}), "streaming": ("stdlib:streaming", {"window": 9, "sinks": 2}),
            "neighborhood_1d": ("stdlib:neighborhood_1d", {"kernel_size": 7, "dilation": 2})}


def spy_pages(monkeypatch) -> list:
    """Each ``cache_pages.view`` call's result: whether it served the call as pages."""
    served = []
    real = CP.view

    def spy(*args, **kwargs):
        got = real(*args, **kwargs)
        served.append(got is not None)
        return got

    monkeypatch.setattr(CP, "view", spy)
    return served


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(sorted(PATTERNS)), batch=st.integers(1, 3), group=st.sampled_from([1, 2]),
       rows=st.sampled_from([1, 3]), start=st.integers(20, 70), grown=st.sampled_from(["sliced", "cat"]),
       seed=st.integers(0, 2**16))
def test_every_step_of_a_growing_cache_equals_the_reference(monkeypatch, name, batch, group, rows, start, grown, seed):
    """Decode steps over a cache growing by one key each step, kept as slices of a larger buffer or grown by
    ``torch.cat`` (its storage exactly its keys: pages of one key where larger ones would pass its end), with GQA
    and several queries a step: each step after the first (the last call's shape but for its keys) is served as
    pages, and every step equals the float64 reference."""
    served = spy_pages(monkeypatch)
    spec, params = PATTERNS[name]
    g = torch.Generator().manual_seed(seed)
    kv_heads, d = 2, 16
    tri = attnc.compile_attention(spec, backend="triton", **params)
    ref = attnc.compile_attention(spec, backend="reference", **params)
    buf_k = torch.randn(batch, kv_heads, start + 8, d, generator=g)
    buf_v = torch.randn(batch, kv_heads, start + 8, d, generator=g)
    k, v = buf_k[:, :, :start], buf_v[:, :, :start]
    if grown == "cat":
        k, v = k.contiguous(), v.contiguous()
    for step in range(3):
        n = start + step
        if step and grown == "sliced":
            k, v = buf_k[:, :, :n], buf_v[:, :, :n]
        elif step:
            k = torch.cat([k, buf_k[:, :, n - 1:n]], 2)
            v = torch.cat([v, buf_v[:, :, n - 1:n]], 2)
        q = torch.randn(batch, kv_heads * group, rows, d, generator=g)
        with torch.no_grad():
            out, lse = tri(q, k, v, return_lse=True)
        want, want_lse = ref(q.double(), k.double(), v.double(), return_lse=True)
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)
    assert served == [True, True]  # the first step is a shape not seen before: the ordinary call


def test_a_growing_cache_plans_once_and_a_repeated_shape_is_replayed(monkeypatch):
    """Twelve steps of a growing cache: the first (a shape not seen) takes the ordinary call, the eleven after it
    (the last call's shape but for the keys' count) one paged template (its lists at one capacity), never the
    ordinary call (which plans per length), and the paged launch bound at the second of them replayed after, its
    pools and table reused (the cache is read as pages twice, never after); a shape called again takes the ordinary
    call twice (the second binds its launch) and is replayed after."""
    served = spy_pages(monkeypatch)
    ordinary = []
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=17)
    real_call = attn._forward_call

    def spy_ordinary(*args, **kwargs):
        ordinary.append(args[1].shape[2])
        return real_call(*args, **kwargs)

    monkeypatch.setattr(attn, "_forward_call", spy_ordinary)
    made = []
    real_template = triton_runner.paged.template

    def spy_template(*args, **kwargs):
        before = len(args[0].block_plans)
        t = real_template(*args, **kwargs)
        made.append(len(args[0].block_plans) - before)
        return t

    monkeypatch.setattr(triton_runner.paged, "template", spy_template)
    unbound = []
    real_forward = attn.runner.paged_forward
    monkeypatch.setattr(attn.runner, "paged_forward", lambda *a: unbound.append(a[4]) or real_forward(*a))
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 128, 16, generator=g)  # room for a last page of 64 keys at every step
    v = torch.randn(1, 2, 128, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    with torch.no_grad():
        for n in range(60, 72):
            attn(q, k[:, :, :n], v[:, :, :n])
        # a cache kept in one buffer: the same pools at every step, run unbound twice, then its bound launch
        assert ordinary == [60] and served == [True] * 2 and sum(made) == 1 and len(unbound) == 2
        for _ in range(4):  # one shape again: the ordinary call twice (the second binds it), then its replay
            attn(q, k[:, :, :71], v[:, :, :71])
    assert ordinary == [60, 71, 71] and len(served) == 2


def test_a_step_in_another_buffer_or_past_the_pages_is_read_as_pages_again(monkeypatch):
    """The pools, table and launch kept for a growing cache serve its later steps only while it stays in its buffer
    and its pages: a cache moved to another buffer of the same shape, or grown to where a page of 64 keys would pass
    its storage's end, is read as pages again, and every step equals the reference."""
    served = spy_pages(monkeypatch)
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=17)
    ref = attnc.compile_attention("stdlib:sliding_window", backend="reference", window=17)
    g = torch.Generator().manual_seed(8)
    bufs = [torch.randn(2, 2, 160, 16, generator=g) for _ in range(4)]  # pages of 64 keys
    q = torch.randn(2, 4, 1, 16, generator=g)
    steps = [(0, 60), (0, 61), (0, 62), (0, 63), (2, 64), (2, 65), (0, 66), (0, 129)]
    with torch.no_grad():
        for which, n in steps:
            k, v = bufs[which][:, :, :n], bufs[which + 1][:, :, :n]
            torch.testing.assert_close(attn(q, k, v).double(), ref(q.double(), k.double(), v.double()),
                                       atol=2e-5, rtol=2e-5)
    # 61, 62 read as pages (the second binds); 63 reuses them; 64 in other buffers (read as pages, the same
    # signature's bound launch replayed on them), 65 reuses those; 66 back in the first, read again; 129 keys
    # would end their last page of 64 past the buffer's 160 keys: read again, in pages of 32
    assert served == [True] * 5


@pytest.mark.parametrize("case", ["prefill", "cross_shapes", "fp64"])
def test_calls_the_paged_kernel_would_not_answer_take_the_ordinary_call(monkeypatch, case):
    """As many queries as keys (a prefill): not served as pages, answered by the ordinary call (equal to the
    reference); k and v of different lengths, or a dtype the kernels do not run: not served as pages, refused by
    the ordinary call's clear error."""
    served = spy_pages(monkeypatch)
    g = torch.Generator().manual_seed(5)
    dtype = torch.float64 if case == "fp64" else torch.float32
    q = torch.randn(1, 2, 40 if case == "prefill" else 1, 8, generator=g, dtype=dtype)
    k = torch.randn(1, 2, 40, 8, generator=g, dtype=dtype)
    v = torch.randn(1, 2, 41 if case == "cross_shapes" else 40, 8, generator=g, dtype=dtype)
    attn = attnc.compile_attention(CAUSAL, backend="triton")
    if case != "prefill":
        with pytest.raises(attnc.SpecError, match="float16, bfloat16 and float32" if case == "fp64" else "v"):
            attn(q, k, v)
    else:
        with torch.no_grad():
            out = attn(q, k, v)
        want = attnc.compile_attention(CAUSAL, backend="reference")(q.double(), k.double(), v.double())
        torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)
    assert served == []


def test_a_cache_shorter_than_the_window_takes_the_ordinary_call_which_refuses_it(monkeypatch):
    """A growing cache of a windowed pattern (NATTEN's 1-D window of 7 with dilation 2: at least 14 keys): the steps
    shorter than that are refused by the ordinary call's error naming the window, never run as pages (whose row
    check would fail on the device); from 14 keys on they are read as pages and equal the reference."""
    served = spy_pages(monkeypatch)
    params = {"kernel_size": 7, "dilation": 2}
    attn = attnc.compile_attention("stdlib:neighborhood_1d", backend="triton", **params)
    ref = attnc.compile_attention("stdlib:neighborhood_1d", backend="reference", **params)
    g = torch.Generator().manual_seed(11)
    k, v = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    q = torch.randn(1, 2, 1, 8, generator=g)
    with torch.no_grad():
        for n in (12, 13):
            with pytest.raises(attnc.SpecError, match="window of 7 with dilation 2 does not fit"):
                attn(q, k[:, :, :n], v[:, :, :n])
        for n in (14, 15, 16):
            torch.testing.assert_close(attn(q, k[:, :, :n], v[:, :, :n]).double(),
                                       ref(q.double(), k[:, :, :n].double(), v[:, :, :n].double()),
                                       atol=2e-5, rtol=2e-5)
    assert served == [True, True]  # 15 and 16: the steps after a shape seen


def test_a_step_whose_v_holds_other_keys_than_k_is_refused(monkeypatch):
    """A growing cache's steps reuse the pools kept for its buffer; a step whose v holds one key fewer than its k is
    refused by the ordinary call's error naming v, never read as pages (v's view would be read past its end)."""
    served = spy_pages(monkeypatch)
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=17)
    g = torch.Generator().manual_seed(9)
    bk, bv = torch.randn(1, 2, 128, 16, generator=g), torch.randn(1, 2, 128, 16, generator=g)
    q = torch.randn(1, 4, 1, 16, generator=g)
    with torch.no_grad():
        for n in range(60, 66):
            attn(q, bk[:, :, :n], bv[:, :, :n])
        with pytest.raises(attnc.SpecError, match="must match k") as err:
            attn(q, bk[:, :, :66], bv[:, :, :65])
    assert err.value.where == "argument v" and served == [True, True]
