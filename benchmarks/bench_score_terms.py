"""Score terms beyond q . k: attnc's ``relative()`` embeddings (stdlib ``music_relative``) and ``weights`` other
than softmax (stdlib ``sigmoid``) against the ways a user writes them today, forward and backward (recorded, not
a timed test).

    python benchmarks/bench_score_terms.py [--quick] [--sizes N,N] [--out FILE] [--rounds R] [--threads N]
    python benchmarks/bench_score_terms.py --device cuda --sizes 4096,16384   # attnc's Triton kernels, bf16

- Music Transformer: attnc's ``stdlib:music_relative`` against tensor2tensor's form in torch (the relative
  logits ``q E^T`` skewed to absolute positions, added to ``q k^T``, a masked softmax) and against SDPA with the
  skewed relative logits as its float ``attn_mask`` (the fused kernel SDPA has; the n x n bias built per call).
- Sigmoid attention: attnc's ``stdlib:sigmoid`` (causal) against the dense torch form of Apple's reference
  (``sigmoid(q k^T * scale + b)`` masked, ``@ v``); FlashSigmoid is CUDA-only and not installed here.

Every case: batch 1, 8 heads, d 64, float32 on CPU (attnc's ``backend="cpu"``) or bfloat16 on CUDA (``backend=
"triton"``, every round synchronised), causal, forward plus backward of ``(out * w).sum()`` (q, k, v and
E). Each round runs every method once in a rotated order; the table gives the median over ``--rounds`` rounds
after a warm-up (min and max beside it), the ratio to the first baseline (run in the same process) and each
method's largest difference to it in out and the gradients.

Cost on a 2-core CPU (2026-11-26, otherwise idle): the recorded run (1K, 2K and 4K tokens, ``--rounds 3``) took 2
minutes wall, so the default 5 rounds take about 3; ``--quick`` (1K and 2K, 3 rounds) about 40 s. On a GPU the dense
forms hold the n x n logits in float32 for the backward (16K tokens: 8 GiB each).
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import statistics
import sys
import time

import torch

import attnc


def skew(x: torch.Tensor) -> torch.Tensor:
    """[b, h, l, l] indexed by (query, key - query + l - 1) to (query, key): tensor2tensor's
    ``_relative_position_to_absolute_position_masked``."""
    b, h, length, _ = x.shape
    return torch.nn.functional.pad(x, (1, 0)).reshape(b, h, length + 1, length)[:, :, 1:]


def left_embeddings(E: torch.Tensor, length: int) -> torch.Tensor:
    heads, rows, d = E.shape
    padded = torch.cat([E.new_zeros(heads, max(length - rows, 0), d), E], dim=1)
    return padded[:, max(rows - length, 0):][:, :length]


def music_dense(q, k, v, E):
    d = q.shape[-1]
    qs = q * d ** -0.5
    logits = qs @ k.transpose(-1, -2) + skew(torch.einsum("bhld,hmd->bhlm", qs, left_embeddings(E, q.shape[2])))
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu(1)
    return torch.softmax(logits.masked_fill(causal, float("-inf")), dim=-1) @ v


def music_sdpa(q, k, v, E):
    d, n = q.shape[-1], q.shape[2]
    rel = skew(torch.einsum("bhld,hmd->bhlm", q * d ** -0.5, left_embeddings(E, n)))
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=rel.masked_fill(causal, float("-inf")))


def sigmoid_dense(q, k, v, length):
    n, d = q.shape[2], q.shape[-1]
    s = q @ k.transpose(-1, -2) * d ** -0.5 - math.log(length)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    return torch.where(causal, torch.sigmoid(s), torch.zeros((), dtype=s.dtype)) @ v


def timed_step(fn, leaves, w):
    def run():
        xs = [x.detach().requires_grad_() for x in leaves]
        out = fn(*xs)
        (out * w).sum().backward()
        return [out.detach()] + [x.grad for x in xs]
    return run


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(methods: dict, rounds: int) -> tuple[dict, dict]:
    results = {name: fn() for name, fn in methods.items()}  # warm-up (and the answers compared)
    times = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            synchronize()
            t0 = time.perf_counter()
            methods[name]()
            synchronize()
            times[name].append(time.perf_counter() - t0)
    return times, results


def table(title: str, times: dict, results: dict) -> list[str]:
    base = next(iter(times))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [f"### {title}", "", "| method | median ms | min - max ms | vs " + base + " | max abs diff (out, grads) |",
            "|---|---|---|---|---|"]
    for name, ts in times.items():
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(results[name], results[base], strict=True))
        rows.append(f"| {name} | {med[name] * 1e3:.1f} | {min(ts) * 1e3:.1f} - {max(ts) * 1e3:.1f} | "
                    f"{med[base] / med[name]:.2f}x | {diff:.1e} |")
    return rows + [""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="n 1024 and 2048 only, 3 rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--sizes", default=None, help="sequence lengths, comma-separated (default 1024,2048,4096)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype, backend = (torch.bfloat16, "triton") if dev.type == "cuda" else (torch.float32, "cpu")
    machine = torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or platform.machine()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else args.rounds
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [1024, 2048] if args.quick else [1024, 2048, 4096]
    g = torch.Generator().manual_seed(0)
    lines = [f"# Score terms: relative embeddings and sigmoid weights ({datetime.date.today()})", "",
             f"- {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}, Python "
             f"{platform.python_version()}; batch 1, 8 heads, d 64, {str(dtype)[6:]}, causal, "
             f"forward + backward; median of {rounds} interleaved rounds after a warm-up", ""]
    for n in sizes:
        q, k, v, w = (torch.randn(1, 8, n, 64, generator=g).to(dev, dtype) for _ in range(4))
        E = (torch.randn(8, n, 64, generator=g) * 64 ** -0.5).to(dev, dtype)
        music = attnc.compile_attention("stdlib:music_relative", max_relative=n, backend=backend)
        times, results = measure({
            "torch dense (tensor2tensor's form)": timed_step(music_dense, (q, k, v, E), w),
            "SDPA, skewed logits as its float mask": timed_step(music_sdpa, (q, k, v, E), w),
            f"attnc music_relative ({backend})": timed_step(lambda a, b, c, e, m=music: m(a, b, c, E=e), (q, k, v, E), w),
        }, rounds)
        lines += table(f"Music Transformer, n {n}, max_relative {n}", times, results)
        sig = attnc.compile_attention("stdlib:sigmoid", length=n, is_causal=True, backend=backend)
        times, results = measure({
            "torch dense sigmoid": timed_step(lambda a, b, c, n=n: sigmoid_dense(a, b, c, n), (q, k, v), w),
            f"attnc sigmoid ({backend})": timed_step(sig, (q, k, v), w),
        }, rounds)
        lines += table(f"Sigmoid attention, n {n}, b = -log({n})", times, results)
        print("\n".join(lines[-12:]), flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
