"""Combiner-Fixed (stdlib ``combiner``; ``keys pooled(max, SIZE)`` and ``combine softmax(...)``): against the code's
rule (google-research at 4c429948, combiner/jax/model/layer.py: _SelfAttSqrtn with max summaries) written query
by query in float64, on random inputs (hypothesis), GQA, a short last block; forward and backward on every
backend; packed sequences; and the new words' checks."""

from __future__ import annotations

import pytest
import torch
from backend_agreement import assert_forward_backward, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.core.errors import SpecError


def combiner_rule(q, k, v, block):
    """Query by query: one softmax over its own block's keys up to it and, per earlier block, a summary key (the
    block's elementwise-max key) with a summary value (the block's attention over all its keys by its
    elementwise-max query); every logit a dot product over sqrt(d)."""
    B, H, n, d = q.shape
    out = torch.zeros(B, H, n, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[1])
            keys, values = [], []
            for t in range(-(-n // block)):
                seg = slice(t * block, min(n, (t + 1) * block))
                w = torch.softmax(k[b, kh, seg] @ q[b, h, seg].amax(0) / d ** 0.5, 0)
                keys.append(k[b, kh, seg].amax(0))
                values.append(w @ v[b, kh, seg])
            for i in range(n):
                s = i // block
                own = range(s * block, i + 1)
                ks = torch.stack([k[b, kh, j] for j in own] + keys[:s])
                vs = torch.stack([v[b, kh, j] for j in own] + values[:s])
                out[b, h, i] = torch.softmax(ks @ q[b, h, i] / d ** 0.5, 0) @ vs
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), block=st.integers(1, 9), kv_heads=st.sampled_from([1, 2]))
def test_random_inputs_match_the_codes_rule(seed, n, block, kv_heads):
    q, k, v = random_qkv(seed, n, kv_heads=kv_heads)
    attn = attnc.compile_attention("stdlib:combiner", block=block, backend="reference")
    torch.testing.assert_close(attn(q, k, v), combiner_rule(q, k, v, block), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
@pytest.mark.parametrize("n,block", [(37, 5), (24, 8)])
def test_forward_and_backward_on_every_backend(backend, n, block):
    """out, dq, dk and dv against autograd through the rule (the summaries' values carry q's and k's gradient
    through the max and the block's own softmax)."""
    attn = attnc.compile_attention("stdlib:combiner", block=block, backend=backend)
    q, k, v = random_qkv(4, n, heads=4, kv_heads=2)
    assert_forward_backward(backend, attn, lambda q, k, v: combiner_rule(q, k, v, block), [q, k, v])


def test_packed_sequences_are_each_their_own():
    attn = attnc.compile_attention("stdlib:combiner", block=4, backend="cpu")
    q, k, v = random_qkv(6, 23, batch=1)
    cut = [0, 9, 23]
    got = attn(q, k, v, cu_seqlens=torch.tensor(cut))
    for a, b in zip(cut, cut[1:], strict=False):
        part = slice(a, b)
        torch.testing.assert_close(got[:, :, part], combiner_rule(q[:, :, part], k[:, :, part], v[:, :, part], 4),
                                   rtol=1e-12, atol=1e-12)


def test_a_softmax_merge_is_the_one_softmax_over_both_key_sets():
    """``combine softmax(a, b)`` of two plain branches over disjoint keys is the pattern of their union."""
    spec = ("pattern p\n  tokens seq\n  branch near\n    mask causal and q - k < 3\n  branch far\n"
            "    mask q - k >= 3 and k % 2 == 0\n  combine softmax(near, far)\n")
    union = "pattern u\n  tokens seq\n  mask causal and (q - k < 3 or k % 2 == 0)\n"
    q, k, v = random_qkv(8, 19)
    torch.testing.assert_close(attnc.compile_attention(spec, backend="cpu")(q, k, v),
                               attnc.compile_attention(union, backend="cpu")(q, k, v), rtol=1e-12, atol=1e-12)


def test_queries_after_a_kv_cache_are_refused():
    attn = attnc.compile_attention("stdlib:combiner", block=4, backend="cpu")
    q, k, v = random_qkv(1, 12)
    with pytest.raises(SpecError, match="one softmax") as err:
        attn(q[:, :, -1:], k, v)
    assert err.value.where == "argument k"


@pytest.mark.parametrize("combine, words, col", [
    ("softmax(own)", "two or more branches", 11),
    ("softmax(own, others)", "no branch 'others'", 24),
    ("softmax(own, own)", "appears twice", 24),
])
def test_a_bad_softmax_merge_is_one_error_at_its_place(combine, words, col):
    spec = ("pattern p\n  tokens seq\n  branch own\n    mask causal\n  branch far\n    keys pooled(max, 4)\n"
            f"    mask k < q // 4\n  combine {combine}\n")
    with pytest.raises(SpecError, match=words) as err:
        attnc.load(spec)
    assert (err.value.pos.line, err.value.pos.col) == (8, col)


def test_an_unknown_pooling_names_the_ones_there_are():
    spec = "pattern p\n  tokens seq\n  branch far\n    keys pooled(min, 4)\n    mask k < q // 4\n  combine far\n"
    with pytest.raises(SpecError, match="'mean' or 'max'") as err:
        attnc.load(spec)
    assert err.value.pos.line == 4


def test_a_row_with_no_key_in_any_branch_outputs_zero_with_finite_gradients():
    """A softmax merge where a query sees no key in any branch: output 0 and no NaN in any gradient (logsumexp's
    gradient over only -inf is NaN), on every backend."""
    spec = ("pattern m(block >= 1 = 2)\n  tokens seq\n  branch a\n    mask k < q and q // block == k // block\n"
            "  branch b\n    mask k < q and q // block != k // block\n  combine softmax(a, b)\n")
    q, k, v = random_qkv(3, 9)
    for backend in ("reference", "cpu", "flex", "triton"):
        leaves = [x.detach().clone().to(torch.float32 if backend == "triton" else torch.float64).requires_grad_()
                  for x in (q, k, v)]
        out = attnc.compile_attention(spec, backend=backend)(*leaves)
        assert bool((out[:, :, 0] == 0).all()), backend
        out.sum().backward()
        assert all(bool(torch.isfinite(x.grad).all()) for x in leaves), backend


def test_max_summaries_after_a_kv_cache_are_refused_in_a_sum_too():
    spec = ("pattern s(block >= 1 = 4)\n  tokens seq\n  branch own\n    mask causal and q // block == k // block\n"
            "  branch summaries\n    keys pooled(max, block)\n    mask k < q // block\n  combine own + summaries\n")
    q, k, v = random_qkv(2, 12)
    with pytest.raises(SpecError, match="reads every query of the run") as err:
        attnc.compile_attention(spec, backend="reference")(q[:, :, -1:], k, v)
    assert err.value.where == "argument k"


def test_a_key_summary_is_refused_by_name():
    q, k, v = random_qkv(2, 12)
    with pytest.raises(SpecError, match="keeps no key summary") as err:
        attnc.compile_attention("stdlib:combiner", block=4)(q, k, v, key_summary=attnc.KeySummary())
    assert err.value.where == "argument key_summary"


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_a_softmax_merge_returns_the_one_softmaxs_lse(layout):
    """``return_lse=True``: the log-sum-exp over both key sets, as the union pattern's, in the call's layout; also
    with packed sequences (each its own)."""
    spec = ("pattern p\n  tokens seq\n  branch near\n    mask causal and q - k < 3\n  branch far\n"
            "    mask q - k >= 3 and k % 2 == 0\n  combine softmax(near, far)\n")
    union = attnc.compile_attention("pattern u\n  tokens seq\n  mask causal and (q - k < 3 or k % 2 == 0)\n",
                                    backend="cpu")
    q, k, v = random_qkv(8, 19, batch=1)
    want_out, want_lse = union(q, k, v, return_lse=True)
    attn = attnc.compile_attention(spec, backend="cpu", layout=layout)
    t = (lambda x: x.transpose(1, 2)) if layout == "bnhd" else (lambda x: x)  # noqa: E731
    out, lse = attn(t(q), t(k), t(v), return_lse=True)
    torch.testing.assert_close(t(out), want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse if layout == "bhnd" else lse.transpose(1, 2), want_lse, rtol=1e-12, atol=1e-12)
    out, lse = attn(t(q), t(k), t(v), return_lse=True, cu_seqlens=torch.tensor([0, 7, 19]))
    part_out, part_lse = union(q[:, :, 7:], k[:, :, 7:], v[:, :, 7:], return_lse=True)
    got_lse = lse if layout == "bhnd" else lse.transpose(1, 2)
    torch.testing.assert_close(got_lse[:, :, 7:], part_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t(out)[:, :, 7:], part_out, rtol=1e-12, atol=1e-12)


def test_the_module_reports_its_latest_calls_shapes():
    """``report()`` after a call: each branch's own prediction (the summaries against their runs), summed; before
    a call, one clear error. No single schedule (each branch has its own)."""
    attn = attnc.compile_attention("stdlib:combiner", block=8, backend="cpu")
    with pytest.raises(SpecError, match="call the module once first"):
        attn.report()
    q, k, v = random_qkv(1, 64)
    attn(q, k, v)
    rep = attn.report()
    assert set(rep.branches) == {"own", "summaries"} and rep.n == 64 and attn.schedule is None
    assert rep.forward_s == pytest.approx(sum(r.best.forward_s for r in rep.branches.values()))
    assert rep.branches["summaries"].to_dict()["nk"] == 8
