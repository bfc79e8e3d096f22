"""The simulator's entry points: ``simulate`` (a pattern's predicted speedup, bounds and schedules) and
``simulate_decode`` (one decode step's bound after a KV cache). Nothing here runs attention."""

from __future__ import annotations

from ..compiler.analysis import evaluate as E
from ..core import ir
from ..core.errors import SpecError
from ..core.recurrence_rules import RULES
from .pattern_arg import as_pattern, refuse_bucketed
from .plan import clusters, forms


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
    kv_heads: int | None = None,
    **params,
):
    """Predict how fast a pattern can run: a ``SimulationReport`` with the
    FLOP-wise bound (1 / density), the tile-wise bound of the chosen schedule,
    the predicted speedup over dense attention (forward and backward), tile
    counts, the chosen and the top schedules, and the hardware model.

    ``hardware``: a name from ``compiler.cost.hardware`` (a100, h100, h200, b200,
    or one added with ``register_hardware``) or a ``Hardware``. ``q_tile`` /
    ``kv_tile`` force the tile shapes, as in ``compile_attention`` (one extent per
    grid axis, or one int for flat tiles of the token order). ``nk``: the keys of a cross-attention pattern
    (``queries ... keys ...``); a self-attention's queries after a KV cache (``nk > n``) are a decode step's
    question, ``simulate_decode``'s. ``inputs``: call-time inputs of
    data-dependent masks (without a batch dimension). ``kv_heads``: K/V heads shared by the ``heads``
    query heads (grouped-query attention; default one per query head, a positive divisor of ``heads``): the
    dK/dV kernel then runs ``Prediction.group_split`` CTAs per K/V head, each walking its share of the
    group's query heads in turn (fp32 partials summed where more than one).
    """
    from ..compiler.cost.hardware import get_hardware
    from ..compiler.cost.model import dtype_bytes
    from ..compiler.cost.simulator import simulate_pattern

    pat = as_pattern(pattern, name, params)
    refuse_bucketed(pat, "simulate")
    if isinstance(pat, ir.CombinedIR):  # the branches' predictions, summed (runtime.combined)
        from .combined import simulate_combined

        return simulate_combined(pat, simulate, n, nk, inputs, sizes=sizes, heads=heads, head_dim=head_dim,
                                 batch=batch, hardware=hardware, q_tile=q_tile, kv_tile=kv_tile, dtype=dtype, top=top,
                                 kv_heads=kv_heads)
    if isinstance(pat, ir.RecurrenceIR):
        if kv_heads is not None and kv_heads != heads:
            raise SpecError("a recurrence's cost model has one K/V head per query head", where="argument kv_heads")
        from .recurrences.common import simulate_recurrence

        return simulate_recurrence(pat, n=n, sizes=sizes, heads=heads, head_dim=head_dim, batch=batch,
                                   hardware=hardware, q_tile=q_tile, kv_tile=kv_tile, dtype=dtype, nk=nk,
                                   inputs=inputs)
    head_dim = E.kernel_head_dim(head_dim)  # the kernels' range, as check-gpu and emit refuse beyond it
    batch, top = (E.positive_int(what, value) for what, value in (("batch", batch), ("top", top)))
    _check_inputs(pat, inputs)
    hw = get_hardware(hardware)
    dtype_bytes(dtype)
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes, dk=head_dim)
    inputs, notes = clusters.sample_derived(pat, bound, dict(inputs or {}), head_dim)  # cluster(): a seeded sample
    report = simulate_pattern(pat, bound, hw, head_dim=head_dim, batch=batch, dtype=str(dtype).lower(),
                              q_tile=q_tile, kv_tile=kv_tile, inputs=inputs or None, top=top, kv_heads=kv_heads)
    report.assumptions.extend(notes)
    return report


def simulate_decode(
    pattern,
    nk: int | None = None,
    n: int = 1,
    sizes: dict | None = None,
    heads: int = 1,
    head_dim: int = 128,
    batch: int = 1,
    hardware=None,
    dtype: str = "bf16",
    name: str | None = None,
    *,
    kv_heads: int | None = None,
    kv_tile: int | None = None,
    inputs: dict | None = None,
    **params,
):
    """Bound one decode step: ``n`` new queries after a KV cache of ``nk`` keys (a
    ``compiler.cost.decode_cost.DecodeReport``): the keys the queries reach, the bytes a step reads
    (K and V once per K/V head, Q, the output, split-KV partials), its FLOPs, and per GPU model the
    bandwidth and compute bounds, the split-KV choice, tokens/s and the dense step's bound beside.

    ``hardware``: one model name or ``Hardware``, a list of them, or None for every model of
    ``compiler.cost.hardware``. ``kv_tile``: the decode kernel's KV tile (default
    ``decode_cost.DECODE_KV_TILE``). ``inputs``: call-time inputs of a data-dependent mask, sized for the
    whole sequence of ``nk`` tokens. A recurrence or a combined pattern is refused (a recurrence's step
    reads its fixed-size state: ``decode_cost.recurrence_state_bytes``)."""
    from ..compiler.cost import decode_cost as D
    from ..compiler.cost.hardware import HARDWARE, get_hardware
    from ..compiler.cost.model import dtype_bytes

    pat = as_pattern(pattern, name, params)
    refuse_bucketed(pat, "simulate_decode")
    if isinstance(pat, ir.RecurrenceIR):
        heads, head_dim, batch = (E.positive_int(w, v) for w, v in (("heads", heads), ("head_dim", head_dim),
                                                                    ("batch", batch)))
        rows = RULES[pat.rule].state_rows
        state = D.recurrence_state_bytes(batch, heads, head_dim, rows)
        raise SpecError(f"'{pat.name}' is a recurrence: a decode step reads and writes its fp32 state "
                        f"(batch x heads x {f'{rows} ' if rows > 1 else ''}head_dim x head_dim: {state:,} bytes) "
                        "whatever nk, not a KV cache",
                        where="argument pattern", hint="simulate_decode bounds a softmax pattern's KV-cache reads")
    if isinstance(pat, ir.CombinedIR):
        raise SpecError(f"'{pat.name}' combines several attentions: a decode step is bounded per softmax pattern",
                        where="argument pattern", hint="simulate each branch's pattern")
    forms.refuse_query_offset(pat, "argument nk")  # the call would refuse the step: so does its bound
    head_dim, batch = E.kernel_head_dim(head_dim), E.positive_int("batch", batch)
    dtype_bytes(dtype)
    _check_inputs(pat, inputs)
    if hardware is None:
        models = list(dict.fromkeys(HARDWARE.values()))
    else:
        models = [get_hardware(h) for h in (hardware if isinstance(hardware, list | tuple) else [hardware])]
        if not models:
            raise SpecError("no hardware model given", where="argument hardware", hint="None means every model")
    bound = D.decode_bound(pat, n=n, nk=nk, heads=heads, sizes=sizes, head_dim=head_dim)
    inputs, notes = clusters.sample_derived(pat, bound, dict(inputs or {}), head_dim)  # cluster(): a seeded sample
    report = D.simulate_decode_pattern(pat, bound, models, head_dim=head_dim, batch=batch, dtype=str(dtype).lower(),
                                       kv_heads=kv_heads, inputs=inputs or None,
                                       kv_tile=D.DECODE_KV_TILE if kv_tile is None else kv_tile)
    report.assumptions.extend(notes)
    return report


def _check_inputs(pat, inputs) -> None:
    """A simulation's ``inputs``: a dict of tensors by name, each an input of the pattern (a misspelt one is named,
    as a call or ``materialize_mask`` names it)."""
    if inputs is not None and not isinstance(inputs, dict):
        raise SpecError(f"expected a dict of input tensors by name, got {type(inputs).__name__}",
                        where="argument inputs")
    E.check_input_names(pat, inputs or {})
