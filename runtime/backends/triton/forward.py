"""The forward pass of the generated Triton kernels: ``(out, lse)`` of one launch, with split-KV
(flash decoding) for forward-only calls, the grouped-query forward of a few rows after a KV cache
(``grouped``), and the bias index errors the kernel found."""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.triton.exprs import LOG2E
from ....compiler.codegen.triton.scores import scale_in_exponent
from ....compiler.cost.search import padded_head_dim
from ....core.errors import SpecError
from ...plan import block_max
from ...tritonenv import interpreting
from . import grouped, split_kv, tma
from . import kernel_launch as KL
from .kernel_launch import Launch

#: While ``recording()`` runs: the list the forward's launches are appended to instead of launched.
_RECORD: contextvars.ContextVar[list | None] = contextvars.ContextVar("attnc_forward_record", default=None)


@contextlib.contextmanager
def recording():
    """Run ``forward`` without launching: each launch ``(launch, kernel, grid, args, meta, backward)`` is appended
    to the yielded list (``launcher.build`` replays them at later calls of the same signature)."""
    made: list = []
    token = _RECORD.set(made)
    try:
        yield made
    finally:
        _RECORD.reset(token)


def record_or_launch(launch: Launch, kernel, grid, named: dict, meta: dict, *, backward: bool) -> None:
    """``KL.launch_kernel`` of ``kernel`` with the arguments it takes of ``named`` and ``meta`` (``KL.bound_args``),
    or the launch recorded (``recording``)."""
    args, meta = KL.bound_args(kernel, named, meta)
    made = _RECORD.get()
    if made is not None:
        made.append((launch, kernel, grid, args, meta, backward))
        return
    KL.launch_kernel(launch, kernel, grid, args, meta, backward=backward)


#: The first item of a recorded fill (a recorded launch's first item is its launch dataclass).
FILL = "fill"


def fill_or_record(t: torch.Tensor, value: float) -> None:
    """``t.fill_(value)``, or the fill recorded as ``(FILL, t, value)`` (``recording``): a buffer that must start
    filled (a packed paged call's rows past its last row's queries), filled again at each replay."""
    made = _RECORD.get()
    if made is not None:
        made.append((FILL, t, value))
        return
    t.fill_(value)


def forward(launch: Launch, q, k, v, scale: float, *, may_split: bool = False):
    """(out ``[B, Hq, Nq, Dv]`` in q's dtype, lse ``[B, Hq, Nq]`` fp32). ``may_split``: a forward-only call, whose
    KV tiles may be split over several programs per Q tile (``split_kv``: flash decoding), their partials merged
    by the module's ``attnc_fwd_combine``."""
    B, Hq, Nq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[-1]
    block_m = grouped.packed_block_m(launch, Hq, Hkv)
    if block_m is not None:  # a few rows with K/V heads shared: a group's query heads in one tile
        return _forward_grouped(launch, q, k, v, scale, block_m, may_split)
    device = q.device
    qp, kp, vp = KL.to_tiles(launch, q, "q"), KL.to_tiles(launch, k, "k"), KL.to_tiles(launch, v, "k")
    rows = qp.shape[2]
    out = torch.empty(B, Hq, rows, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, Hq, rows, dtype=torch.float32, device=device)
    nq_tiles = launch.plan.schedule.num_q_tiles
    splits = split_kv.choose_splits(launch.plan, B, Hq, KL.sms_of(torch.device(device))) if may_split else 1
    decay_c = KL.decay_cumsum(launch, device)
    order, ordered = KL.order_arg(KL.launch_orders(launch, B, Hq, Hkv, device), "Q")
    fblocks = KL.block_sizes(launch, D, DV)
    kv = {"KD": (kp, "k", fblocks["BLOCK_D"]), "VD": (vp, "k", fblocks["BLOCK_DV"])}
    views = tma.tma_views(launch, kv)
    by_tma = views is not None
    specialize = tma.warp_spec(launch, qp, kv, fblocks, by_tma)
    if splits > 1 and specialize.get("ONE_LOOP"):  # a split forward runs the two loops (split_kv)
        specialize = {}
    # a forward in one loop loads by descriptors of its own, not the host's
    descs, desc = tma.boxes(launch, kv, views) if by_tma and not specialize.get("ONE_LOOP") else (dict.fromkeys(kv), {"DESC": False})
    partial = split_kv.partials(splits, B, Hq, rows, DV, device) if splits > 1 else None
    dest = forward_outputs(out, lse, partial)
    size = block_max.requested(Nq, k.shape[2])
    pooled, pool_meta = _row_maxima(launch, size, B, Hq, rows, device) if size is not None else (None, {})
    named = {**KL.streamed(qp, kp, vp), **dest, **KL.common_args(launch, device, decay_c), "ORDER": order, **descs,
             **KL.sizes(scale, Hq // Hkv, D, DV),
             "BM": (pooled, *pooled.stride()[:3]) if pooled is not None else (KL.dummy(device), 0, 0, 0)}
    grid, split_meta = ((nq_tiles, B * Hq, splits), {"SPLIT_KV": True}) if partial is not None else ((nq_tiles, B * Hq), {})
    with interpreting(launch.interpret):
        record_or_launch(launch, launch.module.attnc_fwd, grid, named,
                       dict(**fblocks, DOT=KL.dot_mode(launch, q.dtype), **ordered,
                            **KL.runs_meta(launch, "FULL", "PART"), **desc, **scale_sign(launch, scale),
                            **specialize, **split_meta, **pool_meta), backward=False)
        if partial is not None:
            combine_splits(launch, *partial, out, lse)
    _raise_index_errors(launch)
    out, lse = KL.from_tiles(launch, out, "q", Nq), KL.from_tiles(launch, lse, "q", Nq)
    if pooled is not None:  # return_block_max: the rows' maxima against their final lse, pooled
        block_max.record(block_max.from_row_maxima(pooled[:, :, :Nq], lse, size, pool_meta["BMAX_G"], k.shape[2]))
    return out, lse


def _forward_grouped(launch: Launch, q, k, v, scale: float, block_m: int, may_split: bool):
    """``forward`` on ``attnc_fwd_grouped`` (``grouped``): one program per (Q tile, batch x K/V head), its group's
    query heads packed in ``block_m`` rows; split-KV counts those programs, not one per query head."""
    B, Hq, Nq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[-1]
    group, device = Hq // Hkv, q.device
    qp, kp, vp = KL.to_tiles(launch, q, "q"), KL.to_tiles(launch, k, "k"), KL.to_tiles(launch, v, "k")
    # lists per query head become the group's, whose runs are not asked (read by index)
    runs = KL.runs_meta(launch, "FULL", "PART") if launch.cls == (0, 0) else {"FULL_RUN": False, "PART_RUN": False}
    launch = grouped.grouped_launch(launch, group)
    rows = qp.shape[2]
    out = torch.empty(B, Hq, rows, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, Hq, rows, dtype=torch.float32, device=device)
    splits = split_kv.choose_splits(launch.plan, B, Hkv, KL.sms_of(torch.device(device))) if may_split else 1
    partial = split_kv.partials(splits, B, Hq, rows, DV, device) if splits > 1 else None
    named = {**KL.streamed(qp, kp, vp), **forward_outputs(out, lse, partial), **KL.common_args(launch, device, None),
             **KL.sizes(scale, group, D, DV)}
    programs = (launch.plan.schedule.num_q_tiles, B * Hkv)
    grid, split_meta = ((*programs, splits), {"SPLIT_KV": True}) if partial is not None else (programs, {})
    with interpreting(launch.interpret):
        record_or_launch(launch, launch.module.attnc_fwd_grouped, grid, named,
                dict(**KL.block_sizes(launch, D, DV), DOT=KL.dot_mode(launch, q.dtype), **runs,
                     **scale_sign(launch, scale), **split_meta) | {"BLOCK_M": block_m}, backward=False)
        if partial is not None:
            combine_splits(launch, *partial, out, lse)
    _raise_index_errors(launch)
    return KL.from_tiles(launch, out, "q", Nq), KL.from_tiles(launch, lse, "q", Nq)


def _row_maxima(launch: Launch, size: int, B: int, Hq: int, rows: int, device) -> tuple[torch.Tensor, dict]:
    """``return_block_max``'s buffer, each row's largest score per group of keys (-inf where none is attended), and
    the kernel's ``BLOCK_MAX`` / ``BMAX_G`` / ``BMAX_C``: the group is the block size, or the KV tile where the block
    holds whole tiles; ``BMAX_C`` the groups in a tile, the buffer's columns per KV tile (a tile's, not its BLOCK_N's: the
    kernel stores no group of a padded tile's padding). The tiles must be runs of the token order (1-D) and the block
    a multiple or a divisor of the KV tile."""
    where = "argument return_block_max"
    if len(launch.config.q_tile) != 1 or len(launch.config.kv_tile) != 1 or launch.plan.bound.is_block or \
            launch.plan.bound.q_offset:
        raise SpecError("the triton backend pools the block max of a call over 1-D tiles of the whole sequence: "
                        "not box tiles of a grid or queries after a KV cache in this version", where=where,
                        hint="backend='cpu' pools every call")
    tile = launch.config.kv_tile[0]
    if size % tile and tile % size:
        raise SpecError(f"a block of {size} keys neither holds whole KV tiles of {tile} nor divides one", where=where,
                        hint="a power of two, or a kv_tile= dividing the block, at compile_attention")
    group = min(size, tile)
    columns = launch.plan.schedule.num_kv_tiles * (tile // group)
    return (torch.full((B, Hq, rows, columns), -math.inf, dtype=torch.float32, device=device),
            {"BLOCK_MAX": True, "BMAX_G": group, "BMAX_C": tile // group})


def forward_outputs(out: torch.Tensor, lse: torch.Tensor, partial: tuple | None) -> dict:
    """The forward's ``O`` (its batch, head, row and split strides) and ``LSE`` (batch, head, split): ``out`` and
    ``lse`` themselves, the split strides None (constants to Triton: the kernel without ``SPLIT_KV`` reads none);
    or the split-KV partials ``[splits, B, H, rows (, DV)]`` (``split_kv.partials``)."""
    if partial is None:
        return {"O": (out, *out.stride()[:3], None), "LSE": (lse, *lse.stride()[:2], None)}
    po, pl = partial
    return {"O": (po, *po.stride()[1:4], po.stride(0)), "LSE": (pl, *pl.stride()[1:3], pl.stride(0))}


def combine_splits(launch: Launch, po: torch.Tensor, pl: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the split forward's partials into ``out`` and ``lse`` (``attnc_fwd_combine``, by log-sum-exp on the
    device: no host read)."""
    splits, B, H, rows, DV = po.shape
    block_dv = padded_head_dim(DV)
    block_r = split_kv.combine_rows(block_dv, rows)
    record_or_launch(launch, launch.module.attnc_fwd_combine, (-(-rows // block_r), B * H),
                     {"PO": (po, *po.stride()[:4]), "PL": (pl, *pl.stride()[:3]), "O": (out, *out.stride()[:3]),
                      "LSE": (lse, *lse.stride()[:2]), "ROWS": rows, "DV": DV, "SPLITS": splits},
                   dict(BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4), backward=False)


#: The range of a scale the forward applies in its exponent: ``scale * log2(e)``, the kernel's float32
#: ``scale_l2``, a normal float32 (not 0 after rounding or flushing, not inf; a factor of 2 to spare for the
#: roundings), or a masked slot's ``-inf * scale_l2`` would be NaN rather than -inf.
EXPONENT_SCALES = (2.0**-125 / LOG2E, 2.0**127 / LOG2E)


def scale_sign(launch: Launch, scale: float) -> dict:
    """The forward's ``POS_SCALE`` where its scores are the scaled q.k alone (``scale_in_exponent``): a positive
    scale (within ``EXPONENT_SCALES``) is applied in the exponent, one FMA a score; any other, to the scores
    first."""
    if not scale_in_exponent(launch.pattern):
        return {}
    return {"POS_SCALE": EXPONENT_SCALES[0] <= scale <= EXPONENT_SCALES[1]}


def _raise_index_errors(launch: Launch) -> None:
    """The error of a bias index the forward kernel found out of range on an attended pair
    (``ERR[slot]`` holds an offending index; 0 is always in range, so 0 means none)."""
    if not launch.checks:
        return
    found = launch.extra["ERR"].cpu()
    for (name, dim, size), value in zip(launch.checks, found.tolist(), strict=True):
        if value != 0:
            raise E.index_error(name, dim, value, size, guarded=True)
