"""The kernels' launch order (``compiler.cost.launch_order``) and the simulator's placement of CTAs in it.

The greedy placement is checked against a plain loop over the SMs, the longest-first table against its
definition, the screen (``can_gain``) against the placements it skips, and the simulator's makespan
against the placement of its own CTA times in the order the kernels launch.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis.tiles import classify_tiles
from attnc.compiler.cost import launch_order as L
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.model import KernelConfig, launch_makespan, predict


def naive_makespan(seq: list[float], sms: int) -> float:
    """Each CTA in turn on the SM whose work ends first (the lowest index among equals)."""
    load = [0.0] * sms
    for w in seq:
        i = min(range(sms), key=lambda j: load[j])
        load[i] += w
    return max(load)


counts = st.lists(st.integers(0, 40), min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(full=counts, sms=st.integers(1, 9), repeat=st.integers(1, 4), data=st.data())
def test_greedy_makespan_is_the_placement_in_launch_order(full, sms, repeat, data):
    partial = data.draw(st.lists(st.integers(0, 5), min_size=len(full), max_size=len(full)))
    work = L.visit_work(torch.tensor([full]), torch.tensor([partial]))
    seq = work.reshape(-1).tolist() * repeat
    assert L.greedy_makespan(work, sms, repeat) == naive_makespan(seq, sms)


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), tiles=st.integers(1, 25), data=st.data())
def test_longest_first_sorts_each_class_by_visits_ties_in_tile_order(rows, tiles, data):
    vals = st.lists(st.integers(0, 6), min_size=tiles, max_size=tiles)
    full = torch.tensor([data.draw(vals) for _ in range(rows)])
    partial = torch.tensor([data.draw(vals) for _ in range(rows)])
    order = L.longest_first(full, partial)
    visits = full + partial
    for r in range(rows):
        assert sorted(order[r].tolist()) == list(range(tiles))  # a permutation of the tiles
        got = [(visits[r, t].item(), t) for t in order[r].tolist()]
        assert got == sorted(got, key=lambda x: (-x[0], x[1]))


@settings(max_examples=80, deadline=None)
@given(full=st.lists(st.integers(0, 60), min_size=1, max_size=40), sms=st.integers(1, 12),
       repeat=st.integers(1, 6))
def test_the_screen_skips_only_launches_no_order_moves_by_min_gain(full, sms, repeat):
    f = torch.tensor([full])
    p = torch.zeros_like(f)
    work = L.visit_work(f, p)
    if L.can_gain(work, sms, repeat):
        return
    natural = L.greedy_makespan(work, sms, repeat)
    ordered = L.greedy_makespan(torch.gather(work, -1, L.longest_first(f, p)), sms, repeat)
    assert abs(natural - ordered) < L.MIN_GAIN * max(natural, ordered)


def causal_counts(tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A causal triangle's lists: Q tile i visits i FULL tiles and its diagonal PARTIAL one."""
    return torch.arange(tiles).unsqueeze(0), torch.ones(1, tiles, dtype=torch.int64)


def test_a_causal_triangle_launches_longest_first_and_a_window_in_tile_order():
    full, partial = causal_counts(256)
    order = L.choose_order(full, partial, 8, 132)  # 32K tokens at 128-row tiles, 8 heads, an H100
    assert order is not None and order[0, 0].item() == 255 and order[0, -1].item() == 0
    assert L.gain(full, partial, 8, 132) >= L.MIN_GAIN
    # a window: every Q tile but the first few visits as many tiles
    window = torch.full((1, 256), 30)
    window[0, :8] = 16
    assert L.choose_order(window, torch.full((1, 256), 2), 8, 132) is None
    # too many CTAs to place one by one: decided by the screen alone; here ~250 waves leave no order a
    # tail of MIN_GAIN: tile order
    assert not L.exact(L.visit_work(full, partial), L.EXACT_CTAS // 256 + 1)
    assert L.choose_order(full, partial, L.EXACT_CTAS // 256 + 1, 132) is None
    # ... but one CTA as long as all the others together may end last in tile order: longest first
    skew = torch.zeros(1, 256, dtype=torch.int64)
    skew[0, -1] = 2 ** 22
    order = L.choose_order(skew, torch.zeros_like(skew), L.EXACT_CTAS // 256 + 1, 132)
    assert order is not None and order[0, 0].item() == 255
    # every CTA in one wave: no order can help
    assert L.choose_order(full, partial, 1, 512) is None


def test_the_simulator_places_its_cta_times_in_the_launch_order():
    hw = get_hardware("h100")
    pat = attnc.load("stdlib:sliding_window", window=8192)  # causal at 8K tokens
    bound = E.bind_sizes(pat, n=8192, heads=16)
    cfg = KernelConfig((64,), (64,), "flat", 4, 3)
    sched = classify_tiles(pat, bound, (64,), (64,))
    as_launched = predict(sched, cfg, hw, head_dim=128)
    tile_order = predict(sched, cfg, hw, head_dim=128, ordered=False)
    # the kernels launch this forward longest first, and the prediction says what that saves
    assert L.choose_order(sched.full_count, sched.partial_count, 16, hw.sms) is not None
    assert as_launched.forward.makespan_s < tile_order.forward.makespan_s * (1 - L.MIN_GAIN / 2)
    # both are the greedy placement of the same CTA times, in their orders
    work = torch.rand(1, 128, dtype=torch.float64) + sched.full_count.double()
    f, p = sched.full_count, sched.partial_count
    order = L.longest_first(f, p)
    assert launch_makespan(f, p, work, 16, hw.sms, orderable=True) == L.greedy_makespan(
        torch.gather(work, -1, order), hw.sms, 16)
    assert launch_makespan(f, p, work, 16, hw.sms, orderable=False) == L.greedy_makespan(work, hw.sms, 16)


def test_a_window_prediction_keeps_tile_order_and_lpt_estimate():
    hw = get_hardware("h100")
    pat = attnc.load("stdlib:neighborhood_1d", kernel_size=2048)
    bound = E.bind_sizes(pat, n=32768, heads=8)
    sched = classify_tiles(pat, bound, (128,), (64,))
    cfg = KernelConfig((128,), (64,), "flat", 8, 3)
    a = predict(sched, cfg, hw, head_dim=128)
    b = predict(sched, cfg, hw, head_dim=128, ordered=False)
    assert a.forward.makespan_s == b.forward.makespan_s and a.backward.makespan_s == b.backward.makespan_s


def test_the_dkdv_kernel_is_ordered_only_over_one_list_class():
    """Keys visited by the queries before them (k >= q): the dK/dV kernel's KV tiles in tile order are
    shortest first, so it takes an order table; a route's lists are per (batch, head), where it takes
    none, and the simulator says so."""
    hw = get_hardware("h100")
    pat = attnc.load("pattern anti\n  tokens seq\n  mask k >= q\n")
    bound = E.bind_sizes(pat, n=8192, heads=16)
    sched = classify_tiles(pat, bound, (64,), (64,))
    cfg = KernelConfig((64,), (64,), "flat", 4, 3)
    assert L.choose_order(sched.t_full_count, sched.t_partial_count, 16, hw.sms) is not None
    one_class = predict(sched, cfg, hw, head_dim=128)
    routed = predict(sched, cfg, hw, head_dim=128, routed=True)
    tile_order = predict(sched, cfg, hw, head_dim=128, ordered=False)
    assert one_class.backward.makespan_s < routed.backward.makespan_s == tile_order.backward.makespan_s
    assert one_class.forward.makespan_s == routed.forward.makespan_s


def test_before_hopper_every_kernel_keeps_tile_order(monkeypatch):
    """sm_80 takes no order tables (compiled with them, some kernels spilled there): the simulator places
    an A100's CTAs in tile order, and the runtime launches them so."""
    assert not L.ordered_arch("sm80") and L.ordered_arch("sm90") and L.ordered_arch("sm_100")
    pat = attnc.load("stdlib:sliding_window", window=8192)
    bound = E.bind_sizes(pat, n=8192, heads=16)
    sched = classify_tiles(pat, bound, (64,), (64,))
    cfg = KernelConfig((64,), (64,), "flat", 4, 3)
    a100 = get_hardware("a100")
    assert predict(sched, cfg, a100, head_dim=128).forward.makespan_s == predict(
        sched, cfg, a100, head_dim=128, ordered=False).forward.makespan_s

    from attnc.runtime.backends.triton import kernel_launch as KL

    monkeypatch.setattr(KL, "choose_order", lambda full, partial, repeat, sms: L.longest_first(full, partial))
    tri = attnc.compile_attention(pat, backend="triton", q_tile=16, kv_tile=16)
    q = torch.randn(1, 2, 64, 16)
    for arch, ordered in (("sm80", False), ("sm90", True)):
        monkeypatch.setattr(KL, "CPU_ARCH", arch)
        launch = tri.runner.prepare(E.bind_sizes(pat, n=64, heads=2), q, q, {})
        tables = KL.launch_orders(launch, 1, 2, 2, q.device)
        assert (tables["Q"] is not None) == ordered
        launch.plan.device_state.clear()
