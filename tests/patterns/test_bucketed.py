"""Bucketed patterns (``route buckets(WINDOW) by nearest(CENTROIDS)``) and the stdlib ``routing_transformer``:
against a naive float64 loop of the rule (forward and gradients, hypothesis), against a transcription of the
authors' code's forward (lucidrains/routing-transformer at 0283dd4a, ``KmeansAttention`` without shared QK),
and every refusal with its one clear message."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads

import attnc
from attnc.core.errors import SpecError

BACKENDS = ["reference", "cpu", "flex", "triton", "auto"]


def naive(q, k, v, centroids, window: int, causal: bool, scale: float) -> torch.Tensor:
    """The rule, one token at a time: per (batch, head) each centroid's bucket is the ``window`` queries
    (keys) of largest normalised dot product with it, ties to the lower index; in each bucket a query
    attends the allowed keys; its output is the sum over its buckets / (their count + 1e-5)."""
    B, Hq, N, _ = q.shape
    group = Hq // k.shape[1]
    rows = []
    for b in range(B):
        heads = []
        for h in range(Hq):
            kh, vh = k[b, h // group], v[b, h // group]
            cent = centroids[b, h] if centroids.dim() == 4 else centroids[h]

            def bucket(x, c, cent=cent):
                score = [float(x[i].detach() / max(float(x[i].detach().norm()), 1e-12) @ cent[c]) for i in range(N)]
                return sorted(sorted(range(N), key=lambda i: (-score[i], i))[:window])

            total = [torch.zeros(v.shape[-1], dtype=torch.float64) for _ in range(N)]
            count = [0] * N
            for c in range(cent.shape[0]):
                keys = bucket(kh, c)
                for i in bucket(q[b, h], c):
                    count[i] += 1
                    allowed = [j for j in keys if not causal or j <= i]
                    if not allowed:
                        continue
                    s = torch.stack([scale * (q[b, h, i] @ kh[j]) for j in allowed])
                    total[i] = total[i] + torch.softmax(s, 0) @ vh[allowed]
            heads.append(torch.stack([total[i] / (count[i] + 1e-5) for i in range(N)]))
        rows.append(torch.stack(heads))
    return torch.stack(rows)


def code_forward(q, k, v, means, window: int, causal: bool) -> torch.Tensor:
    """``KmeansAttention.forward`` of lucidrains/routing-transformer (0283dd4a) with ``shared_qk=False``,
    transcribed step by step (not imported: the package is not a dependency): routing by the means on the
    L2-normalised q and k, ``distribution`` (top-window per cluster, sorted), gathers, the rank-causal mask
    ``triu(1)`` filled with the dtype's most negative value, softmax, ``scatter_mean`` with eps 1e-5."""
    b, h, t, d = q.shape
    dists = torch.einsum("bhld,hcd->bhlc", F.normalize(torch.cat((q, k), dim=2), 2, dim=-1), means)
    q_dists, k_dists = dists[:, :, :t], dists[:, :, t:]

    def distribution(x):
        _, top = x.topk(k=window, dim=-2)
        indices = top.sort(dim=-2).values.transpose(-2, -1)
        return indices.reshape(*indices.shape[:2], -1)

    indices, kv_indices = distribution(q_dists), distribution(k_dists)

    def select(x, index):
        return x.gather(2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))

    qs, ks, vs = (select(x, i).reshape(b, h, means.shape[1], -1, d) for x, i in
                  ((q, indices), (k, kv_indices), (v, kv_indices)))
    dots = torch.einsum("bhnid,bhnjd->bhnij", qs, ks) * d**-0.5
    if causal:
        dots = dots.masked_fill(torch.ones(window, window).triu_(1).bool(), -torch.finfo(dots.dtype).max)
    bo = torch.einsum("bhcij,bhcjd->bhcid", dots.softmax(dim=-1), vs).reshape(b, h, -1, d)
    out = torch.zeros_like(q)
    index = indices.unsqueeze(-1).expand_as(bo)
    return out.scatter_add(-2, index, bo) / (out.scatter_add(-2, index, torch.ones_like(bo)) + 1e-5)


def _inputs(B, Hq, Hkv, N, D, clusters, seed, batched_centroids=False, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, dtype=torch.float64, generator=g)
    k = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=g)
    v = torch.randn(B, Hkv, N, D, dtype=torch.float64, generator=g)
    shape = (B, Hq, clusters, D) if batched_centroids else (Hq, clusters, D)
    cent = torch.randn(*shape, dtype=torch.float64, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)], cent


@settings(max_examples=25, deadline=None)
@given(B=st.integers(1, 2), Hkv=st.integers(1, 2), group=st.integers(1, 2), N=st.integers(3, 12),
       D=st.integers(2, 5), clusters=st.integers(1, 4), data=st.data(), causal=st.booleans(),
       batched=st.booleans(), seed=st.integers(0, 2**16))
def test_routing_transformer_matches_the_naive_rule(B, Hkv, group, N, D, clusters, data, causal, batched, seed):
    window = data.draw(st.integers(1, N), label="window")
    Hq = Hkv * group
    (q, k, v), cent = _inputs(B, Hq, Hkv, N, D, clusters, seed, batched)
    attn = attnc.compile_attention("stdlib:routing_transformer", clusters=clusters, window=window, is_causal=causal)
    out = attn(q, k, v, centroids=cent)
    # (tied to q, k, v: a call where no query attends any key has no gradient path of its own)
    want = naive(q, k, v, cent, window, causal, 1 / math.sqrt(D)) + 0 * (q.sum() + k.sum() + v.sum())
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout, allow_unused=True, materialize_grads=True)
    ref = torch.autograd.grad(want, (q, k, v), dout)
    for g_, r_ in zip(got, ref, strict=True):
        torch.testing.assert_close(g_, r_, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_routing_transformer_matches_the_authors_code(causal, seed):
    """Without causality the code's mode without shared QK is this rule exactly; with it, the code masks by
    rank within a bucket, which is causal by position when queries and keys are the same tokens (q = k)."""
    B, H, N, D, clusters, window = 2, 3, 32, 8, 4, 8
    (q, k, v), cent = _inputs(B, H, H, N, D, clusters, seed, grad=False)
    if causal:
        k = q
    attn = attnc.compile_attention("stdlib:routing_transformer", clusters=clusters, window=window, is_causal=causal)
    torch.testing.assert_close(attn(q, k, v, centroids=cent), code_forward(q, k, v, cent, window, causal),
                               rtol=1e-12, atol=1e-12)


def test_a_token_in_no_bucket_gets_zero_and_one_in_several_their_mean():
    """Two identical centroids: every bucket twice, so each chosen token's output is its one bucket's
    attention times 2 / (2 + 1e-5); the tokens no centroid chooses get 0."""
    (q, k, v), cent = _inputs(1, 1, 1, 10, 4, 1, 0, grad=False)
    twice = torch.cat([cent, cent], dim=1)
    once = attnc.compile_attention("stdlib:routing_transformer", clusters=1, window=3)(q, k, v, centroids=cent)
    both = attnc.compile_attention("stdlib:routing_transformer", clusters=2, window=3)(q, k, v, centroids=twice)
    chosen = once.abs().sum(-1) > 0
    assert chosen.sum() == 3
    torch.testing.assert_close(both[chosen], once[chosen] * (1 + 1e-5) * 2 / (2 + 1e-5), rtol=1e-13, atol=1e-13)
    assert (both[~chosen] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_name_runs_the_rule(backend):
    """Every backend name is accepted and runs the one torch implementation (runtime/bucketed.py): float64
    and float32 against the naive rule."""
    (q, k, v), cent = _inputs(2, 2, 1, 16, 4, 3, 1, grad=False)
    want = naive(q, k, v, cent, 5, True, 0.5)
    attn = attnc.compile_attention("stdlib:routing_transformer", clusters=3, window=5, backend=backend)
    torch.testing.assert_close(attn(q, k, v, centroids=cent, scale=0.5), want, rtol=1e-12, atol=1e-12)
    f32 = attn(q.float(), k.float(), v.float(), centroids=cent.float(), scale=0.5)
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, want.float(), rtol=1e-4, atol=1e-5)


def test_ties_go_to_the_lower_index():
    """Tokens 2, 5 and 7 are the same vector: a bucket of 2 that must choose among them takes 2 and 5."""
    q = torch.zeros(1, 1, 8, 2, dtype=torch.float64)
    q[0, 0, :, 1] = -1.0
    q[0, 0, [2, 5, 7]] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    cent = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    from attnc.runtime.bucketed import bucket_members

    assert bucket_members(q, cent, 2).tolist() == [[[[2, 5]]]]
    v = torch.randn(1, 1, 8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = attnc.compile_attention("stdlib:routing_transformer", clusters=1, window=2)(q, q, v, centroids=cent)
    torch.testing.assert_close(out, naive(q, q, v, cent, 2, True, 1 / math.sqrt(2)), rtol=1e-13, atol=1e-13)
    assert out[0, 0, 7].abs().sum() == 0 and out[0, 0, 5].abs().sum() > 0


def test_layout_bnhd_equals_bhnd():
    (q, k, v), cent = _inputs(2, 2, 2, 12, 4, 2, 3, grad=False)
    attn = attnc.compile_attention("stdlib:routing_transformer", clusters=2, window=4)
    out = attn(q, k, v, centroids=cent)
    bnhd = attn(*(t.transpose(1, 2) for t in (q, k, v)), centroids=cent, layout="bnhd")
    torch.testing.assert_close(bnhd.transpose(1, 2), out, rtol=0, atol=0)


def test_a_warm_call_reads_nothing_on_the_host():
    (q, k, v), cent = _inputs(1, 2, 2, 16, 4, 3, 4, grad=False)
    attn = attnc.compile_attention("stdlib:routing_transformer", clusters=3, window=4)
    attn(q, k, v, centroids=cent)
    with HostReads() as reads:
        attn(q, k, v, centroids=cent)
    assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("call,where,fragment", [
    (lambda a, q, k, v, c: a(q, k, v, centroids=c, return_lse=True), "argument return_lse", "no single log-sum-exp"),
    (lambda a, q, k, v, c: a(q, torch.cat([k, k], 2), torch.cat([v, v], 2), centroids=c), "argument k",
     "queries after a KV cache"),
    (lambda a, q, k, v, c: a(q, k, v, centroids=c, cu_seqlens=torch.tensor([0, 4, 8])), "argument cu_seqlens",
     "one sequence's tokens"),
    (lambda a, q, k, v, c: a(q, k, v, centroids=c[:, :2]), "argument centroids", "shape"),
    (lambda a, q, k, v, c: a(q, k, v), "argument centroids", "missing input"),
    (lambda a, q, k, v, c: a(q, k, v, centroids=c, gates=c), "argument gates", "no input 'gates'"),
    (lambda a, q, k, v, c: a(q[:, :, :3], k[:, :, :3], v[:, :, :3], centroids=c), "argument window",
     "does not fit the call's 3 tokens"),
])
def test_bad_calls_get_one_clear_error(call, where, fragment):
    (q, k, v), cent = _inputs(1, 2, 2, 8, 4, 3, 5, grad=False)
    attn = attnc.compile_attention("stdlib:routing_transformer", clusters=3, window=4)
    with pytest.raises(SpecError, match=fragment) as err:
        call(attn, q, k, v, cent)
    assert err.value.where == where


@pytest.mark.parametrize("clauses,fragment", [
    ("input c: float[heads, 4, dk]\n  route buckets(0) by nearest(c)", "at least 1 token"),
    ("input c: float[heads, 4, dk]\n  route buckets(q) by nearest(c)", "window"),
    ("input c: float[heads, 4, dk]\n  route buckets(4) by nearest(d)", "'d' is not a declared input"),
    ("input c: float[heads, 4]\n  route buckets(4) by nearest(c)", "the centroids must be float"),
    ("input c: float[heads, 4, dk]\n  route buckets(4) by nearest(c)\n  bias 1.0", "takes a mask only"),
    ("input c: float[heads, 4, dk]\n  input doc: int[n]\n  route buckets(4) by nearest(c)\n  mask doc[q] == doc[k]",
     "no input"),
    ("input c: float[heads, 4, dk]\n  route buckets(4) by nearest(c)\n  route topk(2) blocks(4) by q @ mean(k)",
     "given twice"),
    ("input c: float[heads, 4, dk]\n  route buckets(4) by nearest(c)\n  route buckets(2) by nearest(c)",
     "given twice"),
])
def test_bad_specs_get_one_clear_error(clauses, fragment):
    with pytest.raises(SpecError, match=fragment) as err:
        attnc.load(f"pattern p\n  tokens seq\n  {clauses}\n")
    assert err.value.pos is not None


def test_mask_view_simulator_and_cli_refuse_it(capsys):
    from attnc import cli

    pat = attnc.load("stdlib:routing_transformer")
    with pytest.raises(SpecError, match="no single mask"):
        attnc.materialize_mask(pat, n=16)
    with pytest.raises(SpecError, match="no model of it"):
        attnc.simulate(pat, n=256)
    with pytest.raises(SpecError, match="no tiles"):
        attnc.compile_attention(pat, q_tile=16)
    attn = attnc.compile_attention(pat)
    assert attn.schedule is None and attn.chosen_backend is None
    with pytest.raises(SpecError, match="no model of it"):
        attn.report()
    for command in ("show", "sim", "emit"):
        assert cli.main([command, "stdlib:routing_transformer", "--n", "256"]) == 1
        err = capsys.readouterr().err
        assert f"'attnc {command}' does not apply to it" in err and "Traceback" not in err
    assert cli.main(["check", "stdlib:routing_transformer"]) == 0
    from attnc.runtime import gpu_check as G

    with pytest.raises(SpecError, match="no generated kernel"):
        G.check_pattern(pat, archs=(90,), head_dims=(64,), n=256)
