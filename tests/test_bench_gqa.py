"""benchmarks/bench_gqa.py end to end at toy sizes (CPU, Triton interpreter): every split of the dK/dV
kernel over a K/V head's query heads runs and agrees, and FlexAttention's ``enable_gqa`` output agrees."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_gqa_toy_runs_end_to_end(tmp_path):
    out = tmp_path / "gqa.md"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton"), "ATTNC_CACHE_DIR": str(tmp_path / "attnc")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gqa.py"), "--toy", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "verdict: PASS" in text and re.search(r"Triton \d+\.\d+", text)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"\| attnc, (\d) program\(s\) per K/V head[^|]*\|[^|]*\|[^|]*\|"
                                                         r"[^|]*\| ([^ |]+) \|", text)}
    assert set(rows) == {"1", "2", "4"}, text  # 4 query heads share one K/V head: every divisor of the group
    assert all(float(err) < 1e-5 for err in rows.values()), text
    assert "(the cost model's pick)" in text and "FlexAttention (enable_gqa)" in text
