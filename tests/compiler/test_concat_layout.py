"""Concatenated layouts: ``tokens seq(text) + grid(t: frames, y: height, x: width)``.

References written here, not taken from attnc: ``naive_tokens`` computes, for every flat index, its
segment and its grid coordinates by walking the segments in the order written (a token outside the
grid segment has the coordinates of the nearest grid cell: the first before the grid, the last after
it, as spec/REFERENCE.md defines); the masks below are Python loops over (q, k) with those tokens.
Dense float64 attention with that mask and bias is the reference of every backend. Tile schedules are
checked with ``test_tiles.check_schedule`` against the materialised mask.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from test_tiles import check_schedule

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis import tiles as T
from attnc.compiler.analysis.tiles import classify_tiles, classify_tiles_dense
from attnc.core.errors import SpecError
from attnc.integrations.diffusers import _check_grid

GRID = "grid(t: frames, y: height, x: width)"
LAYOUTS = {  # name -> (layout text, segment order)
    "text_first": (f"seq(text) + {GRID}", ("text", "grid")),
    "grid_first": (f"{GRID} + seq(text)", ("grid", "text")),
    "three": (f"seq(text) + {GRID} + seq(tail)", ("text", "grid", "tail")),
}


# ----------------------------------------------------------------- the independent reference
@dataclass(frozen=True)
class Tok:
    flat: int
    seg: str
    t: int
    y: int
    x: int


def naive_tokens(order: tuple[str, ...], sizes: dict) -> list[Tok]:
    """Every token of the concatenation, in flat order, with its segment and (clamped) grid coordinates."""
    F, H, W = sizes["frames"], sizes["height"], sizes["width"]
    lengths = {name: (F * H * W if name == "grid" else sizes[name]) for name in order}
    grid_start = sum(lengths[name] for name in order[:order.index("grid")])
    out, flat = [], 0
    for name in order:
        for _ in range(lengths[name]):
            local = min(max(flat - grid_start, 0), F * H * W - 1)
            t, rest = divmod(local, H * W)
            y, x = divmod(rest, W)
            out.append(Tok(flat, name, t, y, x))
            flat += 1
    return out


def naive_mask(rule, tokens: list[Tok], sizes: dict | None = None) -> torch.Tensor:
    return torch.tensor([[bool(rule(q, k, sizes)) for k in tokens] for q in tokens])


#: (mask text, the same rule in Python of (q, k, sizes)); each holds on some pairs and fails on others.
RULES = [
    ("q in text or k in text or (abs(q.t - k.t) <= 1 and abs(q.y - k.y) <= 1 and (q.x + 2 * k.x) % 3 != 1)",
     lambda q, k, s: q.seg == "text" or k.seg == "text" or (abs(q.t - k.t) <= 1 and abs(q.y - k.y) <= 1
                                                            and (q.x + 2 * k.x) % 3 != 1)),
    # coordinates used unguarded: text tokens take the clamped coordinates
    ("q.t - k.y == q.x % 2 - k.t and not (q in grid and k in text)",
     lambda q, k, s: q.t - k.y == q.x % 2 - k.t and not (q.seg == "grid" and k.seg == "text")),
    ("causal and (k in text or (q in grid and k in grid and q.t >= k.t and abs(q.x - k.x) <= 1))",
     lambda q, k, s: k.flat <= q.flat and (k.seg == "text" or (q.seg == "grid" and k.seg == "grid"
                                                               and q.t >= k.t and abs(q.x - k.x) <= 1))),
    ("(q in text) == (k in text) and q - k < 5 and q.y * width + q.x >= k.x",
     lambda q, k, s: (q.seg == "text") == (k.seg == "text") and q.flat - k.flat < 5
     and q.y * s["width"] + q.x >= k.x),
]


def random_sizes(rng: random.Random, order) -> dict:
    sizes = {"text": rng.randint(1, 5), "frames": rng.randint(1, 3), "height": rng.randint(1, 4),
             "width": rng.randint(1, 4)}
    if "tail" in order:
        sizes["tail"] = rng.randint(1, 3)
    return sizes


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("rule", range(len(RULES)))
def test_mask_equals_naive_loop(layout, rule):
    text, order = LAYOUTS[layout]
    mask_text, fn = RULES[rule]
    pat = attnc.load(f"pattern p\n  tokens {text}\n  mask {mask_text}\n")
    rng = random.Random(rule * 10 + len(layout))
    some_true = some_false = False
    for _ in range(6):
        sizes = random_sizes(rng, order)
        tokens = naive_tokens(order, sizes)
        want = naive_mask(fn, tokens, sizes)
        got = attnc.materialize_mask(pat, sizes=sizes)[0]
        assert got.shape == (len(tokens), len(tokens))
        assert torch.equal(got, want), sizes
        some_true |= bool(want.any())
        some_false |= not bool(want.all())
        # n given: must equal the sum of the segments; one missing size is solved from it
        missing = "frames" if layout != "three" else "text"
        solved = attnc.materialize_mask(pat, n=len(tokens), sizes={k: v for k, v in sizes.items() if k != missing})
        assert torch.equal(solved[0], want)
        # after a KV cache: the queries are the last rows of the joint tokens
        rows = min(3, len(tokens))
        cached = attnc.materialize_mask(pat, n=rows, nk=len(tokens), sizes=sizes)[0]
        assert torch.equal(cached, want[-rows:])
    assert some_true and some_false


def test_queries_and_keys_may_be_concatenations():
    """``queries`` and ``keys`` each with their own order (cross attention), or keys a plain sequence."""
    pat = attnc.load(f"""pattern p
      queries seq(text) + {GRID}
      keys {GRID} + seq(text)
      mask q in text and k in text or q.t == k.t and q.x <= k.x""")
    assert not pat.self_attention
    sizes = {"text": 2, "frames": 3, "height": 2, "width": 2}
    qs, ks = naive_tokens(("text", "grid"), sizes), naive_tokens(("grid", "text"), sizes)
    want = torch.tensor([[(q.seg == k.seg == "text") or (q.t == k.t and q.x <= k.x) for k in ks] for q in qs])
    assert torch.equal(attnc.materialize_mask(pat, sizes=sizes)[0], want)
    flat_keys = attnc.load(f"pattern p\n  queries seq(text) + {GRID}\n  keys seq\n  mask q in text or k % 2 == q.x % 2\n")
    want = torch.tensor([[q.seg == "text" or k % 2 == q.x % 2 for k in range(5)] for q in qs])
    assert torch.equal(attnc.materialize_mask(flat_keys, nk=5, sizes=sizes)[0], want)
    same = attnc.load(f"pattern p\n  queries seq(text) + {GRID}\n  keys seq(text) + {GRID}\n  mask q in text\n")
    assert same.self_attention  # the same concatenation on both sides is self-attention, as for a grid


def test_segment_sizes_are_values_and_input_dims():
    """``text`` is an int in expressions and a dimension of inputs (``emb: float[text]``)."""
    pat = attnc.load(f"""pattern p
      tokens seq(text) + {GRID}
      input boost: float[text]
      mask k < text or q - k < frames
      bias if k in text then boost[clamp(k, 0, text - 1)] else 0.0""")
    sizes = {"text": 3, "frames": 2, "height": 2, "width": 2}
    tokens = naive_tokens(("text", "grid"), sizes)
    want = naive_mask(lambda q, k, _: k.flat < 3 or q.flat - k.flat < 2, tokens)
    boost = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    assert torch.equal(attnc.materialize_mask(pat, sizes=sizes, inputs={"boost": boost})[0], want)
    q, k, v = qkv(11, 1)
    got = attnc.compile_attention(pat, backend="reference", sizes=sizes)(q, k, v, boost=boost)
    bias = torch.tensor([[float(boost[k.flat]) if k.seg == "text" else 0.0 for k in tokens] for _ in tokens])
    torch.testing.assert_close(got, dense_attention(q, k, v, want, bias), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["text_first", "grid_first"])
@pytest.mark.parametrize("params", [
    {"kernel_size": (2, 3, 3)},
    {"kernel_size": (2, 2, 3), "dilation": (1, 2, 1), "stride": (1, 1, 2), "is_causal": (True, False, False)},
])
def test_window_on_the_grid_segment_equals_the_grid_pattern(layout, params):
    """``neighborhood_3d(...)`` called from a concatenation is the grid pattern on the video block."""
    text, order = LAYOUTS[layout]
    pat = attnc.load(f"""pattern p(kernel_size_t = 3, kernel_size_y = 3, kernel_size_x = 3, stride_t = 1, stride_y = 1,
                                   stride_x = 1, dilation_t = 1, dilation_y = 1, dilation_x = 1, is_causal_t = false,
                                   is_causal_y = false, is_causal_x = false)
      tokens {text}
      mask q in text or k in text or neighborhood_3d(kernel_size_t = kernel_size_t, kernel_size_y = kernel_size_y,
        kernel_size_x = kernel_size_x, stride_t = stride_t, stride_y = stride_y, stride_x = stride_x,
        dilation_t = dilation_t, dilation_y = dilation_y, dilation_x = dilation_x, is_causal_t = is_causal_t,
        is_causal_y = is_causal_y, is_causal_x = is_causal_x)""", **params)  # NATTEN-style: per-axis expansion
    grid = {"frames": 3, "height": 4, "width": 5}
    video = attnc.materialize_mask("stdlib:neighborhood_3d", sizes=grid, **params)[0]
    G, text_len = 60, 4
    want = torch.ones(G + text_len, G + text_len, dtype=torch.bool)
    at = slice(text_len, None) if order[0] == "text" else slice(0, G)
    want[at, at] = video
    assert not want.all()
    assert torch.equal(attnc.materialize_mask(pat, sizes={**grid, "text": text_len})[0], want)


# ----------------------------------------------------------------- errors, with positions
def _error(src: str, **params) -> SpecError:
    with pytest.raises(SpecError) as err:
        attnc.load(src, name="p", **params)
    return err.value


@pytest.mark.parametrize("src, line, col, message", [
    ("pattern p\n  tokens seq(text) - grid(t: f)\n", 2, 20, "joined with '+'"),
    ("pattern p\n  tokens seq + grid(t: f)\n", 2, 10, "needs its size"),
    ("pattern p\n  tokens seq(text)\n", 2, 10, "is a segment of a concatenation"),
    ("pattern p\n  tokens seq(a) + grid(t: f) + grid(y: h)\n", 2, 32, "at most one grid segment"),
    ("pattern p\n  tokens seq(a) + seq(a) + grid(t: f)\n", 2, 23, "segment 'a' is already declared"),
    ("pattern p\n  tokens seq(grid) + grid(t: f)\n", 2, 14, "the grid segment is already declared"),
    ("pattern p\n  tokens seq(t) + grid(t: f)\n", 2, 14, "has the name of an axis"),
    ("pattern p\n  tokens seq(0) + grid(t: f)\n", 2, 14, "at least 1"),
    ("pattern p\n  tokens seq(nk) + grid(t: f)\n", 2, 14, "builtin name"),
    ("pattern p(text = 1.5)\n  tokens seq(text) + grid(t: f)\n", 2, 14, "must be an int parameter"),
    ("pattern p(text = 0)\n  tokens seq(text) + grid(t: f)\n", 2, 14, "at least 1"),
    ("pattern p\n  tokens seq(a) + grid(t: f, t: g)\n", 2, 30, "declared twice"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask q in video\n", 3, 13, "unknown segment 'video'"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask h in text\n", 3, 8, "only 'q in SEGMENT'"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask q + 1 in text\n", 3, 8, "only 'q in SEGMENT'"),
    ("pattern p\n  tokens seq\n  mask q in text\n", 3, 8, "needs a concatenated layout"),
    ("pattern p\n  tokens grid(t: f)\n  mask k in grid\n", 3, 8, "needs a concatenated layout"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask q.z < 1\n", 3, 10, "unknown axis 'z'"),
    ("pattern p\n  tokens seq(a) + seq(b)\n  mask q.t < 1\n", 3, 10, "a concatenation without a grid"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask (q in text) + 1 > 0\n", 3, 9, "needs numbers, got a bool"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask q.t in text\n", 3, 8, "only 'q in SEGMENT'"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  mask window(z, 3)\n", 3, 15, "'z' is not an axis"),
    ("pattern p\n  let in = 3\n", 2, 7, "reserved word"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  let text = 3\n", 3, 7, "'text' is already a segment size (seq(text)"),
    ("pattern p\n  tokens seq(text) + grid(t: f)\n  input text: int[n]\n", 3, 9, "'text' is already a segment size"),
    ("pattern p\n  queries seq(text) + grid(t: f)\n  keys seq(text) + grid(t: f)\n  let f = 3\n", 4, 7,
     "'f' is already an axis size"),
    ("recurrence p\n  tokens seq(a) + grid(t: f)\n  decay -1.0\n", 2, 3, "'tokens seq + grid' is not allowed"),
    ("pattern inner\n  tokens seq(prompt) + grid(t: f)\n  mask q in prompt\n"
     "pattern p\n  tokens seq(text) + grid(t: f)\n  mask inner\n", 6, 8, "uses segment 'prompt'"),
    ("pattern p\n  tokens seq(text) + grid(y: height)\n  mask neighborhood_3d\n", 3, 8, "uses axis 't'"),
])
def test_errors_are_located(src, line, col, message):
    err = _error(src)
    assert message in err.message, err.render()
    assert err.pos is not None and (err.pos.line, err.pos.col) == (line, col), err.render()
    assert err.render().startswith(f"<spec>:{line}:{col}: error:")


def test_membership_hint_lists_the_segments():
    err = _error("pattern p\n  tokens seq(text) + grid(t: f) + seq(tail)\n  mask k in txt\n")
    assert err.hint == "did you mean 'text'?"
    err = _error("pattern p\n  tokens seq(text) + grid(t: f) + seq(tail)\n  mask k in video\n")
    assert "segments: text, grid, tail" in err.hint


def test_size_errors_name_the_argument():
    pat = attnc.load(f"pattern p\n  tokens seq(text) + {GRID}\n  mask q in text or k in text\n")
    sizes = {"text": 2, "frames": 2, "height": 2, "width": 2}
    with pytest.raises(SpecError) as err:
        attnc.materialize_mask(pat, n=11, sizes=sizes)
    assert err.value.where == "argument n"
    assert "concatenation seq(text) + grid(t: frames, y: height, x: width) with text=2, frames=2" in err.value.message
    with pytest.raises(SpecError) as err:
        attnc.materialize_mask(pat, sizes={"frames": 2, "height": 2, "width": 2})
    assert err.value.where == "argument sizes" and "missing size 'text'" in err.value.message
    with pytest.raises(SpecError) as err:  # 11 - 2 = 9 video tokens is not a multiple of height * width
        attnc.materialize_mask(pat, n=11, sizes={"text": 2, "height": 2, "width": 2})
    assert err.value.where == "argument n" and "11 tokens leave no positive int for the size 'frames'" in err.value.message
    assert "2 + 4 x frames" in err.value.message and "sizes={'frames': ...}" in err.value.hint
    with pytest.raises(SpecError) as err:  # fewer tokens than the given segments hold
        attnc.materialize_mask(pat, n=8, sizes={"frames": 2, "height": 2, "width": 2})
    assert err.value.where == "argument n" and "size 'text'" in err.value.message
    with pytest.raises(SpecError) as err:
        attnc.materialize_mask(pat, sizes={**sizes, "txt": 2})
    assert err.value.where == "argument sizes" and err.value.hint == "did you mean 'text'?"
    attention = attnc.compile_attention(pat, backend="cpu", sizes=sizes)
    q, k, v = qkv(11, 1)
    with pytest.raises(SpecError) as err:  # 11 tokens given, the sizes make 10
        attention(q, k, v)
    assert err.value.where == "argument q" and "11 queries do not match the concatenation" in err.value.message
    with pytest.raises(SpecError) as err:  # packed sequences cannot follow fixed segment sizes
        attention(q[:, :, :10], k[:, :, :10], v[:, :, :10], cu_seqlens=torch.tensor([0, 4, 10]))
    assert err.value.where == "argument cu_seqlens"
    with pytest.raises(SpecError) as err:  # a concatenation where a grid is required (Wan)
        _check_grid(attnc.compile_attention(pat, layout="bnhd"))
    assert err.value.where == "argument pattern" and "CogVideoX" in err.value.hint


def test_swapped_heads_and_tokens_are_refused():
    """[B, N, H, D] given as [B, H, N, D]: the concatenation's sizes fix N, so the swap is caught."""
    pat = attnc.load(f"pattern p\n  tokens seq(text) + {GRID}\n  mask q in text or k in text\n")
    sizes = {"text": 2, "frames": 1, "height": 2, "width": 2}
    attention = attnc.compile_attention(pat, backend="reference", sizes=sizes)
    q = torch.randn(1, 6, 3, 4, dtype=torch.float64)  # [B, N=6, H=3, D] passed as bhnd
    with pytest.raises(SpecError) as err:
        attention(q, q, q)
    assert "swapped" in err.value.message and "concatenation's sizes" in err.value.message


# ----------------------------------------------------------------- every backend against dense float64
def qkv(n: int, heads: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, heads, n, 8, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


def dense_attention(q, k, v, mask: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + bias
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


BACKEND_SPEC = """pattern text_video(kt = 2, ky = 3, kx = 3)
  tokens {layout}
  mask q in text or k in text or (window(t, kt) and window(y, ky) and window(x, kx))
  bias if k in text then 0.5 else 0.25 * (q.t - k.t) - 0.1 * abs(q.x - k.x)
"""


def natten_keys(i: int, L: int, w: int) -> range:
    """NATTEN's window (stride 1, dilation 1, not causal): w keys centred on i, shifted inward at the borders."""
    start = min(max(i - w // 2, 0), L - w)
    return range(start, start + w)


@pytest.mark.parametrize("layout", ["text_first", "grid_first"])
@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_backends_match_dense_float64(layout, backend):
    text, order = LAYOUTS[layout]
    sizes = {"text": 3, "frames": 3, "height": 3, "width": 4}
    tokens = naive_tokens(order, sizes)
    L = {"t": 3, "y": 3, "x": 4}

    def allowed(q, k, _):
        if q.seg == "text" or k.seg == "text":
            return True
        return (k.t in natten_keys(q.t, L["t"], 2) and k.y in natten_keys(q.y, L["y"], 3)
                and k.x in natten_keys(q.x, L["x"], 3))

    mask = naive_mask(allowed, tokens)
    bias = torch.tensor([[0.5 if k.seg == "text" else 0.25 * (q.t - k.t) - 0.1 * abs(q.x - k.x) for k in tokens]
                         for q in tokens], dtype=torch.float64)
    assert 0 < int(mask.sum()) < mask.numel()
    q, k, v = (t.requires_grad_() for t in qkv(len(tokens), 2, seed=3))
    want = dense_attention(q, k, v, mask, bias)
    grad_out = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, (q, k, v), grad_out)
    # the Triton interpreter computes in float32 (as on a GPU); the others take float64
    dtype, tol = (torch.float32, 2e-5) if backend == "triton" else (torch.float64, 1e-10)
    attention = attnc.compile_attention(BACKEND_SPEC.format(layout=text), backend=backend, sizes=sizes)
    qq, kk, vv = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    got = attention(qq, kk, vv)
    assert got.dtype == dtype
    got_grads = torch.autograd.grad(got, (qq, kk, vv), grad_out.to(dtype))
    torch.testing.assert_close(got.double(), want.detach(), rtol=tol, atol=tol)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


# ----------------------------------------------------------------- tile classification
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("tile", [(4, 4), (8, 16), (16, 8)])
@pytest.mark.parametrize("intervals_only", [False, True])
def test_tile_classification_is_sound(layout, tile, intervals_only):
    text, order = LAYOUTS[layout]
    rng = random.Random(len(layout) * 7 + tile[0])
    for rule, _ in RULES[:3]:
        pat = attnc.load(f"pattern p\n  tokens {text}\n  mask {rule}\n")
        sizes = random_sizes(rng, order)
        bound = E.bind_sizes(pat, sizes=sizes, heads=1)
        mask = attnc.materialize_mask(pat, sizes=sizes)
        if intervals_only:  # no exact counting, no refinement: the interval rules alone decide
            with mock.patch.object(T, "AXIS_EXACT_MAX", 0):
                sched = classify_tiles(pat, bound, (tile[0],), (tile[1],), refine_budget=0)
        else:
            sched = classify_tiles(pat, bound, (tile[0],), (tile[1],))
        dense = classify_tiles_dense(pat, bound, (tile[0],), (tile[1],))
        qt, kt = min(tile[0], bound.n), min(tile[1], bound.n)
        check_schedule(sched, mask, (bound.n,), (bound.n,), (qt,), (kt,), 1, dense)


def test_text_video_schedule_skips_empty_tiles():
    """At a CogVideoX-like shape (text 32, grid 4 x 8 x 8) with a 3 x 3 x 3 window the 1-D schedule over
    flat positions finds EMPTY tile pairs, and is exact (equal to the brute force)."""
    pat = attnc.load(BACKEND_SPEC.format(layout=LAYOUTS["text_first"][0]), kt=3, ky=3, kx=3)
    sizes = {"text": 32, "frames": 4, "height": 8, "width": 8}
    bound = E.bind_sizes(pat, sizes=sizes)
    sched = classify_tiles(pat, bound, (32,), (32,))
    dense = classify_tiles_dense(pat, bound, (32,), (32,))
    mask = attnc.materialize_mask(pat, sizes=sizes)
    check_schedule(sched, mask, (bound.n,), (bound.n,), (32,), (32,), 1, dense)
    assert sched.empty > 0 and sched.full > 0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_queries_after_a_kv_cache_are_the_last_rows(backend):
    """nk > n: the sizes describe all nk joint tokens; the queries are the last n of them."""
    spec = BACKEND_SPEC.format(layout=LAYOUTS["text_first"][0])
    sizes = {"text": 3, "frames": 3, "height": 3, "width": 4}
    attention = attnc.compile_attention(spec, backend=backend, sizes=sizes)
    q, k, v = qkv(39, 2, seed=5)
    full = attention(q, k, v)
    for rows in (1, 4, 20):
        torch.testing.assert_close(attention(q[:, :, -rows:], k, v), full[:, :, -rows:], rtol=1e-10, atol=1e-10)


def test_routing_over_a_concatenation_uses_flat_blocks():
    """``route blocks(SIZE)`` on a concatenation: runs of flat positions; ``keep k in text`` always keeps the
    text blocks. The CPU tile executor agrees with the reference backend, and with topk covering every
    block the routing changes nothing."""
    spec = f"""pattern r(topk = 2)
      tokens seq(text) + {GRID}
      mask q in text or k in text or abs(q.t - k.t) <= 1
      route topk(topk) blocks(4) by q @ mean(k) keep k in text"""
    sizes = {"text": 3, "frames": 3, "height": 2, "width": 3}
    q, k, v = qkv(21, 2, seed=7)
    ref, cpu = (attnc.compile_attention(spec, backend=b, sizes=sizes)(q, k, v) for b in ("reference", "cpu"))
    torch.testing.assert_close(cpu, ref, rtol=1e-10, atol=1e-10)
    tokens = naive_tokens(("text", "grid"), sizes)
    mask = naive_mask(lambda a, b, _: a.seg == "text" or b.seg == "text" or abs(a.t - b.t) <= 1, tokens)
    every = attnc.compile_attention(spec, backend="reference", sizes=sizes, topk=6)(q, k, v)  # 21 keys: 6 blocks
    torch.testing.assert_close(every, dense_attention(q, k, v, mask, torch.zeros(21, 21, dtype=torch.float64)),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref, every)  # topk 2 drops some blocks
