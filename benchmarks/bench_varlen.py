"""Packed variable-length batches: attnc ``cu_seqlens=`` against FlexAttention with a document mask
(recorded, not a timed test).

    python benchmarks/bench_varlen.py [--repeats 5] [--out benchmarks/results/varlen-cpu-DATE.md] [--quick]

Cost on a 2-core CPU: ``--quick`` (6 documents, 688 tokens, 2 heads of 32) took 26 s wall (17 s CPU,
2026-11-25, load average 5 from other jobs), most of it Flex's ``torch.compile``; the full run (9
documents, 8,192 tokens, 8 heads of 64) took 24 s wall (23 s CPU, load average 8; Flex's kernels
were in the inductor cache from earlier runs, a cold compile adds about 20 s): already under a
minute.

In one process, forward, fp32, inference, causal attention over documents of mixed lengths packed
into one batch entry (the lengths repeat, as real packing does: attnc plans once per distinct length):

- attnc: ``compile_attention(causal, backend="cpu")`` called with ``cu_seqlens``;
- Flex: ``torch.compile(flex_attention)`` with ``create_block_mask`` of a causal-and-same-document
  ``mask_mod`` over the packed tokens (the BlockMask built per batch, as a packing pipeline does,
  and timed separately).

First calls (attnc: planning per length + run; Flex: create_block_mask + compile + run) and the
forward, interleaved, median of ``--repeats`` after one warm-up. Outputs are checked against each
other (max abs difference printed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # first-call times without an earlier process's kernels
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnc-bench-varlen-")

import torch  # noqa: E402

import attnc  # noqa: E402

CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"


def doc_mask(doc: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])
    return mask_mod


def run_case(lengths, H, D, repeats):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    total = sum(lengths)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, total, D, generator=g) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    rows = {"case": f"{len(lengths)} documents ({len(set(lengths))} distinct lengths), {total} tokens, "
                    f"{H} heads, dim {D}"}
    torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(4))  # one-off inductor start-up
    attn = attnc.compile_attention(CAUSAL, backend="cpu")
    t = time.perf_counter()
    with torch.no_grad():
        out_a = attn(q, k, v, cu_seqlens=cu)
    rows["attnc first call (s)"] = time.perf_counter() - t
    compiled = torch.compile(flex_attention, fullgraph=True, dynamic=False)
    t = time.perf_counter()
    bm = create_block_mask(doc_mask(doc), 1, 1, total, total, device="cpu")
    with torch.no_grad():
        out_f = compiled(q, k, v, block_mask=bm)
    rows["Flex create_block_mask + first call (s)"] = time.perf_counter() - t
    rows["max |attnc - Flex|"] = float((out_a - out_f).abs().max())
    fns = {"attnc": lambda: attn(q, k, v, cu_seqlens=cu),
           "Flex": lambda: compiled(q, k, v, block_mask=bm),
           "create_block_mask": lambda: create_block_mask(doc_mask(doc), 1, 1, total, total, device="cpu")}
    times = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    for name in fns:
        rows[f"{name} (ms, median)"] = 1e3 * statistics.median(times[name])
    a, f, m = (statistics.median(times[n]) for n in ("attnc", "Flex", "create_block_mask"))
    rows["attnc / Flex forward"] = a / f
    rows["attnc / (Flex forward + create_block_mask)"] = a / (f + m)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--note", default="", help="a line recorded with the results (e.g. machine load)")
    args = ap.parse_args()
    if args.quick:
        cases = [((64, 200, 64, 128, 200, 32), 2, 32)]
    else:
        cases = [((512, 2048, 512, 1024, 2048, 256, 1024, 512, 256), 8, 64)]
    results = [run_case(lengths, H, D, args.repeats) for lengths, H, D in cases]
    lines = [f"# varlen (cu_seqlens) vs FlexAttention document mask, CPU, {datetime.date.today()}", "",
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, repeats {args.repeats}" + (" (--quick)" if args.quick else ""),
             *([args.note] if args.note else []), ""]
    for rows in results:
        lines.append(f"## {rows.pop('case')}")
        lines.append("")
        lines += [f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
                  for key, value in rows.items()]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
