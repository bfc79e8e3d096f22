"""Token routes: ``route topk(K) tokens by q @ k | QI @ KI`` and the stdlib ``token_topk``.

The reference backend is compared with a naive float64 implementation written here from the rule of
spec/REFERENCE.md (per query: the keys the mask allows; those ``keep`` forces, counted in K; the rest
by the highest score, ties to the lower key index; ``shared`` averages the scores over heads); every
other backend is compared with the reference, forward and backward.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.core.errors import SpecError

FEW = settings(max_examples=10, deadline=None)

WINDOWED = """
pattern windowed_topk(topk = 3, reach = 9)
  tokens seq
  mask causal and q - k < reach
  route topk(topk) tokens by q @ k keep q == k
"""

INDEXED = """
pattern indexed_topk(topk = 3)
  tokens seq
  input qi: float[heads, n, 3]
  input ki: float[heads, nk, 3]
  mask causal
  route topk(topk) tokens by qi @ ki
"""

SHARED = """
pattern shared_topk(topk = 4)
  tokens seq
  mask causal
  route topk(topk) tokens by q @ k shared
"""


def naive_selection(score, allowed, forced, topk):
    """Per query row: the forced allowed keys, then the highest scores among the other allowed
    keys (ties: lower index), K in all (python lists, float64)."""
    chosen = []
    for s_row, a_row, f_row in zip(score, allowed, forced, strict=True):
        keys = {j for j, (a, f) in enumerate(zip(a_row, f_row, strict=True)) if a and f}
        rest = sorted((j for j, a in enumerate(a_row) if a and j not in keys), key=lambda j: (-s_row[j], j))
        keys |= set(rest[: max(0, topk - len(keys))])
        chosen.append(keys)
    return chosen


def naive_attention(q, k, v, scores, allowed, forced, topk, scale):
    """Dense float64 attention over each query's chosen keys (queries are the last Nq keys)."""
    B, Hq, Nq, _ = q.shape
    Hkv = k.shape[1]
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            chosen = naive_selection(scores[b][h], allowed, forced, topk)
            for i, keys in enumerate(chosen):
                if not keys:
                    continue
                keys = sorted(keys)
                s = (k[b, kh, keys].double() @ q[b, h, i].double()) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, kh, keys].double()
    return out, lse


def draw(g, integer, *shape):
    """Integer-valued draws make exact score ties frequent (the lower key index wins)."""
    if integer:
        return torch.randint(-2, 3, shape, generator=g).double()
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@FEW
@given(st.integers(0, 10_000), st.sampled_from([(1, 1), (2, 1), (2, 2)]), st.integers(1, 24), st.integers(0, 5),
       st.integers(1, 6), st.booleans())
def test_qk_route_matches_naive(seed, heads, nq, extra, topk, integer):
    """Causal, a reach of 9 keys, the query's own key forced; queries after a KV cache of ``extra`` keys."""
    g = torch.Generator().manual_seed(seed)
    (Hq, Hkv), B, D, nk = heads, 2, 3, nq + extra
    q, k = draw(g, integer, B, Hq, nq, D), draw(g, integer, B, Hkv, nk, D)
    v = torch.randn(B, Hkv, nk, D, generator=g, dtype=torch.float64)
    attn = attnc.compile_attention(WINDOWED, topk=topk, backend="reference")
    out, lse = attn(q, k, v, return_lse=True)
    pos = [[(i + extra, j) for j in range(nk)] for i in range(nq)]
    allowed = [[j <= i and i - j < 9 for i, j in row] for row in pos]
    forced = [[i == j for i, j in row] for row in pos]
    kr = k.repeat_interleave(Hq // Hkv, 1)
    scores = (q @ kr.transpose(-1, -2)).tolist()
    want, want_lse = naive_attention(q, k, v, scores, allowed, forced, topk, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


@FEW
@given(st.integers(0, 10_000), st.integers(1, 20), st.integers(1, 5), st.booleans(), st.booleans())
def test_indexer_and_shared_routes_match_naive(seed, n, topk, integer, batched_index):
    g = torch.Generator().manual_seed(seed)
    B, H, D = 2, 2, 4
    q, k, v = (draw(g, integer, B, H, n, D) for _ in range(3))
    causal = [[j <= i for j in range(n)] for i in range(n)]
    nothing = [[False] * n for _ in range(n)]
    # the indexer: scores from qi . ki, never from q and k
    qi = draw(g, integer, *((B,) if batched_index else ()), H, n, 3)
    ki = draw(g, integer, B, H, n, 3)
    out = attnc.compile_attention(INDEXED, topk=topk, backend="reference")(q, k, v, qi=qi, ki=ki)
    scores = (torch.broadcast_to(qi, (B, H, n, 3)) @ ki.transpose(-1, -2)).tolist()
    want, _ = naive_attention(q, k, v, scores, causal, nothing, topk, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    # shared: one selection per query for every head, by the head-mean score
    out = attnc.compile_attention(SHARED, topk=topk, backend="reference")(q, k, v)
    mean = (q @ k.transpose(-1, -2)).mean(1, keepdim=True).expand(B, H, n, n)
    want, _ = naive_attention(q, k, v, mean.tolist(), causal, nothing, topk, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_stdlib_token_topk_keeps_k_keys_per_query():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    mask = attnc.materialize_mask("stdlib:token_topk", n=40, heads=2, topk=5, q=q, k=k)
    assert mask.shape == (1, 2, 40, 40)
    mask = mask[0]
    counts = mask.sum(-1)
    assert torch.equal(counts, torch.arange(1, 41).clamp(max=5).expand_as(counts))
    assert not (mask & ~torch.ones(40, 40, dtype=torch.bool).tril()).any()
    # the kept keys are the highest-scoring causal ones
    s = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(40, 40, dtype=torch.bool).tril(), -math.inf)
    kept_min = s.masked_fill(~mask, math.inf).amin(-1)
    dropped_max = s.masked_fill(mask, -math.inf).amax(-1)
    assert (kept_min[..., 5:] >= dropped_max[..., 5:]).all()


CASES = [  # (spec, params, B, Hq, Hkv, Nq, Nk, inputs)
    (WINDOWED, {"topk": 3}, 2, 2, 1, 37, 37, False),
    (WINDOWED, {"topk": 2}, 1, 2, 2, 9, 30, False),  # queries after a KV cache
    (INDEXED, {"topk": 5}, 1, 2, 2, 33, 33, True),
    ("stdlib:token_topk", {"topk": 6}, 2, 2, 1, 40, 40, False),
]


PAIRS = [pytest.param(b, c, id=f"{b}-{name}") for c, name in zip(CASES, ["window", "kv-cache", "indexer", "stdlib"],
                                                                  strict=True)
         for b in ("cpu", "flex", "triton")]


@pytest.mark.parametrize(("backend", "case"), PAIRS)
def test_backends_match_the_reference(backend, case):
    spec, params, B, Hq, Hkv, Nq, Nk, indexed = case
    g = torch.Generator().manual_seed(Nq)
    q, k, v = (torch.randn(B, H, N, 8, generator=g) for H, N in ((Hq, Nq), (Hkv, Nk), (Hkv, Nk)))
    inputs = {"qi": torch.randn(Hq, Nq, 3, generator=g), "ki": torch.randn(B, Hq, Nk, 3, generator=g)} if indexed else {}
    results = {}
    for name in ("reference", backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        attn = attnc.compile_attention(spec, backend=name, q_tile=16, kv_tile=16, **params)
        out, lse = attn(qq, kk, vv, return_lse=True, **inputs)
        grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (qq, kk, vv))
        results[name] = (out, lse, *grads)
    for got, want in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_checker_errors_name_the_place():
    with pytest.raises(SpecError, match="scores single keys") as err:
        attnc.compile_attention(WINDOWED.replace("q @ k", "q @ mean(k)"))
    assert ":5:" in str(err.value)
    with pytest.raises(SpecError, match="not a mix"):
        attnc.compile_attention(INDEXED.replace("qi @ ki", "qi @ k"))
    with pytest.raises(SpecError, match="must be declared float\\[heads, nk, DI\\]"):
        attnc.compile_attention(INDEXED.replace("ki: float[heads, nk, 3]", "ki: float[heads, n, 3]"))
    with pytest.raises(SpecError, match="different last dimensions"):
        attnc.compile_attention(INDEXED.replace("ki: float[heads, nk, 3]", "ki: float[heads, nk, 4]"))
    with pytest.raises(SpecError, match="unknown name 'kj'"):
        attnc.compile_attention(INDEXED.replace("qi @ ki", "qi @ kj"))
    with pytest.raises(SpecError, match="'blocks\\(SIZE\\)' or 'tokens', got 'keys'"):
        attnc.compile_attention(WINDOWED.replace("tokens by", "keys by"))
    with pytest.raises(SpecError, match="argument topk: error: must be at least 1, got 0"):
        attnc.compile_attention("stdlib:token_topk", topk=0)


def test_call_errors_name_the_argument():
    attn = attnc.compile_attention(INDEXED, backend="cpu")
    q = k = v = torch.randn(1, 2, 8, 4)
    with pytest.raises(SpecError, match="argument qi"):
        attn(q, k, v, qi=torch.randn(2, 8, 2), ki=torch.randn(2, 8, 3))
    with pytest.raises(SpecError, match="argument ki"):
        attn(q, k, v, qi=torch.randn(2, 8, 3), ki=torch.randint(0, 2, (2, 8, 3)))


def test_cli_check_and_sim_take_token_routes(tmp_path):
    path = tmp_path / "idx.attn"
    path.write_text(INDEXED)
    for argv in (["check", str(path)], ["sim", "stdlib:token_topk", "--n", "2048", "-p", "topk=128"]):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            assert cli.main(argv) == 0, err.getvalue()
        assert "unused" not in out.getvalue() + err.getvalue()
    assert "token route" in out.getvalue()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 12), st.booleans(), st.booleans(), st.booleans())
def test_threshold_choice_equals_the_sorted_rule(seed, nblocks, topk, integer, forced, minus_inf):
    """routing.choose's fast paths (no sort of every block) pick what the rule picks: finite scores with
    frequent exact ties, +inf scores, forced blocks, rows with fewer candidates than places; candidates
    scored -inf (the sorted fallback, which must rank them before every block that is no candidate)."""
    from attnc.runtime.plan import routing

    g = torch.Generator().manual_seed(seed)
    shape = (2, 3, 7, nblocks)
    score = torch.randint(-2, 3, shape, generator=g).float() if integer else torch.randn(shape, generator=g)
    score = torch.where(torch.rand(shape, generator=g) < 0.05, torch.inf, score)
    if minus_inf:  # candidates scored -inf: taken when places are left, after every finite one
        score = torch.where(torch.rand(shape, generator=g) < 0.2, -torch.inf, score)
    allowed = torch.rand(shape, generator=g) < 0.7
    keep = (torch.rand(shape, generator=g) < 0.2) if forced else None
    got = routing.choose(score, allowed, keep, topk)
    # the rule, literally: forced, then candidates by (score desc, index asc)
    want = torch.zeros(shape, dtype=torch.bool)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in shape[:-1])).tolist():
        a, s = allowed[tuple(idx)], score[tuple(idx)]
        f = a & keep[tuple(idx)] if keep is not None else torch.zeros_like(a)
        rest = sorted((j for j in range(nblocks) if a[j] and not f[j]), key=lambda j: (-float(s[j]), j))
        row = f.clone()
        row[rest[: max(0, topk - int(f.sum()))]] = True
        want[tuple(idx)] = row
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton"])
def test_an_indexer_route_decodes_as_the_whole_sequence(backend):
    """Indexer inputs are declared over the whole sequence: a decode step's queries score with their own rows
    (the last ones), so its output is the full call's last rows (it read the first rows before)."""
    src = ("pattern p(topk = 3)\n  tokens seq\n  input qi: float[heads, n, 4]\n  input ki: float[heads, nk, 4]\n"
           "  mask causal\n  route topk(topk) tokens by qi @ ki\n")
    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g, dtype=torch.float64) for _ in range(3))
    qi, ki = (torch.randn(2, 40, 4, generator=g, dtype=torch.float64) for _ in range(2))
    full = attnc.compile_attention(src, backend="reference")(q, k, v, qi=qi, ki=ki)
    attn = attnc.compile_attention(src, backend=backend)
    for rows in (1, 3):
        step = attn(*(x.to(dtype) for x in (q[:, :, -rows:], k, v)), qi=qi.to(dtype), ki=ki.to(dtype))
        torch.testing.assert_close(step.double(), full[:, :, -rows:], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "flex", "triton", "auto"])
def test_inputs_that_only_select_take_no_gradient_on_any_backend(backend):
    # an indexer's inputs, a route's gate, a mask's centroids are not differentiated: their .grad stays None on
    # every backend (the kernel backends' ops handed back zeros, the reference None); a bias input's flows
    H, N, D = 2, 24, 8
    gen = torch.Generator().manual_seed(5)
    cases = [("stdlib:seer", {"block": 8, "topk": 2}, {"gate": (H, N, 3)}),
             ("stdlib:dsa", {"topk": 5, "index_heads": 2, "index_dim": 4},
              {"qi": (N, 2, 4), "ki": (N, 4), "w": (N, 2)}),
             ("stdlib:cluster_mask", {"clusters": 3}, {"centroids": (H, 3, D)}),
             ("stdlib:dma", {"window": 5}, {"importance": (H, N)})]
    for spec, params, shapes in cases:
        q, k, v = (torch.randn(1, H, N, D, generator=gen).requires_grad_() for _ in range(3))
        inputs = {name: torch.randn(*shape, generator=gen).requires_grad_() for name, shape in shapes.items()}
        attnc.compile_attention(spec, backend=backend, **params)(q, k, v, **inputs).sum().backward()
        assert all(t.grad is not None for t in (q, k, v)), spec
        for name, t in inputs.items():
            if spec == "stdlib:dma":  # the importance is also the bias
                assert t.grad is not None and bool(t.grad.abs().sum() > 0), (spec, name)
            else:
                assert t.grad is None, (spec, name, backend)
