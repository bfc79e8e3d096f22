"""MMInference's Grid pattern (stdlib ``grid``): its mask against the keys the code's two kernels visit
(microsoft/MInference ``minference/ops/grid_attention.py`` at 13638d05: ``multimodal_grid_attention``'s
parameter rounding, its A-shape kernel and its phase-major cross kernel, written here as loops), on random
parameters and on the code's own configuration; attention against dense float64."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc


def kernel_keys(N, sink, W, vis_start, vis_end, s, block=64) -> torch.Tensor:
    """bool [N, N]: the pairs ``multimodal_grid_attention`` computes. Its rounding: the sink to the vision start
    when it lies before it, both up to a block; the lines cover ``vt`` tokens, a multiple of ``s * block``;
    too short a vision span runs dense causal attention. Then the A-shape kernel (dense rows before
    ``sink + W`` and from the lines' end; the other rows their sinks and their window) and the cross kernel
    over the rows of the lines, phase by phase: the rows of the vision phase every key of the lines' range,
    the others the keys of the vision phase, each only below its window (the kernels meet at ``q - W``)."""
    up = lambda x: (x + block - 1) // block * block  # noqa: E731
    out = torch.zeros(N, N, dtype=torch.bool)
    sink = up(vis_start) if sink < vis_start else up(sink)
    W = up(W)
    if vis_start + s * block + W > vis_end:  # the code's fallback: flash attention, causal
        return torch.ones(N, N, dtype=torch.bool).tril()
    vt = (vis_end - sink - W) // (s * block) * (s * block)
    start_q, end_q, start_k, end_k = sink + W, sink + W + vt, sink, sink + vt
    for q in range(N):  # the A-shape kernel
        if q < start_q or q >= end_q:
            out[q, : q + 1] = True
        else:
            out[q, : min(sink, q + 1)] = True
            out[q, max(q - W + 1, 0): q + 1] = True
    phase_q, phase_k = (vis_start - start_q) % s, (vis_start - start_k) % s
    for q in range(start_q, min(end_q, N)):  # the cross kernel, rows of one phase at a time
        phases = range(s) if (q - start_q) % s == phase_q else [phase_k]
        for k in range(start_k, min(end_k, N)):
            if (k - start_k) % s in phases and k <= q - W:
                out[q, k] = True
    return out


def _mask(N, **params):
    return attnc.materialize_mask("stdlib:grid", n=N, **params)[0]


@settings(max_examples=25, deadline=None, derandomize=True)
@given(s=st.integers(1, 6), block=st.integers(1, 4), sink=st.integers(0, 12), local=st.integers(1, 12),
       vis_start=st.integers(0, 20), span=st.integers(0, 60), tail=st.integers(0, 10))
def test_the_mask_is_the_keys_the_codes_kernels_visit(s, block, sink, local, vis_start, span, tail):
    vis_end = vis_start + span
    N = vis_end + tail
    if N == 0:
        return
    want = kernel_keys(N, sink, local, vis_start, vis_end, s, block)
    got = _mask(N, stride=s, vision_start=vis_start, vision_end=vis_end, sink=sink, local=local, block=block)
    assert torch.equal(got, want)


def test_the_codes_rounding_to_64_token_blocks():
    """The code's blocks of 64 (a grid of 14-token frames after a 300-token prompt, sink 53, window 176)."""
    N, vis_start, vis_end = 2200, 300, 2100
    want = kernel_keys(N, 53, 176, vis_start, vis_end, 14)
    got = _mask(N, stride=14, vision_start=vis_start, vision_end=vis_end, sink=53, local=176)
    assert torch.equal(got, want)
    assert got.sum() < N * (N + 1) // 2  # the lines did not fall back to dense causal


def test_a_short_vision_span_is_dense_causal():
    got = _mask(200, stride=14, vision_start=10, vision_end=150, sink=0, local=64)
    assert torch.equal(got, torch.ones(200, 200, dtype=torch.bool).tril())


@pytest.mark.parametrize("backend", ["cpu", "flex"])
def test_attention_is_dense_attention_over_the_mask(backend):
    N, params = 90, dict(stride=5, vision_start=7, vision_end=80, sink=3, local=6, block=2)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 8, generator=g, dtype=torch.float64) for _ in range(3))
    scores = (q @ k.transpose(-1, -2) * 8 ** -0.5).masked_fill(~kernel_keys(N, 3, 6, 7, 80, 5, 2), float("-inf"))
    want = torch.softmax(scores, dim=-1) @ v
    attn = attnc.compile_attention("stdlib:grid", backend=backend, **params)
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_the_vision_end_must_be_given():
    with pytest.raises(attnc.SpecError, match="vision_end"):
        attnc.compile_attention("stdlib:grid")
