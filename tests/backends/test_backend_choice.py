"""backend="auto" on CPU (the executor or the Flex lowering per call: runtime.auto.cpu) and
torch.compile(fullgraph=True) of modules using the Flex lowering (runtime.flex_op).

The rule's decisions are asserted on representative plans (never timings). Runs that would pick the
fused Flex kernel use Flex's dense implementation here (``compiled = False``: no torch.compile of
the kernel in the normal test run; tests/backends/test_flex_backend.py runs the fused kernel once)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_attention_module

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.runtime.auto import cpu as BC
from attnc.runtime.backends.flex import kernels as FK
from attnc.runtime.backends.flex import runner as FB

TIGHT = {"rtol": 1e-10, "atol": 1e-10}


def decide(spec, n, heads, sizes=None, dtype=torch.float32, grad=False, need_lse=False, **kw):
    attn = attnc.compile_attention(spec, sizes=sizes, **kw)
    bound = E.bind_sizes(attn.pattern, n=n, heads=heads, sizes=sizes)
    q = torch.empty(1, heads, n, 64, dtype=dtype, requires_grad=grad)
    with torch.set_grad_enabled(grad):
        return attn.runner.decide(bound, q, q, q, {}, need_lse)


# ================================================================ the rule
@pytest.mark.parametrize("case", ["grad", "lse", "fp64"])
def test_flex_only_where_its_fused_cpu_kernel_serves(case):
    """Training, lse and float64 calls would run Flex's dense O(N^2) implementation: the executor."""
    kw = {"grad": case == "grad", "need_lse": case == "lse", "dtype": torch.float64 if case == "fp64" else torch.float32}
    choice = decide("stdlib:sliding_window", 2048, 4, window=256, **kw)
    assert choice.backend == "cpu" and choice.flex_s is None
    assert {"grad": "gradients", "lse": "lse", "fp64": "float64"}[case] in choice.reason
    # the same plan for inference in fp32: Flex (modelled faster)
    assert decide("stdlib:sliding_window", 2048, 4, window=256).backend == "flex"


@pytest.mark.parametrize("spec,n,heads,sizes,params,expected", [
    ("stdlib:sliding_window", 8192, 8, None, {"window": 512}, "flex"),  # the 1-D case
    ("stdlib:sliding_window", 64, 1, None, {"window": 16}, "flex"),  # tiny: the executor's per-call cost
    # measured on the quiet machine: the executor 59 ms, the Flex lowering 211 ms (its long grid mask)
    ("stdlib:neighborhood_3d", 8 * 24 * 24, 4, {"frames": 8, "height": 24, "width": 24},
     {"kernel_size": (3, 7, 7)}, "cpu"),
    ("stdlib:neighborhood_2d", 96 * 96, 4, {"height": 96, "width": 96}, {"kernel_size": 13}, "cpu"),  # per-token work
])
def test_rule_on_representative_plans(spec, n, heads, sizes, params, expected):
    choice = decide(spec, n, heads, sizes, **params)
    assert choice.backend == expected
    assert (choice.flex_s < choice.cpu_s) == (expected == "flex")
    assert choice.describe().startswith(f"auto chose backend '{expected}'")


def test_time_model_is_linear_in_the_schedule():
    attn = attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=64)
    q = torch.randn(1, 2, 512, 16)
    with torch.no_grad():
        attn(q, q, q)
    sched = attn.schedule
    full, partial, pairs = BC.schedule_work(sched)
    # per head: the band's token pairs, exactly (FULL + PARTIAL tiles hold every allowed pair)
    assert full + partial >= 2 * sum(min(i + 1, 64) for i in range(512))
    m = BC.TimeModel(token_s=1.0, pair_s=0.0, call_s=0.0, partial_token_s=2.0, mask_op_s=0.5)
    assert m.seconds(sched, 3, 16, 16, mask_ops=7) == pytest.approx(3 * (32 * full + (32 * 2 + 0.5 * 7) * partial))
    assert BC.TimeModel(0.0, 1.0, 5.0, 0.0).seconds(sched, 2, 16, 16) == pytest.approx(5.0 + 2 * pairs)


def test_calibration_is_reproduced_and_ordered_by_the_constants():
    """The constants reproduce the quiet measurements they were fitted to (within 10%) and order
    every case as measured; the recorded mask operator counts are what the lowering counts now."""
    from attnc.compiler.codegen.flex import FlexSource

    for case, cpu_ms, flex_ms, ops, cpu_work, flex_work in BC.CALIBRATION:
        c, f = (1e3 * model.seconds_of(work, 1, 64, 64, ops) for model, work in ((BC.CPU, cpu_work), (BC.FLEX, flex_work)))
        assert abs(c / cpu_ms - 1) < 0.1 and abs(f / flex_ms - 1) < 0.1, (case, c, cpu_ms, f, flex_ms)
        assert (f < c) == (flex_ms < cpu_ms), case
    one_d = FlexSource("", (), (), False, "def mask_mod(b, h, q_idx, kv_idx):\n    return (k <= q) & ((q - k) < 512)\n")
    assert one_d.mask_ops == 4


@pytest.mark.parametrize("spec,n,sizes,params,ops", [
    ("stdlib:sliding_window", 8192, None, {"window": 512}, 4),
    ("stdlib:neighborhood_2d", None, {"height": 64, "width": 64}, {"kernel_size": 13}, 73),
    ("stdlib:neighborhood_3d", None, {"frames": 8, "height": 24, "width": 24}, {"kernel_size": (3, 7, 7)}, 90),
])
def test_mask_ops_of_the_calibrated_lowerings(spec, n, sizes, params, ops):
    from attnc.runtime.backends.flex.runner import FlexBuilder

    pat = attnc.load(spec, **params)
    bound = E.bind_sizes(pat, n=n, heads=4, sizes=sizes)
    source = FlexBuilder().source(pat, bound, None, None)
    runner = FlexBuilder()._runner(pat)
    assert runner.plan(bound, {}, frozenset()).source.mask_ops == ops, source


def test_unequal_forced_tiles_and_unlowerable_patterns_take_the_executor():
    choice = decide("stdlib:sliding_window", 1024, 2, window=128, q_tile=64, kv_tile=32)
    assert choice.backend == "cpu" and "unequal" in choice.reason
    choice = decide("stdlib:sliding_window", 1024, 2, window=128, q_tile=8, kv_tile=8)
    assert choice.backend == "cpu" and "power of two of at least 16" in choice.reason
    attn = attnc.compile_attention("stdlib:sliding_window", window=8)
    attn.runner.flex, attn.runner.unlowerable = None, "why"
    q = torch.randn(1, 1, 32, 8)
    with torch.no_grad():
        attn(q, q, q)
    assert attn.chosen_backend == "cpu" and "no Flex lowering: why" in attn.last_choice.reason


# ================================================================ end to end
def test_auto_runs_the_chosen_backend_with_the_same_results():
    spec, params = "stdlib:forgetting", {}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 80, 16, generator=g) for _ in range(3))
    k, v = k[:, :2], v[:, :2]  # GQA
    gates = torch.nn.functional.logsigmoid(torch.randn(4, 80, generator=g))
    auto = attnc.compile_attention(spec, **params)
    auto.runner.flex.compiled = False
    cpu = attnc.compile_attention(spec, backend="cpu", **params)
    assert auto.chosen_backend is None and "auto chose" not in auto.source
    with torch.no_grad():
        out = auto(q, k, v, g=gates)
        expected = cpu(q, k, v, g=gates)
    assert auto.chosen_backend == "flex" and auto.runner.flex.last is not None
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)  # fp32 rounding only
    assert auto.source.startswith("# auto chose backend 'flex'") and "def score_mod" in auto.source
    assert auto.schedule is auto.runner.flex.last.schedule
    # training: the executor, its gradients
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = auto(qg, kg, vg, g=gates, return_lse=True)
    assert auto.chosen_backend == "cpu" and "q_tile" in auto.source
    o2, l2 = cpu(q, k, v, g=gates, return_lse=True)
    torch.testing.assert_close(out, o2, rtol=0, atol=0)
    torch.testing.assert_close(lse, l2, rtol=0, atol=0)


def _reference_grads(spec, q, k, v, inputs, wrt_inputs, **params):
    ref = attnc.compile_attention(spec, backend="reference", **params)
    o, lse = ref(q, k, v, return_lse=True, **inputs)
    loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + 0.3 * lse.sum()
    return o, lse, torch.autograd.grad(loss, (q, k, v, *(inputs[n] for n in wrt_inputs)))


def test_flex_module_under_torch_compile_fullgraph():
    """A model using backend='flex' compiles with fullgraph=True (attnc::runner_attention): outputs,
    lse and gradients of q, k, v and the FoX gates equal the reference (float64, GQA)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 37, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    gates = torch.nn.functional.logsigmoid(torch.randn(4, 37, generator=g, dtype=torch.float64)).requires_grad_()
    attn = attnc.compile_attention("stdlib:forgetting", backend="flex", q_tile=16)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, q, k, v, g):
            return self.attn(q, k, v, g=g, return_lse=True)

    model = torch.compile(Model(), fullgraph=True)
    o, lse = model(q, k, v, gates)
    loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum() + 0.3 * lse.sum()
    grads = torch.autograd.grad(loss, (q, k, v, gates))
    o1, l1, g1 = _reference_grads("stdlib:forgetting", q, k, v, {"g": gates}, ("g",))
    torch.testing.assert_close(o, o1, **TIGHT)
    torch.testing.assert_close(lse, l1, **TIGHT)
    for a, b in zip(grads, g1, strict=True):
        torch.testing.assert_close(a, b, **TIGHT)
    assert attn.runner.last_path == "dense"  # float64 with gradients: Flex's dense implementation


def test_auto_module_under_torch_compile_fullgraph():
    """Under torch.compile, auto's per-call choice happens inside attnc::runner_attention (inference;
    training calls go to the executor's own op, tested with the CPU backend)."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 70, 8, generator=g) for _ in range(3))
    attn = attnc.compile_attention("stdlib:sliding_window", window=9)
    attn.runner.flex.compiled = False
    ref = attnc.compile_attention("stdlib:sliding_window", backend="reference", window=9)
    fn = torch.compile(lambda q, k, v: attn(q, k, v), fullgraph=True)
    with torch.no_grad():
        out = fn(q, k, v)
    assert attn.chosen_backend == "flex"
    torch.testing.assert_close(out, ref(q, k, v), rtol=1e-5, atol=1e-5)


# ================================================================ Flex plans
def test_compile_failure_falls_back_to_dense_and_auto_avoids_it(monkeypatch):
    from torch._dynamo.exc import TorchDynamoException

    def broken(ns):
        def call(*args):
            raise TorchDynamoException("C++ compile error\nCommand: g++ kernel.cpp\n"
                                       "kernel.cpp:7:3: error: 'cur' was not declared (simulated)")
        return call

    monkeypatch.setattr(FB, "compiled_call", broken)
    attn = attnc.compile_attention("stdlib:streaming", backend="flex", window=5, sinks=2)
    ref = attnc.compile_attention("stdlib:streaming", backend="reference", window=5, sinks=2)
    q = torch.randn(1, 2, 50, 8)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="torch.compile of Flex's kernel failed"):
        out = attn(q, q, q)
    assert attn.runner.last_path == "dense" and "simulated" in attn.runner.fused_failure(attn.runner.last)
    # the compiler's own error line, not the first line of its text (which opens with its command)
    assert "error: 'cur' was not declared" in attn.runner.fused_failure(attn.runner.last)
    torch.testing.assert_close(out, ref(q, q, q), rtol=1e-5, atol=1e-5)
    auto = attnc.compile_attention("stdlib:streaming", window=5, sinks=2)  # the same mods: known to fail
    with torch.no_grad():
        auto(q, q, q)
    assert auto.chosen_backend == "cpu" and "failed" in auto.last_choice.reason


def test_short_sequences_get_power_of_two_blocks_and_mods_are_shared_across_lengths():
    runner = FB.FlexRunner(attnc.load("stdlib:sliding_window", window=8))
    plans = []
    for n in (40, 300, 1000):
        bound = E.bind_sizes(runner.pattern, n=n, heads=2)
        plans.append(runner.plan(bound, {}, frozenset()))
    assert plans[0].block_size == (64, 64) and plans[0].schedule.q_tile == (40,)
    assert all(FK.block_refusal(p) is None for p in plans)
    # one namespace (one compiled Flex call, dynamic shapes) for every length of a 1-D pattern
    assert plans[0].namespace is plans[1].namespace is plans[2].namespace
    grid = FB.FlexRunner(attnc.load("stdlib:neighborhood_2d", kernel_size=3))
    a, b = (grid.plan(E.bind_sizes(grid.pattern, heads=1, sizes={"height": h, "width": 16}), {}, frozenset())
            for h in (16, 24))
    assert a.namespace is not b.namespace  # the axis lengths are literals of the NATTEN window


# ================================================================ the autotuner's Flex candidate
class _FakeTriton:
    """Triton candidates that return their config when run (no kernels: the selection logic only)."""

    name = "fake"

    def source(self, pat, bound, schedule, config):
        return f"# fake kernel {config}\n"

    def load(self, path):
        return None

    def runner(self, kernels, pat, bound, schedule, config, **kw):
        return lambda: config


@pytest.mark.parametrize("flex_ms,winner", [(0.5, "flex"), (5.0, "triton")])
def test_autotuner_times_the_flex_lowering_beside_the_kernels(tmp_path, flex_ms, winner):
    """The injectable timer times every candidate, the Flex lowering included (it really runs here:
    Flex's dense implementation on CPU); the winner's backend is recorded in the result and the cache,
    and the cached config stays the best Triton kernel's."""
    from attnc.runtime.tuning import autotune as A
    from attnc.runtime.tuning import kernel_cache as KC

    pat = attnc.load("stdlib:sliding_window", window=24)
    bound = E.bind_sizes(pat, n=256, heads=2)
    ran = []

    def timer(fn):
        res = fn()
        if isinstance(res, tuple):  # the Flex candidate: a training step (out, lse, dq, dk, dv) of real Flex calls
            out, lse, *grads = res
            assert out.shape == (1, 2, 256, 64) and torch.isfinite(out).all() and lse.shape == (1, 2, 256)
            assert [g.shape for g in grads] == [(1, 2, 256, 64)] * 3 and all(torch.isfinite(g).all() for g in grads)
            ran.append("flex")
            return flex_ms
        return 1.0 + res.q_tokens / 1024  # Triton candidates: the smallest Q tile wins at >= 1 ms

    cache = KC.KernelCache(tmp_path / "cache")
    res = A.autotune(pat, bound, head_dim=64, builder=_FakeTriton(), timer=timer, cache=cache, device="cpu",
                     flex=True, flex_builder=FB.FlexBuilder(compiled=False), progress=False)
    assert ran == ["flex"] and [t.backend for t in res.trials].count("flex") == 1
    assert res.winner == winner and res.config.q_tokens == min(t.config.q_tokens for t in res.trials)
    assert next(t for t in res.trials if t.backend == "flex").to_dict()["backend"] == "flex"
    assert "def mask_mod" in FB.FlexBuilder(compiled=False).source(pat, bound, None, None)
    again = A.autotune(pat, bound, head_dim=64, builder=_FakeTriton(), timer=timer, cache=cache, device="cpu",
                       progress=False)
    assert again.from_cache and again.winner == winner and again.config == res.config
    assert A.tuned_winner(pat, bound, head_dim=64, cache=cache) == winner
    # without flex=True on CPU (tests, the CLI): the Triton candidates only, as before
    plain = A.autotune(pat, bound, head_dim=64, builder=_FakeTriton(), timer=timer, cache=cache, device="cpu",
                       progress=False, retune=True)
    assert all(t.backend == "triton" for t in plain.trials) and plain.winner == "triton"


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_modules_that_ran_flex_copy_and_save(backend):
    """deepcopy and torch.save of a module after a Flex call (its plans hold generated functions):
    the copy plans again and computes the same."""
    import copy
    import io

    attn = attnc.compile_attention("stdlib:sliding_window", backend=backend, window=8)
    runner = attn.runner if backend == "flex" else attn.runner.flex
    runner.compiled = False
    q = torch.randn(1, 2, 40, 8)
    with torch.no_grad():
        out = attn(q, q, q)
        buf = io.BytesIO()
        torch.save(attn, buf)
        buf.seek(0)
        for twin in (copy.deepcopy(attn), torch.load(buf, weights_only=False)):
            torch.testing.assert_close(twin(q, q, q), out, rtol=0, atol=0)
            assert twin.chosen_backend == "flex"


def test_a_module_that_ran_triton_kernels_copies_pickles_and_saves():
    """After a training call and decoding steps its plans hold loaded kernel modules: deepcopy, pickle and torch.save
    raised 'cannot pickle module'; a copy plans again and computes the same."""
    import copy
    import io
    import pickle

    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=8)
    q, k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(3))
    out = attn(q, k, v)
    out.sum().backward()
    with torch.no_grad():
        for n in (40, 48):  # a growing cache's steps (served as pages, bound for replay)
            attn(torch.randn(1, 2, 1, 16), torch.randn(1, 2, n, 16), torch.randn(1, 2, n, 16))
    buf = io.BytesIO()
    torch.save(attn, buf)
    buf.seek(0)
    for twin in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn)), torch.load(buf, weights_only=False)):
        torch.testing.assert_close(twin(q, k, v), out, rtol=0, atol=0)


# ================================================================ the first calls (break-even rule)
def test_first_calls_take_the_executor_until_their_loss_pays_for_the_compile(monkeypatch):
    """Flex modelled faster but not compiled: the executor serves calls until their summed modelled
    loss reaches the compile estimate; that call compiles (here: a stand-in that runs Flex eagerly
    and counts), later calls and a second module of the same pattern take the kernel at once."""
    compiles = []

    def fake_compiled(ns):
        def call(*args):
            compiles.append(args[0].shape[2])
            return ns["flex_call"](*args)
        return call

    monkeypatch.setattr(FB, "compiled_call", fake_compiled)
    monkeypatch.setattr(FK, "COMPILE_SECONDS", [])
    monkeypatch.setattr(flex_attention_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)  # Flex in eager
    spec, params = "stdlib:sliding_window", {"window": 23}  # mods no other test compiles
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 96, 16, generator=g) for _ in range(3))
    ref = attnc.compile_attention(spec, backend="reference", **params)
    auto = attnc.compile_attention(spec, **params)
    bound = E.bind_sizes(auto.pattern, n=96, heads=2)
    modelled = auto.runner.decide(bound, q, k, v, {}, False)
    assert modelled.backend == "flex"
    monkeypatch.setattr(BC, "COMPILE_COST_S", 2.5 * (modelled.cpu_s - modelled.flex_s))
    chosen = []
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(auto(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
            chosen.append(auto.chosen_backend)
    assert chosen == ["cpu", "cpu", "flex", "flex"] and compiles == [96, 96]
    assert len(FK.COMPILE_SECONDS) == 1  # the compiling call was measured: the next estimate
    assert BC.compile_cost_s() == 2.5 * (modelled.cpu_s - modelled.flex_s)  # the override wins
    monkeypatch.setattr(BC, "COMPILE_COST_S", None)
    assert BC.compile_cost_s() == FK.COMPILE_SECONDS[-1]
    twin = attnc.compile_attention(spec, **params)  # same mods and shapes: the kernel is there
    with torch.no_grad():
        twin(q, k, v)
    assert twin.chosen_backend == "flex" and compiles == [96, 96, 96]


def test_break_even_reasons_and_dynamic_lengths(monkeypatch):
    monkeypatch.setattr(FB, "compiled_call", lambda ns: ns["flex_call"])
    monkeypatch.setattr(FK, "COMPILE_SECONDS", [])
    monkeypatch.setattr(flex_attention_module, "_FLEX_ATTENTION_DISABLE_COMPILE_DEBUG", True)
    monkeypatch.setattr(BC, "COMPILE_COST_S", 1e9)  # never worth compiling
    spec, params = "stdlib:sliding_window", {"window": 29}
    auto = attnc.compile_attention(spec, **params)
    q = torch.randn(1, 2, 80, 16)
    with torch.no_grad():
        auto(q, q, q)
    assert auto.chosen_backend == "cpu" and "not compiled yet" in auto.last_choice.reason
    assert auto.last_choice.flex_s < auto.last_choice.cpu_s  # the model prefers Flex all the same
    monkeypatch.setattr(BC, "COMPILE_COST_S", 0.0)  # steady-state benchmarks: compile at once
    runner = auto.runner.flex
    with torch.no_grad():
        for n in (80, 112):
            x = torch.randn(1, 2, n, 16)
            auto(x, x, x)
            assert auto.chosen_backend == "flex" and "compiling it now" in auto.last_choice.reason
        # two lengths ran: dynamo holds a kernel with dynamic lengths, a third length needs no compile
        x = torch.randn(1, 2, 144, 16)
        assert runner.kernel_ready(runner.plan(E.bind_sizes(auto.pattern, n=144, heads=2), {}, frozenset()),
                                   x, x, x, False)
        assert not runner.kernel_ready(runner.last, x, x, x[..., :8], False)  # another value dim: a new kernel


def test_a_static_masks_choice_is_remembered_per_call_shapes(monkeypatch):
    """Repeated calls of the same shapes reuse the choice (no planner lookups, no thread switch);
    other shapes, gradients or lse decide again, and a data-dependent mask decides every call."""
    attn = attnc.compile_attention("stdlib:sliding_window", window=16)
    attn.runner.flex.compiled = False
    runner = attn.runner
    calls = []
    real = runner._decide
    monkeypatch.setattr(runner, "_decide", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = torch.randn(1, 2, 64, 8)
    with torch.no_grad():
        first = attn(q, q, q)
        again = attn(q, q, q)
        attn(torch.randn(1, 2, 96, 8), torch.randn(1, 2, 96, 8), torch.randn(1, 2, 96, 8))
        attn(q, q, q, return_lse=True)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert len(calls) == 3 and attn.chosen_backend == "cpu"  # (lse: the executor)
    qg = q.clone().requires_grad_()
    attn(qg, qg, qg)
    assert len(calls) == 4
    doc = attnc.compile_attention("stdlib:document")
    doc.runner.flex.compiled = False
    seen = []
    real_doc = doc.runner._decide
    monkeypatch.setattr(doc.runner, "_decide", lambda *a, **k: seen.append(1) or real_doc(*a, **k))
    ids = torch.tensor([0] * 30 + [1] * 34)
    with torch.no_grad():
        doc(q, q, q, doc=ids)
        doc(q, q, q, doc=ids)
    assert len(seen) == 2


def test_planning_both_backends_ranks_each_tile_shape_once(monkeypatch):
    """auto plans the executor and the Flex lowering; both rank box tiles with a bounded classification
    (``cpu_backend.ranked_schedule``): each (tiles, budget) is classified once, not once per backend,
    and the decision is the one made without sharing (the schedules are the same)."""
    from attnc.runtime.backends.cpu import runner as CB

    calls = []
    real = CB.classify_tiles

    def counting(pat, bound, q_tile, kv_tile, *args, **kw):
        calls.append((tuple(q_tile), tuple(kv_tile), kw.get("refine_budget")))
        return real(pat, bound, q_tile, kv_tile, *args, **kw)

    monkeypatch.setattr(CB, "classify_tiles", counting)
    monkeypatch.setattr(FB, "classify_tiles", counting)
    sizes = {"height": 32, "width": 32}
    params = {"kernel_size_y": 7, "kernel_size_x": 7}
    shared = decide("stdlib:neighborhood_2d", 1024, 2, sizes=sizes, **params)
    assert calls and len(calls) == len(set(calls)), calls
    ranked = [c for c in calls if c[2] is not None]
    assert len(ranked) >= 2  # both backends had candidates to rank
    monkeypatch.setattr(CB, "ranked_schedule", lambda classified, key: None)  # no sharing: the same choice
    monkeypatch.setattr(FB, "ranked_schedule", lambda classified, key: None)
    alone = decide("stdlib:neighborhood_2d", 1024, 2, sizes=sizes, **params)
    assert (alone.backend, alone.cpu_s, alone.flex_s) == (shared.backend, shared.cpu_s, shared.flex_s)
