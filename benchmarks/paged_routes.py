"""Routed decode steps over a paged KV cache (MoBA, Quest; token top-k and DeepSeek's indexer; NSA), against the same
step on a contiguous cache and SDPA over every key (recorded, not a timed test; a GPU run: issue 59's routed rows).

    python benchmarks/paged_routes.py [--toy] [--out FILE] [--rounds R] [--steps S] [--nk 4096,32768,131072]
                                      [--batch 1,16,64]

A step: one query per row after ``nk`` cached keys (every row the same length, so that the contiguous cache holds
them), 32 query heads over 8 K/V heads, d 128, bf16, pages of 16 keys in shuffled order. Methods, interleaved in a
rotated order in every round, each the median over ``--rounds`` rounds of ``--steps`` steps after a warm-up round:

- ``SDPA dense`` (the baseline): ``F.scaled_dot_product_attention`` over every cached key (``enable_gqa``);
- ``attnc contiguous + KeySummary``: the routed decode step on a ``[B, Hkv, nk, D]`` cache with its block summaries
  kept (``attnc.KeySummary``: a step summarises the keys after the last complete block);
- ``attnc paged``: one launch of ``attnc_fwd_paged`` after ``attnc_paged_summary`` and the selection's device ops
  (every cached key summarised at each step);
- ``attnc paged + KeySummary``: the same with each row's complete blocks' summaries kept.

A token route (``token_topk``: each query's 2,048 keys of highest ``q . k``; ``dsa``: DeepSeek's indexer, 64 index
heads of 128, top 2,048) has no summaries to keep: ``attnc contiguous`` and ``attnc paged`` (its scores by
``attnc_paged_token_scores`` through the block table, or from the indexer inputs, every cached key each step).

NSA (``nsa``: runs of 64, 16 selected blocks, a window of 512; gates per present query) runs one launch per branch
on the pages (``attnc paged``: the runs pooled from the pages, the compressed branch in torch, the selected and window
branches one ``attnc_fwd_paged`` each); ``attnc paged, by length`` is the path every paged nsa call took before,
each row's pages gathered into a contiguous cache and the module run once per distinct length (every row one
length here: once).

``max |diff|``: each attnc method's largest difference to the contiguous call's output (the same selection: bf16
rounding apart). Patterns: Quest (page 16, budget 4096), MoBA (block 512, top 8), token top-k and DSA (top 2,048),
NSA.

Cost on a GPU (an H100, estimated): 2-4 minutes for the defaults, most of it Triton's compiles (one module per
pattern and batch shape) and SDPA at 128K keys. ``--toy`` runs the same code on CPU tensors under Triton's
interpreter at toy sizes (about 30 s on 2 cores): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

PATTERNS = {"quest": {"page": 16, "token_budget": 4096}, "moba": {"block": 512, "topk": 8},
            "token_topk": {"topk": 2048}, "dsa": {"topk": 2048, "index_heads": 64, "index_dim": 128},
            "nsa": {"block": 64, "selected": 16, "window": 512}}
TOY_PATTERNS = {"quest": {"page": 4, "token_budget": 16}, "moba": {"block": 8, "topk": 2},
                "token_topk": {"topk": 5}, "dsa": {"topk": 5, "index_heads": 2, "index_dim": 4},
                "nsa": {"block": 4, "selected": 2, "window": 6}}
#: the patterns whose block summaries a ``KeySummary`` keeps across steps
SUMMARISED = ("quest", "moba")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU tensors, the interpreter, toy sizes")
    ap.add_argument("--out", default=None, help="write the tables to this Markdown file as they finish")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--nk", default="4096,32768,131072", help="cached keys per row")
    ap.add_argument("--batch", default="1,16,64", help="rows of the batch")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.toy:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.nn.functional as F

    import attnc

    toy = args.toy or not torch.cuda.is_available()
    if not args.toy and toy:
        print("no CUDA device: pass --toy for the CPU check", file=sys.stderr)
        return 2
    device, dtype = ("cpu", torch.float32) if toy else ("cuda", torch.bfloat16)
    hq, hkv, d, page = (4, 2, 8, 4) if toy else (32, 8, 128, 16)
    lengths = [40] if toy else [int(x) for x in args.nk.split(",")]
    batches = [2] if toy else [int(x) for x in args.batch.split(",")]
    rounds, steps = (1, 1) if toy else (args.rounds, args.steps)
    patterns = TOY_PATTERNS if toy else PATTERNS
    sync = (lambda: None) if toy else torch.cuda.synchronize
    lines = [f"# Routed decode steps over a paged KV cache ({datetime.date.today().isoformat()})", "",
             f"`python benchmarks/paged_routes.py {' '.join(sys.argv[1:] if argv is None else argv)}`; "
             f"{torch.cuda.get_device_name() if not toy else platform.machine() + ' (toy)'}, torch {torch.__version__}"
             f", {hq} query heads over {hkv} K/V heads, d {d}, {str(dtype).removeprefix('torch.')}, pages of {page}."
             " Median step time over rounds; ratios to SDPA dense in the same table.", ""]
    write(args.out, lines)
    g = torch.Generator(device=device).manual_seed(0)
    for name, params in patterns.items():
        for nk in lengths:
            for batch in batches:
                lines += case(torch, F, attnc, name, params, nk, batch, hq, hkv, d, page, device, dtype, g, rounds,
                              steps, sync)
                write(args.out, lines)
    print("\n".join(lines))
    return 0


def case(torch, F, attnc, name, params, nk, batch, hq, hkv, d, page, device, dtype, g, rounds, steps, sync):
    """One table: the four methods at ``nk`` keys and ``batch`` rows."""
    k = torch.randn(batch, hkv, nk, d, generator=g, device=device).to(dtype)
    v = torch.randn(batch, hkv, nk, d, generator=g, device=device).to(dtype)
    q = torch.randn(batch, hq, 1, d, generator=g, device=device).to(dtype)
    width = -(-nk // page)
    order = torch.randperm(batch * width, generator=g, device=device)
    table = order.view(batch, width).to(torch.int32)
    k_pool = torch.empty(batch * width, page, hkv, d, device=device, dtype=dtype)
    v_pool = torch.empty_like(k_pool)
    padded = width * page - nk
    for pool, cache in ((k_pool, k), (v_pool, v)):  # row b's keys in its pages, in table order
        rows = torch.nn.functional.pad(cache, (0, 0, 0, padded)).transpose(1, 2).reshape(batch * width, page, hkv, d)
        pool[table.view(-1).long()] = rows
    lengths = torch.full((batch,), nk, dtype=torch.int32, device=device)
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
    over_cap, over_n = call_inputs(torch, name, params, batch, hq, width * page, nk, g, device, dtype)
    kept_c, kept_p = attnc.KeySummary(), attnc.KeySummary()
    contiguous = "attnc contiguous + KeySummary" if name in SUMMARISED else "attnc contiguous"
    methods = {
        "SDPA dense": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        contiguous: (lambda: attn(q, k, v, key_summary=kept_c)) if name in SUMMARISED else (
            lambda: attn(q, k, v, **over_n)),
        "attnc paged": lambda: attn(q, k_pool, v_pool, block_table=table, cache_seqlens=lengths, layout="bhnd",
                                    **over_cap),
    }
    if name == "nsa":  # the path before one launch per branch: each row's pages gathered, once per length
        by_length = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)
        by_length._paged_server = None
        methods["attnc paged, by length"] = lambda: by_length(q, k_pool, v_pool, block_table=table,
                                                              cache_seqlens=lengths, layout="bhnd", **over_cap)
    if name in SUMMARISED:
        methods["attnc paged + KeySummary"] = lambda: attn(q, k_pool, v_pool, block_table=table,
                                                           cache_seqlens=lengths, layout="bhnd", key_summary=kept_p)
    with torch.no_grad():
        outs = {label: fn() for label, fn in methods.items()}  # the warm-up: compiles, plans, keeps
        times = {label: [] for label in methods}
        order = list(methods)
        for r in range(rounds):
            for label in order[r % len(order):] + order[:r % len(order)]:
                sync()
                start = time.perf_counter()
                for _ in range(steps):
                    methods[label]()
                sync()
                times[label].append((time.perf_counter() - start) / steps)
    base = statistics.median(times["SDPA dense"])
    ref = outs[contiguous].float()
    out = [f"## {name} {params}, {nk} keys, batch {batch}", "", "| method | ms per step | / SDPA dense | max |diff| |",
           "| --- | --- | --- | --- |"]
    for label, ts in times.items():
        med = statistics.median(ts)
        diff = "" if label == "SDPA dense" else f"{(outs[label].float() - ref).abs().max().item():.2e}"
        out.append(f"| {label} | {med * 1e3:.3f} | {med / base:.2f}x | {diff} |")
    return out + [""]


def call_inputs(torch, name, params, batch, hq, capacity, nk, g, device, dtype) -> tuple[dict, dict]:
    """A pattern's call-time inputs ``(for the paged call, for the contiguous one)``: DSA's indexer inputs over the
    table's capacity and over the contiguous cache's nk keys, per row ``qi`` ``[B, n, J, DI]``, ``ki`` ``[B, n, DI]``,
    ``w`` ``[B, n, J]`` (positive weights); NSA's gates of the present query, ``[B, Hq, 1]``, the same for both;
    none for other patterns."""
    if name == "nsa":
        gates = {gate: torch.rand(batch, hq, 1, generator=g, device=device).to(dtype)
                 for gate in ("g_cmp", "g_slc", "g_swa")}
        return gates, gates
    if name != "dsa":
        return {}, {}
    heads, dim = params["index_heads"], params["index_dim"]
    made = {"qi": torch.randn(batch, capacity, heads, dim, generator=g, device=device).to(dtype),
            "ki": torch.randn(batch, capacity, dim, generator=g, device=device).to(dtype),
            "w": torch.rand(batch, capacity, heads, generator=g, device=device).to(dtype)}
    return made, {key: t[:, :nk] for key, t in made.items()}


def write(path, lines) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
