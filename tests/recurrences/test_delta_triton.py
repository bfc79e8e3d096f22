"""The delta rule's Triton kernels (DeltaNet, Gated DeltaNet: ``runtime.recurrences.delta.triton``; Kimi Delta
Attention, one gate per key channel: ``runtime.recurrences.delta.triton_kda``) in Triton's interpreter against the
token-by-token reference: float64 outputs, final state and every gradient (q, k, v, beta, the gate, the initial
state, with the final state's gradient flowing in) on random inputs, lengths not a multiple of the chunk, GQA and
GVA, with and without an initial state; strong gates and hard resets (-inf gates); float32 and bf16 within their
rounding; packed sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc

pytest.importorskip("triton")

F64 = torch.float64
RULES = ("delta_net", "gated_delta_net")


def make(name, B, H, T, Dk, Dv, seed, kv_heads=None, dtype=F64, gate_shift=2.0, v_heads=None):
    """q, k (L2-normalised, as the layers do) with ``kv_heads`` heads for k, v with ``kv_heads`` heads (or
    ``v_heads``: GVA, q and k then H heads), beta in (0, 2), log gates ``logsigmoid(N(gate_shift, 1))`` per token
    (gated_delta_net) or per token and key channel (kda), an initial state; float64, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    kv_heads = kv_heads or H
    HV = v_heads or H  # the state's heads
    q = torch.randn(B, H, T, Dk, generator=g, dtype=F64)
    k = F.normalize(torch.randn(B, kv_heads, T, Dk, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, v_heads or kv_heads, T, Dv, generator=g, dtype=F64)
    inputs = {"beta": 2 * torch.rand(HV, T, generator=g, dtype=F64)}
    if name == "gated_delta_net":
        inputs["g"] = F.logsigmoid(torch.randn(HV, T, generator=g, dtype=F64) + gate_shift)
    elif name == "kda":
        inputs["g"] = F.logsigmoid(torch.randn(HV, T, Dk, generator=g, dtype=F64) + gate_shift)
    s0 = torch.randn(B, HV, Dk, Dv, generator=g, dtype=F64)
    cast = lambda x: x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), {n: cast(t) for n, t in inputs.items()}, cast(s0)


def run(name, backend, q, k, v, inputs, s0, chunk=None, with_state=True):
    """Outputs, final state and the gradients of every leaf (q, k, v, [s0], inputs) of a loss that weighs every
    output differently and adds the squared final state (so its gradient flows in)."""
    leaves = [
        t.detach().clone().requires_grad_()
        for t in (q, k, v, *(() if s0 is None else (s0,)), *inputs.values())
    ]
    n0 = 3 if s0 is None else 4
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, q_tile=chunk)
    kw = dict(zip(inputs, leaves[n0:], strict=True))
    if with_state:
        out, state = attn(
            *leaves[:3], initial_state=None if s0 is None else leaves[3], return_state=True, **kw
        )
    else:
        out, state = attn(*leaves[:3], initial_state=None if s0 is None else leaves[3], **kw), None
    weight = torch.sin(torch.arange(out.numel(), dtype=F64)).view_as(out).to(out.dtype)
    loss = (out * weight).sum() + (0 if state is None else (state**2).sum())
    return out, state, torch.autograd.grad(loss, leaves)


def as64(name, q, k, v, inputs, s0):
    return (
        q.to(F64),
        k.to(F64),
        v.to(F64),
        {n: t.to(F64) for n, t in inputs.items()},
        None if s0 is None else s0.to(F64),
    )


def assert_all_close(got, want, tol):
    torch.testing.assert_close(got[0].to(F64), want[0], rtol=tol, atol=tol)
    if want[1] is not None:
        torch.testing.assert_close(got[1].to(F64), want[1], rtol=tol, atol=tol)
    assert len(got[2]) == len(want[2])
    for i, (a, b) in enumerate(zip(got[2], want[2], strict=True)):
        torch.testing.assert_close(
            a.to(F64), b, rtol=tol, atol=tol, msg=lambda m, i=i: f"gradient {i}: {m}"
        )


# ----------------------------------------------------------------- float64: exact to rounding
@settings(max_examples=6, deadline=None)
@given(
    name=st.sampled_from(RULES),
    T=st.integers(1, 50),
    chunk=st.sampled_from([16, 32]),
    dims=st.sampled_from([(8, 8), (16, 8), (20, 24)]),
    gqa=st.booleans(),
    init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_triton_equals_naive_forward_state_and_every_gradient(
    name, T, chunk, dims, gqa, init, seed
):
    q, k, v, inputs, s0 = make(name, 1, 2, T, *dims, seed, kv_heads=1 if gqa else None)
    s0 = s0 if init else None
    want = run(name, "reference", q, k, v, inputs, s0)
    got = run(name, "triton", q, k, v, inputs, s0, chunk)
    assert_all_close(got, want, 1e-10)


@pytest.mark.versions
@pytest.mark.parametrize("name", RULES)
def test_default_chunk_of_64_with_a_partial_chunk_gqa_and_initial_state(name):
    # 70 tokens: one full chunk of 64 and one of 6; 4 query heads on 2 kv heads; batch 2
    q, k, v, inputs, s0 = make(name, 2, 4, 70, 16, 8, seed=11, kv_heads=2)
    want = run(name, "reference", q, k, v, inputs, s0)
    got = run(name, "triton", q, k, v, inputs, s0)
    assert_all_close(got, want, 1e-10)


def test_without_initial_or_returned_state():
    # no initial state (no dS0 kernel output) and no final state's gradient flowing in
    q, k, v, inputs, _ = make("gated_delta_net", 1, 2, 37, 8, 8, seed=12)
    want = run("gated_delta_net", "reference", q, k, v, inputs, None, with_state=False)
    got = run("gated_delta_net", "triton", q, k, v, inputs, None, chunk=16, with_state=False)
    assert_all_close(got, want, 1e-10)


def test_strong_gates_stay_finite_and_exact():
    # log gates down to about -30 per token: an exponent of a sum of gates over a chunk that were not taken as a
    # difference of spans inside the chunk (e.g. exp(-b_s) on its own) would overflow or lose every digit
    q, k, v, inputs, s0 = make("gated_delta_net", 1, 2, 40, 8, 8, seed=13)
    inputs["g"] = -30 * torch.rand(2, 40, generator=torch.Generator().manual_seed(3), dtype=F64)
    want = run("gated_delta_net", "reference", q, k, v, inputs, s0)
    got = run("gated_delta_net", "triton", q, k, v, inputs, s0, chunk=32)
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2]))
    assert_all_close(got, want, 1e-10)


@pytest.mark.versions
def test_hard_resets_are_exact():
    # gates of -inf (the state cleared before the token's update): at t = 0, a chunk's first and last token, twice
    # in a row and twice in a chunk; outputs, final state and every gradient as the reference's, 0 for those gates
    q, k, v, inputs, s0 = make("gated_delta_net", 1, 2, 40, 8, 8, seed=18)
    g = inputs["g"].clone()
    for h, t in ((0, 0), (0, 15), (0, 16), (0, 17), (1, 5), (1, 9), (1, 31), (1, 39)):
        g[h, t] = -torch.inf
    inputs["g"] = g
    want = run("gated_delta_net", "reference", q, k, v, inputs, s0)
    got = run("gated_delta_net", "triton", q, k, v, inputs, s0, chunk=16)
    assert not any(torch.isnan(x).any() for x in (got[0], got[1], *got[2]))
    assert_all_close(got, want, 1e-10)
    assert (got[2][-1][torch.isneginf(g)] == 0).all()


# ----------------------------------------------------------------- float32 and bf16: within their rounding
def _relative_errors(got, want):
    """max |got - want| / max |want| of the output, the final state and each gradient."""
    pairs = [(got[0], want[0]), (got[1], want[1]), *zip(got[2], want[2], strict=True)]
    return [((a.to(F64) - b).abs().max() / b.abs().max()).item() for a, b in pairs]


@pytest.mark.parametrize("name", RULES)
def test_float32_within_its_rounding(name):
    # fp32 inputs, fp32 accumulation, exact products (no TF32): against float64 on the same (fp32) values.
    # Seen: <= 3e-7 relative to each tensor's largest entry
    q, k, v, inputs, s0 = make(name, 1, 2, 70, 16, 16, seed=14, dtype=torch.float32)
    want = run(name, "reference", *as64(name, q, k, v, inputs, s0))
    got = run(name, "triton", q, k, v, inputs, s0)
    assert got[0].dtype == torch.float32
    assert max(_relative_errors(got, want)) < 5e-6


@pytest.mark.versions
@pytest.mark.parametrize("name", RULES)
def test_bf16_within_its_rounding(name):
    # bf16 inputs against float64 on the same bf16 values. The tensor cores' operands are bf16 (8 bits, 4e-3
    # relative per rounding), fp32 accumulation: the inverse T, W, U, the per-chunk states, dU and the C x C
    # products are each rounded before their dot, as in flash-linear-attention. Seen (seeds 15-17, relative to
    # each tensor's largest entry): 0.7-4.4e-2 for the output, the final state and the gradients; the torch
    # chunked path (fp32 from the same bf16 inputs, no rounded operands) 0.1-0.4e-2. Keeping W, U and the states
    # in fp32 halved the kernels' error (1-2e-2) at twice their memory traffic; the bf16 operands stay.
    q, k, v, inputs, s0 = make(name, 1, 2, 70, 16, 16, seed=15, dtype=torch.bfloat16)
    want = run(name, "reference", *as64(name, q, k, v, inputs, s0))
    got = run(name, "triton", q, k, v, inputs, s0)
    assert got[0].dtype == torch.bfloat16
    errors = _relative_errors(got, want)
    assert max(errors) < 6e-2, errors
    assert min(errors) > 1e-5, (
        errors
    )  # it did run in bf16: exact-to-fp32 results would mean the operands were not


# ----------------------------------------------------------------- packed sequences, refusals, source
@pytest.mark.versions
def test_packed_sequences_equal_separate_calls():
    q, k, v, inputs, _ = make("gated_delta_net", 1, 2, 30, 8, 8, seed=16)
    attn = attnc.compile_attention("stdlib:gated_delta_net", backend="triton", q_tile=16)
    cu = torch.tensor([0, 7, 30])
    packed = attn(q, k, v, cu_seqlens=cu, **inputs)
    for a, b in ((0, 7), (7, 30)):
        alone = attnc.compile_attention("stdlib:gated_delta_net", backend="reference")(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **{n: t[:, a:b] for n, t in inputs.items()}
        )
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-12, atol=1e-12)


def test_source_shows_the_kernels():
    text = attnc.compile_attention("stdlib:gated_delta_net", backend="triton").source
    assert "Triton kernels" in text
    for name in (
        "_wy_fwd_kernel",
        "_state_fwd_kernel",
        "_out_kernel",
        "_bwd_du_local_kernel",
        "_state_bwd_kernel",
        "_bwd_dqk_kernel",
        "_wy_bwd_da_kernel",
        "_wy_bwd_dk_kernel",
        "unit_lower_inverse",
    ):
        assert f"def {name}(" in text


def test_source_shows_the_kda_kernels():
    text = attnc.compile_attention("stdlib:kda", backend="triton").source
    for name in ("_kda_wy_fwd_kernel", "_kda_dqk_kernel", "_kda_intra_grad", "vec_intra"):
        assert f"def {name}(" in text


# ----------------------------------------------------------------- Kimi Delta Attention (one gate per key channel)
HEADS = {"mha": dict(H=2), "gqa": dict(H=2, kv_heads=1), "gva": dict(H=1, v_heads=2)}


@settings(max_examples=3, deadline=None)
@given(
    T=st.integers(1, 40),
    chunk=st.sampled_from([16, 32]),
    dims=st.sampled_from([(8, 8), (16, 8), (20, 24)]),
    heads=st.sampled_from(sorted(HEADS)),
    init=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kda_triton_equals_naive_forward_state_and_every_gradient(T, chunk, dims, heads, init, seed):
    # chunks of 32: two sub-chunks of 16 (the off-diagonal blocks on the dots); of 16: the diagonal block only
    q, k, v, inputs, s0 = make("kda", 1, T=T, Dk=dims[0], Dv=dims[1], seed=seed, **HEADS[heads])
    s0 = s0 if init else None
    want = run("kda", "reference", q, k, v, inputs, s0)
    got = run("kda", "triton", q, k, v, inputs, s0, chunk)
    assert_all_close(got, want, 1e-10)


@pytest.mark.versions
def test_kda_default_chunk_of_64_with_a_partial_chunk_gqa_and_initial_state():
    # 70 tokens: a chunk of 64 (four sub-chunks of 16) and one of 6; 2 query heads on 1 kv head
    q, k, v, inputs, s0 = make("kda", 1, 2, 70, 16, 8, seed=21, kv_heads=1)
    want = run("kda", "reference", q, k, v, inputs, s0)
    got = run("kda", "triton", q, k, v, inputs, s0)
    assert_all_close(got, want, 1e-10)


@pytest.mark.versions
def test_kda_strong_gates_and_hard_resets_are_exact():
    # head 0: log gates down to -30 per token and channel (an exp(+b) of a cumulative gate on its own would
    # overflow); both heads: gates of -inf (a key channel's row of the state cleared), whole tokens at a chunk's
    # first and last row and at t = 0, single channels inside sub-chunks and on their boundaries; gradient 0 there
    q, k, v, inputs, s0 = make("kda", 1, 2, 40, 8, 8, seed=22)
    g = inputs["g"].clone()
    g[0] = -30 * torch.rand(40, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    for h, t in ((0, 0), (0, 31), (1, 32), (1, 39)):
        g[h, t] = -torch.inf
    for h, t, c in ((0, 5, 2), (0, 16, 7), (1, 15, 0), (1, 20, 3), (1, 21, 3)):
        g[h, t, c] = -torch.inf
    inputs["g"] = g
    want = run("kda", "reference", q, k, v, inputs, s0)
    got = run("kda", "triton", q, k, v, inputs, s0, chunk=32)
    assert all(torch.isfinite(x).all() for x in (got[0], got[1], *got[2]))
    assert_all_close(got, want, 1e-10)
    assert (got[2][-1][torch.isneginf(g)] == 0).all()


@pytest.mark.versions
def test_kda_float32_and_bf16_within_their_rounding():
    # as the gated rule's tests, against float64 on the same values: fp32 exact products (seen <= 3.7e-7 relative
    # to each tensor's largest entry here; <= 7.4e-7 at 70 tokens in chunks of 64, seeds 23-25); bf16 tensor-core
    # operands, the per-channel decays applied to the dots' operands before their rounding, as
    # flash-linear-attention's chunk_kda (seen 0.86-3.1e-2 here; 0.75-2.7e-2 at 70 tokens, where the torch
    # chunked form on the same bf16 inputs gave 0.3-0.4e-2)
    for dtype, top, bottom in ((torch.float32, 5e-6, 0.0), (torch.bfloat16, 6e-2, 1e-5)):
        q, k, v, inputs, s0 = make("kda", 1, 1, 40, 16, 16, seed=23, dtype=dtype)
        want = run("kda", "reference", *as64("kda", q, k, v, inputs, s0))
        got = run("kda", "triton", q, k, v, inputs, s0, chunk=32)
        assert got[0].dtype == dtype
        errors = _relative_errors(got, want)
        assert bottom <= min(errors) and max(errors) < top, (dtype, errors)


def test_kda_packed_sequences_equal_separate_calls():
    q, k, v, inputs, _ = make("kda", 1, 2, 30, 8, 8, seed=24)
    attn = attnc.compile_attention("stdlib:kda", backend="triton", q_tile=16)
    packed = attn(q, k, v, cu_seqlens=torch.tensor([0, 7, 30]), **inputs)
    for a, b in ((0, 7), (7, 30)):
        alone = attnc.compile_attention("stdlib:kda", backend="reference")(
            q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], **{n: t[:, a:b] for n, t in inputs.items()}
        )
        torch.testing.assert_close(packed[:, :, a:b], alone, rtol=1e-12, atol=1e-12)
