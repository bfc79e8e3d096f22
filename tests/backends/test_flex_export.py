"""``attnc.to_flex``: a pattern's FlexAttention objects, checked against independent references.

- the exported ``mask_mod``, evaluated by Flex itself on every (query, key) pair (``create_mask``),
  equals a naive loop's mask where the rule is short to write, and attnc's evaluator's
  (``materialize_mask``) everywhere;
- the ``BlockMask`` lists are exactly the blocks of that mask (EMPTY / PARTIAL / FULL, positions past
  the end of a sequence left out), and equal ``create_block_mask``'s where the sequences are whole blocks;
- ``flex_attention`` with the exported objects (Flex's unfused implementation on CPU, float64) equals a
  dense float64 softmax with the score terms written out, and attnc's reference backend; one test runs
  Flex's fused CPU kernel (``torch.compile``), the one that reads the block lists;
- refusals name the pattern and what Flex lacks.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

import attnc
from attnc.core.errors import SpecError
from attnc.integrations.flex import REFUSED, to_flex

TIGHT = {"rtol": 1e-10, "atol": 1e-10}

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B, H, n, nk, D, seed, dtype=torch.float64, scale=1.0):
    return tuple(
        scale * randn(B, H, length, D, seed=seed + i, dtype=dtype)
        for i, length in enumerate((n, nk, nk))
    )


def sorted_ids(shape, count, seed):
    return torch.sort(
        torch.randint(0, count, shape, generator=torch.Generator().manual_seed(seed)), dim=-1
    ).values


# ---------------------------------------------------------------- naive references (loops over positions)
def naive_mask(rule, B, H, n, nk) -> torch.Tensor:
    """``rule(b, h, q, k)`` on every pair, one Python call each: bool ``[B, H, n, nk]``."""
    return torch.tensor(
        [
            [[[bool(rule(b, h, q, k)) for k in range(nk)] for q in range(n)] for h in range(H)]
            for b in range(B)
        ]
    )


def natten_window(i: int, j: int, length: int, size: int) -> bool:
    """NATTEN's neighborhood of one axis (stride 1, dilation 1, not causal): the window of ``size``
    centred on i, shifted inside the axis at its ends."""
    start = min(max(i - size // 2, 0), length - size)
    return start <= j < start + size


def dense_attention(q, k, v, mask, score_terms=None, scale=None):
    """softmax(score_terms(scale * q . k) masked) v in float64, every score materialized (Flex's and attnc's
    output of a query that attends no key: zeros)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q.to(torch.float64) @ k.to(torch.float64).transpose(-1, -2)
    if score_terms is not None:
        s = score_terms(s)
    s = s.masked_fill(~mask, -math.inf)
    w = torch.softmax(s, -1)
    return torch.where(mask.any(-1, keepdim=True), w, 0.0) @ v.to(
        torch.float64
    )  # a row with no key: zeros


def block_classes(mask: torch.Tensor, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any allowed pair, every pair allowed) per block of ``mask`` ``[B, H, n, nk]``, positions past
    the ends left out."""
    B, H, n, nk = mask.shape
    nqb, nkb = -(-n // bq), -(-nk // bk)
    any_pad = torch.zeros(B, H, nqb * bq, nkb * bk, dtype=torch.bool)
    all_pad = torch.ones(B, H, nqb * bq, nkb * bk, dtype=torch.bool)
    any_pad[:, :, :n, :nk] = mask
    all_pad[:, :, :n, :nk] = mask
    return (
        any_pad.view(B, H, nqb, bq, nkb, bk).any(5).any(3),
        all_pad.view(B, H, nqb, bq, nkb, bk).all(5).all(3),
    )


def listed(num: torch.Tensor, idx: torch.Tensor, nkb: int) -> torch.Tensor:
    """A BlockMask's lists as a dense bool ``[B, H, Q blocks, KV blocks]``."""
    B, H, R = num.shape
    out = torch.zeros(B, H, R, nkb, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for r in range(R):
                out[b, h, r, idx[b, h, r, : num[b, h, r]].long()] = True
    return out


def check_blocks(ex, mask: torch.Tensor, bq: int, bk: int) -> None:
    """The export's PARTIAL and FULL lists are exactly the blocks of ``mask`` ``[B | 1, H | 1, n, nk]``
    where the export says its classification is exact, else they cover it (lists broadcast over the
    batch: listed where an element needs the block, FULL where every element allows every pair)."""
    bm = ex.block_mask
    assert bm.BLOCK_SIZE == (bq, bk) and bm.seq_lengths == (ex.n, ex.nk)
    assert bm.kv_num_blocks.shape[0] == 1  # one list for every batch element
    any_b = block_classes(mask.any(0, keepdim=True), bq, bk)[0]
    all_b = block_classes(mask.all(0, keepdim=True), bq, bk)[1]
    nkb = any_b.shape[-1]
    partial = listed(bm.kv_num_blocks, bm.kv_indices, nkb).expand_as(any_b)
    full = listed(bm.full_kv_num_blocks, bm.full_kv_indices, nkb).expand_as(any_b)
    assert not (partial & full).any()
    if ex.blocks_exact:
        assert torch.equal(full, all_b & any_b), "FULL blocks differ from the mask's"
        assert torch.equal(partial, any_b & ~all_b), "PARTIAL blocks differ from the mask's"
    else:  # a PARTIAL block may be FULL or EMPTY; every allowed pair listed, FULL blocks wholly allowed
        assert not (any_b & ~(partial | full)).any(), "an allowed pair lies in an unlisted block"
        assert not (full & ~all_b).any(), "a FULL block holds a masked pair"


def attnc_mask(spec, ex, heads, sizes=None, inputs=None, **params) -> torch.Tensor:
    mask = attnc.materialize_mask(
        spec,
        n=ex.n if sizes is None else None,
        nk=ex.nk if ex.nk != ex.n else None,
        heads=heads,
        sizes=sizes,
        inputs=inputs,
        **params,
    )
    return mask if mask.dim() == 4 else mask[None]


def flex_mask(ex, B, H) -> torch.Tensor:
    """The exported mask_mod on every pair, evaluated by Flex (``create_mask``)."""
    return create_mask(ex.mask_mod, B, H, ex.n, ex.nk, device="cpu")


# ---------------------------------------------------------------- masks against naive loops
NAIVE_CASES = [
    ("sliding_window", {"window": 7}, 40, None, 1, lambda b, h, q, k: k <= q and q - k < 7),
    (
        "sliding_window",
        {"window": 5},
        13,
        37,
        1,
        lambda b, h, q, k: k <= q + 24 and q + 24 - k < 5,
    ),  # KV cache
    (
        "dilated",
        {"segment": 8, "dilation": 2, "is_causal": True},
        37,
        None,
        1,
        lambda b, h, q, k: q // 8 == k // 8 and q % 8 % 2 == k % 8 % 2 and k <= q,
    ),
    (
        "streaming",
        {"window": 5, "sinks": 3},
        29,
        None,
        1,
        lambda b, h, q, k: k <= q and (q - k < 5 or k < 3),
    ),
    (
        "neighborhood_1d",
        {"kernel_size": 5},
        23,
        None,
        1,
        lambda b, h, q, k: natten_window(q, k, 23, 5),
    ),
]


@pytest.mark.parametrize("name,params,n,nk,heads,rule", NAIVE_CASES)
@pytest.mark.parametrize("block", [8, 16])
def test_mask_mod_equals_naive_mask(name, params, n, nk, heads, rule, block):
    ex = to_flex(f"stdlib:{name}", n=n, nk=nk, heads=heads, block_size=block, **params)
    want = naive_mask(rule, 1, heads, n, nk or n)
    assert torch.equal(flex_mask(ex, 1, heads), want)
    assert torch.equal(attnc_mask(f"stdlib:{name}", ex, heads, **params), want)
    check_blocks(ex, want, block, block)
    q, k, v = qkv(2, heads, n, nk or n, 8, seed=n)
    torch.testing.assert_close(ex(q, k, v), dense_attention(q, k, v, want), **TIGHT)


def test_neighborhood_2d_grid_in_row_major_order():
    H, W, ky, kx = 9, 7, 3, 5
    ex = to_flex(
        "stdlib:neighborhood_2d",
        sizes={"height": H, "width": W},
        kernel_size_y=ky,
        kernel_size_x=kx,
        block_size=16,
    )
    n = H * W
    want = naive_mask(
        lambda b, h, q, k: (
            natten_window(q // W, k // W, H, ky) and natten_window(q % W, k % W, W, kx)
        ),
        1,
        1,
        n,
        n,
    )
    assert ex.n == n and torch.equal(flex_mask(ex, 1, 1), want)
    check_blocks(ex, want, 16, 16)
    q, k, v = qkv(2, 3, n, n, 8, seed=11)
    torch.testing.assert_close(ex(q, k, v), dense_attention(q, k, v, want), **TIGHT)


@pytest.mark.parametrize(
    "params,sizes",
    [
        (
            {
                "kernel_size_y": 3,
                "kernel_size_x": 5,
                "dilation_y": 2,
                "dilation_x": 2,
                "stride_y": 1,
                "stride_x": 5,
                "is_causal_y": True,
            },
            {"height": 8, "width": 10},
        ),
        (
            {"kernel_size_y": 5, "kernel_size_x": 3, "stride_y": 2, "is_causal_x": True},
            {"height": 11, "width": 6},
        ),
    ],
)
def test_neighborhood_2d_against_attnc_mask(params, sizes):
    ex = to_flex("stdlib:neighborhood_2d", sizes=sizes, block_size=16, **params)
    want = attnc_mask("stdlib:neighborhood_2d", ex, 1, sizes=sizes, **params)
    assert torch.equal(flex_mask(ex, 1, 1), want)
    check_blocks(ex, want, 16, 16)
    q, k, v = qkv(1, 2, ex.n, ex.n, 8, seed=12)
    ref = attnc.compile_attention(
        "stdlib:neighborhood_2d", backend="reference", sizes=sizes, **params
    )(q, k, v)
    torch.testing.assert_close(ex(q, k, v), ref, **TIGHT)


@pytest.mark.parametrize(
    "name,params,n,heads",
    [
        ("longnet", {"segment": 8, "dilation": 2, "is_causal": False}, 32, 4),
        ("power", {"block": 4, "local": 2}, 40, 1),
        ("s2", {"block": 4, "local": 2, "vert": 4, "offset": 1}, 40, 4),
        ("prefix_lm", {"prefix": 4}, 17, 1),
        ("logsparse", {}, 33, 1),
        (
            "moa",
            {"alpha": [8, 12, 16, 40], "block": 4, "minimum": 4, "max_new_tokens": 0},
            24,
            4,
        ),  # per-head bands
    ],
)
def test_other_masks_against_attnc(name, params, n, heads):
    spec = f"stdlib:{name}"
    ex = to_flex(spec, n=n, heads=heads, block_size=8, **params)
    want = attnc_mask(spec, ex, heads, **params)
    assert torch.equal(flex_mask(ex, 1, heads), want.expand(1, heads, n, n))
    check_blocks(ex, want.expand(1, heads, n, n), 8, 8)
    q, k, v = qkv(2, heads, n, n, 8, seed=n + heads)
    ref = attnc.compile_attention(spec, backend="reference", **params)(q, k, v)
    torch.testing.assert_close(ex(q, k, v), ref, **TIGHT)
    torch.testing.assert_close(ex(q, k, v), dense_attention(q, k, v, want), **TIGHT)


@pytest.mark.parametrize("batched", [False, True])
def test_document_ids_as_input(batched):
    B, n = 3, 37
    doc = sorted_ids((B, n) if batched else (n,), 4, seed=5)
    ex = to_flex("stdlib:document", n=n, inputs={"doc": doc}, block_size=8)
    rows = doc if batched else doc.expand(B, n)
    want = naive_mask(lambda b, h, q, k: k <= q and rows[b, q] == rows[b, k], B, 1, n, n)
    assert torch.equal(flex_mask(ex, B, 1), want)
    assert ex.batch == (B if batched else None)
    check_blocks(ex, want, 8, 8)
    assert ex.blocks_exact or batched
    q, k, v = qkv(B, 2, n, n, 8, seed=6)
    torch.testing.assert_close(ex(q, k, v), dense_attention(q, k, v, want), **TIGHT)
    with pytest.raises(SpecError, match="missing input 'doc'"):
        to_flex("stdlib:document", n=n)


def test_block_mask_equals_torch_create_block_mask():
    doc = sorted_ids((64,), 5, seed=8)
    for spec, kw in (
        ("stdlib:sliding_window", {"window": 11}),
        ("stdlib:document", {"inputs": {"doc": doc}}),
        ("stdlib:dilated", {"segment": 16, "dilation": 4, "is_causal": False}),
    ):
        ex = to_flex(spec, n=64, block_size=16, **kw)
        ref = create_block_mask(ex.mask_mod, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)
        nkb = ref.kv_indices.shape[-1]
        for ours, theirs in (
            (
                (ex.block_mask.kv_num_blocks, ex.block_mask.kv_indices),
                (ref.kv_num_blocks, ref.kv_indices),
            ),
            (
                (ex.block_mask.full_kv_num_blocks, ex.block_mask.full_kv_indices),
                (ref.full_kv_num_blocks, ref.full_kv_indices),
            ),
        ):
            assert torch.equal(listed(*ours, nkb), listed(*theirs, nkb)), spec


# ---------------------------------------------------------------- score_mod
def alibi_slope(h: int, heads: int) -> float:
    p = 2 ** int(math.log2(heads))
    return 2 ** (-8 * (h + 1) / p) if h < p else 2 ** (-8 * (2 * (h - p) + 1) / (2 * p))


@pytest.mark.parametrize("heads", [4, 6])
def test_alibi_score_mod(heads):
    n = 29
    ex = to_flex("stdlib:alibi", n=n, heads=heads, block_size=8)
    assert ex.score_mod is not None and ex.heads == heads
    pos = torch.arange(n, dtype=torch.float64)
    slopes = torch.tensor([alibi_slope(h, heads) for h in range(heads)], dtype=torch.float64)
    bias = -slopes.view(-1, 1, 1) * (pos.view(-1, 1) - pos.view(1, -1))
    causal = naive_mask(lambda b, h, q, k: k <= q, 1, 1, n, n)
    q, k, v = qkv(2, heads, n, n, 8, seed=heads)
    want = dense_attention(q, k, v, causal, lambda s: s + bias)
    torch.testing.assert_close(ex(q, k, v), want, **TIGHT)
    torch.testing.assert_close(
        ex(q, k, v), attnc.compile_attention("stdlib:alibi", backend="reference")(q, k, v), **TIGHT
    )
    with pytest.raises(SpecError, match="heads"):
        ex(*qkv(1, heads + 1, n, n, 8, seed=1))


def test_softcap_score_mod_and_gqa():
    n, cap, scale = 31, 2.0, 0.7
    ex = to_flex("stdlib:softcap", n=n, cap=cap, block_size=16)
    assert ex.heads is None  # the pattern reads no head: any head count serves
    causal = naive_mask(lambda b, h, q, k: k <= q, 1, 1, n, n)
    q, k, v = qkv(2, 4, n, n, 8, seed=3, scale=3.0)
    k, v = k[:, :2], v[:, :2]  # 4 query heads over 2 key/value heads
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    want = dense_attention(q, kk, vv, causal, lambda s: cap * torch.tanh(s / cap), scale=scale)
    torch.testing.assert_close(ex(q, k, v, scale=scale), want, **TIGHT)
    out, lse = ex(q, k, v, scale=scale, return_lse=True)
    s = (cap * torch.tanh(scale * q @ kk.transpose(-1, -2) / cap)).masked_fill(~causal, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), **TIGHT)


def test_forgetting_gates_score_mod():
    B, H, n = 2, 3, 27
    gates = torch.nn.functional.logsigmoid(randn(H, n, seed=9))
    ex = to_flex("stdlib:forgetting", n=n, heads=H, inputs={"g": gates}, block_size=8)
    csum = gates.cumsum(-1)
    decay = csum[:, :, None] - csum[:, None, :]  # sum of g[h, k+1 .. q]
    causal = naive_mask(lambda b, h, q, k: k <= q, 1, 1, n, n)
    q, k, v = qkv(B, H, n, n, 8, seed=10)
    torch.testing.assert_close(
        ex(q, k, v), dense_attention(q, k, v, causal, lambda s: s + decay), **TIGHT
    )


def test_score_scale_folded_into_score_mod():
    n, D = 21, 8
    ex = to_flex("stdlib:softplus", n=n, heads=2, dk=D, block_size=8)
    q, k, v = qkv(2, 2, n, n, D, seed=13)
    ref = attnc.compile_attention("stdlib:softplus", backend="reference")(q, k, v)
    torch.testing.assert_close(ex(q, k, v), ref, **TIGHT)
    # softmax of log(softplus(E s)) = softplus weights over the row sum, E = log(dk) log(q + 1)
    e = math.log(D) * torch.log(torch.arange(n, dtype=torch.float64) + 1).view(-1, 1)
    w = torch.nn.functional.softplus(e * (q @ k.transpose(-1, -2)) * D**-0.5)
    w = w.masked_fill(~naive_mask(lambda b, h, q, k: k <= q, 1, 1, n, n), 0)
    torch.testing.assert_close(ex(q, k, v), (w / w.sum(-1, keepdim=True)) @ v, **TIGHT)
    with pytest.raises(SpecError, match="dk"):
        to_flex("stdlib:softplus", n=n)


def test_bias_input_read_through_b_and_h():
    src = """
pattern biased(window >= 1 = 4)
  tokens seq
  input rpb: float[heads, 7]
  mask abs(q - k) < window
  bias rpb[h, q - k + window - 1]
"""
    B, H, n, w = 2, 3, 26, 4
    rpb = randn(B, H, 2 * w - 1, seed=14)
    ex = to_flex(src, n=n, heads=H, inputs={"rpb": rpb}, block_size=8)
    band = naive_mask(lambda b, h, q, k: abs(q - k) < w, 1, 1, n, n)
    assert torch.equal(flex_mask(ex, 1, H), band.expand(1, H, n, n))
    pos = torch.arange(n)
    rel = (pos.view(-1, 1) - pos.view(1, -1) + w - 1).clamp(0, 2 * w - 2)
    bias = rpb[:, :, rel]  # [B, H, n, n]
    q, k, v = qkv(B, H, n, n, 8, seed=15)
    torch.testing.assert_close(
        ex(q, k, v), dense_attention(q, k, v, band, lambda s: s + bias), **TIGHT
    )
    with pytest.raises(SpecError, match="batch"):
        ex(*qkv(B + 1, H, n, n, 8, seed=1))


def test_custom_source_string():
    src = """
pattern striped(stride >= 1 = 3, local >= 1 = 4)
  tokens seq
  mask causal and (q - k < local or k % stride == 0)
  softcap 5.0
"""
    n = 34
    ex = to_flex(src, n=n, stride=4, local=3, block_size=8)
    want = naive_mask(lambda b, h, q, k: k <= q and (q - k < 3 or k % 4 == 0), 1, 1, n, n)
    assert torch.equal(flex_mask(ex, 1, 1), want)
    check_blocks(ex, want, 8, 8)
    q, k, v = qkv(1, 2, n, n, 8, seed=16, scale=2.0)
    torch.testing.assert_close(
        ex(q, k, v), dense_attention(q, k, v, want, lambda s: 5.0 * torch.tanh(s / 5.0)), **TIGHT
    )
    assert "def mask_mod" in ex.source and "def score_mod" in ex.source


def test_fused_kernel_reads_the_block_lists():
    # Flex's compiled CPU kernel skips EMPTY blocks and the mask_mod on FULL ones: a wrong list changes the output
    n = 72  # not a whole number of 16-token blocks: FULL last blocks (positions past the end left out)
    doc = sorted_ids((n,), 4, seed=17)
    ex = to_flex("stdlib:document", n=n, inputs={"doc": doc}, block_size=16)
    q, k, v = qkv(1, 2, n, n, 16, seed=18, dtype=torch.float32)
    want = naive_mask(lambda b, h, q, k: k <= q and doc[q] == doc[k], 1, 1, n, n)
    out = ex(q, k, v, flex_attention=torch.compile(flex_attention, fullgraph=True))
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, want), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- refusals
REFUSALS = [
    ("stdlib:delta_net", "recurrence"),
    ("stdlib:nsa", "combined"),
    ("stdlib:combiner", "combined"),
    ("stdlib:routing_transformer", "bucketed"),
    ("stdlib:moba", "routed"),
    ("stdlib:quest", "routed"),
    ("stdlib:cluster_mask", "vector mask"),
    ("stdlib:vertical_slash", "vector mask"),
    ("stdlib:music_relative", "vector score"),
    ("stdlib:sigmoid", "unnormalized weights"),
]


@pytest.mark.parametrize("spec,kind", REFUSALS)
def test_refusals_name_pattern_and_reason(spec, kind):
    name = spec.removeprefix("stdlib:")
    with pytest.raises(SpecError) as info:
        to_flex(spec, n=32)
    text = str(info.value)
    assert f"'{name}' cannot be exported to FlexAttention" in text
    assert REFUSED[kind] in text


def test_call_checks_shapes():
    ex = to_flex("stdlib:sliding_window", n=16, window=3, block_size=8)
    with pytest.raises(SpecError, match="16 queries"):
        ex(*qkv(1, 1, 17, 16, 8, seed=1))
    with pytest.raises(SpecError, match="block_size"):
        to_flex("stdlib:sliding_window", n=16, block_size=0)
