"""Per-token decoding cost: attnc with a KV cache vs PyTorch SDPA with a KV cache, on CPU
(recorded, not a timed test).

    python benchmarks/bench_decode.py [--tokens 4096] [--steps 32] [--repeats 5] [--threads N]
                                      [--out benchmarks/results/decode-cpu-DATE.md] [--quick]

Cost on a 2-core CPU: ``--quick`` (2,048 cached tokens, 16 steps, 3 rounds: the windows of 1,024
still smaller than the cache) took 18 s wall (9 s CPU, 2026-11-25, load average 8 from other jobs);
the full run took 9 s wall (8 s CPU, load average 7): both are mostly imports and planning, so the
full run is already quick.

In one process, fp32, batch 1, 8 heads, dim 64, one new query per step against a cache
of ``--tokens`` keys growing by one token per step (a new key length every step, so
nothing planned at an earlier step is reused):

- patterns: causal, causal sliding window 1024 (``stdlib:sliding_window``), streaming
  (``stdlib:streaming``: 4 sinks + a 1020-token window);
- attnc ``backend="cpu"`` and ``backend="auto"`` (the same CPU path on CPU tensors), called
  as ``attn(q_new, k_cache[:, :, :nk], v_cache[:, :, :nk])``;
- SDPA on the same cache views: no mask for causal (the last query sees every key), a
  boolean mask row built at each step for the windowed patterns (as HF builds its masks);
  for the sliding window also SDPA on the window's slice of the cache only (HF's sliding
  cache keeps only the window).

Each round runs ``--steps`` steps of every method, interleaved (the methods alternate
within a round, in a rotated order); the per-step cost of a method is its round time
divided by the steps, and the table gives the median over ``--repeats`` rounds after a
warm-up round, in wall time and in this process's CPU time (``time.process_time``, less
sensitive to other processes on a loaded machine). It also counts tile classifications (``compiler.analysis.tiles.CLASSIFICATIONS``)
during the timed steps: decoding steps never classify tiles.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import attnc
import attnc.compiler.analysis.tiles as T

CAUSAL = "pattern causal_lm\n  tokens seq\n  mask causal\n"
PATTERNS = [
    ("causal", CAUSAL, {}, None),
    ("sliding window 1024", "stdlib:sliding_window", {"window": 1024}, ("window", 1024, 0)),
    ("streaming (4 sinks + 1020)", "stdlib:streaming", {"window": 1020, "sinks": 4}, ("window", 1020, 4)),
]


def sdpa_mask(rule, nk: int) -> torch.Tensor | None:
    """The mask row of the last query (position nk - 1) over the cache, built per step."""
    if rule is None:
        return None
    _, window, sinks = rule
    k = torch.arange(nk)
    return ((nk - 1 - k < window) | (k < sinks)).view(1, 1, 1, nk)


def run(args) -> str:
    torch.manual_seed(0)
    H, D, N = args.heads, args.dim, args.tokens
    total = N + (args.repeats + 1) * args.steps + 1
    q_all, k_cache, v_cache = (torch.randn(1, H, total, D) for _ in range(3))
    lines = [f"# decoding with a KV cache on CPU ({datetime.date.today().isoformat()})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
             f"load average {os.getloadavg()[0]:.1f} at start",
             f"- python {platform.python_version()}, torch {torch.__version__}, attnc {attnc.__version__}",
             f"- fp32, batch 1, {H} heads, dim {D}, 1 new query per step, cache of {N} tokens growing by one "
             f"per step (a new key length at every step); {args.steps} steps per round, median of "
             f"{args.repeats} interleaved rounds after a warm-up round", ""]
    summary = []
    for label, src, params, rule in PATTERNS:
        methods = {
            "attnc cpu": (attnc.compile_attention(src, backend="cpu", **params), None),
            "attnc auto": (attnc.compile_attention(src, backend="auto", **params), None),
        }

        def attnc_step(attn, nk):
            return attn(q_all[:, :, nk - 1:nk], k_cache[:, :, :nk], v_cache[:, :, :nk])

        def sdpa_step(_, nk, rule=rule):
            return F.scaled_dot_product_attention(q_all[:, :, nk - 1:nk], k_cache[:, :, :nk], v_cache[:, :, :nk],
                                                  attn_mask=sdpa_mask(rule, nk))

        def sdpa_window(_, nk, rule=rule):
            lo = max(0, nk - rule[1])
            return F.scaled_dot_product_attention(q_all[:, :, nk - 1:nk], k_cache[:, :, lo:nk], v_cache[:, :, lo:nk])

        fns = {name: (lambda nk, a=attn: attnc_step(a, nk)) for name, (attn, _) in methods.items()}
        fns["SDPA, KV cache" + (" + mask row" if rule else "")] = lambda nk: sdpa_step(None, nk)
        if rule is not None and rule[2] == 0:
            fns["SDPA, window slice of the cache"] = lambda nk: sdpa_window(None, nk)
        sdpa_name = next(name for name in fns if name.startswith("SDPA, KV"))
        # correctness at the first length
        ref = fns[sdpa_name](N + 1)
        err = max(float((fns[name](N + 1) - ref).abs().max()) for name in fns)
        times: dict[str, list[float]] = {name: [] for name in fns}
        cpu: dict[str, list[float]] = {name: [] for name in fns}  # process CPU time: less sensitive to load
        classified = 0
        names = list(fns)
        for r in range(args.repeats + 1):
            base = N + r * args.steps
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                before = T.CLASSIFICATIONS
                t, c = time.perf_counter(), time.process_time()
                for i in range(1, args.steps + 1):
                    fns[name](base + i)
                elapsed, used = time.perf_counter() - t, time.process_time() - c
                if r:  # round 0 warms up
                    times[name].append(elapsed / args.steps)
                    cpu[name].append(used / args.steps)
                    classified += T.CLASSIFICATIONS - before
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        med_cpu = {name: statistics.median(ts) * 1e3 for name, ts in cpu.items()}
        lines += [f"## {label} @ {N} cached tokens", "", "| method | ms per token (median) | min | max | "
                  f"/ {sdpa_name} | CPU ms per token (median) | CPU ratio |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name in names:
            lines.append(f"| {name} | {med[name]:.3f} | {min(times[name]) * 1e3:.3f} | {max(times[name]) * 1e3:.3f} | "
                         f"{med[name] / med[sdpa_name]:.2f} | {med_cpu[name]:.3f} | "
                         f"{med_cpu[name] / med_cpu[sdpa_name]:.2f} |")
        lines += ["", f"- max |difference| to SDPA at nk = {N + 1}: {err:.3g}",
                  f"- tile classifications during the {args.repeats * args.steps * 2} timed attnc steps: {classified}",
                  ""]
        summary.append((label, med["attnc cpu"] / med[sdpa_name], med["attnc auto"] / med[sdpa_name],
                        med_cpu["attnc cpu"] / med_cpu[sdpa_name]))
    lines += ["## summary (attnc / SDPA with a KV cache, per token, median wall time; CPU time)", "",
              "| pattern | cpu | auto | cpu, CPU time |", "| --- | --- | --- | --- |"]
    lines += [f"| {label} | {a:.2f} | {b:.2f} | {c:.2f} |" for label, a, b, c in summary]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true", help="2,048 tokens, 16 steps, 3 rounds (seconds)")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.steps, args.repeats = 2048, 16, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    text = run(args)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
