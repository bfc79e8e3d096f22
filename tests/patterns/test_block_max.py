"""``return_block_max=SIZE`` (SeerAttention's training target): the block-wise max-pooled attention map, made by the
forward that attends (no second pass over the scores), against the max over each block of the dense float64
softmax; on the reference, cpu and triton backends (the triton forward stores each row's largest score per group
of keys as it goes), with routes, bias terms, ``weights`` and GQA; queries after a KV cache; and the refusals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc

WINDOW = "pattern w(window = 30)\n  tokens seq\n  mask causal and q - k < window\n"


def dense_block_max(q, k, allowed, size, scale=None, bias=0.0, weights=None):
    """max over each (SIZE rows, SIZE keys) block of the attention probabilities, float64, from the formula."""
    B, H, nq, d = q.shape
    kk = k.repeat_interleave(H // k.shape[1], 1)
    s = q @ kk.transpose(-1, -2) * (d ** -0.5 if scale is None else scale) + bias
    w = torch.exp(s) if weights is None else weights(s)
    w = torch.where(allowed, w, torch.zeros((), dtype=w.dtype))
    total = w.sum(-1, keepdim=True)
    p = w / torch.where(total > 0, total, torch.ones_like(total))
    qb, kb = math.ceil(nq / size), math.ceil(k.shape[2] / size)
    p = torch.nn.functional.pad(p, (0, kb * size - k.shape[2], 0, qb * size - nq))
    return p.view(B, H, qb, size, kb, size).amax(dim=(3, 5))


def _qkv(seed, B=2, H=4, Hkv=2, n=70, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, n, d, generator=g, dtype=torch.float64),
            *(torch.randn(B, Hkv, n, d, generator=g, dtype=torch.float64) for _ in range(2)))


def _window(n, nk=None, window=30):
    nk = n if nk is None else nk
    qpos, kpos = torch.arange(nk - n, nk)[:, None], torch.arange(nk)[None, :]
    return (kpos <= qpos) & (qpos - kpos < window)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "auto"])
def test_a_size_beyond_the_call_is_its_one_block(backend):
    # the rows were padded to the size: 65,536 over 16 tokens took 16 GiB on the reference, 2**20 asked Triton for
    # 512 GiB, 2**63 overflowed on cpu
    q, k, v = (t[..., :16, :].float() for t in _qkv(1, B=1, H=2, Hkv=1))
    attn = attnc.compile_attention(WINDOW, backend=backend)
    want = dense_block_max(q.double(), k.double(), _window(16), 16)
    assert want.shape == (1, 2, 1, 1)
    for size in (17, 65536, 2**20, 2**63):
        _, pooled = attn(q, k, v, return_block_max=size)
        torch.testing.assert_close(pooled.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "auto"])
@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_every_backend_pools_the_softmax(backend, size):
    # the interpreter runs each program in Python: one batch of two query heads over one K/V head there
    q, k, v = _qkv(size, B=1, H=2, Hkv=1) if backend == "triton" else _qkv(size)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    attn = attnc.compile_attention(WINDOW, backend=backend)
    out, pooled = attn(q.to(dtype), k.to(dtype), v.to(dtype), return_block_max=size)
    want = dense_block_max(q, k, _window(70), size)
    assert pooled.shape == want.shape and pooled.dtype == dtype
    torch.testing.assert_close(pooled.double(), want, **tol)
    torch.testing.assert_close(out.double(), attnc.compile_attention(WINDOW, backend="reference")(q, k, v), **tol)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.integers(1, 60), st.sampled_from([4, 8, 16]), st.integers(1, 40), st.integers(0, 10**6))
def test_random_sizes_on_the_cpu_backend(n, size, window, seed):
    q, k, v = _qkv(seed, B=1, H=2, Hkv=1, n=n, d=8)
    attn = attnc.compile_attention(WINDOW, window=window, backend="cpu")
    _, pooled = attn(q, k, v, return_block_max=size)
    torch.testing.assert_close(pooled, dense_block_max(q, k, _window(n, window=window), size), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_terms_and_weights_are_pooled_as_the_probabilities(backend):
    """A bias input and sigmoid weights (the map is of the weights divided by their row sum)."""
    q, k, v = _qkv(5, B=1) if backend == "triton" else _qkv(5)  # one batch under the interpreter
    g = torch.Generator().manual_seed(1)
    b = torch.randn(4, 70, generator=g, dtype=torch.float64)
    src = WINDOW.replace("pattern w(", "pattern wb(") + "  input b: float[heads, n]\n  bias b[h, k]\n  weights sigmoid(s)\n"
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    attn = attnc.compile_attention(src, backend=backend)
    _, pooled = attn(q.to(dtype), k.to(dtype), v.to(dtype), b=b.to(dtype), return_block_max=16)
    want = dense_block_max(q, k, _window(70), 16, bias=b[None, :, None, :], weights=torch.sigmoid)
    torch.testing.assert_close(pooled.double(), want, **tol)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_routed_pattern_pools_what_it_attended(backend):
    """MoBA: the map is 0 on the blocks the route left out, and equals the reference's elsewhere."""
    q, k, v = _qkv(9, n=64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    ref = attnc.compile_attention("stdlib:moba", block=8, topk=2, backend="reference")
    _, want = ref(q, k, v, return_block_max=8)
    attn = attnc.compile_attention("stdlib:moba", block=8, topk=2, backend=backend)
    _, pooled = attn(q.to(dtype), k.to(dtype), v.to(dtype), return_block_max=8)
    torch.testing.assert_close(pooled.double(), want, **tol)
    assert bool((want == 0).any())


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_queries_after_a_kv_cache(backend):
    q, k, v = _qkv(3)
    attn = attnc.compile_attention(WINDOW, backend=backend)
    _, pooled = attn(q[:, :, -5:], k, v, return_block_max=8)
    torch.testing.assert_close(pooled, dense_block_max(q[:, :, -5:], k, _window(5, 70), 8), rtol=1e-12, atol=1e-12)


def test_the_outputs_come_in_order_and_the_map_is_not_differentiated():
    q, k, v = (x.requires_grad_() for x in _qkv(2))
    attn = attnc.compile_attention("stdlib:moba", block=8, topk=2, backend="cpu")
    out, lse, chosen, pooled = attn(q, k, v, return_lse=True, return_selection=True, return_block_max=8)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and chosen.dtype == torch.bool
    assert pooled.shape == (2, 4, 9, 9) and not pooled.requires_grad
    out.sum().backward()  # the attention is differentiated as ever
    assert q.grad is not None


@pytest.mark.parametrize("kwargs,message", [
    (dict(return_block_max=0), "expected a positive int"),
    (dict(return_block_max=True), "expected a positive int"),
    (dict(return_block_max=8, cu_seqlens=torch.tensor([0, 30, 70])), "packed sequences or paged caches"),
])
def test_bad_requests_name_the_argument(kwargs, message):
    q, k, v = _qkv(1)
    with pytest.raises(attnc.SpecError, match=message) as err:
        attnc.compile_attention(WINDOW, backend="cpu")(q, k, v, **kwargs)
    assert err.value.where == "argument return_block_max"


def test_flex_and_recurrences_are_refused():
    q, k, v = _qkv(1)
    with pytest.raises(attnc.SpecError, match="backend 'flex' gives no probabilities"):
        attnc.compile_attention(WINDOW, backend="flex")(q, k, v, return_block_max=8)
    with pytest.raises(attnc.SpecError, match="recurrence pattern"):
        attnc.compile_attention("stdlib:retention", backend="cpu")(q, q, q, return_block_max=8)


def test_triton_refuses_what_it_does_not_pool():
    q, k, v = (x.float() for x in _qkv(1))
    attn = attnc.compile_attention(WINDOW, backend="triton", kv_tile=16)
    with pytest.raises(attnc.SpecError, match="queries after a KV cache"):
        attn(q[:, :, -3:], k, v, return_block_max=8)
    with pytest.raises(attnc.SpecError, match="neither holds whole KV tiles of 16 nor divides one"):
        attn(q, k, v, return_block_max=24)


#: What the guard around the triton forward's buffer of row maxima holds: no score maximum is this.
SENTINEL = 12345.0


@pytest.mark.parametrize("n,kv_tile,size", [
    (9, None, 3), (12, None, 4), (24, None, 8), (40, None, 8),  # one KV tile of n keys, a power-of-two group
    (40, None, 40), (40, None, 80), (24, None, 12), (12, None, 6),  # a group of another size
    (70, 24, 8), (70, 24, 12), (70, 24, 48), (70, 40, 8), (70, 40, 20),  # several KV tiles that are no power of two
])
def test_triton_stores_only_the_kv_tiles_groups(monkeypatch, n, kv_tile, size):
    """A KV tile that is not a power of two is padded to BLOCK_N slots: the forward stores the maxima of the tile's
    own groups of keys and nothing for its padding. The buffer is lent from inside a larger sentinel-filled tensor
    (rows twice as wide, a row more), so that a store past a row or past the buffer lands there, where it is seen,
    rather than in memory the process does not own."""
    from attnc.runtime.backends.triton import forward as triton_forward

    rooms = []
    make = triton_forward._row_maxima

    def guarded(launch, size, B, Hq, rows, device):
        buf, meta = make(launch, size, B, Hq, rows, device)
        room = torch.full((B, Hq, rows + 1, 2 * buf.shape[-1] + 8), SENTINEL, dtype=buf.dtype, device=device)
        view = room[:, :, :rows, :buf.shape[-1]]
        view.copy_(buf)
        rooms.append((room, view))
        return view, meta

    monkeypatch.setattr(triton_forward, "_row_maxima", guarded)
    q, k, v = _qkv(n + size, B=1, H=2, Hkv=1, n=n, d=16)
    attn = attnc.compile_attention(WINDOW, window=n // 2 + 3, backend="triton", kv_tile=kv_tile)
    _, pooled = attn(q.float(), k.float(), v.float(), return_block_max=size)
    _, want = attnc.compile_attention(WINDOW, window=n // 2 + 3, backend="reference")(q, k, v, return_block_max=size)
    assert len(rooms) == 1
    room, view = rooms[0]
    outside = torch.ones_like(room, dtype=torch.bool)
    outside[:, :, :view.shape[2], :view.shape[3]] = False
    assert bool((room[outside] == SENTINEL).all()), "the forward stored past its buffer of row maxima"
    assert pooled.shape == want.shape
    torch.testing.assert_close(pooled.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(want, dense_block_max(q, k, _window(n, window=n // 2 + 3), size), rtol=1e-12,
                               atol=1e-12)
