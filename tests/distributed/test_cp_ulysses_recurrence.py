"""Recurrences under Ulysses and USP (attnc.distributed.ContextParallel with ``ulysses_degree`` > 1) on 2
and 4 CPU ranks (gloo): each rank's all-to-all brings whole sequences of its share of the heads (the
per-head gates with them), the chain runs across ring positions only. Every case against one process in
float64, forward and backward (q, k, v and the float gate inputs); ``kv=`` both modes (a recurrence moves
no keys: the same result and bytes); bad head counts and a bad gate on one rank give the same SpecError on
every rank. The ranks of one world size run all their cases in one spawn (a module fixture)."""

from __future__ import annotations

import math

import pytest
import ranks
import torch
from cp_ulysses_recurrence_worker import case_inputs, case_tensors, compile_case, worker

#: one worker runs the whole module: its fixtures spawn the ranks once for every test
pytestmark = pytest.mark.xdist_group("context_parallel")

SMALL = dict(B=1, H=4, n=16, D=4)
GATED = dict(SMALL, spec="stdlib:gated_delta_net", inputs={"g": "gate", "beta": "beta"})

CASES_2 = {  # ulysses_degree 2 over 2 ranks: no chain, each rank runs its 2 heads over all 16 tokens
    # a head gate that reads h: each share evaluates its own heads' decays
    "retention": dict(SMALL, spec="stdlib:retention", u=2),
    "retention-allgather": dict(SMALL, spec="stdlib:retention", u=2, kv="allgather"),
    # a head gate that reads heads (6 heads: the slopes past the largest power of two)
    "lightning-6-heads": dict(SMALL, spec="stdlib:lightning", H=6, u=2, backend="cpu"),
    "mamba2": dict(SMALL, spec="stdlib:mamba2", inputs={"g": "gate"}, u=2),
    # gates with a batch dimension ([B, H, n], [B, H, n, dk]) through the all-to-all; GQA's 2 KV heads
    "mamba2-batched-gate-gqa": dict(SMALL, spec="stdlib:mamba2", inputs={"g": "gate"}, u=2, B=2, Hkv=2,
                                    batched=True, backend="cpu"),
    "kda-batched-gates": dict(SMALL, spec="stdlib:kda", inputs={"g": "vgate", "beta": "beta"}, u=2, B=2,
                              batched=True),
    "gla-whole-gate": dict(SMALL, spec="stdlib:gla", inputs={"g": "vgate"}, u=2, shard_inputs=False),
    "gated-delta": dict(GATED, u=2),
    "gated-delta-cpu-allgather": dict(GATED, u=2, backend="cpu", kv="allgather"),
    # grouped value attention: 2 q/k heads, 4 value heads (and 4 heads of gates and state)
    "gated-delta-gva": dict(GATED, H=2, Hv=4, u=2),
    "delta-net-l2norm": dict(SMALL, spec="stdlib:delta_net", params={"qk_l2norm": True}, inputs={"beta": "beta"},
                             u=2),
}
CASES_4 = {
    # USP: 2 ring positions of 2 Ulysses ranks; the chain runs across the ring positions on each share
    "usp-retention": dict(SMALL, spec="stdlib:retention", u=2),
    "usp-mamba2-allgather": dict(SMALL, spec="stdlib:mamba2", inputs={"g": "gate"}, u=2, kv="allgather"),
    "usp-gated-delta": dict(GATED, u=2, backend="cpu"),
    "usp-kda-whole-inputs": dict(SMALL, spec="stdlib:kda", inputs={"g": "vgate", "beta": "beta"}, u=2,
                                 shard_inputs=False),
    # ulysses_degree 4 over 4 ranks: one head each, no chain; GVA with 8 value heads
    "ulysses4-gated-delta-gva": dict(GATED, H=4, Hv=8, u=4),
}
ERRORS_2 = {
    "heads-not-divisible": dict(SMALL, spec="stdlib:retention", H=3, u=2),
    "value-heads-not-divisible": dict(GATED, H=1, Hv=3, u=2),
    # a positive gate in the last rank's part: refused before the all-to-all, on every rank
    "positive-gate": dict(GATED, u=2, bad_gate=0.5),
    "nan-gate-kda": dict(SMALL, spec="stdlib:kda", inputs={"g": "vgate", "beta": "beta"}, u=2, bad_gate=math.nan),
}
ERRORS_4 = {
    # GVA under USP: the chain is not run for it; every rank says so
    "usp-gva": dict(GATED, H=2, Hv=4, u=2),
}
for table in (ERRORS_2, ERRORS_4):
    for case in table.values():
        case["error"] = True
WORDS = {
    "heads-not-divisible": "3 heads (3 KV heads) do not split over ulysses_degree 2",
    "value-heads-not-divisible": "1 heads (1 KV heads, 3 value heads) do not split over ulysses_degree 2",
    "positive-gate": "rank 1: the delta rule's gates are log decays",
    "nan-gate-kda": "rank 1: the delta rule's gates are log decays",
    "usp-gva": "grouped value attention (GVA) is not chained across ranks",
}


def _results(tmp_path_factory, world: int, table: dict, timeout: float = 120.0) -> dict:
    """Each case's results per rank; never waits past ``timeout`` (the ranks are killed)."""
    out = tmp_path_factory.mktemp(f"cpu{world}")
    names = list(table)
    ranks.spawn(worker, world, [table[n] for n in names], out, timeout)
    return {name: [ranks.result(out / f"case{i}-rank{r}.pt") for r in range(world)] for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _results(tmp_path_factory, 2, {**CASES_2, **ERRORS_2})


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _results(tmp_path_factory, 4, {**CASES_4, **ERRORS_4})


def reference(case: dict) -> dict:
    """One process: the reference backend (the naive loop) on the whole tensors."""
    attn = compile_case(case)
    q, k, v, dout = case_tensors(case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    inputs = {n: t.clone().requires_grad_() for n, t in case_inputs(case).items()}
    out = attn(q, k, v, **inputs)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad,
            "dinputs": {n: t.grad for n, t in inputs.items()}}


def check(case: dict, ranks: list) -> None:
    for r, got in enumerate(ranks):
        assert "crash" not in got, f"rank {r}:\n{got['crash']}"
    ref = reference(case)
    for r, got in enumerate(ranks):  # unshard gives every rank the whole tensor
        for key in ("out", "dq", "dk", "dv"):
            torch.testing.assert_close(got[key], ref[key], rtol=1e-9, atol=1e-9, msg=f"rank {r} {key}")
        assert set(got["dinputs"]) == set(ref["dinputs"])
        for name, g in ref["dinputs"].items():
            torch.testing.assert_close(got["dinputs"][name], g, rtol=1e-9, atol=1e-9, msg=f"rank {r} d{name}")


@pytest.mark.parametrize("name", list(CASES_2))
def test_ulysses_over_two_ranks_equals_one_process(results2, name):
    check(CASES_2[name], results2[name])


@pytest.mark.parametrize("name", list(CASES_4))
def test_usp_and_ulysses_over_four_ranks_equal_one_process(results4, name):
    check(CASES_4[name], results4[name])


def test_kv_mode_changes_nothing_for_a_recurrence(results2):
    """No keys travel: ring and all-gather give the same output and send the same bytes."""
    ring, allgather = results2["retention"], results2["retention-allgather"]
    for a, b in zip(ring, allgather, strict=True):
        assert torch.equal(a["out"], b["out"]) and a["bytes"] == b["bytes"]


def test_ulysses_over_the_whole_group_sends_only_the_all_to_alls(results2, results4):
    """ulysses_degree = the group's size: no chain, only q, k, v (and the gate parts) there and the output
    back, each (u - 1) / u of this rank's part; USP adds the chain's all-gather of states and decays."""
    case = CASES_2["retention"]
    part = case["B"] * case["H"] * (case["n"] // 2) * case["D"] * 8  # float64 bytes of one rank's q
    assert [r["bytes"] for r in results2["retention"]] == [4 * part // 2] * 2
    gated = CASES_2["gated-delta"]
    gate_part = gated["H"] * (gated["n"] // 2) * 8
    assert [r["bytes"] for r in results2["gated-delta"]] == [(4 * part + 2 * gate_part) // 2] * 2
    usp = CASES_4["usp-retention"]
    part4 = usp["B"] * usp["H"] * (usp["n"] // 4) * usp["D"] * 8
    state = usp["B"] * (usp["H"] // 2) * usp["D"] * usp["D"] * 8  # a share's state; its decay is [B, h, 1, 1]
    decay = usp["B"] * (usp["H"] // 2) * 8
    assert [r["bytes"] for r in results4["usp-retention"]] == [4 * part4 // 2 + state + decay] * 4


@pytest.mark.parametrize("name", list(ERRORS_2) + list(ERRORS_4))
def test_bad_input_gives_the_same_error_on_every_rank(results2, results4, name):
    ranks = (results2 if name in ERRORS_2 else results4)[name]
    for r, got in enumerate(ranks):
        assert "crash" not in got, f"rank {r}:\n{got['crash']}"
        assert got["error"] is not None, f"rank {r} ran"
    assert WORDS[name] in ranks[0]["error"], ranks[0]["error"]
    assert all(got["error"] == ranks[0]["error"] and got["where"] == ranks[0]["where"] for got in ranks)
