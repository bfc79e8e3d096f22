"""Paged calls in flash-attn's conventions (``flash_attn_with_kvcache``): q ``[B, n, H, D]`` beside
token-major pools (right when the layout is named, refused by name when q's shape reads two ways and no
layout is), ``k=``/``v=`` appended into the pages in place before attending, an int ``cache_seqlens``.
References are built by hand: each row's keys gathered slot by slot from the pool into a contiguous
float64 tensor, the new tokens written into a copy of the pool token by token, and a dense softmax over a
mask made by a loop over query and key positions."""

import re

import pytest
import torch

from attnc.core.errors import SpecError
from attnc.runtime.api import compile_attention

D, DV = 8, 5
WINDOW = 6


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def pool(reach, page_size, hkv, *, seed=0, spare=3, dtype=torch.float64, dv=DV):
    """Shuffled pages of a pool with spare pages: ``reach[b]`` pages for row b, the table padded with -1
    (and one spare column). Returns (k_cache, v_cache, block_table)."""
    g = _gen(seed)
    num_pages = sum(reach) + spare
    k_cache = torch.randn(num_pages, page_size, hkv, D, generator=g, dtype=dtype)
    v_cache = torch.randn(num_pages, page_size, hkv, dv, generator=g, dtype=dtype)
    order = torch.randperm(num_pages, generator=g)
    table = torch.full((len(reach), max(reach) + 1), -1, dtype=torch.int32)
    used = 0
    for b, count in enumerate(reach):
        table[b, :count] = order[used : used + count].to(torch.int32)
        used += count
    return k_cache, v_cache, table


def row_keys(cache, table, b, length):
    """Row b's first ``length`` keys ``[H, length, D]``, slot by slot."""
    page_size = cache.shape[1]
    rows = [cache[int(table[b, j // page_size]), j % page_size] for j in range(length)]
    return torch.stack(rows, 1) if rows else cache.new_zeros(cache.shape[2], 0, cache.shape[3])


def reference(q_row, k_row, v_row, window):
    """q ``[Hq, n, D]``, k ``[Hkv, L, D]``, v ``[Hkv, L, Dv]``: the queries are the row's last n keys;
    query i (position L - n + i) attends key j iff j <= it and it - j < window. float64, GQA by
    repeat; returns ``[Hq, n, Dv]``."""
    hq, n, _ = q_row.shape
    hkv, length, _ = k_row.shape
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i in range(n):
        pos = length - n + i
        for j in range(length):
            mask[i, j] = j <= pos and pos - j < window
    k, v = (t.double().repeat_interleave(hq // hkv, 0) for t in (k_row, v_row))
    scores = (q_row.double() @ k.transpose(-1, -2)) / D**0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v


def _error(call) -> SpecError:
    with pytest.raises(SpecError) as info:
        call()
    return info.value


# ----------------------------------------------------------------------- q's layout beside the pools


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("hkv", [1, 2], ids=["mqa", "gqa"])
def test_flash_decode_q_is_read_token_major_when_named(backend, hkv):
    """flash_attn_with_kvcache's decode, q ``[B, 1, H, D]``: with layout="bnhd" (per call, or at compile
    time) every row equals the hand-built reference, out ``[B, 1, H, Dv]``."""
    hq, lengths, page_size = 4, (9, 3, 14), 4
    k_cache, v_cache, table = pool([-(-x // page_size) for x in lengths], page_size, hkv)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(len(lengths), 1, hq, D, generator=_gen(1), dtype=torch.float64)
    per_call = compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW)
    compiled = compile_attention(
        "stdlib:sliding_window", backend=backend, layout="bnhd", window=WINDOW
    )
    for out in (
        per_call(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, layout="bnhd"),
        compiled(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens),
    ):
        assert out.shape == (len(lengths), 1, hq, DV)
        for b, length in enumerate(lengths):
            want = reference(
                q[b].transpose(0, 1),
                row_keys(k_cache, table, b, length),
                row_keys(v_cache, table, b, length),
                WINDOW,
            )
            torch.testing.assert_close(out[b].transpose(0, 1), want, rtol=1e-12, atol=1e-12)


def test_mqa_flash_q_without_a_layout_is_refused_not_misread():
    """One K/V head: q ``[B, 1, H, D]`` also reads as one head of H queries; with no layout named the
    call is refused, naming layout=, and nothing is read."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    k_cache, v_cache, table = pool([3, 4], 4, 1)
    seqlens = torch.tensor([10, 13], dtype=torch.int32)
    q = torch.randn(2, 1, 4, D, generator=_gen(2), dtype=torch.float64)
    err = _error(lambda: attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens))
    assert err.where == "argument layout", (err.where, err.message)
    assert 'layout="bnhd"' in err.message and "reads two ways" in err.message, err.message


def test_gqa_flash_q_without_a_layout_names_the_layout():
    """Two K/V heads: q ``[B, 1, 4, D]`` does not fit ``[B, H, n, D]`` (1 head) but fits flash-attn's
    order: the refusal says so and names layout="bnhd", not only GQA divisibility; a call that names
    "bhnd" for it is refused the same way."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    k_cache, v_cache, table = pool([3, 4], 4, 2)
    seqlens = torch.tensor([10, 13], dtype=torch.int32)
    q = torch.randn(2, 1, 4, D, generator=_gen(3), dtype=torch.float64)
    for kw in ({}, {"layout": "bhnd"}):
        err = _error(
            lambda kw=kw: attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, **kw)
        )
        assert err.where == "argument layout", (err.where, err.message)
        assert 'layout="bnhd"' in err.message and "multiple" in err.message, err.message
    # the other way round: [B, H, n, D] under layout="bnhd" (1 head of 4 queries beside 2 K/V heads)
    err = _error(
        lambda: attn(
            q.transpose(1, 2),
            k_cache,
            v_cache,
            block_table=table,
            cache_seqlens=seqlens,
            layout="bnhd",
        )
    )
    assert err.where == "argument layout" and 'layout="bhnd"' in err.message, err.message


@pytest.mark.parametrize(
    "shape,hkv",
    [((2, 4, 4, D), 1), ((2, 2, 4, D), 2), ((2, 4, 2, D), 2), ((2, 3, 5, D), 1)],
    ids=["square-mqa", "gqa-2x4", "gqa-4x2", "mqa-3x5"],
)
def test_ambiguous_shapes_are_refused_until_a_layout_is_named(shape, hkv):
    """Both middle dimensions multiples of Hkv: refused with no layout named; right in each named
    layout (per call), the reading the name gives."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    lengths, page_size = (11, 16), 4
    k_cache, v_cache, table = pool([-(-x // page_size) for x in lengths], page_size, hkv)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    q = torch.randn(*shape, generator=_gen(4), dtype=torch.float64)
    err = _error(lambda: attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens))
    assert err.where == "argument layout" and "layout=" in err.message, err.message
    for layout in ("bhnd", "bnhd"):
        out = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens, layout=layout)
        q_bhnd = q if layout == "bhnd" else q.transpose(1, 2)
        out = out if layout == "bhnd" else out.transpose(1, 2)
        for b, length in enumerate(lengths):
            want = reference(
                q_bhnd[b],
                row_keys(k_cache, table, b, length),
                row_keys(v_cache, table, b, length),
                WINDOW,
            )
            torch.testing.assert_close(out[b], want, rtol=1e-12, atol=1e-12)


def test_shapes_with_one_reading_run_without_a_layout():
    """q ``[B, H, 1, D]`` beside 2 K/V heads (only ``[B, H, n, D]`` fits) and q ``[B, 1, 1, D]`` beside
    one (both readings the same) run in the default layout, as before."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    for shape, hkv in (((2, 4, 1, D), 2), ((2, 1, 1, D), 1)):
        k_cache, v_cache, table = pool([3, 2], 4, hkv, seed=5)
        lengths = (12, 7)
        seqlens = torch.tensor(lengths, dtype=torch.int32)
        q = torch.randn(*shape, generator=_gen(5), dtype=torch.float64)
        out = attn(q, k_cache, v_cache, block_table=table, cache_seqlens=seqlens)
        for b, length in enumerate(lengths):
            want = reference(
                q[b],
                row_keys(k_cache, table, b, length),
                row_keys(v_cache, table, b, length),
                WINDOW,
            )
            torch.testing.assert_close(out[b], want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------- k=, v=: appended, then attended


def appended_pool(cache, table, seqlens, new):
    """The pool after writing ``new`` ``[B, H, n_new, D]`` token by token (a copy)."""
    out = cache.clone()
    page_size = cache.shape[1]
    for b in range(new.shape[0]):
        for t in range(new.shape[2]):
            pos = int(seqlens[b]) + t
            out[int(table[b, pos // page_size]), pos % page_size] = new[b, :, t]
    return out


@pytest.mark.parametrize("backend", ["cpu", "reference", "flex"])
@pytest.mark.parametrize("layout", ["bnhd", "bhnd"])
def test_append_then_attend(backend, layout):
    """GQA (4 query heads, 2 K/V heads), shuffled pages of 4, rows of 5, 0 and 11 cached keys and 3 new
    ones each (a row's writes cross a page boundary, a row starts empty): the pools hold the new tokens
    afterwards and nothing else changed; each row equals the reference over its old keys then its new
    ones, the queries at the new positions (the window sees the new keys up to each query)."""
    hq, hkv, n, page_size = 4, 2, 3, 4
    before = (5, 0, 11)
    reach = [-(-(x + n) // page_size) for x in before]
    k_cache, v_cache, table = pool(reach, page_size, hkv, seed=6)
    g = _gen(7)
    q = torch.randn(len(before), hq, n, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(len(before), hkv, n, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(len(before), hkv, n, DV, generator=g, dtype=torch.float64)
    seqlens = torch.tensor(before, dtype=torch.int32)
    k_want = appended_pool(k_cache, table, seqlens, k_new)
    v_want = appended_pool(v_cache, table, seqlens, v_new)
    k_ptr, v_ptr = k_cache.data_ptr(), v_cache.data_ptr()

    attn = compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW)
    flash = layout == "bnhd"
    out, lse = attn(
        q.transpose(1, 2) if flash else q,
        k_cache,
        v_cache,
        k=k_new.transpose(1, 2) if flash else k_new,
        v=v_new.transpose(1, 2) if flash else v_new,
        block_table=table,
        cache_seqlens=seqlens,
        layout=layout,
        return_lse=True,
    )
    assert (k_cache.data_ptr(), v_cache.data_ptr()) == (k_ptr, v_ptr)
    torch.testing.assert_close(k_cache, k_want, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, v_want, rtol=0, atol=0)
    assert torch.equal(seqlens, torch.tensor(before, dtype=torch.int32))  # the caller's, untouched
    if flash:
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    assert out.shape == (len(before), hq, n, DV) and lse.shape == (len(before), hq, n)
    for b, cached in enumerate(before):
        k_row = torch.cat([row_keys(k_want, table, b, cached), k_new[b]], 1)
        v_row = torch.cat([row_keys(v_want, table, b, cached), v_new[b]], 1)
        torch.testing.assert_close(
            out[b], reference(q[b], k_row, v_row, WINDOW), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_packed_rows_append_one_entry_per_table_row(backend):
    """Packed queries (``cu_seqlens_q``: q is one entry) with ``k=``/``v=``: the new tokens are one entry per row
    of the block table (``[rows, n_new, Hkv, D]``), written at each row's own slots; a batch of q's size (1),
    which was broadcast into every row, is refused by name with nothing written. Rows of 1, 2 and 0 queries,
    each row equal to the reference over its old keys then its new ones, its queries the last positions."""
    hq, hkv, page_size, n_new = 4, 2, 4, 2
    before, counts = (5, 9, 3), (1, 2, 0)
    reach = [-(-(x + n_new) // page_size) for x in before]
    k_cache, v_cache, table = pool(reach, page_size, hkv, seed=16, dtype=torch.float32)
    g = _gen(17)
    q = torch.randn(1, sum(counts), hq, D, generator=g)
    k_new = torch.randn(len(before), n_new, hkv, D, generator=g)
    v_new = torch.randn(len(before), n_new, hkv, DV, generator=g)
    seqlens = torch.tensor(before, dtype=torch.int32)
    cu = torch.tensor([0, 1, 3, 3], dtype=torch.int32)
    attn = compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW, layout="bnhd")
    call = dict(block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=2)
    untouched = (k_cache.clone(), v_cache.clone())
    err = _error(lambda: attn(q, k_cache, v_cache, k=k_new[:1], v=v_new[:1], **call))
    assert err.where == "argument k" and "block table's rows" in err.message, err.message
    torch.testing.assert_close((k_cache, v_cache), untouched, rtol=0, atol=0)

    k_want = appended_pool(k_cache, table, seqlens, k_new.transpose(1, 2))
    v_want = appended_pool(v_cache, table, seqlens, v_new.transpose(1, 2))
    out = attn(q, k_cache, v_cache, k=k_new, v=v_new, **call)
    torch.testing.assert_close((k_cache, v_cache), (k_want, v_want), rtol=0, atol=0)
    for b, cached in enumerate(before):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if lo == hi:
            continue
        k_row = torch.cat([row_keys(k_want, table, b, cached), k_new[b].transpose(0, 1)], 1)
        v_row = torch.cat([row_keys(v_want, table, b, cached), v_new[b].transpose(0, 1)], 1)
        want = reference(q[0, lo:hi].transpose(0, 1), k_row, v_row, WINDOW)
        torch.testing.assert_close(out[0, lo:hi].transpose(0, 1).double(), want, rtol=2e-5, atol=2e-5)


def packed_appended_pool(cache, table, seqlens, cu, new):
    """The pool after writing ``new`` ``[total, H, D]`` packed by ``cu`` token by token: row b's tokens
    ``cu[b] .. cu[b + 1] - 1`` at its keys ``seqlens[b]`` on; tokens past ``cu[-1]`` belong to no row (a copy)."""
    out = cache.clone()
    page_size = cache.shape[1]
    for b in range(len(cu) - 1):
        for t in range(int(cu[b]), int(cu[b + 1])):
            pos = int(seqlens[b]) + t - int(cu[b])
            out[int(table[b, pos // page_size]), pos % page_size] = new[t]
    return out


@pytest.mark.parametrize("backend", ["reference", "cpu", "auto", "triton"])
def test_packed_rows_append_their_own_counts(backend, monkeypatch):
    """A serving batch of chunked-prefill rows beside decode rows appends each row's own count in the call that
    attends: with ``cu_seqlens_q``, ``k=``/``v=`` packed as q (one new token per query). Rows of 1, 4 and 3 queries
    (one starting empty, writes crossing pages), a row of cached keys and no query, a padding row of no key on
    -1 pages, and two padding tokens past the rows': the pools hold each row's tokens at its own slots and nothing
    else changed; each row equals the float64 reference over its old keys then its new ones. On Triton the
    batch is one paged launch."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    hq, hkv, page_size = 4, 2, 4
    before, counts = (5, 9, 0, 3, 0), (1, 4, 3, 0, 0)
    reach = [-(-(x + c) // page_size) for x, c in zip(before, counts, strict=True)]
    k_cache, v_cache, table = pool(reach, page_size, hkv, seed=26, dtype=dtype)
    cu = torch.tensor([0, 1, 5, 8, 8, 8], dtype=torch.int32)
    total = 10  # two padding tokens past cu[-1], as a loop padded to a captured size sends them
    g = _gen(27)
    q = torch.randn(1, total, hq, D, generator=g, dtype=dtype)
    k_new = torch.randn(1, total, hkv, D, generator=g, dtype=dtype)
    v_new = torch.randn(1, total, hkv, DV, generator=g, dtype=dtype)
    seqlens = torch.tensor(before, dtype=torch.int32)
    k_want = packed_appended_pool(k_cache, table, seqlens, cu, k_new[0])
    v_want = packed_appended_pool(v_cache, table, seqlens, cu, v_new[0])
    attn = compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW, layout="bnhd")
    call = dict(block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=4)
    from attnc.runtime.backends.triton import kernel_launch

    launched, real = [], kernel_launch.launch_kernel
    monkeypatch.setattr(kernel_launch, "launch_kernel",
                        lambda launch, kernel, *a, **kw: launched.append(kernel.__name__) or real(launch, kernel, *a, **kw))
    out = attn(q, k_cache, v_cache, k=k_new, v=v_new, **call)
    torch.testing.assert_close((k_cache, v_cache), (k_want, v_want), rtol=0, atol=0)
    assert torch.equal(seqlens, torch.tensor(before, dtype=torch.int32))  # the caller's, untouched
    if backend == "triton":
        assert [n for n in launched if n != "attnc_fwd_combine"] == ["attnc_fwd_paged"], launched
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for b, cached in enumerate(before):
        lo, hi = int(cu[b]), int(cu[b + 1])
        if lo == hi:
            continue
        k_row = torch.cat([row_keys(k_want, table, b, cached), k_new[0, lo:hi].transpose(0, 1)], 1)
        v_row = torch.cat([row_keys(v_want, table, b, cached), v_new[0, lo:hi].transpose(0, 1)], 1)
        want = reference(q[0, lo:hi].transpose(0, 1), k_row, v_row, WINDOW)
        torch.testing.assert_close(out[0, lo:hi].transpose(0, 1).double(), want, **tol)
    assert torch.equal(out[0, 8:], torch.zeros_like(out[0, 8:]))  # the padding tokens' rows


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_packed_appends_that_collide_or_misfit_are_named_and_write_nothing(backend):
    """Packed appends checked before anything is written: two rows whose new tokens share a slot (row 0's second
    token and row 1's first, on one page) and new tokens of another count than q's packed rows are refused by name;
    the pools are untouched."""
    g = _gen(30)
    kc, vc = torch.randn(6, 4, 2, D, generator=g), torch.randn(6, 4, 2, DV, generator=g)
    table = torch.tensor([[0, 3, -1], [1, 3, -1]], dtype=torch.int32)
    seqlens = torch.tensor([4, 5], dtype=torch.int32)  # row 0 writes keys 4, 5 (page 3 slots 0, 1); row 1 key 5
    cu = torch.tensor([0, 2, 3], dtype=torch.int32)
    q = torch.randn(1, 3, 4, D, generator=g)
    kn, vn = torch.randn(1, 3, 2, D, generator=g), torch.randn(1, 3, 2, DV, generator=g)
    attn = compile_attention("stdlib:sliding_window", backend=backend, window=WINDOW, layout="bnhd")
    k_pool, v_pool = kc.clone(), vc.clone()
    call = dict(block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu)
    err = _error(lambda: attn(q, k_pool, v_pool, k=kn, v=vn, **call))
    assert err.where == "argument block_table" and "rows 0 and 1 both write a new key into slot 1 of page 3" in str(err)
    err = _error(lambda: attn(q, k_pool, v_pool, k=kn[:, :2], v=vn[:, :2], **call))
    assert err.where == "argument k" and "[1, 3, 2, 8] packed as q" in err.message, err.message
    torch.testing.assert_close((k_pool, v_pool), (kc, vc), rtol=0, atol=0)
    own = torch.tensor([[0, 3, -1], [1, 2, -1]], dtype=torch.int32)
    attn(q, k_pool, v_pool, k=kn, v=vn, block_table=own, cache_seqlens=seqlens, cu_seqlens_q=cu)
    assert torch.equal(k_pool[3, 0], kn[0, 0]) and torch.equal(k_pool[3, 1], kn[0, 1])
    assert torch.equal(k_pool[2, 1], kn[0, 2])


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_an_append_into_a_row_that_lists_a_page_twice_is_refused(backend):
    """A row whose table lists page 1 twice: its new key 2 lands on slot 0 of page 1, which is also its key 0. It was
    accepted and the row's own key overwritten; refused by name, nothing written."""
    g = _gen(40)
    kc, vc = torch.randn(3, 2, 1, D, generator=g), torch.randn(3, 2, 1, DV, generator=g)
    untouched = (kc.clone(), vc.clone())
    attn = compile_attention("stdlib:sliding_window", backend=backend, window=100, layout="bnhd")
    err = _error(lambda: attn(torch.randn(1, 1, 2, D, generator=g), kc, vc, k=torch.randn(1, 1, 1, D, generator=g),
                              v=torch.randn(1, 1, 1, DV, generator=g), block_table=torch.tensor([[1, 1, -1]],
                                                                                                 dtype=torch.int32),
                              cache_seqlens=torch.tensor([2], dtype=torch.int32)))
    assert err.where == "argument block_table" and "block_table[0, 1] = 1 lists a page row 0 reaches again" in str(err)
    torch.testing.assert_close((kc, vc), untouched, rtol=0, atol=0)


def test_an_int_cache_seqlens_is_every_rows():
    """flash-attn broadcasts an int cache_seqlens: the same as the int32 tensor of it, appending or not;
    a strided pool (a view into a wider buffer) is written in place, its neighbours untouched."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    hkv, page_size, cached = 2, 4, 6
    k_base, v_base, table = pool([3, 3], page_size, hkv, seed=8)
    g = _gen(9)
    q = torch.randn(2, 1, 4, D, generator=g, dtype=torch.float64)  # flash-attn's decode
    k_new = torch.randn(2, 1, hkv, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(2, 1, hkv, DV, generator=g, dtype=torch.float64)
    wide = torch.randn(*k_base.shape[:3], D + 3, generator=g, dtype=torch.float64)
    wide[..., :D] = k_base
    k_cache = wide[..., :D]  # not contiguous: the pool is a view
    results = []
    for lengths in (cached, torch.full((2,), cached, dtype=torch.int32)):
        kc, vc = k_cache.clone(), v_base.clone()
        kw = {"block_table": table, "cache_seqlens": lengths, "layout": "bnhd"}
        results.append(attn(q, kc, vc, k=k_new, v=v_new, **kw))
        results.append(attn(q, kc, vc, **{**kw, "cache_seqlens": lengths + 1}))
    for got in results[1:]:
        torch.testing.assert_close(got, results[0], rtol=0, atol=0)
    spare = wide[..., D:].clone()
    seqlens = torch.full((2,), cached, dtype=torch.int32)
    attn(
        q, k_cache, v_base, k=k_new, v=v_new, block_table=table, cache_seqlens=cached, layout="bnhd"
    )
    want = appended_pool(k_base, table, seqlens, k_new.transpose(1, 2))
    torch.testing.assert_close(wide[..., :D], want, rtol=0, atol=0)
    assert torch.equal(wide[..., D:], spare)
    for b in range(2):
        k_row = row_keys(want, table, b, cached + 1)
        v_row = row_keys(v_base, table, b, cached + 1)
        torch.testing.assert_close(
            results[0][b].transpose(0, 1),
            reference(q[b].transpose(0, 1), k_row, v_row, WINDOW),
            rtol=1e-12,
            atol=1e-12,
        )


def _append_call():
    """One valid appending call (flash layout): arguments by name."""
    hkv, page_size = 2, 4
    k_cache, v_cache, table = pool([2, 3], page_size, hkv, seed=10, spare=2)
    g = _gen(11)
    return {
        "q": torch.randn(2, 2, 4, D, generator=g, dtype=torch.float64),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "k": torch.randn(2, 2, hkv, D, generator=g, dtype=torch.float64),
        "v": torch.randn(2, 2, hkv, DV, generator=g, dtype=torch.float64),
        "block_table": table,
        "cache_seqlens": torch.tensor([5, 9], dtype=torch.int32),
        "layout": "bnhd",
    }


def _bad_appends():
    """(label, change, argument named, message part)."""

    def set_table(a, where, value):
        a["block_table"] = a["block_table"].clone()
        a["block_table"][where] = value

    return [
        ("k without v", lambda a: a.pop("v"), "v", "without v="),
        ("v without k", lambda a: a.pop("k"), "k", "without k="),
        (
            "write past the table",
            lambda a: a.update(cache_seqlens=a["cache_seqlens"] + 6),
            "cache_seqlens",
            "at most 16",
        ),
        (
            "write into a -1 page",
            lambda a: a.update(cache_seqlens=torch.tensor([7, 9], dtype=torch.int32)),
            "block_table",
            r"\[0, 2\] = -1 .*writes its 2 new keys",
        ),
        (
            "write into a page past the pool",
            lambda a: set_table(a, (1, 2), 99),
            "block_table",
            "= 99",
        ),
        (
            "negative length",
            lambda a: a.update(cache_seqlens=torch.tensor([-1, 9], dtype=torch.int32)),
            "cache_seqlens",
            "negative",
        ),
        ("negative int length", lambda a: a.update(cache_seqlens=-1), "cache_seqlens", "-1"),
        ("bool length", lambda a: a.update(cache_seqlens=True), "cache_seqlens", "int32"),
        ("k dtype", lambda a: a.update(k=a["k"].float()), "k", "must agree"),
        ("k heads", lambda a: a.update(k=a["k"][:, :, :1]), "k", r"\[2, n_new, 2, 8\]"),
        ("k batch", lambda a: a.update(k=a["k"][:1]), "k", "q's batch"),
        ("k rank", lambda a: a.update(k=a["k"][0]), "k", "n_new"),
        ("k not a tensor", lambda a: a.update(k=[1.0]), "k", "list"),
        ("v head dim", lambda a: a.update(v=a["v"][..., :3]), "v", "head dim"),
        ("v tokens", lambda a: a.update(v=a["v"][:, :1]), "v", "one value per key"),
        (
            "k requires grad",
            lambda a: a.update(k=a["k"].clone().requires_grad_()),
            "k",
            "forward only",
        ),
    ]


@pytest.mark.parametrize(
    "label,change,name,match", _bad_appends(), ids=[c[0] for c in _bad_appends()]
)
def test_bad_appends_are_named_and_write_nothing(label, change, name, match):
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    args = _append_call()
    caches = (args["k_cache"], args["v_cache"])
    before = tuple(c.clone() for c in caches)
    change(args)
    err = _error(lambda: attn(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), **args))
    assert err.where == f"argument {name}", (err.where, err.message)
    assert re.search(match, err.message), err.message
    torch.testing.assert_close(caches, before, rtol=0, atol=0)  # checked before any write


def test_k_and_v_without_pages_are_named():
    """k=, v= belong to a paged call: a contiguous call names them, not an unknown input."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    q = torch.randn(1, 2, 3, D, dtype=torch.float64)
    err = _error(lambda: attn(q, q, q, k=q))
    assert err.where == "argument k" and "block_table" in err.message, err.message


def test_a_combined_pattern_appends_too():
    """nsa (branches combined in torch): k=, v= are written as for any pattern, then each row equals the
    reference backend's call on its hand-gathered keys (gates of the present queries)."""
    hq, hkv, n, page_size = 4, 2, 2, 4
    before = (13, 6)
    reach = [-(-(x + n) // page_size) for x in before]
    k_cache, v_cache, table = pool(reach, page_size, hkv, seed=12, dv=D)  # nsa: Dv = D
    g = _gen(13)
    q = torch.randn(len(before), hq, n, D, generator=g, dtype=torch.float64)
    k_new = torch.randn(len(before), hkv, n, D, generator=g, dtype=torch.float64)
    v_new = torch.randn(len(before), hkv, n, D, generator=g, dtype=torch.float64)
    gates = {
        name: torch.rand(len(before), hq, n, generator=g, dtype=torch.float64)
        for name in ("g_cmp", "g_slc", "g_swa")
    }
    seqlens = torch.tensor(before, dtype=torch.int32)
    k_want = appended_pool(k_cache, table, seqlens, k_new)
    v_want = appended_pool(v_cache, table, seqlens, v_new)
    kw = {"block": 4, "selected": 3, "window": 5}
    attn = compile_attention("stdlib:nsa", backend="cpu", layout="bhnd", **kw)
    ref = compile_attention("stdlib:nsa", backend="reference", **kw)
    with torch.no_grad():
        got = attn(
            q, k_cache, v_cache, k=k_new, v=v_new, block_table=table, cache_seqlens=seqlens, **gates
        )
        torch.testing.assert_close((k_cache, v_cache), (k_want, v_want), rtol=0, atol=0)
        for b, cached in enumerate(before):
            k_row = row_keys(k_want, table, b, cached + n)[None]
            v_row = row_keys(v_want, table, b, cached + n)[None]
            want = ref(q[b : b + 1], k_row, v_row, **{k: t[b : b + 1] for k, t in gates.items()})
            torch.testing.assert_close(got[b : b + 1], want, rtol=1e-12, atol=1e-12)


def test_q_k_v_by_keyword_still_bind_and_k_beside_k_is_new():
    """``attn(q=, k=, v=)`` is the positional call; a keyword k, v beside positional ones are the new
    keys and values; a missing one is named."""
    attn = compile_attention("stdlib:sliding_window", backend="cpu", window=WINDOW)
    q, k, v = (
        torch.randn(1, 2, 5, D, generator=_gen(s), dtype=torch.float64) for s in (14, 15, 16)
    )
    torch.testing.assert_close(attn(q=q, k=k, v=v), attn(q, k, v), rtol=0, atol=0)
    k_cache, v_cache, table = pool([2], 4, 2, seed=17, dv=D)
    seqlens = torch.tensor([6], dtype=torch.int32)
    paged = {"block_table": table, "cache_seqlens": seqlens, "layout": "bhnd"}
    torch.testing.assert_close(
        attn(q=q[:, :, :1], k=k_cache, v=v_cache, **paged),
        attn(q[:, :, :1], k_cache, v_cache, **paged),
        rtol=0,
        atol=0,
    )
    err = _error(lambda: attn(q, k))
    assert err.where == "argument v" and "missing v" in err.message, err.message
