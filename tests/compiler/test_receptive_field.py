"""Receptive field across stacked layers, at block granularity.

Reference written here: the block adjacency A[i, j] (query block i attends
key block j in some head) is summed from the dense mask of
``attnc.materialize_mask`` (or given in closed form), and reachability within
L layers is the boolean matrix power ((A + I)^L > 0), counted over
(query block, earlier-or-equal key block) pairs.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.compiler.analysis.receptive_field import block_graph, receptive_field


def block_adjacency(mask: torch.Tensor, block: int) -> torch.Tensor:
    """bool [nb, nb] from a dense mask [heads, N, N] on ``tokens seq`` (union over heads)."""
    H, N, _ = mask.shape
    nb = -(-N // block)
    pad = nb * block - N
    m = torch.nn.functional.pad(mask.any(0).to(torch.float64), (0, pad, 0, pad))
    return m.reshape(nb, block, nb, block).sum((1, 3)) > 0


def matrix_power_coverage(adj: torch.Tensor, layers: int, all_pairs: bool = False) -> tuple[list[float], int | None]:
    nb = adj.shape[0]
    step = (adj | torch.eye(nb, dtype=torch.bool)).to(torch.float64)
    counted = torch.ones(nb, nb, dtype=torch.bool) if all_pairs else torch.tril(torch.ones(nb, nb, dtype=torch.bool))
    reach = torch.eye(nb, dtype=torch.bool)
    cov, full_at = [], None
    L = 0
    while True:
        L += 1
        reach = (step @ reach.to(torch.float64)) > 0
        done = bool(reach[counted].all())
        if L <= layers:
            cov.append(int(reach[counted].sum()) / int(counted.sum()))
        if done and full_at is None:
            full_at = L
        if L >= layers and (full_at is not None or L > nb):
            break
    return cov, full_at


def analyse(spec, n, tile, layers, heads=1, **params):
    pat = attnc.load(spec, **params)
    bound = E.bind_sizes(pat, n=n, heads=heads)
    return pat, bound, receptive_field(pat, bound, tile, layers)


@pytest.mark.parametrize("n,window,block", [(1024, 32, 16), (1000, 50, 16), (512, 16, 16), (300, 7, 8)])
def test_sliding_window_layers(n, window, block):
    _, _, rf = analyse("stdlib:sliding_window", n, block, 12, window=window)
    nb = -(-n // block)
    # closed form: block distance d is attended when d * block - (block - 1) < window
    i = torch.arange(nb)
    d = i[:, None] - i[None, :]
    adj = (d >= 0) & (d * block - (block - 1) < window)
    cov, full_at = matrix_power_coverage(adj, 12)
    assert rf["coverage"] == pytest.approx(cov, abs=0, rel=1e-15)
    assert rf["layers_for_full"] == full_at
    r = math.ceil((window - 1) / block)  # the farthest block reached in one layer
    assert full_at == math.ceil((nb - 1) / r)
    assert abs(full_at - n / window) <= n / window / 2 + 2  # about N / window layers
    assert rf["blocks"] == nb and rf["granularity"] == "block" and rf["pairs"] == "earlier_or_equal"
    assert rf["num_pairs"] == nb * (nb + 1) // 2 and rf["layers"] == list(range(1, 13))


def test_power_attention_reaches_everything_in_log_layers():
    block, local, nb = 8, 2, 256
    n = block * nb
    _, _, power = analyse("stdlib:power", n, block, 40, block=block, local=local)
    _, _, sliding = analyse("stdlib:sliding_window", n, block, 40, window=local * block)
    mask = attnc.materialize_mask("stdlib:power", n=n, block=block, local=local)
    cov, full_at = matrix_power_coverage(block_adjacency(mask, block), 40)
    assert power["coverage"] == pytest.approx(cov, abs=0, rel=1e-15) and power["layers_for_full"] == full_at
    assert full_at <= math.ceil(math.log2(nb))  # log-depth
    assert sliding["layers_for_full"] >= (nb - 1) // local  # linear depth for the same local size
    assert sliding["layers_for_full"] > 10 * power["layers_for_full"]
    # the window reaches 2 blocks back per layer: about 15 of 256 blocks after 7 layers
    assert sliding["coverage"][full_at - 1] < 0.15 and power["coverage"][full_at - 1] == 1.0


def test_never_full_and_head_union():
    spec = "pattern p\n  tokens seq\n  mask causal and (q // 8 == k // 8 or (h == 1 and q // 8 - k // 8 == 1))\n"
    _, _, one = analyse(spec, 64, 8, 10, heads=1)
    assert one["layers_for_full"] is None and one["coverage"][-1] == pytest.approx(8 / 36)
    _, _, two = analyse(spec, 64, 8, 10, heads=2)  # head 1 links neighbouring blocks: a chain
    assert two["layers_for_full"] == 7 and two["coverage"][6] == 1.0 and two["coverage"][5] < 1.0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 90), block=st.integers(1, 12), a=st.integers(1, 6), b=st.integers(0, 4),
       causal=st.booleans(), all_pairs=st.booleans(), heads=st.integers(1, 2))
def test_random_patterns_against_matrix_powers(n, block, a, b, causal, all_pairs, heads):
    spec = ("pattern p\n  tokens seq\n  mask " + ("causal and " if causal else "")
            + f"(abs(q - k) < {a} or (q + h) % {a + 1} == k % {b + 2} or is_pow2(q // {a} - k // {a}))\n")
    pat = attnc.load(spec)
    bound = E.bind_sizes(pat, n=n, heads=heads)
    rf = receptive_field(pat, bound, block, 6, all_pairs=all_pairs)
    mask = attnc.materialize_mask(pat, n=n, heads=heads)
    cov, full_at = matrix_power_coverage(block_adjacency(mask, block), 6, all_pairs)
    assert rf["coverage"] == pytest.approx(cov, abs=0, rel=1e-15)
    assert rf["layers_for_full"] == full_at
    assert all(x <= y for x, y in zip(rf["coverage"], rf["coverage"][1:], strict=False))


def test_grid_blocks_and_graph():
    pat = attnc.load("stdlib:neighborhood_2d", kernel_size_y=3, kernel_size_x=3)
    bound = E.bind_sizes(pat, sizes={"height": 8, "width": 12})
    rf = receptive_field(pat, bound, (4, 4), 5, all_pairs=True)
    # 2 x 3 blocks of 4x4; a 3x3 window links each block to its grid neighbours (incl. diagonals)
    assert rf["blocks"] == 6 and rf["block"] == (4, 4)
    assert rf["layers_for_full"] == 2 and rf["coverage"][0] == pytest.approx((4 + 6 + 4 + 4 + 6 + 4) / 36)
    from attnc.compiler.analysis.tiles import classify_tiles

    g = block_graph(classify_tiles(pat, bound, (4, 4), (4, 4)))
    assert g.has_edge(0, 4) and not g.has_edge(0, 2) and g.number_of_edges() == rf["edges"] == 28


def test_bad_arguments():
    pat = attnc.load("stdlib:sliding_window", window=4)
    bound = E.bind_sizes(pat, n=32)
    with pytest.raises(attnc.SpecError, match="layers"):
        receptive_field(pat, bound, 4, 0)
    with pytest.raises(attnc.SpecError):
        receptive_field(pat, bound, (4, 4), 3)


# ----------------------------------------------------------------- concatenated layouts
def test_text_video_counts_every_pair():
    """``q in text or k in text`` over seq(text) + grid: with blocks of 4 (text 4, grid 2 x 2 x 2) the
    text block links every block both ways in one layer, the two video blocks reach each other only
    through it (2 layers). Every (query block, key block) pair counts: 7 of 9 after one layer; with
    earlier key blocks only, the missing pair (video block 1 -> video block 2) would be hidden."""
    spec = "pattern p\n  tokens seq(text) + grid(t: frames, y: height, x: width)\n  mask q in text or k in text\n"
    pat = attnc.load(spec)
    bound = E.bind_sizes(pat, sizes={"text": 4, "frames": 2, "height": 2, "width": 2})
    rf = receptive_field(pat, bound, 4, 3)
    assert rf["pairs"] == "all" and rf["blocks"] == 3 and rf["num_pairs"] == 9
    assert rf["coverage"] == [7 / 9, 1.0, 1.0] and rf["layers_for_full"] == 2
    grid_first = attnc.load(spec.replace("seq(text) + grid(t: frames, y: height, x: width)",
                                         "grid(t: frames, y: height, x: width) + seq(text)"))
    rf = receptive_field(grid_first, E.bind_sizes(grid_first, sizes={"text": 4, "frames": 2, "height": 2, "width": 2}), 4, 3)
    assert rf["coverage"] == [7 / 9, 1.0, 1.0] and rf["layers_for_full"] == 2  # video blocks 0, 1; text block 2
    # asked for explicitly, the earlier-or-equal pairs are still available
    assert receptive_field(pat, bound, 4, 1, all_pairs=False)["pairs"] == "earlier_or_equal"
    with pytest.raises(attnc.SpecError) as err:  # blocks of a concatenation are runs of flat positions
        receptive_field(pat, bound, (2, 2), 1)
    assert err.value.where == "argument block" and "one extent per axis (1), got 2" in err.value.message


@settings(max_examples=40, deadline=None)
@given(text=st.integers(1, 6), tail=st.integers(0, 4), frames=st.integers(1, 3), width=st.integers(1, 5),
       block=st.integers(1, 9), w=st.integers(1, 3), grid_first=st.booleans(), causal=st.booleans(),
       heads=st.integers(1, 2))
def test_random_concatenations_against_matrix_powers(text, tail, frames, width, block, w, grid_first, causal, heads):
    """Every pair counted, against reachability by boolean matrix powers of the block adjacency
    summed from the dense mask (blocks: runs of ``block`` flat positions)."""
    grid = "grid(t: frames, x: width)"
    segs = [grid, "seq(text)"] if grid_first else ["seq(text)", grid]
    if tail:
        segs.append("seq(tail)")
    spec = (f"pattern p\n  tokens {' + '.join(segs)}\n  mask " + ("causal and " if causal else "")
            + "((q in text and k.t == 0) or (k in text and (q + h) % 3 == 0)"
            + f" or (q in grid and k in grid and abs(q.t - k.t) + abs(q.x - k.x) < {w}))\n")
    sizes = {"text": text, "frames": frames, "width": width} | ({"tail": tail} if tail else {})
    pat = attnc.load(spec)
    bound = E.bind_sizes(pat, heads=heads, sizes=sizes)
    rf = receptive_field(pat, bound, block, 5)
    mask = attnc.materialize_mask(pat, heads=heads, sizes=sizes)
    cov, full_at = matrix_power_coverage(block_adjacency(mask, block), 5, all_pairs=True)
    assert rf["pairs"] == "all" and rf["blocks"] == -(-bound.n // block)
    assert rf["coverage"] == pytest.approx(cov, abs=0, rel=1e-15)
    assert rf["layers_for_full"] == full_at


def test_cli_counts_every_pair_of_a_concatenation(capsys, tmp_path):
    """``attnc sim --layers`` on a concatenation reports what ``receptive_field`` does with every pair."""
    import json

    from attnc import cli

    spec = tmp_path / "tv.attn"
    spec.write_text("pattern tv\n  tokens seq(text) + grid(t: frames, y: height, x: width)\n"
                    "  mask q in text or k in text or (q.t == k.t and abs(q.x - k.x) < 2)\n")
    sizes = {"text": 3, "frames": 3, "height": 2, "width": 3}
    code = cli.main(["sim", str(spec), "--sizes", ",".join(f"{k}={v}" for k, v in sizes.items()),
                     "--layers", "3", "--rf-block", "3", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    got = json.loads(out)["receptive_field"]
    pat = attnc.load(spec.read_text())
    mask = attnc.materialize_mask(pat, sizes=sizes)
    cov, full_at = matrix_power_coverage(block_adjacency(mask, 3), 3, all_pairs=True)
    assert got["pairs"] == "all" and got["blocks"] == 7
    # blocks: the text, then one per (t, y) row; rows of different frames meet only through the text
    assert cov[0] == 25 / 49 and full_at == 2
    assert got["coverage"] == pytest.approx(cov, abs=0, rel=1e-15) and got["layers_for_full"] == full_at
