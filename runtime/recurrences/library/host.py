"""The host side of the recurrence kernels: whether Triton is there, wrapping a family's kernels for the GPU or
the interpreter (``jit_table``), launching them (``launch``, on a GPU at the fit ladder's first rung that does
not spill), block sizes, the gate arrays the decay and KDA kernels read (``gate_arrays``), and a rule's forward and
backward as one autograd node (``ChunkedFunction``)."""

import os
import types

import torch

from ... import kernel_fit
from ...tritonenv import interpreting, require_triton
from .device import triton
from .gates import ChunkGates, split_chunks

#: Dk block of the chunk-parallel kernels of per-channel gates (they hold [C, BK] gate tiles besides q, k).
VECTOR_BLOCK = 32


def available() -> bool:
    return triton is not None


def block_size(D: int, limit: int) -> int:
    return min(max(16, triton.next_power_of_2(D)), max(16, limit))


def interprets(t: torch.Tensor) -> bool:
    """CPU tensors run in the interpreter; so does everything when TRITON_INTERPRET=1 was set."""
    return t.device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def rebound(fn, namespace: dict):
    """``fn`` over another globals dict (so its calls resolve to the jitted helpers)."""
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__module__, new.__qualname__, new.__doc__ = fn.__module__, fn.__qualname__, fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    return new


def jit_table(helpers: tuple, kernels_: tuple, namespace: dict, interpret: bool) -> dict:
    """A module's kernels by name: jitted for the GPU over a copy of ``namespace`` in which the helpers are
    jitted too (``interpret=False``), or wrapped by Triton's interpreter, the helpers running as plain Python."""
    require_triton(interpret)
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return {fn.__name__: InterpretedFunction(fn) for fn in kernels_}
    namespace = dict(namespace)
    with interpreting(False):
        for fn in helpers + kernels_:
            namespace[fn.__name__] = triton.jit(rebound(fn, namespace))
    return {fn.__name__: namespace[fn.__name__] for fn in kernels_}


def launch(fn, grid, interpret: bool, *args, **meta) -> None:
    """An ordinary ``kernel[grid](...)`` launch (the interpreter's under TRITON_INTERPRET=1); on a GPU at
    the first rung of ``kernel_fit``'s ladder from its ``num_warps``/``num_stages`` that runs without
    spilling. A grid CUDA would not launch is refused first (``kernel_fit.check_grid``)."""
    kernel_fit.check_grid(grid)
    if interpret:
        with interpreting(True):
            fn[grid](*args, **meta)
        return
    if kernel_fit.on_gpu(args):
        opts = {key: meta.pop(key, default) for key, default in kernel_fit.TRITON_DEFAULTS.items()}
        meta.update(kernel_fit.fitted_options(fn, grid, list(args), meta, opts))
    fn[grid](*args, **meta)


def gate_arrays(g: torch.Tensor, C: int, gate: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """What the kernels read for the gates: ``(GH, GL, GR, TP)``. Head gates: the ``[H]`` values (GL, GR
    unused). Scalar / vector gates: ``gates.ChunkGates`` of chunks of C, flattened to
    ``[B, H, TP, 1 | Dk]`` with TP the padded length: prefix sums ``hi``, ``lo`` and the last reset (int32)."""
    if gate == 0:
        return g, g, torch.zeros(1, dtype=torch.int32, device=g.device), 0
    gc = split_chunks(g.unsqueeze(-1) if gate == 1 else g, C)  # [B, H, N, C, Dg]
    gates = ChunkGates(gc)
    B, H, N = gc.shape[:3]
    lo = gates.lo if gates.lo is not None else torch.zeros_like(gates.hi)
    flat = [x.reshape(B, H, N * C, -1).contiguous() for x in (gates.hi, lo, gates.reset.to(torch.int32))]
    return flat[0], flat[1], flat[2], N * C


class KernelTable:
    """A rule's kernels by name (``table(interpret)[name]``), jitted for the GPU or wrapped by the interpreter
    (``jit_table``) once per mode, and launched by name (``table.launch``)."""

    def __init__(self, helpers: tuple, kernels_: tuple, namespace: dict):
        self.helpers, self.kernels, self.namespace = helpers, kernels_, namespace
        self.tables: dict = {}

    def __call__(self, interpret: bool) -> dict:
        if interpret not in self.tables:
            self.tables[interpret] = jit_table(self.helpers, self.kernels, self.namespace, interpret)
        return self.tables[interpret]

    def launch(self, name: str, grid, interpret: bool, *args, **meta) -> None:
        launch(self(interpret)[name], grid, interpret, *args, **meta)


def output_grad(do: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output's gradient a backward receives, zeros where autograd passes None (only the final state was
    used)."""
    if do is None:
        return torch.zeros(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    return do


class ChunkedFunction(torch.autograd.Function):
    """A rule's kernels as one autograd node: ``rule.forward(*inputs, **options)`` gives ``(out, final state)``; the
    node saves the inputs and the final state (the per-chunk states are recomputed by the backward), and
    ``rule.backward(*inputs, final, do, dS_T, needs, **options)`` gives one gradient per input in the compute dtype
    (None where none is needed: ``needs`` is ``needs_input_grad`` of the inputs), each returned in its input's
    dtype. ``inputs`` start with q, k, v; ``options`` are the keywords both take besides them. The final state is
    saved only where the backward reads it (``rule.reads_final``; otherwise it receives None): a state the caller
    changes in place before the backward is then no autograd error."""

    @staticmethod
    def forward(ctx, rule, options: dict, *inputs):
        out, final = rule.forward(*inputs, **options)
        ctx.save_for_backward(*inputs, final if rule.reads_final else None)
        ctx.rule, ctx.options = rule, options
        return out, final

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do, dS_T):
        *inputs, final = ctx.saved_tensors
        do = output_grad(do, inputs[0], inputs[2])
        grads = ctx.rule.backward(*inputs, final, do, dS_T, ctx.needs_input_grad[2:], **ctx.options)
        return None, None, *(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True))
