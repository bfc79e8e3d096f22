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


@pytest.mark.parametrize("backend", ["triton", "cpu", "flex"])
def test_compiled_call_after_a_kv_cache_equals_the_reference(backend):
    """Under torch.compile, queries after a KV cache: forward and backward as the reference (the Triton
    kernels take the queries' offset, in the op as eagerly)."""
    src = "pattern p\n  tokens seq\n  mask causal and q - k < 8\n"
    attn = torch.compile(attnc.compile_attention(src, backend=backend), fullgraph=True)
    q, k, v = _qkv(4, 40, d=16, dtype=torch.float32, grad=True)
    _with_reference(src, attn, q, k, v, 2e-5, 2e-5)


def _error(fn):
    with pytest.raises(SpecError) as err:
        fn()
    return err.value


def test_compiled_flex_refuses_a_grid_after_a_kv_cache_as_eager_does():
    """Flex folds the queries' offset into its mods on a sequence; a grid's queries after a cache are refused,
    eagerly and compiled alike."""
    attn = attnc.compile_attention("stdlib:neighborhood_2d", backend="flex", sizes={"height": 5, "width": 8},
                                   kernel_size=3)
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


def test_reference_double_backward_is_exact():
    """The reference is plain torch autograd: its second-order gradients pass gradgradcheck (float64)."""
    attn = attnc.compile_attention("pattern p\n  tokens seq\n  mask causal and q - k < 3\n", backend="reference")
    q, k, v = _qkv(5, 5, heads=1, d=3, grad=True)
    assert torch.autograd.gradgradcheck(lambda q, k, v: attn(q, k, v), (q, k, v))


@pytest.mark.parametrize("backend,src", [("cpu", "stdlib:sliding_window"), ("flex", "stdlib:sliding_window"),
                                         ("triton", "stdlib:sliding_window"), ("auto", "stdlib:sliding_window"),
                                         ("cpu", "stdlib:retention"), ("triton", "stdlib:retention")])
def test_double_backward_is_refused_the_same_on_every_other_backend(backend, src):
    """create_graph=True still gives the exact first-order gradients; differentiating them again raises one
    SpecError (before: None on flex, a raw error on cpu, a gradient without requires_grad on triton)."""
    kw = {"window": 4} if "window" in src else {}
    attn = attnc.compile_attention(src, backend=backend, **kw)
    ref = attnc.compile_attention(src, backend="reference", **kw)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = _qkv(16, 16, d=8, dtype=dtype, grad=True)
    g, = torch.autograd.grad(attn(q, k, v).pow(2).sum(), q, create_graph=True)
    assert g.requires_grad
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want, = torch.autograd.grad(ref(q64, k64, v64).pow(2).sum(), q64)
    torch.testing.assert_close(g.double(), want, rtol=1e-5, atol=1e-5)
    err = _error(lambda: torch.autograd.grad(g.pow(2).sum(), (k, v)))
    assert err.where == "backward" and f"the {backend} backend's gradients cannot be differentiated" in err.message


@pytest.mark.parametrize("src,kwargs,sizes", [
    ("stdlib:neighborhood_2d", {"kernel_size": 3}, {"height": 4, "width": 6}),
    ("stdlib:sliding_tile", {"tile_t": 1, "tile_y": 2, "tile_x": 2, "wt": 1}, {"frames": 2, "height": 4, "width": 4}),
    ("stdlib:vertical_slash", {}, None),
])
def test_fullgraph_compile_of_a_grid_on_flat_tensors_and_of_vertical_slash(src, kwargs, sizes):
    """Grid patterns called with flat [B, H, N, D] tensors and vertical-slash's selection ran sympy inside
    the traced region (a raw dynamo error under fullgraph=True); now they compile, equal to eager."""
    attn = attnc.compile_attention(src, backend="cpu", **kwargs)
    n = 1
    for extent in (sizes or {"n": 24}).values():
        n *= extent
    q, k, v = _qkv(n, n, d=16, dtype=torch.float32)
    call = (lambda q, k, v: attn(q, k, v, sizes=sizes)) if sizes else attn
    torch.testing.assert_close(torch.compile(call, fullgraph=True)(q, k, v), call(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("src,inputs", [("stdlib:sliding_window", {}),
                                        ("stdlib:document", {"doc": torch.tensor([0] * 5 + [1] * 11)})])
def test_the_reference_backend_compiles_with_fullgraph(src, inputs):
    """``backend="reference"`` under ``torch.compile(fullgraph=True)``: its call is an op (sizes bound inside it,
    the backward by recomputation), so the first call traces (it failed in dynamo on the memory check's
    ``os.sysconf``, and on a symbolic size with a document mask); forward and gradients equal the eager reference,
    at a second length too."""
    attn = attnc.compile_attention(src, backend="reference")
    compiled = torch.compile(lambda q, k, v: attn(q, k, v, **inputs), fullgraph=True)
    q, k, v = _qkv(16, 16, dtype=torch.float64, grad=True)
    out, want = compiled(q, k, v), attn(q, k, v, **inputs)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    grown = {name: torch.cat([t, t[-1:].expand(8)]) for name, t in inputs.items()}
    compiled_grown = torch.compile(lambda q, k, v: attn(q, k, v, **grown), fullgraph=True)
    q, k, v = _qkv(24, 24, dtype=torch.float64, seed=2)
    torch.testing.assert_close(compiled_grown(q, k, v), attn(q, k, v, **grown), rtol=0, atol=0)


def test_bnhd_gates_over_the_whole_sequence_after_a_kv_cache():
    """Layout bnhd with a KV cache: an input declared [heads, n] is given [n, heads] over the whole
    sequence (k's tokens), as under bhnd it is [heads, nk]; it was refused in every shape."""
    fox = attnc.compile_attention("stdlib:forgetting", backend="cpu")
    q, k, v = _qkv(3, 10)
    g = -torch.rand(2, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = attnc.compile_attention("stdlib:forgetting", backend="reference")(q, k, v, g=g)
    out = fox(*(t.transpose(1, 2) for t in (q, k, v)), g=g.T, layout="bnhd")
    torch.testing.assert_close(out.transpose(1, 2), want, rtol=1e-12, atol=1e-12)
    err = _error(lambda: fox(*(t.transpose(1, 2) for t in (q, k, v)), g=g[:, -3:].T, layout="bnhd"))
    assert err.where == "argument g" and "n = 10" in err.message


@pytest.mark.parametrize("src", ["stdlib:nsa", "stdlib:sliding_window", "stdlib:retention"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_every_packed_sequence_empty_gives_empty_differentiable_results(src, backend):
    attn = attnc.compile_attention(src, backend=backend)
    q, k, v = (torch.zeros(1, 2, 0, 16, requires_grad=True) for _ in range(3))
    gates = {n: torch.zeros(2, 0, requires_grad=True) for n in ("g_cmp", "g_slc", "g_swa")} if "nsa" in src else {}
    out = attn(q, k, v, cu_seqlens=torch.tensor([0, 0, 0], dtype=torch.int32), **gates)
    assert out.shape == (1, 2, 0, 16)
    out.sum().backward()
    for t in (q, k, v, *gates.values()):
        assert t.grad is not None and t.grad.shape == t.shape


def test_compiled_module_with_gradients_compiles_once():
    """The double-backward guard must not make dynamo guard on each tensor's identity (an id() did):
    fresh tensors that require grad reuse the one compiled graph."""
    import torch._dynamo.utils as dynamo_utils

    attn = torch.compile(attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=4), backend="eager")
    dynamo_utils.counters.clear()
    for seed in range(3):
        q, k, v = _qkv(16, 16, dtype=torch.float32, seed=seed, grad=True)
        attn(q, q, q).sum().backward()  # q given three times, as self-attention does
        attn(q, k, v).sum().backward()
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 2  # (q, q, q) and (q, k, v)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_compiled_empty_batch_is_refused_as_eager(backend):
    """An empty batch returned early in the custom ops, before the refusals: a grid's KV cache on flex, a
    per-head softcap that is not positive."""
    src = "pattern p(c = 1.0)\n  tokens seq\n  mask causal\n  softcap c - h\n"
    attn = attnc.compile_attention(src, backend=backend)
    q, k, v = (torch.zeros(0, 2, 16, 16) for _ in range(3))
    eager = _error(lambda: attn(q, k, v))
    compiled = _error(lambda: torch.compile(attn, fullgraph=True)(q, k, v))
    assert (compiled.message, compiled.where) == (eager.message, eager.where)
    if backend == "flex":
        flex = attnc.compile_attention("stdlib:neighborhood_2d", backend="flex", sizes={"height": 4, "width": 4},
                                       kernel_size=3)
        q = torch.zeros(0, 2, 4, 16)
        k = torch.zeros(0, 2, 16, 16)
        eager = _error(lambda: flex(q, k, k))
        torch._dynamo.reset()
        compiled = _error(lambda: torch.compile(flex, fullgraph=True)(q, k, k))
        assert (compiled.message, compiled.where) == (eager.message, eager.where)


@pytest.mark.parametrize(("backend", "compiled"), [("reference", False), ("cpu", False), ("triton", False),
                                                  ("auto", False), ("cpu", True), ("triton", True), ("auto", True)])
def test_a_route_scored_by_query_blocks_is_refused_after_a_kv_cache_on_every_path(backend, compiled):
    """xattention scores antidiagonals of whole query blocks: a block partly in the cache cannot be scored,
    and every backend, eager or compiled, gives the front door's refusal (``forms.refuse_query_offset``)."""
    attn = attnc.compile_attention("stdlib:xattention", backend=backend, block=8, stride=4, chunk=24)
    run = torch.compile(attn, backend="aot_eager") if compiled else attn
    q, k, v = _qkv(4, 48, dtype=torch.float32)
    err = _error(lambda: run(q, k, v))
    assert "antidiagonal scoring" in err.message and err.where == "argument k"
