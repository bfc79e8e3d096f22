"""A paged batch in one launch (``runtime.backends.triton.paged``, ``attnc_fwd_paged``): rows of their own key
counts and query counts (``cu_seqlens_q``), shuffled pages, GQA, read through the block table inside the kernel.
Every row equals a dense float64 softmax over the pattern's mask on its own keys; the launches do not depend on
how many distinct lengths the batch holds; a warm call reads nothing on the host and a new length compiles
nothing; bad values are refused by name; the call compiles with ``fullgraph=True``."""

import os

import pytest
import sympy
import torch
from cases import claimed
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads
from test_paged_kv import HKV, HQ, D, paged_cache

import attnc
from attnc.core import symbols as S
from attnc.core.errors import SpecError
from attnc.runtime.backends.triton import kernel_launch as KL
from attnc.runtime.backends.triton import paged as triton_paged

os.environ.setdefault("TRITON_INTERPRET", "1")

#: the stdlib patterns whose paged call runs in one launch, at small sizes (``tests/cases.py``): their parameters
ONE_LAUNCH = {name: case.params for name, case in claimed("paged").items()}
#: Prefill methods the one launch serves for rows that hold all their queries (``test_paged_prefill_only.py``)
PREFILL_ONE_LAUNCH = {"xattention", "anchor"}


def paged_inputs(name: str, rows: int, cap: int) -> dict:
    """``name``'s call-time inputs over the table's ``cap`` keys for ``HQ`` heads (``tests/cases.py``), float32:
    each row's own (a leading batch dimension) where an input runs over the tokens, one for every row otherwise."""
    case = claimed("paged")[name]
    if case.inputs is None:
        return {}
    decls = {d.name: d for d in attnc.load(f"stdlib:{name}", **case.params).inputs}
    made = [{key: t.detach() for key, t in case.make_inputs(HQ, D, seed=r, dtype=torch.float32, n=cap).items()}
            for r in range(rows)]
    return {key: torch.stack([m[key] for m in made]) if decls[key].token_dims else t for key, t in made[0].items()}


def _gates(*shape):
    """Log forget gates in (-1, 0], a tenth of them -inf (a reset: nothing before it is seen)."""
    g = torch.Generator().manual_seed(sum(shape))
    gates = -torch.rand(*shape, generator=g)
    return torch.where(torch.rand(*shape, generator=g) < 0.1, float("-inf"), gates)


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


def row_inputs(pattern, given: dict, b: int, length: int) -> dict:
    """Row ``b``'s inputs of ``pattern`` over its ``length`` keys (an input without a batch dimension is every
    row's), in float64 where they are floats."""
    decls = {d.name: d for d in pattern.inputs}
    out = {}
    for key, t in given.items():
        decl = decls[key]
        lead = t.dim() - len(decl.dims)
        t = t[b:b + 1] if lead else t
        for d, dim in enumerate(decl.dims):  # its tokens, and a dimension sized by them (a gate's key blocks)
            if d in decl.token_dims:
                t = t.narrow(lead + d, 0, length)
            elif sympy.sympify(dim).free_symbols & {S.N, S.NK}:
                t = t.narrow(lead + d, 0, int(sympy.sympify(dim).subs({S.N: length, S.NK: length})))
        out[key] = t.double() if t.is_floating_point() else t
    return out


def pool(lengths, page, seed=0):
    """Keys and values of each row in shuffled pages of a pool with spare pages, the table padded with -1
    (``test_paged_kv.paged_cache``, float32)."""
    return paged_cache(lengths, page, dtype=torch.float32, seed=seed)


def reference_row(name, params, q, k, v):
    """Dense float64 attention of one row's queries (the last of its keys) over its keys."""
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
    return ref(q.double(), k.double(), v.double())


def assert_fullgraph_is_eager(call, args: tuple, grown: tuple) -> None:
    """``call`` compiled with ``fullgraph=True`` (no graph break) gives the eager answer bit for bit, at ``args`` and
    at ``grown`` (other lengths: one graph for both)."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
        got, got_grown = compiled(*args), compiled(*grown)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, call(*args), rtol=0, atol=0)
    torch.testing.assert_close(got_grown, call(*grown), rtol=0, atol=0)


def count_launches(monkeypatch):
    launched = []
    real = KL.launch_kernel

    def counting(launch, kernel, grid, args, meta, *, backward):
        launched.append(getattr(kernel, "__name__", str(kernel)))
        return real(launch, kernel, grid, args, meta, backward=backward)

    monkeypatch.setattr(KL, "launch_kernel", counting)
    return launched


def test_the_one_launch_patterns_are_the_ones_named_here():
    """The table above is every stdlib pattern the paged forward serves (a new one joins it, and these tests)."""
    from cases import CASES

    served = set()
    for case in CASES:
        name = case.name
        pat = attnc.compile_attention(
            f"stdlib:{name}", backend="reference", sizes=case.sizes, **case.params
        ).pattern
        if triton_paged.applies(pat):
            served.add(name)
    assert served == set(ONE_LAUNCH) | PREFILL_ONE_LAUNCH


@pytest.mark.versions  # the paged forward's interpreter run on each Triton CI installs
@pytest.mark.parametrize("name", sorted(ONE_LAUNCH))
def test_a_mixed_batch_is_one_launch_and_each_row_is_the_reference(name, monkeypatch):
    """Rows of 4 lengths and 4 query counts (a decode row, chunked-prefill rows, a row whose queries are all its
    keys), shuffled pages of 8 keys, 4 query heads on 2 K/V heads, and the batch padded as vLLM pads a captured
    one (two rows of no query and no key, on its null page 0 or on -1, and q's tokens past the last row's): one
    launch of ``attnc_fwd_paged`` (two with the split-KV merge), each row equal to the float64 reference."""
    params = ONE_LAUNCH[name]
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    lengths, counts = [5, 17, 40, 23], [1, 3, 1, 23]
    k, v, table, seqlens, rows = pool(lengths, 8)
    padding = torch.stack([torch.zeros_like(table[0]), torch.full_like(table[0], -1)])
    table, seqlens = torch.cat([table, padding]), torch.cat([seqlens, seqlens.new_zeros(2)])
    cu = torch.tensor([0, *torch.tensor(counts + [0, 0]).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]) + 2, D, generator=torch.Generator().manual_seed(1))
    given = paged_inputs(name, len(lengths) + 2, table.shape[1] * 8)
    launched = count_launches(monkeypatch)
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd", **given)
    assert [n for n in launched if n != "attnc_fwd_combine"] == ["attnc_fwd_paged"]
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
        want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double(),
                   **row_inputs(ref.pattern, given, b, lengths[b]))
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 37), min_size=1, max_size=4),
    page=st.sampled_from([3, 8, 16]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_batches_equal_the_reference_row_by_row(lengths, page, seed, data):
    """Any lengths, query counts up to each row's keys, page sizes that do and do not divide the KV tile, the
    bnhd layout: each row equals the float64 reference, and ``return_lse`` gives each row's log-sum-exp."""
    name = data.draw(st.sampled_from(["sliding_window", "streaming", "alibi", "s2"]))
    params = ONE_LAUNCH[name]
    counts = [data.draw(st.integers(1, n)) for n in lengths]
    k, v, table, seqlens, rows = pool(lengths, page, seed)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, int(cu[-1]), HQ, D, generator=torch.Generator().manual_seed(seed + 1))
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", layout="bnhd", **params)
    out, lse = attn(
        q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, return_lse=True
    )
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        qb = q[:, lo:hi].transpose(1, 2).double()
        want, want_lse = ref(qb, kb.double(), vb.double(), return_lse=True)
        torch.testing.assert_close(
            out[:, lo:hi].transpose(1, 2), want.float(), rtol=2e-5, atol=2e-5
        )
        torch.testing.assert_close(
            lse[:, lo:hi].transpose(1, 2), want_lse.float(), rtol=2e-5, atol=2e-5
        )


@settings(max_examples=6, deadline=None)
@given(kernel=st.integers(1, 7), dilation=st.integers(1, 3), stride=st.integers(1, 7), causal=st.booleans(),
       extra=st.lists(st.integers(0, 30), min_size=1, max_size=4), page=st.sampled_from([3, 8]),
       seed=st.integers(0, 2**16), data=st.data())
def test_windows_at_each_rows_own_length_equal_the_reference(kernel, dilation, stride, causal, extra, page, seed,
                                                             data):
    """NATTEN's 1-D windows (any size, dilation, stride, causal or not), whose window shifts inward at the
    sequence's end: in one paged launch every row's window is its own length's (the kernel reads it), each row
    equal to the float64 reference over its keys, whatever its query count."""
    stride = min(stride, kernel)
    params = {"kernel_size": kernel, "dilation": dilation, "stride": stride, "is_causal": causal}
    lengths = [kernel * dilation + e for e in extra]  # every row fits the window
    counts = [data.draw(st.integers(1, n)) for n in lengths]
    k, v, table, seqlens, rows = pool(lengths, page, seed)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=torch.Generator().manual_seed(seed + 1))
    attn = attnc.compile_attention("stdlib:neighborhood_1d", backend="triton", **params)
    assert triton_paged.applies(attn.pattern)
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        want = reference_row("neighborhood_1d", params, q[:, :, lo:hi], kb, vb)
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=5, deadline=None)
@given(lengths=st.lists(st.integers(1, 37), min_size=1, max_size=4), page=st.sampled_from([3, 8]),
       batched=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_inputs_are_read_at_each_rows_positions(lengths, page, batched, seed, data):
    """Random document ids (a batch entry per row, or one shared by every row) in one paged launch of rows of
    their own lengths and query counts: each row equals the float64 reference given its own ids over its keys."""
    counts = [data.draw(st.integers(1, n)) for n in lengths]
    k, v, table, seqlens, rows = pool(lengths, page, seed)
    cap = table.shape[1] * page
    g = torch.Generator().manual_seed(seed)
    doc = torch.randint(0, 3, (len(lengths), cap) if batched else (cap,), generator=g).cumsum(-1)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=g)
    attn = attnc.compile_attention("stdlib:document", backend="triton")
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd", doc=doc)
    ref = attnc.compile_attention("stdlib:document", backend="reference")
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double(),
                   **row_inputs(ref.pattern, {"doc": doc}, b, lengths[b]))
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


def check_rows_in_one_launch(spec: str, params: dict, cache: tuple, given: dict, packed: bool, g, data) -> None:
    """A paged call of ``stdlib:{spec}`` over ``cache`` (``paged_cache``'s) with inputs ``given``: one query per row,
    or (``packed``) ``cu_seqlens_q`` rows of counts ``data`` draws; one launch of ``attnc_fwd_paged`` (the split
    merge besides), each row the float64 reference's over its own keys and inputs."""
    k, v, table, seqlens, rows = cache
    lengths = [int(x) for x in seqlens]
    attn = attnc.compile_attention(f"stdlib:{spec}", backend="triton", **params)
    ref = attnc.compile_attention(f"stdlib:{spec}", backend="reference", **params)
    with pytest.MonkeyPatch.context() as mp:
        launched = count_launches(mp)
        if packed:
            counts = [data.draw(st.integers(0, n)) for n in lengths]
            cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
            q = torch.randn(1, HQ, max(1, int(cu[-1])), D, generator=g)
            out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd", **given)
            spans = [(slice(None), slice(int(cu[b]), int(cu[b + 1]))) for b in range(len(lengths))]
        else:
            q = torch.randn(len(lengths), HQ, 1, D, generator=g)
            out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **given)
            spans = [(slice(b, b + 1), slice(None)) for b in range(len(lengths))]
    assert [n for n in launched if n not in ("attnc_fwd_combine", "attnc_paged_summary")] == ["attnc_fwd_paged"]
    for b, ((kb, vb), (bs, qs)) in enumerate(zip(rows, spans, strict=True)):
        if q[bs, :, qs].shape[2] == 0:
            continue
        want = ref(q[bs, :, qs].double(), kb.double(), vb.double(),
                   **row_inputs(ref.pattern, given, b, lengths[b]))
        torch.testing.assert_close(out[bs, :, qs], want.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 45), min_size=1, max_size=4), page=st.sampled_from([3, 8]),
       route=st.sampled_from(["moba", "quest", "seer"]), block=st.sampled_from([2, 5, 8]), topk=st.integers(1, 4),
       packed=st.booleans(), seed=st.integers(0, 2**16), data=st.data())
def test_routed_rows_choose_their_own_blocks(lengths, page, route, block, topk, packed, seed, data):
    """MoBA, Quest and SeerAttention (its gate given per row, its keep naming each row's length) over rows of their
    own lengths (Quest's K grows with each row's), pages that do and do not divide the route's blocks, one query per
    row or ``cu_seqlens_q`` rows of their own counts, GQA: one launch of ``attnc_fwd_paged`` (the summaries and the
    split merge besides), each row equal to the float64 reference over its own keys (its selection made from its own
    keys' summaries, or its own gate)."""
    params = ({"page": block, "token_budget": block * topk} if route == "quest"
              else {"block": block, "topk": topk})
    cache = pool(lengths, page, seed)
    g = torch.Generator().manual_seed(seed + 1)
    cap = cache[2].shape[1] * page
    given = {"gate": torch.randn(len(lengths), HQ, cap, -(-cap // block), generator=g)} if route == "seer" else {}
    check_rows_in_one_launch(route, params, cache, given, packed, g, data)


#: token routes at small sizes, and their inputs ``(rows, capacity, heads, batched) -> inputs`` over the capacity
TOKEN_ROUTES = {
    "token_topk": lambda topk: {"topk": topk},
    "sparsifiner": lambda topk: {"budget": topk, "rank": 3, "cls": 1},
    "dsa": lambda topk: {"topk": topk, "index_heads": 2, "index_dim": 4},
    "dma": lambda topk: {"window": topk},
}


def token_inputs(name: str, rows: int, cap: int, heads: int, batched: bool, g) -> dict:
    lead = (rows,) if batched else ()
    shapes = {"token_topk": {}, "sparsifiner": {"qi": (heads, cap, 3), "ki": (heads, cap, 3)},
              "dsa": {"qi": (cap, 2, 4), "ki": (cap, 4), "w": (cap, 2)}, "dma": {"importance": (heads, cap)}}[name]
    return {key: torch.randn(*lead, *shape, generator=g) for key, shape in shapes.items()}


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 45), min_size=1, max_size=4), page=st.sampled_from([3, 8, 16]),
       route=st.sampled_from(sorted(TOKEN_ROUTES)), topk=st.integers(1, 9), packed=st.booleans(),
       batched=st.booleans(), kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16), data=st.data())
def test_token_routes_choose_each_querys_keys_among_its_rows(lengths, page, route, topk, packed, batched, kv_heads,
                                                            seed, data):
    """Top-k token routes (by ``q @ k`` read through the pages, by indexer inputs, by DeepSeek's indexer, by a
    score per key) over rows of their own lengths, one query per row or ``cu_seqlens_q`` rows of their own counts,
    inputs per row or shared, GQA and MQA: one launch of ``attnc_fwd_paged`` (the split merge besides), each row
    equal to the float64 reference over its own keys and inputs (each query's keys chosen among its own row's)."""
    cache = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(seed + 1)
    given = token_inputs(route, len(lengths), cache[2].shape[1] * page, HQ, batched, g)
    check_rows_in_one_launch(route, TOKEN_ROUTES[route](topk), cache, given, packed, g, data)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), page=st.sampled_from([3, 8]),
       clusters=st.integers(1, 4), packed=st.booleans(), batched=st.booleans(), kv_heads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16), data=st.data())
def test_cluster_ids_are_made_over_each_rows_pages(lengths, page, clusters, packed, batched, kv_heads, seed, data):
    """The clustered mask (``cluster(q) == cluster(k)``) over rows of their own lengths, centroids per row or
    shared, GQA and MQA, one query per row or ``cu_seqlens_q`` rows: each key's id made from its row's pages and
    each query's from q on the device, one launch of ``attnc_fwd_paged``, each row the float64 reference's."""
    cache = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(seed + 1)
    given = {"centroids": torch.randn(*((len(lengths),) if batched else ()), HQ, clusters, D, generator=g)}
    check_rows_in_one_launch("cluster_mask", {"clusters": clusters}, cache, given, packed, g, data)


@pytest.mark.parametrize("route", sorted(TOKEN_ROUTES))
def test_a_token_routed_call_reads_nothing_on_the_host(route):
    """A token-routed paged call at its batch shape's later calls, at new lengths: nothing read on the host (the
    scores, choice, bits and lists made by device ops, the inputs' shapes checked against the table's capacity)."""
    params = TOKEN_ROUTES[route](3)
    attn = attnc.compile_attention(f"stdlib:{route}", backend="triton", **params)
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    given = token_inputs(route, 3, table.shape[1] * 8, HQ, True, torch.Generator().manual_seed(0))
    q = torch.randn(3, HQ, 1, D)
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **given)
    for lengths in (seqlens, torch.tensor([13, 31, 8], dtype=torch.int32)):
        with HostReads() as reads:
            attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", **given)
        assert reads.total == 0, dict(reads.seen)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 45), min_size=1, max_size=4), page=st.sampled_from([3, 8, 16]),
       packed=st.booleans(), batched=st.booleans(), kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       data=st.data())
def test_fox_gates_are_each_rows_over_the_capacity(lengths, page, packed, batched, kv_heads, seed, data):
    """The Forgetting Transformer's gates (``decay g``) over the table's capacity, per row or shared, with resets
    (-inf gates), GQA and MQA, one query per row or ``cu_seqlens_q`` rows of their own counts: one launch of
    ``attnc_fwd_paged`` (each packed row reading its own head's prefix sums), each row the float64 reference's."""
    cache = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(seed + 1)
    given = {"g": _gates(*((len(lengths),) if batched else ()), HQ, cache[2].shape[1] * page)}
    check_rows_in_one_launch("forgetting", {}, cache, given, packed, g, data)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), page=st.sampled_from([3, 8]),
       name=st.sampled_from(["music_relative", "landmark"]), size=st.integers(2, 9), packed=st.booleans(),
       batched=st.booleans(), kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16), data=st.data())
def test_tables_of_the_present_queries_are_read_at_their_rows(lengths, page, name, size, packed, batched, kv_heads,
                                                             seed, data):
    """Music Transformer's relative term (its embeddings per row or shared) and landmark gates (blocks of any size,
    each query against its row's keys through the pages) over rows of their own lengths, one query per row or
    ``cu_seqlens_q`` rows, GQA and MQA: the tables made from the present queries, read at each query's row in q,
    one launch of ``attnc_fwd_paged``, each row the float64 reference's."""
    cache = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    g = torch.Generator().manual_seed(seed + 1)
    if name == "music_relative":
        params = {"max_relative": size}
        given = {"E": torch.randn(*((len(lengths),) if batched else ()), HQ, size, D, generator=g)}
    else:
        params, given = {"block": size}, {}
    check_rows_in_one_launch(name, params, cache, given, packed, g, data)


@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4), page=st.sampled_from([3, 8]),
       vertical=st.integers(1, 6), slash=st.integers(1, 6), last=st.integers(1, 9), sinks=st.integers(0, 3),
       local=st.integers(0, 4), packed=st.booleans(), kv_heads=st.sampled_from([1, 2]), seed=st.integers(0, 2**16),
       data=st.data())
def test_vertical_slash_flags_are_chosen_per_row(lengths, page, vertical, slash, last, sinks, local, packed, kv_heads,
                                                 seed, data):
    """MInference's vertical-slash index over rows of their own lengths and query counts: each row's columns and
    diagonals chosen from its own last ``min(last_q, queries)`` queries' softmax over its keys (through the pages),
    forced sinks and local diagonals, each row's K at most its keys; one launch of ``attnc_fwd_paged``, each row the
    float64 reference's."""
    cache = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    params = {"vertical": vertical, "slash": slash, "last_q": last, "sinks": sinks, "local": local, "slash_min": 0}
    check_rows_in_one_launch("vertical_slash", params, cache, {}, packed, torch.Generator().manual_seed(seed + 1),
                             data)


@pytest.mark.parametrize("name", ["cluster_mask", "forgetting", "music_relative", "landmark", "vertical_slash"])
def test_a_call_with_ids_or_gates_reads_nothing_on_the_host(name):
    """The clustered mask's, FoX's, the relative term's, the landmark gates' and the vertical-slash index's paged
    calls at new lengths: their ids, prefix sums, resets, tables and flags made by device ops, nothing read on the
    host."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **ONE_LAUNCH[name])
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    given = paged_inputs(name, 3, table.shape[1] * 8)
    q = torch.randn(3, HQ, 1, D)
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **given)
    for lengths in (seqlens, torch.tensor([13, 31, 8], dtype=torch.int32)):
        with HostReads() as reads:
            attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", **given)
        assert reads.total == 0, dict(reads.seen)


def test_a_routed_call_reads_nothing_and_is_never_replayed(monkeypatch):
    """A routed paged call at its batch shape's later calls reads nothing on the host (the summaries, scores,
    choice and lists made by device ops), and is never bound for replay (its selection is made per call): each call
    at new lengths is the reference's."""
    attn = attnc.compile_attention("stdlib:moba", backend="triton", block=4, topk=2)
    ref = attnc.compile_attention("stdlib:moba", backend="reference", block=4, topk=2)
    k, v, table, seqlens, rows = pool([12, 30, 7], 8)
    q = torch.randn(3, HQ, 1, D, generator=torch.Generator().manual_seed(3))
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")  # the batch shape's first call plans
    for lengths in (seqlens, seqlens, torch.tensor([13, 31, 8], dtype=torch.int32)):
        with HostReads() as reads:
            out = attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd")
        assert reads.total == 0, dict(reads.seen)
        for b in range(len(rows)):
            n = int(lengths[b])
            full_k, full_v = pool_row(k, table, b, n), pool_row(v, table, b, n)
            torch.testing.assert_close(out[b:b + 1], ref(q[b:b + 1].double(), full_k.double(),
                                                         full_v.double()).float(), rtol=2e-5, atol=2e-5)
    assert attn._warm is None  # a routed module keeps no bound launch to replay


def pool_row(cache, table, b: int, n: int) -> torch.Tensor:
    """Row ``b``'s first ``n`` keys of a pool ``[pages, page, Hkv, D]`` through its table: ``[1, Hkv, n, D]``."""
    page = cache.shape[1]
    ids = table[b, : -(-n // page)].long()
    return cache[ids].reshape(-1, *cache.shape[2:])[:n].transpose(0, 1).unsqueeze(0)


def test_a_call_with_inputs_reads_nothing_on_the_host():
    """A paged call of a pattern whose mask reads an input, at its second batch shape's call and at new lengths:
    nothing read on the host (the input's shape is checked against the table's capacity, never the lengths)."""
    attn = attnc.compile_attention("stdlib:longformer", backend="triton", window=4)
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    is_global = (torch.arange(table.shape[1] * 8) % 5 == 0).long().expand(3, -1).contiguous()
    q = torch.randn(3, HQ, 1, D)
    attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", is_global=is_global)
    for lengths in (seqlens, torch.tensor([13, 31, 8], dtype=torch.int32)):
        with HostReads() as reads:
            attn(q, k, v, block_table=table, cache_seqlens=lengths, layout="bhnd", is_global=is_global)
        assert reads.total == 0, dict(reads.seen)


def test_an_input_of_the_wrong_type_is_refused_by_name():
    """A float tensor for document's int ids: not read by the one launch (it would truncate them), refused by name
    by the ordinary path."""
    k, v, table, seqlens, _ = pool([12, 30], 8)
    attn = attnc.compile_attention("stdlib:document", backend="triton")
    doc = torch.zeros(2, table.shape[1] * 8)
    with pytest.raises(SpecError, match="input 'doc' is int") as err:
        attn(torch.randn(2, HQ, 1, D), k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", doc=doc)
    assert "argument doc" in str(err.value)


@pytest.mark.parametrize("route, name, shape", [
    ("dsa", "qi", lambda cap: (cap, 2, 5)),  # index_dim 4 declared
    ("sparsifiner", "ki", lambda cap: (HQ + 1, cap, 3)),  # a head too many
    ("dma", "importance", lambda cap: (HQ + 1, cap)),
])
def test_a_token_route_input_of_the_wrong_shape_is_refused_by_name(route, name, shape):
    """An indexer input of another shape than declared is not scored by the one launch (it would mix dimensions):
    the ordinary path names the argument."""
    k, v, table, seqlens, _ = pool([12, 30], 8)
    cap = table.shape[1] * 8
    attn = attnc.compile_attention(f"stdlib:{route}", backend="triton", **TOKEN_ROUTES[route](3))
    given = token_inputs(route, 2, cap, HQ, False, torch.Generator().manual_seed(0))
    given[name] = torch.randn(*shape(cap))
    with pytest.raises(SpecError) as err:
        attn(torch.randn(2, HQ, 1, D), k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **given)
    assert f"argument {name}" in str(err.value)


@pytest.mark.parametrize("fault, gate, match", [
    ("missing", None, "missing input 'gate'"),
    ("short", lambda cap: torch.randn(HQ, cap - 8, -(-cap // 4)), "fewer entries than the block table's capacity"),
    ("int", lambda cap: torch.zeros(HQ, cap, -(-cap // 4), dtype=torch.int64), "input 'gate' is float"),
    ("heads", lambda cap: torch.randn(HQ + 1, cap, -(-cap // 4)), "expected \\[4, capacity, 10\\]"),
])
def test_a_paged_gate_the_one_launch_does_not_take_is_named(fault, gate, match):
    """SeerAttention's paged call runs only in one launch: a gate it cannot read there (missing, short of the
    table's capacity, of ints, of other heads) is refused naming ``gate``; a backend without the one launch is
    refused naming ``block_table``."""
    k, v, table, seqlens, _ = pool([12, 30], 8)
    cap = table.shape[1] * 8
    given = {} if gate is None else {"gate": gate(cap)}
    attn = attnc.compile_attention("stdlib:seer", backend="triton", block=4, topk=2)
    with pytest.raises(SpecError, match=match) as err:
        attn(torch.randn(2, HQ, 1, D), k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **given)
    assert err.value.where == "argument gate"
    cpu = attnc.compile_attention("stdlib:seer", backend="cpu", block=4, topk=2)
    with pytest.raises(SpecError, match="only where it runs in one launch") as err:
        cpu(torch.randn(2, HQ, 1, D), k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd",
            gate=torch.randn(HQ, cap, -(-cap // 4)))
    assert err.value.where == "argument block_table"


def test_a_bias_reading_inputs_at_the_query_the_key_and_the_head_is_read_by_the_kernel(monkeypatch):
    """A bias reading inputs at the key's position and the head (``w[h, k]``) and at the query's (``u[q]``), over
    the table's capacity: one launch, each row the float64 reference over its own keys and inputs."""
    src = """pattern biased
  tokens seq
  input w: float[heads, n]
  input u: float[n]
  mask causal
  bias w[h, k] + u[q]
"""
    attn = attnc.compile_attention(src, backend="triton")
    ref = attnc.compile_attention(src, backend="reference")
    assert triton_paged.applies(attn.pattern)
    lengths, counts = [5, 17, 23], [1, 3, 23]
    k, v, table, seqlens, rows = pool(lengths, 8)
    cap = table.shape[1] * 8
    g = torch.Generator().manual_seed(5)
    w, u = torch.randn(len(lengths), HQ, cap, generator=g), torch.randn(cap, generator=g)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=g)
    launched = count_launches(monkeypatch)
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd", w=w, u=u)
    assert [n for n in launched if n != "attnc_fwd_combine"] == ["attnc_fwd_paged"]
    for b, (kb, vb) in enumerate(rows):
        lo, hi, n = int(cu[b]), int(cu[b + 1]), lengths[b]
        want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double(), w=w[b:b + 1, :, :n].double(),
                   u=u[:n].double())
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


def test_a_row_shorter_than_the_window_is_refused_by_name():
    """A row whose keys do not fit the pattern's window (size times dilation), which the ordinary call refuses at
    that length: the one-launch call refuses it too, naming ``cache_seqlens`` and the row, from the kernel's row
    check (nothing read on the host before)."""
    attn = attnc.compile_attention("stdlib:neighborhood_1d", backend="triton", kernel_size=5, dilation=2)
    k, v, table, seqlens, _ = pool([12, 30, 9], 8)
    q = torch.randn(3, HQ, 1, D)
    with pytest.raises(SpecError, match=r"cache_seqlens\[2\] = 9 .* at least 10 keys") as err:
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert "argument cache_seqlens" in str(err.value)


def test_rows_of_equal_query_counts_take_q_per_row_and_append_new_keys():
    """Without ``cu_seqlens_q``: q ``[B, H, n, D]``, every row's n queries; ``k=``/``v=`` written into the pages
    first, in place; the same answer as the call on the gathered rows."""
    k, v, table, seqlens, rows = pool([9, 30, 14], 4)
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=7)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, HQ, 2, D, generator=g)
    k_new, v_new = torch.randn(3, HKV, 2, D, generator=g), torch.randn(3, HKV, 2, D, generator=g)
    before = seqlens - 2
    out = attn(q, k, v, block_table=table, cache_seqlens=before, k=k_new, v=v_new, layout="bhnd")
    for b, (kb, vb) in enumerate(rows):
        kb = torch.cat([kb[:, :, :-2], k_new[b : b + 1]], 2)
        vb = torch.cat([vb[:, :, :-2], v_new[b : b + 1]], 2)
        want = reference_row("sliding_window", {"window": 7}, q[b : b + 1], kb, vb)
        torch.testing.assert_close(out[b : b + 1], want.float(), rtol=2e-5, atol=2e-5)


def test_launches_do_not_depend_on_the_distinct_lengths(monkeypatch):
    """Six rows of one length and six rows of six lengths: the same kernels, launched as often."""
    attn = attnc.compile_attention("stdlib:streaming", backend="triton", window=5, sinks=1)
    q = torch.randn(6, HQ, 1, D)
    seen = []
    for lengths in ([20] * 6, [3, 8, 13, 20, 27, 31]):
        k, v, table, seqlens, _ = pool(lengths, 8)
        table = torch.nn.functional.pad(
            table, (0, 5 - table.shape[1]), value=-1
        )  # one capacity for both
        launched = count_launches(monkeypatch)
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
        seen.append(launched)
        monkeypatch.undo()
    assert seen[0] == seen[1] and "attnc_fwd_paged" in seen[0]


def test_a_warm_call_reads_nothing_and_a_new_length_compiles_nothing():
    """A second call of one batch shape reads nothing on the host; a call at other lengths and query counts (a
    growing cache) reuses the same compiled module and plan and reads nothing either."""
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=6)
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    q = torch.randn(1, HQ, 4, D)

    def call(lengths, cu):
        cu = torch.tensor(cu, dtype=torch.int32)
        attn(q, k, v, block_table=table, cache_seqlens=lengths, cu_seqlens_q=cu, max_seqlen_q=2, layout="bhnd")

    call(seqlens, [0, 1, 3, 4])
    module = attn.runner.last_plan
    for lengths, cu in ((seqlens, [0, 1, 3, 4]), (torch.tensor([13, 31, 8], dtype=torch.int32), [0, 2, 3, 4])):
        with HostReads() as reads:
            call(lengths, cu)
        assert reads.total == 0, dict(reads.seen)
    assert attn.runner.last_plan is module  # the template's plan: nothing planned again


@pytest.mark.parametrize(
    "bad, where",
    [
        ({"table_at": (1, 0), "value": 99}, "block_table"),
        ({"table_at": (0, 1), "value": -1}, "block_table"),
        ({"seqlen": (2, 999)}, "cache_seqlens"),
        ({"seqlen": (0, 0)}, "cache_seqlens"),
        ({"cu": [0, 1, 3, 2]}, "cu_seqlens_q"),
        ({"cu": [1, 1, 3, 4]}, "cu_seqlens_q"),
        ({"cu": [0, -1, 3, 4]}, "cu_seqlens_q"),  # a row before q's first: its program reads and writes row 0 on
        ({"cu": [0, 3, 3, 4]}, "max_seqlen_q"),
        ({"cu": [0, 5, 3, 4]}, "cu_seqlens_q"),  # past q's 4 rows, then back: the offsets' fault, not max_seqlen_q's
        ({"seqlen": (1, 1)}, "cache_seqlens"),  # row 1's 2 queries after 1 key: more queries than keys
        ({"cu_dtype": torch.int64}, "cu_seqlens_q"),
        ({"cu": [0, 1, 4]}, "cu_seqlens_q"),  # 2 rows of offsets for a table of 3
        ({"max_q": 0}, "max_seqlen_q"),
        ({"table_dtype": torch.int64}, "block_table"),
    ],
)
@pytest.mark.parametrize("spec", [("stdlib:sliding_window", {"window": 6}), ("stdlib:moba", {"block": 4, "topk": 2})],
                         ids=["window", "routed"])
def test_bad_values_are_refused_by_name(bad, where, spec):
    """A page id outside the pool on a reached page, a length beyond the table or below the row's queries, offsets
    that decrease, do not start at 0, give a row more than ``max_seqlen_q`` or do not match the table's rows, a bad
    ``max_seqlen_q``, index tensors of another dtype: one SpecError naming it; a routed pattern's too (its
    selection's device ops and block summaries read the values clamped, the kernel's row check names them)."""
    attn = attnc.compile_attention(spec[0], backend="triton", **spec[1])
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    cu = torch.tensor(bad.get("cu", [0, 1, 3, 4]), dtype=bad.get("cu_dtype", torch.int32))
    table = table.to(bad.get("table_dtype", torch.int32))
    if "table_at" in bad:
        table[bad["table_at"]] = bad["value"]
    if "seqlen" in bad:
        seqlens[bad["seqlen"][0]] = bad["seqlen"][1]
    q = torch.randn(1, HQ, 4, D)
    with pytest.raises(SpecError) as err:
        attn(
            q,
            k,
            v,
            block_table=table,
            cache_seqlens=seqlens,
            cu_seqlens_q=cu,
            max_seqlen_q=bad.get("max_q", 2),
            layout="bhnd",
        )
    assert f"argument {where}" in str(err.value)


@pytest.mark.parametrize("name, params, inputs", [
    # an input over the longest row's keys but not the table's capacity: the one launch does not take it
    ("document", {}, lambda cap: {"doc": (torch.arange(30) // 9).expand(3, 30).contiguous()}),
])
def test_rows_of_their_own_query_counts_on_patterns_served_by_length(name, params, inputs):
    """Calls the paged forward does not serve (an input shorter than the table's capacity, which the kernel would
    read past) take ``cu_seqlens_q`` too, on every backend: rows grouped by length and query count, each the
    reference's."""
    lengths = [9, 30, 14]
    k, v, table, seqlens, rows = pool(lengths, 4, seed=2)
    cu = torch.tensor([0, 1, 5, 5], dtype=torch.int32)  # query counts 1, 4 and 0
    q = torch.randn(1, HQ, 5, D, generator=torch.Generator().manual_seed(4))
    given = inputs(table.shape[1] * 4)
    for backend in ("triton", "reference"):
        attn = attnc.compile_attention(f"stdlib:{name}", backend=backend, **params)
        out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd", **given)
        ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
        for b, (kb, vb) in enumerate(rows):
            lo, hi = int(cu[b]), int(cu[b + 1])
            if lo == hi:
                continue
            row_in = {n: t[b:b + 1, :lengths[b]] for n, t in given.items()}
            want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double(), **row_in)
            torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_a_paged_call_compiles_with_fullgraph(packed):
    """Under ``torch.compile(fullgraph=True)`` the one-launch call is the ``attnc::paged_attention`` op (no graph
    break, nothing read on the host in the graph), the same answer as the eager call; a second length reuses it."""
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=6)
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    if packed:
        cu = torch.tensor([0, 1, 3, 4], dtype=torch.int32)
        q = torch.randn(1, HQ, 4, D)

        def call(q, k, v, table, seqlens, cu):
            return attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=2,
                        layout="bhnd")

        args = (q, k, v, table, seqlens, cu)
    else:
        q = torch.randn(3, HQ, 1, D)

        def call(q, k, v, table, seqlens):
            return attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")

        args = (q, k, v, table, seqlens)
    assert_fullgraph_is_eager(call, args, (*args[:4], torch.tensor([13, 31, 8], dtype=torch.int32), *args[5:]))


def test_a_paged_call_that_appends_compiles_with_fullgraph():
    """``k=``/``v=`` written into the pools inside the traced call (the checks before the write compared the pools'
    data pointers, which dynamo cannot trace): the same pools and answer as the eager call."""
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=6)
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, HQ, 1, D, generator=g)
    kn, vn = (torch.randn(3, k.shape[2], 1, D, generator=g) for _ in range(2))

    def call(q, k, v, kn, vn, table, seqlens):
        return attn(q, k, v, k=kn, v=vn, block_table=table, cache_seqlens=seqlens, layout="bhnd")

    k_eager, v_eager = k.clone(), v.clone()
    want = call(q, k_eager, v_eager, kn, vn, table, seqlens)
    torch._dynamo.reset()
    try:
        k_traced, v_traced = k.clone(), v.clone()
        got = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k_traced, v_traced, kn, vn, table, seqlens)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(k_traced, k_eager) and torch.equal(v_traced, v_eager) and not torch.equal(k_eager, k)


def test_a_packed_paged_call_that_appends_each_rows_count_compiles_with_fullgraph():
    """``k=``/``v=`` packed as q (``cu_seqlens_q``: each row appends one token per query, padding tokens past the
    rows' none) written inside the traced call: the same pools and answer as the eager call, no graph break."""
    attn = attnc.compile_attention("stdlib:sliding_window", backend="triton", window=6)
    k, v, table, seqlens, _ = pool([12, 29, 5], 8)  # room in each row's last page for its new tokens
    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, HQ, 6, D, generator=g)
    kn, vn = (torch.randn(1, k.shape[2], 6, D, generator=g) for _ in range(2))
    cu = torch.tensor([0, 1, 4, 5], dtype=torch.int32)

    def call(q, k, v, kn, vn, table, seqlens, cu):
        return attn(q, k, v, k=kn, v=vn, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu,
                    max_seqlen_q=3, layout="bhnd")

    k_eager, v_eager = k.clone(), v.clone()
    want = call(q, k_eager, v_eager, kn, vn, table, seqlens, cu)
    torch._dynamo.reset()
    try:
        k_traced, v_traced = k.clone(), v.clone()
        got = torch.compile(call, fullgraph=True, backend="aot_eager")(q, k_traced, v_traced, kn, vn, table, seqlens,
                                                                       cu)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(k_traced, k_eager) and torch.equal(v_traced, v_eager) and not torch.equal(k_eager, k)


def test_a_paged_call_with_inputs_compiles_with_fullgraph():
    """A mask reading an input (document ids over the table's capacity): under ``torch.compile(fullgraph=True)``
    the one-launch op takes it (no graph break), the same answer as the eager call, at a second length too."""
    attn = attnc.compile_attention("stdlib:document", backend="triton")
    k, v, table, seqlens, _ = pool([12, 30, 7], 8)
    doc = (torch.arange(table.shape[1] * 8) // 5).expand(3, -1).contiguous()
    q = torch.randn(3, HQ, 1, D)

    def call(q, k, v, table, seqlens, doc):
        return attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", doc=doc)

    args = (q, k, v, table, seqlens, doc)
    grown = (q, k, v, table, torch.tensor([13, 31, 8], dtype=torch.int32), doc)
    assert_fullgraph_is_eager(call, args, grown)


@pytest.mark.parametrize("name", ["forgetting", "dma", "dsa", "music_relative", "cluster_mask", "sparsifiner", "seer"])
def test_inputs_with_a_heads_dimension_compile_with_fullgraph(name):
    """Inputs beside the tokens (gates ``[B, heads, capacity]``, centroids, embeddings, indexer keys): their declared
    sizes are found once per shape, outside the trace, so ``fullgraph=True`` traces the call (it failed in sympy
    before), the eager answer bit for bit."""
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **ONE_LAUNCH[name])
    k, v, table, seqlens, _ = pool([6, 17, 30], 4)
    given = paged_inputs(name, 3, table.shape[1] * 4)
    q = torch.randn(3, HQ, 1, D)

    def call(q, k, v, table, seqlens):
        return attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **given)

    torch._dynamo.reset()
    try:
        got = torch.compile(call, fullgraph=True, backend="eager")(q, k, v, table, seqlens)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, call(q, k, v, table, seqlens), rtol=0, atol=0)


def test_an_input_of_the_wrong_size_is_named_with_the_shape_given():
    """FoX gates over the K/V heads instead of q's, in flash-attn's order: refused naming ``g``, the shape given and
    the one expected in the call's layout, not a row's transposed slice of it."""
    attn = attnc.compile_attention("stdlib:forgetting", backend="triton")
    k, v, table, seqlens, _ = pool([6, 15], 4)
    capacity = table.shape[1] * 4
    q = torch.randn(2, 1, HQ, D)
    with pytest.raises(SpecError) as err:
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bnhd", g=torch.zeros(2, capacity, HKV))
    assert err.value.where == "argument g"
    assert f"has shape [2, {capacity}, {HKV}], expected [B, capacity, {HQ}] ([B, n, heads]" in err.value.message


def test_pools_of_any_strides_are_read_through_them():
    """Pools that are views whose pages are not whole rows (each page a slice of a longer one), with a spare head
    between K/V heads: the kernel addresses each key by the page's and the slot's strides, the same answer."""
    k, v, table, seqlens, rows = pool([11, 26], 4)
    wide_k = torch.zeros(k.shape[0], 6, HKV * 2, D)
    wide_v = torch.zeros(v.shape[0], 6, HKV * 2, D)
    wide_k[:, :4, ::2], wide_v[:, :4, ::2] = k, v
    kv_views = wide_k[:, :4, ::2], wide_v[:, :4, ::2]
    attn = attnc.compile_attention("stdlib:alibi", backend="triton")
    q = torch.randn(2, HQ, 3, D, generator=torch.Generator().manual_seed(5))
    out = attn(q, *kv_views, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert attn.runner.pages_in_one_launch(q, *kv_views)
    for b, (kb, vb) in enumerate(rows):
        want = reference_row("alibi", {}, q[b:b + 1], kb, vb)
        torch.testing.assert_close(out[b:b + 1], want.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["sliding_window", "longformer", "dsa", "sparsifiner", "seer", "cluster_mask",
                                  "music_relative", "landmark", "vertical_slash"])
def test_rows_past_the_last_offset_are_zeros_with_an_lse_of_minus_infinity(name):
    """q padded past ``cu_seqlens_q[-1]`` (a serving loop's fixed shape), more padding rows than the table holds
    keys: those rows come out as zeros, lse -inf, on the one-launch path (split or not; a route's or a cluster's
    inputs read at no position past the table's), and on the by-length one; the others are the reference's."""
    lengths = [12, 30]
    k, v, table, seqlens, rows = pool(lengths, 8)
    cap = table.shape[1] * 8
    cu = torch.tensor([0, 1, 3], dtype=torch.int32)
    q = torch.randn(1, HQ, cap + 6, D, generator=torch.Generator().manual_seed(6))
    params = {"window": 5} if name in ("sliding_window", "longformer") else ONE_LAUNCH[name]
    given = {"is_global": torch.zeros(2, cap, dtype=torch.int64)} if name == "longformer" else (
        paged_inputs(name, len(lengths), cap))
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    out, lse = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd",
                    return_lse=True, **given)
    assert bool((out[:, :, 3:] == 0).all()) and bool((lse[:, :, 3:] == float("-inf")).all())
    ref = attnc.compile_attention(f"stdlib:{name}", backend="reference", **params)
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double(),
                   **row_inputs(ref.pattern, given, b, lengths[b]))
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


def test_a_token_routes_keep_naming_the_length_is_each_rows():
    """A token route whose ``keep`` names the sequence's length (``k >= nk - 2``: the last two keys kept) keeps
    each row's own last keys, not the table's: each row of a mixed batch the float64 reference's."""
    src = """pattern recent
  tokens seq
  mask causal
  route topk(3) tokens by q @ k keep k >= nk - 2
"""
    attn = attnc.compile_attention(src, backend="triton")
    ref = attnc.compile_attention(src, backend="reference")
    assert triton_paged.applies(attn.pattern)
    lengths, counts = [5, 17, 30, 9], [1, 4, 1, 9]
    k, v, table, seqlens, rows = pool(lengths, 8)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(1, HQ, int(cu[-1]), D, generator=torch.Generator().manual_seed(8))
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, layout="bhnd")
    for b, (kb, vb) in enumerate(rows):
        lo, hi = int(cu[b]), int(cu[b + 1])
        want = ref(q[:, :, lo:hi].double(), kb.double(), vb.double())
        torch.testing.assert_close(out[:, :, lo:hi], want.float(), rtol=2e-5, atol=2e-5)


def test_the_routed_paged_benchmark_runs_on_toy_sizes(tmp_path):
    """``benchmarks/paged_routes.py --toy`` (the GPU run's code on CPU tensors): a table per route with every method,
    the paged steps (with and without a kept summary; a token route's scored through the pages or its indexer; NSA's
    one launch per branch and its path by length) equal to the contiguous step's output."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "paged_routes.py"
    spec = importlib.util.spec_from_file_location("paged_routes_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "paged_routes.md"
    assert bench.main(["--toy", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| attnc paged")]
    # MoBA's and Quest's with and without a kept summary; NSA's in one launch per branch and by length
    assert text.count("## ") == 5 and len(rows) == 8
    assert all(float(row.rstrip(" |").rsplit("|", 1)[-1]) < 1e-5 for row in rows), rows


def test_a_missing_input_is_named():
    """A paged call of a pattern whose mask reads an input, without it: the ordinary path's error naming it, not a
    one launch without its input."""
    k, v, table, seqlens, _ = pool([12, 30], 8)
    attn = attnc.compile_attention("stdlib:document", backend="triton")
    with pytest.raises(SpecError, match="missing input 'doc'") as err:
        attn(torch.randn(2, HQ, 1, D), k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    assert err.value.where == "argument doc"


@pytest.mark.parametrize("spec, fault", [
    # an input read away from the query's or key's own position: the ordinary call checks its index range
    ("pattern shifted\n  tokens seq\n  input doc: int[n]\n  mask causal and doc[q] == doc[k - 1]\n",
     "indexed out of range"),
    # a window whose size names the length: the kernels take fixed window sizes
    ("pattern wn\n  tokens seq\n  mask window(n // 8 + 1)\n", None),
])
def test_masks_the_one_launch_does_not_take_keep_the_ordinary_answer(spec, fault):
    """A mask reading an input at a shifted index, a window sized by the length: not served in one launch (its
    lists or kernel would answer otherwise), so the paged call keeps the ordinary path's answer: the error naming
    the input, or each row equal to the reference."""
    pat = attnc.compile_attention(spec, backend="reference").pattern
    assert not triton_paged.applies(pat)
    lengths = [23, 40, 9]
    k, v, table, seqlens, rows = pool(lengths, 8, 4)
    q = torch.randn(3, HQ, 1, D, generator=torch.Generator().manual_seed(2))
    attn = attnc.compile_attention(spec, backend="triton")
    if fault is not None:
        doc = torch.zeros(3, table.shape[1] * 8, dtype=torch.int64)
        with pytest.raises(SpecError, match=fault):
            attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", doc=doc)
        return
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd")
    ref = attnc.compile_attention(spec, backend="reference")
    for b, (kb, vb) in enumerate(rows):
        torch.testing.assert_close(out[b:b + 1], ref(q[b:b + 1].double(), kb.double(), vb.double()).float(),
                                   rtol=2e-5, atol=2e-5)
