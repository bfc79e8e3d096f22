"""Sparsifiner (stdlib ``sparsifiner``, ``route topk(K) tokens by qi @ ki keep q < cls``): against a transcription
of the authors' inference path (lim142857/Sparsifiner at 9a11e263, ``MaskPredictor.forward`` and
``Attention.forward``: the reduced low-rank scores, the softmax over the basis, its top coefficients, the
thresholded |basis|, the top-budget keys per query, the class token's whole row, the masked softmax), on every
backend, forward and backward."""

from __future__ import annotations

import math

import pytest
import torch
from backend_agreement import assert_forward_backward, precision
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import attnc


def predictor_inputs(qc, kc, proj_n, proj_back_n, coef_topk, threshold=0.02):
    """The mask predictor's two factors, as the code forms them at inference: the coefficients ``[B, H, N, K]``
    (the class token's row, which the code drops, left zero) and the basis ``[K, N]``. qc, kc ``[B, H, N, c]`` are
    the reduced queries and keys (``proj_c_q(q)``, ``proj_c_k(k)``); proj_n, proj_back_n ``[N, K]``."""
    heads = qc.shape[1]
    reduced_keys = kc.transpose(-1, -2) @ proj_n  # [B, H, c, K]: keys reduced over the tokens
    coef = torch.softmax((qc @ reduced_keys) * heads ** -0.5, dim=-1)  # the code scales by num_heads^-1/2
    coef[..., :1, :] = 0  # the class token's query is not scored
    top = coef.topk(coef_topk, dim=-1)
    coef = torch.zeros_like(coef).scatter(-1, top.indices, top.values)  # not renormalised
    basis = proj_back_n.abs().t()
    return coef, torch.where(basis > threshold, basis, torch.zeros_like(basis))


def code_forward(q, k, v, coef, basis, budget):
    """``Attention.forward`` at inference: each query after the class token keeps its ``budget`` keys of
    largest ``coef @ basis``; the class token's row keeps every key; -inf elsewhere, softmax, ``nan_to_num``."""
    B, H, N, d = q.shape
    connectivity = (coef @ basis)[..., 1:, :]  # [B, H, N - 1, N]
    chosen = connectivity.topk(budget, dim=-1).indices
    mask = torch.zeros_like(connectivity, dtype=torch.bool).scatter(-1, chosen, True)
    mask = torch.cat([torch.ones(B, H, 1, N, dtype=torch.bool), mask], dim=2)
    scores = (q @ k.transpose(-1, -2)) * d ** -0.5
    return torch.nan_to_num(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)) @ v


def _case(seed, B, H, N, d, c, K, coef_topk):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=g, dtype=torch.float64) for _ in range(3))
    qc, kc = (torch.randn(B, H, N, c, generator=g, dtype=torch.float64) for _ in range(2))
    proj_n = torch.randn(N, K, generator=g, dtype=torch.float64)
    proj_back_n = torch.randn(N, K, generator=g, dtype=torch.float64) * 0.1  # some entries under the threshold
    coef, basis = predictor_inputs(qc, kc, proj_n, proj_back_n, coef_topk)
    return q, k, v, coef, basis


def _attnc_inputs(coef, basis):
    B, H = coef.shape[:2]
    return {"qi": coef, "ki": basis.t().expand(B, H, -1, -1).contiguous()}


def _unambiguous(coef, basis, budget) -> bool:
    """Whether every row's top-``budget`` connectivity is strictly above the rest (torch.topk's ties are
    unspecified, so only such rows pin the code's choice)."""
    ranked = (coef @ basis)[..., 1:, :].sort(dim=-1, descending=True).values
    return bool((ranked[..., budget - 1] > ranked[..., budget]).all())


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.integers(0, 10**6), st.integers(1, 2), st.integers(1, 3), st.integers(6, 40), st.integers(2, 6),
       st.integers(1, 4), st.data())
def test_matches_the_authors_code(seed, B, H, N, K, c, data):
    budget = data.draw(st.integers(1, N))
    coef_topk = data.draw(st.integers(1, K))
    q, k, v, coef, basis = _case(seed, B, H, N, 8, c, K, coef_topk)
    if budget < N and not _unambiguous(coef, basis, budget):
        assume(False)  # a tie at the cut: the code's own choice is unspecified there
    want = code_forward(q, k, v, coef, basis, budget)
    attn = attnc.compile_attention("stdlib:sparsifiner", budget=budget, rank=K, backend="reference")
    torch.testing.assert_close(attn(q, k, v, **_attnc_inputs(coef, basis)), want, rtol=1e-12, atol=1e-12)


def test_the_code_defaults_are_the_stdlib_defaults():
    """DeiT-S as the code ships it: 197 tokens, keep rate 0.25 (budget ceil(0.25 * 197)), rank 197 // 6."""
    pat = attnc.load("stdlib:sparsifiner")
    assert dict(pat.params) == {"budget": math.ceil(0.25 * 197), "rank": 197 // 6, "cls": 1}


def test_the_class_token_keeps_every_key_and_the_others_budget():
    q, k, v, coef, basis = _case(3, 1, 2, 30, 8, 4, 6, 3)
    inputs = {name: t[0] for name, t in _attnc_inputs(coef, basis).items()}  # one batch row: [heads, n, rank]
    mask = attnc.materialize_mask("stdlib:sparsifiner", n=30, heads=2, inputs=inputs, q=q, k=k, budget=7, rank=6)
    assert mask[..., 0, :].all()
    assert (mask[..., 1:, :].sum(-1) == 7).all()


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_every_backend_matches_the_code_forward_and_backward(backend):
    q, k, v, coef, basis = _case(11, 2, 4, 40, 16, 4, 6, 3)
    assert _unambiguous(coef, basis, 9)
    inputs = {n: t.to(precision(backend)[0]) for n, t in _attnc_inputs(coef, basis).items()}
    attn = attnc.compile_attention("stdlib:sparsifiner", budget=9, rank=6, backend=backend)
    assert_forward_backward(backend, lambda *qkv: attn(*qkv, **inputs),
                            lambda *qkv: code_forward(*qkv, coef, basis, 9), [q, k, v])


@pytest.mark.parametrize("params,message", [
    ({"budget": 0}, "budget"),
    ({"rank": 0}, "rank"),
    ({"cls": -1}, "cls"),
])
def test_bad_parameters_name_the_argument(params, message):
    with pytest.raises(attnc.SpecError, match=message):
        attnc.compile_attention("stdlib:sparsifiner", **params)


def test_connectivity_inputs_of_the_wrong_rank_are_refused():
    q, k, v, coef, basis = _case(5, 1, 2, 12, 8, 4, 6, 3)
    attn = attnc.compile_attention("stdlib:sparsifiner", budget=3, rank=5, backend="cpu")
    with pytest.raises(attnc.SpecError, match="qi"):
        attn(q, k, v, **_attnc_inputs(coef, basis))
