"""The decode-step bound (``compiler.cost.decode_cost``, ``runtime.api.simulate_decode``, ``attnc sim --decode``).

References are independent of the module: the keys a step reads come from the exact mask
(``evaluate.mask_tensor``) and plain Python loops over its tiles; a sliding window's also from its
rule; bytes from the formula written out; the split-KV rule from a closed-form makespan of identical
programs and a naive search over split counts.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.cost import decode_cost as D
from attnc.compiler.cost.hardware import get_hardware
from attnc.runtime.api import simulate_decode

FAST = settings(max_examples=20, deadline=None)
CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"
PATTERNS = {  # name -> (source, parameters) at small sizes
    "sliding_window": ("stdlib:sliding_window", {"window": 37}),
    "causal": (CAUSAL, {}),
    "streaming": ("stdlib:streaming", {"window": 29, "sinks": 5}),
    "dilated": ("stdlib:dilated", {"segment": 24, "dilation": 3}),
    "longnet": (
        "stdlib:longnet",
        {"segment": 24, "dilation": 2},
    ),  # per-head offsets: the group's union
}


def brute_force(mask: torch.Tensor, kv_heads: int, q_tile: int, kv_tile: int):
    """From the exact mask ``[heads, n, nk]``: per K/V head, the KV tiles and keys in them each Q tile
    reaches (any query of the tile, any query head of the group) and the distinct keys over Q tiles."""
    heads, n, nk = mask.shape
    grouped = mask.view(kv_heads, heads // kv_heads, n, nk).any(1)
    tiles, keys, distinct = [], [], []
    for g in range(kv_heads):
        row_tiles, row_keys, union = [], [], set()
        for start in range(0, n, q_tile):
            reached = grouped[g, start : start + q_tile].any(0).tolist()
            touched = {j // kv_tile for j in range(nk) if reached[j]}
            row_tiles.append(len(touched))
            row_keys.append(sum(min(kv_tile, nk - t * kv_tile) for t in touched))
            union |= touched
        tiles.append(row_tiles)
        keys.append(row_keys)
        distinct.append(sum(min(kv_tile, nk - t * kv_tile) for t in union))
    return tiles, keys, distinct


def per_kv_head(visit: D.DecodeVisit, values: torch.Tensor) -> list:
    return values.repeat_interleave(visit.repeat, 0).tolist()


@FAST
@given(
    name=st.sampled_from(sorted(PATTERNS)),
    nk=st.integers(1, 260),
    n=st.integers(1, 6),
    q_tile=st.sampled_from([1, 2, 4, 64]),
    kv_tile=st.sampled_from([8, 16, 32]),
    kv_heads=st.sampled_from([1, 2]),
)
def test_visited_keys_equal_the_masks_brute_force(name, nk, n, q_tile, kv_tile, kv_heads):
    source, params = PATTERNS[name]
    pat = attnc.load(source, **params)
    n = min(n, nk)
    heads = 4
    bound = D.decode_bound(pat, n=n, nk=nk, heads=heads, sizes=None, head_dim=16)
    assert (bound.n, bound.nk, bound.q_offset) == (n, nk, nk - n)
    visit = D.visited_tiles(pat, bound, kv_heads=kv_heads, kv_tile=kv_tile, q_tile=q_tile)
    mask = E.mask_tensor(pat, bound)[0]  # the queries are the last n tokens
    tiles, keys, distinct = brute_force(mask, kv_heads, min(q_tile, n), kv_tile)
    assert per_kv_head(visit, visit.tiles) == tiles
    assert per_kv_head(visit, visit.keys) == keys
    assert per_kv_head(visit, visit.distinct) == distinct
    assert visit.key_reads() == sum(map(sum, keys))
    rows = [min(q_tile, n - s) for s in range(0, n, min(q_tile, n))]
    group = heads // kv_heads
    pairs = sum(r * k for row in keys for r, k in zip(rows, row, strict=True))
    assert visit.pairs() == pairs
    cost = D.step_cost(visit, get_hardware("h100"), heads=heads, head_dim=16, batch=3, nbytes=2)
    assert cost.flops == 4 * 16 * 3 * group * pairs


@FAST
@given(nk=st.integers(1, 5000), window=st.integers(1, 700), kv_tile=st.sampled_from([16, 64, 128]))
def test_a_sliding_windows_tiles_follow_its_rule(nk, window, kv_tile):
    pat = attnc.load("stdlib:sliding_window", window=window)
    bound = D.decode_bound(pat, n=1, nk=nk, heads=1, sizes=None, head_dim=64)
    visit = D.visited_tiles(pat, bound, kv_tile=kv_tile)
    q = nk - 1  # the one query: the last token; it sees keys max(0, q - window + 1) .. q
    first, last = max(0, q - window + 1) // kv_tile, q // kv_tile
    assert visit.tiles.tolist() == [[last - first + 1]]
    assert visit.distinct.tolist() == [min(nk, (last + 1) * kv_tile) - first * kv_tile]


def kv_bytes(pattern: str, nk: int, **params) -> int:
    rep = simulate_decode(
        pattern, nk=nk, heads=8, kv_heads=2, head_dim=128, batch=2, hardware="h100", **params
    )
    return rep["gpus"][0]["kv_bytes"]


def test_bytes_grow_with_the_window_not_with_the_cache():
    per_key = 2 * 2 * 2 * 128 * 2  # batch, K/V heads, K and V, head dim, bf16 bytes
    window = {
        nk: kv_bytes("stdlib:sliding_window", nk, window=256) for nk in (4096, 65536, 1 << 20)
    }
    assert set(window.values()) == {256 * per_key}  # tile-aligned: 4 KV tiles of 64 keys
    assert kv_bytes("stdlib:sliding_window", 65536, window=1024) == 1024 * per_key
    causal = {nk: kv_bytes(CAUSAL, nk) for nk in (4096, 65536)}
    assert causal == {4096: 4096 * per_key, 65536: 65536 * per_key}


def test_the_step_cost_is_its_formula_and_the_dense_step_reads_every_key():
    heads, kv_heads, d, batch, nk, window = 8, 2, 128, 3, 10000, 500
    rep = simulate_decode(
        "stdlib:sliding_window",
        nk=nk,
        n=2,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=d,
        batch=batch,
        window=window,
        dtype="fp16",
    )
    assert [g["hardware"] for g in rep["gpus"]] == ["A100", "H100", "H200", "B200"]
    keys = nk - (nk - 2 - window + 1) // 64 * 64  # queries nk-2, nk-1 (one Q tile) to the last key
    assert rep["key_reads"] == kv_heads * keys and rep["dense_key_reads"] == kv_heads * nk
    for g in rep["gpus"]:
        hw = get_hardware(g["hardware"])
        io = batch * heads * 2 * d * 2
        for step, reads in ((g, keys), (g["dense"], nk)):
            splits = step["split"]["splits"]
            partial = 2 * batch * heads * 2 * splits * (d + 1) * 4 if splits > 1 else 0
            total = 2 * batch * kv_heads * reads * d * 2 + 2 * io + partial
            assert step["bytes"] == total
            assert step["bandwidth_bound_s"] == pytest.approx(total / (hw.hbm_gbps * 1e9))
            flops = 4 * d * batch * heads * 2 * reads
            assert step["flops"] == flops
            assert step["compute_bound_s"] == pytest.approx(flops / (hw.tensor_tflops * 1e12))
            bound = max(step["bandwidth_bound_s"], step["compute_bound_s"])
            assert step["tokens_per_s"] == pytest.approx(batch * 2 / bound)
        assert g["speedup"] == pytest.approx(g["dense"]["bound_s"] / g["bound_s"])


def naive_split(tiles: int, rows: int, repeat: int, sms: int) -> int:
    """Identical rows of ``tiles`` KV tiles: s splits make rows x repeat x s identical programs of
    ceil(tiles / s) tiles, so the makespan is waves x that; the smallest s within the slack of the best."""
    spans = {
        s: math.ceil(rows * repeat * s / sms) * math.ceil(tiles / s)
        for s in range(1, min(tiles, D.MAX_SPLITS) + 1)
    }
    best = min(spans.values())
    return min(s for s, span in spans.items() if span <= best * (1 + D.SPLIT_SLACK))


@settings(max_examples=60, deadline=None)
@given(
    tiles=st.integers(1, 3000),
    rows=st.integers(1, 3),
    repeat=st.integers(1, 200),
    sms=st.sampled_from([108, 132, 148]),
)
def test_the_split_rule_is_the_smallest_split_near_the_best_makespan(tiles, rows, repeat, sms):
    choice = D.split_kv([tiles] * rows, repeat, sms)
    assert choice.splits == naive_split(tiles, rows, repeat, sms)
    assert 1 <= choice.splits <= tiles  # each split at least one KV tile
    assert choice.programs == rows * repeat * choice.splits
    assert choice.waves == math.ceil(choice.programs / sms)
    assert choice.makespan_tiles == choice.waves * math.ceil(tiles / choice.splits)
    assert choice.fill == pytest.approx(rows * repeat * tiles / (sms * choice.makespan_tiles))


@pytest.mark.parametrize("gpu", ["a100", "h100", "b200"])
@pytest.mark.parametrize("programs", [1, 2, 8, 24])
def test_the_split_fills_the_sms_on_a_long_cache(gpu, programs):
    sms = get_hardware(gpu).sms
    choice = D.split_kv([16 * sms], programs, sms)  # a long cache: many KV tiles per program
    # at least 90% of a wave busy, within the slack of the work spread evenly over the SMs
    assert choice.programs >= 0.9 * sms and choice.fill >= 1 / (1 + D.SPLIT_SLACK)
    assert choice.makespan_tiles <= (1 + D.SPLIT_SLACK) * programs * 16 * sms / sms
    assert D.split_kv([16 * sms], programs, sms).splits > 1


def test_enough_programs_keep_one_split():
    for gpu in ("a100", "h100", "h200", "b200"):
        sms = get_hardware(gpu).sms
        assert D.split_kv([4096], 2 * sms, sms).splits == 1  # two full waves already
        assert D.split_kv([1], 1, sms).splits == 1  # one KV tile cannot be split


def test_a_routed_step_keeps_topk_blocks_forced_block_first():
    block, topk, nk = 256, 3, 5000
    rep = simulate_decode("stdlib:moba", nk=nk, heads=2, hardware="h100", block=block, topk=topk)
    # the query (token nk - 1) keeps its own block (forced) and the 2 nearest earlier ones
    own = (nk - 1) // block
    expected = (
        nk - (own - topk + 1) * block
    )  # keys of blocks own-2 .. own up to the query (64-key tiles align)
    assert rep["keys_visited"] == expected
    assert any("routing is data-dependent" in a for a in rep["assumptions"])
    early = simulate_decode("stdlib:moba", nk=300, heads=2, hardware="h100", block=block, topk=topk)
    assert early["keys_visited"] == 300  # both reachable blocks, every key: fewer than topk exist


def test_simulate_decode_refuses_what_has_no_kv_cache():
    with pytest.raises(attnc.SpecError, match="recurrence.*state") as err:
        simulate_decode("stdlib:mamba2", nk=100, heads=2, head_dim=8)
    assert f"{2 * 2 * 8 * 8 * 4:,} bytes" in str(err.value)
    with pytest.raises(attnc.SpecError, match="combines several attentions"):
        simulate_decode("stdlib:nsa", nk=1024)
    with pytest.raises(attnc.SpecError, match="cross attention"):
        simulate_decode("pattern x\n  queries seq\n  keys seq\n  mask k < 5\n", nk=64)
    with pytest.raises(attnc.SpecError, match="nk >= n") as err:
        simulate_decode("stdlib:sliding_window", nk=4, n=8)
    assert err.value.where == "argument nk"
    with pytest.raises(attnc.SpecError, match="KV cache's length"):
        simulate_decode("stdlib:sliding_window")
    with pytest.raises(attnc.SpecError, match="divisor"):
        simulate_decode("stdlib:sliding_window", nk=64, heads=4, kv_heads=3)


# ----------------------------------------------------------------- the command
def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "internal error" not in out + err
    return code, out, err


def test_sim_decode_prints_the_prefill_unchanged_then_the_decode_step(capsys):
    common = [
        "sim",
        "stdlib:sliding_window",
        "-p",
        "window=64",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--top",
        "1",
    ]
    code, prefill, _ = run(capsys, *common, "--n", "512")
    assert code == 0
    code, out, _ = run(capsys, *common, "--nk", "512", "--decode", "--gpu", "h100")
    assert code == 0
    assert out.startswith(prefill)  # today's report first, as it was
    decode = out[len(prefill) :]
    assert "sliding_window decode step: the last 1 of 512 tokens as query over the KV cache" in decode
    assert "keys visited     64 of 512 per K/V head" in decode
    lines = [line.split() for line in decode.splitlines()]
    assert [line[0] for line in lines if line and line[0] in {"A100", "H100", "H200", "B200"}] == [
        "H100"
    ]


def test_sim_decode_json_holds_both(capsys):
    code, out, _ = run(
        capsys,
        "sim",
        "stdlib:streaming",
        "-p",
        "window=100,sinks=4",
        "--nk",
        "1000",
        "--n",
        "2",
        "--decode",
        "--json",
        "--top",
        "1",
    )
    assert code == 0
    data = json.loads(out)
    assert data["n"] == 1000 and data["decode"]["n"] == 2 and data["decode"]["nk"] == 1000
    # queries 998, 999: sinks 0..3 (tile 0) and keys 899..999 (tiles 14..15)
    assert data["decode"]["keys_visited"] == 64 + 1000 - 14 * 64
    assert [g["hardware"] for g in data["decode"]["gpus"]] == ["A100", "H100", "H200", "B200"]


@pytest.mark.parametrize(
    ("argv", "where", "what"),
    [
        (["stdlib:sliding_window", "--decode"], "argument --nk", "needs the KV cache's length"),
        (
            ["stdlib:sliding_window", "--decode", "--nk", "4", "--n", "8"],
            "argument --nk",
            "4 keys but 8 queries",
        ),
        (["stdlib:sliding_window", "--decode", "--nk", "0"], "argument --nk", "positive"),
        (["stdlib:mamba2", "--decode", "--nk", "100"], "argument --decode", "recurrence"),
        (
            ["stdlib:nsa", "--decode", "--nk", "1024"],
            "argument --decode",
            "combines several attentions",
        ),
        (
            ["stdlib:sliding_window", "--decode", "--nk", "64", "--gpu", "h10"],
            "argument --gpu",  # the flag typed (--hardware is its alias)
            "unknown",
        ),
        (
            ["stdlib:sliding_window", "--decode", "--nk", "64", "--hardware", "h10"],
            "argument --hardware",
            "unknown",
        ),
    ],
)
def test_sim_decode_bad_arguments_are_one_clean_error(capsys, argv, where, what):
    code, out, err = run(capsys, "sim", *argv)
    assert code == 1 and out == ""
    assert err.splitlines()[0].startswith(f"{where}: error:") and what in err
