"""Blocks of context parallelism on the generated Triton kernels (``runtime.runner.BlockRunner``):
queries at ``bound.q_offset`` against keys at ``bound.k_offset`` of a pattern bound at the whole
sequence (``evaluate.block_bound``).

A block runs on 1-D tiles of its rows (a grid's on the flat view, as the CPU executor's blocks),
classified with both offsets; the module is generated for the block's row counts and takes the
offsets as run-time arguments (``Q_OFF``, ``K_OFF``: ``compiler.codegen``), so every block of the
same row counts shares one compiled module. The mask, bias, softcap and FoX decay read absolute
positions (the call-time inputs and gates are the whole sequence's); a routing selection made
across ranks is read at the block's rows. The backward takes the rows' merged ``out`` and ``lse``
(delta = rowsum(dout * out) of the whole row, as flash attention's backward).

The tiles are not tuned per block: ``BLOCK_TILE_TOKENS`` on CUDA, the interpreter's tiles on CPU
tensors, or the tiles the module was compiled with.
"""

from __future__ import annotations

import math

import sympy
import torch

from ....compiler import evaluate as E
from ....compiler.codegen import ScheduleShape, bias_index_checks, generate_source
from ....compiler.cost import KernelConfig
from ....core import symbols as S
from ....core.errors import SpecError
from ...plan import routing, tile_plan
from ...plan.cache import PlanCache, mask_input_names
from . import runner as R

#: Tile tokens of a block's 1-D tiles on CUDA (not autotuned per block).
BLOCK_TILE_TOKENS = 64
#: Block plans kept per runner (least recently used dropped first): one per (sizes, heads, offsets,
#: rows, device, head dim, dtype).
BLOCK_PLANS = 64


def _tokens(runner, device: torch.device) -> tuple[int, int]:
    if runner.q_tile is not None or runner.kv_tile is not None:  # forced tiles count as their tokens
        tiles = (runner.q_tile or runner.kv_tile, runner.kv_tile or runner.q_tile)
        return tuple(math.prod(t) if isinstance(t, tuple | list) else int(t) for t in tiles)
    tokens = BLOCK_TILE_TOKENS if device.type == "cuda" else R.INTERPRET_TILE_TOKENS
    return tokens, tokens


def _plan(runner, bound: E.Bound, q: torch.Tensor, tensors: dict):
    """(config, plan, module) of a block, cached on the runner (``block_plans``) per shapes and, for a
    mask that reads inputs, per those inputs' values."""
    pat = runner.pattern
    if not hasattr(runner, "block_plans"):
        runner.block_plans = PlanCache(BLOCK_PLANS)
    key = (tuple(sorted(bound.axis_sizes.items())), bound.heads, bound.q_offset, bound.n, bound.k_offset, bound.nk,
           q.device.type, q.shape[-1], q.dtype)
    used = {n: t.detach().cpu() for n, t in tensors.items() if n in mask_input_names(pat)}
    entry = runner.block_plans.get(key)
    if entry is not None and entry[0].keys() == used.keys() and all(
            entry[0][n].shape == t.shape and torch.equal(entry[0][n], t) for n, t in used.items()):
        return entry[1]
    tq, tk = _tokens(runner, q.device)
    config = KernelConfig((min(tq, bound.n),), (min(tk, bound.nk),), "flat")
    sched = R.classify(pat, bound, config, used)
    plan = tile_plan.Plan.build(pat, bound, sched)
    source = generate_source(pat, bound, ScheduleShape.of(sched), config)
    interpret = q.device.type != "cuda" and not type(runner).native
    module = R.load_kernels(R.write_source(source), interpret=interpret)
    value = (config, plan, module, interpret)
    runner.block_plans[key] = (used, value)
    return value


def launch(runner, bound: E.Bound, q, inputs: dict, selection=None, key_block=None) -> R.Launch:
    """The launch state of one block (``runner``: a ``TritonRunner``)."""
    pat = runner.pattern
    if not bound.is_block:
        raise SpecError("expected a block bound (evaluate.block_bound)", where="argument bound")
    if q.dtype not in R.DTYPES:
        raise SpecError(f"the triton backend runs float16, bfloat16 and float32, got {q.dtype}",
                        where="argument q", hint="use backend='cpu' for float64")
    tensors, _ = E.bind_inputs(pat, bound, inputs, batch=q.shape[0])
    if mask_input_names(pat):
        E.check_mask_indices(pat, bound, {n: t.detach().cpu() for n, t in tensors.items()}, batch=q.shape[0])
    batched = frozenset(n for n, t in tensors.items() if t.dim() > len(pat.input(n).dims))
    config, plan, module, interpret = _plan(runner, bound, q, tensors)
    device = q.device
    if selection is not None:  # routing: the selection made over the whole sequence, at these rows
        plan = routing.selected_plan(plan, selection.cpu(), key_block.cpu())
    sched = plan.schedule
    cls = (bound.heads, 1) if plan.selection is not None else ((0, 0) if sched.heads_stored == 1 else (0, 1))
    extra: dict = {}
    if plan.selection is not None:
        extra["SEL"] = routing.selection_words(plan.selection).to(device)
        extra["KEY_BLOCK"] = plan.key_block.to(torch.int32).contiguous().to(device)
    if plan.softcap is not None:
        extra["SOFTCAP"] = plan.softcap.to(torch.float32).contiguous().to(device)
    checks = [(S.input_name(site.func), j, int(sympy.sympify(pat.input(S.input_name(site.func)).dims[j]).subs(
        bound.subs))) for site, j in bias_index_checks(pat, bound)]
    if checks:
        extra["ERR"] = torch.zeros(len(checks), dtype=torch.int64, device=device)
    return R.Launch(module, interpret, config, ScheduleShape.of(sched), plan, pat, bound, tensors, batched,
                    R._lists(sched, device), cls, extra, checks)


def block_forward(runner, bound: E.Bound, q, k, v, inputs: dict, scale: float, selection=None, key_block=None):
    """``(out, lse)`` of a block in float32 (the kernels' accumulation; q, k, v in their dtype)."""
    out, lse = R.forward(launch(runner, bound, q, inputs, selection, key_block), q, k, v, scale)
    return out.float(), lse.float()


def block_backward(runner, bound: E.Bound, q, k, v, out, lse, dout, inputs: dict, scale: float, selection=None,
                   key_block=None):
    """``(dq share, dk, dv)`` of a block from the rows' merged ``out`` and ``lse``."""
    lau = launch(runner, bound, q, inputs, selection, key_block)
    dq, dk, dv, _ = R.backward(lau, q, k, v, out, lse, dout.to(q.dtype), None, scale, [])
    return dq, dk, dv
