"""Relative-position embeddings (``bias relative(E, INDEX)``, stdlib ``music_relative``): the Music Transformer
against a transcription of tensor2tensor's ``dot_product_self_attention_relative_v2`` (bafdc1b6) (the left embeddings padded
with zero rows, ``matmul_with_relative_keys``, the skewing ``_relative_position_to_absolute_position_masked``);
Shaw et al.'s clipped form against a naive float64 loop; every backend forward and backward (q, k, v and E),
queries after a KV cache; and the term's checks."""

from __future__ import annotations

import pytest
import torch
from backend_agreement import assert_forward_backward
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc


def t2t_left_embeddings(E: torch.Tensor, length: int) -> torch.Tensor:
    """``get_relative_embeddings_left``: E [heads, max_relative, d] padded in front with zero rows to the
    length, then its last ``length`` rows: row m is the distance length - 1 - m."""
    heads, max_relative, d = E.shape
    pad = max(length - max_relative, 0)
    start = max(max_relative - length, 0)
    padded = torch.cat([E.new_zeros(heads, pad, d), E], dim=1)
    return padded[:, start:start + length]


def t2t_skew(x: torch.Tensor) -> torch.Tensor:
    """``_relative_position_to_absolute_position_masked``: [b, h, l, l] indexed by (query, key - query + l - 1)
    to (query, key): one zero column in front, a reshape to l + 1 rows, the first row dropped."""
    b, h, length, _ = x.shape
    x = torch.nn.functional.pad(x, (1, 0))
    return x.reshape(b, h, length + 1, length)[:, :, 1:]


def t2t_forward(q, k, v, E):
    """``dot_product_self_attention_relative_v2`` with the causal bias, q already scaled by depth^-1/2 as
    ``multihead_attention`` scales it."""
    length, depth = q.shape[2], q.shape[3]
    q = q * depth ** -0.5
    logits = q @ k.transpose(-1, -2)
    rel = torch.einsum("bhld,hmd->bhlm", q, t2t_left_embeddings(E, length))  # matmul_with_relative_keys
    logits = logits + t2t_skew(rel)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    return torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1) @ v


def _case(seed, B, H, N, d, rows):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.randn(H, rows, d, generator=g, dtype=torch.float64)


def test_the_skewing_is_the_distance_table():
    """The transcription's skew puts q_i . E_row(i - j) at (i, j) below the diagonal (the rule the header states)."""
    q, _, _, E = _case(0, 1, 2, 9, 4, 5)
    got = t2t_skew(torch.einsum("bhld,hmd->bhlm", q, t2t_left_embeddings(E, 9)))
    for i in range(9):
        for j in range(i + 1):
            dist = i - j
            want = (q[0, :, i] * E[:, 5 - 1 - dist]).sum(-1) if dist < 5 else torch.zeros(2, dtype=torch.float64)
            torch.testing.assert_close(got[0, :, i, j], want, rtol=0, atol=1e-14)


@settings(max_examples=15, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 2), H=st.integers(1, 3), N=st.integers(1, 40),
       rows=st.integers(1, 50))
def test_music_relative_matches_tensor2tensor(seed, B, H, N, rows):
    q, k, v, E = _case(seed, B, H, N, 8, rows)
    attn = attnc.compile_attention("stdlib:music_relative", max_relative=rows, backend="reference")
    torch.testing.assert_close(attn(q, k, v, E=E), t2t_forward(q, k, v, E), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_every_backend_matches_tensor2tensor_forward_and_backward(backend):
    q, k, v, E = _case(7, 2, 4, 37, 16, 12)
    attn = attnc.compile_attention("stdlib:music_relative", max_relative=12, backend=backend)
    assert_forward_backward(backend, lambda q, k, v, E: attn(q, k, v, E=E), t2t_forward, [q, k, v, E])


SHAW = """pattern shaw(radius = 3, rows = 7)
  tokens seq
  input E: float[rows, dk]
  bias relative(E, clamp(k - q, -radius, radius) + radius)
"""


def shaw_loop(q, k, v, E, radius, scale):
    """Shaw et al.'s relative keys, one pair at a time: a_ij = scale * q_i . (k_j + E[clip(j - i) + radius])."""
    B, H, N, _ = q.shape
    out = torch.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(N):
                scores = torch.stack([scale * (q[b, h, i] @ (k[b, h, j] + E[min(max(j - i, -radius), radius) + radius]))
                                      for j in range(N)])
                out[b, h, i] = torch.softmax(scores, 0) @ v[b, h]
    return out


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_shaws_clipped_distances_with_shared_embeddings(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 19, 8, generator=g, dtype=torch.float64) for _ in range(3))
    E = torch.randn(7, 8, generator=g, dtype=torch.float64)
    dtype = torch.float32 if backend == "triton" else torch.float64
    attn = attnc.compile_attention(SHAW, backend=backend)
    out = attn(q.to(dtype), k.to(dtype), v.to(dtype), E=E.to(dtype), scale=0.3)
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double(), shaw_loop(q, k, v, E, 3, 0.3), **tol)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_queries_after_a_kv_cache_read_their_own_rows(backend):
    q, k, v, E = _case(5, 1, 2, 30, 8, 9)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    attn = attnc.compile_attention("stdlib:music_relative", max_relative=9, backend=backend)
    out = attn(q[:, :, -3:].to(dtype), k.to(dtype), v.to(dtype), E=E.to(dtype))
    torch.testing.assert_close(out.double(), t2t_forward(q, k, v, E)[:, :, -3:], **tol)


def test_the_mask_needs_no_vectors():
    """relative() is a score term: the mask (and attnc show) is the causal one, no q or k needed."""
    mask = attnc.materialize_mask("stdlib:music_relative", n=6, max_relative=4)
    assert torch.equal(mask[0], torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("clause,message", [
    ("mask relative(E, q - k) > 0", "only a bias may read it"),
    ("bias relative(w, q - k)", "must name the embeddings input"),
    ("bias relative(g, q - k)", "must be float\\[ROWS, dk\\]"),
    ("bias relative(E)", "takes 2 arguments"),
    ("bias relative(E, q > k)", "row of relative"),
])
def test_bad_terms_are_refused_with_their_place(clause, message):
    source = ("pattern p(rows = 5)\n  tokens seq\n  input E: float[rows, dk]\n  input g: float[heads, n]\n"
              "  " + clause + "\n")
    with pytest.raises(attnc.SpecError, match=message) as err:
        attnc.compile_attention(source)
    assert err.value.pos is not None and err.value.pos.line == 5


def test_embeddings_of_the_wrong_shape_name_the_argument():
    q, k, v, E = _case(1, 1, 2, 10, 8, 4)
    attn = attnc.compile_attention("stdlib:music_relative", max_relative=5, backend="cpu")
    with pytest.raises(attnc.SpecError, match="input 'E' has shape"):
        attn(q, k, v, E=E)
    with pytest.raises(attnc.SpecError, match="missing input 'E'"):
        attn(q, k, v)
    with pytest.raises(attnc.SpecError, match="not an argument"):
        attn(q, k, v, E=torch.randn(2, 5, 8, dtype=torch.float64), __relative_E=torch.zeros(1))
