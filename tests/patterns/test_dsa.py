"""DeepSeek Sparse Attention (stdlib ``dsa``, ``route topk(K) tokens by indexer(QI, KI, W)``): against a
transcription of the authors' code (deepseek-ai/DeepSeek-V3.2-Exp at 3b99a535: ``Indexer.forward``'s scores and
top-k, ``MLA.forward``'s index mask, without the fp8 quantisation), against a naive float64 loop of the rule on
random inputs, on every backend, prefill and decode, forward and backward; and the clause's checks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.core.errors import SpecError


def code_forward(q, k, v, qi, ki, w, topk, start_pos=0):
    """``MLA.forward`` with the indexer (the MHA prefill path, and a decode step with ``start_pos``): q ``[b, h,
    s, d]`` of the last s of ``end_pos`` tokens; qi ``[b, s, J, DI]``, ki ``[b, end_pos, DI]``, w ``[b, s, J]``
    (the weights with the code's scales folded in); k, v ``[b, h, end_pos, d]``."""
    bsz, _, seqlen, d = q.shape
    end_pos = k.shape[2]
    mask = None
    if seqlen > 1:
        mask = torch.full((seqlen, end_pos), float("-inf"), dtype=q.dtype).triu_(start_pos + 1)
    # fp8_index: per key, sum over the indexer heads of relu(q . k) times the weight
    index_score = (torch.relu(torch.einsum("bshd,btd->bsht", qi, ki)) * w[..., None]).sum(2)  # [b, s, end_pos]
    if mask is not None:
        index_score += mask
    topk_indices = index_score.topk(min(topk, end_pos), dim=-1)[1]
    index_mask = torch.full((bsz, seqlen, end_pos), float("-inf"), dtype=q.dtype).scatter_(-1, topk_indices, 0)
    if mask is not None:
        index_mask += mask
    scores = q @ k.transpose(-1, -2) / math.sqrt(d) + index_mask[:, None]
    return torch.softmax(scores, dim=-1) @ v


def naive(q, k, v, qi, ki, w, topk):
    """The rule one query at a time: the causal keys of the `topk` largest indexer scores, ties to the lower key."""
    B, H, Nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(B, H, Nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(Nq):
            pos = nk - Nq + t
            score = [sum(float(w[b, t, j]) * max(0.0, float(qi[b, t, j] @ ki[b, s])) for j in range(qi.shape[2]))
                     for s in range(pos + 1)]
            kept = sorted(range(pos + 1), key=lambda s: (-score[s], s))[:topk]
            for h in range(H):
                s = torch.stack([q[b, h, t] @ k[b, h, j] for j in kept]) / math.sqrt(d)
                out[b, h, t] = torch.softmax(s, 0) @ v[b, h, kept]
    return out


def _inputs(g, B, n, nk, J, DI, H=2, d=8, positive=False):
    q = torch.randn(B, H, n, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(B, H, nk, d, generator=g, dtype=torch.float64) for _ in range(2))
    qi = torch.randn(B, nk, J, DI, generator=g, dtype=torch.float64)
    ki = torch.randn(B, nk, DI, generator=g, dtype=torch.float64)
    w = torch.rand(B, nk, J, generator=g, dtype=torch.float64) if positive else torch.randn(B, nk, J, generator=g,
                                                                                                   dtype=torch.float64)
    return q, k, v, qi, ki, w


@pytest.mark.parametrize("n,topk,J,DI,seed", [(24, 5, 4, 8, 0), (40, 8, 3, 16, 1), (33, 3, 6, 4, 2)])
@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_prefill_and_decode_match_the_authors_code(n, topk, J, DI, seed, backend):
    g = torch.Generator().manual_seed(seed)
    q, k, v, qi, ki, w = _inputs(g, 2, n, n, J, DI, positive=True)
    qi, ki = qi + 1.0, ki + 1.0  # most products positive, some not (relu at work); no exact tie where a row's top-k is cut:
    index = (torch.relu(torch.einsum("bshd,btd->bsht", qi, ki)) * w[..., None]).sum(2)
    ranked = index.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")).sort(-1, True).values
    cut = ranked[..., topk - 1:topk + 1]
    assert not bool(((cut[..., 0] == cut[..., 1]) & (cut[..., 1] > float("-inf"))).any())
    attn = attnc.compile_attention("stdlib:dsa", topk=topk, index_heads=J, index_dim=DI, backend=backend)
    out = attn(q, k, v, qi=qi, ki=ki, w=w)
    torch.testing.assert_close(out, code_forward(q, k, v, qi, ki, w, topk), rtol=1e-12, atol=1e-12)
    for rows in (1, 2):  # decode steps: the code's start_pos is the cache before them
        step = attn(q[:, :, -rows:], k, v, qi=qi, ki=ki, w=w)
        want = code_forward(q[:, :, -rows:], k, v, qi[:, -rows:], ki, w[:, -rows:], topk, start_pos=n - rows)
        torch.testing.assert_close(step, want, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 20), topk=st.integers(1, 8), J=st.integers(1, 4),
       rows=st.sampled_from([None, 1, 3]))
def test_random_inputs_match_the_naive_rule(seed, n, topk, J, rows):
    """Random signs of the weights: exact ties at 0 (every product negative) are common, and go to the lower key."""
    g = torch.Generator().manual_seed(seed)
    q, k, v, qi, ki, w = _inputs(g, 1, n, n, J, 3)
    if rows is not None and rows < n:
        q = q[:, :, -rows:]
    attn = attnc.compile_attention("stdlib:dsa", topk=topk, index_heads=J, index_dim=3, backend="reference")
    got = attn(q, k, v, qi=qi, ki=ki, w=w)
    want = naive(q, k, v, qi[:, n - q.shape[2]:], ki, w[:, n - q.shape[2]:], topk)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_every_backend_matches_the_reference_forward_and_backward(backend):
    g = torch.Generator().manual_seed(4)
    q, k, v, qi, ki, w = _inputs(g, 2, 40, 40, 3, 8, H=4, d=16)
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    kv_heads = lambda x: x[:, :2]  # noqa: E731 (GQA: 4 query heads over 2 KV heads)
    ref_args = [q.clone().requires_grad_(), kv_heads(k).clone().requires_grad_(), kv_heads(v).clone().requires_grad_()]
    args = [x.detach().to(dtype).requires_grad_() for x in ref_args]
    index = dict(qi=qi, ki=ki, w=w)
    ref = attnc.compile_attention("stdlib:dsa", topk=6, index_heads=3, index_dim=8, backend="reference")
    attn = attnc.compile_attention("stdlib:dsa", topk=6, index_heads=3, index_dim=8, backend=backend)
    want = ref(*ref_args, **index)
    out = attn(*args, **{n: t.to(dtype) for n, t in index.items()})
    torch.testing.assert_close(out.double(), want, **tol)
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    want.backward(grad)
    out.backward(grad.to(dtype))
    for mine, theirs in zip(args, ref_args, strict=True):
        torch.testing.assert_close(mine.grad.double(), theirs.grad, **tol)


@pytest.mark.parametrize("clause,message", [
    ("route topk(4) tokens by indexer(qi, ki, nope)", "unknown name 'nope'"),
    ("route topk(4) tokens by indexer(ki, qi, w)", "must be declared float\\[n, J, DI\\]"),
    ("route topk(4) tokens by indexer(qi, ki, w2)", "must agree on J and DI"),
    ("route topk(4) blocks(4) by indexer(qi, ki, w)", "scores single keys"),
    ("route topk(4) tokens by indexer(qi, ki, w) @ k", "not a side of '@'"),
    ("route topk(4) tokens by indexes(qi, ki, w)", "not a routing score"),
])
def test_bad_indexer_clauses_are_refused_with_their_place(clause, message):
    source = ("pattern p(j = 3, di = 4)\n  tokens seq\n  input qi: float[n, j, di]\n  input ki: float[nk, di]\n"
              "  input w: float[n, j]\n  input w2: float[n, di]\n  mask causal\n  " + clause + "\n")
    with pytest.raises(SpecError, match=message) as err:
        attnc.compile_attention(source)
    assert err.value.pos is not None and err.value.pos.line == 8


def test_the_route_scores_are_the_lightning_indexer():
    """``routing.block_scores`` (every path's scores: host, device, context-parallel ranks) is sum_j w relu(qi . ki)."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.plan import routing

    pat = attnc.load("stdlib:dsa", topk=4, index_heads=2, index_dim=3)
    g = torch.Generator().manual_seed(6)
    q, k, _, qi, ki, w = _inputs(g, 1, 12, 12, 2, 3)
    bound = E.bind_sizes(pat, n=12, nk=12, heads=2, sizes={}, dk=8)
    inputs = {"qi": qi, "ki": ki, "w": w}
    sq, sk = routing.score_vectors(pat, q, k, inputs)
    score = routing.block_scores(pat, bound, sq, sk, torch.arange(12), 12)
    want = (torch.relu(torch.einsum("bshd,btd->bsht", qi, ki)) * w[..., None]).sum(2)
    torch.testing.assert_close(score[:, 0], want, rtol=1e-12, atol=1e-12)


def test_the_weights_keep_their_precision_beside_low_precision_vectors():
    """bf16 indexer vectors with fp32 weights (DeepSeek's): the weights are not rounded to bf16."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.plan import routing

    pat = attnc.load("stdlib:dsa", topk=4, index_heads=2, index_dim=3)
    g = torch.Generator().manual_seed(7)
    q = torch.randn(1, 2, 12, 8, generator=g)
    qi, ki = torch.randn(1, 12, 2, 3, generator=g).bfloat16(), torch.randn(1, 12, 3, generator=g).bfloat16()
    w = 1 + torch.rand(1, 12, 2, generator=g) / 7  # not representable in bf16
    bound = E.bind_sizes(pat, n=12, nk=12, heads=2, sizes={}, dk=8)
    sq, sk = routing.score_vectors(pat, q, q, {"qi": qi, "ki": ki, "w": w})
    score = routing.block_scores(pat, bound, sq, sk, torch.arange(12), 12)
    want = (torch.relu(torch.einsum("bshd,btd->bsht", qi.float(), ki.float())) * w[..., None]).sum(2)
    torch.testing.assert_close(score[:, 0], want, rtol=1e-6, atol=1e-6)
