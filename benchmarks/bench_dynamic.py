"""CPU benchmark: run-time selection (routes chosen per call from q and k) against FlexAttention.

    python benchmarks/bench_dynamic.py [--n 16384] [--heads 4] [--repeat 5] [--cases token_topk,moba,...]
        [--out benchmarks/results/dynamic-cpu-DATE.md]

Per case (fp32, batch 1, head dim 64, forward under ``no_grad``: FlexAttention has no CPU backward),
in one process, interleaved rounds after a warm-up (``bench_flex.interleaved``), the median:

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

#: name -> (stdlib pattern, params at --n): selections that stay sparse at 16K tokens
CASES = {
    "token_topk": ("stdlib:token_topk", {"topk": 1024}),
    "moba": ("stdlib:moba", {"block": 1024, "topk": 4}),
    "xattention": ("stdlib:xattention", {}),
    "vertical_slash": ("stdlib:vertical_slash", {}),
}


def run_case(name: str, n: int, heads: int, repeat: int) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    spec, params = CASES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, D, generator=g) for _ in range(3))
    selected = attnc.materialize_mask(spec, n=n, heads=heads, q=q, k=k, **params)  # [1, H, n, n]
    density = float(selected.float().mean())
    flex = torch.compile(flex_attention)

    def flex_call():
        bm = create_block_mask(lambda b, h, qi, ki: selected[0, h, qi, ki], 1, heads, n, n, device="cpu")
        return flex(q, k, v, block_mask=bm)

    mods = {b: attnc.compile_attention(spec, backend=b, **params) for b in ("auto", "cpu")}
    with torch.no_grad():
        want = flex_call()
        errs = {b: float((m(q, k, v) - want).abs().max()) for b, m in mods.items()}
        steps = [(routing, "route_plan"), (clusters, "derive_inputs")]
        with StepTimer(steps) as timer:
            selection = []  # seconds in the selection steps, per auto call

            def auto_call():
                before = sum(timer.seconds)
                mods["auto"](q, k, v)
                selection.append(sum(timer.seconds) - before)

            times = interleaved({"auto": auto_call, "cpu": lambda: mods["cpu"](q, k, v), "flex": flex_call}, repeat)
    med = {key: statistics.median(ts) for key, ts in times.items()}
    return {"name": name, "params": params, "density": density, "errs": errs, "med": med,
            "select": statistics.median(selection[1:]), "chosen": str(getattr(mods["auto"], "chosen_backend", "-"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    lines = [f"# Run-time selection on CPU: attnc against FlexAttention ({datetime.date.today().isoformat()})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
             f"Python {platform.python_version()}, torch {torch.__version__}",
             f"- load average {os.getloadavg()[0]:.1f} at start",
             f"- `benchmarks/bench_dynamic.py --n {args.n} --heads {args.heads} --repeat {args.repeat} "
             f"--cases {args.cases}`",
             f"- fp32, batch 1, head dim {D}, {args.heads} heads, {args.n} tokens, forward (no grad); ms: medians of "
             f"{args.repeat} interleaved rounds after a warm-up",
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
