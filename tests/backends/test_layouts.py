"""``layout="bnhd"``: [B, N, H, D] (and [B, *spatial, H, D] on grids) against the [B, H, N, D] result,
forward and backward, GQA, grids, recurrences with fla's gate layout, torch.compile; swapped shapes refused."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc import SpecError

F64 = torch.float64


def _rand(*shape, seed: int, grad: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(grad)


def _grads(outs, weights, leaves):
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bnhd_matches_bhnd_with_gqa(backend):
    B, N, Hq, Hkv, D = 2, 11, 4, 2, 8
    q, k, v = _rand(B, N, Hq, D, seed=1), _rand(B, N, Hkv, D, seed=2), _rand(B, N, Hkv, 6, seed=3)
    ref = attnc.compile_attention("stdlib:sliding_window", window=4, backend=backend)
    out = attnc.compile_attention("stdlib:sliding_window", window=4, backend=backend, layout="bnhd")
    o, lse = out(q, k, v, return_lse=True)
    assert o.shape == (B, N, Hq, 6) and lse.shape == (B, N, Hq)
    o_ref, lse_ref = ref(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True)
    torch.testing.assert_close(o, o_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    w, wl = _rand(*o.shape, seed=4, grad=False), _rand(*lse.shape, seed=5, grad=False)
    got = _grads((o, lse), (w, wl), (q, k, v))
    want = _grads((o_ref, lse_ref), (w.transpose(1, 2), wl.transpose(1, 2)), (q, k, v))
    for g, h in zip(got, want, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_call_layout_overrides_module_default_and_no_copy():
    q = _rand(1, 7, 3, 4, seed=6, grad=False)
    attn = attnc.compile_attention("stdlib:sliding_window", window=2, backend="reference")
    o = attn(q, q, q, layout="bnhd")
    torch.testing.assert_close(o, attn(*(q.transpose(1, 2),) * 3).transpose(1, 2), rtol=0, atol=0)
    # the result is a view of the backend's [B, H, N, D] output, not a copy
    assert o.shape == (1, 7, 3, 4) and o.transpose(1, 2).is_contiguous()


def test_grid_spatial_layout_binds_sizes():
    B, Y, X, H, D = 1, 5, 10, 2, 4
    q, k, v = (_rand(B, Y, X, H, D, seed=s) for s in (7, 8, 9))
    attn = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=(3, 5), dilation=(1, 2), layout="bnhd")
    o, lse = attn(q, k, v, return_lse=True)  # no sizes=: the extents are the grid
    assert o.shape == (B, Y, X, H, D) and lse.shape == (B, Y, X, H)
    ref = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=(3, 5), dilation=(1, 2),
                                  sizes={"height": Y, "width": X}, backend="reference")
    flat = [t.flatten(1, 2).transpose(1, 2) for t in (q, k, v)]
    o_ref, lse_ref = ref(*flat, return_lse=True)
    torch.testing.assert_close(o, o_ref.transpose(1, 2).unflatten(1, (Y, X)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, lse_ref.transpose(1, 2).unflatten(1, (Y, X)), rtol=1e-12, atol=1e-12)
    w = _rand(*o.shape, seed=10, grad=False)
    got = _grads((o,), (w,), (q, k, v))
    want = _grads((o_ref,), (w.flatten(1, 2).transpose(1, 2),), (q, k, v))
    for g, h in zip(got, want, strict=True):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    # a flat [B, N, H, D] works on a grid too, with the sizes given
    o_flat = attn(*(t.flatten(1, 2) for t in (q, k, v)), sizes={"height": Y, "width": X})
    torch.testing.assert_close(o_flat, o.flatten(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name, gate_dims", [("gla", (4,)), ("mamba2", ())])
def test_recurrence_fla_layout_and_gates(name, gate_dims):
    B, T, H, D = 2, 21, 2, 4
    q, k, v = (_rand(B, T, H, D, seed=s) for s in (11, 12, 13))
    g = (-torch.rand(B, T, H, *gate_dims, generator=torch.Generator().manual_seed(14), dtype=F64)).requires_grad_()
    s0 = _rand(B, H, D, D, seed=15)
    fla = attnc.compile_attention(f"stdlib:{name}", backend="cpu", q_tile=16, layout="bnhd")
    ours = attnc.compile_attention(f"stdlib:{name}", backend="cpu", q_tile=16)
    o, st = fla(q, k, v, g=g, initial_state=s0, return_state=True)
    o_ref, st_ref = ours(*(t.transpose(1, 2) for t in (q, k, v)), g=g.transpose(1, 2), initial_state=s0,
                         return_state=True)
    assert o.shape == (B, T, H, D) and st.shape == (B, H, D, D)
    torch.testing.assert_close(o, o_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, st_ref, rtol=1e-12, atol=1e-12)
    w, ws = _rand(*o.shape, seed=16, grad=False), _rand(*st.shape, seed=17, grad=False)
    got = _grads((o, st), (w, ws), (q, k, v, g, s0))
    want = _grads((o_ref, st_ref), (w.transpose(1, 2), ws), (q, k, v, g, s0))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # an unbatched gate [T, H(, K)] is broadcast over the batch, as [H, T(, K)] is in bhnd
    o1 = fla(q, k, v, g=g[0].detach())
    o1_ref = ours(*(t.transpose(1, 2) for t in (q, k, v)), g=g[0].detach().transpose(0, 1))
    torch.testing.assert_close(o1, o1_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)


def test_torch_compile_fullgraph_bnhd_cpu_backend():
    torch._dynamo.reset()
    q, k, v = (_rand(1, 9, 2, 4, seed=s) for s in (18, 19, 20))
    attn = attnc.compile_attention("stdlib:sliding_window", window=3, backend="cpu", layout="bnhd")
    eager = attn(q, k, v)
    w = _rand(*eager.shape, seed=21, grad=False)
    want = _grads((eager,), (w,), (q, k, v))
    # aot_eager: the whole graph (layout views, custom op, backward) is traced; inductor's codegen
    # adds nothing to what this checks and takes a minute on a loaded CPU
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    got = _grads((out,), (w,), (q, k, v))
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------- refusals
def _refused(attn, *args, where="argument q", match="", **kw):
    with pytest.raises(SpecError) as info:
        attn(*args, **kw)
    assert info.value.where == where, str(info.value)
    assert match in str(info.value), str(info.value)
    return info.value


def test_swapped_gqa_shapes_refused():
    attn = attnc.compile_attention("stdlib:sliding_window", window=3, backend="reference")
    q, kv = torch.randn(1, 12, 4, 8), torch.randn(1, 12, 2, 8)  # [B, N, H, D] given to a bhnd module
    err = _refused(attn, q, kv, kv, match="swapped")
    assert "layout='bnhd'" in err.hint
    bnhd = attnc.compile_attention("stdlib:sliding_window", window=3, backend="reference", layout="bnhd")
    err = _refused(bnhd, q.transpose(1, 2), kv.transpose(1, 2), kv.transpose(1, 2), match="swapped")
    assert "layout='bhnd'" in err.hint
    # fewer keys than queries as read (a cache missing keys reads so too): both readings named, not only the swap
    err = _refused(attn, torch.randn(2, 2, 16, 8), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 8, 8), match="swapped")
    assert "fewer keys than queries" in str(err) and "give them every key" in err.hint and "layout='bnhd'" in err.hint
    # heads not dividing in either reading: the ordinary error, no layout advice
    _refused(attn, torch.randn(1, 3, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8), where="argument k")


def test_swapped_grid_shapes_refused_with_sizes_known():
    attn = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=3, sizes={"height": 5, "width": 6})
    x = torch.randn(1, 30, 4, 8)
    _refused(attn, x, x, x, match="make 30 queries, not 4")
    # declared sizes and the extents of a [B, *spatial, H, D] tensor disagree
    grid = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=3, sizes={"height": 5, "width": 6},
                                   layout="bnhd")
    y = torch.randn(1, 5, 7, 4, 8)
    _refused(grid, y, y, y, match="axis x has extent 7")
    _refused(grid, torch.randn(1, 5, 6, 4, 8), torch.randn(1, 6, 5, 4, 8), torch.randn(1, 6, 5, 4, 8),
             where="argument k", match="extent")


def test_swapped_shapes_refused_from_input_dims():
    spec = "pattern rel\n  tokens seq\n  input rpb: float[heads, 9]\n  mask causal\n  bias rpb[h, clamp(q - k, 0, 8)]\n"
    attn = attnc.compile_attention(spec, backend="reference")
    x = torch.randn(1, 10, 3, 8)  # [B, N, H, D]: rpb's 3 heads tell
    _refused(attn, x, x, x, rpb=torch.randn(3, 9), match="heads = 3")
    out = attnc.compile_attention(spec, backend="reference", layout="bnhd")(x, x, x, rpb=torch.randn(3, 9))
    assert out.shape == x.shape


def test_gate_in_the_wrong_order_refused_in_the_callers_terms():
    attn = attnc.compile_attention("stdlib:mamba2", backend="cpu", layout="bnhd")
    x = torch.randn(2, 10, 3, 4)
    _refused(attn, x, x, x, g=-torch.rand(2, 3, 10), where="argument g", match="expects [B, n, heads] with n = 10")
    _refused(attn, x, x, x, g=-torch.rand(3, 10), where="argument g", match="[n, heads]")


def test_bad_layout_and_rank_refused():
    with pytest.raises(SpecError) as info:
        attnc.compile_attention("stdlib:sliding_window", layout="nhd")
    assert info.value.where == "argument layout"
    attn = attnc.compile_attention("stdlib:sliding_window", window=3, backend="reference")
    x = torch.randn(1, 4, 2, 8)
    _refused(attn, x, x, x, layout="BNHD", where="argument layout")
    _refused(attn, torch.randn(1, 2, 2, 2, 8), x, x, layout="bnhd", match="expected 4 dimensions")


def test_ambiguous_shapes_follow_the_layout():
    # a self-attention pattern on a sequence with as many heads in q and k: [B, N, H, D] and [B, H, N, D]
    # are both consistent, so the layout decides (documented in runtime/frontends/layouts.py and docs/calling.md)
    attn = attnc.compile_attention("stdlib:sliding_window", window=3, backend="reference")
    x = torch.randn(1, 6, 3, 8)
    assert attn(x, x, x).shape == (1, 6, 3, 8)


@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_bnhd_on_kernel_backends(backend):
    # the layout is converted at the API boundary: the generated kernels see [B, H, N, D] views
    q, k, v = (torch.randn(1, 16, 2, 16, generator=torch.Generator().manual_seed(s)) for s in (22, 23, 24))
    o, lse = attnc.compile_attention("stdlib:sliding_window", window=4, backend=backend, layout="bnhd")(
        q, k, v, return_lse=True)
    ref = attnc.compile_attention("stdlib:sliding_window", window=4, backend="reference")
    o_ref, lse_ref = ref(*(t.transpose(1, 2) for t in (q, k, v)), return_lse=True)
    torch.testing.assert_close(o, o_ref.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref.transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_recurrence_fla_layout():
    torch._dynamo.reset()
    B, T, H, D = 1, 18, 2, 4
    q, k, v = (_rand(B, T, H, D, seed=s) for s in (25, 26, 27))
    g = (-torch.rand(B, T, H, generator=torch.Generator().manual_seed(28), dtype=F64)).requires_grad_()
    attn = attnc.compile_attention("stdlib:mamba2", backend="cpu", q_tile=16, layout="bnhd")
    eager, e_state = attn(q, k, v, g=g, return_state=True)
    w = _rand(*eager.shape, seed=29, grad=False)
    want = _grads((eager, e_state), (w, torch.ones_like(e_state)), (q, k, v, g))
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out, state = compiled(q, k, v, g=g, return_state=True)
    got = _grads((out, state), (w, torch.ones_like(state)), (q, k, v, g))
    torch.testing.assert_close(out, eager, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, e_state, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_cross_attention_bnhd_with_gqa():
    spec = "pattern cross\n  queries seq\n  keys seq\n  mask k <= q + 2\n"
    q, k, v = _rand(1, 5, 2, 4, seed=30), _rand(1, 9, 1, 4, seed=31), _rand(1, 9, 1, 3, seed=32)
    o = attnc.compile_attention(spec, backend="cpu", layout="bnhd")(q, k, v)
    o_ref = attnc.compile_attention(spec, backend="reference")(*(t.transpose(1, 2) for t in (q, k, v)))
    torch.testing.assert_close(o, o_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_inputs_over_the_keys_are_given_keys_first_under_bnhd(backend):
    # dma's importance [heads, nk] and sparsifiner's ki [heads, nk, rank] are given [nk, heads(, rank)] under
    # 'bnhd', as inputs over the queries are: sparsifiner's qi was transposed and its ki was not, and dma's
    # importance in the caller's order was refused with a hint to read q, k, v swapped
    B, N, H, D = 2, 12, 2, 8
    q, k, v = (_rand(B, H, N, D, seed=s) for s in range(3))
    cases = {"stdlib:dma": dict(params={"window": 5}, inputs={"importance": _rand(B, H, N, seed=3)}),
             "stdlib:sparsifiner": dict(params={"budget": 4, "rank": 3, "cls": 1},
                                        inputs={"qi": _rand(B, H, N, 3, seed=4), "ki": _rand(B, H, N, 3, seed=5)})}
    for spec, case in cases.items():
        attn = attnc.compile_attention(spec, backend=backend, **case["params"])
        want = attn(q, k, v, **case["inputs"])
        swapped = {name: t.transpose(1, 2) for name, t in case["inputs"].items()}
        got = attn(*(t.transpose(1, 2) for t in (q, k, v)), layout="bnhd", **swapped)
        torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=0)
        if spec == "stdlib:dma":  # the importance is also a bias: the same gradient in both layouts
            leaf = case["inputs"]["importance"]
            (g_bnhd,), (g_bhnd,) = torch.autograd.grad(got.sum(), leaf), torch.autograd.grad(want.sum(), leaf)
            torch.testing.assert_close(g_bnhd, g_bhnd, rtol=1e-12, atol=1e-12)
        # in the declared order under 'bnhd', the input is refused, naming it
        first = next(iter(case["inputs"]))
        with pytest.raises(SpecError) as info:
            attn(*(t.transpose(1, 2) for t in (q, k, v)), layout="bnhd", **{**swapped, first: case["inputs"][first]})
        assert info.value.where == f"argument {first}"
