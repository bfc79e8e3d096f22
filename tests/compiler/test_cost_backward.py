"""The cost model predicts each pass at its own config: the backward at the backward's tiles, warps
and stages (``KernelConfig.backward_config``), on the schedule classified at those tiles, not at the
forward's."""

from __future__ import annotations

import dataclasses

import pytest

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.cost import search as SR
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.model import KernelConfig, predict, predict_dense
from attnc.core.errors import SpecError

LOCAL = "pattern local\n  tokens seq\n  mask q - 300 <= k <= q\n"


def _search(hw="h100"):
    pat = attnc.load(LOCAL)
    return SR.ScheduleSearch(pat, E.bind_sizes(pat, n=2048, heads=2), get_hardware(hw), head_dim=64)


def test_backward_is_predicted_at_its_own_tiles_warps_and_stages():
    search = _search()
    split = KernelConfig((128,), (64,), "flat", 8, 3, 4, 2, (64,), (64,))
    whole = KernelConfig((64,), (64,), "flat", 4, 2)  # the backward's config, run as the only one
    got = search.evaluate(split, False).prediction
    want = search.evaluate(whole, False).prediction
    fwd_only = search.evaluate(dataclasses.replace(split, bwd_q_tile=(), bwd_kv_tile=()), False).prediction
    # the backward: exactly the 64/64 w4 s2 config's (its schedule, its tiles, its launch parameters)
    assert got.backward.time_s == pytest.approx(want.backward.time_s, rel=1e-12)
    assert got.backward.ctas == want.backward.ctas
    # ... which is not what the forward's tiles predict (so a model at the forward's tiles fails here)
    assert got.backward.time_s != pytest.approx(fwd_only.backward.time_s, rel=1e-3)
    assert got.backward.ctas != fwd_only.backward.ctas
    # the forward stays the forward's
    assert got.forward.time_s == pytest.approx(fwd_only.forward.time_s, rel=1e-12)
    # CTA counts follow the tiles: dQ one per 64-token Q tile, dK/dV one per 64-token KV tile
    assert got.backward.ctas == 2 * (2048 // 64 + 2048 // 64) != fwd_only.backward.ctas


def test_backward_launch_parameters_count_without_own_tiles():
    """A backward on the forward's tiles still runs its own warps and stages."""
    search = _search("a100")
    base = KernelConfig((64,), (64,), "flat", 4, 3)
    two = search.evaluate(dataclasses.replace(base, bwd_num_warps=4, bwd_num_stages=2), False).prediction
    three = search.evaluate(base, False).prediction
    assert two.forward.time_s == pytest.approx(three.forward.time_s, rel=1e-12)
    assert two.backward.time_s > three.backward.time_s  # two stages expose part of the memory time


def test_own_backward_tiles_need_their_schedule():
    search = _search()
    split = KernelConfig((128,), (64,), "flat", 8, 3, 8, 3, (64,), (64,))
    sched = search.schedule((128,), (64,))
    with pytest.raises(SpecError, match="backward_schedule"):
        predict(sched, split, search.hw, head_dim=64)


def test_dense_backward_at_its_own_tiles():
    hw = get_hardware("h100")
    split = KernelConfig((128,), (64,), "flat", 8, 3, 8, 3, (64,), (64,))
    own = predict_dense(4096, 4096, 4, split, hw, head_dim=128)
    alone = predict_dense(4096, 4096, 4, KernelConfig((64,), (64,), "flat", 8, 3), hw, head_dim=128)
    fwd = predict_dense(4096, 4096, 4, KernelConfig((128,), (64,), "flat", 8, 3), hw, head_dim=128)
    assert own.backward.time_s == pytest.approx(alone.backward.time_s, rel=1e-12)
    assert own.forward.time_s == pytest.approx(fwd.forward.time_s, rel=1e-12)
    assert own.backward.ctas == 4 * (4096 // 64) * 2 != fwd.backward.ctas
