"""Tensor layouts at the API boundary: ``"bhnd"`` (attnc's own, ``[B, H, N, D]``) and ``"bnhd"``
(HuggingFace, diffusers, flash-attention, fla: ``[B, N, H, D]``; NATTEN's ``[B, *spatial, H, D]`` on
a grid pattern).

Every backend computes in ``[B, H, N, D]``; a ``"bnhd"`` call is turned into permuted *views* of the
caller's tensors (``flatten`` of the spatial axes then ``transpose``: no copy for a contiguous
input), and the results are handed back as views in the caller's layout: ``out`` ``[B, N, H, Dv]``
(``[B, *spatial, H, Dv]``), ``lse`` ``[B, N, H]`` (``[B, *spatial, H]``), as NATTEN returns it.
A recurrence's state keeps fla's ``[B, H, Dk, Dv]`` in both layouts.

Call-time inputs declared ``[heads, n, ...]`` (recurrence gates ``g``, FoX's forget gates) are
given ``[n, heads, ...]`` in ``"bnhd"`` (fla's ``g [B, T, H]`` / ``[B, T, H, K]``), and those declared
``[heads, nk, ...]`` (dma's ``importance``, sparsifiner's ``ki``) ``[nk, heads, ...]``, with the usual
optional leading batch dimension.

A 4-D tensor's reading cannot always be told from its shape: ``check_orientation`` refuses shapes
that are inconsistent in the declared layout but consistent once heads and tokens are swapped
(GQA divisibility, equal query/key lengths of a self-attention pattern, grid sizes known before the
call, the ``heads``/``n``/``nk`` dimensions of call-time inputs). What it cannot see (a
self-attention pattern on a sequence, q and k with as many heads, no sized input) is decided by the
layout alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import sympy
import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError

LAYOUTS = ("bhnd", "bnhd")


def check_layout(layout, where: str = "argument layout") -> str:
    """``layout`` itself, after checking that it names a layout."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise SpecError(f"unknown layout {layout!r}", where=where,
                        hint="'bhnd' ([B, H, N, D], the default) or 'bnhd' ([B, N, H, D]; [B, *spatial, H, D] on a grid)")
    return layout


def sequence_qkv(layout: str, q, k, v) -> tuple:
    """q, k, v of one sequence layout as ``[B, H, N, D]``: themselves (``bhnd``), or ``[B, N, H, D]`` ones
    transposed (``bnhd``, each checked 4-d first); for the patterns run in plain torch around their own
    checks (combined, bucketed)."""
    if layout != "bnhd":
        return q, k, v
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise SpecError(f"{name} must be a 4-d tensor [B, N, H, D] (layout bnhd)", where=f"argument {name}")
    return tuple(t.transpose(1, 2) for t in (q, k, v))


@dataclass(frozen=True)
class Restore:
    """How to hand results back in the caller's layout: ``spatial`` is q's grid extents when q came
    as ``[B, *spatial, H, D]`` (None for ``[B, N, H, D]``)."""

    layout: str
    spatial: tuple[int, ...] | None = None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, ...]`` -> ``[B, N, H, ...]`` (``[B, *spatial, H, ...]``), a view."""
        if self.layout == "bhnd":
            return x
        x = x.transpose(1, 2)
        return x if self.spatial is None else x.unflatten(1, self.spatial)

    def result(self, result, return_lse: bool, return_state: bool):
        """The forward's result (``out``, ``(out, lse)`` or ``(out, state)``) in the caller's layout."""
        if self.layout == "bhnd":
            return result
        if return_lse:
            return self.tokens(result[0]), self.tokens(result[1].unsqueeze(-1)).squeeze(-1)
        if return_state:
            return self.tokens(result[0]), result[1]
        return self.tokens(result)


def _grid_axes(pat, role: str) -> tuple[tuple[str, sympy.Expr], ...]:
    if not isinstance(pat, ir.PatternIR):
        return ()
    lay = pat.queries if role == "queries" else pat.keys
    return lay.axes if lay.kind == "grid" else ()


def _shape_text(axes) -> str:
    return "[B, " + ", ".join(str(size) for _, size in axes) + ", H, D]"


def _subs(sizes: dict) -> dict:
    """Size name -> value as sympy substitutions (values that are not ints are left to ``bind_sizes``)."""
    return {S.size_symbol(name): value for name, value in sizes.items()
            if isinstance(name, str) and isinstance(value, int) and not isinstance(value, bool)}


def _flat(t, name: str, axes, sizes: dict, known: dict) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    """One of q, k, v given ``[B, N, H, D]`` or ``[B, *spatial, H, D]``: the ``[B, H, N, D]`` view and
    its spatial extents (None when it came flat). Spatial extents bind the grid's size names in
    ``sizes`` (an extent that contradicts a size given here or in ``known`` is refused)."""
    if not isinstance(t, torch.Tensor):
        return t, None  # _check_qkv names the argument
    if t.dim() == 4:
        return t.transpose(1, 2), None
    if len(axes) < 2 or t.dim() != 3 + len(axes):
        grid = f" or {_shape_text(axes)}" if len(axes) >= 2 else ""
        raise SpecError(f"expected {4 if not grid else f'4 or {3 + len(axes)}'} dimensions [B, N, H, D]{grid} "
                        f"(layout 'bnhd'), got shape {list(t.shape)}", where=f"argument {name}")
    spatial = tuple(int(e) for e in t.shape[1:-2])
    for (axis, size), extent in zip(axes, spatial, strict=True):
        size_name = str(size).removeprefix("size_")
        if isinstance(size, sympy.Symbol):  # the common case, without sympy substitution (per call)
            given = sizes.get(size_name, known.get(size_name))
            if given is None:
                sizes[size_name] = extent
                continue
            if type(given) is not int:  # a bad value: bind_sizes names it
                continue
            value = sympy.Integer(given)
        else:
            value = size.subs(_subs({**known, **sizes}))
        if value.is_number and int(value) != extent:
            raise SpecError(f"axis {axis} has extent {extent} in shape {list(t.shape)}, but the grid's size "
                            f"{size_name} is {int(value)}", where=f"argument {name}")
        elif not value.is_number:
            raise SpecError(f"the extent of axis {axis} ({size}) cannot be bound from the shape",
                            where=f"argument {name}", hint=f"pass sizes= or a flat [B, N, H, D] {name}")
    return t.flatten(1, -3).transpose(1, 2), spatial


def _gate_inputs(pat, inputs: dict, q, k=None, v=None) -> dict:
    """Inputs declared ``[heads, n, ...]`` or ``[heads, nk, ...]``, given ``[n, heads, ...]`` (``[nk, heads,
    ...]``; batched or not), as views in the declared order; their leading two extents are checked against
    q's heads (v's where the delta rule has more value heads, GVA) and the tokens here, where the message can
    show the caller's order; anything else is passed on unchanged (``bind_inputs`` checks it). A
    self-attention pattern's ``n`` is the whole sequence: k's tokens, more than q's after a KV cache; ``nk``
    is k's tokens."""
    out = dict(inputs)
    heads = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else None
    tokens = {"n": q.shape[2] if heads is not None else None}
    keys = isinstance(k, torch.Tensor) and k.dim() == 4
    tokens["nk"] = k.shape[2] if heads is not None and keys else None
    if heads is not None and getattr(pat, "self_attention", True) and keys:
        tokens["n"] = k.shape[2]
    if heads is not None and getattr(pat, "rule", None) == "delta" and isinstance(v, torch.Tensor) and v.dim() == 4:
        heads = max(heads, v.shape[1])
    for decl in pat.inputs:
        t = out.get(decl.name)
        if decl.dim_names[:2] not in (("heads", "n"), ("heads", "nk")) or not isinstance(t, torch.Tensor):
            continue
        batched = t.dim() == len(decl.dims) + 1
        if t.dim() != len(decl.dims) and not batched:
            continue
        lead = tuple(t.shape[int(batched):int(batched) + 2])
        along = decl.dim_names[1]
        if heads is not None and tokens[along] is not None and lead != (tokens[along], heads):
            rest = ", ".join(decl.dim_names[2:])
            raise SpecError(f"input '{decl.name}' has shape {list(t.shape)}; layout 'bnhd' expects "
                            f"[{'B, ' if batched else ''}{along}, heads{', ' + rest if rest else ''}] with "
                            f"{along} = {tokens[along]}, heads = {heads}", where=f"argument {decl.name}",
                            hint="under layout 'bnhd' tokens come before heads, as fla's g [B, T, H(, K)]")
        out[decl.name] = t.transpose(int(batched), int(batched) + 1)
    return out


def to_bhnd(pat, layout: str, q, k, v, inputs: dict, sizes: dict | None, known: dict):
    """q, k, v (and ``[heads, n, ...]`` inputs) in attnc's ``[B, H, N, D]``, call sizes completed from
    spatial extents (``known``: the module's sizes), and the ``Restore`` for the results. ``bhnd``
    passes everything through."""
    if layout == "bhnd":
        return q, k, v, inputs, sizes, Restore("bhnd")
    q_axes, k_axes = _grid_axes(pat, "queries"), _grid_axes(pat, "keys")
    sizes = dict(sizes or {})
    q, q_spatial = _flat(q, "q", q_axes, sizes, known)
    k, k_spatial = _flat(k, "k", k_axes, sizes, known)
    v, v_spatial = _flat(v, "v", k_axes, sizes, known)
    if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k_spatial != v_spatial:
        raise SpecError(f"v's grid extents {v_spatial} differ from k's {k_spatial}", where="argument v")
    return q, k, v, _gate_inputs(pat, inputs, q, k, v), sizes or None, Restore("bnhd", q_spatial)


def _input_dims(pat, inputs: dict) -> dict[str, int]:
    """``heads``, ``n`` and ``nk`` as the shapes of call-time inputs state them (inputs whose leading
    dims are ``heads, n`` or ``heads, nk`` are left out: their reading follows the layout too)."""
    found: dict[str, int] = {}
    for decl in pat.inputs:
        t = inputs.get(decl.name)
        if not isinstance(t, torch.Tensor) or decl.dim_names[:2] in (("heads", "n"), ("heads", "nk")):
            continue
        shape = tuple(t.shape[1:]) if t.dim() == len(decl.dims) + 1 else tuple(t.shape)
        if len(shape) != len(decl.dims):
            continue
        for dim, extent in zip(decl.dim_names, shape, strict=True):
            if dim in ("heads", "n", "nk"):
                found.setdefault(dim, int(extent))
    return found


@torch.compiler.assume_constant_result  # sympy is not traceable: dynamo calls it once, as a constant
def _layout_tokens(pat, role: str, sizes: dict) -> int | None:
    """The token count a grid's or a concatenation's sizes give, when all are known (else None)."""
    if not isinstance(pat, ir.PatternIR):
        return None
    count = (pat.queries if role == "queries" else pat.keys).token_count()
    if count is None:
        return None
    known = tuple(sorted((k, v) for k, v in sizes.items() if isinstance(k, str) and type(v) is int))
    return _tokens_of(count, known)


@lru_cache(maxsize=256)
def _tokens_of(count: sympy.Expr, known: tuple) -> int | None:
    # memoised: sympy substitution costs milliseconds, and this runs on every call
    value = count.subs(_subs(dict(known)))
    return int(value) if value.is_number else None


def _inconsistency(pat, hq: int, nq: int, hkv: int, nk: int, sizes: dict, dims: dict) -> str | None:
    """Why ``(heads, tokens)`` of q and k cannot be right for this pattern (None if they can)."""
    if hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} key/value heads"
    self_attention = not isinstance(pat, ir.PatternIR) or pat.self_attention
    if self_attention and nq != nk:
        return f"'{pat.name}' is self-attention, but q has {nq} tokens and k {nk}"
    for role, n in (("queries", nq), ("keys", nk)):
        want = _layout_tokens(pat, role, sizes)
        if want is not None and want != n:
            what = "concatenation" if (pat.queries if role == "queries" else pat.keys).segments else "grid"
            return f"the {what}'s sizes {sizes} make {want} {role}, not {n}"
    for dim, got in (("heads", hq), ("n", nq), ("nk", nk)):
        if dim in dims and dims[dim] != got:
            return f"a call-time input has {dim} = {dims[dim]}, not {got}"
    return None


def check_orientation(pat, layout: str, q, k, inputs: dict, sizes: dict) -> None:
    """Refuse q, k (already ``[B, H, N, D]`` views) whose heads and tokens look swapped: inconsistent
    as ``layout`` read them, and consistent as the other layout would have (see the module docstring
    for what is checked)."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 and 0 not in t.shape for t in (q, k)):
        return
    dims = _input_dims(pat, inputs)
    read = (q.shape[1], q.shape[2], k.shape[1], k.shape[2])  # (Hq, Nq, Hkv, Nk)
    why = _inconsistency(pat, *read, sizes, dims)
    if why is None or _inconsistency(pat, read[1], read[0], read[3], read[2], sizes, dims) is not None:
        return
    shapes = [list(t.shape if layout == "bhnd" else t.transpose(1, 2).shape) for t in (q, k)]
    shown = "[B, H, N, D]" if layout == "bhnd" else "[B, N, H, D]"
    flip = "bnhd" if layout == "bhnd" else "bhnd"
    swap = f"pass layout={flip!r} (to compile_attention or the call), or transpose(1, 2) q, k and v"
    if read[1] > read[3]:  # as read, fewer keys than queries: a cache that misses keys reads so too
        raise SpecError(f"q {shapes[0]} and k {shapes[1]} read as {shown} (layout {layout!r}) do not fit: {why}, "
                        "fewer keys than queries (a call's queries are the last of its keys); read with heads and "
                        "tokens swapped they would fit", where="argument q",
                        hint=f"if k and v are a cache, give them every key up to the last query; if the tensors are "
                             f"{'[B, N, H, D]' if layout == 'bhnd' else '[B, H, N, D]'}, {swap}")
    raise SpecError(f"q {shapes[0]} and k {shapes[1]} read as {shown} (layout {layout!r}) do not fit: {why}; "
                    "read with heads and tokens swapped they do", where="argument q", hint=swap)
