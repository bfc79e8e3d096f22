"""The public API under bad and unusual arguments (issue 9, items 2.2 and 4): one
``SpecError`` naming the argument, raised before any work; empty batches, meta
tensors, numpy scalars, per-batch scalar inputs, autocast and the one tile
convention, each checked against the reference backend or a dense computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import attnc
from attnc.runtime.backends.cpu import fused

WINDOW = "pattern w\ntokens seq\nmask abs(q - k) < 3\n"
BIAS_INPUT = "pattern b\ntokens seq\ninput w: float[n]\nmask abs(q - k) < 3\nbias w[k]\n"
PREFIX = "pattern p\ntokens seq\ninput plen: int[1]\nmask k <= q or k < plen[0]\n"
GRID = "pattern g\ntokens grid(y: height, x: width)\nmask abs(q.y - k.y) <= 1 and abs(q.x - k.x) <= 2\n"
MIXED = "pattern m\nqueries seq\nkeys grid(y: height, x: width)\nmask (q + k.y + k.x) % 3 != 0\n"
SIZES = {"height": 6, "width": 5}
BACKENDS = ("cpu", "reference", "triton")


def _qkv(B=1, H=2, N=8, D=4, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, D, generator=g, dtype=dtype), torch.randn(B, H, N, D, generator=g, dtype=dtype),
            torch.randn(B, H, N, Dv or D, generator=g, dtype=dtype))


def _dense(q, k, v, allowed, scale=None, softcap=None):
    """Dense float64 attention: the independent reference of these tests."""
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~allowed, -math.inf)
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def _spec_error(fn, where: str, match: str | None = None) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError, match=match) as info:
        fn()
    assert info.value.where == where, (info.value.where, str(info.value))
    return info.value


# ------------------------------------------------------------------ 2.2: devices and dtypes
@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_and_mismatched_tensors_are_refused_naming_the_argument(backend):
    attn = attnc.compile_attention(BIAS_INPUT, backend=backend)
    q, k, v = _qkv()
    w = torch.randn(8)
    _spec_error(lambda: attn(q, k, v, w=w.to("meta")), "argument w", "meta")
    _spec_error(lambda: attn(q.to("meta"), k.to("meta"), v.to("meta"), w=w), "argument q", "meta")
    _spec_error(lambda: attn(q, k.to("meta"), v, w=w), "argument k", "meta")
    _spec_error(lambda: attn(q, k, v.double(), w=w), "argument v", "dtype")
    _spec_error(lambda: attn(q, k.double(), v, w=w), "argument k", "dtype")


@pytest.mark.parametrize("backend", BACKENDS)
def test_meta_tensors_of_a_pattern_without_inputs_are_refused_naming_q(backend):
    """A pattern that reads no input (whose warm Triton calls are replayed): meta tensors got a bare RuntimeError
    from the replay's autocast check on triton."""
    attn = attnc.compile_attention("stdlib:sliding_window", window=4, backend=backend)
    q, k, v = (t.to("meta") for t in _qkv())
    _spec_error(lambda: attn(q, k, v), "argument q", "meta")


def test_meta_inputs_of_masks_and_states_are_refused():
    doc = torch.zeros(8, dtype=torch.int64, device="meta")
    _spec_error(lambda: attnc.materialize_mask("stdlib:document", n=8, inputs={"doc": doc}), "argument doc", "meta")
    rec = attnc.compile_attention("stdlib:retention", backend="cpu")
    q, k, v = _qkv()
    state = torch.zeros(1, 2, 4, 4, device="meta")
    _spec_error(lambda: rec(q, k, v, initial_state=state), "argument initial_state", "meta")
    _spec_error(lambda: rec.step(q[:, :, 0], k[:, :, 0], v[:, :, 0], state), "argument state", "meta")
    _spec_error(lambda: rec.step(q[:, :, 0].to("meta"), k[:, :, 0], v[:, :, 0]), "argument q", "meta")


# ------------------------------------------------------------------ 4: raw exceptions
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_heads_or_head_dim_are_spec_errors(backend):
    attn = attnc.compile_attention(WINDOW, backend=backend)
    _spec_error(lambda: attn(*_qkv(H=0)), "argument q", "heads 0")
    _spec_error(lambda: attn(*_qkv(D=0)), "argument q", "head dim 0")
    q, k, _ = _qkv()
    _spec_error(lambda: attn(q, k, torch.randn(1, 2, 8, 0)), "argument v", "head dim 0")


@pytest.mark.parametrize("backend", ["cpu", "flex"])
def test_empty_batch_on_cpu_returns_empty_outputs_and_gradients(backend):
    q, k, v = (t.requires_grad_() for t in _qkv(B=0, Dv=6))
    ref = attnc.compile_attention(WINDOW, backend="reference")(q, k, v)
    out, lse = attnc.compile_attention(WINDOW, backend=backend)(q, k, v, return_lse=True)
    assert out.shape == ref.shape == (0, 2, 8, 6) and lse.shape == (0, 2, 8)
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape
    # with a float input that gets a gradient
    q, k, v = _qkv(B=0)
    w = torch.randn(0, 8, requires_grad=True)
    attnc.compile_attention(BIAS_INPUT, backend=backend)(q, k, v, w=w).sum().backward()
    assert w.grad.shape == (0, 8)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton", "reference"])
def test_an_empty_batch_without_gradients_returns_empty_outputs(backend):
    # forward only, Triton chose a split of the KV tiles over batch x heads programs: at 0 of them it divided by 0
    attn = attnc.compile_attention(WINDOW, backend=backend)
    with torch.no_grad():
        out, lse = attn(*_qkv(B=0, Dv=6), return_lse=True)
        assert out.shape == (0, 2, 8, 6) and lse.shape == (0, 2, 8)
        q, k, v = _qkv(B=0, Dv=6)
        assert attn(q[:, :, -1:], k, v).shape == (0, 2, 1, 6)  # a decoding step's shape


def test_bad_sizes_inputs_and_tiles_are_spec_errors():
    _spec_error(lambda: attnc.materialize_mask(WINDOW, n=8, sizes=[1]), "argument sizes", "dict")
    _spec_error(lambda: attnc.materialize_mask(WINDOW, n=8, inputs=[1]), "argument inputs", "dict")
    _spec_error(lambda: attnc.simulate("stdlib:document", n=64, inputs=[1]), "argument inputs", "dict")
    _spec_error(lambda: attnc.materialize_mask(WINDOW, n=8, heads=0), "argument heads")
    _spec_error(lambda: attnc.materialize_mask(WINDOW, n=2**70), "argument n", "int64")
    _spec_error(lambda: attnc.simulate(WINDOW, n=2**70), "argument n", "int64")
    _spec_error(lambda: attnc.materialize_mask(WINDOW, n=8.0), "argument n")
    _spec_error(lambda: attnc.compile_attention("stdlib:neighborhood_2d", sizes={"height": 2**70, "width": 4}),
                "argument sizes['height']", "int64")
    _spec_error(lambda: attnc.materialize_mask("stdlib:neighborhood_2d", sizes={"height": 2**40, "width": 2**40}),
                "argument sizes", "int64")
    for backend in BACKENDS:  # refused when compiling, on every backend
        for tiles, where in (({"q_tile": 1.5}, "argument q_tile"), ({"kv_tile": 0}, "argument kv_tile"),
                             ({"q_tile": True}, "argument q_tile")):
            _spec_error(lambda b=backend, t=tiles: attnc.compile_attention(WINDOW, backend=b, **t), where)
    _spec_error(lambda: attnc.simulate(WINDOW, n=64, q_tile=1.5), "argument q_tile")


def test_sizes_that_cannot_fit_fail_fast_with_the_memory_they_need(monkeypatch):
    # fast: refused from the sizes alone, no index over the tokens or the heads made first (the largest arange)
    largest = [0]
    arange = torch.arange

    def counted(*args, **kwargs):
        made = arange(*args, **kwargs)
        largest[0] = max(largest[0], made.numel())
        return made

    monkeypatch.setattr(torch, "arange", counted)
    err = _spec_error(lambda: attnc.materialize_mask(WINDOW, n=10**9), "argument n")
    assert "n = 1000000000 needs a 1e+18-byte mask" in str(err)
    head_dependent = "pattern p\nmask (q + h) % 2 == 0\n"
    err = _spec_error(lambda: attnc.materialize_mask(head_dependent, n=8, heads=10**9), "argument n")
    assert "heads = 1000000000" in str(err) and "6.4e+10-byte mask" in str(err)
    # the dense reference backend (q, k, v as zero-stride views: no memory of their own)
    huge = torch.zeros(1, 1, 1, 1).expand(1, 1, 10**6, 1)
    err = _spec_error(lambda: attnc.compile_attention(WINDOW, backend="reference")(huge, huge, huge), "argument q")
    assert "4e+12 bytes" in str(err)
    many_heads = torch.zeros(1, 1, 1, 1).expand(1, 10**9, 4, 1)
    for backend in BACKENDS:  # the output alone (and its fp32 accumulator) cannot fit
        attn = attnc.compile_attention(WINDOW, backend=backend)
        err = _spec_error(lambda a=attn: a(many_heads, many_heads, many_heads), "argument q", "heads 1000000000")
        assert "need an output of 1.6e+10 bytes" in str(err)
    # a head-independent mask at many heads is a broadcast view, which fits (no index over its heads made)
    mask = attnc.materialize_mask(WINDOW, n=8, heads=10**9)
    assert mask.shape == (10**9, 8, 8) and bool(mask[123456789, 2, 4]) and not bool(mask[5, 0, 7])
    assert largest[0] <= 8
    # a head-dependent mask reads each head's index
    assert torch.equal(attnc.materialize_mask(head_dependent, n=4, heads=3)[:, 0, 0], torch.tensor([True, False, True]))


def test_numpy_scalars_are_ints_and_floats():
    want = attnc.materialize_mask("stdlib:sliding_window", n=16, heads=2, window=3)
    got = attnc.materialize_mask("stdlib:sliding_window", n=np.int64(16), heads=np.int32(2), window=np.int64(3))
    assert torch.equal(want, got)
    capped = attnc.compile_attention("stdlib:softcap", backend="cpu", cap=np.float32(2.5))
    q, k, v = _qkv(dtype=torch.float64)
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    torch.testing.assert_close(capped(q, k, v), _dense(q, k, v, causal, softcap=2.5), rtol=1e-10, atol=1e-10)
    tiled = attnc.compile_attention(WINDOW, backend="cpu", q_tile=np.int64(4))
    tiled(q, k, v)
    assert tiled.schedule.q_tile == (4,)
    _spec_error(lambda: attnc.load("stdlib:sliding_window", window=True), "argument window", "bool")
    _spec_error(lambda: attnc.load("stdlib:sliding_window", window=np.bool_(True)), "argument window", "bool")
    _spec_error(lambda: attnc.load("stdlib:sliding_window", window=np.float64(3.5)), "argument window", "float")
    _spec_error(lambda: attnc.load("stdlib:sliding_window", window=torch.tensor(3)), "argument window", "Tensor")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_positive_per_head_softcap_is_refused(backend):
    attn = attnc.compile_attention("pattern p\nmask causal\nsoftcap 2.0 - h\n", backend=backend)
    err = _spec_error(lambda: attn(*_qkv(H=4)), "softcap", "at h = 2")
    assert "positive" in str(err)
    q, k, v = _qkv(H=2, dtype=torch.float32)  # heads 0 and 1: caps 2 and 1, fine
    out = attn(q, k, v).double()
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    cap = torch.tensor([2.0, 1.0], dtype=torch.float64).view(1, 2, 1, 1)
    torch.testing.assert_close(out, _dense(q, k, v, causal, softcap=cap), rtol=2e-5, atol=2e-5)
    with pytest.raises(attnc.SpecError, match="argument cap: error: must be positive, got -1.0"):
        attnc.load("stdlib:softcap", cap=-1.0)  # the stdlib declares cap > 0


# ------------------------------------------------------------------ 4: per-batch scalar inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_per_batch_scalar_input(backend):
    """``input plen: int[1]`` given as ``[B, 1]``: each batch element its own prefix."""
    q, k, v = _qkv(B=3, N=8)
    plen = torch.tensor([[0], [3], [6]])
    out = attnc.compile_attention(PREFIX, backend=backend)(q, k, v, plen=plen).double()
    qi, ki = torch.arange(8).view(-1, 1), torch.arange(8).view(1, -1)
    for b in range(3):
        allowed = (ki <= qi) | (ki < int(plen[b, 0]))
        want = _dense(q[b:b + 1], k[b:b + 1], v[b:b + 1], allowed)
        torch.testing.assert_close(out[b:b + 1], want, rtol=2e-5, atol=2e-5)
    mask = attnc.materialize_mask(PREFIX, n=8, inputs={"plen": plen})
    assert mask.shape == (3, 1, 8, 8)
    for b in range(3):
        assert torch.equal(mask[b, 0], (ki <= qi) | (ki < int(plen[b, 0])))


# ------------------------------------------------------------------ 4: autocast
@pytest.mark.parametrize("spec, dv, softcap", [
    ("pattern p\nmask causal\nsoftcap 5.0\n", 4, 5.0),
    ("pattern p\nmask causal\n", 6, None),
    ("pattern p\nmask causal and q - k < 5\n", 4, None),
])
def test_cpu_autocast_bf16_matches_the_reference_and_leaves_later_calls_alone(spec, dv, softcap):
    q, k, v = (t.requires_grad_() for t in _qkv(N=16, Dv=dv))
    attn = attnc.compile_attention(spec, backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(q, k, v)
    assert out.dtype == torch.bfloat16  # as torch's own attention under autocast
    allowed = attnc.materialize_mask(spec, n=16)[0]
    # the same computation on the bf16-rounded inputs, in float64
    qb, kb, vb = (t.detach().bfloat16() for t in (q, k, v))
    want = _dense(qb, kb, vb, allowed, softcap=softcap)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-2)
    out.float().sum().backward()
    assert q.grad is not None and q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()
    # a later call without autocast: full precision, unaffected by the autocast call
    later = attn(q.detach(), k.detach(), v.detach())
    assert later.dtype == torch.float32
    torch.testing.assert_close(later.double(), _dense(q, k, v, allowed, softcap=softcap), rtol=2e-5, atol=2e-5)


def test_fused_kernel_choice_is_by_shape_never_sticky(monkeypatch):
    """A call the fused CPU kernel cannot run (Dv != D) must not turn it off for later
    calls of the same module; an error from the kernel itself is raised, not hidden."""
    real = fused.flash_op()
    assert real is not None
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2].shape[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(fused, "flash_op", lambda: counting)
    attn = attnc.compile_attention(WINDOW, backend="cpu")
    q, k, v = _qkv(Dv=6, dtype=torch.float64)
    attn(q, k, v)
    assert calls == []  # Dv != D: the unfused path
    q, k, v = _qkv(dtype=torch.float64)
    out = attn(q, k, v)
    assert calls and set(calls) == {4}  # same sizes, same plan: the fused kernel runs
    allowed = attnc.materialize_mask(WINDOW, n=8)[0]
    torch.testing.assert_close(out, _dense(q, k, v, allowed), rtol=1e-12, atol=1e-12)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the fused kernel")

    monkeypatch.setattr(fused, "flash_op", lambda: broken)
    with pytest.raises(RuntimeError, match="a bug in the fused kernel"):
        attn(q, k, v)


# ------------------------------------------------------------------ 4: one tile convention
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("q_tile, kv_tile, want", [
    (8, None, ((8,), (8,))),            # an int on a grid: flat tiles of the token order
    ((8,), 4, ((8,), (4,))),
    ((2, 4), None, ((2, 4), (2, 4))),   # one extent per axis: boxes
    ((2, 4), (3, 3), ((2, 4), (3, 3))),
    (64, None, ((30,), (30,))),         # clipped to the token count
])
def test_grid_tiles_mean_the_same_on_every_backend(backend, q_tile, kv_tile, want):
    q, k, v = _qkv(N=30, D=8)
    attn = attnc.compile_attention(GRID, backend=backend, sizes=SIZES, q_tile=q_tile, kv_tile=kv_tile)
    out = attn(q, k, v).double()
    assert (attn.schedule.q_tile, attn.schedule.kv_tile) == want
    allowed = attnc.materialize_mask(GRID, sizes=SIZES)[0]
    torch.testing.assert_close(out, _dense(q, k, v, allowed), rtol=2e-5, atol=2e-5)
    tiles = attnc.simulate(GRID, sizes=SIZES, q_tile=q_tile, kv_tile=kv_tile).to_dict()["tiles"]
    assert (tuple(tiles["q_tile"]), tuple(tiles["kv_tile"])) == want


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("q_tile, kv_tile, want", [
    (4, None, ((4,), (4,))),            # the keys' grid gets flat tiles of 4 tokens
    (4, (2, 4), ((4,), (2, 4))),        # a box on the keys' grid
    (4, 8, ((4,), (8,))),
])
def test_mixed_layout_tiles_have_common_values(backend, q_tile, kv_tile, want):
    q = torch.randn(1, 2, 7, 8, generator=torch.Generator().manual_seed(1))
    _, k, v = _qkv(N=30, D=8)
    attn = attnc.compile_attention(MIXED, backend=backend, sizes=SIZES, q_tile=q_tile, kv_tile=kv_tile)
    out = attn(q, k, v).double()
    assert (attn.schedule.q_tile, attn.schedule.kv_tile) == want
    allowed = attnc.materialize_mask(MIXED, n=7, sizes=SIZES)[0]
    torch.testing.assert_close(out, _dense(q, k, v, allowed), rtol=2e-5, atol=2e-5)
    tiles = attnc.simulate(MIXED, n=7, sizes=SIZES, q_tile=q_tile, kv_tile=kv_tile).to_dict()["tiles"]
    assert (tuple(tiles["q_tile"]), tuple(tiles["kv_tile"])) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_tiles_are_refused_when_compiling(backend):
    for q_tile, kv_tile, where, match in [
        ((1, 2, 3), None, "argument q_tile", "2-axis grid"),
        ((2, 4), 8, "argument q_tile", "other side is flat too"),
        (8, (2, 4), "argument kv_tile", "other side is flat too"),
        ((2, 4, 1), (2, 4), "argument q_tile", "2-axis grid"),
    ]:
        _spec_error(lambda qt=q_tile, kt=kv_tile: attnc.compile_attention(GRID, backend=backend, q_tile=qt,
                                                                          kv_tile=kt), where, match)
    _spec_error(lambda: attnc.compile_attention(MIXED, backend=backend, kv_tile=(2, 2)), "argument q_tile",
                "does not fit")


def test_cli_show_tiles_takes_the_same_convention(capsys):
    from attnc import cli

    code = cli.main(["show", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "--tiles", "--q-tile", "16"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Q tile 16, KV tile 16" in out and "4 x 4 tiles" in out
    code = cli.main(["show", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "--tiles", "--q-tile", "16",
                     "--kv-tile", "4,4"])
    _, err = capsys.readouterr()
    assert code == 1 and "other side is flat too" in err and "Traceback" not in err


BAD_VALUES = [-1, 0, 1.5, "x", [1], {"a": 1}, True, np.int64(-1), float("nan"), 2**70, torch.tensor(1),
              torch.zeros(3), object(), (1, 2)]


def test_public_entry_points_give_spec_errors_for_bad_values():
    """Every argument of every public entry point, given a bad value: a result or one
    SpecError, never another exception."""
    q = torch.randn(1, 2, 16, 4)
    qt = q[:, :, 0]
    cpu = attnc.compile_attention(WINDOW, backend="cpu")
    ref = attnc.compile_attention(WINDOW, backend="reference")
    rec = attnc.compile_attention("stdlib:retention", backend="cpu")
    calls = {
        "load source": lambda b: attnc.load(b),
        "load name": lambda b: attnc.load("stdlib:sliding_window", name=b),
        "load parameter": lambda b: attnc.load("stdlib:sliding_window", window=b),
        "materialize_mask size value": lambda b: attnc.materialize_mask("stdlib:neighborhood_2d", sizes={"height": 4,
                                                                                                 "width": b}),
        "simulate inputs": lambda b: attnc.simulate("stdlib:document", n=64, inputs=b),
        "simulate head_dim": lambda b: attnc.simulate(WINDOW, n=64, head_dim=b),
        "simulate kv_tile": lambda b: attnc.simulate(WINDOW, n=64, kv_tile=b),
        "call return_lse": lambda b: cpu(q, q, q, return_lse=b),
        "call sizes": lambda b: ref(q, q, q, sizes=b),
        "call initial_state": lambda b: rec(q, q, q, initial_state=b),
        "call return_state": lambda b: rec(q, q, q, return_state=b),
        "recurrence q_tile": lambda b: attnc.compile_attention("stdlib:retention", q_tile=b),
        "step state": lambda b: rec.step(qt, qt, qt, b),
        "step scale": lambda b: rec.step(qt, qt, qt, scale=b),
    }
    for what in ("n", "heads", "sizes", "inputs", "nk", "name"):
        calls[f"materialize_mask {what}"] = lambda b, w=what: attnc.materialize_mask(WINDOW, **{"n": 16, w: b})
    for what in ("backend", "sizes", "q_tile", "kv_tile", "name"):
        calls[f"compile_attention {what}"] = lambda b, w=what: attnc.compile_attention(GRID, **{w: b})
    for what in ("q", "k", "v"):
        calls[f"call {what}"] = lambda b, w=what: cpu(**{"q": q, "k": q, "v": q, w: b})
    for label, call in calls.items():
        for bad in BAD_VALUES:
            try:
                call(bad)
            except attnc.SpecError:
                pass
            except Exception as err:  # noqa: BLE001 - the point of the test
                pytest.fail(f"{label} = {bad!r}: {type(err).__name__}: {err}")


def test_an_input_sized_by_dk_without_q_is_one_clear_error():
    """An input declared over dk, with no q to set dk (materialize_mask without q=): a SpecError naming the
    input (it was a TypeError from sympy; found by the parser's mutation fuzzer)."""
    spec = "pattern p\n  tokens seq\n  input c: float[heads, dk]\n  mask causal\n"
    with pytest.raises(attnc.SpecError, match="input 'c' has a dimension of dk") as err:
        attnc.materialize_mask(spec, n=4, heads=2, inputs={"c": torch.randn(2, 8)})
    assert err.value.where == "argument c"
    mask = attnc.materialize_mask(spec, n=4, heads=2, inputs={"c": torch.randn(2, 8)}, q=torch.randn(1, 2, 4, 8),
                                  k=torch.randn(1, 2, 4, 8))
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).tril().expand(2, 4, 4))


# ------------------------------------------------------------------ hints for misspelt arguments, inputs a mask needs
def test_a_misspelt_call_keyword_suggests_the_keyword():
    """``return_lsee=True`` arrives among the inputs (``**inputs``): the hint names ``return_lse``."""
    attn = attnc.compile_attention("stdlib:sliding_window", window=4, backend="reference")
    err = _spec_error(lambda: attn(*_qkv(), return_lsee=True), "argument return_lsee")
    assert err.hint == "did you mean 'return_lse'? (a keyword of the call, not an input)"
    doc = attnc.compile_attention("stdlib:document", backend="reference")
    err = _spec_error(lambda: doc(*_qkv(), dcc=torch.zeros(8, dtype=torch.long)), "argument dcc")
    assert err.hint == "did you mean 'doc'?"  # an input's name first


def test_the_call_keywords_are_those_of_the_call():
    import inspect

    from attnc.compiler.analysis.call_keywords import CALL_KEYWORDS

    params = inspect.signature(attnc.Attention.forward).parameters.values()
    assert set(CALL_KEYWORDS) == {p.name for p in params if p.kind == p.KEYWORD_ONLY}


@pytest.mark.parametrize("source, near", [("streaming", "streaming"), ("streaming.attn", "streaming"),
                                          ("slidng_window", "sliding_window")])
def test_a_stdlib_name_without_its_prefix_points_at_the_stdlib(source, near):
    err = _spec_error(lambda: attnc.load(source), "argument source", f"no such file: {source}")
    assert err.hint == f"did you mean 'stdlib:{near}'? (a stdlib pattern)"
    err = _spec_error(lambda: attnc.load(f"folder/{source}"), "argument source")
    assert err.hint is None  # a path with a folder is a path


def test_a_mask_needs_only_the_inputs_the_mask_reads():
    """``materialize_mask`` of a pattern whose bias reads an input: the mask does not read it, so it is
    not demanded (a given one is still checked); an input the mask reads still is."""
    spec = ("pattern p\n  tokens seq\n  input rpb: float[heads, n]\n  mask causal and q - k < 3\n"
            "  bias rpb[h, q]\n")
    mask = attnc.materialize_mask(spec, n=6)
    assert torch.equal(mask[0], torch.tensor([[q >= k > q - 3 for k in range(6)] for q in range(6)]))
    _spec_error(lambda: attnc.materialize_mask(spec, n=6, inputs={"rpb": torch.zeros(3)}), "argument rpb",
                "has shape")
    _spec_error(lambda: attnc.materialize_mask("stdlib:document", n=6), "argument doc",
                "missing input 'doc'")
    _spec_error(lambda: attnc.compile_attention(spec, backend="reference")(*_qkv(N=6)), "argument rpb",
                "missing input 'rpb'")  # the attention itself reads it


# ------------------------------------------------------------------ issue 58: zero queries, foreign keywords
def _stdlib_names() -> list[str]:
    from attnc.spec.library import stdlib_index

    return sorted(stdlib_index())


#: parameters without defaults of stdlib patterns
_REQUIRED_PARAMS = {"prefix_lm": {"prefix": 1}, "grid": {"vision_end": 100}, "seer": {"topk": 2}}


@pytest.mark.parametrize("name", _stdlib_names())
def test_zero_queries_give_one_spec_error_on_every_stdlib_pattern(name):
    """Zero queries are refused as q's before any input is derived from q and k (landmark's gate table
    raised torch's ValueError from torch.cat, vertical_slash's selection a ZeroDivisionError)."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu", **_REQUIRED_PARAMS.get(name, {}))
    q = torch.randn(1, 2, 0, 4)
    err = _spec_error(lambda: attn(q, q, q), "argument q", "has tokens 0")
    assert "[1, 2, 0, 4]" in str(err)


def test_zero_keys_are_refused_as_k():
    attn = attnc.compile_attention("stdlib:landmark", backend="cpu")
    q, k, v = _qkv(N=8)
    _spec_error(lambda: attn(q, k[:, :, :0], v[:, :, :0]), "argument k", "has tokens 0")


@pytest.mark.parametrize("keyword, value, says", [
    ("output_final_state", True, "return_state=True"),              # fla
    ("head_first", False, "layout='bnhd'"),
    ("use_qk_l2norm_in_kernel", True, "qk_l2norm=True"),
    ("block_mask", None, "attnc builds its masks from the pattern"),  # FlexAttention
    ("score_mod", None, "'bias ...'"),
    ("attn_mask", None, "write the mask in the .attn"),              # SDPA
    ("is_causal", True, "causality is part of the pattern"),
    ("enable_gqa", True, "GQA is automatic"),
    ("dropout_p", 0.0, "no attention dropout"),
    ("softmax_scale", 0.5, "scale="),                               # flash-attn
    ("causal", True, "causality is part of the pattern"),
    ("window_size", (4, 0), "stdlib:sliding_window"),
    ("return_softmax_lse", True, "return_lse=True"),
    ("attention_mask", None, "write the mask in the .attn"),        # HuggingFace
    ("scaling", 0.5, "scale="),
])
def test_keywords_of_other_attention_apis_say_the_attnc_way(keyword, value, says):
    """A keyword of fla, Flex, SDPA, flash-attn or HuggingFace: its attnc equivalent, not the nearest attnc
    keyword (``block_mask`` suggested ``block_table``) or 'this pattern takes no inputs'."""
    from attnc.compiler.analysis.call_keywords import FOREIGN_KEYWORDS

    source = "stdlib:gated_delta_net" if keyword in ("output_final_state", "head_first",
                                                     "use_qk_l2norm_in_kernel") else "stdlib:sliding_window"
    attn = attnc.compile_attention(source, backend="cpu")
    q, k, v = _qkv(H=4, N=8)
    gates = {"g": -torch.rand(1, 4, 8), "beta": torch.rand(1, 4, 8)} if "delta" in source else {}
    err = _spec_error(lambda: attn(q, k, v, **gates, **{keyword: value}), f"argument {keyword}")
    assert err.hint == f"'{keyword}' is not an attnc keyword: {FOREIGN_KEYWORDS[keyword]}"
    assert says in err.hint


def test_a_pattern_parameter_named_like_a_foreign_keyword_is_named_as_the_parameter():
    attn = attnc.compile_attention("stdlib:softplus", backend="cpu")
    err = _spec_error(lambda: attn(*_qkv(), is_causal=False), "argument is_causal")
    assert "parameter of the pattern" in err.hint and "compile_attention(..., is_causal=...)" in err.hint


@pytest.mark.parametrize("source", ["stdlib:sliding_window", "stdlib:nsa"])
def test_return_state_on_a_softmax_pattern_names_return_state(source):
    attn = attnc.compile_attention(source, backend="cpu")
    q, k, v = _qkv(N=8)
    gates = {name: torch.rand(2, 8) for name in ("g_slc", "g_cmp", "g_swa")} if "nsa" in source else {}
    _spec_error(lambda: attn(q, k, v, return_state=True, **gates), "argument return_state", "only recurrences")
    _spec_error(lambda: attn(q, k, v, initial_state=torch.zeros(1, 2, 4, 4), **gates), "argument initial_state",
                "only recurrences")


def test_materialize_mask_takes_the_head_dim_of_a_mask_that_reads_it():
    """``dk`` in a mask: ``materialize_mask`` had no way to give it ("'dk' has no value" with no argument to set)."""
    spec = "pattern p\n  tokens seq\n  mask q - k < dk and k <= q\n"
    got = attnc.materialize_mask(spec, n=6, dk=2)[0]
    q, k = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(got, (q - k < 2) & (k <= q))
    assert torch.equal(attnc.materialize_mask(spec, n=6, q=torch.zeros(1, 1, 6, 2), k=torch.zeros(1, 1, 6, 2))[0], got)
    _spec_error(lambda: attnc.materialize_mask(spec, n=6, dk=0), "argument dk", "positive int")
    _spec_error(lambda: attnc.materialize_mask(spec, n=6, dk=3, q=torch.zeros(1, 1, 6, 2), k=torch.zeros(1, 1, 6, 2)),
                "argument dk", "head dim is 2")


def test_an_empty_source_is_refused_as_such():
    _spec_error(lambda: attnc.load(""), "argument source", "an empty source")
    _spec_error(lambda: attnc.compile_attention("  "), "argument source", "an empty source")


def test_a_single_patterns_call_keyword_on_a_combined_pattern_is_told_as_such():
    """``return_selection=`` on NSA (three branches): it said "'nsa' has no input 'return_selection'"."""
    attn = attnc.compile_attention("stdlib:nsa", backend="cpu")
    q = torch.randn(1, 2, 32, 16)
    err = _spec_error(lambda: attn(q, q, q, return_selection=True), "argument return_selection",
                      "a keyword of a single pattern's call")
    assert "has no input" not in err.message


def test_a_routed_masks_selection_needs_both_vectors_as_tensors():
    # one of them, or numpy arrays, returned the mask before the selection without a word
    q = torch.randn(1, 1, 8, 4)
    for kw, where in ((dict(q=q), "argument k"), (dict(k=q), "argument q"),
                      (dict(q=q.numpy(), k=q.numpy()), "argument q")):
        _spec_error(lambda kw=kw: attnc.materialize_mask("stdlib:moba", n=8, block=2, topk=1, **kw), where,
                    "selection needs both")
    selected = attnc.materialize_mask("stdlib:moba", n=8, block=2, topk=1, q=q, k=q)
    before = attnc.materialize_mask("stdlib:moba", n=8, block=2, topk=1)
    assert selected.shape == (1, 1, 8, 8) and bool((selected[0, 0] <= before[0]).all())
    assert int(selected.sum()) < int(before.sum())


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_a_scale_beyond_float32_is_refused_for_float32_inputs(backend):
    # finite in Python, inf in the float32 scores: NaN outputs on reference and cpu, silently
    attn = attnc.compile_attention(WINDOW, backend=backend)
    q, k, v = _qkv()
    _spec_error(lambda: attn(q, k, v, scale=1e39), "argument scale", "beyond the float32 range")
    if backend != "triton":  # float64 inputs compute in float64: taken
        assert torch.isfinite(attn(q.double(), k.double(), v.double(), scale=1e39)).all()


@pytest.mark.parametrize("backend", ["cpu", "auto", "reference"])
def test_numpy_integers_for_sizes_and_tiles_are_ints_at_every_call(backend):
    # accepted by compile_attention, then every call of a cpu or auto module failed naming 'sizes' or 'q_tile'
    np = pytest.importorskip("numpy")
    q = torch.randn(1, 2, 16, 8)
    grid = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=3, backend=backend,
                                   sizes={"height": np.int64(4), "width": 4})
    want = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=3, backend="reference",
                                   sizes={"height": 4, "width": 4})(q, q, q)
    torch.testing.assert_close(grid(q, q, q), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grid(q, q, q, sizes={"height": np.int32(4)}), want, atol=1e-6, rtol=1e-6)
    if backend != "reference":
        tiled = attnc.compile_attention(WINDOW, backend=backend, q_tile=np.int64(8))
        q, k, v = _qkv()
        torch.testing.assert_close(tiled(q, k, v), attnc.compile_attention(WINDOW, backend="reference")(q, k, v),
                                   atol=1e-6, rtol=1e-6)



def test_keywords_a_call_does_not_take_say_where_they_belong():
    # cu_seqlens_q was called "not an attnc keyword" (it is a paged call's), q_tile= hinted "this pattern takes no
    # inputs" (it is compile_attention's), and step(return_state=True) hinted "did you mean 'return_state'?"
    attn = attnc.compile_attention(WINDOW, backend="cpu")
    q, k, v = _qkv()
    err = _spec_error(lambda: attn(q, k, v, cu_seqlens_q=torch.tensor([0, 8], dtype=torch.int32)),
                      "argument cu_seqlens_q")
    assert "a keyword of a paged call only" in err.hint and "cu_seqlens=" in err.hint
    err = _spec_error(lambda: attn(q, k, v, q_tile=8), "argument q_tile")
    assert err.hint == "'q_tile' is set when compiling, compile_attention(..., q_tile=...), not per call"
    gla = attnc.compile_attention("stdlib:gla", backend="cpu")
    t = torch.randn(1, 2, 8)
    for name, says in (("return_state", "always returns (o_t, new_state)"), ("initial_state", "fourth argument")):
        err = _spec_error(lambda name=name: gla.step(t, t, t, None, g=-torch.rand(1, 2, 8), **{name: True}),
                          f"argument {name}")
        assert says in err.hint


def test_helpers_name_the_argument_where_torch_would_raise_its_own_error():
    # kmeans_update on meta vectors or with no centroid, to_flex on a device Flex does not run on, q twice: torch's
    # RuntimeError, IndexError, AssertionError or a TypeError naming a private method
    c = torch.nn.functional.normalize(torch.randn(2, 3, 4), dim=-1)
    x = torch.randn(1, 2, 8, 4)
    _spec_error(lambda: attnc.kmeans_update(c, x.to("meta")), "argument x", "centroids' device")
    _spec_error(lambda: attnc.kmeans_update(torch.randn(2, 0, 4), x), "argument centroids", "at least one centroid")
    for device, says in (("tpu", ""), ("meta", "CPU or a CUDA device"), ("nonsense", "not a device")):
        _spec_error(lambda device=device: attnc.to_flex("stdlib:sliding_window", n=16, window=4, block_size=16,
                                                        device=device), "argument device", says)
    if not torch.cuda.is_available():
        _spec_error(lambda: attnc.to_flex("stdlib:sliding_window", n=16, window=4, block_size=16, device="cuda"),
                    "argument device", "CUDA is not available")
    q = torch.randn(1, 2, 8, 4)
    _spec_error(lambda: attnc.compile_attention(WINDOW, backend="cpu")(q, q, q, q=q), "argument q", "twice")


def test_simulate_names_an_input_the_pattern_does_not_declare():
    from attnc.runtime.api import simulate_decode

    # a misspelt input was ignored by simulate (materialize_mask and a call name it)
    doc = torch.arange(64) // 16
    for run in (lambda: attnc.simulate("stdlib:document", n=64, inputs={"doc": doc, "dco": doc}),
                lambda: simulate_decode("stdlib:document", nk=64, inputs={"doc": doc, "dco": doc})):
        err = _spec_error(run, "argument dco", "has no input 'dco'")
        assert "did you mean 'doc'?" in err.hint
    assert attnc.simulate("stdlib:document", n=64, inputs={"doc": doc})["predicted_speedup"] > 1


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton", "auto"])
def test_float8_inputs_are_refused_by_name_and_numpy_scales_are_numbers(backend):
    # float8 q, k, v ran silently on some backends and failed inside torch on flex; a numpy float32, an int64 or a
    # Fraction scale was refused as "not a finite number"
    from fractions import Fraction

    np = pytest.importorskip("numpy")
    attn = attnc.compile_attention(WINDOW, backend=backend)
    q, k, v = _qkv()
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        for name in ("q", "k", "v"):
            args = {n: (t.to(dtype) if n == name else t) for n, t in {"q": q, "k": k, "v": v}.items()}
            _spec_error(lambda args=args: attn(**args), f"argument {name}", "float8 inputs")
        _spec_error(lambda dtype=dtype: attn(q.to(dtype), k.to(dtype), v.to(dtype)), "argument q", "float8 inputs")
    want = attn(q, k, v, scale=0.25)
    for scale in (np.float32(0.25), np.float64(0.25), Fraction(1, 4)):
        torch.testing.assert_close(attn(q, k, v, scale=scale), want, rtol=0, atol=0)
    _spec_error(lambda: attn(q, k, v, scale=torch.tensor(0.25)), "argument scale", "must be a number, got Tensor")
