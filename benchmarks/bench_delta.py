"""The delta rule on CPU: the chunked form against the token-by-token one (recorded, not a timed test).

    python benchmarks/bench_delta.py [--t 4096] [--heads 4] [--dim 64] [--repeat 3] [--out FILE.md]

fp32, batch 1; forward under no_grad and forward + backward (q, k, v, beta, g); interleaved rounds,
the median. ``reference`` is attnc's naive loop, ``cpu`` the chunked form (chunks of 64). Outputs are
checked against each other before timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from bench_flex import emit, interleaved  # noqa: E402

import attnc  # noqa: E402

GATES = {"delta_net": None, "gated_delta_net": "scalar", "kda": "vector"}


def tensors(name, T, H, D):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, H, T, D, generator=g)
    k = F.normalize(torch.randn(1, H, T, D, generator=g), dim=-1)
    v = torch.randn(1, H, T, D, generator=g)
    inputs = {"beta": torch.rand(H, T, generator=g)}
    if GATES[name] == "scalar":
        inputs["g"] = F.logsigmoid(torch.randn(H, T, generator=g) + 3)
    elif GATES[name] == "vector":
        inputs["g"] = F.logsigmoid(torch.randn(H, T, D, generator=g) + 3)
    return (q, k, v), inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--t", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name in GATES:
        qkv, inputs = tensors(name, args.t, args.heads, args.dim)
        mods = {b: attnc.compile_attention(f"stdlib:{name}", backend=b) for b in ("reference", "cpu")}
        with torch.no_grad():
            a, b = mods["reference"](*qkv, **inputs), mods["cpu"](*qkv, **inputs)
        err = (a - b).abs().max().item()

        def fwd(m, qkv=qkv, inputs=inputs):
            def run():
                with torch.no_grad():
                    m(*qkv, **inputs)
            return run

        def train(m, qkv=qkv, inputs=inputs):
            def run():
                leaves = [t.clone().requires_grad_() for t in (*qkv, *inputs.values())]
                out = m(*leaves[:3], **dict(zip(inputs, leaves[3:], strict=True)))
                torch.autograd.grad(out.sum(), leaves)
            return run

        for mode, make in (("forward", fwd), ("forward+backward", train)):
            times = interleaved({b: make(m) for b, m in mods.items()}, args.repeat)
            med = {b: statistics.median(t) for b, t in times.items()}
            rows.append((name, mode, med["reference"], med["cpu"], err))
            print(name, mode, med, file=sys.stderr)
    lines = [f"# The delta rule on CPU: chunked against token by token, {datetime.date.today()}", "",
             f"- command: `python benchmarks/bench_delta.py {' '.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
             f"{platform.platform()}; python {platform.python_version()}, torch {torch.__version__}",
             f"- fp32, batch 1, {args.heads} heads, T = {args.t}, head dim {args.dim}; median of {args.repeat} "
             "interleaved rounds", "",
             "| pattern | mode | token by token (s) | chunked (s) | speedup | max abs difference |",
             "|---|---|---|---|---|---|"]
    for name, mode, ref, cpu, err in rows:
        lines.append(f"| {name} | {mode} | {ref:.2f} | {cpu:.3f} | {ref / cpu:.1f}x | {err:.1e} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
