"""A combined pattern's paged batch with one launch per branch (``runtime.combined_paged``, stdlib ``nsa``): each
row's runs pooled from its pages on the device, each query's compressed attention and its route's scores at its own
position, the selected and window branches one ``attnc_fwd_paged`` each. Every row equals the float64 reference on
its own keys (the combined call after a contiguous KV cache); the launches do not depend on the lengths; a warm call
reads nothing on the host; the call compiles with ``fullgraph=True``; a gate of the wrong shape is named."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_host_reads import HostReads
from test_paged_kv import D, paged_cache
from test_paged_one_launch import assert_fullgraph_is_eager, count_launches

import attnc
from attnc.core.errors import SpecError
from attnc.runtime import combined_paged

os.environ.setdefault("TRITON_INTERPRET", "1")

GATES = ("g_cmp", "g_slc", "g_swa")
PARAMS = {"block": 4, "selected": 2, "window": 6}


def _gates(batch, heads, rows, seed):
    g = torch.Generator().manual_seed(seed)
    return {name: torch.rand(batch, heads, rows, generator=g) for name in GATES}


def _reference_rows(params, q_rows, rows, gate_rows):
    """Each row's float64 reference: its queries (the last of its keys) over its own keys (None for no query)."""
    ref = attnc.compile_attention("stdlib:nsa", backend="reference", **params)
    return [ref(qb.double(), kb.double(), vb.double(), **{n: g.double() for n, g in gb.items()}) if qb.shape[2]
            else None for qb, (kb, vb), gb in zip(q_rows, rows, gate_rows, strict=True)]


def _packed_call(params, lengths, counts, page, heads, kv_heads, seed, layout="bhnd"):
    """A packed call (``cu_seqlens_q``) of nsa at ``params``: ``(out [1, Hq, total, D], references per row, each
    row's slice of the packed queries)``."""
    attn = attnc.compile_attention("stdlib:nsa", backend="triton", **params)
    k, v, table, seqlens, rows = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    cu = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32)
    total = int(cu[-1])
    q = torch.randn(1, heads, total, D, generator=torch.Generator().manual_seed(seed + 1))
    gates = _gates(1, heads, total, seed + 2)
    if layout == "bnhd":
        out = attn(q.transpose(1, 2), k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu,
                   max_seqlen_q=max(1, *counts), layout="bnhd", **{n: g.transpose(1, 2) for n, g in gates.items()})
        out = out.transpose(1, 2)
    else:
        out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=max(1, *counts),
                   layout="bhnd", **gates)
    cut = [slice(int(cu[b]), int(cu[b + 1])) for b in range(len(lengths))]
    want = _reference_rows(params, [q[:, :, c] for c in cut], rows, [{n: g[0, :, c] for n, g in gates.items()}
                                                                      for c in cut])
    return out, want, cut


def _compile(params, backend="triton"):
    return attnc.compile_attention("stdlib:nsa", backend=backend, **params)


def test_every_combined_stdlib_pattern_is_served_in_one_launch_per_branch():
    """Of the stdlib's combined patterns, nsa's and Combiner's paged calls run one launch per branch (Combiner's
    prefill rows only: a run's value reads every query of the run)."""
    from cases import CASES

    from attnc.spec.library import stdlib_index

    params = {case.name: case.params for case in CASES}
    combined = {name for name, (_, decl) in stdlib_index().items() if decl.kind == "pattern"
                and attnc.load(f"stdlib:{name}", **params.get(name, {})).kind == "combined"}
    assert combined == {"nsa", "combiner"}
    served = {name for name in combined if combined_paged.applies(attnc.load(f"stdlib:{name}"))}
    assert served == {"nsa", "combiner"}


@pytest.mark.versions  # the paged forward's interpreter run on each Triton CI installs
def test_a_mixed_batch_is_one_launch_per_branch_and_each_row_is_the_reference(monkeypatch):
    """Rows of 4 lengths and 4 query counts (a decode row, chunked-prefill rows, a row whose queries are all its
    keys), shuffled pages of 8 keys, 4 query heads on 2 K/V heads: one ``attnc_fwd_paged`` for the selected
    branch and one for the window (two each with the split-KV merge), every row the float64 reference."""
    launched = count_launches(monkeypatch)
    out, want, cut = _packed_call(PARAMS, [5, 17, 40, 23], [1, 3, 1, 23], 8, 4, 2, seed=0)
    assert [n for n in launched if n != "attnc_fwd_combine"] == ["attnc_fwd_paged"] * 2
    for c, w in zip(cut, want, strict=True):
        torch.testing.assert_close(out[:, :, c], w.float(), rtol=2e-5, atol=2e-5)


@settings(max_examples=6, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 37), min_size=1, max_size=4),
    page=st.sampled_from([3, 8, 16]),
    block=st.sampled_from([2, 4, 5]),
    selected=st.integers(1, 4),
    window=st.integers(1, 9),
    packed=st.booleans(),
    kv_heads=st.sampled_from([1, 2]),
    bnhd=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_random_batches_equal_the_reference_row_by_row(lengths, page, block, selected, window, packed, kv_heads,
                                                       bnhd, seed, data):
    """Random lengths, page sizes, run sizes, selections and windows, packed rows of their own query counts or one
    count for every row, GQA and MQA, either layout: every row the reference's."""
    params = {"block": block, "selected": selected, "window": window}
    heads, layout = 4, "bnhd" if bnhd else "bhnd"
    if packed:
        counts = [data.draw(st.integers(0, n)) for n in lengths]
        out, want, cut = _packed_call(params, lengths, counts, page, heads, kv_heads, seed, layout)
        for c, w in zip(cut, want, strict=True):
            if w is not None:  # (a row of no query)
                torch.testing.assert_close(out[:, :, c], w.float(), rtol=2e-5, atol=2e-5)
        return
    n = data.draw(st.integers(1, min(lengths)))
    attn = _compile(params)
    k, v, table, seqlens, rows = paged_cache(lengths, page, dtype=torch.float32, seed=seed, kv_heads=kv_heads)
    q = torch.randn(len(lengths), heads, n, D, generator=torch.Generator().manual_seed(seed + 1))
    gates = _gates(len(lengths), heads, n, seed + 2)
    if bnhd:
        out = attn(q.transpose(1, 2), k, v, block_table=table, cache_seqlens=seqlens, layout="bnhd",
                   **{name: g.transpose(1, 2) for name, g in gates.items()}).transpose(1, 2)
    else:
        out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **gates)
    want = _reference_rows(params, [q[b:b + 1] for b in range(len(lengths))], rows,
                           [{name: g[b:b + 1] for name, g in gates.items()} for b in range(len(lengths))])
    for b, w in enumerate(want):
        torch.testing.assert_close(out[b:b + 1], w.float(), rtol=2e-5, atol=2e-5)


def test_gates_shared_by_every_row_and_appended_tokens():
    """Gates without a batch dimension (``[heads, n]``, every row's) and new keys given as ``k=``, ``v=`` (written
    into the pages first, then attended): the rows equal the reference over their keys with the new ones."""
    attn = _compile(PARAMS)
    lengths, n = [9, 22, 14], 2
    k, v, table, seqlens, rows = paged_cache([x + n for x in lengths], 4, dtype=torch.float32, seed=5)
    q = torch.randn(len(lengths), 4, n, D, generator=torch.Generator().manual_seed(6))
    gates = {name: g[0] for name, g in _gates(1, 4, n, 7).items()}
    new_k = torch.stack([kb[0, :, -n:] for kb, _ in rows])  # [B, Hkv, n, D]: the rows' last keys, given again
    new_v = torch.stack([vb[0, :, -n:] for _, vb in rows])
    out = attn(q, k, v, k=new_k, v=new_v, block_table=table, cache_seqlens=torch.tensor(lengths, dtype=torch.int32),
               layout="bhnd", **gates)
    want = _reference_rows(PARAMS, [q[b:b + 1] for b in range(len(lengths))], rows,
                           [{name: g for name, g in gates.items()}] * len(lengths))
    for b, w in enumerate(want):
        torch.testing.assert_close(out[b:b + 1], w.float(), rtol=2e-5, atol=2e-5)


def test_launches_do_not_depend_on_the_distinct_lengths(monkeypatch):
    """A batch of one length and a batch of three make the same launches."""
    attn = _compile(PARAMS)
    seen = []
    for lengths in ([20, 20, 20], [7, 20, 33]):
        k, v, table, seqlens, _ = paged_cache(lengths, 8, dtype=torch.float32, seed=1)
        table = torch.nn.functional.pad(table, (0, 6 - table.shape[1]), value=-1)  # one capacity for both
        launched = count_launches(monkeypatch)
        attn(torch.randn(3, 4, 1, D), k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd",
             **_gates(3, 4, 1, 0))
        seen.append(launched)
        monkeypatch.undo()
    assert seen[0] == seen[1] and seen[0].count("attnc_fwd_paged") == 2


def test_a_warm_call_reads_nothing_on_the_host():
    """A second call of one batch shape, and a call at other lengths and query counts, read nothing on the host."""
    attn = _compile(PARAMS)
    k, v, table, seqlens, _ = paged_cache([12, 30, 7], 8, dtype=torch.float32, seed=2)
    q = torch.randn(1, 4, 4, D)
    gates = _gates(1, 4, 4, 3)

    def call(lengths, cu):
        attn(q, k, v, block_table=table, cache_seqlens=lengths, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
             max_seqlen_q=2, layout="bhnd", **gates)

    call(seqlens, [0, 1, 3, 4])
    for lengths, cu in ((seqlens, [0, 1, 3, 4]), (torch.tensor([13, 31, 8], dtype=torch.int32), [0, 2, 3, 4])):
        with HostReads() as reads:
            call(lengths, cu)
        assert reads.total == 0, dict(reads.seen)


def test_a_paged_call_compiles_with_fullgraph():
    """Under ``torch.compile(fullgraph=True)`` the call is the ``attnc::paged_attention`` op (no graph break), the
    same answer as the eager call, at a second length too."""
    attn = _compile(PARAMS)
    k, v, table, seqlens, _ = paged_cache([12, 30, 7], 8, dtype=torch.float32, seed=4)
    q = torch.randn(3, 4, 1, D)
    gates = _gates(3, 4, 1, 5)

    def call(q, k, v, table, seqlens, g_cmp, g_slc, g_swa):
        return attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", g_cmp=g_cmp, g_slc=g_slc,
                    g_swa=g_swa)

    args = (q, k, v, table, seqlens, *gates.values())
    grown = (q, k, v, table, torch.tensor([13, 31, 8], dtype=torch.int32), *gates.values())
    assert_fullgraph_is_eager(call, args, grown)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fault, match", [
    ("shape", r"\[4, 2\] or \[(1|3), 4, 2\]"),
    ("dtype", "float tensor"),
])
def test_a_gate_of_the_wrong_kind_is_named(packed, fault, match):
    """A gate that is not the present queries' (wrong rows, or ints) is refused naming it, packed rows or not."""
    attn = _compile(PARAMS)
    k, v, table, seqlens, _ = paged_cache([12, 30, 7], 8, dtype=torch.float32, seed=6)
    extra = {}
    if packed:
        q = torch.randn(1, 4, 2, D)
        extra = {"cu_seqlens_q": torch.tensor([0, 1, 1, 2], dtype=torch.int32), "max_seqlen_q": 1}
    else:
        q = torch.randn(3, 4, 2, D)
    gates = _gates(q.shape[0], 4, 2, 7)
    gates["g_slc"] = gates["g_slc"][..., :1] if fault == "shape" else gates["g_slc"].long()
    with pytest.raises(SpecError) as err:
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **extra, **gates)
    assert "argument g_slc" in str(err.value)
    if packed:
        assert err.match(match)


def test_a_gate_in_the_other_layouts_order_is_named_with_the_shape_given():
    """Gates ``[B, heads, n]`` under ``"bnhd"`` (which takes ``[B, n, heads]``): refused naming the gate, the shape
    given and the order the layout takes, not a row's slice of it."""
    attn = _compile(PARAMS)
    k, v, table, seqlens, _ = paged_cache([12, 30, 7], 8, dtype=torch.float32, seed=6)
    q = torch.randn(3, 1, 4, D)
    gates = _gates(3, 4, 1, 7)  # [B, heads, n]: bhnd's order
    with pytest.raises(SpecError) as err:
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bnhd", **gates)
    assert err.value.where == "argument g_cmp"
    assert "got [3, 4, 1]" in err.value.message and "[.., n, heads]" in err.value.message


def test_other_backends_keep_the_answer_by_length():
    """The reference backend runs the same call by length (no one launch): the same answer as Triton's."""
    lengths = [5, 17, 11]
    k, v, table, seqlens, _ = paged_cache(lengths, 4, dtype=torch.float32, seed=8)
    q = torch.randn(3, 4, 1, D, generator=torch.Generator().manual_seed(9))
    gates = _gates(3, 4, 1, 10)
    outs = [_compile(PARAMS, backend)(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **gates)
            for backend in ("triton", "reference")]
    torch.testing.assert_close(outs[0], outs[1].float(), rtol=2e-5, atol=2e-5)


POOLED_ONLY = """
pattern pooled_only(block >= 1 = 4)
  tokens seq
  input g_a: float[heads, n]
  branch a
    keys pooled(mean, block)
    mask (k + 1) * block - 1 <= q
  combine g_a * a
"""


def test_a_combined_pattern_of_pooled_branches_alone_takes_the_path_by_length():
    """No branch launches ``attnc_fwd_paged`` (whose row check validates the table and lengths on the device): the
    call takes the path by length, which checks them on the host; the answer is the reference's and a page id out
    of range is refused by name."""
    assert not combined_paged.applies(attnc.load(POOLED_ONLY))
    attn = attnc.compile_attention(POOLED_ONLY, backend="triton")
    ref = attnc.compile_attention(POOLED_ONLY, backend="reference")
    k, v, table, seqlens, rows = paged_cache([9, 17], 8, dtype=torch.float32, seed=11)
    q = torch.randn(2, 4, 1, D, generator=torch.Generator().manual_seed(12))
    gate = torch.rand(2, 4, 1, generator=torch.Generator().manual_seed(13))
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", g_a=gate)
    for b, (kb, vb) in enumerate(rows):
        want = ref(q[b:b + 1].double(), kb.double(), vb.double(), g_a=gate[b:b + 1].double())
        torch.testing.assert_close(out[b:b + 1], want.float(), rtol=2e-5, atol=2e-5)
    table[1, 1] = 10**6
    with pytest.raises(SpecError, match="block_table"):
        attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", g_a=gate)


def test_pools_with_a_strided_head_dim_take_the_path_by_length():
    """Pools whose head dim is not contiguous (the summary kernel reads it contiguous) are not served in one launch:
    the answer is still the reference's."""
    attn = attnc.compile_attention("stdlib:nsa", backend="triton", **PARAMS)
    k, v, table, seqlens, rows = paged_cache([9, 17], 8, dtype=torch.float32, seed=14)
    k = k.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert k.stride(-1) != 1
    q = torch.randn(2, 4, 1, D, generator=torch.Generator().manual_seed(15))
    gates = _gates(2, 4, 1, 16)
    assert not attn._paged_server.pages_in_one_launch(q, k, v)
    out = attn(q, k, v, block_table=table, cache_seqlens=seqlens, layout="bhnd", **gates)
    want = _reference_rows(PARAMS, [q[b:b + 1] for b in range(2)], rows,
                           [{n: g[b:b + 1] for n, g in gates.items()} for b in range(2)])
    for b, w in enumerate(want):
        torch.testing.assert_close(out[b:b + 1], w.float(), rtol=2e-5, atol=2e-5)
