"""Every benchmark script says what it costs, and every one that runs on a CPU has a ``--quick`` mode.

Read from the sources (no script is run, nothing heavy imported): the module docstring, which each
script's ``--help`` prints, names its cost, and the argparse options include ``--quick``; the GPU-only
suites (``--toy`` is their CPU check) say so instead. ``bench_dynamic``'s quick mode keeps the
selections' densities (its token counts scale with ``--n``) and its up-front estimate warns at 16K.
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py"))
#: need a CUDA device for their real run; ``--toy`` runs them in Triton's interpreter on a CPU
GPU_ONLY = {"gpu_conformance.py", "gpu_suite.py", "gpu_suite_dynamic.py", "bench_gqa.py"}


def options(tree: ast.Module) -> set[str]:
    """The option strings of every ``add_argument`` call in the file."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
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
        assert "--toy" in options(tree) or "suite_args(" in path.read_text()  # gpu_suite's command line
    else:
        assert "--quick" in options(tree), f"{path.name}: no --quick"
        assert "--quick" in doc


def test_help_prints_the_docstring():
    """argparse's description is the whole docstring (where the cost is), not only its first line."""
    for path in SCRIPTS:
        text = path.read_text()
        if "ArgumentParser(" not in text:
            continue
        assert "description=__doc__.split" not in text and "description=__doc__.splitlines" not in text, path.name


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
    assert dynamic.params("vertical_slash", 16384) == {}  # its defaults: 1,000 columns, 6,096 diagonals
    assert dynamic.params("vertical_slash", 2048) == {"vertical": 125, "slash": 762}
    assert dynamic.params("xattention", 2048) == {}
    assert dynamic.params("token_topk", 2048) == {"topk": 128}
    assert dynamic.params("moba", 2048) == {"block": 128, "topk": 4}


def test_dynamic_estimate(dynamic):
    full = dynamic.estimate_s(16384, 4, 5)
    quick = dynamic.estimate_s(dynamic.QUICK["n"], 4, dynamic.QUICK["repeat"])
    assert 15 * 60 < full < 30 * 60  # the recorded runs: about 45 s a case and round at 16K
    assert quick < 120
