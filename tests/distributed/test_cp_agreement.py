"""Context parallelism's agreement before any collective (runtime/parallel/context.py): a call that can
fail on one rank only (a bad gate in that rank's part of a delta-rule recurrence) gives the same
SpecError on every rank, instead of the other ranks waiting in a collective it skips; ranks whose
attentions were compiled differently (a route's topk, a softcap, a recurrence's option: anything of the
IR) refuse to run, each its own. Two gloo ranks per case, a short process-group timeout (cp_agree_worker)
and a join deadline: a regression fails, it does not hang."""

from __future__ import annotations

import math

import pytest
import ranks
import torch
from cp_agree_worker import worker

GATED = dict(spec="stdlib:gated_delta_net", B=1, H=2, n=32, D=4)
#: a bias table of one entry per 12 queries, 2 entries: the queries from 24 on read past it, and under the
#: zigzag order over 2 ranks (chunks of 8) only rank 0 holds them. The mask's own reads are checked before
#: any transfer, a bias's only at the pairs attended: while the blocks are computed
TABLE = dict(spec="pattern b\n  tokens seq\n  input t: float[heads]\n  mask k <= q\n  bias t[q // 12]\n",
             B=1, H=2, n=32, D=4, table=2)
CASES = {
    # one rank's bad gate: refused on every rank before the states are all-gathered
    "nan-gate-cpu": dict(GATED, gate=math.nan, backend="cpu"),
    "inf-gate-reference": dict(GATED, gate=math.inf, backend="reference"),
    "positive-gate-cpu": dict(GATED, gate=0.5, backend="cpu"),
    "nan-gate-kda-triton": dict(GATED, spec="stdlib:kda", gate=math.nan, backend="triton", dtype=torch.float32),
    # ranks compiled differently: the route's topk, a softcap, a recurrence's option
    "moba-topk-differs": dict(spec="stdlib:moba", params={"block": 8, "topk": 2}, params_on_rank1={"topk": 3},
                              B=1, H=2, n=64, D=8),
    "token-topk-differs": dict(spec="stdlib:token_topk", params={"topk": 3}, params_on_rank1={"topk": 4},
                               B=1, H=2, n=48, D=8),
    "softcap-differs": dict(spec="stdlib:softcap", params={"cap": 2.0}, params_on_rank1={"cap": 3.0},
                            B=1, H=2, n=32, D=8),
    "delta-option-differs": dict(GATED, gate=-1.0, params_on_rank1={"qk_l2norm": True}),
    # one rank's queries read a bias input out of range, found only once the ring has begun
    "bias-index-ring-reference": dict(TABLE, kv="ring"),
    "bias-index-ring-cpu": dict(TABLE, kv="ring", backend="cpu"),
    "bias-index-allgather-cpu": dict(TABLE, kv="allgather", backend="cpu"),
}
WORDS = {
    "nan-gate-cpu": "rank 1: the delta rule's gates are log decays",
    "inf-gate-reference": "rank 1: the delta rule's gates are log decays",
    "positive-gate-cpu": "rank 1: the delta rule's gates are log decays",
    "nan-gate-kda-triton": "rank 1: the delta rule's gates are log decays",
    "moba-topk-differs": "ranks disagree on the pattern",
    "token-topk-differs": "ranks disagree on the pattern",
    "softcap-differs": "ranks disagree on the pattern",
    "delta-option-differs": "ranks disagree on the pattern",
    "bias-index-ring-reference": "rank 0: input 't' indexed out of range at a (query, key) pair the pattern attends",
    "bias-index-ring-cpu": "rank 0: input 't' indexed out of range at a (query, key) pair the pattern attends",
    "bias-index-allgather-cpu": "rank 0: input 't' indexed out of range at a (query, key) pair the pattern attends",
}


#: the case of ranks compiled alike, with valid gates: they run
ALIKE = dict(GATED, gate=-1.0, backend="cpu")
#: one worker runs the whole module: its fixture spawns the two ranks once for every case
pytestmark = pytest.mark.xdist_group("cp_agreement")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, list[dict]]:
    """Each case's result on each rank, from one spawn of two ranks that run every case in turn (never
    waiting past the deadline: the ranks are killed). Every case below ends before any collective it
    could be stuck in, or after one every rank reached: the next case starts with the ranks in step."""
    out = tmp_path_factory.mktemp("cp_agreement")
    names = [*CASES, "alike"]
    ranks.spawn(worker, 2, [CASES.get(name, ALIKE) for name in names], out, timeout=300.0)
    return {name: [ranks.result(out / f"case{i}-rank{r}.pt") for r in range(2)] for i, name in enumerate(names)}


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_raises_the_same_error(results, name):
    got_ranks = results[name]
    for r, got in enumerate(got_ranks):
        assert "crash" not in got, f"rank {r}:\n{got['crash']}"
        assert got["error"] is not None, f"rank {r} ran: {got}"
    assert WORDS[name] in got_ranks[0]["error"], got_ranks[0]["error"]
    assert got_ranks[1]["error"] == got_ranks[0]["error"] and got_ranks[1]["where"] == got_ranks[0]["where"]
    assert got_ranks[0]["where"] == ("argument attn" if "params_on_rank1" in CASES[name] else
                                     "argument t" if "table" in CASES[name] else "argument g")


def test_identical_attentions_compiled_on_each_rank_still_agree(results):
    """The pattern's identity is a digest of its IR, stable across processes: ranks that compile the same
    pattern each on its own run (with valid gates)."""
    assert results["alike"] == [{"error": None, "finite": True}] * 2, results["alike"]
