"""The parameters the generated kernels read at run time (``compiler.codegen.triton.run_values``): a mask's window,
sink count or prefix is the kernels' ``p_NAME`` argument, so two modules that differ only in it have one source (one
compile), and each call's answer is its own value's. Only what the spec names is lifted: a number that happens to
equal a parameter stays in the text, and so do divisors, NATTEN windows and values read in float arithmetic. A
parameter given one value per head (MoA's ``alpha``) is a table the kernels read at the head they serve."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.codegen.triton.run_values import lifted_mask, run_values
from attnc.runtime.backends.triton.runner import emit

os.environ.setdefault("TRITON_INTERPRET", "1")

#: a window and a literal of the same value: the literal is not the parameter
SAME_VALUE = "pattern w(window >= 1 = 4)\n  tokens seq\n  mask causal and (q - k < window or k < 4)\n"


def _qkv(n, heads=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, d, generator=g, dtype=torch.float64) for _ in range(3)]


def _triton_call(spec, params, n, heads, seed):
    """``spec``'s Triton module at ``params``, its forward and gradients against the float64 reference."""
    attn = attnc.compile_attention(spec, backend="triton", q_tile=16, kv_tile=16, **params)
    ref = attnc.compile_attention(spec, backend="reference", **params)
    q, k, v = (t.float().requires_grad_() for t in _qkv(n, heads=heads, seed=seed))
    out = attn(q, k, v)
    out.square().sum().backward()
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = ref(qd, kd, vd)
    want.square().sum().backward()
    torch.testing.assert_close(out, want.float(), rtol=2e-5, atol=2e-5)
    for got, exp in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        torch.testing.assert_close(got, exp.float(), rtol=1e-4, atol=1e-4)
    return attn


def _mask_line(source: str) -> str:
    lines = source.splitlines()
    return lines[lines.index(next(line for line in lines if line.startswith("def _mask("))) + 2]


def test_two_windows_share_one_source_and_each_call_answers_its_own():
    """sliding_window at windows 5 and 9: the same kernel text (``p_window`` in it, neither number), and each
    module's forward and gradients equal the float64 reference at its own window."""
    sources = []
    for window in (5, 9):
        sources.append(_triton_call("stdlib:sliding_window", {"window": window}, 40, 2, window).runner.last_source)
    assert sources[0] == sources[1]
    assert "p_window" in _mask_line(sources[0]) and not {"5", "9"} & set(_mask_line(sources[0]).split())


@settings(max_examples=6, deadline=None)
@given(window=st.integers(1, 45), sinks=st.integers(0, 6), n=st.integers(1, 45), seed=st.integers(0, 2**16))
def test_random_windows_and_sinks_equal_the_reference(window, sinks, n, seed):
    """streaming's window and sinks, both read at run time, at random values and lengths (a window past the
    sequence included): the forward equals the reference."""
    params = {"window": window, "sinks": sinks}
    attn = attnc.compile_attention("stdlib:streaming", backend="triton", q_tile=16, kv_tile=16, **params)
    q, k, v = _qkv(n, seed=seed)
    want = attnc.compile_attention("stdlib:streaming", backend="reference", **params)(q, k, v)
    torch.testing.assert_close(attn(q.float(), k.float(), v.float()), want.float(), rtol=2e-5, atol=2e-5)
    assert "p_window" in run_values(attn.pattern)


def test_a_number_equal_to_a_parameter_stays_a_number():
    """``k < 4`` beside a window of 4: the window is the parameter, the 4 of ``k < 4`` is not."""
    pat = attnc.load(SAME_VALUE, window=4)
    assert run_values(pat) == {"p_window": 4}
    line = _mask_line(emit(pat, n=32))
    assert "p_window" in line and "4" in line


@pytest.mark.parametrize("spec, params", [
    ("pattern blocks(block >= 1 = 4)\n  tokens seq\n  mask causal and q // block == k // block\n", {}),
    ("stdlib:neighborhood_1d", {"kernel_size": 5}),
    ("stdlib:moa", {"alpha": [1024, 2048], "beta": [0.0, 0.5]}),
    ("stdlib:moba", {}),
])
def test_divisors_windows_and_float_reads_stay_in_the_text(spec, params):
    """A divisor (a constant one is a shift), a NATTEN window (its bounds computed at generation), values read in
    float arithmetic (MoA's spans with a per-head ``beta``: ``(alpha + total * beta) // 1``) and a route's block:
    none is a run-time parameter."""
    pat = attnc.load(spec, **params)
    assert run_values(pat) == {}
    assert lifted_mask(pat)[0] == pat.mask


def test_emit_shows_the_run_time_parameter_in_every_kernel_that_reads_the_mask():
    """Every kernel that evaluates the mask takes ``p_window`` (not specialised on); no other kernel does."""
    src = emit(attnc.load("stdlib:sliding_window", window=7), n=64)
    assert "def _mask(q, k, h, p_window):" in src
    kernels = src.split("\n@triton.jit")[1:]
    masked = [k for k in kernels if "_mask(" in k and not k.startswith("\ndef _mask")]
    assert masked and all(k.startswith("(do_not_specialize=['p_window'])") for k in masked)
    assert all("p_window" not in k for k in kernels if k not in masked and not k.startswith("\ndef _mask"))


#: MoA at small sizes: blocks of 4 keys, spans of a few blocks, nothing reserved for new tokens
MOA = {"block": 4, "minimum": 4, "max_new_tokens": 0}


def _moa_call(alpha, n, seed):
    """MoA's Triton module at per-head spans ``alpha`` against the reference (``_triton_call``)."""
    return _triton_call("stdlib:moa", {"alpha": alpha, **MOA}, n, len(alpha), seed)


def test_per_head_values_are_one_table_and_two_lists_share_one_source():
    """MoA at two lists of per-head spans: one kernel text, which reads ``tl.load(p_alpha + h)`` and none of the
    spans; each module's forward and gradients equal the reference at its own spans."""
    sources = []
    for alpha in ([8, 20], [16, 4]):
        attn = _moa_call(alpha, 40, seed=alpha[0])
        assert run_values(attn.pattern)["p_alpha"] == tuple(alpha)
        sources.append(attn.runner.last_source)
    assert sources[0] == sources[1]
    line = _mask_line(sources[0])
    assert "tl.load(p_alpha + h)" in line and not {"8", "20", "16"} & set(line.replace("(", " ").split())


@settings(max_examples=6, deadline=None)
@given(alpha=st.lists(st.integers(0, 48), min_size=2, max_size=3), n=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_random_per_head_spans_equal_the_reference(alpha, n, seed):
    """Random spans per head (one equal to another, spans past the sequence, 0) at random lengths."""
    _moa_call(alpha, n, seed)


def test_emit_passes_a_per_head_table_as_a_pointer():
    """The table is a pointer (specialised as any pointer), the spans' neighbours ``p_minimum`` ints never
    specialised on; every kernel reading the mask takes them."""
    src = emit(attnc.load("stdlib:moa", alpha=[8, 20], **MOA), n=32, heads=2)
    assert "def _mask(q, k, h, p_alpha, p_max_new_tokens, p_minimum):" in src
    masked = [k for k in src.split("\n@triton.jit")[1:] if "_mask(" in k and not k.startswith("\ndef _mask")]
    assert masked and all("p_alpha" in k and "'p_alpha'" not in k.split(")")[0] for k in masked)
