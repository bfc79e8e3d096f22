"""Route kinds as a registry (``core.route_kinds``, ``runtime.plan.forms``): a kind added from this test, with no
library file touched, is written in a pattern, checked with errors at its place in the file, lowered to
``Route(kind, params)``, and runs on the reference and the Triton backend (interpreter) against a naive float64 loop
of its rule; what it does not implement (context parallelism, a paged pool in one launch) is refused by name.

The kind: ``route lownorm(K) blocks(B) | tokens [keep EXPR]`` keeps, per query, the K units whose (mean) key has
the lowest L2 norm among those the mask lets it reach (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based
Strategy for KV Cache Compression": low-norm keys draw the most attention), ``keep`` forced and counted in K, ties to
the lower unit. It reads no query, so each query selects alone (a decode step selects as the whole call)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis.route_blocks import block_ids, route_sizes
from attnc.core import route_kinds
from attnc.core.errors import SpecError
from attnc.runtime.plan import forms
from attnc.runtime.plan.forms.base import RouteForm
from attnc.runtime.plan.route_scores import choose, keep_blocks


@dataclasses.dataclass(frozen=True)
class LowNorm(route_kinds.RouteParams):
    count: sympy.Expr


def _check(checker, clause: route_kinds.RouteClause) -> LowNorm:
    if len(clause.args) != 1:
        raise checker.error(f"route lownorm(K) takes one argument, got {len(clause.args)}", clause.pos)
    (count,), (pos,) = clause.args, clause.arg_pos
    if count.is_number and not (count.is_integer and count >= 1):
        raise checker.error(f"lownorm(K) keeps K >= 1 units, got {count}", pos, hint="K is a count of key units")
    return LowNorm(clause.block, clause.keep, count)


KIND = route_kinds.RouteKind(
    "lownorm", "lowest key norms", "route lownorm(K) blocks(...) | tokens [keep EXPR]", LowNorm,
    per_query=lambda p: True, count=lambda p: p.count, check=_check,
    describe=lambda p: f"lownorm({p.count}) blocks{tuple(p.block)} keep={p.keep}")


def _select(pat, bound, q, k, inputs, allowed):
    """Per query, the K units of lowest mean-key norm that the mask lets it reach (``choose``: keep forced, ties to
    the lower unit), one choice per K/V head repeated over its query heads."""
    block, count = route_sizes(pat, bound)
    key_block, nblocks = block_ids(pat.keys, block, bound, k.shape[2])
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        onehot = torch.nn.functional.one_hot(key_block, nblocks).to(dtype).to(k.device)
        mean = (k.to(dtype).transpose(-1, -2) @ onehot).transpose(-1, -2) / onehot.sum(0)[:, None]
        score = -mean.norm(dim=-1).repeat_interleave(q.shape[1] // k.shape[1], 1)[:, :, None, :]
        reach = allowed(key_block, nblocks, dtype).to(q.device)
        keep = keep_blocks(pat, bound, inputs, q.shape[0], key_block, nblocks)
        keep = None if keep is None else keep.to(q.device)
        return choose(score, reach, keep, count), key_block, nblocks


FORM = RouteForm("lownorm", _select)

SPEC = """\
pattern low_norm(K = 2, B = 3)
  tokens seq
  mask causal
  route lownorm(K) blocks(B) keep k // B == q // B
"""


@pytest.fixture(autouse=True)
def registered():
    route_kinds.register(KIND)
    forms.register(FORM)
    yield
    forms.unregister(KIND.name)
    route_kinds.unregister(KIND.name)


def naive(q, k, v, K: int, B: int, scale: float) -> torch.Tensor:
    """The rule one query at a time, in float64: causal units (blocks of B keys), the own block forced, then the
    lowest mean-key norms, ties to the lower block; the causal keys of the chosen blocks attended."""
    Bt, H, N, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros(Bt, H, N, v.shape[-1], dtype=torch.float64)
    blocks = [list(range(s, min(N, s + B))) for s in range(0, N, B)]
    for b in range(Bt):
        for h in range(H):
            kh, vh = k[b, h // group].double(), v[b, h // group].double()
            norms = [float(kh[keys].mean(0).norm()) for keys in blocks]
            for i in range(N):
                reach = [u for u, keys in enumerate(blocks) if keys[0] <= i]
                own = i // B
                rest = sorted((u for u in reach if u != own), key=lambda u: (norms[u], u))[:max(0, K - 1)]
                keys = [j for u in [own, *rest] for j in blocks[u] if j <= i]
                w = torch.softmax(scale * (kh[keys] @ q[b, h, i].double()), 0)
                out[b, h, i] = w @ vh[keys]
    return out


def test_the_clause_lowers_to_the_kind_and_its_params():
    pat = attnc.load(SPEC)
    assert pat.route.kind == "lownorm" and isinstance(pat.route.params, LowNorm)
    assert pat.route.params.count == 2 and tuple(pat.route.block) == (3,) and pat.route.keep is not None
    assert pat.route.per_query and not pat.route.tokens
    assert "route = lownorm(2) blocks(3,)" in "\n".join(pat.describe_terms())
    tokens = attnc.load(SPEC.replace("blocks(B) keep k // B == q // B", "tokens"))
    assert tokens.route.tokens and tokens.route.keep is None
    assert attnc.load(SPEC).key() != attnc.load(SPEC, K=3).key()


@pytest.mark.parametrize("route,fragment,col", [
    ("route lownorm(0) blocks(B)", "lownorm(K) keeps K >= 1 units, got 0", 17),
    ("route lownorm(K, 2) blocks(B)", "takes one argument, got 2", 3),
    ("route lownorms(K) blocks(B)", "unknown route kind 'lownorms'", 9),
])
def test_bad_clauses_name_their_place(route, fragment, col):
    with pytest.raises(SpecError, match=re.escape(fragment)) as info:
        attnc.load(SPEC.replace("route lownorm(K) blocks(B) keep k // B == q // B", route))
    assert (info.value.pos.line, info.value.pos.col) == (4, col)


def test_an_unknown_kind_suggests_the_registered_ones():
    with pytest.raises(SpecError, match="did you mean 'lownorm'"):
        attnc.load(SPEC.replace("lownorm(K)", "lownrm(K)"))


def test_a_kind_without_its_facts_is_unknown_and_one_without_a_form_is_refused_at_the_call():
    route_kinds.unregister(KIND.name)
    with pytest.raises(SpecError, match="unknown route kind 'lownorm'"):
        attnc.load(SPEC)
    route_kinds.register(KIND)
    forms.unregister(KIND.name)
    attn = attnc.compile_attention(SPEC, backend="reference")
    q = torch.randn(1, 1, 6, 4)
    with pytest.raises(SpecError, match="the route kind 'lownorm' has no selection registered"):
        attn(q, q, q)


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="registered already"):
        route_kinds.register(dataclasses.replace(KIND, title="another"))
    with pytest.raises(ValueError, match="has a form already"):
        forms.register(RouteForm("lownorm", lambda *a: None))
    with pytest.raises(ValueError, match="no route kind 'nothing'"):
        forms.register(RouteForm("nothing", _select))


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 20), K=st.integers(1, 4), B=st.integers(1, 5), group=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_the_reference_equals_the_naive_rule(N, K, B, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2 * group, N, 4, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, N, 4, dtype=torch.float64, generator=g) for _ in range(2))
    attn = attnc.compile_attention(SPEC, K=K, B=B, backend="reference")
    torch.testing.assert_close(attn(q, k, v, scale=0.5), naive(q, k, v, K, B, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex"])
def test_every_backend_equals_the_reference_forward_and_backward(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 24, 16, generator=g, requires_grad=True)
    k, v = (torch.randn(1, 2, 24, 16, generator=g, requires_grad=True) for _ in range(2))
    want = attnc.compile_attention(SPEC, K=3, B=4, backend="reference")
    got = attnc.compile_attention(SPEC, K=3, B=4, backend=backend)
    out, ref = got(q, k, v), want(q, k, v)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(ref.double(), naive(q.detach(), k.detach(), v.detach(), 3, 4, 0.25), rtol=1e-5,
                               atol=1e-5)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-4)


def test_a_decode_step_after_a_cache_selects_as_the_whole_call():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 2, 20, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, 2, 20, 8, dtype=torch.float64, generator=g) for _ in range(2))
    attn = attnc.compile_attention(SPEC, K=2, B=3, backend="reference")
    whole = attn(q, k, v)
    torch.testing.assert_close(attn(q[:, :, -3:], k, v), whole[:, :, -3:], rtol=1e-12, atol=1e-12)


def test_context_parallelism_refuses_the_kind_by_name(tmp_path):
    from attnc.runtime.parallel.simulate import simulate_parallel

    with pytest.raises(SpecError, match="routes by lowest key norms, which context parallelism does not run") as info:
        simulate_parallel(attnc.load(SPEC), n=4096, ranks=2, single_device_s=1.0)
    assert info.value.where == "argument --ranks"


def test_a_paged_batch_runs_row_by_row_and_equals_the_reference():
    """The kind has no paged selection of its own: a paged call serves it by length (each row's keys gathered
    from its pages), each row the reference's call on its own keys; pages shuffled, -1 past a row's pages."""
    g = torch.Generator().manual_seed(6)
    lengths, page, heads, kv_heads, d = [9, 14, 5], 4, 4, 2, 8
    pages_of = [-(-n // page) for n in lengths]
    order = torch.randperm(sum(pages_of) + 2, generator=g)
    k_pool, v_pool = (torch.randn(len(order), page, kv_heads, d, generator=g) for _ in range(2))
    table = torch.full((len(lengths), max(pages_of)), -1, dtype=torch.int32)
    start = 0
    for b, count in enumerate(pages_of):
        table[b, :count] = order[start:start + count].to(torch.int32)
        start += count
    q = torch.randn(len(lengths), heads, 1, d, generator=g)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    attn = attnc.compile_attention(SPEC, K=2, B=3, backend="triton")
    out = attn(q, k_pool, v_pool, block_table=table, cache_seqlens=seqlens)
    ref = attnc.compile_attention(SPEC, K=2, B=3, backend="reference")
    for b, n in enumerate(lengths):
        ids = table[b, :pages_of[b]].long()
        kb, vb = (x[ids].reshape(-1, kv_heads, d)[:n].transpose(0, 1)[None].double() for x in (k_pool, v_pool))
        torch.testing.assert_close(out[b:b + 1], ref(q[b:b + 1].double(), kb, vb).float(), rtol=2e-5, atol=2e-5)
