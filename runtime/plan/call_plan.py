"""A plan's form for one call whose tile lists are made on the call's device (a mask's call-time inputs:
``runtime.plan.device_tiles``; a route's selection: ``runtime.plan.device_routes``): the lists of this call,
in fixed-width device tensors, over the state its plan keeps for every call (kernels, launch orders,
constants). Nothing of it is read back on the host while a call runs, so a warm call can be captured in a
CUDA graph."""

from __future__ import annotations

import dataclasses
import math

import torch

from ...compiler.analysis.schedule import TileSchedule

#: The device-state entries a call makes for itself (its lists); every other entry is its plan's, shared by
#: the calls.
CALL_KEYS = ("lists",)

#: The kernels' names of the four lists (``TileSchedule.runs``).
LIST_NAMES = ("FULL", "PART", "T_FULL", "T_PART")


class DeviceSchedule(TileSchedule):
    """A ``TileSchedule`` made on the device for one call: counts and lists of fixed widths (the widths of the
    candidates the call chose among, padded with -1), its allowed pairs not counted (``exact`` and
    ``density_exact`` False; ``allowed_pairs``, ``allowed_total`` and ``density`` NaN, not a count: counting them would read every
    pair of the call's mask; ``attnc.materialize_mask`` does)."""

    @property
    def allowed_total(self) -> float:
        return math.nan

    @property
    def density(self) -> float:
        return math.nan

    def runs(self) -> dict[str, bool]:
        """No list is asked whether it is a run of consecutive tiles: that would read it back from the device
        (the kernels read every list by index)."""
        return dict.fromkeys(LIST_NAMES, False)


def device_schedule(like: TileSchedule, classes: int, lists: dict[str, torch.Tensor]) -> DeviceSchedule:
    """A ``DeviceSchedule`` of ``like``'s tiles and heads with ``classes`` list classes and the lists ``lists``
    (``FULL_N``, ``FULL_I``, ``PART_N``, ``PART_I`` and the ``T_`` ones, int32 on the device)."""
    # not counted: NaN (zeros read as a count of 0 allowed pairs)
    uncounted = torch.full((classes,), math.nan, dtype=torch.float64, device=lists["FULL_N"].device)
    return DeviceSchedule(like.q_extents, like.kv_extents, like.q_tile, like.kv_tile, like.num_heads,
                          lists["FULL_N"], lists["FULL_I"], lists["PART_N"], lists["PART_I"], lists["T_FULL_N"],
                          lists["T_FULL_I"], lists["T_PART_N"], lists["T_PART_I"], uncounted, False, False)


class CallState(dict):
    """The device state of one call's plan: the entries the call makes for itself (``CALL_KEYS``: its lists)
    kept here, every other entry read from and written to its plan's (loaded kernels, launch orders, split
    counts, constants: made by the first call, reused by the later ones)."""

    def __init__(self, shared: dict):
        super().__init__()
        self.shared = shared

    @staticmethod
    def _own(key) -> bool:
        return isinstance(key, tuple) and bool(key) and key[0] in CALL_KEYS

    def __contains__(self, key) -> bool:
        return dict.__contains__(self, key) if self._own(key) else key in self.shared

    def __getitem__(self, key):
        return dict.__getitem__(self, key) if self._own(key) else self.shared[key]

    def __setitem__(self, key, value) -> None:
        if self._own(key):
            dict.__setitem__(self, key, value)
        else:
            self.shared[key] = value

    def get(self, key, default=None):
        return self[key] if key in self else default


def for_call(plan, schedule: DeviceSchedule, **changes):
    """``plan`` with one call's ``schedule`` (and ``changes``: a route's selection), its device state over
    ``plan``'s (``CallState``)."""
    shared = plan.device_state.shared if isinstance(plan.device_state, CallState) else plan.device_state
    return dataclasses.replace(plan, schedule=schedule, device_state=CallState(shared), **changes)
