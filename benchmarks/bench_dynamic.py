"""CPU benchmark: run-time selection (routes chosen per call from q and k) against FlexAttention.

    python benchmarks/bench_dynamic.py [--quick] [--n 16384] [--heads 4] [--repeat 5]
        [--cases token_topk,moba,...] [--out benchmarks/results/dynamic-cpu-DATE.md]

Cost on a 2-core CPU: ``--quick`` (2,048 tokens, 3 rounds, all 4 cases) took 116 s wall, 66 s CPU
(2026-11-25, load average 6.5-7 from other jobs; about a minute on an idle machine). The full run
(16,384 tokens, 5 rounds, 4 cases) takes about 20-25 minutes on an idle machine, twice that under
load (estimated from the recorded runs: 1,189 s for 4 cases at ``--repeat 3``, before the warm-up
round was dropped); the script prints its estimate first. Every call of every column costs O(N^2) at
a fixed density: at 16K tokens a Flex call builds its BlockMask from the 1 GiB selected mask
(``create_block_mask`` evaluates all 268M pairs per head, 15-25 s a call here) and an attnc call
selects and attends in 4-15 s, so a case is about 45 s per round, and each case also materialises
its selected mask once (O(N^2) through the reference rule).

Per case (fp32, batch 1, head dim 64, forward under ``no_grad``: FlexAttention has no CPU backward),
in one process, interleaved rounds after the check (whose calls warm every column up:
``bench_flex.interleaved``), the median:

- attnc ``backend="auto"`` and ``"cpu"``: the whole call, whose selection runs inside it every call;
  beside it the selection alone (attnc's routing step ``route_plan``, or the derived-input step for
  a selection lowered to per-token flags, timed by wrapping it during the attnc rounds);
- FlexAttention given the selection for free: a ``create_block_mask`` from this call's selected mask
  (materialised once, before timing, by ``attnc.materialize_mask(q=, k=)``: the same rule) and the
  compiled ``flex_attention``, both every call, as a user rebuilding the BlockMask per call does. Its
  own selection code would come on top; it is not counted, so the comparison favours Flex.

attnc's output is checked against Flex's before timing. ``attnc / Flex`` < 1: attnc faster.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch

import attnc
from attnc.runtime.plan import clusters, routing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_flex import StepTimer, emit, interleaved  # noqa: E402

D = 64

#: name -> (stdlib pattern, params at 16,384 tokens): selections that stay sparse at 16K tokens;
#: the token counts among them scale with --n (``params``), so that --quick keeps the densities
CASES = {
    "token_topk": ("stdlib:token_topk", {"topk": 1024}),
    "moba": ("stdlib:moba", {"block": 1024, "topk": 4}),
    "xattention": ("stdlib:xattention", {}),
    "vertical_slash": ("stdlib:vertical_slash", {}),
}
#: the parameters that count tokens (scaled by n / 16,384); vertical_slash's defaults at 16K are
#: 1,000 columns and 6,096 diagonals
SCALED = {"token_topk": {"topk": 1024}, "moba": {"block": 1024}, "vertical_slash": {"vertical": 1000, "slash": 6096}}
FULL_N = 16384
QUICK = {"n": 2048, "repeat": 3}
#: wall seconds per case and round at 16,384 tokens on an idle 2-core CPU (attnc auto + cpu + Flex's
#: BlockMask and kernel; the recorded runs, benchmarks/results/dynamic-cpu-2026-11-23.md), and per
#: case besides the rounds (compiling, attnc's first plans)
ROUND_S_16K, CASE_S = 45.0, 10.0


def params(name: str, n: int) -> dict:
    """The case's parameters at ``n`` tokens: the token counts of ``SCALED`` times n / 16,384."""
    out = dict(CASES[name][1])
    if n != FULL_N:
        out.update({key: max(1, round(value * n / FULL_N)) for key, value in SCALED.get(name, {}).items()})
    return out


def estimate_s(n: int, cases: int, repeat: int, heads: int = 4) -> float:
    """Rough wall time on an idle 2-core CPU: per case, the selected mask (about one round) and
    ``repeat`` + 1 rounds (the check, then the timed rounds), each O(heads N^2)."""
    return cases * ((repeat + 2) * ROUND_S_16K * heads / 4 * (n / FULL_N) ** 2 + CASE_S)


def run_case(name: str, n: int, heads: int, repeat: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    spec, params_ = CASES[name][0], params(name, n)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, D, generator=g) for _ in range(3))
    selected = attnc.materialize_mask(spec, n=n, heads=heads, q=q, k=k, **params_)  # [1, H, n, n]
    density = float(selected.float().mean())
    flex = torch.compile(flex_attention)

    def flex_call():
        bm = create_block_mask(lambda b, h, qi, ki: selected[0, h, qi, ki], 1, heads, n, n, device="cpu")
        return flex(q, k, v, block_mask=bm)

    mods = {b: attnc.compile_attention(spec, backend=b, **params_) for b in ("auto", "cpu")}
    with torch.no_grad():
        # the check: the first call of every column (Flex compiles, attnc plans), so no warm-up round
        want = flex_call()
        errs = {b: float((m(q, k, v) - want).abs().max()) for b, m in mods.items()}
        steps = [(routing, "route_plan"), (clusters, "derive_inputs")]
        with StepTimer(steps) as timer:
            selection = []  # seconds in the selection steps, per auto call

            def auto_call():
                before = sum(timer.seconds)
                mods["auto"](q, k, v)
                selection.append(sum(timer.seconds) - before)

            times = interleaved({"auto": auto_call, "cpu": lambda: mods["cpu"](q, k, v), "flex": flex_call}, repeat,
                                warmup=False)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    return {"name": name, "params": params_, "density": density, "errs": errs, "med": med,
            "select": statistics.median(selection), "chosen": str(getattr(mods["auto"], "chosen_backend", "-"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK['n']:,} tokens, {QUICK['repeat']} rounds (the selections' token counts scaled "
                         "alike): about a minute")
    ap.add_argument("--n", type=int, default=None, help=f"tokens (default {FULL_N:,}; --quick {QUICK['n']:,})")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=None, help=f"timed rounds (default 5; --quick {QUICK['repeat']})")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.n = args.n or (QUICK["n"] if args.quick else FULL_N)
    args.repeat = args.repeat or (QUICK["repeat"] if args.quick else 5)
    unknown = [c for c in args.cases.split(",") if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    guess = estimate_s(args.n, len(args.cases.split(",")), args.repeat, args.heads)
    print(f"bench_dynamic: {len(args.cases.split(','))} case(s) at {args.n:,} tokens, {args.repeat} rounds: about "
          f"{guess / 60:.0f} min on an idle 2-core CPU (more under load)" if guess >= 90 else
          f"bench_dynamic: about {guess:.0f} s on an idle 2-core CPU (more under load)", flush=True)
    if guess > 600:
        print("bench_dynamic: that is long: Ctrl-C and run --quick (about a minute), or fewer --cases / --repeat",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    lines = [f"# Run-time selection on CPU: attnc against FlexAttention ({datetime.date.today().isoformat()})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
             f"Python {platform.python_version()}, torch {torch.__version__}",
             f"- load average {os.getloadavg()[0]:.1f} at start",
             f"- `benchmarks/bench_dynamic.py --n {args.n} --heads {args.heads} --repeat {args.repeat} "
             f"--cases {args.cases}`",
             f"- fp32, batch 1, head dim {D}, {args.heads} heads, {args.n} tokens, forward (no grad); ms: medians of "
             f"{args.repeat} interleaved rounds after the check (which warms every column up)",
             "- Flex: a new create_block_mask from this call's selected mask + compiled flex_attention, every call; "
             "its selection is given for free (not timed)", "",
             "| case | density | attnc auto | of which selection | attnc cpu | Flex (mask + kernel) | auto / Flex | "
             "cpu / Flex | max abs diff vs Flex (auto, cpu) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name in args.cases.split(","):
        print(f"[{time.perf_counter() - start:6.0f} s] {name}", flush=True)
        r = run_case(name, args.n, args.heads, args.repeat)
        m = r["med"]
        lines.append(f"| {name} {r['params'] or '(defaults)'} | {r['density']:.4f} | {m['auto'] * 1e3:,.0f} "
                     f"({r['chosen']}) | {r['select'] * 1e3:,.0f} | {m['cpu'] * 1e3:,.0f} | {m['flex'] * 1e3:,.0f} | "
                     f"{m['auto'] / m['flex']:.2f} | {m['cpu'] / m['flex']:.2f} | "
                     f"{r['errs']['auto']:.1e}, {r['errs']['cpu']:.1e} |")
    lines += ["", f"- total {time.perf_counter() - start:.0f} s; load average {os.getloadavg()[0]:.1f} at the end"]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
