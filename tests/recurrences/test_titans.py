"""Titans' neural memory (``update titans(theta, eta)``): the reference and chunked backends against a float64
loop that takes each token's gradient by autograd (not the closed form the backends use), forward, final state
and every gradient; the decoding step; its checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnc

SRC = ("recurrence memory\n  tokens seq\n  input a: float[heads, n]\n  input theta: float[heads, n]\n"
       "  input eta: float[heads, n]\n  decay a\n  update titans(theta, eta)\n")


def inputs(B=2, H=3, Hkv=3, T=21, D=4, Dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=torch.float64) / D ** 0.5
    v = torch.randn(B, Hkv, T, Dv, generator=g, dtype=torch.float64)
    rates = {"a": torch.log1p(-0.3 * torch.rand(H, T, generator=g, dtype=torch.float64)),  # log(1 - alpha)
             "theta": 0.8 * torch.rand(H, T, generator=g, dtype=torch.float64),
             "eta": 0.05 + 0.9 * torch.rand(H, T, generator=g, dtype=torch.float64)}
    return q, k, v, rates


def by_gradient_descent(q, k, v, rates, scale, state=None):
    """The paper's rule written as gradient descent: each token's gradient of 1/2 ||k S - v||^2 by autograd."""
    B, H, T, D = q.shape
    k, v = (x.repeat_interleave(H // x.shape[1], 1) for x in (k, v))
    S = torch.zeros(B, H, D, v.shape[-1], dtype=q.dtype) if state is None else state[:, :, :D]
    m = torch.zeros_like(S) if state is None else state[:, :, D:]
    outs = []
    for t in range(T):
        with torch.enable_grad():
            w = S.detach().requires_grad_()
            loss = 0.5 * ((torch.einsum("bhk,bhkv->bhv", k[:, :, t], w) - v[:, :, t]) ** 2).sum()
            grad, = torch.autograd.grad(loss, w)
        m = rates["eta"][:, t, None, None] * m - rates["theta"][:, t, None, None] * grad
        S = torch.exp(rates["a"][:, t, None, None]) * S + m
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2), torch.cat([S, m], 2)


@settings(max_examples=12, deadline=None)
@given(T=st.integers(1, 40), chunk=st.sampled_from([16, 32]), seed=st.integers(0, 2**16), with_state=st.booleans())
@example(T=2, chunk=16, seed=0, with_state=False)  # fewer tokens than heads: fla's reading, unless named
def test_every_backend_is_gradient_descent_with_momentum(T, chunk, seed, with_state):
    q, k, v, rates = inputs(T=T, seed=seed)
    s0 = 0.3 * torch.randn(2, 3, 8, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) \
        if with_state else None
    want, want_state = by_gradient_descent(q, k, v, rates, 0.5, s0)
    for backend, tile in (("reference", None), ("cpu", chunk)):
        # [B, H, T, D] named: with 3 heads and 2 tokens, a layout named nowhere reads as fla's and is refused
        attn = attnc.compile_attention(SRC, backend=backend, q_tile=tile, layout="bhnd")
        out, state = attn(q, k, v, scale=0.5, initial_state=s0, return_state=True, **rates)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(state, want_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Hkv", [3, 1])
def test_gradients_of_the_chunked_form_equal_the_loops(Hkv):
    q, k, v, rates = inputs(Hkv=Hkv, T=37)
    s0 = 0.3 * torch.randn(2, 3, 8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    w = torch.randn(2, 3, 37, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = {}
    for backend in ("reference", "cpu"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, s0, *rates.values())]
        attn = attnc.compile_attention(SRC, backend=backend)
        out, state = attn(*leaves[:3], initial_state=leaves[3], return_state=True,
                          **dict(zip(rates, leaves[4:], strict=True)))
        ((out * w).sum() + state.square().sum()).backward()
        grads[backend] = [x.grad for x in leaves]
    for a, b in zip(grads["cpu"], grads["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk", [16, 64])
def test_hard_resets_and_strong_decays_in_the_chunked_form(chunk):
    """-inf gates (a chunk's first and last tokens, two in a row) and decays down to -30: every decay across a
    reset is 0 and its gate's gradient 0, exactly as the loop."""
    q, k, v, rates = inputs(T=70, seed=3)
    a = -30 * torch.rand(3, 70, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for h, t in ((0, 0), (0, 15), (1, 16), (2, 40), (2, 41), (2, 69)):
        a[h, t] = float("-inf")
    rates = {**rates, "a": a}
    grads = {}
    for backend in ("reference", "cpu"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *rates.values())]
        attn = attnc.compile_attention(SRC, backend=backend, q_tile=chunk)
        out, state = attn(*leaves[:3], return_state=True, **dict(zip(rates, leaves[3:], strict=True)))
        ((out * torch.sin(out)).sum() + state.square().sum()).backward()
        grads[backend] = [out, state] + [x.grad for x in leaves]
    for got, want in zip(grads["cpu"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (grads["cpu"][5][torch.isneginf(a)] == 0).all()


def test_decoding_steps_continue_the_sequence():
    q, k, v, rates = inputs(T=20)
    attn = attnc.compile_attention(SRC, backend="cpu")
    out, state = attn(q[:, :, :12], k[:, :, :12], v[:, :, :12], return_state=True,
                      **{n: r[:, :12] for n, r in rates.items()})
    full = attnc.compile_attention(SRC, backend="reference")(q, k, v, **rates)
    for t in range(12, 20):
        o, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, **{n: r[:, t:t + 1] for n, r in rates.items()})
        torch.testing.assert_close(o, full[:, :, t], rtol=1e-10, atol=1e-10)


def test_without_a_decay_the_memory_is_not_decayed():
    src = SRC.replace("  decay a\n", "").replace("  input a: float[heads, n]\n", "")
    q, k, v, rates = inputs(T=18)
    rates = {**rates, "a": torch.zeros_like(rates["a"])}
    want, _ = by_gradient_descent(q, k, v, rates, 0.5)
    out = attnc.compile_attention(src, backend="cpu")(q, k, v, scale=0.5, theta=rates["theta"], eta=rates["eta"])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,value,message", [
    ("eta", 0.0, "momentum must be in \\(0, 1\\]; 'eta' is 0.0"),
    ("eta", 1.5, "momentum must be in \\(0, 1\\]; 'eta' is 1.5"),
    ("eta", float("nan"), "momentum must be in \\(0, 1\\]; 'eta' is nan"),
    ("theta", float("inf"), "learning rate must be finite; 'theta' is inf"),
    ("a", 0.5, "log decays"),
])
def test_bad_rates_name_the_input_on_every_path(name, value, message):
    q, k, v, rates = inputs(T=6)
    rates[name] = rates[name].clone()
    rates[name][1, 4] = value
    for backend in ("reference", "cpu", "triton"):
        with pytest.raises(attnc.SpecError, match=message) as err:
            attnc.compile_attention(SRC, backend=backend)(q, k, v, **rates)
        assert f"argument {name}" in str(err.value)
    with pytest.raises(attnc.SpecError, match=message):
        attnc.compile_attention(SRC, backend="cpu").step(q[:, :, 4], k[:, :, 4], v[:, :, 4], None,
                                                        **{n: r[:, 4:5] for n, r in rates.items()})


def test_language_and_call_errors():
    with pytest.raises(attnc.SpecError, match="'titans' takes two rate inputs .*got 1") as err:
        attnc.load(SRC.replace("titans(theta, eta)", "titans(theta)"))
    assert ":7:" in str(err.value)
    per_channel = SRC.replace("input a: float[heads, n]", "input a: float[heads, n, dk]")
    with pytest.raises(attnc.SpecError, match="one value per token and head"):
        attnc.load(per_channel)
    q, k, v, rates = inputs(T=6)
    with pytest.raises(attnc.SpecError, match=r"initial_state must be \[2, 3, 8, 5\]"):
        attnc.compile_attention(SRC, backend="cpu")(q, k, v, initial_state=torch.zeros(2, 3, 4, 5,
                                                                                      dtype=torch.float64), **rates)


def test_source_says_the_rule():
    attn = attnc.compile_attention(SRC, backend="cpu")
    assert "m_t = eta_t m_(t-1) + theta_t k_t^T u_t" in attn.source
    assert "def chunked" in attn.source
