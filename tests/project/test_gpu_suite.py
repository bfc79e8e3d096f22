"""benchmarks/gpu_suite.py end to end at toy sizes (CPU, Triton interpreter), in a
subprocess as a user runs it: every case checked and passing, one results file
holding the versions, the correctness table and the timings beside the predictions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import interpreter_speed

ROOT = Path(__file__).resolve().parents[2]


def run_toy(tmp_path, script: str, *args: str) -> str:
    """``benchmarks/SCRIPT --toy ARGS --out FILE`` in a process of its own, with caches of its own: the text
    of its results file (the run must exit 0)."""
    out = tmp_path / f"{Path(script).stem}.md"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "ATTNC_CACHE_DIR": str(tmp_path / "attnc")}
    env = interpreter_speed.child_env(env, tmp_path)  # the suite's interpreter settings, as in the workers
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--toy", *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out.read_text()


def test_gpu_suite_toy_runs_end_to_end(tmp_path):
    text = run_toy(tmp_path, "gpu_suite.py")
    assert "verdict: PASS" in text
    assert re.search(r"torch \d+\.\d+", text) and re.search(r"Triton \d+\.\d+", text)
    assert "flash-linear-attention:" in text
    # one correctness row per case, each passing with float32 errors (the interpreter computes in fp32)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.rstrip().endswith("PASS |")]
    assert len(rows) == 5, text
    for row in rows:
        errors = [float(x) for x in re.findall(r"\d\.\d\de[-+]\d\d", row)[:4]]
        assert len(errors) == 4 and max(errors) < 1e-5, row
    # every softmax case has attnc, FlexAttention and SDPA timings, with a predicted time beside attnc's
    for name in ("1-D", "2-D", "3-D", "causal"):
        attnc_row = next(line for line in text.splitlines() if line.startswith(f"| {name} | attnc triton ("))
        cells = [c.strip() for c in attnc_row.strip("|").split("|")]
        assert float(cells[2]) > 0 and float(cells[3]) > 0 and cells[7].endswith("x"), attnc_row
        # the config that ran, named as check-gpu names it (tiles, layout, warps, stages)
        assert re.search(r"attnc triton \([\dx]+/[\dx]+ \w+ w\d+ s\d+", cells[1]), attnc_row
        assert any(line.startswith(f"| {name} | FlexAttention |") for line in text.splitlines())
        assert any(line.startswith(f"| {name} | SDPA dense |") for line in text.splitlines())
    assert "## Fit ladder\n\n- the interpreter launches every kernel as picked" in text
    assert any(line.startswith("| causal | SDPA causal (is_causal) |") for line in text.splitlines())
    # the variant the toy run can take: the causal case's kernels again without order tables
    variant = next(line for line in text.splitlines() if line.startswith("| causal | attnc triton, tile order"))
    assert float(variant.split("|")[5]) > 0, variant
    # and the forward with its scale applied to the scores first (every case's scores are the scaled q.k alone)
    for name in ("1-D", "2-D", "3-D", "causal"):
        first = next(line for line in text.splitlines()
                     if line.startswith(f"| {name} | attnc triton, scale applied to the scores first"))
        assert float(first.split("|")[3]) > 0 and float(first.split("|")[5]) > 0, first
    # and the kernels reading every tile index from the lists, where they had stepped through runs (causal)
    indexed = next(line for line in text.splitlines() if line.startswith("| causal | attnc triton, lists by index"))
    assert float(indexed.split("|")[5]) > 0, indexed
    # and the config that ran with its tiles loaded by TMA (the interpreter loads tensor descriptors)
    tma = next(line for line in text.splitlines() if line.startswith("| causal | attnc triton, TMA loads"))
    assert float(tma.split("|")[5]) > 0, tma
    # and its forward warp-specialized on those loads (on the toy's H100: its KV tiles in one loop), the same output
    specialized = next(line for line in text.splitlines()
                       if line.startswith("| causal | attnc triton, forward warp-specialized"))
    assert float(specialized.split("|")[5]) > 0, specialized
    assert float(re.search(r"output within (\S+) of", specialized).group(1)) < 1e-6, specialized
    # and the backward in one kernel, dQ by atomics (the toy's hardware model is an H100), its gradients those
    # of the two kernels to fp32 rounding
    for name in ("1-D", "2-D", "3-D", "causal"):
        fused = next(line for line in text.splitlines()
                     if line.startswith(f"| {name} | attnc triton, backward in one kernel"))
        assert float(fused.split("|")[5]) > 0, fused
        assert float(re.search(r"gradients within (\S+) of", fused).group(1)) < 1e-5, fused


def test_gpu_conformance_toy_checks_each_case_against_the_reference(tmp_path):
    """benchmarks/gpu_conformance.py at toy sizes: a softmax case (triton and flex rows) and a
    recurrence, each in its own subprocess, every error a float32 one, one results file."""
    text = run_toy(tmp_path, "gpu_conformance.py", "--only", "moba", "mamba2", "--jobs", "2")
    assert "verdict: PASS" in text
    rows = [line for line in text.splitlines() if line.startswith("| moba") or line.startswith("| mamba2")]
    assert sorted(r.split("|")[2].strip() for r in rows) == ["flex", "triton", "triton"], rows
    for row in rows:
        errors = [float(x) for x in re.findall(r"\b(?:out|lse|dq|dk|dv|dg) (\d\.\de[-+]\d\d)", row)]
        assert len(errors) >= 4 and max(errors) < 1e-5 and row.rstrip().endswith("PASS |"), row
    assert (tmp_path / "gpu_conformance.jsonl").read_text().count("\n") == len(rows)


def test_gpu_conformance_differentiates_only_the_inputs_the_scores_read(tmp_path):
    """gpu_conformance asks gradients of the float inputs the scores read, not of those only a route
    reads: dsa's indexer inputs (qi, ki, w) choose its keys, a selection that is not differentiated (asking
    for their gradients raised in autograd on every backend); dma's importance, its route's score and
    also its bias, gets its gradient checked."""
    text = run_toy(tmp_path, "gpu_conformance.py", "--only", "dsa", "dma", "--jobs", "2")
    assert "verdict: PASS" in text
    rows = {(r.split("|")[1].split()[0], r.split("|")[2].strip()): r for r in text.splitlines()
            if r.startswith(("| dsa", "| dma"))}
    assert sorted(rows) == [("dma", "flex"), ("dma", "triton"), ("dsa", "flex"), ("dsa", "triton")], text
    for (case, _), row in rows.items():
        errors = dict(re.findall(r"\b(d\w+) (\d\.\de[-+]\d\d)", row))
        assert set(errors) == {"dq", "dk", "dv"} | ({"dimportance"} if case == "dma" else set()), row
        assert max(map(float, errors.values())) < 1e-5 and row.rstrip().endswith("PASS |"), row


def test_gate_gradient_yardstick_matches_autograd_and_catches_a_wrong_dg():
    """gpu_suite's gate-gradient formula equals float64 autograd (scalar and per-channel gates, a batch of
    two); dq and dk perturbed by 2e-3 explain a dg error several times larger (the terms cancel); and
    ``gate_grad_ok`` passes a dg within 1.5x of that, but not beyond it, not above the cap, not with
    failing dq or dk, and not NaN."""
    import importlib.util

    import torch

    import attnc

    spec = importlib.util.spec_from_file_location("gpu_suite_mod", ROOT / "benchmarks" / "gpu_suite.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)
    for name, gshape in (("mamba2", (2, 96)), ("gla", (2, 96, 8))):
        gen = torch.Generator().manual_seed(3)
        q, k, v = (torch.randn(2, 2, 96, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
        g = (-torch.rand(*gshape, generator=gen, dtype=torch.float64) * 0.2).requires_grad_()
        o = attnc.compile_attention(f"stdlib:{name}", backend="cpu")(q, k, v, g=g, scale=0.3)
        dq, dk, dg = torch.autograd.grad((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum(), [q, k, g])
        vector = name == "gla"
        q, k = q.detach(), k.detach()
        assert gs.rel(gs.gate_grad_from(q, k, dq, dk, vector), dg) < 1e-12
        noisy = [x + torch.randn(x.shape, generator=gen, dtype=x.dtype) * (2e-3 * x.norm() / x.numel() ** 0.5)
                 for x in (dq, dk)]
        explained = gs.gate_grad_explained(q, k, *noisy, dg, vector)
        assert explained > 2 * 2e-3, (name, explained)
    errs = {"dq": 3e-3, "dk": 2e-3, "dg": 0.03}
    assert gs.gate_grad_ok(errs, 0.025, 2e-2)  # 0.03 <= 1.5 x 0.025
    assert not gs.gate_grad_ok(errs, 0.015, 2e-2)  # beyond what dq, dk explain
    assert not gs.gate_grad_ok({**errs, "dg": 0.06}, 0.05, 2e-2)  # above GATE_GRAD_CAP
    assert not gs.gate_grad_ok({**errs, "dq": 3e-2}, 0.025, 2e-2)  # dq itself fails
    assert not gs.gate_grad_ok({**errs, "dg": float("nan")}, 0.025, 2e-2)
    assert gs.gate_grad_ok({**errs, "dg": 0.01}, 0.0, 2e-2)  # under the plain bound


def test_gpu_suite_dynamic_toy_runs_end_to_end(tmp_path):
    """benchmarks/gpu_suite_dynamic.py at toy sizes: every route case (moba, token_topk, xattention,
    vertical_slash), delta-rule case (gated_delta_net, kda) and Titans checked and passing with float32
    errors, the selection timed apart, one results file."""
    text = run_toy(tmp_path, "gpu_suite_dynamic.py")
    assert "verdict: PASS" in text and re.search(r"Triton \d+\.\d+", text)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.rstrip().endswith("PASS |")]
    assert len(rows) == 7, text
    for row in rows:
        errors = [float(x) for x in re.findall(r"\d\.\d\de[-+]\d\d", row)[:4]]
        assert len(errors) == 4 and max(errors) < 1e-5, row
    for name in ("moba", "token_topk", "xattention", "vertical_slash"):
        attnc_row = next(line for line in text.splitlines() if line.startswith(f"| {name} T=96 | attnc triton"))
        cells = [c.strip() for c in attnc_row.strip("|").split("|")]
        assert float(cells[2]) > 0 and 0 < float(cells[3]) < float(cells[2]), attnc_row  # selection inside the call


def test_gpu_suite_names_the_kernels_the_fit_ladder_lowered(monkeypatch):
    """On a GPU the results say which kernels ran below their config's rung (a timing is of what ran)."""
    import importlib.util

    from attnc.runtime import kernel_fit as KF

    spec = importlib.util.spec_from_file_location("gpu_suite_mod", ROOT / "benchmarks" / "gpu_suite.py")
    gs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gs)

    def attnc_bwd_dq():
        pass

    monkeypatch.setattr(KF, "FITTED", {})
    assert "- none: every kernel launched as picked" in gs.fit_ladder_lines(False)
    KF.FITTED[attnc_bwd_dq] = {(8, 3, (), ()): {"num_warps": 8, "num_stages": 3, "FULL_RUN": False}}
    assert "- attnc_bwd_dq: w8 s3 -> w8 s3 indexed" in gs.fit_ladder_lines(False)


def test_bench_gqa_toy_runs_end_to_end(tmp_path):
    """benchmarks/bench_gqa.py at toy sizes: every split of the dK/dV kernel over a K/V head's query heads
    runs and agrees, and FlexAttention's ``enable_gqa`` output agrees."""
    text = run_toy(tmp_path, "bench_gqa.py")
    assert "verdict: PASS" in text and re.search(r"Triton \d+\.\d+", text)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"\| attnc, (\d) program\(s\) per K/V head[^|]*\|[^|]*\|[^|]*\|"
                                                         r"[^|]*\| ([^ |]+) \|", text)}
    assert set(rows) == {"1", "2", "4"}, text  # 4 query heads share one K/V head: every divisor of the group
    assert all(float(err) < 1e-5 for err in rows.values()), text
    assert "(the cost model's pick)" in text and "FlexAttention (enable_gqa)" in text
