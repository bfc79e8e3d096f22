"""``backend="auto"``: a runner that chooses among the others per call.

On CPU tensors the tile executor or the Flex lowering by the modelled rule and the break-even rule
(``auto.cpu``); on CUDA tensors attnc's Triton kernels, or the Flex lowering where the autotuner
timed it faster for the call's shape bucket (``auto.cuda``). Queries after a KV cache on CUDA run
the Triton kernels at their offset (Flex has none). The choice is the only place
that names backends; the children are ordinary runners."""

from __future__ import annotations

import logging

from ...core import ir
from ..backends.cpu.runner import CpuRunner, describe_plan
from ..backends.triton.runner import TritonRunner
from ..numerics import needs_grad
from ..ops.common import Registered
from ..plan import block_max
from ..runner import Call, Support
from .cpu import LOG, CpuPolicy
from .cuda import flex_won


class AutoRunner(CpuPolicy, Registered):
    """The executor, the Flex lowering (where the pattern lowers) and, made at the first CUDA call,
    the Triton kernels; ``last`` is the CPU choice of the latest CPU call (``Choice``)."""

    name = "auto"
    op = "runner"  # under torch.compile on CPU, where Flex may serve: attnc::runner_attention chooses per call
    #: blocks of context parallelism: the executor on CPU tensors, the Triton kernels on CUDA (Flex
    #: has no offsets)
    support = Support(query_offset="native", key_offset=frozenset({"cpu", "cuda"}))

    def __init__(self, pat: ir.PatternIR, q_tile=None, kv_tile=None):
        super().__init__(pat, CpuRunner(pat, q_tile, kv_tile), q_tile, kv_tile)
        self.tiles = (q_tile, kv_tile)
        self._triton: TritonRunner | None = None
        self.cuda_winner: dict = {}  # shapes -> the tuned winner ("triton" or "flex")
        self.cuda_last: str | None = None
        self.last_device: str | None = None
        self.register_op()

    @property
    def triton(self) -> TritonRunner:
        """The Triton runner, made at the first call that needs it (float32 constants refused then)."""
        if self._triton is None:
            self._triton = TritonRunner(self.pattern, *self.tiles)
        return self._triton

    @property
    def chosen(self) -> str | None:
        """The backend that ran the latest call; None before the first call."""
        if self.last_device == "cuda":
            return self.cuda_last
        return None if self.last is None else self.last.backend

    def forward(self, call: Call, q, k, v):
        self.last_device = q.device.type
        pooled = block_max.requested() is not None  # Flex's kernel gives no probabilities to pool
        if not q.is_cuda:
            choice = None if pooled else self.select(call.bound, q, k, v, call.inputs, call.need_lse)
            if choice is not None and choice.backend == "flex":
                return self.run_flex(choice, lambda: self.flex.forward(call, q, k, v))
            return self.cpu.forward(call, q, k, v)
        if call.q_offset or pooled:  # the Triton kernels at the queries' offset (a decode step is not in the tuned buckets)
            self._cuda_choice("triton", "queries after a KV cache (or a pooled block max) run the Triton kernels", q)
            return self.triton.forward(call, q, k, v)
        if flex_won(self, call.bound, q, k):
            self._cuda_choice("flex", "the autotuner timed the Flex lowering faster for this shape bucket", q)
            return self.flex.forward(call, q, k, v)
        self._cuda_choice("triton", "no tuned Flex win for this shape bucket", q)
        return self.triton.forward(call, q, k, v)

    def _cuda_choice(self, backend: str, reason: str, q) -> None:
        """Record a CUDA call's backend; logged at INFO where it changes, else at DEBUG."""
        level = logging.INFO if backend != self.cuda_last else logging.DEBUG
        if LOG.isEnabledFor(level):
            was = f" (was '{self.cuda_last}')" if self.cuda_last not in (None, backend) else ""
            LOG.log(level, "auto: '%s' q %s runs on '%s'%s: %s", self.pattern.name, list(q.shape), backend, was,
                    reason)
        self.cuda_last = backend

    def block_forward(self, bound, q, k, v, inputs: dict, scale: float, selection=None, key_block=None):
        """A block of context parallelism (``runtime.runner.BlockRunner``): the executor's on CPU
        tensors, the Triton kernels' on CUDA."""
        runner = self.triton if q.is_cuda else self.cpu
        return runner.block_forward(bound, q, k, v, inputs, scale, selection, key_block)

    def block_backward(self, bound, q, k, v, out, lse, dout, inputs: dict, scale: float, selection=None,
                       key_block=None, dlse=None, wrt: tuple = ()):
        """The backward of a block (``runtime.runner.BlockRunner``), on the forward's runner."""
        runner = self.triton if q.is_cuda else self.cpu
        return runner.block_backward(bound, q, k, v, out, lse, dout, inputs, scale, selection, key_block, dlse, wrt)

    def traced(self, q, k, v, inputs: dict, need_lse: bool):
        """The runner whose op serves a call traced by dynamo: the Triton kernels on CUDA tensors; on
        CPU this runner itself (its op chooses per call) where the Flex kernel may serve the call,
        else the executor (training, lse, float64: the executor's own backward)."""
        if q.is_cuda:
            return self.triton
        from ..backends.flex.kernels import fused_refusal

        if self.flex is not None and fused_refusal(q.device, q.dtype, needs_grad(q, k, v, *inputs.values()),
                                                   need_lse) is None:
            return self
        return self.cpu

    @property
    def last_schedule(self):
        if self._triton is not None and self._triton.last_plan is not None:
            return self._triton.last_plan.schedule
        if self.chosen == "flex":
            return self.flex.last_schedule
        return self.cpu.last_schedule

    def describe(self) -> str:
        if self.last is not None and self.last_device != "cuda":
            body = self.flex.describe() if self.last.backend == "flex" else self.cpu.describe()
            return f"# {self.last.describe()}\n{body}"
        if self._triton is not None:
            return self._triton.describe()
        return describe_plan(self.cpu.last, self.pattern)


