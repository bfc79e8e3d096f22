"""Routing's call-time arguments: a route's block sizes and topk that depend on the sizes are checked at
every call, and the inputs its ``keep`` reads are checked like a mask's, with errors naming the
argument (and the ``keep``), on every backend."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.core.errors import SpecError

BACKENDS = ["reference", "cpu", "triton", "flex"]  # triton: the interpreter on CPU tensors


def _route(route: str, tokens: str = "seq", extra: str = "", keep: str = "") -> str:
    keep = f" keep {keep}" if keep else ""
    return f"pattern r\n  tokens {tokens}\n{extra}  mask causal\n  route {route} by q @ mean(k){keep}\n"


def _qkv(n: int = 16, heads: int = 2, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, 16, generator=g, dtype=dtype) for _ in range(3))


def _refused(attn, args, kwargs, match: str, where: str):
    with pytest.raises(SpecError, match=match) as info:
        attn(*args, **kwargs)
    assert info.value.where == where


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("route,match,where", [
    ("topk(2) blocks(n - 16)", r"a block size of the route is 0 at n = 16; it must be at least 1", "argument q"),
    ("topk(heads - 3) blocks(4)", r"topk of the route is -1 at heads = 2", "argument q"),
])
def test_size_dependent_route_refused_at_the_call(backend, route, match, where):
    """A block of 0 keys divided by zero, and a topk below 1 silently selected nothing."""
    attn = attnc.compile_attention(_route(route), backend=backend)
    _refused(attn, _qkv(), {}, match, where)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_size_dependent_route_on_a_grid_and_after_a_kv_cache(backend):
    grid = attnc.compile_attention(_route("topk(2) blocks(y: height // 8, x: 2)", "grid(y: height, x: width)"),
                                   backend=backend)
    _refused(grid, _qkv(), {"sizes": {"height": 4, "width": 4}}, r"is 0 at height = 4", "argument sizes")
    cached = attnc.compile_attention(_route("topk(2) blocks(n - 16)"), backend=backend)
    q, k, v = _qkv()
    _refused(cached, (q[:, :, -2:], k, v), {}, r"is 0 at n = 16", "argument k")  # n is the whole sequence


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_size_dependent_route_equals_its_constant_form(backend):
    """blocks(n // 4) and topk(heads) at n = 16, heads = 2 select as blocks(4) topk(2) (float64)."""
    by_size = attnc.compile_attention(_route("topk(heads) blocks(n // 4)"), backend=backend)
    constant = attnc.compile_attention(_route("topk(2) blocks(4)"), backend="reference")
    q, k, v = _qkv(dtype=torch.float64, seed=1)
    torch.testing.assert_close(by_size(q, k, v), constant(q, k, v), rtol=1e-12, atol=1e-12)
    # and the selection matters here: one block fewer gives another result
    fewer = attnc.compile_attention(_route("topk(1) blocks(4)"), backend="reference")
    assert not torch.allclose(fewer(q, k, v), constant(q, k, v))


def test_size_dependent_route_refused_under_fullgraph_compile():
    attn = attnc.compile_attention(_route("topk(2) blocks(n - 16)"), backend="cpu")
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True)
    _refused(compiled, _qkv(), {}, r"a block size of the route is 0 at n = 16", "argument q")


KEEP = "  input pin: int[4]\n"


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_input_read_out_of_range_names_the_input_and_the_keep(backend):
    """keep is evaluated at every query with k at each block's first key (0, 4, 8, 12): pin[k] reads 4, 8 and 12."""
    attn = attnc.compile_attention(_route("topk(1) blocks(4)", extra=KEEP, keep="pin[k] > 0"), backend=backend)
    _refused(attn, _qkv(), {"pin": torch.tensor([1, 0, 0, 1])},
             r"input 'pin' indexed out of range in the route's keep .*: index 4 in dimension 0, valid 0\.\.3",
             "argument pin")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_keep_inputs_checked_and_used(backend):
    attn = attnc.compile_attention(_route("topk(1) blocks(4)", extra=KEEP, keep="pin[k // 4] > 0"), backend=backend)
    qkv = _qkv(dtype=torch.float64, seed=2)
    _refused(attn, qkv, {"pin": torch.tensor([1.0, 0.0, 0.0, 1.0])}, "input 'pin' is int", "argument pin")
    _refused(attn, qkv, {"pin": torch.tensor([1, 0, 1])}, r"input 'pin' has shape \[3\]", "argument pin")
    _refused(attn, qkv, {}, "missing input 'pin'", "argument pin")
    # in range: pinning block 0 equals the stdlib's own-block keep where every query's own block is 0
    out = attnc.compile_attention(_route("topk(1) blocks(4)", keep="k < 4"), backend="reference")(*qkv)
    torch.testing.assert_close(attn(*qkv, pin=torch.tensor([1, 0, 0, 0])), out, rtol=1e-12, atol=1e-12)


def test_size_dependent_route_refused_by_the_simulator():
    """The simulator's routing model reads the same checked sizes (it divided by a block of 0)."""
    with pytest.raises(SpecError, match=r"a block size of the route is 0 at n = 16; it must be at least 1"):
        attnc.simulate(_route("topk(2) blocks(n - 16)"), n=16, heads=2, head_dim=16)
    with pytest.raises(SpecError, match=r"topk of the route is -1 at heads = 2"):
        attnc.simulate(_route("topk(heads - 3) blocks(4)"), n=16, heads=2, head_dim=16)
    report = attnc.simulate(_route("topk(heads) blocks(n // 4)"), n=64, heads=2, head_dim=16)
    assert report["predicted_speedup"] > 0


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex"])
@pytest.mark.parametrize("n,block,topk,tile", [(80, 256, 3, 64), (100, 48, 2, 64), (130, 40, 2, 32), (80, 16, 2, 64)])
def test_route_blocks_across_a_padded_last_tile_equal_the_reference(backend, n, block, topk, tile):
    """MoBA where the last KV tile is padded and shares a route block with its valid keys (a block
    longer than the sequence, or one spanning the padded tile): the padded slots must not unmark the
    block the tile touches (they did on cpu and triton: whole query tiles lost their keys)."""
    g = torch.Generator().manual_seed(n + block)
    q = torch.randn(2, 2, n, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 1, n, 16, generator=g, dtype=torch.float64) for _ in range(2))
    ref = attnc.compile_attention("stdlib:moba", backend="reference", block=block, topk=topk)(q, k, v)
    attn = attnc.compile_attention("stdlib:moba", backend=backend, block=block, topk=topk, q_tile=tile, kv_tile=tile)
    if backend == "triton":  # the interpreter computes in float32
        torch.testing.assert_close(attn(q.float(), k.float(), v.float()).double(), ref, atol=2e-5, rtol=2e-5)
    else:
        torch.testing.assert_close(attn(q, k, v), ref, atol=1e-10, rtol=1e-10)
