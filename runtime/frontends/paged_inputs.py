"""A paged call's call-time inputs, as each path takes them: the one launch reads them at each row's positions over
the table's capacity (``one_launch_inputs``); the path by length cuts them to each group's rows and length
(``check_inputs``, ``group_input``). ``frontends.paged`` runs both paths."""

from __future__ import annotations

import functools

import sympy
import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError


def _cut_dims(pat, decl: ir.InputDecl) -> tuple[int, ...]:
    """The token dimensions of an input that a group cuts to its length (cross-attention: ``nk`` only; a
    combined pattern's gates are the present queries' ``[B, heads, n]``: none)."""
    if isinstance(pat, ir.CombinedIR) and any(g.name == decl.name for g in pat.gates):
        return ()
    return tuple(d for d in decl.token_dims if pat.self_attention or decl.dim_names[d] == "nk")


def check_inputs(pat, inputs: dict, layout: str, batch: int, longest: int) -> dict:
    """Call-time inputs of a paged call, ``[heads, n, ...]`` ones in attnc's order (``"bnhd"`` takes them
    ``[n, heads, ...]``): a batch dimension of q's batch, token dimensions of at least ``longest``
    entries. Unknown names, ranks and other dimensions are left to the ordinary forward."""
    out = dict(inputs)
    for decl in pat.inputs:
        t = out.get(decl.name)
        if not isinstance(t, torch.Tensor) or t.dim() not in (len(decl.dims), len(decl.dims) + 1):
            continue
        lead = t.dim() - len(decl.dims)
        if layout == "bnhd" and decl.dim_names[:2] == ("heads", "n"):
            t = out[decl.name] = t.transpose(lead, lead + 1)
        where = f"argument {decl.name}"
        if lead and t.shape[0] != batch:
            raise SpecError(
                f"input '{decl.name}' has batch {t.shape[0]}, q {batch}: a batch dimension holds one "
                "entry per row of the block table",
                where=where,
            )
        for d in _cut_dims(pat, decl):
            if t.shape[lead + d] < longest:
                raise SpecError(
                    f"input '{decl.name}' has {t.shape[lead + d]} entries along "
                    f"{decl.dim_names[d]}; with a paged KV cache a token dimension is indexed by "
                    f"absolute position and needs max(cache_seqlens) = {longest} at least",
                    where=where,
                    hint="size it to the block table's capacity, max_pages * page_size",
                )
    return out


def group_input(pat, name: str, t, rows: torch.Tensor, length: int):
    """An input for one group: its batch cut to the group's rows, its token dimensions to ``length``."""
    decl = next((d for d in pat.inputs if d.name == name), None)
    if (
        decl is None
        or not isinstance(t, torch.Tensor)
        or t.dim() not in (len(decl.dims), len(decl.dims) + 1)
    ):
        return t  # the ordinary forward names what is wrong
    lead = t.dim() - len(decl.dims)
    if lead:
        t = t.index_select(0, rows)
    for d in _cut_dims(pat, decl):
        t = t.narrow(lead + d, 0, length)
    return t


# sympy is not traceable: dynamo calls this once per shape, as a constant. A plain function: under the decorator an
# lru_cache wrapper is traced into (fullgraph then fails in sympy for an input with a heads dimension).
@torch.compiler.assume_constant_result
def _other_sizes(decl: ir.InputDecl, heads: int, capacity: int, head_dim: int) -> tuple:
    """``_sizes_at``, as a constant under ``torch.compile``."""
    return _sizes_at(decl, heads, capacity, head_dim)


@functools.lru_cache(maxsize=256)  # asked at every call: sympy's substitution once per shape
def _sizes_at(decl: ir.InputDecl, heads: int, capacity: int, head_dim: int) -> tuple:
    """Each dimension's declared size at ``heads`` query heads of ``head_dim`` and a sequence of the table's
    ``capacity`` (a given score's blocks), None for a token dimension, -1 for one naming another size (no tensor
    has it: the ordinary path, which binds every size, takes the call)."""
    at = {S.HEADS: heads, S.N: capacity, S.NK: capacity, S.DK: head_dim}
    sizes = []
    for d, dim in enumerate(decl.dims):
        size = None if d in decl.token_dims else sympy.sympify(dim).subs(at)
        sizes.append(None if size is None else int(size) if isinstance(size, sympy.Integer) else -1)
    return tuple(sizes)


def one_launch_inputs(pat, inputs: dict, block_table, k_cache, heads: int, layout: str = "bhnd", head_dim: int = 0,
                      faults: list | None = None) -> dict | None:
    """A paged call's call-time inputs as the one launch reads them, or None where it does not: each of the
    pattern's inputs a tensor of its rank (a leading batch dimension of the table's rows, or none: one for every
    row), of the declared type, every token dimension of the table's capacity at least (read at each row's
    positions, never a host read of the lengths), its other dimensions of their declared sizes (``heads``: q's
    heads; ``"bnhd"`` takes ``[n, heads, ...]`` ones transposed, as ``check_inputs``), no other name. An input the
    kernel reads (the mask's, the bias's) is over the tokens and the heads; one the route alone reads (a token
    route's indexer, scored before the launch) or a cluster's centroids may have any dimensions; the ids made from
    them are not given. The ordinary path (``by_length``) takes what is not so, and names what is wrong; where there
    is none, ``faults`` gets ``(argument, why, final)`` of the first input the one launch does not take."""
    if not isinstance(pat, ir.PatternIR) or not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        return None
    if k_cache.dim() != 4:
        return None
    declared = [decl for decl in pat.inputs if not decl.derived]
    odd = sorted(set(inputs) ^ {decl.name for decl in declared})  # missing, or not the pattern's
    if odd:
        name = odd[0]
        return _fault(faults, name, f"missing input '{name}'" if name not in inputs
                      else f"'{pat.name}' declares no input '{name}'")
    capacity = block_table.shape[1] * k_cache.shape[1]
    route = pat.route
    routed = set() if route is None else set(route.inputs)
    routed |= {decl.derived[2] for decl in pat.inputs  # centroids, relative embeddings
               if decl.derived and decl.derived[0] in ("cluster", "relative")}
    out = {}
    for decl in declared:
        t, name = inputs[decl.name], decl.name
        if not isinstance(t, torch.Tensor) or t.dim() not in (len(decl.dims), len(decl.dims) + 1):
            return _fault(faults, name, f"expected a tensor of {len(decl.dims)} dimensions ({', '.join(decl.dim_names)}"
                                        ") with an optional leading batch dimension")
        if t.dtype.is_floating_point != (decl.dtype == "float") or t.dtype == torch.bool or t.dtype.is_complex:
            return _fault(faults, name, f"input '{name}' is {decl.dtype}, got a {t.dtype} tensor")
        lead = t.dim() - len(decl.dims)
        if layout == "bnhd" and decl.dim_names[:2] == ("heads", "n"):
            t = t.transpose(lead, lead + 1)
        if lead and t.shape[0] != block_table.shape[0]:
            return _fault(faults, name, f"a batch dimension of {t.shape[0]}, the block table has "
                                        f"{block_table.shape[0]} rows")
        if t.device != k_cache.device:
            return _fault(faults, name, f"input '{name}' is on {t.device}, the caches on {k_cache.device}")
        if any(t.shape[lead + d] < capacity for d in decl.token_dims):
            return _fault(faults, name, f"its token dimensions hold fewer entries than the block table's capacity, "
                                        f"{capacity} (max_pages * page_size)")
        if name not in routed and not set(decl.dim_names) <= {"heads", "n", "nk"}:
            return _fault(faults, name, "the kernel reads it at positions and the head only")
        sizes = _other_sizes(decl, heads, capacity, head_dim or k_cache.shape[-1])
        if any(size is not None and t.shape[lead + d] != size for d, size in enumerate(sizes)):
            # in the caller's order: "bnhd" gives [n, heads, ...] ones as [n, heads]
            want, names = ["capacity" if size is None else str(size) for size in sizes], list(decl.dim_names)
            if t is not inputs[name]:
                want[:2], names[:2] = want[1::-1], names[1::-1]
            batch = ["B"] if lead else []
            return _fault(faults, name, f"has shape {list(inputs[name].shape)}, expected [{', '.join(batch + want)}] "
                                        f"([{', '.join(batch + names)}], n the block table's capacity, {capacity})",
                          final=-1 not in sizes)
        out[name] = t
    return out


def _fault(faults: list | None, name: str, why: str, final: bool = False) -> None:
    """Note why the one launch does not take input ``name``; ``final``: nor would the path by length (a dimension
    of the wrong size), which then refuses the call with this message rather than a row's slice's."""
    if faults is not None:
        faults.append((f"argument {name}", why, final))
    return None


__all__ = ["check_inputs", "group_input", "one_launch_inputs"]
