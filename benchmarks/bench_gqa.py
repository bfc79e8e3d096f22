"""Grouped-query attention's training step: the dK/dV kernel at every split of a K/V head's query heads
over programs, against multi-head attention and FlexAttention (``enable_gqa``) (recorded, not a timed test).

    python benchmarks/bench_gqa.py [--repeats 7] [--out benchmarks/results/gqa-GPU-DATE.md]
    python benchmarks/bench_gqa.py --toy       # CPU, Triton interpreter, toy sizes: proves the script runs

Cost: GPU-only: without a CUDA device it exits at once (status 2), so on a CPU-only machine only
``--toy`` runs. On a GPU: not measured (no GPU has run it yet). ``--toy`` on a 2-core CPU: took 15 s
wall (13 s CPU, 2026-11-25, load average 5 from other jobs).

A causal sliding window (a quarter of the tokens), batch 1, 8 query heads (``--toy``: 4) sharing 1 and 2 K/V
heads, bf16 and head dim 128 on CUDA (``--toy``: fp32, head dim 16). Per case, in one process, interleaved,
median of ``--repeats``: attnc's forward + backward with the dK/dV kernel at each divisor of the group
(``SPLIT`` programs per K/V head; the one the cost model picks marked, with the simulator's prediction;
the fit ladder may run a split whose kernel spills at one program per query head, and the row says so),
attnc with a K/V head per query head (multi-head, the same FLOPs), and FlexAttention with ``enable_gqa=True``
and the same window (``torch.compile``d on CUDA). Gradients are compared between the splits and against Flex.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite as base  # noqa: E402  (attnc's import from a checkout, rel, timed)

attnc = base.attnc
from attnc.runtime.backends.triton import kernel_launch as KL  # noqa: E402

ROOT = base.ROOT


def window_mod(window: int):
    """stdlib:sliding_window's rule, written here: k <= q and q - k < window."""
    def mask_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)
    return mask_mod


def run_case(n: int, heads: int, kv_heads: int, head_dim: int, *, device, dtype, toy: bool, repeats: int) -> list[str]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    window = n // 4
    spec = "stdlib:sliding_window"
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, head_dim, generator=gen).to(device=device, dtype=dtype)
    k, v = (torch.randn(1, kv_heads, n, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    dout = torch.randn(1, heads, n, head_dim, generator=gen).to(device=device, dtype=dtype)
    group = heads // kv_heads
    from attnc.compiler.cost.hardware import hardware_for_gpu

    # the cost model's pick on this GPU's model, as the runner decides it (the H100's in --toy)
    hw = "h100" if toy else hardware_for_gpu(torch.cuda.get_device_name())
    rep = attnc.simulate(spec, n=n, heads=heads, kv_heads=kv_heads, head_dim=head_dim, window=window, top=1,
                         hardware=hw, dtype="bf16")
    picked = rep.best.prediction.group_split
    ran: list[int] = []
    fitting = KL.fitting_group_split

    def spy(*args, **kwargs):
        out = fitting(*args, **kwargs)
        ran.append(out)
        return out

    def step(mod, kk, vv):
        def fb():
            qg, kg, vg = (x.detach().requires_grad_() for x in (q, kk, vv))
            mod(qg, kg, vg).backward(dout)
            return qg.grad, kg.grad, vg.grad
        return fb

    def forced(split: int, fb):
        """``fb`` with the dK/dV kernel at ``split`` programs per K/V head (the fit ladder may still run one
        program per query head: ``ran`` records what ran)."""
        def run():
            saved_split, saved_fitting = KL._group_split, KL.fitting_group_split
            KL._group_split, KL.fitting_group_split = (lambda *args: split), spy
            try:
                return fb()
            finally:
                KL._group_split, KL.fitting_group_split = saved_split, saved_fitting
        return run

    runs, grads, labels = {}, {}, {}
    for split in [s for s in range(1, group + 1) if group % s == 0]:
        mod = attnc.compile_attention(spec, backend="triton", window=window)
        runs[split] = forced(split, step(mod, k, v))
        ran.clear()
        grads[split] = runs[split]()
        labels[split] = (f"attnc, {split} program(s) per K/V head" + (" (the cost model's pick)" if split == picked
                                                                      else "")
                         + (f"; ran at {ran[-1]} (the fit ladder)" if ran and ran[-1] != split else ""))
    mha = attnc.compile_attention(spec, backend="triton", window=window)
    k_mha, v_mha = (x.repeat_interleave(group, 1) for x in (k, v))
    runs["mha"], labels["mha"] = step(mha, k_mha, v_mha), f"attnc, multi-head ({heads} K/V heads)"
    block = create_block_mask(window_mod(window), None, None, n, n, device=device)
    flex = flex_attention if toy else torch.compile(flex_attention)

    def flex_fb():
        qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
        flex(qg, kg, vg, block_mask=block, enable_gqa=True).backward(dout)
        return qg.grad, kg.grad, vg.grad

    # the splits' gradients: one program's to fp32 partial sums; FlexAttention's to its own rounding (on CPU,
    # where Flex has no backward, its output against attnc's)
    errors = {s: max(base.rel(a, b) for a, b in zip(g, grads[1], strict=True)) for s, g in grads.items()}
    if toy:
        with torch.no_grad():
            flex_err = base.rel(attnc.compile_attention(spec, backend="triton", window=window)(q, k, v),
                           flex(q, k, v, block_mask=block, enable_gqa=True))
    else:
        runs["flex"], labels["flex"] = flex_fb, "FlexAttention (enable_gqa)"
        flex_err = max(base.rel(a, b) for a, b in zip(grads[picked], flex_fb(), strict=True))
    times = {key: [] for key in runs}
    for _ in range(repeats):  # interleaved
        for key, fn in runs.items():
            times[key].append(base.timed(fn, toy))
    med = {key: statistics.median(ts) for key, ts in times.items()}
    rows = []
    for key in runs:
        ms = med[key] * 1e3
        pred = (f"{(rep.best.forward_s + rep.best.backward_s) * 1e3:.3f}" if key == picked else "")
        err = f"{errors[key]:.1e}" if key in errors else (f"{flex_err:.1e} (vs the pick)" if key == "flex" else "")
        ratio = f"{med['flex'] / med[key]:.2f}x" if "flex" in med else "-"
        rows.append(f"| n {n}, {heads} / {kv_heads} | {labels[key]} | {ms:.3f} | {ratio} | {pred} | {err} |")
    if toy:
        rows.append(f"| n {n}, {heads} / {kv_heads} | FlexAttention (enable_gqa): forward only on CPU | - | - | | "
                    f"{flex_err:.1e} (output) |")
    return rows, max([*errors.values(), flex_err])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="CPU, Triton interpreter, toy sizes")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", help="the results file (default benchmarks/results/gqa-GPU-DATE.md)")
    args = p.parse_args(argv)
    if not args.toy and not torch.cuda.is_available():
        print("no CUDA device: run with --toy for the interpreter check", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cpu" if args.toy else "cuda")
    dtype, head_dim, heads = (torch.float32, 16, 4) if args.toy else (torch.bfloat16, 128, 8)
    cases = [(64, 1)] if args.toy else [(n, kv) for n in (2048, 4096, 8192) for kv in (1, 2)]
    repeats = 1 if args.toy else args.repeats
    gpu = "CPU (Triton interpreter, --toy)" if args.toy else torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    lines = [f"# Grouped-query attention, forward + backward ({date})", "",
             f"- device: {gpu}; torch {torch.__version__}; Triton {triton.__version__}; Python "
             f"{platform.python_version()}",
             f"- {str(dtype).replace('torch.', '')}, head dim {head_dim}, batch 1, sliding window of n / 4; median of "
             f"{repeats}, interleaved" + (" (toy sizes: the times mean nothing)" if args.toy else ""), "",
             "| case (heads / K/V heads) | kernel | fwd+bwd ms | Flex / this | predicted ms | gradient error |",
             "|---|---|---|---|---|---|"]
    failures: list[str] = []
    for n, kv in cases:
        print(f"n {n}, {heads} heads / {kv} K/V heads", flush=True)
        rows, worst = run_case(n, heads, kv, head_dim, device=device, dtype=dtype, toy=args.toy, repeats=repeats)
        lines += rows
        failures += [f"n {n}, {kv} K/V heads"] if not worst < (1e-5 if args.toy else 2e-2) else []
    lines += ["", "Gradient error: the largest relative error of dq, dk, dv against one program per K/V head (the "
              "splits), or of the cost model's pick against FlexAttention (Flex's row); a case fails above "
              + ("1e-5 (fp32)" if args.toy else "2e-2 (bf16)") + ".",
              f"- verdict: {'PASS' if not failures else 'FAIL: ' + ', '.join(failures)}"]
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"gqa-{'toy' if args.toy else torch.cuda.get_device_name().split()[-1].lower()}-{date}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")
    if failures:
        print("gradients off (see the table): " + ", ".join(failures), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
