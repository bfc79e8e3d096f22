"""Queries after a KV cache (``nk > n``): the last n rows of the full computation,
on every backend; decoding steps without tile re-planning; the bounded plan cache."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc.compiler.analysis.tiles as T
from attnc.compiler.analysis import evaluate as E
from attnc.core.errors import SpecError
from attnc.runtime.api import compile_attention, materialize_mask, simulate
from attnc.runtime.backends.cpu import rows as decode
from attnc.spec.library import load

CAUSAL = "pattern causal_lm\n  tokens seq\n  mask causal\n"
# `n` in a mask is the whole sequence (nk tokens), whatever the query count
TAIL = "pattern tail\n  tokens seq\n  mask causal and q - k < n // 3 + 1\n"

CASES = [
    ("causal", CAUSAL, {}, {}),
    ("tail_n", TAIL, {}, {}),
    ("sliding", "stdlib:sliding_window", {"window": 7}, {}),
    ("streaming", "stdlib:streaming", {"window": 6, "sinks": 3}, {}),
    ("prefix", "stdlib:prefix_lm", {"prefix": 5}, {}),
    ("alibi", "stdlib:alibi", {}, {}),
    ("softcap", "stdlib:softcap", {"cap": 2.0}, {}),
    ("fox", "stdlib:forgetting", {}, {"g": "gates"}),
    ("document", "stdlib:document", {}, {"doc": "docs"}),
    ("moba", "stdlib:moba", {"block": 8, "topk": 2}, {}),
    # visited keys in many runs (gathered), and rows with no key at all (odd positions)
    ("strided", "pattern strided\n  tokens seq\n  mask causal and (q - k) % 5 == 0\n", {}, {}),
    ("empty_rows", "pattern gaps\n  tokens seq\n  mask causal and q - k > 30 and q % 2 == 0\n", {}, {}),
]


def _qkv(nk, heads=4, hkv=2, d=8, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, nk, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, hkv, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, hkv, nk, d, generator=g, dtype=torch.float64)
    return q, k, v


def _inputs(spec, nk, heads=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, kind in spec.items():
        if kind == "gates":  # FoX log gates [heads, n]: indexed by absolute position, n = nk
            out[name] = torch.nn.functional.logsigmoid(torch.randn(heads, nk, generator=g, dtype=torch.float64))
        else:  # document ids [n], batched
            out[name] = torch.sort(torch.randint(0, 4, (2, nk), generator=g)).values
    return out


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("label,src,params,inputs", CASES, ids=[c[0] for c in CASES])
def test_last_rows_of_the_full_computation(label, src, params, inputs, backend):
    nk = 41
    q, k, v = _qkv(nk)
    extra = _inputs(inputs, nk)
    full, full_lse = compile_attention(src, backend="reference", **params)(q, k, v, return_lse=True, **extra)
    attn = compile_attention(src, backend=backend, **params)
    for n in (1, 3, 22):  # a decode, a few rows (decoding-rows path), a tiled chunk
        out, lse = attn(q[:, :, -n:], k, v, return_lse=True, **extra)
        torch.testing.assert_close(out, full[:, :, -n:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lse, full_lse[:, :, -n:], rtol=1e-12, atol=1e-12)
        if backend == "cpu":
            kind = decode.RowPlan if n <= decode.DECODE_ROWS else object
            assert isinstance(attn.runner.last, kind)


@pytest.mark.parametrize("rows_path", [True, False], ids=["decode_rows", "tiled_flat"])
@pytest.mark.parametrize("n", [1, 4, 6, 13])
def test_grid_queries_are_a_suffix_of_the_token_order(n, rows_path, monkeypatch):
    """A grid's sizes describe all nk tokens; the queries are its last n in row-major order
    (whole rows or not): 1 token, part of a row, a row, two rows and a part; on the CPU
    backend through the decoding rows or the tile executor (flat tiles of the token order)."""
    if not rows_path:
        monkeypatch.setattr(decode, "DECODE_ROWS", 0)
    sizes = {"height": 5, "width": 6}
    params = dict(kernel_size_y=3, kernel_size_x=3)
    q, k, v = _qkv(30)
    full = compile_attention("stdlib:neighborhood_2d", backend="reference", sizes=sizes, **params)(q, k, v)
    for backend in ("reference", "cpu"):
        out = compile_attention("stdlib:neighborhood_2d", backend=backend, sizes=sizes, **params)(q[:, :, -n:], k, v)
        torch.testing.assert_close(out, full[:, :, -n:], rtol=1e-12, atol=1e-12)
    pat = load("stdlib:neighborhood_2d", **params)
    mask = materialize_mask(pat, n=n, nk=30, sizes=sizes)
    assert torch.equal(mask, materialize_mask(pat, sizes=sizes)[:, -n:])


def test_tiled_executor_with_an_offset(monkeypatch):
    """The tile executor (forced tiles, the decoding-rows path off) at an offset: the
    classification moves the query tiles to their absolute positions."""
    monkeypatch.setattr(decode, "DECODE_ROWS", 0)
    q, k, v = _qkv(53)
    for src, params in (("stdlib:streaming", {"window": 9, "sinks": 2}), (TAIL, {})):
        full = compile_attention(src, backend="reference", **params)(q, k, v)
        attn = compile_attention(src, backend="cpu", q_tile=4, kv_tile=8, **params)
        for n in (1, 5, 17):
            torch.testing.assert_close(attn(q[:, :, -n:], k, v), full[:, :, -n:], rtol=1e-12, atol=1e-12)
            assert attn.schedule is not None and attn.schedule.num_queries == n


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_gradients_match_the_full_computation(rows):
    """dq, dk, dv and the gradients of float inputs (FoX gates) of the last rows equal the full
    computation's, with a loss on those rows only."""
    nk = 33
    q, k, v = _qkv(nk, batch=1)
    gates = _inputs({"g": "gates"}, nk)["g"]
    w = torch.randn(1, 4, rows, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(backend, offset):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, gates)]
        qq, kk, vv, gg = leaves
        attn = compile_attention("stdlib:forgetting", backend=backend)
        out = attn(qq[:, :, -rows:], kk, vv, g=gg) if offset else attn(qq, kk, vv, g=gg)[:, :, -rows:]
        (out * w).sum().backward()
        return [t.grad for t in leaves]

    want = grads("reference", offset=False)
    for backend in ("reference", "cpu"):
        for got, exp in zip(grads(backend, offset=True), want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_growing_cache_does_not_replan():
    """A prefill then decoding steps of 1 (and once 3) tokens: every step equals the full
    computation's last rows, and the steps classify no tiles (counted, not timed)."""
    total = 120
    q, k, v = _qkv(total, batch=1)
    for src, params in (("stdlib:sliding_window", {"window": 16}), ("stdlib:streaming", {"window": 12, "sinks": 4}),
                        (CAUSAL, {})):
        full = compile_attention(src, backend="reference", **params)(q, k, v)
        attn = compile_attention(src, backend="cpu", **params)
        attn(q[:, :, :96], k[:, :, :96], v[:, :, :96])  # prefill
        before = T.CLASSIFICATIONS
        pos, steps = 96, 0
        while pos < total:
            new = 3 if steps == 5 else 1
            out = attn(q[:, :, pos:pos + new], k[:, :, :pos + new], v[:, :, :pos + new])
            torch.testing.assert_close(out, full[:, :, pos:pos + new], rtol=1e-12, atol=1e-12)
            pos, steps = pos + new, steps + 1
        assert steps == 22
        assert T.CLASSIFICATIONS - before == 0  # O(1) amortised per step: here none at all
        assert len(attn.runner.plans) <= attn.runner.max_plans


def test_plan_cache_is_a_bounded_lru():
    from attnc.runtime.backends.cpu.runner import PLAN_CACHE_SIZE

    q, k, v = _qkv(40, batch=1)
    attn = compile_attention(CAUSAL, backend="cpu")
    runner = attn.runner
    assert runner.max_plans == PLAN_CACHE_SIZE
    runner.max_plans = 3
    for nk in range(30, 38):
        attn(q[:, :, nk - 1:nk], k[:, :, :nk], v[:, :, :nk])
    assert [key[2] for key in runner.plans] == [35, 36, 37]  # the 3 most recent key lengths
    attn(q[:, :, 35:36], k[:, :, :36], v[:, :, :36])  # a hit refreshes its entry
    assert [key[2] for key in runner.plans] == [35, 37, 36]
    runner.max_plans = 1
    assert len(runner.plans) == 1
    with pytest.raises(SpecError, match="max_plans"):
        runner.max_plans = 0


def test_refusals():
    q, k, v = _qkv(10, batch=1)
    attn = compile_attention(CAUSAL, backend="cpu")
    with pytest.raises(SpecError, match="nk >= n") as err:
        attn(q, k[:, :, :4], v[:, :, :4])
    assert err.value.where == "argument k"
    with pytest.raises(SpecError, match="mean of query blocks"):
        compile_attention("stdlib:biformer", backend="reference", sizes={"height": 4, "width": 4}, region=2, topk=1)(
            *(_qkv(16, batch=1)[0][:, :, -2:],), *_qkv(16, batch=1)[1:])
    with pytest.raises(SpecError, match="after a KV cache on a sequence only"):
        compile_attention("stdlib:neighborhood_2d", backend="flex", sizes={"height": 4, "width": 4}, kernel_size=3)(
            *(_qkv(16, batch=1)[0][:, :, -2:],), *_qkv(16, batch=1)[1:])
    with pytest.raises(SpecError, match="not supported here"):
        simulate(CAUSAL, n=4, nk=10)
    # `n` in an input's shape is the whole sequence (nk) also with a KV cache
    doc = torch.zeros(10, dtype=torch.int64)
    document = compile_attention("stdlib:document", backend="cpu")
    torch.testing.assert_close(document(q[:, :, -2:], k, v, doc=doc),
                               compile_attention(CAUSAL, backend="cpu")(q[:, :, -2:], k, v), rtol=0, atol=0)
    with pytest.raises(SpecError, match=r"expected \[n\] = \[10\]") as err:
        document(q[:, :, -2:], k, v, doc=doc[:2])
    assert err.value.where == "argument doc"
    pat = load(CAUSAL)
    with pytest.raises(SpecError, match="nk >= n"):
        E.bind_sizes(pat, n=5, nk=3, offset_ok=True)
    bound = E.bind_sizes(pat, n=2, nk=7, offset_ok=True)
    assert (bound.n, bound.nk, bound.q_offset) == (2, 7, 5)
    assert torch.equal(materialize_mask(pat, n=2, nk=7), materialize_mask(pat, n=7)[:, -2:])


def test_triton_takes_the_query_offset():
    pytest.importorskip("triton")
    q, k, v = _qkv(16, heads=2, hkv=1, d=16, batch=1)
    q, k, v = (t.float() for t in (q, k, v))
    full = compile_attention("stdlib:sliding_window", backend="reference", window=5)(q, k, v)
    out = compile_attention("stdlib:sliding_window", backend="triton", window=5)(q[:, :, -2:], k, v)
    torch.testing.assert_close(out, full[:, :, -2:], rtol=2e-5, atol=2e-5)


def test_a_triton_decode_step_visits_what_its_queries_reach():
    """One query after caches of 128 and 512 keys, a window of 16: the kernels are launched over the same KV
    tiles (the window's), not over the cache, and equal the reference."""
    pytest.importorskip("triton")
    attn = compile_attention("stdlib:sliding_window", backend="triton", window=16)
    visited = []
    for nk in (128, 512):
        q, k, v = (t.float() for t in _qkv(nk, heads=2, hkv=1, d=16, batch=1))
        out = attn(q[:, :, -1:], k, v)
        want = compile_attention("stdlib:sliding_window", backend="reference", window=16)(q, k, v)[:, :, -1:]
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
        sched = attn.runner.last_schedule
        assert sched.num_q_tiles == 1
        visited.append(sched.pairs()[0].numel())
    assert visited[0] == visited[1] <= 2


def test_a_triton_decode_step_reads_a_cache_slice_in_place(monkeypatch):
    """K and V as the first nk keys of a longer cache buffer (how a server holds them): the kernels read the
    slice by its strides, nothing copies it (a copy of the whole cache was made at every step), and the step
    equals the reference's."""
    pytest.importorskip("triton")
    attn = compile_attention("stdlib:sliding_window", backend="triton", window=16)
    q, k, v = (t.float() for t in _qkv(96, heads=2, hkv=1, d=16, batch=2))
    nk = 70
    k_nk, v_nk = k[:, :, :nk], v[:, :, :nk]
    assert not k_nk.is_contiguous()
    attn(q[:, :, nk - 1:nk], k_nk, v_nk)
    copied = []
    contiguous = torch.Tensor.contiguous

    def watched(self, *args, **kwargs):
        out = contiguous(self, *args, **kwargs)
        if out.data_ptr() != self.data_ptr() and self.shape[-2:] == k_nk.shape[-2:]:
            copied.append(tuple(self.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", watched)
    out = attn(q[:, :, nk - 1:nk], k_nk, v_nk)
    monkeypatch.undo()
    assert copied == []
    want = compile_attention("stdlib:sliding_window", backend="reference", window=16)(
        q[:, :, :nk].double(), k_nk.double(), v_nk.double())[:, :, -1:]
    torch.testing.assert_close(out, want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "src, params, on_device",
    [(CAUSAL, {}, True), ("stdlib:sliding_window", {"window": 16}, True),
     ("stdlib:streaming", {"window": 6, "sinks": 3}, True), ("stdlib:alibi", {}, True),
     ("stdlib:longnet", {"segment": 32, "dilation": 4}, True),  # head-dependent: a list class per head
     ("stdlib:moba", {"block": 8, "topk": 2}, True)],  # a route: its selection and lists made at every step
    ids=["causal", "sliding", "streaming", "alibi", "longnet", "moba"],
)
def test_a_triton_decode_step_loads_one_module_at_every_cache_length(monkeypatch, src, params, on_device):
    """A decode step's cache grows by a key a step: its kernels take the lengths at run time, so the module
    (and on a GPU, its compiled kernels) is the same at every length of at least one KV tile (64 keys; a
    shorter cache takes a tile of its length), across tile boundaries too; after the first step no tile is
    classified on the host (the lists are made on the device), and the steps equal the reference. The ordinary
    call's path: a plain step that the paged kernel serves is read as pages instead (``test_cache_pages``), so
    that route is turned off here; a step with a gradient, under ``torch.compile`` or with a route takes this one."""
    pytest.importorskip("triton")
    from attnc.runtime.backends.triton import cache_pages

    monkeypatch.setattr(cache_pages, "applies", lambda *args: False)
    attn = compile_attention(src, backend="triton", **params)
    ref = compile_attention(src, backend="reference", **params)
    sources = set()
    q, k, v = (t.float() for t in _qkv(130, heads=2, hkv=1, d=16, batch=1))
    before = None
    for nk in (64, 65, 128, 130):
        out = attn(q[:, :, nk - 1 : nk], k[:, :, :nk], v[:, :, :nk])
        want = ref(q[:, :, :nk], k[:, :, :nk], v[:, :, :nk])[:, :, -1:]
        torch.testing.assert_close(out, want, rtol=2e-5, atol=2e-5)
        sources.add(attn.runner.last_source)
        before = T.CLASSIFICATIONS if before is None else before
    assert len(sources) == 1
    assert (T.CLASSIFICATIONS == before) == on_device
    if attn.runner.pattern.route is None:  # lists serve a range of lengths: a later step of the range makes none
        kept = attn.runner.last_plan.schedule
        attn(q[:, :, 128:129], k[:, :, :129], v[:, :, :129])
        again = attn.runner.last_plan.schedule
        assert again.kv_extents == (129,)
        assert again.full_index is kept.full_index and again.partial_index is kept.partial_index


DECODE_MASKS = [
    "causal and q - k < {a}",
    "causal and (k < {b} or q - k < {a})",
    "causal and (q - k) % {b} == 0",
    "causal and (q - k) % (h + {b}) < {b}",  # a list class per head
    "causal and q - k >= {a}",  # rows with no key (early steps)
]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(mask=st.sampled_from(DECODE_MASKS), a=st.integers(1, 150), b=st.integers(1, 9), nk=st.integers(1, 260),
       n=st.sampled_from([1, 1, 2, 5]), bias=st.booleans())
def test_decode_lists_made_on_the_device_equal_the_reference(mask, a, b, nk, n, bias):
    """Forward-only steps of queries after a KV cache on the Triton backend (lists made on the device for a
    range of lengths, ``plan.decode_lists``) equal the float64 reference's last rows, at random lengths, query
    counts, head-dependent masks and a bias; two steps of one range share their lists."""
    pytest.importorskip("triton")
    from attnc.runtime.plan import decode_lists

    n = min(n, nk)
    src = "pattern p\n  tokens seq\n  mask " + mask.format(a=a, b=b) + "\n" + ("  bias -(q - k) / 16\n" if bias else "")
    attn = compile_attention(src, backend="triton")
    assert decode_lists.applies(attn.runner.pattern)
    ref = compile_attention(src, backend="reference")
    q, k, v = _qkv(nk + 1, heads=2, hkv=1, d=16, batch=1)
    for length in (nk, nk + 1) if (nk - 1) // 64 == nk // 64 else (nk,):  # the second: same range of lengths
        want = ref(q[:, :, :length], k[:, :, :length], v[:, :, :length])[:, :, -n:]
        out = attn(q[:, :, length - n : length].float(), k[:, :, :length].float(), v[:, :, :length].float())
        torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5, equal_nan=True)


def test_a_triton_decode_step_of_a_mask_reading_inputs_loads_one_module():
    """An input over the sequence (document ids, ``doc: int[n]``) grows with the cache: a block's kernels take
    its extent at run time, so a decode step of a document mask loads one module at every length."""
    pytest.importorskip("triton")
    attn = compile_attention("stdlib:document", backend="triton")
    ref = compile_attention("stdlib:document", backend="reference")
    q, k, v = _qkv(130, heads=2, hkv=1, d=16, batch=1)
    doc = torch.repeat_interleave(torch.arange(5), torch.tensor([30, 41, 20, 30, 9]))
    sources = set()
    for nk in (64, 100, 130):
        out = attn(q[:, :, nk - 1 : nk].float(), k[:, :, :nk].float(), v[:, :, :nk].float(), doc=doc[:nk])
        want = ref(q[:, :, :nk], k[:, :, :nk], v[:, :, :nk], doc=doc[:nk])[:, :, -1:]
        torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
        sources.add(attn.runner.last_source)
    assert len(sources) == 1


def test_decode_steps_of_one_plan_choose_their_split_by_their_lists(monkeypatch):
    """Decode steps share one plan across lengths (``plan.decode_lists``): the split-KV count follows each
    step's lists, so a long cache splits more than the short one that made the plan. (The ordinary call's path:
    the paged route of plain growing steps is turned off, as in the test above.)"""
    pytest.importorskip("triton")
    from attnc.runtime.backends.triton import cache_pages, split_kv

    monkeypatch.setattr(cache_pages, "applies", lambda *args: False)

    attn = compile_attention(CAUSAL, backend="triton")
    q, k, v = (t.float() for t in _qkv(2000, heads=2, hkv=1, d=16, batch=1))
    splits = []
    for nk in (64, 2000):
        attn(q[:, :, nk - 1 : nk], k[:, :, :nk], v[:, :, :nk])
        splits.append(split_kv.choose_splits(attn.runner.last_plan, 1, 2, 132))
    assert splits[0] < splits[1]


ROUTED_DECODE = {"quest": {"token_budget": 16, "page": 4}, "moba": {"block": 8, "topk": 2}, "token_topk": {"topk": 5}}


@pytest.mark.parametrize("name", sorted(ROUTED_DECODE))
def test_routed_decode_steps_plan_nothing_on_the_host_as_the_cache_grows(name, monkeypatch):
    """Forward-only decode steps of a routed pattern over a growing cache (``device_routes.decode_route_plan``):
    one template for every length, the route's constants made on the device at each step, no tile classified
    and no routed plan built on the host after the first step; every step equals the float64 reference's last
    rows, one and three queries, GQA."""
    pytest.importorskip("triton")
    from attnc.runtime.plan import device_routes

    calls = {"constants": 0}
    constants = device_routes.constants

    def counted(*args, **kwargs):
        calls["constants"] += 1
        return constants(*args, **kwargs)

    monkeypatch.setattr(device_routes, "constants", counted)
    attn = compile_attention(f"stdlib:{name}", backend="triton", **ROUTED_DECODE[name])
    ref = compile_attention(f"stdlib:{name}", backend="reference", **ROUTED_DECODE[name])
    q, k, v = _qkv(150, heads=4, hkv=2, d=16, batch=2)
    for rows in (1, 3):  # lengths within one range of 64, across its end, and two ranges on
        for step, nk in enumerate((61, 63, 64, 65, 129, 150)):
            want = ref(q[:, :, :nk], k[:, :, :nk], v[:, :, :nk])[:, :, -rows:]
            out = attn(q[:, :, nk - rows : nk].float(), k[:, :, :nk].float(), v[:, :, :nk].float())
            torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
            if step == 0:
                calls["constants"], classified = 0, T.CLASSIFICATIONS
        assert calls["constants"] == 0 and T.CLASSIFICATIONS == classified, (calls, T.CLASSIFICATIONS - classified)


@pytest.mark.parametrize("name", ["dma", "dsa", "landmark", "music_relative", "sparsifiner"])
def test_decode_steps_of_patterns_whose_inputs_the_mask_does_not_read_keep_one_plan(name):
    """Inputs read by a bias or a route's score (not by the mask, keep or softcap) follow the cache's length but
    leave the plan alone: the decode template serves every length (``decode_lists.applies``), no tile is
    classified after the first step, and every step equals the float64 reference's last row."""
    pytest.importorskip("triton")
    from test_triton import STDLIB, stdlib_inputs

    from attnc.runtime.plan import decode_lists

    case = STDLIB[name]
    params = case.params
    attn = compile_attention(f"stdlib:{name}", backend="triton", **params)
    ref = compile_attention(f"stdlib:{name}", backend="reference", **params)
    assert decode_lists.applies(attn.runner.pattern)
    q, k, v = _qkv(140, heads=2, hkv=2, d=16, batch=1)
    for step, nk in enumerate((61, 62, 65, 100, 130)):
        inputs = {key: t.detach() for key, t in stdlib_inputs(case, nk).items()}
        out = attn(q[:, :, nk - 1:nk].float(), k[:, :, :nk].float(), v[:, :, :nk].float(), **inputs)
        want = ref(q[:, :, :nk], k[:, :, :nk], v[:, :, :nk],
                   **{key: t.double() if t.is_floating_point() else t for key, t in inputs.items()})[:, :, -1:]
        torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
        if step == 0:
            classified = T.CLASSIFICATIONS
    assert T.CLASSIFICATIONS == classified


@pytest.mark.parametrize("form", ["stride2", "transposed"])
def test_a_growing_cache_with_q_of_a_last_dimension_stride_equals_a_dense_softmax_at_every_step(form):
    # a growing cache's later steps are served as pages (one launch per step, bound once): the paged kernel reads
    # q's head dim as contiguous, and a [..., ::2] or transposed q came out 0.6-1.0 off from the second step on
    attn = compile_attention("stdlib:sliding_window", backend="triton", window=4)
    g = torch.Generator().manual_seed(21)
    for nk in (8, 16, 24):
        q, k, v = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, nk, 8, generator=g), torch.randn(1, 2, nk, 8,
                                                                                                      generator=g)
        if form == "stride2":
            wide = torch.full((1, 2, 4, 16), 100.0)
            wide[..., ::2] = q
            given = wide[..., ::2]
        else:
            given = q.transpose(-1, -2).contiguous().transpose(-1, -2)
        qp, kp = torch.arange(nk - 4, nk)[:, None], torch.arange(nk)[None]
        scores = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)).masked_fill(
            ~((kp <= qp) & (qp - kp < 4)), -math.inf)
        with torch.no_grad():
            out = attn(given, k, v)
        torch.testing.assert_close(out.double(), torch.softmax(scores, -1) @ v.double(), atol=2e-5, rtol=2e-5)
