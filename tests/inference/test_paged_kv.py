"""Paged KV caches (``attn(q, k_cache, v_cache, block_table=..., cache_seqlens=...)``): every row equals the
same module called on its keys gathered into a contiguous cache, and a dense float64 softmax over the
pattern's mask; pages are shuffled, rows differ in length, block tables are padded with ids that must
never be read; every bad argument is refused by name before any page is read."""

import re

import pytest
import torch

import attnc
from attnc.core.errors import SpecError
from attnc.runtime.api import compile_attention, materialize_mask

HQ, HKV, D = 4, 2, 8

# (label, source, parameters, inputs by kind, routed: the dense reference selects with q and k)
CASES = [
    ("sliding_window", "stdlib:sliding_window", {"window": 6}, {}, False),
    ("streaming", "stdlib:streaming", {"window": 5, "sinks": 2}, {}, False),
    ("dilated", "stdlib:dilated", {"segment": 8, "dilation": 2}, {}, False),
    ("document", "stdlib:document", {}, {"doc": "docs"}, False),
    ("longformer", "stdlib:longformer", {"window": 5}, {"is_global": "global"}, False),
    ("token_topk", "stdlib:token_topk", {"topk": 5}, {}, True),
    ("moba", "stdlib:moba", {"block": 4, "topk": 2}, {}, True),
    ("quest", "stdlib:quest", {"token_budget": 8, "page": 4}, {}, True),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def paged_cache(lengths, page_size, *, dtype=torch.float64, seed=0, dv=D, kv_heads=HKV):
    """Random keys and values of each row written into shuffled pages of a pool with spare pages;
    the block table is padded with -1 past each row's pages, and a spare column past every row's.
    Returns (k_cache, v_cache, block_table, cache_seqlens, [(k_b, v_b) contiguous [1, Hkv, L_b, D]])."""
    g = _gen(seed)
    reach = [-(-length // page_size) for length in lengths]
    max_pages = max(reach) + 1
    num_pages = sum(reach) + 3
    k_cache = torch.randn(num_pages, page_size, kv_heads, D, generator=g, dtype=dtype)
    v_cache = torch.randn(num_pages, page_size, kv_heads, dv, generator=g, dtype=dtype)
    order = torch.randperm(num_pages, generator=g)
    table = torch.full((len(lengths), max_pages), -1, dtype=torch.int32)
    rows, used = [], 0
    for b, (length, pages) in enumerate(zip(lengths, reach, strict=True)):
        ids = order[used : used + pages]
        used += pages
        table[b, :pages] = ids.to(torch.int32)
        k_b = k_cache[ids].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
        v_b = v_cache[ids].flatten(0, 1)[:length].transpose(0, 1).unsqueeze(0)
        rows.append((k_b, v_b))
    return k_cache, v_cache, table, torch.tensor(lengths, dtype=torch.int32), rows


def _inputs(spec, batch, capacity, seed=7):
    """Call-time inputs over the block table's capacity (token dimensions at absolute positions)."""
    g = _gen(seed)
    out = {}
    for name, kind in spec.items():
        if kind == "docs":  # document ids, one row per batch entry
            out[name] = torch.sort(torch.randint(0, 3, (batch, capacity), generator=g)).values
        else:  # global tokens, shared by every row
            out[name] = (torch.rand(capacity, generator=g) < 0.2).long()
    return out


def _row_inputs(spec, inputs, b, length):
    """The inputs of row b alone, cut to its length (the contiguous call's)."""
    return {
        name: (t[b : b + 1, :length] if spec[name] == "docs" else t[:length])
        for name, t in inputs.items()
    }


def dense(src, params, q, k, v, inputs, routed):
    """The float64 softmax over the pattern's mask (after the KV cache: the last n rows), GQA by repeat.
    q ``[1, Hq, n, D]``, k, v ``[1, Hkv, L, D]``; returns (out, lse)."""
    q, k, v = (t.double() for t in (q, k, v))
    n, length = q.shape[2], k.shape[2]
    vectors = {"q": q, "k": k} if routed else {}
    mask = materialize_mask(
        src, n=n, nk=length, heads=HQ, inputs=inputs or None, **vectors, **params
    )
    mask = mask.reshape(1, HQ, n, length)
    k, v = (t.repeat_interleave(HQ // HKV, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v, lse


def _check_rows(
    attn, src, params, spec, routed, *, n, lengths, page_size, dtype, tol, layout="bhnd"
):
    k_cache, v_cache, table, seqlens, rows = paged_cache(lengths, page_size, dtype=dtype)
    q = torch.randn(len(lengths), HQ, n, D, generator=_gen(3), dtype=dtype)
    inputs = _inputs(spec, len(lengths), table.shape[1] * page_size)
    q_call = q if layout == "bhnd" else q.transpose(1, 2)
    out, lse = attn(
        q_call,
        k_cache,
        v_cache,
        block_table=table,
        cache_seqlens=seqlens,
        return_lse=True,
        layout=layout,
        **inputs,
    )
    if layout == "bnhd":
        assert out.shape == (len(lengths), n, HQ, D) and lse.shape == (len(lengths), n, HQ)
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    assert out.shape == (len(lengths), HQ, n, D) and out.dtype == dtype
    for b, (length, (k_b, v_b)) in enumerate(zip(lengths, rows, strict=True)):
        row_inputs = _row_inputs(spec, inputs, b, length)
        alone, alone_lse = attn(
            q[b : b + 1], k_b, v_b, return_lse=True, layout="bhnd", **row_inputs
        )
        torch.testing.assert_close(out[b : b + 1], alone, rtol=tol, atol=tol)
        torch.testing.assert_close(lse[b : b + 1], alone_lse, rtol=tol, atol=tol)
        want, want_lse = dense(src, params, q[b : b + 1], k_b, v_b, row_inputs, routed)
        torch.testing.assert_close(out[b : b + 1].double(), want, rtol=tol, atol=tol)
        torch.testing.assert_close(lse[b : b + 1].double(), want_lse, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["cpu", "reference", "flex"])
@pytest.mark.parametrize("label,src,params,spec,routed", CASES, ids=[c[0] for c in CASES])
def test_rows_equal_the_contiguous_call_and_the_dense_mask(
    label, src, params, spec, routed, backend
):
    attn = compile_attention(src, backend=backend, **params)
    # rows of different lengths (two of one length: one batched group), a decode and a chunk
    for n, page_size in ((1, 4), (3, 16)):
        _check_rows(
            attn,
            src,
            params,
            spec,
            routed,
            n=n,
            lengths=(9, 23, 9, 3 if n == 1 else 17),
            page_size=page_size,
            dtype=torch.float64,
            tol=1e-10,
        )


@pytest.mark.parametrize("backend", ["cpu", "auto"])
def test_bnhd_layout_and_the_auto_backend(backend):
    attn = compile_attention("stdlib:streaming", backend=backend, layout="bnhd", window=5, sinks=2)
    _check_rows(
        attn,
        "stdlib:streaming",
        {"window": 5, "sinks": 2},
        {},
        False,
        n=2,
        lengths=(6, 14, 11),
        page_size=4,
        dtype=torch.float64,
        tol=1e-10,
        layout="bnhd",
    )


@pytest.mark.parametrize(
    "label,src,params,spec,routed", [CASES[0], CASES[3]], ids=["sliding_window", "document"]
)
def test_triton_float32_under_the_interpreter(label, src, params, spec, routed):
    """The Triton kernels (the interpreter on CPU tensors), float32: few, small rows."""
    pytest.importorskip("triton")
    attn = compile_attention(src, backend="triton", **params)
    _check_rows(
        attn,
        src,
        params,
        spec,
        routed,
        n=2,
        lengths=(5, 12, 5),
        page_size=4,
        dtype=torch.float32,
        tol=2e-5,
    )


def test_gates_over_the_whole_sequence_and_a_value_dim_of_its_own():
    """FoX forget gates ``[heads, n]`` (unbatched, at absolute positions, shared by the rows; ``[n, heads]``
    under bnhd) and Dv != D: each row equals its contiguous call; no dense mask covers the decay, the
    reference backend is the float64 ground truth."""
    lengths, page_size, n, dv = (7, 18, 12), 4, 2, 5
    k_cache, v_cache, table, seqlens, rows = paged_cache(lengths, page_size, dv=dv)
    q = torch.randn(len(lengths), HQ, n, D, generator=_gen(4), dtype=torch.float64)
    g = torch.nn.functional.logsigmoid(
        torch.randn(HQ, table.shape[1] * page_size, generator=_gen(5), dtype=torch.float64)
    )
    ref = compile_attention("stdlib:forgetting", backend="reference")
    for layout in ("bhnd", "bnhd"):
        attn = compile_attention("stdlib:forgetting", backend="cpu", layout=layout)
        qq, gg = (q, g) if layout == "bhnd" else (q.transpose(1, 2), g.T)
        out = attn(qq, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, g=gg)
        out = out if layout == "bhnd" else out.transpose(1, 2)
        assert out.shape == (len(lengths), HQ, n, dv)
        for b, (length, (k_b, v_b)) in enumerate(zip(lengths, rows, strict=True)):
            want = ref(q[b : b + 1], k_b, v_b, g=g[:, :length])
            torch.testing.assert_close(out[b : b + 1], want, rtol=1e-10, atol=1e-12)


def test_whole_rows_of_queries_and_an_empty_batch():
    """cache_seqlens == n (no earlier keys: the ordinary call) and a batch of 0 rows (q [B, 4, 6, D] reads
    both ways beside 2 K/V heads: the layout is named)."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", layout="bhnd", window=4)
    k_cache, v_cache, table, seqlens, rows = paged_cache((6, 6), 4)
    q = torch.randn(2, HQ, 6, D, generator=_gen(6), dtype=torch.float64)
    out = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens)
    torch.testing.assert_close(
        out,
        attn(q, torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])),
        rtol=1e-12,
        atol=1e-12,
    )
    out, lse = attn(
        q[:0], k_cache, v_cache, block_table=table[:0], cache_seqlens=seqlens[:0], return_lse=True
    )
    assert out.shape == (0, HQ, 6, D) and lse.shape == (0, HQ, 6)


def test_torch_compile_runs_the_paged_call_eagerly():
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=5)
    k_cache, v_cache, table, seqlens, _ = paged_cache((9, 14), 4)
    q = torch.randn(2, HQ, 1, D, generator=_gen(8), dtype=torch.float64)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(
            lambda *a: attn(a[0], a[1], a[2], block_table=a[3], cache_seqlens=a[4]), backend="eager"
        )
        got = compiled(q, k_cache, v_cache, table, seqlens)
    finally:
        torch._dynamo.reset()
    want = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _error(attn, q, k, v, **kw) -> SpecError:
    with pytest.raises(SpecError) as info:
        attn(q, k, v, **kw)
    return info.value


def test_refusals_of_the_routes_are_the_contiguous_calls():
    """A route that needs the cached queries (xattention): the paged call gives the contiguous call's
    error, on every backend."""
    k_cache, v_cache, table, seqlens, rows = paged_cache((9, 9), 4)
    q = torch.randn(2, HQ, 2, D, generator=_gen(9), dtype=torch.float64)
    k_b, v_b = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
    for attn in (
        compile_attention(
            "stdlib:xattention", backend="reference", layout="bhnd", block=4, stride=2
        ),
        compile_attention("stdlib:xattention", backend="flex", layout="bhnd", block=4, stride=2),
    ):
        paged = _error(attn, q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens)
        plain = _error(attn, q, k_b, v_b)
        assert (paged.message, paged.where) == (plain.message, plain.where)
        assert "KV cache" in paged.message and paged.where == "argument k"


def _bad_calls():
    """(label, what to change, argument named, message part) for one valid paged call."""
    return [
        (
            "page id past the pool",
            lambda a: a["block_table"].__setitem__((1, 2), 99),
            "block_table",
            r"= 99",
        ),
        (
            "negative page id",
            lambda a: a["block_table"].__setitem__((0, 1), -2),
            "block_table",
            r"\[0, 1\] = -2",
        ),
        (
            "length past the table",
            lambda a: a["cache_seqlens"].__setitem__(0, 25),
            "cache_seqlens",
            "at most 24",
        ),
        (
            "length below n",
            lambda a: a["cache_seqlens"].__setitem__(1, 2),
            "cache_seqlens",
            "last keys",
        ),
        (
            "int64 table",
            lambda a: a.update(block_table=a["block_table"].long()),
            "block_table",
            "int32",
        ),
        (
            "int64 lengths",
            lambda a: a.update(cache_seqlens=a["cache_seqlens"].long()),
            "cache_seqlens",
            "int32",
        ),
        (
            "table on meta",
            lambda a: a.update(block_table=a["block_table"].to("meta")),
            "block_table",
            "meta",
        ),
        (
            "lengths on meta",
            lambda a: a.update(cache_seqlens=a["cache_seqlens"].to("meta")),
            "cache_seqlens",
            "meta",
        ),
        (
            "table batch",
            lambda a: a.update(block_table=a["block_table"][:1]),
            "block_table",
            r"B = 2",
        ),
        (
            "lengths shape",
            lambda a: a.update(cache_seqlens=a["cache_seqlens"][:1]),
            "cache_seqlens",
            r"\[B\]",
        ),
        (
            "table without lengths",
            lambda a: a.update(cache_seqlens=None),
            "cache_seqlens",
            "without",
        ),
        ("lengths without table", lambda a: a.update(block_table=None), "block_table", "without"),
        (
            "with cu_seqlens",
            lambda a: a.update(cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
            "cu_seqlens",
            "one or the other",
        ),
        (
            "q requires grad",
            lambda a: a.update(q=a["q"].clone().requires_grad_()),
            "q",
            "forward only",
        ),
        (
            "k requires grad",
            lambda a: a.update(k=a["k"].clone().requires_grad_()),
            "k",
            "forward only",
        ),
        ("k dtype", lambda a: a.update(k=a["k"].float()), "k", "must agree"),
        ("k head dim", lambda a: a.update(k=a["k"][..., :4]), "k", "head dim"),
        ("v pages", lambda a: a.update(v=a["v"][:3]), "v", "pages"),
        ("k contiguous layout", lambda a: a.update(k=a["k"][0]), "k", "num_pages, page_size"),
        ("GQA heads", lambda a: a.update(q=a["q"][:, :3]), "q", "multiple"),  # q's heads are at fault (it named k)
    ]


@pytest.mark.parametrize("label,change,name,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_arguments_are_named(label, change, name, match):
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=4)
    k_cache, v_cache, table, seqlens, _ = paged_cache((9, 20), 4)  # 6 pages a row at most: 24 keys
    args = {
        "q": torch.randn(2, HQ, 3, D, generator=_gen(10), dtype=torch.float64),
        "k": k_cache,
        "v": v_cache,
        "block_table": table.clone(),
        "cache_seqlens": seqlens.clone(),
    }
    change(args)
    err = _error(attn, args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert err.where == f"argument {name}", (err.where, err.message)
    assert re.search(match, err.message), err.message


def test_unreached_page_ids_are_never_read():
    """Entries of the block table past a row's length may hold anything (vLLM pads with -1)."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=4)
    k_cache, v_cache, table, seqlens, _ = paged_cache((5, 8), 4)
    q = torch.randn(2, HQ, 1, D, generator=_gen(11), dtype=torch.float64)
    want = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens)
    table[0, 2:] = 10**6
    table[1, 2:] = -(10**6)
    torch.testing.assert_close(
        attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens), want, rtol=0, atol=0
    )


def test_inputs_too_short_or_of_another_batch_are_named():
    attn = compile_attention("stdlib:document", backend="cpu")
    k_cache, v_cache, table, seqlens, _ = paged_cache((9, 14), 4)
    q = torch.randn(2, HQ, 1, D, generator=_gen(12), dtype=torch.float64)
    for doc, match in (
        (torch.zeros(2, 13, dtype=torch.int64), "max\\(cache_seqlens\\) = 14"),
        (torch.zeros(3, 16, dtype=torch.int64), "batch 3"),
    ):
        err = _error(attn, q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, doc=doc)
        assert err.where == "argument doc" and re.search(match, err.message), err.message


def test_recurrences_and_grids_are_refused():
    k_cache, v_cache, table, seqlens, _ = paged_cache((4, 4), 4)
    q = torch.randn(2, HQ, 1, D, dtype=torch.float64)
    for attn, match in (
        (compile_attention("stdlib:mamba2", backend="cpu"), "recurrence"),
        (
            attnc.compile_attention(
                "stdlib:neighborhood_2d", backend="cpu", kernel_size_y=3, kernel_size_x=3
            ),
            "grid",
        ),
    ):
        err = _error(attn, q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens)
        assert err.where == "argument block_table" and match in err.message, err.message


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_nsa_rows_equal_their_contiguous_decode(backend):
    """The combined pattern (compressed, selected and window branches) over paged rows of three lengths: each
    row equals its own call with a contiguous KV cache on the reference (float64); gates of the present
    queries ``[B, heads, n]``."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    lengths, n = (13, 29, 13), 2
    k_cache, v_cache, table, seqlens, rows = paged_cache(lengths, 4, dtype=dtype, seed=3)
    g = _gen(4)
    q = torch.randn(len(lengths), HQ, n, D, generator=g, dtype=dtype)
    gates = {
        name: torch.rand(len(lengths), HQ, n, generator=g, dtype=dtype)
        for name in ("g_cmp", "g_slc", "g_swa")
    }
    kw = {"block": 4, "selected": 3, "window": 5}
    attn = compile_attention(
        "stdlib:nsa", backend=backend, q_tile=16, kv_tile=16, layout="bhnd", **kw
    )
    ref = compile_attention("stdlib:nsa", backend="reference", **kw)
    with torch.no_grad():
        got = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, **gates)
        for b, (k_b, v_b) in enumerate(rows):
            want = ref(
                q[b : b + 1].double(),
                k_b.double(),
                v_b.double(),
                **{name: t[b : b + 1].double() for name, t in gates.items()},
            )
            tol = (
                {"rtol": 2e-5, "atol": 2e-5}
                if dtype == torch.float32
                else {"rtol": 1e-12, "atol": 1e-12}
            )
            torch.testing.assert_close(got[b : b + 1], want.to(dtype), **tol)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_appends_that_would_overwrite_each_other_are_refused_before_anything_is_written(backend):
    # two rows sharing a page and both appending into its slot 1; then k and v given as one pool: each was accepted,
    # and a row attended the other row's token (or the new key was its value)
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(8, 4, 2, 8, generator=g), torch.randn(8, 4, 2, 8, generator=g)
    table = torch.tensor([[0, 3, -1, -1], [1, 3, -1, -1]], dtype=torch.int32)
    before = torch.tensor([5, 5], dtype=torch.int32)
    q, kn, vn = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8,
                                                                                                     generator=g)
    attn = compile_attention("stdlib:sliding_window", window=8, backend=backend)
    k_pool, v_pool = kc.clone(), vc.clone()
    with pytest.raises(SpecError, match="both write a new key into slot 1 of page 3") as err:
        attn(q, k_pool, v_pool, k=kn, v=vn, block_table=table, cache_seqlens=before)
    assert err.value.where == "argument block_table"
    assert torch.equal(k_pool, kc) and torch.equal(v_pool, vc)  # nothing written
    own = torch.tensor([[0, 3, -1, -1], [1, 2, -1, -1]], dtype=torch.int32)
    with pytest.raises(SpecError, match="k and v are one pool") as err:
        attn(q, k_pool, k_pool, k=kn, v=vn, block_table=own, cache_seqlens=before)
    assert err.value.where == "argument v" and torch.equal(k_pool, kc)
    # a negative length of a row that appends: named (on triton the slots it would write were gathered at a
    # negative page index first, a raw torch error)
    with pytest.raises(SpecError, match=r"cache_seqlens\[1\] = -3 is outside .*a key count is not negative") as err:
        attn(q, k_pool, v_pool, k=kn, v=vn, block_table=own, cache_seqlens=torch.tensor([5, -3], dtype=torch.int32))
    assert err.value.where == "argument cache_seqlens" and torch.equal(k_pool, kc) and torch.equal(v_pool, vc)
    # pages of their own: taken
    out = attn(q, k_pool, v_pool, k=kn, v=vn, block_table=own, cache_seqlens=before)
    assert torch.isfinite(out).all() and torch.equal(k_pool[3, 1], kn[0, :, 0]) and torch.equal(k_pool[2, 1], kn[1, :, 0])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_an_append_into_a_key_another_row_attends_is_refused_and_a_shared_prefix_is_not(backend):
    """A radix cache's rows share prefix pages. Row 0 (6 keys on pages 0, 1) appends into slot 2 of page 1, which row
    1 (10 keys on pages 0, 1, 2) attends as its key 6: it was accepted, and row 1 attended row 0's new token in that
    same call. Refused by name with nothing written. Rows sharing only full prefix pages, each appending on a page of
    its own, and a row of no query whose keys lie on the written page, are taken; each row equals the float64
    reference over its keys."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    g = torch.Generator().manual_seed(3)
    kc, vc = (torch.randn(5, 4, HKV, D, generator=g, dtype=dtype) for _ in range(2))
    attn = compile_attention("stdlib:sliding_window", window=64, backend=backend, layout="bhnd")
    q, kn, vn = (torch.randn(2, h, 1, D, generator=g, dtype=dtype) for h in (HQ, HKV, HKV))
    shared = torch.tensor([[0, 1, -1], [0, 1, 2]], dtype=torch.int32)
    before = torch.tensor([6, 10], dtype=torch.int32)
    k_pool, v_pool = kc.clone(), vc.clone()
    with pytest.raises(SpecError, match="row 0 writes a new key into slot 2 of page 1, which row 1 attends as its "
                                        "key 6") as err:
        attn(q, k_pool, v_pool, k=kn, v=vn, block_table=shared, cache_seqlens=before)
    assert err.value.where == "argument block_table"
    assert torch.equal(k_pool, kc) and torch.equal(v_pool, vc)  # nothing written
    # the prefix page 0 shared, each row's last page its own; a third row of no query reads page 1 (packed rows)
    table = torch.tensor([[0, 1, -1], [0, 3, -1], [0, 1, -1]], dtype=torch.int32)
    seqlens = torch.tensor([6, 6, 7], dtype=torch.int32)
    cu = torch.tensor([0, 1, 2, 2], dtype=torch.int32)
    qp, knp, vnp = (t.transpose(0, 2).reshape(1, t.shape[1], 2, D) for t in (q, kn, vn))
    out = attn(qp, k_pool, v_pool, k=knp, v=vnp, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu)
    assert torch.equal(k_pool[1, 2], kn[0, :, 0]) and torch.equal(k_pool[3, 2], kn[1, :, 0])
    ref = compile_attention("stdlib:sliding_window", window=64, backend="reference")
    for b in range(2):
        ids = table[b, :2].long()
        k_b = k_pool[ids].flatten(0, 1)[:7].transpose(0, 1).unsqueeze(0).double()
        v_b = v_pool[ids].flatten(0, 1)[:7].transpose(0, 1).unsqueeze(0).double()
        want = ref(q[b : b + 1].double(), k_b, v_b)
        torch.testing.assert_close(out[:, :, b : b + 1].double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto", "triton"])
def test_a_batch_padded_with_rows_of_no_query_and_no_key_equals_its_rows(backend):
    # vLLM pads a captured decode batch with rows of length 0 (their queries none, their table rows its null page
    # 0 or -1): refused ("every row holds a key"); a row of queries still needs its keys
    dtype = torch.float32 if backend == "triton" else torch.float64
    attn = compile_attention("stdlib:sliding_window", backend=backend, window=6)
    k_cache, v_cache, table, seqlens, rows = paged_cache((9, 14, 0, 0), 4, dtype=dtype)
    table[2] = 0
    cu = torch.tensor([0, 1, 3, 3, 3], dtype=torch.int32)
    q = torch.randn(1, HQ, 5, D, generator=_gen(21), dtype=dtype)  # two padding tokens past the rows'
    out = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu)
    ref = compile_attention("stdlib:sliding_window", backend="reference", window=6)
    for b, (lo, hi) in enumerate(((0, 1), (1, 3))):
        k_b, v_b = rows[b]
        want = ref(q[:, :, lo:hi].double(), k_b.double(), v_b.double())
        torch.testing.assert_close(out[:, :, lo:hi].double(), want, rtol=2e-5, atol=2e-5)
    with pytest.raises(SpecError, match=r"cache_seqlens\[2\] = 0 is outside \[1, ") as err:
        attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens,
             cu_seqlens_q=torch.tensor([0, 1, 3, 4, 4], dtype=torch.int32))
    assert err.value.where == "argument cache_seqlens"
