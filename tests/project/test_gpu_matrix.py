"""``benchmarks/gpu_matrix.py``, the one-call GPU matrix of every stdlib pattern: its table names every stdlib
pattern, and ``--toy`` runs end to end on the CPU (the interpreter) for a pattern of each kind of row: a mask
Flex takes, a route (Flex given attnc's selection), a grid, a recurrence (Flex refused, by name), writing one row
each with attnc's and SDPA's times and Flex's output equal to attnc's."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import interpreter_speed

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_matrix.py"


def run(*args, folder, timeout=900):
    """``benchmarks/gpu_matrix.py ARGS`` in a process of its own, with the suite's interpreter settings."""
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=timeout,
                          env=interpreter_speed.child_env(dict(os.environ), folder))


def test_the_matrix_has_a_row_for_every_stdlib_pattern():
    from attnc.spec.library import stdlib_index

    spec = importlib.util.spec_from_file_location("gpu_matrix_mod", BENCH)
    matrix = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = matrix  # its dataclass looks its module up
    spec.loader.exec_module(matrix)
    for toy in (True, False):
        assert {c.name for c in matrix.cases(toy)} == set(stdlib_index())
    real = {c.name: c for c in matrix.cases(False)}
    assert real["sliding_window"].n == 16384 and real["mamba2"].n == 8192
    assert real["neighborhood_2d"].grid == {"height": 128, "width": 128}
    assert real["neighborhood_3d"].grid == {"frames": 30, "height": 48, "width": 80}
    assert matrix.main(["--toy", "--only", "no_such_pattern"]) == 2


def test_toy_rows_of_each_kind(tmp_path):
    out = tmp_path / "matrix.md"
    names = ["sliding_window", "moba", "neighborhood_2d", "mamba2"]
    done = run("--toy", "--only", ",".join(names), "--out", str(out), folder=tmp_path)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| pattern") and not line.startswith("| ---")}
    assert set(rows) == set(names)
    for cells in rows.values():
        assert float(cells[3]) > 0 and float(cells[5]) > 0, cells  # attnc's forward and fwd+bwd
        assert float(cells[12]) > 0 and float(cells[13]) > 0, cells  # SDPA's
    for name in ("sliding_window", "moba", "neighborhood_2d"):  # Flex's forward (no CPU backward: in the note)
        assert float(rows[name][8]) > 0 and float(rows[name][10]) < 1e-4, rows[name]  # the same attention
    assert "given attnc's selection" in rows["moba"][-1]
    assert rows["sliding_window"][11] == "is_causal" and rows["neighborhood_2d"][11] == "dense"
    assert "Flex: " in rows["mamba2"][-1]  # what Flex cannot express is named
    assert rows["mamba2"][1] == "recurrence"


def _row(name: str, note: str) -> str:
    return "| " + " | ".join([name, *["-"] * 21, note]) + " |"


def test_resume_keeps_the_measured_rows_and_runs_the_rest(tmp_path):
    """``--resume``: a row an earlier run measured is kept as it is (not run again), a row it did not reach or that
    failed is run, a row of a pattern not asked for stays as it was, and the rows keep the table's order, under both
    runs' header lines."""
    out = tmp_path / "matrix.md"
    first = run("--toy", "--only", "sliding_window,streaming", "--budget-s", "0", "--out", str(out), folder=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    text = out.read_text()
    assert text.count("not reached: --budget-s spent") == 2
    # an earlier run's failed row and measured row, as the script writes them
    text = text.replace(_row("streaming", "not reached: --budget-s spent"), _row("streaming", "error: OutOfMemoryError"))
    out.write_text(text + _row("mamba2", "measured earlier") + "\n" + _row("alibi", "not reached: --budget-s spent")
                   + "\n")
    second = run("--toy", "--resume", "--only", "sliding_window,mamba2,streaming", "--out", str(out), folder=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    lines = out.read_text().splitlines()
    table = [line for line in lines if line.startswith("| ") and not line.startswith(("| pattern", "| ---"))]
    by_name = {line.split(" | ")[0].strip("| "): line for line in table}
    spec = importlib.util.spec_from_file_location("gpu_matrix_order", BENCH)
    matrix = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = matrix
    spec.loader.exec_module(matrix)
    order = [c.name for c in matrix.cases(True)]
    assert list(by_name) == sorted(["sliding_window", "mamba2", "streaming", "alibi"], key=order.index)
    assert by_name["mamba2"] == _row("mamba2", "measured earlier")  # kept, not run again
    assert by_name["alibi"] == _row("alibi", "not reached: --budget-s spent")  # not asked for: left as it was
    for name in ("sliding_window", "streaming"):  # not reached, failed: run now
        cells = by_name[name].split(" | ")
        assert float(cells[3]) > 0 and "not reached" not in cells[-1] and "error" not in cells[-1], cells
    resumed = [line for line in lines if line.startswith("Resumed: ")]
    assert len(resumed) == 1 and resumed[0].endswith("1 rows kept, 2 run.")
