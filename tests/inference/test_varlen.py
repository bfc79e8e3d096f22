"""Packed variable-length batches (``cu_seqlens=``): the packed call equals running each sequence alone."""

from __future__ import annotations

import pytest
import torch

import attnc
from attnc.core.errors import SpecError

LENGTHS = (5, 9, 5, 1, 12, 9)  # repeated lengths share a group; a one-token sequence
CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
TAIL = "pattern tail\n  tokens seq\n  mask k >= n - 3\n"  # n is each sequence's own length


def _rand(*shape, seed: int, dtype=torch.float64, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def _cu(lengths, dtype=torch.int32) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


def _split(x: torch.Tensor, lengths, dim: int = 2):
    return torch.split(x, list(lengths), dim=dim)


def _grads(outs, leaves, seed: int):
    weights = [_rand(*o.shape, seed=seed + i, dtype=o.dtype, grad=False) for i, o in enumerate(outs)]
    loss = sum((o * w).sum() for o, w in zip(outs, weights, strict=True))
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,params", [("stdlib:sliding_window", {"window": 4}), ("stdlib:alibi", {}),
                                         (TAIL, {}), ("stdlib:prefix_lm", {"prefix": 3})])
def test_packed_softmax_equals_each_sequence_alone(backend, name, params):
    attn = attnc.compile_attention(name, backend=backend, **params)
    total, hq, hkv = sum(LENGTHS), 4, 2  # GQA
    q, k, v = _rand(1, hq, total, 8, seed=1), _rand(1, hkv, total, 8, seed=2), _rand(1, hkv, total, 6, seed=3)
    out, lse = attn(q, k, v, cu_seqlens=_cu(LENGTHS), return_lse=True)
    assert out.shape == (1, hq, total, 6) and lse.shape == (1, hq, total)
    alone = [attn(qi, ki, vi, return_lse=True) for qi, ki, vi in
             zip(_split(q, LENGTHS), _split(k, LENGTHS), _split(v, LENGTHS), strict=True)]
    want_out, want_lse = torch.cat([a[0] for a in alone], 2), torch.cat([a[1] for a in alone], 2)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)
    got = _grads([out, lse], (q, k, v), seed=10)
    want = _grads([want_out, want_lse], (q, k, v), seed=10)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_packed_matches_dense_block_diagonal_mask():
    """Independent of attnc's own per-sequence call: a dense block-diagonal causal softmax."""
    attn = attnc.compile_attention(CAUSAL, backend="cpu")
    total = sum(LENGTHS)
    q, k, v = (_rand(1, 2, total, 4, seed=s, grad=False) for s in (4, 5, 6))
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    pos = torch.arange(total)
    keep = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    scores = (q @ k.transpose(-1, -2)) / 2.0
    want = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v
    torch.testing.assert_close(attn(q, k, v, cu_seqlens=_cu(LENGTHS, torch.int64)), want, rtol=1e-12, atol=1e-12)


def test_packed_bnhd_layout_and_call_inputs():
    """layout="bnhd" packs as [1, total, H, D]; a call-time input declared [n] is split per sequence."""
    attn = attnc.compile_attention("stdlib:document", backend="cpu", layout="bnhd")
    lengths, total = (7, 3, 7), 17
    q, k, v = (_rand(1, total, 2, 4, seed=s) for s in (7, 8, 9))
    doc = torch.tensor([0, 0, 1, 1, 1, 2, 2, 0, 0, 0, 5, 5, 5, 5, 6, 6, 6])
    out = attn(q, k, v, cu_seqlens=_cu(lengths), doc=doc)
    want = torch.cat([attn(qi, ki, vi, doc=di) for qi, ki, vi, di in
                      zip(_split(q, lengths, 1), _split(k, lengths, 1), _split(v, lengths, 1),
                          _split(doc, lengths, 0), strict=True)], 1)
    assert out.shape == (1, total, 2, 4)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def _recurrence_alone(attn, q, k, v, g, s0, lengths):
    """Each sequence run alone from its own initial state: outputs (concatenated) and final states (an
    empty sequence keeps its initial state)."""
    outs, finals = [], []
    for i, (qi, ki, vi, gi) in enumerate(zip(_split(q, lengths), _split(k, lengths), _split(v, lengths),
                                             _split(g, lengths), strict=True)):
        if lengths[i] == 0:
            finals.append(s0[i:i + 1])
            continue
        o, s = attn(qi, ki, vi, g=gi, initial_state=s0[i:i + 1], return_state=True)
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, 2), torch.cat(finals)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,gate_dims", [("mamba2", ()), ("gla", (4,))])
def test_packed_recurrence_resets_state_per_sequence(backend, name, gate_dims):
    attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, q_tile=16 if backend == "cpu" else None)
    lengths = (20, 3, 0, 20, 7)  # an empty sequence keeps its initial state
    total, H, Dk, Dv = sum(lengths), 2, 4, 3
    q, k, v = _rand(1, H, total, Dk, seed=11), _rand(1, H, total, Dk, seed=12), _rand(1, H, total, Dv, seed=13)
    g = torch.nn.functional.logsigmoid(_rand(1, H, total, *gate_dims, seed=14, grad=False)).requires_grad_()
    s0 = _rand(len(lengths), H, Dk, Dv, seed=15)
    out, final = attn(q, k, v, g=g, cu_seqlens=_cu(lengths), initial_state=s0, return_state=True)
    assert final.shape == (len(lengths), H, Dk, Dv)
    want_out, want_final = _recurrence_alone(attn, q, k, v, g, s0, lengths)
    torch.testing.assert_close(out, want_out, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=1e-11, atol=1e-12)
    got = _grads([out, final], (q, k, v, g, s0), seed=20)
    want = _grads([want_out, want_final], (q, k, v, g, s0), seed=20)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # without an initial state: zeros, and the boundary is a reset (not a continuation)
    plain = attn(q, k, v, g=g, cu_seqlens=_cu(lengths))
    first = attn(q[:, :, :23], k[:, :, :23], v[:, :, :23], g=g[:, :, :23])
    torch.testing.assert_close(plain[:, :, :20], first[:, :, :20], rtol=1e-11, atol=1e-12)
    assert not torch.allclose(plain[:, :, 20:23], first[:, :, 20:23])


@pytest.mark.parametrize("backend", ["triton", "flex"])  # triton: the interpreter on CPU tensors
def test_packed_float32_backends_small(backend):
    attn = attnc.compile_attention("stdlib:sliding_window", window=3, backend=backend)
    # flex compiles per shape on CPU (tens of seconds each here): one length, two sequences
    lengths = (5, 11, 5) if backend == "triton" else (7, 7)
    q, k, v = (_rand(1, 2, sum(lengths), 16, seed=s, dtype=torch.float32, grad=False) for s in (21, 22, 23))
    out = attn(q, k, v, cu_seqlens=_cu(lengths))
    ref = attnc.compile_attention("stdlib:sliding_window", window=3, backend="reference")
    want = torch.cat([ref(*(x.double() for x in xs)) for xs in
                      zip(_split(q, lengths), _split(k, lengths), _split(v, lengths), strict=True)], 2)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


def _refused(attn, q, k, v, match: str, where: str = "argument cu_seqlens", **kw):
    with pytest.raises(SpecError, match=match) as info:
        attn(q, k, v, **kw)
    assert info.value.where == where


def test_bad_cu_seqlens_refused():
    attn = attnc.compile_attention(CAUSAL, backend="cpu")
    q = torch.randn(1, 2, 10, 4)
    for cu, match in [([0, 4, 10], "integer tensor"), (torch.tensor([0.0, 10.0]), "int32 or int64"),
                      (torch.tensor([[0, 10]]), "1-D"), (torch.tensor([0]), "1-D"),
                      (torch.tensor([1, 10]), "start at 0"), (torch.tensor([0, 4, 9]), "end at the packed"),
                      (torch.tensor([0, 6, 4, 10]), "non-decreasing"), (torch.tensor([0, 6, 12, 10]), "non-decreasing")]:
        _refused(attn, q, q, q, match, cu_seqlens=cu)
    _refused(attn, q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), "batch of 1",
             cu_seqlens=torch.tensor([0, 10]))
    grid = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size=3, backend="reference")
    _refused(grid, q, q, q, "grid", cu_seqlens=torch.tensor([0, 10]), sizes={"height": 2, "width": 5})
    rec = attnc.compile_attention("stdlib:mamba2", backend="cpu")
    g = torch.zeros(1, 2, 10)
    _refused(rec, q, q, q, r"one state per sequence, \[2, 2, 4, 4\]", where="argument initial_state",
             cu_seqlens=torch.tensor([0, 3, 10]), g=g, initial_state=torch.zeros(1, 2, 4, 4))
    _refused(rec, q, q, q, "batch of 1", where="argument g", cu_seqlens=torch.tensor([0, 3, 10]),
             g=torch.zeros(2, 2, 10))


def test_packed_recurrence_fla_layout():
    """fla's calling convention: q, k, v [1, T, H, D], g [1, T, H, K], cu_seqlens, per-sequence states."""
    fla = attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=16, layout="bnhd")
    ours = attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=16)
    lengths, H, D = (9, 17, 9), 2, 4
    q, k, v = (_rand(1, sum(lengths), H, D, seed=s, grad=False) for s in (31, 32, 33))
    g = torch.nn.functional.logsigmoid(_rand(1, sum(lengths), H, D, seed=34, grad=False))
    s0 = _rand(len(lengths), H, D, D, seed=35, grad=False)
    o, st = fla(q, k, v, g=g, cu_seqlens=_cu(lengths), initial_state=s0, return_state=True)
    o_ref, st_ref = ours(*(t.transpose(1, 2) for t in (q, k, v)), g=g.transpose(1, 2), cu_seqlens=_cu(lengths),
                         initial_state=s0, return_state=True)
    assert o.shape == (1, sum(lengths), H, D) and st.shape == (len(lengths), H, D, D)
    torch.testing.assert_close(o, o_ref.transpose(1, 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st, st_ref, rtol=1e-12, atol=1e-12)
    # the middle sequence alone, from its own initial state
    o1, s1 = ours(*(t[:, 9:26].transpose(1, 2) for t in (q, k, v)), g=g[:, 9:26].transpose(1, 2),
                  initial_state=s0[1:2], return_state=True)
    torch.testing.assert_close(o[:, 9:26], o1.transpose(1, 2), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(st[1:2], s1, rtol=1e-11, atol=1e-12)


class _PackedModel(torch.nn.Module):
    """A projection into q, k, v packed as [1, H, total, D], then the attnc module on the packed batch."""

    def __init__(self, attn, heads: int = 2, dim: int = 4):
        super().__init__()
        self.attn, self.heads, self.dim = attn, heads, dim
        g = torch.Generator().manual_seed(40)
        self.proj = torch.nn.Parameter(torch.randn(heads * dim, 3 * heads * dim, generator=g, dtype=torch.float64))

    def forward(self, x, cu_seqlens, **kw):
        q, k, v = ((x @ self.proj).unflatten(-1, (3, self.heads, self.dim)).unbind(-3))
        return self.attn(*(t.transpose(1, 2) for t in (q, k, v)), cu_seqlens=cu_seqlens, **kw)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_packed_softmax_fullgraph_compile_equals_eager_and_each_sequence(backend):
    """cu_seqlens under torch.compile(fullgraph=True) (the attnc::varlen_attention op): forward and
    backward equal the eager packed call and each sequence run alone; new offsets of the same count
    reuse the compiled graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    attn = attnc.compile_attention("stdlib:sliding_window", window=4, backend=backend)
    model = _PackedModel(attn)
    lengths = (5, 9, 5, 1)
    x = _rand(1, sum(lengths), 8, seed=41)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    out, lse = compiled(x, _cu(lengths), return_lse=True)
    eager_out, eager_lse = model(x, _cu(lengths), return_lse=True)
    torch.testing.assert_close(out, eager_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, eager_lse, rtol=1e-12, atol=1e-12)
    alone = [model(xi, _cu((n,)), return_lse=True) for xi, n in zip(_split(x, lengths, 1), lengths, strict=True)]
    torch.testing.assert_close(out, torch.cat([a[0] for a in alone], 2), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, torch.cat([a[1] for a in alone], 2), rtol=1e-12, atol=1e-12)
    leaves = (x, model.proj)
    got = _grads([out, lse], leaves, seed=42)
    for g, w in zip(got, _grads([eager_out, eager_lse], leaves, seed=42), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, _grads([torch.cat([a[0] for a in alone], 2), torch.cat([a[1] for a in alone], 2)],
                                leaves, seed=42), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # other boundaries (same count of offsets), and the output alone: exact, and no recompilation for them
    other = (3, 3, 12, 2)
    out2 = compiled(x, _cu(other))
    torch.testing.assert_close(out2, model(x, _cu(other)), rtol=1e-12, atol=1e-12)
    g2 = _grads([out2], leaves, seed=43)
    for g, w in zip(g2, _grads([model(x, _cu(other))], leaves, seed=43), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert counter.frame_count == 2  # one graph with lse, one without; new offsets are data


def test_packed_recurrence_fullgraph_compile_equals_each_sequence():
    """A recurrence on packed sequences under fullgraph compilation: outputs, final states and the
    gradients of q, k, v, the gate and the initial states equal each sequence run alone."""
    attn = attnc.compile_attention("stdlib:gla", backend="cpu", q_tile=16)
    lengths = (20, 3, 0, 7)
    total, H, D = sum(lengths), 2, 4
    q, k, v = (_rand(1, H, total, D, seed=s) for s in (51, 52, 53))
    g = torch.nn.functional.logsigmoid(_rand(1, H, total, D, seed=54, grad=False)).requires_grad_()
    s0 = _rand(len(lengths), H, D, D, seed=55)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: attn(*a[:3], g=a[3], initial_state=a[4], cu_seqlens=a[5], return_state=True),
                             fullgraph=True)
    out, final = compiled(q, k, v, g, s0, _cu(lengths))
    want_out, want_final = _recurrence_alone(attn, q, k, v, g, s0, lengths)
    torch.testing.assert_close(out, want_out, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=1e-11, atol=1e-12)
    for a, b in zip(_grads([out, final], (q, k, v, g, s0), seed=56),
                    _grads([want_out, want_final], (q, k, v, g, s0), seed=56), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # another packed total: dynamo retraces with a symbolic token count, which the input checks read (it failed
    # on str() of it while writing an error message the call did not need)
    lengths = (9, 14)
    total = sum(lengths)
    q, k, v = (_rand(1, H, total, D, seed=s) for s in (57, 58, 59))
    g = torch.nn.functional.logsigmoid(_rand(1, H, total, D, seed=60, grad=False))
    s0 = _rand(len(lengths), H, D, D, seed=61)
    out, final = compiled(q, k, v, g, s0, _cu(lengths))
    want_out, want_final = _recurrence_alone(attn, q, k, v, g, s0, lengths)
    torch.testing.assert_close(out, want_out, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(final, want_final, rtol=1e-11, atol=1e-12)


def test_bad_cu_seqlens_refused_under_fullgraph_compile():
    """The offsets are data under compilation: a bad one is refused at the call with the eager message."""
    attn = attnc.compile_attention(CAUSAL, backend="cpu")
    q = torch.randn(1, 2, 10, 4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, cu: attn(q, q, q, cu_seqlens=cu), fullgraph=True)
    for cu, match in [(torch.tensor([0, 6, 4, 10]), "non-decreasing"), (torch.tensor([0, 4, 9]), "end at the packed"),
                      (torch.tensor([0.0, 10.0]), "int32 or int64")]:
        with pytest.raises(SpecError, match=match) as info:
            compiled(q, cu)
        assert info.value.where == "argument cu_seqlens"


@pytest.mark.parametrize("value", ["a", 2.5, True])
def test_packed_call_under_fullgraph_refuses_a_size_that_is_not_an_int(value):
    """Sizes reach the varlen op as text and are checked when it runs: a value that is not an int is
    one SpecError naming it (it was a bare ValueError while dynamo traced, or a float truncated)."""
    attn = attnc.compile_attention("stdlib:sliding_window", window=4, backend="cpu")
    x = _rand(1, 2, 12, 8, seed=61)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, c: attn(q, q, q, cu_seqlens=c, sizes={"x": value}), fullgraph=True)
    with pytest.raises(SpecError, match="expected an int") as info:
        compiled(x, _cu((6, 6)))
    assert info.value.where == "argument sizes 'x'"


@pytest.mark.parametrize("spec,name,bad", [
    ("stdlib:document", "doc", [5]), ("stdlib:document", "doc", [9]), ("stdlib:document", "doc", [2]),
    ("stdlib:document", "doc", [8, 2]), ("stdlib:mamba2", "g", [2, 5]), ("stdlib:mamba2", "g", [2]),
])
def test_packed_inputs_of_the_wrong_shape_name_the_input_and_the_shape(spec, name, bad):
    """cu_seqlens with an input over the wrong number of tokens: one SpecError naming the input and
    the packed shape expected, never a raw error from cutting it nor a silent truncation."""
    attn = attnc.compile_attention(spec, backend="cpu")
    q = torch.randn(1, 2, 8, 16)
    value = torch.zeros(bad, dtype=torch.long if name == "doc" else torch.float32)
    with pytest.raises(attnc.SpecError) as err:
        attn(q, q, q, cu_seqlens=torch.tensor([0, 3, 8]), **{name: value})
    assert err.value.where == f"argument {name}"
    assert "8]" in err.value.message and str(list(value.shape)) in err.value.message
