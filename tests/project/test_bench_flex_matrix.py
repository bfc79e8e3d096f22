"""The CPU benchmark matrix's baselines are the stdlib patterns (benchmarks/bench_flex_matrix.py).

The matrix times hand-written FlexAttention mask_mods and SDPA masks against attnc; these tests
check, at the ``--quick`` sizes and without torch.compile, that each hand-written mask is exactly
the stdlib pattern's mask (``materialize_mask``), that the MoBA baseline routes as attnc's
reference backend, and the timing helper's run counts. (A ``--quick`` run of the script itself
compiles Flex kernels: about a minute on the shared CPU, so it is not a test.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import attnc

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_flex_matrix", BENCH / "bench_flex_matrix.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))
        sys.modules.pop("bench_flex_matrix", None)


STATIC = ["sw512_8k", "sw1024_16k", "streaming", "document", "power_16k", "nbhd2d_64", "nbhd2d_96", "nbhd3d",
          "nbhd3d_strided", "radial"]


@pytest.mark.parametrize("key", STATIC)
def test_hand_written_mask_is_the_stdlib_pattern(bench, key):
    case = bench.cases(quick=True)[key]
    want = attnc.materialize_mask(case.spec, n=case.n, sizes=case.sizes, inputs=case.inputs or None, **case.params)
    got = bench.dense_mask(case, case.mask_mod, per_head=False)[0, 0]
    assert got.shape == want.shape[-2:]
    assert torch.equal(got, want.reshape(-1, case.n, case.n)[0]), f"{key}: {int((got != want).sum())} pairs differ"
    assert 0 < int(got.sum()) < case.n * case.n  # not all or nothing: the case has structure


def test_quick_runs_known_cases(bench):
    """``--quick``'s default cases and first-call case are matrix cases: a sequence, a grid and a route."""
    keys = bench.QUICK_CASES.split(",")
    assert set(keys) <= set(bench.cases(quick=True)) and bench.QUICK_FIRST_CALL in keys
    assert set(bench.FULL_FIRST_CALL.split(",")) <= set(bench.cases(quick=False))
    kinds = {bench.cases(quick=True)[k].sizes is not None for k in keys}
    assert kinds == {True, False} and any(bench.cases(quick=True)[k].route for k in keys)


def test_matrix_covers_the_issue_cases(bench):
    routed = {"moba", "token_topk", "quest", "quest_32k", "vmoba", "vmoba_30k", "anchor", "anchor_16k"}
    assert set(bench.cases(quick=True)) == {*STATIC, *routed}
    assert set(bench.cases(quick=False)) == {*STATIC, *routed}
    full = bench.cases(quick=False)
    assert (full["sw512_8k"].n, full["sw1024_16k"].n, full["power_16k"].n) == (8192, 16384, 16384)
    assert full["nbhd2d_96"].sizes == {"height": 96, "width": 96}
    assert full["nbhd3d_strided"].params["stride_y"] == 4
    assert (full["quest"].n, full["quest_32k"].n) == (8192, 32768)
    assert (full["vmoba"].n, full["vmoba_30k"].n) == (12288, 30720)
    assert (full["anchor"].n, full["anchor_16k"].n) == (8192, 16384)


@pytest.mark.parametrize("key", ["moba", "token_topk", "quest", "vmoba", "vmoba_30k", "anchor", "anchor_16k"])
def test_routed_baselines_route_as_attnc(bench, key):
    case = bench.cases(quick=True)[key]
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, case.n, 64, generator=g, dtype=torch.float64) for _ in range(3))
    base = bench.Baselines.__new__(bench.Baselines)
    base.case, base.sdpa_mask, base.sdpa_error = bench.Case(**{**case.__dict__, "heads": 2}), None, None
    got = base.sdpa_call(q, k, v)
    want = attnc.compile_attention(case.spec, backend="reference", **case.params)(q, k, v, sizes=case.sizes)
    torch.testing.assert_close(got, want)
    assert bench.near_tie_rows(base.case, q, k).shape == (2, case.n)


def test_near_tie_rows_flags_equal_block_scores(bench):
    case = bench.Case("m", "", "stdlib:moba", {}, 8, 1, route=(2, 2, True))
    q = torch.ones(1, 1, 8, 1)
    k = torch.tensor([1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.0]).view(1, 1, 8, 1)
    # query 7 (own block 3 forced): blocks 1 and 2 both score 2, a tie for the second place
    ties = bench.near_tie_rows(case, q, k)
    assert bool(ties[0, 7]) and not bool(ties[0, 1])


def test_dense_mask_refuses_what_does_not_fit(bench, monkeypatch):
    case = bench.Case("big", "", "stdlib:sliding_window", {}, 2**22, 8, bench.sliding(4))
    with pytest.raises(MemoryError, match="SDPA with a dense mask"):
        bench.dense_mask(case, case.mask_mod, per_head=False)
    # SDPA's memory grows with the heads (its scores per head): 16K tokens at 8 heads need ~28 GB,
    # which the old guard (8 N^2 bytes whatever the heads) let through to the OOM killer
    sixteen_k = bench.Case("16k", "", "stdlib:sliding_window", {}, 16384, 8, bench.sliding(4))
    one_head = bench.Case("16k1", "", "stdlib:sliding_window", {}, 16384, 1, bench.sliding(4))
    assert bench.sdpa_bytes(sixteen_k) > 25 * 2**30 and bench.sdpa_bytes(one_head) < 6 * 2**30
    monkeypatch.setattr(bench, "mem_available", lambda: 24 * 2**30)
    with pytest.raises(MemoryError):
        bench.dense_mask(sixteen_k, sixteen_k.mask_mod, per_head=False)


def test_time_cells_counts_and_failures(bench):
    calls = {"warm": 0, "cold": 0, "over": 0}

    def counter(name):
        def fn():
            calls[name] += 1
        return fn

    def broken():
        raise NotImplementedError("no backward here. More text")

    fns = {"warm": counter("warm"), "cold": counter("cold"), "broken": broken}
    cells = bench.time_cells(fns, {"warm"}, repeat=5, budget=1e9)
    assert calls == {"warm": 5, "cold": 6, "over": 0}  # "warm" ran in the checks: no extra warm-up
    assert cells["warm"].runs == cells["cold"].runs == 5 and cells["cold"].ms >= 0
    assert cells["broken"].ms is None and cells["broken"].note == "NotImplementedError: no backward here"
    assert bench.ratio(cells["warm"], cells["broken"]) == "-"
    # a cell whose runs would overrun the budget runs once (after its warm-up)
    over = bench.time_cells({"over": counter("over")}, set(), repeat=5, budget=0.0)
    assert over["over"].runs == 1 and calls["over"] == 2


def test_sdpa_mask_matches_attnc_on_document(bench):
    # the forward the matrix checks against: SDPA with the dense mask equals attnc's CPU backend
    case = bench.cases(quick=True)["document"]
    q, k, v = bench.qkv(bench.Case(**{**case.__dict__, "heads": 2}), grad=False)
    mask = bench.dense_mask(case, case.mask_mod, per_head=False)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = attnc.compile_attention(case.spec, backend="cpu")(q, k, v, **case.inputs)
    torch.testing.assert_close(got, want, **bench.OUT_TOL)
