"""Quest (stdlib ``quest``, ``route ... by q @ bound(k)``): a decode step against a transcription of the authors'
code (mit-han-lab/Quest at 24c9c6fc, ``evaluation/quest_attention.py``), every query against a naive float64
loop of the rule, on every backend; and the bound score's checks."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.core.errors import SpecError


def _heavy_hitter_mask(weights: torch.Tensor, token_budget: int, chunk: int) -> torch.Tensor:
    """``local_heavy_hitter_mask``: the chunks of the top ``max(3, budget // chunk)`` chunk maxima."""
    seq = weights.shape[-1]
    pad = chunk - ((seq - 1) % chunk + 1)
    weights = torch.cat([weights, torch.full((*weights.shape[:3], pad), torch.finfo(weights.dtype).min,
                                             dtype=weights.dtype)], dim=-1)
    chunks = weights.reshape(*weights.shape[:3], weights.shape[3] // chunk, chunk).amax(dim=-1)
    _, top = chunks.topk(k=min(max(3, token_budget // chunk), chunks.size(-1)), dim=-1)
    top = top.unsqueeze(-1).repeat(1, 1, 1, 1, chunk) * chunk + torch.arange(chunk)
    mask = torch.zeros_like(weights, dtype=torch.bool)
    mask.scatter_(-1, top.reshape(*top.shape[:3], -1), True)
    return mask[:, :, :, :seq]


def quest_code_decode(q, k, v, token_budget: int, chunk: int) -> torch.Tensor:
    """The decode branch of Quest's ``forward`` (one query, layer >= 2), transcribed: q ``[b, h, 1, d]``, k and v
    ``[b, hkv, kv, d]`` (the cache with the new token last)."""
    b, h, _, d = q.shape
    k, v = (x.repeat_interleave(h // x.shape[1], dim=1) for x in (k, v))
    weights = q @ k.transpose(2, 3) / math.sqrt(d)
    sign = (q > 0) + (~(q > 0)) * -1
    max_key, positive_query = k * sign, q * sign
    seq = max_key.shape[-2]
    pad = chunk - ((seq - 1) % chunk + 1)
    max_key = torch.cat([max_key, torch.full((b, h, pad, d), torch.finfo(max_key.dtype).min, dtype=max_key.dtype)],
                        dim=-2)
    chunk_max = max_key.reshape(b, h, max_key.shape[2] // chunk, chunk, d).amax(dim=-2)
    chunk_max = chunk_max.unsqueeze(-2).repeat(1, 1, 1, chunk, 1).reshape(b, h, -1, d)[:, :, :seq, :]
    estimate = positive_query @ chunk_max.transpose(2, 3)
    mask = _heavy_hitter_mask(estimate, min(seq, token_budget), chunk)
    mask = torch.tril(mask, diagonal=seq - 1)
    weights = weights.masked_fill(~mask, torch.finfo(weights.dtype).min)
    return torch.softmax(weights, dim=-1) @ v


@pytest.mark.parametrize("kv,page,budget,heads,kv_heads,seed", [
    (37, 4, 16, 2, 2, 0), (64, 4, 24, 4, 2, 1), (100, 16, 64, 2, 1, 2), (81, 16, 16, 2, 2, 3), (50, 4, 64, 1, 1, 4),
])
@pytest.mark.parametrize("backend", ["reference", "cpu", "flex"])
def test_a_decode_step_matches_the_authors_code(kv, page, budget, heads, kv_heads, seed, backend):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, 1, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, kv_heads, kv, 8, dtype=torch.float64, generator=g) for _ in range(2))
    attn = attnc.compile_attention("stdlib:quest", token_budget=budget, page=page, backend=backend)
    torch.testing.assert_close(attn(q, k, v), quest_code_decode(q, k, v, budget, page), rtol=1e-12, atol=1e-12)


def test_a_decode_step_on_triton_matches_the_authors_code():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 16, generator=g)
    k, v = (torch.randn(1, 2, 90, 16, generator=g) for _ in range(2))
    attn = attnc.compile_attention("stdlib:quest", token_budget=32, page=8, backend="triton")
    want = quest_code_decode(q.double(), k.double(), v.double(), 32, 8)
    torch.testing.assert_close(attn(q, k, v).double(), want, rtol=1e-5, atol=1e-5)


def naive(q, k, v, token_budget: int, page: int, scale: float) -> torch.Tensor:
    """The rule one query at a time: pages with a causal key, each scored by the bound over all its keys,
    the top max(3, min(nk, budget) // page) (ties to the lower page), the causal keys of those attended."""
    B, H, N, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, N, v.shape[-1], dtype=torch.float64)
    pages = [list(range(s, min(N, s + page))) for s in range(0, N, page)]
    count = max(3, min(N, token_budget) // page)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, h // group], v[b, h // group]
            for i in range(N):
                reach = [p for p, keys in enumerate(pages) if keys[0] <= i]
                bound = {p: sum(max(float(q[b, h, i, d]) * float(kh[j, d]) for j in pages[p])
                                for d in range(q.shape[-1])) for p in reach}
                chosen = sorted(reach, key=lambda p: (-bound[p], p))[:count]
                keys = [j for p in chosen for j in pages[p] if j <= i]
                w = torch.softmax(scale * (kh[keys] @ q[b, h, i]), 0)
                out[b, h, i] = w @ vh[keys]
    return out


@settings(max_examples=20, deadline=None)
@given(N=st.integers(1, 30), page=st.integers(1, 6), budget=st.integers(1, 40), group=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_quest_matches_the_naive_rule(N, page, budget, group, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2 * group, N, 4, dtype=torch.float64, generator=g)
    k, v = (torch.randn(1, 2, N, 4, dtype=torch.float64, generator=g) for _ in range(2))
    attn = attnc.compile_attention("stdlib:quest", token_budget=budget, page=page, backend="reference")
    torch.testing.assert_close(attn(q, k, v), naive(q, k, v, budget, page, 0.5), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route,fragment", [
    ("route topk(2) blocks(4) by mean(q) @ bound(k)", "score by 'q @ bound(k)'"),
    ("route topk(2) blocks(4) by q @ max(k)", "'mean(k)' or 'bound(k)'"),
])
def test_bad_bound_scores_get_one_clear_error(route, fragment):
    with pytest.raises(SpecError, match=re.escape(fragment)) as err:
        attnc.load(f"pattern p\n  tokens seq\n  {route}\n  mask causal\n")
    assert err.value.pos is not None


def test_context_parallelism_refuses_the_bound_score_by_name(tmp_path):
    import torch.distributed as dist

    from attnc.distributed import ContextParallel
    from attnc.runtime.parallel.simulate import simulate_parallel

    pat = attnc.load("stdlib:quest", token_budget=16, page=4)
    with pytest.raises(SpecError, match=re.escape("q @ bound(k), Quest")) as info:
        simulate_parallel(pat, n=4096, ranks=2, single_device_s=1.0)
    assert info.value.where == "argument --ranks"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdv'}", rank=0, world_size=1)
    try:
        with pytest.raises(SpecError, match="context parallelism does not run") as info:
            ContextParallel(attnc.compile_attention(pat, backend="reference"))
        assert info.value.where == "argument attn"
    finally:
        dist.destroy_process_group()
