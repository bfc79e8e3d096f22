"""The HyperAttention recipe (docs/examples/hyper_attention.py): against a transcription of the authors' non-causal
forward (insuhan/hyper-attn at 68b91e9b, ``HyperAttention.forward_no_causal_mask`` with its ``AngularLSH.hash``,
``indexing``, ``exact_attention`` and ``add_self_attentions``; the projections and the sampled set given, the
float path), forward, log-sum-exp and gradients, float64."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "docs", "examples"))
from hyper_attention import HyperAttention  # noqa: E402


def _unit_hamming(size: int) -> torch.Tensor:
    if size == 1:
        return torch.tensor([0, 1])
    a = _unit_hamming(size - 1)
    return torch.concat([a, torch.flip(a, dims=[0]) + 2 ** (size - 1)], 0)


def code_hash(mat, proj_dir):
    mask = torch.einsum("...nd,...dr -> ...nr", mat, proj_dir) > 0
    bin_ids = (mask * 2 ** torch.arange(proj_dir.shape[-1]).view(1, 1, 1, -1)).sum(-1)
    return _unit_hamming(proj_dir.shape[-1])[bin_ids]


def indexing(x, indices):
    return x.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def exact_attention(query, key, value, scale, bias=None):
    qk = query @ key.transpose(-1, -2) * scale
    if bias is not None:
        qk = qk + bias
    return qk.softmax(dim=-1) @ value, torch.logsumexp(qk, dim=-1, keepdim=True)


def add_self_attentions(attn1, lse1, attn2, lse2):
    c = (1 / (1 + (lse2 - lse1).exp())).to(dtype=attn1.dtype)
    return c * attn1 + (1 - c) * attn2, lse1 - (c + torch.finfo(lse1.dtype).eps).log()


def code_forward(query, key, value, proj_dir, sampled_set, block_size, sample_size):
    """``forward_no_causal_mask`` for lengths the block divides (no padding), above ``min_seq_len``."""
    batch_size, head_size, n_query, dim = query.shape
    n_key = key.shape[2]
    scale = dim ** -0.5
    _, query_sort_idx = torch.sort(code_hash(query, proj_dir), dim=2, stable=True)
    _, key_sort_idx = torch.sort(code_hash(key, proj_dir), dim=2, stable=True)
    query_sort_idx_inv = torch.argsort(query_sort_idx, dim=2, stable=True)
    query_sorted, key_sorted = indexing(query, query_sort_idx), indexing(key, key_sort_idx)
    value_sorted = indexing(value, key_sort_idx)
    num_blocks = key_sorted.shape[2] // block_size
    query_block_size = query_sorted.shape[2] // num_blocks
    attn_block, lse_block = exact_attention(query_sorted.reshape(-1, 1, query_block_size, dim),
                                            key_sorted.reshape(-1, 1, block_size, dim),
                                            value_sorted.reshape(-1, 1, block_size, dim), scale)
    attn_block = attn_block.reshape(batch_size, head_size, n_query, -1)
    lse_block = lse_block.reshape(batch_size, head_size, n_query, -1)
    offset_n = torch.arange(n_query).view(1, -1, 1)
    weights = n_key / sample_size
    value_subset, key_subset = indexing(value_sorted, sampled_set), indexing(key_sorted, sampled_set)
    block_mask = (offset_n // query_block_size) == (sampled_set // block_size).view(-1, 1, sample_size)
    block_mask = block_mask.view(batch_size, head_size, -1, sample_size).to(query.dtype)
    block_mask *= torch.finfo(query.dtype).min
    attn_res, lse_res = exact_attention(query_sorted, key_subset, value_subset, scale, bias=block_mask)
    lse_res = lse_res + math.log(weights)
    attn, lse = add_self_attentions(attn_block, lse_block, attn_res, lse_res)
    return indexing(attn, query_sort_idx_inv), indexing(lse, query_sort_idx_inv)


@pytest.mark.parametrize("n,block,samples,projs,seed", [(64, 16, 16, 3, 0), (96, 32, 40, 4, 1), (128, 16, 64, 5, 2)])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_recipe_is_the_authors_forward(n, block, samples, projs, seed, backend):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for _ in range(3))
    proj_dir = torch.randn(16, projs, generator=g, dtype=torch.float64)
    sampled = torch.randint(n, (2, 3, samples), generator=g)
    ours = [x.clone().requires_grad_() for x in (q, k, v)]
    theirs = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = HyperAttention(block, samples, backend=backend)(*ours, proj_dir, sampled)
    want, want_lse = code_forward(*theirs, proj_dir, sampled, block, samples)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse[..., 0], rtol=1e-10, atol=1e-10)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    want.backward(grad)
    for mine, ref in zip(ours, theirs, strict=True):
        torch.testing.assert_close(mine.grad, ref.grad, rtol=1e-9, atol=1e-9)


def test_a_length_the_block_does_not_divide_is_refused():
    q = torch.randn(1, 1, 40, 8)
    with pytest.raises(ValueError, match="must divide"):
        HyperAttention(16, 8)(q, q, q, torch.randn(8, 3), torch.randint(40, (1, 1, 8)))
