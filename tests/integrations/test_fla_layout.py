"""flash-linear-attention's layout (issue 58, item 6): fla's q, k, v ``[B, T, H, K]`` and gates
``[B, T, H]`` read as attnc's default ``[B, H, N, D]`` are T heads of H tokens, a shape every check
accepts. A recurrence compiled and called without a layout refuses such a call (naming
``layout='bnhd'``); naming a layout runs it; ``step`` takes fla's one-token ``[B, 1, H, K]`` tensors
and gates under ``"bnhd"``, and its errors show the shapes of the layout in use."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import attnc

B, T, H, K = 2, 12, 4, 8


def _fla(T=T, H=H, vector_gate=False, seed=0):
    """fla-shaped q, k, v ``[B, T, H, K]`` and gates (``g`` ``[B, T, H]``, or ``[B, T, H, K]`` for kda)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=torch.float64), dim=-1) for _ in range(3))
    g = -torch.rand(B, T, H, *((K,) if vector_gate else ()), generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    return q, k, v, {"g": g, "beta": beta}


def _spec_error(fn, where: str, match: str | None = None) -> attnc.SpecError:
    with pytest.raises(attnc.SpecError, match=match) as info:
        fn()
    assert info.value.where == where, (info.value.where, str(info.value))
    return info.value


def _bhnd(gates: dict) -> dict:
    return {name: t.transpose(1, 2) for name, t in gates.items()}


def test_fla_tensors_without_a_layout_are_refused_naming_bnhd():
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    q, k, v, gates = _fla()
    err = _spec_error(lambda: attn(q, k, v, **gates), "argument q", f"{T} heads of {H} tokens")
    assert "layout='bnhd'" in err.hint and "[B, T, H, K]" in err.hint
    # named, at the call or when compiling: fla's tensors run as fla reads them
    want = attn(*(t.transpose(1, 2) for t in (q, k, v)), **_bhnd(gates)).transpose(1, 2)
    torch.testing.assert_close(attn(q, k, v, layout="bnhd", **gates), want, rtol=1e-12, atol=1e-12)
    named = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu", layout="bnhd")
    torch.testing.assert_close(named(q, k, v, **gates), want, rtol=1e-12, atol=1e-12)


def test_an_initial_state_decides_the_reading_when_given():
    """The state's heads are the same in both layouts: fla's tensors with a state are refused even where
    they read as fewer heads than tokens (T = 2 < H = 4), and [B, H, T, K] ones with their state run."""
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    q, k, v, gates = _fla(T=2)
    state = torch.zeros(B, H, K, K, dtype=torch.float64)
    err = _spec_error(lambda: attn(q, k, v, initial_state=state, **gates), "argument q",
                      re.escape(f"initial_state {list(state.shape)} has {H} heads"))
    assert "layout='bnhd'" in err.hint
    out, final = attn(q, k, v, initial_state=state, return_state=True, layout="bnhd", **gates)
    assert out.shape == (B, 2, H, K) and final.shape == (B, H, K, K)
    # more heads than tokens in [B, H, T, K], with a state of those heads: no other reading, it runs
    qb, kb, vb = (t.transpose(1, 2) for t in (q, k, v))
    assert attn(qb, kb, vb, initial_state=state, **_bhnd(gates)).shape == (B, H, 2, K)


def test_bhnd_calls_that_name_no_layout_still_run():
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    q, k, v, gates = _fla()
    # fewer heads than tokens: attnc's own [B, H, T, K]
    assert attn(*(t.transpose(1, 2) for t in (q, k, v)), **_bhnd(gates)).shape == (B, H, T, K)
    # one token (a decoding step as a forward), many heads
    one = [t[:, :1].transpose(1, 2) for t in (q, k, v)]
    assert attn(*one, **{n: t[:, :1].transpose(1, 2) for n, t in gates.items()}).shape == (B, H, 1, K)
    # more heads than tokens, said to be bhnd
    assert attn(q, k, v, layout="bhnd", **_bhnd({n: t.transpose(1, 2) for n, t in gates.items()})).shape \
        == (B, T, H, K)


@pytest.mark.parametrize("name, vector_gate", [("gated_delta_net", False), ("kda", True)])
def test_step_under_bnhd_takes_fla_one_token_tensors_and_gates(name, vector_gate):
    """Token by token, ``step`` with fla's ``q[:, t:t+1]`` and ``g[:, t:t+1]`` under ``"bnhd"`` gives the
    forward's outputs and final state; gates without the token axis are the same gates."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu", layout="bnhd")
    q, k, v, gates = _fla(T=5, vector_gate=vector_gate)
    out, final = attn(q, k, v, return_state=True, **gates)
    state = None
    for t in range(5):
        o, state = attn.step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state,
                             **{n: g[:, t:t + 1] for n, g in gates.items()})
        assert o.shape == (B, 1, H, K)
        torch.testing.assert_close(o, out[:, t:t + 1], rtol=1e-10, atol=1e-10)
        squeezed, _ = attn.step(q[:, t], k[:, t], v[:, t], state, **{n: g[:, t] for n, g in gates.items()})
        assert squeezed.shape == (B, H, K)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)
    # the module's layout per step call, as per forward call
    bhnd, _ = attn.step(q[:, :1].transpose(1, 2), k[:, :1].transpose(1, 2), v[:, :1].transpose(1, 2),
                        layout="bhnd", **{n: g[:, :1].transpose(1, 2) for n, g in gates.items()})
    torch.testing.assert_close(bhnd.transpose(1, 2), out[:, :1], rtol=1e-10, atol=1e-10)


def test_step_errors_show_the_shapes_of_the_layout_in_use():
    q, k, v, gates = _fla()
    fla = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu", layout="bnhd")
    one = [t[:, :1] for t in (q, k, v)]  # [B, 1, H, K]
    err = _spec_error(lambda: fla.step(*one, g=gates["g"][:, :1].transpose(1, 2), beta=gates["beta"][:, :1]),
                      "argument g", r"one step under layout 'bnhd' takes \[B, 1, H\] or \[B, H\]")
    assert f"H = {H}" in str(err)
    err = _spec_error(lambda: fla.step(*(t.transpose(1, 2) for t in one), **{n: g[:, :1] for n, g in gates.items()}),
                      "argument q", r"q \[B, 1, H, D\] under layout 'bnhd'")
    assert "layout='bhnd'" in err.hint
    plain = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    err = _spec_error(lambda: plain.step(*(t.transpose(1, 2) for t in one),
                                         **{n: g[:, :1] for n, g in gates.items()}),
                      "argument g", r"one step under layout 'bhnd' takes \[B, H, 1\] or \[B, H\]")
    assert "layout='bnhd'" in err.hint
