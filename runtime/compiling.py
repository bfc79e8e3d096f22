"""Whether the calling thread is inside a ``torch.compile`` session: the one test every traced path takes.

``torch.compiler.is_compiling()`` reads a process-wide flag, which torch (2.13) holds for the whole of a compile
session so that code run by the compile but not traced by dynamo sees it. Another thread's eager call saw it too,
took the traced path (the custom ops) while the compile ran, and crashed beside it (FlexAttention's first call in
two threads: a heap corruption). ``compiling`` adds the thread's own compile context, which torch keeps per thread;
dynamo takes that test as a constant while it traces (``assume_constant_result``), so ``fullgraph=True`` holds.
"""

from __future__ import annotations

import torch


def compiling() -> bool:
    """True while this thread's code is traced or run by ``torch.compile`` (or exported)."""
    return torch.compiler.is_compiling() and (_this_thread_compiles() or torch.compiler.is_exporting())


@torch.compiler.assume_constant_result
def _this_thread_compiles() -> bool:
    return torch._guards.CompileContext.try_get() is not None
