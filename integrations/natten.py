"""NATTEN's functional API on attnc: ``na1d``, ``na2d``, ``na3d`` (and ``neighborhood_attention``, which
takes the rank from the tensors).

The arguments are NATTEN's (``kernel_size``, ``stride``, ``dilation``, ``is_causal``: one value for every
axis or a tuple with one per axis; ``scale``; ``additional_keys`` / ``additional_values``), and so is the
layout: ``[B, L, H, D]``, ``[B, Y, X, H, D]``, ``[B, T, Y, X, H, D]`` (heads last). The mask is the stdlib's
``neighborhood_1d/2d/3d`` (one source of truth); each distinct (rank, kernel_size, stride, dilation,
is_causal, spatial shape, backend) is compiled once and kept in a bounded LRU cache.

``additional_keys`` / ``additional_values`` ``[B, M, H, D]``: an extra flat segment of M tokens that
every query attends besides its neighborhood (NATTEN: cross-attention context such as text tokens).
The two parts are merged exactly through their log-sum-exps, as if the keys had been concatenated:
``lse = logaddexp(lse_na, lse_extra)``, ``out = out_na * exp(lse_na - lse) + out_extra * exp(lse_extra - lse)``.
The extra segment is computed densely (``O(N x M)`` scores), in fp32 (fp64 for fp64 inputs).

Beyond NATTEN: GQA/MQA (query heads a multiple of key/value heads) is accepted, and any attnc
``backend`` may be named.
"""

from __future__ import annotations

import ast
import math
from collections import OrderedDict

import torch

from ..core.errors import SpecError
from ..runtime.api import BACKENDS, compile_attention
from ..runtime.compiling import compiling
from ..runtime.ops import common as C

#: The most compiled modules kept (least recently used dropped first).
CACHE_SIZE = 32
_CACHE: OrderedDict[tuple, torch.nn.Module] = OrderedDict()

#: Per rank: the stdlib pattern's axis names and size names, in NATTEN's axis order.
_AXES = {1: ("sequence",), 2: ("y", "x"), 3: ("t", "y", "x")}
_SIZES = {1: (), 2: ("height", "width"), 3: ("frames", "height", "width")}
_SHAPES = {1: "[B, L, H, D]", 2: "[B, Y, X, H, D]", 3: "[B, T, Y, X, H, D]"}


def na1d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale: float | None = None,
         additional_keys=None, additional_values=None, backend: str | None = "auto", return_lse: bool = False,
         **natten_options):
    """1-D neighborhood attention on ``[B, L, H, D]`` tensors (NATTEN's ``na1d``); see ``neighborhood_attention``."""
    return _na(1, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, backend, return_lse, natten_options)


def na2d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale: float | None = None,
         additional_keys=None, additional_values=None, backend: str | None = "auto", return_lse: bool = False,
         **natten_options):
    """2-D neighborhood attention on ``[B, Y, X, H, D]`` tensors (NATTEN's ``na2d``); see ``neighborhood_attention``."""
    return _na(2, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, backend, return_lse, natten_options)


def na3d(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False, scale: float | None = None,
         additional_keys=None, additional_values=None, backend: str | None = "auto", return_lse: bool = False,
         **natten_options):
    """3-D neighborhood attention on ``[B, T, Y, X, H, D]`` tensors (NATTEN's ``na3d``); see ``neighborhood_attention``."""
    return _na(3, query, key, value, kernel_size, stride, dilation, is_causal, scale, additional_keys,
               additional_values, backend, return_lse, natten_options)


def neighborhood_attention(query, key, value, kernel_size, stride=1, dilation=1, is_causal=False,
                           scale: float | None = None, additional_keys=None, additional_values=None,
                           backend: str | None = "auto", return_lse: bool = False, **natten_options):
    """Neighborhood attention (NATTEN's rule: a window of ``kernel_size`` keys per axis around the query,
    shifted inward at the borders; ``dilation`` groups; ``stride`` groups of queries sharing a window;
    ``is_causal`` per axis) on ``[B, *spatial, H, D]`` tensors, 1 to 3 spatial axes.

    ``kernel_size`` (each >= 2), ``stride``, ``dilation`` (positive), ``is_causal`` (bool): one value or a
    tuple with one per axis; ``kernel_size * dilation`` must fit each axis and ``stride <= kernel_size``.
    ``scale`` defaults to ``1/sqrt(D)``. ``additional_keys``/``additional_values`` ``[B, M, Hkv, D]``: extra
    tokens every query attends (merged exactly through the log-sum-exps). Returns ``out``
    ``[B, *spatial, H, Dv]``, or ``(out, lse)`` with ``lse`` ``[B, *spatial, H]`` when ``return_lse``.
    Differentiable; the compiled module is cached per configuration and spatial shape.

    As NATTEN, ``stride``, ``dilation`` and ``is_causal`` may be None (1, 1, False) and ``backend`` None (attnc's
    ``"auto"``). NATTEN's performance keywords (``q_tile_shape``, ``kv_tile_shape``, their backward forms,
    ``backward_kv_splits``, ``backward_use_pt_reduction``, ``run_persistent_kernel``, ``kernel_schedule``,
    ``torch_compile``, ``try_fuse_additional_kv``, ``attention_kwargs``) are accepted and change nothing: attnc's
    cost model picks the schedule, and a schedule never changes the answer. Any other keyword is refused by name."""
    if not isinstance(query, torch.Tensor):
        raise SpecError(f"expected a tensor, got {type(query).__name__}", where="argument query")
    if query.dim() not in (4, 5, 6):
        raise SpecError(f"expected a 4-D, 5-D or 6-D tensor ([B, *spatial, H, D] with 1 to 3 spatial axes), "
                        f"got shape {list(query.shape)}", where="argument query")
    return _na(query.dim() - 3, query, key, value, kernel_size, stride, dilation, is_causal, scale,
               additional_keys, additional_values, backend, return_lse, natten_options)


def clear_cache() -> None:
    """Forget every compiled neighborhood module."""
    _CACHE.clear()


# ----------------------------------------------------------------- argument checks
def _per_axis(what: str, value, rank: int, check, want: str) -> tuple:
    """NATTEN's int-or-tuple argument as one value per axis, each passing ``check``."""
    values = tuple(value) if isinstance(value, tuple | list) else (value,) * rank
    if len(values) != rank or not all(check(x) for x in values):
        axes = ", ".join(_AXES[rank])
        raise SpecError(f"expected {want} or a tuple of {rank} (one per axis: {axes}), got {value!r}",
                        where=f"argument {what}")
    return values


def window_arguments(rank: int, kernel_size, stride=1, dilation=1, is_causal=False) -> tuple[tuple, ...]:
    """NATTEN's window arguments checked, one value per axis each: ``(kernel, stride, dilation, causal)``; None is
    NATTEN's default (1, 1, False). Whether the window fits the axes is checked with the tensors."""
    stride = 1 if stride is None else stride
    dilation = 1 if dilation is None else dilation
    is_causal = False if is_causal is None else is_causal
    return (_per_axis("kernel_size", kernel_size, rank, lambda x: _is_int(x) and x >= 2, "an int >= 2"),
            _per_axis("stride", stride, rank, lambda x: _is_int(x) and x >= 1, "a positive int"),
            _per_axis("dilation", dilation, rank, lambda x: _is_int(x) and x >= 1, "a positive int"),
            _per_axis("is_causal", is_causal, rank, lambda x: isinstance(x, bool), "True or False"))


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_tensors(rank: int, query, key, value) -> tuple[int, ...]:
    """Ranks, batch and spatial extents of q, k, v (what the module would not name in NATTEN's terms)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.dim() != rank + 3:
            raise SpecError(f"na{rank}d expects {rank + 3}-D tensors {_SHAPES[rank]}, got shape {list(t.shape)}",
                            where=f"argument {name}")
    spatial = tuple(int(s) for s in query.shape[1:-2])
    for name, t in (("key", key), ("value", value)):
        if t.shape[0] != query.shape[0] or tuple(t.shape[1:-2]) != spatial:
            raise SpecError(f"neighborhood attention is self-attention: {name} {list(t.shape)} must match query "
                            f"{list(query.shape)} in batch and spatial extents", where=f"argument {name}")
    if value.shape[-2] != key.shape[-2]:
        raise SpecError(f"value has {value.shape[-2]} heads, key {key.shape[-2]}", where="argument value")
    for name, t in (("query", query), ("key", key), ("value", value)):  # in the caller's shape, not the module's
        for axis, what in ((-2, "heads"), (-1, "head dim")):
            if t.shape[axis] == 0:
                raise SpecError(f"has {what} 0 (shape {list(t.shape)})", where=f"argument {name}")
    return spatial


def _check_window(rank: int, spatial, kernel, stride, dilation) -> None:
    for axis, extent, w, s, d in zip(_AXES[rank], spatial, kernel, stride, dilation, strict=True):
        if w * d > extent:
            raise SpecError(f"kernel_size * dilation ({w} * {d} = {w * d}) is larger than the input's extent "
                            f"{extent} on axis {axis}", where=f"argument {'dilation' if d > 1 else 'kernel_size'}",
                            hint="kernel_size * dilation must be at most the extent of every axis (NATTEN's rule)")
        if s > w:
            raise SpecError(f"stride {s} is larger than kernel_size {w} on axis {axis}", where="argument stride",
                            hint="stride must be at most kernel_size (stride == kernel_size is blocked attention)")


def _check_additional(query, key, value, add_k, add_v) -> None:
    if (add_k is None) != (add_v is None):
        raise SpecError("additional_keys and additional_values must be given together",
                        where="argument additional_values" if add_v is None else "argument additional_keys")
    if add_k is None:
        return
    for name, t in (("additional_keys", add_k), ("additional_values", add_v)):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.dim() != 4 or 0 in t.shape:
            raise SpecError(f"expected a non-empty 4-D tensor [B, M, H, D], got shape {list(t.shape)}",
                            where=f"argument {name}")
        if t.dtype != query.dtype or t.device != query.device:
            raise SpecError(f"must match query's dtype and device ({query.dtype} on {query.device}), got "
                            f"{t.dtype} on {t.device}", where=f"argument {name}")
    for name, t, base in (("additional_keys", add_k, key), ("additional_values", add_v, value)):
        if t.shape[0] != base.shape[0] or t.shape[2] != base.shape[-2] or t.shape[3] != base.shape[-1]:
            which = name.split("_")[1][:-1]
            raise SpecError(f"{name} {list(t.shape)} must match the {which} {list(base.shape)} in batch, heads "
                            "and head dim", where=f"argument {name}")
    if add_k.shape[1] != add_v.shape[1]:
        raise SpecError(f"additional_keys has {add_k.shape[1]} tokens, additional_values {add_v.shape[1]}",
                        where="argument additional_values")


# ----------------------------------------------------------------- running
def _module(rank: int, kernel, stride, dilation, causal, spatial, backend):
    key = (rank, kernel, stride, dilation, causal, spatial, backend)
    attn = _CACHE.get(key)
    if attn is not None:
        _CACHE.move_to_end(key)
        return attn
    one = (lambda t: t[0]) if rank == 1 else (lambda t: t)  # neighborhood_1d's parameters are scalars
    attn = compile_attention(f"stdlib:neighborhood_{rank}d", backend=backend, layout="bnhd",
                             sizes=dict(zip(_SIZES[rank], spatial, strict=True)) if rank > 1 else None,
                             kernel_size=one(kernel), stride=one(stride), dilation=one(dilation),
                             is_causal=one(causal))
    _CACHE[key] = attn
    while len(_CACHE) > CACHE_SIZE:
        _CACHE.popitem(last=False)
    return attn


def _call(attn, query, key, value, scale, return_lse: bool):
    """The module's call, its errors naming NATTEN's arguments (query, key, value: its q, k, v)."""
    try:  # dtypes, devices, heads and scale are checked by the module
        return attn(query, key, value, scale=scale, return_lse=return_lse)
    except SpecError as err:
        names = {"argument q": "argument query", "argument k": "argument key", "argument v": "argument value"}
        if err.where not in names:
            raise
        raise SpecError(err.message, where=names[err.where], hint=err.hint) from None


def _default_scale(query) -> float:
    return 1.0 / math.sqrt(query.shape[-1])


# ----------------------------------------------------------------- under torch.compile
# ``na*d`` inside a compiled model: the module of a configuration is made (the stdlib file read, sympy) and called
# inside ``attnc::natten_attention``, which dynamo does not trace; its backward recomputes the call under autograd.
def _op_module(config: str):
    rank, kernel, stride, dilation, causal, spatial, backend = ast.literal_eval(config)
    return _module(rank, kernel, stride, dilation, causal, spatial, backend)


def _op_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, config: str, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    attn = _op_module(config)
    with C.eager_dispatch(), torch.no_grad():
        out, lse = _call(attn, query, key, value, scale, True)
    return out.contiguous(), lse.contiguous()


def _op_fake(query, key, value, config, scale):
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_empty(*query.shape[:-1], value.shape[-1]),
            query.new_empty(query.shape[:-1], dtype=lse_dtype))


def _op_backward_impl(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dout: torch.Tensor,
                      dlse: torch.Tensor | None, config: str, scale: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    attn = _op_module(config)
    grads = C.recompute_gradients(lambda q, k, v: _call(attn, q, k, v, scale, True), [query, key, value], [0, 1, 2],
                                  [dout, dlse], guard=C.eager_dispatch)
    return grads[0], grads[1], grads[2]


def _op_backward_fake(query, key, value, dout, dlse, config, scale):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _op_setup(ctx, inputs, output):
    query, key, value, config, scale = inputs
    ctx.save_for_backward(query, key, value)
    ctx.config, ctx.scale = config, scale


def _op_formula(ctx, dout, dlse):
    query, key, value = ctx.saved_tensors
    if dout is None:
        dout = query.new_zeros(*query.shape[:-1], value.shape[-1])
    dq, dk, dv = natten_attention_backward(query, key, value, dout, dlse, ctx.config, ctx.scale)
    return dq, dk, dv, None, None


#: ``torch.ops.attnc.natten_attention`` and its backward
natten_attention, natten_attention_backward = C.defined_once("natten_ops", lambda: C.define_ops(
    "natten_attention", _op_forward, _op_fake, _op_backward_impl, _op_backward_fake, _op_formula, _op_setup))


def _extra_segment(query, add_k, add_v, scale: float):
    """Attention of every query over the extra tokens: ``out [B, N, H, Dv]`` and ``lse [B, N, H]`` in the
    compute dtype (query flattened to ``[B, N, H, D]``)."""
    dt = torch.float64 if query.dtype == torch.float64 else torch.float32
    heads = query.shape[-2]
    k, v = (t.to(dt).repeat_interleave(heads // t.shape[2], dim=2) for t in (add_k, add_v))
    scores = torch.einsum("bnhd,bmhd->bhnm", query.to(dt), k) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhnm,bmhe->bnhe", torch.exp(scores - lse.unsqueeze(-1)), v)
    return out, lse.transpose(1, 2)


#: NATTEN's keywords that choose how its kernels run, not what they compute (accepted, no effect here)
NATTEN_PERFORMANCE_KEYWORDS = frozenset({
    "q_tile_shape", "kv_tile_shape", "backward_q_tile_shape", "backward_kv_tile_shape", "backward_kv_splits",
    "backward_use_pt_reduction", "run_persistent_kernel", "kernel_schedule", "torch_compile",
    "try_fuse_additional_kv", "attention_kwargs"})


def _na(rank, query, key, value, kernel_size, stride, dilation, is_causal, scale, add_k, add_v, backend,
        return_lse, natten_options=None):
    unknown = sorted(set(natten_options or ()) - NATTEN_PERFORMANCE_KEYWORDS)
    if unknown:
        raise SpecError(f"na{rank}d() got an unexpected keyword argument {unknown[0]!r}", where=f"argument {unknown[0]}",
                        hint="NATTEN's performance keywords are accepted (attnc's cost model picks the schedule); "
                        "the other arguments are kernel_size, stride, dilation, is_causal, scale, additional_keys, "
                        "additional_values, backend, return_lse")
    backend = "auto" if backend is None else backend
    spatial = _check_tensors(rank, query, key, value)
    kernel, stride, dilation, causal = window_arguments(rank, kernel_size, stride, dilation, is_causal)
    _check_window(rank, spatial, kernel, stride, dilation)
    _check_additional(query, key, value, add_k, add_v)
    if not isinstance(return_lse, bool):
        raise SpecError(f"expected True or False, got {return_lse!r}", where="argument return_lse")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise SpecError(f"unknown or unavailable backend {backend!r}", where="argument backend",
                        hint="available in this version: " + ", ".join(BACKENDS))
    if compiling():  # the module is built and called inside an op (sympy is not traceable)
        config = repr((rank, kernel, stride, dilation, causal, spatial, backend))
        out, lse = natten_attention(query, key, value, config, _default_scale(query) if scale is None else scale)
        result = (out, lse) if return_lse or add_k is not None else out
    else:
        result = _call(_module(rank, kernel, stride, dilation, causal, spatial, backend), query, key, value, scale,
                       return_lse or add_k is not None)
    if add_k is None:
        return result
    out, lse = result
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    flat = query.flatten(1, -3)
    out_x, lse_x = _extra_segment(flat, add_k, add_v, scale)
    lse_na = lse.flatten(1, -2).to(lse_x.dtype)
    merged = torch.logaddexp(lse_na, lse_x)
    out = (out.flatten(1, -3).to(out_x.dtype) * torch.exp(lse_na - merged).unsqueeze(-1)
           + out_x * torch.exp(lse_x - merged).unsqueeze(-1))
    out = out.to(query.dtype).unflatten(1, spatial)
    return (out, merged.unflatten(1, spatial)) if return_lse else out
