"""The SASS instructions of each kernel's loop steps, two compile matrices side by side (offline, no GPU).

    python benchmarks/gpu_compile_matrix.py --quick --out before.md     # on one version of attnc
    python benchmarks/gpu_compile_matrix.py --quick --out after.md      # on another
    python benchmarks/loop_instructions.py before.jsonl after.jsonl [--out FILE.md]

Cost: under a second (0.1 s measured 2026-11-25: it reads the two files; the matrices cost what
``gpu_compile_matrix.py --help`` says); ``--quick`` is accepted and runs the same.

Each matrix row records ``loop_instructions`` (``runtime.gpu_check.loop_instructions``): the instructions of
each innermost loop that issues tensor-core instructions, in program order; for attnc's softmax kernels the step
over a FULL and over a PARTIAL tile (dK/dV: a Q tile). What a step costs besides its matmuls (the score's
scale, mask, exponentials, the online softmax's rescaling, addresses) is what a change to the loops moves; the
matmuls are the same on both sides. Fewer instructions is not a measured time: on a GPU they overlap with the
tensor cores' work in part, so the time saved is at most their share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

#: What tells a matrix's rows apart beside the pattern, kernel, arch, head dim and dtype (its options: the old
#: search's configs, order tables, TMA, grouped-query attention, the backward in one kernel, the forward
#: warp-specialized), each with the value a row written before the option existed means
VARIANT = {"before": False, "ordered": False, "tma": False, "kv_heads": None, "group_split": 1, "atomic_dq": False,
           "warp_specialize": False}


def load(path: str) -> dict[tuple, dict]:
    """The rows of a matrix's JSON lines with loop counts, by (pattern, kernel, arch, head dim, dtype, variant,
    launch): ``launch`` counts the kernel's earlier rows of the same options (a recurrence launches a kernel in
    its forward and again in its backward), in the order a cell records them."""
    rows: dict[tuple, dict] = {}
    seen: dict[tuple, int] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("loop_instructions") and not row.get("error"):
            key = (row["pattern"], row["kernel"], row["arch"], row["head_dim"], row["dtype"],
                   *(row.get(k, default) for k, default in VARIANT.items()))
            seen[key] = seen.get(key, -1) + 1
            rows[(*key, seen[key])] = row
    return rows


def compare(before: dict[tuple, dict], after: dict[tuple, dict]) -> str:
    """Markdown: per architecture and kernel, the median ratio of a step's instructions after to before (every
    loop of every kernel both matrices compiled with the same number of loops), then every kernel's counts."""
    common = sorted(k for k in before.keys() & after.keys()
                    if len(before[k]["loop_instructions"]) == len(after[k]["loop_instructions"]))
    groups: dict[tuple, list[float]] = {}
    for key in common:
        for b, a in zip(before[key]["loop_instructions"], after[key]["loop_instructions"], strict=True):
            groups.setdefault((key[2], key[1]), []).append(a / b)
    lines = ["| arch | kernel | loop steps | after / before (median) | fewest | most |", "|---|---|---|---|---|---|"]
    for (arch, kernel), ratios in sorted(groups.items()):
        lines.append(f"| sm_{arch} | {kernel} | {len(ratios)} | {statistics.median(ratios):.3f} | "
                     f"{min(ratios):.3f} | {max(ratios):.3f} |")
    lines += ["", "| pattern | kernel | arch | d | dtype | before | after | registers before / after |",
              "|---|---|---|---|---|---|---|---|"]
    for key in common:
        b, a = before[key], after[key]
        options = ", ".join(f"{k} {v}" for k, v in zip(VARIANT, key[5:-1], strict=True) if v not in (None, False, 1))
        options += f"{', ' if options else ''}launch {key[-1] + 1}" if key[-1] else ""
        lines.append(f"| {key[0]}{f' ({options})' if options else ''} | {key[1]} | sm_{key[2]} | {key[3]} | {key[4]} | "
                     f"{'+'.join(map(str, b['loop_instructions']))} | {'+'.join(map(str, a['loop_instructions']))} | "
                     f"{b['regs']} / {a['regs']} |")
    missing = len(before.keys() ^ after.keys()) + len(before.keys() & after.keys()) - len(common)
    if missing:
        lines += ["", f"{missing} kernels in only one matrix, or with a different number of loops, not compared."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", help="a compile matrix's .jsonl")
    ap.add_argument("--quick", action="store_true",
                    help="accepted for uniformity: the full run already takes under a minute, --quick runs the same")
    ap.add_argument("after", help="another's")
    ap.add_argument("--out", help="write the markdown here too")
    args = ap.parse_args(argv)
    text = compare(load(args.before), load(args.after))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
