"""The public entry points: ``compile_attention`` and ``materialize_mask``."""

from __future__ import annotations

import math

import torch

from ..compiler import evaluate as E
from ..compiler import ir
from ..spec.errors import SpecError
from ..spec.library import load
from . import custom_op, reference
from .cpu_backend import CpuRunner, describe_plan

BACKENDS = ("auto", "cpu", "reference", "triton", "flex")

Pattern = ir.PatternIR | ir.RecurrenceIR


def _as_pattern(pattern, name: str | None, params: dict) -> Pattern:
    if isinstance(pattern, ir.PatternIR | ir.RecurrenceIR):
        if name is not None or params:
            raise SpecError("name= and parameters apply when loading; this pattern is already loaded",
                            where="argument pattern", hint="pass the source (path, 'stdlib:NAME' or text) instead")
        return pattern
    return load(pattern, name=name, **params)


def materialize_mask(
    pattern,
    n: int | None = None,
    heads: int = 1,
    sizes: dict | None = None,
    inputs: dict | None = None,
    *,
    nk: int | None = None,
    name: str | None = None,
    **params,
) -> torch.Tensor:
    """The exact mask of a pattern: bool ``[heads, Nq, Nk]`` (``[B, heads, Nq, Nk]``
    when an input has a batch dimension).

    ``pattern`` is a loaded pattern, a path, ``"stdlib:NAME"`` or spec text
    (then ``name=`` and parameters apply). ``n`` is the number of queries (for
    a grid, implied by ``sizes``); ``nk`` the number of keys of a cross-attention
    pattern. Routing is data-dependent and not part of the mask.
    """
    pat = _as_pattern(pattern, name, params)
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is a recurrence and has no mask", where="argument pattern")
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes)
    mask = E.mask_tensor(pat, bound, inputs)
    batched = any(t.dim() > len(pat.input(k).dims) for k, t in (inputs or {}).items())
    return mask if batched else mask[0]


class Attention(torch.nn.Module):
    """A compiled attention pattern or recurrence; call it as ``attn(q, k, v, **inputs)``.

    Softmax patterns: ``q`` ``[B, Hq, Nq, D]``, ``k`` ``[B, Hkv, Nk, D]``, ``v``
    ``[B, Hkv, Nk, Dv]`` with Hq a multiple of Hkv (GQA); returns ``out``
    ``[B, Hq, Nq, Dv]`` or ``(out, lse)`` with ``return_lse=True``.
    Recurrences: ``initial_state=`` ``[B, Hq, D, Dv]``; ``return_state=True``
    returns ``(out, final_state)``. ``scale`` defaults to ``1/sqrt(D)``.
    Call-time inputs are keyword arguments with their declared shape,
    optionally with a leading batch dimension.
    """

    def __init__(self, pattern: Pattern, backend: str, sizes: dict | None, q_tile=None, kv_tile=None):
        super().__init__()
        self.pattern = pattern
        self.backend = backend
        self.sizes = dict(sizes or {})
        self._runner = None
        self._runner_key = None
        self._chunk = q_tile if isinstance(pattern, ir.RecurrenceIR) else None  # a recurrence's forced chunk
        if backend == "cpu" and isinstance(pattern, ir.PatternIR):
            self._runner = CpuRunner(pattern, q_tile, kv_tile)
            self._runner_key = custom_op.register(self._runner)
        self.flex = None  # backend="flex": the FlexAttention lowering (runtime.flex_backend)
        if backend == "flex":
            from .flex_backend import FlexRunner

            self.flex = FlexRunner(pattern, q_tile, kv_tile)
        # softmax on Triton: backend="triton" (CUDA natively, CPU tensors under the interpreter),
        # or "auto" (``self.auto``) on CUDA tensors; the runner is made at the first such call
        self._tiles = (q_tile, kv_tile)
        self._triton = None
        self.auto = False
        self._last_call: dict | None = None

    def __setstate__(self, state):
        super().__setstate__(state)
        if self._runner is not None:  # a copy (deepcopy, pickle) gets its own registry entry
            self._runner_key = custom_op.register(self._runner)

    @property
    def schedule(self):
        """The TileSchedule of the latest call (None before the first call or on the reference backend)."""
        if self._triton is not None and self._triton.last_plan is not None:
            return self._triton.last_plan.schedule
        if self.flex is not None:
            return None if self.flex.last is None else self.flex.last.schedule
        return None if self._runner is None or self._runner.last is None else self._runner.last.schedule

    def report(self, hardware="h100", **kwargs):
        """The simulator's report for the shapes of the latest call (``attnc.simulate``)."""
        if self._last_call is None:
            raise SpecError("call the module once first: the report is for the shapes of a call", where="report")
        args = {**self._last_call, **kwargs}
        if self.schedule is not None and "q_tile" not in kwargs:
            args.update(q_tile=self.schedule.q_tile, kv_tile=self.schedule.kv_tile)
        return simulate(self.pattern, hardware=hardware, **args)

    @property
    def source(self) -> str:
        """What runs: the CPU backend's tile plan, or the reference's dense computation."""
        p = self.pattern
        if self.flex is not None:
            from .flex_backend import describe

            return describe(self.flex, p)
        if isinstance(p, ir.PatternIR) and (self.backend == "triton" or self._triton is not None):
            from .triton_backend import describe_source

            return describe_source(self._triton, p)
        if self._runner is not None:
            return describe_plan(self._runner.last, p)
        if isinstance(p, ir.RecurrenceIR) and self.backend != "reference":
            from . import recurrence

            return recurrence.describe(p, self.backend, self._chunk or (self._last_call or {}).get("q_tile"))
        if isinstance(p, ir.RecurrenceIR):
            return (f"# reference backend: naive recurrence '{p.name}' ({p.gate} gate)\n"
                    f"# S_t = diag(exp(decay_t)) S_(t-1) + k_t^T v_t ; o_t = scale * q_t S_t\n"
                    f"decay = {p.decay}\n")
        return "\n".join([f"# reference backend: dense attention '{p.name}'", *p.describe_terms()]) + "\n"

    def extra_repr(self) -> str:
        return f"{self.pattern.kind} {self.pattern.name!r}, backend={self.backend!r}"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        return_lse: bool = False,
        initial_state: torch.Tensor | None = None,
        return_state: bool = False,
        sizes: dict | None = None,
        **inputs,
    ):
        pat = self.pattern
        _check_qkv(q, k, v)
        B, Hq, Nq, D = q.shape
        if scale is None:
            scale = 1.0 / math.sqrt(D)
        elif isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
            raise SpecError(f"scale must be a finite number, got {scale!r}", where="argument scale")
        all_sizes = {**self.sizes, **(sizes or {})}
        if isinstance(pat, ir.RecurrenceIR):
            if return_lse:
                raise SpecError("a recurrence has no log-sum-exp", where="argument return_lse")
            if Nq != k.shape[2]:
                raise SpecError(f"q has {Nq} tokens but k has {k.shape[2]}", where="argument k")
            bound = E.bind_sizes(pat, n=Nq, heads=Hq, sizes=all_sizes, dk=D)
            tensors, _ = E.bind_inputs(pat, bound, inputs, batch=B)
            if initial_state is not None:
                want = (B, Hq, D, v.shape[-1])
                if not isinstance(initial_state, torch.Tensor) or tuple(initial_state.shape) != want:
                    got = list(initial_state.shape) if isinstance(initial_state, torch.Tensor) else type(initial_state).__name__
                    raise SpecError(f"initial_state must be {list(want)}, got {got}", where="argument initial_state")
            if self.backend == "reference":
                out, state = reference.recurrence(pat, bound, q, k, v, tensors, float(scale), initial_state)
                chunk = None
            else:  # chunked: torch ('cpu'), Triton ('triton'; the interpreter on CPU tensors), 'auto'
                from . import recurrence

                out, state, chunk = recurrence.run(self.backend, pat, bound, q, k, v, tensors, float(scale),
                                                   initial_state, self._chunk)
            self._last_call = {"n": Nq, "heads": Hq, "head_dim": D, "batch": B, "q_tile": chunk}
            return (out, state) if return_state else out
        if initial_state is not None or return_state:
            raise SpecError("only recurrences carry a state", where="argument initial_state")
        if self._runner is not None and not (self.auto and q.is_cuda) and torch.compiler.is_compiling():
            # Under torch.compile the sizes and inputs are bound inside the custom op
            # (sympy is not traceable); eager calls check them here, with clear errors.
            out, lse = self._cpu(q, k, v, inputs, all_sizes, scale)
            return (out, lse) if return_lse else out
        try:
            bound = E.bind_sizes(pat, n=Nq, nk=k.shape[2], heads=Hq, sizes=all_sizes, dk=D)
        except SpecError as err:  # n and nk come from q and k here: name those
            if err.where not in ("argument n", "argument nk"):
                raise
            raise SpecError(err.message, where="argument q" if err.where == "argument n" else "argument k",
                            hint=err.hint) from None
        self._last_call = {"n": Nq, "nk": k.shape[2] if not pat.self_attention else None, "heads": Hq,
                           "head_dim": D, "batch": B, "sizes": all_sizes or None}
        if self.flex is not None:
            out, lse = self.flex(bound, q, k, v, inputs, float(scale), return_lse)
        elif self.backend == "triton" or (self.auto and q.is_cuda):
            out, lse = self._triton_runner()(bound, q, k, v, inputs, float(scale))
        elif self._runner is not None:
            E.bind_inputs(pat, bound, inputs, batch=B)  # errors name the argument
            out, lse = self._cpu(q, k, v, inputs, all_sizes, scale)
        else:
            out, lse = reference.attention(pat, bound, q, k, v, inputs, float(scale))
        return (out, lse) if return_lse else out

    def step(self, q, k, v, state=None, *, scale: float | None = None, **inputs):
        """One decoding step of a recurrence (the recurrent form, for inference loops):
        ``o_t, state = attn.step(q_t, k_t, v_t, state, **gates)``.

        ``q_t`` ``[B, Hq, Dk]`` (or ``[B, Hq, 1, Dk]``), ``k_t`` ``[B, Hkv, Dk]``, ``v_t`` ``[B, Hkv, Dv]``
        (q's rank); ``state`` ``[B, Hq, Dk, Dv]`` (None: zeros, e.g. the first token; or the final state
        of a forward with ``return_state=True``); call-time gates for this token with their declared
        shape at n = 1 (``g[..., t:t+1]`` of a ``[heads, n]`` input). Returns ``(o_t, new_state)``:
        ``o_t`` like q with Dv, the state in float32 (float64 for float64 inputs). Differentiable."""
        if not isinstance(self.pattern, ir.RecurrenceIR):
            raise SpecError(f"'{self.pattern.name}' is a softmax pattern: step() is for recurrences",
                            where="argument pattern", hint="decode a softmax pattern with a KV cache and forward")
        from . import recurrence

        return recurrence.decode_step(self.pattern, self.sizes, q, k, v, state, scale, inputs)

    def _triton_runner(self):
        if self._triton is None:
            from .triton_backend import TritonRunner

            self._triton = TritonRunner(self.pattern, *self._tiles)
        return self._triton

    def _cpu(self, q, k, v, inputs: dict, sizes: dict, scale):
        """The CPU executor through its custom op (``attnc::tiled_attention``)."""
        return custom_op.tiled_attention(q, k, v, list(inputs.values()), self._runner_key, ",".join(inputs),
                                         custom_op.encode_sizes(sizes), float(scale))


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.dim() != 4:
            raise SpecError(f"expected 4 dimensions [B, H, N, D], got shape {list(t.shape)}", where=f"argument {name}")
        if not t.dtype.is_floating_point:
            raise SpecError(f"expected a floating-point tensor, got {t.dtype}", where=f"argument {name}")
    if not (q.dtype == k.dtype == v.dtype):
        raise SpecError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}", where="argument k")
    if not (q.device == k.device == v.device):
        raise SpecError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}", where="argument k")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise SpecError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}", where="argument k")
    if k.shape[3] != q.shape[3]:
        raise SpecError(f"head dim of k ({k.shape[3]}) differs from q's ({q.shape[3]})", where="argument k")
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise SpecError(f"v {list(v.shape)} must match k {list(k.shape)} in heads and tokens", where="argument v")
    if q.shape[1] % k.shape[1] != 0:
        raise SpecError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})",
                        where="argument k")


def compile_attention(
    pattern,
    *,
    backend: str = "auto",
    sizes: dict | None = None,
    name: str | None = None,
    q_tile=None,
    kv_tile=None,
    **params,
) -> Attention:
    """Compile a pattern or recurrence into a differentiable ``torch.nn.Module``.

    ``pattern``: a loaded pattern, a path, ``"stdlib:NAME"`` or spec text
    (``name=`` picks a declaration; other keywords set parameters).
    ``sizes``: grid axis extents by size name (also accepted at call time).
    ``backend``: ``"cpu"`` runs the tile executor (only the KV tiles each Q
    tile needs; forward and backward); ``"reference"`` is the exact dense
    implementation; ``"triton"`` runs generated Triton kernels (natively on
    CUDA tensors, under the Triton interpreter on CPU tensors); ``"flex"``
    lowers the pattern to PyTorch's FlexAttention (``runtime.flex_backend``);
    ``"auto"``
    picks Triton on CUDA tensors and the CPU executor otherwise.
    ``q_tile``/``kv_tile`` force the tile shape (one extent per layout axis).
    Recurrences: ``"cpu"`` is the chunked torch path, ``"triton"`` the chunked
    Triton kernels (the interpreter on CPU tensors), ``"auto"`` Triton on CUDA
    tensors and the chunked torch path otherwise; ``q_tile`` forces the chunk
    size (16, 32 or 64; the simulator chooses otherwise). Decoding: ``step``.
    """
    if backend not in BACKENDS:
        raise SpecError(f"unknown or unavailable backend {backend!r}", where="argument backend",
                        hint="available in this version: " + ", ".join(BACKENDS))
    pat = _as_pattern(pattern, name, params)
    if sizes is not None:
        # Bad names and values, and windows that do not fit a fully sized grid,
        # are reported now rather than at the first call.
        E.check_size_names(pat, sizes)
        layouts = (pat.queries, pat.keys) if isinstance(pat, ir.PatternIR) else ()
        if layouts and all(lay.kind == "grid" for lay in layouts) and len(sizes) == len(E.check_size_names(pat, {})):
            E.bind_sizes(pat, sizes=sizes)
    if isinstance(pat, ir.RecurrenceIR):
        from . import recurrence

        if backend == "flex":
            from .flex_backend import refuse_recurrence

            refuse_recurrence(pat)
        if kv_tile is not None:
            raise SpecError("a recurrence has no KV tiles", where="argument kv_tile",
                            hint="q_tile= sets its chunk size (16, 32 or 64)")
        return Attention(pat, backend, sizes, recurrence.check_chunk(q_tile), None)
    chosen = backend if backend in ("reference", "triton", "flex") else "cpu"
    attn = Attention(pat, chosen, sizes, q_tile, kv_tile)
    attn.auto = backend == "auto"  # Triton kernels on CUDA tensors, the CPU executor otherwise
    return attn


def simulate(
    pattern,
    n: int | None = None,
    sizes: dict | None = None,
    heads: int = 1,
    head_dim: int = 128,
    batch: int = 1,
    hardware="h100",
    q_tile=None,
    kv_tile=None,
    dtype: str = "bf16",
    name: str | None = None,
    *,
    nk: int | None = None,
    inputs: dict | None = None,
    top: int = 5,
    **params,
):
    """Predict how fast a pattern can run: a ``SimulationReport`` with the
    FLOP-wise bound (1 / density), the tile-wise bound of the chosen schedule,
    the predicted speedup over dense attention (forward and backward), tile
    counts, the chosen and the top schedules, and the hardware model.

    ``hardware``: a name from ``compiler.hardware`` (a100, h100, h200, b200,
    or one added with ``register_hardware``) or a ``Hardware``. ``q_tile`` /
    ``kv_tile`` force the tile shapes (one extent per grid axis; one int on a
    grid means flat 1-D tiles). ``inputs``: call-time inputs of
    data-dependent masks (without a batch dimension).
    """
    from ..compiler.cost import dtype_bytes
    from ..compiler.hardware import get_hardware
    from ..compiler.simulator import simulate_pattern

    pat = _as_pattern(pattern, name, params)
    if isinstance(pat, ir.RecurrenceIR):
        from .recurrence import simulate_recurrence

        return simulate_recurrence(pat, n=n, sizes=sizes, heads=heads, head_dim=head_dim, batch=batch,
                                   hardware=hardware, q_tile=q_tile, kv_tile=kv_tile, dtype=dtype, nk=nk,
                                   inputs=inputs)
    for what, value in (("head_dim", head_dim), ("batch", batch), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"must be a positive int, got {value!r}", where=f"argument {what}")
    hw = get_hardware(hardware)
    dtype_bytes(dtype)
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes)
    return simulate_pattern(pat, bound, hw, head_dim=head_dim, batch=batch, dtype=str(dtype).lower(), q_tile=q_tile,
                            kv_tile=kv_tile, inputs=inputs, top=top)
