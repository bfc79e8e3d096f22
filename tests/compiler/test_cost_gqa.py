"""Grouped-query attention in the cost model: the dK/dV kernel runs ``group_split`` CTAs per (KV tile, batch x
K/V head), each walking the Q tiles of its share of the group's query heads in turn (compiler/codegen/triton/kernels.py,
``SPLIT``, ``SHARE``), so that with a split of 1 its CTAs are fewer and longer than one per query head; the
forward and dQ kernels keep one per query head."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.cost import search as SR
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.model import (
    GROUP_SPLIT_GAIN,
    KernelConfig,
    group_reduction_s,
    group_split_may_pay,
    grouped_kv_counts,
    predict,
)
from attnc.core.errors import SpecError

LOCAL = "pattern local\n  tokens seq\n  mask q - 300 <= k <= q\n"
PER_HEAD = "pattern per_head\n  tokens seq\n  mask q - k <= (if h > 1 then q // 2 else 64) and k <= q\n"


def _search(text: str, *, n: int, heads: int, kv_heads: int | None = None, batch: int = 1):
    pat = attnc.load(text)
    return SR.ScheduleSearch(pat, E.bind_sizes(pat, n=n, heads=heads), get_hardware("h100"), head_dim=64,
                             batch=batch, kv_heads=kv_heads)


@settings(max_examples=40, deadline=None)
@given(kv=st.sampled_from([1, 2, 3, 6]), tiles=st.integers(1, 7), seed=st.integers(0, 2**31 - 1),
       per_head=st.booleans())
def test_grouped_counts_are_the_group_heads_counts_summed(kv, tiles, seed, per_head):
    heads = 6
    gen = torch.Generator().manual_seed(seed)
    classes = heads if per_head else 1
    full = torch.randint(0, 9, (classes, tiles), generator=gen)
    part = torch.randint(0, 9, (classes, tiles), generator=gen)
    got_full, got_part, launches = grouped_kv_counts(full, part, heads, kv)
    group = heads // kv
    # a naive walk: K/V head j's CTA for a KV tile visits query heads j*group .. j*group + group - 1, each
    # on its own list (per-head lists) or on the one list every head shares
    rows = range(kv) if per_head else range(1)
    walk = lambda c: torch.stack([sum(c[j * group + g if per_head else 0] for g in range(group)) for j in rows])  # noqa: E731
    want_full, want_part = walk(full), walk(part)
    assert torch.equal(got_full, want_full) and torch.equal(got_part, want_part)
    # every class row stands for its K/V heads: launched once per K/V head when the heads share one list
    assert launches == (1 if per_head else kv)
    assert float(got_full.sum()) * launches == float(full.sum()) * (1 if per_head else heads)


def _predict(text: str, cfg: KernelConfig, *, n: int, heads: int, batch: int, kv_heads: int | None = None,
             group_split: int | None = None):
    search = _search(text, n=n, heads=heads, kv_heads=kv_heads, batch=batch)
    sched = search.schedule(cfg.q_tile, cfg.kv_tile)
    return predict(sched, cfg, search.hw, head_dim=64, batch=batch, ops=search.pair_ops(cfg.q_tile, cfg.kv_tile),
                   kv_heads=kv_heads, group_split=group_split)


@pytest.mark.parametrize("text", [LOCAL, PER_HEAD], ids=["shared lists", "per-head lists"])
def test_grouped_dkdv_has_fewer_longer_ctas_and_the_same_work(text):
    heads, batch, n = 4, 2, 1024
    cfg = KernelConfig((64,), (64,), "flat", 4, 2)
    mha = _predict(text, cfg, n=n, heads=heads, batch=batch)
    same = _predict(text, cfg, n=n, heads=heads, batch=batch, kv_heads=heads)
    gqa = _predict(text, cfg, n=n, heads=heads, batch=batch, kv_heads=1, group_split=1)
    # kv_heads == heads is the default, to the bit
    assert same.forward.time_s == mha.forward.time_s and same.backward.time_s == mha.backward.time_s
    # the forward and dQ kernels run one CTA per query head either way
    assert gqa.forward.time_s == mha.forward.time_s and gqa.forward.ctas == mha.forward.ctas
    tiles = n // 64
    assert mha.backward.ctas == batch * heads * tiles + batch * heads * tiles
    assert gqa.backward.ctas == batch * heads * tiles + batch * 1 * tiles
    # the same tile pairs, so the same matmul and memory time in all
    assert gqa.backward.mma_s == pytest.approx(mha.backward.mma_s, rel=1e-12)
    assert gqa.backward.memory_s == pytest.approx(mha.backward.memory_s, rel=1e-12)
    # 2 x 16 dK/dV CTAs fill a fraction of 132 SMs, each walking 4 heads: the pass takes longer
    assert gqa.backward.makespan_s > mha.backward.makespan_s


def test_the_group_split_is_the_fastest_of_the_group_divisors():
    """With the query heads of a K/V head split over ``s`` dK/dV CTAs, each walks ``group / s`` of them and
    the partials are summed (``group_reduction_s``); unforced, ``predict`` takes the fastest split. At a split
    of the whole group the dK/dV CTAs are MHA's, one per query head: MHA's time plus the sum."""
    heads, batch, n = 8, 1, 2048
    cfg = KernelConfig((64,), (64,), "flat", 4, 2)
    mha = _predict(LOCAL, cfg, n=n, heads=heads, batch=batch)
    forced = {s: _predict(LOCAL, cfg, n=n, heads=heads, batch=batch, kv_heads=1, group_split=s) for s in (1, 2, 4, 8)}
    for s, p in forced.items():
        assert p.group_split == s and p.forward.time_s == mha.forward.time_s
        assert p.backward.ctas == batch * heads * (n // 64) + batch * s * (n // 64)
    reduction = group_reduction_s(8, batch, n, 64, get_hardware("h100"))
    assert reduction > 0 and group_reduction_s(1, batch, n, 64, get_hardware("h100")) == 0
    assert forced[8].backward.time_s == pytest.approx(mha.backward.time_s + reduction, rel=1e-12)
    chosen = _predict(LOCAL, cfg, n=n, heads=heads, batch=batch, kv_heads=1)
    # the fastest, a larger split taken only GROUP_SPLIT_GAIN faster than the best smaller one (its partials'
    # memory is not in the time model)
    want = forced[1]
    for s in (2, 4, 8):
        if forced[s].backward.time_s < want.backward.time_s * (1 - GROUP_SPLIT_GAIN):
            want = forced[s]
    assert chosen.group_split == want.group_split and chosen.backward.time_s == want.backward.time_s
    assert want.backward.time_s <= min(p.backward.time_s for p in forced.values()) * 1.1
    # 32 KV tiles x 1 K/V head fill a quarter of 132 SMs: splitting the group pays here
    assert chosen.group_split > 1 and chosen.backward.time_s < forced[1].backward.time_s
    with pytest.raises(SpecError, match="argument group_split"):
        _predict(LOCAL, cfg, n=n, heads=heads, batch=batch, kv_heads=1, group_split=3)


def test_the_screen_passes_over_splits_only_where_none_can_pay():
    """``group_split_may_pay`` says no split can be ``GROUP_SPLIT_GAIN`` faster where the dK/dV CTAs of one
    program per K/V head fill many waves; there a forced split predicts no such gain (the screen is sound
    against the model), and where it says one may, the model takes one."""
    cfg = KernelConfig((64,), (64,), "flat", 4, 2)
    hw = get_hardware("h100")
    many = _search(LOCAL, n=4096, heads=16, kv_heads=8, batch=32).schedule((64,), (64,))  # 16,384 CTAs
    assert not group_split_may_pay(many.t_full_count, many.t_partial_count, 16, 8, 32, hw.sms)
    one = _predict(LOCAL, cfg, n=4096, heads=16, batch=32, kv_heads=8, group_split=1)
    two = _predict(LOCAL, cfg, n=4096, heads=16, batch=32, kv_heads=8, group_split=2)
    assert two.backward.time_s > one.backward.time_s * (1 - GROUP_SPLIT_GAIN)
    assert _predict(LOCAL, cfg, n=4096, heads=16, batch=32, kv_heads=8).group_split == 1
    few = _search(LOCAL, n=2048, heads=8, kv_heads=1).schedule((64,), (64,))  # 32 CTAs on 132 SMs
    assert group_split_may_pay(few.t_full_count, few.t_partial_count, 8, 1, 1, hw.sms)
    assert _predict(LOCAL, cfg, n=2048, heads=8, batch=1, kv_heads=1).group_split > 1


def test_simulate_reports_kv_heads_and_checks_them():
    rep = attnc.simulate(LOCAL, n=2048, heads=8, kv_heads=2, top=1)
    assert rep.to_dict()["kv_heads"] == 2 and "sharing 2 K/V heads" in str(rep)
    assert attnc.simulate(LOCAL, n=2048, heads=8, top=1).to_dict()["kv_heads"] == 8
    for bad in (3, 0, 16):
        with pytest.raises(SpecError, match="argument kv_heads"):
            attnc.simulate(LOCAL, n=2048, heads=8, kv_heads=bad)
    with pytest.raises(SpecError, match="argument kv_heads"):
        attnc.simulate("stdlib:retention", n=2048, heads=8, kv_heads=2)
