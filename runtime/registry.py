"""Backend names -> runners: the one table a new backend is added to (with its folder under
``runtime/backends/``)."""

from __future__ import annotations

from ..core import ir
from ..core.errors import SpecError
from .auto.runner import AutoRunner
from .backends.cpu.runner import CpuRunner
from .backends.flex.runner import FlexRunner, refuse_recurrence
from .backends.reference.runner import ReferenceRunner
from .backends.triton.runner import TritonRunner
from .recurrences.runner import RecurrenceRunner

#: Softmax runners by backend name; each is made as ``factory(pattern, q_tile, kv_tile)``.
SOFTMAX_RUNNERS = {
    "auto": AutoRunner,
    "cpu": CpuRunner,
    "reference": lambda pat, q_tile, kv_tile: ReferenceRunner(pat),
    "triton": TritonRunner,
    "flex": FlexRunner,
}
#: Recurrence backends (``RecurrenceRunner``): Flex has no softmax to lower a recurrence to.
RECURRENCE_BACKENDS = ("auto", "cpu", "reference", "triton")
BACKENDS = tuple(SOFTMAX_RUNNERS)


def check_backend(backend) -> str:
    """``backend`` if it names a runner, else one clear message listing them."""
    if not isinstance(backend, str) or backend not in SOFTMAX_RUNNERS:
        raise SpecError(f"unknown or unavailable backend {backend!r}", where="argument backend",
                        hint="available in this version: " + ", ".join(BACKENDS))
    return backend


def check_recurrence_backend(pattern: ir.RecurrenceIR, backend: str) -> None:
    """A recurrence on a backend that has none (Flex: no softmax to lower) is refused when compiling."""
    if backend not in RECURRENCE_BACKENDS:
        refuse_recurrence(pattern)


def make_runner(pattern: ir.PatternIR | ir.RecurrenceIR, backend: str, q_tile=None, kv_tile=None):
    """The runner of ``backend`` for ``pattern`` (tiles already checked; for a recurrence ``q_tile``
    is the checked chunk size or None)."""
    if isinstance(pattern, ir.RecurrenceIR):
        check_recurrence_backend(pattern, backend)
        return RecurrenceRunner(pattern, backend, q_tile)
    return SOFTMAX_RUNNERS[check_backend(backend)](pattern, q_tile, kv_tile)
