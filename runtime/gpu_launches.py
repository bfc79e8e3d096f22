"""The launches a call would make on CUDA, recorded instead of run (the seam: the call's launch path, not the
compiler): ``capture_launches`` swaps Triton's launcher for a recorder, ``launching_for`` makes CPU tensors launch as
on ``sm_<arch>`` (its SMs and architecture), ``native_kernel`` finds the CUDA twin of an interpreted kernel.
``gpu_compile`` compiles what is recorded; ``gpu_check`` drives a pattern's call through it."""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
from dataclasses import dataclass

from ..core.errors import SpecError
from .tritonenv import interpreting

#: Shared memory one block may use (bytes): the opt-in maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
#: A local table on purpose: ``compiler.cost.hardware`` models per-SM capacity for the cost model.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
#: The simulator's hardware model whose schedule a call on this architecture runs.
ARCH_HARDWARE = {80: "a100", 86: "a100", 89: "a100", 90: "h100", 100: "b200", 120: "b200"}

_LOCK = threading.RLock()


@dataclass
class Recorded:
    """One ``kernel[grid](*args, **kwargs)`` of the launch path (not run)."""

    name: str
    fn: object  # the JITFunction (or InterpretedFunction) launched
    grid: tuple
    args: tuple
    kwargs: dict
    branch: str | None = None  # the branch of a combined pattern that launched it
    config: str = ""  # that branch's config in words (``describe_launch``)


@contextlib.contextmanager
def launching_for(arch: int):
    """CPU tensors launched as on ``sm_<arch>``'s GPU: the launch order decided for its SMs and
    architecture (``runtime.backends.triton.kernel_launch``: ``CPU_SMS``, ``CPU_ARCH``)."""
    from ..compiler.cost.hardware import get_hardware
    from .backends.triton import kernel_launch as KL

    saved = KL.CPU_SMS, KL.CPU_ARCH
    KL.CPU_SMS, KL.CPU_ARCH = get_hardware(ARCH_HARDWARE.get(arch, "h100")).sms, f"sm{arch}"
    try:
        yield
    finally:
        KL.CPU_SMS, KL.CPU_ARCH = saved


@contextlib.contextmanager
def capture_launches():
    """Record every Triton kernel launch in the block instead of running it (native and
    interpreted launches alike); yields the list the records go to. Outputs of recorded
    launches are left as allocated (garbage): only the launches matter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    records: list[Recorded] = []

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            raise SpecError("a warm-up compile inside a recorded launch path", where="gpu check")
        name = getattr(getattr(self, "fn", None), "__name__", None) or str(self)
        records.append(Recorded(name, self, tuple(grid) if not callable(grid) else grid, args, dict(kwargs)))

    with _LOCK:
        saved = (JITFunction.run, InterpretedFunction.run)
        JITFunction.run = record
        InterpretedFunction.run = record
        try:
            yield records
        finally:
            JITFunction.run, InterpretedFunction.run = saved


def native_kernel(fn):
    """The CUDA ``JITFunction`` of a recorded kernel: itself when native; for an interpreted one, the
    native twin from its module (generated kernel modules are reloaded natively, modules with a
    ``kernels(interpret)`` table are asked for theirs), else the plain function jitted."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    raw = fn.fn
    module = sys.modules.get(raw.__module__)
    if raw.__module__.startswith("attnc_kernels_"):
        from .backends.triton.runner import load_kernels

        return getattr(load_kernels(inspect.getsourcefile(raw), interpret=False), raw.__name__)
    table = getattr(module, "kernels", None)
    if callable(table):
        with contextlib.suppress(Exception):
            return table(False)[raw.__name__]
    import triton

    with interpreting(False):
        return triton.jit(raw)

