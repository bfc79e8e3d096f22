"""The softmax runners as ``torch.library`` custom ops, so that a model calling an attnc module
compiles with ``torch.compile(fullgraph=True)``; and what every attnc op shares (the registry of
runners, the encoding of sizes and input names, the op definitions).

The ops know no backend: each calls the runner registered under its ``key``
(``runner.traced_forward`` / ``runner.traced_backward``, the runner's own kernels). The CPU
executor's runner is served by ``attnc::tiled_attention``, the Triton runner by
``attnc::triton_attention`` (natively on CUDA tensors, in Triton's interpreter on CPU tensors);
both take the same arguments and differ only in the lse's dtype.

``attnc::tiled_attention(q, k, v, inputs, key, names, sizes, scale) -> (out, lse)``
runs the forward; ``attnc::tiled_attention_backward`` the backward (registered
as its autograd formula). Everything dynamo cannot trace (sympy, binding the
sizes and inputs, building and caching the tile plan) happens inside the op
implementations; the traced graph only sees tensors and constants:

- ``key`` names the module's runner in a process-global registry
  (weak references: a runner lives as long as its module);
- ``names`` is the comma-separated list of the call-time input names, in the
  order of ``inputs`` (int inputs such as document ids pass through and get
  no gradient);
- ``sizes`` is ``"name=value,..."``, the grid sizes given at compile and call time.

The fake implementations only need the shapes: ``out`` ``[B, Hq, Nq, Dv]`` in
q's dtype and ``lse`` ``[B, Hq, Nq]`` in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import types
import weakref

import torch
from torch.utils._python_dispatch import _disable_current_modes

from ...compiler.analysis import evaluate as E
from ...core.errors import SpecError
from ..admission import admit
from ..numerics import compute_dtype, empty_batch_outputs

# One registry and one op definition per process, even when the package is
# imported twice under two names (pytest imports the repository root, which is
# the package, as another top-level package too): torch dispatches an op name
# to its first definition, which must see every runner.
_SHARED = sys.modules.setdefault("_attnc_custom_op_state", types.ModuleType("_attnc_custom_op_state"))
if not hasattr(_SHARED, "registry"):
    _SHARED.registry = weakref.WeakValueDictionary()
    _SHARED.counter = itertools.count()
_REGISTRY: weakref.WeakValueDictionary = _SHARED.registry
_COUNTER = _SHARED.counter


def register(runner) -> str:
    """A fresh key for ``runner`` (held weakly: the caller keeps it alive)."""
    key = f"{runner.pattern.name}#{next(_COUNTER)}"
    _REGISTRY[key] = runner
    return key


class Registered:
    """A runner the custom ops find by key (``op_key``): registered when made, and again when copied
    (deepcopy, pickle: a copy gets its own entry)."""

    op_key: str

    def register_op(self) -> None:
        self.op_key = register(self)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.register_op()


def _runner(key: str):
    runner = _REGISTRY.get(key)
    if runner is None:
        raise SpecError(f"no attnc module is registered under {key!r} (was the module deleted?)",
                        where="attnc::tiled_attention")
    return runner


def encode_sizes(sizes: dict) -> str:
    """``sizes`` as the ops' string argument. Values are written as given (``repr``) and checked
    when the op runs (``_decode_sizes``): a check while dynamo traces could only fail as dynamo's
    own error, and ``int()`` here truncated floats."""
    return ",".join(f"{name}={value!r}" for name, value in sizes.items())


def _decode_sizes(sizes: str) -> dict:
    out = {}
    for item in filter(None, sizes.split(",")):
        name, value = item.split("=", 1)
        if not value.lstrip("-").isdigit():
            raise SpecError(f"expected an int, got {value}", where=f"argument sizes {name!r}")
        out[name] = int(value)
    return out


def _names(names: str) -> list[str]:
    return [n for n in names.split(",") if n]


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return compute_dtype(q.dtype)


def _named(names: str, inputs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(_names(names), inputs, strict=True))


def _bound(runner, q, k, sizes) -> E.Bound:
    """The sizes of a traced call bound (a backward's: its forward admitted the call)."""
    return E.bind_sizes(runner.pattern, n=q.shape[2], nk=k.shape[2], heads=q.shape[1],
                        sizes=_decode_sizes(sizes), dk=q.shape[3], offset_ok=True)


def _bind(runner, q, k, v, inputs, names, sizes) -> E.Bound:
    """The sizes of a traced call bound, and the call admitted as an eager call is (``admission.admit``:
    the same checks and refusals on every path, an empty batch's too)."""
    bound = _bound(runner, q, k, sizes)
    admit(runner, bound, q, k, v, _named(names, inputs))
    # the shapes of a compiled call, for Attention.report() (an eager call keeps its own in the module)
    runner.traced_call = {"n": q.shape[2], "nk": None if runner.pattern.self_attention else k.shape[2],
                          "heads": q.shape[1], "head_dim": q.shape[3], "batch": q.shape[0],
                          "sizes": _decode_sizes(sizes) or None}
    return bound


# ------------------------------------------- pieces every attnc op shares (here, flex_op, recurrence_op, varlen_op)
def define_ops(name: str, forward_impl, forward_fake, backward_impl, backward_fake, formula, setup_context):
    """``attnc::NAME`` and ``attnc::NAME_backward`` with their fake implementations, the first
    differentiated by ``formula`` (which calls the second). Callers define them once per process
    (``defined_once``)."""
    fwd = torch.library.custom_op(f"attnc::{name}", forward_impl, mutates_args=())
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(f"attnc::{name}_backward", backward_impl, mutates_args=())
    bwd.register_fake(backward_fake)
    fwd.register_autograd(formula, setup_context=setup_context)
    return fwd, bwd


def defined_once(attr: str, define):
    """``define()``'s ops, made at the first import only: a second copy of the package uses the first
    one's (torch dispatches an op name to its first definition)."""
    if not hasattr(_SHARED, attr):
        setattr(_SHARED, attr, define())
    return getattr(_SHARED, attr)


def attention_fake(q: torch.Tensor, v: torch.Tensor, lse_dtype: torch.dtype):
    """The fake ``(out, lse)`` of a softmax op: ``[B, Hq, Nq, Dv]`` in q's dtype, ``[B, Hq, Nq]``."""
    B, Hq, Nq, _ = q.shape
    return q.new_empty(B, Hq, Nq, v.shape[-1]), q.new_empty(B, Hq, Nq, dtype=lse_dtype)


def gradients_like(q, k, v, inputs: list, wrt: list[int], make=torch.Tensor.new_empty):
    """``(dq, dk, dv, [d inputs[i] for i in wrt])`` shaped like their primals and contiguous, as the
    real kernels return them: ``new_empty`` in fake implementations, ``new_zeros`` for an empty batch."""
    return make(q, q.shape), make(k, k.shape), make(v, v.shape), [make(inputs[i], inputs[i].shape) for i in wrt]


def input_gradients(d_in: dict, raw: dict, wrt_names: list[str]) -> list[torch.Tensor]:
    """A backward's gradients of the inputs named in ``wrt_names``, contiguous; zeros where it gave none."""
    return [d_in[n].contiguous() if d_in.get(n) is not None else torch.zeros_like(raw[n]) for n in wrt_names]


def remember_runner(ctx, key: str, count: int) -> None:
    """In a ``setup_context``: the graph keeps the runner alive (the module may be gone before the
    backward), and how many call-time inputs the op took."""
    ctx.key, ctx.runner, ctx.count = key, _REGISTRY.get(key), count


def wanted_inputs(ctx, tensors: list[torch.Tensor], position: int) -> list[int]:
    """In an autograd formula: the indices of the float inputs whose gradient is needed (the op's list
    argument at ``position``); the runner goes back into the registry for the backward op."""
    need = ctx.needs_input_grad[position]
    need = need if isinstance(need, list | tuple) else [need] * ctx.count
    if ctx.runner is not None:
        _REGISTRY.setdefault(ctx.key, ctx.runner)
    return [i for i, t in enumerate(tensors) if t.dtype.is_floating_point and need[i]]


def placed(count: int, wrt: list[int], grads: list) -> list:
    """The gradient of the op's list of ``count`` inputs: ``grads[j]`` for input ``wrt[j]``, None elsewhere."""
    out: list = [None] * count
    for i, g in zip(wrt, grads, strict=True):
        out[i] = g
    return out


def _autograd_dispatch():
    """Autograd usable again inside an op implementation (which runs below the
    autograd dispatch keys, where no graph would be recorded)."""
    exclude = torch._C._dispatch_tls_local_exclude_set().remove(torch._C.DispatchKey.AutogradFunctionality)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


#: The dispatch key sets of plain eager code (taken at import, outside any op).
_EAGER_KEYS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


@contextlib.contextmanager
def eager_dispatch():
    """A runner as in eager mode: an op implementation runs with autograd and functorch's keys
    excluded (Flex's BlockMask helpers use vmap; a recomputed backward uses autograd), and on its
    first compiled call under AOTAutograd's checking ``TorchDispatchMode``; the op's own inputs and
    outputs are still what the caller's modes see."""
    with torch._C._ForceDispatchKeyGuard(*_EAGER_KEYS), _disable_current_modes():
        yield


def recompute_gradients(forward, primals: list, wrt: list[int], cotangents: list, guard=_autograd_dispatch
                        ) -> list[torch.Tensor]:
    """The backward of an op that recomputes: ``forward(*primals)`` (a tuple of outputs) runs again under
    autograd inside an op implementation (``guard()`` restores the dispatch keys autograd needs) and is
    differentiated with ``cotangents`` (None: that output takes no gradient). Returns the gradients of
    ``primals[i]`` for i in ``wrt``, in that order, contiguous; zeros where a primal was unused."""
    with guard(), torch.enable_grad():
        leaves = [t.detach().requires_grad_() if i in wrt else t for i, t in enumerate(primals)]
        outs = forward(*leaves)
        used = [(o, g.to(o.dtype)) for o, g in zip(outs, cotangents, strict=True) if g is not None and o.requires_grad]
        targets = [leaves[i] for i in wrt]
        grads = (torch.autograd.grad([o for o, _ in used], targets, [g for _, g in used], allow_unused=True) if used
                 else [None] * len(targets))
    return [torch.zeros_like(t) if g is None else g.contiguous() for t, g in zip(targets, grads, strict=True)]


# ------------------------------------------------------------------ forward
def _forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor], key: str, names: str, sizes: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    runner = _runner(key)
    bound = _bind(runner, q, k, v, inputs, names, sizes)
    if q.shape[0] == 0:  # an empty batch: empty outputs, as on the other backends
        return empty_batch_outputs(q, v, _lse_dtype(q))
    out, lse = runner.traced_forward(bound, q, k, v, _named(names, inputs), scale)
    return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()


def _forward_fake(q, k, v, inputs, key, names, sizes, scale):
    return attention_fake(q, v, _lse_dtype(q))


# ----------------------------------------------------------------- backward
def _backward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    dlse: torch.Tensor | None, inputs: list[torch.Tensor], key: str, names: str, sizes: str, scale: float,
    wrt: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt])."""
    runner = _runner(key)
    if q.shape[0] == 0:  # an empty batch: zero (empty) gradients
        return gradients_like(q, k, v, inputs, wrt, torch.Tensor.new_zeros)
    raw = _named(names, inputs)
    wrt_names = [_names(names)[i] for i in wrt]
    with _autograd_dispatch():  # the executor differentiates score terms (softcap, bias, gates) with autograd
        bound = _bound(runner, q, k, sizes)
        dq, dk, dv, d_in = runner.traced_backward(bound, q, k, v, out, lse, dout,
                                                  dlse, raw, scale, wrt_names)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), input_gradients(d_in, raw, wrt_names)


def _backward_fake(q, k, v, out, lse, dout, dlse, inputs, key, names, sizes, scale, wrt):
    return gradients_like(q, k, v, inputs, wrt)


def _setup_context(ctx, inputs, output):
    q, k, v, tensors, key, names, sizes, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *tensors)
    ctx.names, ctx.sizes, ctx.scale = names, sizes, scale
    remember_runner(ctx, key, len(tensors))


def _autograd_formula(backward_op):
    """The autograd formula of a forward op: ``backward_op()`` (looked up at call
    time: the op is defined after the formula) computes the gradients."""

    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        wrt = wanted_inputs(ctx, tensors, 3)
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, d_list = backward_op()(q, k, v, out, lse, dout, dlse, tensors, ctx.key, ctx.names, ctx.sizes,
                                           ctx.scale, wrt)
        return dq, dk, dv, placed(ctx.count, wrt, d_list), None, None, None, None

    return backward


#: ``torch.ops.attnc.tiled_attention`` and ``torch.ops.attnc.tiled_attention_backward``
tiled_attention, tiled_attention_backward = defined_once("ops", lambda: define_ops(
    "tiled_attention", _forward_impl, _forward_fake, _backward_impl, _backward_fake,
    _autograd_formula(lambda: tiled_attention_backward), _setup_context))


# ------------------------------------------------------------ the Triton kernels
def _triton_forward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inputs: list[torch.Tensor], key: str, names: str, sizes: str,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    runner = _runner(key)
    bound = _bind(runner, q, k, v, inputs, names, sizes)
    if q.shape[0] == 0:
        return empty_batch_outputs(q, v, torch.float32)
    args = (bound, q, k, v, _named(names, inputs), scale)
    out, lse = runner.traced_forward(*args)
    return out.contiguous(), lse.contiguous()


def _triton_forward_fake(q, k, v, inputs, key, names, sizes, scale):
    return attention_fake(q, v, torch.float32)


def _triton_backward_impl(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
    dlse: torch.Tensor | None, inputs: list[torch.Tensor], key: str, names: str, sizes: str, scale: float,
    wrt: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(dq, dk, dv, [gradient of inputs[i] for i in wrt]) from the Triton backward kernels."""
    runner = _runner(key)
    if q.shape[0] == 0:
        return gradients_like(q, k, v, inputs, wrt, torch.Tensor.new_zeros)
    raw = _named(names, inputs)
    wrt_names = [_names(names)[i] for i in wrt]
    bound = _bound(runner, q, k, sizes)
    args = (bound, q, k, v, out, lse, dout, dlse, raw, scale, wrt_names)
    dq, dk, dv, d_in = runner.traced_backward(*args)
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), input_gradients(d_in, raw, wrt_names)


#: ``torch.ops.attnc.triton_attention`` and ``torch.ops.attnc.triton_attention_backward``
triton_attention, triton_attention_backward = defined_once("triton_ops", lambda: define_ops(
    "triton_attention", _triton_forward_impl, _triton_forward_fake, _triton_backward_impl, _backward_fake,
    _autograd_formula(lambda: triton_attention_backward), _setup_context))
