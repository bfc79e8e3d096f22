"""The CPU executor: runs a ``TileSchedule`` with batched torch operations.

Tokens are permuted so that every tile is contiguous (multi-dimensional tiles
become runs of the permuted order; edge tiles are padded with invalid slots).
For a chunk of Q tiles it gathers the KV tiles of their FULL lists and of
their PARTIAL lists, computes the scores, evaluates the mask on PARTIAL tiles
only, adds the score terms, and takes the softmax over every visited key of
the query at once. Memory is bounded by the chunk (``CHUNK_ELEMENTS`` score
entries), never by N x N.

The backward pass recomputes the probabilities: dQ (and the gradients of
score inputs) over the Q tiles' lists, dK and dV over the transposed lists
(per KV tile, the Q tiles that visit it), so no gradient is accumulated by
scattering across tiles except the key side of FoX gates and bias inputs.
"""

from __future__ import annotations

import functools
import math

import torch

from ...numerics import fox_prefix
from ...plan import block_max
from ...plan.tile_plan import (
    CHUNK_ELEMENTS,
    Plan,
    TileBlock,
    TiledTokens,
    chunks,
    packed_lists,
    trim_lists,
    visited_lists,
)
from . import fused
from . import rows as decode

#: Elements of the gathered K and V and the float mask of one chunk through the fused kernel
#: (``fusable``: it holds no scores; 128 MiB in fp32).
FUSED_CHUNK_ELEMENTS = 1 << 25


def _heads(x: torch.Tensor, heads: list[int]) -> torch.Tensor:
    """``x[:, heads]`` without a copy when the heads are a contiguous run."""
    if heads == list(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0]:heads[0] + len(heads)]
    return x[:, heads]


def fusable(plan: Plan, q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the blocks run through torch's fused CPU attention kernel: ``fused_shapes`` and no
    softcap and no ``weights`` clause (the kernel takes the mask and the additive terms as one float mask, not
    a tanh or a logarithm).
    The decision depends on the shapes only, never on an earlier failure: an error from the
    kernel is a bug and is raised."""
    return plan.softcap is None and plan.pattern.weights is None and fused.fused_shapes(q, v)


def _tile_major(x: torch.Tensor, index: torch.Tensor, tokens: TiledTokens | None = None,
                own: torch.Tensor | None = None) -> torch.Tensor:
    """The rows ``index [C, T]`` of ``x [B, H, N, D]`` in the kernel's layout ``[B * C, H, T, D]``
    (a strided view of one gather; a view of ``x`` itself for one batch row when ``tokens`` is
    in token order and ``own`` a run of tiles)."""
    B, H, N, D = x.shape
    C, T = index.shape
    if C == 1 and T == N and torch.equal(index[0], torch.arange(N)):  # every token in order (a whole tile)
        return _unit_stride(x)
    if B == 1 and tokens is not None and tokens.identity and int(own[-1]) - int(own[0]) + 1 == len(own):
        start = int(own[0]) * T
        return _unit_stride(x[:, :, start:start + C * T].unflatten(2, (C, T)).permute(0, 2, 1, 3, 4).reshape(C, H, T, D))
    return x.transpose(1, 2)[:, index].permute(0, 1, 3, 2, 4).reshape(B * C, H, T, D)


def _unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its features (the fused kernel's rows are read as such)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_mask(plan: Plan, blk: TileBlock, own: torch.Tensor, allowed: torch.Tensor, extra: dict, dtype, cache_key):
    """(float mask ``[Bm * C, Hm, R, K]`` in the kernel's layout, rows with an allowed key
    ``[Bm, C, Hm, R]`` or None when every valid row has one): the mask and the additive terms
    (bias, decay) as -inf / values; built once per plan for a static mask without terms."""
    additive = plan.bias is not None or plan.pattern.decay is not None
    key = ("kernel mask", cache_key, dtype)
    if not additive and key in plan.mask_cache:
        return plan.mask_cache[key]
    if additive:
        add = blk.terms(torch.zeros((), dtype=dtype), extra)
        shape = torch.broadcast_shapes(allowed.shape, add.shape)
        add = add.expand(shape).masked_fill(~allowed.expand(shape), -math.inf)
        keep = add != -math.inf  # a FoX reset (-inf decay) can empty a row too
    else:
        add = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, -math.inf)
        keep = allowed
    Bm, Hm, C, R, K = add.shape
    rows_ok = keep.any(-1)  # [Bm, Hm, C, R]
    row_valid = (plan.k_tokens if blk.transposed else plan.q_tokens).valid[own]  # padding rows are dropped
    empty_rows = None if bool((rows_ok | ~row_valid).all()) else rows_ok.permute(0, 2, 1, 3)
    entry = (add.permute(0, 2, 1, 3, 4).reshape(Bm * C, Hm, R, K), empty_rows)
    if not additive and cache_key is not None and plan.static_mask:
        plan.remember(key, entry)
    return entry


def _batch_mask(mask: torch.Tensor, B: int, C: int) -> torch.Tensor:
    """The kernel mask ``[Bm * C, Hm, R, K]`` for ``B`` batch rows (a copy where one is shared by all)."""
    if mask.shape[0] == B * C:
        return mask
    return mask.unflatten(0, (1, C)).expand(B, C, *mask.shape[1:]).reshape(B * C, *mask.shape[1:])


def _assemble(blocks: list, B: int, H: int, nQ: int, fill: float, dt) -> torch.Tensor:
    """``[B, H, nQ, ...]`` from per-chunk results ``(batch rows, heads, tiles, [rows, Hs, C, ...])``:
    the one block itself when it holds every tile in order, else copied into place (``fill``
    where no chunk wrote: tiles without visited keys)."""
    if len(blocks) == 1 and blocks[0][0] == slice(None) and blocks[0][1] == list(range(H)) \
            and len(blocks[0][2]) == nQ:
        return blocks[0][3]
    x = blocks[0][3]
    out = torch.full((B, H, nQ, *x.shape[3:]), fill, dtype=dt)
    for bsel, heads, own, part in blocks:
        out[bsel, torch.tensor(heads)[:, None], own[None, :]] = part
    return out


def _fused_block(plan: Plan, blk: TileBlock, own: torch.Tensor, qh, kh, vh, allowed, extra, scale: float,
                 cache_key=None):
    """The forward of one block through torch's fused CPU attention kernel (see ``fusable``):
    (out ``[B, Hs, C, R, Dv]``, lse ``[B, Hs, C, R]``), strided views of the kernel's outputs."""
    mask, rows_ok = _kernel_mask(plan, blk, own, allowed, extra, qh.dtype, cache_key)
    B, Hs = qh.shape[:2]
    C, R = blk.row_index.shape
    qc = _tile_major(qh, blk.row_index, plan.q_tokens, own)
    kc, vc = _tile_major(kh, blk.col_index), _tile_major(vh, blk.col_index)
    out, lse = fused.flash_attention(qc, kc, vc, _batch_mask(mask, B, C), scale)
    out, lse = out.unflatten(0, (B, C)), lse.to(qh.dtype).unflatten(0, (B, C))  # [B, C, Hs, R, (Dv)]
    if rows_ok is not None:  # a row with no allowed key: output 0, lse -inf
        out = torch.where(rows_ok[..., None], out, torch.zeros((), dtype=out.dtype))
        lse = torch.where(rows_ok, lse, torch.full((), -math.inf, dtype=lse.dtype))
    return out.permute(0, 2, 1, 3, 4), lse.permute(0, 2, 1, 3)


def _exp_rows(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(exp(s - rowmax), safe row sums, log-sum-exp) of masked scores (-inf where
    masked); a row with no allowed key has zeros, sum 1 and lse -inf. Overwrites ``s``:
    the caller divides ``p @ v`` by the sums (N x Dv work instead of N x K)."""
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = s.sub_(m).exp_()
    total = p.sum(dim=-1, keepdim=True)
    lse = (m + torch.log(total)).squeeze(-1)
    return p, torch.where(total == 0, torch.ones_like(total), total), lse


#: A chunk of tiles (``_width_chunks``) pads every tile's list to the longest one's: at most this
#: many times the pairs its tiles visit.
PADDING_LIMIT = 1.3


def _chunk_cost(plan: Plan, fused: bool, rows: int, heads: int, d: int, dv: int) -> tuple[int, int]:
    """(elements per visited tile pair, elements per chunk) of the forward's chunks: the scores
    and their work unfused; the gathered K/V rows and the float mask through the fused kernel."""
    tq, tk = plan.q_tokens.index.shape[1], plan.k_tokens.index.shape[1]
    if fused:
        return rows * heads * tk * (d + dv) + tq * tk, FUSED_CHUNK_ELEMENTS
    return rows * heads * tq * tk, CHUNK_ELEMENTS


def _width_chunks(plan: Plan, cls: int, transposed: bool, per_pair: int, budget: int) -> list[torch.Tensor]:
    """The tiles of list class ``cls`` in chunks of similar list widths (sorted by width, cut
    where padding to the longest list would exceed ``PADDING_LIMIT`` or the chunk ``budget``
    score entries, ``per_pair`` per visited tile pair); each chunk's tiles in ascending order
    (a run of tiles for uniform lists). Cached in the plan."""
    key = ("chunks", cls, transposed, per_pair, budget)
    if key in plan.mask_cache:
        return plan.mask_cache[key]
    s = plan.schedule
    full, part = (s.t_full_index, s.t_partial_index) if transposed else (s.full_index, s.partial_index)
    widths = (full[cls] >= 0).sum(-1) + (part[cls] >= 0).sum(-1)
    order = torch.argsort(widths, stable=True)
    chunks, start, total = [], 0, 0
    for i, w in enumerate(widths[order].tolist()):
        count = i - start + 1
        if count > 1 and (count * w * per_pair > budget or count * w > PADDING_LIMIT * (total + w)):
            chunks.append(order[start:i].sort().values)
            start, total = i, 0
        total += w
    chunks.append(order[start:].sort().values)
    plan.remember(key, tuple(chunks))
    return chunks


def _chunk_key(plan: Plan, cls: int, per: int, budget: int, i: int) -> tuple:
    """The cache key of the forward's chunk ``i`` (the fused backward reads the same masks): a whole
    tile is one chunk whatever the batch (``per`` grows with it), so its masks are kept once."""
    return ("whole", cls) if plan.whole else ("q by width", cls, per, budget, i)


def _prepare_extra(plan: Plan, inputs: dict[str, torch.Tensor], dtype) -> dict:
    extra = dict(inputs)
    if plan.pattern.decay is not None:
        g = inputs[plan.pattern.decay].to(dtype)
        for part, t in zip(("hi", "lo", "reset"), fox_prefix(g if g.dim() == 3 else g.unsqueeze(0)), strict=True):
            extra[f"__fox_{part}_{plan.pattern.decay}"] = t
    return extra


def _batch_rows(extra: dict, batched: set[str], bsel: slice, B: int) -> dict:
    """The call-time inputs (and derived tensors) seen by the batch rows ``bsel``."""
    if bsel == slice(None):
        return extra
    out = {}
    for name, t in extra.items():
        sliced = name in batched or (name.startswith("__") and t.shape[0] == B)
        out[name] = t[bsel] if sliced else t
    return out


def _no_autocast(fn):
    """Run ``fn`` with autocast off: the executor chooses its compute dtype (fp32, fp64 for
    fp64 inputs) itself; autocast would turn its matmuls to bf16/fp16 and mix dtypes
    (callers under autocast cast q, k, v first, as torch does for its attention)."""
    @functools.wraps(fn)
    def wrapper(plan, q, *args, **kwargs):
        with torch.autocast(q.device.type, enabled=False):
            return fn(plan, q, *args, **kwargs)

    return wrapper


@_no_autocast
def forward(plan: Plan, q, k, v, inputs: dict, batched: set[str], scale: float):
    """(out ``[B, Hq, Nq, Dv]`` in q's dtype, lse ``[B, Hq, Nq]`` fp32/fp64)."""
    if isinstance(plan, decode.RowPlan):  # a few queries after a KV cache (runtime.backends.cpu.rows)
        return decode.forward(plan, q, k, v, inputs, batched, scale)
    B, Hq, Nq, _ = q.shape
    group = Hq // k.shape[1]
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    size = block_max.requested(Nq, k.shape[2])  # return_block_max: the probabilities pooled per chunk (the fused kernel keeps them)
    fused = fusable(plan, q, v) and size is None
    pooled = block_max.empty(B, Hq, Nq, k.shape[2], size, dt, q.device) if size is not None else None
    # the scale folded into q (N x D work, not N x K) unless the kernel takes it
    qd, kd, vd = q.to(dt) if fused else q.to(dt) * scale, k.to(dt), v.to(dt)
    extra = _prepare_extra(plan, inputs, dt)
    nQ, Tq = plan.q_tokens.index.shape
    Dv = v.shape[-1]
    blocks, lse_blocks = [], []  # (batch rows, heads, tiles, out [rows, Hs, C, R, Dv] | lse [rows, Hs, C, R])
    for cls, bsel, heads in plan.groups():
        kv_heads = [h // group for h in heads]
        qh, kh, vh = _heads(qd[bsel], heads), _heads(kd[bsel], kv_heads), _heads(vd[bsel], kv_heads)
        ex = _batch_rows(extra, batched, bsel, B)
        rows = qh.shape[0]
        per, budget = _chunk_cost(plan, fused, rows, len(heads), q.shape[-1], Dv)
        for i, own in enumerate(_width_chunks(plan, cls, False, per, budget)):
            lists = packed_lists(plan.schedule, cls, own, False)
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            chunk_key = _chunk_key(plan, cls, per, budget, i)
            blk = TileBlock(plan, heads, own, lists, False, ex, batched, bsel, key=chunk_key)
            allowed = blk.allowed(chunk_key)
            if fused:
                o, lse = _fused_block(plan, blk, own, qh, kh, vh, allowed, ex, scale, chunk_key)
            else:
                qc, kc, vc = qh[:, :, blk.row_index], kh[:, :, blk.col_index], vh[:, :, blk.col_index]
                s = blk.terms(qc @ kc.transpose(-1, -2), ex)
                p, total, lse = _exp_rows(blk.mask_scores(s, allowed))
                if pooled is not None:  # the chunk's whole rows: their probabilities are final
                    at = torch.tensor(heads)  # (the groups' batch rows are a slice)
                    part = pooled[bsel][:, at]
                    block_max.scatter_max(part, (p / total).expand(rows, len(heads), *p.shape[-3:]),
                                          blk.row_index, blk.col_index, size)
                    pooled[bsel, at] = part
                o = (p @ vc).div_(total)
            blocks.append((bsel, heads, own, o.expand(rows, len(heads), *o.shape[-3:])))
            lse_blocks.append((bsel, heads, own, lse.expand(rows, len(heads), *lse.shape[-2:])))
    if not blocks:  # no query visits any key
        out_t, lse_t = torch.zeros(B, Hq, nQ, Tq, Dv, dtype=dt), torch.full((B, Hq, nQ, Tq), -math.inf, dtype=dt)
    else:
        out_t, lse_t = _assemble(blocks, B, Hq, nQ, 0.0, dt), _assemble(lse_blocks, B, Hq, nQ, -math.inf, dt)
    out = plan.q_tokens.scatter(out_t, Nq, features=True)
    lse = plan.q_tokens.scatter(lse_t, Nq, features=False)
    if pooled is not None:
        block_max.record(pooled)
    return out.to(q.dtype), lse


def _terms_grad(blk: TileBlock, s_raw: torch.Tensor, ds: torch.Tensor, plan: Plan, inputs: dict, batched, wrt: list[str],
                dt) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Push the gradient of the scores after the terms back to the raw scores and to score inputs."""
    if plan.softcap is None and plan.bias is None and plan.pattern.decay is None and plan.pattern.weights is None:
        return ds, {}
    with torch.enable_grad():
        leaves = {name: inputs[name].detach().to(dt).requires_grad_() for name in wrt}
        extra = _prepare_extra(plan, {**inputs, **leaves}, dt)
        raw = s_raw.detach().requires_grad_()
        s = blk.terms(raw, extra)
        targets = [raw, *leaves.values()]
        grads = torch.autograd.grad(s, targets, grad_outputs=ds.expand_as(s), allow_unused=True)
    out = {name: g for name, g in zip(leaves, grads[1:], strict=True) if g is not None}
    return grads[0], out


def _lse_feature(q, k, v, out, dout, dlse):
    """q, k, v, out, dout with one feature more that carries the lse's gradient through the fused
    backward kernel: it computes ``delta = rowsum(dout * out)`` and ``dS = P (dout v^T - delta)``,
    and the lse adds ``dlse P`` to dS. Zero features leave the scores (and dout v^T) unchanged, and
    the feature pair (dout 1, out -dlse) turns delta into ``delta - dlse``; dQ, dK and dV are the
    first D / Dv columns of the kernel's."""
    zero = torch.zeros((), dtype=q.dtype)
    pad = [torch.cat([x, zero.expand(*x.shape[:-1], 1)], -1) for x in (q, k, v)]
    out = torch.cat([out, -dlse.to(out.dtype)[..., None]], -1)
    dout = torch.cat([dout, torch.ones((), dtype=dout.dtype).expand(*dout.shape[:-1], 1)], -1)
    return (*pad, out, dout)


def _fused_backward(plan: Plan, q, k, v, out, lse, dout, dlse, inputs: dict, batched: set[str], scale: float):
    """(dq, dk, dv) through torch's fused CPU attention backward (``fusable``; no gradient of score
    inputs; the lse's gradient ``dlse`` through one extra feature, ``_lse_feature``): per chunk of
    Q tiles (the forward's chunks, masks and geometry), the kernel recomputes P from the saved lse
    over the gathered K/V and returns dQ and the gathered dK/dV, which are added to their tokens."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qd, kd, vd, dod, od = (x.to(dt) for x in (q, k, v, dout, out))
    if dlse is not None and bool(dlse.any()):
        qd, kd, vd, od, dod = _lse_feature(qd, kd, vd, od, dod, dlse)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros((), dtype=lse.dtype), lse).to(dt)  # empty rows: P = 0
    extra = _prepare_extra(plan, inputs, dt)
    nQ, Tq = plan.q_tokens.index.shape
    dk_acc = torch.zeros(B, Nk, Hkv, kd.shape[-1], dtype=dt)  # token-major: chunks add [C * K] key rows at once
    dv_acc = torch.zeros(B, Nk, Hkv, vd.shape[-1], dtype=dt)
    dq_blocks = []
    backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    for cls, bsel, heads in plan.groups():
        kv_heads = [h // group for h in heads]
        qh, dh, oh = (_heads(x[bsel], heads) for x in (qd, dod, od))
        kh, vh = _heads(kd[bsel], kv_heads), _heads(vd[bsel], kv_heads)
        lh = _heads(safe_lse[bsel], heads)[..., None]
        ex = _batch_rows(extra, batched, bsel, B)
        rows = qh.shape[0]
        per, budget = _chunk_cost(plan, True, rows, len(heads), D, Dv)
        for i, own in enumerate(_width_chunks(plan, cls, False, per, budget)):
            lists = packed_lists(plan.schedule, cls, own, False)
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            chunk_key = _chunk_key(plan, cls, per, budget, i)  # the forward's
            blk = TileBlock(plan, heads, own, lists, False, ex, batched, bsel, key=chunk_key)
            mask, _ = _kernel_mask(plan, blk, own, blk.allowed(chunk_key), ex, dt, chunk_key)
            C, K = blk.col_index.shape
            qc, doc, oc, lc = (_tile_major(x, blk.row_index, plan.q_tokens, own) for x in (qh, dh, oh, lh))
            kc, vc = _tile_major(kh, blk.col_index), _tile_major(vh, blk.col_index)
            dq_c, dk_c, dv_c = backward_op(doc, qc, kc, vc, oc, lc[..., 0].contiguous(), 0.0, False,
                                           attn_mask=_batch_mask(mask, rows, C), scale=scale)
            dq_blocks.append((bsel, heads, own, dq_c.unflatten(0, (rows, C)).permute(0, 2, 1, 3, 4)))
            cols = blk.col_index.flatten()  # padded columns are masked: their gradients are 0
            for acc, g in ((dk_acc, dk_c), (dv_acc, dv_c)):
                g = g.unflatten(0, (rows, C)).transpose(2, 3).reshape(rows, C * K, len(heads), g.shape[-1])
                if heads == list(range(Hq)):  # every head: grouped query heads summed onto their key head
                    acc[bsel].index_add_(1, cols, g.unflatten(2, (Hkv, group)).sum(3) if group > 1 else g)
                else:
                    for j, kv in enumerate(kv_heads):
                        acc[bsel, :, kv].index_add_(1, cols, g[:, :, j])
    dq_t = _assemble(dq_blocks, B, Hq, nQ, 0.0, dt) if dq_blocks else torch.zeros(B, Hq, nQ, Tq, qd.shape[-1], dtype=dt)
    dq = plan.q_tokens.scatter(dq_t, Nq, features=True)[..., :D].to(q.dtype)
    return dq, dk_acc.transpose(1, 2)[..., :D].to(k.dtype), dv_acc.transpose(1, 2)[..., :Dv].to(v.dtype)


@_no_autocast
def backward(plan: Plan, q, k, v, out, lse, dout, dlse, inputs: dict, batched: set[str], scale: float,
             wrt: list[str]):
    """Gradients (dq, dk, dv, {input: grad}) by recomputation over the tile lists."""
    if isinstance(plan, decode.RowPlan):
        return decode.backward(plan, q, k, v, out, lse, dout, dlse, inputs, batched, scale, wrt)
    if fusable(plan, q, v) and not wrt:
        return (*_fused_backward(plan, q, k, v, out, lse, dout, dlse, inputs, batched, scale), {})
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = Hq // Hkv
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qd, kd, vd, dod = q.to(dt), k.to(dt), v.to(dt), dout.to(dt)
    delta = (dod * out.to(dt)).sum(-1)  # [B, H, Nq]
    if dlse is not None:
        delta = delta - dlse.to(dt)
    safe_lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).to(dt)
    extra = _prepare_extra(plan, inputs, dt)
    nQ, Tq = plan.q_tokens.index.shape
    nK, Tk = plan.k_tokens.index.shape
    dq_t = torch.zeros(B, Hq, nQ, Tq, D, dtype=dt)
    dk_t = torch.zeros(B, Hkv, nK, Tk, D, dtype=dt)
    dv_t = torch.zeros(B, Hkv, nK, Tk, v.shape[-1], dtype=dt)
    d_inputs: dict[str, torch.Tensor] = {}
    sched = plan.schedule
    for cls, bsel, heads in plan.groups():
        kv_heads = [h // group for h in heads]
        kvh = torch.tensor(kv_heads)
        qh, dh = _heads(qd[bsel], heads), _heads(dod[bsel], heads)
        kh, vh = _heads(kd[bsel], kv_heads), _heads(vd[bsel], kv_heads)
        lse_h, delta_h = _heads(safe_lse[bsel], heads), _heads(delta[bsel], heads)
        ex, inp = _batch_rows(extra, batched, bsel, B), _batch_rows(inputs, batched, bsel, B)
        nrows = qh.shape[0]
        # dQ and score inputs: rows are Q tiles, over their KV lists
        width = sched.full_index.shape[-1] + sched.partial_index.shape[-1]
        for own in chunks(nQ, nrows * len(heads) * Tq * max(1, width) * Tk):
            lists = trim_lists(visited_lists(sched, cls, own, False))
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            blk = TileBlock(plan, heads, own, lists, False, ex, batched, bsel)
            rows, cols = blk.row_index, blk.col_index
            qc, kc, vc = qh[:, :, rows], kh[:, :, cols], vh[:, :, cols]
            s_raw = scale * (qc @ kc.transpose(-1, -2))
            allowed = blk.allowed(("q", cls, int(own[0]), len(own)))
            s = blk.terms(s_raw, ex)
            p = torch.where(allowed, torch.exp(s - lse_h[:, :, rows][..., None]), torch.zeros((), dtype=dt))
            dp = dh[:, :, rows] @ vc.transpose(-1, -2)
            ds = p * (dp - delta_h[:, :, rows][..., None])
            ds_raw, d_in = _terms_grad(blk, s_raw, ds, plan, inp, batched, wrt, dt)
            for name, g in d_in.items():
                if name in batched and bsel != slice(None):
                    whole = torch.zeros(inputs[name].shape, dtype=g.dtype)
                    whole[bsel] = g
                    g = whole
                d_inputs[name] = d_inputs[name] + g if name in d_inputs else g
            dq_t[bsel, heads, own[0]:own[-1] + 1] = scale * (ds_raw @ kc)
        # dK and dV: rows are KV tiles, over the transposed lists
        width = sched.t_full_index.shape[-1] + sched.t_partial_index.shape[-1]
        for own in chunks(nK, nrows * len(heads) * Tk * max(1, width) * Tq):
            lists = trim_lists(visited_lists(sched, cls, own, True))
            if sum(idx.shape[1] for idx, _ in lists) == 0:
                continue
            blk = TileBlock(plan, heads, own, lists, True, ex, batched, bsel)
            rows, cols = blk.row_index, blk.col_index
            kc, vc = kh[:, :, rows], vh[:, :, rows]
            qc, doc = qh[:, :, cols], dh[:, :, cols]
            s_raw = scale * (kc @ qc.transpose(-1, -2))  # [B, Hs, C, Tk, Kq]
            allowed = blk.allowed(("kv", cls, int(own[0]), len(own)))
            s = blk.terms(s_raw, ex)
            p = torch.where(allowed, torch.exp(s - lse_h[:, :, cols][..., None, :]), torch.zeros((), dtype=dt))
            dv = p @ doc
            dp = vc @ doc.transpose(-1, -2)
            ds = p * (dp - delta_h[:, :, cols][..., None, :])
            ds_raw, _ = _terms_grad(blk, s_raw, ds, plan, inp, batched, [], dt)
            dk = scale * (ds_raw @ qc)
            dk_t[bsel, :, own[0]:own[-1] + 1].index_add_(1, kvh, dk.expand(nrows, *dk.shape[1:]))
            dv_t[bsel, :, own[0]:own[-1] + 1].index_add_(1, kvh, dv.expand(nrows, *dv.shape[1:]))
    dq = plan.q_tokens.scatter(dq_t, Nq, features=True).to(q.dtype)
    dk = plan.k_tokens.scatter(dk_t, Nk, features=True).to(k.dtype)
    dv = plan.k_tokens.scatter(dv_t, Nk, features=True).to(v.dtype)
    return dq, dk, dv, {name: g.to(inputs[name].dtype) for name, g in d_inputs.items()}


class TiledAttention(torch.autograd.Function):
    """The executor as a differentiable function of q, k, v and the float score inputs."""

    @staticmethod
    def forward(ctx, plan: Plan, scale: float, batched: frozenset, names: tuple, q, k, v, *input_tensors):
        inputs = dict(zip(names, input_tensors, strict=True))
        out, lse = forward(plan, q, k, v, inputs, set(batched), scale)
        ctx.plan, ctx.scale, ctx.batched, ctx.names = plan, scale, batched, names
        ctx.save_for_backward(q, k, v, out, lse, *input_tensors)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *input_tensors = ctx.saved_tensors
        inputs = dict(zip(ctx.names, input_tensors, strict=True))
        wrt = [n for n, t, need in zip(ctx.names, input_tensors, ctx.needs_input_grad[7:], strict=True)
               if need and t.dtype.is_floating_point]
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, d_in = backward(ctx.plan, q, k, v, out, lse, dout, dlse, inputs, set(ctx.batched), ctx.scale, wrt)
        return (None, None, None, None, dq, dk, dv, *(d_in.get(n) for n in ctx.names))
