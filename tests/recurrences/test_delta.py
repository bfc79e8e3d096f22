"""The delta rule (DeltaNet, Gated DeltaNet, Kimi Delta Attention): the naive reference against a loop
written here from the formula, the chunked form against the naive one in float64 (outputs, final
state, every gradient) on random inputs, decoding continuing a prefix, packed sequences, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc

F64 = torch.float64
GATES = {"delta_net": None, "gated_delta_net": "scalar", "kda": "vector"}


def loop(q, k, v, g, beta, scale, s0):
    """The rule as written (q, k, v [B, H, T, D]; g [B, H, T, Dk] log gates; beta [B, H, T])."""
    B, H, T, Dk = q.shape
    S = s0.clone()
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    for t in range(T):
        S = torch.exp(g[:, :, t])[..., None] * S
        for b in range(B):
            for h in range(H):
                kt, vt = k[b, h, t], v[b, h, t]
                S[b, h] = S[b, h] + beta[b, h, t] * torch.outer(kt, vt - kt @ S[b, h])
        out[:, :, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return out, S


def rate_and_gates(name, H, T, Dk, gen):
    """The call-time inputs of a delta pattern over H (value) heads: beta in (0, 2) (negative eigenvalues
    too) and, per ``GATES``, log gates per token or per key channel."""
    inputs = {"beta": 2 * torch.rand(H, T, generator=gen, dtype=F64)}
    if GATES[name] == "scalar":
        inputs["g"] = F.logsigmoid(torch.randn(H, T, generator=gen, dtype=F64) + 2)
    elif GATES[name] == "vector":
        inputs["g"] = F.logsigmoid(torch.randn(H, T, Dk, generator=gen, dtype=F64) + 2)
    return inputs


def case(name, B, H, T, Dk, Dv, seed, kv_heads=None):
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or H
    q = torch.randn(B, H, T, Dk, generator=g, dtype=F64)
    k = F.normalize(torch.randn(B, kv_heads, T, Dk, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, kv_heads, T, Dv, generator=g, dtype=F64)
    inputs = rate_and_gates(name, H, T, Dk, g)
    s0 = torch.randn(B, H, Dk, Dv, generator=g, dtype=F64)
    return q, k, v, inputs, s0


def full_gates(name, inputs, B, H, T, Dk):
    if GATES[name] is None:
        return torch.zeros(B, H, T, Dk, dtype=F64)
    g = inputs["g"]
    return (g.unsqueeze(-1) if g.dim() == 2 else g).unsqueeze(0).expand(B, H, T, Dk)


@pytest.mark.parametrize("name", list(GATES))
def test_the_naive_reference_is_the_rule(name):
    q, k, v, inputs, s0 = case(name, 2, 2, 9, 4, 3, seed=1)
    out, state = attnc.compile_attention(f"stdlib:{name}", backend="reference")(
        q, k, v, initial_state=s0, return_state=True, scale=0.7, **inputs)
    want, want_state = loop(q, k, v, full_gates(name, inputs, 2, 2, 9, 4), inputs["beta"].expand(2, 2, 9), 0.7, s0)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, want_state, rtol=1e-12, atol=1e-12)


def _run(name, backend, q, k, v, inputs, s0, chunk=None):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, s0, *inputs.values())]
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, q_tile=chunk)
    out, state = attn(*leaves[:3], initial_state=leaves[3], return_state=True, **dict(zip(inputs, leaves[4:], strict=True)))
    weight = torch.sin(torch.arange(out.numel(), dtype=F64)).view_as(out)
    grads = torch.autograd.grad((out * weight).sum() + (state ** 2).sum(), leaves)
    return out, state, grads


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", ["gated_delta_net", "kda"])
def test_the_gate_gradient_under_strong_decay_keeps_float32_precision(name, backend):
    """Log gates in [-20, -15], float32: the gates' gradient (about 1e-6) was off by 42% on the Triton kernels (a
    token's own pair, which cancels exactly in q dq - k dk, summed into dq and dk first); within 1e-4 of the float64
    loop relative to its largest entry."""
    B, H, T, Dk = 1, 1, 192, 16
    q, k, v, inputs, _ = case(name, B, H, T, Dk, Dk, seed=11)
    gen = torch.Generator().manual_seed(12)
    inputs["g"] = -20 + 5 * torch.rand(inputs["g"].shape, generator=gen, dtype=F64)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    g32, beta32 = inputs["g"].float().requires_grad_(), inputs["beta"].float()
    out = attnc.compile_attention(f"stdlib:{name}", backend=backend)(q32, k32, v32, g=g32, beta=beta32)
    w = torch.randn(out.shape, generator=gen, dtype=F64)
    (dg,) = torch.autograd.grad((out.double() * w).sum(), [g32])
    g64 = g32.detach().double().requires_grad_()
    want, _ = loop(q32.double(), k32.double(), v32.double(), full_gates(name, {"g": g64}, B, H, T, Dk),
                   beta32.double().expand(B, H, T), Dk**-0.5, torch.zeros(B, H, Dk, Dk, dtype=F64))
    (dg_want,) = torch.autograd.grad((want * w).sum(), [g64])
    assert dg_want.abs().max() < 1e-4  # the case: a gradient far below the others' size
    assert (dg.double() - dg_want).abs().max() / dg_want.abs().max() < 1e-4


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(list(GATES)), T=st.integers(1, 40), chunk=st.sampled_from([16, 32, 64]),
       gqa=st.booleans(), seed=st.integers(0, 2**16))
def test_chunked_equals_naive_forward_state_and_every_gradient(name, T, chunk, gqa, seed):
    q, k, v, inputs, s0 = case(name, 2, 2, T, 4, 3, seed, kv_heads=1 if gqa else None)
    want = _run(name, "reference", q, k, v, inputs, s0)
    got = _run(name, "cpu", q, k, v, inputs, s0, chunk)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=1e-10, atol=1e-10)
    for a, b in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(GATES))
def test_decoding_continues_a_prefix(name):
    q, k, v, inputs, _ = case(name, 1, 2, 12, 4, 3, seed=3)
    attn = attnc.compile_attention(f"stdlib:{name}", backend="cpu")
    full = attn(q, k, v, **inputs)
    part = {n: t[:, :8] for n, t in inputs.items()}
    _, state = attn(q[:, :, :8], k[:, :, :8], v[:, :, :8], return_state=True, **part)
    for t in range(8, 12):
        o, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, **{n: x[:, t:t + 1] for n, x in inputs.items()})
        torch.testing.assert_close(o, full[:, :, t], rtol=1e-12, atol=1e-12)


def test_packed_sequences_equal_separate_calls():
    q, k, v, inputs, _ = case("gated_delta_net", 1, 2, 20, 4, 3, seed=4)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    cu = torch.tensor([0, 7, 20])
    packed = attn(q, k, v, cu_seqlens=cu, **inputs)
    for a, b in ((0, 7), (7, 20)):
        alone = attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **{n: t[:, a:b] for n, t in inputs.items()})
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-12, atol=1e-12)


def test_bad_input_names_the_argument():
    q, k, v, inputs, _ = case("gated_delta_net", 1, 2, 8, 4, 3, seed=5)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu")
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k, v, g=inputs["g"], beta=inputs["beta"][:, :5])
    assert err.value.where == "argument beta"
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k, v, g=inputs["g"].unsqueeze(-1).expand(2, 8, 4), beta=inputs["beta"])
    assert err.value.where == "argument g"
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k, v, initial_state=torch.zeros(1, 2, 4, 4, dtype=F64), **inputs)
    assert err.value.where == "argument initial_state"
    with pytest.raises(attnc.SpecError, match="finite or -inf") as err:
        attn(q, k, v, g=inputs["g"].index_fill(1, torch.tensor([3]), float("nan")), beta=inputs["beta"])
    assert err.value.where == "argument g"


def test_language_refuses_misplaced_or_malformed_updates():
    with pytest.raises(attnc.SpecError, match="unknown update rule 'delt'"):
        attnc.load("recurrence r\n  input beta: float[heads, n]\n  update delt(beta)\n")
    with pytest.raises(attnc.SpecError, match="must be an input of shape float\\[heads, n\\]"):
        attnc.load("recurrence r\n  input beta: float[heads, n, dk]\n  update delta(beta)\n")
    with pytest.raises(attnc.SpecError, match="'update' is a recurrence's clause"):
        attnc.load("pattern p\n  input beta: float[heads, n]\n  mask causal\n  update delta(beta)\n")
    rec = attnc.load("stdlib:gated_delta_net")
    assert (rec.rule, rec.beta, rec.gate) == ("delta", "beta", "scalar")
    assert rec.key() != attnc.load("stdlib:mamba2").key()


def test_compiles_fullgraph_and_matches_eager():
    """Under torch.compile the delta rule runs as the attnc::recurrence custom op (its backward the
    registered formula): outputs, final state and gradients equal eager."""
    q, k, v, inputs, s0 = case("gated_delta_net", 1, 2, 21, 4, 3, seed=6)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="cpu", q_tile=16)

    def f(q, k, v, g, beta, s0):
        return attn(q, k, v, g=g, beta=beta, initial_state=s0, return_state=True)

    leaves = [t.clone().requires_grad_() for t in (q, k, v, inputs["g"], inputs["beta"], s0)]
    eager = f(*leaves)
    want = torch.autograd.grad(eager[0].sum() + eager[1].pow(2).sum(), leaves)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        got_out = torch.compile(f, fullgraph=True)(*leaves)
        got = torch.autograd.grad(got_out[0].sum() + got_out[1].pow(2).sum(), leaves)
    torch.testing.assert_close(got_out[0], eager[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_out[1], eager[1], rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _fla_naive(folder: str):
    """flash-linear-attention's own torch reference module ``fla/ops/FOLDER/naive.py`` (fla-core is a
    test dependency; its package __init__ needs a GPU Triton, so the file is loaded alone)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("fla")
    assert spec is not None, "fla-core is a test dependency (pyproject [test])"
    path = Path(next(iter(spec.submodule_search_locations))) / "ops" / folder / "naive.py"
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{folder}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", list(GATES))
def test_the_reference_equals_flash_linear_attention_naive(name):
    """attnc's reference against fla's naive recurrences (float32, as fla computes them): outputs and
    final state, with an initial state; fla's layout is [B, T, H, D]."""
    q, k, v, inputs, s0 = case(name, 2, 2, 11, 4, 3, seed=7)
    q, k, v, s0 = (t.float() for t in (q, k, v, s0))
    inputs = {n: t.float() for n, t in inputs.items()}
    out, state = attnc.compile_attention(f"stdlib:{name}", backend="reference")(
        q, k, v, initial_state=s0, return_state=True, **inputs)
    beta = inputs["beta"].unsqueeze(0).expand(2, 2, 11)
    if name == "delta_net":
        want, want_state = _fla_naive("delta_rule").delta_rule_recurrence(q, k, v, beta, s0, True)
    else:
        bthd = lambda t: t.transpose(1, 2)  # noqa: E731
        if name == "gated_delta_net":
            fn = _fla_naive("gated_delta_rule").naive_recurrent_gated_delta_rule
            g = inputs["g"].unsqueeze(0).expand(2, 2, 11)
            want, want_state = fn(bthd(q), bthd(k), bthd(v), bthd(beta), bthd(g), None, s0, True)
        else:
            fn = _fla_naive("kda").naive_recurrent_kda
            g = inputs["g"].unsqueeze(0).expand(2, 2, 11, 4)
            want, want_state = fn(bthd(q), bthd(k), bthd(v), bthd(g), bthd(beta), None, s0, True)
        want = bthd(want)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------- gates that are no log decays
#: every path a delta-rule call takes: the token-by-token reference, the chunked torch form, the Triton
#: kernels (interpreted on CPU tensors) and the decoding step
PATHS = ("reference", "cpu", "triton", "step")


def _gate_error(path, spec, q, k, v, inputs) -> attnc.SpecError:
    """The SpecError ``path`` raises for these inputs (the step decodes the last token alone)."""
    attn = attnc.compile_attention(spec, backend="cpu" if path == "step" else path)
    with pytest.raises(attnc.SpecError) as err:
        if path == "step":
            attn.step(q[:, :, -1], k[:, :, -1], v[:, :, -1], None, **{n: t[:, -1:] for n, t in inputs.items()})
        else:
            attn(q, k, v, **inputs)
    return err.value


@pytest.mark.parametrize("name", ["gated_delta_net", "kda"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3.0, 1e-30])
def test_a_gate_that_is_no_log_decay_is_the_same_error_on_every_path(name, bad):
    """NaN, +inf and positive gates (log decays are <= 0, the published rules' g) are refused by every path
    with one error naming the gate (the reference loop and the step returned NaN for NaN and +inf; the
    chunked form was off by orders of magnitude for positive gates)."""
    q, k, v, inputs, _ = case(name, 1, 2, 20, 4, 3, seed=8)
    g = inputs["g"].clone()
    g[(1, -1) if g.dim() == 2 else (1, -1, 2)] = bad  # the last token: the step decodes it
    inputs["g"] = g
    errors = [_gate_error(path, f"stdlib:{name}", q, k, v, inputs) for path in PATHS]
    for err in errors:
        assert err.where == "argument g"
        assert "the delta rule's gates are log decays: each must be finite or -inf" in err.message
        assert "<= 0" in err.message and f"g is {bad!r}" in err.message
    assert len({e.message.split(";")[0] for e in errors}) == 1


def test_the_issue_case_positive_gates_refused_zero_gates_follow_the_rule():
    """dk = 1, k = 1, beta = 1: the rule gives o_t = v_t whatever the gate. g = 3.0 over 40 tokens is
    refused (the chunked form was off by ~1e35); g = 0 and a hard reset (-inf) follow the rule on every
    backend, exactly."""
    T = 40
    q, k = torch.ones(1, 1, T, 1, dtype=F64), torch.ones(1, 1, T, 1, dtype=F64)
    v = torch.randn(1, 1, T, 1, generator=torch.Generator().manual_seed(9), dtype=F64)
    beta = torch.ones(1, T, dtype=F64)
    for path in PATHS:
        err = _gate_error(path, "stdlib:gated_delta_net", q, k, v, {"g": torch.full((1, T), 3.0, dtype=F64),
                                                                     "beta": beta})
        assert err.where == "argument g", path
    g = torch.zeros(1, T, dtype=F64)
    g[0, 17] = -torch.inf
    for backend in ("reference", "cpu", "triton"):
        out = attnc.compile_attention("stdlib:gated_delta_net", backend=backend)(q, k, v, g=g, beta=beta, scale=1.0)
        torch.testing.assert_close(out, v, rtol=1e-12, atol=1e-12, msg=backend)


def test_a_positive_constant_decay_is_refused_naming_the_decay():
    """A head gate (a constant per head) under the delta rule: positive on head 0, refused by every path,
    naming the decay clause; a log decay <= 0 on every head runs and equals the loop."""
    q, k, v, inputs, s0 = case("delta_net", 1, 2, 12, 4, 3, seed=10)
    bad = "recurrence r\n  input beta: float[heads, n]\n  decay 0.5 - h\n  update delta(beta)\n"
    errors = [_gate_error(path, bad, q, k, v, inputs) for path in PATHS]
    for err in errors:
        assert err.where == "decay" and "log decays" in err.message and "at h = 0" in err.message
    good = attnc.load("recurrence r\n  input beta: float[heads, n]\n  decay -0.5 - h\n  update delta(beta)\n")
    gates = torch.tensor([-0.5, -1.5], dtype=F64).view(1, 2, 1, 1).expand(1, 2, 12, 4)
    want, _ = loop(q, k, v, gates, inputs["beta"].expand(1, 2, 12), 0.5, s0)
    for backend in ("reference", "cpu", "triton"):
        out = attnc.compile_attention(good, backend=backend)(q, k, v, initial_state=s0, scale=0.5, **inputs)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=backend)


@pytest.mark.parametrize("name", ["gated_delta_net", "kda"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("big", [-1e4, -1e6])
def test_a_gate_far_below_underflow_keeps_float32_at_its_rounding(name, backend, big):
    # a float32 sum of the gates with -1e6 in it took the decays after it to its rounding: 0.02-0.06 off, in the
    # gradients too (the rule as written, in float64, is the reference)
    q, k, v, inputs, s0 = case(name, 1, 2, 24, 4, 3, seed=7)
    g = inputs["g"].clone()
    g[0, 5] = big
    inputs = {**inputs, "g": g}
    B, H, T, Dk = q.shape
    want, want_state = loop(q, k, v, full_gates(name, inputs, B, H, T, Dk), inputs["beta"].expand(B, H, T), 0.5, s0)
    leaves = [t.float().requires_grad_() for t in (q, k, v, s0, inputs["g"], inputs["beta"])]
    out, state = attnc.compile_attention(f"stdlib:{name}", backend=backend)(
        *leaves[:3], initial_state=leaves[3], return_state=True, scale=0.5, g=leaves[4], beta=leaves[5])
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(state.double(), want_state, rtol=2e-5, atol=2e-5)
    # gradients: the reference backend (the rule's loop, checked against it above) in float64
    ref = [t.clone().requires_grad_() for t in (q, k, v, s0, inputs["g"], inputs["beta"])]
    ref_out = attnc.compile_attention(f"stdlib:{name}", backend="reference")(
        *ref[:3], initial_state=ref[3], scale=0.5, g=ref[4], beta=ref[5])
    torch.testing.assert_close(ref_out, want, rtol=1e-12, atol=1e-12)
    weight = torch.sin(torch.arange(out.numel(), dtype=F64)).view_as(out)
    got = torch.autograd.grad((out.double() * weight).sum(), leaves)
    expect = torch.autograd.grad((ref_out * weight).sum(), ref)
    for a, b in zip(got, expect, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
