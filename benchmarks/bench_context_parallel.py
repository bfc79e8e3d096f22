"""Context parallelism across ranks: time and bytes per mode (recorded, not a timed test).

    python benchmarks/bench_context_parallel.py [--quick] [--ranks 1,2,4] [--n 4096] [--repeat 5]
        [--cases window,causal,nbhd3d] [--out benchmarks/results/context-parallel-DATE.md]

Cost on a 2-core CPU: ``--quick`` (1 and 2 ranks, 1,024 tokens, 3 rounds) took 28 s wall (27 s CPU,
2026-11-25, load average 5 from other jobs); the full run (1, 2 and 4 ranks, 4,096 tokens: 4 ranks
share 2 cores) about 3-6 minutes (an estimate, not measured).

For each world size, the ranks are spawned once (gloo on CPU; ``--device cuda`` uses NCCL, one GPU
per rank) and every case runs, in one process per rank, interleaved rounds (one run of each mode per
round), the median of ``--repeat`` training steps (forward + backward of q, k, v), fp32, batch 1,
head dim 64, 4 heads:

- attnc ``ContextParallel`` with ``kv="ring"``, ``kv="allgather"`` and ``ulysses_degree=P``;
- a dense ring: the same ring and the same block code with every shard sent to every rank (what a
  pass-KV ring does without the pattern's plan): the baseline for the sparse plan;
- ``kv="ring"`` with the reference blocks (the reference evaluator's scores in torch, what every
  block ran before the backends ran blocks): the baseline for the kernels (``blocks.block_runner``);
  the other modes run their blocks on the attention's backend (the CPU executor on CPU tensors)
  where it runs blocks (also on Ulysses ranks, a share of the heads, unless the pattern reads the head);
- torch's own ``context_parallel`` (``torch.distributed.tensor.experimental``) with causal SDPA,
  where it runs (its cell says why where it does not).

The bytes are what each rank sent in the forward (``last_comm_bytes``; max over ranks). Every mode's
output is checked against the one-process reference on rank 0 before timing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from bench_flex import emit, interleaved  # noqa: E402

import attnc  # noqa: E402
from attnc.distributed import ContextParallel  # noqa: E402
from attnc.runtime.parallel.pairs import PairPlan  # noqa: E402

H, D = 4, 64
CASES = {
    "window": dict(spec="stdlib:sliding_window", params={"window": 256}, sizes=None),
    "causal": dict(spec="pattern causal\n  tokens seq\n  mask causal\n", params={}, sizes=None),
    "nbhd3d": dict(spec="stdlib:neighborhood_3d", params={"kernel_size": (3, 7, 7)}, sizes="grid"),
}


def grid_sizes(n: int) -> dict:
    frames = 16
    side = int(round((n // frames) ** 0.5))
    return {"frames": frames, "height": side, "width": n // frames // side}


class DenseRing(ContextParallel):
    """The same ring and blocks with every shard sent to every rank (a pass-KV ring without the plan)."""

    def plan(self, bound, tensors, batch, order):
        return PairPlan(order, torch.ones(order.ring, order.ring, dtype=torch.bool))


class ReferenceBlocks(ContextParallel):
    """The ring with every block on the reference scores (not the attention's backend)."""

    def block_runner(self, device, heads, pattern_heads):
        return None


def torch_cp_step(q, k, v, world, device):
    """torch's context_parallel over SDPA (causal); raises where it does not run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh(device, (world,))
    bufs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    with context_parallel(mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2]):
        out = torch.nn.functional.scaled_dot_product_attention(*bufs, is_causal=True)
        out.sum().backward()


def worker(rank, world, port, args, out_path):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    device = args.device
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = []
    for name in args.cases.split(","):
        case = CASES[name]
        sizes = grid_sizes(args.n) if case["sizes"] == "grid" else None
        n = args.n if sizes is None else sizes["frames"] * sizes["height"] * sizes["width"]
        attn = attnc.compile_attention(case["spec"], sizes=sizes, backend="cpu" if device == "cpu" else "auto",
                                       **case["params"])
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, H, n, D, generator=g).to(device) for _ in range(3))
        ref = attn(q, k, v) if rank == 0 else None
        modes = {"ring": ContextParallel(attn, kv="ring"), "allgather": ContextParallel(attn, kv="allgather"),
                 "dense ring": DenseRing(attn, kv="ring"), "ring (reference blocks)": ReferenceBlocks(attn, kv="ring")}
        if world > 1 and H % world == 0:
            modes[f"ulysses {world}"] = ContextParallel(attn, ulysses_degree=world)
        if world == 1:
            modes = {"ring": modes["ring"], "ring (reference blocks)": modes["ring (reference blocks)"]}
        modes = {k: m for k, m in modes.items() if not args.modes or k in args.modes.split(",")}
        steps, sent, errors, blocks = {}, {}, {}, {}
        for label, cp in modes.items():
            ql, kl, vl = (cp.shard(t) for t in (q, k, v))
            out = cp.unshard(cp(ql, kl, vl))
            if rank == 0:
                err = (out - ref).abs().max().item()
                assert err < 1e-4, f"{name} {label}: max error {err}"

            def step(cp=cp, ql=ql, kl=kl, vl=vl):
                a, b, c = (t.detach().requires_grad_() for t in (ql, kl, vl))
                cp(a, b, c).sum().backward()

            steps[label] = step
            step()
            b = torch.tensor([cp.last_comm_bytes], dtype=torch.int64)
            dist.all_reduce(b, op=dist.ReduceOp.MAX)
            sent[label] = int(b)
            blocks[label] = cp.last_blocks
        if name == "causal" and world > 1 and (not args.modes or "torch" in args.modes):
            try:
                torch_cp_step(q, k, v, world, device)
                steps["torch context_parallel (SDPA)"] = lambda q=q, k=k, v=v: torch_cp_step(q, k, v, world, device)
            except Exception as err:  # recorded: where torch's own context parallelism does not run
                errors["torch context_parallel (SDPA)"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"

        def synced(fn):
            def run():
                fn()
                dist.barrier()
            return run

        times = interleaved({k: synced(f) for k, f in steps.items()}, args.repeat)
        med = {k: statistics.median(t) for k, t in times.items()}
        base = med.get("dense ring")
        for label in steps:
            rows.append((name, n, world, label, blocks.get(label, "-"), med[label], (med[label] / base) if base else None,
                         sent.get(label)))
        for label, why in errors.items():
            rows.append((name, n, world, label, "-", None, None, why))
    if rank == 0:
        torch.save(rows, out_path)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="--ranks 1,2 --n 1024 --repeat 3 (unless given)")
    ap.add_argument("--ranks", default=None, help="default 1,2,4 (--quick 1,2)")
    ap.add_argument("--n", type=int, default=None, help="tokens (default 4,096; --quick 1,024)")
    ap.add_argument("--repeat", type=int, default=None, help="rounds (default 5; --quick 3)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default=None, help="comma-separated mode labels to run (default: all)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.ranks = args.ranks or ("1,2" if args.quick else "1,2,4")
    args.n = args.n or (1024 if args.quick else 4096)
    args.repeat = args.repeat or (3 if args.quick else 5)
    rows = []
    for world in (int(r) for r in args.ranks.split(",")):
        path = f"/tmp/attnc-cp-bench-{os.getpid()}-{world}.pt"
        t = time.perf_counter()
        mp.spawn(worker, args=(world, free_port(), args, path), nprocs=world)
        rows += torch.load(path, weights_only=False)
        os.remove(path)
        print(f"# {world} rank(s): {time.perf_counter() - t:.0f} s", file=sys.stderr)
    import triton

    lines = [f"# Context parallelism, {datetime.date.today()}", "",
             f"- command: `python benchmarks/bench_context_parallel.py {' '.join(sys.argv[1:])}`",
             f"- machine: {platform.machine()}, {os.cpu_count()} cores, {platform.platform()}; device {args.device}",
             f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}",
             f"- fp32, batch 1, {H} heads, head dim {D}; a training step (forward + backward of q, k, v); "
             f"median of {args.repeat} interleaved rounds; bytes: sent by the busiest rank in the forward",
             "", "| case | tokens | ranks | mode | blocks | step (ms) | vs dense ring | bytes sent |",
             "|---|---|---|---|---|---|---|---|"]
    for name, n, world, label, blocks, sec, ratio, b in rows:
        step = "-" if sec is None else f"{sec * 1e3:.1f}"
        rel = "-" if ratio is None else f"{ratio:.2f}x"
        lines.append(f"| {name} | {n} | {world} | {label} | {blocks} | {step} | {rel} | {b if b is not None else '-'} |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
