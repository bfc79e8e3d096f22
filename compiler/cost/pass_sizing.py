"""Whether a kernel configuration fits the hardware, and the sizing that makes it fit.

Per pass (forward, dQ, dK/dV): the shared memory of its resident and pipelined tiles, the registers its
register-resident tiles take, the tensor memory of tcgen05's accumulators (``pass_fits``). On top of
them: the backward's launch parameters and tiles (``backward_launch``, ``backward_tiles``, ``sized``),
FlexAttention's wide-KV backward (``wide_kv_backward``) and whether a configuration's tiles load as TMA
boxes (``tma_fits``). The schedule search (``compiler.cost.search``) keeps only configurations these admit.
"""

from __future__ import annotations

import dataclasses
import math

import sympy

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError
from ..analysis.schedule import block_size
from .hardware import Hardware, compute_capability
from .model import KernelConfig

#: The backward's launch parameters, most preferred first (more stages hide more latency; with
#: three fp32 score tiles and two accumulators, the backward needs the warps more than the forward).
BWD_LAUNCH = ((8, 3), (8, 2), (4, 3), (4, 2), (8, 1), (4, 1))
#: Before Hopper, the backward's warp counts, most preferred first: 4 where the pass's register-resident
#: tiles fit there (FlexAttention's sm8x backward default is 64/64 w4 s2), else 8. At 8 warps (256
#: threads) ptxas packs the small-tile backward into 128 registers, two blocks an SM, whatever the
#: need: every sm_80 dK/dV at 32-token KV tiles sat at exactly 128 (neighborhood 1-D/2-D/3-D, biformer,
#: moba at d = 128) and neighborhood_1d's spilled 16 B (Triton 3.6); at w4 s2 it takes 179, no spill
#: (measured with ``runtime.gpu_check``).
BWD_WARPS_MMA = (4, 8)
#: KV tile tokens at least on Hopper and later: wgmma needs 64-row operands, and the KV tile is the
#: M side of the dK/dV products (a 32-token KV box falls back to mma.sync there).
MIN_KV_TOKENS_WGMMA = 64
#: Backward pipeline stages at most before Hopper: a third cp.async stage holds its prefetch in
#: registers and tips the backward into spills (measured with ``runtime.gpu_check``, sm_80, moba
#: d = 64, 64/64 tiles: w4 s3 spills 8-16 B on Triton 3.6 and 3.9, w8 s3 8-20 B on 3.6; s2 none).
MAX_BWD_STAGES_MMA = 2
#: Score-shaped register tiles a FoX decay adds to the backward (``ScheduleSearch.bwd_score_tiles``):
#: measured with ``runtime.gpu_check`` (sm_90, d = 128, bf16), forgetting's dK/dV at 64/64 w8 spills
#: 72 B (s3, Triton 3.6) / 16 B (s2, 3.9) while 5 score tiles in all put it at 32/64 w8 s3: 210 registers,
#: no spill on either.
DECAY_BWD_TILES = 3
#: The smallest backward tile (tokens) the search proposes: ``tl.dot`` takes 16.
MIN_BWD_TOKENS = 16
#: Registers a thread may give a pass's register-resident tiles (``pass_registers``), of the 255 ptxas
#: allows: the rest holds addresses, masks, loop state and operand staging. Calibrated with
#: ``runtime.gpu_check`` (bf16, sm_80 and sm_90, Triton 3.6 and 3.9; w8 = 256 threads):
#:   spill-free at 160: the forward at 128/64, d = 128 (O 64 + 2 score tiles 64 x 1.5) and moba's
#:     dK/dV at 64/64, d = 128 (dK, dV 64 + 4 score tiles 64 x 1.5): 221-254 registers;
#:   spills at 176: dK/dV at 128/64, d = 64 (dK, dV 32 + 3 score tiles 96 x 1.5): sliding_window
#:     44 B (sm_80, 3.9), 60 B (sm_80, 3.6), 32 B (sm_90, 3.6, also streaming); forgetting's dK/dV
#:     at 64/64, d = 64 (32 + 6 score tiles 96 x 1.5): 16 B (sm_80, 3.9).
#: (Counting plain fp32 values, 128 a thread, could not tell these apart: both sides hold 128.)
REG_BUDGET = 160
#: Tensor memory (Blackwell, sm_100 and later): tcgen05.mma keeps its fp32 accumulators there, 128 lanes x
#: ``TMEM_COLUMNS`` columns of 32 bits a block, not in registers (``pass_registers(tmem=True)``; the search
#: asks it of the backward it was checked on: ``pass_fits(in_tmem=)``). Compiled
#: offline (``runtime.gpu_check``, Triton 3.9, sm_100, bf16, 8 warps): dK/dV on 64 Q x 128 KV tokens at
#: d 128, whose accumulators alone are 128 fp32 a thread, took 205-224 registers and did not spill
#: (sliding_window, streaming, softcap, alibi), where sm_90 takes 250-255 and spills softcap's 248-400 B;
#: the forward on 128 x 128 at d 128 (two score tiles of 96 registers a thread) spilled 56-132 B.
TMEM_COLUMNS = 512
#: Registers per element of a score-shaped tile: the fp32 value and half a register for its 16-bit
#: copy, the operand of the dot that follows (P for O / dV, dS for dQ / dK); the accumulators
#: (O, dQ, dK, dV) stay fp32 only, one register per element.
SCORE_TILE_REGS = 1.5
#: A routing pattern's per-query selection of the tile, in score tiles: a mask with no operand copy,
#: one register an element at most where a score tile takes ``SCORE_TILE_REGS`` (moba's forward at
#: 64/64 w4, d = 64, with it: 160 registers, compiled spill-free: 165-168 on sm_80 / sm_90).
ROUTE_SELECT_TILES = 1 / SCORE_TILE_REGS
#: Pair-shaped mask sub-expressions (``pair_subexpressions``) the register budget absorbs: up to
#: sliding_tile's 10, every stdlib mask compiled spill-free at the searched configs (``runtime.gpu_check``).
MASK_FREE_EXPRS = 10
#: Score tiles each further pair-shaped sub-expression adds, where the KV tile can shrink (not on
#: Hopper). Only radial (19, with its float band and window per pair) is above the free count.
#: Measured with ``attnc check-gpu`` (fp16, 16 frames x 256 tokens), spill bytes fwd / dQ / dK/dV:
#:   before the kernels held one-value-per-tile coordinates as scalars (``schedule.uniform_axes``),
#:   without -> with this term: sm_80 d=64 Triton 3.6 676 / 1244 / 1664 -> 0 / 0 / 12, 3.9 796 / 1144
#:   / 1612 -> 0 / 0 / 20 (1x64/1x32 boxes, w8); sm_90 (64-token KV tiles for wgmma: only warps and
#:   stages can give) kept 236-1460 B per kernel either way.
#:   With scalar frame terms: every radial kernel spill-free on sm_80 and sm_90 at d 64 and 128, both
#:   Triton versions, with this term; without it sm_80 d=64 picks 64/64 and its dK/dV spills 644 B
#:   (3.6) / 988 B (3.9): the scalar float64 work (exp2, division, fmod) still raises the peak, so the
#:   term counts the whole mask, as before.
MASK_EXPR_TILES = 0.5


PASSES = ("fwd", "bwd_dq", "bwd_dkdv")


def pass_smem(kind: str, q_tokens: int, kv_tokens: int, head_dim: int, nbytes: int, stages: int,
              hopper: bool = True) -> int:
    """Shared memory (bytes) of one pass's kernel: its resident tiles plus the pipeline's buffers of
    the streamed ones (forward: Q resident, K and V streamed; dQ: Q and dO resident, K and V
    streamed; dK/dV: K and V resident, Q and dO streamed, plus a score tile for the transposed
    operand). Triton keeps ``stages`` buffers on Hopper (wgmma reads them in place) and
    ``stages - 1`` before it (cp.async into the next, the current one in registers), one at least.
    Checked against the compiled kernels by ``runtime.gpu_check`` (Triton 3.6 / 3.9: exact for
    the forward and dQ, within 1 KiB for dK/dV)."""
    d = head_dim * nbytes
    stages = max(stages if hopper else stages - 1, 1)
    if kind == "fwd":
        return q_tokens * d + stages * 2 * kv_tokens * d
    if kind == "bwd_dq":
        return 2 * q_tokens * d + stages * 2 * kv_tokens * d
    if kind == "bwd_dkdv":
        return 2 * kv_tokens * d + stages * 2 * q_tokens * d + q_tokens * kv_tokens * nbytes
    raise SpecError(f"unknown pass {kind!r}", where="argument kind", hint=", ".join(PASSES))


def pass_tiles(kind: str, q_tokens: int, kv_tokens: int, head_dim: int, score_tiles: float = 2) -> tuple[float, float]:
    """(accumulator, score-tile) fp32 values a pass keeps in registers across its loop (block-wide):
    forward: O and ``score_tiles`` score tiles (S/P, ...); dQ: dQ and the same; dK/dV: dK, dV and one
    score tile more (the transposed operand). ``score_tiles`` is 2 (S/P and dP/dS), more for a routing
    pattern's selection (``ROUTE_SELECT_TILES``) and a decay's weights (``DECAY_BWD_TILES``)."""
    scores = score_tiles * q_tokens * kv_tokens
    if kind in ("fwd", "bwd_dq"):
        return q_tokens * head_dim, scores
    if kind == "bwd_dkdv":
        # one score tile more than dQ: measured with ``runtime.gpu_check`` (sm_90, d = 128, bf16), the
        # dK/dV kernel at 128/64 w8 s2 spills 536 B on Triton 3.6 and 840 B on 3.9 (sliding_window,
        # streaming at n = 8192), at 64/64 none
        return 2 * kv_tokens * head_dim, scores + q_tokens * kv_tokens
    raise SpecError(f"unknown pass {kind!r}", where="argument kind", hint=", ".join(PASSES))


def pass_values(kind: str, q_tokens: int, kv_tokens: int, head_dim: int, score_tiles: float = 2) -> float:
    """fp32 values a pass keeps in registers across its loop, block-wide (``pass_tiles``, summed)."""
    return sum(pass_tiles(kind, q_tokens, kv_tokens, head_dim, score_tiles))


def pair_subexpressions(mask: sympy.Basic) -> int:
    """Distinct sub-expressions of a mask that depend on a query and a key position: each is a
    score-shaped value when a kernel evaluates the mask on a PARTIAL tile (a scalar where its
    coordinates have one value per tile: ``symbols.pair_part``)."""
    free = S.FreeSymbols()
    seen, found, stack = set(), set(), [mask]
    while stack:  # each node of the DAG once (sympy's preorder_traversal walks the expanded tree)
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        roles = {sym.name.split("_")[0] for sym in free(e) if S.is_position(sym)}
        if not e.is_Atom and {"q", "k"} <= roles:
            found.add(e)
        stack.extend(e.args)
    return len(found)


def mask_score_tiles(mask: sympy.Basic) -> float:
    """Score tiles a long mask's live temporaries add to every pass (``MASK_EXPR_TILES`` per
    pair-shaped sub-expression beyond ``MASK_FREE_EXPRS``)."""
    return MASK_EXPR_TILES * max(0, pair_subexpressions(mask) - MASK_FREE_EXPRS)


def pass_registers(kind: str, q_tokens: int, kv_tokens: int, head_dim: int, warps: int,
                   score_tiles: float = 2, tmem: bool = False) -> float:
    """Registers a thread gives the pass's register-resident tiles at ``warps`` warps: one per
    accumulator element (none with ``tmem``: tcgen05's accumulators live in tensor memory),
    ``SCORE_TILE_REGS`` per score-tile element (``REG_BUDGET`` at most)."""
    acc, scores = pass_tiles(kind, q_tokens, kv_tokens, head_dim, score_tiles)
    return ((0 if tmem else acc) + SCORE_TILE_REGS * scores) / (32 * warps)


def tensor_memory(hw: Hardware) -> bool:
    """Whether ``hw``'s MMAs accumulate in tensor memory (tcgen05: the datacenter Blackwells, sm_100 to
    sm_11x; sm_120, the consumer one, has neither)."""
    return 100 <= compute_capability(hw.arch) < 120


def padded_head_dim(head_dim: int) -> int:
    """The head dim the kernels run (``BLOCK_D``, ``BLOCK_DV``: the next power of two, 16 at least)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def tmem_columns(kind: str, q_tokens: int, kv_tokens: int, head_dim: int) -> int:
    """Tensor-memory columns a pass's tcgen05 accumulators take (fp32, one column per N of an [M, N]
    accumulator and 128 rows of M): forward S and O; dQ S, dP and dQ; dK/dV S^T, dP^T, dK and dV."""
    if kind == "fwd":
        return (kv_tokens + head_dim) * -(-q_tokens // 128)
    if kind == "bwd_dq":
        return (2 * kv_tokens + head_dim) * -(-q_tokens // 128)
    if kind == "bwd_dkdv":
        return (2 * q_tokens + 2 * head_dim) * -(-kv_tokens // 128)
    raise SpecError(f"unknown pass {kind!r}", where="argument kind", hint=", ".join(PASSES))


def pass_fits(kind: str, q_tokens: int, kv_tokens: int, head_dim: int, nbytes: int, warps: int, stages: int,
              hw: Hardware, score_tiles: float = 2, in_tmem: bool = False) -> bool:
    """A pass's kernel fits one block: shared memory under the per-block limit (the SM's less 1 KiB),
    its register-resident tiles within ``REG_BUDGET`` registers a thread and, with ``in_tmem`` on tensor
    memory (its accumulators there, out of the registers), those within ``TMEM_COLUMNS``.

    ``in_tmem`` is asked for the one backward it was checked on (``wide_kv_backward``): elsewhere the search
    counts tcgen05's accumulators as registers still. Admitting them everywhere on sm_100 (offline, Triton
    3.9, bf16, n = 8192) gave dK/dV 128 Q x 64 KV tiles whose shared memory the model puts at 176 KiB and
    ptxas's kernels at 227-257 KiB (document, vertical_slash, d 128), and dQ kernels at 128 x 64 that
    spilled 8-28 B at their pass's 2 stages (power, prefix_lm, nsa's cmp): seven kernels down to one stage.

    Sized at the blocks the kernel allocates: the tiles' tokens padded to a power of two (``model.blocks``)."""
    q_tokens, kv_tokens = block_size(q_tokens), block_size(kv_tokens)
    smem = pass_smem(kind, q_tokens, kv_tokens, head_dim, nbytes, stages, min_kv_tokens(hw) > 1)
    tmem = in_tmem and tensor_memory(hw)
    regs = pass_registers(kind, q_tokens, kv_tokens, head_dim, warps, score_tiles, tmem)
    return (smem <= hw.smem_bytes - 1024 and regs <= REG_BUDGET
            and (not tmem or tmem_columns(kind, q_tokens, kv_tokens, head_dim) <= TMEM_COLUMNS))


def forward_fits(config: KernelConfig, head_dim: int, nbytes: int, hw: Hardware, score_tiles: float = 2) -> bool:
    return pass_fits("fwd", config.q_tokens, config.kv_tokens, head_dim, nbytes, config.num_warps,
                     config.num_stages, hw, score_tiles)


def backward_launch(q_tokens: int, kv_tokens: int, head_dim: int, nbytes: int, hw: Hardware,
                    score_tiles: float = 2) -> tuple[int, int] | None:
    """The backward's (num_warps, num_stages): the first of ``BWD_LAUNCH`` under which both the dQ
    and the dK/dV kernels fit (before Hopper: at most ``MAX_BWD_STAGES_MMA`` stages, and in the warp
    order of ``BWD_WARPS_MMA``); None when none does."""
    hopper = min_kv_tokens(hw) > 1
    launches = BWD_LAUNCH if hopper else sorted(
        (launch for launch in BWD_LAUNCH if launch[1] <= MAX_BWD_STAGES_MMA),
        key=lambda launch: BWD_WARPS_MMA.index(launch[0]))  # stable: stages keep their order
    for warps, stages in launches:
        if all(pass_fits(k, q_tokens, kv_tokens, head_dim, nbytes, warps, stages, hw, score_tiles)
               for k in PASSES[1:]):
            return warps, stages
    return None


def halved(tile: tuple[int, ...]) -> tuple[int, ...]:
    """``tile`` halved on its largest axis (ties: the outer one, so inner runs stay long)."""
    i = max(range(len(tile)), key=lambda j: (tile[j], -j))
    return tuple(t // 2 if j == i else t for j, t in enumerate(tile))


def backward_tiles(q_tile: tuple[int, ...], kv_tile: tuple[int, ...], hw: Hardware) -> list[tuple[tuple, tuple]]:
    """The backward's candidate tiles for a forward on ``q_tile`` x ``kv_tile``: the forward's, then
    its sub-tiles (each axis halved up to twice, larger first; the KV tile kept at the wgmma minimum
    on Hopper, and every tile at ``MIN_BWD_TOKENS`` at least, the smallest ``tl.dot`` operand)."""
    def chain(tile, floor):
        out = [tuple(tile)]
        for _ in range(2):
            nxt = halved(out[-1])
            if math.prod(nxt) < max(floor, MIN_BWD_TOKENS) or min(nxt) < 1:
                break
            out.append(nxt)
        return out

    qs, ks = chain(q_tile, MIN_BWD_TOKENS), chain(kv_tile, min_kv_tokens(hw))
    pairs = [(q, k) for q in qs for k in ks]
    # larger tiles first (fewer programs, less re-reading); of equals, the longer KV tile (dK/dV's
    # resident operand), as FlexAttention's 64/128 backward on Hopper
    pairs.sort(key=lambda p: (-math.prod(p[0]) * math.prod(p[1]), -math.prod(p[1])))
    return pairs


def wide_kv_backward(config: KernelConfig, head_dim: int, nbytes: int, hw: Hardware, bwd_score_tiles: float = 2,
                     *, registers: bool = True, kv_ext: tuple[int, ...] | None = None) -> KernelConfig | None:
    """``config`` with FlexAttention's Hopper backward orientation: the dK/dV kernel on a Q tile of the
    forward's KV tile (64 tokens) and a KV tile twice it (its innermost axis doubled), so dK/dV's MMAs run
    128 KV rows (tcgen05's full M, two wgmma warpgroups of 64); the dQ kernel on the forward's tiles; 8
    warps and the most stages (3, 2) under which both fit at the kernels' padded head dim (``registers``:
    the register and tensor-memory model too, as the search asks; without, shared memory only, the tuner's
    trial on Hopper). None on a forward KV tile other than 64 tokens, tiles of different ranks, before
    Hopper, a doubled tile past the keys' extents ``kv_ext`` (per axis, or all of them for a flat tile),
    or where nothing fits."""
    if min_kv_tokens(hw) <= 1 or config.kv_tokens != 64 or len(config.kv_tile) != len(config.q_tile):
        return None
    q = tuple(config.kv_tile)  # 64 tokens, in the KV tile's shape (a box on a grid)
    kv = tuple(t * 2 if i == len(q) - 1 else t for i, t in enumerate(q))
    if kv_ext is not None and (kv[-1] > kv_ext[-1] if len(kv_ext) == len(kv) else math.prod(kv) > math.prod(kv_ext)):
        return None  # half the doubled tile would be padding
    d = padded_head_dim(head_dim)
    passes = (("bwd_dkdv", math.prod(q), math.prod(kv)), ("bwd_dq", config.q_tokens, config.kv_tokens))
    for stages in (3, 2):
        if registers:  # tensor memory asked for the dK/dV kernel, the one it was checked on
            ok = all(pass_fits(kind, qt, kt, d, nbytes, 8, stages, hw, bwd_score_tiles, in_tmem=kind == "bwd_dkdv")
                     for kind, qt, kt in passes)
        else:
            ok = all(pass_smem(kind, qt, kt, d, nbytes, stages) <= hw.smem_bytes - 1024 for kind, qt, kt in passes)
        if ok:
            return dataclasses.replace(config, bwd_num_warps=8, bwd_num_stages=stages, bwd_q_tile=q, bwd_kv_tile=kv,
                                       dq_q_tile=tuple(config.q_tile), dq_kv_tile=tuple(config.kv_tile))
    return None


def is_wide_kv(config: KernelConfig) -> bool:
    """Whether ``config``'s dK/dV runs ``wide_kv_backward``'s tiles (its Q tile the forward's KV tile, its
    KV tile twice that)."""
    b = config.backward_config()
    return config.own_backward_tiles and b.q_tokens == config.kv_tokens and b.kv_tokens == 2 * config.kv_tokens


#: The first architecture with the tensor memory accelerator (TMA: tensor-descriptor loads).
MIN_TMA_ARCH = 90


def has_tma(arch: str) -> bool:
    """Whether an architecture (``"sm90"``, ``"sm_100"``...) loads tensor-descriptor boxes (TMA)."""
    return compute_capability(arch) >= MIN_TMA_ARCH

#: The most elements a TMA box spans along one dimension.
TMA_BOX = 256


#: The most grid axes a tile's box spans: a descriptor has at most 5 dimensions, and a 3-D grid's box takes
#: batch x head, the three axes and the head dim (``triton_tiles.box_coordinates``).
TMA_GRID_AXES = 3


def tma_fits(config: KernelConfig, q_extents: tuple[int, ...], kv_extents: tuple[int, ...]) -> bool:
    """Whether every pass's tiles of ``config`` (forward, dK/dV, dQ) are each one box of its tensor's descriptor
    (``KernelConfig.tma``, ``triton_tiles.box_tile``) of exactly ``BLOCK`` slots: a power-of-two token count (16
    at least: the block holds no slot more; ``TMA_BOX`` at most). Either runs of memory rows: 1-D tiles (flat or
    of a sequence), or tiles permuted into tile order whose boxes tile their grid exactly (a padded slot of a
    box at the grid's edge is a copy of another token there, which the pointer loads mask and a box would
    read). Or boxes of a grid of at most ``TMA_GRID_AXES`` axes in token order (the ``address`` layout: TMA
    reads 0 past the grid's edge, as the masked pointer loads do)."""
    def whole(tile: tuple[int, ...], extents: tuple[int, ...], layout: str) -> bool:
        slots = math.prod(tile)
        if slots < 16 or slots > TMA_BOX or slots & (slots - 1):
            return False
        if layout == "permute":
            return len(tile) == len(extents) and all(L % t == 0 for L, t in zip(extents, tile, strict=True))
        if len(tile) > 1:
            return layout == "address" and len(tile) == len(extents) <= TMA_GRID_AXES
        return layout == "flat" or len(extents) == 1

    return all(whole(c.q_tile, q_extents, c.layout) and whole(c.kv_tile, kv_extents, c.layout)
               for c in (config, config.backward_config(), config.dq_config()))


def score_tiles_of(pat: ir.PatternIR, mask: sympy.Basic, hw: Hardware) -> tuple[float, float]:
    """Score-shaped register tiles of the forward and the backward passes (``pass_tiles``) for a pattern
    whose mask, with the sizes substituted, is ``mask``: S/P and dP/dS, a routing pattern's selection, a
    long mask's temporaries where the KV tile may be a single token; the backward's also a FoX decay's."""
    fwd = (2 + (ROUTE_SELECT_TILES if pat.route is not None else 0)
           + (mask_score_tiles(mask) if min_kv_tokens(hw) == 1 else 0))
    return fwd, fwd + (DECAY_BWD_TILES if pat.decay is not None else 0)


def sized(config: KernelConfig, head_dim: int, nbytes: int, hw: Hardware, score_tiles: float = 2,
          bwd_score_tiles: float | None = None, dq_tiles: bool = True) -> KernelConfig | None:
    """``config`` with its backward's tiles and launch parameters set to fit (the forward's tiles
    when the backward fits there, else the largest sub-tiles under which it does), or None if its
    forward cannot fit at these tiles or its backward at none of ``backward_tiles``. Where the
    backward had to shrink, the dQ kernel (``dq_tiles``) keeps the largest earlier candidate with
    as many query rows or more at which it fits alone (``KernelConfig.dq_q_tile``): dK/dV holds two
    accumulators and a score tile more."""
    if not forward_fits(config, head_dim, nbytes, hw, score_tiles):
        return None
    bwd_tiles = score_tiles if bwd_score_tiles is None else bwd_score_tiles
    candidates = backward_tiles(config.q_tile, config.kv_tile, hw)
    for i, (q_tile, kv_tile) in enumerate(candidates):
        bwd = backward_launch(math.prod(q_tile), math.prod(kv_tile), head_dim, nbytes, hw, bwd_tiles)
        if bwd is not None:
            own = (q_tile, kv_tile) != (tuple(config.q_tile), tuple(config.kv_tile))
            found = dataclasses.replace(config, bwd_num_warps=bwd[0], bwd_num_stages=bwd[1],
                                        bwd_q_tile=q_tile if own else (), bwd_kv_tile=kv_tile if own else ())
            if dq_tiles:  # the dQ kernel on the largest larger tiles where it fits at the backward's launch
                for dq_q, dq_kv in candidates[:i]:
                    if (math.prod(dq_q) >= math.prod(q_tile)
                            and pass_fits("bwd_dq", math.prod(dq_q), math.prod(dq_kv), head_dim, nbytes, *bwd, hw,
                                          bwd_tiles)):
                        return dataclasses.replace(found, dq_q_tile=dq_q, dq_kv_tile=dq_kv)
            return found
    return None


def min_kv_tokens(hw: Hardware) -> int:
    """The smallest KV tile the search proposes on this hardware (64 where wgmma needs it)."""
    return MIN_KV_TOKENS_WGMMA if compute_capability(hw.arch) >= 90 else 1


__all__ = ["BWD_LAUNCH", "BWD_WARPS_MMA", "DECAY_BWD_TILES", "MAX_BWD_STAGES_MMA", "MIN_TMA_ARCH", "PASSES",
           "REG_BUDGET", "ROUTE_SELECT_TILES", "TMA_BOX", "TMEM_COLUMNS", "backward_launch", "backward_tiles",
           "forward_fits", "halved", "has_tma", "is_wide_kv", "mask_score_tiles", "min_kv_tokens", "padded_head_dim",
           "pair_subexpressions", "pass_fits", "pass_registers", "pass_smem", "pass_tiles", "pass_values",
           "score_tiles_of", "sized", "tensor_memory", "tma_fits", "tmem_columns", "wide_kv_backward"]
