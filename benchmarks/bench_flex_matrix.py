"""CPU benchmark matrix: attnc against FlexAttention and SDPA (recorded, not a timed test).

    python benchmarks/bench_flex_matrix.py [--quick] [--cases sw512_8k,nbhd2d_64,...] [--repeat 5]
        [--modes fwd,fwdbwd,first] [--cell-budget 15] [--out benchmarks/results/flex-matrix-DATE.md]

Cost on a 2-core CPU: ``--quick`` took 46-105 s wall (42-53 s CPU, 2026-11-25, load average 5-8 from
other jobs). It runs three cases (``QUICK_CASES``: a sliding window, a 2-D neighborhood, MoBA
routing) at tiny sizes (512 tokens, a 16x16 grid), the first-call row on the sliding window only,
cells capped at ``--cell-budget 10``; most of its time is FlexAttention's ``torch.compile`` (once
per case in the process, and again in the first-call subprocess), so at those sizes its ratios speak
for per-call overhead and the first-call cost, not for speed at scale. The full matrix (all 14 cases
at 8K-16K tokens, Quest also at 32K, first-call rows on 4) takes about 20-30 minutes on an idle machine
(not measured as one run: the sum of the recorded per-case times, 35-140 s a case, radial up to 5 min
and Quest at 32K 4 min, in benchmarks/results/flex-matrix-*.md); ``--cases`` runs some (``--list`` names them).

Per case (fp32, batch 1, head dim 64; 8 heads on sequences, 4 on grids), in
one process, interleaved rounds (``bench_flex.interleaved``), the median:

- columns: attnc ``backend="auto"`` (with the backend it chose when the module
  says, ``chosen_backend``), ``"cpu"`` and ``"flex"``; FlexAttention as a user
  writes it (a hand-written mask_mod, ``create_block_mask``,
  ``torch.compile(flex_attention)``); SDPA with the materialised boolean mask;
- ``fwd``: forward under ``no_grad``; ``fwdbwd``: forward and
  ``torch.autograd.grad`` of q, k, v (FlexAttention has no CPU backward in
  torch 2.13: that cell says so);
- ``first``: the first-call cost, each measurement in a fresh subprocess with
  an empty inductor cache (imports not counted): attnc ``load`` +
  ``compile_attention`` + the first call, against Flex's ``create_block_mask``
  + the first compiled call (``auto`` keeps its break-even rule there: the
  executor serves the first call while Flex's kernel is not compiled; the
  steady-state cells set ``backend_choice.COMPILE_COST_S = 0``: compile at once);
- MoBA routing: the Flex user computes the routing and a new BlockMask on every
  call (``create_block_mask``), and SDPA a new dense mask: both are in their time.

Every attnc output (and its gradients) is checked against a baseline's once
per case before timing (FlexAttention forward, SDPA gradients). A baseline that
fails (an error, or a dense buffer that would not fit in memory: checked before
it runs) prints its reason in its cell. Each cell runs ``--repeat`` times, fewer
(never below 3) when one run takes longer than ``--cell-budget / --repeat``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import attnc
from attnc.runtime.auto import cpu as backend_choice

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_flex import interleaved  # noqa: E402  (the shared timing helper)

D = 64
ATTNC = ("auto", "cpu", "flex")
COLUMNS = tuple(f"attnc {b}" for b in ATTNC) + ("Flex", "SDPA")
#: fp32 agreement required before timing (sums over thousands of keys in different orders)
OUT_TOL = {"atol": 2e-5, "rtol": 1e-4}
GRAD_TOL = {"atol": 1e-4, "rtol": 1e-3}
#: Flex's dense CPU path (backend="flex" with gradients) holds about this many [B, H, N, N] fp32
#: buffers (measured: VmHWM growth 7.3-7.6x at 1-2K tokens, 8 heads)
DENSE_FLEX_BUFFERS = 8


# ---------------------------------------------------------------- hand-written Flex masks (what a user writes)
def sliding(window):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
    return mask_mod


def streaming(window, sinks):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx - kv_idx < window) | (kv_idx < sinks))
    return mask_mod


def document(doc):
    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc[q_idx] == doc[kv_idx])
    return mask_mod


def power(block, local):
    def mask_mod(b, h, q_idx, kv_idx):
        blk = q_idx // block - kv_idx // block
        return (q_idx >= kv_idx) & ((blk < local) | ((blk & (blk - 1)) == 0) | (kv_idx < block))
    return mask_mod


def natten_axis(i, j, length, kernel, stride):
    """NATTEN's non-causal 1-D window (dilation 1): the stride group's leader, the window
    centred on it and shifted inward at the borders."""
    leader = torch.clamp((i // stride) * stride + stride // 2, max=length - 1)
    before, after = kernel // 2, kernel // 2 + kernel % 2 - 1
    centre = torch.clamp(leader, before, length - 1 - after)
    return (j - centre >= -before) & (j - centre <= after)


def natten(extents, kernels, strides):
    def mask_mod(b, h, q_idx, kv_idx):
        keep, qi, ki = None, q_idx, kv_idx
        for length, kernel, stride in reversed(list(zip(extents, kernels, strides, strict=True))):  # x first (row-major)
            axis = natten_axis(qi % length, ki % length, length, kernel, stride)
            keep = axis if keep is None else keep & axis
            qi, ki = qi // length, ki // length
        return keep
    return mask_mod


def radial(per_frame, frames, block=128, decay=1.0):
    """Radial Attention's token mask with per-frame-distance tables (as the radial-attention code)."""
    band = [2 ** per_frame.bit_length() / 2 ** d.bit_length() for d in range(frames)]
    width = torch.tensor([max(b * decay, block) for b in band], dtype=torch.float64)
    step_ok = torch.tensor([b >= block or d % (block // b) == 0 for d, b in enumerate(band)])

    def mask_mod(b, h, q_idx, kv_idx):
        d = (q_idx // per_frame - kv_idx // per_frame).abs()
        s = (q_idx % per_frame - kv_idx % per_frame).abs()
        return (d <= 1) | ((s <= width[d]) & step_ok[d])
    return mask_mod


def moba_select(q, k, block, topk, force_own=True):
    """MoBA routing as its code: q . mean(k_block) per query (fp32, unscaled), later blocks
    excluded, the own block forced (``force_own``; token top-k: blocks of 1, nothing forced);
    ``[H, N, nblocks]`` bool and the scores."""
    _, H, N, _ = q.shape
    nb = N // block
    k_mean = k[0].unflatten(1, (nb, block)).mean(2)  # [H, nb, D]
    score = q[0] @ k_mean.transpose(-1, -2)  # [H, N, nb]
    pos = torch.arange(N)
    score = score.masked_fill((torch.arange(nb) * block)[None, None, :] > pos[None, :, None], -math.inf)
    if force_own:
        score = score.scatter(-1, (pos // block)[None, :, None].expand(H, N, 1), math.inf)
    chosen = score.topk(topk, dim=-1).indices
    sel = torch.zeros(H, N, nb, dtype=torch.bool).scatter_(-1, chosen, True)
    return sel & (score > -math.inf), score  # never a later block (fewer allowed than topk: all of them)


def quest_select(q, k, page, budget):
    """Quest's page selection as its code makes it per decode step, for every query: per page the bound
    sum_d max(q_d * max k_d, q_d * min k_d) over its keys (fp32, unscaled), later pages excluded, the top
    max(3, min(N, budget) // page); ``[H, N, pages]`` bool and the scores."""
    _, H, N, _ = q.shape
    nb = -(-N // page)
    pad = nb * page - N
    blocks = torch.nn.functional.pad(k[0], (0, 0, 0, pad), value=float("nan")).unflatten(1, (nb, page))
    kmax, kmin = blocks.nan_to_num(-math.inf).amax(2), blocks.nan_to_num(math.inf).amin(2)  # [H, nb, D]
    score = q[0].clamp(min=0) @ kmax.transpose(-1, -2) + q[0].clamp(max=0) @ kmin.transpose(-1, -2)
    pos = torch.arange(N)
    score = score.masked_fill((torch.arange(nb) * page)[None, None, :] > pos[None, :, None], -math.inf)
    chosen = score.topk(min(max(3, min(N, budget) // page), nb), dim=-1).indices
    sel = torch.zeros(H, N, nb, dtype=torch.bool).scatter_(-1, chosen, True)
    return sel & (score > -math.inf), score


def grid_blocks(case) -> torch.Tensor:
    """VMoBA's block of every token of the case's (frames, height, width) grid, row-major over the blocks."""
    extents = [case.sizes[a] for a in ("frames", "height", "width")]
    chunk = case.route[1]
    t, y, x = torch.meshgrid(*(torch.arange(e) for e in extents), indexing="ij")
    tiles = [-(-e // c) for e, c in zip(extents, chunk, strict=True)]
    return ((t // chunk[0] * tiles[1] + y // chunk[1]) * tiles[2] + x // chunk[2]).flatten()


def vmoba_select(q, k, key_block, threshold):
    """VMoBA's threshold selection as its code makes it (KwaiVGI/VMoBA's ``_select_threshold_head_global``
    in token order): per head, q . mean(k_block) (fp32, unscaled) min-max normalised over every (block,
    query) pair, the own block kept, the others taken by normalised score until their running share reaches
    the threshold less the own blocks' share; ``[H, N, blocks]`` bool and the normalised scores."""
    _, H, N, _ = q.shape
    nb = int(key_block.max()) + 1
    onehot = torch.nn.functional.one_hot(key_block, nb).to(k.dtype)
    k_mean = (onehot.T @ k[0]) / onehot.sum(0)[None, :, None]  # [H, nb, D]
    score = q[0] @ k_mean.transpose(-1, -2)  # [H, N, nb]
    own = onehot.bool()[None].expand(H, N, nb)
    low = score.amin(dim=(1, 2), keepdim=True)
    spread = score.amax(dim=(1, 2), keepdim=True) - low
    norm = (score - low) / torch.where(spread <= 1e-6, torch.ones_like(spread), spread)
    total = norm.sum(dim=(1, 2))
    needed = (threshold - (norm * own).sum(dim=(1, 2)) / (total + 1e-6)).clamp(min=0)
    others = norm.masked_fill(own, 0).transpose(1, 2).reshape(H, -1)  # (block, query) order, as the code's
    values, order = others.sort(dim=1, descending=True, stable=True)
    reached = values.cumsum(1) / (total[:, None] + 1e-6) >= needed[:, None]
    cut = torch.where(reached.any(1), reached.float().argmax(1), torch.full((H,), others.shape[1] - 1))
    taken = torch.zeros_like(reached).scatter_(1, order, torch.arange(others.shape[1])[None] <= cut[:, None])
    return own | taken.view(H, nb, N).transpose(1, 2), norm


def anchor_select(q, k, block, step, init, theta):
    """AnchorAttention's kernels' rule (yuzhouzhang9/Anchor-Attention at fdc74208, every key counted once): each
    query's anchor, its largest ``q . k / sqrt(d)`` over the initial keys and its own group (causal); a column
    passes for a block where its mean query's score plus theta reaches the block's mean anchor; the group keeps
    the columns before it that any of its blocks passed; the last N mod group queries dense. ``([H, N, N] bool,
    margins [H, blocks, N])``, the margins the mean query's score plus theta minus the mean anchor."""
    _, H, N, D = q.shape
    group = block * step
    full = N - N % group
    pos = torch.arange(N)
    causal = pos[None, :] <= pos[:, None]
    region = causal & ((pos[None, :] < init) | (pos[None, :] // group == pos[:, None] // group))
    anchor = (q[0, :, :full] @ k[0].transpose(-1, -2) * D ** -0.5).masked_fill(~region[:full], -math.inf).amax(-1)
    q_mean = q[0, :, :full].unflatten(1, (full // block, block)).mean(2)
    margin = q_mean @ k[0].transpose(-1, -2) * D ** -0.5 + theta - anchor.unflatten(1, (full // block, block)).mean(
        2)[..., None]
    candidate = (pos >= init) & (pos < torch.arange(0, full, group)[:, None])  # the columns before each group
    stripes = (margin >= 0).unflatten(1, (full // group, step)).any(2) & candidate
    sel = region.expand(H, N, N).clone()
    sel[:, :full] |= stripes.repeat_interleave(group, 1)
    sel[:, full:] = causal[full:]
    return sel, margin


def route_select(case, q, k):
    """The case's routing as its authors' code computes it: ``(selected [H, N, blocks], scores)``."""
    if case.route[0] == "anchor":
        return anchor_select(q, k, *case.route[1:])
    if case.route[0] == "quest":
        return quest_select(q, k, *case.route[1:])
    if case.route[0] == "vmoba":
        return vmoba_select(q, k, grid_blocks(case), case.route[2])
    return moba_select(q, k, *case.route)


def route_key_blocks(case) -> torch.Tensor:
    """The block of every key of a routed case."""
    if case.route[0] == "vmoba":
        return grid_blocks(case)
    if case.route[0] == "anchor":  # single keys
        return torch.arange(case.n)
    return torch.arange(case.n) // (case.route[1] if case.route[0] == "quest" else case.route[0])


def route_topk(case) -> int:
    if case.route[0] == "quest":
        _, page, budget = case.route
        return max(3, min(case.n, budget) // page)
    return case.route[1]


def routed_mask(sel, key_block, causal: bool):
    def mask_mod(b, h, q_idx, kv_idx):
        chosen = sel[h, q_idx, key_block[kv_idx]]
        return (q_idx >= kv_idx) & chosen if causal else chosen
    return mask_mod


# ---------------------------------------------------------------- cases
#: ``--quick``'s cases and first-call case (when --cases / --first-call-cases are not given): one
#: sequence, one grid and one routed pattern, at the tiny sizes of ``cases(quick=True)``
QUICK_CASES, QUICK_FIRST_CALL = "sw512_8k,nbhd2d_64,moba", "sw512_8k"
QUICK_CELL_BUDGET = 10.0
FULL_FIRST_CALL = "sw512_8k,document,nbhd2d_64,nbhd3d"


@dataclass
class Case:
    key: str
    label: str
    spec: str
    params: dict
    n: int
    heads: int
    mask_mod: Callable | None = None  # None: routed (built per call from q, k)
    sizes: dict | None = None
    inputs: dict = field(default_factory=dict)
    # MoBA (block, topk, own block forced); token top-k (1, topk, False); ("quest", page, budget);
    # ("vmoba", (frames, height, width) of a block, threshold); ("anchor", block, step, init, theta)
    route: tuple | None = None
    seed: int = 0


def doc_ids(n, mean_len, seed):
    g = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(torch.randint(mean_len // 4, 2 * mean_len, (1,), generator=g)))
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[:n].contiguous()


def grid_case(key, label, spec, extents, names, kernels, strides, heads):
    params = {f"kernel_size_{a}": kk for a, kk in zip(names, kernels, strict=True)}
    params.update({f"stride_{a}": s for a, s in zip(names, strides, strict=True) if s != 1})
    size_names = {"t": "frames", "y": "height", "x": "width"}
    return Case(key, label, spec, params, math.prod(extents), heads, natten(extents, kernels, strides),
                sizes={size_names[a]: e for a, e in zip(names, extents, strict=True)})


def vmoba_case(key, layer, extents, chunk, heads):
    """VMoBA's layer ``layer`` (1: 2-D tiles over every frame, 2: 3-D boxes) at its Wan chunk sizes."""
    n = math.prod(extents)
    kind = {1: "2-D tiles", 2: "3-D boxes"}[layer]
    return Case(key, f"VMoBA {kind} {'x'.join(map(str, chunk[1:] if layer == 1 else chunk))}, threshold 0.25 "
                     f"@ {'x'.join(map(str, extents))} = {n}", "stdlib:vmoba", {"layer": layer}, n, heads, None,
                sizes=dict(zip(("frames", "height", "width"), extents, strict=True)), route=("vmoba", chunk, 0.25))


def cases(quick: bool) -> dict[str, Case]:
    """The matrix's cases by key (``--quick``: the same patterns at tiny sizes)."""
    s = (lambda full, tiny: tiny) if quick else (lambda full, tiny: full)
    n8, n16 = s(8192, 512), s(16384, 1024)
    doc = doc_ids(n8, s(1024, 96), seed=3)
    fr, pf = s(16, 8), s(512, 64)
    out = [
        Case("sw512_8k", f"causal sliding window {s(512, 64)} @ {n8}", "stdlib:sliding_window",
             {"window": s(512, 64)}, n8, 8, sliding(s(512, 64))),
        Case("sw1024_16k", f"causal sliding window {s(1024, 128)} @ {n16}", "stdlib:sliding_window",
             {"window": s(1024, 128)}, n16, 8, sliding(s(1024, 128))),
        Case("streaming", f"streaming, {s(1020, 60)} + 4 sinks @ {n8}", "stdlib:streaming",
             {"window": s(1020, 60), "sinks": 4}, n8, 8, streaming(s(1020, 60), 4)),
        Case("document", f"document masking, {int(doc.max()) + 1} documents @ {n8}", "stdlib:document", {},
             n8, 8, document(doc), inputs={"doc": doc}),
        Case("power_16k", f"PowerAttention block {s(256, 32)}, 5 local @ {n16}", "stdlib:power",
             {"block": s(256, 32), "local": 5}, n16, 8, power(s(256, 32), 5)),
        grid_case("nbhd2d_64", f"2-D neighborhood {s(13, 5)}^2 @ {s(64, 16)}^2", "stdlib:neighborhood_2d",
                  (s(64, 16),) * 2, "yx", (s(13, 5),) * 2, (1, 1), 4),
        grid_case("nbhd2d_96", f"2-D neighborhood {s(13, 5)}^2 @ {s(96, 24)}^2", "stdlib:neighborhood_2d",
                  (s(96, 24),) * 2, "yx", (s(13, 5),) * 2, (1, 1), 4),
        grid_case("nbhd3d", f"3-D neighborhood 3x{s(7, 5)}x{s(7, 5)} @ 8x{s(24, 10)}x{s(24, 10)}",
                  "stdlib:neighborhood_3d", (8, s(24, 10), s(24, 10)), "tyx", (3, s(7, 5), s(7, 5)), (1, 1, 1), 4),
        grid_case("nbhd3d_strided", f"3-D neighborhood 3x{s(7, 5)}x{s(7, 5)} stride 2x4x4 @ 8x{s(24, 10)}x{s(24, 10)}",
                  "stdlib:neighborhood_3d", (8, s(24, 10), s(24, 10)), "tyx", (3, s(7, 5), s(7, 5)), (2, 4, 4), 4),
        Case("radial", f"radial, {fr} frames x {pf} tokens, block {s(128, 16)}", "stdlib:radial",
             {"block": s(128, 16)}, fr * pf, 4, radial(pf, fr, s(128, 16)), sizes={"frames": fr, "per_frame": pf}),
        Case("moba", f"MoBA block {s(512, 64)} top-{s(4, 3)} @ {n8}", "stdlib:moba",
             {"block": s(512, 64), "topk": s(4, 3)}, n8, 8, None, route=(s(512, 64), s(4, 3), True)),
        Case("token_topk", f"token top-{s(512, 16)} (q . k) @ {n8}", "stdlib:token_topk",
             {"topk": s(512, 16)}, n8, 4, None, route=(1, s(512, 16), False)),
        Case("quest", f"Quest page {s(64, 16)} budget {s(1024, 64)} @ {n8}", "stdlib:quest",
             {"page": s(64, 16), "token_budget": s(1024, 64)}, n8, 8, None, route=("quest", s(64, 16), s(1024, 64))),
        Case("quest_32k", f"Quest page 64 budget 2048 @ {s(32768, 1024)}", "stdlib:quest",
             {"page": 64, "token_budget": 2048}, s(32768, 1024), 2, None, route=("quest", 64, 2048)),
        Case("anchor", f"AnchorAttention blocks {s(128, 16)} x {s(16, 4)}, theta 12 @ {n8}", "stdlib:anchor",
             {"block": s(128, 16), "step": s(16, 4), "init": s(2048, 64), "theta": 12.0}, n8, 4, None,
             route=("anchor", s(128, 16), s(16, 4), s(2048, 64), 12.0)),
        Case("anchor_16k", f"AnchorAttention blocks {s(128, 16)} x {s(16, 4)}, theta 12 @ {n16}", "stdlib:anchor",
             {"block": s(128, 16), "step": s(16, 4), "init": s(2048, 64), "theta": 12.0}, n16, 2, None,
             route=("anchor", s(128, 16), s(16, 4), s(2048, 64), 12.0)),
        vmoba_case("vmoba", 1, (16, s(24, 6), s(32, 8)), (16, 3, 4), 4),
        vmoba_case("vmoba_30k", 2, (16, s(48, 6), s(40, 8)), (4, 6, 4), 2),
    ]
    return {c.key: c for c in out}


# ---------------------------------------------------------------- memory
def _meminfo(field: str) -> int | None:
    """A /proc/meminfo field in bytes, or None."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


def mem_available() -> int:
    return _meminfo("MemAvailable") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits(what: str, nbytes: int, share: float = 0.6) -> None:
    """Refuse a dense buffer that would not fit (an OOM kill cannot be caught)."""
    avail = mem_available()
    if nbytes > share * avail:
        raise MemoryError(f"{what} needs ~{nbytes / 2**30:.1f} GiB, {share:.0%} of available is "
                          f"{share * avail / 2**30:.1f} GiB")


def sdpa_bytes(case: Case) -> int:
    """Memory of SDPA with a boolean mask on CPU, forward and backward: it materialises the scores
    per head. Measured VmHWM growth (torch 2.13, fp32, d 64, 2,048 tokens, a [1, N, N] mask) per N^2:
    14 bytes at 1 head, 52 at 4, 103 at 8 (forward + backward; forward 14 / 42 / 79): about
    (6 + 13 H) N^2. (The guard used 8 N^2 whatever the heads, and 16K tokens at 8 heads, 28 GB,
    were killed by the OOM killer.)"""
    return (6 + 13 * case.heads) * case.n * case.n


def cap_address_space(share: float = 0.95) -> None:
    """Cap this process's address space just under the machine's memory: an allocation past it
    fails as an error the cell records, where the kernel's OOM killer would end the whole run (seen:
    both 16K cases in one process, 24 GB resident on a 24 GiB machine)."""
    total = _meminfo("MemTotal") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = int(share * total)
    if soft == resource.RLIM_INFINITY or soft > cap:
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))


def dense_mask(case: Case, mask_mod, per_head: bool) -> torch.Tensor:
    """The boolean mask SDPA needs, evaluated from the same mask_mod in row chunks."""
    N, H = case.n, case.heads
    heads = H if per_head else 1
    fits("SDPA with a dense mask", sdpa_bytes(case))
    mask = torch.empty(heads, N, N, dtype=torch.bool)
    h = torch.arange(heads)[:, None, None] if per_head else torch.zeros((), dtype=torch.int64)
    kv = torch.arange(N)[None, None, :]
    step = max(1, 2**24 // (N * heads))
    for r0 in range(0, N, step):
        qi = torch.arange(r0, min(N, r0 + step))[None, :, None]
        mask[:, r0:r0 + qi.shape[1]] = mask_mod(torch.zeros((), dtype=torch.int64), h, qi, kv)
    return mask[None]


# ---------------------------------------------------------------- the callables of one case
def qkv(case: Case, grad: bool):
    g = torch.Generator().manual_seed(case.seed)
    return tuple(torch.randn(1, case.heads, case.n, D, generator=g).requires_grad_(grad) for _ in range(3))


def flex_compiled():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


class Baselines:
    """FlexAttention and SDPA as a user writes them for one case."""

    def __init__(self, case: Case):
        from torch.nn.attention.flex_attention import create_block_mask

        self.case, self.create_block_mask = case, create_block_mask
        self.flex = flex_compiled()
        self.block_mask = None
        self.sdpa_mask = None
        self.sdpa_error = None
        if case.route is None:
            t = time.perf_counter()
            self.block_mask = create_block_mask(case.mask_mod, None, None, case.n, case.n, device="cpu")
            self.block_mask_s = time.perf_counter() - t
            try:
                self.sdpa_mask = dense_mask(case, case.mask_mod, per_head=False)
            except MemoryError as err:
                self.sdpa_error = f"skipped: {err}"

    def flex_call(self, q, k, v):
        if self.case.route is None:
            return self.flex(q, k, v, block_mask=self.block_mask)
        sel, _ = route_select(self.case, q.detach(), k.detach())
        bm = self.create_block_mask(routed_mask(sel, route_key_blocks(self.case), self.case.route[0] != "vmoba"),
                                    None, self.case.heads, self.case.n, self.case.n, device="cpu")
        return self.flex(q, k, v, block_mask=bm)

    def sdpa_call(self, q, k, v):
        if self.sdpa_error:
            raise MemoryError(self.sdpa_error)
        mask = self.sdpa_mask
        if self.case.route is not None:
            sel, _ = route_select(self.case, q.detach(), k.detach())
            fits("SDPA with a dense per-head mask", sdpa_bytes(self.case))
            mask = sel[:, :, route_key_blocks(self.case)]
            if self.case.route[0] != "vmoba":
                mask &= torch.ones(self.case.n, self.case.n, dtype=torch.bool).tril()
            mask = mask[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def attnc_module(case: Case, backend: str):
    return attnc.compile_attention(case.spec, backend=backend, sizes=case.sizes, **case.params)


def chosen(module) -> str:
    got = getattr(module, "chosen_backend", None)
    return "-" if got is None else str(got)


def near_tie_rows(case: Case, q, k) -> torch.Tensor:
    """MoBA: query rows whose k-th and (k+1)-th block scores are within rounding ([H, N] bool):
    there two exact implementations may pick different blocks, both right."""
    if case.route[0] == "vmoba":  # entries of a head within rounding of the last one its threshold takes
        sel, norm = route_select(case, q.detach(), k.detach())
        taken = sel & ~torch.nn.functional.one_hot(grid_blocks(case)).bool()[None]
        last = torch.where(taken, norm, torch.inf).amin(dim=(1, 2), keepdim=True)
        return ((norm - last).abs() <= 1e-5).any(-1)
    if case.route[0] == "anchor":  # the queries of a group where a column's margin is within rounding of 0
        _, margin = route_select(case, q.detach(), k.detach())
        _, block, step, _, _ = case.route
        close = (margin.abs() <= 1e-5).unflatten(1, (-1, step)).any(-1).any(-1)  # [H, groups]
        rows = torch.zeros(margin.shape[0], case.n, dtype=torch.bool)
        rows[:, :close.shape[1] * block * step] = close.repeat_interleave(block * step, 1)
        return rows
    topk = route_topk(case)
    _, score = route_select(case, q.detach(), k.detach())
    top = score.sort(dim=-1, descending=True).values
    if top.shape[-1] <= topk:
        return torch.zeros(top.shape[:2], dtype=torch.bool)
    a, b = top[..., topk - 1], top[..., topk]
    return torch.isfinite(a) & torch.isfinite(b) & ((a - b).abs() <= 1e-5 * (1 + a.abs()))


def check_close(name: str, got, want, tol: dict, rows_ok=None) -> str:
    """Assert agreement (rows_ok: [H, N] rows exempt, MoBA near-ties); the max difference as text."""
    diff = (got.detach() - want.detach()).abs()
    if rows_ok is not None and rows_ok.any():
        diff = diff.masked_fill(rows_ok[None, :, :, None], 0)
        want = want.detach().masked_fill(rows_ok[None, :, :, None], 0)
        got = got.detach().masked_fill(rows_ok[None, :, :, None], 0)
    torch.testing.assert_close(got.detach(), want.detach(), **tol, msg=lambda m: f"{name}: {m}")
    return f"{float(diff.max()):.1e}"


# ---------------------------------------------------------------- running one case
@dataclass
class Cell:
    ms: float | None = None
    runs: int = 0
    note: str = ""


def time_cells(fns: dict, warmed: set, repeat: int, budget: float) -> dict[str, Cell]:
    """A warm-up run of each callable not in ``warmed`` (the checks ran those), then interleaved
    rounds; the first round's time sets each cell's number of runs: ``repeat``, or fewer (at
    least one) where ``repeat`` runs would take more than ``budget`` seconds."""
    cells, live = {}, {}
    for name, fn in fns.items():
        try:
            if name not in warmed:
                fn()
            live[name] = fn
        except Exception as err:  # noqa: BLE001 - the reason goes in the cell
            cells[name] = Cell(note=reason(err))
    first = interleaved(live, 1, warmup=False)
    counts = {n: max(0, min(repeat, int(budget / max(first[n][0], 1e-9))) - 1) for n in live}
    times = interleaved(live, counts, warmup=False)
    for name in live:
        runs = first[name] + times[name]
        cells[name] = Cell(1e3 * statistics.median(runs), len(runs))
    return cells


def reason(err: BaseException) -> str:
    """The cell's text for a failure: the error's type and first sentence."""
    msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {msg.split('. ')[0]}"[:160]


def selection_times(case: Case, base: Baselines, cpu_module, q, k, repeat: int) -> dict:
    """A routed case's selection alone, in ms (medians of interleaved runs): attnc's scores, choice and
    per-(batch, head) tile lists as a call makes them on its device before any kernel
    (``device_routes.route_call_plan`` over the cpu module's schedule), against the Flex user's selection
    with the authors' rule and its ``create_block_mask``."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.compiler.analysis.tiles import classify_tiles
    from attnc.runtime.plan import device_routes
    from attnc.runtime.plan.tile_plan import Plan

    pat = attnc.load(case.spec, **case.params)
    bound = E.bind_sizes(pat, n=case.n, nk=case.n, heads=case.heads, sizes=case.sizes or {}, dk=D)
    tiles = cpu_module.schedule
    plan = Plan.build(pat, bound, classify_tiles(pat, bound, tiles.q_tile, tiles.kv_tile))
    device_routes.route_call_plan(plan, q, k, {})  # the plan's constants, made once

    def theirs():
        sel, _ = route_select(case, q, k)
        base.create_block_mask(routed_mask(sel, route_key_blocks(case), case.route[0] != "vmoba"), None,
                               case.heads, case.n, case.n, device="cpu")

    runs = interleaved({"attnc": lambda: device_routes.route_call_plan(plan, q, k, {}), "Flex": theirs}, repeat)
    return {f"selection alone (ms): {name}": f"{1e3 * statistics.median(times):,.1f}" for name, times in
            (("attnc (scores, choice, tile lists)", runs["attnc"]),
             ("Flex user (the authors' rule + create_block_mask)", runs["Flex"]))}


def run_forward(case: Case, base: Baselines, mods: dict, repeat: int, budget: float) -> tuple[dict, dict]:
    q, k, v = qkv(case, grad=False)
    ref = None
    info = {}
    with torch.no_grad():
        try:
            ref, info["checked against"] = base.flex_call(q, k, v), "Flex"
        except Exception as err:  # noqa: BLE001
            info["Flex error"] = reason(err)
            ref, info["checked against"] = base.sdpa_call(q, k, v), "SDPA"
        ties = near_tie_rows(case, q, k) if case.route else None
        if ties is not None:
            info["near-tie rows exempt"] = int(ties.sum())
        for b, m in mods.items():
            info[f"max |attnc {b} - {info['checked against']}|"] = check_close(
                f"attnc {b} forward", m(q, k, v, **case.inputs), ref, OUT_TOL, ties)
            info[f"attnc {b} chose"] = chosen(m) if b == "auto" else b
        if case.route and "cpu" in mods:
            info.update(selection_times(case, base, mods["cpu"], q, k, repeat))
        fns = {f"attnc {b}": (lambda m=m: m(q, k, v, **case.inputs)) for b, m in mods.items()}
        fns["Flex"] = lambda: base.flex_call(q, k, v)
        fns["SDPA"] = lambda: base.sdpa_call(q, k, v)
        return time_cells(fns, {*fns} - {"SDPA"} - ({"Flex"} if "Flex error" in info else set()), repeat, budget), info


def dense_flex_bytes(case: Case) -> int:
    """What backend='flex' with gradients holds on CPU (Flex's dense implementation: scores,
    probabilities, their gradients and the mask's work, [B, H, N, N] each)."""
    return case.heads * case.n ** 2 * 4 * DENSE_FLEX_BUFFERS


def run_backward(case: Case, base: Baselines, mods: dict, repeat: int, budget: float,
                 dense_limit: float) -> tuple[dict, dict]:
    q, k, v = qkv(case, grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    info = {}
    if case.route:
        # MoBA near-ties: no gradient flows from those query rows, so that dq, dk and dv compare
        # exactly whichever blocks each implementation picked there
        ties = near_tie_rows(case, q, k)
        dout = dout.masked_fill(ties[None, :, :, None], 0)
        info["near-tie rows without gradient"] = int(ties.sum())

    def grads(fn):
        return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    def guarded(b, m):
        def call(q, k, v):
            # auto never takes Flex's dense path for gradients on CPU (backend_choice); its last
            # choice is the forward's, so it says nothing about this call
            if b == "flex":
                what = "Flex's dense CPU path (backend='flex' with gradients)"
                nbytes = dense_flex_bytes(case)
                if nbytes > dense_limit * 2**30:
                    raise MemoryError(f"{what} would hold ~{nbytes / 2**30:.0f} GiB (> --dense-limit "
                                      f"{dense_limit:g} GiB)")
                fits(what, nbytes)
            return m(q, k, v, **case.inputs)
        return call

    calls = {f"attnc {b}": guarded(b, m) for b, m in mods.items()}
    calls["Flex"] = base.flex_call
    calls["SDPA"] = base.sdpa_call
    want, against = None, None
    for name in ("SDPA", "attnc cpu"):  # the reference gradients: SDPA's, else the tile executor's
        try:
            want, against = grads(calls[name]), name
            break
        except Exception as err:  # noqa: BLE001
            info[f"{name} error"] = reason(err)
    info["checked against"] = against
    skip = {name for name in ("SDPA", "attnc cpu") if f"{name} error" in info}
    for name, fn in calls.items():
        if name == against or name in skip or not name.startswith("attnc"):
            continue
        try:
            got = grads(fn)
        except Exception as err:  # noqa: BLE001
            skip.add(name)
            info[f"{name} error"] = reason(err)
            continue
        diffs = [check_close(f"{name} d{t}", g, w, GRAD_TOL) for t, g, w in zip("qkv", got, want, strict=True)]
        info[f"max |d(q,k,v) {name} - {against}|"] = ", ".join(diffs)
    fns = {name: (lambda fn=fn: grads(fn)) for name, fn in calls.items() if name not in skip}
    cells = time_cells(fns, {*fns} - {"Flex"}, repeat, budget)
    for name in skip:
        cells[name] = Cell(note=info[f"{name} error"])
    return cells, info


# ---------------------------------------------------------------- first call (fresh subprocess each)
def first_call_child(key: str, which: str, quick: bool) -> dict:
    """In a fresh process: the first-call cost of ``which`` (an attnc backend, or "Flex")."""
    case = cases(quick)[key]
    q, k, v = qkv(case, grad=False)
    from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401  (imports not counted)

    with torch.no_grad():
        if which == "Flex":
            t = time.perf_counter()
            base = Baselines.__new__(Baselines)
            base.case, base.create_block_mask, base.flex = case, create_block_mask, flex_compiled()
            if case.route is None:
                base.block_mask = create_block_mask(case.mask_mod, None, None, case.n, case.n, device="cpu")
            base.flex_call(q, k, v)
            total = time.perf_counter() - t
            return {"s": total, "chose": "Flex"}
        t = time.perf_counter()
        pat = attnc.load(case.spec, **case.params)
        mod = attnc.compile_attention(pat, backend=which, sizes=case.sizes)
        mod(q, k, v, **case.inputs)
        total = time.perf_counter() - t
        return {"s": total, "chose": chosen(mod) if which == "auto" else which}


def first_call(key: str, which: str, quick: bool, timeout: float) -> Cell:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="attnc-first-call-"))
    cmd = [sys.executable, os.path.abspath(__file__), "--first-call-child", key, which] + (["--quick"] if quick else [])
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return Cell(note=f"timed out after {timeout:.0f} s")
    if run.returncode != 0:
        tail = (run.stderr.strip().splitlines() or ["?"])[-1]
        return Cell(note=f"exit {run.returncode}: {tail[:160]}")
    got = json.loads(run.stdout.strip().splitlines()[-1])
    return Cell(1e3 * got["s"], 0, "" if which != "auto" else f"(chose {got['chose']})")


# ---------------------------------------------------------------- report
def fmt_ms(cell: Cell | None) -> str:
    if cell is None:
        return "-"
    if cell.ms is None:
        return cell.note
    text = f"{cell.ms:,.0f}" if cell.ms >= 10 else f"{cell.ms:.2f}"
    return text + (f" ({cell.runs})" if cell.runs else "") + (f" {cell.note}" if cell.note else "")


def ratio(a: Cell | None, b: Cell | None) -> str:
    if a is None or b is None or a.ms is None or b.ms is None:
        return "-"
    return f"{a.ms / b.ms:.2f}"


def table(title: str, rows: list[tuple[str, dict]], baselines=("Flex", "SDPA")) -> list[str]:
    """A markdown table: one row per case, the times, then attnc / baseline ratios."""
    columns = [c for c in COLUMNS if c.startswith("attnc") or c in baselines]
    head = ["case", *columns] + [f"{b.split()[1]} / {base}" for base in baselines for b in COLUMNS[:3]]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for label, cells in rows:
        vals = [fmt_ms(cells.get(c)) for c in columns]
        vals += [ratio(cells.get(a), cells.get(base)) for base in baselines for a in COLUMNS[:3]]
        lines.append("| " + " | ".join([label, *vals]) + " |")
    return lines + [""]


def cpu_seconds() -> float:
    """CPU time of this process and its finished subprocesses (a load-independent size of the run)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def machine() -> str:
    import triton

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"- machine: {platform.machine()}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
            f"{ram:.0f} GiB RAM, {platform.platform()}\n"
            f"- python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help=f"tiny sizes, the cases {QUICK_CASES} (unless --cases), first call on {QUICK_FIRST_CALL}, "
                         f"--cell-budget {QUICK_CELL_BUDGET:g}: about a minute")
    ap.add_argument("--cases", default=None,
                    help="comma-separated case keys (default: all; --quick: " + QUICK_CASES + "); see --list")
    ap.add_argument("--list", action="store_true", help="print the case keys and exit")
    ap.add_argument("--modes", default="fwd,fwdbwd,first", help="any of fwd, fwdbwd, first")
    ap.add_argument("--first-call", default="auto,Flex",
                    help="what the first-call rows measure: attnc backends (auto, cpu, flex) and/or Flex")
    ap.add_argument("--first-call-cases", default=None,
                    help=f"the cases (of those selected) that get first-call rows, or 'all' "
                         f"(default {FULL_FIRST_CALL}; --quick: {QUICK_FIRST_CALL})")
    ap.add_argument("--repeat", type=int, default=5, help="timed runs per cell (median)")
    ap.add_argument("--cell-budget", type=float, default=None,
                    help="seconds per cell: a cell whose runs would take longer runs fewer times (at least once); "
                         f"default 15, --quick {QUICK_CELL_BUDGET:g}")
    ap.add_argument("--dense-limit", type=float, default=4.0,
                    help="GiB: backend='flex' with gradients (Flex's dense CPU path) is skipped above this")
    ap.add_argument("--first-call-timeout", type=float, default=600.0, help="seconds per first-call subprocess")
    ap.add_argument("--out", default=None, help="write the results as markdown to this file")
    ap.add_argument("--first-call-child", nargs=2, metavar=("CASE", "WHICH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first_call_cases is None:
        args.first_call_cases = QUICK_FIRST_CALL if args.quick else FULL_FIRST_CALL
    if args.cell_budget is None:
        args.cell_budget = QUICK_CELL_BUDGET if args.quick else 15.0
    if args.first_call_child:
        print(json.dumps(first_call_child(*args.first_call_child, args.quick)))
        return
    # steady state: auto compiles Flex's kernel at its first call where Flex is modelled faster (the
    # break-even rule of runtime.auto.cpu would serve the warm-up calls with the executor);
    # the first-call children above keep the rule
    backend_choice.COMPILE_COST_S = 0.0
    all_cases = cases(args.quick)
    if args.list:
        for key, c in all_cases.items():
            print(f"{key:16} {c.label}, {c.heads} heads")
        return
    keys = args.cases.split(",") if args.cases else QUICK_CASES.split(",") if args.quick else list(all_cases)
    unknown = [k for k in keys if k not in all_cases]
    if unknown:
        ap.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(all_cases)}")
    modes = args.modes.split(",")
    cap_address_space()
    started = time.perf_counter()
    header = [f"# attnc vs FlexAttention and SDPA on CPU, forward and forward+backward ({datetime.date.today()})", "",
              machine(), f"- load average {os.getloadavg()[0]:.1f} at start",
              "- `" + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]) + "`",
              f"- fp32, batch 1, head dim {D}; times in ms: the median of the number of runs in parentheses "
              f"(interleaved rounds after a warm-up; {args.repeat} runs, fewer, at least one, where {args.repeat} "
              f"would take more than {args.cell_budget:g} s); ratios: attnc / baseline (< 1: attnc faster)",
              f"- backend='flex' with gradients runs Flex's dense CPU path (O(N^2) memory): skipped above "
              f"{args.dense_limit:g} GiB",
              f"- first call ({'fresh subprocess each' if 'first' in modes else 'not run'}): {args.first_call} on "
              f"{args.first_call_cases}", ""]
    fwd_rows, bwd_rows, first_rows, notes = [], [], [], []
    for key in keys:
        case = all_cases[key]
        label = f"{case.label}, {case.heads} heads"
        print(f"== {key}: {label}", flush=True)
        t_case, cpu_case = time.perf_counter(), cpu_seconds()
        base = Baselines(case)
        mods = {b: attnc_module(case, b) for b in ATTNC}
        info = {}
        if "fwd" in modes:
            cells, info_f = run_forward(case, base, mods, args.repeat, args.cell_budget)
            fwd_rows.append((label, cells))
            info.update({f"fwd: {a}": b for a, b in info_f.items()})
            print(table("forward", fwd_rows[-1:])[2:-1][-1], flush=True)
        if "fwdbwd" in modes:
            cells, info_b = run_backward(case, base, mods, args.repeat, args.cell_budget, args.dense_limit)
            bwd_rows.append((label, cells))
            info.update({f"fwd+bwd: {a}": b for a, b in info_b.items()})
            print(table("fwd+bwd", bwd_rows[-1:])[2:-1][-1], flush=True)
        if "first" in modes and (args.first_call_cases == "all" or key in args.first_call_cases.split(",")):
            cells = {}
            for which in args.first_call.split(","):
                col = "Flex" if which == "Flex" else f"attnc {which}"
                cells[col] = first_call(key, which, args.quick, args.first_call_timeout)
            first_rows.append((label, cells))
            print(table("first call", first_rows[-1:], ("Flex",))[2:-1][-1], flush=True)
        info["case time (s)"] = f"{time.perf_counter() - t_case:.0f} wall, {cpu_seconds() - cpu_case:.0f} CPU"
        notes.append(f"- {key} ({label}): " + "; ".join(f"{a} {b}" for a, b in info.items()))
        print(notes[-1], flush=True)
        del base, mods
        gc.collect()
        torch._dynamo.reset()  # this case's compiled Flex kernels and their guards
    body = []
    if fwd_rows:
        body += table("forward (ms)", fwd_rows)
    if bwd_rows:
        body += table("forward + backward (ms; FlexAttention has no CPU backward)", bwd_rows)
    if first_rows:
        body += table("first call (ms; fresh process and inductor cache each: attnc load + compile_attention + "
                      "call; Flex create_block_mask + first compiled call)", first_rows, ("Flex",))
    footer = ["### checks and notes", "", *notes, "",
              f"- total {time.perf_counter() - started:.0f} s wall, {cpu_seconds():.0f} s CPU (user + system, "
              f"subprocesses included); load average {os.getloadavg()[0]:.1f} at the end"]
    text = "\n".join(header + body + footer) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
