"""Titans' Triton kernels (``runtime.recurrences.titans.triton``) in Triton's interpreter: float64 outputs, final
state and every gradient (q, k, v, the initial state, the decay, theta and eta, with the final state's gradient
flowing in) against the paper's rule written as gradient descent and against the token loop, on random inputs,
lengths not a multiple of the chunk, GQA, with and without an initial state; hard resets; float32 and bf16
within their rounding; packed sequences; decoding after a Triton prefill; the cost model the chunk comes from."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_titans import SRC, by_gradient_descent, inputs

import attnc
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.recurrence_cost import best_chunk, titans_chunk_cost
from attnc.runtime.api import simulate_decode

pytest.importorskip("triton")

F64 = torch.float64


def run(backend, q, k, v, rates, s0, chunk=None, scale=0.5):
    """Output, final state and the gradients of every leaf (q, k, v, [s0], rates) of a loss that weighs every
    output differently and adds the squared final state (so its gradient flows in)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, *(() if s0 is None else (s0,)), *rates.values())]
    n0 = 3 if s0 is None else 4
    attn = attnc.compile_attention(SRC, backend=backend, q_tile=chunk)
    out, state = attn(*leaves[:3], scale=scale, initial_state=None if s0 is None else leaves[3], return_state=True,
                      **dict(zip(rates, leaves[n0:], strict=True)))
    weight = torch.sin(torch.arange(out.numel(), dtype=F64)).view_as(out).to(out.dtype)
    loss = (out * weight).sum() + (state.float() ** 2).sum()
    return out, state, torch.autograd.grad(loss, leaves)


def assert_all_close(got, want, tol):
    torch.testing.assert_close(got[0].to(F64), want[0].to(F64), rtol=tol, atol=tol)
    torch.testing.assert_close(got[1].to(F64), want[1].to(F64), rtol=tol, atol=tol)
    for i, (a, b) in enumerate(zip(got[2], want[2], strict=True)):
        torch.testing.assert_close(a.to(F64), b.to(F64), rtol=tol, atol=tol, msg=lambda m, i=i: f"gradient {i}: {m}")


@settings(max_examples=6, deadline=None)
@given(T=st.integers(1, 50), chunk=st.sampled_from([16, 32]), dims=st.sampled_from([(4, 5), (16, 8), (20, 24)]),
       gqa=st.booleans(), init=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_is_gradient_descent_with_momentum_and_its_gradients_are_the_loops(T, chunk, dims, gqa, init, seed):
    D, Dv = dims
    q, k, v, rates = inputs(B=1, H=2, Hkv=1 if gqa else 2, T=T, D=D, Dv=Dv, seed=seed)
    s0 = 0.3 * torch.randn(1, 2, 2 * D, Dv, generator=torch.Generator().manual_seed(seed), dtype=F64) if init else None
    want_out, want_state = by_gradient_descent(q, k, v, rates, 0.5, s0)
    got = run("triton", q, k, v, rates, s0, chunk)
    torch.testing.assert_close(got[0], want_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[1], want_state, rtol=1e-10, atol=1e-10)
    assert_all_close(got, run("reference", q, k, v, rates, s0), 1e-10)


@pytest.mark.versions
def test_chunk_chosen_by_the_cost_model_with_a_partial_chunk_gqa_and_initial_state():
    q, k, v, rates = inputs(B=2, H=4, Hkv=2, T=70, D=8, Dv=8, seed=3)
    s0 = 0.3 * torch.randn(2, 4, 16, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    attn = attnc.compile_attention(SRC, backend="triton")
    attn(q, k, v, **rates)
    want = best_chunk("scalar", 70, 4, 8, 2, get_hardware("h100"), nbytes=4, rule="titans").chunk
    assert attn._last_call["q_tile"] == want  # what the simulator predicts is what runs
    assert_all_close(run("triton", q, k, v, rates, s0), run("reference", q, k, v, rates, s0), 1e-10)


@pytest.mark.versions
def test_hard_resets_are_exact_and_their_gates_have_no_gradient():
    q, k, v, rates = inputs(B=1, H=3, Hkv=1, T=40, D=8, Dv=8, seed=5)
    a = rates["a"].clone()
    for h, t in ((0, 0), (0, 3), (1, 20), (2, 31), (2, 32), (2, 39)):  # a chunk's first and last tokens, twice in a row
        a[h, t] = float("-inf")
    rates = {**rates, "a": a}
    got, want = run("triton", q, k, v, rates, None, 16), run("reference", q, k, v, rates, None)
    assert_all_close(got, want, 1e-10)
    da = got[2][3]
    assert torch.isfinite(da).all() and (da[torch.isneginf(a)] == 0).all()


def test_strong_decays_and_learning_rates_stay_finite_and_exact():
    q, k, v, rates = inputs(B=1, H=2, Hkv=2, T=45, D=8, Dv=8, seed=6)
    rates = {"a": -30 * torch.rand(2, 45, dtype=F64, generator=torch.Generator().manual_seed(7)),
             "theta": 2 * rates["theta"], "eta": torch.full((2, 45), 1e-2, dtype=F64)}
    got, want = run("triton", q, k, v, rates, None, 32), run("reference", q, k, v, rates, None)
    assert_all_close(got, want, 1e-9)


@pytest.mark.parametrize("src", [SRC.replace("decay a", "decay -0.1 * (h + 1)").replace(
    "  input a: float[heads, n]\n", ""), SRC.replace("  decay a\n", "").replace("  input a: float[heads, n]\n", "")],
    ids=["head-decay", "no-decay"])
def test_a_constant_decay_or_none(src):
    q, k, v, rates = inputs(B=1, H=2, Hkv=2, T=21, D=4, Dv=4, seed=8)
    rates = {n: r for n, r in rates.items() if n != "a"}
    outs = [attnc.compile_attention(src, backend=b, q_tile=16)(q, k, v, **rates) for b in ("triton", "reference")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)


def test_float32_within_its_rounding():
    q, k, v, rates = inputs(B=1, H=2, Hkv=1, T=37, D=16, Dv=8, seed=9)
    want = run("reference", q, k, v, rates, None)
    got = run("triton", q.float(), k.float(), v.float(), {n: r.float() for n, r in rates.items()}, None, 16)
    assert got[0].dtype == torch.float32
    assert_all_close(got, want, 5e-5)


@pytest.mark.versions
def test_bf16_stays_bf16_within_its_rounding():
    """Output, state and every gradient within bf16's rounding of the float32 torch form (relative norms: the states
    enter the tensor-core dots, and are kept for the backward, in bf16)."""
    q, k, v, rates = inputs(B=1, H=2, Hkv=2, T=70, D=16, Dv=16, seed=10)
    k = torch.nn.functional.normalize(k, dim=-1)

    def run_in(backend, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [r.float().requires_grad_() for r in rates.values()]
        out, state = attnc.compile_attention(SRC, backend=backend)(*leaves[:3], scale=0.5, return_state=True,
                                                                   **dict(zip(rates, leaves[3:], strict=True)))
        weight = torch.sin(torch.arange(out.numel(), dtype=torch.float32)).view_as(out)
        ((out.float() * weight).sum() + (state.float() ** 2).sum()).backward()
        return out, [out.float(), state.float()] + [x.grad.float() for x in leaves]

    out, got = run_in("triton", torch.bfloat16)
    assert out.dtype == torch.bfloat16
    for i, (a, b) in enumerate(zip(got, run_in("cpu", torch.float32)[1], strict=True)):
        assert (a - b).norm() <= 2e-2 * b.norm(), i


def test_rates_per_batch_and_a_forced_chunk_of_64():
    """Gates, learning rates and momenta that differ per batch row ([B, H, n] inputs), chunks of 64."""
    q, k, v, rates = inputs(B=2, H=2, Hkv=1, T=70, D=8, Dv=8, seed=15)
    gen = torch.Generator().manual_seed(16)
    rates = {"a": torch.log1p(-0.3 * torch.rand(2, 2, 70, generator=gen, dtype=F64)),
             "theta": 0.8 * torch.rand(2, 2, 70, generator=gen, dtype=F64),
             "eta": 0.05 + 0.9 * torch.rand(2, 2, 70, generator=gen, dtype=F64)}
    s0 = 0.3 * torch.randn(2, 2, 16, 8, generator=gen, dtype=F64)
    assert_all_close(run("triton", q, k, v, rates, s0, 64), run("reference", q, k, v, rates, s0), 1e-10)


def test_packed_sequences_equal_separate_calls():
    q, k, v, rates = inputs(B=1, H=2, Hkv=2, T=30, D=8, Dv=8, seed=11)
    packed = attnc.compile_attention(SRC, backend="triton", q_tile=16)(q, k, v, cu_seqlens=torch.tensor([0, 7, 30]),
                                                                       **rates)
    for a, b in ((0, 7), (7, 30)):
        alone = attnc.compile_attention(SRC, backend="reference")(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                  **{n: r[:, a:b] for n, r in rates.items()})
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-10, atol=1e-10)


@pytest.mark.versions
def test_decoding_steps_continue_a_triton_prefill():
    q, k, v, rates = inputs(T=24, D=8, Dv=8, seed=12)
    attn = attnc.compile_attention(SRC, backend="triton", q_tile=16)
    _, state = attn(q[:, :, :17], k[:, :, :17], v[:, :, :17], return_state=True,
                    **{n: r[:, :17] for n, r in rates.items()})
    full = attnc.compile_attention(SRC, backend="reference")(q, k, v, **rates)
    for t in range(17, 24):
        o, state = attn.step(q[:, :, t], k[:, :, t], v[:, :, t], state, **{n: r[:, t:t + 1] for n, r in rates.items()})
        torch.testing.assert_close(o, full[:, :, t], rtol=1e-10, atol=1e-10)


def test_a_key_head_dim_over_the_limit_is_refused_naming_q():
    q, k, v, rates = inputs(B=1, H=1, Hkv=1, T=4, D=130, Dv=4, seed=13)
    with pytest.raises(attnc.SpecError, match="up to 128, got 130") as err:
        attnc.compile_attention(SRC, backend="triton")(q, k, v, **rates)
    assert "argument q" in str(err.value)


def test_source_shows_the_kernels():
    attn = attnc.compile_attention(SRC, backend="triton", q_tile=32)
    src = attn.source
    assert "Triton kernels, chunk 32" in src and "m_t = eta_t m_(t-1) + theta_t k_t^T u_t" in src
    for name in ("def _chunk_kernel", "def _state_fwd_kernel", "def _out_kernel", "def _state_bwd_kernel",
                 "def _bwd_dqk_kernel", "def _bwd_gates_kernel", "def _chunk_decays",
                 "def value_block", "def unit_lower_inverse"):  # the shared helpers it calls too
        assert name in src


def test_simulate_reports_the_kernels_cost():
    rep = attnc.simulate("stdlib:titans", n=4096, heads=8, head_dim=64, hardware="h100")
    d = rep.to_dict()
    assert (d["kind"], d["gate"], d["rule"]) == ("recurrence", "scalar", "titans")
    want = titans_chunk_cost("scalar", 4096, 8, 64, 1, d["chunk"], get_hardware("h100"))
    assert d["flops"] == {"forward": want.forward_flops, "backward": want.backward_flops}
    # chosen of 16 and 32: chunks of 64 spill registers (offline compile check), so they are only run when forced
    chosen = min((c for c in d["candidates"] if c["chunk"] != 64), key=lambda c: (c["forward_s"] + c["backward_s"]))
    assert d["chunk"] == chosen["chunk"] and "(chosen of 16/32)" in str(rep)
    assert [c["chunk"] for c in d["candidates"]] == [16, 32, 64]
    assert "Titans' neural memory" in str(rep)
    assert attnc.simulate("stdlib:titans", n=4096, heads=8, head_dim=64, q_tile=64)["chunk"] == 64
    # more work per chunk than the gated delta rule's WY form (two states, the momentum's decays)
    gdn = attnc.simulate("stdlib:gated_delta_net", n=4096, heads=8, head_dim=64, q_tile=d["chunk"])
    assert d["flops"]["forward"] > gdn["flops"]["forward"]
    # a partial last chunk counts as a whole one; the time grows with the length
    hw = get_hardware("h100")
    assert titans_chunk_cost("head", 100, 2, 64, 1, 32, hw).forward_flops == \
        titans_chunk_cost("head", 128, 2, 64, 1, 32, hw).forward_flops
    assert titans_chunk_cost("head", 8192, 8, 64, 1, 32, hw).forward_s > \
        titans_chunk_cost("head", 4096, 8, 64, 1, 32, hw).forward_s


def test_auto_past_the_kernels_key_head_dim_runs_the_torch_form(monkeypatch):
    from attnc.runtime.recurrences.titans import rule

    monkeypatch.setattr(rule, "resolve_backend", lambda backend, device: "triton")  # as on CUDA tensors
    q, k, v, rates = inputs(B=1, H=1, Hkv=1, T=5, D=130, Dv=4, seed=14)
    attn = attnc.compile_attention(SRC, backend="auto")
    out = attn(q, k, v, **rates)
    assert attn._last_call["q_tile"] == rule.TITANS_CHUNK  # the torch form's chunk: the kernels stop at 128
    torch.testing.assert_close(out, attnc.compile_attention(SRC, backend="reference")(q, k, v, **rates),
                               rtol=1e-10, atol=1e-10)
    from attnc.runtime.recurrences.titans import triton as titans_triton

    real, calls = titans_triton.run, []
    monkeypatch.setattr(titans_triton, "run", lambda q, *a: calls.append(q.shape[-1]) or real(q, *a))
    q, k, v, rates = inputs(B=1, H=1, Hkv=1, T=5, D=8, Dv=4, seed=14)
    attn(q, k, v, **rates)
    assert calls == [8]  # at d 8 'auto' takes the kernels


def test_packed_sequences_take_and_return_the_memory_and_its_momentum():
    """With cu_seqlens, one [H, 2 dk, dv] state per sequence in and out: each sequence as if called alone."""
    q, k, v, rates = inputs(B=1, H=2, Hkv=2, T=30, D=8, Dv=8, seed=17)
    s0 = 0.3 * torch.randn(2, 2, 16, 8, generator=torch.Generator().manual_seed(18), dtype=F64)
    attn = attnc.compile_attention(SRC, backend="triton", q_tile=16)
    packed, states = attn(q, k, v, cu_seqlens=torch.tensor([0, 7, 30]), initial_state=s0, return_state=True, **rates)
    assert states.shape == (2, 2, 16, 8)
    for i, (a, b) in enumerate(((0, 7), (7, 30))):
        alone, state = attnc.compile_attention(SRC, backend="reference")(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], initial_state=s0[i:i + 1], return_state=True,
            **{n: r[:, a:b] for n, r in rates.items()})
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(states[i:i + 1], state, rtol=1e-10, atol=1e-10)


def test_report_chooses_the_chunk_unless_one_was_given_and_refuses_a_head_dim_it_does_not_model():
    q, k, v, rates = inputs(B=1, H=2, Hkv=2, T=40, D=8, Dv=8, seed=19)
    chosen = attnc.compile_attention(SRC, backend="triton")
    chosen(q, k, v, **rates)
    assert chosen.report()["chunk_forced"] is False
    forced = attnc.compile_attention(SRC, backend="triton", q_tile=16)
    forced(q, k, v, **rates)
    assert forced.report()["chunk_forced"] is True and forced.report()["chunk"] == 16
    with pytest.raises(attnc.SpecError, match="key head dims up to 128, got 200") as err:
        attnc.simulate("stdlib:titans", n=4096, heads=8, head_dim=200)
    assert "argument head_dim" in str(err.value)
    with pytest.raises(attnc.SpecError, match=r"2 head_dim x head_dim: 524,288 bytes"):
        simulate_decode("stdlib:titans", nk=4096, heads=8, head_dim=64)
