"""Cost model: predicted forward and backward time of a ``TileSchedule`` on a
hardware model, and the dense baseline modelled the same way.

The model, per kernel (forward: one CTA per (batch, head, Q tile) walking its
KV tiles; backward: one CTA per (batch, head, KV tile) walking its Q tiles):

- each visited tile pair costs its tensor-core work, ``2 Bq Bk D`` flops per
  matmul the kernel executes on it (``FWD_MATMULS`` forward; backward the
  dQ kernel's and the dK/dV kernel's, ``Calibration.bwd_matmuls``), at an
  attainable fraction of the per-SM peak fitted per architecture
  (``ArchFit``), overlapped with the HBM traffic it causes (K/V tiles
  forward and in the dQ kernel; Q, dO, lse and delta in the dK/dV kernel).
  ``Bq``, ``Bk`` are the kernel's BLOCK_M and BLOCK_N: the tiles' tokens padded to
  a power of two (``schedule.block_size``, what code generation runs: a 48-token
  tile computes on 64 rows); the bytes are the tiles' tokens (masked loads);
- a PARTIAL pair also evaluates the mask elementwise on ``Bq x Bk`` pairs:
  ``mask_ops`` operations (sympy's operation count of the mask, custom
  functions weighted) on the non-tensor ALUs;
- each CTA has a fixed prologue/epilogue (load its resident tile, write the
  output) and the uneven per-CTA work is placed on the SMs as the GPU places
  it: in launch order, each CTA on the SM that frees first, the order being
  the one the kernels launch in (tile order, or longest first where that
  pays: ``compiler.cost.launch_order``); the kernel time is the makespan plus a launch; the backward is two
  kernels (dQ: one CTA per Q tile; dK/dV: one CTA per KV tile) one after the
  other, as ``runtime/triton_backend.py`` launches them;
- token permutation (multi-dimensional tiles made contiguous) reads and
  writes q, k, v and o once (forward) or do, dq, dk, dv (backward);
  in-kernel multi-dimensional addressing instead pays a little per KV tile.

The attainable fractions and per-CTA overheads of A100 and H100 are fitted to
published dense FlashAttention-2-class throughput (``compiler.cost.published``;
``benchmarks/calibration.py --fit`` re-derives them, and writes the
predicted-vs-published table); the remaining constants in ``Calibration`` are
still estimates to be measured on a GPU. Data-sheet figures live in
``compiler.cost.hardware``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import sympy
import torch

from ...core.errors import SpecError
from ..analysis.schedule import TileSchedule, block_size
from . import launch_order
from .calibration import (  # noqa: F401 (the model's constants: its callers' defaults)
    ARCH_FITS,
    BWD_FLOP_RATIO,
    BWD_MATMULS,
    DEFAULT_CALIBRATION,
    FWD_MATMULS,
    PUBLISHED_BWD_FLOP_RATIO,
    SDPA_FITS,
    SDPA_TILES,
    ArchFit,
    Calibration,
)
from .hardware import Hardware
from .sm_placement import MAX_ROUNDS, makespan

LAYOUTS = ("flat", "permute", "address")
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2}


@dataclass(frozen=True)
class KernelConfig:
    """One candidate kernel: tile shapes, how tokens are laid out, warps and stages.

    ``layout``: "flat" (tiles are runs of the flat token order; no
    permutation), "permute" (multi-dimensional tiles made contiguous by a
    token permutation) or "address" (multi-dimensional tiles gathered by
    in-kernel addressing).
    """

    q_tile: tuple[int, ...]
    kv_tile: tuple[int, ...]
    layout: str = "flat"
    num_warps: int = 4
    num_stages: int = 2
    #: The backward kernels' launch parameters (0: the forward's), as FlexAttention's per-pass configs.
    bwd_num_warps: int = 0
    bwd_num_stages: int = 0
    #: The backward kernels' own tiles (empty: the forward's). The backward re-plans (classifies) at
    #: them, so they need not divide the forward's; smaller ones keep dK/dV within registers.
    bwd_q_tile: tuple[int, ...] = ()
    bwd_kv_tile: tuple[int, ...] = ()
    #: The dQ kernel's own tiles (empty: the backward's, above, which the dK/dV kernel runs). dQ keeps
    #: one accumulator where dK/dV keeps two and a score tile more, so it may fit larger tiles where
    #: dK/dV needs smaller ones: a 64-row Q tile, the tensor cores' minimum on Hopper and Blackwell
    #: (wgmma, tcgen05), where dK/dV fits only at 32 rows (FoX's backward).
    dq_q_tile: tuple[int, ...] = ()
    dq_kv_tile: tuple[int, ...] = ()
    #: Hopper and later: the streamed tiles loaded as boxes of tensor descriptors (TMA) rather than by
    #: pointer, where every pass's tile is one box: a run of memory rows or a box of a grid (``search.tma_fits``; a call whose
    #: tensors TMA cannot address loads by pointer). Same tiles, same answer: a schedule choice the tuner times.
    tma: bool = False
    #: The backward in one kernel, as FlashAttention-2's: the dK/dV kernel also adds each pair's dS K into an
    #: fp32 dQ with atomics, and no dQ kernel runs (5 matmuls a pair where the two kernels take 7; no dQ tiles
    #: of its own). Atomics add in no fixed order, so dQ differs from run to run in its last bits: a call under
    #: ``torch.use_deterministic_algorithms`` runs the dQ kernel, as does one that needs the decay gates' or a
    #: float bias input's gradients (``runtime.backends.triton.backward.atomic_dq_applies``). A choice the tuner times.
    atomic_dq: bool = False
    #: The forward's KV loop warp-specialized by Triton (``tl.range(warp_specialize=True)``): a producer warp
    #: group issues the tile loads while the others compute. On Blackwell the forward's two loops as they are;
    #: on Hopper, whose pass takes one loop with every load from a descriptor, the FULL and PARTIAL tiles in one
    #: loop, all masked, Q, K and V by TMA (with ``tma``, where ``search.tma_fits``; a route's kernel is left
    #: as it is). Same answer: a schedule choice the tuner times.
    warp_specialize: bool = False

    @property
    def own_backward_tiles(self) -> bool:
        return (bool(self.bwd_q_tile) and self.bwd_q_tile != self.q_tile) or (
            bool(self.bwd_kv_tile) and self.bwd_kv_tile != self.kv_tile)

    @property
    def own_dq_tiles(self) -> bool:
        """The dQ kernel runs tiles other than the dK/dV kernel's (its own plan)."""
        b = self.backward_config()
        return (bool(self.dq_q_tile) and self.dq_q_tile != b.q_tile) or (
            bool(self.dq_kv_tile) and self.dq_kv_tile != b.kv_tile)

    def backward_config(self) -> KernelConfig:
        """The config the backward kernels run (the dK/dV kernel, and the dQ kernel unless it has tiles of
        its own: ``dq_config``): the backward's own tiles (if any) and launch parameters."""
        if not self.own_backward_tiles:
            return self if not (self.dq_q_tile or self.dq_kv_tile) else dataclasses.replace(
                self, dq_q_tile=(), dq_kv_tile=())
        return dataclasses.replace(self, q_tile=self.bwd_q_tile or self.q_tile, kv_tile=self.bwd_kv_tile or self.kv_tile,
                                   num_warps=self.bwd_warps, num_stages=self.bwd_stages, bwd_q_tile=(), bwd_kv_tile=(),
                                   dq_q_tile=(), dq_kv_tile=())

    def dq_config(self) -> KernelConfig:
        """The config the dQ kernel runs: its own tiles where it has some, else ``backward_config``'s."""
        b = self.backward_config()
        if not self.own_dq_tiles:
            return b
        return dataclasses.replace(b, q_tile=self.dq_q_tile or b.q_tile, kv_tile=self.dq_kv_tile or b.kv_tile,
                                   num_warps=self.bwd_warps, num_stages=self.bwd_stages, bwd_q_tile=(), bwd_kv_tile=())

    @property
    def bwd_warps(self) -> int:
        return self.bwd_num_warps or self.num_warps

    @property
    def bwd_stages(self) -> int:
        return self.bwd_num_stages or self.num_stages

    @property
    def q_tokens(self) -> int:
        return math.prod(self.q_tile)

    @property
    def kv_tokens(self) -> int:
        return math.prod(self.kv_tile)

    def to_dict(self) -> dict:
        return {"q_tile": list(self.q_tile), "kv_tile": list(self.kv_tile), "layout": self.layout,
                "permute": self.layout == "permute", "num_warps": self.num_warps, "num_stages": self.num_stages,
                **({"bwd_num_warps": self.bwd_warps, "bwd_num_stages": self.bwd_stages}
                   if self.bwd_num_warps or self.bwd_num_stages else {}),
                **({"bwd_q_tile": list(self.bwd_q_tile or self.q_tile), "bwd_kv_tile": list(self.bwd_kv_tile or self.kv_tile)}
                   if self.own_backward_tiles else {}),
                **({"dq_q_tile": list(self.dq_config().q_tile), "dq_kv_tile": list(self.dq_config().kv_tile)}
                   if self.own_dq_tiles else {}),
                **({"tma": True} if self.tma else {}), **({"atomic_dq": True} if self.atomic_dq else {}),
                **({"warp_specialize": True} if self.warp_specialize else {})}


@dataclass
class PassCost:
    """Predicted time of one pass (forward or backward) and where it goes."""

    time_s: float
    kernel_s: float
    permute_s: float
    makespan_s: float
    ideal_s: float  # total work / SMs: the makespan with perfect balance
    mma_s: float  # summed over SMs
    mask_s: float
    memory_s: float
    ctas: int

    @property
    def balance(self) -> float:
        """ideal / makespan: 1.0 is a perfectly balanced launch."""
        return self.ideal_s / self.makespan_s if self.makespan_s > 0 else 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["balance"] = self.balance
        return d


@dataclass
class Prediction:
    config: KernelConfig
    forward: PassCost
    backward: PassCost
    #: CTAs per (KV tile, K/V head) of the dK/dV kernel, each walking its share of the query heads that
    #: share the K/V head (grouped-query attention; ``predict``): more than 1 adds a sum of fp32 partials
    group_split: int = 1

    def to_dict(self) -> dict:
        return {**self.config.to_dict(), "forward_s": self.forward.time_s, "backward_s": self.backward.time_s,
                "forward": self.forward.to_dict(), "backward": self.backward.to_dict(),
                "group_split": self.group_split}


# ----------------------------------------------------------------- mask operation count
def mask_ops(mask: sympy.Basic, calibration: Calibration = DEFAULT_CALIBRATION) -> int:
    """Elementwise operations to evaluate the mask on one (query, key) pair:
    sympy's ``count_ops`` with custom functions weighted (at least 1)."""
    if mask in (sympy.true, sympy.false):
        return 0
    visual = sympy.count_ops(mask, visual=True)
    if visual == 0:
        return 1
    weights = {s: calibration.op_weights.get(str(s), 1) for s in visual.free_symbols}
    return max(1, int(visual.subs(weights)))


def dtype_bytes(dtype) -> int:
    if isinstance(dtype, torch.dtype):
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    key = str(dtype).lower()
    if key not in DTYPE_BYTES:
        raise SpecError(f"unsupported dtype {dtype!r}", where="argument dtype",
                        hint="the cost model covers the tensor-core types: bf16, fp16")
    return DTYPE_BYTES[key]


def smem_fits(config: KernelConfig, head_dim: int, nbytes: int, hw: Hardware) -> bool:
    """The forward kernel's shared memory (resident Q tile + stages x (K, V) tiles) fits one SM."""
    need = config.q_tokens * head_dim * nbytes + config.num_stages * 2 * config.kv_tokens * head_dim * nbytes
    return need <= hw.smem_bytes - 1024


# ----------------------------------------------------------------- one pass
def blocks(config: KernelConfig) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the rows and columns the kernels run a tile pair's matmuls and elementwise work on,
    the tiles' tokens padded to a power of two (at least 16) as code generation pads them
    (``analysis.schedule.block_size``). Their loads are masked to the tile's tokens: HBM traffic is the tokens'."""
    return block_size(config.q_tokens), block_size(config.kv_tokens)


def _shape_factor(config: KernelConfig, cal: Calibration) -> float:
    """Efficiency multiplier of a tile configuration against the best one (1.0), at the blocks it runs."""
    tq, tk = blocks(config)
    near = min((abs(math.log2(max(tq, 1)) - math.log2(q)), q) for q, _ in cal.warp_factor)[1]
    warp = cal.warp_factor.get((near, config.num_warps), min(cal.warp_factor.values()))
    shape = min(1.0, tq / 128) ** cal.q_tile_exponent * min(1.0, tk / 128) ** cal.kv_tile_exponent
    return warp * shape


def _rows_factor(rows: int, fit: ArchFit) -> float:
    """The fraction of the MMA rate a pass attains whose MMAs run ``rows`` rows (``ArchFit.mma_rows``)."""
    return min(1.0, rows / fit.mma_rows) if fit.mma_rows else 1.0


def _overlap(mma: float, mem: float, stages: int, cal: Calibration) -> float:
    exposed = cal.two_stage_exposed if stages <= 2 else 0.0
    return max(mma, mem) + exposed * min(mma, mem)


def _partial_pair(t_full: float, mask_pair: float, fit: ArchFit) -> float:
    """A PARTIAL pair: a FULL pair's time and the mask's elementwise work, overlapped but for
    ``fit.mask_exposed`` of the shorter."""
    return max(t_full, mask_pair) + fit.mask_exposed * min(t_full, mask_pair)


def launch_makespan(full: torch.Tensor, partial: torch.Tensor, work: torch.Tensor, repeat: int | float, sms: int,
                    orderable: bool, placed: bool = True) -> float:
    """The makespan of one kernel's CTAs (``work``, ``[classes, CTAs]``, each class row launched ``repeat``
    times) placed as the GPU places them: in launch order, each on the SM that frees first. The order is
    the one the kernels launch in (``compiler.cost.launch_order.choose_order`` on the visit counts ``full``,
    ``partial``; tile order where the kernel has no order table: not ``orderable``). Where no order could move the makespan by
    ``MIN_GAIN``, where the launch has too many CTAs to place one by one, and where the counts are a
    sample standing for more CTAs (not ``placed``: their order is not known), the longest-first
    estimate ``makespan`` stands for it (a launch over ``EXACT_CTAS`` that has no order table, as a
    dK/dV kernel over per-head lists, is then estimated as if ordered)."""
    visits = launch_order.visit_work(full, partial)
    if not placed or not launch_order.exact(visits, repeat) or not launch_order.can_gain(visits, sms, repeat):
        return makespan(work, sms, repeat)
    order = launch_order.choose_order(full, partial, int(repeat), sms) if orderable else None
    if order is not None:
        work = torch.gather(work, -1, order)
    return launch_order.greedy_makespan(work, sms, int(repeat))


def _pass(full: torch.Tensor, partial: torch.Tensor, repeat: int | float, *, t_full: float, t_partial: float,
          t_cta: float, mma_pair: float, mask_pair: float, mem_pair: float, hw: Hardware,
          cal: Calibration, permute_s: float, orderable: bool = True, placed: bool = True) -> PassCost:
    """One kernel: CTA ``i`` of a head class visits ``full[c, i]`` FULL and
    ``partial[c, i]`` PARTIAL tiles; every class row is launched ``repeat`` times, in the kernels' launch
    order (``launch_makespan``; ``orderable``: the kernel can take an order table for these rows, on
    architectures that take them: ``launch_order.ordered_arch``;
    ``placed``: the rows are every CTA of the launch, not a sample)."""
    full = full.to(torch.float64)
    partial = partial.to(torch.float64)
    work = t_cta + full * t_full + partial * t_partial
    per_class = work.reshape(-1)
    total_pairs_full = float(full.sum()) * repeat
    total_pairs_partial = float(partial.sum()) * repeat
    ctas = round(per_class.numel() * repeat)
    span = launch_makespan(full, partial, work, repeat, hw.sms, orderable and launch_order.ordered_arch(hw.arch),
                           placed)
    ideal = float(per_class.sum()) * repeat / hw.sms
    kernel = span + cal.launch_s
    return PassCost(
        time_s=kernel + permute_s, kernel_s=kernel, permute_s=permute_s, makespan_s=span, ideal_s=ideal,
        mma_s=(total_pairs_full + total_pairs_partial) * mma_pair,
        mask_s=total_pairs_partial * mask_pair,
        memory_s=(total_pairs_full + total_pairs_partial) * mem_pair, ctas=ctas)


def _axes_of(config: KernelConfig) -> int:
    return len(config.q_tile)


def _address_s(tokens: int, config: KernelConfig, hw: Hardware, cal: Calibration) -> float:
    """In-kernel multi-dimensional addressing per visited tile pair: ``tokens`` streamed tokens'
    coordinates decoded per axis (zero unless the layout is "address")."""
    if config.layout != "address":
        return 0.0
    return tokens * cal.address_ops_per_axis * _axes_of(config) / (hw.vector_flops_per_sm * cal.mask_alu_fraction)


def predict_counts(full_fwd: torch.Tensor, partial_fwd: torch.Tensor, full_bwd: torch.Tensor,
                   partial_bwd: torch.Tensor, repeat: int, config: KernelConfig, hw: Hardware, *,
                   head_dim: int, tokens: tuple[int, int], batch_heads: int, nbytes: int = 2,
                   ops: int = 1, grid_axes: int = 1, calibration: Calibration | None = None,
                   repeat_bwd: int | float | None = None, dq_counts: tuple | None = None,
                   repeat_dq: int | float | None = None, placed: bool = True, ordered: bool = True,
                   routed: bool = False, kv_classes: int | None = None) -> Prediction:
    """Forward and backward cost from per-CTA tile counts (``[classes, CTAs]``),
    every CTA launched ``repeat`` times (``repeat_bwd`` in the dK/dV kernel, if given).

    The backward runs the config's backward (``KernelConfig.backward_config``: its own tiles where
    it has some, its own warps and stages): ``full_bwd``/``partial_bwd`` are the dK/dV kernel's
    per-KV-tile counts at the backward's tiles, and ``dq_counts`` (FULL, PARTIAL per Q tile, each
    CTA launched ``repeat_dq`` times) the dQ kernel's; without them the dQ kernel walks the
    forward's lists, which is right only when the backward has the forward's tiles.

    ``tokens``: (queries, keys) per head; ``batch_heads``: batch x heads (for
    the permutation and pre/post-processing traffic); ``ops``: the mask's
    per-pair operation count; ``grid_axes``: axes of the token grid (flat
    tiles on a grid decode coordinates per pair); ``placed``: the counts are every CTA of the launches
    (not a sample standing for more), so that they are placed on the SMs in the kernels' launch order;
    ``ordered``: False models kernels that always launch in tile order (no order tables: what-if only);
    ``routed``: a routed pattern, whose runtime lists are per (batch, head): its dK/dV kernel keeps tile
    order; ``kv_classes``: the list classes the dK/dV counts were folded from (``grouped_kv_counts``; default
    their rows): its kernel takes an order table only for one.
    """
    cal = calibration or DEFAULT_CALIBRATION
    if (config.own_backward_tiles or config.own_dq_tiles) and dq_counts is None:
        raise SpecError("a config with backward tiles of its own needs the dQ kernel's tile counts at them",
                        where="argument dq_counts")
    if config.layout not in LAYOUTS:
        raise SpecError(f"unknown layout {config.layout!r}", where="argument layout", hint="one of " + ", ".join(LAYOUTS))
    D, b = head_dim, nbytes
    tq, tk = config.q_tokens, config.kv_tokens  # the tiles' tokens: the bytes loaded and stored
    bq, bk = blocks(config)  # the blocks the kernel computes on: matmuls, the mask, addressing
    fit = cal.fit(hw)
    shape = _shape_factor(config, cal)
    eff_f = fit.forward * shape * _rows_factor(bq, fit)
    pair_flops = 2.0 * bq * bk * D  # one matmul over a tile pair
    per_sm_bw = hw.bytes_per_s / hw.sms
    bw_eff = cal.address_bw_efficiency if config.layout == "address" else 1.0
    miss = 1.0 - cal.l2_hit
    ops_pair = ops + cal.mask_fixed_ops
    if config.layout == "flat" and grid_axes > 1:
        ops_pair += cal.flat_decode_ops_per_axis * grid_axes
    mask_pair = bq * bk * ops_pair / (hw.vector_flops_per_sm * cal.mask_alu_fraction) if ops else 0.0
    address_fwd = _address_s(bk, config, hw, cal)
    bw = per_sm_bw * bw_eff

    # forward: CTA per Q tile; K and V tiles stream in
    mma_f = FWD_MATMULS * pair_flops / (hw.flops_per_sm * eff_f)
    mem_f = 2.0 * tk * D * b * miss / bw
    t_full_f = _overlap(mma_f, mem_f, config.num_stages, cal) + address_fwd
    cta_f = fit.cta_overhead_s + 2.0 * tq * D * b / bw  # load Q, store O
    nq_tok, nk_tok = tokens
    perm_bytes = 4 * 2 * batch_heads * max(nq_tok, nk_tok) * D * b  # 4 tensors read + written
    perm = perm_bytes / (hw.bytes_per_s * cal.permute_bw_efficiency) + cal.launch_s if config.layout == "permute" else 0.0
    fwd = _pass(full_fwd, partial_fwd, repeat, t_full=t_full_f, t_partial=_partial_pair(t_full_f, mask_pair, fit), t_cta=cta_f,
                mma_pair=mma_f, mask_pair=mask_pair, mem_pair=mem_f, hw=hw, cal=cal, permute_s=perm, placed=placed,
                orderable=ordered)

    # backward: delta = rowsum(dO * O), then the dQ kernel (CTA per Q tile, K and V stream
    # in) and the dK/dV kernel (CTA per KV tile; Q, dO, lse and delta stream in), one after the
    # other, at the backward's own tiles, warps and stages
    bcfg = dataclasses.replace(config.backward_config(), num_warps=config.bwd_warps, num_stages=config.bwd_stages)
    btq, btk = bcfg.q_tokens, bcfg.kv_tokens
    bbq, bbk = blocks(bcfg)
    eff_b = fit.backward * _shape_factor(bcfg, cal) * _rows_factor(bbk, fit)  # dK/dV's MMAs run KV rows
    bpair_flops = 2.0 * bbq * bbk * D
    bmask_pair = bbq * bbk * ops_pair / (hw.vector_flops_per_sm * cal.mask_alu_fraction) if ops else 0.0
    addr_dkdv = _address_s(bbq, bcfg, hw, cal)
    full_dq, partial_dq = dq_counts if dq_counts is not None else (full_fwd, partial_fwd)
    n_dq, n_dkdv = cal.bwd_matmuls
    if config.atomic_dq and n_dq:  # dS K in the dK/dV kernel: the dQ kernel's two recomputing matmuls saved
        n_dq, n_dkdv = 0, n_dkdv + 1
    pre = 2.0 * batch_heads * nq_tok * D * b / hw.bytes_per_s + cal.launch_s
    parts = []
    if n_dq:  # at the dQ kernel's tiles (its own, or the backward's)
        parts.append(_dq_pass(config, full_dq, partial_dq, repeat if repeat_dq is None else repeat_dq, n_dq,
                              hw, cal, fit, head_dim=D, nbytes=b, ops_pair=ops_pair if ops else 0.0, bw=bw,
                              miss=miss, placed=placed, ordered=ordered))
    mma_k = n_dkdv * bpair_flops / (hw.flops_per_sm * eff_b)
    mem_k = (2.0 * btq * D * b + 8.0 * btq) * miss / bw  # Q, dO; lse, delta (fp32)
    if not n_dq:  # one kernel (FlashAttention-2): dQ accumulated in fp32 by atomics
        mem_k += 2.0 * btq * D * 4 * miss / bw
    t_k = _overlap(mma_k, mem_k, bcfg.num_stages, cal) + addr_dkdv
    cta_k = fit.cta_overhead_s + 4.0 * btk * D * b / bw  # load K, V; store dK, dV
    # the dK/dV kernel takes an order table only where every head shares one list class (never a route's)
    parts.append(_pass(full_bwd, partial_bwd, repeat if repeat_bwd is None else repeat_bwd, t_full=t_k,
                       t_partial=_partial_pair(t_k, bmask_pair, fit), t_cta=cta_k, mma_pair=mma_k, mask_pair=bmask_pair,
                       mem_pair=mem_k, hw=hw, cal=cal, permute_s=0.0,
                       orderable=ordered and not routed and (full_bwd.shape[0] if kv_classes is None else kv_classes) == 1,
                       placed=placed))
    bwd = _sequence(parts, pre=pre, permute_s=perm)
    return Prediction(config, fwd, bwd)


def _dq_pass(config: KernelConfig, full: torch.Tensor, partial: torch.Tensor, repeat: int | float, n_dq: int,
             hw: Hardware, cal: Calibration, fit: ArchFit, *, head_dim: int, nbytes: int, ops_pair: float, bw: float,
             miss: float, placed: bool, ordered: bool) -> PassCost:
    """The backward's dQ kernel (``predict_counts``): a CTA per Q tile at its tiles (``KernelConfig.dq_config``)
    and the backward's warps and stages, ``n_dq`` matmuls a tile pair, K and V streaming in at ``bw`` bytes
    a second an SM (``miss`` of them from memory); ``ops_pair``: the mask's operations a score (0: none counted)."""
    D, b = head_dim, nbytes
    dcfg = dataclasses.replace(config.dq_config(), num_warps=config.bwd_warps, num_stages=config.bwd_stages)
    dtq, dtk = dcfg.q_tokens, dcfg.kv_tokens
    dbq, dbk = blocks(dcfg)
    dmask_pair = dbq * dbk * ops_pair / (hw.vector_flops_per_sm * cal.mask_alu_fraction) if ops_pair else 0.0
    mma_q = n_dq * 2.0 * dbq * dbk * D / (hw.flops_per_sm * fit.backward * _shape_factor(dcfg, cal)
                                           * _rows_factor(dbq, fit))
    mem_q = 2.0 * dtk * D * b * miss / bw
    t_q = _overlap(mma_q, mem_q, dcfg.num_stages, cal) + _address_s(dbk, dcfg, hw, cal)
    cta_q = fit.cta_overhead_s + (3.0 * dtq * D * b + 8.0 * dtq) / bw  # Q, dO in, dQ out; lse, delta
    return _pass(full, partial, repeat, t_full=t_q, t_partial=_partial_pair(t_q, dmask_pair, fit), t_cta=cta_q,
                 mma_pair=mma_q, mask_pair=dmask_pair, mem_pair=mem_q, hw=hw, cal=cal, permute_s=0.0, placed=placed,
                 orderable=ordered)


def _sequence(parts: list[PassCost], *, pre: float, permute_s: float) -> PassCost:
    """Kernels launched one after the other (plus a pre-pass and the permutation) as one pass."""
    total = lambda name: sum(getattr(p, name) for p in parts)  # noqa: E731
    kernel = total("kernel_s") + pre
    return PassCost(time_s=kernel + permute_s, kernel_s=kernel, permute_s=permute_s, makespan_s=total("makespan_s"),
                    ideal_s=total("ideal_s"), mma_s=total("mma_s"), mask_s=total("mask_s"),
                    memory_s=total("memory_s"), ctas=sum(p.ctas for p in parts))


#: How much faster (predicted backward) a dK/dV split over more programs per K/V head must be than the one
#: taken among the smaller splits: its fp32 partials take split x the K/V tensors' size in memory, which the time
#: model does not weigh (a 3-D video at 115K tokens with one K/V head predicted 0.25% faster at 4 programs).
GROUP_SPLIT_GAIN = 0.03


def checked_kv_heads(heads: int, kv_heads: int | None, where: str = "argument kv_heads") -> int:
    """``kv_heads`` (None: ``heads``), checked to be a positive divisor of ``heads`` (an error names ``where``)."""
    kv = heads if kv_heads is None else kv_heads
    if not isinstance(kv, int) or isinstance(kv, bool) or kv < 1 or heads % kv:
        raise SpecError(f"{heads} query heads cannot share {kv_heads!r} K/V heads", where=where,
                        hint="a positive divisor of the number of heads")
    return kv


def checked_group_split(group: int, split: int) -> int:
    """``split`` (dK/dV programs per K/V head), checked to be a positive divisor of ``group`` (query heads per
    K/V head)."""
    if not isinstance(split, int) or isinstance(split, bool) or split < 1 or group % split:
        raise SpecError(f"{group} query heads per K/V head cannot be split {split!r} ways",
                        where="argument group_split", hint="a positive divisor of heads // kv_heads")
    return split


def grouped_kv_counts(t_full: torch.Tensor, t_partial: torch.Tensor, heads: int, kv_heads: int | None,
                      split: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The dK/dV kernel's per-CTA counts (FULL, PARTIAL; ``[classes, KV tiles]``) and how many times each
    class row is launched per batch element, with ``kv_heads`` K/V heads shared by ``heads`` query heads.
    ``split`` CTAs per (KV tile, K/V head) each visit the Q tiles of ``heads // kv_heads // split`` query
    heads of its group in turn: a head-independent mask's counts times that share, launched ``split`` times
    per K/V head; per-head counts summed over each share, launched once."""
    kv = checked_kv_heads(heads, kv_heads)
    group, classes = heads // kv, t_full.shape[0]
    share = group // checked_group_split(group, split)
    if classes == 1:
        return t_full * share, t_partial * share, kv * split
    if classes != heads:
        raise SpecError(f"per-head tile counts of {classes} classes for {heads} heads", where="argument schedule")
    fold = lambda c: c.reshape(kv * split, share, -1).sum(1)  # noqa: E731
    return fold(t_full), fold(t_partial), 1


def group_split_may_pay(t_full: torch.Tensor, t_partial: torch.Tensor, heads: int, kv_heads: int | None,
                        batch: int | float, sms: int) -> bool:
    """Whether splitting the dK/dV kernel's K/V heads over more programs can be ``GROUP_SPLIT_GAIN`` faster:
    with one program per K/V head the CTAs' placement ends at most one CTA's work after their total work over
    the SMs (list scheduling), and a split removes at most that tail. Screened on tile pairs with half the
    gain (a PARTIAL pair costs more than a FULL one), so that a plan whose dK/dV CTAs fill many waves is not
    priced at every split (the runtime decides per plan: a mask of call-time inputs plans per call)."""
    full, partial, launches = grouped_kv_counts(t_full, t_partial, heads, kv_heads)
    work = (full + partial).to(torch.float64)
    total = float(work.sum()) * launches * batch
    return total > 0 and sms * float(work.max()) >= total * GROUP_SPLIT_GAIN / 2


def group_reduction_s(split: int, kv_batch_heads: int, keys: int, head_dim: int, hw: Hardware,
                      cal: Calibration | None = None) -> float:
    """What splitting each K/V head's query heads over ``split`` dK/dV CTAs adds: the kernel stores dK and
    dV as fp32 partials (4 bytes an element each, where it stored the result), torch sums them (reads
    ``split`` partials, writes fp32) and casts the sum (reads it, writes the result): 8 x split + 8 bytes
    per element of dK and dV more than without a split, and 4 launches. 0 for ``split`` 1."""
    if split <= 1:
        return 0.0
    cal = cal or DEFAULT_CALIBRATION
    elements = 2.0 * kv_batch_heads * keys * head_dim
    return elements * (8.0 * split + 8.0) / hw.bytes_per_s + 4 * cal.launch_s


def predict(schedule: TileSchedule, config: KernelConfig, hw: Hardware, *, head_dim: int, batch: int = 1,
            nbytes: int = 2, ops: int = 1, grid_axes: int = 1, calibration: Calibration | None = None,
            backward_schedule: TileSchedule | None = None, dq_schedule: TileSchedule | None = None,
            ordered: bool = True, routed: bool = False, kv_heads: int | None = None,
            group_split: int | None = None) -> Prediction:
    """Forward and backward cost of a schedule run with ``config`` (whose tile
    token counts are those of the schedule's tiles). A config whose backward has
    tiles of its own (``KernelConfig.bwd_q_tile``/``bwd_kv_tile``) needs
    ``backward_schedule``, the schedule at those tiles: its dQ and dK/dV kernels
    walk that one's tile lists; one whose dQ kernel has tiles of its own
    (``KernelConfig.dq_q_tile``/``dq_kv_tile``) also ``dq_schedule``, the dQ's. ``ordered``, ``routed``:
    as in ``predict_counts``. ``kv_heads``: K/V heads (grouped-query attention; default: one per query
    head). The dK/dV kernel runs ``group_split`` CTAs per (KV tile, batch x K/V head), each visiting the
    tiles of its share of the group's query heads, one head after the other (``grouped_kv_counts``); more
    than one sum fp32 partials (``group_reduction_s``). ``group_split`` None: the divisor of the group
    predicted fastest, each larger one taken only ``GROUP_SPLIT_GAIN`` faster than the one taken among the
    smaller (1 for a route, whose lists are made per call), in ``Prediction.group_split``."""
    if config.own_backward_tiles and backward_schedule is None:
        raise SpecError("the config's backward has tiles of its own: pass the schedule at them",
                        where="argument backward_schedule")
    if config.own_dq_tiles and dq_schedule is None:
        raise SpecError("the config's dQ kernel has tiles of its own: pass the schedule at them",
                        where="argument dq_schedule")
    bsched = backward_schedule if config.own_backward_tiles else schedule
    dsched = dq_schedule if config.own_dq_tiles else bsched
    H = schedule.num_heads
    repeat = batch * (H if schedule.heads_stored == 1 else 1)
    drepeat = batch * (H if dsched.heads_stored == 1 else 1)
    kv = checked_kv_heads(H, kv_heads)
    group = H // kv
    if group_split is not None:
        splits = [group_split]
    elif routed or not group_split_may_pay(bsched.t_full_count, bsched.t_partial_count, H, kv,
                                           batch * getattr(bsched, "kv_weight", 1), hw.sms):
        splits = [1]  # a route keeps one CTA per K/V head (its lists are made per call)
    else:  # every divisor of the group
        splits = [s for s in range(1, group + 1) if group % s == 0]
    # a TileSummary holds sampled CTAs, each standing for `weight` CTAs
    q_weight = getattr(schedule, "q_weight", 1)
    bkv_weight, dq_weight = getattr(bsched, "kv_weight", 1), getattr(dsched, "q_weight", 1)
    best = None
    for split in splits:
        t_full, t_partial, brepeat = grouped_kv_counts(bsched.t_full_count, bsched.t_partial_count, H, kv, split)
        pred = predict_counts(
            schedule.full_count, schedule.partial_count, t_full, t_partial,
            repeat * q_weight, config, hw, head_dim=head_dim, tokens=(schedule.num_queries, schedule.num_keys),
            batch_heads=batch * H, nbytes=nbytes, ops=ops, grid_axes=grid_axes, calibration=calibration,
            repeat_bwd=batch * brepeat * bkv_weight, dq_counts=(dsched.full_count, dsched.partial_count),
            repeat_dq=drepeat * dq_weight, placed=q_weight == 1 and bkv_weight == 1 and dq_weight == 1,
            ordered=ordered, routed=routed, kv_classes=bsched.heads_stored)
        extra = group_reduction_s(split, batch * kv, schedule.num_keys, head_dim, hw, calibration)
        bwd = dataclasses.replace(pred.backward, time_s=pred.backward.time_s + extra,
                                  kernel_s=pred.backward.kernel_s + extra)
        pred = Prediction(pred.config, pred.forward, bwd, split)
        if best is None or pred.backward.time_s < best.backward.time_s * (1.0 - GROUP_SPLIT_GAIN):
            best = pred
    return best


def predict_dense(num_queries: int, num_keys: int, heads: int, config: KernelConfig, hw: Hardware, *,
                  head_dim: int, batch: int = 1, nbytes: int = 2, calibration: Calibration | None = None) -> Prediction:
    """Dense attention modelled the same way: flat tiles of the config's token
    counts (the backward at its own, with its own warps and stages), every tile
    pair FULL, no mask, no permutation."""
    tq, tk = config.q_tokens, config.kv_tokens
    bwd = config.backward_config()
    btq, btk = bwd.q_tokens, bwd.kv_tokens
    nq, nk = -(-num_queries // tq), -(-num_keys // tk)
    bnq, bnk = -(-num_queries // btq), -(-num_keys // btk)
    own = config.own_backward_tiles
    flat = KernelConfig((tq,), (tk,), "flat", config.num_warps, config.num_stages, config.bwd_num_warps,
                        config.bwd_num_stages, (btq,) if own else (), (btk,) if own else ())
    # Every CTA is alike: one of each, repeated (no tensor as long as the tile grid).
    one = lambda count: torch.tensor([[float(count)]])  # noqa: E731
    pred = predict_counts(one(nk), torch.zeros(1, 1), one(bnq), torch.zeros(1, 1), batch * heads * nq, flat, hw,
                          head_dim=head_dim, tokens=(num_queries, num_keys), batch_heads=batch * heads,
                          nbytes=nbytes, ops=0, calibration=calibration, repeat_bwd=batch * heads * bnk,
                          dq_counts=(one(bnk), torch.zeros(1, 1)), repeat_dq=batch * heads * bnq)
    return Prediction(flat, pred.forward, pred.backward)


def sdpa_calibration(hw: Hardware, fits: dict | None = None) -> Calibration:
    """The calibration that models SDPA's dense kernel on ``hw`` (``SDPA_FITS``; archs without a fit take
    the sm90 one): its fractions, one backward kernel of 5 matmuls."""
    fits = SDPA_FITS if fits is None else fits
    return Calibration(arch={hw.arch: fits.get(hw.arch, fits["sm90"])}, bwd_matmuls=(0, 5))


def predict_sdpa(num_queries: int, num_keys: int, heads: int, hw: Hardware, *, head_dim: int, batch: int = 1,
                 nbytes: int = 2, fits: dict | None = None) -> Prediction:
    """Dense attention as ``torch.nn.functional.scaled_dot_product_attention`` runs it on ``hw`` (the
    vendor's fused kernel; ``SDPA_FITS``): forward and backward time."""
    config = KernelConfig((SDPA_TILES,), (SDPA_TILES,), "flat", 8, 3)
    return predict_dense(num_queries, num_keys, heads, config, hw, head_dim=head_dim, batch=batch, nbytes=nbytes,
                         calibration=sdpa_calibration(hw, fits))


__all__ = ["ARCH_FITS", "BWD_FLOP_RATIO", "BWD_MATMULS", "FWD_MATMULS", "GROUP_SPLIT_GAIN", "PUBLISHED_BWD_FLOP_RATIO", "SDPA_FITS", "SDPA_TILES", "ArchFit",
           "Calibration", "DEFAULT_CALIBRATION", "KernelConfig", "MAX_ROUNDS", "PassCost", "Prediction",
           "blocks", "checked_group_split", "checked_kv_heads", "dtype_bytes", "group_reduction_s", "group_split_may_pay", "grouped_kv_counts", "launch_makespan", "makespan", "mask_ops", "predict", "predict_counts", "predict_dense", "predict_sdpa", "sdpa_calibration",
           "smem_fits"]
