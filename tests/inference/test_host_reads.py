"""Host reads of a warm call: every read of a tensor's values on the host (``item``, ``tolist``, ``cpu``,
``numpy``, ``bool``, ``int``, ``float``, ``nonzero``, ``equal``, ``.to`` the CPU) is a device sync on a GPU
and keeps a call out of a CUDA graph. Counted with a ``TorchFunctionMode`` around the second call of a
module with the same shapes, on the Triton backend under the interpreter (there the call's device is the
CPU, so a plan built on the host and copied over counts too).

No stdlib pattern reads anything, prefill or decode step: the lists of a mask that reads call-time inputs
(``runtime.plan.device_tiles``) and a route's selection and lists (``runtime.plan.device_routes``) are made
on the device at every call, in fixed shapes; what depends on the shapes alone is made by the first call.
The makers are also run on ``meta`` tensors, which hold no value (any read raises), with no CPU tensor other
than a scalar meeting theirs (a copy to the device at every call)."""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch
from test_triton import STDLIB, stdlib_inputs
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis.tiles import classify_tiles
from attnc.core import symbols as S
from attnc.runtime.plan import device_choice, device_routes, device_tiles, routing
from attnc.runtime.plan.tile_plan import Plan

os.environ.setdefault("TRITON_INTERPRET", "1")

HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal"}

#: Routes scored from whole query blocks: a decode step is refused (``forms.refuse_query_offset``).
NO_DECODE = {"biformer", "xattention", "vmoba", "anchor"}


class HostReads(TorchFunctionMode):
    """Counts the host reads of the torch calls made under it, by (function, attnc file:line)."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        hit = name in HOST_READS
        if name == "to":
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
            hit = device is not None and torch.device(device).type == "cpu"
        if hit:
            ours = [f for f in traceback.extract_stack()[:-1] if "attnc" in f.filename or "/runtime/" in f.filename]
            self.seen[(name, f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?")] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


class HostTensors(TorchFunctionMode):
    """Records the torch calls made under it that take a CPU tensor of one element or more (on a GPU, a copy
    to the device at every call; a CPU scalar is passed by value)."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0 for a in flat):
            self.seen.append((getattr(func, "__name__", str(func)), traceback.extract_stack()[-2].lineno))
        return func(*args, **kwargs)


def _tokens(name: str) -> int:
    return STDLIB[name].tokens


def warm_reads(name: str, nk: int | None = None, rows: int | None = None) -> HostReads:
    """The host reads of the second call of stdlib pattern ``name`` (``rows`` queries after a cache of
    ``nk`` tokens where given); the call's output is checked against the float64 reference's."""
    case = STDLIB[name]
    params, sizes, q_tile = case.params, case.sizes, case.tiles
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", sizes=sizes, q_tile=q_tile, **params)
    total = nk or _tokens(name)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, rows or total, 16, generator=g)
    k, v = torch.randn(1, 2, total, 16, generator=g), torch.randn(1, 2, total, 16, generator=g)
    given = stdlib_inputs(case, total)
    attn(q, k, v, **given)
    with HostReads() as reads:
        out = attn(q, k, v, **given)
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", sizes=sizes, **params)
    want = ref(q.double(), k.double(), v.double(), **{n: t.detach().double() if t.is_floating_point() else t
                                                     for n, t in given.items()})
    torch.testing.assert_close(out, want.float(), rtol=2e-5, atol=2e-5)
    return reads


@pytest.mark.parametrize("name", sorted(STDLIB))
def test_a_warm_prefill_of_a_stdlib_pattern_reads_nothing_on_the_host(name):
    reads = warm_reads(name)
    assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("name", sorted(set(STDLIB) - NO_DECODE))
def test_a_warm_decode_step_of_a_stdlib_pattern_reads_nothing_on_the_host(name):
    reads = warm_reads(name, nk=_tokens(name), rows=1)
    assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("rows", [None, 1])
def test_a_warm_call_of_nsa_reads_nothing_on_the_host(rows):
    """The combined pattern (prefill and a decode step): its pooled branch's probabilities, which score the
    selection branch's route, are made on the device."""
    attn = attnc.compile_attention("stdlib:nsa", backend="triton", block=8, selected=2, window=5, q_tile=16)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    q = q[:, :, -(rows or 40):]
    gates = {name: torch.rand(2, q.shape[2], generator=g) for name in ("g_cmp", "g_slc", "g_swa")}
    attn(q, k, v, **gates)
    with HostReads() as reads:
        attn(q, k, v, **gates)
    assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("name", sorted(NO_DECODE))
def test_routes_scored_from_query_blocks_still_refuse_a_decode_step(name):
    with pytest.raises(attnc.SpecError, match="not supported"):
        warm_reads(name, nk=_tokens(name), rows=1)


# ----------------------------------------------------------------- answers of calls planned on the device
def _docs(n: int, seed: int, batch: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, 4, (batch, n) if batch else (n,), generator=g)).values


@pytest.mark.parametrize("name,params,make", [
    ("document", {}, lambda n, s: {"doc": _docs(n, s, batch=2)}),  # per batch row: one set of lists for both
    ("longformer", {"window": 4}, lambda n, s: {"is_global": (torch.rand(n, generator=torch.Generator()
                                                                         .manual_seed(s)) < 0.1).long()}),
    ("cluster_mask", {"clusters": 3}, lambda n, s: {"centroids": torch.randn(
        2, 3, 16, generator=torch.Generator().manual_seed(s))}),
    ("vertical_slash", {"vertical": 3, "slash": 4, "last_q": 8, "sinks": 2, "local": 3, "slash_min": 1},
     lambda n, s: {}),
    ("moba", {"block": 8, "topk": 2}, lambda n, s: {}),
    ("quest", {"token_budget": 16, "page": 4}, lambda n, s: {}),
    ("token_topk", {"topk": 5}, lambda n, s: {}),
])
def test_calls_of_the_same_shapes_get_the_lists_of_their_own_inputs(name, params, make):
    """One module, three calls of the same shapes: a prefill, the same with other inputs and vectors, and a
    decode step of 3 queries; each equals the reference (the plan is one; the lists are each call's)."""
    tri = attnc.compile_attention(f"stdlib:{name}", backend="triton", q_tile=16, kv_tile=16, **params)
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
    n = 40
    for seed, rows in ((1, n), (2, n), (3, 3)):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
        inputs = make(n, seed)
        q = q[:, :, n - rows:]
        want = ref(q.double(), k.double(), v.double(), **inputs)
        torch.testing.assert_close(tri(q, k, v, **inputs), want.float(), atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------- the device lists themselves
def _plan(name: str, params: dict, n: int = 48, heads: int = 2, tile: int = 8) -> tuple:
    pat = attnc.load(f"stdlib:{name}", **params)
    bound = E.bind_sizes(pat, n=n, nk=n, heads=heads, sizes={}, dk=16)
    return pat, bound, device_tiles.input_plan(pat, bound, (tile,), (tile,))


def _listed(count: torch.Tensor, index: torch.Tensor) -> set:
    return {(c, t, int(x)) for c in range(index.shape[0]) for t in range(index.shape[1])
            for x in index[c, t, :int(count[c, t])]}


#: Masks reading inputs in every way the device's interval rules take: at a position (Longformer), at two
#: varying indices (a table), at an index of positions, at a constant index of a per-row input, per head, a
#: float input with NaN; each with a maker of random inputs for 3 batch rows and 2 heads over 48 tokens.
READS = {
    "longformer": ("stdlib:longformer", {"window": 6},
                   lambda g: {"is_global": (torch.rand(3, 48, generator=g) < 0.08).long()}),
    "table": ("pattern p\n tokens seq\n input t: int[n, n]\n mask causal and t[q, k] > 0", {},
              lambda g: {"t": (torch.rand(48, 48, generator=g) < 0.05).long()}),
    "halves": ("pattern p\n tokens seq\n input w: int[n]\n mask w[q // 2] == w[(n - 1 - k) // 2]", {},
               lambda g: {"w": torch.randint(0, 3, (3, 48), generator=g)}),
    "prefix": ("pattern p\n tokens seq\n input plen: int[1]\n mask k < plen[0] or k <= q", {},
               lambda g: {"plen": torch.randint(0, 48, (3, 1), generator=g)}),
    "per_head": ("pattern p\n tokens seq\n input c: int[heads, n]\n mask causal and c[h, q] == c[h, k]", {},
                 lambda g: {"c": torch.sort(torch.randint(0, 3, (2, 48), generator=g)).values}),
    "float": ("pattern p\n tokens seq\n input f: float[n]\n mask f[k] <= f[q] + 0.5", {},
              lambda g: {"f": torch.where(torch.rand(48, generator=g) < 0.1, float("nan"),
                                          torch.randn(48, generator=g).double())}),
}


@pytest.mark.parametrize("case", sorted(READS))
@pytest.mark.parametrize("seed", range(2))
def test_input_lists_are_sound_and_their_transposes_agree(case, seed):
    """Every tile pair with an allowed pair in some batch row is listed, a FULL one holds only allowed pairs in
    every row, and the KV tiles' lists hold the same pairs in the same classes."""
    src, params, make = READS[case]
    inputs = make(torch.Generator().manual_seed(seed))
    pat = attnc.load(src, **params)
    bound = E.bind_sizes(pat, n=48, nk=48, heads=2, sizes={}, dk=16)
    plan = device_tiles.input_plan(pat, bound, (8,), (8,))
    tensors, batch = E.bind_inputs(pat, bound, inputs)
    batched = frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))
    call = plan.call_lists.call_plan(plan, tensors, batched, torch.device("cpu"))
    s = call.schedule
    full, part = _listed(s.full_count, s.full_index), _listed(s.partial_count, s.partial_index)
    t_full = {(c, qt, kt) for c, kt, qt in _listed(s.t_full_count, s.t_full_index)}
    t_part = {(c, qt, kt) for c, kt, qt in _listed(s.t_partial_count, s.t_partial_index)}
    assert (full, part) == (t_full, t_part) and not full & part
    mask = torch.broadcast_to(E.mask_tensor(pat, bound, inputs, batch=batch), (batch or 1, 2, 48, 48))
    for h in range(2):
        c = h if s.heads_stored > 1 else 0
        for qt in range(6):
            for kt in range(6):
                tile = mask[:, h, qt * 8:qt * 8 + 8, kt * 8:kt * 8 + 8]
                if bool(tile.any()):
                    assert (c, qt, kt) in full | part, (h, qt, kt)
                if (c, qt, kt) in full:
                    assert bool(tile.all()), (h, qt, kt)


def test_input_lists_of_sorted_document_ids_are_the_exact_classes():
    """Sorted document ids: the interval classes of every tile pair are the host's exact ones (FULL inside one
    document below the diagonal, EMPTY where no document is shared)."""
    pat, bound, plan = _plan("document", {}, n=64)
    doc = torch.tensor([0] * 5 + [1] * 19 + [2] * 3 + [3] * 30 + [4] * 7)
    call = plan.call_lists.call_plan(plan, {"doc": doc}, frozenset(), torch.device("cpu"))
    exact = classify_tiles(pat, bound, (8,), (8,), {"doc": doc})
    assert torch.equal(call.schedule.classes(), exact.classes())


def test_relaxed_bounds_of_a_mask():
    """Each condition reading an input bounded apart, negations flipping the bound."""
    pat = attnc.load("pattern p\n tokens seq\n input w: int[n]\n"
                     " mask causal and not (w[k] > 2 and q - k > 3) and (w[q] == w[k] or q - k < 2)")
    upper, lower = device_tiles.relaxed(pat.mask)
    assert not E.input_names(upper) and not E.input_names(lower) and upper != lower
    q, k = torch.arange(8).view(-1, 1), torch.arange(8).view(1, -1)
    env = {S.Q: q, S.K: k}
    up = E.as_tensor(E.Evaluator(env, {}, set(), None)(upper), torch.bool)
    low = E.as_tensor(E.Evaluator(env, {}, set(), None)(lower), torch.bool)
    for seed in range(5):
        w = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(seed))
        real = E.as_tensor(E.Evaluator(env, {"w": w}, set(), None)(pat.mask), torch.bool)
        assert bool((low <= real).all()) and bool((real <= up).all())


# ----------------------------------------------------------------- the route's choice and lists
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_device_choice_is_the_host_rule_bit_for_bit(dtype):
    """Scores with ties, NaN, +-inf and both zeros, keep or not, places from none to more than blocks."""
    g = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, 1.0, 1.0, float("nan"), float("inf"), -float("inf"), -1.0], dtype=dtype)
    for trial in range(400):
        nb = int(torch.randint(1, 12, (1,), generator=g))
        score = (special[torch.randint(0, len(special), (2, 5, nb), generator=g)] if trial % 2
                 else torch.randn(2, 5, nb, generator=g, dtype=dtype).round())
        allowed = torch.rand(2, 5, nb, generator=g) < 0.7
        keep = torch.rand(1, 5, nb, generator=g) < 0.2 if trial % 3 else None
        topk = int(torch.randint(0, nb + 3, (1,), generator=g))
        assert torch.equal(device_choice.choose(score, allowed, keep, topk),
                           routing.choose(score, allowed, keep, topk)), (score, allowed, keep, topk)


@pytest.mark.parametrize("name,params,sizes,tile", [
    ("moba", {"block": 8, "topk": 2}, {}, (16,)),
    ("token_topk", {"topk": 5}, {}, (16,)),
    ("xattention", {"block": 8, "stride": 4, "threshold": 0.8, "chunk": 24}, {}, (16,)),
    # tiles of 4 x 2 over regions of 2 x 2: a KV tile's blocks are not a run (0 and 4)
    ("biformer", {"region": 2, "topk": 3}, {"height": 6, "width": 8}, (4, 2)),
])
def test_route_lists_are_the_host_lists(name, params, sizes, tile):
    """The device's selection and lists of a route are the host's (``routing.route_plan``), per (batch, head)."""
    pat = attnc.load(f"stdlib:{name}", **params)
    bound = E.bind_sizes(pat, n=48, nk=48, heads=2, sizes=sizes, dk=16)
    plan = Plan.build(pat, bound, classify_tiles(pat, bound, tile, tile))
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(2, 2, 48, 16, generator=g), torch.randn(2, 2, 48, 16, generator=g)
    host = routing.route_plan(plan, q, k, {}, set())
    device = device_routes.route_call_plan(plan, q, k, {})
    assert torch.equal(device.selection, host.selection)
    assert torch.equal(device.schedule.classes(), host.schedule.classes())
    assert device.schedule.runs() == dict.fromkeys(("FULL", "PART", "T_FULL", "T_PART"), False)
    runs = plan.device_state[("route", torch.device("cpu"))].tile_blocks is None
    assert runs == (name != "biformer")


# ----------------------------------------------------------------- no value read, no host tensor
def _meta_calls():
    meta = torch.device("meta")
    _, _, doc_plan = _plan("document", {})
    doc = _docs(48, 0).to(meta)
    yield "document", lambda: doc_plan.call_lists.call_plan(doc_plan, {"doc": doc}, frozenset(), meta)
    for name, params in (("moba", {"block": 8, "topk": 2}), ("token_topk", {"topk": 5}),
                         ("xattention", {"block": 8, "stride": 4, "threshold": 0.8, "chunk": 24})):
        pat = attnc.load(f"stdlib:{name}", **params)
        bound = E.bind_sizes(pat, n=48, nk=48, heads=2, sizes={}, dk=16)
        plan = Plan.build(pat, bound, classify_tiles(pat, bound, (16,), (16,)))
        q, k = torch.empty(1, 2, 48, 16, device=meta), torch.empty(1, 2, 48, 16, device=meta)
        yield name, lambda plan=plan, q=q, k=k: device_routes.route_call_plan(plan, q, k, {})


@pytest.mark.parametrize("case", range(4))
def test_plans_made_on_a_device_whose_values_cannot_be_read(case):
    """On ``meta`` tensors (no values: a read raises) a warm call's lists and selection are made, of the
    shapes they have on the CPU, with no CPU tensor of one element or more taken by any torch call."""
    name, make = list(_meta_calls())[case]
    make()  # the first call: the plan's constants moved to the device
    with HostTensors() as host:
        call = make()
    assert call.schedule.full_index.device.type == "meta" and not host.seen, (name, host.seen)


# ----------------------------------------------------------------- index checks
def test_a_mask_index_out_of_range_is_refused_at_every_call():
    """A read at an index of positions is checked once per sizes, before any kernel reads it, and refused again
    at the next call of those sizes; a read at an index taken from an input is checked at every call."""
    by_position = "pattern p\n tokens seq\n input w: int[n]\n mask causal and w[q + 1] >= 0"
    by_value = "pattern p\n tokens seq\n input w: int[n]\n input at: int[n]\n mask causal and w[at[q]] >= 0"
    q = k = v = torch.randn(1, 1, 16, 16)
    attn = attnc.compile_attention(by_position, backend="triton")
    for _ in range(2):
        with pytest.raises(attnc.SpecError, match="argument w"):
            attn(q, k, v, w=torch.zeros(16, dtype=torch.long))
    attn = attnc.compile_attention(by_value, backend="triton")
    w = torch.ones(16, dtype=torch.long)
    with pytest.raises(attnc.SpecError, match="argument w"):
        attn(q, k, v, w=w, at=torch.arange(16) + 1)
    want = attnc.compile_attention(by_value, backend="reference")(q, k, v, w=w, at=torch.arange(16))
    torch.testing.assert_close(attn(q, k, v, w=w, at=torch.arange(16)), want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", ["document", "longformer", "vertical_slash"])
def test_one_head_masks_that_read_inputs_equal_the_reference(name):
    """One head: the device classification binds the head of a mask that reads it (vertical_slash's per-head
    selection failed with "'h' has no value" where the plan had one head class)."""
    case = STDLIB[name]
    params, sizes, q_tile, tokens = case.params, case.sizes, case.tiles, case.tokens
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, tokens, 16, generator=g) for _ in range(3))
    given = stdlib_inputs(case, tokens)
    out = attnc.compile_attention(f"stdlib:{name}", backend="triton", sizes=sizes, q_tile=q_tile, **params)(
        q, k, v, **given)
    want = attnc.compile_attention(f"stdlib:{name}", backend="reference", sizes=sizes, **params)(
        q.double(), k.double(), v.double(), **given)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("src,params,make", [
    ("stdlib:music_relative", {"max_relative": 12}, lambda g: {"E": torch.randn(2, 12, 16, generator=g)}),
    ("pattern p\n tokens seq\n input b: float[heads, n]\n mask causal\n bias b[h, k] - b[h, q]", {},
     lambda g: {"b": torch.randn(2, 40, generator=g)}),
])
def test_a_warm_backward_with_a_float_bias_input_reads_nothing_on_the_host(src, params, make, monkeypatch):
    """The bias inputs' gradients are summed where the kernel's dS is (they were summed on the host: seconds a
    call on a GPU at 4K tokens); each equals the float64 reference's."""
    attn = attnc.compile_attention(src, backend="triton", q_tile=16, kv_tile=16, **params)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    given = make(g)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v, *given.values())]
        out = fn(*leaves[:3], **dict(zip(given, leaves[3:], strict=True)))
        (out * torch.linspace(-1, 1, out.shape[-2])[:, None].to(dtype)).sum().backward()
        return [t.grad for t in leaves]

    grads(attn, torch.float32)
    seen = collections.Counter()  # a mode does not reach a backward (autograd runs it): the methods are wrapped

    def counted(name, method):
        def read(self, *args, **kwargs):
            to_cpu = name != "to" or any(str(a) == "cpu" for a in (*args, *kwargs.values()))
            ours = [f for f in traceback.extract_stack()[:-1] if "/runtime/" in f.filename]
            if to_cpu and ours:
                seen[(name, f"{ours[-1].filename}:{ours[-1].lineno}")] += 1
            return method(self, *args, **kwargs)
        return read

    for name in sorted(HOST_READS - {"equal", "__index__"} | {"to"}):
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    got = grads(attn, torch.float32)
    monkeypatch.undo()
    assert not seen, dict(seen)
    want = grads(attnc.compile_attention(src, backend="reference", **params), torch.float64)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["quest", "moba", "token_topk", "dsa"])
def test_a_decode_step_at_a_new_length_reads_nothing_on_the_host(name):
    """A cache grown by one key since the last step: the step's lists, and a route's constants and selection, are
    made on the device (``decode_lists``, ``device_routes.decode_route_plan``), so a length never seen reads
    nothing either; inputs over the sequence (a route's scores) grow with it. (A bias that reads an input, dma's
    and landmark's, has its index ranges checked once per length: on host-made tensors, not the call's.)"""
    case = STDLIB[name]
    params, q_tile = case.params, case.tiles
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", q_tile=q_tile, **params)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 16, generator=g)
    k, v = torch.randn(1, 2, 42, 16, generator=g), torch.randn(1, 2, 42, 16, generator=g)
    given = {nk: {n: t.detach() for n, t in stdlib_inputs(case, nk).items()} for nk in (40, 41)}
    attn(q, k[:, :, :40], v[:, :, :40], **given[40])
    with HostReads() as reads:
        attn(q, k[:, :, :41], v[:, :, :41], **given[41])
    assert reads.total == 0, dict(reads.seen)
