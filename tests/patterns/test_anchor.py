"""AnchorAttention (stdlib ``anchor``, ``route stripes(THETA) blocks(B) groups(G) keep REGION``): against the
kernels' rule of the authors' code (yuzhouzhang9/Anchor-Attention at fdc74208: the anchor pass, the stripe test and
the final pass) written query by query in float64, on random inputs (hypothesis), GQA, forward and backward on every
backend; the selection made on the device equals the host's; and the clause's checks."""

from __future__ import annotations

import pytest
import torch
from backend_agreement import assert_forward_backward, random_qkv
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import assert_context_parallel_refuses

import attnc
from attnc.core.errors import SpecError
from attnc.runtime.api import simulate_decode


def kernels_rule(q, k, v, block, step, init, theta):
    """The anchor pass, the stripe test and the final pass, one query at a time (float64, every key once): q
    ``[B, H, n, d]``, k and v ``[B, Hkv, n, d]`` (a K/V head serves H / Hkv query heads), causal; groups of ``step``
    blocks of ``block`` queries; the last n mod group queries dense."""
    B, H, n, d = q.shape
    group = block * step
    full = n - n % group
    out = torch.zeros(B, H, n, v.shape[-1], dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            kh = h // (H // k.shape[1])
            s = (q[b, h] @ k[b, kh].T / d ** 0.5).tolist()
            region = [[j for j in range(i + 1) if j < init or j // group == i // group] for i in range(n)]
            anchors = [max(s[i][j] for j in region[i]) for i in range(full)]
            chosen = []
            for gr in range(full // group):
                columns = set()
                for m in range(gr * step, (gr + 1) * step):  # the group's query blocks
                    rows = range(m * block, (m + 1) * block)
                    q_mean = sum(q[b, h, i] for i in rows) / block
                    a_mean = sum(anchors[i] for i in rows) / block
                    estimate = (k[b, kh] @ q_mean / d ** 0.5).tolist()
                    columns |= {j for j in range(init, gr * group) if estimate[j] + theta >= a_mean}
                chosen.append(columns)
            for i in range(n):
                keys = sorted(set(region[i]) | chosen[i // group]) if i < full else list(range(i + 1))
                w = torch.softmax(q[b, h, i] @ k[b, kh, keys].T / d ** 0.5, 0)
                out[b, h, i] = w @ v[b, kh, keys]
    return out


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 60), block=st.integers(1, 4), step=st.integers(1, 3),
       init=st.integers(0, 12), theta=st.floats(-1.0, 3.0), kv_heads=st.sampled_from([1, 2]))
def test_random_inputs_match_the_kernels_rule(seed, n, block, step, init, theta, kv_heads):
    q, k, v = random_qkv(seed, n, kv_heads=kv_heads)
    attn = attnc.compile_attention("stdlib:anchor", block=block, step=step, init=init, theta=theta,
                                   backend="reference")
    torch.testing.assert_close(attn(q, k, v), kernels_rule(q, k, v, block, step, init, theta), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("n", [64, 90])
def test_the_recipes_sizes_keep_some_columns_not_all(n):
    """n 64 (4 groups) and 90 (5 groups and a 10-query dense tail): a selection that is neither the anchor
    region alone nor every causal key."""
    q, k, v = random_qkv(0, n)
    attn = attnc.compile_attention("stdlib:anchor", block=4, step=4, init=16, theta=1.0, backend="cpu")
    out, selection = attn(q, k, v, return_selection=True)
    torch.testing.assert_close(out, kernels_rule(q, k, v, 4, 4, 16, 1.0), rtol=1e-12, atol=1e-12)
    pos = torch.arange(n)
    region = (pos <= pos[:, None]) & ((pos < 16) | (pos // 16 == pos[:, None] // 16) | (pos[:, None] >= n - n % 16))
    causal = pos <= pos[:, None]
    assert selection.shape == (2, 2, n, n)
    assert bool((selection >= region).all()) and bool((selection <= causal).all())
    assert region.sum() * 4 < selection.sum() < causal.sum() * 4


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_forward_and_backward_on_every_backend(backend):
    attn = attnc.compile_attention("stdlib:anchor", block=3, step=2, init=7, theta=0.5, backend=backend)
    assert_forward_backward(backend, attn, lambda q, k, v: kernels_rule(q, k, v, 3, 2, 7, 0.5),
                            list(random_qkv(3, 45, heads=4, kv_heads=2)))


def test_the_device_selection_is_the_hosts():
    """The Triton backend selects on the call's device (``select_on_device``, no host read); the reference on the
    host: the same selection, bit for bit, GQA and a partial last group included."""
    q, k, v = random_qkv(5, 53, heads=4, kv_heads=1, dtype=torch.float32)
    params = dict(block=2, step=3, init=5, theta=0.25)
    chosen = [attnc.compile_attention("stdlib:anchor", **params, backend=b)(q, k, v, return_selection=True)[1]
              for b in ("reference", "triton")]
    assert torch.equal(chosen[0], chosen[1])


def test_a_given_selection_is_attended_as_made():
    q, k, v = random_qkv(6, 40)
    attn = attnc.compile_attention("stdlib:anchor", block=4, step=2, init=6, theta=0.0, backend="cpu")
    out, selection = attn(q, k, v, return_selection=True)
    torch.testing.assert_close(attn(q, k, v, selection=selection), out, rtol=0, atol=0)


SOURCE = "pattern p(g = 8)\n  tokens seq\n  mask causal\n  route stripes(1.5) blocks(4) groups({group}){keep}"


@pytest.mark.parametrize("text,message", [
    (SOURCE.format(group="6", keep=" keep k < 4"), "groups(6) does not hold whole blocks of 4 queries"),
    (SOURCE.format(group="8", keep=""), "a stripes route needs its anchor region: 'keep REGION'"),
    (SOURCE.replace("stripes(1.5)", "stripes(n)").format(group="8", keep=" keep k < 4"),
     "the stripes margin must be a constant"),
    (SOURCE.replace("stripes(1.5)", "stripes(k < 3)").format(group="8", keep=" keep k < 4"),
     "the stripes margin must be a number, got a bool"),
    (SOURCE.replace("blocks(4)", "blocks(0)").format(group="8", keep=" keep k < 4"),
     "the query block must be at least 1"),
    (SOURCE.replace("tokens seq", "tokens grid(y: height, x: width)").format(group="8", keep=" keep k.x < 4"),
     "a stripes route needs one sequence layout for queries and keys, not a grid"),
])
def test_bad_clauses_are_named(text, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        attnc.compile_attention(text)
    assert err.value.pos is not None  # file:line:col


def test_sizes_set_at_the_call_are_checked_there():
    text = "pattern p\n  tokens seq\n  mask causal\n  route stripes(1.0) blocks(3) groups(n // 2) keep k < 2"
    attn = attnc.compile_attention(text, backend="reference")
    q, k, v = random_qkv(7, 12)
    assert attn(q, k, v).shape == q.shape  # groups of 6: two blocks of 3
    with pytest.raises(SpecError, match="group of 5 queries does not hold whole blocks of 3") as err:
        attn(*random_qkv(7, 10))
    assert err.value.where == "argument q"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_queries_after_a_kv_cache_are_refused_by_name(backend):
    attn = attnc.compile_attention("stdlib:anchor", block=2, step=2, init=4, theta=1.0, backend=backend)
    q, k, v = random_qkv(8, 20, dtype=torch.float32)
    with pytest.raises(SpecError, match="queries after a KV cache") as err:
        attn(q[:, :, -1:], k, v)
    assert err.value.where == "argument k"


def test_context_parallelism_refuses_by_name(tmp_path):
    assert_context_parallel_refuses("stdlib:anchor", "stripes by anchor.*context parallelism does not run", tmp_path)


def test_a_decode_steps_simulation_refuses_as_the_call_does():
    """``attnc sim --decode`` of a pattern whose call refuses queries after a KV cache refuses too, with the same
    message, naming ``nk``."""
    with pytest.raises(SpecError, match="queries after a KV cache") as err:
        simulate_decode("stdlib:anchor", nk=8192)
    assert err.value.where == "argument nk"
