"""The grouped-query forward of a few rows (``attnc_fwd_grouped``): queries after a KV cache (a decode step, a
short prefill after one) with K/V heads shared by ``group`` query heads.

The one-head forward launches a program per query head, whose Q tile of a decode step holds one row padded to
16: each K/V tile is read once per query head, ``group`` times per K/V head. The grouped forward launches a
program per K/V head and packs the Q tile's rows of its group's query heads into one tile (BLOCK_M rows,
``compiler.cost.decode_cost.packed_rows``), so each K/V tile is read once per group and one dot gives every head's
scores; the score terms read each row's own head. It runs where the module has it (a block's, of a pattern with
no route and no FoX decay: ``KernelSource.grouped_forward_applies``), the rows fit ``decode_cost.PACKED_ROWS``, the
tiles are 1-D runs in token order and no block max is asked for; a split-KV launch counts groups, not query heads.

Its lists are the group's (``group_lists``): one class for every head where the mask does not read the head; else,
from the per-head lists, a tile FULL for the group where it is FULL for every head of it and PARTIAL where it is
listed for some head otherwise (the kernel then evaluates the mask per row: a head for which the tile is EMPTY
gets no pair). Made with torch ops on the lists' device, nothing read back."""

from __future__ import annotations

import dataclasses
import math

import torch

from ....compiler.cost.decode_cost import packed_rows
from ...plan import block_max
from ...plan.device_tiles import compact
from .kernel_launch import Launch


def packed_block_m(launch: Launch, heads: int, kv_heads: int) -> int | None:
    """BLOCK_M of the grouped forward of ``launch`` with ``heads`` query heads on ``kv_heads`` K/V heads, or None
    where the one-head forward runs (module docstring)."""
    if heads == kv_heads or heads % kv_heads or not hasattr(launch.module, "attnc_fwd_grouped"):
        return None
    if launch.config.layout == "permute" or len(launch.shape.q_tile) != 1 or block_max.requested() is not None:
        return None
    if launch.cls not in ((0, 0), (0, 1)) or (launch.cls == (0, 1) and launch.lists["FULL_N"].shape[0] != heads):
        return None  # lists of one class, or one per query head (a mask reading h): nothing else is grouped
    return packed_rows(heads // kv_heads, launch.shape.q_tile[0])


def grouped_launch(launch: Launch, group: int) -> Launch:
    """``launch`` with the group's lists (module docstring) and their class strides: one class per K/V head where
    the lists were per query head."""
    if launch.cls == (0, 0):
        return launch
    lists = launch.plan.on_device(("lists", "grouped", group, launch.lists["FULL_N"].device),
                                  lambda: group_lists(launch.lists, group, kv_tiles(launch)))
    return dataclasses.replace(launch, lists={**launch.lists, **lists}, cls=(0, 1))


def kv_tiles(launch: Launch) -> int:
    """A bound on the KV tiles the forward lists name: the schedule's, or the lists' widths where they were made
    for a longer range of lengths than this call's (a decode step's, ``plan.decode_lists``)."""
    s = launch.shape
    own = -(-math.prod(s.kv_extents) // math.prod(s.kv_tile))
    return max(own, launch.lists["FULL_I"].shape[-1], launch.lists["PART_I"].shape[-1])


def group_lists(lists: dict, group: int, width: int) -> dict:
    """The forward's lists (``FULL_N``, ``FULL_I``, ``PART_N``, ``PART_I``) of each group of ``group`` consecutive
    query heads, from per-head lists naming KV tiles below ``width``."""
    full = _dense(lists["FULL_N"], lists["FULL_I"], width)
    listed = full | _dense(lists["PART_N"], lists["PART_I"], width)
    heads, rows = full.shape[:2]
    full = full.view(heads // group, group, rows, width).all(1)  # FULL for every head of the group
    part = listed.view(heads // group, group, rows, width).any(1) & ~full
    index = torch.arange(width, device=full.device, dtype=torch.int64).expand(*full.shape)
    out = {}
    for name, keep in (("FULL", full), ("PART", part)):
        count, entries = compact(index, keep)
        if entries.shape[-1] == 0:  # a width-0 list: one column of -1 (a valid pointer and row stride)
            entries = torch.full((*entries.shape[:-1], 1), -1, dtype=torch.int32, device=entries.device)
        out[f"{name}_N"], out[f"{name}_I"] = count.contiguous(), entries.contiguous()
    return out


def _dense(count: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
    """``[classes, Q tiles, width]`` bool: the KV tiles each list names."""
    live = torch.arange(index.shape[-1], device=index.device) < count[..., None]
    slot = torch.where(live, index.to(torch.int64), width)  # the dead entries to a column cut off after
    dense = torch.zeros(*count.shape, width + 1, dtype=torch.bool, device=index.device)
    return dense.scatter_(-1, slot, True)[..., :width]


__all__ = ["group_lists", "grouped_launch", "packed_block_m"]
