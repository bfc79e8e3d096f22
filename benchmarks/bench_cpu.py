"""CPU backend speed and memory against PyTorch (recorded, not a timed test).

    python benchmarks/bench_cpu.py [--repeats 3] [--out benchmarks/results/cpu-DATE.md] [--quick] [--only abcd]

Cost on a 2-core CPU: ``--quick`` took 35 s wall (19 s CPU, 2026-11-25, load average 8 from other
jobs). It runs the four parts at small sizes (``QUICK``: 2,048 tokens with a window of 256, a 32x32
grid with a 7x7 window, the memory part at 16,384 tokens); most of its time is FlexAttention's
``torch.compile`` (once per case). The full run takes about 1-2 minutes on an idle machine (an
estimate from the recorded parts, benchmarks/results/cpu-2026-11-21.md: Flex's compile and a few
calls per case at 16K tokens, attnc's forward + backward at 16K, and a 64K-token forward in a
subprocess; not measured as one run).

In one process, forward, fp32, batch 1:
(a) causal sliding window 1024 on 16,384 tokens, 8 heads, dim 64: attnc's CPU
    executor vs dense causal ``scaled_dot_product_attention`` vs FlexAttention
    compiled for CPU (``torch.compile(flex_attention)``) on the same mask
    (``create_block_mask``); also Flex's one-off compile time vs attnc's first
    call (tile analysis + plan + the run);
(b) 2-D neighborhood 13x13 on a 96x96 grid, 4 heads, dim 64
    (``stdlib:neighborhood_2d``, NATTEN rule) vs dense SDPA and Flex;
(c) forward+backward of (a) vs SDPA causal forward+backward (FlexAttention has
    no CPU backward);
(d) peak resident memory of a 65,536-token sliding-window forward, measured in
    a subprocess (``ru_maxrss``), vs the N x N bytes a dense mask would need.
Times are the best of ``--repeats`` runs after one warm-up run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnc


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def qkv(H, N, D, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, N, D, generator=g).requires_grad_(grad) for _ in range(3))


def flex_setup(mask_mod, N):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    t = time.perf_counter()
    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=N, KV_LEN=N, device="cpu")
    mask_time = time.perf_counter() - t
    return torch.compile(flex_attention), block_mask, mask_time


def case_sliding(repeats: int, N=16384, H=8, D=64, W=1024) -> dict:
    q, k, v = qkv(H, N, D)
    res = {"case": f"sliding window {W} causal, N={N}, {H} heads, dim {D}"}
    attn = attnc.compile_attention("stdlib:sliding_window", window=W, backend="cpu")
    res["attnc_first_call_s"] = once(lambda: attn(q, k, v))
    res["attnc_s"] = best_of(lambda: attn(q, k, v), repeats)
    res["attnc_tiles"] = f"q_tile={attn.schedule.q_tile} kv_tile={attn.schedule.kv_tile}"
    out = attn(q, k, v)
    # analysis alone (tile choice + classification + plan), on a fresh module
    fresh = attnc.compile_attention("stdlib:sliding_window", window=W, backend="cpu")
    from attnc.compiler.analysis import evaluate as E

    bound = E.bind_sizes(fresh.pattern, n=N, nk=N, heads=H, dk=D)
    res["attnc_analysis_s"] = once(lambda: fresh.runner.plan(bound, {}))

    res["sdpa_causal_s"] = best_of(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)

    def sw(b, h, qi, ki):
        return (ki <= qi) & (qi - ki < W)

    flex, bm, res["flex_block_mask_s"] = flex_setup(sw, N)
    res["flex_first_call_s"] = once(lambda: flex(q, k, v, block_mask=bm))
    res["flex_s"] = best_of(lambda: flex(q, k, v, block_mask=bm), repeats)
    res["max_abs_diff_vs_flex"] = float((flex(q, k, v, block_mask=bm) - out).abs().max())
    return res


def natten_start(i, L, K):
    return torch.clamp(i - K // 2, 0, L - K)


def case_neighborhood(repeats: int, side=96, K=13, H=4, D=64) -> dict:
    N = side * side
    q, k, v = qkv(H, N, D, seed=1)
    res = {"case": f"2-D neighborhood {K}x{K} on {side}x{side} (N={N}), {H} heads, dim {D}"}
    attn = attnc.compile_attention("stdlib:neighborhood_2d", kernel_size_y=K, kernel_size_x=K, backend="cpu",
                                   sizes={"height": side, "width": side})
    res["attnc_first_call_s"] = once(lambda: attn(q, k, v))
    res["attnc_s"] = best_of(lambda: attn(q, k, v), repeats)
    res["attnc_tiles"] = f"q_tile={attn.schedule.q_tile} kv_tile={attn.schedule.kv_tile}"
    out = attn(q, k, v)
    res["sdpa_dense_s"] = best_of(lambda: F.scaled_dot_product_attention(q, k, v), repeats)

    def na(b, h, qi, ki):
        qy, qx, ky, kx = qi // side, qi % side, ki // side, ki % side
        sy, sx = natten_start(qy, side, K), natten_start(qx, side, K)
        return (ky >= sy) & (ky < sy + K) & (kx >= sx) & (kx < sx + K)

    flex, bm, res["flex_block_mask_s"] = flex_setup(na, N)
    res["flex_first_call_s"] = once(lambda: flex(q, k, v, block_mask=bm))
    res["flex_s"] = best_of(lambda: flex(q, k, v, block_mask=bm), repeats)
    res["max_abs_diff_vs_flex"] = float((flex(q, k, v, block_mask=bm) - out).abs().max())
    res["density"] = attn.schedule.density
    return res


def case_training(repeats: int, N=16384, H=8, D=64, W=1024) -> dict:
    q, k, v = qkv(H, N, D, grad=True)
    dout = torch.randn(1, H, N, D)
    res = {"case": f"forward+backward, sliding window {W} causal, N={N}, {H} heads, dim {D}"}
    attn = attnc.compile_attention("stdlib:sliding_window", window=W, backend="cpu")

    def ours():
        torch.autograd.grad(attn(q, k, v), (q, k, v), dout)

    def sdpa():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), dout)

    ours()
    res["attnc_s"] = best_of(ours, repeats)
    res["sdpa_causal_s"] = best_of(sdpa, repeats)
    res["flex"] = "FlexAttention has no CPU backward (not run)"
    return res


# VmHWM (peak RSS of this process image), not ru_maxrss: Linux carries the
# parent's ru_maxrss into a forked child, so a big parent would hide the child's peak.
MEMORY_CHILD = r"""
import json, sys, torch, attnc
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
N, H, D, W = (int(a) for a in sys.argv[1:5])
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, H, N, D, generator=g) for _ in range(3))
attn = attnc.compile_attention("stdlib:sliding_window", window=W, backend="cpu")
before = hwm()
with torch.no_grad():
    out = attn(q, k, v)
after = hwm()
del out
with open("/proc/self/clear_refs", "w") as f:  # reset the peak: a second call (plan cached)
    f.write("5")
base2 = hwm()
with torch.no_grad():
    out = attn(q, k, v)
print(json.dumps({"before": before, "after": after, "base2": base2, "after2": hwm(),
                  "finite": bool(torch.isfinite(out).all())}))
"""


def case_memory(N=65536, H=8, D=64, W=1024) -> dict:
    run = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(N), str(H), str(D), str(W)], capture_output=True,
                         text=True, check=True)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    io = 4 * N * H * D * 4  # q, k, v, out in fp32
    return {
        "case": f"peak memory, sliding window {W} forward, N={N}, {H} heads, dim {D}",
        "peak_rss_bytes": got["after"], "rss_before_call_bytes": got["before"],
        "growth_bytes": got["after"] - got["before"], "q_k_v_out_bytes": io,
        "second_call_growth_bytes": got["after2"] - got["base2"],
        "dense_bool_mask_bytes": N * N, "dense_fp32_scores_bytes": 4 * H * N * N, "finite": got["finite"],
    }


def fmt_s(x: float) -> str:
    return f"{x * 1e3:,.0f} ms" if x < 10 else f"{x:,.1f} s"


def report(results: dict, repeats: int, quick: bool = False) -> str:
    a, b, c, d = results["a"], results["b"], results["c"], results["d"]
    lines = [
        f"# CPU backend benchmark, {datetime.date.today().isoformat()}",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores "
        f"(torch threads {torch.get_num_threads()}), {platform.platform()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, fp32, batch 1",
        f"- best of {repeats} runs after a warm-up; `python benchmarks/bench_cpu.py{' --quick' if quick else ''}`",
        "",
        f"## (a) {a['case']}",
        "",
        "| | time | vs attnc |",
        "|---|---:|---:|",
        f"| attnc cpu ({a['attnc_tiles']}) | {fmt_s(a['attnc_s'])} | 1.00x |",
        f"| FlexAttention (torch.compile, CPU) | {fmt_s(a['flex_s'])} | {a['flex_s'] / a['attnc_s']:.2f}x |",
        f"| SDPA dense causal | {fmt_s(a['sdpa_causal_s'])} | {a['sdpa_causal_s'] / a['attnc_s']:.2f}x |",
        "",
        f"One-off costs: attnc first call {fmt_s(a['attnc_first_call_s'])} (of which the analysis "
        f"- tile choice, classification, plan - {fmt_s(a['attnc_analysis_s'])}); FlexAttention "
        f"create_block_mask {fmt_s(a['flex_block_mask_s'])} + first call (compilation) "
        f"{fmt_s(a['flex_first_call_s'])}. Max |attnc - Flex| = {a['max_abs_diff_vs_flex']:.2e}.",
        f"Target attnc <= Flex: **{'met' if a['attnc_s'] <= a['flex_s'] else 'missed'}**.",
        "",
        f"## (b) {b['case']}",
        "",
        "| | time | vs attnc |",
        "|---|---:|---:|",
        f"| attnc cpu ({b['attnc_tiles']}) | {fmt_s(b['attnc_s'])} | 1.00x |",
        f"| FlexAttention (torch.compile, CPU) | {fmt_s(b['flex_s'])} | {b['flex_s'] / b['attnc_s']:.2f}x |",
        f"| SDPA dense (no mask) | {fmt_s(b['sdpa_dense_s'])} | {b['sdpa_dense_s'] / b['attnc_s']:.2f}x |",
        "",
        f"Density {b['density']:.4f} (FLOP-wise bound {1 / b['density']:.0f}x over dense). attnc first call "
        f"{fmt_s(b['attnc_first_call_s'])}; Flex create_block_mask {fmt_s(b['flex_block_mask_s'])} + first call "
        f"{fmt_s(b['flex_first_call_s'])}. Max |attnc - Flex| = {b['max_abs_diff_vs_flex']:.2e}.",
        f"Target >= 2x faster than Flex: **{'met' if b['flex_s'] >= 2 * b['attnc_s'] else 'missed'}** "
        f"({b['flex_s'] / b['attnc_s']:.2f}x).",
        "",
        f"## (c) {c['case']}",
        "",
        "| | time | vs attnc |",
        "|---|---:|---:|",
        f"| attnc cpu | {fmt_s(c['attnc_s'])} | 1.00x |",
        f"| SDPA dense causal | {fmt_s(c['sdpa_causal_s'])} | {c['sdpa_causal_s'] / c['attnc_s']:.2f}x |",
        "| FlexAttention | - | no CPU backward |",
        "",
        f"## (d) {d['case']}",
        "",
        f"Peak RSS (VmHWM, subprocess) {d['peak_rss_bytes'] / 2**20:,.0f} MiB: "
        f"{d['rss_before_call_bytes'] / 2**20:,.0f} MiB before the call (torch, q, k, v) and "
        f"{d['growth_bytes'] / 2**20:,.0f} MiB more during it (first call: analysis, plan, out; q, k, v and out "
        f"alone: {d['q_k_v_out_bytes'] / 2**20:,.0f} MiB); a second call (plan cached) grows the peak by "
        f"{d['second_call_growth_bytes'] / 2**20:,.0f} MiB over the resident set before it. A dense N x N bool mask alone would take "
        f"{d['dense_bool_mask_bytes'] / 2**30:,.2g} GiB, fp32 scores for all heads "
        f"{d['dense_fp32_scores_bytes'] / 2**30:,.0f} GiB.",
        "",
        "```json",
        json.dumps(results, indent=1),
        "```",
    ]
    return "\n".join(lines) + "\n"


#: ``--quick``'s sizes (keyword arguments of each part)
QUICK = {"a": {"N": 2048, "W": 256}, "b": {"side": 32, "K": 7}, "c": {"N": 2048, "W": 256}, "d": {"N": 16384}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="abcd")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (2K tokens, a 32x32 grid, 16K for the memory part): about a minute")
    args = ap.parse_args()
    results = {}
    size = QUICK if args.quick else dict.fromkeys("abcd", {})
    cases = {"a": lambda: case_sliding(args.repeats, **size["a"]),
             "b": lambda: case_neighborhood(args.repeats, **size["b"]),
             "c": lambda: case_training(args.repeats, **size["c"]), "d": lambda: case_memory(**size["d"])}
    for key in args.only:
        results[key] = cases[key]()
        print(key, json.dumps(results[key]), flush=True)
    if set(results) == set("abcd"):
        text = report(results, args.repeats, args.quick)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)


if __name__ == "__main__":
    main()
