"""SeerAttention (stdlib ``seer``, ``route topk(K) blocks(B) by gate``): against a transcription of the authors'
prefill path (microsoft/SeerAttention at aba03e3f: ``modules/common.py``'s mask from the gate's block logits with
``nz_ratio``, the last two query blocks dense, ``tril``, then block-sparse causal attention) on every backend,
forward and backward; its training target (``attn_pooling_kernel_2d``: the max over each block of the causal
softmax, normalised over key blocks) against the call's ``return_block_max``; and the language's block-score
route's checks."""

from __future__ import annotations

import math

import pytest
import torch
from backend_agreement import assert_forward_backward, precision
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc


def code_mask(gate_logits: torch.Tensor, nz_ratio: float) -> torch.Tensor:
    """``modules/common.py`` with sparsity_method "nz_ratio": gate logits ``[B, H, nb, nb]`` (future blocks at
    finfo.min, as AttnGate's block mask leaves them), top ``max(1, int((1 - sqrt(1 - nz_ratio)) * nb))`` key blocks
    per query block, the last two query blocks dense, ``tril``. bool ``[B, H, nb, nb]``."""
    nb = gate_logits.shape[-1]
    future = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    logits = gate_logits.masked_fill(future, torch.finfo(gate_logits.dtype).min)
    topk = max(1, int((1 - math.sqrt(1 - nz_ratio)) * nb))
    idx = logits.topk(topk, dim=-1).indices
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, idx, True)
    mask[:, :, -2:, :] = True
    return mask.tril()


def code_attention(q, k, v, mask, block):
    """Block-sparse causal attention over the kept blocks (the code's ``block_sparse_triton_fn``), float64."""
    n = q.shape[2]
    token = mask.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
    allowed = token & torch.ones(n, n, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def code_target(q, k, block):
    """The gate's training target: per (query block, key block) the max of the causal softmax, then each query
    block's row divided by its sum over key blocks (the kernel's Po / Po.sum(-1))."""
    n = q.shape[2]
    s = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1),
                                                                       float("-inf"))
    p = torch.softmax(s, -1)
    nb = math.ceil(n / block)
    p = torch.nn.functional.pad(p, (0, nb * block - n, 0, nb * block - n))
    pooled = p.view(*p.shape[:2], nb, block, nb, block).amax(dim=(3, 5))
    return pooled / pooled.sum(-1, keepdim=True)


def _case(seed, B, H, nb, block, d=8):
    g = torch.Generator().manual_seed(seed)
    n = nb * block
    q, k, v = (torch.randn(B, H, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    return q, k, v, torch.randn(B, H, nb, nb, generator=g, dtype=torch.float64)


def gate_rows(gate_logits, block, n):
    """The block logits as the pattern's input: each query block's row repeated over its ``block`` query rows."""
    return gate_logits.repeat_interleave(block, dim=-2)[..., :n, :]


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.integers(1, 2), st.integers(1, 3), st.integers(2, 7), st.sampled_from([2, 4, 8]),
       st.floats(0.05, 1.0))
def test_matches_the_authors_code(seed, B, H, nb, block, nz_ratio):
    q, k, v, logits = _case(seed, B, H, nb, block)
    n = nb * block
    topk = max(1, int((1 - math.sqrt(1 - nz_ratio)) * nb))
    want = code_attention(q, k, v, code_mask(logits, nz_ratio), block)
    attn = attnc.compile_attention("stdlib:seer", block=block, topk=topk, backend="reference")
    torch.testing.assert_close(attn(q, k, v, gate=gate_rows(logits, block, n)), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_every_backend_matches_the_code_forward_and_backward(backend):
    q, k, v, logits = _case(3, 2, 4, 6, 8, d=16)
    gate = gate_rows(logits, 8, 48).to(precision(backend)[0])
    attn = attnc.compile_attention("stdlib:seer", block=8, topk=max(1, int((1 - math.sqrt(0.5)) * 6)), backend=backend)
    assert_forward_backward(backend, lambda *qkv: attn(*qkv, gate=gate),
                            lambda *qkv: code_attention(*qkv, code_mask(logits, 0.5), 8), [q, k, v])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_the_training_target_is_the_calls_block_max(backend):
    """Causal attention's map, normalised over key blocks, is the code's target (the gate is trained on the dense
    attention's map: a causal pattern's call gives it)."""
    q, k, v, _ = _case(5, 1, 2, 6, 8, d=16)
    dtype = torch.float32 if backend == "triton" else torch.float64
    attn = attnc.compile_attention("pattern causal_lm\n  tokens seq\n  mask causal", backend=backend)
    _, pooled = attn(q.to(dtype), k.to(dtype), v.to(dtype), return_block_max=8)
    got = pooled.double() / pooled.double().sum(-1, keepdim=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, code_target(q, k, 8), **tol)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_a_gate_without_a_batch_serves_every_batch_entry(backend):
    """A gate ``[heads, n, blocks]`` (no batch dimension, as every input may be given) beside q of batch 3: each
    entry selects by it. The Triton forward read its lists and selection past their one entry (a segfault under
    the interpreter) where the cpu and reference backends broadcast it."""
    q, k, v, logits = _case(9, 3, 2, 4, 8, d=16)
    gate = gate_rows(logits, 8, 32)[:1].squeeze(0)  # one entry's scores, no batch dimension
    one = logits[:1].expand_as(logits)
    topk = max(1, int((1 - math.sqrt(1 - 0.4)) * 4))
    attn = attnc.compile_attention("stdlib:seer", block=8, topk=topk, backend=backend)
    dtype, _ = precision(backend)
    assert_forward_backward(backend, lambda *qkv: attn(*qkv, gate=gate.to(dtype)),
                            lambda *qkv: code_attention(*qkv, code_mask(one, 0.4), 8), [q, k, v])


def test_queries_after_a_kv_cache_read_their_own_gate_rows():
    q, k, v, logits = _case(7, 1, 2, 5, 8)
    want = code_attention(q, k, v, code_mask(logits, 0.4), 8)[:, :, -3:]
    topk = max(1, int((1 - math.sqrt(1 - 0.4)) * 5))
    for backend in ("cpu", "flex", "triton"):
        dtype = torch.float32 if backend == "triton" else torch.float64
        attn = attnc.compile_attention("stdlib:seer", block=8, topk=topk, backend=backend)
        out = attn(q[:, :, -3:].to(dtype), k.to(dtype), v.to(dtype), gate=gate_rows(logits, 8, 40).to(dtype))
        tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out.double(), want, **tol)


def test_the_threshold_method_is_a_given_selection():
    """The code's "threshold" method (keep softmax(gate) > threshold), passed as selection=."""
    q, k, v, logits = _case(11, 1, 2, 5, 8)
    nb, n = 5, 40
    future = torch.ones(nb, nb, dtype=torch.bool).triu(1)
    probs = torch.softmax(logits.masked_fill(future, torch.finfo(logits.dtype).min), -1)
    mask = probs > 0.15
    mask[:, :, -2:, :] = True
    mask = mask.tril()
    attn = attnc.compile_attention("stdlib:seer", block=8, topk=1, backend="cpu")
    out = attn(q, k, v, gate=gate_rows(logits, 8, n), selection=gate_rows(mask, 8, n))
    torch.testing.assert_close(out, code_attention(q, k, v, mask, 8), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decl,route,message", [
    ("input gate: float[heads, n, 4]", "route topk(2) blocks(8) by gate", "must be declared float\\[heads, n, blocks\\]"),
    ("input gate: float[heads, n, blocks]", "route topk(2) blocks(8) by nope", "unknown name 'nope'"),
    ("input gate: float[heads, n, blocks]", "mask causal", "no 'route topk\\(K\\) blocks\\(B\\) by gate' reads it"),
])
def test_bad_block_score_routes_are_refused(decl, route, message):
    with pytest.raises(attnc.SpecError, match=message):
        attnc.load(f"pattern p\n  tokens seq\n  {decl}\n  {route}\n")


def test_gate_scores_of_the_wrong_shape_name_the_input():
    q, k, v, logits = _case(1, 1, 2, 5, 8)
    attn = attnc.compile_attention("stdlib:seer", block=8, topk=2, backend="cpu")
    with pytest.raises(attnc.SpecError, match="gate"):
        attn(q, k, v, gate=logits)
