"""The Runner protocol: what every backend implements, and the one place that says why a backend
cannot serve a call.

A runner is made once per compiled module (``registry.make_runner``) and called per call with a
``Call``: the shapes, dtype, device and flags bound once by the module (``api.Attention``). Backends
live in ``runtime/backends/<name>/`` (softmax patterns) and ``runtime/recurrences/`` (recurrences);
``auto`` is itself a runner that chooses among the others (``runtime/auto/``).

What a runner supports is declared, not discovered by trying: ``Support`` lists the devices, pattern
kinds and features it serves, and ``refusal`` turns the first unsupported one into the message every
backend's users see.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from ..compiler.analysis import evaluate as E


@dataclass(frozen=True)
class Support:
    """What a runner serves. ``devices``: device types (``"cpu"``, ``"cuda"``); ``kinds``: ``"softmax"``
    and/or ``"recurrence"``; ``query_offset``: queries after a KV cache (``nk > n``), ``"native"`` (the
    kernels take the offset), ``"sequence"`` (on a ``tokens seq`` layout only) or None; ``routing``: data-dependent block selection; ``compile``: runs under ``torch.compile``
    through a custom op (``runtime.ops``); ``decode_step``: ``Attention.step``; ``key_offset``: the
    device types on which the runner runs BLOCKS of a longer sequence (``BlockRunner``: queries at
    ``bound.q_offset`` against keys at ``bound.k_offset``, ``evaluate.block_bound``), the unit of
    context parallelism (``runtime.parallel.blocks``); ``double_backward``: its gradients are
    differentiable again (``create_graph=True``; elsewhere ``admission.first_order`` refuses)."""

    devices: frozenset = frozenset({"cpu", "cuda"})
    kinds: frozenset = frozenset({"softmax"})
    query_offset: str | None = "native"
    routing: bool = True
    compile: bool = True
    decode_step: bool = False
    key_offset: frozenset = frozenset()
    double_backward: bool = False


@dataclass(frozen=True)
class Call:
    """One call, bound once: the pattern's sizes (``bound``), the tensors' shapes and flags, and the
    call-time inputs by name (as given: the runners bind them against ``bound``)."""

    bound: E.Bound
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype
    device: torch.device
    grad: bool
    need_lse: bool
    scale: float
    inputs: dict = field(default_factory=dict)
    sizes: dict = field(default_factory=dict)  # the grid sizes given at compile and call time

    @property
    def q_offset(self) -> int:
        return self.bound.q_offset


@runtime_checkable
class Runner(Protocol):
    """A backend. ``name`` is its public name (``backend=``), ``support`` what it serves;
    ``forward(call, q, k, v)`` returns ``(out, lse)`` (differentiable: each runner records its own
    backward); ``last_schedule`` the ``TileSchedule`` of its latest call (None where it has none);
    ``describe()`` the text of what runs (``Attention.source``)."""

    name: str
    support: Support

    def forward(self, call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple: ...

    @property
    def last_schedule(self): ...

    def describe(self) -> str: ...


@runtime_checkable
class BlockRunner(Protocol):
    """A runner whose ``support.key_offset`` names a device type runs blocks there. ``bound`` is
    ``evaluate.block_bound(whole, q0, lq, k0, lk)``; q ``[B, H, lq, D]``, k, v ``[B, Hkv, lk, D]``
    the block's rows; ``inputs`` the WHOLE call-time inputs bound at the whole sequence (read at
    absolute positions); ``selection`` ``[B, H, lq, blocks]`` and ``key_block`` ``[lk]``: a
    routing pattern's selection of these queries and the block of each key (None otherwise).

    ``block_forward`` returns ``(out, lse)`` of the block in the compute dtype (fp32, fp64 for fp64);
    a query with no allowed key gives 0 and lse -inf. ``block_backward`` takes the MERGED
    statistics of every block of the rows (``out`` and ``lse`` of the whole row, as flash
    attention's backward; ``dlse`` the gradient of the merged lse, or None) and returns ``(dq share of
    this block, dk, dv, {input: gradient})`` (dk, dv with k's heads; the gradients of the inputs named
    by ``wrt``, the whole inputs' shapes, this block's share)."""

    def block_forward(self, bound: E.Bound, q, k, v, inputs: dict, scale: float,
                      selection=None, key_block=None) -> tuple: ...

    def block_backward(self, bound: E.Bound, q, k, v, out, lse, dout, inputs: dict, scale: float,
                       selection=None, key_block=None, dlse=None, wrt: tuple = ()) -> tuple: ...


def refusal(runner, kind: str, device: torch.device, q_offset: int = 0) -> str | None:
    """Why ``runner`` cannot serve a call of this pattern kind, device and query offset; None if it can."""
    s = runner.support
    if kind not in s.kinds:
        return f"the {runner.name} backend does not run {kind} patterns"
    if device.type not in s.devices:
        return f"the {runner.name} backend does not run on {device.type} tensors"
    if q_offset and s.query_offset is None:
        return f"the {runner.name} backend does not run queries after a KV cache yet"
    if q_offset and s.query_offset == "sequence" and getattr(runner.pattern.queries, "kind", "seq") != "seq":
        return f"the {runner.name} backend runs queries after a KV cache on a sequence only, not on a grid"
    return None
