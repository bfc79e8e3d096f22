"""A pattern's int parameters that its kernels read at run time (the seam: which of a pattern's values stay out of the
kernel's text, so that one compiled module serves every value of them): a sliding window's size, a sink count, a
prefix's length. Two modules of one pattern whose parameters differ only in these have the same source, so they load
(and Triton compiles) one module: a model whose layers differ in their window compiles its kernels once.

How a parameter is found: the pattern is lowered again from its own source with the parameter kept a symbol
(``spec.library.lower``'s ``symbolic``), so the mask reads it exactly where the spec does (``window``, and what is
computed from it, ``window // 2 + 1``), never a number that only happens to equal it. The symbolic mask is taken only
where putting the value back gives the compiled mask itself (the same expression), and where every place that reads
the parameter is integer arithmetic or a comparison a run-time int serves exactly. The kernels then take it as
``p_NAME`` (``PREFIX``), an int that Triton does not specialise on, passed by name at every launch
(``runtime.backends.triton.kernel_launch.common_args``). A parameter given one value per head (``NAME[heads]``, MoA's
``alpha``) is found the same way, the symbol standing for the per-head expression the checker makes of the values; the
kernels take it as a pointer to an int32 table of the values and read ``tl.load(p_NAME + h)`` at the head they serve,
so a model whose layers give their heads different spans compiles one module.

What stays a constant of the text, and why:

- a parameter read as a divisor or a modulus (``q // block``): a constant one is a shift or a multiply, a run-time one
  an integer division in every pair of every PARTIAL tile (offline, sm_90, Triton 3.6: ``s2``'s forward PARTIAL loop
  525 -> 1,275 instructions, registers 126 -> 194; docs/backends.md);
- a NATTEN window's size, dilation and stride (``window(...)``): the printer computes the window's bounds from them;
- a parameter read in float arithmetic, as an exponent or in an input's index: the printer folds those as numbers;
- floats and bools (per head or not); the bias, softcap and route (only the mask is read);
- the sizes (``n``, the grid's extents) and the tiles: they fix the kernels' static loops and descriptors (a block of a
  sequence and a paged batch take their rows at run time already: ``Q_EXT``, ``K_EXT``).
"""

from __future__ import annotations

import functools
import weakref

import sympy

from ....core import ir
from ....core import symbols as S

#: The prefix of a parameter's name in the kernels' text (no name of the spec becomes a name of the code).
PREFIX = "p_"


def lifted_mask(pat: ir.PatternIR) -> tuple[sympy.Basic, dict[str, int | tuple[int, ...]]]:
    """``(mask, values)``: ``pat``'s mask with the parameters its kernels read at run time as symbols
    (``S.param_symbol``), and ``{kernel parameter: value}`` of them (a tuple of one int per head for a per-head
    parameter); ``(pat.mask, {})`` where none is. Found once per pattern object (every launch asks:
    ``kernel_launch.common_args``)."""
    seen = _BY_OBJECT.get(id(pat))
    if seen is not None and seen[0]() is pat:
        return seen[1]
    if not isinstance(pat, ir.PatternIR) or pat.source is None or not isinstance(pat.mask, sympy.Basic):
        made = (getattr(pat, "mask", None), {})
    else:
        made = _lifted(pat.source, pat.filename, pat.name, pat.params, pat.mask, pat.head_params)
    if len(_BY_OBJECT) > 4096:  # patterns come and go with their modules: the dead ones dropped
        for key in [key for key, (ref, _) in _BY_OBJECT.items() if ref() is None]:
            del _BY_OBJECT[key]
    _BY_OBJECT[id(pat)] = (weakref.ref(pat), made)
    return made


#: id(pattern) -> (a weak reference to it, ``lifted_mask``'s result)
_BY_OBJECT: dict[int, tuple[weakref.ref, tuple]] = {}


def run_values(pat: ir.PatternIR) -> dict[str, int | tuple[int, ...]]:
    """``{kernel parameter: value}`` of the parameters ``pat``'s kernels read at run time (``lifted_mask``)."""
    return lifted_mask(pat)[1]


def symbol_names(values: dict[str, int | tuple[int, ...]]) -> dict[sympy.Symbol, str]:
    """The symbol of each run-time parameter and how the kernels' text reads it: its name, or, one value per head,
    its table's entry at the head ``h`` the mask is asked at."""
    return {S.param_symbol(name.removeprefix(PREFIX)): f"tl.load({name} + h)" if isinstance(v, tuple) else name
            for name, v in values.items()}


def largest(value: int | tuple[int, ...]) -> int:
    """The largest magnitude a run-time parameter takes (any head's)."""
    return max(abs(v) for v in value) if isinstance(value, tuple) else abs(value)


@functools.lru_cache(maxsize=256)
def _lifted(source: str, filename: str, name: str, params: tuple, mask: sympy.Basic, head_params: tuple = ()):
    heads = dict(head_params)
    given = {p: _per_head(v, heads[p]) if p in heads and not isinstance(v, int | sympy.Integer) else v
             for p, v in params}  # as a caller gives them: a per-head parameter's values as a list
    values = {p: v for p, v in given.items() if _int_value(v)}
    if not values:
        return mask, {}
    plain = tuple((p, given[p]) for p, _ in params)
    exprs = dict(params)  # what the checker made of each value (a per-head one: its expression of h)
    alone = {p: _lower(source, filename, name, plain, frozenset({p})) for p in values}
    served = [p for p, lifted in alone.items() if _served(lifted, p, exprs, mask)]
    if not served:
        return mask, {}
    # one parameter: its own lowering; several: lowered together, and checked again
    lifted = alone[served[0]] if len(served) == 1 else _lower(source, filename, name, plain, frozenset(served))
    if not all(_served(lifted, p, exprs, mask, every=served) for p in served):
        return mask, {}
    return lifted, {PREFIX + p: tuple(values[p]) if isinstance(values[p], list) else int(values[p]) for p in served}


def _per_head(expr, count: int) -> list:
    """A per-head parameter's values, head by head, from the checker's expression of ``h``."""
    return [expr.subs(S.H, i) for i in range(count)]


def _int_value(value) -> bool:
    """Whether a run-time int (or one per head) serves ``value``: ints at least 0, no bool."""
    values = value if isinstance(value, list) else [value]
    return all(isinstance(v, int | sympy.Integer) and not isinstance(v, bool) and int(v) >= 0 for v in values)


def _lower(source: str, filename: str, name: str, params: tuple, symbolic: frozenset) -> sympy.Basic | None:
    """The mask of the declaration ``name`` of ``source`` lowered with ``params``, ``symbolic`` kept symbols; None
    where that does not lower (a check that needs the value)."""
    from ....spec.library import lower
    from ....spec.parser import parse

    try:
        module = parse(source, filename)
        decl = module.by_name[name]
        pat = lower(module, decl, {p: [_plain(x) for x in v] if isinstance(v, list) else _plain(v) for p, v in params},
                    symbolic=symbolic)
    except Exception:  # noqa: BLE001 - any failure keeps the value in the text, as before
        return None
    return pat.mask if isinstance(pat, ir.PatternIR) else None


def _plain(value):
    """A parameter's value as a caller gives it (the IR keeps sympy numbers)."""
    if isinstance(value, sympy.Integer):
        return int(value)
    if isinstance(value, sympy.Float | sympy.Rational):
        return float(value)
    if value is sympy.true or value is sympy.false:
        return bool(value)
    return value


def _served(lifted, param: str, values: dict, mask, every=None) -> bool:
    """Whether ``lifted`` reads ``param`` only where a run-time int serves it, and gives ``mask`` itself with the
    values of ``every`` (default: ``param`` alone) put back (``values``: the checker's expressions of them)."""
    if not isinstance(lifted, sympy.Basic):
        return False
    sym = S.param_symbol(param)
    if sym not in lifted.free_symbols:
        return False
    back = {S.param_symbol(p): values[p] for p in (every or [param])}
    return S.substitute(lifted, back) == mask and _integer_reads(lifted, sym)


def _integer_reads(e: sympy.Basic, sym: sympy.Symbol) -> bool:
    """Whether every node of ``e`` that reads ``sym`` is integer arithmetic, a comparison or a logical operator:
    never a divisor or modulus, a window, an input's index, a power, a float."""
    if sym not in e.free_symbols:
        return True
    if isinstance(e, S.Window | sympy.Pow) or S.input_name(getattr(e, "func", None)):
        return False
    if isinstance(e, S.FloorDiv | sympy.Mod) and sym in e.args[1].free_symbols:
        return False
    if isinstance(e, sympy.Expr) and not isinstance(e, sympy.Symbol) and e.is_integer is not True:
        return False
    return all(_integer_reads(arg, sym) for arg in e.args if isinstance(arg, sympy.Basic))


__all__ = ["PREFIX", "largest", "lifted_mask", "run_values", "symbol_names"]
