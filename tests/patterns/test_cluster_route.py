"""Clustering routes: ``cluster(q | k, CENTROIDS)`` and the stdlib ``cluster_mask`` (the Routing Transformer's argmax membership).

The reference backend is compared with a naive float64 implementation written here from the rule of
spec/REFERENCE.md (cluster(x) = argmax_c x . centroids[h, c], ties to the lower index; causal and
cluster(q) == cluster(k)); every other backend is compared with the reference, forward and backward.
The k-means update is compared with a loop written from lucidrains/routing-transformer's rule.
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
from attnc import cli, kmeans_update

FEW = settings(max_examples=8, deadline=None)


def naive_cluster(x: torch.Tensor, cent: torch.Tensor) -> list[int]:
    """The first index of the largest dot product, per row of ``x`` [N, D] (``cent`` [C, D])."""
    out = []
    for row in x.tolist():
        scores = [sum(a * b for a, b in zip(row, c, strict=True)) for c in cent.tolist()]
        best = max(scores)
        out.append(scores.index(best))
    return out


def naive_attention(q, k, v, cent, scale):
    """Dense float64 attention with the routing transformer's mask; queries are the last Nq keys."""
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    off = Nk - Nq
    out = torch.zeros(B, Hq, Nq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((B, Hq, Nq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            c = cent[b, h] if cent.dim() == 4 else cent[h]
            kh = h // (Hq // Hkv)
            cq = naive_cluster(q[b, h].double(), c.double())
            ck = naive_cluster(k[b, kh].double(), c.double())
            for i in range(Nq):
                keys = [j for j in range(Nk) if j <= i + off and cq[i] == ck[j]]
                if not keys:
                    continue
                s = (k[b, kh, keys].double() @ q[b, h, i].double()) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, kh, keys].double()
    return out, lse


@FEW
@given(
    st.integers(0, 10_000),
    st.sampled_from([(1, 1), (2, 1), (3, 3)]),
    st.integers(1, 30),
    st.integers(0, 6),
    st.integers(1, 5),
    st.booleans(),
    st.booleans(),
)
def test_reference_matches_naive(seed, heads, nq, extra, clusters, integer, batched):
    """Random vectors; integer-valued ones make exact ties between centroids frequent (lower index wins)."""
    g = torch.Generator().manual_seed(seed)
    Hq, Hkv = heads
    B, D, nk = 2, 4, nq + extra

    def draw(*shape):
        if integer:
            return torch.randint(-2, 3, shape, generator=g).double()
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k, v = (
        draw(B, Hq, nq, D),
        draw(B, Hkv, nk, D),
        torch.randn(B, Hkv, nk, D, generator=g, dtype=torch.float64),
    )
    cent = draw(B, Hq, clusters, D) if batched else draw(Hq, clusters, D)
    attn = attnc.compile_attention(
        "stdlib:cluster_mask", clusters=clusters, backend="reference"
    )
    out, lse = attn(q, k, v, centroids=cent, return_lse=True)
    want, want_lse = naive_attention(q, k, v, cent, 1 / math.sqrt(D))
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, want_lse, rtol=1e-10, atol=1e-10)


def test_materialized_mask_matches_the_rule():
    g = torch.Generator().manual_seed(3)
    q, k = (
        torch.randint(-2, 3, (1, 2, 12, 3), generator=g).float(),
        torch.randint(-2, 3, (1, 2, 12, 3), generator=g).float(),
    )
    cent = torch.randint(-1, 2, (2, 3, 3), generator=g).float()
    mask = attnc.materialize_mask(
        "stdlib:cluster_mask",
        n=12,
        heads=2,
        clusters=3,
        q=q,
        k=k,
        inputs={"centroids": cent},
    )
    for h in range(2):
        cq, ck = naive_cluster(q[0, h], cent[h]), naive_cluster(k[0, h], cent[h])
        want = torch.tensor([[j <= i and cq[i] == ck[j] for j in range(12)] for i in range(12)])
        assert torch.equal(mask[0, h], want)
    assert mask.any() and not mask.all()


CASES = [  # (B, Hq, Hkv, Nq, Nk, clusters, batched centroids)
    (2, 2, 1, 40, 40, 3, False),
    (1, 2, 2, 33, 33, 2, True),
]


@pytest.mark.parametrize("backend", ["cpu", "flex", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_backends_match_the_reference(backend, case):
    B, Hq, Hkv, Nq, Nk, C, batched = case
    g = torch.Generator().manual_seed(Nq)
    q = torch.randn(B, Hq, Nq, 8, generator=g)
    k = torch.randn(B, Hkv, Nk, 8, generator=g)
    v = torch.randn(B, Hkv, Nk, 8, generator=g)
    cent = torch.randn(*((B,) if batched else ()), Hq, C, 8, generator=g)
    results = {}
    for name in ("reference", backend):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        attn = attnc.compile_attention(
            "stdlib:cluster_mask", clusters=C, backend=name, q_tile=16, kv_tile=16
        )
        out, lse = attn(qq, kk, vv, centroids=cent, return_lse=True)
        grads = torch.autograd.grad(
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), (qq, kk, vv)
        )
        results[name] = (out, lse, *grads)
    ref = results["reference"]
    for got, want in zip(results[backend], ref, strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    # the selection is real: some pairs the causal mask allows are cut by the clustering
    mask = attnc.materialize_mask(
        "stdlib:cluster_mask",
        n=Nq,
        nk=Nk if Nk != Nq else None,
        heads=Hq,
        clusters=C,
        q=q,
        k=k,
        inputs={"centroids": cent},
    )
    causal = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    assert (mask.sum() < B * Hq * causal.sum()) and mask.any()


def test_cpu_with_a_kv_cache_matches_the_reference():
    g = torch.Generator().manual_seed(5)
    q, k, v = (
        torch.randn(1, 2, 9, 8, generator=g),
        torch.randn(1, 1, 30, 8, generator=g),
        torch.randn(1, 1, 30, 8, generator=g),
    )
    cent = torch.randn(2, 3, 8, generator=g)
    outs = [
        attnc.compile_attention(
            "stdlib:cluster_mask", clusters=3, backend=b, q_tile=16, kv_tile=16
        )(q, k, v, centroids=cent)
        for b in ("reference", "cpu")
    ]
    want, _ = naive_attention(q, k, v, cent, 1 / math.sqrt(8))
    torch.testing.assert_close(outs[0].double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-5, atol=2e-5)


def test_clusters_compose_with_other_terms():
    """cluster() is an int expression: routing heads or a local window, as the paper mixes them."""
    spec = """
pattern routed_or_local(clusters = 2, local = 4)
  tokens seq
  input centroids: float[heads, clusters, dk]
  mask causal and (cluster(q, centroids) == cluster(k, centroids) or q - k < local)
"""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
    cent = torch.randn(1, 2, 4, generator=g, dtype=torch.float64)
    out = attnc.compile_attention(spec, backend="cpu", q_tile=8, kv_tile=8)(q, k, v, centroids=cent)
    cq, ck = naive_cluster(q[0, 0], cent[0]), naive_cluster(k[0, 0], cent[0])
    want = torch.zeros_like(out)
    for i in range(20):
        keys = [j for j in range(20) if j <= i and (cq[i] == ck[j] or i - j < 4)]
        want[0, 0, i] = torch.softmax(k[0, 0, keys] @ q[0, 0, i] / 2, 0) @ v[0, 0, keys]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------- k-means
def naive_kmeans(cent: torch.Tensor, x: torch.Tensor, decay: float) -> torch.Tensor:
    H, C, D = cent.shape
    new = cent.clone()
    for h in range(H):
        vectors = [row / max(row.norm(), 1e-12) for b in range(x.shape[0]) for row in x[b, h]]
        assigned: dict[int, list] = {}
        for vec in vectors:
            assigned.setdefault(naive_cluster(vec[None], cent[h])[0], []).append(vec)
        for c, vecs in assigned.items():
            total = torch.stack(vecs).sum(0)
            new[h, c] = decay * cent[h, c] + (1 - decay) * total / max(total.norm(), 1e-12)
    return new


@FEW
@given(st.integers(0, 10_000), st.integers(1, 6), st.sampled_from([0.0, 0.5, 0.999]))
def test_kmeans_update_matches_the_rule(seed, clusters, decay):
    g = torch.Generator().manual_seed(seed)
    cent = torch.randn(2, clusters, 3, generator=g, dtype=torch.float64)
    x = torch.randn(2, 2, 7, 3, generator=g, dtype=torch.float64)
    got = kmeans_update(cent, x, decay)
    torch.testing.assert_close(got, naive_kmeans(cent, x, decay), rtol=1e-12, atol=1e-12)
    assert got.dtype == cent.dtype


def test_kmeans_update_moves_centroids_towards_their_vectors():
    """With decay 0 a centroid becomes the normalised mean direction of its vectors; an unused one stays."""
    cent = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]])
    x = torch.tensor([[[[2.0, 0.2], [3.0, -0.3], [0.1, 5.0]]]])
    got = kmeans_update(cent, x, 0.0)
    torch.testing.assert_close(
        got[0, 0],
        torch.nn.functional.normalize(torch.tensor([1.0, 0.1]) + torch.tensor([1.0, -0.1]), dim=0),
    )
    torch.testing.assert_close(got[0, 2], cent[0, 2])
    assert got[0, 1, 1] > 0.99


@pytest.mark.parametrize(
    "kwargs,where",
    [
        ({"centroids": torch.zeros(2, 3)}, "argument x"),
        ({"decay": 1.5}, "argument decay"),
    ],
)
def test_kmeans_update_bad_arguments(kwargs, where):
    args = {"centroids": torch.zeros(2, 3, 4), "x": torch.zeros(1, 2, 5, 4), "decay": 0.9}
    args.update(kwargs)
    if "centroids" in kwargs:
        args["centroids"], where = kwargs["centroids"], "argument centroids"
    with pytest.raises(attnc.SpecError) as err:
        kmeans_update(**args)
    assert err.value.where == where


# ----------------------------------------------------------------- errors
def _call(**inputs):
    q = k = v = torch.randn(1, 2, 8, 4)
    attn = attnc.compile_attention("stdlib:cluster_mask", clusters=3, backend="reference")
    return attn(q, k, v, **inputs)


@pytest.mark.parametrize(
    "inputs,where,words",
    [
        ({}, "argument centroids", "missing input 'centroids'"),
        ({"centroids": torch.zeros(2, 4, 4)}, "argument centroids", "shape [2, 4, 4]"),
        (
            {"centroids": torch.zeros(2, 3, 5)},
            "argument centroids",
            "expected [heads, clusters, dk] = [2, 3, 4]",
        ),
        ({"centroids": torch.zeros(2, 3, 4, dtype=torch.int64)}, "argument centroids", "is float"),
        ({"centroids": [[0.0]]}, "argument centroids", "expected a tensor"),
        (
            {
                "centroids": torch.zeros(2, 3, 4),
                "__cluster_q_centroids": torch.zeros(2, 8, dtype=torch.int64),
            },
            "argument __cluster_q_centroids",
            "computed from q and k",
        ),
    ],
)
def test_bad_centroids_name_the_argument(inputs, where, words):
    with pytest.raises(attnc.SpecError) as err:
        _call(**inputs)
    assert err.value.where == where and words in str(err.value), str(err.value)


def test_materialize_mask_needs_the_vectors():
    with pytest.raises(attnc.SpecError) as err:
        attnc.materialize_mask(
            "stdlib:cluster_mask", n=8, heads=2, inputs={"centroids": torch.zeros(2, 4, 4)}
        )
    assert err.value.where == "argument q" and "needs them" in str(err.value)


@pytest.mark.parametrize(
    "mask,col,words",
    [
        ("cluster(x, c) == 0", 16, "must be 'q' or 'k'"),
        ("cluster(q, d) == 0", 19, "must be float[heads, CLUSTERS, dk]"),
        ("cluster(q, e) == 0", 19, "'e' is not an input"),
        ("cluster(q) == 0", 8, "takes 2 arguments"),
        ("cluster(q, c) + 0.5 > 0 and cluster(k, c, 1) == 0", 36, "takes 2 arguments"),
    ],
)
def test_check_errors_have_positions(mask, col, words):
    src = f"pattern p\n  input c: float[heads, 2, dk]\n  input d: int[n]\n  mask {mask}\n"
    with pytest.raises(attnc.SpecError) as err:
        attnc.load(src)
    text = str(err.value)
    assert words in text, text
    assert err.value.pos.line == 4 and err.value.pos.col == col, (err.value.pos, text)


# ----------------------------------------------------------------- the command line
def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_cli_check_show_sim():
    rc, out, err = run_cli("check", "stdlib:cluster_mask")
    assert rc == 0 and "warning" not in out + err
    rc, out, err = run_cli("show", "stdlib:cluster_mask", "--n", "16")
    assert rc == 0 and "Traceback" not in err, err
    assert "cluster() depends on the q and k vectors" in out and "#" in out and "." in out
    rc, out, err = run_cli(
        "sim", "stdlib:cluster_mask", "--n", "2048", "--heads", "2", "--json"
    )
    assert rc == 0, err
    import json

    data = json.loads(out)
    assert any("cluster()" in a for a in data["assumptions"])
    assert 0 < data["density"] < 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_tile_classes_of_a_call_are_sound(seed):
    """The CPU executor's schedule of a call: no allowed pair in an EMPTY tile, no masked pair in a
    FULL one (ids that are sorted along the tokens make FULL and EMPTY tiles as well as PARTIAL ones)."""
    g = torch.Generator().manual_seed(seed)
    n, t, C = 48, 8, 3
    cent = torch.randn(2, C, 4, generator=g)
    # vectors near one centroid per run of 16 tokens: whole tiles fall in one cluster
    owner = torch.arange(n) // 16 % C
    q = (cent[:, owner] * 5 + 0.1 * torch.randn(2, n, 4, generator=g))[None]
    k = (cent[:, owner] * 5 + 0.1 * torch.randn(2, n, 4, generator=g))[None]
    attn = attnc.compile_attention(
        "stdlib:cluster_mask", clusters=C, backend="cpu", q_tile=t, kv_tile=t
    )
    attn(q, k, k, centroids=cent)
    sched = attn.schedule
    mask = attnc.materialize_mask(
        "stdlib:cluster_mask", n=n, heads=2, clusters=C, q=q, k=k, inputs={"centroids": cent}
    )[0]
    classes = sched.classes()  # [heads_stored, Q tiles, KV tiles]: 0 EMPTY, 1 PARTIAL, 2 FULL
    seen = set()
    for h in range(2):
        stored = classes[h if classes.shape[0] > 1 else 0]
        for i in range(n // t):
            for j in range(n // t):
                tile = mask[h, i * t : (i + 1) * t, j * t : (j + 1) * t]
                cls = int(stored[i, j])
                seen.add(cls)
                if cls == 0:
                    assert not tile.any(), (h, i, j)
                if cls == 2:
                    assert tile.all(), (h, i, j)
    assert seen == {0, 1, 2}
