"""Context parallelism (attnc.distributed.ContextParallel) on 2 and 4 CPU ranks (gloo): every mode
against the single-process reference in float64, forward and backward; the keys that travel against
the plan; bad input gives the same error on every rank. The ranks of one world size run all their
cases in one spawn (a module fixture); each test reads its case's results."""

from __future__ import annotations

import pytest
import ranks
import torch
from cp_worker import case_dlse, case_inputs, case_tensors, compile_case, worker

#: one worker runs the whole module: its fixtures spawn the ranks once for every test
pytestmark = pytest.mark.xdist_group("context_parallel")

B, H, D = 2, 4, 8
SW = dict(spec="stdlib:sliding_window", params={"window": 8})
BIASED = ("pattern biased\n  tokens seq\n  input t: float[heads, 95]\n  input w: float[n]\n"
          "  mask abs(q - k) < 12\n  bias t[h, q - k + 47] + w[k]\n")  # n = 48

CASES_2 = {
    "window-ring": dict(SW, n=64),
    "window-allgather": dict(SW, n=64, kv="allgather"),
    "causal-ring-zigzag": dict(spec="causal", n=64),
    "softcap-allgather": dict(spec="stdlib:softcap", params={"cap": 2.0}, n=64, kv="allgather"),
    "alibi-ring": dict(spec="stdlib:alibi", n=32),
    "neighborhood2d-ring": dict(spec="stdlib:neighborhood_2d", params={"kernel_size": 3},
                                sizes={"height": 8, "width": 8}, n=64),
    "neighborhood3d-allgather": dict(spec="stdlib:neighborhood_3d", params={"kernel_size": 3},
                                     sizes={"frames": 4, "height": 4, "width": 4}, n=64, kv="allgather"),
    "document-ring": dict(spec="stdlib:document", n=60, inputs={"doc": "doc"}),
    "document-whole-inputs": dict(spec="stdlib:document", n=60, inputs={"doc": "doc"}, shard_inputs=False),
    "forgetting-ring": dict(spec="stdlib:forgetting", n=32, inputs={"g": "gate"}),
    "ulysses-gqa": dict(SW, n=64, u=2, Hkv=2),
    "rows-with-no-key": dict(spec="pattern lag\n  tokens seq\n  mask k + 20 <= q\n", n=64),
    "moba-ring": dict(spec="stdlib:moba", params={"block": 8, "topk": 2}, n=64),
    "token-topk-ring": dict(spec="stdlib:token_topk", params={"topk": 5}, n=48),
    "token-indexer-allgather": dict(spec="pattern idx(topk = 4)\n  tokens seq\n  input qi: float[heads, n, 3]\n"
                                    "  input ki: float[heads, nk, 3]\n  mask causal\n  route topk(topk) tokens by qi @ ki\n",
                                    n=48, inputs={"qi": "index", "ki": "index"}, kv="allgather"),
    "dsa-allgather": dict(spec="stdlib:dsa", params={"topk": 5, "index_heads": 2, "index_dim": 3}, n=48,
                          inputs={"qi": "lightning_q", "ki": "lightning_k", "w": "lightning_w"}, kv="allgather"),
    "cluster-mask-ring": dict(spec="stdlib:cluster_mask", params={"clusters": 3}, n=48,
                                     inputs={"centroids": "centroids"}),
    "vertical-slash-ring": dict(spec="stdlib:vertical_slash", n=64, params={
        "vertical": 3, "slash": 4, "last_q": 8, "sinks": 2, "local": 3, "slash_min": 1}),
    "biformer-allgather": dict(spec="stdlib:biformer", params={"region": 2, "topk": 3},
                               sizes={"height": 8, "width": 8}, n=64, kv="allgather"),
    "retention": dict(spec="stdlib:retention", n=32),
    "mamba2": dict(spec="stdlib:mamba2", n=32, inputs={"g": "gate"}, grad_inputs=True),
    "gla": dict(spec="stdlib:gla", n=32, inputs={"g": "vgate"}, grad_inputs=True),
    "gated-delta": dict(spec="stdlib:gated_delta_net", n=32, inputs={"g": "gate", "beta": "beta"}, grad_inputs=True),
    "titans": dict(spec="recurrence mem\n  tokens seq\n  input g: float[heads, n]\n  input theta: float[heads, n]\n"
                        "  input eta: float[heads, n]\n  decay g\n  update titans(theta, eta)\n", n=32,
                   inputs={"g": "gate", "theta": "beta", "eta": "momentum"}, grad_inputs=True),
    # the blocks on the CPU executor (backend "cpu" / "auto") against the one-process reference
    "exec-window-ring": dict(SW, n=64, backend="cpu"),
    "exec-causal-zigzag": dict(spec="causal", n=64, backend="cpu"),
    "exec-neighborhood2d": dict(spec="stdlib:neighborhood_2d", params={"kernel_size": 3},
                                sizes={"height": 8, "width": 8}, n=64, backend="cpu"),
    "exec-document": dict(spec="stdlib:document", n=60, inputs={"doc": "doc"}, backend="cpu"),
    "exec-forgetting": dict(spec="stdlib:forgetting", n=32, inputs={"g": "gate"}, backend="auto",
                            blocks="cpu"),
    "exec-moba-allgather": dict(spec="stdlib:moba", params={"block": 8, "topk": 2}, n=64, backend="cpu",
                                kv="allgather"),
    "exec-softcap-gqa": dict(spec="stdlib:softcap", params={"cap": 2.0}, n=64, Hkv=2, backend="cpu"),
    # the blocks on the Triton kernels (interpreted on CPU tensors), float32, against the reference in
    # float64 within float32 rounding
    "triton-window": dict(SW, n=64, backend="triton", dtype=torch.float32),
    "triton-causal-zigzag": dict(spec="causal", n=64, backend="triton", dtype=torch.float32),
    "triton-neighborhood2d": dict(spec="stdlib:neighborhood_2d", params={"kernel_size": 3},
                                  sizes={"height": 8, "width": 8}, n=64, backend="triton", dtype=torch.float32),
    "triton-document": dict(spec="stdlib:document", n=60, inputs={"doc": "doc"}, backend="triton",
                            dtype=torch.float32),
    "triton-forgetting": dict(spec="stdlib:forgetting", n=32, inputs={"g": "gate"}, backend="triton",
                              dtype=torch.float32),
    "triton-moba": dict(spec="stdlib:moba", params={"block": 8, "topk": 2}, n=64, backend="triton",
                        dtype=torch.float32),
    # a Ulysses rank's share of the heads on the executor: nothing of moba reads the head
    "exec-ulysses-moba": dict(spec="stdlib:moba", params={"block": 8, "topk": 2}, n=64, u=2, backend="cpu"),
    # gradients of call-time inputs across ranks (the reference scores differentiate them, whatever the
    # backend): FoX's gates and a per-key weight sharded over the tokens, a bias table whole on every rank
    "forgetting-grad-ring": dict(spec="stdlib:forgetting", n=32, inputs={"g": "gate"}, grad_inputs=True),
    # FoX's gates under Ulysses: each rank's share of the heads reads its heads' gates (it read every head's)
    "forgetting-grad-ulysses": dict(spec="stdlib:forgetting", n=32, u=2, inputs={"g": "gate"}, grad_inputs=True),
    "exec-forgetting-grad": dict(spec="stdlib:forgetting", n=32, inputs={"g": "gate"}, grad_inputs=True,
                                 backend="cpu"),
    "exec-bias-grad": dict(spec=BIASED, n=48, inputs={"t": "table", "w": "weight"}, grad_inputs=True, backend="cpu",
                           kv="allgather"),
    "triton-forgetting-grad": dict(spec="stdlib:forgetting", n=32, inputs={"g": "gate"}, grad_inputs=True,
                                   backend="triton", dtype=torch.float32),
    "triton-bias-grad": dict(spec=BIASED, n=48, inputs={"t": "table", "w": "weight"}, grad_inputs=True,
                             backend="triton", dtype=torch.float32),
    "triton-lse-causal": dict(spec="causal", n=64, lse=True, backend="triton", dtype=torch.float32),
    # the lse returned and differentiated (to merge with attention computed elsewhere); rows with no key
    "lse-window-ring": dict(SW, n=64, lse=True),
    "exec-lse-lag": dict(spec="pattern lag\n  tokens seq\n  mask k + 20 <= q\n", n=64, lse=True, backend="cpu"),
    # an indexer input that requires grad: the selection does not differentiate it (no gradient, as on
    # one process), and the call does not fail
    "token-indexer-grad": dict(spec="pattern idx(topk = 4)\n  tokens seq\n  input qi: float[heads, n, 3]\n"
                               "  input ki: float[heads, nk, 3]\n  mask causal\n  route topk(topk) tokens by qi @ ki\n",
                               n=48, inputs={"qi": "index", "ki": "index"}, grad_inputs=True, backend="cpu"),
    "bias-grad-allgather": dict(spec=BIASED, n=48, inputs={"t": "table", "w": "weight"}, grad_inputs=True,
                                kv="allgather"),
}
CASES_4 = {
    "window-ring-4": dict(SW, n=64),
    "window-allgather-4": dict(SW, n=64, kv="allgather"),
    "usp-causal-gqa": dict(spec="causal", n=64, u=2, Hkv=2),
    "neighborhood3d-ring-4": dict(spec="stdlib:neighborhood_3d", params={"kernel_size": 3},
                                  sizes={"frames": 8, "height": 3, "width": 3}, n=72),
    "causal-allgather-zigzag-4": dict(spec="causal", n=64, kv="allgather"),
    "moba-usp": dict(spec="stdlib:moba", params={"block": 8, "topk": 3}, n=64, u=2),
    "mamba2-4": dict(spec="stdlib:mamba2", n=32, inputs={"g": "gate"}, grad_inputs=True),
    "vertical-slash-ring-4": dict(spec="stdlib:vertical_slash", n=64, params={
        "vertical": 3, "slash": 4, "last_q": 8, "sinks": 2, "local": 3, "slash_min": 1}),
    "exec-causal-zigzag-4": dict(spec="causal", n=64, kv="allgather", backend="cpu"),
    "exec-usp-window": dict(SW, n=64, u=2, backend="cpu"),
    # ALiBi's slopes read the head: a share of the heads takes the reference scores
    "exec-usp-alibi": dict(spec="stdlib:alibi", n=32, u=2, backend="cpu", blocks="reference"),
    "usp-lse-causal": dict(spec="causal", n=64, u=2, Hkv=2, lse=True),
    "usp-bias-grad": dict(spec=BIASED, n=48, u=2, inputs={"t": "table", "w": "weight"}, grad_inputs=True),
    "kda-4": dict(spec="stdlib:kda", n=32, inputs={"g": "vgate", "beta": "beta"}, grad_inputs=True),
}
WAN_2 = {
    "wan-ring": {"wan": {"ring_degree": 2}},
    "wan-ulysses": {"wan": {"ulysses_degree": 2}},
    "wan-allgather": {"wan": {"ring_degree": 2, "kv": "allgather"}},
    "cogvideox-ring": {"cogvideox": {"ring_degree": 2}},
    "cogvideox-ulysses": {"cogvideox": {"ulysses_degree": 2}},
}
TRAINING_2 = {"cogvideox-training": {"cogvideox": {"ring_degree": 2, "train": True}}}
ERRORS_2 = {
    "shapes-differ": dict(SW, n=64, extra_on_rank1=8, error=True),
    "heads-not-divisible": dict(SW, n=64, u=2, H=3, error=True),
    "tokens-not-divisible": dict(SW, n=66, error=True),
    "arguments-differ": dict(SW, n=64, u=1, u_on_rank1=2, error=True),
    "shared-routing-over-ulysses": dict(spec="stdlib:biformer", params={"region": 2, "topk": 3},
                                        sizes={"height": 8, "width": 8}, n=64, u=2, error=True),
    "recurrence-return-state": dict(spec="stdlib:retention", n=32, error=True, call_kwargs={"return_state": True}),
}
for table in (CASES_2, CASES_4, ERRORS_2):
    for case in table.values():
        case.setdefault("B", B), case.setdefault("H", H), case.setdefault("D", D)


def spawn(world: int, cases: list, out_dir, timeout: float = 600.0) -> None:
    """Runs ``cases`` on ``world`` ranks; never waits past ``timeout`` (the ranks are killed)."""
    ranks.spawn(worker, world, cases, out_dir, timeout)


def _results(tmp_path_factory, world: int, table: dict) -> dict:
    out = tmp_path_factory.mktemp(f"cp{world}")
    names = list(table)
    spawn(world, [table[n] for n in names], out)
    got = {}
    for i, name in enumerate(names):
        got[name] = [torch.load(out / f"case{i}-rank{r}.pt", weights_only=False)
                     if (out / f"case{i}-rank{r}.pt").exists() else {"crash": "no result"} for r in range(world)]
    return got


@pytest.fixture(scope="module")
def results2(tmp_path_factory):
    return _results(tmp_path_factory, 2, {**CASES_2, **ERRORS_2, **WAN_2, **TRAINING_2})


@pytest.fixture(scope="module")
def results4(tmp_path_factory):
    return _results(tmp_path_factory, 4, CASES_4)


def reference(case: dict) -> dict:
    """The single-process result: the reference backend on the whole tensors."""
    attn = compile_case(case)
    q, k, v, dout = case_tensors(case)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    inputs = {n: (t.clone().requires_grad_() if case.get("grad_inputs") else t) for n, t in case_inputs(case).items()}
    if case.get("lse"):
        out, lse = attn(q, k, v, return_lse=True, **inputs)
        torch.autograd.backward([out, lse], [dout, case_dlse(case)])
    else:
        out = attn(q, k, v, **inputs)
        out.backward(dout)
    ref = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if case.get("lse"):
        ref["lse"] = lse.detach()
    if case.get("grad_inputs"):
        ref["dinputs"] = {n: t.grad for n, t in inputs.items()}
    return ref


def check(case: dict, ranks: list) -> None:
    for r, got in enumerate(ranks):
        assert "crash" not in got, f"rank {r}:\n{got['crash']}"
    ref = reference(case)
    for r, got in enumerate(ranks):  # unshard gives every rank the whole tensor
        tol = 1e-9 if case.get("dtype", torch.float64) == torch.float64 else 1e-5  # float32: its rounding
        for key in ("out", "dq", "dk", "dv", *(("lse",) if "lse" in ref else ())):
            torch.testing.assert_close(got[key].to(ref[key].dtype), ref[key], rtol=tol, atol=tol,
                                       msg=f"rank {r} {key}")
        for name, g in ref.get("dinputs", {}).items():
            if g is None:  # not differentiated on one process either (a route's indexer)
                assert got["dinputs"][name] is None, f"rank {r} d{name}"
                continue
            torch.testing.assert_close(got["dinputs"][name].to(g.dtype), g, rtol=tol, atol=tol, msg=f"rank {r} d{name}")


@pytest.mark.parametrize("name", list(CASES_2))
def test_two_ranks_equal_one_process(results2, name):
    check(CASES_2[name], results2[name])


@pytest.mark.parametrize("name", list(CASES_4))
def test_four_ranks_equal_one_process(results4, name):
    check(CASES_4[name], results4[name])


def test_blocks_run_on_the_attentions_backend_where_it_runs_blocks(results2, results4):
    """backend "cpu" and "auto" on CPU tensors: the executor's blocks, also on a Ulysses rank's share of
    the heads; the reference backend, a share of the heads of a pattern that reads the head, and input
    gradients: the reference scores. Recurrences have no blocks (None)."""
    seen = set()
    for table, results in ((CASES_2, results2), (CASES_4, results4)):
        for name, case in table.items():
            ranks = results[name]
            assert all("crash" not in r for r in ranks), name
            if ranks[0]["need"] is None:  # a recurrence
                continue
            want = case.get("blocks", case.get("backend", "reference"))
            assert {r["blocks"] for r in ranks} == {want}, name
            seen.add(want)
    assert seen == {"reference", "cpu", "triton"}  # "auto" names the backend its blocks ran on


def _kv_bytes(case: dict, world: int) -> int:
    """Bytes of one rank's keys and values (float64)."""
    return 2 * case["B"] * case.get("Hkv", case["H"]) * (case["n"] // world) * case["D"] * 8


def test_a_narrow_window_moves_keys_to_the_next_rank_only(results4):
    """Window 8 over shards of 16 tokens: rank i needs rank i - 1 only; the last rank sends nothing."""
    ranks = results4["window-ring-4"]
    need = ranks[0]["need"]
    assert need.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    one = _kv_bytes(CASES_4["window-ring-4"], 4)
    assert [r["bytes"] for r in ranks] == [one, one, one, 0]
    # all-gather moves every shard to every rank, and computes the same pairs
    assert [r["bytes"] for r in results4["window-allgather-4"]] == [3 * one] * 4


def test_a_3d_neighborhood_over_frames_moves_neighbouring_frames_only(results4):
    need = results4["neighborhood3d-ring-4"][0]["need"]
    assert need.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    one = _kv_bytes(CASES_4["neighborhood3d-ring-4"], 4)
    assert [r["bytes"] for r in results4["neighborhood3d-ring-4"]] == [one, 2 * one, 2 * one, one]


def test_a_query_with_no_key_anywhere_gives_zeros(results2):
    """Queries 0..19 of ``k + 20 <= q`` have no key: their output and gradient are exactly 0, not NaN
    (the whole comparison with the reference is in the two-rank tests)."""
    got = results2["rows-with-no-key"][0]
    assert torch.equal(got["out"][:, :, :20], torch.zeros_like(got["out"][:, :, :20]))
    assert torch.equal(got["dq"][:, :, :20], torch.zeros_like(got["dq"][:, :, :20]))
    assert not got["out"].isnan().any() and got["out"][:, :, 20:].abs().sum() > 0


def test_causal_patterns_shard_zigzag_and_windows_contiguous(results2, results4):
    assert results2["causal-ring-zigzag"][0]["zigzag"] is True
    assert results4["causal-allgather-zigzag-4"][0]["zigzag"] is True
    assert results2["window-ring"][0]["zigzag"] is False
    # USP: 2 ring positions of 2 Ulysses ranks; the ring is causal, so zigzag
    assert results4["usp-causal-gqa"][0]["need"].shape == (2, 2)


@pytest.mark.parametrize("name,words", [
    ("shapes-differ", "ranks disagree on the q"),
    ("heads-not-divisible", "do not split over ulysses_degree 2"),
    ("tokens-not-divisible", "66 tokens do not split"),
    ("arguments-differ", "ranks disagree on the ulysses_degree"),
    ("shared-routing-over-ulysses", "averages its routing scores over every head"),
    ("recurrence-return-state", "it takes no return_state="),
])
def test_bad_input_gives_the_same_error_on_every_rank(results2, name, words):
    errors = [r.get("error") for r in results2[name]]
    assert all("crash" not in r for r in results2[name]), results2[name]
    assert errors[0] is not None and words in errors[0], errors
    assert errors[1] == errors[0]


@pytest.mark.parametrize("name,mode", [("window-ring-4", "ring"), ("window-allgather-4", "allgather"),
                                       ("neighborhood3d-ring-4", "ring"), ("usp-causal-gqa", "ring + ulysses 2"),
                                       ("vertical-slash-ring-4", "ring")])
def test_the_simulator_predicts_the_bytes_each_rank_sends(results4, name, mode):
    """``attnc sim --ranks``'s bytes per rank (bf16) are the runtime's (float64: 4x) for the same plan
    (a vertical-slash selection: the flags of the case's q and k, and the gathered k and last queries counted)."""
    from attnc.runtime.parallel.simulate import simulate_parallel
    from attnc.runtime.plan import clusters

    case = CASES_4[name]
    pat = compile_case(case).pattern
    q, k, _, _ = case_tensors(case)
    inputs = clusters.derive_inputs(pat, q, k, case_inputs(case))
    rep = simulate_parallel(pat, n=case["n"], ranks=4, sizes=case.get("sizes"),
                            heads=case["H"], kv_heads=case.get("Hkv"), head_dim=case["D"], batch=case["B"],
                            single_device_s=1e-3, inputs=inputs or None)
    est = next(m for m in rep.modes if m.name() == mode)
    assert [4 * b for b in est.sent_bytes] == [r["bytes"] for r in results4[name]]
    assert est.need == results4[name][0]["need"].int().tolist()


def test_sim_ranks_names_the_best_mode_and_refuses_bad_arguments(capsys):
    from attnc.cli import main

    assert main(["sim", "stdlib:sliding_window", "-p", "window=64", "--n", "4096", "--heads", "4",
                 "--ranks", "4", "--link", "pcie"]) == 0
    text = capsys.readouterr().out
    assert "context parallel: 'sliding_window' over 4 ranks, link pcie (64 GB/s" in text
    assert "best: " in text and "allgather" in text
    assert main(["sim", "stdlib:sliding_window", "-p", "window=64", "--n", "4095", "--ranks", "4"]) != 0
    assert "argument --ranks" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(WAN_2))
def test_a_video_model_sharded_over_ranks_equals_one_process(results2, name):
    """diffusers' ContextParallelConfig(ring_degree / ulysses_degree) on a tiny random Wan transformer
    (split where its _cp_plan says) and CogVideoX (no _cp_plan: its video tokens split, its text tokens on
    every rank, the text queries' partial results gathered): every rank's output equals the one-process
    attnc model's (itself checked against diffusers' processors in tests/integrations/test_diffusers.py); keys moved
    only between neighbours."""
    import cp_worker

    ranks = results2[name]
    assert all("crash" not in r for r in ranks), ranks[0].get("crash")
    model = next(iter(WAN_2[name]))  # "wan" or "cogvideox"
    want = getattr(cp_worker, f"run_{model}")(None)["out"]
    for r in ranks:
        torch.testing.assert_close(r["out"], want, rtol=1e-9, atol=1e-9)
    assert ranks[0]["bytes"] > 0


def test_the_diffusers_integration_refuses_a_training_call_under_context_parallelism(results2):
    """The gathered output is outside autograd: a call recording gradients is one clear error on every
    rank, not a silent loss of the blocks' gradients."""
    ranks = results2["cogvideox-training"]
    assert all("crash" not in r for r in ranks), ranks[0].get("crash")
    assert all(r["error"] and "serves inference" in r["error"] and "hidden_states" in r["error"] for r in ranks)


def test_sim_ranks_reads_the_call_time_inputs_of_the_mask(capsys):
    """The estimate classifies chunk pairs with the mask's inputs (here document ids): documents that end
    at the shard boundary move nothing over the ring; one document over the whole sequence moves one
    shard forward. From the CLI, missing inputs are sampled as for the one-device simulation (it used to
    fail on 'missing input')."""
    import attnc
    from attnc.cli import main
    from attnc.runtime.parallel.simulate import simulate_parallel

    n = 2048
    doc = attnc.load("stdlib:document")

    def ring(pat, inputs=None):
        rep = simulate_parallel(pat, n=n, ranks=2, heads=2, head_dim=64, single_device_s=1e-3, inputs=inputs)
        est = next(m for m in rep.modes if m.name() == "ring")
        return est.sent_bytes, est.need

    split = torch.cat([torch.zeros(n // 2), torch.ones(n // 2)]).long()
    assert ring(doc, {"doc": split}) == ([0, 0], [[1, 0], [0, 1]])
    # one document: rank 1's queries read rank 0's keys, which sends its k and v shard (bf16) once
    shard = 2 * 2 * 64 * (n // 2) * 2
    assert ring(doc, {"doc": torch.zeros(n, dtype=torch.long)}) == ([shard, 0], [[1, 0], [1, 1]])
    assert main(["sim", "stdlib:document", "--n", "4096", "--ranks", "2", "--input", "doc=0*2048,1*2048"]) == 0
    assert "context parallel: 'document' over 2 ranks" in capsys.readouterr().out
