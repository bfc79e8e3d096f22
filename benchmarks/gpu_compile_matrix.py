"""The offline GPU compile matrix: every stdlib pattern x head dim x dtype x architecture, compiled
for CUDA without a GPU through attnc's launch path at the configs its schedule search picks
(``runtime.gpu_check``), on the installed Triton. Writes
``benchmarks/results/gpu-compile-<triton version>-<date>.md``: one row per kernel (registers, spill
bytes, shared memory against the per-block limit, wgmma / mma.sync counts) and, with ``--before``,
the same kernels at the configs the search picked before it sized the backward (forward-only shared
memory, one launch config for both passes, 32-token KV tiles on Hopper) beside them.

One command (``python benchmarks/gpu_compile_matrix.py``) runs the full matrix; ``--quick`` the
documented subset (``QUICK``: 12 patterns, every arch, head dim and dtype, as the recorded quick
matrices); results are appended to a JSON-lines file as they come (``--resume`` skips what it holds),
so an interrupted run continues where it stopped. Exit status 1 when a kernel of the current configs
fails to compile, exceeds the shared-memory limit or spills.

Needs no GPU (Triton's own ptxas); each cell (pattern x arch x d x dtype) compiles its kernels in
3-5 s on a 2-core CPU. Cost there: ``--quick`` about 10 minutes (12 patterns x 3 archs x 2 dims x 2
dtypes); a one-minute check, ``--quick --arch 90 --head-dim 128 --dtype bf16`` (12 cells), took 73 s
wall (65 s CPU, 2026-11-25, load average 5 from other jobs); the full matrix (34 patterns, about 400
cells) about 30 minutes with ``--jobs 2`` and an hour with ``--jobs 1`` (estimated from the recorded
runs' cell time: 104 cells, 7 min). Without ``--out`` the results go to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

DATE = datetime.date.today().isoformat()
RESULTS = Path(__file__).resolve().parent / "results"
#: Sizes of the recorded call per layout (the kernels bake the sizes in; the search's pick depends on them).
SEQ_N = 8192
GRID_SIZES = {2: {"height": 64, "width": 64}, 3: {"frames": 16, "height": 32, "width": 32}}
#: Grid sizes of patterns whose axes are named otherwise (radial: frames x tokens per frame).
PATTERN_SIZES = {"radial": {"frames": 16, "per_frame": 256}}
#: Parameters a stdlib pattern needs (no default) or whose default does not fit SEQ_N.
PARAMS = {"prefix_lm": {"prefix": 1024}, "moba": {"block": 1024, "topk": 4}, "grid": {"vision_end": 8000},
          "seer": {"topk": 16}}
RECURRENCES = {"gla", "lightning", "lightning_fla", "mamba2", "retention"}
QUICK = ["sliding_window", "softcap", "alibi", "forgetting", "moba", "streaming", "power", "document",
         "neighborhood_2d", "neighborhood_3d", "mamba2", "retention"]


def stdlib_names() -> list[str]:
    from attnc.spec.library import stdlib_index

    return sorted(stdlib_index())


def _sizes(pat, name: str = "") -> tuple[int | None, dict | None]:
    from attnc.core import ir

    if isinstance(pat, ir.PatternIR) and pat.queries.kind == "grid":
        return None, dict(PATTERN_SIZES.get(name) or GRID_SIZES[len(pat.queries.axes)])
    return SEQ_N, None


@contextlib.contextmanager
def before_search():
    """The schedule search as it was before per-pass sizing: forward-only shared memory, the
    forward's launch parameters for the backward, 32-token KV tiles on every architecture."""
    from attnc.compiler.cost import model as cost
    from attnc.compiler.cost import pass_sizing as PS
    from attnc.compiler.cost import search as SR

    saved = (SR.sized, SR.min_kv_tokens, PS.min_kv_tokens)

    def old_sized(config, head_dim, nbytes, hw, score_tiles=2):
        return config if cost.smem_fits(config, head_dim, nbytes, hw) else None

    # the search and the sizing it calls (backward tiles, wide-KV backward, score tiles) each look it up
    SR.sized, SR.min_kv_tokens, PS.min_kv_tokens = old_sized, lambda hw: 1, lambda hw: 1
    try:
        yield
    finally:
        SR.sized, SR.min_kv_tokens, PS.min_kv_tokens = saved


@contextlib.contextmanager
def ordered_launches():
    """Every kernel launched through its order table (``ORDERED``), as causal and routed schedules launch
    on a GPU where the order pays (``compiler.cost.launch_order``); at the recorded sizes it seldom does."""
    from attnc.compiler.cost import launch_order
    from attnc.runtime.backends.triton import kernel_launch as KL

    saved = KL.choose_order
    KL.choose_order = lambda full, partial, repeat, sms: launch_order.longest_first(full, partial)
    try:
        yield
    finally:
        KL.choose_order = saved


@contextlib.contextmanager
def trial_launches(**fields):
    """Every pick with ``fields`` of its ``KernelConfig`` set, as the autotuner's trials run them: ``tma`` (its
    streamed tiles loaded by TMA where each is one box (``search.tma_fits``), a row's ``desc``; by pointer
    elsewhere), ``atomic_dq`` (the backward in one kernel, dQ added by the dK/dV kernel's atomics, no dQ kernel:
    ``autotune.atomic_dq_backward``, where the tuner would time it; the pick as it is elsewhere),
    ``warp_specialize`` (the forward warp-specialized on TMA loads: ``autotune.warp_specialized_forward``, the pick
    as it is where that gives none; a row's ``ws``)."""
    import dataclasses

    from attnc.runtime.backends.triton import runner
    from attnc.runtime.tuning.autotune import atomic_dq_backward, warp_specialized_forward

    saved = runner.search_config

    def with_fields(pat, bound, hw, **kw):
        cfg = saved(pat, bound, hw, **kw)
        if fields.get("atomic_dq"):
            cfg = atomic_dq_backward(cfg, pat, hw) or cfg
        if fields.get("warp_specialize"):
            nbytes = getattr(kw.get("dtype"), "itemsize", 2)
            cfg = warp_specialized_forward(cfg, pat, hw, *runner.schedule_extents(pat, bound, cfg), nbytes) or cfg
        return dataclasses.replace(cfg, **{k: v for k, v in fields.items() if k not in ("atomic_dq", "warp_specialize")})

    runner.search_config = with_fields
    try:
        yield
    finally:
        runner.search_config = saved


def run_one(task: tuple) -> list[dict]:
    """One (pattern, arch, head dim, dtype, before[, ordered[, tma[, kv_heads, group_split[, atomic_dq[,
    warp_specialize]]]]]) cell: its kernels' reports as dicts."""
    name, arch, d, dtype, before, *rest = task
    ordered = bool(rest and rest[0])
    tma = bool(len(rest) > 1 and rest[1])
    kv_heads, group_split = (rest[2], rest[3]) if len(rest) > 3 else (None, 1)
    atomic_dq = bool(len(rest) > 4 and rest[4])
    ws = bool(len(rest) > 5 and rest[5])
    trial = {**({"tma": True} if tma else {}), **({"atomic_dq": True} if atomic_dq else {}),
             **({"warp_specialize": True} if ws else {})}
    import triton

    import attnc
    from attnc.runtime import gpu_check as G

    start = time.perf_counter()
    try:
        pat = attnc.load(f"stdlib:{name}", **PARAMS.get(name, {}))
        n, sizes = _sizes(pat, name)
        with before_search() if before else contextlib.nullcontext(), \
                ordered_launches() if ordered else contextlib.nullcontext(), \
                trial_launches(**trial) if trial else contextlib.nullcontext():
            reports = G.check_pattern(pat, archs=(arch,), head_dims=(d,), dtypes=(dtype,), n=n, sizes=sizes,
                                      label=name, kv_heads=kv_heads, group_split=group_split)
        # the tile lists each kernel stepped through as runs of consecutive tiles (``{kind}_RUN``)
        rows = [{**r.to_dict(), "runs": sorted(k[:-4] for k, v in r.constexprs.items() if k.endswith("_RUN") and v),
                 "desc": bool(r.constexprs.get("DESC")), "ws": bool(r.constexprs.get("WARP_SPEC")),
                 "one_loop": bool(r.constexprs.get("ONE_LOOP"))} for r in reports]
    except Exception as err:  # noqa: BLE001 - a cell that cannot even be recorded is a finding too
        rows = [{"pattern": name, "kernel": "-", "arch": arch, "head_dim": d, "dtype": dtype, "config": "",
                 "num_warps": 0, "num_stages": 0, "shared": 0, "smem_limit": 0, "regs": 0, "spill_bytes": 0,
                 "stack": 0, "wgmma": 0, "mma": 0, "tcgen05": 0, "dots": 0,
                 "error": f"{type(err).__name__}: {err}"[:240]}]
    for r in rows:
        # ``cell``: the stdlib name the cell ran (a combined pattern's rows name their branch, ``nsa/cmp``)
        r.update(cell=name, before=before, ordered=ordered, tma=tma, kv_heads=kv_heads, group_split=group_split,
                 atomic_dq=atomic_dq, warp_specialize=ws,
                 triton=triton.__version__,
                 seconds=round(time.perf_counter() - start, 1))
    return rows


def done_cells(rows: list[dict]) -> set[tuple]:
    """The tasks (``run_one``'s) that rows already hold, for ``--resume`` (rows of older runs without
    ``cell``: their pattern's name)."""
    return {(r.get("cell", r["pattern"]), r["arch"], r["head_dim"], r["dtype"], r["before"], r.get("ordered", False),
             r.get("tma", False), r.get("kv_heads"), r.get("group_split", 1), r.get("atomic_dq", False),
             r.get("warp_specialize", False)) for r in rows}


def _report(r: dict):
    """The row as ``gpu_check.KernelReport`` (rows of older runs lack the newer counts: 0)."""
    import dataclasses

    from attnc.runtime import gpu_check as G

    names = {f.name for f in dataclasses.fields(G.KernelReport)} - {"constexprs", "cubin"}
    stored = {**r, "loop_counts": r.get("loop_instructions", [])}  # counted when the row was written
    return G.KernelReport(**{k: v for k, v in stored.items() if k in names})


def problems(r: dict) -> list[str]:
    """What ``attnc check-gpu`` flags: a compile error, shared memory over the limit, spills, 16-bit dots
    off the tensor cores (no tcgen05.mma on sm_100)."""
    return _report(r).problems


def cell(text: str) -> str:
    """A markdown table cell (a config's ``|`` separates its passes)."""
    return text.replace("|", "\\|")


def row_md(r: dict) -> str:
    rep = _report(r)
    status = ("; ".join(rep.problems) or "ok") + "".join(f" (note: {n})" for n in rep.notes)
    return (f"| {r['pattern']} | {r['kernel']} | sm_{r['arch']} | {r['head_dim']} | {r['dtype']} | {cell(r['config'])} | "
            f"{r['num_warps']} | {r['num_stages']} | {r['shared'] / 1024:.1f} | {r['smem_limit'] // 1024} | "
            f"{r['regs']} | {r['spill_bytes']} | {rep.dots} | {r['wgmma']} | {r['mma']} | {rep.tcgen05} | {status} |")


HEAD = ("| pattern | kernel | arch | d | dtype | config | warps | stages | smem KiB | limit KiB | regs | spill B | "
        "dots | wgmma | mma.sync | tcgen05 | status |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def badness(r: dict) -> tuple:
    over = max(0, r["shared"] - r["smem_limit"]) if r["smem_limit"] else 0
    return (bool(r["error"]), over, r["spill_bytes"], r["shared"] / max(r["smem_limit"], 1))


def _command_args(argv: list[str]) -> list[str]:
    """The command line's arguments that say what ran (not --render-only, --resume, --note TEXT)."""
    out, skip = [], False
    for a in argv:
        if skip or a in ("--render-only", "--resume"):
            skip = False
            continue
        if a == "--note":
            skip = True
            continue
        if not a.startswith("--note="):
            out.append(a)
    return out


def _cell(r: dict) -> tuple:
    return (r["pattern"], r["arch"], r["head_dim"], r["dtype"], r["before"])


def cell_seconds(rows: list[dict]) -> float:
    """Summed time of the cells the rows come from (each row of a cell carries its cell's time)."""
    return sum({_cell(r): r["seconds"] for r in rows}.values())


def render(rows: list[dict], args, elapsed: float) -> str:
    import platform

    import triton

    cur = [r for r in rows if not r["before"]]
    old = [r for r in rows if r["before"]]
    bad = [r for r in cur if problems(r)]
    lines = [f"# Offline GPU compile matrix: Triton {triton.__version__}, {DATE}", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["**An offline compile, not a run: no kernel was launched and nothing was timed** (no GPU). "
             "Kernels compiled for CUDA without a GPU (`runtime.gpu_check`: the launch path's own launches, "
             "recorded on CPU tensors, bound and specialised as `JITFunction.run` does, compiled with "
             "`triton.compile` for `GPUTarget(\"cuda\", arch, 32)`; registers and spills from ptxas -v) "
             "at the configs the schedule search picks for the arch's hardware model (sm_80: A100, sm_90: "
             "H100, sm_100: B200). Shared-memory limit per block: 163 KiB (sm_80), 227 KiB (sm_90, sm_100).", "",
             f"Command: `python benchmarks/gpu_compile_matrix.py "
             f"{' '.join(_command_args(sys.argv[1:]))}`; "
             f"{len(cur)} kernels in {len({_cell(r) for r in cur})} cells (pattern x arch x d x dtype), "
             f"{elapsed / 60:.0f} min of cell time on {platform.machine()} ({os.cpu_count()} cores, "
             "shared with other jobs).", "",
             f"Sizes: seq n = {SEQ_N}; 2-D grids {GRID_SIZES[2]}; 3-D grids {GRID_SIZES[3]}; {PATTERN_SIZES}; "
             f"params {PARAMS}.", "",
             *([f"Launch order: {sum(bool(r.get('ordered')) for r in cur)} of {len(cur)} kernels compiled with "
                "their order tables (`--ordered`: `ORDERED`, longest first, forced where the recorded sizes "
                "would not take it).", ""] if any(r.get("ordered") for r in cur) else []),
             *([f"TMA: {sum(bool(r.get('desc')) for r in cur)} of {len(cur)} kernels load their streamed tiles by "
                "tensor descriptor (`--tma`: the search's pick with `KernelConfig.tma`, as the autotuner's Hopper "
                "trial; by pointer where a tile is not one box (`search.tma_fits`), and on sm_80, which has no "
                "TMA).", ""]
               if any(r.get("tma") for r in cur) else []),
             *([f"Warp specialization: {sum(bool(r.get('ws')) for r in cur)} of {len(cur)} kernels with their "
                f"forward's KV loop warp-specialized, {sum(bool(r.get('one_loop')) for r in cur)} of them in one loop "
                "(`--warp-specialize`: `autotune.warp_specialized_forward`, the tuner's trial: on Hopper a 128-token "
                "Q tile at 4 warps, FULL and PARTIAL tiles in one loop with descriptors made in the kernel; on "
                "Blackwell the pick's two loops on TMA loads, not for a softcap or a decay; the pick as it is elsewhere).", ""]
               if any(r.get("warp_specialize") for r in cur) else []),
             *([f"Grouped-query attention: K/V heads {cur[0].get('kv_heads')} of 2 query heads, the dK/dV kernel's "
                f"group split over {cur[0].get('group_split', 1)} program(s) per K/V head (`--kv-heads`, "
                "`--group-split`).", ""] if cur and cur[0].get("kv_heads") else []),
             *([f"Runs: {sum(bool(r.get('runs')) for r in cur)} of {len(cur)} kernels stepped through at least one "
                "of their tile lists as a run of consecutive tiles, with no index load in the loop (`{kind}_RUN`): "
                + ", ".join(f"{kind} {sum(kind in r.get('runs', ()) for r in cur)}"
                            for kind in ("FULL", "PART", "T_FULL", "T_PART")) + ".", ""]
               if any("runs" in r for r in cur) else []),
             f"**{len(bad)} of {len(cur)} kernels with a problem** (compile error, shared memory over the limit, "
             "spills, or 16-bit dots off the tensor cores: on FMA, or not on tcgen05.mma on sm_100) at the "
             "current configs." + (" Problems:" if bad else ""), ""]
    for r in sorted(bad, key=badness, reverse=True):
        lines.append(f"- {r['pattern']} {r['kernel']} sm_{r['arch']} d={r['head_dim']} {r['dtype']} "
                     f"({r['config']}): {'; '.join(problems(r))}")
    fell = [r for r in cur if r.get("fell_back")]
    if fell:
        lines += [""] * bool(bad) + [f"**{len(fell)} of {len(cur)} kernels launched on a lower rung** of the fit ladder "
                  "(`runtime.kernel_fit`: at the warps and stages their pass picked, ptxas's kernel spilled or "
                  "was over shared memory; a GPU launches them at the rung shown, their rows too; `indexed`: "
                  "the same warps and stages with the tile lists read by index, not stepped through as runs):", ""]
        lines += [f"- {r['pattern']} {r['kernel']} sm_{r['arch']} d={r['head_dim']} {r['dtype']} ({r['config']}): "
                  f"launched at w{r['num_warps']} s{r['num_stages']}{' indexed' if r.get('indexed') else ''}; "
                  + ", ".join(r["fell_back"])
                  for r in sorted(fell, key=lambda r: (r["pattern"], r["kernel"], r["arch"], r["head_dim"]))]
    if old:
        lines += ["", "## Before / after (worst kernels before)", "",
                  "Before: the search as it was (forward-only shared memory, the forward's warps/stages for "
                  "the backward, 32-token KV tiles on Hopper), reproduced by `--before`. After: per-pass "
                  "sizing (this branch).", "",
                  "| pattern | kernel | arch | d | before config | smem KiB | regs | spill B | mma.sync | "
                  "after config | smem KiB | regs | spill B | mma.sync |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        after = {(r["pattern"], r["kernel"], r["arch"], r["head_dim"], r["dtype"]): r for r in cur}
        worst = sorted(old, key=badness, reverse=True)
        shown = 0
        for b in worst:
            a = after.get((b["pattern"], b["kernel"], b["arch"], b["head_dim"], b["dtype"]))
            if a is None or not problems(b) and shown >= 12:
                continue
            lines.append(f"| {b['pattern']} | {b['kernel']} | sm_{b['arch']} | {b['head_dim']} | {cell(b['config'])} | "
                         f"{b['shared'] / 1024:.0f} | {b['regs']} | {b['spill_bytes']} | {b['mma']} | {cell(a['config'])} | "
                         f"{a['shared'] / 1024:.0f} | {a['regs']} | {a['spill_bytes']} | {a['mma']} |")
            shown += 1
            if shown >= 40:
                break
        nb = len([r for r in old if problems(r)])
        lines += ["", f"Before: {nb} of {len(old)} kernels with a problem; after: {len(bad)} of {len(cur)}."]
    lines += ["", "## All kernels (current configs)", "", HEAD]
    lines += [row_md(r) for r in sorted(cur, key=lambda r: (r["pattern"], r["arch"], r["head_dim"], r["dtype"]))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import triton

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patterns", help="comma-separated stdlib names (default: all)")
    p.add_argument("--quick", action="store_true", help=f"the subset {','.join(QUICK)}")
    p.add_argument("--arch", default=None, help="compute capabilities (default 80,90 and 100 when supported)")
    p.add_argument("--head-dim", default="64,128")
    p.add_argument("--dtype", default="fp16,bf16")
    p.add_argument("--before", action="store_true", help="also the configs of the search before per-pass sizing")
    p.add_argument("--before-head-dim", default="128", help="head dims of the --before cells (default 128)")
    p.add_argument("--before-dtype", default="bf16", help="dtypes of the --before cells (default bf16)")
    p.add_argument("--jobs", type=int, default=1, help="processes compiling in parallel")
    p.add_argument("--out", help="the results file (default benchmarks/results/gpu-compile-<triton>-<date>.md)")
    p.add_argument("--resume", action="store_true", help="skip the cells the JSON-lines file already holds")
    p.add_argument("--render-only", action="store_true", help="write the results file from the JSON-lines file")
    p.add_argument("--note", default="", help="a paragraph for the results file's head (what was run and why)")
    p.add_argument("--ordered", action="store_true",
                   help="compile every kernel with its launch-order table (as where longest first pays)")
    p.add_argument("--kv-heads", type=int, default=None,
                   help="K/V heads shared by the 2 query heads (grouped-query attention; default one per head)")
    p.add_argument("--group-split", type=int, default=1,
                   help="the dK/dV programs per K/V head with --kv-heads (each over its share of the group)")
    p.add_argument("--tma", action="store_true",
                   help="the picks whose tiles are each one box with TMA loads (the tuner's Hopper trial)")
    p.add_argument("--atomic-dq", action="store_true",
                   help="the picks with the backward in one kernel, dQ added by atomics (the tuner's trial)")
    p.add_argument("--warp-specialize", action="store_true",
                   help="the picks with their forward warp-specialized on TMA loads (the tuner's trial, Hopper and later)")
    args = p.parse_args(argv)
    from attnc.runtime import gpu_check as G

    names = args.patterns.split(",") if args.patterns else (QUICK if args.quick else stdlib_names())
    archs = [int(a) for a in args.arch.split(",")] if args.arch else list(G.default_archs())
    dims = [int(d) for d in args.head_dim.split(",")]
    dtypes = args.dtype.split(",")
    tasks = []
    for n in names:  # per pattern and arch: the current configs, then (--before) the old ones beside them
        for a in archs:
            tasks += [(n, a, d, t, False, args.ordered, args.tma, args.kv_heads, args.group_split, args.atomic_dq,
                       args.warp_specialize)
                      for d in dims for t in dtypes]
            if args.before and n not in RECURRENCES:  # the recurrences' launch parameters did not change
                tasks += [(n, a, d, t, True, args.ordered, args.tma, args.kv_heads, args.group_split, args.atomic_dq,
                          args.warp_specialize)
                          for d in map(int, args.before_head_dim.split(","))
                          for t in args.before_dtype.split(",")]
    out = Path(args.out) if args.out else RESULTS / f"gpu-compile-{triton.__version__}-{DATE}.md"
    log = out.with_suffix(".jsonl")
    rows: list[dict] = []
    if args.render_only:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        out.write_text(render(rows, args, cell_seconds(rows)), encoding="utf-8")
        print(f"wrote {out}")
        return 1 if any(problems(r) for r in rows if not r["before"]) else 0
    if args.resume and log.exists():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        done = done_cells(rows)
        tasks = [t for t in tasks if t not in done]
    elif log.exists():
        log.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        def take(cell_rows):
            for r in cell_rows:
                f.write(json.dumps(r) + "\n")
            f.flush()
            rows.extend(cell_rows)
            r0 = cell_rows[0]
            print(f"[{len(rows)}] {r0['pattern']} sm_{r0['arch']} d{r0['head_dim']} {r0['dtype']}"
                  f"{' before' if r0['before'] else ''}: "
                  f"{'; '.join(sum((problems(r) for r in cell_rows), [])) or 'ok'} ({r0['seconds']} s)", flush=True)

        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs) as pool:
                for fut in as_completed([pool.submit(run_one, t) for t in tasks]):
                    take(fut.result())
        else:
            for t in tasks:
                take(run_one(t))
    out.write_text(render(rows, args, cell_seconds(rows)), encoding="utf-8")
    print(f"wrote {out}")
    return 1 if any(problems(r) for r in rows if not r["before"]) else 0


if __name__ == "__main__":
    sys.exit(main())
