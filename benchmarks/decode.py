"""Decode steps: attnc against SDPA, Flex decoding and FlashAttention's ``flash_attn_with_kvcache``
(recorded, not a timed test).

    python benchmarks/decode.py [--quick] [--out FILE] [--sections interpreter,cpu,gpu]
                                [--rounds R] [--steps S] [--threads N] [--gpu-toy]

Cost on a 2-core CPU (2026-11-25, shared with other jobs: load average 10-12): ``--quick`` took
47 s wall (23 s CPU); the full run took 293 s wall (137 s CPU). Most of it is Triton's interpreter
(about 0.4 s of CPU a KV tile: a step of a 64-key window, two tiles, costs 0.8 s whatever the
cache, a causal step 2 s at nk = 256 and 3.5 s at 512) and one ``torch.compile`` of Flex per
case (5-15 s). On a GPU: not measured yet; estimated 5-10 minutes for the full run, mostly compiling
Flex for each of its 8 cases (``--quick``: 4 cases, 2-4 minutes).

Every step is one new query per batch row after a KV cache of nk keys, the cache growing by one
key per step (a new nk every step, as in generation: nothing planned at one length is reused at
the next). Each round runs ``--steps`` steps of every method, the methods interleaved in a rotated
order; a method's step time is its round time over the steps, and the tables give the median over
``--rounds`` rounds after a warm-up round (min and max beside it), tokens/s (batch rows / step
time) and the ratio to the baseline of the same table, run in the same process. ``max |diff|`` is
each method's largest difference to the baseline's output at the table's first nk.

Sections (the default: ``interpreter,cpu`` without CUDA, ``gpu`` with it):

- ``interpreter`` (CPU tensors; ``TRITON_INTERPRET=1`` is set by this script before Triton is
  imported): attnc's Triton kernels under the interpreter, ``stdlib:sliding_window`` window 64,
  one query, 8 heads, d 64, fp32, at nk = 256 .. 2048 (``--quick``: 256 and 2048), on a contiguous
  cache and on a paged one (64-key pages), with their WORK COUNTS: the KV tiles a step visits
  (``attn.runner.last_schedule.pairs()``) and the keys those tiles hold, against nk; and the cpu
  backend's step (its decoding rows: the keys it attends). It states issue 42's criterion: the
  step at nk = 2048 takes at most 1.5x the step at nk = 256. The full run adds causal attention
  at nk = 256 and 512 (every tile visited: the step grows with nk).
- ``cpu``: the cpu backend against SDPA on the cache (baseline; the windowed pattern with a
  boolean mask row built per step, as HF does), SDPA on the window's slice, and Flex decoding
  (``torch.compile(flex_attention)``, gpt-fast's way: a static buffer, the BlockMask row of the
  query's block and a mask_mod reading the query's position from a tensor), sliding window 1024
  and causal at nk = 4096 (full run: and 16384); paged: attnc's paged call against SDPA on the
  row's pages gathered.
- ``gpu`` (CUDA; bf16, batch 4, 32 query heads sharing 8 K/V heads, d 128): attnc's Triton
  kernels against SDPA (``enable_gqa``), Flex decoding and ``flash_attn_with_kvcache`` (when
  ``flash_attn`` imports) at nk = 4K .. 128K (``--quick``: 4K and 32K), causal and a 4096-key
  window; paged (256-key pages: flash_attn's paged kernels need multiples of 256) against
  flash_attn's paged call and SDPA on gathered pages; and one attnc decode step captured in a
  CUDA graph (``torch.cuda.CUDAGraph``): its replay time beside SDPA's, or why the capture failed; and one
  paged step captured once with its lengths in a device tensor, replayed as the cache grows (each replay checked
  against the eager call at its length).
  ``--gpu-toy`` runs this section's code on CPU tensors at toy sizes (the interpreter; no flash_attn,
  no graphs): a check of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # CPU tensors run attnc's Triton kernels under the interpreter: set before Triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import attnc  # noqa: E402

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

CAUSAL = "pattern causal_lm\n  tokens seq\n  mask causal\n"
# one compiled Flex per (pattern, nk) and mask_mod: more recompiles of flex_attention than dynamo's
# default limit of 8, past which it would run Flex eagerly (unfused)
for _limit in ("cache_size_limit", "recompile_limit"):
    if hasattr(torch._dynamo.config, _limit):
        setattr(torch._dynamo.config, _limit, 64)
#: Flex's BlockMask block size (its default), and the rows of one block mask built per query block.
FLEX_BLOCK = 128


# ----------------------------------------------------------------------------- inputs
@dataclass
class Caches:
    """One decode problem: the query of every step, a contiguous cache of ``length`` keys and the same
    keys in pages (row b's page j holds its keys ``j * page .. (j + 1) * page - 1``, pages shuffled)."""

    q: torch.Tensor  # [B, Hq, 1, D]
    k: torch.Tensor  # [B, Hkv, L, D]
    v: torch.Tensor
    k_pages: torch.Tensor  # [num_pages, page, Hkv, D]
    v_pages: torch.Tensor
    block_table: torch.Tensor  # int32 [B, L / page]
    flash_k: torch.Tensor | None = None  # [B, L, Hkv, D]: flash_attn's layout
    flash_v: torch.Tensor | None = None

    @classmethod
    def make(cls, batch, hq, hkv, d, length, page, dtype, device, flash=False) -> Caches:
        gen = torch.Generator(device=device).manual_seed(0)  # drawn where they live (GBs at 128K)
        q = torch.randn(batch, hq, 1, d, generator=gen, device=device).to(dtype)
        k, v = (
            torch.randn(batch, hkv, length, d, generator=gen, device=device).to(dtype) for _ in "kv"
        )
        per_row = length // page
        order = torch.randperm(batch * per_row, generator=gen, device=device)
        pools = []
        for c in (k, v):
            pages = (
                c.view(batch, hkv, per_row, page, d)
                .permute(0, 2, 3, 1, 4)
                .reshape(-1, page, hkv, d)
            )
            pool = torch.empty_like(pages)
            pool[order] = pages
            pools.append(pool)
        table = order.view(batch, per_row).to(torch.int32)
        flash_kv = [c.transpose(1, 2).contiguous() for c in (k, v)] if flash else [None, None]
        return cls(q, k, v, pools[0], pools[1], table, *flash_kv)

    def seqlens(self, nk: int) -> torch.Tensor:
        return torch.full((self.q.shape[0],), nk, dtype=torch.int32, device=self.q.device)

    def gathered(self, nk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's first nk keys and values gathered from its pages: ``[B, Hkv, nk, D]``."""
        pages = self.block_table[:, : -(-nk // self.k_pages.shape[1])].long()
        return tuple(
            c[pages].flatten(1, 2)[:, :nk].transpose(1, 2) for c in (self.k_pages, self.v_pages)
        )


def window_row(nk: int, window: int | None, device) -> torch.Tensor | None:
    """SDPA's boolean mask row of the last query (position nk - 1), built per step."""
    if window is None:
        return None
    return (torch.arange(nk, device=device) > nk - 1 - window).view(1, 1, 1, nk)


def sdpa(q, k, v, mask=None):
    # not cuDNN's kernel: on an H200 (torch 2.11) it planned again at every new key count, 30-50 ms of host
    # time a step; the flash and memory-efficient kernels take any length
    with sdpa_kernel(SDPA_BACKENDS):
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1]
        )


class FlexDecoder:
    """Flex decoding as gpt-fast writes it: the whole static buffer of keys, the BlockMask row of the
    query's block (built once per block of ``FLEX_BLOCK`` positions) and a mask_mod that reads the
    query's position from a tensor, so the compiled kernel is reused at every step."""

    def __init__(self, window: int | None, length: int, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.window, self.length, self.device = window, length, device
        self.create_block_mask = create_block_mask
        self.position = torch.zeros(
            1, dtype=torch.int64, device=device
        )  # [1]: a 0-d buffer fails on CPU
        self.rows: dict[int, object] = {}
        self.fn = torch.compile(flex_attention, dynamic=False)

    def rule(self, q, k):
        keep = k <= q
        return keep if self.window is None else keep & (q - k < self.window)

    def mask_mod(self, b, h, q, k):
        return self.rule(q + self.position[0], k)

    def _row(self, block: int):
        if block not in self.rows:
            start = block * FLEX_BLOCK
            rows = self.create_block_mask(
                lambda b, h, q, k: self.rule(q + start, k),
                None,
                None,
                FLEX_BLOCK,
                self.length,
                device=self.device,
                BLOCK_SIZE=FLEX_BLOCK,
            )
            row = rows[:, :, 0]
            row.mask_mod = self.mask_mod
            row.seq_lengths = (1, self.length)
            self.rows[block] = row
        return self.rows[block]

    def __call__(self, q, k, v, nk: int):
        self.position.fill_(nk - 1)
        bm = self._row((nk - 1) // FLEX_BLOCK)
        return self.fn(q, k, v, block_mask=bm, enable_gqa=k.shape[1] != q.shape[1])


# ----------------------------------------------------------------------------- timing
@dataclass
class Timed:
    """Per-step seconds of one method over the timed rounds (wall and this process's CPU time)."""

    wall: list[float]
    cpu: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.wall)


def run_rounds(methods: dict[str, Callable[[int], object]], nk: int, steps: int, rounds: int, sync):
    """Time ``steps`` steps of every method per round at nk, nk + 1, ... (a new length each step and
    round), interleaved in a rotated order; round 0 warms up."""
    names = list(methods)
    timed = {name: Timed([], []) for name in names}
    for r in range(rounds + 1):
        base = nk + r * steps
        for name in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            t, c = time.perf_counter(), time.process_time()
            for i in range(steps):
                methods[name](base + i)
            sync()
            if r:
                timed[name].wall.append((time.perf_counter() - t) / steps)
                timed[name].cpu.append((time.process_time() - c) / steps)
    return timed


def differences(methods, baseline: str, nk: int) -> dict[str, float]:
    """Each method's largest difference to the baseline's output at nk (both in float32)."""
    ref = methods[baseline](nk).float()
    return {name: float((fn(nk).float() - ref).abs().max()) for name, fn in methods.items()}


def no_sync():
    """CPU tensors: nothing to wait for."""


def ratio(x: float) -> str:
    return f"{x:.2f}" if x < 100 else f"{x:,.0f}"


def rate(per_s: float) -> str:
    return f"{per_s:,.0f}" if per_s >= 100 else f"{per_s:.3g}"


def table(title: str, timed: dict[str, Timed], baseline: str, batch: int, diffs) -> list[str]:
    """A markdown table of one case: every method's step against the baseline's."""
    base = timed[baseline].median
    head = "| method | ms per step (median) | min | max | tokens/s | / baseline | CPU ms per step | max abs diff |"
    lines = [f"### {title}", "", head, "|" + " --- |" * (head.count("|") - 1)]
    for name, t in timed.items():
        mark = " (baseline)" if name == baseline else ""
        lines.append(
            f"| {name}{mark} | {t.median * 1e3:.3f} | {min(t.wall) * 1e3:.3f} | {max(t.wall) * 1e3:.3f} | "
            f"{rate(batch / t.median)} | {ratio(t.median / base)} | {statistics.median(t.cpu) * 1e3:.3f} | "
            f"{diffs.get(name, float('nan')):.3g} |"
        )
    return lines + [""]


# ----------------------------------------------------------------------------- work counts
def triton_work(attn) -> tuple[int, int] | None:
    """(KV tiles, keys in them) the latest Triton call visited (``last_schedule.pairs()``); None where it ran the
    paged kernel (a paged call, or a growing contiguous cache read as pages): its tiles are chosen in the kernel, per
    row, from lists made once, and no schedule of the step exists on the host to count."""
    runner = attn.runner
    if any(key[0] == "paged" and t.launch.plan is runner.last_plan for key, t in runner.block_plans.items()):
        return None
    sched = runner.last_schedule
    if sched is None:
        return None
    kv = torch.unique(sched.pairs()[2])
    return kv.numel(), int(sched.kv_tile_tokens()[kv].sum())


def cpu_work(attn) -> int | None:
    """Keys the cpu backend's latest decoding rows attended (their visited columns)."""
    cols = getattr(getattr(attn.runner, "last", None), "cols", None)
    if isinstance(cols, slice):
        return cols.stop - cols.start
    if isinstance(cols, tuple):
        return sum(c.stop - c.start for c in cols)
    return None if cols is None else int(cols.numel())


def rounded_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# ----------------------------------------------------------------------------- interpreter
def interpreter_cases(quick: bool):
    """(label, source, params, lengths, steps, rounds) of the interpreter section."""
    window = ("sliding window 64", "stdlib:sliding_window", {"window": 64})
    if quick:
        return [(*window, (256, 2048), 1, 3)]
    return [(*window, (256, 512, 1024, 2048), 2, 3), ("causal", CAUSAL, {}, (256, 512), 1, 2)]


def interpreter_methods(triton, cpu, c: Caches, window) -> dict[str, Callable]:
    paged = {"block_table": c.block_table}
    return {
        "attnc triton": lambda n: triton(c.q, c.k[:, :, :n], c.v[:, :, :n]),
        "attnc triton, paged": lambda n: triton(
            c.q, c.k_pages, c.v_pages, **paged, cache_seqlens=c.seqlens(n)
        ),
        "attnc cpu": lambda n: cpu(c.q, c.k[:, :, :n], c.v[:, :, :n]),
        "attnc cpu, paged": lambda n: cpu(
            c.q, c.k_pages, c.v_pages, **paged, cache_seqlens=c.seqlens(n)
        ),
        "SDPA": lambda n: sdpa(c.q, c.k[:, :, :n], c.v[:, :, :n], window_row(n, window, "cpu")),
    }


def step_work(name: str, triton, cpu) -> tuple[int | None, int | None]:
    """(KV tiles, keys) of the step a method just ran: Triton's schedule, the cpu backend's rows."""
    if name.startswith("attnc triton"):
        return triton_work(triton) or ("-", "-")  # the paged kernel's: not counted on the host
    if name.startswith("attnc cpu"):
        return None, cpu_work(cpu)
    return None, None


@dataclass
class Row:
    """One (method, nk) of the interpreter table: its steps, difference and the work of the steps at
    nk and nk + 1 (a window's keys fill one tile or straddle two)."""

    timed: Timed | None
    diff: float
    work: list[tuple[int | None, int | None]]

    def cells(self, nk: int) -> str:
        tiles, keys = ([w[i] for w in self.work] for i in (0, 1))
        if None in keys:  # SDPA: every key
            return f"- | {nk} | 1.000"
        if "-" in keys:  # the paged kernel's tiles, chosen on the device: not counted
            return "- | - | -"
        shown = ", ".join(str(k) for k in keys)
        return f"{', '.join('-' if t is None else str(t) for t in tiles)} | {shown} | {max(keys) / nk:.3f}"


def interpreter_case(label, src, params, lengths, steps, rounds) -> tuple[list[str], dict]:
    """One pattern's table: every method at every nk, with its work counts; returns the lines and the
    median step of each (method, nk)."""
    heads, dim, page = 8, 64, 64
    triton = attnc.compile_attention(src, backend="triton", **params)
    cpu = attnc.compile_attention(src, backend="cpu", **params)
    found: dict[tuple[str, int], Row] = {}
    for nk in lengths:
        length = rounded_up(nk + (rounds + 1) * steps + 2, page)
        c = Caches.make(1, heads, heads, dim, length, page, torch.float32, "cpu")
        methods = interpreter_methods(triton, cpu, c, params.get("window"))
        ref = methods["SDPA"](nk)
        for name, fn in methods.items():  # first calls, differences and the work at nk, nk + 1
            diff = float((fn(nk) - ref).abs().max())
            work = [step_work(name, triton, cpu)]
            fn(nk + 1)
            found[name, nk] = Row(None, diff, work + [step_work(name, triton, cpu)])
        for name, t in run_rounds(methods, nk, steps, rounds, no_sync).items():
            found[name, nk].timed = t
        print(
            f"  {label} nk={nk}: "
            + ", ".join(f"{n} {found[n, nk].timed.median:.3f} s" for n in methods)
        )
    head = (
        "| method | nk | ms per step (median) | min | max | CPU ms per step | / the step at nk = "
        f"{lengths[0]} | KV tiles visited (nk, nk + 1) | keys read (nk, nk + 1) | keys read / nk "
        "| max abs diff |"
    )
    lines = [
        f"### {label}: one query, 8 heads, d 64, fp32",
        "",
        head,
        "|" + " --- |" * (head.count("|") - 1),
    ]
    for name in methods:
        first = found[name, lengths[0]].timed.median
        for nk in lengths:
            row = found[name, nk]
            t = row.timed
            lines.append(
                f"| {name} | {nk} | {t.median * 1e3:.1f} | {min(t.wall) * 1e3:.1f} | {max(t.wall) * 1e3:.1f} | "
                f"{statistics.median(t.cpu) * 1e3:.1f} | "
                f"{t.median / first:.2f} | {row.cells(nk)} | {row.diff:.2g} |"
            )
    return lines + [""], {key: row.timed.median for key, row in found.items()}


def interpreter_section(args) -> list[str]:
    lines = [
        "## Triton under the interpreter (CPU): work counts",
        "",
        "KV tiles visited: the distinct KV tiles of the latest step's schedule "
        "(`attn.runner.last_schedule.pairs()`), keys read: the keys those tiles hold (64 a tile); "
        "for the cpu backend the keys its decoding rows attend; SDPA reads all nk. Paged: 64-key pages, "
        "shuffled; the step includes the paged frontend's work.",
        "",
    ]
    medians = {}
    for case in interpreter_cases(args.quick):
        part, found = interpreter_case(*case)
        lines += part
        medians.update({(case[0], *key): value for key, value in found.items()})
    small, large = (medians.get(("sliding window 64", "attnc triton", n)) for n in (256, 2048))
    if small and large:
        ratio = large / small
        verdict = "met" if ratio <= 1.5 else "NOT met"
        lines += [
            f"**Criterion (issue 42)**: a Triton decode step under the interpreter (window 64, one query) "
            f"at nk = 2048 takes {large:.3f} s, at nk = 256 {small:.3f} s: {ratio:.2f}x (at most 1.5x: "
            f"{verdict}).",
            "",
        ]
    return lines


# ----------------------------------------------------------------------------- CPU timings
def kv_methods(name: str, attn, c: Caches, window, flex, device, sdpa_label: str, paged_label: str
               ) -> tuple[dict, dict]:
    """The methods every section times: attnc (``name``), SDPA on the cache (and on the window's slice),
    Flex decoding; attnc and SDPA on the paged cache. ``(contiguous, paged)``."""
    contiguous = {
        name: lambda n: attn(c.q, c.k[:, :, :n], c.v[:, :, :n]),
        sdpa_label: lambda n: sdpa(c.q, c.k[:, :, :n], c.v[:, :, :n], window_row(n, window, device)),
    }
    if window:
        contiguous["SDPA, window slice"] = lambda n: sdpa(
            c.q, c.k[:, :, max(0, n - window) : n], c.v[:, :, max(0, n - window) : n]
        )
    contiguous["Flex decoding (compiled)"] = lambda n: flex(c.q, c.k, c.v, n)
    paged = {
        f"{name}, paged": lambda n: attn(
            c.q, c.k_pages, c.v_pages, block_table=c.block_table, cache_seqlens=c.seqlens(n)
        ),
        paged_label: lambda n: sdpa(c.q, *c.gathered(n), window_row(n, window, device)),
    }
    return contiguous, paged


def cpu_methods(attn, c: Caches, window, flex) -> tuple[dict, str, dict, str]:
    """(contiguous methods, their baseline, paged methods, their baseline)."""
    mask = " + mask row" if window else ""
    base, paged_base = f"SDPA, KV cache{mask}", f"SDPA, gathered pages{mask}"
    contiguous, paged = kv_methods("attnc cpu", attn, c, window, flex, "cpu", base, paged_base)
    return contiguous, base, paged, paged_base


def cpu_section(args) -> list[str]:
    heads, dim, page = 8, 64, 64
    lengths = (4096,) if args.quick else (4096, 16384)
    lines = [
        "## CPU: attnc's cpu backend against SDPA and Flex decoding",
        "",
        f"fp32, batch 1, {heads} heads, d {dim}, {args.steps} steps a round, median of {args.rounds} rounds; "
        "paged: 64-key pages, shuffled.",
        "",
    ]
    for label, src, window in (
        ("sliding window 1024", "stdlib:sliding_window", 1024),
        ("causal", CAUSAL, None),
    ):
        attn = attnc.compile_attention(src, backend="cpu", **({"window": window} if window else {}))
        for nk in lengths:
            length = rounded_up(nk + (args.rounds + 1) * args.steps + 1, FLEX_BLOCK)
            c = Caches.make(1, heads, heads, dim, length, page, torch.float32, "cpu")
            flex = FlexDecoder(window, length, "cpu")
            contiguous, base, paged, paged_base = cpu_methods(attn, c, window, flex)
            for kind, methods, baseline in (
                ("contiguous", contiguous, base),
                ("paged", paged, paged_base),
            ):
                diffs = differences(methods, baseline, nk)
                timed = run_rounds(methods, nk, args.steps, args.rounds, no_sync)
                lines += table(f"{label}, nk = {nk}, {kind} cache", timed, baseline, 1, diffs)
                print(f"  cpu {label} nk={nk} {kind}: done", flush=True)
    return lines


# ----------------------------------------------------------------------------- GPU
@dataclass
class GpuSizes:
    batch: int
    heads: int
    kv_heads: int
    dim: int
    page: int
    window: int
    lengths: tuple[int, ...]
    dtype: torch.dtype
    device: str


def gpu_sizes(args) -> GpuSizes:
    if args.gpu_toy:  # the section's code on CPU tensors under the interpreter
        return GpuSizes(1, 4, 2, 16, 64, 64, (256,), torch.float32, "cpu")
    lengths = (4096, 32768) if args.quick else (4096, 16384, 65536, 131072)
    return GpuSizes(4, 32, 8, 128, 256, 4096, lengths, torch.bfloat16, "cuda")


def flash_kvcache():
    """flash_attn's ``flash_attn_with_kvcache`` and its version, or None and why not."""
    try:
        import flash_attn
        from flash_attn import flash_attn_with_kvcache
    except Exception as err:  # not installed, or built for another torch
        return None, f"not available ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
    return flash_attn_with_kvcache, flash_attn.__version__


def gpu_methods(attn, c: Caches, sz: GpuSizes, window, flex, flash) -> tuple[dict, dict]:
    """(contiguous methods, paged methods); the baselines are the SDPA ones."""
    dev, qf = sz.device, c.q.transpose(1, 2).contiguous()
    size = (window - 1, 0) if window else (-1, -1)
    contiguous, paged = kv_methods("attnc triton", attn, c, window, flex, dev, "SDPA", "SDPA, gathered pages")
    if flash is not None:
        contiguous["flash_attn_with_kvcache"] = lambda n: flash(
            qf, c.flash_k, c.flash_v, cache_seqlens=c.seqlens(n), causal=True, window_size=size
        ).transpose(1, 2)
        paged["flash_attn_with_kvcache, paged"] = lambda n: flash(
            qf,
            c.k_pages,
            c.v_pages,
            cache_seqlens=c.seqlens(n),
            block_table=c.block_table,
            causal=True,
            window_size=size,
        ).transpose(1, 2)
    return contiguous, paged


def failure_text(err: BaseException) -> str:
    """The error and, where it was raised while handling another, the first one (a failed capture's
    cause, not only the capture's end)."""
    first = err
    while first.__cause__ or first.__context__:
        first = first.__cause__ or first.__context__
    text = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
    if first is not err:
        text += f" (first: {type(first).__name__}: {str(first).splitlines()[0][:300] if str(first) else ''})"
    return text.replace("|", "/")


def captured(fn):
    """``(graph, output)``: ``fn`` warmed up on a side stream (as torch's docs ask), then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def graph_replay(fn, replays: int, rounds: int):
    """(median ms per replay, max |replay - eager|, failure text) of ``fn`` captured in a CUDA graph."""
    try:
        graph, out = captured(fn)
        graph.replay()
        torch.cuda.synchronize()
    except Exception as err:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass
        return None, None, failure_text(err)
    diff = float((out.float() - fn().float()).abs().max())
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) / replays)
    return statistics.median(times) * 1e3, diff, "captured"


def graph_section(attn, c: Caches, nk: int, window, args) -> list[str]:
    """One decode step at a fixed nk: eager, and replayed from a CUDA graph (attnc and SDPA)."""
    mask = window_row(nk, window, "cuda")
    kv = (c.k[:, :, :nk], c.v[:, :, :nk])
    rows = {"SDPA": lambda: sdpa(c.q, *kv, mask), "attnc triton": lambda: attn(c.q, *kv)}
    head = "| method | eager ms per step (fixed nk) | graph replay ms | max abs diff, replay vs eager | capture |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, fn in rows.items():
        eager = run_rounds(
            {name: lambda n, fn=fn: fn()}, nk, args.steps, args.rounds, torch.cuda.synchronize
        )
        replay, diff, text = graph_replay(fn, args.steps, args.rounds)
        lines.append(
            f"| {name} | {eager[name].median * 1e3:.3f} | {'-' if replay is None else f'{replay:.3f}'} | "
            f"{'-' if diff is None else f'{diff:.3g}'} | {text} |"
        )
    return lines + [""]


def paged_graph_across_steps(attn, c: Caches, nk: int, steps: int) -> list[str]:
    """One paged decode step captured once in a CUDA graph with its lengths in a device tensor, then replayed at
    ``steps`` growing lengths (the tensor incremented between replays, as a serving loop does): each replay's output
    against the eager call at its length, and the replay time beside the eager step's."""
    lengths = c.seqlens(nk)
    call = lambda: attn(c.q, c.k_pages, c.v_pages, block_table=c.block_table, cache_seqlens=lengths)  # noqa: E731
    head = "| method | eager ms per step | graph replay ms per step | max abs diff over the steps | capture |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    try:
        graph, out = captured(call)
        torch.cuda.synchronize()
    except Exception as err:
        return lines + [f"| attnc triton, paged | - | - | - | {failure_text(err)} |", ""]
    diff, replay = 0.0, []
    for _ in range(steps):
        lengths.add_(1)
        torch.cuda.synchronize()
        t = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        replay.append(time.perf_counter() - t)
        diff = max(diff, float((out.float() - call().float()).abs().max()))
    eager = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        torch.cuda.synchronize()
        eager.append(time.perf_counter() - t)
    return lines + [f"| attnc triton, paged (one graph, {steps} lengths from {nk + 1}) | "
                    f"{statistics.median(eager) * 1e3:.3f} | {statistics.median(replay) * 1e3:.3f} | {diff:.3g} | "
                    "captured once, replayed at every length |", ""]


def gpu_section(args) -> list[str]:
    sz = gpu_sizes(args)
    cuda = sz.device == "cuda"
    flash, flash_version = flash_kvcache() if cuda else (None, "not tried on CPU tensors")
    steps, rounds = (1, 1) if args.gpu_toy else (args.steps, args.rounds)
    lines = [
        "## GPU: attnc's Triton kernels against SDPA, Flex decoding and flash_attn_with_kvcache"
        + (" (toy sizes on CPU tensors: a check of the script)" if args.gpu_toy else ""),
        "",
        f"{sz.dtype}, batch {sz.batch}, {sz.heads} query heads sharing {sz.kv_heads} K/V heads, d {sz.dim}; "
        f"{steps} steps a round, median of {rounds} rounds; paged: {sz.page}-key pages, shuffled; "
        f"flash_attn: {flash_version}.",
        "",
    ]
    patterns = [
        ("causal", CAUSAL, None),
        (f"sliding window {sz.window}", "stdlib:sliding_window", sz.window),
    ]
    modules = {}
    for label, src, window in patterns:
        modules[label] = attnc.compile_attention(
            src, backend="triton", **({"window": window} if window else {})
        )
        for nk in sz.lengths:
            lines += gpu_case(label, modules[label], window, nk, sz, flash, steps, rounds)
    if cuda:  # last: a failed capture must not disturb the timings
        for label, _, window in patterns:
            nk = sz.lengths[0]
            c = Caches.make(
                sz.batch, sz.heads, sz.kv_heads, sz.dim, nk, sz.page, sz.dtype, sz.device
            )
            lines += [f"### {label}: one step at nk = {nk} in a CUDA graph", ""]
            lines += graph_section(modules[label], c, nk, window, args)
            grown = Caches.make(sz.batch, sz.heads, sz.kv_heads, sz.dim, rounded_up(nk + args.steps + 1, sz.page),
                                sz.page, sz.dtype, sz.device)
            lines += [f"### {label}: a paged step captured once, replayed as the cache grows from nk = {nk}", ""]
            lines += paged_graph_across_steps(modules[label], grown, nk, args.steps)
    return lines


def gpu_case(label, attn, window, nk, sz: GpuSizes, flash, steps, rounds) -> list[str]:
    """The contiguous and paged tables of one pattern at one nk."""
    length = rounded_up(nk + (rounds + 1) * steps + 1, max(sz.page, FLEX_BLOCK))
    c = Caches.make(
        sz.batch,
        sz.heads,
        sz.kv_heads,
        sz.dim,
        length,
        sz.page,
        sz.dtype,
        sz.device,
        flash=flash is not None,
    )
    flex = FlexDecoder(window, length, sz.device)
    contiguous, paged = gpu_methods(attn, c, sz, window, flex, flash)
    sync = torch.cuda.synchronize if sz.device == "cuda" else no_sync
    lines = []
    for kind, methods, baseline in (
        ("contiguous", contiguous, "SDPA"),
        ("paged", paged, "SDPA, gathered pages"),
    ):
        diffs = differences(methods, baseline, nk)
        timed = run_rounds(methods, nk, steps, rounds, sync)
        done = table(f"{label}, nk = {nk}, {kind} cache", timed, baseline, sz.batch, diffs)
        lines += done
        print("\n".join(done), flush=True)  # in the log as it finishes: a run cut short keeps its tables
    return lines


# ----------------------------------------------------------------------------- main
def header(args, sections) -> list[str]:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return [
        f"# decode steps: attnc against SDPA, Flex decoding and FlashAttention ({datetime.date.today().isoformat()})",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"GPU: {gpu}; load average {os.getloadavg()[0]:.1f} at start",
        f"- python {platform.python_version()}, torch {torch.__version__}, Triton {triton.__version__}, "
        f"attnc {attnc.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}",
        f"- `python benchmarks/decode.py {' '.join(args.argv)}`: sections {', '.join(sections)}",
        "- one new query per row and step after nk cached keys, the cache growing by one key per step; "
        "methods interleaved per round, median over the rounds after a warm-up round; ratios to the "
        "table's baseline, run in the same process",
        "",
    ]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer lengths and rounds (about a minute on 2 cores)"
    )
    parser.add_argument("--out", default=None, help="write the markdown tables to this file")
    parser.add_argument("--sections", default=None, help="comma-separated: interpreter, cpu, gpu")
    parser.add_argument(
        "--rounds", type=int, default=None, help="timed rounds (default 5; --quick 3)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="steps a round (default 16; --quick 8)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch's CPU threads (default 1 on a CPU)"
    )
    parser.add_argument(
        "--gpu-toy", action="store_true", help="the gpu section on CPU tensors at toy sizes"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.steps = args.steps or (8 if args.quick else 16)
    return args


def main(argv=None):
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    if args.threads or not torch.cuda.is_available():
        # a decode step is too small to share: with two threads on a busy 2-core machine every op
        # waited about 16 ms for its second thread (SDPA over 256 keys: 16 ms, against 0.02 ms alone)
        torch.set_num_threads(args.threads or 1)
    default = "gpu" if torch.cuda.is_available() or args.gpu_toy else "interpreter,cpu"
    sections = [s.strip() for s in (args.sections or default).split(",") if s.strip()]
    unknown = set(sections) - {"interpreter", "cpu", "gpu"}
    if unknown or ("gpu" in sections and not (torch.cuda.is_available() or args.gpu_toy)):
        raise SystemExit(
            f"--sections: unknown {sorted(unknown)}"
            if unknown
            else "--sections gpu needs CUDA (or --gpu-toy)"
        )
    run = {"interpreter": interpreter_section, "cpu": cpu_section, "gpu": gpu_section}
    wall, used = time.perf_counter(), time.process_time()
    lines = header(args, sections)
    for name in sections:
        print(f"section {name} ...", flush=True)
        lines += run[name](args)
    lines += [
        f"Run: {time.perf_counter() - wall:.0f} s wall, {time.process_time() - used:.0f} s CPU (this process)."
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
