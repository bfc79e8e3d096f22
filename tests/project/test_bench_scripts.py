"""Every benchmark script says what it costs, and every one that runs on a CPU has a ``--quick`` mode.

Read from the sources (no script is run, nothing heavy imported): the module docstring, which each
script's ``--help`` prints, names its cost, and the argparse options include ``--quick``; the GPU-only
suites (``--toy`` is their CPU check) say so instead. ``bench_dynamic``'s quick mode keeps the
selections' densities (its token counts scale with ``--n``) and its up-front estimate warns at 16K.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py"))
#: need a CUDA device for their real run; ``--toy`` runs them in Triton's interpreter on a CPU
GPU_ONLY = {"gpu_conformance.py", "gpu_matrix.py", "gpu_suite.py", "gpu_suite_dynamic.py", "bench_gqa.py",
            "paged_routes.py"}


def options(tree: ast.Module) -> set[str]:
    """The option strings of every ``add_argument`` call in the file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {
                a.value
                for a in node.args
                if isinstance(a, ast.Constant) and isinstance(a.value, str)
            }
    return found


def test_every_script_is_covered():
    assert len(SCRIPTS) >= 20 and GPU_ONLY <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_help_says_what_the_script_costs(path):
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    assert "Cost" in doc, f"{path.name}: its docstring (--help) does not say what it costs"
    assert "QUICK_COST" not in doc and "FULL_COST" not in doc, f"{path.name}: a placeholder left in"
    if path.name in GPU_ONLY:
        assert "GPU" in doc and "--toy" in doc
        assert (
            "--toy" in options(tree) or "suite_args(" in path.read_text()
        )  # gpu_suite's command line
    else:
        assert "--quick" in options(tree), f"{path.name}: no --quick"
        assert "--quick" in doc


def test_help_prints_the_docstring():
    """argparse's description is the whole docstring (where the cost is), not only its first line."""
    for path in SCRIPTS:
        text = path.read_text()
        if "ArgumentParser(" not in text:
            continue
        assert (
            "description=__doc__.split" not in text and "description=__doc__.splitlines" not in text
        ), path.name


@pytest.fixture(scope="module")
def dynamic():
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_dynamic", BENCH / "bench_dynamic.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_dynamic_params_scale_with_n(dynamic):
    assert dynamic.params("token_topk", 16384) == {"topk": 1024}  # the full run as recorded
    assert dynamic.params("moba", 16384) == {"block": 1024, "topk": 4}
    assert (
        dynamic.params("vertical_slash", 16384) == {}
    )  # its defaults: 1,000 columns, 6,096 diagonals
    assert dynamic.params("vertical_slash", 2048) == {"vertical": 125, "slash": 762}
    assert dynamic.params("xattention", 2048) == {}
    assert dynamic.params("token_topk", 2048) == {"topk": 128}
    assert dynamic.params("moba", 2048) == {"block": 128, "topk": 4}


def test_dynamic_estimate(dynamic):
    full = dynamic.estimate_s(16384, 4, 5)
    quick = dynamic.estimate_s(dynamic.QUICK["n"], 4, dynamic.QUICK["repeat"])
    assert 15 * 60 < full < 30 * 60  # the recorded runs: about 45 s a case and round at 16K
    assert quick < 120


@pytest.fixture(scope="module")
def decode():
    """benchmarks/decode.py, imported without leaving its ``TRITON_INTERPRET`` in this process."""
    saved = os.environ.get("TRITON_INTERPRET")
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("bench_decode_steps", BENCH / "decode.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_decode_steps", None)
        sys.path.remove(str(BENCH))
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved


def test_decode_pages_hold_the_contiguous_cache(decode):
    """The paged rows the decode benchmark times hold the same keys as its contiguous cache."""
    import torch

    c = decode.Caches.make(2, 4, 2, 8, 256, 64, torch.float32, "cpu")
    assert sorted(c.block_table.flatten().tolist()) == list(range(8))  # every page once, shuffled
    assert c.block_table.flatten().tolist() != list(range(8))
    for nk in (1, 64, 100, 256):
        k, v = c.gathered(nk)
        assert torch.equal(k, c.k[:, :, :nk]) and torch.equal(v, c.v[:, :, :nk])
        rows = c.block_table.long()
        for b in range(
            2
        ):  # slot j % 64 of page block_table[b, j // 64], as the paged call reads it
            j = torch.arange(nk)
            got = c.k_pages[rows[b, j // 64], j % 64].transpose(0, 1)
            assert torch.equal(got, c.k[b, :, :nk])
    assert c.seqlens(5).tolist() == [5, 5] and c.seqlens(5).dtype == torch.int32


def test_decode_quick_runs_the_criterion_case(decode):
    """--quick keeps issue 42's criterion: window 64, nk 256 and 2048; SDPA's mask row is that window."""
    import torch

    label, src, params, lengths, steps, rounds = decode.interpreter_cases(True)[0]
    assert (src, params, lengths) == ("stdlib:sliding_window", {"window": 64}, (256, 2048))
    assert {c[3] for c in decode.interpreter_cases(False)} >= {(256, 512, 1024, 2048)}
    assert decode.window_row(10, 4, "cpu").flatten().tolist() == [False] * 6 + [True] * 4
    assert decode.window_row(10, None, "cpu") is None
    args = decode.parse_args(["--quick"])
    assert (args.rounds, args.steps, args.quick) == (3, 8, True)
    full = decode.parse_args([])
    assert (full.rounds, full.steps) == (5, 16)
    assert decode.gpu_sizes(decode.parse_args(["--gpu-toy"])).device == "cpu"
    assert (
        decode.gpu_sizes(full).dtype == torch.bfloat16
        and max(decode.gpu_sizes(full).lengths) == 131072
    )
