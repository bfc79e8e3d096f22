"""Blocks of a sequence on the generated Triton kernels: context parallelism's
(``runtime.runner.BlockRunner``, served by ``TritonRunner.block_forward`` / ``block_backward``) and the
queries after a KV cache (``TritonRunner._offset_block``): queries at ``bound.q_offset`` against keys
at ``bound.k_offset`` of a pattern bound at the whole sequence (``evaluate.block_bound``).

A block runs on 1-D tiles of its rows (a grid's on the flat view, as the CPU executor's blocks),
classified with both offsets, so its kernels visit only the KV tiles its rows reach (a decode step
of a sliding window reads the window, not the cache); the module is generated for the block's row
counts and takes the offsets as run-time arguments (``Q_OFF``, ``K_OFF``: ``compiler.codegen.triton.source``), so
every block of the same row counts shares one compiled module. The mask, bias, softcap and FoX decay
read absolute positions (the call-time inputs and gates are the whole sequence's); a routing
selection made across ranks is read at the block's rows, a KV-cache call's queries select their own.
The backward takes the rows' merged ``out`` and ``lse`` (delta = rowsum(dout * out) of the whole
row, as flash attention's backward).

The tiles are not tuned per block: ``BLOCK_TILE_TOKENS`` tokens a side, or the tokens of the tiles
the module was compiled with.
"""

from __future__ import annotations

import math

import sympy
import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.schedule import TileSchedule
from ....compiler.analysis.tiles import classify_tiles
from ....compiler.codegen.triton.exprs import FP32_TINY, softcap_too_small
from ....compiler.codegen.triton.source import ScheduleShape, bias_index_checks, generate_source
from ....compiler.cost.model import KernelConfig
from ....compiler.cost.search import block_config, classify_flat
from ....core import symbols as S
from ....core.errors import SpecError
from ...plan import decode_lists, device_routes, device_tiles, routing, tile_plan
from ...plan.cache import block_key, mask_input_names, same_tensors
from ...plan.route_scores import placed

#: Tile tokens of a block's 1-D tiles, on CUDA and under the interpreter (not autotuned per block).
BLOCK_TILE_TOKENS = 64
#: What the kernels run (as ``TritonRunner``).
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tokens(runner) -> tuple[int, int]:
    if runner.q_tile is None and runner.kv_tile is None:
        return BLOCK_TILE_TOKENS, BLOCK_TILE_TOKENS
    tiles = (runner.q_tile or runner.kv_tile, runner.kv_tile or runner.q_tile)  # forced: their token counts
    return tuple(math.prod(t) if isinstance(t, tuple | list) else int(t) for t in tiles)


def block_hardware(runner, q: torch.Tensor):
    """The hardware model a block's launch is sized for: the runner's ``hardware`` where set (the offline
    check sets the architecture's), the GPU's on CUDA tensors, else None (the interpreter)."""
    hw = getattr(runner, "hardware", None)
    if hw is not None or q.device.type != "cuda":
        return hw
    from ....compiler.cost.hardware import hardware_for_gpu

    return hardware_for_gpu(torch.cuda.get_device_name(q.device))


def _block_config(runner, bound: E.Bound, q: torch.Tensor) -> KernelConfig:
    """A block's 1-D tiles (``BLOCK_TILE_TOKENS`` a side, at most its rows) and, on a GPU, the launch
    parameters under which its passes fit."""
    tq, tk = _tokens(runner)
    config = KernelConfig((min(tq, bound.n),), (min(tk, bound.nk),), "flat")
    hw = block_hardware(runner, q)
    if hw is not None:  # the launch parameters under which the block's passes fit on this GPU
        config = block_config(runner.pattern, bound, config, q.shape[-1], q.element_size(), hw)
    return config


def _decode_plan(runner, bound: E.Bound, q: torch.Tensor):
    """(config, template plan, source) of the decode steps of ``bound``'s query count and tiles
    (``decode_lists``): made at the first such step, kept in the runner's ``block_plans`` for every later
    length (a cache shorter than a KV tile takes a tile of its length: its own template)."""
    tq, tk = _tokens(runner)
    key = ("decode", bound.n, min(tk, bound.nk), bound.heads, q.device.type, q.shape[-1], q.dtype)
    entry = runner.block_plans.get(key)
    if entry is not None:
        return entry
    pat = runner.pattern
    config = _block_config(runner, bound, q)
    # the template's own schedule is never launched (each step makes its lists): one pair, FULL
    one = torch.zeros(1, dtype=torch.int64)
    sched = TileSchedule.from_pairs((bound.n,), (bound.nk,), config.q_tile, config.kv_tile, bound.heads, 1, one, one,
                                    one, torch.ones(1, dtype=torch.bool), torch.zeros(1, dtype=torch.float64), False,
                                    False)
    plan = tile_plan.Plan.build(pat, bound, sched)
    plan.call_lists = decode_lists.DecodeLists.of(pat, bound)
    entry = runner.block_plans[key] = (config, plan, generate_source(pat, bound, ScheduleShape.of(sched), config))
    return entry


def _plan(runner, bound: E.Bound, q: torch.Tensor, tensors: dict):
    """(config, plan, source) of a block, cached in the runner's ``block_plans`` (a bounded LRU) per
    (sizes, heads, offsets, rows, device, head dim, dtype) and, for a mask that reads inputs whose lists are
    not made on the device (``device_tiles.listed_on_device``), per those inputs' values."""
    pat = runner.pattern
    key = (*block_key(bound), q.device.type, q.shape[-1], q.dtype)
    on_device = device_tiles.listed_on_device(pat)
    used = {} if on_device else {n: t.detach().cpu() for n, t in tensors.items() if n in mask_input_names(pat)}
    entry = runner.block_plans.get(key)
    if entry is not None and (on_device or same_tensors(entry[0], used)):
        return entry[1]
    config = _block_config(runner, bound, q)
    if on_device:  # every call's lists made on the device from its inputs
        plan = device_tiles.input_plan(pat, bound, config.q_tile, config.kv_tile)
    else:
        if pat.queries.kind == "grid":  # 1-D tiles of a grid: classified on its flat view
            sched = classify_flat(pat, bound, config.q_tile, config.kv_tile, used)
        else:
            sched = classify_tiles(pat, bound, config.q_tile, config.kv_tile, used)
        plan = tile_plan.Plan.build(pat, bound, sched)
    value = (config, plan, generate_source(pat, bound, ScheduleShape.of(plan.schedule), config))
    runner.block_plans[key] = (used, value)
    return value


def checked_inputs(pat, bound: E.Bound, q, inputs: dict, checked: dict | None = None) -> tuple[dict, frozenset]:
    """The call's inputs bound and checked for the Triton kernels (q's dtype, the mask's index reads) and
    the names of the batched ones: what every launch, of a whole sequence or a block, starts from.

    A mask's input read at an index of positions and sizes is in range or not whatever the inputs hold: it is
    checked once per sizes and offsets (``checked``: the runner's record of those checked, else at every call),
    on the host, before any kernel runs, and raised by every call of sizes that fail it; a call of checked sizes
    asks nothing. A read at an index taken from an input (``w[doc[q]]``) is checked against the values at every
    call, on the host: such a mask reads the host (no stdlib pattern has one). Not a flag on the device read at
    the next host sync: the kernels clamp every index of a mask's read, so they would run on clamped values
    and the error would come calls late, from another call than the one at fault."""
    if q.dtype not in DTYPES:
        raise SpecError(f"the triton backend runs float16, bfloat16 and float32, got {q.dtype}",
                        where="argument q", hint="use backend='cpu' for float64" if q.dtype == torch.float64 else None)
    tensors, _ = E.bind_inputs(pat, bound, inputs, batch=q.shape[0])
    if mask_input_names(pat):
        key = ("mask indices", *block_key(bound), q.shape[0])
        if checked is None or key not in checked:
            cpu = {n: t.detach().cpu() for n, t in tensors.items()}
            E.check_mask_indices(pat, bound, cpu, batch=q.shape[0], value_indexed=False)
            if checked is not None:
                checked[key] = True
        if E.value_indexed_sites(pat.mask):
            cpu = {n: t.detach().cpu() for n, t in tensors.items()}
            E.check_mask_indices(pat, bound, cpu, batch=q.shape[0], value_indexed=True)
    return tensors, frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))


def kernel_inputs(pat, tensors: dict, device: torch.device) -> dict:
    """Every declared input as the kernels read it, by its ``extra`` entry ``in:NAME`` (what
    ``runner._device_input`` makes where the entry is missing): ints as int64 (a derived input's as int32),
    floats as float32, contiguous, on ``device`` (copied only from elsewhere: a per-call copy onto the
    device it is on would still be a call to ask for)."""
    out = {}
    for decl in pat.inputs:
        t = tensors[decl.name]
        t = (t.to(torch.int32 if decl.derived else torch.int64) if decl.dtype == "int"
             else t.detach().to(torch.float32)).contiguous()
        out[f"in:{decl.name}"] = placed(t, device)
    return out


def prepare(runner, bound: E.Bound, q, inputs: dict, selection=None, key_block=None, *,
            route_keys: torch.Tensor | None = None, decode: bool = False) -> tuple:
    """What a block's launch needs besides the module: ``(config, plan, source, tensors, batched, list
    class strides, extra device tensors, bias index checks)`` (``runner``: a ``TritonRunner``). A routed
    block takes either the ``selection`` made over the whole sequence (context parallelism) or
    ``route_keys``, the keys its own queries select among (queries after a KV cache: every key).
    ``decode``: a forward-only call of queries after a KV cache, whose lists are made on the device from
    a plan kept for every length where the pattern allows it (``decode_lists``)."""
    pat = runner.pattern
    if not bound.is_block:
        raise SpecError("expected a block bound (evaluate.block_bound)", where="argument bound")
    tensors, batched = checked_inputs(pat, bound, q, inputs, runner._checks)
    device = q.device
    routed_decode = decode and decode_lists.applies(pat) and pat.route is not None and route_keys is not None
    if decode and decode_lists.applies(pat):  # one plan for every length, this step's lists made on the device
        config, plan, source = _decode_plan(runner, bound, q)
        if routed_decode:  # and its selection, among the lists' candidates
            plan = device_routes.decode_route_plan(plan, bound, q, route_keys, tensors)
        else:
            plan = plan.call_lists.call_plan(plan, bound, device)
    else:
        config, plan, source = _plan(runner, bound, q, tensors)
        if plan.call_lists is not None:  # lists made on the device from this call's inputs
            plan = plan.call_lists.call_plan(plan, tensors, batched, device)
    if selection is not None:  # routing: the selection made over the whole sequence, at these rows
        plan = routing.selected_plan(plan, selection.cpu(), key_block.cpu())
    elif pat.route is not None and route_keys is not None and not routed_decode:  # these queries select
        if device_routes.applies(pat):  # selected and listed on q's device
            plan = device_routes.route_call_plan(plan, q, route_keys, tensors)
        else:
            cpu_t = {n: t.detach().cpu() for n, t in tensors.items()}
            plan = routing.route_plan(plan, q.detach(), route_keys.detach(), cpu_t, set(batched))
    cls, extra, checks = launch_extras(runner, bound, plan, device)
    extra.update(kernel_inputs(pat, tensors, device))
    return config, plan, source, tensors, batched, cls, extra, checks


def launch_extras(runner, bound: E.Bound, plan, device) -> tuple[tuple[int, int], dict, list]:
    """What a launch, of a whole sequence or a block, passes besides q, k, v and the lists: the list class
    strides, the extra device tensors (the routing selection, softcap, the bias's index-error flags) and the
    bias index checks, computed once per sizes and offsets (``runner._checks``)."""
    pat = runner.pattern
    key = (tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk, bound.heads, bound.q_offset, bound.k_offset)
    if key not in runner._checks:
        runner._checks[key] = [(S.input_name(site.func), j, int(sympy.sympify(pat.input(S.input_name(
            site.func)).dims[j]).subs(bound.subs))) for site, j in bias_index_checks(pat, bound)]
    checks = runner._checks[key]
    sched = plan.schedule
    cls = (bound.heads, 1) if plan.selection is not None else ((0, 0) if sched.heads_stored == 1 else (0, 1))
    extra: dict = {}
    if plan.selection is not None:
        extra["SEL"] = placed(routing.selection_words(plan.selection), device)  # 32 blocks per int32 word
        extra["KEY_BLOCK"] = placed(plan.key_block.to(torch.int32).contiguous(), device)
    if plan.softcap is not None:
        extra["SOFTCAP"] = plan.on_device(("softcap", device), lambda: _softcaps(plan, device))
    if checks:
        extra["ERR"] = torch.zeros(len(checks), dtype=torch.int64, device=device)
    return cls, extra, checks


def _softcaps(plan, device) -> torch.Tensor:
    """The per-head softcaps as the kernels read them (float32 on ``device``), made once per plan: a cap below
    float32's smallest normal number is refused (``s / cap`` would be inf, and the gradient 0 * inf NaN)."""
    small = plan.softcap.abs() < FP32_TINY
    if bool(small.any()):
        h = int(small.nonzero()[0])
        raise softcap_too_small(plan.pattern, float(plan.softcap[h]), h)
    return plan.softcap.to(torch.float32).contiguous().to(device)
