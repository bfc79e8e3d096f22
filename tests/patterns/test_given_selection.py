"""A route's selection kept across calls (``return_selection=True``, ``selection=``; ``runtime.plan.given``): the
selection a call returns is the one its output used, the same on every backend, and a later call given it
attends exactly those blocks (against dense float64 attention masked by it), forward and backward."""

from __future__ import annotations

import math

import pytest
import torch

import attnc
from attnc.core.errors import SpecError

N = 48
GRID = {"frames": 2, "height": 4, "width": 6}


def _vmoba_blocks() -> torch.Tensor:  # layer 1: tiles of 2 x 3 over both frames, row-major
    t, y, x = torch.meshgrid(*(torch.arange(e) for e in GRID.values()), indexing="ij")
    return (y // 2 * 2 + x // 3).flatten()


def _causal(n, nk):
    return (torch.arange(n)[:, None] + nk - n) >= torch.arange(nk)[None, :]


#: name -> (params, sizes, the mask the route picks among (n, nk) -> [n, nk], the block of every key (nk) -> [nk])
CASES = {
    "moba": ({"block": 8, "topk": 2}, None, _causal, lambda nk: torch.arange(nk) // 8),
    "quest": ({"token_budget": 16, "page": 4}, None, _causal, lambda nk: torch.arange(nk) // 4),
    "token_topk": ({"topk": 5}, None, _causal, lambda nk: torch.arange(nk)),
    "anchor": ({"block": 3, "step": 2, "init": 5, "theta": 0.5}, None, _causal, lambda nk: torch.arange(nk)),
    "xattention": ({"block": 8, "stride": 4, "threshold": 0.8, "chunk": 24}, None, _causal,
                   lambda nk: torch.arange(nk) // 8),
    "vmoba": ({"layer": 1, "spatial_chunk_y": 2, "spatial_chunk_x": 3}, GRID,
              lambda n, nk: torch.ones(n, nk, dtype=torch.bool), lambda nk: _vmoba_blocks()),
}


def _dense(q, k, v, allowed):
    """Softmax attention in float64 over the allowed pairs ``[B, H, n, nk]`` (GQA: k, v repeated)."""
    rep = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(rep, 1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~allowed, -math.inf), -1) @ v


def _qkv(seed, dtype, n=N, nk=N, hq=4, hkv=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, n, d, generator=g, dtype=torch.float64).to(dtype),
            *(torch.randn(2, hkv, nk, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)))


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_returned_selection_is_the_one_used_and_a_given_one_is_attended(name, backend):
    params, sizes, mask, blocks = CASES[name]
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, sizes=sizes, **params)
    q, k, v = _qkv(1, dtype)
    out, chosen = attn(q, k, v, return_selection=True)
    assert chosen.dtype == torch.bool and chosen.shape == (2, 4, N, int(blocks(N).max()) + 1)
    reference = attnc.compile_attention(f"stdlib:{name}", backend="reference", sizes=sizes, **params)
    assert torch.equal(chosen, reference(*(x.double() for x in (q, k, v)), return_selection=True)[1])
    allowed = mask(N, N) & chosen[..., blocks(N)]
    torch.testing.assert_close(out.double(), _dense(q, k, v, allowed), **tol)
    # later calls: other queries and keys, the kept selection (not their own), forward and backward
    q2, k2, v2 = (x.clone().requires_grad_() for x in _qkv(2, dtype))
    out2 = attn(q2, k2, v2, selection=chosen)
    ref = [x.detach().double().requires_grad_() for x in (q2, k2, v2)]
    want = _dense(*ref, allowed)
    torch.testing.assert_close(out2.double(), want, **tol)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out2.backward(grad.to(dtype))
    want.backward(grad)
    for mine, theirs in zip((q2, k2, v2), ref, strict=True):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)
    again, same = attn(q2.detach(), k2.detach(), v2.detach(), selection=chosen, return_selection=True)
    assert torch.equal(same, chosen)  # the kept selection, as the call used it


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_selection_recycled_over_decode_steps(backend):
    """Recycled Attention's shape of reuse: a selection of one step's query kept for the next steps, each new
    key (made after it) attended as well: the kept selection padded with selected columns."""
    attn = attnc.compile_attention("stdlib:token_topk", topk=6, backend=backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    q, k, v = _qkv(4, dtype, n=1, nk=40)
    _, kept = attn(q, k, v, return_selection=True)  # [2, 4, 1, 40]
    assert int(kept.sum(-1).max()) == 6
    for step in range(1, 4):
        qs, ks, vs = _qkv(10 + step, dtype, n=1, nk=40 + step)
        ks[:, :, :40], vs[:, :, :40] = k[:, :, :40], v[:, :, :40]
        given = torch.cat([kept, torch.ones(2, 4, 1, step, dtype=torch.bool)], -1)
        out = attn(qs, ks, vs, selection=given)
        torch.testing.assert_close(out.double(), _dense(qs, ks, vs, given), **tol)


def test_refusals_name_the_argument():
    plain = attnc.compile_attention("stdlib:sliding_window", window=4, backend="cpu")
    moba = attnc.compile_attention("stdlib:moba", block=8, topk=2, backend="cpu")
    q, k, v = _qkv(5, torch.float32)
    with pytest.raises(SpecError, match="no route") as err:
        plain(q, k, v, return_selection=True)
    assert err.value.where == "argument return_selection"
    with pytest.raises(SpecError, match="no route") as err:
        plain(q, k, v, selection=torch.ones(2, 4, N, 6, dtype=torch.bool))
    assert err.value.where == "argument selection"
    with pytest.raises(SpecError, match="a bool tensor") as err:
        moba(q, k, v, selection=torch.ones(2, 4, N, 6))
    assert err.value.where == "argument selection"
    with pytest.raises(SpecError, match=r"input 'selection' has shape \[2, 4, 48, 5\], expected .* = \[4, 48, 6\]") as err:
        moba(q, k, v, selection=torch.ones(2, 4, N, 5, dtype=torch.bool))
    assert err.value.where == "argument selection"
    with pytest.raises(SpecError, match="packed sequences") as err:
        moba(q[:1], k[:1], v[:1], cu_seqlens=torch.tensor([0, 20, 48]), return_selection=True)
    assert err.value.where == "argument return_selection"
    with pytest.raises(SpecError, match="return_selection"):
        moba(q, k, v, return_selection="yes")


def test_a_given_selection_runs_under_torch_compile_fullgraph():
    attn = attnc.compile_attention("stdlib:moba", block=8, topk=2, backend="cpu")
    q, k, v = _qkv(6, torch.float32)
    out, kept = attn(q, k, v, return_selection=True)
    compiled = torch.compile(attn, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, selection=kept), out, rtol=1e-6, atol=1e-6)


def test_a_given_selection_needs_no_input_only_the_route_reads():
    """An indexer's inputs feed the choice alone: with the selection given they need not be passed (and may be)."""
    g = torch.Generator().manual_seed(8)
    attn = attnc.compile_attention("stdlib:dsa", topk=4, index_heads=2, index_dim=3, backend="cpu")
    q, k, v = _qkv(9, torch.float64, n=20, nk=20)
    index = {"qi": torch.randn(20, 2, 3, generator=g, dtype=torch.float64),
             "ki": torch.randn(20, 3, generator=g, dtype=torch.float64),
             "w": torch.randn(20, 2, generator=g, dtype=torch.float64)}
    out, kept = attn(q, k, v, return_selection=True, **index)
    torch.testing.assert_close(attn(q, k, v, selection=kept), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn(q, k, v, selection=kept, **index), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_declared_block_count_is_the_routes(name):
    """The extent a given selection is declared with is the number of blocks the route's keys fall in."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.compiler.analysis.route_blocks import block_count, block_ids, route_sizes

    params, sizes, _, blocks = CASES[name]
    pat = attnc.load(f"stdlib:{name}", **params)
    for nk in (N, N - 5) if sizes is None else (N,):
        bound = E.bind_sizes(pat, n=nk, nk=nk, heads=2, sizes=sizes or {}, dk=8)
        _, count = block_ids(pat.keys, route_sizes(pat, bound)[0], bound, nk)
        assert int(block_count(pat.keys, pat.route.block).subs(bound.subs)) == count
