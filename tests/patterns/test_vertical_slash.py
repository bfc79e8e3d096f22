"""Vertical-slash routing (MInference): ``route topk(V) columns and topk(S) diagonals by last(L)`` and
the stdlib ``vertical_slash``.

The selection is compared with a naive float64 implementation written here from MInference's index
builder (``vertical_and_slash_kernel``, minference/modules/minference_forward.py at fb56c917): the
softmax of the last L queries under causality, column sums, sums along the diagonals, the first
columns and the nearest diagonals forced, the counts floored and clipped, ties to the lower index.
The reference backend is compared with a dense float64 masked softmax over that selection; every
other backend with the reference, forward and backward. Context parallelism is tested in
tests/distributed/test_context_parallel.py (case vertical-slash-ring).
"""

from __future__ import annotations

import functools
import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.runtime.plan import vertical_slash

FEW = settings(max_examples=25, deadline=None)
SMALL = {"vertical": 3, "slash": 4, "last_q": 8, "sinks": 2, "local": 3, "slash_min": 1}


def spec(vertical, slash, last, sinks, local, slash_min=1) -> str:
    return (
        "pattern vs\n  tokens seq\n  mask causal\n"
        f"  route topk(max({vertical}, {sinks})) columns and topk(max({slash}, {slash_min})) diagonals"
        f" by last({last}) keep columns(k < {sinks}) diagonals(q - k < {local})\n"
    )


# ----------------------------------------------------------------- the rule, naively
def _near(sa: float, sb: float) -> bool:
    return abs(sa - sb) <= 1e-12 * max(abs(sa), abs(sb), 1e-300)


def _top(scores: list[float], forced: list[bool], count: int) -> set[int]:
    """The ``count`` best units: forced ones first, then by score, values within 1e-12 (relative)
    of each other tie, ties to the lower index."""

    def better(a: int, b: int) -> int:
        if forced[a] != forced[b]:
            return -1 if forced[a] else 1
        sa, sb = scores[a], scores[b]
        if not forced[a] and not _near(sa, sb):
            return -1 if sa > sb else 1
        return -1 if a < b else 1

    return set(sorted(range(len(scores)), key=functools.cmp_to_key(better))[:count])


def _near_ties(scores: list[float], forced: list[bool], chosen: set[int]) -> set[int]:
    """The units that tie (within 1e-12, not forced) with the last unit ``_top`` took: where the exact
    sums of two units are equal but the float ones differ by rounding (the scores of equal keys come
    from different lanes of a matrix product), either may be taken."""
    last = [j for j in chosen if not forced[j]]
    if not last:
        return set()
    worst = min(scores[j] for j in last)
    return {j for j in range(len(scores)) if not forced[j] and _near(scores[j], worst)}


def naive_select(q, k, vertical, slash, last, sinks, local, slash_min, scale, ties=None):
    """MInference's selection for one head: ``q`` [Nq, D] (the last Nq of Nk tokens), ``k`` [Nk, D].
    Returns (columns, offsets) as sets."""
    nq, nk = len(q), len(k)
    rows = min(last, nq)
    probs = []  # per last query: (its position, P over its keys 0..p)
    for i in range(nq - rows, nq):
        p = nk - nq + i
        s = [scale * math.fsum(a * b for a, b in zip(q[i], k[j], strict=True)) for j in range(p + 1)]
        m = max(s)
        e = [math.exp(x - m) for x in s]
        z = math.fsum(e)
        probs.append((p, [x / z for x in e]))
    col = [math.fsum(P[j] for p, P in probs if j <= p) for j in range(nk)]
    diag = [math.fsum(P[p - o] for p, P in probs if p - o >= 0) for o in range(nk)]
    col_forced, diag_forced = [j < sinks for j in range(nk)], [o < local for o in range(nk)]
    cols = _top(col, col_forced, min(nk, max(vertical, sinks)))
    offs = _top(diag, diag_forced, min(nk, max(slash, slash_min)))
    if ties is not None:
        ties.append((_near_ties(col, col_forced, cols), _near_ties(diag, diag_forced, offs)))
    return cols, offs


def naive_mask(q, k, rule, scale=None) -> torch.Tensor:
    """bool [B, Hq, Nq, Nk]: causal, and in a selected column or on a selected diagonal."""
    B, Hq, nq, D = q.shape
    Hkv, nk = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = torch.zeros(B, Hq, nq, nk, dtype=torch.bool)
    for b in range(B):
        for h in range(Hq):
            kh = h // (Hq // Hkv)
            cols, offs = naive_select(q[b, h].tolist(), k[b, kh].tolist(), *rule, scale=scale)
            for i in range(nq):
                p = nk - nq + i
                for j in range(p + 1):
                    out[b, h, i, j] = j in cols or (p - j) in offs
    return out


def dense(q, k, v, allowed, scale=None):
    """Dense float64 masked softmax attention and its lse (rows with no key: 0 and -inf)."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = (scale or 1 / math.sqrt(q.shape[-1])) * q @ k.transpose(-1, -2)
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return p @ v, lse


def draw(g, kind, *shape):
    if kind == "zeros":  # every score equal: whole runs of columns and diagonals tie exactly
        return torch.zeros(*shape, dtype=torch.float64)
    if kind == "dup":  # repeated vectors: equal columns
        base = torch.randn(*shape[:-2], 3, shape[-1], generator=g, dtype=torch.float64)
        return base[..., torch.randint(0, 3, (shape[-2],), generator=g), :]
    return torch.randn(*shape, generator=g, dtype=torch.float64)


# ----------------------------------------------------------------- the selection
@FEW
@given(
    st.integers(0, 10_000),
    st.sampled_from([(1, 1), (2, 1), (2, 2)]),
    st.integers(1, 2),
    st.integers(1, 24),
    st.sampled_from([0, 0, 5]),
    st.integers(1, 30),
    st.integers(1, 30),
    st.integers(1, 12),
    st.integers(0, 6),
    st.integers(0, 8),
    st.sampled_from(["normal", "zeros", "dup"]),
    st.sampled_from(["normal", "dup"]),
)
# all-zero queries over 23 keys: 19 columns tie exactly, and a vectorised column sum had split them
@example(0, (1, 1), 1, 23, 0, 1, 1, 5, 0, 0, "zeros", "normal")
def test_selection_matches_minference_rule(seed, heads, B, nq, extra, V, S, L, sinks, local, qkind, kkind):
    """Sizes, counts, heads, batch rows, queries after a KV cache (extra keys), and data with many exact
    ties (all-zero queries, repeated keys): attnc's mask equals the naive rule's."""
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    nk, D = nq + extra, 4
    q = draw(g, qkind, B, Hq, nq, D)
    k = draw(g, kkind, B, Hkv, nk, D)
    rule = (V, S, L, sinks, local, 1)
    got = attnc.materialize_mask(spec(*rule), n=nq, nk=nk if extra else None, heads=Hq, q=q, k=k)
    want = naive_mask(q, k, rule)
    if qkind == "zeros" or kkind != "dup":  # equal scores are exactly equal: the rule's choice, exactly
        assert torch.equal(got, want)
        return
    # repeated keys: equal sums may differ in the last bit, so a near-tied unit may stand in for another
    # at the boundary; the selection must be the rule's up to such swaps, and the mask exactly its mask
    pat = attnc.compile_attention(spec(*rule)).pattern
    flags = vertical_slash.derive(pat, q, k)
    (col_name, diag_name) = sorted(flags, key=lambda name: flags[name].shape[-1])
    scale = 1 / math.sqrt(D)
    for b in range(B):
        for h in range(Hq):
            ties = []
            want_cols, want_offs = naive_select(q[b, h].tolist(), k[b, h // (Hq // Hkv)].tolist(), *rule,
                                                scale=scale, ties=ties)
            got_cols = set(flags[col_name][b, h].nonzero().flatten().tolist())
            got_offs = {o - (nk - 1) for o in flags[diag_name][b, h].nonzero().flatten().tolist()}
            for got_set, want_set, near in ((got_cols, want_cols, ties[0][0]), (got_offs, want_offs, ties[0][1])):
                assert len(got_set) == len(want_set) and got_set ^ want_set <= near, (b, h, got_set, want_set)
            for i in range(nq):
                p = nk - nq + i
                row = [j <= p and (j in got_cols or (p - j) in got_offs) for j in range(nk)]
                assert got[b, h, i].tolist() == row, (b, h, i)


def test_stdlib_defaults_are_minference_numbers():
    """At MInference's numbers (30 sinks, 100 local diagonals, floors 30 and 50) over 300 tokens:
    the selection of a head is that of the rule, and it is sparse."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 1, 300, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got = attnc.materialize_mask("stdlib:vertical_slash", n=300, heads=1, q=q, k=k, vertical=40, slash=60)
    want = naive_mask(q, k, (40, 60, 64, 30, 100, 50))
    assert torch.equal(got, want)
    assert got.sum() < torch.ones(300, 300).tril().sum() * 0.8


def test_slash_below_the_forced_diagonals_keeps_the_nearest():
    """slash_min 50 < local 100: 50 of the 100 forced diagonals are kept, the nearest (ties to the lower
    offset), whatever the scores."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 1, 160, 4, generator=g, dtype=torch.float64) for _ in range(2))
    mask = attnc.materialize_mask("stdlib:vertical_slash", n=160, heads=1, q=q, k=k, vertical=30, slash=1)[0, 0]
    last = mask[-1]
    offsets = {159 - j for j in range(160) if last[j] and j >= 30}
    assert offsets == set(range(50)) - {159 - j for j in range(30)}


def test_selection_uses_the_call_scale():
    """The scores are at the call's scale: a different scale selects other columns, as the rule does."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 1, 30, 4, generator=g, dtype=torch.float64) * 3 for _ in range(3))
    rule = (2, 2, 6, 1, 1, 1)
    attn = attnc.compile_attention(spec(*rule), backend="reference")
    masks = []
    for scale in (0.05, 2.0):
        allowed = naive_mask(q, k, rule, scale=scale)
        out = attn(q, k, v, scale=scale)
        torch.testing.assert_close(out, dense(q, k, v, allowed, scale)[0], rtol=1e-10, atol=1e-10)
        masks.append(allowed)
    assert not torch.equal(*masks)


# ----------------------------------------------------------------- attention on every backend
@pytest.mark.parametrize("nk_extra", [0, 7])
def test_reference_matches_dense_float64(nk_extra):
    g = torch.Generator().manual_seed(2 + nk_extra)
    q = torch.randn(2, 2, 33, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 1, 33 + nk_extra, 8, generator=g, dtype=torch.float64) for _ in range(2))
    rule = (3, 4, 8, 2, 3, 1)
    out, lse = attnc.compile_attention(spec(*rule), backend="reference")(q, k, v, return_lse=True)
    want, want_lse = dense(q, k, v, naive_mask(q, k, rule))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


CASES = [(2, 4, 2, 40), (1, 2, 2, 37)]  # (B, Hq, Hkv, n)


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_backends_match_the_reference(backend, case):
    B, Hq, Hkv, n = case
    g = torch.Generator().manual_seed(n)
    q = torch.randn(B, Hq, n, 8, generator=g)
    k, v = (torch.randn(B, Hkv, n, 8, generator=g) for _ in range(2))
    results = {}
    for name in ("reference", backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        attn = attnc.compile_attention("stdlib:vertical_slash", backend=name, q_tile=16, kv_tile=16, **SMALL)
        out, lse = attn(qq, kk, vv, return_lse=True)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        grads = torch.autograd.grad((out * weights).sum() + lse.sum(), (qq, kk, vv))
        results[name] = (out, lse, *grads)
    for got, want in zip(results[backend], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    mask = attnc.materialize_mask("stdlib:vertical_slash", n=n, heads=Hq, q=q, k=k, **SMALL)
    assert mask.any() and mask.sum() < 0.5 * B * Hq * n * (n + 1) / 2  # the selection is real


@pytest.mark.parametrize("nq", [9, 1])
def test_queries_after_a_kv_cache_match_the_rule(nq):
    """Queries after a KV cache (a prefill chunk, one decoding step): the last L queries of the call
    score all the keys."""
    g = torch.Generator().manual_seed(5 + nq)
    q = torch.randn(1, 2, nq, 8, generator=g)
    k, v = (torch.randn(1, 1, 30, 8, generator=g) for _ in range(2))
    rule = (3, 4, 8, 2, 3, 1)
    want, _ = dense(q, k, v, naive_mask(q.double(), k.double(), rule))
    for backend in ("reference", "cpu", "triton"):
        out = attnc.compile_attention(spec(*rule), backend=backend, q_tile=16, kv_tile=16)(q, k, v)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_packed_sequences_select_per_sequence():
    """With cu_seqlens each sequence is its own call: its own last queries select its columns."""
    g = torch.Generator().manual_seed(6)
    lens = [17, 23]
    q, k, v = (torch.randn(1, sum(lens), 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cu = torch.tensor([0, 17, 40], dtype=torch.int32)
    rule = (2, 3, 5, 1, 2, 1)
    out = attnc.compile_attention(spec(*rule), backend="reference", layout="bnhd")(q, k, v, cu_seqlens=cu)
    for s, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        qs, ks, vs = (x[:, a:b].transpose(1, 2) for x in (q, k, v))
        want, _ = dense(qs, ks, vs, naive_mask(qs, ks, rule))
        torch.testing.assert_close(out[:, a:b].transpose(1, 2), want, rtol=1e-10, atol=1e-10, msg=f"seq {s}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tile_classes_are_exact(seed):
    """The CPU executor's classes of a call: sound (no allowed pair in an EMPTY tile, no masked pair in a
    FULL one) and as tight as the flags allow: a tile is EMPTY exactly when it lies above the diagonal
    or no selected column crosses its keys and no selected diagonal its offsets (so below the diagonal,
    exactly when it holds no allowed pair); a tile below the diagonal whose columns (or offsets) are all
    selected is FULL."""

    g = torch.Generator().manual_seed(seed)
    n, t = 64, 8
    q, k = (torch.randn(1, 2, n, 4, generator=g) for _ in range(2))
    # 8 sink columns fill the first KV tile (FULL tiles below it), one more column, 3 diagonals
    params = {"vertical": 9, "slash": 3, "last_q": 8, "sinks": 8, "local": 2, "slash_min": 1}
    attn = attnc.compile_attention("stdlib:vertical_slash", backend="cpu", q_tile=t, kv_tile=t, **params)
    attn(q, k, k)
    classes = attn.schedule.classes()
    mask = attnc.materialize_mask("stdlib:vertical_slash", n=n, heads=2, q=q, k=k, **params)[0]
    flags = vertical_slash.derive(attn.pattern, q, k)
    seen = set()
    for h in range(2):
        stored = classes[h if classes.shape[0] > 1 else 0]
        sel_cols = set(flags["__vs_columns"][0, h].nonzero().flatten().tolist())
        sel_offs = {i - (n - 1) for i in flags["__vs_diagonals"][0, h].nonzero().flatten().tolist()}
        assert len(sel_cols) == 9 and len(sel_offs) == 3 and set(range(8)) <= sel_cols and {0, 1} <= sel_offs
        for i in range(n // t):
            for j in range(n // t):
                tile = mask[h, i * t:(i + 1) * t, j * t:(j + 1) * t]
                cls = int(stored[i, j])
                seen.add(cls)
                q0, q1, k0, k1 = i * t, (i + 1) * t - 1, j * t, (j + 1) * t - 1
                crossed = any(k0 <= c <= k1 for c in sel_cols) or any(q0 - k1 <= o <= q1 - k0 for o in sel_offs)
                assert (cls == 0) == (q1 < k0 or not crossed), (h, i, j, cls)
                assert cls != 0 or not tile.any()
                assert cls != 2 or tile.all()
                if k1 <= q0:
                    assert (cls == 0) == (not tile.any()), (h, i, j)
                    if (all(c in sel_cols for c in range(k0, k1 + 1))
                            or all(o in sel_offs for o in range(q0 - k1, q1 - k0 + 1))):
                        assert cls == 2, (h, i, j)
    assert seen == {0, 1, 2}


# ----------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "text,line,col,words",
    [
        ("tokens seq\n  mask k <= q + 1\n  route topk(2) columns and topk(2) diagonals by last(4)", 4, 3,
         "needs a causal mask"),
        ("tokens grid(a: 4, b: 4)\n  mask causal\n  route topk(2) columns and topk(2) diagonals by last(4)", 4, 3,
         "self-attention over one sequence"),
        ("queries seq\n  keys seq\n  mask true\n  route topk(2) columns and topk(2) diagonals by last(4)", 5, 3,
         "self-attention over one sequence"),
        ("tokens seq\n  mask causal\n  route topk(0) columns and topk(2) diagonals by last(4)", 4, 14,
         "at least 1"),
        ("tokens seq\n  mask causal\n  route topk(2) columns and topk(-1) diagonals by last(4)", 4, 34,
         "at least 1"),
        ("tokens seq\n  mask causal\n  route topk(2) columns and topk(2) diagonals by last(0)", 4, 55,
         "at least 1"),
        ("tokens seq\n  mask causal\n  route topk(n) columns and topk(2) diagonals by last(4)", 4, 14,
         "constant or a parameter"),
        ("tokens seq\n  mask causal\n  route topk(q) columns and topk(2) diagonals by last(4)", 4, 14,
         "must not depend"),
        ("tokens seq\n  mask causal\n  route topk(2.5) columns and topk(2) diagonals by last(4)", 4, 14,
         "int"),
        ("tokens seq\n  mask causal\n  route topk(2) columns and topk(2) diagonals by last(4) keep columns(q < 3)",
         4, 71, "condition on the key k"),
        ("tokens seq\n  mask causal\n  route topk(2) columns and topk(2) diagonals by last(4) keep diagonals(k < 3)",
         4, 73, "condition on the offset q - k"),
        ("tokens seq\n  input d: int[n]\n  mask causal\n"
         "  route topk(2) columns and topk(2) diagonals by last(4) keep columns(d[k] == 1)", 5, 71,
         "must not read inputs"),
    ],
)
def test_check_errors_have_positions(text, line, col, words):
    with pytest.raises(attnc.SpecError) as err:
        attnc.load(f"pattern p\n  {text}\n")
    message = str(err.value)
    assert words in message, message
    assert (err.value.pos.line, err.value.pos.col) == (line, col), (err.value.pos, message)


def test_a_recurrence_takes_no_route():
    src = "recurrence r\n  tokens seq\n  route topk(2) columns and topk(2) diagonals by last(4)\n"
    with pytest.raises(attnc.SpecError) as err:
        attnc.load(src)
    assert "route" in str(err.value) and err.value.pos.line == 3


def test_two_routes_are_refused():
    src = ("pattern p\n  tokens seq\n  mask causal\n  route topk(2) columns and topk(2) diagonals by last(4)\n"
           "  route topk(2) blocks(4) by q @ mean(k)\n")
    with pytest.raises(attnc.SpecError) as err:
        attnc.load(src)
    assert "given twice" in str(err.value) and err.value.pos.line == 5


def test_the_flags_are_not_arguments():
    q = k = v = torch.randn(1, 2, 8, 4)
    attn = attnc.compile_attention("stdlib:vertical_slash", backend="reference")
    with pytest.raises(attnc.SpecError) as err:
        attn(q, k, v, __vs_columns=torch.zeros(2, 8, dtype=torch.int64))
    assert err.value.where == "argument __vs_columns" and "vertical-slash route" in str(err.value)


def test_materialize_mask_needs_the_vectors():
    with pytest.raises(attnc.SpecError) as err:
        attnc.materialize_mask("stdlib:vertical_slash", n=8, heads=2)
    assert err.value.where == "argument q" and "routes by the query and key vectors" in str(err.value)


def test_the_ir_key_of_other_patterns_is_unchanged():
    """The rule enters the key through its derived inputs only; other patterns' keys stay as they were."""
    a = attnc.load(spec(3, 4, 8, 2, 3)).key()
    b = attnc.load(spec(3, 4, 9, 2, 3)).key()
    c = attnc.load(spec(3, 4, 8, 2, 3)).key()
    assert a != b and a == c


# ----------------------------------------------------------------- the command line
def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_check_show_sim_and_simulate():
    rc, out, err = run_cli("check", "stdlib:vertical_slash")
    assert rc == 0 and "warning" not in out + err
    params = ",".join(f"{key}={value}" for key, value in SMALL.items())
    rc, out, err = run_cli("show", "stdlib:vertical_slash", "--n", "24", "-p", params)
    assert rc == 0 and "Traceback" not in err, err
    assert "the vertical-slash route depends on the q and k vectors" in out and "#" in out and "." in out
    rc, out, err = run_cli("sim", "stdlib:vertical_slash", "--n", "4096", "--heads", "2", "--json",
                           "-p", "vertical=64,slash=128")
    assert rc == 0, err
    data = json.loads(out)
    assert any("vertical-slash" in a for a in data["assumptions"])
    assert 0 < data["density"] < 0.5
    report = attnc.simulate("stdlib:vertical_slash", n=2048, heads=2, vertical=64, slash=64)
    assert any("vertical-slash" in a for a in report.assumptions)


def test_heads_scored_in_groups_select_the_same(monkeypatch):
    """Long sequences score the heads in groups (bounded memory): the flags are those of one pass."""

    g = torch.Generator().manual_seed(8)
    q = torch.randn(2, 4, 30, 4, generator=g)
    k = torch.randn(2, 2, 30, 4, generator=g)
    pat = attnc.load("stdlib:vertical_slash", **SMALL)
    whole = vertical_slash.derive(pat, q, k)
    monkeypatch.setattr(vertical_slash, "SCORE_ELEMENTS", 8 * 30 * 3)  # groups of 3 of the 8 (batch, head) rows
    grouped = vertical_slash.derive(pat, q, k)
    assert whole.keys() == grouped.keys()
    assert all(torch.equal(whole[name], grouped[name]) for name in whole)


@FEW
@given(st.integers(0, 10_000), st.integers(1, 70), st.integers(1, 40), st.sampled_from([torch.float32, torch.float64]))
def test_rows_summed_gives_equal_columns_equal_sums(seed, rows, cols, dtype):
    """``rows_summed``: the sum over rows, to rounding, and columns of equal terms (repeated column vectors,
    as all-zero queries give) exactly equal, where a reduction kernel may order its lanes apart."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(2, rows, 3, generator=g, dtype=torch.float64).to(dtype)
    pick = torch.randint(0, 3, (cols,), generator=g)
    x = base[..., pick]
    got = vertical_slash.rows_summed(x)
    torch.testing.assert_close(got, x.sum(-2))
    for c in range(cols):
        assert torch.equal(got[..., c], got[..., int((pick == pick[c]).nonzero()[0])])
