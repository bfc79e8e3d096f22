"""Every stdlib pattern timed on the GPU in one call: attnc's Triton kernels against what a user would pick instead,
forward and forward+backward, the simulator's prediction beside each measurement.

    python benchmarks/gpu_matrix.py                        # on a GPU machine (one call; --budget-s bounds it)
    python benchmarks/gpu_matrix.py --toy                  # CPU, Triton interpreter, toy sizes (the tests run it)
    python benchmarks/gpu_matrix.py --only moba,alibi      # some patterns
    python benchmarks/gpu_matrix.py --list                 # the patterns and their sizes

Cost: GPU-only unless ``--toy``: without a CUDA device it exits at once (status 2). ``--budget-s`` (default 420 there,
none with ``--toy``) stops starting new patterns once spent, and the rows not reached say so. Measured on an H100
(2026-11-28, ``benchmarks/results/gpu-matrix-h100-2026-11-28.md``): compiling dominates. A pattern's first call
(attnc's kernels, Flex's ``torch.compile`` of its mods, forward and backward) took 35-88 s in a warm-up of 16
processes at once (``--warm-jobs 16``), and a recurrence's more than 110 s; the timed pass then took 20-30 s a row.
So every row does not fit one 10-minute call: run it in parts (``--only``, in the order given), or again with
``--resume``, which keeps the rows an earlier run measured in the same file (``--out``) and runs the rest of
the patterns asked for (not reached, failed, missing), each run's line in the header; the file's other rows stay. ``--toy`` on a
2-core CPU: every pattern at toy sizes in the interpreter, a few minutes (``tests/project/test_gpu_matrix.py`` runs a few).

Rows: the 53 stdlib patterns (``spec.library.stdlib_index``), at one realistic size each: sequences of 16,384
tokens, 2-D grids of 128 x 128, 3-D grids of 30 x 48 x 80, the recurrences at 8,192 tokens as fla's benchmarks
take them; batch 1, 16 heads, head dim 128, bf16 (``--toy``: float32, 2 heads, head dim 16, tiny sizes). The
parameters and call-time inputs are ``gpu_conformance.py``'s (its ``SOFTMAX`` table and input makers, one source
for both scripts), sized up where the table's were for 4,096 tokens; the patterns it does not list take theirs
here (``EXTRA``).

Columns, each the median of ``triton.testing.do_bench`` (``--toy``: one wall-clock call, which proves the run,
not a speed):

- attnc: ``backend="triton"``, forward (``no_grad``) and forward+backward (``torch.autograd.grad`` of q, k, v);
  the simulator's prediction for the schedule that ran (``attn.report`` on this GPU's model) beside each, and
  predicted / measured;
- FlexAttention as a user writes it: the pattern's ``mask_mod`` and ``score_mod`` (``attnc.to_flex``), its
  ``BlockMask`` built once by ``create_block_mask`` (the build in its own column), ``torch.compile``d
  ``flex_attention``; a routed pattern's Flex is given attnc's selection (its mask without the route and the
  selection, read by the ``mask_mod``: a Flex user builds that ``BlockMask`` at every call, since the selection
  changes; attnc's time includes making the selection); a pattern Flex cannot express says why
  (``integrations.flex.REFUSED``);
- SDPA: dense, or ``is_causal=True`` where the pattern's mask keeps no key after its query (FlashAttention-2's
  causal kernel);
- fla's chunk kernel where ``fla`` is importable and has the recurrence (``FLA_OPS``);
- ratios attnc / each alternative (below 1: attnc faster).

Rows are written as they finish (the file is complete after every row), so a run cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import sys
import time
import traceback
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_conformance as conf  # noqa: E402  (the cases' parameters and inputs)
import gpu_suite as suite  # noqa: E402  (attnc's import, timing, the budget)
import torch  # noqa: E402

attnc = suite.attnc

#: Realistic sizes of the matrix (batch 1, 16 heads, head dim 128, bf16).
SEQ, RECURRENCE_T, HEADS, HEAD_DIM = 16384, 8192, 16, 128
#: Grid sizes of the matrix, per pattern on a grid (the issue's 128 x 128 and 30 x 48 x 80 where they apply).
GRID_SIZES = {
    "neighborhood_2d": {"height": 128, "width": 128}, "biformer": {"height": 128, "width": 128},
    "window_2d": {"height": 128, "width": 128}, "halo_2d": {"height": 128, "width": 128},
    "neighborhood_3d": {"frames": 30, "height": 48, "width": 80},
    "sliding_tile": {"frames": 30, "height": 48, "width": 80},
    "freeswim": {"frames": 30, "height": 48, "width": 80},
    "vmoba": {"frames": 16, "height": 32, "width": 32}, "radial": {"frames": 32, "per_frame": 512},
}
#: Parameters that change at the matrix's sizes (the table's are for 4,096 tokens).
MATRIX_PARAMS = {
    "sigmoid": {"length": SEQ, "is_causal": True},
    "neighborhood_2d": {"kernel_size_y": 33, "kernel_size_x": 33},
    "neighborhood_3d": {"kernel_size_t": 18, "kernel_size_y": 24, "kernel_size_x": 24},
    "sliding_tile": {"tile_t": 2, "tile_y": 8, "tile_x": 8, "wt": 3, "wy": 3, "wx": 3},
}
#: The patterns ``gpu_conformance.SOFTMAX`` does not list: (params, toy params).
EXTRA = {
    "cluster_mask": ({}, {}),
    "nsa": ({}, {"block": 8, "selected": 2, "window": 8}),
    "routing_transformer": ({}, {"window": 16}),
    "retention": ({}, {}), "mamba2": ({}, {}), "gla": ({}, {}), "lightning": ({}, {}), "lightning_fla": ({}, {}),
    "delta_net": ({}, {}), "gated_delta_net": ({}, {}), "kda": ({}, {}), "titans": ({}, {}),
}
#: fla's chunk kernel of a recurrence: (module, function, gate form): "scalar" gates ``[B, T, H]``, "vector"
#: ``[B, T, H, K]``, None without gates.
FLA_OPS = {
    "mamba2": ("fla.ops.simple_gla", "chunk_simple_gla", "scalar"),
    "gla": ("fla.ops.gla", "chunk_gla", "vector"),
    "retention": ("fla.ops.retention", "chunk_retention", None),
    "delta_net": ("fla.ops.delta_rule", "chunk_delta_rule", None),
    "gated_delta_net": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", "scalar"),
    "kda": ("fla.ops.kda", "chunk_kda", "vector"),
}
COLUMNS = ["pattern", "kind", "sizes", "attnc fwd ms", "predicted", "attnc fwd+bwd ms", "predicted",
           "Flex mask build ms", "Flex fwd ms", "Flex fwd+bwd ms", "max abs(attnc - Flex)", "SDPA", "SDPA fwd ms", "SDPA fwd+bwd ms",
           "fla fwd ms", "fla fwd+bwd ms", "attnc/Flex fwd", "attnc/Flex fwd+bwd", "attnc/SDPA fwd",
           "attnc/SDPA fwd+bwd", "attnc/fla fwd+bwd", "pred/meas fwd", "note"]


@dataclasses.dataclass
class Case:
    """One row: a stdlib pattern at the matrix's (or the toy) sizes."""

    name: str
    params: dict
    n: int  # tokens
    grid: dict | None  # a grid's axes, None on a sequence
    inputs_kind: str | None  # gpu_conformance's input maker, None: made from the declarations


def cases(toy: bool) -> list[Case]:
    """Every stdlib pattern, in the library's order."""
    from attnc.spec.library import stdlib_index

    out = []
    for name in sorted(stdlib_index()):
        if name in conf.SOFTMAX:
            _, params, real, small, kind = conf.SOFTMAX[name]
            params = conf.TOY_PARAMS.get(name, params) if toy else {**params, **MATRIX_PARAMS.get(name, {})}
            sizes = small if toy else GRID_SIZES.get(name, real if "n" not in real else {"n": SEQ})
        else:
            real_params, toy_params = EXTRA.get(name, ({}, {}))
            params, kind = (toy_params if toy else real_params), None
            recurrent = attnc.load(f"stdlib:{name}").kind == "recurrence"
            sizes = {"n": 96 if toy else (RECURRENCE_T if recurrent else SEQ)}
        grid = None if "n" in sizes else dict(sizes)
        out.append(Case(name, dict(params), sizes.get("n") or math.prod(sizes.values()), grid, kind))
    return out


def make_inputs(case: Case, pat, heads: int, head_dim: int, device, gen) -> dict:
    """The call-time inputs: ``gpu_conformance``'s maker where the table names one, else from the declarations
    (a recurrence's rates in (0.25, 0.75) and log gates in (-0.2, 0), other floats in (0, 1), sorted small ints)."""
    if case.inputs_kind is not None:
        return conf._softmax_inputs(case.inputs_kind, case.n, heads, device, gen, head_dim, case.params)
    decls = pat.gates if pat.kind == "combined" else getattr(pat, "inputs", ())
    rates = set(getattr(pat, "rates", None) or ())
    dims = {"heads": heads, "n": case.n, "nk": case.n, "dk": head_dim, "dv": head_dim}
    out = {}
    for decl in decls:
        if getattr(decl, "derived", None):
            continue
        shape = tuple(dims.get(str(d), None) or int(d) for d in decl.dims)
        if getattr(decl, "dtype", "float") != "float":
            out[decl.name] = torch.sort(torch.randint(0, 4, shape, generator=gen), dim=-1).values.to(device)
        elif decl.name in rates:
            out[decl.name] = (0.25 + 0.5 * torch.rand(shape, generator=gen)).to(device)
        elif pat.kind == "recurrence":  # a recurrence's other float inputs are its log gates
            out[decl.name] = (-0.2 * torch.rand(shape, generator=gen)).to(device)
        else:
            out[decl.name] = torch.rand(shape, generator=gen).to(device)
    return out


def sdpa_is_causal(case: Case, pat) -> bool:
    """Whether the pattern's mask keeps no key after its query (checked on 256 tokens of a sequence): SDPA's
    ``is_causal`` kernel is then the dense alternative."""
    from attnc.compiler.analysis import evaluate as E

    if pat.kind != "pattern" or case.grid is not None or not pat.self_attention:
        return False
    try:
        small = dataclasses.replace(pat, route=None)
        bound = E.bind_sizes(small, n=256, heads=1, dk=16)
        gen = torch.Generator().manual_seed(0)
        ins = make_inputs(dataclasses.replace(case, n=256), small, 1, 16, "cpu", gen)
        mask = E.mask_tensor(small, bound, ins)[0]
    except Exception:  # noqa: BLE001 - a mask this check cannot evaluate: the dense baseline
        return False
    return not bool(mask.triu(1).any())


def _ratio(a, b) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def _fwd_bwd(call, q, k, v):
    """A function running ``call`` forward and ``autograd.grad`` of q, k, v (its loss: the output's sum)."""

    def run():
        qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
        out = call(qq, kk, vv)
        out = out[0] if isinstance(out, tuple) else out
        torch.autograd.grad(out.float().sum(), (qq, kk, vv))

    return run


def measure(case: Case, *, toy: bool, device, dtype, heads: int, head_dim: int, hw: str, once: bool = False) -> dict:
    """One row's cells. ``once``: every timing is one call and the simulator is not asked (the warm-up pass,
    which only compiles)."""
    timed = lambda fn: suite.timed(fn, toy or once)  # noqa: E731
    row: dict = {"pattern": case.name, "sizes": "x".join(map(str, case.grid.values())) if case.grid else str(case.n)}
    gen = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))
    attn = attnc.compile_attention(f"stdlib:{case.name}", backend="triton", sizes=case.grid, **case.params)
    pat = attn.pattern
    row["kind"] = pat.kind
    q, k, v = (torch.randn(1, heads, case.n, head_dim, generator=gen).to(device=device, dtype=dtype)
               for _ in range(3))
    ins = make_inputs(case, pat, heads, head_dim, device, gen)
    with torch.no_grad():
        out = attn(q, k, v, **ins)  # compiles and plans: outside the timings

    def attnc_call(qq, kk, vv):
        return attn(qq, kk, vv, **ins)

    with torch.no_grad():
        row["attnc fwd ms"] = timed(lambda: attnc_call(q, k, v))
    row["attnc fwd+bwd ms"] = timed(_fwd_bwd(attnc_call, q, k, v))
    try:
        if once:
            raise _Skipped

        given = {name: t.cpu() for name, t in ins.items()} if ins and pat.kind == "pattern" else None
        rep = attn.report(hardware=hw, dtype="bf16", **({"inputs": given} if given else {}))
        row["predicted fwd"] = rep.best.forward_s
        row["predicted fwd+bwd"] = rep.best.forward_s + rep.best.backward_s
    except _Skipped:
        pass
    except Exception as err:  # noqa: BLE001 - a pattern the simulator does not model: said in the row
        row["notes"] = [f"simulator: {type(err).__name__}: {str(err)[:80]}"]
    selection = None
    if pat.kind == "pattern" and pat.route is not None:  # Flex is given the selection attnc made (made per call)
        with torch.no_grad():
            selection = attn(q, k, v, return_selection=True, **ins)[-1]
    _flex(row, case, pat, q, k, v, ins, toy=toy, device=device, heads=heads, selection=selection, out=out, once=once)
    _sdpa(row, case, pat, q, k, v, toy=toy, once=once)
    _fla(row, case, q, k, v, ins, toy=toy, once=once)
    return row


class _Skipped(Exception):
    """The simulator's cells, not asked for in the warm-up pass."""


def _flex(row: dict, case: Case, pat, q, k, v, ins: dict, *, toy: bool, device, heads: int, selection=None,
          out=None, once: bool = False) -> None:
    """Flex's columns, and the largest difference between its output and attnc's ``out`` (the same attention). A routed pattern's Flex is given attnc's selection (``return_selection=True``: one flag per
    query and key block, or key): the mask without its route, and the selection, read by the ``mask_mod``; its
    ``BlockMask`` (built per call by such a user, as the selection changes) is the build column."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    source = f"stdlib:{case.name}"
    params = case.params
    if selection is not None and case.grid is not None:  # its blocks are regions of the grid, not runs of keys
        row.setdefault("notes", []).append("Flex: given a grid route's selection not built here (its key blocks are "
                                           "regions)")
        return
    if selection is not None:
        source, params = dataclasses.replace(pat, route=None), {}
        ins = {name: t for name, t in ins.items() if name in {d.name for d in source.inputs}}
    try:
        exported = attnc.to_flex(source, n=case.n, heads=heads, sizes=case.grid, dk=q.shape[-1],
                                 inputs=ins or None, device=device, **params)
    except Exception as err:  # noqa: BLE001 - what Flex cannot express is named
        why = str(err).splitlines()[0]
        row.setdefault("notes", []).append(f"Flex: {why.split('FlexAttention: ')[-1][:120]}")
        return
    mask_mod = exported.mask_mod
    if selection is not None:
        block = -(-case.n // selection.shape[-1])
        chosen = selection.to(device)

        def mask_mod(b, h, q_idx, kv_idx, base=exported.mask_mod):
            return base(b, h, q_idx, kv_idx) & chosen[b, h, q_idx, kv_idx // block]

        row.setdefault("notes", []).append("Flex given attnc's selection")
    torch._dynamo.reset()  # each pattern's mods compile afresh (no recompile limit reached across rows)
    per_head = selection is not None or any(str(s) == "h" for s in pat.mask.free_symbols)
    start = time.perf_counter()
    # evaluated in one vmap, the mask of 30x48x80 tokens took 99 GiB and of 16K tokens per head 32 GiB (out of memory on
    # an H100): Flex's compiled builder evaluates it block by block, as its docs advise for long sequences
    large = device.type == "cuda" and case.n * case.n * (heads if per_head else 1) >= 1 << 28
    block_mask = create_block_mask(mask_mod, 1, heads if per_head else None, case.n, case.n, device=device,
                                   _compile=large)
    if device.type == "cuda":
        torch.cuda.synchronize()
    row["Flex mask build ms"] = time.perf_counter() - start
    compiled = flex_attention if toy else torch.compile(flex_attention)

    def flex_call(qq, kk, vv):
        return compiled(qq, kk, vv, score_mod=exported.score_mod, block_mask=block_mask)

    with torch.no_grad():
        got = flex_call(q, k, v)
        if out is not None:
            row["Flex max diff"] = float((got.float() - out.float()).abs().max())
        row["Flex fwd ms"] = suite.timed(lambda: flex_call(q, k, v), toy or once)
    if device.type == "cpu":  # torch's Flex has no CPU backward
        row.setdefault("notes", []).append("Flex: no backward on CPU")
        return
    row["Flex fwd+bwd ms"] = suite.timed(_fwd_bwd(flex_call, q, k, v), toy or once)


def _sdpa(row: dict, case: Case, pat, q, k, v, *, toy: bool, once: bool = False) -> None:
    causal = sdpa_is_causal(case, pat)
    row["SDPA"] = "is_causal" if causal else "dense"

    def sdpa_call(qq, kk, vv):
        return torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)

    with torch.no_grad():
        row["SDPA fwd ms"] = suite.timed(lambda: sdpa_call(q, k, v), toy or once)
    row["SDPA fwd+bwd ms"] = suite.timed(_fwd_bwd(sdpa_call, q, k, v), toy or once)


def _fla(row: dict, case: Case, q, k, v, ins: dict, *, toy: bool, once: bool = False) -> None:
    spec = FLA_OPS.get(case.name)
    if spec is None or toy:
        return
    try:
        module = __import__(spec[0], fromlist=[spec[1]])
        op = getattr(module, spec[1])
    except Exception as err:  # noqa: BLE001 - fla not carried, or without this kernel
        row.setdefault("notes", []).append(f"fla: {type(err).__name__}")
        return

    def fla_call(qq, kk, vv):  # fla's layout: [B, T, H, D], gates [B, T, H(, K)]
        args = [x.transpose(1, 2) for x in (qq, kk, vv)]
        kw = {}
        if "g" in ins:
            g = ins["g"]
            kw["g"] = (g.transpose(0, 1) if g.dim() == 2 else g.transpose(0, 1))[None].contiguous()
        if "beta" in ins:
            kw["beta"] = ins["beta"].transpose(0, 1)[None].contiguous()
        out = op(*args, **kw)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)

    try:
        with torch.no_grad():
            fla_call(q, k, v)
            row["fla fwd ms"] = suite.timed(lambda: fla_call(q, k, v), toy or once)
        row["fla fwd+bwd ms"] = suite.timed(_fwd_bwd(fla_call, q, k, v), toy or once)
    except Exception as err:  # noqa: BLE001 - a call form this fla does not take: said in the row
        row.setdefault("notes", []).append(f"fla: {type(err).__name__}: {str(err)[:80]}")


def format_row(row: dict) -> str:
    ms = lambda key: "-" if row.get(key) is None else f"{row[key] * 1e3:.3f}"  # noqa: E731
    cells = [row["pattern"], row.get("kind", "-"), row.get("sizes", "-"), ms("attnc fwd ms"), ms("predicted fwd"),
             ms("attnc fwd+bwd ms"), ms("predicted fwd+bwd"), ms("Flex mask build ms"), ms("Flex fwd ms"),
             ms("Flex fwd+bwd ms"), "-" if row.get("Flex max diff") is None else f"{row['Flex max diff']:.1e}",
             row.get("SDPA", "-"), ms("SDPA fwd ms"), ms("SDPA fwd+bwd ms"), ms("fla fwd ms"),
             ms("fla fwd+bwd ms"), _ratio(row.get("attnc fwd ms"), row.get("Flex fwd ms")),
             _ratio(row.get("attnc fwd+bwd ms"), row.get("Flex fwd+bwd ms")),
             _ratio(row.get("attnc fwd ms"), row.get("SDPA fwd ms")),
             _ratio(row.get("attnc fwd+bwd ms"), row.get("SDPA fwd+bwd ms")),
             _ratio(row.get("attnc fwd+bwd ms"), row.get("fla fwd+bwd ms")),
             _ratio(row.get("predicted fwd"), row.get("attnc fwd ms")), "; ".join(row.get("notes", [])) or "-"]
    return "| " + " | ".join(" ".join(str(c).replace("|", "/").split()) for c in cells) + " |"


def warm_up_worker(table: list[Case], **how) -> int:
    """One warm-up process: every row of ``table`` run once (its compiles), nothing timed or written."""
    for case in table:
        start = time.perf_counter()
        try:
            measure(case, once=True, **how)
            print(f"gpu_matrix warm: {case.name} {time.perf_counter() - start:.0f} s", flush=True)
        except Exception as err:  # noqa: BLE001 - the timed pass meets it again and records it in the row
            print(f"gpu_matrix warm: {case.name} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def warm_up(table: list[Case], jobs: int, seconds: float, *, toy: bool) -> str:
    """Compile every row's kernels in ``jobs`` processes at once (rows dealt round-robin), stopping them after
    ``seconds``: attnc's kernel cache, Triton's and Inductor's are on disk, so the timed pass in this process
    finds them warm and spends the device's time on timings. What it did, for the file's header."""
    import subprocess

    start = time.perf_counter()
    groups = [table[i::jobs] for i in range(min(jobs, len(table)))]
    # one Inductor compile thread each: ``jobs`` processes already share the cores, and each one's default pool (a
    # worker per core) would hold ``jobs`` x cores processes in memory
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--warm", *(["--toy"] if toy else []),
                               "--only", ",".join(c.name for c in group)], env=env) for group in groups]
    stopped = 0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, seconds - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stopped += 1
    took = time.perf_counter() - start
    print(f"gpu_matrix: warm-up of {len(table)} rows in {len(groups)} processes took {took:.0f} s"
          f"{f', {stopped} stopped at --warm-s' if stopped else ''}", flush=True)
    return (f"a warm-up pass ({len(groups)} processes, {took:.0f} s"
            f"{f'; {stopped} stopped unfinished' if stopped else ''}), outside the timings")


#: A row's note that leaves it to be run again by ``--resume``.
UNFINISHED = ("not reached", "error:")


def earlier_rows(path: Path) -> tuple[list[str], dict[str, str], set[str]]:
    """An earlier results file's header lines (above its table), its rows by pattern, and the patterns it measured
    (the rows whose note is not ``UNFINISHED``), for ``--resume``; nothing where there is no such file."""
    if not path.exists():
        return [], {}, set()
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("| pattern |")), len(lines))
    rows, measured = {}, set()
    for line in lines[start + 2:]:
        cells = line.split(" | ")
        if not line.startswith("| ") or len(cells) != len(COLUMNS):
            continue
        name = cells[0].strip("| ")
        rows[name] = line
        if not cells[-1].rstrip(" |").startswith(UNFINISHED):
            measured.add(name)
    return lines[:start], rows, measured


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU, the Triton interpreter, toy sizes")
    ap.add_argument("--only", default=None, help="comma-separated pattern names")
    ap.add_argument("--list", action="store_true", help="print the patterns and their sizes, run nothing")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no pattern after this many seconds (default 420 on a GPU, none with --toy)")
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/gpu-matrix-<gpu>-<date>.md)")
    ap.add_argument("--warm-jobs", type=int, default=0,
                    help="first compile every row's kernels in this many processes at once (each timing one call, "
                         "no simulator), so that the timed pass finds attnc's, Triton's and Inductor's caches warm")
    ap.add_argument("--warm-s", type=float, default=180.0, help="stop the warm-up processes after this many seconds")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows the results file (--out) already measured; run the others")
    ap.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)  # one warm-up process
    args = ap.parse_args(argv)
    table = cases(args.toy)
    if args.only:  # in the order given: a run cut short by its budget has the rows asked for first
        wanted = list(dict.fromkeys(n.strip() for n in args.only.split(",") if n.strip()))
        by_name = {c.name: c for c in table}
        unknown = [n for n in wanted if n not in by_name]
        if unknown:
            print(f"gpu_matrix: unknown pattern(s) {', '.join(unknown)} (--list names them)", file=sys.stderr)
            return 2
        table = [by_name[n] for n in wanted]
    if args.list:
        for c in table:
            print(f"{c.name}: {'x'.join(map(str, c.grid.values())) if c.grid else c.n} tokens, {c.params}")
        return 0
    if not args.toy and not torch.cuda.is_available():
        print("gpu_matrix: no CUDA device (run with --toy on a CPU)", file=sys.stderr)
        return 2
    if args.toy:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    device = torch.device("cpu" if args.toy else "cuda")
    dtype = torch.float32 if args.toy else torch.bfloat16
    heads, head_dim = (2, 16) if args.toy else (HEADS, HEAD_DIM)
    hw = suite._hardware_name()
    gpu = "toy" if args.toy else torch.cuda.get_device_name().replace(" ", "-").lower()
    out = Path(args.out or suite.ROOT / "benchmarks" / "results" / f"gpu-matrix-{gpu}-{datetime.date.today()}.md")
    import triton

    head = [f"# Every stdlib pattern against the alternatives ({datetime.date.today()}, {gpu})", "",
            f"`python benchmarks/gpu_matrix.py{' --toy' if args.toy else ''}`; torch {torch.__version__}, Triton "
            f"{triton.__version__}, Python {platform.python_version()}; {str(dtype).replace('torch.', '')}, batch 1, "
            f"{heads} heads, head dim {head_dim}; simulator model: {hw}"
            + ("; toy sizes in the interpreter: the times prove the run, not a speed" if args.toy else "") + ".", "",
            "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    if args.warm:
        return warm_up_worker(table, toy=args.toy, device=device, dtype=dtype, heads=heads, head_dim=head_dim, hw=hw)
    order = [c.name for c in cases(args.toy)]  # the file's order; a resumed file keeps rows --only leaves out
    earlier_head, rows, kept = earlier_rows(out) if args.resume else ([], {}, set())
    table = [c for c in table if c.name not in kept]
    order += [name for name in rows if name not in order]  # an earlier row of another pattern list stays too
    warmed = warm_up(table, args.warm_jobs, args.warm_s, toy=args.toy) if args.warm_jobs > 0 and table else None
    if warmed:
        head[2] = head[2][:-1] + f"; compiled first in {warmed}."
    if earlier_head:  # the earlier runs' lines, then this run's
        head = [*earlier_head[:-1], f"Resumed: {head[2]} {len(kept)} rows kept, {len(table)} run.", "", *head[-2:]]
    lines = list(head)
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = suite.Budget(args.budget_s if args.budget_s is not None else math.inf if args.toy else 420.0)
    failed = 0
    for case in table:
        if not budget.left(case.name):
            rows[case.name] = format_row({"pattern": case.name, "notes": ["not reached: --budget-s spent"]})
        else:
            try:
                row = measure(case, toy=args.toy, device=device, dtype=dtype, heads=heads, head_dim=head_dim, hw=hw)
            except Exception as err:  # noqa: BLE001 - recorded in its row, the run goes on
                failed += 1
                row = {"pattern": case.name, "notes": [f"error: {type(err).__name__}: {str(err)[:200]}"]}
                traceback.print_exc()
            rows[case.name] = format_row(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(rows[case.name], flush=True)
        # complete after every row, in the table's order (a resumed run's rows among the kept ones)
        out.write_text("\n".join([*lines, *(rows[n] for n in order if n in rows)]) + "\n", encoding="utf-8")
    print(f"gpu_matrix: {len(table)} rows, {failed} failed; {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
