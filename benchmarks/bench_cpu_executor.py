"""The CPU tile executor (``backend="cpu"``) against FlexAttention and SDPA (recorded, not a timed test).

    python benchmarks/bench_cpu_executor.py [--quick] [--cases nbhd2d_64,nbhd3d,sw512_8k,document,decode]
        [--repeat 5] [--modes fwd,fwdbwd] [--out FILE]

Cost on a 2-core CPU: ``--quick`` took 36 s wall (18 s CPU, 2026-11-25, load average 8 from other
jobs): the cases ``nbhd2d_64,sw512_8k,decode`` at the matrix's ``--quick`` sizes (512 tokens, a
16x16 grid; decode after 1,024 keys, window 128), most of it FlexAttention's ``torch.compile``; at
those sizes the ratios speak for per-call overhead. The full run (5 cases at 4K-8K tokens) takes
about 5-8 minutes on an idle machine (not measured as one run; the matrix's recorded per-case times,
less the Flex backward and first-call columns).

One process, fp32, batch 1, head dim 64; per case the callables run in
interleaved rounds (``bench_flex.interleaved``) after a warm-up and the median
is reported, with attnc / baseline ratios (< 1: attnc faster). The cases and
baselines are ``bench_flex_matrix``'s (a hand-written mask_mod,
``create_block_mask``, ``torch.compile(flex_attention)``; SDPA with the dense
boolean mask), plus a decode step: 1 query after a 4K KV cache, causal sliding
window 512, 8 heads (Flex with a 1 x 4K BlockMask, SDPA with a 1 x 4K mask).
FlexAttention has no CPU backward in torch 2.13: forward + backward compares
with SDPA only. Every attnc output (and its gradients) is checked against SDPA
(or Flex) once before timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch
import torch.nn.functional as F

import attnc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_flex_matrix as M  # noqa: E402  (the matrix's cases and baselines)
from bench_flex import interleaved  # noqa: E402

DECODE_KEYS, DECODE_WINDOW, DECODE_HEADS = 4096, 512, 8
QUICK_DECODE = (1024, 128)  # keys, window
QUICK_CASES = "nbhd2d_64,sw512_8k,decode"


def decode_case(keys: int = DECODE_KEYS, window: int = DECODE_WINDOW):
    """(attnc call, Flex call, SDPA call, reference output) of one decode step."""
    from torch.nn.attention.flex_attention import create_block_mask

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, DECODE_HEADS, 1, M.D, generator=g)
    k, v = (torch.randn(1, DECODE_HEADS, keys, M.D, generator=g) for _ in range(2))
    offset = keys - 1
    mod = attnc.compile_attention("stdlib:sliding_window", backend="cpu", window=window)

    def mask_mod(b, h, q_idx, kv_idx):
        pos = q_idx + offset
        return (pos >= kv_idx) & (pos - kv_idx < window)

    bm = create_block_mask(mask_mod, None, None, 1, keys, device="cpu")
    flex = M.flex_compiled()
    dense = (torch.arange(keys) > offset - window)[None, None, None, :]
    return ({"attnc cpu": lambda: mod(q, k, v), "Flex": lambda: flex(q, k, v, block_mask=bm),
             "SDPA": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)},
            F.scaled_dot_product_attention(q, k, v, attn_mask=dense))


def run_case(key: str, modes: list[str], repeat: int, quick: bool = False) -> dict[str, dict[str, float]]:
    """{mode: {column: median ms}} of one case (``quick``: the matrix's --quick sizes)."""
    res = {}
    if key == "decode":
        fns, want = decode_case(*QUICK_DECODE) if quick else decode_case()
        with torch.no_grad():
            for name, fn in fns.items():
                torch.testing.assert_close(fn(), want, **M.OUT_TOL, msg=lambda m, n=name: f"decode {n}: {m}")
            times = interleaved(fns, repeat)
        return {"fwd": {n: 1e3 * statistics.median(t) for n, t in times.items()}}
    case = M.cases(quick)[key]
    base = M.Baselines(case)
    mod = M.attnc_module(case, "cpu")
    if "fwd" in modes:
        q, k, v = M.qkv(case, grad=False)
        with torch.no_grad():
            fns = {"attnc cpu": lambda: mod(q, k, v, **case.inputs), "Flex": lambda: base.flex_call(q, k, v),
                   "SDPA": lambda: base.sdpa_call(q, k, v)}
            try:
                want = base.flex_call(q, k, v)
            except Exception as err:  # noqa: BLE001 - e.g. Inductor's CPU Flex template failing to compile
                res["Flex error"] = M.reason(err)
                del fns["Flex"]
                want = base.sdpa_call(q, k, v)
            M.check_close("attnc cpu forward", mod(q, k, v, **case.inputs), want, M.OUT_TOL)
            times = interleaved(fns, repeat)
        res["fwd"] = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    if "fwdbwd" in modes:
        q, k, v = M.qkv(case, grad=True)
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))

        def grads(fn):
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

        calls = {"attnc cpu": lambda q, k, v: mod(q, k, v, **case.inputs), "SDPA": base.sdpa_call}
        want = grads(calls["SDPA"])
        for t, a, b in zip("qkv", grads(calls["attnc cpu"]), want, strict=True):
            M.check_close(f"attnc cpu d{t}", a, b, M.GRAD_TOL)
        times = interleaved({n: (lambda fn=fn: grads(fn)) for n, fn in calls.items()}, repeat)
        res["fwdbwd"] = {n: 1e3 * statistics.median(t) for n, t in times.items()}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"the matrix's tiny sizes, cases {QUICK_CASES} (unless --cases): about a minute")
    ap.add_argument("--cases", default=None,
                    help=f"default nbhd2d_64,nbhd3d,sw512_8k,document,decode (--quick: {QUICK_CASES})")
    ap.add_argument("--modes", default="fwd,fwdbwd")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--label", default="", help="a name for this run in the output (e.g. the commit)")
    ap.add_argument("--out", default=None, help="append the markdown table to this file")
    args = ap.parse_args()
    args.cases = args.cases or (QUICK_CASES if args.quick else "nbhd2d_64,nbhd3d,sw512_8k,document,decode")
    modes = args.modes.split(",")
    label = f"{args.label or 'run'}{' (--quick sizes)' if args.quick else ''}"
    lines = [f"### {label} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"load average {os.getloadavg()[0]:.1f} at start, torch threads {torch.get_num_threads()})", "",
             "| case | mode | attnc cpu (ms) | Flex (ms) | SDPA (ms) | cpu / Flex | cpu / SDPA |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for key in args.cases.split(","):
        result = run_case(key, modes, args.repeat, args.quick)
        if "Flex error" in result:
            lines.append(f"| {key} | Flex failed: {result.pop('Flex error')} | | | | | |")
            print(lines[-1], flush=True)
        for mode, cells in result.items():
            a, f, s = (cells.get(c) for c in ("attnc cpu", "Flex", "SDPA"))
            row = (f"| {key} | {mode} | {a:,.1f} | {'-' if f is None else f'{f:,.1f}'} | {s:,.1f} | "
                   f"{'-' if f is None else f'{a / f:.2f}'} | {a / s:.2f} |")
            lines.append(row)
            print(row, flush=True)
    lines.append(f"\nload average {os.getloadavg()[0]:.1f} at the end\n")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
