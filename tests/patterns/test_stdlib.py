"""The stdlib: every published pattern against an independent reference.

Each reference below is written from the published rule (the pattern file's
header: the paper or the authors' code) as a plain Python / torch loop, never derived
from the .attn text or from attnc's evaluator. Masks are compared exactly
with ``attnc.materialize_mask``; score terms, routing and recurrences are
compared with the reference backend in float64 on random inputs.
"""

from __future__ import annotations

import io
import math
from contextlib import redirect_stderr, redirect_stdout
from importlib import resources
from itertools import product

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli

STDLIB_DIR = resources.files("attnc.stdlib_patterns")
STDLIB_FILES = sorted(e.name for e in STDLIB_DIR.iterdir() if e.name.endswith(".attn"))
STDLIB_NAMES = [f[: -len(".attn")] for f in STDLIB_FILES]

#: The patterns the stdlib must ship, with the defaults (the papers' settings).
EXPECTED_DEFAULTS = {
    "sliding_window": {"window": 4096},
    "streaming": {"window": 1020, "sinks": 4},
    "a_shape": {"sinks": 128, "local": 3968},
    "neighborhood_1d": {"kernel_size": 7, "stride": 1, "dilation": 1, "is_causal": False},
    "neighborhood_2d": {
        **{f"kernel_size_{a}": 7 for a in "yx"},
        **{f"stride_{a}": 1 for a in "yx"},
        **{f"dilation_{a}": 1 for a in "yx"},
        **{f"is_causal_{a}": False for a in "yx"},
    },
    "neighborhood_3d": {
        **{f"kernel_size_{a}": k for a, k in zip("tyx", (3, 7, 7), strict=True)},
        **{f"stride_{a}": 1 for a in "tyx"},
        **{f"dilation_{a}": 1 for a in "tyx"},
        **{f"is_causal_{a}": False for a in "tyx"},
    },
    "dilated": {"segment": 8192, "dilation": 4, "is_causal": True},
    "longnet": {"segment": 8192, "dilation": 4, "is_causal": True},
    "sliding_tile": {"tile_t": 6, "tile_y": 8, "tile_x": 8, "wt": 3, "wy": 3, "wx": 3},
    "window_2d": {"window": 7, "shift": 0},
    "halo_2d": {"block": 8, "halo": 3},
    "freeswim": {"half_height": 15, "half_width": 26},
    "moa": {"alpha": 4096, "beta": 0.0, "max_new_tokens": 1024, "block": 64, "minimum": 128},
    "radial": {"decay_factor": 1.0, "block": 128, "sink": False},
    "power": {"block": 256, "local": 5},
    "logsparse": {},
    "longformer": {"window": 512},
    "s2": {"block": 64, "local": 16, "vert": 8, "offset": 0, "kv_heads": 0},
    "prefix_lm": {"prefix": 3},  # bare: given here
    "grid": {"stride": 14, "vision_start": 812, "vision_end": 4000, "sink": 1024, "local": 1024, "block": 64},  # vision_end given
    "document": {},
    "alibi": {},
    "softcap": {"cap": 50.0},
    "forgetting": {},
    "moba": {"block": 4096, "topk": 12},
    "quest": {"token_budget": 4096, "page": 16},
    "dsa": {"topk": 2048, "index_heads": 64, "index_dim": 128},
    "dma": {"window": 2048},
    "sparsifiner": {"budget": 50, "rank": 32, "cls": 1},
    "music_relative": {"max_relative": 2048},
    "sigmoid": {"length": 2048, "is_causal": False},
    "softplus": {"is_causal": True, "p": 1.0},
    "seer": {"block": 64, "topk": 8},  # topk given
    "vmoba": {"layer": 0, "threshold": 0.25, "temporal_chunk": 2, "spatial_chunk_y": 3, "spatial_chunk_x": 4,
              "st_chunk_t": 4, "st_chunk_y": 6, "st_chunk_x": 4},
    "biformer": {"region": 4, "topk": 4},
    "cluster_mask": {"clusters": 4},
    "routing_transformer": {"clusters": 4, "window": 128, "is_causal": True},
    "token_topk": {"topk": 2048},
    "anchor": {"block": 128, "step": 16, "init": 2048, "theta": 12.0},
    "landmark": {"block": 64},
    "xattention": {"block": 128, "stride": 16, "threshold": 0.9, "chunk": 16384},
    "vertical_slash": {"vertical": 1000, "slash": 6096, "last_q": 64, "sinks": 30, "local": 100, "slash_min": 50},
    "nsa": {"block": 64, "selected": 16, "window": 512},
    "combiner": {"block": 128},
    "retention": {},
    "lightning": {},
    "lightning_fla": {"layer_idx": 0, "num_layers": 1},
    "mamba2": {},
    "gla": {},
}

FAST = settings(max_examples=30, deadline=None)


def as_mask(keep, heads: int, nq: int, nk: int | None = None) -> torch.Tensor:
    """bool [heads, nq, nk] from a Python predicate keep(h, q, k)."""
    nk = nq if nk is None else nk
    out = torch.zeros(heads, nq, nk, dtype=torch.bool)
    for h in range(heads):
        for q in range(nq):
            for k in range(nk):
                out[h, q, k] = bool(keep(h, q, k))
    return out


def assert_same_mask(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == torch.bool
    assert got.shape == want.shape, (got.shape, want.shape)
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"masks differ at (head, q, k) {bad}")


def is_pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def alibi_slopes(H: int) -> list[float]:
    """The head slopes of ALiBi's get_slopes (also Lightning Attention's
    _build_slope_tensor): the geometric sequence 2^(-8/H), 2^(-16/H), ... for a
    power-of-two H; otherwise the sequence of the largest power of two P < H,
    followed by the first H - P of every other slope of the 2P sequence."""
    if is_pow2(H):
        return [2.0 ** (-8.0 * (i + 1) / H) for i in range(H)]
    P = 2 ** int(math.floor(math.log2(H)))
    return alibi_slopes(P) + alibi_slopes(2 * P)[0::2][: H - P]


def test_alibi_slopes_reference():
    """The reference above against the values the rule gives by hand."""
    assert alibi_slopes(3) == [2.0**-4, 2.0**-8, 2.0**-2]
    assert alibi_slopes(6) == [2.0 ** (-2 * i) for i in (1, 2, 3, 4)] + [2.0**-1, 2.0**-3]
    assert alibi_slopes(8) == [2.0 ** -(i + 1) for i in range(8)]


# ================================================================ the stdlib itself
def test_required_patterns_present():
    assert set(EXPECTED_DEFAULTS) <= set(STDLIB_NAMES)


@pytest.mark.parametrize("fname", STDLIB_FILES)
def test_file_header_and_single_declaration(fname):
    text = (STDLIB_DIR / fname).read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0].startswith("# ") and len(lines[0]) > 10, "first line must be a one-line summary"
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, "header must cite the source and state the rule"
    assert "Rule" in "\n".join(header)
    decls = [ln for ln in lines if ln.startswith(("pattern ", "recurrence "))]
    assert len(decls) == 1
    name = decls[0].split()[1].split("(")[0]
    assert name == fname[: -len(".attn")]


@pytest.mark.parametrize("name", sorted(EXPECTED_DEFAULTS))
def test_defaults(name):
    params = {"prefix_lm": {"prefix": 3}, "grid": {"vision_end": 4000}, "seer": {"topk": 8}}.get(name, {})
    pat = attnc.load(f"stdlib:{name}", **params)
    got = {k: v for k, v in pat.params}
    want = EXPECTED_DEFAULTS[name]
    assert set(got) == set(want)
    for k, v in want.items():
        if isinstance(v, bool):
            assert bool(got[k]) is v, k
        else:
            assert float(got[k]) == pytest.approx(v), k


def test_cli_list_shows_every_pattern():
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["list"])
    assert rc == 0
    lines = out.getvalue().splitlines()
    listed = {ln.split()[0] for ln in lines if ln.strip()}
    assert listed == set(STDLIB_NAMES)
    for ln in lines:
        assert len(ln.split()) >= 3, f"no summary: {ln!r}"


@pytest.mark.parametrize("fname", STDLIB_FILES)
def test_cli_check_every_file(fname):
    path = str(STDLIB_DIR / fname)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main(["check", path])
    assert rc == 0, err.getvalue()
    assert "ok" in out.getvalue()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert cli.main(["check", "stdlib:" + fname[: -len(".attn")]]) == 0


def test_cli_check_fails_on_a_broken_copy(tmp_path):
    text = (
        (STDLIB_DIR / "power.attn")
        .read_text(encoding="utf-8")
        .replace("is_pow2(blk)", "is_pow2(blk, 2)")
    )
    bad = tmp_path / "bad.attn"
    bad.write_text(text)
    err = io.StringIO()
    with redirect_stdout(io.StringIO()), redirect_stderr(err):
        assert cli.main(["check", str(bad)]) == 1
    assert "error" in err.getvalue()


# ================================================================ simple 1-D masks
@pytest.mark.parametrize("n,window", [(1, 1), (9, 1), (17, 4), (20, 7), (12, 30)])
def test_sliding_window(n, window):
    want = as_mask(lambda h, q, k: k <= q and q - k < window, 1, n)
    assert_same_mask(attnc.materialize_mask("stdlib:sliding_window", n=n, window=window), want)


@pytest.mark.parametrize(
    "n,window,sinks", [(16, 4, 1), (23, 5, 3), (10, 1, 0), (9, 20, 2), (31, 6, 8)]
)
def test_streaming(n, window, sinks):
    want = as_mask(lambda h, q, k: k <= q and (q - k < window or k < sinks), 1, n)
    assert_same_mask(
        attnc.materialize_mask("stdlib:streaming", n=n, window=window, sinks=sinks), want
    )


@pytest.mark.parametrize("n,local,sinks", [(16, 4, 1), (29, 6, 3), (40, 10, 5)])
def test_a_shape(n, local, sinks):
    want = as_mask(lambda h, q, k: k <= q and (q - k < local or k < sinks), 1, n)
    assert_same_mask(attnc.materialize_mask("stdlib:a_shape", n=n, local=local, sinks=sinks), want)


def test_a_shape_calls_streaming_with_minference_setting():
    text = (STDLIB_DIR / "a_shape.attn").read_text(encoding="utf-8")
    assert "streaming(" in text
    # At the defaults (128 sinks, 3968 local) on a short sequence: causal, and
    # the sink/local boundary sits where MInference puts it.
    n = 4200
    m = attnc.materialize_mask("stdlib:a_shape", n=n)[0]
    q = n - 1
    row = m[q]
    assert row[:128].all() and not row[128 : q - 3968 + 1].any() and row[q - 3967 : q + 1].all()
    assert not torch.triu(m, diagonal=1).any()


@pytest.mark.parametrize(
    "n,block,local", [(40, 4, 2), (64, 4, 5), (37, 3, 1), (50, 7, 3), (40, 4, 0), (33, 1, 0), (45, 5, 0)]
)
def test_power(n, block, local):
    """PowerAttention's Algorithm 1: a block distance passes the power-of-two
    test when blk & (blk - 1) == 0, which distance 0 (the own block) does too,
    so local = 0 still keeps the query's own block."""

    def keep(h, q, k):
        blk = q // block - k // block
        return k <= q and (blk < local or blk & (blk - 1) == 0 or k < block)

    assert_same_mask(
        attnc.materialize_mask("stdlib:power", n=n, block=block, local=local), as_mask(keep, 1, n)
    )


def test_power_local_0_keeps_the_own_block():
    m = attnc.materialize_mask("stdlib:power", n=24, block=4, local=0)[0]
    for q in range(24):
        assert m[q, (q // 4) * 4 : q + 1].all()  # the own block, causally


@pytest.mark.parametrize("n", [1, 2, 17, 40])
def test_logsparse(n):
    want = torch.zeros(1, n, n, dtype=torch.bool)
    for q in range(n):
        want[0, q, q] = True
        step = 1
        while q - step >= 0:
            want[0, q, q - step] = True
            step *= 2
    assert_same_mask(attnc.materialize_mask("stdlib:logsparse", n=n), want)


@pytest.mark.parametrize("n,prefix", [(12, 0), (12, 4), (15, 15), (9, 20), (17, 1)])
def test_prefix_lm(n, prefix):
    want = torch.tril(torch.ones(n, n, dtype=torch.bool))
    p = min(prefix, n)
    want[:p, :p] = True
    assert_same_mask(attnc.materialize_mask("stdlib:prefix_lm", n=n, prefix=prefix), want[None])


@pytest.mark.parametrize("seed,n", [(0, 16), (1, 25), (2, 7)])
def test_document(seed, n):
    g = torch.Generator().manual_seed(seed)
    doc = torch.sort(torch.randint(0, 4, (n,), generator=g)).values
    shuffled = doc[torch.randperm(n, generator=g)]  # the rule does not need sorted ids
    for ids in (doc, shuffled):
        want = as_mask(lambda h, q, k, ids=ids: k <= q and int(ids[q]) == int(ids[k]), 1, n)
        got = attnc.materialize_mask("stdlib:document", n=n, inputs={"doc": ids})
        assert_same_mask(got, want)


@pytest.mark.parametrize("seed,n,window", [(0, 20, 4), (1, 17, 5), (2, 12, 1), (3, 30, 512)])
def test_longformer(seed, n, window):
    g = torch.Generator().manual_seed(seed)
    glob = (torch.rand(n, generator=g) < 0.15).to(torch.int64)
    want = as_mask(lambda h, q, k: abs(q - k) <= window / 2 or glob[q] == 1 or glob[k] == 1, 1, n)
    got = attnc.materialize_mask(
        "stdlib:longformer", n=n, window=window, inputs={"is_global": glob}
    )
    assert_same_mask(got, want)


# ================================================================ LongNet
@pytest.mark.parametrize(
    "n,segment,dilation,causal",
    [(24, 8, 2, True), (30, 8, 3, True), (27, 9, 1, False), (20, 6, 4, False), (16, 32, 2, True)],
)
def test_dilated(n, segment, dilation, causal):
    def keep(h, q, k):
        return (
            q // segment == k // segment
            and (q % segment) % dilation == (k % segment) % dilation
            and (k <= q or not causal)
        )

    got = attnc.materialize_mask(
        "stdlib:dilated", n=n, segment=segment, dilation=dilation, is_causal=causal
    )
    assert_same_mask(got, as_mask(keep, 1, n))


def torchscale_head_group(h: int, heads: int, r: int) -> int:
    """The group of head h in torchscale's DilatedAttention: heads are padded to a
    multiple of r, then split as '(r2 h)' with r2 = r the outer factor."""
    padded = heads + (-heads) % r
    layout = torch.arange(padded).view(r, padded // r)
    return int((layout == h).nonzero()[0, 0])


@pytest.mark.parametrize(
    "n,heads,segment,dilation,causal",
    [
        (24, 4, 8, 2, True),
        (30, 6, 10, 3, True),
        (20, 3, 8, 2, False),
        (18, 1, 6, 2, True),
        (26, 5, 12, 4, False),
        (16, 8, 8, 1, True),
    ],
)
def test_longnet(n, heads, segment, dilation, causal):
    def keep(h, q, k):
        j = torchscale_head_group(h, heads, dilation)
        return (
            q // segment == k // segment
            and (q % segment) % dilation == j
            and (k % segment) % dilation == j
            and (k <= q or not causal)
        )

    got = attnc.materialize_mask(
        "stdlib:longnet", n=n, heads=heads, segment=segment, dilation=dilation, is_causal=causal
    )
    assert_same_mask(got, as_mask(keep, heads, n))
    if heads % dilation == 0:  # the paper's h // (heads / r)
        for h in range(heads):
            assert torchscale_head_group(h, heads, dilation) == h // (heads // dilation)


def test_longnet_heads_cover_dilated():
    """Over the head groups, LongNet sees exactly the single-branch `dilated` mask."""
    n, heads, segment, r = 24, 4, 8, 2
    per_head = attnc.materialize_mask(
        "stdlib:longnet", n=n, heads=heads, segment=segment, dilation=r
    )
    union = per_head.any(0)
    assert_same_mask(
        union[None], attnc.materialize_mask("stdlib:dilated", n=n, segment=segment, dilation=r)
    )


# ================================================================ S2-Attention
def dkernel_mask(
    n: int, heads: int, block: int, local: int, vert: int, offset: int, kv_heads: int | None = None
) -> torch.Tensor:
    """DKernel's get_sparse_attn_mask (heterogeneous heads) made dense, with the
    lower-triangular token mask it multiplies in, cut to n tokens. With GQA
    (kv_heads), one pattern per KV head, repeated for its heads // kv_heads
    query heads; the head step always counts the query heads."""
    kv_heads = kv_heads or heads
    per_kv = heads // kv_heads
    nb = -(-n // block)
    qb = torch.arange(nb)[None, :, None]
    kb = torch.arange(nb)[None, None]
    step = max(1, int(vert / heads))
    vert_rows = [
        (torch.arange(nb) + g * step + offset) % vert == 0 for g in range(kv_heads) for _ in range(per_kv)
    ]
    vert_mask = torch.vstack(vert_rows).unsqueeze(1)
    blocks = (qb >= kb) & ((qb - kb < local) | vert_mask)  # [heads, nb, nb]
    dense = torch.kron(blocks.to(torch.int64), torch.ones(block, block, dtype=torch.int64)).bool()
    causal = torch.tril(torch.ones(nb * block, nb * block, dtype=torch.bool))
    return (dense & causal)[:, :n, :n]


@pytest.mark.parametrize(
    "n,heads,block,local,vert,offset",
    [
        (32, 4, 2, 2, 4, 1),
        (45, 3, 4, 1, 8, 1),
        (40, 2, 3, 2, 3, 0),
        (30, 8, 2, 1, 4, 1),
        (27, 1, 2, 3, 5, 2),
        (64, 16, 4, 2, 8, 1),
        (48, 4, 2, 1, 8, 0),
    ],
)
def test_s2(n, heads, block, local, vert, offset):
    got = attnc.materialize_mask(
        "stdlib:s2", n=n, heads=heads, block=block, local=local, vert=vert, offset=offset
    )
    assert_same_mask(got, dkernel_mask(n, heads, block, local, vert, offset))


@pytest.mark.parametrize("n,heads,block,local,vert", [(48, 4, 2, 1, 8), (40, 3, 2, 2, 4), (64, 8, 4, 1, 16)])
def test_s2_default_offset_is_dkernels(n, heads, block, local, vert):
    """get_sparse_attn_mask's head_sliding_offset defaults to 0."""
    got = attnc.materialize_mask("stdlib:s2", n=n, heads=heads, block=block, local=local, vert=vert)
    assert_same_mask(got, dkernel_mask(n, heads, block, local, vert, 0))


@pytest.mark.parametrize(
    "n,heads,kv_heads,block,local,vert,offset",
    [
        (48, 8, 2, 2, 1, 8, 0),
        (40, 4, 1, 2, 1, 4, 0),
        (64, 6, 3, 4, 1, 4, 1),
        (36, 4, 4, 2, 2, 8, 0),  # as many KV heads as query heads: no grouping
        (60, 16, 4, 3, 1, 8, 0),
    ],
)
def test_s2_gqa(n, heads, kv_heads, block, local, vert, offset):
    """With GQA, DKernel gives every query head its KV head's pattern."""
    got = attnc.materialize_mask(
        "stdlib:s2", n=n, heads=heads, block=block, local=local, vert=vert, offset=offset, kv_heads=kv_heads
    )
    want = dkernel_mask(n, heads, block, local, vert, offset, kv_heads)
    assert_same_mask(got, want)
    per_kv = heads // kv_heads
    for h in range(heads):  # query heads of one KV head share the pattern
        assert torch.equal(got[h], got[(h // per_kv) * per_kv])


def test_s2_gqa_runs_with_grouped_kv():
    """The GQA form through the CPU executor, K/V with kv_heads heads, against dense attention."""
    B, H, Hkv, N, D = 1, 4, 2, 24, 8
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=gen, dtype=torch.float64)
    params = dict(block=2, local=1, vert=4, kv_heads=Hkv)
    attn = attnc.compile_attention("stdlib:s2", backend="cpu", **params)
    mask = dkernel_mask(N, H, 2, 1, 4, 0, Hkv)
    rep = H // Hkv
    want = dense_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), lambda s: s, mask)
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)


def test_s2_heads_differ_and_are_causal():
    m = attnc.materialize_mask("stdlib:s2", n=64, heads=4, block=4, local=1, vert=8)
    assert not torch.equal(m[0], m[1])
    assert not torch.triu(m, diagonal=1).any()


# ================================================================ NATTEN
def natten_axis_keys(i: int, L: int, w: int, d: int, s: int, causal: bool) -> set[int]:
    """Keys of query i on one axis, as NATTEN computes them (border form)."""
    g = i % d
    Lg = -(-(L - g) // d)  # ceil((L - g) / d): the length of dilation group g
    ii = i // d
    if causal:
        leader = min((ii // s) * s + s - 1, Lg - 1)
        start, end = max(leader - w + 1, 0), ii + 1
    else:
        leader = min((ii // s) * s + s // 2, Lg - 1)
        wl = w // 2
        wr = w // 2 + (w % 2) - 1
        start = max(leader - wl, 0) + (Lg - wr - leader - 1 if leader + wr >= Lg else 0)
        end = start + w
    return {kk * d + g for kk in range(start, end)}


def natten_mask(shape, windows, dilations, strides, causals) -> torch.Tensor:
    """Multi-axis NATTEN mask on a row-major grid: a key must pass on every axis."""
    coords = list(product(*[range(L) for L in shape]))
    N = len(coords)
    out = torch.zeros(1, N, N, dtype=torch.bool)
    per_axis = [
        [natten_axis_keys(i, L, w, d, s, c) for i in range(L)]
        for L, w, d, s, c in zip(shape, windows, dilations, strides, causals, strict=True)
    ]
    for qi, qc in enumerate(coords):
        for ki, kc in enumerate(coords):
            out[0, qi, ki] = all(kc[a] in per_axis[a][qc[a]] for a in range(len(shape)))
    return out


@st.composite
def natten_axis(draw, max_len=24):
    L = draw(st.integers(1, max_len))
    w = draw(st.integers(1, L))
    d = draw(st.integers(1, L // w))
    s = draw(st.integers(1, w))
    return L, w, d, s, draw(st.booleans())


@FAST
@given(natten_axis(max_len=40))
def test_neighborhood_1d_hypothesis(axis):
    L, w, d, s, c = axis
    got = attnc.materialize_mask(
        "stdlib:neighborhood_1d", n=L, kernel_size=w, dilation=d, stride=s, is_causal=c
    )
    assert_same_mask(got, natten_mask((L,), (w,), (d,), (s,), (c,)))


@pytest.mark.parametrize(
    "L,w,d,s,c",
    [
        (32, 7, 1, 1, False),
        (32, 8, 2, 3, False),
        (33, 5, 3, 5, False),
        (17, 4, 4, 2, False),
        (30, 6, 2, 4, True),
        (25, 7, 3, 7, True),
        (20, 5, 1, 5, False),
        (9, 9, 1, 9, True),
    ],
)
def test_neighborhood_1d_cases(L, w, d, s, c):
    got = attnc.materialize_mask(
        "stdlib:neighborhood_1d", n=L, kernel_size=w, dilation=d, stride=s, is_causal=c
    )
    want = natten_mask((L,), (w,), (d,), (s,), (c,))
    assert_same_mask(got, want)
    if not c:  # NATTEN's window always holds exactly w keys
        assert (want.sum(-1) == w).all()


def test_natten_reference_matches_clamp_form():
    """The border form above equals NATTEN's centre-clamp form."""
    for L in range(1, 20):
        for w in range(1, L + 1):
            for s in range(1, w + 1):
                for i in range(L):
                    leader = min((i // s) * s + s // 2, L - 1)
                    wl, wr = w // 2, w // 2 + w % 2 - 1
                    centre = min(max(leader, wl), L - 1 - wr)
                    clamp_keys = {k for k in range(L) if -wl <= k - centre <= wr}
                    assert natten_axis_keys(i, L, w, 1, s, False) == clamp_keys


@FAST
@given(natten_axis(max_len=9), natten_axis(max_len=9))
def test_neighborhood_2d_hypothesis(ay, ax):
    (Ly, ky, dy, sy, cy), (Lx, kx, dx, sx, cx) = ay, ax
    got = attnc.materialize_mask(
        "stdlib:neighborhood_2d",
        sizes={"height": Ly, "width": Lx},
        kernel_size_y=ky,
        kernel_size_x=kx,
        dilation_y=dy,
        dilation_x=dx,
        stride_y=sy,
        stride_x=sx,
        is_causal_y=cy,
        is_causal_x=cx,
    )
    assert_same_mask(got, natten_mask((Ly, Lx), (ky, kx), (dy, dx), (sy, sx), (cy, cx)))


@pytest.mark.parametrize(
    "shape,k,d,s,c",
    [
        ((8, 8), (3, 3), (1, 1), (1, 1), (False, False)),
        ((9, 7), (4, 3), (2, 1), (2, 3), (False, False)),
        ((8, 10), (3, 5), (2, 2), (1, 5), (True, False)),
        ((7, 9), (7, 2), (1, 4), (7, 1), (False, True)),
    ],
)
def test_neighborhood_2d_cases(shape, k, d, s, c):
    got = attnc.materialize_mask(
        "stdlib:neighborhood_2d",
        sizes={"height": shape[0], "width": shape[1]},
        kernel_size_y=k[0],
        kernel_size_x=k[1],
        dilation_y=d[0],
        dilation_x=d[1],
        stride_y=s[0],
        stride_x=s[1],
        is_causal_y=c[0],
        is_causal_x=c[1],
    )
    assert_same_mask(got, natten_mask(shape, k, d, s, c))


@pytest.mark.parametrize(
    "shape,k,d,s,c",
    [
        ((4, 5, 6), (3, 3, 3), (1, 1, 1), (1, 1, 1), (False, False, False)),
        ((5, 6, 6), (2, 3, 2), (2, 2, 1), (1, 3, 2), (False, False, False)),
        ((6, 4, 5), (3, 2, 5), (1, 2, 1), (3, 1, 5), (True, False, False)),
        ((4, 7, 5), (4, 3, 2), (1, 1, 2), (2, 2, 2), (True, True, False)),
    ],
)
def test_neighborhood_3d(shape, k, d, s, c):
    got = attnc.materialize_mask(
        "stdlib:neighborhood_3d",
        sizes={"frames": shape[0], "height": shape[1], "width": shape[2]},
        kernel_size_t=k[0],
        kernel_size_y=k[1],
        kernel_size_x=k[2],
        dilation_t=d[0],
        dilation_y=d[1],
        dilation_x=d[2],
        stride_t=s[0],
        stride_y=s[1],
        stride_x=s[2],
        is_causal_t=c[0],
        is_causal_y=c[1],
        is_causal_x=c[2],
    )
    assert_same_mask(got, natten_mask(shape, k, d, s, c))


# NATTEN's own names: kernel_size, stride, dilation, is_causal, each one value or one per axis.
NATTEN_NAMES = ("kernel_size", "stride", "dilation", "is_causal")


@pytest.mark.parametrize("name,axes", [("neighborhood_1d", ""), ("neighborhood_2d", "yx"),
                                       ("neighborhood_3d", "tyx")])
def test_neighborhood_parameters_share_natten_names(name, axes):
    got = [p for p, _ in attnc.load(f"stdlib:{name}").params]
    want = list(NATTEN_NAMES) if not axes else [f"{n}_{a}" for n in NATTEN_NAMES for a in axes]
    assert got == want


def natten_args(shape, **natten):
    """NATTEN's int-or-tuple arguments, normalised to one value per axis as NATTEN does."""
    out = {}
    for key, default in (("kernel_size", None), ("stride", 1), ("dilation", 1), ("is_causal", False)):
        value = natten.get(key, default)
        out[key] = tuple(value) if isinstance(value, tuple | list) else (value,) * len(shape)
    return out


@pytest.mark.parametrize(
    "shape,natten",
    [
        ((7, 10), dict(kernel_size=(3, 5), dilation=2, is_causal=(False, True))),  # the call
        ((7, 8), dict(kernel_size=3, stride=(1, 3), is_causal=True)),
        ((8, 5), dict(kernel_size=(4, 5), stride=2, dilation=(2, 1))),
        ((4, 5, 6), dict(kernel_size=3, dilation=(1, 1, 2), is_causal=(True, False, False))),
        ((5, 4, 7), dict(kernel_size=(2, 3, 5), stride=(2, 1, 5), is_causal=(False, True, False))),
    ],
)
def test_neighborhood_natten_style_arguments(shape, natten):
    """compile_attention with NATTEN's int-or-tuple arguments gives NATTEN's mask and output."""
    name = f"stdlib:neighborhood_{len(shape)}d"
    sizes = dict(zip(("frames", "height", "width")[-len(shape):], shape, strict=True))
    a = natten_args(shape, **natten)
    want = natten_mask(shape, a["kernel_size"], a["dilation"], a["stride"], a["is_causal"])
    assert_same_mask(attnc.materialize_mask(name, sizes=sizes, **natten), want)
    N = math.prod(shape)
    q, k, v = rand_qkv(1, 2, N, 8, seed=len(shape))
    attn = attnc.compile_attention(name, sizes=sizes, backend="reference", **natten)
    expected = dense_attention(q, k, v, lambda s: s, want[0])
    torch.testing.assert_close(attn(q, k, v), expected, rtol=1e-12, atol=1e-12)


@FAST
@given(natten_axis(max_len=8), natten_axis(max_len=8))
def test_neighborhood_tuple_equals_per_axis(ay, ax):
    (Ly, ky, dy, sy, cy), (Lx, kx, dx, sx, cx) = ay, ax
    sizes = {"height": Ly, "width": Lx}
    got = attnc.materialize_mask(
        "stdlib:neighborhood_2d", sizes=sizes, kernel_size=(ky, kx), stride=[sy, sx],
        dilation=(dy, dx), is_causal=(cy, cx),
    )
    assert_same_mask(got, natten_mask((Ly, Lx), (ky, kx), (dy, dx), (sy, sx), (cy, cx)))


def test_neighborhood_1d_natten_names_and_one_tuple():
    want = natten_mask((20,), (5,), (2,), (3,), (True,))
    for kernel in (5, (5,), [5]):
        got = attnc.materialize_mask("stdlib:neighborhood_1d", n=20, kernel_size=kernel, stride=3,
                                     dilation=(2,), is_causal=True)
        assert_same_mask(got, want)


@pytest.mark.parametrize(
    "name,kwargs,where,fragment",
    [
        ("neighborhood_2d", dict(kernel_size=(3, 5, 7)), "argument kernel_size", "one per axis: y, x"),
        ("neighborhood_3d", dict(stride=(1, 2)), "argument stride", "one per axis: t, y, x"),
        ("neighborhood_2d", dict(kernel_size=3, kernel_size_x=5), "argument kernel_size_x", "given twice"),
        ("neighborhood_2d", dict(kernel_size=(3, 2.5)), "argument kernel_size", "axis x"),
        ("neighborhood_2d", dict(is_causal=(True, 1)), "argument is_causal", "axis x"),
        ("neighborhood_1d", dict(kernel_size=(3, 5)), "argument kernel_size", "one value"),
        ("neighborhood_2d", dict(ky=3), "argument ky", "no parameter"),
        ("neighborhood_1d", dict(kernel=3), "argument kernel", "no parameter"),
    ],
)
def test_neighborhood_bad_natten_arguments(name, kwargs, where, fragment):
    with pytest.raises(attnc.SpecError) as err:
        attnc.compile_attention(f"stdlib:{name}", **kwargs)
    assert err.value.where == where
    assert fragment in str(err.value)


def test_cli_takes_natten_style_parameter(capsys):
    rc = cli.main(["show", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "-p", "kernel_size=3"])
    out = capsys.readouterr().out
    assert rc == 0
    want = natten_mask((8, 8), (3, 3), (1, 1), (1, 1), (False, False))
    assert f"density {float(want.float().mean()):.3f}" in out


# ================================================================ Sliding Tile Attention
def sta_mask(shape, tiles, windows) -> torch.Tensor:
    """STA: per axis, the query tile's centre clamped to [w//2, n_tiles-1-w//2];
    key tiles within w//2 of it are kept."""
    coords = list(product(*[range(L) for L in shape]))
    N = len(coords)
    out = torch.zeros(1, N, N, dtype=torch.bool)

    def tile_range(i, L, T, w):
        n_tiles = -(-L // T)
        centre = min(max(i // T, w // 2), n_tiles - 1 - w // 2)
        return centre - w // 2, centre + w // 2

    for qi, qc in enumerate(coords):
        ranges = [tile_range(qc[a], shape[a], tiles[a], windows[a]) for a in range(3)]
        for ki, kc in enumerate(coords):
            out[0, qi, ki] = all(lo <= kc[a] // tiles[a] <= hi for a, (lo, hi) in enumerate(ranges))
    return out


def sta(shape, tiles, windows):
    return attnc.materialize_mask(
        "stdlib:sliding_tile",
        sizes={"frames": shape[0], "height": shape[1], "width": shape[2]},
        tile_t=tiles[0],
        tile_y=tiles[1],
        tile_x=tiles[2],
        wt=windows[0],
        wy=windows[1],
        wx=windows[2],
    )


@pytest.mark.parametrize(
    "shape,tiles,windows",
    [
        ((6, 8, 8), (2, 2, 2), (3, 3, 3)),
        ((4, 6, 9), (2, 2, 3), (1, 3, 3)),
        ((5, 7, 8), (2, 3, 2), (3, 3, 1)),  # non-divisible: partial last tiles
        ((6, 6, 10), (1, 2, 2), (5, 3, 5)),
        ((3, 4, 4), (3, 4, 4), (1, 1, 1)),
    ],
)
def test_sliding_tile(shape, tiles, windows):
    assert_same_mask(sta(shape, tiles, windows), sta_mask(shape, tiles, windows))


@pytest.mark.parametrize(
    "shape,tiles,windows",
    [
        ((6, 8, 8), (2, 2, 2), (3, 3, 3)),
        ((4, 6, 9), (2, 2, 3), (1, 3, 3)),
        ((6, 6, 10), (1, 2, 2), (5, 3, 5)),
        ((8, 4, 6), (2, 2, 3), (3, 1, 1)),
    ],
)
def test_sta_equals_natten_strided(shape, tiles, windows):
    """STA with tile T and window k tiles == NATTEN window k*T, stride T (T | L)."""
    ks = tuple(w * t for w, t in zip(windows, tiles, strict=True))
    ones = (1, 1, 1)
    falses = (False, False, False)
    ref_sta = sta_mask(shape, tiles, windows)
    ref_na = natten_mask(shape, ks, ones, tiles, falses)
    assert_same_mask(ref_sta, ref_na)  # the independent references agree
    got_na = attnc.materialize_mask(
        "stdlib:neighborhood_3d",
        sizes={"frames": shape[0], "height": shape[1], "width": shape[2]},
        kernel_size=ks,  # NATTEN-style: one value per axis
        stride=tiles,
    )
    assert_same_mask(sta(shape, tiles, windows), got_na)  # and so do the attnc patterns


def fastvideo_sta_mask(shape, tiles, windows) -> torch.Tensor:
    """FastVideo's reference STA mask (flex_sta_ref.py, generate_sta_mask) on a row-major
    grid, tiles dividing the axes: per axis the query tile is clamped with torch.clamp
    to [w // 2, n_tiles - 1 - w // 2] (torch: the upper bound wins when they cross),
    and key tiles within w // 2 of it are kept."""
    coords = torch.tensor(list(product(*[range(L) for L in shape])))  # [N, 3]
    keep = torch.ones(len(coords), len(coords), dtype=torch.bool)
    for a, (L, T, w) in enumerate(zip(shape, tiles, windows, strict=True)):
        n_tiles = L // T
        tile = coords[:, a] // T
        centre = tile.clamp(w // 2, (n_tiles - 1) - w // 2)
        keep &= (centre[:, None] - tile[None, :]).abs() <= w // 2
    return keep[None]


@pytest.mark.parametrize(
    "shape,tiles,windows",
    [
        ((6, 8, 8), (2, 2, 2), (2, 2, 2)),  # even windows: w // 2 tiles each side
        ((8, 6, 8), (2, 2, 2), (4, 2, 3)),
        ((4, 6, 8), (2, 2, 2), (5, 3, 4)),  # wider than the axis (2 tiles): the whole axis
        ((6, 4, 6), (2, 2, 3), (3, 6, 2)),
        ((2, 4, 4), (1, 1, 1), (8, 2, 6)),
    ],
)
def test_sliding_tile_even_and_oversized_windows(shape, tiles, windows):
    """Windows the paper does not use are defined as FastVideo's mask defines them."""
    want = fastvideo_sta_mask(shape, tiles, windows)
    assert_same_mask(sta(shape, tiles, windows), want)
    for a, (L, T, w) in enumerate(zip(shape, tiles, windows, strict=True)):
        if w >= L // T:  # the whole axis: the same as no constraint on it (one tile spanning it)
            free = fastvideo_sta_mask(shape, [L if i == a else tiles[i] for i in range(3)],
                                      [1 if i == a else windows[i] for i in range(3)])
            assert torch.equal(want, free)


def test_per_axis_family_is_generic():
    """The NATTEN-style binding is not special to NATTEN: sliding_tile's tile_t/tile_y/tile_x
    take tile=(T, Y, X) or one tile for every axis the same way."""
    shape, windows = (4, 6, 6), (1, 3, 3)
    want = fastvideo_sta_mask(shape, (2, 2, 3), windows)
    sizes = {"frames": 4, "height": 6, "width": 6}
    got = attnc.materialize_mask("stdlib:sliding_tile", sizes=sizes, tile=(2, 2, 3), wt=1, wy=3, wx=3)
    assert_same_mask(got, want)
    got = attnc.materialize_mask("stdlib:sliding_tile", sizes=sizes, tile=2, wt=1, wy=3, wx=3)
    assert_same_mask(got, fastvideo_sta_mask(shape, (2, 2, 2), windows))


def test_sliding_tile_header_defines_every_window():
    text = (STDLIB_DIR / "sliding_tile.attn").read_text(encoding="utf-8")
    assert "each odd" not in text  # the old header claimed odd windows and accepted any
    assert "even" in text and "n_tiles" in text


# ================================================================ Radial Attention
def radial_mask(F: int, P: int, decay_factor: float, block: int, sink: bool) -> torch.Tensor:
    """Radial Attention's token mask (gen_log_mask_shrinked before block shrinking),
    per radial.attn's header: frames within distance 1 are dense; farther frame pairs
    keep a band |s_q - s_k| <= w on frames whose distance passes the split test."""
    out = torch.zeros(1, F * P, F * P, dtype=torch.bool)
    s_idx = torch.arange(P)
    for i in range(F):
        for j in range(F):
            dist = abs(i - j)
            if (sink and j == 0) or dist <= 1:
                local = torch.ones(P, P, dtype=torch.bool)
            else:
                group = dist.bit_length()
                decay_length = 2 ** P.bit_length() / 2**group
                width = max(decay_length * decay_factor, block)
                local = (s_idx[None, :] - s_idx[:, None]).abs() <= width
                if decay_length < block:
                    split_factor = int(block / decay_length)
                    if dist % split_factor != 0:
                        local = torch.zeros(P, P, dtype=torch.bool)
            out[0, i * P : (i + 1) * P, j * P : (j + 1) * P] = local
    return out


@pytest.mark.parametrize(
    "F,P,decay_factor,block,sink",
    [
        (10, 20, 1.0, 4, False),
        (10, 20, 0.5, 6, True),
        (9, 33, 1.0, 8, False),
        (12, 16, 0.3, 2, False),
        (6, 12, 2.0, 3, True),
        (11, 24, 1.0, 16, False),
        (8, 5, 1.0, 8, True),
        (3, 7, 1.0, 128, False),
    ],
)
def test_radial(F, P, decay_factor, block, sink):
    got = attnc.materialize_mask(
        "stdlib:radial",
        sizes={"frames": F, "per_frame": P},
        decay_factor=decay_factor,
        block=block,
        sink=sink,
    )
    assert_same_mask(got, radial_mask(F, P, decay_factor, block, sink))


def test_radial_is_sparser_far_away():
    F, P = 16, 32
    m = attnc.materialize_mask("stdlib:radial", sizes={"frames": F, "per_frame": P}, block=4)[0]
    density = [m[0:P, j * P : (j + 1) * P].float().mean().item() for j in range(F)]
    assert density[0] == density[1] == 1.0
    assert density[2] > density[4] > density[8]


def test_radial_wan_keeps_adjacent_frames_whole():
    """The current radial-attention code (get_window_width) gives adjacent frames the
    full window P for Wan as for HunyuanVideo; only its first revision narrowed
    them to P // 2 for Wan, which the header must not present as current."""
    F, P, block = 5, 40, 4
    m = attnc.materialize_mask(
        "stdlib:radial", sizes={"frames": F, "per_frame": P}, block=block, sink=True
    )[0]
    for i in range(F - 1):
        assert m[i * P : (i + 1) * P, (i + 1) * P : (i + 2) * P].all()
        assert m[(i + 1) * P : (i + 2) * P, i * P : (i + 1) * P].all()
    text = (STDLIB_DIR / "radial.attn").read_text(encoding="utf-8")
    assert "code also narrows adjacent frames" not in text
    assert "3f66894" in text  # the revision that did


# ================================================================ score terms
def dense_attention(q, k, v, scores_fn, mask):
    """softmax over allowed keys of scores_fn(raw scaled scores), zero rows for empty masks."""
    s = scores_fn((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]))
    s = s.masked_fill(~mask, -math.inf)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    return p @ v


def rand_qkv(B, H, N, D, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(
        scale * torch.randn(B, H, N, D, generator=g, dtype=torch.float64) for _ in range(3)
    )


@pytest.mark.parametrize(
    "B,H,N,D,seed",
    [(2, 4, 13, 8, 0), (1, 3, 20, 16, 1), (1, 8, 7, 4, 2), (1, 5, 9, 4, 3), (1, 6, 9, 4, 4),
     (1, 12, 6, 4, 5), (1, 1, 5, 4, 6)],
)
def test_alibi(B, H, N, D, seed):
    """Any head count, with ALiBi's get_slopes rule for non-powers of two."""
    q, k, v = rand_qkv(B, H, N, D, seed)
    attn = attnc.compile_attention("stdlib:alibi", backend="reference")
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
    dist = torch.arange(N)[:, None] - torch.arange(N)[None, :]
    bias = -slopes[:, None, None] * dist
    mask = torch.tril(torch.ones(N, N, dtype=torch.bool))
    want = dense_attention(q, k, v, lambda s: s + bias, mask)
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cap,seed", [(50.0, 0), (2.0, 1), (0.5, 2)])
def test_softcap(cap, seed):
    q, k, v = rand_qkv(2, 3, 15, 8, seed, scale=4.0)  # large scores so the cap matters
    attn = attnc.compile_attention("stdlib:softcap", backend="reference", cap=cap)
    mask = torch.tril(torch.ones(15, 15, dtype=torch.bool))
    want = dense_attention(q, k, v, lambda s: cap * torch.tanh(s / cap), mask)
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)
    if cap < 5:
        uncapped = dense_attention(q, k, v, lambda s: s, mask)
        assert not torch.allclose(want, uncapped, atol=1e-3)


@pytest.mark.parametrize("B,H,N,D,seed,batched", [(2, 3, 14, 8, 0, False), (2, 2, 11, 4, 1, True)])
def test_forgetting(B, H, N, D, seed, batched):
    q, k, v = rand_qkv(B, H, N, D, seed)
    g_gen = torch.Generator().manual_seed(100 + seed)
    shape = (B, H, N) if batched else (H, N)
    gates = torch.nn.functional.logsigmoid(
        torch.randn(*shape, generator=g_gen, dtype=torch.float64)
    )
    gb = gates if batched else gates.expand(B, H, N)
    bias = torch.zeros(B, H, N, N, dtype=torch.float64)
    for i in range(N):
        for j in range(i + 1):
            bias[:, :, i, j] = gb[:, :, j + 1 : i + 1].sum(-1)  # sum of g over k+1 .. q
    mask = torch.tril(torch.ones(N, N, dtype=torch.bool))
    want = dense_attention(q, k, v, lambda s: s + bias, mask)
    attn = attnc.compile_attention("stdlib:forgetting", backend="reference")
    torch.testing.assert_close(attn(q, k, v, g=gates), want, rtol=1e-12, atol=1e-12)


# ================================================================ routing
def moba_reference(q, k, v, block, topk):
    """MoBA's gate: q . mean(K_b) per query token; future blocks -inf, own block
    +inf; top-k blocks (own counted); then a token-level causal mask."""
    B, H, N, D = q.shape
    nb = -(-N // block)
    means = torch.stack([k[:, :, b * block : (b + 1) * block].mean(2) for b in range(nb)], dim=2)
    gate = q @ means.transpose(-1, -2)  # [B, H, N, nb]
    starts = torch.arange(nb) * block
    pos = torch.arange(N)
    gate = gate.masked_fill(starts[None, :] > pos[:, None], -math.inf)
    own = (pos // block)[:, None] == torch.arange(nb)[None, :]
    gate = gate.masked_fill(own, math.inf)
    chosen = torch.topk(gate, min(topk, nb), dim=-1).indices
    selected = torch.zeros(B, H, N, nb, dtype=torch.bool).scatter_(-1, chosen, True)
    mask = selected[..., pos // block] & (pos[None, :] <= pos[:, None])
    return dense_attention(q, k, v, lambda s: s, mask), mask


@pytest.mark.parametrize(
    "B,H,N,D,block,topk,seed",
    [
        (2, 2, 32, 8, 4, 3, 0),
        (1, 3, 30, 8, 4, 2, 1),
        (1, 2, 25, 16, 5, 1, 2),
        (2, 1, 20, 4, 3, 10, 3),
    ],
)
def test_moba(B, H, N, D, block, topk, seed):
    q, k, v = rand_qkv(B, H, N, D, seed)
    want, mask = moba_reference(q, k, v, block, topk)
    attn = attnc.compile_attention("stdlib:moba", backend="reference", block=block, topk=topk)
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)
    if topk < -(-N // block) - 1:  # routing really drops blocks here
        assert not mask.equal(torch.tril(torch.ones(N, N, dtype=torch.bool)).expand_as(mask))


def biformer_reference(q, k, v, Hh, Ww, region, topk):
    """BiFormer: region means of q and k over all channels (heads concatenated),
    affinity q_r . k_r, top-k key regions per query region, no other mask."""
    B, H, N, D = q.shape
    qa = q.permute(0, 2, 1, 3).reshape(B, N, H * D)
    ka = k.permute(0, 2, 1, 3).reshape(B, N, H * D)
    ny, nx = Hh // region, Ww // region
    rid = torch.tensor([(y // region) * nx + (x // region) for y in range(Hh) for x in range(Ww)])
    R = ny * nx
    q_r = torch.stack([qa[:, rid == r].mean(1) for r in range(R)], dim=1)
    k_r = torch.stack([ka[:, rid == r].mean(1) for r in range(R)], dim=1)
    affinity = q_r @ k_r.transpose(-1, -2)  # [B, R, R]
    chosen = torch.topk(affinity, topk, dim=-1).indices
    routed = torch.zeros(B, R, R, dtype=torch.bool).scatter_(-1, chosen, True)
    mask = routed[:, rid][:, :, rid]  # [B, N, N]
    return dense_attention(q, k, v, lambda s: s, mask[:, None]), mask


@pytest.mark.parametrize(
    "B,H,Hh,Ww,D,region,topk,seed",
    [
        (2, 2, 8, 8, 8, 2, 3, 0),
        (1, 4, 8, 12, 4, 4, 2, 1),
        (2, 3, 6, 6, 8, 3, 1, 2),
        (1, 2, 4, 8, 8, 2, 8, 3),
    ],
)
def test_biformer(B, H, Hh, Ww, D, region, topk, seed):
    q, k, v = rand_qkv(B, H, Hh * Ww, D, seed)
    want, mask = biformer_reference(q, k, v, Hh, Ww, region, topk)
    attn = attnc.compile_attention(
        "stdlib:biformer",
        backend="reference",
        region=region,
        topk=topk,
        sizes={"height": Hh, "width": Ww},
    )
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)
    regions = (Hh // region) * (Ww // region)
    assert (mask.sum(-1) == topk * region * region).all() if topk <= regions else mask.all()


def test_biformer_own_region_not_forced():
    """A construction where a region's best match is another region."""
    Hh = Ww = 4
    region, H, D = 2, 1, 4
    N = Hh * Ww
    q = torch.zeros(1, H, N, D, dtype=torch.float64) + 0.01 * torch.arange(
        N * D, dtype=torch.float64
    ).view(1, 1, N, D)
    k = q.clone()
    k[..., 0] -= 5.0  # every key region scores low ...
    rid = torch.tensor([(y // 2) * 2 + (x // 2) for y in range(Hh) for x in range(Ww)])
    k[:, :, rid == 3, 0] += 20.0  # ... except region 3, which every query region picks
    q[..., 0] += 1.0
    v = torch.randn(1, H, N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    want, mask = biformer_reference(q, k, v, Hh, Ww, region, 1)
    assert not mask[0, 0, 0]  # query region 0 does not see itself
    attn = attnc.compile_attention(
        "stdlib:biformer",
        backend="reference",
        region=region,
        topk=1,
        sizes={"height": Hh, "width": Ww},
    )
    torch.testing.assert_close(attn(q, k, v), want, rtol=1e-12, atol=1e-12)


# ================================================================ recurrences
def closed_form(q, k, v, c, scale, S0=None):
    """Scalar gates: O = scale * ((Q K^T) * D) V with D_ij = exp(c_i - c_j), i >= j;
    plus the initial state's contribution scale * exp(c_i) q_i S0. Final state
    S_T = exp(c_T) S0 + sum_j exp(c_T - c_j) k_j^T v_j."""
    N = q.shape[2]
    tril = torch.tril(torch.ones(N, N, dtype=torch.bool))
    diff = c[..., :, None] - c[..., None, :]
    D = torch.where(
        tril, torch.exp(torch.where(tril, diff, torch.zeros_like(diff))), torch.zeros_like(diff)
    )
    out = scale * ((q @ k.transpose(-1, -2)) * D) @ v
    last = c[..., -1:]  # [.., 1]
    state = (k * torch.exp(last - c)[..., None]).transpose(-1, -2) @ v
    if S0 is not None:
        out = out + scale * torch.exp(c)[..., None] * (q @ S0)
        state = state + torch.exp(last)[..., None] * S0
    return out, state


def run_recurrence(name, q, k, v, **kw):
    attn = attnc.compile_attention(f"stdlib:{name}", backend="reference")
    return attn(q, k, v, return_state=True, **kw)


@pytest.mark.parametrize("H,seed", [(4, 0), (3, 1)])
def test_retention(H, seed):
    B, N, D = 2, 12, 8
    q, k, v = rand_qkv(B, H, N, D, seed)
    g = torch.tensor([math.log(1 - 2 ** (-5 - h)) for h in range(H)], dtype=torch.float64)
    c = g.view(1, H, 1) * torch.arange(1, N + 1, dtype=torch.float64)
    want, want_state = closed_form(q, k, v, c.expand(B, H, N), D**-0.5)
    out, state = run_recurrence("retention", q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, want_state, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("H,seed", [(8, 0), (3, 1), (5, 2), (6, 3), (12, 4), (1, 5)])
def test_lightning(H, seed):
    """Slopes of Lightning Attention's _build_slope_tensor (ALiBi's rule) for any head count."""
    B, N, D = 1, 15, 4
    q, k, v = rand_qkv(B, H, N, D, seed)
    S0 = torch.randn(B, H, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    slopes = torch.tensor(alibi_slopes(H), dtype=torch.float64)
    c = -slopes.view(1, H, 1) * torch.arange(1, N + 1, dtype=torch.float64)
    want, want_state = closed_form(q, k, v, c.expand(B, H, N), D**-0.5, S0)
    out, state = run_recurrence("lightning", q, k, v, initial_state=S0)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, want_state, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("H", [3, 8])
def test_lightning_matches_the_unscaled_reference_with_scale_1(H):
    """Lightning's reference (linear_attn): O = ((Q K^T) * M) V, M[i, j] = exp(-s_h (i - j))
    for j <= i, no 1/sqrt(d); attnc reproduces it with scale=1.0 (and differs by default)."""
    B, N, D = 2, 11, 8
    q, k, v = rand_qkv(B, H, N, D, 7)
    i = torch.arange(N, dtype=torch.float64)
    dist = i[:, None] - i[None, :]
    want = torch.zeros(B, H, N, D, dtype=torch.float64)
    for h, s in enumerate(alibi_slopes(H)):
        M = torch.where(dist >= 0, torch.exp(-s * dist.clamp(min=0)), torch.zeros_like(dist))
        want[:, h] = ((q[:, h] @ k[:, h].transpose(-1, -2)) * M) @ v[:, h]
    attn = attnc.compile_attention("stdlib:lightning", backend="reference")
    torch.testing.assert_close(attn(q, k, v, scale=1.0), want, rtol=1e-11, atol=1e-11)
    assert not torch.allclose(attn(q, k, v), want)  # the default scale is 1/sqrt(dk)
    text = (STDLIB_DIR / "lightning.attn").read_text(encoding="utf-8")
    assert "scale=1.0" in text  # the header says how to match it


@pytest.mark.parametrize("H,layer_idx,num_layers,seed", [(4, 0, 1, 0), (3, 2, 12, 1), (6, 5, 6, 2), (8, 7, 24, 3)])
def test_lightning_fla(H, layer_idx, num_layers, seed):
    """flash-linear-attention's chunk_lightning_attn: log decay
    -(8 / H * (1 - layer_idx / num_layers)) * h per head (head 0 never decays)."""
    B, N, D = 2, 13, 4
    q, k, v = rand_qkv(B, H, N, D, seed)
    S0 = torch.randn(B, H, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    g = torch.tensor([-(8 / H * (1 - layer_idx / num_layers)) * h for h in range(H)], dtype=torch.float64)
    assert g[0] == 0
    c = g.view(1, H, 1) * torch.arange(1, N + 1, dtype=torch.float64)
    want, want_state = closed_form(q, k, v, c.expand(B, H, N), D**-0.5, S0)
    attn = attnc.compile_attention(
        "stdlib:lightning_fla", backend="reference", layer_idx=layer_idx, num_layers=num_layers
    )
    out, state = attn(q, k, v, initial_state=S0, return_state=True)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, want_state, rtol=1e-11, atol=1e-11)


def test_lightning_header_describes_fla_correctly():
    """The old header said fla 'scales the slopes by layer depth'; fla's decay is linear in h."""
    text = (STDLIB_DIR / "lightning.attn").read_text(encoding="utf-8")
    assert "TransNormerLLM and fla also\n# scale the slopes" not in text
    assert "stdlib:lightning_fla" in text


@pytest.mark.parametrize("batched,seed", [(False, 0), (True, 1)])
def test_mamba2(batched, seed):
    B, H, N, D = 2, 3, 14, 8
    q, k, v = rand_qkv(B, H, N, D, seed)
    gen = torch.Generator().manual_seed(50 + seed)
    shape = (B, H, N) if batched else (H, N)
    g = -torch.nn.functional.softplus(torch.randn(*shape, generator=gen, dtype=torch.float64))
    S0 = torch.randn(B, H, D, D, dtype=torch.float64, generator=gen)
    c = torch.cumsum(g if batched else g.expand(B, H, N), dim=-1)
    want, want_state = closed_form(q, k, v, c, D**-0.5, S0)
    out, state = run_recurrence("mamba2", q, k, v, g=g, initial_state=S0)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, want_state, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("seed", [0, 1])
def test_gla(seed):
    """Vector gates: the parallel form o_t = scale * sum_{j<=t} sum_c q_t[c] k_j[c]
    exp(C_t[c] - C_j[c]) v_j with C = cumsum(g), written as an explicit loop."""
    B, H, N, Dk, Dv = 1, 2, 9, 4, 3
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, Dk, generator=gen, dtype=torch.float64)
    k = torch.randn(B, H, N, Dk, generator=gen, dtype=torch.float64)
    v = torch.randn(B, H, N, Dv, generator=gen, dtype=torch.float64)
    g = (
        torch.nn.functional.logsigmoid(torch.randn(H, N, Dk, generator=gen, dtype=torch.float64))
        / 16
    )
    S0 = torch.randn(B, H, Dk, Dv, generator=gen, dtype=torch.float64)
    scale = Dk**-0.5
    C = torch.cumsum(g, dim=1)  # [H, N, Dk]
    want = torch.zeros(B, H, N, Dv, dtype=torch.float64)
    want_state = torch.zeros(B, H, Dk, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for t in range(N):
                acc = torch.zeros(Dv, dtype=torch.float64)
                for j in range(t + 1):
                    for ch in range(Dk):
                        acc += (
                            q[b, h, t, ch]
                            * k[b, h, j, ch]
                            * math.exp(C[h, t, ch] - C[h, j, ch])
                            * v[b, h, j]
                        )
                for ch in range(Dk):
                    acc += q[b, h, t, ch] * math.exp(C[h, t, ch]) * S0[b, h, ch]
                want[b, h, t] = scale * acc
            for ch in range(Dk):
                want_state[b, h, ch] = math.exp(C[h, -1, ch]) * S0[b, h, ch] + sum(
                    math.exp(C[h, -1, ch] - C[h, j, ch]) * k[b, h, j, ch] * v[b, h, j]
                    for j in range(N)
                )
    out, state = run_recurrence("gla", q, k, v, g=g, initial_state=S0)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(state, want_state, rtol=1e-11, atol=1e-11)


# ----------------------------------------------------------------- Swin windows and HaloNet blocks
def swin_mask(H: int, W: int, window: int, shift: int) -> torch.Tensor:
    """Swin's W-MSA / SW-MSA as its code computes it (microsoft/Swin-Transformer, SwinTransformerBlock):
    the window clipped to min(H, W) with the shift then 0, the grid rolled by (-shift, -shift), windows of
    the rolled grid, the region mask of the slices (0, -w), (-w, -s), (-s, None) inside each window, the
    roll undone. bool [1, H*W, H*W] over the grid's own token order. The window divides H and W."""
    if min(H, W) <= window:
        window, shift = min(H, W), 0
    token = torch.arange(H * W).view(H, W)
    region = torch.zeros(H, W, dtype=torch.int64)
    if shift > 0:
        cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, (hs, ws) in enumerate(product(cuts, cuts)):
            region[hs, ws] = i
    rolled = torch.roll(token, shifts=(-shift, -shift), dims=(0, 1))
    mask = torch.zeros(H * W, H * W, dtype=torch.bool)
    for wy in range(H // window):
        for wx in range(W // window):
            cut = (slice(wy * window, (wy + 1) * window), slice(wx * window, (wx + 1) * window))
            members, regions = rolled[cut].flatten(), region[cut].flatten()
            same = regions[:, None] == regions[None, :]
            mask[members[:, None], members[None, :]] = same
    return mask[None]


def halo_mask(H: int, W: int, block: int, halo: int) -> torch.Tensor:
    """HaloNet's blocks as lucidrains/halonet-pytorch forms them: each block of block x block queries against
    the keys F.unfold takes around it (kernel block + 2 halo, stride block, padding halo), the padding
    masked. bool [1, H*W, H*W]. The block divides H and W."""
    span = block + 2 * halo
    ids = torch.arange(H * W, dtype=torch.float64).view(1, 1, H, W) + 1  # 0 marks the padding
    keys = torch.nn.functional.unfold(ids, kernel_size=span, stride=block, padding=halo)[0].long() - 1
    queries = torch.nn.functional.unfold(ids, kernel_size=block, stride=block)[0].long() - 1
    mask = torch.zeros(H * W, H * W, dtype=torch.bool)
    for b in range(queries.shape[1]):
        real = keys[:, b][keys[:, b] >= 0]
        mask[queries[:, b][:, None], real[None, :]] = True
    return mask[None]


@settings(max_examples=15, deadline=None)
@given(wy=st.integers(1, 4), wx=st.integers(1, 4), window=st.integers(1, 6), data=st.data())
def test_window_2d_is_swin_shifted_windows(wy, wx, window, data):
    """Windows that divide the grid, every shift the code admits (0 <= shift < window), and windows of the
    whole smaller axis or more (the code's clip)."""
    H, W = wy * window, wx * window
    shift = data.draw(st.integers(0, window - 1))
    got = attnc.materialize_mask("stdlib:window_2d", sizes={"height": H, "width": W}, window=window, shift=shift)
    assert_same_mask(got, swin_mask(H, W, window, shift))
    side = min(H, W)
    if H % side == 0 and W % side == 0:  # the code's clipped window must divide the grid too
        big = data.draw(st.integers(side, side + 3))
        got = attnc.materialize_mask("stdlib:window_2d", sizes={"height": H, "width": W}, window=big, shift=shift)
        assert_same_mask(got, swin_mask(H, W, big, shift))


@FAST
@given(H=st.integers(1, 11), W=st.integers(1, 11), window=st.integers(1, 5), shift=st.integers(0, 9))
def test_window_2d_partial_windows_and_large_shifts(H, W, window, shift):
    """Any grid: the runs [j * w - s, (j + 1) * w - s) of each axis cut at the borders, the shift modulo the
    window (a loop over token pairs)."""
    small = min(H, W) <= window
    w = min(H, W) if small else window
    s = 0 if small else shift % w
    keep = lambda h, q, k: ((q // W - s) // w == (k // W - s) // w) and ((q % W - s) // w == (k % W - s) // w)  # noqa: E731
    got = attnc.materialize_mask("stdlib:window_2d", sizes={"height": H, "width": W}, window=window, shift=shift)
    assert_same_mask(got, as_mask(keep, 1, H * W))


@FAST
@given(by=st.integers(1, 4), bx=st.integers(1, 4), block=st.integers(1, 4), halo=st.integers(0, 5))
def test_halo_2d_is_halonet_blocks(by, bx, block, halo):
    H, W = by * block, bx * block
    got = attnc.materialize_mask("stdlib:halo_2d", sizes={"height": H, "width": W}, block=block, halo=halo)
    assert_same_mask(got, halo_mask(H, W, block, halo))


@FAST
@given(H=st.integers(1, 11), W=st.integers(1, 11), block=st.integers(1, 5), halo=st.integers(0, 4))
def test_halo_2d_partial_blocks(H, W, block, halo):
    """Any grid: a partial last block is a block; keys within the halo of its block's span, cut at the grid."""
    def near(qc, kc):
        start = qc // block * block
        return start - halo <= kc < start + block + halo

    keep = lambda h, q, k: near(q // W, k // W) and near(q % W, k % W)  # noqa: E731
    got = attnc.materialize_mask("stdlib:halo_2d", sizes={"height": H, "width": W}, block=block, halo=halo)
    assert_same_mask(got, as_mask(keep, 1, H * W))


# ----------------------------------------------------------------- MoA's per-head elastic bands
def moa_mask(n: int, alphas, betas, new_tokens: int, block: int, minimum: int) -> torch.Tensor:
    """MoA's prefill mask as thu-nics/MoA computes it (cache_utils: the per-head cache size C =
    block * ceil(max(min(int(alpha + beta * N), N), minimum) / block), N = n + new tokens, its first block
    the sink; the block-sparse prefill kernel: global blocks sink // block, band blocks (C - sink) // block
    ending at the query's block, causal). bool [heads, n, n]."""
    out = torch.zeros(len(alphas), n, n, dtype=torch.bool)
    total = n + new_tokens
    for h, (alpha, beta) in enumerate(zip(alphas, betas, strict=True)):
        cache = math.ceil(max(min(int(alpha + total * beta), total), minimum) / block) * block
        sink = min(cache, block)
        band, globals_ = (cache - sink) // block, sink // block
        for q in range(n):
            for k in range(q + 1):
                out[h, q, k] = k // block < globals_ or k // block >= q // block - band + 1
    return out


@FAST
@given(n=st.integers(1, 70), block=st.integers(1, 8), minimum=st.integers(0, 24), new=st.integers(0, 40),
       heads=st.lists(st.tuples(st.integers(-60, 80), st.sampled_from([0.0, 0.1, 0.125, 0.3, 0.5, 1.0])),
                      min_size=1, max_size=4))
def test_moa_is_the_codes_per_head_bands(n, block, minimum, new, heads):
    alphas, betas = [a for a, _ in heads], [b for _, b in heads]
    got = attnc.materialize_mask("stdlib:moa", n=n, heads=len(heads), alpha=alphas, beta=betas,
                                 max_new_tokens=new, block=block, minimum=minimum)
    assert_same_mask(got, moa_mask(n, alphas, betas, new, block, minimum))


def test_per_head_parameters_are_checked_by_name():
    """A list for a NAME[heads] parameter: every value checked (named by its index), the call's head count
    must be the list's length; a plain value serves every head."""
    with pytest.raises(attnc.SpecError, match="must be at least 0") as err:
        attnc.load("stdlib:moa", beta=[0.5, -0.1])
    assert err.value.where == "argument beta[1]"
    with pytest.raises(attnc.SpecError, match="empty list") as err:
        attnc.load("stdlib:moa", alpha=[])
    assert err.value.where == "argument alpha"
    pat = attnc.load("stdlib:moa", alpha=[64, 128, 256], block=16)
    assert pat.head_params == (("alpha", 3),)
    with pytest.raises(attnc.SpecError, match="3 values, one per head, but the call has 2 heads") as err:
        attnc.materialize_mask(pat, n=64, heads=2)
    assert err.value.where == "argument alpha"
    attn = attnc.compile_attention(pat, backend="cpu")
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(attnc.SpecError, match="one per head") as err:
        attn(q, q, q)
    assert err.value.where == "argument alpha"
    same = attnc.materialize_mask("stdlib:moa", n=64, heads=3, alpha=[64, 64, 64], block=16)
    assert torch.equal(same, attnc.materialize_mask("stdlib:moa", n=64, heads=3, alpha=64, block=16))
    with pytest.raises(attnc.SpecError, match="'\\[heads\\]', not '\\[n\\]'"):
        attnc.load("pattern p(w[n] = 1)\n  tokens seq\n  mask causal")
    # a pattern given a list passes it on to a pattern it calls: every head's value meets the callee's bound
    calls = ("pattern inner(block >= 1 = 4)\n  tokens seq\n  mask q // block == k // block\n"
             "pattern outer(a[heads] = 4)\n  tokens seq\n  mask inner(block = a)\n")
    with pytest.raises(attnc.SpecError, match="'block' of 'inner' must be at least 1, got 0") as err:
        attnc.load(calls, name="outer", a=[3, 0])
    assert err.value.where == "argument a"
    per_block = attnc.materialize_mask(attnc.load(calls, name="outer", a=[3, 2]), n=4, heads=2)
    assert per_block.sum(dim=(1, 2)).tolist() == [10, 8]  # blocks {0, 1, 2}, {3}; and {0, 1}, {2, 3}
    with pytest.raises(attnc.SpecError, match="a bool takes one value for every head") as err:
        attnc.load("pattern p(f[heads] = false)\n  tokens seq\n  mask causal and f", f=[True, False])
    assert err.value.where == "argument f"
    # where the head count is not known yet (compile time, a shard order), nothing is refused
    grid = "pattern g(r[heads] >= 0 = 1)\n  tokens grid(y: height, x: width)\n  mask abs(q.y - k.y) <= r"
    attn = attnc.compile_attention(grid, backend="cpu", r=[0, 1], sizes={"height": 4, "width": 4})
    out = attn(*(torch.randn(1, 2, 16, 8) for _ in range(3)))
    assert out.shape == (1, 2, 16, 8)
    with pytest.raises(attnc.SpecError, match="one value per head is taken by softmax patterns"):
        attnc.load("recurrence r(c[heads] = 0.5)\n  decay c", c=[0.5, 0.25])


# ----------------------------------------------------------------- FreeSwim's inward spatial window
def freeswim_mask(T: int, H: int, W: int, d_h: int, d_w: int) -> torch.Tensor:
    """FreeSwim's window as WillWu111/FreeSwim (9f35a72f, ``init_mask_flex``) writes its mask_mod over the
    flattened (t, h, w) latent: the window of half-width d on each side grown on the inner side by what the
    border cuts off (``d_b``, ``d_u``, ``d_r``, ``d_l``); the frame index is not read. bool [1, n, n]."""
    n = T * H * W
    idx = torch.arange(n)
    h, w = idx % (H * W) // W, idx % W
    qh, qw, kh, kw = h[:, None], w[:, None], h[None, :], w[None, :]
    below = (d_h - qh).clamp_min(0)
    above = (d_h + qh - H + 1).clamp_min(0)
    right = (d_w - qw).clamp_min(0)
    left = (d_w + qw - W + 1).clamp_min(0)
    keep = ((kh <= qh + d_h + below) & (kh >= qh - d_h - above)
            & (kw <= qw + d_w + right) & (kw >= qw - d_w - left))
    return keep[None]


@FAST
@given(T=st.integers(1, 3), H=st.integers(1, 12), W=st.integers(1, 12), d_h=st.integers(0, 7), d_w=st.integers(0, 7))
def test_freeswim_is_the_codes_window(T, H, W, d_h, d_w):
    got = attnc.materialize_mask("stdlib:freeswim", sizes={"frames": T, "height": H, "width": W},
                                 half_height=d_h, half_width=d_w)
    assert_same_mask(got, freeswim_mask(T, H, W, d_h, d_w))


def test_freeswim_is_natten_with_every_frame():
    """Where the window fits the frame it is NATTEN's window of kernel 2d + 1 on y and x, every frame in t."""
    sizes = {"frames": 3, "height": 7, "width": 9}
    got = attnc.materialize_mask("stdlib:freeswim", sizes=sizes, half_height=2, half_width=3)
    natten = attnc.materialize_mask("stdlib:neighborhood_3d", sizes=sizes, kernel_size_t=3, kernel_size_y=5,
                                    kernel_size_x=7)
    assert_same_mask(got, natten)


def test_freeswim_with_the_codes_scale_is_its_windowed_attention():
    """The windowed branch as the code calls it: its mask, scale sqrt(log(3120) / log(1560) / head_dim)."""
    T, H, W, d = 2, 5, 6, 8
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, T * H * W, d, generator=g, dtype=torch.float64) for _ in range(3))
    scale = math.sqrt(math.log(30 * 52 * 2, 30 * 52) / d)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~freeswim_mask(T, H, W, 1, 2), float("-inf"))
    want = torch.softmax(scores, dim=-1) @ v
    attn = attnc.compile_attention("stdlib:freeswim", half_height=1, half_width=2, backend="cpu",
                                   sizes={"frames": T, "height": H, "width": W})
    torch.testing.assert_close(attn(q, k, v, scale=scale), want, rtol=1e-12, atol=1e-12)
