"""Tensor descriptors (TMA) for the Triton backend's kernels: the view of a tensor whose boxes a tile
loads, whether a launch can load by descriptors at all (``tma_applies``), and the forward's warp-specialized
form where its K/V tiles do."""

from __future__ import annotations

import math

import torch

from ....compiler.codegen.triton.kernels import warp_specialized_form
from ....compiler.codegen.triton.tiles import box_tile, boxes_are_rows, layout_of
from ....compiler.cost.hardware import compute_capability
from ....compiler.cost.search import TMA_BOX, has_tma, tma_fits
from . import kernel_launch as KL
from .kernel_launch import Launch

#: A descriptor argument as the runner gives it: (its tensor ``[B, H, rows, d]``, the role of its tiles,
#: 'q' or 'k', the tiles' padded head dim).
BoxSpec = tuple[torch.Tensor, str, int]


def box_of(launch: Launch, role: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(The grid's extents, the box a tile loads as) for ``role`` ('q' or 'k') tiles of ``launch``, as its kernels
    address them (``triton_tiles.box_tile``)."""
    s = launch.shape
    extents, tile = (s.q_extents, s.q_tile) if role == "q" else (s.kv_extents, s.kv_tile)
    return extents, box_tile(extents, tile, layout_of(launch.config) == "permute")


def descriptors(launch: Launch, tensors: dict[str, BoxSpec]) -> tuple[dict, dict]:
    """The tensor-descriptor arguments of a kernel (``KernelConfig.tma``) by their parameters' names, and its
    ``DESC`` constexpr. ``tensors`` maps each descriptor parameter to its ``BoxSpec``. Every parameter is None, a
    constant, and the kernel loads by pointer, where ``tma_applies`` says no."""
    views = tma_views(launch, tensors)
    return boxes(launch, tensors, views) if views is not None else (dict.fromkeys(tensors), {"DESC": False})


def boxes(launch: Launch, tensors: dict[str, BoxSpec], views: list) -> tuple[dict, dict]:
    """``descriptors``'s answer where TMA applies: each tensor's descriptor over its view (``tma_views``), its box a
    tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = {}
    for (name, (t, role, cols)), (shape, strides) in zip(tensors.items(), views, strict=True):
        box = box_of(launch, role)[1]
        descs[name] = TensorDescriptor(t, shape, strides, [1] * (len(shape) - len(box) - 1) + [*box, cols])
    return descs, {"DESC": True}


def _box_view(launch: Launch, t: torch.Tensor, role: str) -> tuple[list[int], list[int]] | None:
    """The shape and strides of the view of ``t`` (``[B, H, rows, d]``) whose boxes ``role``'s tiles load
    (``triton_tiles.box_coordinates``): ``t`` as it is for runs of rows; ``[B, H, Y, X, d]`` for boxes of a 2-D
    grid; ``[B * H, T, Y, X, d]`` for a 3-D grid, None where batch and head do not merge (a batch stride other
    than H head strides: a descriptor has at most 5 dimensions)."""
    extents, box = box_of(launch, role)
    strides = _tma_strides(t)
    if len(box) == 1:
        return list(t.shape), strides
    B, H, _, d = t.shape
    axes = [strides[2] * math.prod(extents[a + 1:]) for a in range(len(extents))]
    if len(box) == 2:
        return [B, H, *extents, d], [strides[0], strides[1], *axes, strides[3]]
    if H == 1:  # the heads' stride moves nothing
        lead = strides[0]
    elif B == 1 or t.stride(0) == H * t.stride(1):
        lead = strides[1]
    else:
        return None
    return [B * H, *extents, d], [lead, *axes, strides[3]]


def _tma_strides(t: torch.Tensor) -> list[int]:
    """A tensor's strides as its descriptor takes them: a dimension of one element never moves the address, so its
    stride, whatever torch keeps, is given as 16 B."""
    strides = [st if n > 1 else 16 // t.element_size() for n, st in zip(t.shape, t.stride(), strict=True)]
    strides[-1] = t.stride(-1)
    return strides


def tma_applies(launch: Launch, tensors: dict[str, BoxSpec]) -> bool:
    """Whether a kernel loads the ``tensors`` (as ``descriptors`` takes them) by TMA (``tma_views``)."""
    return tma_views(launch, tensors) is not None


def tma_views(launch: Launch, tensors: dict[str, BoxSpec]) -> list | None:
    """Each tensor's view as its descriptor spans it (``_box_view``), or None where the kernel loads by pointer: the
    config asks for no TMA, the architecture has none (before sm_90; the interpreter loads them too), a tile is not
    one box (``search.tma_fits``), or a tensor is not addressable by TMA: a stride or base off 16 bytes, a feature
    stride other than 1, a padded head dim over ``TMA_BOX``, a 3-D grid's batch and head that do not merge."""
    if not launch.config.tma or not has_tma(KL.arch_of(next(iter(tensors.values()))[0].device)):
        return None
    if not tma_fits(launch.config, launch.shape.q_extents, launch.shape.kv_extents):
        return None
    views = []
    for t, role, cols in tensors.values():
        if cols > TMA_BOX or t.stride(-1) != 1 or t.numel() == 0:  # (an empty batch: no box)
            return None
        view = _box_view(launch, t, role)
        size = t.element_size()
        if view is None or t.data_ptr() % 16 or not all(st > 0 and st * size % 16 == 0 for st in view[1][:-1]):
            return None
        views.append(view)
    return views


def warp_spec(launch: Launch, qp: torch.Tensor, kv: dict[str, BoxSpec], blocks: dict, by_tma: bool) -> dict:
    """The forward's ``WARP_SPEC`` and ``ONE_LOOP`` (``KernelConfig.warp_specialize``) where its K/V tiles ``kv`` load
    by TMA (``by_tma``, ``tma_applies``: Triton specializes no loop of pointer loads), in the form the architecture takes
    (``warp_specialized_form``): on Blackwell and later the two loops; on Hopper one loop, where Q's tensor ``qp``
    is TMA-addressable too and the tensors hold the rows the kernel's own descriptors span (runs of rows)."""
    if not launch.config.warp_specialize or not by_tma:
        return {}
    form = warp_specialized_form(launch.pattern, compute_capability(KL.arch_of(qp.device)))
    if form == "two loops":
        return {"WARP_SPEC": True}
    rows = math.prod(launch.shape.q_extents), math.prod(launch.shape.kv_extents)  # the kernel's descriptors' rows
    if (form == "one loop" and qp.shape[2] == rows[0] and kv["KD"][0].shape[2] == rows[1]
            and boxes_are_rows(launch.shape, layout_of(launch.config))
            and tma_applies(launch, {"Q": (qp, "q", blocks["BLOCK_D"])})):
        return {"WARP_SPEC": True, "ONE_LOOP": True}
    return {}
