"""backend="flex" against FlexAttention with ``create_block_mask`` (recorded, not a timed test).

    python benchmarks/bench_flex.py [--repeats 5] [--out benchmarks/results/flex-cpu-DATE.md] [--quick]

Cost on a 2-core CPU: ``--quick`` (1K tokens, a 16x16 grid, 2 heads) took 44 s wall (29 s CPU,
2026-11-25, load average 6-7 from other jobs), nearly all of it two ``torch.compile`` runs per case
(attnc's Flex lowering and Flex's own, each with a fresh inductor cache); the full run about 4-5
minutes (an estimate from the recorded first calls, 26-42 s each, and forwards of 1-3 s; not
measured as one run).

In one process, forward, fp32, batch 1, inference (Flex's fused CPU kernel has
no backward and no lse):

(a) causal sliding window 512 on 8,192 tokens, 8 heads, dim 64;
(b) 2-D neighborhood 13x13 on a 64x64 grid, 4 heads, dim 64 (NATTEN rule).

For each case:
- planning: attnc's tile analysis + BlockMask construction (``FlexRunner.plan`` +
  ``block_mask_of``) vs ``create_block_mask`` on a hand-written mask_mod;
- first call: attnc's first call (plan + torch.compile + run) vs
  ``create_block_mask`` + the first call of ``torch.compile(flex_attention)``,
  each with a fresh inductor cache (a temporary ``TORCHINDUCTOR_CACHE_DIR``),
  after warm-ups that take one-off initialisations (inductor, vmap, sympy)
  out of both;
- forward: attnc flex, Flex (create_block_mask, default 128x128 blocks) and
  attnc's CPU executor, interleaved, the median of ``--repeats`` after one warm-up.
Outputs are checked against each other (max abs difference printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

if __name__ == "__main__" and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    # first-call times without an earlier process's kernels (not when imported for its helpers)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-bench-flex-")

import torch  # noqa: E402

import attnc  # noqa: E402
from attnc.compiler.analysis import evaluate as E  # noqa: E402


class StepTimer:
    """Seconds spent in module-level functions (wrapped while in use), e.g. attnc's selection steps;
    CUDA is synchronized around each call when available."""

    def __init__(self, targets: list[tuple[object, str]]):
        self.targets, self.seconds, self.saved = targets, [], []

    def __enter__(self):
        for module, name in self.targets:
            inner = getattr(module, name)
            self.saved.append((module, name, inner))

            def timed(*args, _inner=inner, **kwargs):
                sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
                sync()
                t = time.perf_counter()
                out = _inner(*args, **kwargs)
                sync()
                self.seconds.append(time.perf_counter() - t)
                return out

            setattr(module, name, timed)
        return self

    def __exit__(self, *exc):
        for module, name, inner in self.saved:
            setattr(module, name, inner)


def emit(lines: list[str], out: str | None) -> None:
    """A result table: printed, and written to ``out`` when given (benchmarks/results/NAME-DATE.md)."""
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)


def interleaved(fns: dict, repeats, warmup: bool = True) -> dict[str, list[float]]:
    """Seconds per run of each callable, interleaved (one run of each per round, so that load
    changes hit all alike), after one warm-up round unless ``warmup`` is False.
    ``repeats``: one count for all, or a dict of counts per name (a callable stops taking
    part after its count; the slowest cells can then run fewer times)."""
    counts = repeats if isinstance(repeats, dict) else dict.fromkeys(fns, repeats)
    times = {name: [] for name in fns}
    if warmup:
        for fn in fns.values():
            fn()
    for r in range(max(counts.values(), default=0)):
        for name, fn in fns.items():
            if r < counts[name]:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return times


def qkv(H, N, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, H, N, D, generator=g) for _ in range(3))


def sliding_mask(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


def natten_mask(H, W, ky, kx):
    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx, ky_, kx_ = q_idx // W, q_idx % W, kv_idx // W, kv_idx % W
        cy = torch.clamp(qy, ky // 2, H - 1 - ky // 2)
        cx = torch.clamp(qx, kx // 2, W - 1 - kx // 2)
        return ((ky_ - cy).abs() <= ky // 2) & ((kx_ - cx).abs() <= kx // 2)
    return mask_mod


def case_list(quick: bool):
    if quick:
        return [("sliding window 64 @ 1K, 2 heads", "stdlib:sliding_window", {"window": 64}, None, 1024, 2,
                 sliding_mask(64)),
                ("2-D neighborhood 7x7 @ 16x16, 2 heads", "stdlib:neighborhood_2d", {"kernel_size_y": 7, "kernel_size_x": 7},
                 {"height": 16, "width": 16}, 256, 2, natten_mask(16, 16, 7, 7))]
    return [("sliding window 512 @ 8K, 8 heads", "stdlib:sliding_window", {"window": 512}, None, 8192, 8,
             sliding_mask(512)),
            ("2-D neighborhood 13x13 @ 64x64, 4 heads", "stdlib:neighborhood_2d", {"kernel_size_y": 13, "kernel_size_x": 13},
             {"height": 64, "width": 64}, 4096, 4, natten_mask(64, 64, 13, 13))]


def run_case(label, spec, params, sizes, N, H, mask_mod, D, repeats):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from attnc.runtime.backends.flex.block_masks import block_mask_of
    from attnc.runtime.backends.flex.runner import FlexRunner

    q, k, v = qkv(H, N, D)
    rows = {"case": label}
    # one-off initialisations (inductor, vmap, sympy) out of the timings of whichever comes first
    torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(4))
    create_block_mask(mask_mod, 1, 1, 256, 256, device="cpu")
    warm = attnc.load(spec, **params)
    FlexRunner(warm).plan(E.bind_sizes(warm, n=256 if sizes is None else None, heads=1,
                                       sizes={a: 16 for a in sizes} if sizes else None, dk=D), {}, frozenset())
    # ---- planning: attnc's analysis + BlockMask vs create_block_mask
    pat = attnc.load(spec, **params)
    bound = E.bind_sizes(pat, n=N, heads=H, sizes=sizes, dk=D)
    runner = FlexRunner(pat)
    t = time.perf_counter()
    plan = runner.plan(bound, {}, frozenset())
    block_mask_of(plan.schedule, plan.namespace["mask_mod"], plan.q_map.length, plan.k_map.length, q.device)
    rows["attnc plan + BlockMask (s)"] = time.perf_counter() - t
    t = time.perf_counter()
    create_block_mask(mask_mod, 1, 1, N, N, device="cpu")
    rows["create_block_mask (s)"] = time.perf_counter() - t
    per_class = (f"{int(plan.schedule.full_count.sum())} FULL + {int(plan.schedule.partial_count.sum())} PARTIAL"
                 f" per head class ({plan.schedule.heads_stored} class(es))")
    rows["attnc blocks"] = f"{plan.block_size}, {per_class}"
    # ---- first calls
    attn = attnc.compile_attention(spec, backend="flex", sizes=sizes, **params)
    t = time.perf_counter()
    with torch.no_grad():
        out_a = attn(q, k, v)
    rows["attnc flex first call (s)"] = time.perf_counter() - t
    compiled_flex = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    t = time.perf_counter()
    bm = create_block_mask(mask_mod, 1, 1, N, N, device="cpu")
    with torch.no_grad():
        out_f = compiled_flex(q, k, v, block_mask=bm)
    rows["Flex create_block_mask + first call (s)"] = time.perf_counter() - t
    cpu = attnc.compile_attention(spec, backend="cpu", sizes=sizes, **params)
    with torch.no_grad():
        out_c = cpu(q, k, v)
    rows["max |attnc flex - Flex|"] = float((out_a - out_f).abs().max())
    rows["max |attnc cpu - Flex|"] = float((out_c - out_f).abs().max())
    rows["Flex blocks"] = (f"{bm.BLOCK_SIZE}, {int(bm.full_kv_num_blocks.sum())} FULL + {int(bm.kv_num_blocks.sum())} "
                           "PARTIAL (one class)")
    # ---- forward, interleaved
    fns = {"attnc flex": lambda: attn(q, k, v), "Flex": lambda: compiled_flex(q, k, v, block_mask=bm),
           "attnc cpu": lambda: cpu(q, k, v)}
    with torch.no_grad():
        times = interleaved(fns, repeats)
    for name in fns:
        rows[f"{name} forward (ms, median)"] = 1e3 * statistics.median(times[name])
    rows["attnc flex / Flex forward"] = statistics.median(times["attnc flex"]) / statistics.median(times["Flex"])
    rows["attnc cpu / Flex forward"] = statistics.median(times["attnc cpu"]) / statistics.median(times["Flex"])
    rows["first call ratio (attnc flex / Flex)"] = (rows["attnc flex first call (s)"]
                                                   / rows["Flex create_block_mask + first call (s)"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    args = ap.parse_args()
    import triton

    head = [f"# backend='flex' vs FlexAttention on CPU ({datetime.date.today()})", "",
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
            f"load average {os.getloadavg()[0]:.1f} at start",
            f"- python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}",
            "- fp32, batch 1, dim 64, forward only (inference); median of "
            f"{args.repeats} interleaved runs after a warm-up; fresh inductor cache", ""]
    lines = list(head)
    for case in case_list(args.quick):
        label, spec, params, sizes, N, H, mask_mod = case
        rows = run_case(label, spec, params, sizes, N, H, mask_mod, 64, args.repeats)
        lines += [f"## {label}", "", "| quantity | value |", "| --- | --- |"]
        for key, value in rows.items():
            if key != "case":
                lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
        lines.append("")
        print("\n".join(lines[-len(rows) - 4:]), flush=True)
    lines.append(f"- load average {os.getloadavg()[0]:.1f} at the end")
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
