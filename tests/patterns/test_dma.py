"""Dynamic Mask Attention (stdlib ``dma``, ``route topk(K) tokens by S`` with S a score per key, also a bias):
against a transcription of the authors' code (SmallDoges/flash-dmattn at f024c288: ``topk_mask`` and
``dynamic_mask_attention_python``), prefill and decode, GQA, forward and backward (the importance's gradient
through the bias); against a naive float64 loop with ties; on every backend; and the clause's checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.core.errors import SpecError


def repeat_kv(x, n_rep):
    b, h, s, d = x.shape
    return x if n_rep == 1 else x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def code_forward(q, k, v, attn_bias, window_size):
    """``dynamic_mask_attention_python`` with ``create_mask(type="topk")``: q ``[b, h, s, d]``, k, v ``[b, hkv, t,
    d]``, attn_bias ``[b, hkv, 1, t]`` (the Doge model's, one row for every query), causal with the queries the
    last s of t."""
    b, h, s, d = q.shape
    t = k.shape[2]
    causal = (torch.arange(s)[:, None] + t - s >= torch.arange(t)[None, :]).view(1, 1, s, t)
    min_dtype = torch.finfo(q.dtype).min
    bias = attn_bias.detach().masked_fill(~causal, min_dtype)  # topk_mask
    # the model masks only where there are more keys than the window (topk of more than t would raise)
    topk_values, topk_indices = torch.topk(bias, min(window_size, t), dim=-1, largest=True, sorted=False)
    attn_mask = torch.zeros_like(bias, dtype=torch.bool).scatter_(-1, topk_indices, topk_values != min_dtype)
    n_rep = h // k.shape[1]
    k, v, attn_bias, attn_mask = (repeat_kv(x, n_rep) for x in (k, v, attn_bias, attn_mask))
    weights = (q @ k.transpose(-2, -1)) * d ** -0.5 + attn_bias
    weights = weights.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(weights, dim=-1) @ v


def _case(seed, b=2, h=4, hkv=2, s=24, t=24, d=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(b, hkv, 1, t, generator=g, dtype=torch.float64)
    return q, k, v, bias


@pytest.mark.parametrize("window,rows,seed", [(5, None, 0), (8, None, 1), (30, None, 2), (5, 1, 3), (6, 3, 4)])
@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_matches_the_authors_code(window, rows, seed, backend):
    q, k, v, bias = _case(seed)
    if rows is not None:  # a decode step: the last rows' queries against the whole cache
        q = q[:, :, -rows:]
    importance = repeat_kv(bias, q.shape[1] // k.shape[1])[:, :, 0]  # one row per query head
    ours = [x.clone().requires_grad_() for x in (q, k, v, importance)]
    theirs = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    attn = attnc.compile_attention("stdlib:dma", window=window, backend=backend)
    out = attn(*ours[:3], importance=ours[3])
    want = code_forward(*theirs, window)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    out.backward(grad)
    want.backward(grad)
    for mine, ref in zip(ours[:3], theirs[:3], strict=True):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-11, atol=1e-11)
    # the importance's gradient: the code's per K/V head, ours per query head (summed over a group it is theirs)
    group = q.shape[1] // k.shape[1]
    torch.testing.assert_close(ours[3].grad.view(2, k.shape[1], group, -1).sum(2), theirs[3].grad[:, :, 0],
                               rtol=1e-11, atol=1e-11)


def naive(q, k, v, importance, window):
    B, H, n, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(B, H, n, v.shape[-1], dtype=torch.float64)
    group = H // k.shape[1]
    for b in range(B):
        for h in range(H):
            for i in range(n):
                pos = nk - n + i
                kept = sorted(range(pos + 1), key=lambda j: (-float(importance[b, h, j]), j))[:window]
                s = torch.stack([q[b, h, i] @ k[b, h // group, j] / math.sqrt(d) + importance[b, h, j] for j in kept])
                out[b, h, i] = torch.softmax(s, 0) @ v[b, h // group, kept]
    return out


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 16), window=st.integers(1, 10), levels=st.integers(2, 4))
def test_random_inputs_with_ties_match_the_naive_rule(seed, n, window, levels):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    importance = torch.randint(levels, (1, 2, n), generator=g).to(torch.float64)  # few values: many ties
    got = attnc.compile_attention("stdlib:dma", window=window, backend="reference")(q, k, v, importance=importance)
    torch.testing.assert_close(got, naive(q, k, v, importance, window), rtol=1e-12, atol=1e-12)


def test_triton_matches_the_authors_code():
    q, k, v, bias = _case(5, s=40, t=40, d=16)
    importance = repeat_kv(bias, 2)[:, :, 0]
    attn = attnc.compile_attention("stdlib:dma", window=7, backend="triton")
    out = attn(q.float(), k.float(), v.float(), importance=importance.float())
    torch.testing.assert_close(out.double(), code_forward(q, k, v, bias, 7), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("decl,message", [
    ("input importance: float[heads, n]", r"must be declared float\[heads, nk\]"),
    ("input importance: int[heads, nk]", r"must be declared float\[heads, nk\]"),
    ("input other: float[heads, nk]", "unknown name 'importance'"),
])
def test_a_score_per_key_must_be_declared_over_the_keys(decl, message):
    source = f"pattern p\n  tokens seq\n  {decl}\n  mask causal\n  route topk(4) tokens by importance\n"
    with pytest.raises(SpecError, match=message) as err:
        attnc.compile_attention(source)
    assert err.value.pos is not None and err.value.pos.line == 5
