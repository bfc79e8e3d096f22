"""Chunked recurrences (issue 6): the chunked torch path and the Triton kernels (interpreter on CPU)
against an independent naive loop in float64 (outputs, final state, gradients of q, k, v, gates and the
initial state), extreme gates without NaN/inf, decoding steps, GQA, and the recurrence simulator."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.recurrence_cost import best_chunk, chunk_cost, crossover, softmax_causal

F64 = torch.float64
SPECS = {
    "retention": "stdlib:retention",
    "lightning": "stdlib:lightning",
    "mamba2": "stdlib:mamba2",
    "gla": "stdlib:gla",
}
GATE = {"retention": "head", "lightning": "head", "mamba2": "scalar", "gla": "vector"}


# ----------------------------------------------------------------- independent references
def alibi_slopes(H: int) -> list[float]:
    """ALiBi's get_slopes (also Lightning Attention's _build_slope_tensor), written from the rule."""
    def power_of_2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(H).is_integer():
        return power_of_2(H)
    c = 2 ** math.floor(math.log2(H))
    return power_of_2(c) + alibi_slopes(2 * c)[0::2][: H - c]


def head_log_decay(name: str, H: int) -> torch.Tensor:
    if name == "retention":
        return torch.tensor([math.log(1 - 2.0 ** (-5 - h)) for h in range(H)], dtype=F64)
    return -torch.tensor(alibi_slopes(H), dtype=F64)


def naive(q, k, v, g4, scale, S0):
    """The step-by-step loop in float64: g4 [B, H, T, Dk] log gates; k, v with Hkv heads (GQA)."""
    B, H, T, Dk = q.shape
    rep = torch.arange(H) // (H // k.shape[1])
    k, v = k[:, rep].to(F64), v[:, rep].to(F64)
    q = q.to(F64)
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=F64) if S0 is None else S0.to(F64)
    outs = []
    for t in range(T):
        S = torch.exp(g4[:, :, t]).unsqueeze(-1) * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append(scale * (q[:, :, t].unsqueeze(-2) @ S).squeeze(-2))
    out = torch.stack(outs, 2) if outs else torch.zeros(B, H, 0, v.shape[-1], dtype=F64)
    return out, S


def full_gates(name, gates, B, H, T, Dk):
    """The gates of a call as [B, H, T, Dk] float64 (differentiable in ``gates``)."""
    if GATE[name] == "head":
        return head_log_decay(name, H).view(1, H, 1, 1).expand(B, H, T, Dk)
    g = gates.to(F64)
    if GATE[name] == "scalar":
        g = g.unsqueeze(-1)
    if g.dim() == 3:
        g = g.unsqueeze(0)
    return g.expand(B, H, T, Dk)


def make(name, B, H, Hkv, T, Dk, Dv, *, seed=0, lo=-3.0, hi=0.0, dtype=F64, batched_gates=False, state=True):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).requires_grad_()

    q, k, v = rnd(B, H, T, Dk), rnd(B, Hkv, T, Dk), rnd(B, Hkv, T, Dv)
    S0 = rnd(B, H, Dk, Dv) if state else None
    gates = {}
    if GATE[name] != "head":
        shape = (H, T) if GATE[name] == "scalar" else (H, T, Dk)
        if batched_gates:
            shape = (B, *shape)
        g = lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=F64)
        gates["g"] = g.to(dtype).requires_grad_()
    return q, k, v, S0, gates


def leaves(q, k, v, S0, gates):
    return [t for t in (q, k, v, S0, gates.get("g")) if t is not None]


def check_against_loop(name, backend, B, H, Hkv, T, Dk, Dv, *, chunk=None, seed=0, lo=-3.0, hi=0.0, scale=None,
                       batched_gates=False, state=True, tol=1e-9):
    q, k, v, S0, gates = make(name, B, H, Hkv, T, Dk, Dv, seed=seed, lo=lo, hi=hi, batched_gates=batched_gates,
                              state=state)
    attn = attnc.compile_attention(SPECS[name], backend=backend, q_tile=chunk)
    out, fin = attn(q, k, v, initial_state=S0, return_state=True, scale=scale, **gates)
    sc = Dk**-0.5 if scale is None else scale
    want, want_fin = naive(q, k, v, full_gates(name, gates.get("g"), B, H, T, Dk), sc, S0)
    assert out.shape == (B, H, T, Dv) and fin.shape == (B, H, Dk, Dv)
    assert torch.isfinite(out).all() and torch.isfinite(fin).all()
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    torch.testing.assert_close(fin, want_fin, rtol=tol, atol=tol)
    gen = torch.Generator().manual_seed(seed + 100)
    w1 = torch.randn(out.shape, generator=gen, dtype=F64)
    w2 = torch.randn(fin.shape, generator=gen, dtype=F64)
    ts = leaves(q, k, v, S0, gates)
    got = torch.autograd.grad((out * w1).sum() + (fin * w2).sum(), ts)
    exp = torch.autograd.grad((want * w1).sum() + (want_fin * w2).sum(), ts)
    for a, b in zip(got, exp, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=tol * 10, atol=tol * 10)
    return attn


# ----------------------------------------------------------------- chunked torch path
def test_lightning_slopes_for_a_head_count_that_is_not_a_power_of_two():
    # 6 heads: the ALiBi rule for non-powers of two (slopes of 4 heads, then every other of 8)
    check_against_loop("lightning", "cpu", 1, 6, 3, 40, 4, 4, chunk=16, seed=3)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_cpu_chunked_matches_loop(name, chunk):
    # 75 tokens: not a multiple of any chunk; GQA 4 query heads on 2 kv heads; Dk != Dv
    attn = check_against_loop(name, "cpu", 2, 4, 2, 75, 6, 5, chunk=chunk, seed=chunk)
    assert attn._last_call["q_tile"] == chunk


@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_cpu_batched_gates_scale_and_no_initial_state(name):
    check_against_loop(name, "cpu", 2, 2, 2, 40, 4, 3, chunk=16, seed=3, scale=0.7, batched_gates=True,
                       state=False)


def test_gate_gradient_without_final_state_use():
    # only the output is used: the final-state term of the gate gradient must vanish
    q, k, v, S0, gates = make("gla", 1, 2, 2, 37, 4, 4, seed=9)
    out = attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=16)(q, k, v, initial_state=S0, **gates)
    want, _ = naive(q, k, v, full_gates("gla", gates["g"], 1, 2, 37, 4), 0.5, S0)
    ts = leaves(q, k, v, S0, gates)
    for a, b in zip(torch.autograd.grad(out.square().sum(), ts), torch.autograd.grad(want.square().sum(), ts),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(["mamba2", "gla", "retention"]),
    T=st.integers(1, 70),
    chunk=st.sampled_from([16, 32, 64]),
    lo=st.sampled_from([-1e-4, -0.1, -2.0, -30.0]),
    near_zero=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_gate_magnitudes_and_lengths(name, T, chunk, lo, near_zero, seed):
    # log gates uniform in [lo, hi]: from near 0 (no decay) down to -30 per step (everything forgotten)
    hi = -1e-6 if near_zero else lo / 2
    check_against_loop(name, "cpu", 1, 2, 1, T, 3, 2, chunk=chunk, seed=seed, lo=lo, hi=hi)


def test_mixed_extreme_gates_float32_finite_and_accurate():
    # alternating -30 and ~0 gates in fp32: exponents are in-chunk sums, never a difference of large sums
    B, H, T, D = 1, 2, 130, 8
    gen = torch.Generator().manual_seed(4)
    g = torch.where(torch.rand(H, T, D, generator=gen) < 0.5, torch.full((H, T, D), -30.0),
                    -1e-3 * torch.rand(H, T, D, generator=gen))
    q, k, v = (torch.randn(B, H, T, D, generator=gen) for _ in range(3))
    S0 = torch.randn(B, H, D, D, generator=gen)
    for backend in ("cpu", "triton"):
        for t in (q, k, v, S0, g):
            t.requires_grad_(True)
        out, fin = attnc.compile_attention("stdlib:gla", backend=backend)(q, k, v, g=g, initial_state=S0,
                                                                           return_state=True)
        assert out.dtype == torch.float32 and fin.dtype == torch.float32
        want, want_fin = naive(q.double(), k.double(), v.double(), g.double().unsqueeze(0), D**-0.5, S0.double())
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fin.double(), want_fin, rtol=1e-4, atol=1e-4)
        grads = torch.autograd.grad(out.sum() + fin.sum(), (q, k, v, S0, g))
        assert all(torch.isfinite(x).all() for x in grads)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_the_gate_gradient_under_strong_decay_keeps_float32_precision(name, backend):
    """Log gates in [-20, -15] (everything but the last token forgotten), float32: the gates' gradient is small
    (1e-6) and was off by its own size on the chunked paths (a token's own pair summed into dq and dk, where it
    cancels exactly in q dq - k dk, left its rounding as the whole gradient); now within 1e-4 of the float64 loop
    relative to its largest entry, as every other gradient is."""
    B, H, T, D = 1, 1, 256, 16
    q, k, v, _, gates = make(name, B, H, H, T, D, D, seed=9, lo=-20.0, hi=-15.0, dtype=torch.float32, state=False)
    attn = attnc.compile_attention(SPECS[name], backend=backend)
    out = attn(q, k, v, **gates)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(10), dtype=F64)
    (dg,) = torch.autograd.grad((out.double() * w).sum(), [gates["g"]])
    g64 = gates["g"].detach().double().requires_grad_()
    want, _ = naive(q.detach().double(), k.detach().double(), v.detach().double(), full_gates(name, g64, B, H, T, D),
                    D**-0.5, None)
    (dg_want,) = torch.autograd.grad((want * w).sum(), [g64])
    assert dg_want.abs().max() < 1e-4  # the case: a gradient far below the others' size
    assert (dg.double() - dg_want).abs().max() / dg_want.abs().max() < 1e-4


def test_bfloat16_inputs():
    q, k, v, _, gates = make("mamba2", 1, 2, 2, 50, 8, 8, seed=5, dtype=torch.bfloat16, state=False)
    out = attnc.compile_attention("stdlib:mamba2", backend="cpu")(q, k, v, **gates)
    assert out.dtype == torch.bfloat16
    want, _ = naive(q, k, v, full_gates("mamba2", gates["g"], 1, 2, 50, 8), 8**-0.5, None)
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)


def test_backward_memory_is_linear_in_tokens():
    # saved for backward: q, k, v, g (O(T D)) and one state per chunk (O(T/C D^2)) -- never [T, T]
    B, H, T, D, C = 1, 1, 512, 8, 16
    q, k, v, S0, gates = make("gla", B, H, H, T, D, D, seed=6, dtype=torch.float32)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=C)(q, k, v, initial_state=S0, **gates)
    assert sum(saved) <= 8 * T * D + (T // C + 2) * D * D
    assert max(saved) < T * C  # no [T, T] (or [T, C, D]) tensor kept


# ----------------------------------------------------------------- Triton kernels (interpreter)
@pytest.mark.versions
@pytest.mark.parametrize("name", list(SPECS))
def test_triton_matches_loop(name):
    # 37 tokens (not a multiple of 16 or 32), GQA, Dk != Dv, chunk 32 (vector gates run chunks of
    # VECTOR_CHUNK, factorised into sub-chunks)
    from attnc.runtime.recurrences.decay.triton import VECTOR_CHUNK

    attn = check_against_loop(name, "triton", 1, 4, 2, 37, 5, 20, chunk=32, seed=11)
    assert attn._last_call["q_tile"] == (VECTOR_CHUNK if name == "gla" else 32)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(["mamba2", "gla"]), T=st.integers(1, 40), lo=st.sampled_from([-1e-3, -1.0, -30.0]),
       seed=st.integers(0, 2**16))
def test_hypothesis_triton(name, T, lo, seed):
    check_against_loop(name, "triton", 1, 1, 1, T, 4, 3, chunk=16, seed=seed, lo=lo, hi=lo / 3)



@pytest.fixture
def small_blocks(monkeypatch):
    """Dk / Dv blocks of 16, so the kernels' loops over Dk and Dv blocks and the state pass's block grid run
    more than once at D = 32 (the GPU uses blocks of 64)."""
    from attnc.runtime.recurrences.decay import triton as triton_recurrence

    monkeypatch.setattr(triton_recurrence, "MAX_BLOCK", 16)
    monkeypatch.setattr(triton_recurrence, "VECTOR_BLOCK", 16)


@pytest.mark.versions
@pytest.mark.parametrize("name", ["retention", "mamba2", "gla"])
def test_triton_blocked_kernels_match_loop_float64(name, small_blocks):
    # two Dk and two Dv blocks, GQA (2 query heads on 1 kv head), 40 tokens in chunks of 32 (16 for GLA),
    # an initial state: every output, the final state and all gradients against the float64 loop
    check_against_loop(name, "triton", 1, 2, 1, 40, 32, 32, chunk=32, seed=21)


def _bf16_case(name, chunk, T=40, lo=-1.0, hi=0.0):
    """bf16 inputs through the Triton kernels against the same (bf16-rounded) inputs in float64."""
    B, H, Hkv, D = 1, 2, 1, 32
    q, k, v, S0, gates = make(name, B, H, Hkv, T, D, D, seed=23, dtype=torch.bfloat16, lo=lo, hi=hi)
    attn = attnc.compile_attention(SPECS[name], backend="triton", q_tile=chunk)
    out, fin = attn(q, k, v, initial_state=S0, return_state=True, **gates)
    assert out.dtype == torch.bfloat16 and fin.dtype == torch.float32
    want, want_fin = naive(q, k, v, full_gates(name, gates.get("g"), B, H, T, D), D**-0.5, S0)
    ts = leaves(q, k, v, S0, gates)
    gen = torch.Generator().manual_seed(24)
    w1, w2 = torch.randn(out.shape, generator=gen, dtype=F64), torch.randn(fin.shape, generator=gen, dtype=F64)
    got = torch.autograd.grad((out.double() * w1).sum() + (fin.double() * w2).sum(), ts)
    exp = torch.autograd.grad((want * w1).sum() + (want_fin * w2).sum(), ts)
    return [(out, want), (fin, want_fin), *zip(got, exp, strict=True)]


def _assert_bf16_close(cases, what):
    # bf16 operands on the tensor cores with fp32 accumulation: errors of a few bf16 ulps of each
    # result's scale (bf16 has 8 bits: eps 7.8e-3)
    for got, want in cases:
        assert torch.isfinite(got).all()
        err = float((got.double() - want).abs().max().detach())
        assert err <= 2e-2 * max(1.0, float(want.abs().max())), (what, err)


@pytest.mark.versions
@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_triton_bfloat16_matches_float64_loop(name, small_blocks):
    # GQA and an initial state
    _assert_bf16_close(_bf16_case(name, 32), name)


# log gates per step: strong decay (an off-diagonal sub-chunk block's rescaling factors underflow to 0,
# never overflow), weak decay (factors near 1: the product leans on the dots' accuracy), and both mixed
# across channels and steps
DECAYS = {"strong": (-10.0, -5.0), "weak": (-0.05, 0.0), "mixed": (-10.0, 0.0)}


@pytest.mark.versions
@pytest.mark.parametrize("decay", list(DECAYS))
@pytest.mark.parametrize("D", [16, 32])
def test_triton_gla_sub_chunk_factorisation_matches_float64_loop(decay, D, small_blocks):
    # 150 tokens: two full chunks of VECTOR_CHUNK and a partial one, each in sub-chunks (off-diagonal blocks
    # as dots, diagonal ones exact); D = 32 runs two Dk blocks; GQA and an initial state; forward, final state
    # and every gradient (q, k, v, gates, initial state) against the float64 loop at 1e-9
    from attnc.runtime.recurrences.decay.triton import VECTOR_CHUNK, VECTOR_SUB_CHUNK

    assert VECTOR_CHUNK >= 2 * VECTOR_SUB_CHUNK and 150 > 2 * VECTOR_CHUNK
    lo, hi = DECAYS[decay]
    check_against_loop("gla", "triton", 1, 2, 1, 150, D, D, seed=31 + D, lo=lo, hi=hi)


@pytest.mark.parametrize("decay", list(DECAYS))
def test_triton_gla_bfloat16_sub_chunks_match_float64_loop(decay, small_blocks):
    # bf16 through the factorised in-chunk product: the rescaled q and k are rounded to bf16 for the dots
    lo, hi = DECAYS[decay]
    _assert_bf16_close(_bf16_case("gla", None, T=150, lo=lo, hi=hi), decay)


@pytest.mark.parametrize("name", ["lightning", "mamba2", "gla"])
def test_cpu_and_triton_paths_agree_in_float32(name):
    q, k, v, S0, gates = make(name, 2, 2, 1, 45, 8, 8, seed=12, dtype=torch.float32)
    outs = []
    for backend in ("cpu", "triton"):
        attn = attnc.compile_attention(SPECS[name], backend=backend, q_tile=16)
        out, fin = attn(q, k, v, initial_state=S0, return_state=True, **gates)
        ts = leaves(q, k, v, S0, gates)
        outs.append((out, fin, *torch.autograd.grad(out.sum() + 0.5 * fin.sum(), ts)))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_triton_source_and_softmax_backend_errors():
    attn = attnc.compile_attention("stdlib:mamba2", backend="triton")
    src = attn.source
    assert all(f"def {name}(" in src for name in ("_state_kernel", "_out_kernel", "_bwd_dv_kernel", "_bwd_dqk_kernel",
                                                  "_gate_grad_kernel"))
    assert "chunked recurrence 'mamba2' (scalar gate)" in src


# ----------------------------------------------------------------- auto backend
def test_auto_on_cpu_is_the_chunked_torch_path():
    q, k, v, S0, gates = make("mamba2", 1, 2, 2, 20, 4, 4, seed=13)
    auto = attnc.compile_attention("stdlib:mamba2")
    cpu = attnc.compile_attention("stdlib:mamba2", backend="cpu")
    a = auto(q, k, v, initial_state=S0, **gates)
    b = cpu(q, k, v, initial_state=S0, **gates)
    assert torch.equal(a, b)
    assert auto._last_call["q_tile"] in (16, 32, 64)


# ----------------------------------------------------------------- decoding
@pytest.mark.parametrize("name", list(SPECS))
def test_decoding_steps_reproduce_the_sequence(name):
    B, H, Hkv, T, Dk, Dv = 2, 4, 2, 23, 4, 3
    q, k, v, S0, gates = make(name, B, H, Hkv, T, Dk, Dv, seed=14, batched_gates=True)
    attn = attnc.compile_attention(SPECS[name], backend="cpu")
    full, fin = attn(q, k, v, initial_state=S0, return_state=True, **gates)
    # the first half by forward, the rest token by token from its final state
    half = 11
    gh = {n: g[:, :, :half] for n, g in gates.items()}
    _, state = attn(q[:, :, :half], k[:, :, :half], v[:, :, :half], initial_state=S0, return_state=True, **gh)
    outs = []
    for t in range(half, T):
        gt = {n: g[:, :, t : t + 1] for n, g in gates.items()}
        o, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, **gt)
        assert o.shape == (B, H, Dv)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 2), full[:, :, half:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, fin, rtol=1e-10, atol=1e-10)
    # 4-D one-token inputs, no state (zeros), differentiable
    gt = {n: g[:, :, :1] for n, g in gates.items()}
    o, s1 = attn.step(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, **gt)
    want, want_s = naive(q[:, :, :1], k[:, :, :1], v[:, :, :1],
                         full_gates(name, gates.get("g", torch.zeros(1))[:, :, :1] if gates else None, B, H, 1, Dk),
                         Dk**-0.5, None)
    torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, want_s, rtol=1e-12, atol=1e-12)
    (o.sum() + s1.sum()).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_step_errors_are_clean():
    attn = attnc.compile_attention("stdlib:mamba2", backend="cpu")
    x = torch.randn(1, 2, 4)
    with pytest.raises(attnc.SpecError, match="missing input 'g'"):
        attn.step(x, x, x)
    with pytest.raises(attnc.SpecError, match="state must be"):
        attn.step(x, x, x, torch.zeros(1, 2, 4, 5), g=torch.zeros(2, 1))
    with pytest.raises(attnc.SpecError, match="one token"):
        attn.step(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), g=torch.zeros(2, 3))
    with pytest.raises(attnc.SpecError, match="has shape"):
        attn.step(x, x, x, g=torch.zeros(3, 2, 2))
    with pytest.raises(attnc.SpecError, match="batch size 2 of input 'g' differs from q's 1"):
        attn.step(x, x, x, g=torch.zeros(2, 2))  # [B, H] without the token axis, for another batch
    with pytest.raises(attnc.SpecError, match="expected 3 dimensions"):
        attn.step(x, torch.randn(1, 2, 1, 4), x, g=torch.zeros(2, 1))
    with pytest.raises(attnc.SpecError, match="step\\(\\) is for recurrences"):
        attnc.compile_attention("stdlib:sliding_window", backend="reference").step(x, x, x)


def test_compile_errors_are_clean():
    with pytest.raises(attnc.SpecError, match="chunk size"):
        attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=48)
    with pytest.raises(attnc.SpecError, match="no KV tiles"):
        attnc.compile_attention("stdlib:gla", backend="cpu", kv_tile=16)
    with pytest.raises(attnc.SpecError, match="unknown or unavailable backend"):
        attnc.compile_attention("stdlib:gla", backend="cuda")


# ----------------------------------------------------------------- simulator
def test_simulator_report_fields_and_chunk_choice():
    rep = attnc.simulate("stdlib:gla", n=8192, heads=16, head_dim=128, hardware="h200")
    d = rep.to_dict()
    # the chunk is the candidate minimising forward + backward (checked below): with chunk-parallel kernels
    # the elementwise C^2 Dk work no longer runs inside the sequential pass, so it need not be 16
    assert d["kind"] == "recurrence" and d["gate"] == "vector" and d["chunk"] in (16, 32, 64)
    assert d["flops"]["forward"] > 0 and d["bytes"]["forward"] > 0 and d["flops"]["backward"] > d["flops"]["forward"]
    assert {c["chunk"] for c in d["candidates"]} == {16, 32, 64}
    best = min(d["candidates"], key=lambda c: c["forward_s"] + c["backward_s"])
    assert best["chunk"] == d["chunk"]
    forced = attnc.simulate("stdlib:retention", n=8192, heads=16, head_dim=128, q_tile=32)
    assert forced["chunk"] == 32 and forced["chunk_forced"] is True
    with pytest.raises(attnc.SpecError, match="no nk"):
        attnc.simulate("stdlib:retention", n=64, nk=64)


def test_simulator_flops_are_linear_and_softmax_quadratic():
    hw = get_hardware("h100")
    for gate in ("head", "vector"):
        a = chunk_cost(gate, 4096, 8, 64, 1, 32, hw)
        b = chunk_cost(gate, 8192, 8, 64, 1, 32, hw)
        assert b.forward_flops == pytest.approx(2 * a.forward_flops)
        assert b.forward_bytes == pytest.approx(2 * a.forward_bytes)
    # head gates, chunk C, Dk = Dv = D = BV (one value block at D = 64): per chunk 2C^2 D (q k^T) + 2C^2 D (A v)
    # + 4 C D^2 (inter-chunk and state update) + 3 C^2 (decay matrix)
    C, D, n = 32, 64, 4096
    want = 8 * (n // C) * (4 * C * C * D + 4 * C * D * D + 3 * C * C)
    assert chunk_cost("head", n, 8, D, 1, C, hw).forward_flops == pytest.approx(want)
    # per-channel gates, as the Triton kernels run them: chunks of 64 in sub-chunks of 16, per chunk one
    # whole-chunk dot for each sub-chunk after the first (the kernels' `for i in range(1, C // SUB)`:
    # 3 x 2C^2 D), 2C^2 D (A v), 4 C D^2, and the diagonal blocks 5 C 16 D
    C = 64
    want = 8 * (n // C) * (3 * 2 * C * C * D + 2 * C * C * D + 4 * C * D * D + 5 * C * 16 * D)
    assert chunk_cost("vector", n, 8, D, 1, C, hw).forward_flops == pytest.approx(want)
    from attnc.runtime.recurrences.decay.triton import VECTOR_CHUNK

    assert best_chunk("vector", n, 8, D, 1, hw).chunk == C == VECTOR_CHUNK
    s1, s2 = softmax_causal(16384, 8, 64, 1, hw), softmax_causal(32768, 8, 64, 1, hw)
    assert s2.forward.time_s > 3.5 * s1.forward.time_s


@pytest.mark.parametrize("hardware", ["a100", "h100", "b200"])
def test_crossover_exists_and_is_the_boundary(hardware):
    hw = get_hardware(hardware)
    for gate in ("head", "vector"):
        for D in (64, 128):
            n = crossover(gate, 8, D, 1, hw)
            assert n is not None and n % 64 == 0

            def faster(m, gate=gate, D=D):
                return best_chunk(gate, m, 8, D, 1, hw).forward_s < softmax_causal(m, 8, D, 1, hw).forward.time_s

            assert faster(n) and faster(2 * n) and faster(8 * n)
            if n > 64:
                assert not faster(n - 64)
    # per-channel gates (elementwise in-chunk work) need longer sequences than constant gates
    assert crossover("vector", 8, 128, 1, hw) > crossover("head", 8, 128, 1, hw)


def test_the_crossover_is_where_the_recurrence_stays_faster_not_a_first_win():
    """mamba2 with 8 heads, training (forward + backward) on H100: predicted faster at 320 tokens, slower again at
    640 (whole waves and chunk choices make the times non-monotone), faster from 704. The report said 320 (the
    first win of a bisection); the crossover is the length after the last one that loses."""
    hw = get_hardware("h100")

    def faster(m):
        rec, sm = best_chunk("scalar", m, 8, 128, 1, hw), softmax_causal(m, 8, 128, 1, hw)
        return rec.forward_s + rec.backward_s < sm.forward.time_s + sm.backward.time_s

    assert faster(320) and not faster(640)  # the non-monotone case itself
    n = attnc.simulate("stdlib:mamba2", n=4096, heads=8, hardware="h100")["crossover_n_training"]
    assert n == crossover("scalar", 8, 128, 1, hw, backward=True) and n % 64 == 0
    assert not faster(n - 64)
    assert all(faster(m) for m in range(n, 4 * n + 1, 64))


def test_simulate_report_agrees_with_crossover_and_cli(capsys):
    rep = attnc.simulate("stdlib:mamba2", n=4096, heads=8, head_dim=64, hardware="a100")
    assert rep["crossover_n"] == crossover("scalar", 8, 64, 1, get_hardware("a100"))
    assert rep["predicted_speedup"] == pytest.approx(rep["predicted"]["softmax_forward_s"] / rep["predicted"]["forward_s"])
    code = cli.main(["sim", "stdlib:mamba2", "--n", "4096", "--heads", "8", "--head-dim", "64", "--hardware", "a100"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"beats softmax from   {rep['crossover_n']:,} tokens" in out and "chunk size" in out and "FLOPs" in out
    code = cli.main(["sim", "stdlib:gla", "--n", "2048", "--q-tile", "32", "--json"])
    d = json.loads(capsys.readouterr().out)
    assert code == 0 and d["chunk"] == 32 and d["gate"] == "vector"
    code = cli.main(["sim", "stdlib:gla", "--n", "2048", "--q-tile", "24"])
    assert code == 1 and "chunk size" in capsys.readouterr().err


def test_report_after_a_call():
    attn = attnc.compile_attention("stdlib:retention", backend="cpu", q_tile=16)
    q = torch.randn(1, 2, 40, 8)
    attn(q, q, q)
    rep = attn.report(hardware="h100")
    assert rep["n"] == 40 and rep["heads"] == 2 and rep["head_dim"] == 8 and rep["chunk"] == 16


# ----------------------------------------------------------------- torch.compile, state arguments (issue 9)
class _RecModel(torch.nn.Module):
    """A projection, data-dependent Mamba2 gates, a Mamba2 and a RetNet recurrence with a carried state."""

    def __init__(self, backend, heads=2, dim=8):
        super().__init__()
        self.heads, self.dim = heads, dim
        self.proj = torch.nn.Linear(heads * dim, 3 * heads * dim + heads)
        self.mamba = attnc.compile_attention("stdlib:mamba2", backend=backend)
        self.ret = attnc.compile_attention("stdlib:retention", backend=backend, q_tile=16)

    def forward(self, x, s0):
        B, N, _ = x.shape
        h, d = self.heads, self.dim
        p = self.proj(x)
        q, k, v = (t.reshape(B, N, h, d).transpose(1, 2) for t in p[..., :3 * h * d].chunk(3, -1))
        g = torch.nn.functional.logsigmoid(p[..., 3 * h * d:]).transpose(1, 2)  # [B, H, N]
        a, state = self.mamba(q, k, v, g=g, initial_state=s0, return_state=True)
        b = self.ret(q, k, v)
        return (a + b).transpose(1, 2).reshape(B, N, -1), state


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_recurrence_compiles_fullgraph_and_matches_eager(backend):
    torch.manual_seed(0)
    T = 37 if backend == "cpu" else 20
    model = _RecModel(backend)
    x = torch.randn(2, T, 16, requires_grad=True)
    s0 = torch.randn(2, 2, 8, 8, requires_grad=True)
    w, ws = torch.randn(2, T, 16), torch.randn(2, 2, 8, 8)
    params = [x, s0, *model.parameters()]
    eager, e_state = model(x, s0)
    eager_grads = torch.autograd.grad((eager * w).sum() + (e_state * ws).sum(), params)
    # independent check of the eager model: the naive loop
    with torch.no_grad():
        p = model.proj(x)
        q, k, v = (t.reshape(2, T, 2, 8).transpose(1, 2).double() for t in p[..., :48].chunk(3, -1))
        g = torch.nn.functional.logsigmoid(p[..., 48:]).transpose(1, 2).double()
        a, st = naive(q, k, v, g.unsqueeze(-1).expand(2, 2, T, 8), 8 ** -0.5, s0.double())
        b, _ = naive(q, k, v, head_log_decay("retention", 2).view(1, 2, 1, 1).expand(2, 2, T, 8), 8 ** -0.5, None)
    torch.testing.assert_close(eager.double(), (a + b).transpose(1, 2).reshape(2, T, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(e_state.double(), st, atol=1e-5, rtol=1e-5)

    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = torch.compile(model, fullgraph=True)
        out, state = compiled(x, s0)
        grads = torch.autograd.grad((out * w).sum() + (state * ws).sum(), params)
    torch.testing.assert_close(out, eager, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(state, e_state, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_recurrence_op_registration_opcheck():
    from attnc.runtime.ops.recurrence import recurrence_op

    attn = attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=16)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(3))
    g = (-torch.rand(2, 9, 4, generator=gen, dtype=F64)).requires_grad_()
    s0 = torch.randn(1, 2, 4, 4, generator=gen, dtype=F64, requires_grad=True)
    args = (q, k, v, [g], s0, attn.runner.op_key, "g", "", 0.5)
    torch.library.opcheck(recurrence_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, state = recurrence_op(*args)
    ref_out, ref_state = attn(q, k, v, g=g, scale=0.5, initial_state=s0, return_state=True)
    assert torch.equal(out, ref_out) and torch.equal(state, ref_state)
    grads = torch.autograd.grad(out.sum() + state.sum(), (q, k, v, g, s0))
    ref = torch.autograd.grad(ref_out.sum() + ref_state.sum(), (q, k, v, g, s0))
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_states_are_refused(dtype):
    attn = attnc.compile_attention("stdlib:retention", backend="cpu")
    q = torch.randn(1, 2, 5, 4)
    bad = torch.ones(1, 2, 4, 4, dtype=dtype)
    with pytest.raises(attnc.SpecError, match="argument initial_state: .*floating-point"):
        attn(q, q, q, initial_state=bad)
    with pytest.raises(attnc.SpecError, match="argument state: .*floating-point"):
        attn.step(q[:, :, 0], q[:, :, 0], q[:, :, 0], bad)


def test_a_state_with_fewer_bits_than_q_is_refused_by_step_and_forward():
    """A float32 state in a float64 call would silently carry fewer bits: refused with the dtypes."""
    attn = attnc.compile_attention("stdlib:retention", backend="cpu")
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    low = torch.zeros(1, 2, 4, 4)
    with pytest.raises(attnc.SpecError, match="state is torch.float32 but q is torch.float64"):
        attn.step(q[:, :, 0], q[:, :, 0], q[:, :, 0], low)
    with pytest.raises(attnc.SpecError, match="initial_state is torch.float32 but q is torch.float64"):
        attn(q, q, q, initial_state=low)
    o, s = attn.step(q[:, :, 0], q[:, :, 0], q[:, :, 0], low.double())  # the state a float64 call returns
    assert s.dtype == torch.float64
