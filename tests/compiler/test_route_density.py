"""A routing pattern's simulated density is the pattern's, not the schedule's (``compiler.cost.route_selection``).

Every expected count here is independent of the module: a Python loop over queries (and blocks or keys) from
the pattern's rule as its .attn file and spec/REFERENCE.md state it (``keep`` blocks always, counted in K;
the rest nearest first where the data would choose, or by the given scores), or ``materialize_mask`` on the
same inputs. The count is compared exactly (integers), at several tile shapes, misaligned ones included: the
tiles a schedule visits may change the work, never the density. Decode: a step reads at least the keys it
attends, at any KV tile.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc
from attnc import cli
from attnc.runtime.api import simulate_decode

FAST = settings(max_examples=12, deadline=None)
TILES = [(None, None), (32, 32), (64, 64), (128, 128), (128, 32), (48, 48), (256, 256)]


def sim(pattern, q_tile=None, kv_tile=None, **kw):
    return attnc.simulate(pattern, q_tile=q_tile, kv_tile=kv_tile, top=1, **kw)


def assert_density(rep, pairs: int, total: int):
    """The stated count is exactly ``pairs`` of ``total`` (and its bound their ratio), and the schedule visits
    tiles holding at least those pairs."""
    d = rep.to_dict()
    assert d["allowed_pairs"] == pairs
    assert d["total_pairs"] == total
    assert Fraction(d["density"]).limit_denominator(total) == Fraction(pairs, total)
    assert d["flop_bound"] == total / pairs
    assert d["work"] * total >= pairs


# ----------------------------------------------------------------- MoBA
def moba_pairs(n: int, block: int, topk: int) -> int:
    """Per query: its own block's keys up to it (forced), and min(topk, i + 1) - 1 whole earlier blocks."""
    total = 0
    for q in range(n):
        i = q // block
        total += (q - i * block + 1) + (min(topk, i + 1) - 1) * block
    return total


@pytest.mark.parametrize("tiles", TILES)
def test_moba_density_is_the_patterns_at_any_tiles(tiles):
    n, block, topk = 777, 64, 5
    rep = sim("stdlib:moba", *tiles, n=n, block=block, topk=topk)
    assert_density(rep, moba_pairs(n, block, topk), n * n)
    assert rep["density_exact"] is True  # every earlier block is whole: any choice attends as many keys


def test_moba_default_cli_case_is_not_below_the_truth():
    rep = sim("stdlib:moba", n=777, block=100, topk=3)
    assert_density(rep, moba_pairs(777, 100, 3), 777 * 777)


@FAST
@given(n=st.integers(1, 300), block=st.integers(1, 70), topk=st.integers(1, 6),
       q_tile=st.sampled_from([16, 32, 48, 64, 100]), kv_tile=st.sampled_from([16, 32, 48, 64]))
def test_moba_density_never_depends_on_tiles(n, block, topk, q_tile, kv_tile):
    rep = sim("stdlib:moba", q_tile, kv_tile, n=n, block=block, topk=topk)
    assert_density(rep, moba_pairs(n, block, topk), n * n)


# ----------------------------------------------------------------- token top-k
@pytest.mark.parametrize("tiles", [(32, 32), (64, 64), (128, 128), (48, 48), (128, 32)])
@pytest.mark.parametrize("pattern", ["stdlib:token_topk", "stdlib:dsa"])
def test_token_topk_keeps_exactly_topk_keys_per_query(pattern, tiles):
    n, topk = 1000, 100
    rep = sim(pattern, *tiles, n=n, topk=topk)
    assert_density(rep, sum(min(topk, q + 1) for q in range(n)), n * n)
    assert rep["density_exact"] is True


@pytest.mark.parametrize("tiles", [(32, 32), (64, 64), (128, 128), (48, 48)])
def test_sparsifiner_count_is_determined_whatever_the_inputs(tiles):
    n, budget, cls = 1000, 50, 1
    g = torch.Generator().manual_seed(1)
    inputs = {"qi": torch.randn(1, n, 4, generator=g), "ki": torch.randn(1, n, 4, generator=g)}
    rep = sim("stdlib:sparsifiner", *tiles, n=n, budget=budget, rank=4, cls=cls, inputs=inputs)
    # the class token's row keeps every key; every other row its budget of keys (mask true)
    assert_density(rep, cls * n + (n - cls) * budget, n * n)


# ----------------------------------------------------------------- Quest
def quest_pairs(n: int, budget: int, page: int) -> int:
    """The nearest pages: a query's own page up to it, then earlier whole pages, K in all."""
    k = max(3, min(n, budget) // page)
    total = 0
    for q in range(n):
        own = q // page
        total += (q - own * page + 1) + min(k - 1, own) * page
    return total


@pytest.mark.parametrize("tiles", [(32, 32), (64, 64), (128, 128), (48, 48), (256, 256)])
def test_quest_keeps_topk_pages_not_topk_tiles(tiles):
    n, budget, page = 1000, 128, 16
    rep = sim("stdlib:quest", *tiles, n=n, token_budget=budget, page=page)
    assert_density(rep, quest_pairs(n, budget, page), n * n)
    # no query attends more than its K pages: the cap whatever the scores
    k = max(3, min(n, budget) // page)
    assert rep["allowed_pairs"] <= sum(min(q + 1, k * page) for q in range(n))


def test_quest_at_the_default_budget_is_below_its_cap():
    n = 8192
    rep = sim("stdlib:quest", n=n)
    assert_density(rep, quest_pairs(n, 4096, 16), n * n)
    assert rep["density"] <= 0.375


# ----------------------------------------------------------------- BiFormer
def biformer_pairs(height: int, width: int, region: int, topk: int) -> int:
    """Per query region: the topk key regions nearest to it (per-axis distance of the regions' first tokens,
    ties to the lower region), every token of each (no mask)."""
    ry, rx = -(-height // region), -(-width // region)

    def size(b):
        y, x = divmod(b, rx)
        return (min(region, height - y * region)) * (min(region, width - x * region))

    total = 0
    for a in range(ry * rx):
        ay, ax = divmod(a, rx)
        ranked = sorted(range(ry * rx), key=lambda b: (abs(b // rx - ay) + abs(b % rx - ax), b))
        total += size(a) * sum(size(b) for b in ranked[:topk])
    return total


@pytest.mark.parametrize("tiles", [(None, None), ((4, 4), (4, 4)), ((3, 3), (3, 3)), ((4, 16), (4, 16)), (64, 64)])
def test_biformer_attends_topk_regions_whatever_the_tiles(tiles):
    rep = sim("stdlib:biformer", *tiles, sizes={"height": 16, "width": 16}, region=4, topk=4)
    assert_density(rep, 256 * 64, 256 * 256)  # each query: 4 regions of 16 keys
    assert rep["flop_bound"] == 4.0
    assert rep["density_exact"] is True


@pytest.mark.parametrize("tiles", [(None, None), ((4, 4), (4, 4)), ((2, 8), (2, 8)), (32, 32)])
def test_biformer_with_edge_regions(tiles):
    rep = sim("stdlib:biformer", *tiles, sizes={"height": 14, "width": 14}, region=4, topk=2)
    assert_density(rep, biformer_pairs(14, 14, 4, 2), 196 * 196)
    assert rep["density"] <= 0.163  # two of the largest regions per query at most


# ----------------------------------------------------------------- SeerAttention
def seer_pairs(gate: torch.Tensor, n: int, block: int, topk: int) -> int:
    """Per query: the causal blocks by the gate (ties to the lower block), topk of them; every causal block in
    the last two query blocks (keep); the keys up to the query of each."""
    nb = -(-n // block)
    total = 0
    for q in range(n):
        mine = q // block
        if mine >= nb - 2:
            chosen = range(mine + 1)
        else:
            chosen = sorted(range(mine + 1), key=lambda b: (-float(gate[0, q, b]), b))[:topk]
        total += sum(min(q + 1, (b + 1) * block) - b * block for b in chosen)
    return total


@pytest.mark.parametrize("tiles", [(None, None), (32, 32), (64, 64), (128, 128), (48, 48)])
def test_seer_keeps_its_dense_last_blocks_beyond_topk(tiles):
    n, block, topk = 1000, 64, 3
    gate = torch.randn(1, n, -(-n // block), generator=torch.Generator().manual_seed(1))
    rep = sim("stdlib:seer", *tiles, n=n, block=block, topk=topk, inputs={"gate": gate})
    pairs = seer_pairs(gate, n, block, topk)
    assert_density(rep, pairs, n * n)
    q, k = torch.randn(1, 1, n, 8), torch.randn(1, 1, n, 8)
    mask = attnc.materialize_mask("stdlib:seer", n=n, block=block, topk=topk, inputs={"gate": gate}, q=q, k=k)
    assert int(mask.sum()) == pairs


# ----------------------------------------------------------------- NSA's selected branch
def nsa_slc_pairs(n: int, block: int, selected: int) -> int:
    """Blocks 0, the query's own and the previous one forced (all kept even beyond ``selected``), then the
    nearest earlier ones, ``selected`` in all; the keys up to the query of each."""
    total = 0
    for q in range(n):
        mine = q // block
        forced = {b for b in (0, mine, mine - 1) if b >= 0}
        rest = [b for b in range(mine, -1, -1) if b not in forced][:max(0, selected - len(forced))]
        total += sum(min(q + 1, (b + 1) * block) - b * block for b in forced | set(rest))
    return total


@pytest.mark.parametrize("tile", [32, 64, 128, 256, 48])
@pytest.mark.parametrize("selected", [2, 4])
def test_nsa_selected_branch_density_is_the_patterns(tile, selected):
    n, block = 1000, 64
    rep = attnc.simulate("stdlib:nsa", n=n, block=block, selected=selected, window=128, q_tile=tile,
                         kv_tile=tile, top=1)
    slc = rep.branches["slc"]
    assert slc["allowed_pairs"] == nsa_slc_pairs(n, block, selected)
    assert slc["flop_bound"] == n * n / nsa_slc_pairs(n, block, selected)


# ----------------------------------------------------------------- decode
@pytest.mark.parametrize("kv_tile", [7, 48, 64, 100, 128])
def test_a_routed_decode_step_reads_at_least_what_it_attends(kv_tile):
    rep = simulate_decode("stdlib:moba", nk=777, hardware="h100", block=100, topk=3, kv_tile=kv_tile)
    attended = 777 - 500  # its own block 7 (700..776) and blocks 6 and 5
    first = 500 // kv_tile * kv_tile  # the tiles holding keys 500..776
    assert rep["keys_visited"] == 777 - first >= attended
    big = simulate_decode("stdlib:moba", nk=10000, hardware="h100", block=512, topk=3, kv_tile=kv_tile)
    start = (9999 // 512 - 2) * 512
    assert big["keys_visited"] == 10000 - start // kv_tile * kv_tile >= 10000 - start


@pytest.mark.parametrize("kv_tile", [16, 48, 64, 100])
def test_quest_decode_reads_its_token_budget(kv_tile):
    nk = 131072
    rep = simulate_decode("stdlib:quest", nk=nk, hardware="h100", kv_tile=kv_tile)
    first = nk - 4096  # the 256 nearest pages of 16
    assert rep["keys_visited"] == nk - first // kv_tile * kv_tile


# ----------------------------------------------------------------- the command line
def test_a_bad_pattern_parameter_is_named_as_the_other_parameters(capsys):
    for value in ("0", "1.5"):
        assert cli.main(["sim", "stdlib:moba", "--n", "100", "-p", f"block={value}"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("argument block: error"), err
        assert "--block" not in err
