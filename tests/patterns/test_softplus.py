"""Softplus Attention (stdlib ``softplus``, LSSA) and the language's ``scale`` clause: against the paper's rule as a
public reimplementation writes it (On-Point-RND/transformer-architecture-generalization at f8c318be, models/lssa.py:
lssa_attention, l2-normalised q and k, its 1e-8 on the row sums left out) as a per-query float64 loop, on random
inputs (hypothesis), GQA, causal and not, after a KV cache; forward and backward on every backend; decode steps;
and the clause's checks."""

from __future__ import annotations

import math

import pytest
import torch
from backend_agreement import assert_forward_backward, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import assert_context_parallel_refuses

import attnc
from attnc.core.errors import SpecError


def lssa_rule(q, k, v, causal: bool, p: float = 1.0):
    """Query by query: the weight of key j is softplus(log(d) log(N_i) cos(q_i, k_j)) ** p over the row's sum, N_i
    the keys query i sees (its position + 1 causally, every key otherwise); the queries are the last of the keys."""
    B, H, n, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(B, H, n, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[1])
            for i in range(n):
                position = nk - n + i
                keys = list(range(position + 1)) if causal else list(range(nk))
                cos = [q[b, h, i] @ k[b, kh, j] / (q[b, h, i].norm() * k[b, kh, j].norm()) for j in keys]
                w = torch.nn.functional.softplus(math.log(d) * math.log(len(keys)) * torch.stack(cos)) ** p
                out[b, h, i] = (w / w.sum()) @ v[b, kh, keys]
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), extra=st.integers(0, 6), d=st.sampled_from([2, 8, 16]),
       kv_heads=st.sampled_from([1, 2]), causal=st.booleans(), p=st.sampled_from([1, 2, 3, 0.5]))
def test_random_inputs_match_the_rule(seed, n, extra, d, kv_heads, causal, p):
    """``extra`` cached keys before the queries (a KV cache: the queries' own positions scale them); the power p
    (1: the paper's LSSA)."""
    q, k, v = random_qkv(seed, n + extra, kv_heads=kv_heads, d=d)
    q = q[:, :, extra:]
    attn = attnc.compile_attention("stdlib:softplus", backend="reference", is_causal=causal, p=p)
    torch.testing.assert_close(attn(_unit(q), _unit(k), v, scale=1.0), lssa_rule(q, k, v, causal, p),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
@pytest.mark.parametrize(("causal", "p"), [(True, 1), (False, 1), (True, 3)])
def test_forward_and_backward_on_every_backend(backend, causal, p):
    """out, dq, dk and dv against autograd through the rule (the normalisation inside both: the gradient reaches
    the raw q and k through it)."""
    attn = attnc.compile_attention("stdlib:softplus", backend=backend, is_causal=causal, p=p)
    q, k, v = random_qkv(5, 37, heads=4, kv_heads=2)
    assert_forward_backward(backend, lambda q, k, v: attn(_unit(q), _unit(k), v, scale=1.0),
                            lambda q, k, v: lssa_rule(q, k, v, causal, p), [q, k, v])


def test_a_power_not_positive_is_refused_naming_p():
    for p in (0, -1.5):
        with pytest.raises(SpecError, match="must be positive") as err:
            attnc.compile_attention("stdlib:softplus", p=p)
        assert "argument p" in str(err.value)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_decode_steps_continue_the_sequence(backend):
    """Steps of 1 and 3 queries after a cache: the last rows of the whole sequence's output."""
    attn = attnc.compile_attention("stdlib:softplus", backend=backend)
    q, k, v = random_qkv(7, 50, heads=4, kv_heads=2, dtype=torch.float32 if backend == "triton" else torch.float64)
    q, k = _unit(q), _unit(k)
    whole = attn(q, k, v, scale=1.0)
    for nk, nq in ((20, 1), (21, 1), (33, 3), (50, 1)):
        step = attn(q[:, :, nk - nq:nk], k[:, :, :nk], v[:, :, :nk], scale=1.0)
        torch.testing.assert_close(step, whole[:, :, nk - nq:nk], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_half_precision_queries_stay_in_their_dtype(backend):
    """The scale folded into bf16 queries is rounded back to bf16 (a float32 q beside bf16 k and v would not
    compile on a GPU); the answer is the rule's to bf16's rounding."""
    q, k, v = random_qkv(9, 24)
    attn = attnc.compile_attention("stdlib:softplus", backend=backend)
    out = attn(*(x.to(torch.bfloat16) for x in (_unit(q), _unit(k), v)), scale=1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), lssa_rule(q, k, v, True), rtol=3e-2, atol=3e-2)


def test_the_scale_multiplies_the_calls_scale_and_not_the_bias():
    """``scale E`` scales the dot products only: softcap, bias and decay come after, unscaled; a per-head E."""
    spec = ("pattern p\n  tokens seq\n  mask causal\n  scale (h + 2) * log(q + 2)\n  bias -0.5 * (q - k)\n"
            "  softcap 3.0\n")
    q, k, v = random_qkv(3, 12, heads=2, kv_heads=1)
    out = attnc.compile_attention(spec, backend="reference")(q, k, v, scale=0.7)
    rows = torch.arange(12, dtype=torch.float64)
    e = (torch.arange(2, dtype=torch.float64).view(2, 1, 1) + 2) * torch.log(rows + 2).view(1, 12, 1)
    s = 3.0 * torch.tanh(0.7 * e * (q @ k.transpose(-1, -2)) / 3.0) - 0.5 * (rows.view(-1, 1) - rows.view(1, -1))
    s = s.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(out, torch.softmax(s, -1) @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clause, words", [
    ("scale log(k + 1)", "must not depend on k"),
    ("scale t[h]", "must not depend on inputs"),
    ("scale q > 2", "a number"),
])
def test_a_bad_scale_is_one_error_at_its_place(clause, words):
    spec = f"pattern p\n  tokens seq\n  input t: float[heads]\n  mask causal\n  {clause}\n"
    with pytest.raises(SpecError, match=words) as err:
        attnc.load(spec)
    assert err.value.pos is not None and err.value.pos.line == 5


def test_a_combined_branch_refuses_a_scale():
    spec = ("pattern p\n  tokens seq\n  branch a\n    mask causal\n    scale 2.0\n  branch b\n    mask causal\n"
            "  combine a + b\n")
    with pytest.raises(SpecError, match="'scale' is not taken in a combined pattern") as err:
        attnc.load(spec)
    assert err.value.pos.line == 5


def test_context_parallelism_refuses_a_scale(tmp_path):
    assert_context_parallel_refuses("pattern p\n  tokens seq\n  mask causal\n  scale log(q + 2)\n",
                                    "scales each query's scores", tmp_path)


def test_a_scale_that_is_not_finite_at_a_query_is_one_error():
    """``log(q - 3)`` is NaN before query 3 and -inf at it: named with its position (after a KV cache, the query's
    own)."""
    attn = attnc.compile_attention("pattern p\n  tokens seq\n  mask causal\n  scale log(q - 3)\n", backend="cpu")
    q, k, v = random_qkv(2, 8)
    with pytest.raises(SpecError, match=r"is nan at query 0 \(head 0\)") as err:
        attn(q, k, v)
    assert err.value.where == "argument q"
    with pytest.raises(SpecError, match=r"is -inf at query 3 \(head 0\)"):
        attn(q[:, :, 3:], k, v)
    assert torch.isfinite(attn(q[:, :, 6:], k, v)).all()  # queries 6 and 7 after a cache: finite there


def test_scale_is_still_a_name_outside_the_clause():
    pat = attnc.load("pattern p(scale = 2)\n  tokens seq\n  let w = scale + 1\n  mask q - k < w\n"
                     "  scale scale * log(q + 2)\n")
    assert str(pat.score_scale) == "2*log(q + 2)"
