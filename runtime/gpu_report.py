"""The offline GPU compile check's reports as text (``runtime.gpu_check``: ``attnc check-gpu``): a markdown table
of every compiled launch and a one-line summary."""

from __future__ import annotations

HEADER = ("| pattern | kernel | arch | d | dtype | config | warps | stages | smem KiB | limit KiB | regs | spill B "
          "| dots | wgmma | mma.sync | tcgen05 | loop instr | status |")


def table(reports: list) -> str:
    """A markdown table of the reports (``gpu_check.KernelReport``)."""
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for r in reports:
        status = ("ok" if r.ok else "; ".join(r.problems)) + "".join(f" (note: {n})" for n in r.notes)
        lines.append(f"| {r.pattern} | {r.kernel} | sm_{r.arch} | {r.head_dim} | {r.dtype} | {r.config.replace('|', '/')} | "
                     f"{r.num_warps} | {r.num_stages} | {r.shared / 1024:.1f} | {r.smem_limit // 1024} | {r.regs} | "
                     f"{r.spill_bytes} | {r.dots} | {r.wgmma} | {r.mma} | {r.tcgen05} | "
                     f"{'+'.join(map(str, r.loop_instructions)) or '-'} | {status} |")
    return "\n".join(lines)


def summary(reports: list) -> str:
    """How many launches compiled, how many with problems, and which."""
    bad = [r for r in reports if not r.ok]
    return f"{len(reports)} kernels compiled, {len(bad)} with problems" + (
        "" if not bad else ": " + ", ".join(sorted({f'{r.pattern}/{r.kernel}/sm_{r.arch}/d{r.head_dim}' for r in bad})))
