"""CPU speed of the chunked recurrence (``compile_attention(rec, backend="cpu")``) against the naive
step-by-step loop (the reference backend) and against the quadratic masked form
``O = scale ((Q K^T) * D) V`` with ``D_ij = exp(c_i - c_j)`` (i >= j, c = cumsum(g); scalar gates only),
at 4K and 16K tokens.

    python benchmarks/bench_recurrence.py [--quick] [--out benchmarks/results/recurrence-cpu-DATE.md] [--repeat 3]

Cost on a 2-core CPU: ``--quick`` (1K and 4K tokens) took 31 s wall (30 s CPU, 2026-11-25, load
average 5 from other jobs); the full run (4K and 16K) about 2 minutes (estimated from the recorded
times: most of it the quadratic form at 16K, 7 s forward and 17 s forward + backward a run).

Shapes: B=1, H=2, Dk=Dv=64, float32 (the quadratic form's [T, T] matrices are built one head at a time:
1 GiB each at 16K). Patterns: mamba2 (scalar gate per token and head, log gates uniform in [-0.1, 0]) and
gla (per-channel gate; no quadratic form without a [T, T, Dk] tensor). Forward times are best of
``--repeat`` (the naive loop: best of 2); forward + backward for the chunked path and the quadratic form (the naive loop's backward
is not run at 16K: its autograd graph has 16K steps of [B, H, Dk, Dv] states).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

import attnc

B, H, D = 1, 2, 64


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def quadratic(q, k, v, g, scale):
    """((Q K^T) * D) V per head, D_ij = exp(c_i - c_j) for i >= j."""
    outs = []
    T = q.shape[2]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            c = torch.cumsum(g[h], 0)
            Dm = torch.exp((c[:, None] - c[None, :]).masked_fill(~causal, float("-inf")))
            outs.append(scale * ((q[b, h] @ k[b, h].T) * Dm) @ v[b, h])
    return torch.stack(outs).view(q.shape[0], q.shape[1], T, -1)


def inputs(name: str, T: int, grad: bool = False):
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, H, T, D, generator=gen).requires_grad_(grad) for _ in range(3))
    shape = (H, T) if name == "mamba2" else (H, T, D)
    g = (-0.1 * torch.rand(*shape, generator=gen)).requires_grad_(grad)
    return q, k, v, g


def case(name: str, T: int, cpu, ref, repeat: int) -> dict:
    q, k, v, g = inputs(name, T)
    with torch.no_grad():
        chunked_f = best_of(lambda: cpu(q, k, v, g=g), repeat)
        chunk = cpu._last_call["q_tile"]
        naive_f = best_of(lambda: ref(q, k, v, g=g), min(2, repeat))
        quad_f = best_of(lambda: quadratic(q, k, v, g, D**-0.5), repeat) if name == "mamba2" else None
        err = (cpu(q, k, v, g=g) - ref(q, k, v, g=g)).abs().max().item()
    qg, kg, vg, gg = inputs(name, T, grad=True)

    def fb_chunked():
        cpu(qg, kg, vg, g=gg).sum().backward()

    def fb_quad():
        quadratic(qg, kg, vg, gg, D**-0.5).sum().backward()

    chunked_fb = best_of(fb_chunked, repeat)
    quad_fb = best_of(fb_quad, repeat) if name == "mamba2" else None
    return dict(pattern=name, T=T, chunk=chunk, chunked_f=chunked_f, chunked_fb=chunked_fb, naive_f=naive_f,
                quad_f=quad_f, quad_fb=quad_fb, err=err)


def run(repeat: int, lengths=(4096, 16384)) -> list[dict]:
    rows = []
    for name in ("mamba2", "gla"):
        cpu = attnc.compile_attention(f"stdlib:{name}", backend="cpu")
        ref = attnc.compile_attention(f"stdlib:{name}", backend="reference")
        for T in lengths:
            rows.append(case(name, T, cpu, ref, repeat))
            print(rows[-1], flush=True)
    return rows


def ms(x):
    return "-" if x is None else f"{x * 1e3:,.1f} ms"


def ratio(a, b):
    return "-" if a is None or b is None else f"{a / b:,.1f}x"


def report(rows: list[dict], repeat: int) -> str:
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu_name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        f"# Recurrence, CPU: chunked path vs naive loop vs quadratic masked form ({datetime.date.today()})",
        "",
        f"- machine: {cpu_name}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}",
        f"- shapes: B={B}, H={H}, Dk=Dv={D}, float32; log gates uniform in [-0.1, 0]; best of {repeat} "
        "(naive loop: best of 2)",
        f"- load average (1 min) at the end: {os.getloadavg()[0]:.2f}",
        "- chunked: `compile_attention(spec, backend='cpu')` (chunk chosen by the simulator); naive: the "
        "reference backend's step loop; quadratic: `scale ((Q K^T) * D) V` per head (scalar gates only)",
        "- err: max |chunked - naive| of the forward output",
        "",
        "| pattern | T | chunk | chunked fwd | naive fwd | quadratic fwd | naive / chunked | quadratic / chunked "
        "| chunked fwd+bwd | quadratic fwd+bwd | quadratic / chunked (fwd+bwd) | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pattern']} | {r['T']} | {r['chunk']} | {ms(r['chunked_f'])} | {ms(r['naive_f'])} | "
            f"{ms(r['quad_f'])} | {ratio(r['naive_f'], r['chunked_f'])} | {ratio(r['quad_f'], r['chunked_f'])} | "
            f"{ms(r['chunked_fb'])} | {ms(r['quad_fb'])} | {ratio(r['quad_fb'], r['chunked_fb'])} | {r['err']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1K and 4K tokens (the full run: 4K and 16K)")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    rows = run(args.repeat, (1024, 4096) if args.quick else (4096, 16384))
    text = report(rows, args.repeat)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
