"""Top-p blocks by antidiagonal scoring (XAttention): ``route topp(P) blocks(SIZE) by antidiagonal(STRIDE)``; the
rule is ``plan/antidiagonal.py``'s, every query of a block sharing the block's selection."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.route_blocks import route_sizes, route_stride
from ....core import ir, route_kinds
from .. import antidiagonal
from ..route_scores import keep_blocks
from .base import RouteForm


def select(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, inputs: dict | None, allowed):
    return antidiagonal.select(pat, bound, q, k, inputs, allowed, lambda key_block, nblocks: keep_blocks(
        pat, bound, inputs, q.shape[0], key_block, nblocks))


def select_on_device(pat: ir.PatternIR, bound: E.Bound, q, k, _tensors: dict, c) -> torch.Tensor:
    (block,), _ = route_sizes(pat, bound)
    t = c.extras
    mass = antidiagonal.block_mass(pat, bound, q, k, None, block, t["stride"], tiles=t["tiles"])
    B = mass.shape[0]
    forced = None if t["forced"] is None else t["forced"].expand(B, *t["forced"].shape[1:])
    chosen = antidiagonal.threshold(mass, t["candidates"].expand(B, *t["candidates"].shape[1:]), forced,
                                    float(pat.route.params.topp))  # [B, Hq, nblocks, nblocks]
    return chosen[:, :, c.key_block[:q.shape[2]]] & c.allowed


def device_extras(plan, allowed: torch.Tensor, keep: torch.Tensor | None, block: tuple[int, ...]) -> dict:
    """What the calls share: the stride tiles the mask reaches ``[1, Hq, runs, runs]`` (``antidiagonal.block_mass``'s),
    and per (query block, key block) whether the mask reaches it and whether ``keep`` forces it
    (``antidiagonal.select``'s candidates and forced blocks)."""
    pat, bound = plan.pattern, plan.bound
    stride = route_stride(pat, bound)
    tiles = antidiagonal.classified_stride_tiles(pat, bound, None, stride)
    if tiles is None:  # the classifier left pairs open: the mask pooled densely, once
        tiles = antidiagonal.stride_tiles(pat, bound, None, 1, stride, range(0, -(-bound.n // stride)))
    nblocks = allowed.shape[-1]
    forced = None if keep is None else antidiagonal.per_block(torch.broadcast_to(keep, allowed.shape), block[0],
                                                             nblocks)
    return {"tiles": tiles, "stride": stride, "candidates": antidiagonal.per_block(allowed, block[0], nblocks),
            "forced": forced}


def _decode(pat: ir.PatternIR) -> str:
    return (f"'{pat.name}' selects blocks by antidiagonal scoring over every query of a block: queries after a KV "
            "cache (nk > n) are not supported")


def _context_parallel(pat: ir.PatternIR) -> str:
    return (f"'{pat.name}' selects blocks by antidiagonal top-p scoring (XAttention), which context parallelism "
            "does not run: each query block's estimate reads every key and every query of the block")


FORM = RouteForm(route_kinds.TOPP_ANTIDIAGONAL.name, select, select_on_device, _decode, _context_parallel,
                 device_extras)
