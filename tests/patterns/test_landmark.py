"""Landmark Attention (stdlib ``landmark``, the ``landmark(BLOCK)`` score term): against the authors' training-time
grouped softmax (epfml/landmark-attention at d963e504: LandmarkGroupedSoftmaxFunction with the masks of
LlamaModel.forward, the landmark last in every block) written query by query in float64, on random inputs
(hypothesis), GQA, partial last blocks; forward and backward on every backend; decode steps; and the term's
checks."""

from __future__ import annotations

import pytest
import torch
from backend_agreement import assert_forward_backward, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import assert_context_parallel_refuses

import attnc
from attnc.core.errors import SpecError


def grouped_softmax_rule(q, k, v, block):
    """Query by query: one softmax P over the query's own block's regular tokens up to it and the earlier blocks'
    landmarks (a landmark closes each block of ``block`` tokens; a shorter last block has none); an earlier block's
    regular token weighs P(its landmark) times its share of the block's own softmax; no landmark's value is
    attended. q ``[B, H, n, d]``, k and v ``[B, Hkv, n, d]``."""
    B, H, n, d = q.shape
    out = torch.zeros(B, H, n, v.shape[-1], dtype=q.dtype)
    is_landmark = [j % block == block - 1 for j in range(n)]
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[1])
            s = q[b, h] @ k[b, kh].T / d ** 0.5
            for i in range(n):
                own = i // block
                direct = [j for j in range(own * block, i + 1) if not is_landmark[j]]
                gates = [c * block + block - 1 for c in range(own)]
                if not direct and not gates:
                    continue  # a row with nothing to attend outputs 0
                p = torch.softmax(s[i, direct + gates], 0)
                row = p[:len(direct)] @ v[b, kh, direct]
                for g, c in zip(p[len(direct):], range(own), strict=True):
                    members = list(range(c * block, c * block + block - 1))
                    row = row + g * (torch.softmax(s[i, members], 0) @ v[b, kh, members])
                out[b, h, i] = row
    return out


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 40), block=st.integers(2, 7), kv_heads=st.sampled_from([1, 2]))
def test_random_inputs_match_the_grouped_softmax(seed, n, block, kv_heads):
    q, k, v = random_qkv(seed, n, kv_heads=kv_heads)
    attn = attnc.compile_attention("stdlib:landmark", block=block, backend="reference")
    torch.testing.assert_close(attn(q, k, v), grouped_softmax_rule(q, k, v, block), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
@pytest.mark.parametrize("n,block", [(37, 5), (24, 4)])
def test_forward_and_backward_on_every_backend(backend, n, block):
    """out, dq, dk and dv against autograd through the rule (the gates' gradient reaches q and k through the
    landmark scores and the blocks' log-sum-exps)."""
    attn = attnc.compile_attention("stdlib:landmark", block=block, backend=backend)
    assert_forward_backward(backend, attn, lambda q, k, v: grouped_softmax_rule(q, k, v, block),
                            list(random_qkv(n, n, heads=4, kv_heads=2)))


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_decode_steps_are_the_sequences_last_rows(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 2e-5 if backend == "triton" else 1e-12
    q, k, v = random_qkv(9, 30)
    attn = attnc.compile_attention("stdlib:landmark", block=4, backend=backend)
    full = grouped_softmax_rule(q, k, v, 4)
    for nk, rows in ((23, 1), (24, 1), (30, 3)):
        got = attn(q[:, :, nk - rows:nk].to(dtype), k[:, :, :nk].to(dtype), v[:, :, :nk].to(dtype))
        want = grouped_softmax_rule(q[:, :, :nk], k[:, :, :nk], v[:, :, :nk], 4)[:, :, -rows:]
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert full.shape == q.shape


def test_a_landmark_query_attends_its_own_block_without_its_landmark():
    """Query 3 (the first landmark, block 4) attends keys 0-2; query 7 attends keys 4-6 and, through landmark 3's
    gate, keys 0-2: never a landmark's value."""
    q, k, v = random_qkv(1, 8)
    attn = attnc.compile_attention("stdlib:landmark", block=4, backend="reference")
    out = attn(q, k, v)
    s = q @ k.transpose(-1, -2) / 8 ** 0.5
    own = (torch.softmax(s[:, :, 3, :3], -1)[..., None, :] @ v[:, :, :3]).squeeze(-2)
    torch.testing.assert_close(out[:, :, 3], own, rtol=1e-12, atol=1e-12)
    landmarks_changed = v.clone()
    landmarks_changed[:, :, [3, 7]] = 1e6
    torch.testing.assert_close(attn(q, k, landmarks_changed), out, rtol=1e-12, atol=1e-12)


SOURCE = "pattern p\n  tokens seq\n  mask causal\n  bias {bias}"


@pytest.mark.parametrize("text,message", [
    (SOURCE.format(bias="landmark(1)"), "the block of landmark() must be at least 2"),
    (SOURCE.format(bias="landmark(n)"), "the block of landmark() must be a constant"),
    (SOURCE.format(bias="landmark(4, 2)"), "'landmark' takes 1 argument"),
    ("pattern p\n  tokens seq\n  mask causal and landmark(4) > 0", "landmark() is a score term: only a bias"),
    ("pattern p\n  tokens grid(y: height, x: width)\n  bias landmark(4)",
     "landmark() needs one sequence layout for queries and keys"),
])
def test_bad_terms_are_named(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        attnc.compile_attention(text)
    assert err.value.pos is not None  # file:line:col


def test_a_block_below_two_names_the_argument():
    with pytest.raises(SpecError) as err:
        attnc.compile_attention("stdlib:landmark", block=1)
    assert err.value.where == "argument block"


def test_the_gates_are_not_an_argument():
    q, k, v = random_qkv(2, 8)
    with pytest.raises(SpecError, match="computed from q and k at every call") as err:
        attnc.compile_attention("stdlib:landmark", block=4)(q, k, v, __landmark=torch.zeros(2, 8, 2))
    assert err.value.where == "argument __landmark"


def test_context_parallelism_refuses_by_name(tmp_path):
    assert_context_parallel_refuses("stdlib:landmark", "score table made from the whole sequence", tmp_path)


def test_the_simulator_says_it_does_not_model_the_gates():
    report = attnc.simulate("stdlib:landmark", n=4096)
    assert any("landmark(): its gate table" in a for a in report.assumptions)
