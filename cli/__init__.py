"""The ``attnc`` command: list, check, show, sim. Every user error is one clean
message and exit status 1; no traceback reaches the user."""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..core.errors import SpecError
from .args import (
    CHECK_GPU_DEFAULT_N,
    CHECK_GPU_MAX_TOKENS,
    Parser,
    SaidAs,
    call_inputs,
    check_kv_heads,
    int_list,
    int_sizes,
    load_args,
    pattern_args,
    read_file,
    sampled_inputs,
    shape_args,
    tile_arg,
    tokens_of,
)
from .output import print_json as _print_json
from .refusals import refuse_bucketed as _refuse_bucketed
from .refusals import refuse_combined as _refuse_combined
from .refusals import refuse_kv_cache as _refuse_kv_cache
from .show import SHOW_DEFAULT_N, cmd_show


def first_pattern(pat):
    """A combined pattern's first branch (its sizes are every branch's), else the pattern itself."""
    from ..core import ir

    return pat.branches[0].pattern if isinstance(pat, ir.CombinedIR) else pat


def cmd_list(args) -> int:
    from ..spec.library import stdlib_index

    index = stdlib_index()
    names = getattr(args, "names", None) or []
    if names:  # one pattern in full: its header (paper, code matched, rule) and its declaration
        entries = []
        for i, name in enumerate(names):
            found = index.get(name.removeprefix("stdlib:"))
            if found is None:
                from ..core.errors import did_you_mean

                raise SpecError(f"no stdlib pattern '{name}'", where="argument NAME",
                                hint=did_you_mean(name, list(index)) or "attnc list shows them all")
            module, decl = found
            lines = module.source.splitlines()
            end = next((j for j in range(decl.pos.line, len(lines)) if lines[j].strip().startswith(
                ("pattern ", "recurrence "))), len(lines))
            text = "\n".join(lines[_header_start(lines, decl.pos.line):end]).rstrip()
            entries.append({**_list_entry(name.removeprefix("stdlib:"), module, decl), "source": text})
            if not args.json:
                print(("\n" if i else "") + text)
        if args.json:
            _print_json({"patterns": entries})
        return 0
    if args.json:
        _print_json({"patterns": [_list_entry(name, module, decl) for name, (module, decl) in sorted(index.items())]})
        return 0
    width = max(map(len, index))
    for name, (module, decl) in sorted(index.items()):
        summary = _summary(module.source, decl.pos.line)
        params = ", ".join(p.name + ("" if p.default is None else f"={_fmt(p.default)}") for p in decl.params)
        print(f"{name:{width}s} {decl.kind:10s} {summary}" + (f"  ({params})" if params else ""))
    return 0


def _list_entry(name: str, module, decl) -> dict:
    """``attnc list --json``: one stdlib pattern (keys: name, kind, summary, params)."""
    return {"name": name, "kind": decl.kind, "summary": _summary(module.source, decl.pos.line),
            "params": [{"name": p.name, "default": p.default} for p in decl.params]}


def _header_start(lines: list[str], decl_line: int) -> int:
    """The index of the first line of the comment block just above line ``decl_line`` (1-based)."""
    start = decl_line - 1
    while start > 0 and lines[start - 1].strip().startswith("#"):
        start -= 1
    return start


def _fmt(v) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def _summary(source: str, decl_line: int) -> str:
    """The first sentence of the file's header comment (it may run over several lines, up to one
    ending with '.'): what the pattern is."""
    words: list[str] = []
    for line in source.splitlines()[: decl_line - 1]:
        line = line.strip()
        text = line.lstrip("# ").strip() if line.startswith("#") else ""
        if not text:
            if words:
                break
            continue
        words.append(text)
        if text.endswith("."):
            break
    return " ".join(words)


def cmd_check(args) -> int:
    from ..core.errors import Pos
    from ..spec.library import check_text, read_source

    status = 0
    results = []
    for path in args.files:
        shown = path
        try:
            text, filename = read_source(path, where=path) if path.startswith("stdlib:") else read_file(path)
            shown = path if path.startswith("stdlib:") else filename  # the name as the user gave it
            decls = check_text(text, filename)
            if not decls:  # nothing to show, simulate or compile: every other command would refuse it
                raise SpecError("declares no pattern or recurrence", Pos(1, 1),
                                filename=filename, source=text,
                                hint="a file declares at least one: pattern NAME / tokens seq / mask ...")
            names = ", ".join(d.name for d in decls)
            warnings = [f"'{decl.name}' declares input '{name}' but no clause reads it (a call would still have "
                        "to pass it)" for decl in decls for name in _unused_inputs(decl)]
            results.append({"file": shown, "ok": True, "declarations": [{"name": d.name, "kind": d.kind}
                                                                        for d in decls],
                            "warnings": warnings, "errors": []})
            if not args.json:
                print(f"{shown}: ok ({len(decls)} declaration{'s' if len(decls) != 1 else ''}: {names})")
                for warning in warnings:
                    print(f"{shown}: warning: {warning}")
        except SpecError as err:
            status = 1
            results.append({"file": shown, "ok": False, "declarations": [], "warnings": [],
                            "errors": [_error_entry(e) for e in _each_error(err)]})
            if not args.json:
                print(err.render(), file=sys.stderr)
    if args.json:
        _print_json({"files": results})
    return status


def _each_error(err: SpecError) -> list[SpecError]:
    """The errors one SpecError reports (``attnc check`` gathers every misspelt name into one)."""
    return list(getattr(err, "errors", None) or [err])


def _error_entry(err: SpecError) -> dict:
    """``attnc check --json``: one error (keys: message, line, col, hint, where)."""
    return {"message": err.message, "line": err.pos.line if err.pos else None,
            "col": err.pos.col if err.pos else None, "hint": err.hint, "where": err.where}


def _unused_inputs(decl) -> list[str]:
    """Declared call-time inputs that none of the declaration's clauses reads."""
    if not decl.inputs:
        return []
    import sympy

    from ..compiler.analysis.evaluate import input_names
    from ..core import ir

    if isinstance(decl, ir.BucketedIR):  # its one input is the centroids, read by the route
        return []
    if isinstance(decl, ir.CombinedIR):  # the gates are read by 'combine'; the rest by some branch
        unused = set.intersection(*(set(_unused_inputs(b.pattern)) | {d.name for d in decl.inputs
                                                                     if d not in b.pattern.inputs}
                                    for b in decl.branches))
        return [d.name for d in decl.inputs if d.name in unused and d not in decl.gates]
    if isinstance(decl, ir.RecurrenceIR):
        used = {decl.decay} if isinstance(decl.decay, str) else set(input_names(decl.decay))
        used |= set(decl.rates)
    else:
        exprs = [decl.mask, decl.bias, decl.softcap, decl.route.keep if decl.route is not None else None]
        used = set().union(*(input_names(e) for e in exprs if isinstance(e, sympy.Basic)))
        if decl.decay is not None:
            used.add(decl.decay if isinstance(decl.decay, str) else "")
        used |= {d.derived[2] for d in decl.inputs  # cluster(q, C) reads C, relative(E, r) reads E
                 if d.derived is not None and d.derived[0] in ("cluster", "relative")}
        if decl.route is not None:  # a route's indexer inputs and given block scores
            used |= set(decl.route.inputs)
    return [d.name for d in decl.inputs if d.name not in used]


def cmd_sim(args) -> int:
    from ..core import ir
    from ..runtime.api import simulate

    pat = load_args(args)
    _refuse_bucketed(pat, "sim")
    decode = _decode_step(pat, args) if args.decode else None
    if decode is None:
        _refuse_kv_cache(pat, args, "sim")
    if decode is not None:  # the prefill beside it: the whole sequence of nk tokens
        args = argparse.Namespace(**{**vars(args), "n": args.nk, "nk": None})
    if isinstance(pat, ir.CombinedIR) and (args.layers is not None or args.ranks is not None):
        what = "--layers" if args.layers is not None else "--ranks"
        raise SpecError(f"'{pat.name}' combines several attentions: {what} ("
                        + ("the receptive field" if what == "--layers" else "context parallelism")
                        + ") covers one softmax pattern in this version", where=f"argument {what}")
    check_kv_heads(args)
    if args.kv_heads is not None and isinstance(pat, ir.RecurrenceIR) and args.kv_heads != args.heads:
        raise SpecError("a recurrence's cost model has one K/V head per query head", where="argument --kv-heads")
    sizes = int_sizes(args.sizes, first_pattern(pat))
    first = pat.branches[0].pattern if isinstance(pat, ir.CombinedIR) else pat
    queries = getattr(first, "queries", None)  # a recurrence: a sequence
    if args.n is None and (queries is None or queries.token_count() is None):  # a sequence: how long?
        raise SpecError(f"'{pat.name}' runs over a sequence: its length is not known", where="argument --n",
                        hint="give the number of tokens, e.g. --n 8192 (attnc show draws 32 when not given)")
    inputs = sampled_inputs(pat, args, sizes, call_inputs(args.input))
    rep = simulate(pat, n=args.n, nk=args.nk, sizes=sizes or None, heads=args.heads, head_dim=args.head_dim,
                   batch=args.batch, hardware=args.hardware or "h100", dtype=args.dtype, top=args.top,
                   q_tile=tile_arg(args.q_tile, "--q-tile"), kv_tile=tile_arg(args.kv_tile, "--kv-tile"),
                   inputs=inputs or None, kv_heads=args.kv_heads)
    if args.layers is not None and rep.to_dict().get("kind") == "recurrence":
        raise SpecError("a recurrence has no receptive-field analysis (every earlier token reaches a query)",
                        where="argument --layers")
    rf = _receptive_field(pat, rep, args, sizes) if args.layers is not None else None
    cp = _context_parallel(pat, rep, args, sizes, inputs) if args.ranks is not None else None
    step = decode(sizes, inputs) if decode is not None else None
    if args.json:
        import json

        data = rep.to_dict()
        if rf is not None:
            data["receptive_field"] = rf
        if cp is not None:
            data["context_parallel"] = cp.to_dict()
        if step is not None:
            data["decode"] = step.to_dict()
        print(json.dumps(data, indent=2, default=str))
    else:
        print(rep)
        if rf is not None:
            print(_format_receptive_field(rf))
        if cp is not None:
            print(cp)
        if step is not None:
            print()
            print(step)
    return 0


def _decode_step(pat, args):
    """``sim --decode --nk N [--n Q]``: its arguments checked before anything is modelled, and the
    decode report to make once the prefill's sizes and inputs are known (``runtime.api.simulate_decode``;
    the sampled inputs are sized for the whole sequence of nk tokens, as a decode step reads them)."""
    from ..compiler.cost.decode_cost import recurrence_state_bytes
    from ..core import ir
    from ..core.recurrence_rules import RULES
    from ..runtime.api import simulate_decode

    if isinstance(pat, ir.RecurrenceIR):
        rows = RULES[pat.rule].state_rows
        state = recurrence_state_bytes(*(max(v, 0) for v in (args.batch, args.heads, args.head_dim)), rows)
        raise SpecError(f"'{pat.name}' is a recurrence: a decode step reads and writes its fp32 state "
                        f"(batch x heads x {f'{rows} ' if rows > 1 else ''}head_dim x head_dim: {state:,} bytes) "
                        "whatever the length, not a KV cache", where="argument --decode",
                        hint="the recurrence's prefill cost: attnc sim without --decode")
    if isinstance(pat, ir.CombinedIR):
        raise SpecError(f"'{pat.name}' combines several attentions: --decode bounds one softmax pattern",
                        where="argument --decode", hint="simulate each branch's pattern")
    if not pat.self_attention:
        raise SpecError(f"'{pat.name}' is a cross attention: its keys do not grow as tokens are decoded",
                        where="argument --decode", hint="--decode bounds a self-attention's KV-cache reads")
    if args.nk is None:
        raise SpecError("--decode needs the KV cache's length", where="argument --nk",
                        hint="--nk N: the keys cached, the new queries' included")
    n = 1 if args.n is None else args.n
    for flag, value in (("--n", n), ("--nk", args.nk)):
        if value < 1:
            raise SpecError(f"must be a positive int, got {value}", where=f"argument {flag}")
    if args.nk < n:
        raise SpecError(f"{args.nk} keys but {n} queries: the queries are the last n of the nk tokens",
                        where="argument --nk", hint="--nk at least --n")

    def make(sizes: dict, inputs: dict):
        return simulate_decode(pat, nk=args.nk, n=n, sizes=sizes or None, heads=args.heads,
                               head_dim=args.head_dim, batch=args.batch, hardware=args.hardware,
                               dtype=args.dtype, kv_heads=args.kv_heads, inputs=inputs or None)

    return make


def _context_parallel(pat, rep, args, sizes, inputs):
    """``sim --ranks P [--link L]``: the context-parallel estimate per mode (runtime.parallel.simulate)."""
    from ..compiler.analysis import evaluate as E
    from ..runtime.parallel.simulate import simulate_parallel
    from ..runtime.plan import clusters

    if rep.to_dict().get("kind") == "recurrence":
        raise SpecError("a recurrence runs across ranks by chaining its state (one all-gather of a state per "
                        "rank); the estimate covers softmax patterns", where="argument --ranks")
    # the inputs the single-device simulation read: given or sampled, cluster ids derived from a sample
    bound = E.bind_sizes(pat, n=rep.n, heads=args.heads, sizes=sizes or None, dk=args.head_dim)
    inputs, _ = clusters.sample_derived(pat, bound, dict(inputs or {}), args.head_dim)
    return simulate_parallel(pat, n=rep.n, ranks=args.ranks, link=args.link, sizes=sizes or None,
                             heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, batch=args.batch,
                             single_device_s=rep.best.forward_s, dtype=args.dtype, inputs=inputs or None)


def _receptive_field(pat, rep, args, sizes) -> dict:
    """Which key blocks a query block reaches within 1..L stacked layers (the pairs counted
    follow the layout: earlier keys on a sequence, every pair on a grid or a concatenation)."""
    from ..compiler.analysis import evaluate as E
    from ..compiler.analysis.receptive_field import receptive_field

    if args.layers < 1:
        raise SpecError(f"must be a positive int, got {args.layers}", where="argument --layers")
    block = tile_arg(args.rf_block, "--rf-block")
    if block is None:
        block = tuple(rep.to_dict()["tiles"]["q_tile"])
    bound = E.bind_sizes(pat, n=args.n, nk=args.nk, heads=args.heads, sizes=sizes or None)
    return receptive_field(pat, bound, block, args.layers, inputs=call_inputs(args.input) or None)


def _format_receptive_field(rf: dict) -> str:
    lines = [f"receptive field ({rf['granularity']} granularity, block {tuple(rf['block'])}, {rf['blocks']} blocks,"
             f" {rf['pairs']} pairs):"]
    for layer, cov in zip(rf["layers"], rf["coverage"], strict=True):
        lines.append(f"  {layer:3d} layer{'s' if layer != 1 else ' '}  {100 * cov:6.2f}% of pairs reached")
    full = rf["layers_for_full"]
    lines.append(f"  full coverage after {full} layers" if full is not None else "  full coverage is never reached")
    return "\n".join(lines)


def cmd_tune(args) -> int:
    from ..compiler.analysis import evaluate as E
    from ..core import ir
    from ..runtime.tuning import autotune as A
    from ..runtime.tuning import kernel_cache as KC

    pat = load_args(args)
    _refuse_bucketed(pat, "tune")
    _refuse_combined(pat, "attnc tune")
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is a recurrence: only softmax patterns are autotuned", where="attnc tune")
    check_kv_heads(args)
    dtype = A.canonical_dtype(args.dtype)
    if not A.cuda_available():
        raise A.AutotuneError("autotuning needs a CUDA GPU, and none is available",
                              hint="on CPU, kernels run with the simulator's schedule (no tuning needed)")
    bound = E.bind_sizes(pat, n=args.n, nk=args.nk, heads=args.heads, sizes=int_sizes(args.sizes) or None)
    cache = KC.KernelCache()
    res = A.autotune(pat, bound, head_dim=args.head_dim, dtype=dtype, batch=args.batch, top=args.top,
                     cache=cache, retune=args.retune, progress=False if args.quiet else None,
                     inputs=call_inputs(args.input) or None, kv_heads=args.kv_heads)
    bucket = KC.describe_bucket(KC.shape_bucket(pat, bound, head_dim=args.head_dim, batch=args.batch,
                                                kv_heads=args.kv_heads))
    if res.from_cache:
        print(f"{pat.name} [{bucket}, {dtype}, {res.key.device}]: cached: {KC.describe_config(A.config_dict(res.config))}"
              " (use --retune to time again)")
    else:
        print(f"{pat.name} [{bucket}, {dtype}, {res.key.device}]: {len(res.trials)} candidates")
        print("   (each timed as a training step: forward, then backward; * the winner)")
        for t in sorted(res.trials, key=lambda t: (t.measured_ms, t.rank)):
            measured = f"{t.measured_ms:9.4f} ms" if t.error is None else "   failed   "
            predicted = f"{t.predicted_ms:.4f} ms" if t.predicted_ms == t.predicted_ms else "-"
            is_flex = t.backend == "flex"
            won = (res.winner == "flex") if is_flex else (res.winner != "flex" and t.rank == res.best_rank)
            name = "FlexAttention lowering" if is_flex else KC.describe_config(A.config_dict(t.config))
            print(f" {'*' if won else ' '} {name:28s} {measured}  (predicted {predicted})"
                  + (f"  {t.error}" if t.error else ""))
        if res.winner == "flex":
            print("   backend='auto' runs the FlexAttention lowering at these shapes; the cache keeps the best "
                  "Triton kernel for backend='triton'")
    print(f"cached in {res.source_path.parent}")
    return 0


def cmd_cache(args) -> int:
    from ..runtime.tuning import kernel_cache as KC

    cache = KC.KernelCache()
    problem = cache.problem()
    if problem is not None:
        raise SpecError(f"the kernel cache cannot be read: {problem}", where="environment ATTNC_CACHE_DIR"
                        if os.environ.get("ATTNC_CACHE_DIR", "").strip() else f"the kernel cache {cache.root}",
                        hint="point ATTNC_CACHE_DIR at a directory")
    if args.action == "clear":
        removed = cache.clear()
        print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.dir}")
        if cache.not_removed:
            shown = ", ".join(cache.not_removed[:5]) + (f" and {len(cache.not_removed) - 5} more"
                                                         if len(cache.not_removed) > 5 else "")
            print(f"attnc cache: error: could not remove {len(cache.not_removed)} file"
                  f"{'' if len(cache.not_removed) == 1 else 's'}: {shown}", file=sys.stderr)
            return 1
        return 0
    entries = cache.entries()
    if not entries:
        print(f"no entries in {cache.dir}")
        return 0
    total = sum(e.size for e in entries)
    print(f"{cache.dir}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, {KC.human_size(total)}")
    print(f"{'DIGEST':12s} {'PATTERN':18s} {'SHAPE':34s} {'DTYPE':5s} {'DEVICE':20s} {'TRITON':8s} "
          f"{'CONFIG':24s} {'SIZE':>9s} {'AGE':>4s} STATUS")
    cell = KC.printable  # entries are files anyone may have edited: no escape codes reach the terminal
    for e in entries:
        f = e.fields
        print(f"{e.digest[:12]:12s} {cell(e.pattern or '?')[:18]:18s} {KC.describe_bucket(f.get('bucket'))[:34]:34s} "
              f"{cell(f.get('dtype', '?'))[:5]:5s} {cell(f.get('device', '?'))[:20]:20s} "
              f"{cell(f.get('triton', '?'))[:8]:8s} {KC.describe_config(e.config)[:24]:24s} "
              f"{KC.human_size(e.size):>9s} {KC.human_age(e.age_s):>4s} {cell(e.status)}")
    return 0


def cmd_emit(args) -> int:
    from ..core import ir
    from ..runtime.backends.triton.runner import emit

    if args.gpu is not None:  # elsewhere --gpu names a GPU model (sim); emit takes an architecture
        raise SpecError("emit takes the architecture to show the kernels of, not --gpu", where="argument --gpu",
                        hint="--arch 90 (or sm_80, sm_100): the kernels a CUDA call there launches, recorded and "
                             "compiled offline (no GPU needed)")
    pat = load_args(args)
    _refuse_bucketed(pat, "emit")
    _refuse_kv_cache(pat, args, "emit")
    arch = _arch(args.arch) if args.arch is not None else None
    if args.ptx and arch is None:
        raise SpecError("--ptx is the PTX compiled for an architecture", where="argument --ptx",
                        hint="add --arch 90 (or sm_80, sm_100)")
    if arch is not None or not isinstance(pat, ir.PatternIR):
        from .emit import emit_recorded

        return emit_recorded(args, pat, arch)
    _refuse_combined(pat, "argument FILE")
    sizes = int_sizes(args.sizes, pat)
    n = tokens_of(args, pat, SHOW_DEFAULT_N)
    print(emit(pat, n=n, nk=args.nk, heads=args.heads, sizes=sizes or None,
               q_tile=tile_arg(args.q_tile, "--q-tile"), kv_tile=tile_arg(args.kv_tile, "--kv-tile"),
               device="cpu", dk=args.head_dim), end="")
    return 0


def _arch(text: str) -> int:
    """``--arch 90``, ``sm_90`` or ``sm90``: one compute capability."""
    from ..runtime import gpu_check as G

    word = text.strip().lower().removeprefix("sm_").removeprefix("sm")
    if not word.isdigit() or int(word) not in G.SMEM_LIMIT:
        raise SpecError(f"unknown architecture {text!r}", where="argument --arch",
                        hint="one of " + ", ".join(f"sm_{a}" for a in G.SMEM_LIMIT))
    arch = int(word)
    if not G.targets_available(arch):
        raise SpecError(f"the installed Triton cannot compile for sm_{arch}", where="argument --arch")
    return arch


def cmd_check_gpu(args) -> int:
    from ..runtime import gpu_check as G

    pat = load_args(args)
    _refuse_bucketed(pat, "check-gpu")
    if args.block:  # a combined pattern's kernels are checked branch by branch; its blocks are not
        _refuse_combined(pat, "argument --block")
    archs = G.default_archs() if args.arch is None else int_list(args.arch, "--arch")
    dims = int_list(args.head_dim, "--head-dim")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    sizes = int_sizes(args.sizes)
    n = tokens_of(args, pat, CHECK_GPU_DEFAULT_N) if sizes == {} else args.n
    tokens = n if n is not None else math.prod(sizes.values())
    if tokens > CHECK_GPU_MAX_TOKENS:  # before anything is planned: its tile lists take about 512 bytes a token
        raise SpecError(f"{tokens} tokens is too many to plan for an offline compile (about {tokens * 512 / 2**30:.3g} "
                        f"GiB of tile lists; at most {CHECK_GPU_MAX_TOKENS})", where="argument --n" if n is not None else "argument --sizes",
                        hint="check at a smaller size (the default is the usual one)")
    if args.block and args.paged:
        raise SpecError("--block and --paged check different calls: pass one", where="argument --paged")
    if args.paged:
        from ..runtime.gpu_paged_check import check_paged

        reports = check_paged(pat, archs=archs, head_dims=dims, dtypes=dtypes or ["fp16"], n=n, sizes=sizes or None)
    else:
        reports = G.check_pattern(pat, archs=archs, head_dims=dims, dtypes=dtypes or ["fp16"], n=n,
                                  sizes=sizes or None, block=args.block)
    if args.json:
        import json

        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print(G.table(reports))
        print(G.summary(reports))
    return 0 if all(r.ok for r in reports) else 1



def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="attnc", description="attnc: a compiler for attention patterns")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=Parser)
    p = sub.add_parser("list", help="the stdlib patterns, one line each; with names, each one in full")
    p.add_argument("names", nargs="*", metavar="NAME", help="show these patterns' headers and declarations")
    p.add_argument("--json", action="store_true", help="print the patterns as JSON (keys: name, kind, summary, "
                   "params; with NAMEs, source too)")
    p = sub.add_parser("check", help="parse and check .attn files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print one JSON document (files: file, ok, declarations, "
                   "warnings, errors with message, line, col, hint, where)")
    p = sub.add_parser("show", help="draw the mask of a pattern at a small size")
    pattern_args(p, sizes_help="grid sizes (default 8 per axis)",
                  n_help=f"number of tokens of a seq layout (default {SHOW_DEFAULT_N})")
    p.add_argument("--heads", type=int, help="number of heads (head-dependent patterns show each)")
    p.add_argument("--png", metavar="PATH.png", help="write the mask (or tile map, or query's keys) as a PNG picture")
    p.add_argument("--tiles", action="store_true", help="draw tile classes: # full, + partial, . empty")
    p.add_argument("--q-tile", metavar="A,B,..", help="Q tile extents per axis (implies --tiles)")
    p.add_argument("--kv-tile", metavar="A,B,..", help="KV tile extents per axis (implies --tiles)")
    p.add_argument("--query", metavar="A,B,..", help="draw one query's keys on the grid instead: its coordinates, one "
                   "per grid axis (a 3-D grid: one slice per frame); with --png a picture with axes and a legend")
    p.add_argument("--json", action="store_true", help="print the mask (or tile map, or query's keys) as JSON")
    p = sub.add_parser("sim", help="predict the speedup bounds and the best tile schedules (recurrences: "
                       "FLOPs, bytes, chunk size and the length past which they beat softmax)")
    pattern_args(p)
    shape_args(p)
    p.add_argument("--hardware", "--gpu", dest="hardware", metavar="NAME", action=SaidAs,
                   help="a100, h100, h200 or b200 (default h100; --decode: every model)")
    p.add_argument("--dtype", default="bf16", help="bf16 or fp16 (default bf16)")
    p.add_argument("--decode", action="store_true", help="also bound one decode step: --n queries (default 1) "
                   "after a KV cache of --nk keys (bytes, keys visited, bandwidth bound, split-KV, tokens/s); "
                   "the prediction above it is the prefill of the nk tokens")
    p.add_argument("--q-tile", metavar="A,B,..", help="force the Q tile extents per axis (a recurrence: its chunk)")
    p.add_argument("--kv-tile", metavar="A,B,..", help="force the KV tile extents per axis")
    p.add_argument("--top", type=int, default=5, help="schedules to list (default 5)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--layers", type=int, metavar="L", help="also report the receptive field over 1..L stacked layers")
    p.add_argument("--rf-block", metavar="A,B,..", help="block shape of the receptive field (default: the Q tile)")
    p.add_argument("--ranks", type=int, metavar="P", help="also estimate context parallelism over P ranks "
                   "(bytes and compute per rank, per mode, and the best mode)")
    p.add_argument("--link", default="nvlink", choices=["nvlink", "pcie", "ib"],
                   help="the interconnect of --ranks (data-sheet bandwidth; default nvlink)")
    p = sub.add_parser("tune", help="autotune a pattern on the current GPU and fill the kernel cache")
    pattern_args(p)
    shape_args(p)
    p.add_argument("--dtype", default="bf16", help="bf16, fp16 or fp32 (default bf16)")
    p.add_argument("--top", type=int, default=4, help="distinct schedules of the simulator to time (default 4)")
    p.add_argument("--retune", action="store_true", help="time again even when the cache has a winner")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("cache", help="the kernel cache ($ATTNC_CACHE_DIR): ls or clear")
    p.add_argument("action", nargs="?", default="ls", choices=("ls", "clear"), help="ls (default) or clear")
    p = sub.add_parser("emit", help="print the generated Triton kernel source (a recurrence: its Triton kernels)")
    pattern_args(p, n_help=f"number of tokens of a seq layout (default {SHOW_DEFAULT_N}; with --arch or a "
                 f"recurrence {CHECK_GPU_DEFAULT_N}, as check-gpu)", inputs=False)
    p.add_argument("--heads", type=int, default=1, help="number of heads (default 1)")
    p.add_argument("--q-tile", metavar="A,B,..", help="Q tile extents per axis")
    p.add_argument("--kv-tile", metavar="A,B,..", help="KV tile extents per axis")
    p.add_argument("--arch", metavar="90|sm_90", help="the kernels a CUDA call on this architecture launches, at "
                   "the schedule the search picks for it (recorded offline as check-gpu does; no GPU needed); "
                   "default: the interpreter's schedule")
    p.add_argument("--ptx", action="store_true", help="with --arch: each kernel compiled offline, as PTX")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128): with --arch, the "
                   "call's; else what sizes an input declared over dk")
    p.add_argument("--dtype", default="fp16", help="with --arch: fp16, bf16 or fp32 (default fp16)")
    p.add_argument("--gpu", nargs="?", const="", help=argparse.SUPPRESS)  # refused with a hint: see --arch
    p = sub.add_parser("check-gpu", help="compile the CUDA kernels of a pattern offline (no GPU) for sm_80/sm_90: "
                       "shared memory, registers, spills, tensor-core instructions; exit 1 on a problem")
    pattern_args(p, n_help=f"number of tokens of a seq layout (default {CHECK_GPU_DEFAULT_N})", inputs=False)
    p.add_argument("--arch", metavar="80,90", help="compute capabilities (default 80,90 and 100 when supported)")
    p.add_argument("--head-dim", default="64,128", metavar="64,128", help="head dims (default 64,128)")
    p.add_argument("--dtype", default="fp16", metavar="fp16,bf16", help="dtypes (default fp16)")
    p.add_argument("--json", action="store_true", help="print the reports as JSON")
    p.add_argument("--block", action="store_true", help="the kernels of a context-parallel block (offsets as "
                   "run-time arguments; the lse's and the score inputs' gradients) instead of the whole sequence's")
    p.add_argument("--paged", action="store_true", help="the kernels of one launch over a paged KV cache (a decode "
                   "batch of rows of their own lengths, N keys of capacity) instead of the whole sequence's")
    return parser


#: The flags whose value may start with a minus (a query's coordinate counted from the end: ``--query -1,2``)
NEGATIVE_VALUE_FLAGS = ("--query",)


def _negative_values_joined(argv: list[str]) -> list[str]:
    """``--query -1,2`` as ``--query=-1,2``: argparse takes a value starting with a minus for a flag of its own
    (a lone negative number it would take; a list it refuses with "expected one argument")."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] in NEGATIVE_VALUE_FLAGS and arg[:1] == "-" and arg[1:2].isdigit():
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    import contextlib
    import io

    args = None
    out = io.StringIO()
    try:
        args = build_parser().parse_args(_negative_values_joined(sys.argv[1:] if argv is None else argv))
        if args.version:
            from ..core.version import __version__

            print(f"attnc {__version__}")
            return 0
        if args.command is None:
            build_parser().print_help()
            return 1
        handler = {"list": cmd_list, "check": cmd_check, "show": cmd_show, "sim": cmd_sim, "tune": cmd_tune,
                   "cache": cmd_cache, "emit": cmd_emit, "check-gpu": cmd_check_gpu}[args.command]
        if args.command == "tune":  # minutes of timing: its lines as they come
            return handler(args)
        # the output is written once the command succeeded: a note printed before an error would
        # describe a result that never came (and --json's stdout stays one document)
        with contextlib.redirect_stdout(out):
            status = handler(args)
        sys.stdout.write(out.getvalue())
        return status
    except SpecError as err:
        from .words import cli_error

        loaded = getattr(args, "loaded", None)
        names = {d.name for d in getattr(loaded, "inputs", ())}
        params = {item.split("=", 1)[0].strip() for group in getattr(args, "param", None) or ()
                  for item in str(group).split(",")}
        print(cli_error(err, names, getattr(args, "said", None), params).render(), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.stdout.write(out.getvalue())  # what was done before the interrupt
        print("attnc: interrupted", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 1
    except Exception as err:  # a bug in attnc, not the user's fault: still no traceback
        print(f"attnc: internal error: {type(err).__name__}: {err}", file=sys.stderr)
        print("please report this with the command and the spec file", file=sys.stderr)
        return 1

