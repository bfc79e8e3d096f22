"""Binding a call's sizes and inputs to a pattern (the seam before evaluation: ``evaluate`` computes at what is bound
here): ``Bound``, the sizes of one evaluation (``bind_sizes``, a block's ``block_bound``), and the call-time inputs
checked against their declarations (``bind_inputs``)."""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import sympy
import torch

from ...core import ir
from ...core import symbols as S
from ...core.errors import SpecError, did_you_mean
from .call_keywords import unknown_input_hint

INT = torch.int64


# ----------------------------------------------------------------- binding sizes
@dataclass
class Bound:
    """Concrete sizes for one evaluation: the sympy substitution and the extents."""

    subs: dict
    n: int
    nk: int
    heads: int
    axis_sizes: dict[str, int]  # size names -> extent
    #: Self-attention with a KV cache: the ``n`` queries are the last ``n`` of the ``nk``
    #: tokens, so query row i has absolute position ``q_offset + i`` (``nk - n``); 0 otherwise.
    q_offset: int = 0
    #: A block of a longer sequence (context parallelism: ``block_bound``): key row j has absolute
    #: position ``k_offset + j``; 0 otherwise. ``subs`` (``n``, grid sizes, input shapes) stay the
    #: whole sequence's.
    k_offset: int = 0
    #: The rows are a block of a longer sequence (``block_bound``), not all of it or the queries
    #: after a KV cache.
    is_block: bool = False


def bind_sizes(
    pat: ir.PatternIR | ir.RecurrenceIR,
    *,
    n: int | None = None,
    nk: int | None = None,
    heads: int | None = None,
    sizes: dict | None = None,
    dk: int | None = None,
    offset_ok: bool = False,
) -> Bound:
    """Check and bind the sizes of a pattern: ``n`` (queries), ``nk`` (keys),
    ``heads`` (None: not known yet, 1 and unchecked), ``sizes`` (grid axis extents by size name).

    Self-attention with ``nk > n`` (``offset_ok``: the callers that implement it) is
    a KV cache: the queries are the LAST ``n`` of the ``nk`` tokens (query row i is
    token ``nk - n + i``, as FlexAttention's and HF's offsets), ``q``/``k``/``q.AXIS``
    are absolute positions and the size symbol ``n`` (also in input shapes) is the
    whole sequence, ``nk``. A grid's sizes then describe all ``nk`` tokens and the
    queries are the last ``n`` of its row-major order (any suffix)."""
    if heads is not None and isinstance(pat, ir.PatternIR):  # None: a count not known yet
        pat.check_head_count(positive_int("heads", heads))
    heads = positive_int("heads", 1 if heads is None else heads)
    size_syms = check_size_names(pat, sizes if sizes is not None else {})
    sizes = {name: positive_int(f"sizes[{name!r}]", value) for name, value in (sizes or {}).items()}
    n = None if n is None else positive_int("n", n)
    nk = None if nk is None else positive_int("nk", nk)
    dk = None if dk is None else positive_int("dk", dk)
    layouts = (pat.queries, pat.keys) if isinstance(pat, ir.PatternIR) else (ir.Layout("seq"),)
    subs: dict = {S.HEADS: heads}
    if dk is not None:
        subs[S.DK] = dk
    q_layout = layouts[0]
    k_layout = layouts[-1]
    self_attn = isinstance(pat, ir.PatternIR) and pat.self_attention
    _check_kv_cache(self_attn, n, nk, offset_ok)
    cached = self_attn and nk is not None and n is not None and nk > n
    grid_count = nk if cached else n  # the token count a grid's (or a concatenation's) sizes describe
    _infer_missing_size(q_layout, size_syms, sizes, grid_count, cached)
    for name, value in sizes.items():
        subs[size_syms[name]] = int(value)
    if cached:  # the grid (or sequence) is the nk tokens; the queries its last n
        nk_val = _layout_length(k_layout, nk, "keys", subs)
        n_val = n
    else:
        n_val = _layout_length(q_layout, n, "queries", subs)
        if isinstance(pat, ir.PatternIR) and not pat.self_attention:
            nk_val = _layout_length(k_layout, nk, "keys", subs)
        else:
            if nk is not None and nk != n_val:  # a grid whose sizes imply other than nk tokens
                raise SpecError(f"{nk} keys but the queries' grid has {n_val} tokens", where="argument nk")
            nk_val = n_val
    # self-attention: ``n`` is the sequence (nk tokens, positions 0..nk-1) whatever the query count
    subs[S.N] = nk_val if self_attn else n_val
    subs[S.NK] = nk_val
    if isinstance(pat, ir.PatternIR):
        ir.check_window_sizes(pat, subs)
    subs[S.NQ] = n_val  # after the window checks, which it never enters (their memo keys stay per sequence)
    return Bound(subs, n_val, nk_val, heads, {k: int(v) for k, v in sizes.items()},
                 q_offset=nk_val - n_val if self_attn else 0)


def block_bound(whole: Bound, q0: int, lq: int, k0: int, lk: int) -> Bound:
    """The queries at absolute positions ``[q0, q0 + lq)`` against the keys at ``[k0, k0 + lk)`` of a
    self-attention pattern bound at the whole sequence (``whole``: no KV cache): ``n = lq``,
    ``nk = lk`` rows, the offsets make them absolute positions, the sizes stay the whole sequence's."""
    if whole.q_offset or whole.is_block or whole.n != whole.nk:
        raise SpecError("a block is cut from a pattern bound at the whole sequence", where="argument whole")
    for what, start, length in (("q0", q0, lq), ("k0", k0, lk)):
        if start < 0 or length < 1 or start + length > whole.n:
            raise SpecError(f"rows [{start}, {start + length}) are not inside the {whole.n} tokens",
                            where=f"argument {what}")
    return dataclasses.replace(whole, n=lq, nk=lk, q_offset=q0, k_offset=k0, is_block=True,
                               subs={**whole.subs, S.NQ: lq})


def _check_kv_cache(self_attn: bool, n: int | None, nk: int | None, offset_ok: bool) -> None:
    """Self-attention with ``nk != n``: only a KV cache (``nk > n``) where the caller implements it."""
    if self_attn and nk is not None and n is not None and nk != n:
        if not offset_ok:
            raise SpecError(f"{nk} keys but {n} queries: this pattern is self-attention and queries after a KV "
                            "cache are not supported here", where="argument nk",
                            hint="call the compiled module (or materialize_mask) with nk > n")
        if nk < n:
            raise SpecError(f"{nk} keys but {n} queries: the queries are the last n of the nk tokens, so nk >= n",
                            where="argument nk")


def _infer_missing_size(q_layout: ir.Layout, size_syms: dict, sizes: dict, grid_count: int | None,
                        cached: bool) -> None:
    """Completes ``sizes`` in place: one missing size follows from the token count when the layout
    is linear in it; any size still missing is an error."""
    missing = [name for name in size_syms if name not in sizes]
    count = q_layout.token_count()
    if missing and grid_count is not None and count is not None and len(missing) == 1:
        inferred = _solve_size(count.subs({size_syms[k]: v for k, v in sizes.items()}), size_syms[missing[0]],
                               grid_count)
        if isinstance(inferred, str):  # linear, but no positive int fits: the token count is at fault
            raise SpecError(inferred, where=f"argument {'nk' if cached else 'n'}",
                            hint=f"pass sizes={{'{missing[0]}': ...}}, or a token count the layout can hold")
        if inferred is not None:
            sizes[missing[0]] = inferred
            missing = []
    if missing:
        raise SpecError(
            "missing size" + ("s " if len(missing) > 1 else " ") + ", ".join(repr(m) for m in missing),
            where="argument sizes",
            hint="pass sizes={" + ", ".join(f"'{m}': ..." for m in missing) + "}",
        )


def _layout_length(layout: ir.Layout, given: int | None, what: str, subs: dict) -> int:
    """The token count of a layout at ``subs`` (checked against ``given``), or ``given`` for a
    sequence of unknown length."""
    count = layout.token_count()
    if count is None:
        if given is None:
            raise SpecError(f"the number of {what} is not known", where=f"argument {'n' if what == 'queries' else 'nk'}")
        return given
    total = int(count.subs(subs))
    if total > INT64_MAX:  # token indices are int64
        raise SpecError(f"the {_layout_word(layout)} {layout.describe()} has {total} tokens, more than int64 "
                        "indices hold",
                        where="argument sizes")
    if given is not None and given != total:
        named = [(_size_name(e), e) for e in layout.extents()] if layout.segments else layout.axes
        extents = ", ".join(f"{name}={int(e.subs(subs))}" for name, e in named)
        raise SpecError(
            f"{given} {what} do not match the {_layout_word(layout)} {layout.describe()} with {extents} = "
            f"{total} tokens",
            where="argument n" if what == "queries" else "argument nk",
        )
    return total


def check_size_names(pat: ir.PatternIR | ir.RecurrenceIR, sizes: dict) -> dict[str, sympy.Symbol]:
    """Every given size names an axis size of the pattern and is a positive int.
    Returns size name -> symbol for all the pattern's named sizes."""
    if not isinstance(sizes, dict):
        raise SpecError(f"expected a dict of sizes, got {type(sizes).__name__}", where="argument sizes")
    size_syms: dict[str, sympy.Symbol] = {}
    layouts = (pat.queries, pat.keys) if isinstance(pat, ir.PatternIR) else ()
    for layout in layouts:
        for size in layout.extents():
            for sym in size.free_symbols:
                size_syms[str(sym).removeprefix("size_")] = sym
    for name, value in sizes.items():
        if name not in size_syms:
            hint = (f"'{name}' is not a named size: the tensors' shapes give it (on the command line, --{name})"
                    if name in ("n", "nk", "heads") else None) or did_you_mean(str(name), size_syms) or (
                "sizes: " + ", ".join(size_syms) if size_syms else "this pattern has no named sizes"
            )
            raise SpecError(f"unknown size '{name}'", where="argument sizes", hint=hint)
        positive_int(f"sizes[{name!r}]", value)
    return size_syms


def _layout_word(layout: ir.Layout) -> str:
    return "concatenation" if layout.segments else "grid"


def _size_name(extent: sympy.Expr) -> str:
    return str(extent).removeprefix("size_")


def _solve_size(count: sympy.Expr, missing: sympy.Symbol, tokens: int) -> int | str | None:
    """The one missing size that makes the layout hold ``tokens`` tokens, when ``count`` (the
    token count with the other sizes substituted) is linear in it: the size, or why no positive
    int fits (a message about the token count); None where it is not linear (reported as a missing
    size)."""
    coeff, rest = count.diff(missing), count.subs(missing, 0)
    if count.free_symbols - {missing} or coeff.free_symbols or not coeff.is_Integer or coeff == 0:
        return None
    value, remainder = divmod(tokens - int(rest), int(coeff))
    if remainder == 0 and value >= 1:
        return value
    name = _size_name(missing)
    return (f"{tokens} tokens leave no positive int for the size '{name}': the layout holds "
            f"{int(rest)} + {int(coeff)} x {name} tokens")


#: The largest size, count or extent: tokens and positions are int64.
INT64_MAX = 2**63 - 1


def check_input_names(pat, inputs: dict) -> None:
    """Refuse a name ``pat`` declares no input of (a misspelt input, another API's keyword), naming it."""
    declared = {d.name: d for d in pat.inputs}
    for name in inputs:
        if name not in declared:
            raise SpecError(f"'{pat.name}' has no input '{name}'", where=f"argument {name}",
                            hint=unknown_input_hint(name, declared, dict(pat.params)))


def plain_ints(value):
    """``value`` with integer-like scalars (numpy integers, 0-d integer tensors; not bools) made Python ints, in a
    tuple or list too, so that every later check and cache key sees one type; anything else as it is."""
    if isinstance(value, tuple | list):
        return type(value)(plain_ints(v) for v in value)
    if isinstance(value, int) or type(value).__name__ == "bool_":  # (bools are ints: kept as they are)
        return value
    if hasattr(value, "__index__"):
        try:
            return operator.index(value)
        except TypeError:  # a float tensor, a tensor of more than one element: refused by its check
            return value
    return value


def positive_int(what: str, value) -> int:
    """``value`` as a Python int in 1..INT64_MAX. Integer-like scalars (numpy
    integers, 0-d integer tensors) are accepted; bools and floats are not."""
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not hasattr(value, "__index__"):
        raise SpecError(f"must be a positive int, got {value!r}", where=f"argument {what}")
    try:
        value = operator.index(value)
    except TypeError:  # e.g. a tensor with more than one element, or a float tensor
        raise SpecError(f"must be a positive int, got {value!r}", where=f"argument {what}") from None
    if value < 1:
        raise SpecError(f"must be a positive int, got {value!r}", where=f"argument {what}")
    if value > INT64_MAX:
        raise SpecError(f"{value} is beyond int64 (tokens and positions are 64-bit)", where=f"argument {what}")
    return value


#: The head dims the Triton kernels take: what ``attnc check-gpu`` and ``emit`` compile and the simulator costs.
KERNEL_HEAD_DIMS = range(1, 257)


def kernel_head_dim(value, where: str = "argument head_dim") -> int:
    """``value`` as a head dim the Triton kernels take (``KERNEL_HEAD_DIMS``): an int (integer-like scalars
    too, bools not), refused in one line naming ``where`` otherwise. The one rule of check-gpu, emit and the
    simulator (a recurrence's kernels may take fewer: its rule's own limit is checked beside)."""
    index = plain_ints(value)  # (a bool stays a bool: refused)
    if isinstance(index, bool) or not isinstance(index, int) or index not in KERNEL_HEAD_DIMS:
        lo, hi = KERNEL_HEAD_DIMS[0], KERNEL_HEAD_DIMS[-1]
        raise SpecError(f"head dims are ints in {lo}..{hi}, got {value!r}", where=where)
    return index


# ----------------------------------------------------------------- binding inputs
def bind_inputs(
    pat: ir.PatternIR | ir.RecurrenceIR, bound: Bound, inputs: dict | None, batch: int | None = None,
    device: torch.device | None = None, required: frozenset[str] | None = None,
) -> tuple[dict[str, torch.Tensor], int | None]:
    """Check call-time inputs against their declarations.

    Returns the inputs (int inputs as int64) and the batch size when any input
    carries a leading batch dimension (``batch`` if given must agree). Every
    input must be on ``device`` when given (q's device), and never on ``meta``
    (no data: a kernel would read uninitialised memory). ``required``: the inputs
    that must be given (default every declared one; ``mask_input_names`` where only
    the mask is evaluated); another declared input may be left out, and is checked
    when given."""
    if inputs is not None and not isinstance(inputs, dict):
        raise SpecError(f"expected a dict of input tensors by name, got {type(inputs).__name__}",
                        where="argument inputs")
    inputs = dict(inputs or {})
    declared = {d.name: d for d in pat.inputs}
    check_input_names(pat, inputs)
    out: dict[str, torch.Tensor] = {}
    found_batch = None
    for name, decl in declared.items():
        if name not in inputs:
            if required is not None and name not in required:
                continue
            shape = f"{decl.dtype}[{', '.join(decl.dim_names)}]"
            raise SpecError(f"missing input '{name}' ({shape})", where=f"argument {name}")
        t = inputs[name]
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.is_meta or (device is not None and t.device != device):
            raise SpecError(f"input '{name}' is on {t.device}" + (f", q on {device}" if device is not None else "")
                            + (": a meta tensor holds no data" if t.is_meta else ""),
                            where=f"argument {name}", hint="pass every input on q's device")
        sized = [sympy.sympify(d).subs(bound.subs) for d in decl.dims]
        unknown = sorted({str(s) for d in sized for s in d.free_symbols})
        if unknown:  # e.g. dk, which only q's last dimension sets
            raise SpecError(f"input '{name}' has a dimension of {', '.join(unknown)}, which this call does not "
                            "set", where=f"argument {name}",
                            hint="pass q= (materialize_mask, simulate) so that dk is known" if "dk" in unknown
                            else None)
        dims = tuple(int(d) for d in sized)
        if tuple(t.shape) == dims:
            has_batch = False
        elif t.dim() == len(dims) + 1 and tuple(t.shape[1:]) == dims:
            has_batch = True
        else:
            shape = f"[{', '.join(decl.dim_names)}] = {list(dims)}"
            raise SpecError(
                f"input '{name}' has shape {list(t.shape)}, expected {shape} with an optional leading batch dimension",
                where=f"argument {name}",
            )
        if decl.dtype == "int":
            if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
                raise SpecError(f"input '{name}' is int, got a {t.dtype} tensor", where=f"argument {name}",
                                hint=f"{name}.long() for 0 and 1" if t.dtype == torch.bool else None)
            t = t.to(INT)
        elif not t.dtype.is_floating_point:
            raise SpecError(f"input '{name}' is float, got a {t.dtype} tensor", where=f"argument {name}")
        if has_batch:
            b = t.shape[0]
            for other, what in ((found_batch, "another input"), (batch, "q")):
                if other is not None and other != b:
                    raise SpecError(f"batch size {b} of input '{name}' differs from {what}'s {other}",
                                    where=f"argument {name}")
            found_batch = b
        out[name] = t
    return out, found_batch
