"""One front door for a softmax call (``runtime.admission``): the same answers and the same refusals on
every path a call takes: eager or under ``torch.compile``, every backend, decoding rows or tiles.

Regression tests of defects found by differential fuzzing: each failed before its fix."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.core.errors import SpecError


def _qkv(n, nk, heads=2, d=8, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(1, heads, m, d, generator=g, dtype=dtype) for m in (n, nk, nk)]
    return [x.requires_grad_(grad) for x in t]


def _with_reference(src, attn, q, k, v, rtol, atol, **inputs):
    """``attn(q, k, v)`` and its gradients of q, k, v against the float64 reference's."""
    out = attn(q, k, v, **inputs)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = attnc.compile_attention(src, backend="reference")(q64, k64, v64, **inputs)
    torch.testing.assert_close(out.double(), want, rtol=rtol, atol=atol)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout)
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol)


# A mask that reads neither q nor k evaluates to one column; the decoding rows of the CPU backend
# (a few queries after a KV cache) must still see every key.
KEYLESS_MASKS = ["pattern p\n  tokens seq\n",
                 "pattern p\n  tokens seq\n  mask true\n",
                 "pattern p\n  tokens seq\n  mask h == 0\n",
                 "pattern p\n  tokens seq\n  input t: float[n]\n  mask t[q] > 0\n"]


@pytest.mark.parametrize("src", KEYLESS_MASKS)
def test_cpu_decoding_rows_with_a_mask_that_reads_no_key(src):
    q, k, v = _qkv(3, 20, grad=True)
    # t over all 20 tokens: the rows read t at their positions 17-19 (the second one is masked out)
    inputs = {"t": torch.tensor([1.0] * 18 + [-1.0, 2.0], dtype=torch.float64)} if "input t" in src else {}
    _with_reference(src, attnc.compile_attention(src, backend="cpu"), q, k, v, 1e-10, 1e-10, **inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_compiled_call_after_a_kv_cache_equals_the_reference(backend):
    """Under torch.compile, queries after a KV cache: forward and backward as the reference (the Triton
    kernels run the whole sequence with zero queries in front, in the op as eagerly)."""
    src = "pattern p\n  tokens seq\n  mask causal and q - k < 8\n"
    attn = torch.compile(attnc.compile_attention(src, backend=backend), fullgraph=True)
    q, k, v = _qkv(4, 40, d=16, dtype=torch.float32, grad=True)
    _with_reference(src, attn, q, k, v, 2e-5, 2e-5)


def _error(fn):
    with pytest.raises(SpecError) as err:
        fn()
    return err.value


def test_compiled_flex_refuses_a_kv_cache_as_eager_does():
    attn = attnc.compile_attention("stdlib:sliding_window", backend="flex", window=8)
    q, k, v = _qkv(4, 40, d=16, dtype=torch.float32)
    eager = _error(lambda: attn(q, k, v))
    compiled = _error(lambda: torch.compile(attn)(q, k, v))
    assert (compiled.message, compiled.where) == (eager.message, eager.where)
    assert "KV cache" in eager.message and eager.where == "argument k"


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex"])
def test_compiled_call_refuses_a_softcap_that_is_not_positive_on_a_head(backend):
    src = "pattern p(c = 1.0)\n  tokens seq\n  mask causal\n  softcap c - h\n"
    attn = attnc.compile_attention(src, backend=backend)
    q, k, v = _qkv(16, 16, d=16, dtype=torch.float32)
    eager = _error(lambda: attn(q, k, v))
    compiled = _error(lambda: torch.compile(attn)(q, k, v))
    assert (compiled.message, compiled.where) == (eager.message, eager.where)
    assert "softcap" in eager.message and "h = 1" in eager.message
