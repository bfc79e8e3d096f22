"""Combined patterns (``branch`` ... ``combine``) and the stdlib ``nsa`` (Native Sparse Attention).

Checked against flash-linear-attention's reference (fla-core 0.6.0, ``fla/ops/nsa/naive.py``) and a
dense float64 implementation written here from the rule of spec/REFERENCE.md (``dense_nsa``):

- fla's naive functions compute in float32 (they call ``.float()`` on their inputs): the comparisons
  with them hold to float32 rounding; its ``mean_pooling`` is a Triton kernel (fp32 accumulation), so
  ``naive_nsa`` runs here with the float64 pooling loop of this file in its place;
- ``dense_nsa`` is checked against fla (the selected blocks exactly, the outputs to float32), and the
  reference backend against ``dense_nsa`` in float64, forward and every gradient (q, k, v, gates);
- every other backend against the reference backend, forward and backward.
"""

from __future__ import annotations

import io
import math
import warnings
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.core.errors import SpecError

with warnings.catch_warnings():  # fla warns that flash_attn is missing: only its window branch needs it
    warnings.simplefilter("ignore")
    from fla.ops.nsa import naive as fla_nsa

FEW = settings(max_examples=8, deadline=None)
GATES = ("g_cmp", "g_slc", "g_swa")


# ----------------------------------------------------------------------------- the rule, densely
def pool_loop(x: torch.Tensor, size: int, cu_seqlens=None) -> torch.Tensor:
    """Means of runs of ``size`` tokens of x ``[B, T, H, D]`` (the last run: its own tokens), a loop; with
    ``cu_seqlens`` (a batch of 1), the runs of each packed sequence, joined."""
    if cu_seqlens is not None:
        bounds = cu_seqlens.tolist()
        return torch.cat([pool_loop(x[:, a:b], size) for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a], dim=1)
    T = x.shape[1]
    return torch.stack([x[:, s:min(T, s + size)].mean(1) for s in range(0, T, size)], dim=1)


def masked_softmax(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys; 0 on a row with none (differentiable, no NaN)."""
    some = mask.any(-1, keepdim=True)
    filled = torch.where(mask, score, torch.where(some, -math.inf, 0.0))
    return torch.where(some, torch.softmax(filled, dim=-1), 0.0)


def nsa_selection(probs: torch.Tensor, T: int, block: int, selected: int) -> list:
    """Per (batch, KV head, query): the set of selected blocks, python loops. ``probs`` ``[B, Hkv, T, runs]``
    (already averaged over the group): blocks with a key <= t; 0, own, previous forced; the rest by score."""
    out = []
    for b in range(probs.shape[0]):
        per_head = []
        for h in range(probs.shape[1]):
            rows = []
            for t in range(T):
                allowed = range(t // block + 1)
                forced = {c for c in (0, t // block, t // block - 1) if c in allowed}
                rest = sorted((c for c in allowed if c not in forced), key=lambda c: (-probs[b, h, t, c].item(), c))
                rows.append(forced | set(rest[: max(0, selected - len(forced))]))
            per_head.append(rows)
        out.append(per_head)
    return out


def dense_nsa(q, k, v, gates, block, selected, window, scale=None):
    """NSA in [B, H, T, D] tensors, float64, differentiable in q, k, v and the gates (``[B, Hq, T]``);
    returns (out, branch outputs, selection)."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    scale = D ** -0.5 if scale is None else scale
    kk, vv = (x.repeat_interleave(group, 1) for x in (k, v))
    t = torch.arange(T)
    kc, vc = (pool_loop(x.transpose(1, 2), block).transpose(1, 2) for x in (k, v))
    runs = kc.shape[2]
    c = torch.arange(runs)
    cmp_mask = ((c[None, :] + 1) * block - 1) <= t[:, None]
    p_cmp = masked_softmax(q @ kc.repeat_interleave(group, 1).transpose(-1, -2) * scale, cmp_mask)
    o_cmp = p_cmp @ vc.repeat_interleave(group, 1)
    probs = p_cmp.detach().view(B, -1, group, T, runs).mean(2)
    sel = nsa_selection(probs, T, block, selected)
    chosen = torch.tensor([[[[c in row for c in range(runs)] for row in head] for head in batch] for batch in sel])
    slc_mask = chosen.repeat_interleave(group, 1)[..., t // block] & (t[None, :] <= t[:, None])  # [B, Hq, T, T]
    s = q @ kk.transpose(-1, -2) * scale
    o_slc = masked_softmax(s, slc_mask) @ vv
    swa_mask = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < window)
    o_swa = masked_softmax(s, swa_mask) @ vv
    outs = {"cmp": o_cmp, "slc": o_slc, "swa": o_swa}
    out = sum(gates[f"g_{name}"][..., None] * o for name, o in outs.items())
    return out, outs, sel


def draw(seed, B, Hq, Hkv, T, D, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k, v = (torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) for _ in range(2))
    gates = {name: torch.rand(B, Hq, T, generator=g, dtype=dtype) for name in GATES}
    return q, k, v, gates


def only(name, gates):
    """Gates that keep one branch: 1 on it, 0 elsewhere."""
    return {g: torch.ones_like(t) if g == f"g_{name}" else torch.zeros_like(t) for g, t in gates.items()}


def bnhd(x):
    return x.transpose(1, 2)


FLA32 = {"rtol": 1e-5, "atol": 1e-5}  # fla's naive functions compute in float32


# ----------------------------------------------------------------------------- against fla
@FEW
@given(seed=st.integers(0, 2**16), T=st.integers(1, 44), block=st.sampled_from([4, 8]), selected=st.integers(3, 6),
       gqa=st.sampled_from([(2, 1), (4, 2)]))
def test_branches_match_fla(seed, T, block, selected, gqa):
    Hq, Hkv = gqa
    q, k, v, gates = draw(seed, 2, Hq, Hkv, T, 8)
    scale = 8 ** -0.5
    _, outs, sel = dense_nsa(q, k, v, gates, block, selected, window=5)
    kc, vc = (pool_loop(bnhd(x), block) for x in (k, v))
    fla_cmp, _ = fla_nsa.naive_nsa_compression(bnhd(q), kc, vc, block, scale)
    indices = fla_nsa.naive_nsa_topk(bnhd(q), kc, selected, block, scale)  # [B, T, Hkv, S], -1 padded
    fla_slc = fla_nsa.naive_nsa_selection(bnhd(q), bnhd(k), bnhd(v), indices, block, scale)
    # the test's rule selects exactly fla's blocks
    assert [[[set(indices[b, t, h].tolist()) - {-1} for t in range(T)] for h in range(Hkv)] for b in range(2)] == sel
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=block, selected=selected, window=5)
    for name, want in (("cmp", fla_cmp), ("slc", fla_slc)):
        torch.testing.assert_close(bnhd(outs[name]), want.double(), **FLA32)
        torch.testing.assert_close(attn(q, k, v, **only(name, gates)), outs[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 12, 13, 15])
def test_pooling_is_the_mean_of_each_run(T):
    """fla's mean_pooling kernel divides each run's sum by min(BT, T - start) (its last, shorter run is
    the mean of its own tokens; the kernel needs a GPU driver, so the loop of this file stands for it)."""
    from attnc.runtime.combined import pool_mean

    x = torch.randn(2, T, 3, 4, generator=torch.Generator().manual_seed(T), dtype=torch.float64)
    want = pool_loop(x, 4)
    assert want.shape[1] == -(-T // 4)
    torch.testing.assert_close(want[:, -1], x[:, 4 * (want.shape[1] - 1):].mean(1), rtol=0, atol=0)
    torch.testing.assert_close(bnhd(pool_mean(bnhd(x), 4)), want, rtol=1e-15, atol=1e-15)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), T=st.integers(1, 40), selected=st.integers(3, 5))
def test_whole_matches_fla_naive_nsa(monkeypatch_pool, seed, T, selected):
    """fla's naive_nsa (a GQA group of 16 query heads; window_size 0: its window branch needs
    flash_attn) plus g_swa times the dense window branch, against attnc on layout bnhd, fla's."""
    block, window = 8, 6
    q, k, v, gates = draw(seed, 1, 16, 1, T, 8)
    want = fla_nsa.naive_nsa(bnhd(q), bnhd(k), bnhd(v), bnhd(gates["g_cmp"]), bnhd(gates["g_slc"]),
                             block_counts=selected, block_size=block, window_size=0)
    _, outs, _ = dense_nsa(q, k, v, gates, block, selected, window)
    want = want.double() + bnhd(gates["g_swa"][..., None] * outs["swa"])
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=block, selected=selected, window=window,
                                   layout="bnhd")
    got = attn(bnhd(q), bnhd(k), bnhd(v), **{g: bnhd(t) for g, t in gates.items()})
    torch.testing.assert_close(got, want, **FLA32)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), lengths=st.lists(st.integers(1, 20), min_size=1, max_size=3))
def test_packed_sequences_match_fla(monkeypatch_pool, seed, lengths):
    """cu_seqlens: every sequence alone (its own runs, blocks and window), as fla's naive_nsa with
    cu_seqlens (plus the dense window branch per sequence); layout bnhd, a batch of 1."""
    block, selected, window = 4, 3, 5
    T = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    q, k, v, gates = draw(seed, 1, 16, 1, T, 4)
    want = fla_nsa.naive_nsa(bnhd(q), bnhd(k), bnhd(v), bnhd(gates["g_cmp"]), bnhd(gates["g_slc"]),
                             block_counts=selected, block_size=block, window_size=0, cu_seqlens=cu).double()
    for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:], strict=True):
        part = slice(a, b)
        _, outs, _ = dense_nsa(q[:, :, part], k[:, :, part], v[:, :, part], {g: t[..., part] for g, t in gates.items()},
                               block, selected, window)
        want[:, part] += bnhd(gates["g_swa"][..., part, None] * outs["swa"])
    attn = attnc.compile_attention("stdlib:nsa", backend="cpu", block=block, selected=selected, window=window,
                                   layout="bnhd")
    got = attn(bnhd(q), bnhd(k), bnhd(v), cu_seqlens=cu, **{g: bnhd(t) for g, t in gates.items()})
    torch.testing.assert_close(got, want, **FLA32)


@pytest.fixture(scope="module")
def monkeypatch_pool():
    """naive_nsa pools with the float64 loop of this file (fla's mean_pooling is a Triton kernel)."""
    saved = fla_nsa.mean_pooling
    fla_nsa.mean_pooling = pool_loop
    yield
    fla_nsa.mean_pooling = saved


# ----------------------------------------------------------------------------- exact, float64, gradients
@FEW
@given(seed=st.integers(0, 2**16), T=st.integers(1, 30), block=st.sampled_from([3, 4, 8]), selected=st.integers(1, 5),
       window=st.integers(1, 9), gqa=st.sampled_from([(1, 1), (2, 1), (4, 2)]), batch_gates=st.booleans())
def test_reference_matches_dense_with_gradients(seed, T, block, selected, window, gqa, batch_gates):
    Hq, Hkv = gqa
    q, k, v, gates = draw(seed, 2, Hq, Hkv, T, 4)
    if not batch_gates:  # gates [heads, n], shared by the batch
        gates = {name: t[0] for name, t in gates.items()}
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates.values())]
    want, _, _ = dense_nsa(*leaves[:3], dict(zip(GATES, leaves[3:], strict=True)), block, max(selected, 3), window,
                           scale=0.3)
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=block, selected=max(selected, 3),
                                   window=window)
    mine = [x.clone().requires_grad_() for x in (q, k, v, *gates.values())]
    got = attn(*mine[:3], scale=0.3, **dict(zip(GATES, mine[3:], strict=True)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    for g_got, g_want in zip(torch.autograd.grad((got * w).sum(), mine), torch.autograd.grad((want * w).sum(), leaves),
                             strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-11, atol=1e-11)


def test_selection_counts_forced_blocks_and_ties_go_low():
    """Equal probabilities go to the lower block (q = 0 gives every visible run the same probability);
    forced blocks count towards K but are all kept when there are more than K (the route's keep rule;
    fla's torch.topk keeps K of its equal 1.0 scores in an unspecified order there)."""
    T, block = 24, 4
    q, k, v, gates = draw(3, 1, 1, 1, T, 4)
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=block, selected=4, window=1)
    got = attn(torch.zeros_like(q), k, v, **only("slc", gates))
    _, outs, sel = dense_nsa(torch.zeros_like(q), k, v, gates, block, 4, 1)
    assert sel[0][0][23] == {0, 1, 4, 5}  # forced 0, 4, 5; then run 1, the lowest of equal scores
    torch.testing.assert_close(got, outs["slc"], rtol=1e-12, atol=1e-12)
    one = attnc.compile_attention("stdlib:nsa", backend="reference", block=block, selected=1, window=1)
    _, outs, sel = dense_nsa(q, k, v, gates, block, 1, 1)
    assert sel[0][0] == [{0, t // block - 1, t // block} - {-1} for t in range(T)]  # every forced block
    torch.testing.assert_close(one(q, k, v, **only("slc", gates)), outs["slc"], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- every backend
@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
def test_backends_match_the_reference(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, gates = draw(7, 1, 2, 1, 37, 8, dtype)
    results = {}
    for name in ("reference", backend):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates.values())]
        attn = attnc.compile_attention("stdlib:nsa", backend=name, block=8, selected=3, window=6, q_tile=16,
                                       kv_tile=16)
        out = attn(*leaves[:3], **dict(zip(GATES, leaves[3:], strict=True)))
        w = torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)
        results[name] = (out, *torch.autograd.grad((out * w).sum(), leaves))
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    for got, want in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(got, want, **tol)


def test_torch_compile_runs_the_branches_eagerly():
    q, k, v, gates = draw(1, 1, 2, 1, 20, 4)
    attn = attnc.compile_attention("stdlib:nsa", backend="cpu", block=4, selected=3, window=5)
    compiled = torch.compile(lambda *a, **kw: attn(*a, **kw), backend="eager")
    torch.testing.assert_close(compiled(q, k, v, **gates), attn(q, k, v, **gates), rtol=0, atol=0)


# ----------------------------------------------------------------------------- the language
COMBINED = """
pattern two(block = 4)
  tokens seq
  input ga: float[heads, n]
  input doc: int[n]
  branch coarse
    keys pooled(mean, block)
    mask (k + 1) * block - 1 <= q
  branch fine
    mask causal and doc[q] == doc[k]
    route topk(2) blocks(block) by probs(coarse) keep q // block == k // block
  combine ga * fine + coarse
"""


def test_a_general_combination():
    """A bare branch term has weight 1; a branch reads its own inputs (a document mask) and its route's
    'allowed' follows its own mask; the gates are not seen by the branches. Against a naive float64 rule."""
    pat = attnc.load(COMBINED)
    assert [b.name for b in pat.branches] == ["coarse", "fine"] and pat.terms == (("ga", "fine"), (None, "coarse"))
    assert [d.name for d in pat.inputs] == ["ga", "doc"]
    assert [d.name for d in pat.branch("fine").pattern.inputs] == ["doc", "probs(coarse)"]
    g = torch.Generator().manual_seed(0)
    T, block = 14, 4
    q, k, v = (torch.randn(1, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ga, doc = torch.rand(2, T, generator=g, dtype=torch.float64), torch.tensor([0] * 6 + [1] * 8)
    got = attnc.compile_attention(COMBINED, backend="reference")(q, k, v, ga=ga, doc=doc)
    t = torch.arange(T)
    kc, vc = (pool_loop(bnhd(x), block).transpose(1, 2) for x in (k, v))
    p = masked_softmax(q @ kc.transpose(-1, -2) / 2, ((torch.arange(kc.shape[2]) + 1) * block - 1) <= t[:, None])
    coarse = p @ vc
    keys = (t[None, :] <= t[:, None]) & (doc[None, :] == doc[:, None])
    fine_mask = torch.zeros(2, T, T, dtype=torch.bool)
    for h in range(2):
        for i in range(T):
            allowed = {j // block for j in range(T) if keys[i, j]}
            forced = allowed & {i // block}
            rest = sorted(allowed - forced, key=lambda c: (-p[0, h, i, c].item(), c))
            chosen = forced | set(rest[: 2 - len(forced)])
            fine_mask[h, i] = keys[i] & torch.tensor([j // block in chosen for j in range(T)])
    fine = masked_softmax(q @ k.transpose(-1, -2) / 2, fine_mask) @ v
    torch.testing.assert_close(got, ga[..., None] * fine + coarse, rtol=1e-12, atol=1e-12)


def test_layouts_and_packed_sequences_carry_every_input():
    """layout bnhd takes [n, heads] gates (and any [heads, n] input) and [B, n, H, D] tensors; cu_seqlens cuts
    every input along its tokens (the document ids too) and equals one call per sequence."""
    g = torch.Generator().manual_seed(4)
    T = 19
    q, k, v = (torch.randn(1, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    ga, doc = torch.rand(2, T, generator=g, dtype=torch.float64), torch.tensor([0] * 9 + [1] * 10)
    attn = attnc.compile_attention(COMBINED, backend="cpu")
    whole = attn(q, k, v, ga=ga, doc=doc)
    flipped = attn(bnhd(q), bnhd(k), bnhd(v), ga=ga.T, doc=doc, layout="bnhd")
    torch.testing.assert_close(bnhd(flipped), whole, rtol=0, atol=0)
    cu = torch.tensor([0, 7, 7, T])
    packed = attn(q, k, v, ga=ga[None], doc=doc, cu_seqlens=cu)
    parts = [attn(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ga=ga[:, a:b], doc=doc[a:b]) for a, b in ((0, 7), (7, T))]
    torch.testing.assert_close(packed, torch.cat(parts, dim=2), rtol=0, atol=0)


def test_keys_of_existing_patterns_do_not_change():
    """A route without given scores keys as before the field existed (core/ir.py 'when set')."""
    from attnc.core.ir import _canon

    route = attnc.load("stdlib:moba").route
    assert "scores" not in _canon(route) and "probs" not in _canon(route)
    assert attnc.load("stdlib:nsa").key() == attnc.load("stdlib:nsa").key()
    assert attnc.load("stdlib:nsa", window=64).key() != attnc.load("stdlib:nsa").key()


BAD = [  # (replace this, with that), the message, the line of the error
    (("  branch coarse", "  mask causal\n  branch coarse"), "belongs to a branch", 6),
    (("  combine ga * fine + coarse", ""), "no 'combine' clause", 2),
    (("ga * fine + coarse", "ga * fine + coarse + ga * fin"), "no branch 'fin'", 12),
    (("ga * fine + coarse", "ga * fine + coarse + ga * coarse"), "appears twice", 12),
    (("ga * fine + coarse", "doc * fine + coarse"), "must be float\\[heads, n\\]", 12),
    (("ga * fine + coarse", "gb * fine + coarse"), "'gb' is not an input", 12),
    (("ga * fine + coarse", "ga * fine - coarse"), "a sum of terms", 12),
    (("  combine", "  branch extra\n    mask causal\n  combine"), "branch 'extra' is neither combined nor read", 12),
    (("ga * fine + coarse", "fine * ga + coarse"), None, None),  # BRANCH * GATE is GATE * BRANCH
    (("ga * fine + coarse", "fine * fine + coarse"), "is not an input", 12),
    (("branch fine", "branch coarse"), "declared twice", 9),
    (("pooled(mean, block)", "pooled(min, block)"), "unknown pooling 'min'", 7),
    (("pooled(mean, block)", "pooled(mean, blk)"), "'blk' is not a parameter", 7),
    (("blocks(block) by probs(coarse)", "blocks(8) by probs(coarse)"), "must be the runs", 11),
    (("by probs(coarse)", "by probs(fine)"), "no earlier branch 'fine'", 11),
    (("by probs(coarse)", "by softmax(coarse)"), "probs\\(BRANCH\\)", 11),
    (("    mask causal and doc", "    input x: int[n]\n    mask causal and doc"), "shared by every branch", 10),
    (("  tokens seq", "  tokens seq\n  keys pooled(mean, 4)"), "belongs to a branch", 4),
    (("  branch fine", "  branch block"), "name of a parameter", 9),
]


@pytest.mark.parametrize(("change", "message", "line"), BAD, ids=[(b[1] or "swap")[:24] for b in BAD])
def test_checker_errors_name_the_place(change, message, line):
    text = COMBINED.replace(*change)
    assert text != COMBINED
    if message is None:
        assert attnc.load(text) == attnc.load(COMBINED)
        return
    with pytest.raises(SpecError, match=message) as err:
        attnc.load(text)
    assert f"<spec>:{line}:" in str(err.value)


def test_more_checker_errors():
    with pytest.raises(SpecError, match="has no single mask") as err:
        attnc.load("pattern calls\n  mask nsa")
    assert "<spec>:2:" in str(err.value)
    pooled_route = COMBINED.replace("    mask (k + 1) * block - 1 <= q", "    mask causal\n    route topk(1) "
                                    "blocks(1) by q @ mean(k)")
    with pytest.raises(SpecError, match="only a mask"):
        attnc.load(pooled_route)
    with pytest.raises(SpecError, match="need the pattern's layout to be 'tokens seq'"):
        attnc.load(COMBINED.replace("tokens seq", "tokens grid(y: 4, x: 4)"))
    with pytest.raises(SpecError, match="declare them in a 'pattern'"):
        attnc.load("recurrence r\n  branch a\n  combine a")
    with pytest.raises(SpecError, match="at least 1"):
        attnc.load("stdlib:nsa", block=0)
    with pytest.raises(SpecError, match="a route scores by 'q @ mean\\(k\\)'") as err:  # a plain pattern's score
        attnc.load("pattern p\n  mask causal\n  route topk(2) blocks(4) by mean(k)")
    assert "<spec>:3:" in str(err.value)
    with pytest.raises(SpecError, match="a route by probs\\(...\\) belongs to a branch") as err:
        attnc.load("pattern p\n  mask causal\n  route topk(2) blocks(4) by probs(x)")
    assert "<spec>:3:3" in str(err.value)


def test_check_leaves_bare_parameters_symbolic(tmp_path):
    """attnc check of a combined pattern whose sizes are bare parameters (symbols while checking)."""
    path = tmp_path / "bare.attn"
    path.write_text(COMBINED.replace("two(block = 4)", "two(block)"))
    status, text = run_cli(["check", str(path)])
    assert status == 0 and "ok (1 declaration: two)" in text and "warning" not in text
    path.write_text(COMBINED.replace("two(block = 4)", "two(block)").replace("  input doc: int[n]\n",
                                                                            "  input doc: int[n]\n  input w: float[n]\n"))
    status, text = run_cli(["check", str(path)])
    assert status == 0 and "declares input 'w' but no clause reads it" in text


def test_call_errors_name_the_argument(tmp_path):
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=4, selected=3, window=3)
    q, k, v, gates = draw(0, 1, 2, 1, 12, 4)
    cases = [
        ({**gates, "g_cmp": None}, {}, "argument g_cmp", "missing gate"),
        ({**gates, "g_cmp": torch.rand(2, 11, dtype=torch.float64)}, {}, "argument g_cmp", "expected \\[2, 12\\]"),
        ({**gates, "g_swa": torch.ones(2, 12, dtype=torch.int64)}, {}, "argument g_swa", "float tensor"),
        ({**gates, "g_sw": gates["g_swa"]}, {}, "argument g_sw", "no input 'g_sw'"),
        (gates, {"return_lse": True}, "argument return_lse", "no single log-sum-exp"),
        (gates, {"cu_seqlens": torch.tensor([0, 5, 11])}, "argument cu_seqlens", "must end at"),
    ]
    for inputs, extra, where, message in cases:
        with pytest.raises(SpecError, match=message) as err:
            attn(q, k, v, **{n: t for n, t in inputs.items() if t is not None}, **extra)
        assert err.value.where == where
    with pytest.raises(SpecError, match="no single mask"):
        attnc.materialize_mask("stdlib:nsa", n=8)
    from attnc.runtime import gpu_check

    with pytest.raises(SpecError, match="offline check of blocks takes one softmax pattern") as err:
        gpu_check.check_pattern("stdlib:nsa", archs=(90,), head_dims=(64,), n=256, block=True)
    assert err.value.where == "argument block"
    import torch.distributed as dist

    from attnc.distributed import ContextParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        with pytest.raises(SpecError, match="context parallelism does not run combined patterns"):
            ContextParallel(attn)
    finally:
        dist.destroy_process_group()


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue() + err.getvalue()


def test_cli_check_show_sim():
    status, text = run_cli(["check", "stdlib:nsa"])
    assert status == 0 and "ok (1 declaration: nsa)" in text and "warning" not in text
    status, text = run_cli(["show", "stdlib:nsa", "--n", "12", "-p", "block=4,selected=2,window=3"])
    assert status == 0 and text.count("# branch") == 3 and "3 runs" in text
    cmp_rows = text.split("# branch cmp")[1].split("# branch")[0].splitlines()[2:14]
    assert cmp_rows[:3] == ["..."] * 3 and cmp_rows[3] == "#.." and cmp_rows[-1] == "###"
    status, text = run_cli(["sim", "stdlib:nsa", "--n", "4096"])
    assert status == 0 and "sum of the branches" in text and text.count("# branch") == 3
    status, text = run_cli(["emit", "stdlib:nsa"])  # every branch's kernels, each launch named by its branch
    assert status == 0 and all(f"launch [{b}] attnc_fwd" in text for b in ("cmp", "slc", "swa"))
    status, text = run_cli(["sim", "stdlib:nsa", "--n", "256", "--ranks", "2"])
    assert status != 0 and "argument --ranks" in text and "combines several attentions" in text


def test_simulate_sums_the_branches():
    rep = attnc.simulate("stdlib:nsa", n=4096, heads=2)
    parts = [r.best.forward_s for r in rep.branches.values()]
    assert list(rep.branches) == ["cmp", "slc", "swa"] and rep.forward_s == pytest.approx(sum(parts))
    assert rep.branches["cmp"].nk == 64 and rep.to_dict()["kind"] == "combined"


def test_the_cuda_schedule_search_reads_the_first_batch_elements_route_scores():
    """On CUDA a branch's config comes from the schedule search (``search_config``), which reads a routed
    branch's scores unbatched: the call passes them ``[B, Hq, n, runs]``, and the search reads the first
    batch element (it refused the batched tensor before)."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.runtime.backends.triton import runner as TB

    slc = attnc.load("stdlib:nsa", block=32, selected=4).branch("slc").pattern
    bound = E.bind_sizes(slc, n=512, nk=512, heads=2)
    scores = torch.rand(2, 2, 512, 16, generator=torch.Generator().manual_seed(0))
    batched = TB.search_config(slc, bound, "h100", head_dim=64, inputs={"probs(cmp)": scores})
    assert batched == TB.search_config(slc, bound, "h100", head_dim=64, inputs={"probs(cmp)": scores[0]})


# ----------------------------------------------------------------------------- queries after a KV cache
@FEW
@given(seed=st.integers(0, 2**16), T=st.integers(1, 40), rows=st.integers(1, 4), block=st.sampled_from([3, 4, 8]),
       selected=st.integers(3, 5), window=st.integers(1, 9), gqa=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
       whole_gates=st.booleans())
def test_a_kv_cache_call_is_the_last_rows_of_the_whole(seed, T, rows, block, selected, window, gqa, whole_gates):
    """The last ``rows`` queries after a cache of the earlier tokens: the rows of the dense float64 NSA of the
    whole sequence, forward and gradients (gates given for the present queries or for the whole sequence)."""
    Hq, Hkv = gqa
    rows = min(rows, T)
    q, k, v, gates = draw(seed, 2, Hq, Hkv, T, 4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates.values())]
    whole, _, _ = dense_nsa(*leaves[:3], dict(zip(GATES, leaves[3:], strict=True)), block, selected, window)
    want = whole[:, :, T - rows:]
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=block, selected=selected, window=window)
    mine = [x.clone().requires_grad_() for x in (q, k, v, *gates.values())]
    given_gates = {g: (t if whole_gates else t[..., T - rows:]) for g, t in zip(GATES, mine[3:], strict=True)}
    got = attn(mine[0][:, :, T - rows:], mine[1], mine[2], **given_gates)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed), dtype=got.dtype)
    for g_got, g_want in zip(torch.autograd.grad((got * w).sum(), mine), torch.autograd.grad((want * w).sum(), leaves),
                             strict=True):
        torch.testing.assert_close(g_got, g_want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
@pytest.mark.parametrize("rows", [1, 3])
def test_backends_decode_after_a_kv_cache(backend, rows):
    """A decode step (``rows`` queries after a cache) on every backend equals the reference's whole call's rows."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, gates = draw(11, 2, 4, 2, 37, 8, dtype)
    kw = {"block": 8, "selected": 3, "window": 6}
    want = attnc.compile_attention("stdlib:nsa", backend="reference", **kw)(q.double(), k.double(), v.double(),
                                                                             **{g: t.double() for g, t in gates.items()})
    attn = attnc.compile_attention("stdlib:nsa", backend=backend, q_tile=16, kv_tile=16, **kw)
    got = attn(q[:, :, -rows:], k, v, **{g: t[..., -rows:] for g, t in gates.items()})
    tol = {"rtol": 2e-5, "atol": 2e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want[:, :, -rows:].to(dtype), **tol)


BIASED_POOL = """
pattern three(block = 4)
  tokens seq
  input ga: float[heads, n]
  branch coarse
    keys pooled(mean, block)
    mask (k + 1) * block - 1 <= q
  branch biased
    keys pooled(mean, block)
    bias 0.5 * k
    mask (k + 1) * block - 1 <= q
  combine ga * biased + coarse
"""


def test_kv_cache_refusals_name_the_argument():
    q, k, v, gates = draw(2, 1, 2, 1, 12, 4)
    attn = attnc.compile_attention("stdlib:nsa", backend="reference", block=4, selected=3, window=3)
    with pytest.raises(attnc.SpecError, match="argument g_cmp.*expected \\[2, 2 or 12\\]"):
        attn(q[:, :, -2:], k, v, **{**{g: t[..., -2:] for g, t in gates.items()}, "g_cmp": gates["g_cmp"][..., :5]})
    with pytest.raises(attnc.SpecError, match="argument k.*nk >= n"):
        attn(q, k[:, :, :5], v[:, :, :5], **gates)
    with pytest.raises(attnc.SpecError, match="argument cu_seqlens"):
        attn(q[:, :, -2:], k, v, cu_seqlens=torch.tensor([0, 2]), **{g: t[..., -2:] for g, t in gates.items()})
    # a pooled branch with more than a mask (here a bias) is not computed after a cache: refused, named
    biased = attnc.compile_attention(BIASED_POOL, backend="reference")
    full = biased(q, k, v, ga=gates["g_cmp"])  # every token: computed
    assert full.shape == q.shape
    with pytest.raises(attnc.SpecError, match="branch 'biased'.*more than a mask") as err:
        biased(q[:, :, -2:], k, v, ga=gates["g_cmp"][..., -2:])
    assert err.value.where == "argument k"


def test_a_general_combination_after_a_kv_cache():
    """COMBINED (a document mask read by its routed branch) after a cache: the whole call's last rows."""
    T = 21
    q, k, v, _ = draw(5, 2, 2, 1, T, 4)
    ga = torch.rand(2, 2, T, dtype=torch.float64)
    doc = torch.tensor([0] * 9 + [1] * (T - 9))
    attn = attnc.compile_attention(COMBINED, backend="reference")
    whole = attn(q, k, v, ga=ga, doc=doc)
    for rows in (1, 4):
        got = attn(q[:, :, -rows:], k, v, ga=ga[..., -rows:], doc=doc)
        torch.testing.assert_close(got, whole[:, :, -rows:], rtol=1e-12, atol=1e-12)
