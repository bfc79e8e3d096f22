"""The autotuner on CPU with a fake kernel builder and a fake timer: candidate
lists, winner selection, persistence and reuse, failures, the progress bar, and
the ``attnc tune`` / ``attnc cache`` commands."""

from __future__ import annotations

import dataclasses
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.cost import search as SR
from attnc.compiler.cost.hardware import get_hardware
from attnc.compiler.cost.model import KernelConfig
from attnc.compiler.cost.search import ScheduleSearch
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton import runner as TB
from attnc.runtime.tuning import autotune as A
from attnc.runtime.tuning import kernel_cache as KC

LOCAL = "pattern local(w = 24)\n  tokens seq\n  mask causal and q - k < w\n"
GRID = "pattern g(r = 1)\n  tokens grid(y: height, x: width)\n  mask abs(q.y - k.y) <= r and abs(q.x - k.x) <= r\n"


class FakeBuilder(A.KernelBuilder):
    """Sources that record their config and shape; loading executes them; running returns the config."""

    name = "fake"

    def __init__(self, fail=lambda cfg: False):
        self.fail = fail
        self.sources = self.loads = self.runs = 0

    def source(self, pat, bound, schedule, config):
        self.sources += 1
        assert tuple(schedule.q_tile) == config.q_tile and tuple(schedule.kv_tile) == config.kv_tile
        return f"# fake kernel\nCONFIG = {A.config_dict(config)!r}\nN = {bound.n}\n"

    def load(self, path):
        self.loads += 1
        ns: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), ns)
        return ns

    def runner(self, kernels, pat, bound, schedule, config, **kw):
        self.runs += 1
        if self.fail(config):
            raise RuntimeError("out of resources: shared memory")
        return lambda: kernels["CONFIG"]


class FakeTimer:
    """Milliseconds from a function of the config the fake kernel returns."""

    def __init__(self, cost):
        self.cost, self.calls = cost, 0

    def __call__(self, fn):
        self.calls += 1
        return self.cost(A.config_from_dict(fn()))


def prefer(q=128, kv=32, warps=8, stages=3):
    """A cost with a unique minimum at the given config."""
    return lambda c: 1.0 + abs(math.log2(c.q_tokens / q)) + abs(math.log2(c.kv_tokens / kv)) \
        + 0.1 * (c.num_warps != warps) + 0.01 * (c.num_stages != stages)


@pytest.fixture(scope="module")
def local():
    pat = attnc.load(LOCAL)
    return pat, E.bind_sizes(pat, n=256, heads=2)


@pytest.fixture
def cache(tmp_path):
    return KC.KernelCache(tmp_path / "cache")


def fwd_only(cfg: KernelConfig) -> KernelConfig:
    """The config without its backward launch parameters (which the search sets)."""
    return dataclasses.replace(cfg, bwd_num_warps=0, bwd_num_stages=0, bwd_q_tile=(), bwd_kv_tile=(), dq_q_tile=(),
                               dq_kv_tile=())


def tune(pat, bound, cache, builder=None, timer=None, **kw):
    kw.setdefault("head_dim", 64)
    kw.setdefault("progress", False)
    return A.autotune(pat, bound, builder=builder or FakeBuilder(), timer=timer or FakeTimer(prefer()), cache=cache,
                      device="cpu", **kw)


# ----------------------------------------------------------------- candidates
def test_candidates_are_top_schedules_times_launch_parameters(local):
    pat, bound = local
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=64)
    ranked = search.run(top=0)
    distinct = []
    for c in ranked:
        s = (c.config.q_tile, c.config.kv_tile, c.config.layout)
        if s not in distinct:
            distinct.append(s)
    for top in (1, 2, 3, 100):
        trials = A.candidates(search, top=top, launch=((4, 2), (8, 3), (4, 3)))
        shapes = []
        for t in trials:
            s = (t.config.q_tile, t.config.kv_tile, t.config.layout)
            if s not in shapes:
                shapes.append(s)
        assert shapes == distinct[:top]  # the simulator's order
        assert [t.rank for t in trials] == list(range(len(trials)))
        for s in shapes:
            best = next(c.config for c in ranked if (c.config.q_tile, c.config.kv_tile, c.config.layout) == s)
            # the forward's variants (with the pick's backward launch parameters)
            own = lambda c: (c.bwd_q_tile, c.bwd_kv_tile, c.dq_q_tile, c.dq_kv_tile)  # noqa: E731
            cfgs = [(t.config.num_warps, t.config.num_stages) for t in trials
                    if (t.config.q_tile, t.config.kv_tile, t.config.layout) == s and own(t.config) == own(best)
                    and (t.config.bwd_warps, t.config.bwd_stages) == (best.bwd_warps, best.bwd_stages)
                    and not t.config.tma and not t.config.atomic_dq]
            assert cfgs[0] == (best.num_warps, best.num_stages)  # the simulator's pick first
            fitting = {(w, st_) for w, st_ in ((4, 2), (8, 3), (4, 3))
                       if SR.forward_fits(dataclasses.replace(best, num_warps=w, num_stages=st_), 64, 2,
                                          get_hardware("h100"))}
            assert fitting and set(cfgs) == {(best.num_warps, best.num_stages)} | fitting
            assert len(cfgs) == len(set(cfgs))
        for t in trials:
            assert t.predicted_ms > 0 or math.isnan(t.predicted_ms)


def test_hopper_candidates_include_the_wide_kv_backward():
    """On Hopper the tuner also times FlexAttention's backward orientation (dK/dV on a KV tile twice the
    forward's and a Q tile half of it, dQ on the forward's tiles, 8 warps), predicted by the simulator;
    not before Hopper, nor for a FoX decay."""
    pat = attnc.load("stdlib:sliding_window", window=512)
    bound = E.bind_sizes(pat, n=4096, heads=2)
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=128)
    trials = A.candidates(search, top=1)
    pick = trials[0].config
    wide = [t for t in trials if t.config.own_backward_tiles and
            math.prod(t.config.backward_config().kv_tile) == 2 * pick.kv_tokens]
    assert len(wide) == 1
    w = wide[0].config
    assert w.backward_config().q_tokens == 64 and w.bwd_warps == 8
    assert (w.dq_config().q_tile, w.dq_config().kv_tile) == (pick.q_tile, pick.kv_tile)
    assert math.isfinite(wide[0].predicted_ms) and wide[0].predicted_ms > 0
    assert A.config_from_dict(A.config_dict(w)) == w
    assert A.wide_kv_backward(pick, ScheduleSearch(pat, bound, get_hardware("a100"), head_dim=128)) is None
    fox = attnc.load("stdlib:forgetting")
    fsearch = ScheduleSearch(fox, E.bind_sizes(fox, n=4096, heads=2), get_hardware("h100"), head_dim=128)
    assert A.wide_kv_backward(pick, fsearch) is None


def test_hopper_candidates_include_the_pick_with_tma_loads():
    """On Hopper and later the tuner also times each schedule's pick with its tiles loaded by TMA (the model
    predicts the pick's time for it: the GPU decides), where each tile is one box: a run of memory rows, or a box of a
    grid in token order (``search.tma_fits``); not before Hopper. The config round-trips the kernel cache."""
    pat = attnc.load("stdlib:sliding_window", window=512)
    bound = E.bind_sizes(pat, n=4096, heads=2)
    for hw, expected in (("h100", 1), ("b200", 1), ("a100", 0)):
        trials = A.candidates(ScheduleSearch(pat, bound, get_hardware(hw), head_dim=128), top=2)
        tma = [t for t in trials if t.config.tma and not t.config.warp_specialize]
        assert len(tma) == expected * len({t.config.q_tile + t.config.kv_tile for t in trials}), hw
        for t in tma:
            pick = next(p for p in trials if p.config == dataclasses.replace(t.config, tma=False))
            assert t.predicted_ms == pick.predicted_ms and t.rank > pick.rank
            assert A.config_from_dict(A.config_dict(t.config)) == t.config
    # a GPU without TMA tuned on a model with it (an unknown GPU takes the H100's) drops those trials
    trials = A.candidates(ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=128), top=2)
    kept = A.without_tma(trials)
    assert [t.config for t in kept] == [t.config for t in trials if not t.config.tma] and len(kept) < len(trials)
    assert not any(t.config.warp_specialize for t in kept)  # the warp-specialized trials load by TMA too
    assert [t.rank for t in kept] == list(range(len(kept)))
    grid = attnc.load("stdlib:neighborhood_2d", kernel_size_y=3, kernel_size_x=3)
    search = ScheduleSearch(grid, E.bind_sizes(grid, sizes={"height": 60, "width": 60}, heads=2),
                            get_hardware("h100"), head_dim=64)
    trials = A.candidates(search, top=3)
    assert any(t.config.layout == "address" for t in trials)
    for shape in {(t.config.q_tile, t.config.kv_tile, t.config.layout) for t in trials}:
        with_tma = [t for t in trials if (t.config.q_tile, t.config.kv_tile, t.config.layout) == shape and t.config.tma
                    and not t.config.warp_specialize]
        pick = next(t.config for t in trials if (t.config.q_tile, t.config.kv_tile, t.config.layout) == shape)
        assert len(with_tma) == SR.tma_fits(pick, (60, 60), (60, 60)), shape
    # boxes of the grid, read as 0 past its edge (60 is a multiple of none of them)
    assert any(t.config.tma and t.config.layout == "address" for t in trials)


def test_candidates_include_the_warp_specialized_forward():
    """Beside each TMA trial, the pick with its forward warp-specialized (``warp_specialized_forward``), predicted at
    the pick's time, its backward launched as the pick's: on Hopper a 128-token Q tile at 4 warps (a 64-token Q
    tile has none); on Blackwell the pick's tiles at 8 warps or more; none before Hopper. The config round-trips
    the kernel cache."""
    pat = attnc.load("stdlib:sliding_window", window=512)
    bound = E.bind_sizes(pat, n=4096, heads=2)
    for hw in ("h100", "b200", "a100"):
        trials = A.candidates(ScheduleSearch(pat, bound, get_hardware(hw), head_dim=128), top=2)
        specialized = [t for t in trials if t.config.warp_specialize]
        with_tma = [t for t in trials if t.config.tma and not t.config.warp_specialize]
        expected = [t for t in with_tma if hw == "b200" or t.config.q_tokens == A.HOPPER_WS_Q_TOKENS]
        assert len(specialized) == len(expected) and (hw != "h100" or 0 < len(expected) < len(with_tma)), hw
        for t, tma in zip(specialized, expected, strict=True):
            pick = dataclasses.replace(tma.config, tma=False)
            warps = A.HOPPER_WS_WARPS if hw == "h100" else max(pick.num_warps, A.BLACKWELL_WS_WARPS)
            assert t.config == dataclasses.replace(pick, tma=True, warp_specialize=True, num_warps=warps,
                                                   bwd_num_warps=pick.bwd_warps, bwd_num_stages=pick.bwd_stages), hw
            backward = lambda c: (c.bwd_warps, c.bwd_stages, c.backward_config().q_tile,  # noqa: E731
                                  c.backward_config().kv_tile, c.dq_config().q_tile, c.dq_config().kv_tile)
            assert backward(t.config) == backward(pick), hw  # the backward launches as the pick's
            assert t.predicted_ms == tma.predicted_ms and t.rank > tma.rank
            assert A.config_from_dict(A.config_dict(t.config)) == t.config
        fp32 = A.candidates(ScheduleSearch(pat, bound, get_hardware(hw), head_dim=128), top=2, nbytes=4)
        assert not any(t.config.warp_specialize for t in fp32), hw  # not specialized on sm_90 offline


@pytest.mark.parametrize("name,params,h100,b200", [
    ("sliding_window", {"window": 512}, True, True),
    ("softcap", {}, True, False),  # Blackwell: its warp-specialized forward spilled
    ("forgetting", {}, False, False),  # Hopper: a decay's loads in the loop; Blackwell: spilled
    ("document", {}, False, True),  # Hopper: a mask input's loads in the loop
    ("moba", {"block": 64, "topk": 2}, False, True),  # Hopper: a route's FULL tiles skip its selection
])
def test_warp_specialized_forward_where_its_form_applies(name, params, h100, b200):
    """``warp_specialized_forward`` follows ``warp_specialized_form`` (the runner's rule too): on Hopper one loop
    loading only K and V, not a route's; on Blackwell the two loops, not with a softcap or a decay term. Never
    before Hopper, nor where a tile is not one box (TMA), nor for a Hopper Q tile of 64."""
    pat = attnc.load(f"stdlib:{name}", **params)
    pick = KernelConfig((128,), (64,), "flat", num_warps=8, num_stages=3)
    ext = (4096,), (4096,)
    for hw, expected in (("h100", h100), ("b200", b200), ("a100", False)):
        assert (A.warp_specialized_forward(pick, pat, get_hardware(hw), *ext) is not None) is expected, hw
    odd = dataclasses.replace(pick, kv_tile=(48,))  # 48 slots in a block of 64: not one box
    assert A.warp_specialized_forward(odd, pat, get_hardware("b200"), *ext) is None
    small = dataclasses.replace(pick, q_tile=(64,))
    assert A.warp_specialized_forward(small, pat, get_hardware("h100"), *ext) is None


def test_tma_fits_one_box_a_tile():
    """``search.tma_fits``: every pass's tiles a power of two of 16 tokens or more, each one box: in memory order
    (1-D), permuted boxes tiling their grid, or boxes of a grid of up to 3 axes in token order; the backward's
    and the dQ kernel's own tiles checked too."""
    fits = SR.tma_fits
    assert fits(KernelConfig((64,), (64,), "flat"), (1000,), (1000,))
    assert fits(KernelConfig((64,), (32,), "address"), (1000,), (1000,))  # a sequence's 1-D tiles
    assert not fits(KernelConfig((64,), (48,), "flat"), (1000,), (1000,))  # 48 slots in a block of 64
    assert not fits(KernelConfig((8,), (64,), "flat"), (1000,), (1000,))  # below 16
    assert not fits(KernelConfig((512,), (64,), "flat"), (1000,), (1000,))  # over a TMA box's 256
    assert fits(KernelConfig((4, 16), (8, 8), "permute"), (64, 64), (64, 64))
    assert not fits(KernelConfig((4, 16), (8, 8), "permute"), (60, 64), (60, 64))  # 60 rows: padded boxes
    assert fits(KernelConfig((4, 16), (8, 8), "address"), (60, 64), (60, 64))  # boxes of the grid: 0 past its edge
    assert fits(KernelConfig((2, 8, 8), (4, 4, 4), "address"), (30, 48, 80), (30, 48, 80))
    assert not fits(KernelConfig((3, 8), (8, 8), "address"), (60, 64), (60, 64))  # 24 slots in a block of 32
    assert not fits(KernelConfig((1, 2, 4, 4), (1, 2, 4, 4), "address"), (2, 4, 8, 8), (2, 4, 8, 8))  # 7 dimensions
    assert not fits(KernelConfig((64,), (64,), "flat", bwd_q_tile=(24,)), (1000,), (1000,))  # the backward's
    assert not fits(KernelConfig((64,), (64,), "flat", dq_kv_tile=(40,)), (1000,), (1000,))  # the dQ kernel's


def test_candidates_drop_launches_that_do_not_fit(local):
    pat, bound = local
    search = ScheduleSearch(pat, bound, get_hardware("a100"), head_dim=256)
    trials = A.candidates(search, top=3, launch=((4, 2), (4, 16)))
    # 16 stages of 64-token K and V tiles at head_dim 256 need far more than 164 KiB
    assert all(t.config.num_stages != 16 for t in trials)
    assert trials


# ----------------------------------------------------------------- selection, persistence, reuse
def test_winner_is_the_fastest_and_persisted(local, cache):
    pat, bound = local
    builder, timer = FakeBuilder(), FakeTimer(prefer(q=64, kv=64, warps=8, stages=2))
    res = tune(pat, bound, cache, builder, timer)
    assert not res.from_cache
    assert fwd_only(res.config) == KernelConfig((64,), (64,), "flat", 8, 2)
    assert res.config.bwd_num_warps and res.config.bwd_num_stages  # the search sized the backward
    assert timer.calls == len(res.trials) == builder.sources == builder.runs
    assert res.best_ms == min(t.measured_ms for t in res.trials) == 1.0
    assert f"CONFIG = {A.config_dict(res.config)!r}" in res.source
    assert res.source_path.read_text() == res.source and res.source_path.parent == cache.dir
    key = KC.CacheKey.make(pat, bound, head_dim=64, dtype="bf16", device="cpu-interpreter")
    entry = cache.get(key)
    assert entry is not None and A.config_from_dict(entry.config) == res.config and entry.source == res.source
    assert [t["measured_ms"] for t in entry.meta["trials"]] == [t.measured_ms for t in res.trials]
    assert A.lookup(pat, bound, head_dim=64, cache=cache) == res.config


def test_second_call_reuses_the_cached_winner_without_tuning(local, cache):
    pat, bound = local
    first = tune(pat, bound, cache)
    builder, timer = FakeBuilder(), FakeTimer(prefer(q=64))  # a different preference: must not be consulted
    again = tune(pat, bound, cache, builder, timer)
    assert again.from_cache and again.config == first.config and again.source == first.source
    assert timer.calls == 0 and builder.sources == 0 and builder.loads == 0
    assert len(again.cached_trials) == len(first.trials)
    # retune: times again and replaces the winner
    third = tune(pat, bound, cache, builder, timer, retune=True)
    assert not third.from_cache and timer.calls == len(third.trials) and third.config.q_tile == (64,)
    assert tune(pat, bound, cache, FakeBuilder(), FakeTimer(prefer())).config == third.config


def test_same_bucket_other_shape_reuses_config_and_regenerates_source(local, cache):
    pat, bound = local
    first = tune(pat, bound, cache, timer=FakeTimer(prefer(q=64, kv=32, warps=4, stages=3)))
    other = E.bind_sizes(pat, n=200, heads=2)  # the same bucket (n <= 256, heads 2)
    builder, timer = FakeBuilder(), FakeTimer(prefer())
    res = tune(pat, other, cache, builder, timer)
    assert res.from_cache and res.config == first.config and timer.calls == 0
    assert builder.sources == 1 and "N = 200" in res.source and "N = 256" in first.source
    assert res.source_path.read_text() == res.source
    assert cache.get(res.key).source == first.source  # the stored entry is left as it was
    # the regenerated source is this process's: nothing is written into the cache directory, which may be read-only
    # (that write was an OSError there) and kept a file per length where it was not
    before = sorted(p.name for p in cache.dir.iterdir())
    again = tune(pat, E.bind_sizes(pat, n=150, heads=2), cache, FakeBuilder(), timer)
    assert again.from_cache and again.config == first.config and "N = 150" in again.source
    assert again.source_path.parent != cache.dir and sorted(p.name for p in cache.dir.iterdir()) == before
    # another bucket: tuned anew
    big = E.bind_sizes(pat, n=300, heads=2)
    res = tune(pat, big, cache, FakeBuilder(), timer)
    assert not res.from_cache and timer.calls > 0


def test_cached_tiles_are_clipped_to_a_smaller_shape_of_the_bucket(cache):
    pat = attnc.load(LOCAL)
    first = tune(pat, E.bind_sizes(pat, n=128, heads=2), cache, timer=FakeTimer(prefer(q=128, kv=64)))
    assert first.config.q_tile == (128,) and first.config.kv_tile == (64,)
    builder = FakeBuilder()  # asserts the regenerated schedule's tiles are the config's
    res = tune(pat, E.bind_sizes(pat, n=100, heads=2), cache, builder, FakeTimer(prefer()))
    assert res.from_cache and builder.sources == 1
    assert res.config == dataclasses.replace(first.config, q_tile=(100,), kv_tile=(64,))


def test_keys_differ_by_dtype_and_head_dim(local, cache):
    pat, bound = local
    tune(pat, bound, cache)
    for kw in ({"dtype": "fp16"}, {"dtype": "fp32"}, {"head_dim": 128}, {"batch": 2}):
        timer = FakeTimer(prefer())
        assert not tune(pat, bound, cache, timer=timer, **kw).from_cache and timer.calls > 0, kw
    assert len(cache.entries()) == 5


def test_corrupt_entry_is_retuned(local, cache):
    pat, bound = local
    first = tune(pat, bound, cache)
    json_path = cache.dir / f"{first.key.digest()}.json"
    json_path.write_bytes(json_path.read_bytes()[:40])
    timer = FakeTimer(prefer())
    res = tune(pat, bound, cache, timer=timer)
    assert not res.from_cache and timer.calls == len(res.trials) and res.config == first.config
    assert cache.get(res.key) is not None


@settings(max_examples=25, deadline=None)
@given(times=st.lists(st.integers(1, 6), min_size=40, max_size=40))
def test_selection_is_argmin_with_ties_to_the_simulator(tmp_path_factory, times):
    pat = attnc.load(LOCAL)
    bound = E.bind_sizes(pat, n=256, heads=2)
    cache = KC.KernelCache(tmp_path_factory.mktemp("c"))
    order: list[KernelConfig] = []

    def cost(cfg):
        order.append(cfg)
        return times[len(order) - 1] / 7.0

    res = tune(pat, bound, cache, timer=FakeTimer(cost), top=3)
    measured = [times[i] for i in range(len(order))]
    expect = order[measured.index(min(measured))]  # the first (best-ranked) of the fastest
    assert res.config == expect
    assert [t.config for t in res.trials] == order


# ----------------------------------------------------------------- failures and refusals
def test_failing_candidates_are_skipped(local, cache):
    pat, bound = local
    builder = FakeBuilder(fail=lambda c: c.num_warps == 8)
    res = tune(pat, bound, cache, builder, FakeTimer(prefer(warps=8)))
    assert res.config.num_warps == 4
    failed = [t for t in res.trials if t.error]
    assert failed and all(t.config.num_warps == 8 and "out of resources" in t.error for t in failed)
    assert all(not math.isfinite(t.measured_ms) for t in failed)
    assert all(t["measured_ms"] is None for t in cache.get(res.key).meta["trials"] if t["error"])


def test_all_failing_is_a_clean_error(local, cache):
    pat, bound = local
    with pytest.raises(A.AutotuneError, match="every candidate failed"):
        tune(pat, bound, cache, FakeBuilder(fail=lambda c: True))
    with pytest.raises(A.AutotuneError, match="every candidate failed"):
        tune(pat, bound, cache, timer=FakeTimer(lambda c: math.nan))
    with pytest.raises(A.AutotuneError):
        tune(pat, bound, cache, timer=FakeTimer(lambda c: -1.0))
    assert cache.entries() == []


def test_refused_without_cuda(local, cache, monkeypatch):
    pat, bound = local
    monkeypatch.setattr(A, "cuda_available", lambda: False)
    with pytest.raises(A.AutotuneError, match="needs a CUDA GPU") as err:
        A.autotune(pat, bound, cache=cache)
    assert err.value.render().startswith("autotune: error:")
    with pytest.raises(A.AutotuneError, match="CUDA is not available"):
        A.autotune(pat, bound, cache=cache, device="cuda", timer=FakeTimer(prefer()))
    assert isinstance(err.value, attnc.SpecError)


def test_bad_arguments(local, cache):
    pat, bound = local
    rec = attnc.load("stdlib:retention")
    with pytest.raises(attnc.SpecError, match="not a softmax pattern"):
        tune(rec, bound, cache)
    with pytest.raises(attnc.SpecError, match="unsupported dtype"):
        tune(pat, bound, cache, dtype="int8")
    for bad in ({"head_dim": 0}, {"batch": True}, {"top": -1}):
        with pytest.raises(attnc.SpecError, match="positive int"):
            tune(pat, bound, cache, **bad)


def test_unwritable_cache_still_returns_the_winner(local, tmp_path, capsys):
    pat, bound = local
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = tune(pat, bound, KC.KernelCache(blocker))
    assert fwd_only(res.config) == KernelConfig((128,), (64,), "flat", 8, 3)  # no 32-token KV tiles on H100
    # at d = 64 dK/dV at 128/64 spilled (the register model): the backward runs its own 64/64 tiles, the
    # dQ kernel (one accumulator) the forward's
    assert res.config.dq_config().q_tile == (128,)
    assert (res.config.backward_config().q_tokens, res.config.backward_config().kv_tokens) == (64, 64)
    assert res.source_path.read_text() == res.source
    assert "could not write the kernel cache" in capsys.readouterr().err


def test_grid_pattern_tunes_box_tiles(cache):
    pat = attnc.load(GRID)
    bound = E.bind_sizes(pat, sizes={"height": 16, "width": 16})
    res = tune(pat, bound, cache, timer=FakeTimer(lambda c: 1.0 + (len(c.q_tile) == 1) + (c.layout != "address")))
    assert len(res.config.q_tile) == 2 and res.config.layout == "address"
    again = tune(pat, E.bind_sizes(pat, sizes={"height": 16, "width": 16}), cache, timer=FakeTimer(prefer()))
    assert again.from_cache and again.config == res.config


def test_hardware_for_device_names():
    assert A.hardware_for("NVIDIA H200").name == "H200"
    assert A.hardware_for("NVIDIA H100 80GB HBM3").name == "H100"
    assert A.hardware_for("NVIDIA A100-SXM4-80GB").name == "A100"
    assert A.hardware_for("NVIDIA GeForce RTX 4090").name == "H100"  # unknown: the default model


# ----------------------------------------------------------------- progress bar
class Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_tty(local, cache):
    pat, bound = local
    out = Tty()
    res = tune(pat, bound, cache, progress=None, stream=out)
    text = out.getvalue()
    n = len(res.trials)
    assert text.startswith("\rtuning local [") and text.endswith("\n")
    frames = text.rstrip("\n").split("\r")[1:]
    assert len(frames) == n + 1
    assert f" 0/{n}" in frames[0] and "#" not in frames[0]
    assert f"[{'#' * 24}] {n}/{n}" in frames[-1] and f"best {res.best_ms:.3f} ms" in frames[-1]
    counts = [int(f.split("] ")[1].split("/")[0]) for f in frames]
    assert counts == list(range(n + 1))


def test_progress_bar_quiet(local, cache):
    pat, bound = local
    for stream, progress in ((io.StringIO(), None), (Tty(), False)):
        tune(pat, bound, cache, progress=progress, stream=stream, retune=True)
        assert stream.getvalue() == ""
    forced = io.StringIO()
    tune(pat, bound, cache, progress=True, stream=forced, retune=True)
    assert "tuning local" in forced.getvalue()


def test_progress_class():
    out = Tty()
    bar = A.Progress(4, "x", stream=out, width=8)
    bar.update("a long note here")
    bar.update()
    bar.close()
    frames = out.getvalue().split("\r")[1:]
    assert frames[0] == "x [##......] 1/4 a long note here"
    assert frames[1].startswith("x [####....] 2/4") and len(frames[1]) == len("x [##......] 1/4 a long note here") + 1
    assert frames[1].endswith(" \n")  # padded over the longer previous line, then a newline
    silent = io.StringIO()
    A.Progress(3, stream=silent).update()
    assert silent.getvalue() == ""


# ----------------------------------------------------------------- the commands
def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in out + err
    return code, out, err


def test_cli_tune_without_cuda(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setattr(A, "cuda_available", lambda: False)
    code, out, err = run_cli(capsys, "tune", "stdlib:sliding_window", "-p", "window=64", "--n", "1024")
    assert code == 1 and out == ""
    assert "autotune: error: autotuning needs a CUDA GPU" in err and err.count("error") == 1
    assert not (tmp_path / "c").exists()


def test_cli_tune_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "c"))
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern p\n  tokens seq\n  mask q < < k\n")
    assert run_cli(capsys, "tune", str(bad), "--n", "64")[0] == 1
    assert run_cli(capsys, "tune", "stdlib:retention")[0] == 1
    code, _, err = run_cli(capsys, "tune", "stdlib:sliding_window", "--n", "64", "--dtype", "int4")
    assert code == 1 and "unsupported dtype" in err
    assert run_cli(capsys, "tune")[0] == 1
    assert run_cli(capsys, "cache", "purge")[0] == 1
    code, out, err = run_cli(capsys, "tune", "stdlib:sliding_window", "--n", "64", "--heads", "4", "--kv-heads", "3")
    assert code == 1 and out == "" and "argument --kv-heads: error: 4 query heads cannot share 3 K/V heads" in err
    assert not (tmp_path / "c").exists()


def test_cli_tune_then_cache_ls_and_clear(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setattr(A, "cuda_available", lambda: True)  # a pretend GPU: fake kernels and timer
    monkeypatch.setattr(A, "TritonBuilder", FakeBuilder)
    monkeypatch.setattr(A, "do_bench_timer", FakeTimer(prefer(q=64, kv=64, warps=4, stages=2)))
    code, out, err = run_cli(capsys, "cache", "ls")
    assert code == 0 and "no entries" in out
    args = ("tune", "stdlib:sliding_window", "-p", "window=64", "--n", "1000", "--heads", "2", "--head-dim", "64")
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    assert "sliding_window [n<=1024 heads=2 d<=64 b<=1, bf16, cpu-interpreter]" in out
    winner = [line for line in out.splitlines() if line.startswith(" * ")]
    assert len(winner) == 1 and "64/64 flat w4 s2" in winner[0] and "1.0000 ms" in winner[0]
    assert err == ""  # not a TTY: no progress bar
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "cached: 64/64 flat w4 s2" in out
    code, out, _ = run_cli(capsys, *args, "--dtype", "fp16", "-q")
    assert code == 0 and "candidates" in out
    code, out, _ = run_cli(capsys, "cache", "ls")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"{tmp_path / 'c' / 'kernels'}: 2 entries")
    rows = lines[2:]
    assert len(rows) == 2 and all("sliding_window" in r and "64/64 flat w4 s2" in r for r in rows)
    assert sorted(r.split()[-1] for r in rows) == ["ok", "ok"]
    assert {"bf16", "fp16"} == {r.split()[6] for r in rows}
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0 and out.startswith("removed 2 entries")
    code, out, _ = run_cli(capsys, "cache")
    assert code == 0 and "no entries" in out
    code, out, _ = run_cli(capsys, "cache", "clear")
    assert code == 0 and out.startswith("removed 0 entries")


# ----------------------------------------------------------------- the real kernels, interpreted
def test_real_triton_kernels_tuned_under_the_interpreter(cache):
    """The code generator's kernels, loaded for the interpreter, timed by a fake timer
    that also checks each candidate's output against a dense softmax written here."""
    import torch

    pat = attnc.load(LOCAL)
    n, heads, d = 64, 2, 16
    bound = E.bind_sizes(pat, n=n, heads=heads)
    qi = torch.arange(n)[:, None]
    ki = torch.arange(n)[None, :]
    allowed = (ki <= qi) & (qi - ki < 24)
    gen = torch.Generator().manual_seed(0)  # the runner's inputs: seed 0, q then k then v
    q, k, v = (torch.randn(1, heads, n, d, generator=gen) for _ in range(3))
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5
    expect = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ v.double()
    seen = []

    dout = torch.randn(1, heads, n, d, generator=gen)  # the runner's upstream gradient: drawn after v
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    ref = torch.softmax(((qd @ kd.transpose(-1, -2)) * d ** -0.5).masked_fill(~allowed, -math.inf), -1) @ vd
    ref.backward(dout.double())

    def timer(fn):
        out = fn()  # a training step: out, lse, dq, dk, dv
        torch.testing.assert_close(out[0].double(), expect, rtol=1e-5, atol=1e-5)
        for got, want in zip(out[2:5], (qd.grad, kd.grad, vd.grad), strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        seen.append(len(seen))
        return 2.0 - 0.1 * len(seen)  # the last candidate wins

    builder = A.TritonBuilder(interpret=True)
    res = A.autotune(pat, bound, head_dim=d, dtype="fp32", builder=builder, timer=timer, cache=cache, top=2,
                     launch=((4, 2),), device="cpu", progress=False)
    assert len(seen) == len(res.trials) >= 2 and all(t.error is None for t in res.trials)
    assert res.config == res.trials[-1].config
    assert "@triton.jit" in res.source and "attnc_fwd" in res.source
    assert cache.get(res.key).source == res.source
    module = builder.load(res.source_path)  # the cached source loads
    assert hasattr(module, "attnc_fwd")
    again = A.autotune(pat, bound, head_dim=d, dtype="fp32", builder=builder, timer=timer, cache=cache, device="cpu")
    assert again.from_cache and again.config == res.config and len(seen) == len(res.trials)


def test_candidates_include_the_backward_in_one_kernel_where_a_step_runs_it(local, monkeypatch):
    """Each schedule's pick with dQ added by the dK/dV kernel's atomics (``KernelConfig.atomic_dq``, no dQ
    tiles) is a trial on Hopper, priced by the model (2 matmuls a pair fewer: faster); none on an A100, for a
    pattern with a decay gate (a training step takes its gradient from the dQ kernel) or under torch's
    deterministic mode. The config round-trips the cache."""
    pat, bound = local
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=64)
    trials = A.candidates(search, top=2)
    fused = [t for t in trials if t.config.atomic_dq]
    assert len(fused) == len({(t.config.q_tile, t.config.kv_tile, t.config.layout) for t in trials}) == 2
    for t in fused:
        pick = next(p for p in trials if (p.config.q_tile, p.config.kv_tile, p.config.layout)
                    == (t.config.q_tile, t.config.kv_tile, t.config.layout))
        assert t.config == dataclasses.replace(pick.config, atomic_dq=True, dq_q_tile=(), dq_kv_tile=())
        cand = search.evaluate(t.config, False)
        assert t.predicted_ms == pytest.approx((cand.forward_s + cand.backward_s) * 1e3)
        assert t.predicted_ms < pick.predicted_ms
        assert A.config_from_dict(A.config_dict(t.config)) == t.config and KC.validate_config(A.config_dict(t.config)) is None
    a100 = ScheduleSearch(pat, bound, get_hardware("a100"), head_dim=64)  # scalar atomics, spills at d 64
    assert not any(t.config.atomic_dq for t in A.candidates(a100, top=2))
    # a GPU before Hopper tuned on the H100's model (an unknown one: L4, A10G, RTX 4090) drops the trial, and an
    # sm_89 TMA's too; Hopper keeps both
    for arch, atomic, tma in (("sm89", False, False), ("sm80", False, False), ("sm90", True, True)):
        kept = A.for_device(trials, arch)
        assert any(t.config.atomic_dq for t in kept) == atomic and any(t.config.tma for t in kept) == tma, arch
        assert [t.rank for t in kept] == list(range(len(kept)))
        assert [t.config for t in kept] == [t.config for t in trials if (atomic or not t.config.atomic_dq)
                                            and (tma or not t.config.tma)]
    # Blackwell: a dK/dV kernel with its accumulators in tensor memory has no columns left for dQ's
    window = attnc.load("stdlib:sliding_window")
    b200 = ScheduleSearch(window, E.bind_sizes(window, n=8192, heads=2), get_hardware("b200"), head_dim=128)
    blackwell = A.candidates(b200, top=2)
    for t in blackwell:
        assert not (t.config.atomic_dq and SR.is_wide_kv(t.config)), t.config
    # ... so where the pick's dK/dV runs on tensor memory, the trial takes the same forward's 64-row backward
    wide_picks = 0
    for shape in {(t.config.q_tile, t.config.kv_tile, t.config.layout) for t in blackwell}:
        same = [t.config for t in blackwell if (t.config.q_tile, t.config.kv_tile, t.config.layout) == shape]
        fused = [c for c in same if c.atomic_dq]
        assert len(fused) == 1, shape
        if SR.is_wide_kv(same[0]):
            wide_picks += 1
            assert dataclasses.replace(fused[0], atomic_dq=False) in [
                dataclasses.replace(c, dq_q_tile=(), dq_kv_tile=()) for c in same if not SR.is_wide_kv(c)]
    assert wide_picks
    gated = attnc.load("stdlib:forgetting")
    gsearch = ScheduleSearch(gated, E.bind_sizes(gated, n=256, heads=2), get_hardware("h100"), head_dim=64)
    assert not any(t.config.atomic_dq for t in A.candidates(gsearch, top=2))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert not any(t.config.atomic_dq for t in A.candidates(search, top=2))


def test_a_candidate_whose_step_differs_from_the_picks_is_refused(local, cache):
    """Every candidate's training step is compared with the first candidate's (the simulator's pick) before it
    is timed: one beyond its dtype's tolerance (or with a NaN, or -inf rows elsewhere) fails with the
    difference named, and is never the winner however fast; one within it is timed as usual."""
    pat, bound = local
    base = tuple(torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 1, 8, 8) * (i + 1) for i in range(5))
    base[1][0, 0, 0, 0] = -math.inf  # a row with no allowed key: its lse
    trials_seen = []

    class Stepping(FakeBuilder):
        def runner(self, kernels, pat, bound, schedule, config, **kw):
            rank = len(trials_seen)
            trials_seen.append(config)
            out = [t.clone() for t in base]
            if rank == 1:  # the fastest: wrong by 5%
                out[2] = out[2] * 1.05
            elif rank == 2:  # next fastest: a NaN
                out[4][0, 0, 1, 1] = math.nan
            elif rank == 3:  # an lse that is finite where the pick's is -inf
                out[1][0, 0, 0, 0] = 0.0
            elif rank == 4:  # within bf16's tolerance: timed
                out[0] = out[0] * (1 + 1e-3)

            def step():
                return tuple(out)

            step.ms = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.5}.get(rank, 1.0 + rank)
            return step

    res = tune(pat, bound, cache, builder=Stepping(), timer=lambda fn: fn.ms, top=1)
    assert len(res.trials) >= 5
    by_rank = {t.rank: t for t in res.trials}
    for rank in (1, 2, 3):
        assert "differs from the first candidate's" in by_rank[rank].error and by_rank[rank].measured_ms == math.inf
    assert "by 5.00e-02" in by_rank[1].error
    assert by_rank[4].error is None and res.config == by_rank[4].config
    assert A.step_difference(base, base) == 0.0 and A.step_difference("cfg", base) is None


def test_a_first_candidate_with_a_nan_is_not_the_reference_and_local_errors_count(local, cache, monkeypatch):
    """The first candidate whose step holds a NaN fails (it is not the reference the others must match); the
    next one is. A wrong element the norm would average away (one in a million) is refused by the largest
    element difference; the comparison works in chunks (``COMPARE_CHUNK``) with the same result."""
    pat, bound = local
    gen = torch.Generator().manual_seed(0)
    good = (torch.randn(1, 1, 1000, 1000, generator=gen),)
    seen = []

    class Stepping(FakeBuilder):
        def runner(self, kernels, pat, bound, schedule, config, **kw):
            rank = len(seen)
            seen.append(rank)
            out = good[0].clone()
            if rank == 0:
                out[0, 0, 3, 3] = math.nan
            elif rank == 2:  # one element off by 2: 2e-3 in norm, 0.1 of 4x the largest element
                out[0, 0, 7, 7] += 2.0

            def step():
                return (out,)

            step.ms = 0.1 if rank == 2 else 1.0 + rank
            return step

    res = tune(pat, bound, cache, builder=Stepping(), timer=lambda fn: fn.ms, top=1)
    by_rank = {t.rank: t for t in res.trials}
    assert "NaN" in by_rank[0].error and by_rank[1].error is None
    assert "differs from the first candidate's" in by_rank[2].error and res.config == by_rank[1].config
    wrong = (good[0].clone(),)
    wrong[0][0, 0, 7, 7] += 2.0
    whole = A.step_difference(wrong, good)
    monkeypatch.setattr(A, "COMPARE_CHUNK", 4096)
    assert A.step_difference(wrong, good) == pytest.approx(whole, rel=1e-6) and whole > 2e-2


# ----------------------------------------------------------------- grouped-query attention
def test_the_bucket_keys_the_group_only_where_heads_share_kv(local):
    """Query heads per K/V head are keyed exactly, and only above 1: a multi-head call keeps the key it had
    before K/V heads were keyed (its cached winners stay valid)."""
    pat, bound = local  # 2 heads

    def key(kv):
        return KC.CacheKey.make(pat, bound, head_dim=64, dtype="bf16", device="gpu", triton="t", attnc="a",
                                kv_heads=kv)

    assert key(None) == key(2) and key(None).digest() == key(2).digest()
    assert "group" not in KC.shape_bucket(pat, bound, head_dim=64, kv_heads=2)
    assert key(1) != key(None) and KC.shape_bucket(pat, bound, head_dim=64, kv_heads=1)["group"] == 2
    assert "heads=2 group=2" in KC.describe_bucket(KC.shape_bucket(pat, bound, head_dim=64, kv_heads=1))
    assert KC.exact_shape(bound, head_dim=64, kv_heads=1)["kv_heads"] == 1
    assert KC.exact_shape(bound, head_dim=64, kv_heads=2) == KC.exact_shape(bound, head_dim=64)
    eight = E.bind_sizes(pat, n=256, heads=8)
    groups = {KC.CacheKey.make(pat, eight, head_dim=64, dtype="bf16", device="gpu", triton="t", attnc="a",
                               kv_heads=kv).digest() for kv in (1, 2, 4, 8)}
    assert len(groups) == 4
    with pytest.raises(attnc.SpecError, match="8 query heads cannot share 3 K/V heads"):
        KC.shape_bucket(pat, eight, head_dim=64, kv_heads=3)


class RecordingBuilder(FakeBuilder):
    """A fake builder that records the K/V heads each candidate is run with."""

    def __init__(self):
        super().__init__()
        self.kv_heads = []

    def runner(self, kernels, pat, bound, schedule, config, **kw):
        self.kv_heads.append(kw["kv_heads"])
        return super().runner(kernels, pat, bound, schedule, config, **kw)


def test_grouped_query_tuning_ranks_times_and_caches_the_call(cache):
    """Tuned with K/V heads, the candidates are the search's for those K/V heads (its predictions), each is
    run on k and v of that many heads, and the winner is cached under its own key: a multi-head entry is not
    reused for it, nor it for a multi-head call."""
    pat = attnc.load(LOCAL)
    bound = E.bind_sizes(pat, n=2048, heads=8)
    mha_builder, gqa_builder = RecordingBuilder(), RecordingBuilder()
    mha = tune(pat, bound, cache, builder=mha_builder)
    gqa = tune(pat, bound, cache, builder=gqa_builder, kv_heads=1)
    assert not gqa.from_cache and mha.key != gqa.key
    assert set(mha_builder.kv_heads) == {None} and gqa_builder.kv_heads == [1] * len(gqa.trials)
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=64, kv_heads=1)
    expect = A.candidates(search)
    assert [(t.config, t.predicted_ms) for t in gqa.trials] == [(t.config, t.predicted_ms) for t in expect]
    assert gqa.trials[0].predicted_ms != mha.trials[0].predicted_ms  # the dK/dV CTAs walk the group's heads
    assert A.lookup(pat, bound, head_dim=64, cache=cache, kv_heads=1) == gqa.config
    assert tune(pat, bound, cache, builder=gqa_builder, kv_heads=1).from_cache
    assert tune(pat, bound, cache, builder=mha_builder, kv_heads=8).key == mha.key  # one K/V head per head
    assert len(cache.entries()) == 2
    with pytest.raises(attnc.SpecError, match="argument kv_heads"):
        tune(pat, bound, cache, kv_heads=3)


def test_real_grouped_query_step_tuned_under_the_interpreter(cache):
    """The Triton builder's training step on 4 query heads sharing 1 K/V head (the interpreter, fp32): its
    output and gradients, dK and dV summed over the group, match a dense softmax on expanded K/V."""
    pat = attnc.load(LOCAL)
    n, heads, d = 48, 4, 16
    bound = E.bind_sizes(pat, n=n, heads=heads)
    gen = torch.Generator().manual_seed(0)  # the runner's inputs: seed 0, q, k, v, then the output's gradient
    q, k, v, dout = (torch.randn(1, h, n, d, generator=gen) for h in (heads, 1, 1, heads))
    qi, ki = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (ki <= qi) & (qi - ki < 24)
    qd, kd, vd = (x.double().requires_grad_() for x in (q, k, v))
    scores = (qd @ kd.expand(1, heads, n, d).transpose(-1, -2)) * d ** -0.5
    ref = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ vd.expand(1, heads, n, d)
    ref.backward(dout.double())

    def timer(fn):
        out, _lse, *grads = fn()
        torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
        assert [g.shape[1] for g in grads] == [heads, 1, 1]
        for got, want in zip(grads, (qd.grad, kd.grad, vd.grad), strict=True):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        return 1.0

    res = A.autotune(pat, bound, head_dim=d, dtype="fp32", builder=A.TritonBuilder(interpret=True), timer=timer,
                     cache=cache, top=1, launch=((4, 2),), device="cpu", progress=False, kv_heads=1)
    assert res.trials and all(t.error is None for t in res.trials)
    assert KC.shape_bucket(pat, bound, head_dim=d, kv_heads=1) == dict(res.key.bucket)


def test_flex_candidate_runs_grouped_query_tensors():
    """The Flex lowering's timed step takes k and v of the call's K/V heads (Flex's ``enable_gqa``)."""
    from attnc.runtime.backends.flex.runner import FlexBuilder

    pat = attnc.load(LOCAL)
    bound = E.bind_sizes(pat, n=64, heads=4)
    out, lse, dq, dk, dv = FlexBuilder(compiled=False).runner(None, pat, bound, None, None, head_dim=16,
                                                              dtype="fp32", batch=1, device="cpu", inputs=None,
                                                              kv_heads=2)()
    assert out.shape == dq.shape == (1, 4, 64, 16) and dk.shape == dv.shape == (1, 2, 64, 16)
    assert all(torch.isfinite(t).all() for t in (out, lse, dq, dk, dv))


def test_the_runner_asks_the_tuner_with_the_calls_kv_heads(monkeypatch):
    """``TritonRunner.config_hook`` (the autotuner when installed) is asked with the call's K/V heads, and
    ``backend='auto'`` looks up the winner of that key."""
    from types import SimpleNamespace

    from attnc.runtime.auto import cuda as AC

    asked = []
    monkeypatch.setattr(TB.TritonRunner, "config_hook",
                        staticmethod(lambda pat, bound, q, inputs, kv_heads: asked.append(kv_heads)))
    q = torch.randn(1, 4, 32, 16)
    for kv in (1, 2, 4):
        attnc.compile_attention(LOCAL, backend="triton")(q, q[:, :kv], q[:, :kv])
    assert asked == [1, 2, 4]
    pat = attnc.load(LOCAL)
    bound = E.bind_sizes(pat, n=32, heads=4)
    looked = []

    def winner(pattern, bound, *, kv_heads, **kw):
        looked.append(kv_heads)
        return "flex" if kv_heads == 1 else "triton"

    monkeypatch.setattr(A, "tuned_winner", winner)
    auto = SimpleNamespace(flex=object(), cuda_winner={}, pattern=pat)
    assert [AC.flex_won(auto, bound, q, q[:, :kv]) for kv in (1, 4, 1)] == [True, False, True]
    assert looked == [1, 4]  # the second call of a key is remembered


# ----------------------------------------------------------------- per-pass sizing (search + tuner)


@pytest.mark.parametrize("hw_name", ["a100", "h100"])
@pytest.mark.parametrize("d", [64, 128])
def test_search_sizes_every_pass(hw_name, d):
    """Every fitting candidate of the search fits the forward, dQ and dK/dV kernels' shared memory
    (recomputed here from the tile sizes, independently of ``pass_smem``) and register budget,
    each at its own pass's launch parameters; the backward's are set."""
    hw = get_hardware(hw_name)
    pat = attnc.load("stdlib:sliding_window", window=512)
    bound = E.bind_sizes(pat, n=4096, heads=2)
    ranked = ScheduleSearch(pat, bound, hw, head_dim=d).run(top=0)
    assert ranked and SR.sized(ranked[0].config, d, 2, hw) is not None
    limit = hw.smem_per_sm_kib * 1024 - 1024
    lag = 0 if hw_name == "h100" else 1  # pipeline buffers: stages on Hopper, stages - 1 on Ampere
    for cand in ranked:
        c = cand.config
        tq, tk, row = c.q_tokens, c.kv_tokens, d * 2
        fs, bs = max(c.num_stages - lag, 1), max(c.bwd_stages - lag, 1)
        assert c.bwd_num_warps and c.bwd_num_stages
        assert tq * row + fs * 2 * tk * row <= limit  # forward: Q + buffers x (K, V)
        assert (tq * d + 1.5 * 2 * tq * tk) / (32 * c.num_warps) <= SR.REG_BUDGET  # O + 2 score tiles
        b = c.backward_config()  # the backward's own tiles, where the search gave it some
        tq, tk = b.q_tokens, b.kv_tokens
        assert 2 * tq * row + bs * 2 * tk * row <= limit  # dQ: Q, dO + buffers x (K, V)
        assert 2 * tk * row + bs * 2 * tq * row + tq * tk * 2 <= limit  # dK/dV
        assert (2 * tk * d + 1.5 * 3 * tq * tk) / (32 * c.bwd_warps) <= SR.REG_BUDGET  # dK/dV: 3 score tiles


def test_backward_launch_prefers_stages_and_refuses_what_cannot_fit():
    h100, a100 = get_hardware("h100"), get_hardware("a100")
    assert SR.backward_launch(64, 64, 64, 2, h100) == (8, 3)
    # d = 128, 128 x 64 tiles: dK/dV needs 2*16K + 3*64K + 16K = 240 KiB > 227 at 3 stages: 2 stages
    assert SR.pass_smem("bwd_dkdv", 128, 64, 128, 2, 3) > 227 * 1024
    assert SR.pass_smem("bwd_dkdv", 128, 64, 128, 2, 2) <= 227 * 1024
    # ... but its registers do not fit at 8 warps (3 score tiles: measured spills at 128 values), 64 x 64 does
    assert SR.pass_registers("bwd_dkdv", 128, 64, 128, 8) > SR.REG_BUDGET
    assert SR.backward_launch(128, 64, 128, 2, h100) is None
    assert SR.backward_launch(64, 64, 128, 2, h100) == (8, 3)
    # on A100 one buffer fewer (cp.async): 3 stages hold 2 buffers, 176 KiB > 163; and at most 2 stages
    assert SR.pass_smem("bwd_dkdv", 128, 64, 128, 2, 3, hopper=False) > 163 * 1024
    assert SR.backward_launch(64, 64, 128, 2, a100) == (8, 2)
    # before Hopper, 4 warps where the tiles fit there (ptxas packs 8 warps on small tiles into 128
    # registers): 64 x 32 at d = 128 fits at 4, 64 x 64 at d = 128 does not; Hopper keeps 8
    assert SR.pass_registers("bwd_dkdv", 64, 32, 128, 4) <= SR.REG_BUDGET
    assert SR.pass_registers("bwd_dkdv", 64, 64, 128, 4) > SR.REG_BUDGET
    assert SR.backward_launch(64, 32, 128, 2, a100) == (4, 2)
    assert SR.backward_launch(64, 32, 128, 2, h100) == (8, 3)
    # 128 x 128 at d = 128: dK, dV and the score tiles exceed the register budget at 8 warps
    assert SR.pass_registers("bwd_dkdv", 128, 128, 128, 8) > SR.REG_BUDGET
    assert SR.backward_launch(128, 128, 128, 2, h100) is None
    assert SR.backward_launch(256, 256, 256, 2, a100) is None


def test_hopper_kv_tiles_are_at_least_64_tokens():
    """wgmma needs 64-row operands: on sm_90 no candidate KV tile (box) below 64 tokens where the
    keys allow one; on A100 the 32-token boxes stay candidates."""
    pat = attnc.load("stdlib:neighborhood_3d")
    bound = E.bind_sizes(pat, heads=1, sizes={"frames": 8, "height": 16, "width": 16})
    h = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=128).run(top=0)
    assert h and min(c.config.kv_tokens for c in h) >= 64
    a = ScheduleSearch(pat, bound, get_hardware("a100"), head_dim=64).run(top=0)
    assert min(c.config.kv_tokens for c in a) == 32
    seq = attnc.load("stdlib:sliding_window", window=512)
    s = ScheduleSearch(seq, E.bind_sizes(seq, n=2048, heads=1), get_hardware("h100"), head_dim=64).run(top=0)
    assert min(c.config.kv_tokens for c in s) >= 64


def test_candidates_vary_each_pass_and_round_trip_the_cache(local):
    pat, bound = local
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=128)
    trials = A.candidates(search, top=1)
    pick = trials[0].config
    assert pick.bwd_num_warps and pick.bwd_num_stages
    fwd = {(t.config.num_warps, t.config.num_stages) for t in trials if t.config.bwd_warps == pick.bwd_warps
           and t.config.bwd_stages == pick.bwd_stages}
    bwd = {(t.config.bwd_warps, t.config.bwd_stages) for t in trials if t.config.num_warps == pick.num_warps
           and t.config.num_stages == pick.num_stages}
    assert len(fwd) > 1 and len(bwd) > 1
    for t in trials:
        assert A.config_from_dict(A.config_dict(t.config)) == t.config
    old = {"q_tile": [64], "kv_tile": [64], "layout": "flat", "num_warps": 4, "num_stages": 2}
    assert A.config_from_dict(old) == KernelConfig((64,), (64,), "flat", 4, 2)  # entries before per-pass configs
    assert A.config_from_dict({**old, "bwd_num_warps": 3, "bwd_num_stages": True}).bwd_num_warps == 0


def test_builder_times_forward_and_backward(local, monkeypatch):
    """The Triton builder's timed callable runs the three kernels (forward, dQ, dK/dV) with each
    pass's launch parameters."""
    pat, bound = local
    launched = []
    real = KL.launch_kernel

    def spy(launch, kernel, grid, args, meta, *, backward):
        launched.append((getattr(kernel, "fn", kernel).__name__, KL._launch_opts(launch, backward)))
        return real(launch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", spy)
    cfg = KernelConfig((64,), (64,), "flat", 4, 2, 8, 1)
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=16)
    sched = search.schedule(cfg.q_tile, cfg.kv_tile)
    builder = A.TritonBuilder(interpret=True)
    path = A.scratch_source(builder.source(pat, bound, sched, cfg))
    fn = builder.runner(builder.load(path), pat, bound, sched, cfg, head_dim=16, dtype="fp16", batch=1,
                        device="cpu", inputs=None)
    fn()
    assert [name for name, _ in launched] == ["attnc_fwd", "attnc_bwd_delta", "attnc_bwd_dq", "attnc_bwd_dkdv"]
    assert launched[0][1] == {"num_warps": 4, "num_stages": 2}
    assert launched[2][1] == launched[3][1] == {"num_warps": 8, "num_stages": 1}


def test_builder_times_the_backwards_own_tiles(local, monkeypatch):
    """A config whose backward and dQ kernel have tiles of their own (the search's Hopper picks, the wide-KV
    trial) is timed with each kernel on its own tiles, as a call's backward runs them: the dK/dV kernel on
    the backward's, the dQ kernel on its own (the timed step had run both on the forward's)."""
    pat, bound = local
    grids = {}
    real = KL.launch_kernel

    def spy(launch, kernel, grid, args, meta, *, backward):
        grids[getattr(kernel, "fn", kernel).__name__] = (grid[0], meta.get("BLOCK_M"), meta.get("BLOCK_N"))
        return real(launch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", spy)
    cfg = KernelConfig((32,), (32,), "flat", 4, 2, 4, 2, bwd_q_tile=(16,), bwd_kv_tile=(64,), dq_q_tile=(64,),
                       dq_kv_tile=(16,))
    search = ScheduleSearch(pat, bound, get_hardware("h100"), head_dim=16)
    builder = A.TritonBuilder(interpret=True)
    path = A.scratch_source(builder.source(pat, bound, search.schedule(cfg.q_tile, cfg.kv_tile), cfg))
    builder.runner(builder.load(path), pat, bound, search.schedule(cfg.q_tile, cfg.kv_tile), cfg, head_dim=16,
                   dtype="fp16", batch=1, device="cpu", inputs=None)()
    n = bound.n
    assert grids["attnc_fwd"] == (-(-n // 32), 32, 32)
    assert grids["attnc_bwd_dq"] == (-(-n // 64), 64, 16)
    assert grids["attnc_bwd_dkdv"] == (-(-n // 64), 16, 64)


# ----------------------------------------------------------------- out of resources: fall back, never fail
class _OutOfResourcesKernels:
    """A loaded kernel module whose kernels raise Triton's ``OutOfResources`` above a shared-memory
    budget computed from the launch (as a GPU's loader does), and run otherwise."""

    def __init__(self, module, too_big):
        self.module, self.too_big, self.launches = module, too_big, []

    def __getattr__(self, name):
        kernel = getattr(self.module, name)
        outer = self

        class Proxy:
            fn = getattr(kernel, "fn", kernel)

            def __getitem__(self, grid):
                def launch(*args, **kw):
                    # (the backward's row-term pre-pass has no tiles: None, None)
                    outer.launches.append((name, kw.get("BLOCK_M"), kw.get("BLOCK_N"), kw["num_stages"]))
                    if outer.too_big(name, kw):
                        from triton.runtime.errors import OutOfResources

                        raise OutOfResources(300000, 232448, "shared memory")
                    return kernel[grid](*args, **kw)

                return launch

        return Proxy()


def _run_with(monkeypatch, cfg: KernelConfig | None, too_big) -> list:
    """Triton calls run ``cfg`` (None: their own) and their kernel modules refuse launches ``too_big(name,
    kwargs)`` says are out of resources; returns the modules' wrappers (their ``launches``), filled as
    modules load."""
    if cfg is not None:
        monkeypatch.setattr(TB.TritonRunner, "config_hook", lambda pat, bound, q, inputs, kv_heads: cfg)
    wrappers = []
    real_load = TB.load_kernels

    def load(path, interpret=False):
        wrappers.append(_OutOfResourcesKernels(real_load(path, interpret), too_big))
        return wrappers[-1]

    monkeypatch.setattr(TB, "load_kernels", load)
    return wrappers


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("case", ["stages", "fwd_tiles", "bwd_tiles"])
def test_out_of_resources_falls_back_to_a_smaller_config(monkeypatch, case):
    """A launch Triton refuses (simulated ``OutOfResources``) is retried with fewer stages, then
    with smaller tiles, forward or backward alone, and the results still equal the reference."""
    too_big = {
        "stages": lambda name, kw: kw["num_stages"] > 1,
        "fwd_tiles": lambda name, kw: name == "attnc_fwd" and kw["BLOCK_N"] > 16,
        "bwd_tiles": lambda name, kw: name == "attnc_bwd_dkdv" and kw["BLOCK_M"] * kw["BLOCK_N"] > 32 * 16,
    }[case]
    wrappers = _run_with(monkeypatch, None, too_big)
    pat = attnc.load(LOCAL)
    tri = attnc.compile_attention(pat, backend="triton", q_tile=32, kv_tile=32)
    ref = attnc.compile_attention(pat, backend="reference")
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 48, 16, generator=g).requires_grad_() for _ in range(3))
    out = tri(q, k, v)
    out.sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    expect = ref(q, k, v)
    expect.sum().backward()
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=2e-5)
    for got, want in zip(grads, (q.grad, k.grad, v.grad), strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    launches = [x for w in wrappers for x in w.launches]
    refused = [x for x in launches if too_big(x[0], {"BLOCK_M": x[1], "BLOCK_N": x[2], "num_stages": x[3]})]
    assert refused  # the simulated limit was hit, and fallen back from
    ran = {x[0] for x in launches if x not in refused}
    assert ran == {"attnc_fwd", "attnc_bwd_delta", "attnc_bwd_dq", "attnc_bwd_dkdv"}
    if case == "stages":
        assert refused[0][3] == 2 and any(x[3] == 1 for x in launches)
    # the next call starts from the fallen-back config: nothing refused again
    for w in wrappers:
        w.launches.clear()
    tri(q, k, v).sum().backward()
    again = [x for w in wrappers for x in w.launches]
    assert again and not [x for x in again if too_big(x[0], {"BLOCK_M": x[1], "BLOCK_N": x[2], "num_stages": x[3]})]


def test_smaller_config_halves_kv_then_q_and_stops_at_16():
    c = KernelConfig((64,), (32,), "flat", 8, 3, 8, 3)
    s1 = KL.smaller_config(c)
    assert s1.kv_tile == (16,) and s1.q_tile == (64,) and s1.num_stages == 2 and s1.bwd_num_stages == 2
    s2 = KL.smaller_config(s1)
    assert s2.q_tile == (32,) and s2.kv_tile == (16,)
    assert KL.smaller_config(KernelConfig((16,), (16,))) is None
    box = KL.smaller_config(KernelConfig((4, 8, 8), (4, 4, 4), "address"))
    assert box.kv_tile == (2, 4, 4) and box.q_tile == (4, 8, 8)
    assert KL.smaller_config(KernelConfig((64,), (64,)), square=True).kv_tile == (32,)


BIASED = """pattern biased
  tokens seq
  input b: float[heads, n]
  mask k <= q and q - k < 20
  bias 0.5 * b[h, k] * b[h, q]
"""
#: (config, the kernels' (name, BLOCK_M, BLOCK_N)): the backward on tiles of its own, then with the dQ
#: kernel on tiles of its own besides (KernelConfig.dq_q_tile)
OWN_TILES = {
    "bwd": (KernelConfig((32,), (16,), "address", 4, 2, 4, 2, (16,), (32,)),
            {("attnc_fwd", 32, 16), ("attnc_bwd_delta", None, None), ("attnc_bwd_dq", 16, 32),
             ("attnc_bwd_dkdv", 16, 32)}),
    "dq": (KernelConfig((32,), (16,), "address", 4, 2, 4, 2, (16,), (32,), (32,), (16,)),
           {("attnc_fwd", 32, 16), ("attnc_bwd_delta", None, None), ("attnc_bwd_dq", 32, 16),
            ("attnc_bwd_dkdv", 16, 32)}),
}


@pytest.mark.parametrize("tiles", list(OWN_TILES))
@pytest.mark.parametrize(("spec", "params"), [(LOCAL, {}), ("stdlib:forgetting", {}), (BIASED, {})],
                         ids=["local", "forgetting", "bias-input"])
def test_backward_on_its_own_tiles_equals_the_reference(monkeypatch, spec, params, tiles):
    """A config whose backward has tiles of its own (not the forward's, nor sub-tiles of them) runs
    the forward at its tiles and the dQ and dK/dV kernels on a schedule re-planned at the backward's,
    or the dQ kernel on one re-planned at its own; the gradients (q, k, v, a FoX gate's and a bias
    input's, whose dS the dQ kernel stores at its tiles) equal the dense reference's, in float64 terms."""
    cfg, kernels = OWN_TILES[tiles]
    assert cfg.own_backward_tiles and cfg.backward_config().q_tile == (16,)
    assert cfg.own_dq_tiles == (tiles == "dq") and cfg.dq_config().q_tile == (32 if tiles == "dq" else 16,)
    wrappers = _run_with(monkeypatch, cfg, lambda name, kw: False)
    pat = attnc.load(spec, **params)
    tri = attnc.compile_attention(pat, backend="triton")
    ref = attnc.compile_attention(pat, backend="reference")
    g = torch.Generator().manual_seed(3)
    n = 48
    q, k, v = (torch.randn(1, 2, n, 16, generator=g).requires_grad_() for _ in range(3))
    inputs = {}
    if pat.decay is not None:
        inputs[pat.decay] = (-torch.rand(2, n, generator=g)).requires_grad_()
    if pat.bias is not None:
        inputs["b"] = torch.randn(2, n, generator=g).requires_grad_()
    out = tri(q, k, v, **inputs)
    out.pow(2).sum().backward()
    got = [x.grad.clone() for x in (q, k, v, *inputs.values())]
    for x in (q, k, v, *inputs.values()):
        x.grad = None
    want_out = ref(q.double(), k.double(), v.double(), **{n_: t.double() for n_, t in inputs.items()})
    want_out.pow(2).sum().backward()
    want = [x.grad for x in (q, k, v, *inputs.values())]
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-5)
    ran = {(name, bm, bn) for w in wrappers for name, bm, bn, _ in w.launches}
    assert ran == kernels


def test_dq_kernel_out_of_resources_on_its_own_tiles_runs_on_the_backwards(monkeypatch):
    """A dQ kernel on tiles of its own that runs out of resources (at every stage count) runs on the
    backward's tiles, beside the dK/dV kernel; the gradients stay the reference's."""
    wrappers = _run_with(monkeypatch, OWN_TILES["dq"][0], lambda name, kw: name == "attnc_bwd_dq" and kw["BLOCK_M"] == 32)
    pat = attnc.load(LOCAL)
    tri = attnc.compile_attention(pat, backend="triton")
    ref = attnc.compile_attention(pat, backend="reference")
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g).requires_grad_() for _ in range(3))
    got = torch.autograd.grad(tri(q, k, v).pow(2).sum(), (q, k, v))
    want = torch.autograd.grad(ref(q.double(), k.double(), v.double()).pow(2).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-5)
    ran = [(name, bm, bn) for w in wrappers for name, bm, bn, _ in w.launches]
    # the dQ kernel tried at its own tiles (refused at 2 and 1 stages), then run at the backward's
    # (the backward's row term, once per try of the backward)
    assert sorted(ran, key=str) == sorted([("attnc_fwd", 32, 16), *[("attnc_bwd_delta", None, None)] * 2,
                                           ("attnc_bwd_dq", 32, 16), ("attnc_bwd_dq", 32, 16),
                                           ("attnc_bwd_dq", 16, 32), ("attnc_bwd_dkdv", 16, 32)], key=str)


def test_search_gives_the_dq_kernel_larger_tiles_where_only_dkdv_needs_smaller():
    """FoX at d = 128 on sm_90: dK/dV fits only at 32-row Q tiles, dQ at 64 (wgmma's minimum): the search
    gives the dQ kernel its own 64-row tiles, each pass fitting at its tiles and the backward's launch; a
    routing pattern (which would select again for another plan) keeps one backward plan."""
    hw = get_hardware("h100")
    tiles = 2 + SR.DECAY_BWD_TILES
    cfg = SR.sized(KernelConfig((64,), (64,), "flat", 4, 3), 128, 2, hw, 2, tiles)
    b, dq = cfg.backward_config(), cfg.dq_config()
    assert b.q_tile == (32,) and dq.q_tile == (64,) and cfg.own_dq_tiles
    assert SR.pass_fits("bwd_dkdv", b.q_tokens, b.kv_tokens, 128, 2, cfg.bwd_warps, cfg.bwd_stages, hw, tiles)
    assert SR.pass_fits("bwd_dq", dq.q_tokens, dq.kv_tokens, 128, 2, cfg.bwd_warps, cfg.bwd_stages, hw, tiles)
    assert not SR.pass_fits("bwd_dkdv", 64, 64, 128, 2, cfg.bwd_warps, cfg.bwd_stages, hw, tiles)
    one = SR.sized(KernelConfig((64,), (64,), "flat", 4, 3), 128, 2, hw, 2, tiles, dq_tiles=False)
    assert not one.own_dq_tiles and one.dq_config() == one.backward_config()
    assert A.config_from_dict(A.config_dict(cfg)) == cfg


def test_search_gives_the_backward_sub_tiles_where_it_does_not_fit_at_the_forwards():
    """On sm_90 at d = 128, the forward at 128/64 fits 8 warps; the backward there only with its own
    tiles when the model says so: whatever the search sets, each pass fits at its own tiles."""
    hw = get_hardware("h100")
    tiles = SR.backward_tiles((128,), (128,), hw)
    assert tiles[0] == ((128,), (128,)) and ((64,), (128,)) in tiles and all(k[0] >= 64 for _, k in tiles)
    assert tiles.index(((64,), (128,))) < tiles.index(((128,), (64,)))  # the longer KV tile first
    cfg = SR.sized(KernelConfig((128,), (64,), "flat", 8, 2), 128, 2, get_hardware("a100"))
    assert cfg is not None and all(SR.pass_fits(p, math.prod(cfg.backward_config().q_tile),
                                           math.prod(cfg.backward_config().kv_tile), 128, 2, cfg.bwd_warps,
                                           cfg.bwd_stages, get_hardware("a100")) for p in SR.PASSES[1:])
    big = SR.sized(KernelConfig((128,), (64,), "flat", 8, 2), 128, 2, hw)
    assert big is not None and big.bwd_num_warps
    b = big.backward_config()
    assert all(SR.pass_fits(p, b.q_tokens, b.kv_tokens, 128, 2, big.bwd_warps, big.bwd_stages, hw)
               for p in SR.PASSES[1:])
    # before Hopper the backward keeps at most two stages (a third spills: MAX_BWD_STAGES_MMA)
    small = SR.sized(KernelConfig((64,), (64,), "flat", 4, 3), 64, 2, get_hardware("a100"))
    assert small is not None and small.bwd_stages <= SR.MAX_BWD_STAGES_MMA


@pytest.mark.parametrize("winner", ["flex", "triton"])
def test_cli_tune_names_the_flex_candidate_and_marks_the_one_winner(capsys, monkeypatch, tmp_path, winner):
    """`attnc tune` lists the FlexAttention lowering by name (not by the config it borrows), and the
    star marks exactly the winner: the Flex row when it won, else the fastest Triton kernel."""
    import types

    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setattr(A, "cuda_available", lambda: True)
    cfg = KernelConfig((64,), (64,), "flat", 4, 3)
    trials = [A.Trial(0, cfg, None, 1.0, measured_ms=2.0), A.Trial(1, dataclasses.replace(cfg, num_stages=2), None,
                                                                  1.1, measured_ms=3.0),
              A.Trial(2, cfg, None, float("nan"), backend="flex", measured_ms=1.0 if winner == "flex" else 9.0)]
    fake = types.SimpleNamespace(from_cache=False, trials=trials, config=cfg, winner=winner, best_rank=0,
                                 key=types.SimpleNamespace(device="FAKE GPU"), source_path=tmp_path / "k" / "x.py")
    monkeypatch.setattr(A, "autotune", lambda *a, **k: fake)
    code, out, _ = run_cli(capsys, "tune", "stdlib:sliding_window", "-p", "window=64", "--n", "1024")
    assert code == 0
    rows = [line for line in out.splitlines() if " ms " in line]
    assert len(rows) == 3 and sum(line.startswith(" * ") for line in rows) == 1
    star = next(line for line in rows if line.startswith(" * "))
    assert ("FlexAttention lowering" in star) == (winner == "flex")
    assert ("2.0000 ms" in star) == (winner == "triton")
    assert sum("FlexAttention lowering" in line for line in rows) == 1
    assert sum("64/64 flat w4 s3" in line for line in rows) == 1 and "64/64 flat w4 s2" in out  # named by config


def test_backward_out_of_resources_on_its_own_tiles_shrinks_the_backward_only(monkeypatch):
    """A backward on tiles of its own that runs out of resources falls back to smaller backward tiles;
    the forward keeps its config, on this call and the next (before, the backward's shrunk config
    replaced the forward's)."""
    cfg = KernelConfig((32,), (16,), "address", 4, 2, 4, 1, (16,), (32,))

    def too_big(name, kw):  # the backward kernels cannot take a 32-token KV tile
        return name.startswith("attnc_bwd") and kw.get("BLOCK_N") == 32

    wrappers = _run_with(monkeypatch, cfg, too_big)
    pat = attnc.load(LOCAL)
    tri = attnc.compile_attention(pat, backend="triton")
    ref = attnc.compile_attention(pat, backend="reference")
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=g).requires_grad_() for _ in range(3))
    for attempt in range(2):
        for w in wrappers:
            w.launches.clear()
        out = tri(q, k, v)
        got = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
        want_out = ref(q.double(), k.double(), v.double())
        want = torch.autograd.grad(want_out.pow(2).sum(), (q, k, v))
        torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=5e-5)
        ran = [(name, bm, bn) for w in wrappers for name, bm, bn, _ in w.launches]
        assert ("attnc_fwd", 32, 16) in ran and all(x == ("attnc_fwd", 32, 16) for x in ran if x[0] == "attnc_fwd")
        assert ("attnc_bwd_dq", 16, 16) in ran and ("attnc_bwd_dkdv", 16, 16) in ran
        if attempt == 1:  # the fallback is kept: nothing refused again
            assert not any(too_big(name, {"BLOCK_N": bn}) for name, _, bn in ran)
