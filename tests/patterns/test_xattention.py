"""Top-p block selection by antidiagonal scoring (XAttention): ``route topp(P) blocks(SIZE) by
antidiagonal(STRIDE) [keep EXPR]`` and the stdlib ``xattention``.

The selection is compared with a naive float64 implementation written here, with loops, from the rule
of spec/REFERENCE.md (mit-han-lab/x-attention's xattn_estimate / find_blocks_chunked, commit e3798877);
the reference backend's attention with dense float64 attention over that selection; every other
backend with the reference, forward and backward. A few hand-made rows pin the code's two quirks
(the two places reserved for forced blocks, block 0 always selected) with the selections its
find_blocks_chunked returns for them.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from ranks import assert_context_parallel_refuses

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.core import ir
from attnc.core.errors import SpecError
from attnc.runtime.plan import antidiagonal, routing

FEW = settings(max_examples=25, deadline=None)

MASKS = {  # name -> (mask clause, the same predicate in Python)
    "causal": ("causal", lambda q, k: k <= q),
    "none": ("true", lambda q, k: True),
    "window": ("causal and q - k < 11", lambda q, k: k <= q and q - k < 11),
}


def spec(p: float, block: int, stride: int, mask: str, keep: str | None) -> str:
    keep_part = f" keep {keep}" if keep else ""
    return (f"pattern xa\n  tokens seq\n  mask {MASKS[mask][0]}\n"
            f"  route topp({p}) blocks({block}) by antidiagonal({stride}){keep_part}\n")


KEEPS = {  # name -> (keep clause, the same predicate in Python of (query, first key of the block), block)
    None: (None, None),
    "diagonal": ("q // {b} == k // {b}", lambda q, k, b: q // b == k // b),
    "diagonal_and_first": ("q // {b} == k // {b} or (k < {b} and q >= {c})",
                           lambda q, k, b, c=None: q // b == k // b or (k < b and q >= c)),
}


def naive_selection(q, k, block, stride, p, allowed, keep) -> torch.Tensor:
    """bool [B, H, query blocks, key blocks], from the rule, with loops in float64.

    ``allowed(q, k)``: the mask; ``keep(q, first key of the block)`` or None."""
    B, H, N, D = q.shape
    group = H // k.shape[1]
    runs, nb, per = -(-N // stride), -(-N // block), block // stride
    qs, ks = q.tolist(), k.tolist()
    out = torch.zeros(B, H, nb, nb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            qv, kv = qs[b][h], ks[b][h // group]
            mass = [[0.0] * nb for _ in range(nb)]
            for i in range(runs):
                logits = {}
                for j in range(runs):
                    tile = [(a, c) for a in range(i * stride, min(i * stride + stride, N))
                            for c in range(j * stride, min(j * stride + stride, N))]
                    if not any(allowed(a, c) for a, c in tile):
                        continue
                    dot = 0.0
                    for s in range(stride):  # the antidiagonal: query offsets reversed
                        a, c = i * stride + stride - 1 - s, j * stride + s
                        if a < N and c < N:
                            dot += sum(x * y for x, y in zip(qv[a], kv[c], strict=True))
                    logits[j] = dot / math.sqrt(D) / stride
                if not logits:
                    continue
                top = max(logits.values())
                z = sum(math.exp(x - top) for x in logits.values())
                for j, x in logits.items():
                    mass[i // per][j // per] += math.exp(x - top) / z
            for qb in range(nb):
                rows = range(qb * block, min(qb * block + block, N))
                cand = {kb for kb in range(nb) if any(allowed(a, c) for a in rows
                                                      for c in range(kb * block, min(kb * block + block, N)))}
                forced = {kb for kb in range(nb) if keep is not None and any(keep(a, kb * block) for a in rows)}
                row = mass[qb]
                required = p * sum(row)
                others = sorted((kb for kb in range(nb) if kb not in forced), key=lambda kb: (-row[kb], kb))
                ranked = sorted(forced) + others
                listed = ([0.0, sum(row[kb] for kb in forced)] if keep is not None else []) + [row[kb] for kb in others]
                listed = (listed + [0.0] * nb)[:nb]
                taken, before = set(), 0.0
                for m, kb in enumerate(ranked):
                    if before < required:
                        taken.add(kb)
                    before += listed[m]
                taken |= forced | {0}
                for kb in taken & cand:
                    out[b, h, qb, kb] = True
    return out


def token_mask(sel, block, N, allowed) -> torch.Tensor:
    """The selection as a token mask [B, H, N, N], with the pattern's mask."""
    base = torch.tensor([[allowed(a, c) for c in range(N)] for a in range(N)])
    blk = torch.arange(N) // block
    return base & sel[:, :, blk][:, :, :, blk]


def draw(seed, B, H, Hkv, N, D, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, N, D, generator=g, dtype=torch.float64) * s
                 for h, s in ((H, scale), (Hkv, scale), (Hkv, 1.0)))


def attnc_selection(src, q, k, N, H):
    pat = attnc.load(src)
    bound = E.bind_sizes(pat, n=N, nk=N, heads=H, dk=q.shape[-1])
    mask = E.mask_tensor(pat, bound)
    return routing.select_blocks(pat, bound, q, k, mask, None)


@FEW
@given(
    st.integers(0, 10_000),
    st.sampled_from([1, 2, 4]),                  # stride
    st.sampled_from([1, 2, 3]),                  # runs per block
    st.integers(1, 5),                           # blocks (the last one partial when cut)
    st.integers(0, 3),                           # tokens cut from the end
    st.sampled_from([0.3, 0.6, 0.8, 0.9, 0.97, 1.0]),
    st.sampled_from([(1, 1), (2, 1), (3, 3)]),
    st.sampled_from(list(MASKS)),
    st.sampled_from(list(KEEPS)),
)
def test_selection_matches_the_naive_rule(seed, stride, runs, nblocks, cut, p, heads, mask, keep):
    block = stride * runs
    N = max(1, block * nblocks - cut)
    H, Hkv = heads
    q, k, _ = draw(seed, 2, H, Hkv, N, 4)
    chunk = 2 * block
    keep_text = KEEPS[keep][0].format(b=block, c=chunk) if keep else None
    fn = KEEPS[keep][1]
    keep_fn = None if fn is None else (lambda a, c: fn(a, c, block, chunk)) if keep == "diagonal_and_first" \
        else (lambda a, c: fn(a, c, block))
    allowed = MASKS[mask][1]
    want = token_mask(naive_selection(q, k, block, stride, p, allowed, keep_fn), block, N, allowed)
    got = attnc_selection(spec(p, block, stride, mask, keep_text), q, k, N, H)
    assert torch.equal(got, want)


def test_the_selection_is_sparse_and_real():
    """At p < 1 on data with a few strong blocks, blocks the mask allows are dropped, and the output differs
    from the mask's attention; at p = 1 every block the mask allows is kept (the mask's attention)."""
    q, k, v = draw(3, 1, 2, 2, 64, 8, scale=3.0)
    causal = attnc.compile_attention("pattern c\n  tokens seq\n  mask causal\n", backend="reference")
    sparse = attnc.compile_attention(spec(0.5, 8, 2, "causal", None), backend="reference")
    dense = attnc.compile_attention(spec(1.0, 8, 2, "causal", None), backend="reference")
    sel = attnc_selection(spec(0.5, 8, 2, "causal", None), q, k, 64, 2)
    assert sel.sum() < 2 * 64 * 65 // 2 * 0.8
    assert not torch.allclose(sparse(q, k, v), causal(q, k, v))
    torch.testing.assert_close(dense(q, k, v), causal(q, k, v), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("forced,want", [
    # one forced block (the diagonal): the largest other block is always taken, the next ones while
    # (0, forced total, others...) before their place is below P; block 0 too (x-attention's redirect)
    ({4}, {0, 1, 3, 4}),
    # two forced (block 0 and the diagonal): the plain rule
    ({0, 4}, {0, 1, 4}),
])
def test_threshold_pins_the_codes_accounting(forced, want):
    """Rows run through x-attention's find_blocks_chunked (causal, threshold 0.9) gave these selections."""
    mass = torch.tensor([[4.8721e-03, 7.6874e-01, 1.6180e-02, 4.9245e-02, 1.6097e-01]], dtype=torch.float64)
    keep = torch.tensor([[b in forced for b in range(5)]])
    got = antidiagonal.threshold(mass, torch.ones(1, 5, dtype=torch.bool), keep, 0.9)
    assert {i for i in range(5) if got[0, i]} == want


def test_threshold_without_keep_is_the_plain_rule_with_block_zero():
    mass = torch.tensor([[0.05, 0.5, 0.3, 0.15]], dtype=torch.float64)
    cand = torch.ones(1, 4, dtype=torch.bool)
    got = antidiagonal.threshold(mass, cand, None, 0.7)  # 0.5 then 0.3 crosses 0.7: the boundary block counts
    assert got.tolist() == [[True, True, True, False]]  # block 0 by the redirect
    got = antidiagonal.threshold(mass, cand & torch.tensor([[False, True, True, True]]), None, 0.7)
    assert got.tolist() == [[False, True, True, False]]  # a block the mask does not reach never is


# ------------------------------------------------------------------------------------- backends
def _run(backend, src, q, k, v, **kw):
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    attn = attnc.compile_attention(src, backend=backend, **kw)
    out, lse = attn(qq, kk, vv, return_lse=True)
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    grads = torch.autograd.grad((out * w).sum() + lse.sum(), (qq, kk, vv))
    return out, lse, *grads


def naive_attention(q, k, v, tmask):
    B, H, N, D = q.shape
    group = H // k.shape[1]
    kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (q @ kk.transpose(-1, -2)) / math.sqrt(D)
    s = s.masked_fill(~tmask, -math.inf)
    return torch.softmax(s, -1) @ vv, torch.logsumexp(s, -1)


def test_reference_attention_is_dense_attention_over_the_naive_selection():
    q, k, v = draw(11, 2, 4, 2, 37, 8, scale=3.0)
    allowed = MASKS["causal"][1]
    sel = naive_selection(q, k, 8, 4, 0.6, allowed, lambda a, c: a // 8 == c // 8)
    out, lse = attnc.compile_attention(spec(0.6, 8, 4, "causal", "q // 8 == k // 8"), backend="reference")(
        q, k, v, return_lse=True)
    want, want_lse = naive_attention(q, k, v, token_mask(sel, 8, 37, allowed))
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend,dtype,tol", [
    ("cpu", torch.float64, 1e-10), ("flex", torch.float64, 1e-10), ("cpu", torch.float32, 2e-5),
    ("triton", torch.float32, 2e-5),
])
@pytest.mark.parametrize("mask,keep", [("causal", "diagonal_and_first"), ("window", None)])
def test_backends_match_the_reference(backend, dtype, tol, mask, keep):
    """Forward (out, lse) and backward (dq, dk, dv), GQA, a partial last block, tiles across blocks."""
    N, block, stride = 45, 8, 2
    q, k, v = (t.to(dtype) for t in draw(5, 2, 4, 2, N, 8, scale=3.0))
    keep_text = KEEPS[keep][0].format(b=block, c=24) if keep else None
    src = spec(0.7, block, stride, mask, keep_text)
    ref = _run("reference", src, q, k, v)
    got = _run(backend, src, q, k, v, q_tile=16, kv_tile=16)
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)
    sel = attnc_selection(src, q.double(), k.double(), N, 4)
    base = torch.tensor([[MASKS[mask][1](a, c) for c in range(N)] for a in range(N)])
    assert sel.sum() < base.sum() * 2 * 4  # the selection dropped some allowed pairs


def test_stdlib_defaults_select_like_the_rule():
    """The stdlib pattern at small sizes (its parameters passed) against the naive rule."""
    q, k, _ = draw(7, 1, 2, 1, 40, 8, scale=3.0)
    got = attnc_selection(_stdlib_text(8, 4, 0.8, 16), q, k, 40, 2)
    allowed = MASKS["causal"][1]
    want = naive_selection(q, k, 8, 4, 0.8, allowed, lambda a, c: a // 8 == c // 8 or (c < 8 and a >= 16))
    assert torch.equal(got, token_mask(want, 8, 40, allowed))


def _stdlib_text(block, stride, threshold, chunk) -> str:
    from importlib import resources

    text = resources.files("attnc.stdlib_patterns").joinpath("xattention.attn").read_text()
    for default, value in (("block >= 1 = 128", block), ("stride >= 1 = 16", stride),
                           ("threshold > 0 = 0.9", threshold), ("chunk >= 0 = 16384", chunk)):
        assert default in text, default
        text = text.replace(default, f"{default.split()[0]} = {value}")
    return text


# --------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("route,match,at", [  # at: the text the error points to
    ("topp(0) blocks(8) by antidiagonal(2)", r"topp must be in \(0, 1\], got 0", "0)"),
    ("topp(1.5) blocks(8) by antidiagonal(2)", r"topp must be in \(0, 1\], got 1.5", "1.5"),
    ("topp(n / 100) blocks(8) by antidiagonal(2)", r"topp must be a constant", "n /"),
    ("topp(0.5) blocks(8) by antidiagonal(3)", r"the antidiagonal stride 3 does not divide the block size 8", "3)"),
    ("topp(0.5) blocks(8) by antidiagonal(0)", r"the antidiagonal stride must be at least 1, got 0", "0)"),
    ("topp(0.5) blocks(8) by antidiagonal(k)", r"the antidiagonal stride must not depend on q, k or h", "k)"),
    ("topp(0.5) blocks(0) by antidiagonal(1)", r"a block size must be at least 1, got 0", "0)"),
    ("topp(0.5) blocks(8) by antidiagonal(2) shared", r"unexpected 'shared'", "shared"),
    ("topp(true) blocks(8) by antidiagonal(2)", r"topp", "true"),
])
def test_clause_errors_are_located(route, match, at):
    with pytest.raises(SpecError, match=match) as info:
        attnc.load(f"pattern xa\n  tokens seq\n  mask causal\n  route {route}\n")
    assert (info.value.pos.line, info.value.pos.col) == (4, len("  route ") + route.index(at) + 1)


def test_layouts_other_than_one_sequence_are_refused():
    with pytest.raises(SpecError, match="needs one sequence layout for queries and keys, not a grid") as info:
        attnc.load("pattern g\n  tokens grid(y: height, x: width)\n  route topp(0.5) blocks(4) by antidiagonal(2)\n")
    assert info.value.pos.line == 3
    with pytest.raises(SpecError, match="not different query and key layouts"):
        attnc.load("pattern g\n  queries seq\n  keys seq\n  route topp(0.5) blocks(4) by antidiagonal(2)\n")
    with pytest.raises(SpecError, match="'route' is not allowed in a recurrence"):
        attnc.load("recurrence r\n  route topp(0.5) blocks(4) by antidiagonal(2)\n")


def test_stdlib_parameters_are_checked():
    """A bad argument is named as the user gave it; where the stdlib file reads it, in the hint."""
    with pytest.raises(SpecError, match=r"argument threshold: error: topp must be in \(0, 1\], got 1.2") \
            as info:
        attnc.compile_attention("stdlib:xattention", threshold=1.2)
    assert re.match(r"'threshold' is read at stdlib:xattention.attn:\d+:\d+", info.value.hint)
    with pytest.raises(SpecError, match=r"argument threshold: error: must be positive, got -0.5"):
        attnc.compile_attention("stdlib:xattention", threshold=-0.5)
    with pytest.raises(SpecError, match="the antidiagonal stride 5 does not divide the block size 128"):
        attnc.compile_attention("stdlib:xattention", stride=5)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_call_time_values_are_refused_naming_the_argument(backend):
    q, k, v = draw(0, 1, 2, 2, 24, 4)
    by_size = attnc.compile_attention(
        "pattern xa\n  tokens seq\n  mask causal\n  route topp(0.9) blocks(n // 4) by antidiagonal(4)\n",
        backend=backend)
    with pytest.raises(SpecError, match=r"the antidiagonal stride 4 does not divide the route's block size 6 at "
                                        r"n = 24") as info:
        by_size(q, k, v)
    assert info.value.where == "argument q"
    fine = attnc.compile_attention(spec(0.9, 8, 4, "causal", None), backend=backend)
    with pytest.raises(SpecError, match="queries after a KV cache") as info:
        fine(q[:, :, -3:], k, v)
    assert info.value.where == "argument k"


def test_context_parallelism_refuses_by_name(tmp_path):
    assert_context_parallel_refuses("stdlib:xattention", "antidiagonal top-p scoring .* context parallelism does not run", tmp_path)


def test_keys_of_other_routes_unchanged():
    """A top-k route holds no top-p values: MoBA's route is of its own kind, its key without them."""
    pat = attnc.load("stdlib:moba")
    assert pat.route.kind == "topk_blocks" and not hasattr(pat.route.params, "topp")
    assert "TopPAntidiagonal" not in ir._canon(pat.route)
    xa = attnc.load("stdlib:xattention")
    assert xa.key() != attnc.load("stdlib:xattention", threshold=0.8).key()
    assert xa.key() != attnc.load("stdlib:xattention", stride=8).key()


def test_cli_check_show_sim():
    import io
    import json
    from contextlib import redirect_stderr, redirect_stdout

    from attnc import cli

    def run(*argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = cli.main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    rc, out, err = run("check", "stdlib:xattention")
    assert rc == 0 and "warning" not in out + err
    rc, out, err = run("show", "stdlib:xattention", "--n", "16")
    rows = [line for line in out.splitlines() if line and set(line) <= {"#", "."}]
    assert rc == 0 and "shows the mask before the selection" in out, out + err
    assert len(rows) == 16 and sum(r.count("#") for r in rows) == 16 * 17 // 2  # the mask before selection
    rc, out, err = run("sim", "stdlib:xattention", "--n", "2048", "--heads", "2", "--json")
    assert rc == 0, err
    data = json.loads(out)
    assert any("routing (top-p by antidiagonal scoring)" in a for a in data["assumptions"])
    assert 0.4 < data["density"] < 0.6  # every block the causal mask reaches: the model's upper bound
    rc, out, err = run("sim", "stdlib:xattention", "--n", "2048", "--ranks", "2")
    assert rc != 0 and "context parallelism does not run" in out + err


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.integers(1, 90), st.sampled_from([
    "causal", "true", "causal and q - k < 11", "(q - k) % 3 == 0 and k <= q", "doc[q] == doc[k]",
    "q - k < 4 * (h + 1) and k <= q"]), st.integers(0, 1000))
def test_classified_stride_tiles_equal_the_dense_pooling(stride, n, mask, seed):
    """The tile classifier's stride tiles (no n x n mask) equal the dense mask pooled per stride tile."""
    src = f"pattern t\n  tokens seq\n  input doc: int[n]\n  mask {mask}\n"
    pat = attnc.load(src)
    bound = E.bind_sizes(pat, n=n, nk=n, heads=3, sizes={})
    g = torch.Generator().manual_seed(seed)
    inputs = {"doc": torch.sort(torch.randint(0, 4, (n,), generator=g)).values}
    tensors, _ = E.bind_inputs(pat, bound, inputs)
    fast = antidiagonal.classified_stride_tiles(pat, bound, tensors, stride)
    assert fast is not None  # unbatched inputs: the classifier decides every pair exactly
    runs = -(-n // stride)
    dense = antidiagonal.stride_tiles(pat, bound, tensors, None, stride, range(0, runs))
    assert fast.shape == dense.shape == (1, 3, runs, runs) and torch.equal(fast, dense)
