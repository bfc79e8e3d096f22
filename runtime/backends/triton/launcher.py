"""A forward-only call's launches bound once per call signature and replayed: plan once, run many.

``build`` runs the forward (``forward.forward``) twice without launching (``forward.recording``) on a cached
``Launch`` and the call's own q, k and v, and compares the two recordings: an argument that is the same object in
both (tile lists, placeholders, launch orders, constants) belongs to the launch and is kept; one that is a
different tensor in each is a buffer the forward allocates per call (the output, its lse, split-KV partials),
kept as its shape, strides and dtype; q, k and v are found by identity. What a warm call then does
(``Launcher.__call__``): allocate those buffers, fill those the forward filled (``forward.fill_or_record``), put
them and q, k, v into the kept argument lists, and launch the recorded kernels through
``kernel_launch.launch_kernel`` (its fallbacks to fewer stages included). ``bind`` does the same for any forward
and the tensors of its call (a paged call's: q, the pools, the block table, the lengths; ``triton.paged``).

A forward whose launches hold anything else made per call is not replayed (``build`` returns None and the call
keeps the ordinary path): tensor descriptors (TMA: they hold the tensors' addresses), a buffer that must start
filled and that the forward did not fill by ``fill_or_record`` (the block max's), index checks read back from the
device (``launch.checks``), tokens permuted into tile order (q, k, v copied per call), grids, constexprs or
scalars that differ between the two recordings.
"""

from __future__ import annotations

import torch

from ...plan import block_max
from ...tritonenv import interpreting
from . import forward as F
from . import kernel_launch as KL

#: Plain values a replayed argument or constexpr may be (compared between the two recordings).
_PLAIN = (int, float, bool, str, type(None))


class Launcher:
    """The launches of one call signature (module docstring): ``launcher(*fixed) -> (out, lse)``, ``fixed`` the
    call's own tensors in the order they were bound (q, k, v for a contiguous call)."""

    __slots__ = ("buffers", "interpret", "launches", "out", "lse", "owner", "plan_of", "fixed")

    def __init__(self, buffers: list, interpret: bool, launches: list, out: int, lse: int, fixed: int = 3):
        self.buffers = buffers  # (shape, strides, dtype, device) of each per-call buffer
        self.interpret = interpret
        #: (launch, kernel, grid, args, meta, backward, fills (``_fills``)), or (forward.FILL, slot, value)
        self.launches = launches
        self.out, self.lse = out, lse  # the slots of the results
        self.owner = None  # the runner whose latest call this is, once replayed (its source, plan, config)
        self.plan_of: tuple = (None, None, None)
        self.fixed = fixed  # how many of the slots are the call's own tensors

    def __call__(self, *fixed):
        """``(out, lse)`` of the call, or None where a launch ran out of resources (nothing is changed: the
        caller takes the ordinary path, which falls back to smaller tiles)."""
        slots = [*fixed]
        for shape, strides, dtype, device in self.buffers:
            slots.append(torch.empty_strided(shape, strides, dtype=dtype, device=device))
        try:
            with interpreting(self.interpret):
                for entry in self.launches:
                    if entry[0] is F.FILL:
                        slots[entry[1]].fill_(entry[2])
                        continue
                    launch, kernel, grid, args, meta, backward, (singles, heads, others) = entry
                    args = [*args]
                    for i, slot in singles:
                        args[i] = slots[slot]
                    for i, slot, tail in heads:  # a tensor's group: its pointer, then its strides
                        args[i] = (slots[slot],) + tail
                    for i, template, inner in others:
                        group = [*template]
                        for j, slot in inner:
                            group[j] = slots[slot]
                        args[i] = tuple(group)
                    KL.launch_kernel(launch, kernel, grid, args, meta, backward=backward)
        except KL.out_of_resources():
            return None
        if self.owner is not None:
            self.owner.last_source, self.owner.last_plan, self.owner.last_config = self.plan_of
        return slots[self.out], slots[self.lse]


def _plain(value) -> bool:
    if isinstance(value, tuple | list):
        return all(_plain(x) for x in value)
    return isinstance(value, _PLAIN)


def _values(a, b) -> list | None:
    """The values of an argument in two recordings, ``(place, first, second)``: itself (place None), or each value of
    a group (a tuple argument) at its place; None where the two differ in form."""
    if isinstance(a, tuple) or isinstance(b, tuple):
        if type(a) is not type(b) or len(a) != len(b):
            return None
        return [(j, x, y) for j, (x, y) in enumerate(zip(a, b, strict=True))]
    return [(None, a, b)]


def _fills(kept: list, places: list) -> tuple:
    """How a replay puts a call's tensors into a launch's kept arguments, by the cheapest form for each argument
    (a warm call's host time is the budget): ``singles`` ``(position, slot)``, an argument that is the tensor
    itself; ``heads`` ``(position, slot, tail)``, a tensor's group, the tensor first, its strides kept; ``others``
    ``(position, template, ((place, slot), ...))``, any other group."""
    singles, heads, others = [], [], []
    for i in sorted({p for p, _, _ in places}):
        inner = [(j, slot) for p, j, slot in places if p == i]
        if inner[0][0] is None:
            singles.append((i, inner[0][1]))
        elif len(inner) == 1 and inner[0][0] == 0:
            heads.append((i, inner[0][1], tuple(kept[i][1:])))
        else:
            others.append((i, tuple(kept[i]), tuple(inner)))
    return tuple(singles), tuple(heads), tuple(others)


def _without(arg, places: list):
    """An argument as a replay keeps it: None where it is a per-call tensor (place None), or its group with None at
    those places (a replay puts each call's tensors there)."""
    if not places:
        return arg
    if places == [None]:
        return None
    return tuple(None if j in places else x for j, x in enumerate(arg))


def build(launch, q, k, v, scale: float) -> Launcher | None:
    """The ``Launcher`` of a forward-only call of ``launch`` (a cached one: it is replayed as it is), or None where
    its forward makes something per call that a replay would not (module docstring)."""
    if launch.checks or launch.config.layout == "permute" or launch.pattern.route is not None:
        return None
    if block_max.requested() is not None or any(a is b for a, b in ((q, k), (k, v), (q, v))):
        return None  # a pooled buffer filled per call; one tensor in two places (a later call may pass two)
    if any(t.stride(-1) != 1 for t in (q, k, v)):  # copied into a contiguous layout per call (to_tiles)
        return None
    return bind(lambda: F.forward(launch, q, k, v, scale, may_split=True), (q, k, v), launch.interpret)


def bind(run, fixed: tuple, interpret: bool) -> Launcher | None:
    """The ``Launcher`` of ``run() -> (out, lse)``, a forward whose launches read the tensors ``fixed`` (the call's
    own, found by identity), or None where its two recordings differ in anything but the buffers it allocates
    (module docstring). ``fixed`` holds distinct tensors, each of which the forward passes to its kernels as it is
    (a copy made per call would be taken for an allocated buffer: the caller rules it out)."""
    runs = []
    for _ in range(2):
        with F.recording() as made:
            out, lse = run()
        runs.append((made, out, lse))
    (first, out, lse), (second, out2, lse2) = runs
    if len(first) != len(second) or not first:
        return None
    buffers: list = []
    seen: list = []  # (tensor of the first recording, tensor of the second, slot)

    def slot_of(a, b) -> int | None:
        for i, t in enumerate(fixed):
            if a is t:
                return i if b is t else None
        for x, y, s in seen:
            if a is x:
                return s if b is y else None
        if any(b is y for _, y, _ in seen) or any(b is t for t in fixed):
            return None
        if a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype or a.device != b.device:
            return None
        seen.append((a, b, len(fixed) + len(buffers)))
        buffers.append((tuple(a.shape), tuple(a.stride()), a.dtype, a.device))
        return seen[-1][2]

    launches = []
    for one, two in zip(first, second, strict=True):
        if one[0] is F.FILL or two[0] is F.FILL:  # a buffer filled before the launches read it
            if one[0] != two[0] or one[2] != two[2] or (slot := slot_of(one[1], two[1])) is None:
                return None
            if slot < len(fixed):
                return None  # the call's own tensor is never filled by a replay
            launches.append((F.FILL, slot, one[2]))
            continue
        lch, kernel, grid, args, meta, backward = one
        if type(lch) is not type(two[0]) or kernel is not two[1] or grid != two[2] or backward != two[5]:
            return None
        if len(args) != len(two[3]) or meta.keys() != two[4].keys() or not _plain(grid):
            return None
        if not all(_plain(x) and x == y for x, y in zip(meta.values(), two[4].values(), strict=True)):
            return None
        places = []
        for i, (a, b) in enumerate(zip(args, two[3], strict=True)):
            values = _values(a, b)
            if values is None:
                return None
            for j, x, y in values:
                if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                    if x is y and not any(x is t for t in fixed):
                        continue  # the launch's own: kept
                    slot = slot_of(x, y)
                    if slot is None:
                        return None
                    places.append((i, j, slot))
                elif not (_plain(x) and type(x) is type(y) and x == y):
                    return None  # a descriptor, or a value made per call
        kept = [_without(a, [j for p, j, _ in places if p == i]) for i, a in enumerate(args)]
        launches.append((lch, kernel, grid, tuple(kept), dict(meta), backward, _fills(kept, places)))
    results = []
    for a, b in ((out, out2), (lse, lse2)):
        slot = next((s for x, y, s in seen if a is x and b is y), None)
        if slot is None:
            return None  # a result that is not a buffer the launches wrote (a copy or a view of one)
        results.append(slot)
    return Launcher(buffers, interpret, launches, results[0], results[1], len(fixed))
