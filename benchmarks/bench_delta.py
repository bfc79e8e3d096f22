"""The delta rule on CPU: the chunked form against the token-by-token one and against
flash-linear-attention's own torch chunked references (recorded, not a timed test).

    python benchmarks/bench_delta.py [--quick] [--t 4096] [--heads 4] [--dim 64] [--repeat 3] [--out FILE.md]

Needs flash-linear-attention's torch files (``pip install fla-core``). Cost on a 2-core CPU:
``--quick`` (T = 512) took 35 s wall (37 s CPU, 2026-11-25, load average 5 from other jobs); the
full run (T = 4,096) about 3-5 minutes (estimated from the recorded runs), most of it the
token-by-token loop (and its autograd graph of T steps).

fp32, batch 1; forward under no_grad and forward + backward (q, k, v, beta, g); interleaved rounds,
the median. ``reference`` is attnc's naive loop, ``cpu`` the chunked form (chunks of 64; 16 for KDA),
``fla`` flash-linear-attention's torch chunked reference of the same rule (``delta_rule_chunkwise``,
``naive_chunk_gated_delta_rule``, ``naive_chunk_kda`` from fla-core, chunks of 64 but delta_rule_chunkwise's
default 32; its files are loaded alone: fla's package imports Triton's CUDA paths). Outputs are checked
against each other before timing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
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


def fla_naive(folder: str):
    """fla-core's ``fla/ops/FOLDER/naive.py`` loaded on its own."""
    spec = importlib.util.find_spec("fla")
    if spec is None:
        raise SystemExit("flash-linear-attention is not installed: pip install fla-core")
    path = os.path.join(os.path.dirname(spec.origin), "ops", folder, "naive.py")
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{folder}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def fla_chunked(name: str):
    """fla's torch chunked reference of the rule as ``f(q, k, v, **inputs)`` on attnc's layout
    (``[B, H, T, D]``, inputs ``[H, T(, D)]``), returning ``[B, H, T, Dv]``."""
    if name == "delta_net":  # fla's [B, H, T, D] function; scale d^-0.5 inside
        fn = fla_naive("delta_rule").delta_rule_chunkwise
        return lambda q, k, v, beta: fn(q, k, v, beta.unsqueeze(0))[0]
    fn = (fla_naive("gated_delta_rule").naive_chunk_gated_delta_rule if name == "gated_delta_net"
          else fla_naive("kda").naive_chunk_kda)

    def run(q, k, v, beta, g):
        t = lambda x: x.transpose(1, 2)  # noqa: E731 - [B, H, T, D] -> [B, T, H, D]
        o = fn(t(q), t(k), t(v), g=t(g.unsqueeze(0)), beta=t(beta.unsqueeze(0)), chunk_size=64)
        return o[0].transpose(1, 2)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="T = 512 (unless --t)")
    ap.add_argument("--t", type=int, default=None, help="tokens (default 4,096; --quick 512)")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.t = args.t or (512 if args.quick else 4096)
    rows = []
    for name in GATES:
        qkv, inputs = tensors(name, args.t, args.heads, args.dim)
        mods = {b: attnc.compile_attention(f"stdlib:{name}", backend=b) for b in ("reference", "cpu")}
        mods["fla"] = fla_chunked(name)
        with torch.no_grad():
            a, b, c = (mods[m](*qkv, **inputs) for m in ("reference", "cpu", "fla"))
        err = (a - b).abs().max().item()
        err_fla = (a - c).abs().max().item()

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
            rows.append((name, mode, med["reference"], med["cpu"], med["fla"], err, err_fla))
            print(name, mode, med, file=sys.stderr)
    lines = [f"# The delta rule on CPU: chunked against token by token and fla's torch chunked form, "
             f"{datetime.date.today()}", "",
             f"- command: `python benchmarks/bench_delta.py {' '.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
             f"{platform.platform()}; python {platform.python_version()}, torch {torch.__version__}",
             f"- fp32, batch 1, {args.heads} heads, T = {args.t}, head dim {args.dim}; median of {args.repeat} "
             "interleaved rounds", "",
             "| pattern | mode | token by token (s) | attnc chunked (s) | fla torch chunked (s) | vs token by token "
             "| vs fla | max abs difference attnc / fla |",
             "|---|---|---|---|---|---|---|---|"]
    for name, mode, ref, cpu, fla, err, err_fla in rows:
        lines.append(f"| {name} | {mode} | {ref:.2f} | {cpu:.3f} | {fla:.3f} | {ref / cpu:.1f}x | {fla / cpu:.1f}x "
                     f"| {err:.1e} / {err_fla:.1e} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
