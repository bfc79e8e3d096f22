"""The Triton backend: generated kernels (``compiler.codegen.triton.source``), compiled from a
source file, launched over the tile schedule's lists, with an autograd function
for the backward pass.

On CUDA tensors the kernels run natively; on CPU tensors they run under
Triton's interpreter. Triton reads ``TRITON_INTERPRET`` (through
``triton.knobs.runtime.interpret`` from 3.4 on) when ``@triton.jit``
decorates a function, so the interpreted copy of a module is imported with
the variable set (``interpreting()``) and kept apart from the native copy.

Interface for the autotuner / kernel cache:

- ``generate_source(pattern, bound, schedule_shape, config) -> str``
- ``load_kernels(source_path, interpret=False) -> module`` (``attnc_fwd``,
  ``attnc_bwd_delta``, ``attnc_bwd_dq``, ``attnc_bwd_dkdv``)
- ``KernelConfig`` (``compiler.cost.model.KernelConfig``: q_tile, kv_tile, layout,
  num_warps, num_stages); ``TritonRunner.config_hook`` may pick the config
  (and ``TritonRunner.source_hook`` the source file) instead of the defaults.

The warm host path: plan once, run many. FlashInfer splits a step into ``plan`` (on the host, once per batch
layout) and ``run`` (per layer, no host work); here the split is per call signature, made by the module itself
rather than asked of the caller, so every caller of ``attn(q, k, v)`` gets it:

- What is cached: a ``launcher.Launcher`` per signature, in the module (``runtime.warm_calls.WarmCalls``, an LRU of
  ``LAUNCHER_CACHE_SIZE``), built by ``TritonRunner.launcher`` at a signature's second call (a signature seen once,
  as each step of a cache growing by a key, builds none). It holds the prepared ``Launch`` (bound sizes, plan, tile
  lists, kernel module, placeholders, launch orders, split count) and each kernel's grid, constexprs and argument
  list, recorded from the ordinary forward (``forward.recording``), with slots for q, k, v and the buffers the
  forward allocates per call (output, lse, split-KV partials: their shapes, strides and dtypes).
- Its key (``WarmCalls.key``): q, k and v's shapes, strides, dtypes and devices, which of them are the
  same tensor, their data pointers' alignment to 16 bytes (tensor descriptors depend on it), ``scale``, the
  module's sizes, and the settings the launch reads besides (``launch_knobs``: the interpreter's SM count and
  architecture, forced split-KV, the runs constexpr maker, the native flag, the config and source hooks).
- What a warm call does: the key, a dict lookup, the buffers allocated, the argument lists filled, the launches
  (``kernel_launch.launch_kernel``, its fallbacks to fewer stages included; out of resources, the launcher is
  dropped and the ordinary path falls back to smaller tiles).
- What is checked per call, and why: only what the key does not hold and a call may change without changing its
  tensors' signature: grad mode with a tensor that requires grad (autograd records the ordinary path), a
  ``torch.compile`` trace, autocast, a block max asked for, the types of ``scale`` and ``return_lse``. Every check
  that depends on the signature alone (shapes, heads, dtypes, devices, bound sizes, admission, fits) ran at the
  signature's first two calls, on the ordinary path, and gives the same answer for every later call of it.
- Not replayed (the ordinary path at every call): calls with any keyword beyond ``scale`` and ``return_lse``
  (call-time inputs, ``sizes``, ``layout``, packed or paged calls, selections, block maxima, key summaries),
  patterns that declare inputs (their values choose lists and index checks, some read on the host), routes (the
  selection is made from q and k at every call), FoX gates, a ``scale E`` clause, a module whose layout is not
  ``"bhnd"``, calls that need a gradient, and forwards that make per call what a replay would not
  (``launcher.build``: tensor descriptors, a bias's index checks, tokens permuted into tile order).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.analysis.schedule import TileSchedule
from ....compiler.analysis.tile_args import parse_tiles
from ....compiler.analysis.tiles import classify_tiles, layout_extents
from ....compiler.codegen.triton.paged_lines import summary_module
from ....compiler.codegen.triton.source import ScheduleShape, check_fp32_constants, generate_source
from ....compiler.cost.model import KernelConfig
from ....compiler.cost.search import classify_flat, tile_shapes
from ....core import ir
from ....core.errors import SpecError
from ...numerics import needs_grad
from ...ops.common import Registered
from ...plan import device_routes, device_tiles, routing, tile_plan
from ...plan.cache import PlanCache, mask_input_names
from ...runner import Call, Support
from ...tritonenv import LOCK, interpreting, require_triton
from . import blocks, cache_pages, paged, paged_max_summaries, paged_routes, split_kv
from . import kernel_launch as KL
from . import launcher as launcher_of
from .backward import backward
from .forward import forward
from .kernel_launch import Launch

__all__ = ["KernelConfig", "ScheduleShape", "TritonRunner", "generate_source", "interpreting", "load_kernels",
           "search_config", "write_source"]

#: Tile token count of the default schedule under the interpreter (bigger tiles: fewer, larger numpy ops).
INTERPRET_TILE_TOKENS = 64
DTYPES = blocks.DTYPES  # what the kernels run (one definition, in triton.blocks)

_LOCK = LOCK  # one lock with the interpreter switch (kernels load and launch under it)
_MODULES: dict[tuple[str, bool], object] = {}
_SOURCE_DIR: str | None = None


def source_dir() -> str:
    """Where generated sources are written for this process (Triton reads them back):
    a private folder (mode 0700, unpredictable name), removed when the process exits."""
    global _SOURCE_DIR
    with _LOCK:
        if _SOURCE_DIR is None or not os.path.isdir(_SOURCE_DIR):
            _SOURCE_DIR = tempfile.mkdtemp(prefix="attnc-kernels-")
            atexit.register(shutil.rmtree, _SOURCE_DIR, ignore_errors=True)
        return _SOURCE_DIR


def write_source(source: str, directory: str | None = None) -> str:
    """Write a generated module to ``directory`` (default: a per-process temp dir); returns its path."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:24]
    path = os.path.join(directory or source_dir(), f"attnc_{digest}.py")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(source)
        os.replace(tmp, path)
    return path


def load_kernels(source_path: str, interpret: bool = False):
    """Import a generated kernel module from its file (native, or for the interpreter)."""
    require_triton(interpret)
    with open(source_path, encoding="utf-8") as f:
        digest = hashlib.sha256(f.read().encode()).hexdigest()[:24]
    key = (digest, interpret)
    with _LOCK:
        if key in _MODULES:
            return _MODULES[key]
        name = f"attnc_kernels_{digest}_{'interp' if interpret else 'native'}"
        spec = importlib.util.spec_from_file_location(name, source_path)
        module = importlib.util.module_from_spec(spec)
        with interpreting(interpret):
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        _MODULES[key] = module
        return module


def _load_source(source: str, interpret: bool):
    """The kernel module of a generated source (written to this process's folder)."""
    return load_kernels(write_source(source), interpret=interpret)


@functools.cache  # one module, loaded once per process and mode
def _summary_kernels(interpret: bool):
    """The module of ``attnc_paged_summary`` and ``attnc_paged_max_summary`` (``paged_lines.summary_module``)."""
    return _load_source(summary_module(), interpret)


# ----------------------------------------------------------------- choosing a schedule
def default_config(pat: ir.PatternIR, bound: E.Bound, q_tile=None, kv_tile=None, *, device: torch.device,
                   head_dim: int = 64, dtype: torch.dtype = torch.float16, inputs: dict | None = None,
                   kv_heads: int | None = None) -> KernelConfig:
    """The schedule to run without autotuning: forced tiles, else the simulator's best
    candidate on CUDA (``kv_heads``: the call's K/V heads), else interpreter-friendly tiles of
    ``INTERPRET_TILE_TOKENS``."""
    q_ext = layout_extents(pat.queries, bound, bound.n)
    kv_ext = layout_extents(pat.keys, bound, bound.nk)
    grid = len(q_ext) > 1 or len(kv_ext) > 1
    boxes = pat.queries.kind == "grid" and pat.keys.kind == "grid" and len(q_ext) == len(kv_ext)
    tiles = parse_tiles(pat, q_tile, kv_tile)  # the one convention (compiler.analysis.tile_args)
    if tiles.forced:
        qt, kt, flat = tiles.fit(q_ext, kv_ext)
        return KernelConfig(qt, kt, "flat" if flat else "address")
    if device.type == "cuda":
        from ....compiler.cost.hardware import hardware_for_gpu

        hw = hardware_for_gpu(torch.cuda.get_device_name(device))
        return search_config(pat, bound, hw, head_dim=head_dim, dtype=dtype, inputs=inputs, kv_heads=kv_heads)
    tokens = INTERPRET_TILE_TOKENS
    if boxes:
        while tokens > 1:
            shapes = tile_shapes(tokens, q_ext, limit=1)
            if shapes:
                return KernelConfig(shapes[0], tuple(min(t, L) for t, L in zip(shapes[0], kv_ext, strict=True)),
                                    "address")
            tokens //= 2
    if grid:
        return KernelConfig((min(tokens, math.prod(q_ext)),), (min(tokens, math.prod(kv_ext)),), "flat")
    return KernelConfig((min(tokens, q_ext[0]),), (min(tokens, kv_ext[0]),), "address")


def search_config(pat: ir.PatternIR, bound: E.Bound, hardware, *, head_dim: int = 64,
                  dtype: torch.dtype = torch.float16, inputs: dict | None = None,
                  kv_heads: int | None = None) -> KernelConfig:
    """The simulator's best schedule on a hardware model (what a CUDA call runs without autotuning;
    ``kv_heads``: K/V heads shared by the query heads, as ``ScheduleSearch`` takes them)."""
    from ....compiler.cost.hardware import get_hardware
    from ....compiler.cost.search import ScheduleSearch

    nbytes = 4 if dtype == torch.float32 else 2
    return ScheduleSearch(pat, bound, get_hardware(hardware), head_dim=head_dim, nbytes=nbytes,
                          inputs=_static_inputs(pat, inputs), kv_heads=kv_heads).run(top=1)[0].config


def _static_inputs(pat: ir.PatternIR, inputs: dict | None) -> dict | None:
    """Inputs for the simulator's search, on the host. A routing pattern's search selects on one (batch,
    head)'s inputs (``search.route_schedule``): of a batched input (a dimension more than declared, as a
    combined pattern's route scores), the first batch element."""
    if not inputs:
        return None
    dims = {d.name: len(d.dims) for d in pat.inputs} if pat.route is not None else {}
    return {n: (t[0] if t.dim() > dims.get(n, t.dim()) else t).detach().cpu() for n, t in inputs.items()}


def classify(pat: ir.PatternIR, bound: E.Bound, config: KernelConfig, inputs: dict | None) -> TileSchedule:
    """The tile schedule of a config: box tiles on the pattern (``flat`` contiguous boxes and
    ``address`` boxes alike), 1-D tiles of a grid on its flat view."""
    flat = len(config.q_tile) == 1 and len(config.kv_tile) == 1
    if flat and (pat.queries.kind == "grid" or pat.keys.kind == "grid"):
        return classify_flat(pat, bound, config.q_tile, config.kv_tile, inputs)
    return classify_tiles(pat, bound, config.q_tile, config.kv_tile, inputs)


def _lists(sched: TileSchedule, device) -> dict:
    """The kernels' tile lists of ``sched`` on ``device``: int32, contiguous, a list of width 0 given one
    column of -1 (a valid pointer and row stride). Lists made on the device (``call_plan.DeviceSchedule``)
    are taken as they are: no copy, nothing asked of them."""
    def on_device(t):
        t = t.to(torch.int32).contiguous()
        return t if t.device == torch.device(device) else t.to(device)

    def width1(t):
        if t.shape[-1] == 0:
            t = torch.full((*t.shape[:-1], 1), -1, dtype=torch.int32, device=t.device)
        return on_device(t)

    return {
        "FULL_N": on_device(sched.full_count), "FULL_I": width1(sched.full_index),
        "PART_N": on_device(sched.partial_count), "PART_I": width1(sched.partial_index),
        "T_FULL_N": on_device(sched.t_full_count), "T_FULL_I": width1(sched.t_full_index),
        "T_PART_N": on_device(sched.t_partial_count), "T_PART_I": width1(sched.t_partial_index),
    }


class TritonRunner(Registered):
    """Generated Triton kernels for one pattern: configs and sources per shapes (cached),
    tile lists per call for data-dependent masks and routing."""

    #: Optional ``hook(pattern, bound, q, inputs, *, kv_heads) -> KernelConfig | None`` (the autotuner).
    config_hook = None
    #: Optional ``hook(pattern, bound, shape, config, source) -> path`` (the kernel cache).
    source_hook = None
    #: Load the native (CUDA) kernels whatever the tensors' device (set by ``runtime.gpu_check``).
    native = False

    def __init__(self, pat: ir.PatternIR, q_tile=None, kv_tile=None):
        check_fp32_constants(pat)  # float32 kernels: refused when compiling, not at the first call
        self.pattern = pat
        self.q_tile, self.kv_tile = q_tile, kv_tile
        self.register_op()  # under torch.compile: attnc::triton_attention
        self._static: dict = PlanCache()  # shapes key -> (config, plan, source); bounded LRU
        self._dynamic_last: tuple | None = None
        self._checks: dict = {}  # sizes, offsets -> bias index checks (triton.blocks.launch_extras)
        self._fallback: dict = {}  # shapes key -> the smaller config an out-of-resources launch fell back to
        self._bwd_fallback: dict = {}  # (shapes key, "bwd" | "dq", forward config) -> its backward's (dQ's) smaller config
        self.last_source: str | None = None
        self.last_plan: tile_plan.Plan | None = None
        #: The KernelConfig of the latest call (its forward's; the backward's and dQ's tiles inside)
        self.last_config: KernelConfig | None = None
        self.block_plans = PlanCache()  # blocks of context parallelism and KV caches (triton.blocks), bounded LRU
        self._offset_bounds = PlanCache()  # a KV-cache call's sizes -> its block bound (_offset_block)
        #: whether paged calls run in one launch (``triton.paged``), decided once: a traced call reads a flag
        self._pages_served = paged.applies(pat)

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle, torch.save of a model) keep the configuration and the fallbacks learnt, not the
        plans: they hold loaded kernel modules and device tensors, which do not pickle; a copy plans again at its
        first call (the kernels come from the disk cache)."""
        return {**self.__dict__, "_static": PlanCache(), "_dynamic_last": None, "_checks": {}, "last_source": None,
                "last_plan": None, "last_config": None, "block_plans": PlanCache(), "_offset_bounds": PlanCache()}

    # ------------------------------------------------------------ planning
    @staticmethod
    def _key(bound: E.Bound, q: torch.Tensor, kv_heads: int | None = None) -> tuple:
        return (tuple(sorted(bound.axis_sizes.items())), bound.n, bound.nk, bound.heads, kv_heads, q.device.type,
                q.shape[-1], q.dtype)

    def _config(self, bound: E.Bound, q: torch.Tensor, inputs: dict, kv_heads: int | None = None) -> KernelConfig:
        fallback = self._fallback.get(self._key(bound, q, kv_heads))
        if fallback is not None:
            return fallback
        hook = type(self).config_hook
        if hook is not None and self.q_tile is None and self.kv_tile is None:
            cfg = hook(self.pattern, bound, q, inputs, kv_heads=kv_heads)
            if cfg is not None:
                return cfg
        return default_config(self.pattern, bound, self.q_tile, self.kv_tile, device=q.device, head_dim=q.shape[-1],
                              dtype=q.dtype, inputs=inputs, kv_heads=kv_heads)

    def plan(self, bound: E.Bound, q: torch.Tensor, tensors: dict,
             backward_of: KernelConfig | None = None, role: str = "bwd", *,
             kv_heads: int | None = None) -> tuple[KernelConfig, tile_plan.Plan, str]:
        """(config, plan, source) of a call; ``backward_of``: the plan of that config's own
        backward tiles (``role`` "bwd") or its dQ kernel's (``role`` "dq"), cached apart from the forward's;
        ``kv_heads``: the call's K/V heads (the simulator's pick weighs its dK/dV kernel's CTAs by them)."""
        pat = self.pattern
        dyn_names = mask_input_names(pat)
        on_device = bool(dyn_names) and device_tiles.listed_on_device(pat)  # each call's lists made there
        key = self._key(bound, q, kv_heads)
        if backward_of is not None:
            key = (*key, role, backward_of)
        if (not dyn_names or on_device) and key in self._static:
            return self._static[key]
        used = {n: t for n, t in tensors.items() if n in dyn_names}
        if dyn_names and not on_device and self._dynamic_last is not None and self._dynamic_last[0] == key:
            seen = self._dynamic_last[1]
            if all(seen[n].shape == t.shape and torch.equal(seen[n], t.detach().cpu()) for n, t in used.items()):
                return self._dynamic_last[2]
        if backward_of is not None:  # the backward's (dQ's) own tiles, or the smaller ones it fell back to
            config = self._bwd_fallback.get(key) or (backward_of.dq_config() if role == "dq"
                                                     else backward_of.backward_config())
        elif dyn_names and key in self._static:
            config = self._static[key][0]
        else:
            config = self._config(bound, q, tensors, kv_heads)
        if on_device:  # planned for any inputs: the lists of each call are made from its own (device_tiles)
            plan = device_tiles.input_plan(pat, bound, config.q_tile, config.kv_tile)
        else:
            cpu_inputs = {n: t.detach().cpu() for n, t in used.items()}
            plan = tile_plan.Plan.build(pat, bound, classify(pat, bound, config, cpu_inputs))
        source = generate_source(pat, bound, ScheduleShape.of(plan.schedule), config)
        entry = (config, plan, source)
        self._static[key] = entry
        if dyn_names and not on_device and backward_of is None:
            self._dynamic_last = (key, cpu_inputs, entry)
        return entry

    def prepare(self, bound: E.Bound, q, k, inputs: dict, backward_of: KernelConfig | None = None,
                role: str = "bwd", *, forward_only: bool = False) -> Launch:
        """The launch of a call; ``forward_only``: no gradient will be asked of it (a decode step then takes
        lists made on the device, ``plan.decode_lists``)."""
        pat = self.pattern
        if bound.q_offset and not bound.is_block:  # queries after a KV cache: their own rows, no padding
            return self._block_launch(self._offset_block(bound, q), q, inputs, route_keys=k, decode=forward_only)
        tensors, batched = blocks.checked_inputs(pat, bound, q, inputs, self._checks)
        config, plan, source = self.plan(bound, q, tensors, backward_of, role, kv_heads=k.shape[1])
        # ``native``: the CUDA kernels even for CPU tensors (``runtime.gpu_check`` records the launches)
        interpret = q.device.type != "cuda" and not self.native
        hook = type(self).source_hook
        shape = ScheduleShape.of(plan.schedule)

        def module_of():
            path = hook(pat, bound, shape, config, source) if hook is not None else None
            return load_kernels(path or write_source(source), interpret=interpret)

        module = plan.on_device(("kernels", interpret, hook), module_of)
        if backward_of is None:
            self.last_config = config
        device = q.device
        if plan.call_lists is not None:  # lists made on the device from this call's inputs
            plan = plan.call_lists.call_plan(plan, tensors, batched, device)
        # the plan recorded (``last_schedule``): with a mask reading inputs, this call's lists (the static plan's
        # schedule is then the candidates', whose FULL tiles the inputs may mask); a route's per-call selection is
        # not kept past the call (its lists are per batch entry and head, and the selection may be large)
        self.last_source, self.last_plan = source, plan
        if pat.route is not None and device_routes.applies(pat):  # per call, on q's device: the selection
            plan = device_routes.route_call_plan(plan, q, k, tensors)  # and the lists per (batch, head)
        elif pat.route is not None:  # selected on q's device, listed on the host
            cpu_t = {n: t.detach().cpu() for n, t in tensors.items()}
            plan = routing.route_plan(plan, q.detach(), k.detach(), cpu_t, set(batched))
        sched = plan.schedule
        cls, extra, checks = blocks.launch_extras(self, bound, plan, device)
        extra.update(blocks.kernel_inputs(pat, tensors, device))
        key = self._key(bound, q, k.shape[1])
        lists = plan.on_device(("lists", device), lambda: _lists(sched, device))  # routed plans: new per call
        if backward_of is not None:  # a backward on its own tiles: its fallbacks shrink those tiles only
            return Launch(module, interpret, config, shape, plan, pat, bound, tensors, batched, lists,
                          cls, extra, checks, on_config=lambda cfg: None,
                          shrink=lambda: self._shrink(key, config, bound, q, k, inputs, backward_of, role))
        return Launch(module, interpret, config, shape, plan, pat, bound, tensors, batched, lists,
                      cls, extra, checks, on_config=lambda cfg: self._keep_config(key, cfg),
                      shrink=lambda: self._shrink(key, config, bound, q, k, inputs),
                      for_backward=(lambda: self.prepare(bound, q, k, inputs, backward_of=config))
                      if config.own_backward_tiles else None,
                      for_dq=(lambda: self.prepare(bound, q, k, inputs, backward_of=config, role="dq"))
                      if config.own_dq_tiles else None)

    def _keep_config(self, key: tuple, config: KernelConfig) -> None:
        """A launch fell back to fewer stages: later calls of these shapes start there."""
        entry = self._static.get(key)
        if entry is not None:
            self._static[key] = (config, *entry[1:])
        if self._dynamic_last is not None and self._dynamic_last[0] == key:
            self._dynamic_last = (key, self._dynamic_last[1], (config, *self._dynamic_last[2][1:]))

    def _shrink(self, key: tuple, config: KernelConfig, bound: E.Bound, q, k, inputs: dict,
                backward_of: KernelConfig | None = None, role: str = "bwd") -> Launch | None:
        """The call planned again with tiles smaller than ``config`` after Triton ran out of resources
        (kept for later calls of these shapes); None when the tiles are already the smallest.
        ``backward_of``: ``config`` is that forward's backward on its own tiles, which alone shrink
        (the forward's config is untouched)."""
        square = len(config.q_tile) == 1 and self.pattern.queries.kind == "grid"
        smaller = KL.smaller_config(config, square)
        if smaller is None:
            return None
        if backward_of is not None:
            key = (*key, role, backward_of)
            self._bwd_fallback[key] = smaller
        else:
            self._fallback[key] = smaller
            self._dynamic_last = None
        self._static.pop(key, None)
        return self.prepare(bound, q, k, inputs, backward_of=backward_of, role=role)

    def launch_knobs(self) -> tuple:
        """The settings a bound launcher depends on besides the call's signature (tests and the offline check
        change them): part of its key (``api.Attention``)."""
        cls = type(self)
        return (KL.CPU_SMS, KL.CPU_ARCH, split_kv.FORCE_SPLITS, KL.runs_meta, cls.native, cls.config_hook,
                cls.source_hook)

    def pages_in_one_launch(self, q, k_cache, v_cache) -> bool:
        """Whether a paged call of these tensors runs in one launch of ``attnc_fwd_paged`` (``triton.paged``):
        a pattern it serves, Triton's dtypes, queries and pools with a contiguous head dim (the kernel reads a row's
        head dim as contiguous: a [..., ::2] or transposed q was read wrong), query heads a multiple of the K/V
        heads."""
        return (self._pages_served and q.dtype in DTYPES and all(t.stride(-1) == 1 or t.shape[-1] == 1
                                                                for t in (q, k_cache, v_cache))
                and q.shape[1] % k_cache.shape[2] == 0)

    def paged_forward(self, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q: int,
                      scale: float, inputs: dict | None = None):
        """``(out, lse)`` of a paged batch in one launch (``triton.paged.forward``)."""
        return paged.forward(self, _load_source, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q,
                             scale, inputs)

    def paged_pool_means(self, cache, block_table, seqlens, size: int):
        """The means of each row's runs of ``size`` keys (or values) of a paged pool, ``[B, Hkv, runs, D]`` fp32 (a
        combined pattern's pooled branch: ``triton.paged_routes.pool_means``, the one module of
        ``paged_lines.summary_module``)."""
        interpret = cache.device.type != "cuda" and not self.native
        kernel = _summary_kernels(interpret).attnc_paged_summary
        return paged_routes.pool_means(kernel, interpret, cache, block_table, seqlens, size)

    def paged_max_summaries(self, qmax, k_cache, v_cache, block_table, seqlens, size: int, scale: float):
        """Combiner's max summaries of each row's runs of ``size`` keys, by their queries ``qmax`` ``[B, Hq, runs,
        D]``: ``(keys [B, Hkv, runs, D], values [B, Hq, runs, Dv])`` fp32, one launch
        (``triton.paged_max_summaries``)."""
        interpret = k_cache.device.type != "cuda" and not self.native
        kernel = _summary_kernels(interpret).attnc_paged_max_summary
        return paged_max_summaries.max_summaries(kernel, interpret, qmax, k_cache, v_cache, block_table, seqlens,
                                                 size, scale)

    def cache_as_pages(self, q, k, v):
        """``(k_pool, v_pool, block_table, seqlens)``: the paged call of ``attnc_fwd_paged`` that reads q after the
        contiguous KV cache k, v (``triton.cache_pages``), or None where it is not served so."""
        return cache_pages.view(self, q, k, v) if cache_pages.applies(self, q, k, v) else None

    def paged_launcher(self, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q: int, scale: float):
        """``paged_forward``'s launches bound for replay at later calls of the signature (``triton.paged.bind``), or
        None where they cannot be."""
        return paged.bind(self, _load_source, q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q,
                          scale)

    def launcher(self, call: Call, q, k, v) -> launcher_of.Launcher | None:
        """The launches of a forward-only call bound for replay at later calls of its signature
        (``launcher.build``), or None where this call's launches depend on more than its signature: call-time
        inputs (their values choose lists and checks), a route (its selection is made from q and k at every
        call), a gradient."""
        pat = self.pattern
        if call.grad or call.inputs or pat.inputs or pat.route is not None or pat.decay is not None:
            return None
        made = launcher_of.build(self.prepare(call.bound, q, k, {}, forward_only=True), q, k, v, call.scale)
        if made is not None:
            made.owner = self
            made.plan_of = (self.last_source, self.last_plan, self.last_config)
        return made

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float):
        launch = self.prepare(bound, q, k, inputs, forward_only=not needs_grad(q, k, v, *inputs.values()))
        while True:
            names = tuple(launch.tensors)
            try:
                if not needs_grad(q, k, v, *launch.tensors.values()):  # forward only: it may split its KV tiles
                    return forward(launch, q, k, v, float(scale), may_split=True)
                return TritonAttention.apply(launch, float(scale), names, q, k, v, *(launch.tensors[n] for n in names))
            except KL.out_of_resources():
                launch = launch.shrink()
                if launch is None:
                    raise

    # ------------------------------------------------------------ the Runner protocol (runtime.runner)
    name = "triton"
    op = "triton"
    #: queries after a KV cache and blocks of context parallelism take offsets (triton.blocks)
    support = Support(query_offset="native", key_offset=frozenset({"cpu", "cuda"}))

    def _offset_block(self, bound: E.Bound, q) -> E.Bound:
        """The n queries after a KV cache of ``bound`` as a block of the whole sequence (rows
        ``[nk - n, nk)`` against keys ``[0, nk)``): planned, classified and launched as context
        parallelism's blocks are, so the kernels visit only the KV tiles those rows reach."""
        key = (*self._key(bound, q), "offset", bound.q_offset)
        block = self._offset_bounds.get(key)
        if block is None:
            whole = E.bind_sizes(self.pattern, n=bound.nk, nk=bound.nk, heads=bound.heads, sizes=bound.axis_sizes,
                                 dk=q.shape[-1])
            block = self._offset_bounds[key] = E.block_bound(whole, bound.q_offset, bound.n, 0, bound.nk)
        return block

    def _block_launch(self, bound: E.Bound, q, inputs: dict, selection=None, key_block=None, *,
                      route_keys: torch.Tensor | None = None, decode: bool = False) -> Launch:
        """The launch of a block (planned by ``triton.blocks``): of context parallelism, with the selection
        made across ranks, or of queries after a KV cache (``route_keys``: the keys a route selects
        among, per call; ``decode``: a forward-only one)."""
        interpret = q.device.type != "cuda" and not self.native
        config, plan, source, tensors, batched, cls, extra, checks = blocks.prepare(
            self, bound, q, inputs, selection, key_block, route_keys=route_keys, decode=decode)
        module = plan.on_device(("kernels", interpret, None),
                                lambda: load_kernels(write_source(source), interpret=interpret))
        lists = plan.on_device(("lists", q.device), lambda: _lists(plan.schedule, q.device))
        self.last_source, self.last_plan, self.last_config = source, plan, config
        return Launch(module, interpret, config, ScheduleShape.of(plan.schedule), plan, self.pattern, bound, tensors,
                      batched, lists, cls, extra, checks)

    def block_forward(self, bound: E.Bound, q, k, v, inputs: dict, scale: float, selection=None, key_block=None):
        """``(out, lse)`` of a block in float32 (``runtime.runner.BlockRunner``)."""
        out, lse = forward(self._block_launch(bound, q, inputs, selection, key_block), q, k, v, scale)
        return out.float(), lse.float()

    def block_backward(self, bound: E.Bound, q, k, v, out, lse, dout, inputs: dict, scale: float, selection=None,
                       key_block=None, dlse=None, wrt: tuple = ()):
        """``(dq share, dk, dv, {input: gradient})`` of a block from the rows' merged ``out``, ``lse`` and
        the merged lse's gradient ``dlse``."""
        launch = self._block_launch(bound, q, inputs, selection, key_block)
        return backward(launch, q, k, v, out, lse, dout.to(q.dtype), dlse, scale, list(wrt))

    @property
    def last_schedule(self):
        return None if self.last_plan is None else self.last_plan.schedule

    def forward(self, call: Call, q, k, v):
        return self(call.bound, q, k, v, call.inputs, call.scale)

    def traced_forward(self, bound: E.Bound, q, k, v, inputs: dict, scale: float):
        """The op's forward (``attnc::triton_attention``): ``(out, lse)``, no autograd."""
        # its backward (traced_backward) prepares its own launch: this one takes no gradient
        return forward(self.prepare(bound, q, k, inputs, forward_only=True), q, k, v, scale)

    def traced_backward(self, bound: E.Bound, q, k, v, out, lse, dout, dlse, inputs: dict, scale: float,
                        wrt: list[str]):
        """The op's backward: ``(dq, dk, dv, {input: gradient})`` from the backward kernels (on their own
        tiles where the config gives them some, as eager calls run them)."""
        launch = self.prepare(bound, q, k, inputs)
        return backward(launch.backward_launch(), q, k, v, out, lse, dout, dlse, scale, wrt, launch.dq_launch())

    def describe(self) -> str:
        return describe_source(self, self.pattern)


class TritonAttention(torch.autograd.Function):
    """The generated kernels as a differentiable function of q, k, v and the float score inputs."""

    @staticmethod
    def forward(ctx, launch: Launch, scale: float, names: tuple, q, k, v, *input_tensors):
        out, lse = forward(launch, q, k, v, scale)
        ctx.launch, ctx.scale, ctx.names = launch, scale, names
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        launch, dq_launch = ctx.launch.backward_launch(), ctx.launch.dq_launch()
        wrt = [n for n, need in zip(ctx.names, ctx.needs_input_grad[6:], strict=True)
               if need and launch.tensors[n].dtype.is_floating_point]
        if dout is None:
            dout = torch.zeros_like(out)
        while True:  # out of resources: the same gradients on smaller tiles (the inputs are in token order)
            try:
                dq, dk, dv, d_in = backward(launch, q, k, v, out, lse, dout, dlse, ctx.scale, wrt, dq_launch)
                break
            except KL.out_of_resources():
                if dq_launch is not None:  # first the dQ kernel on the backward's tiles, then smaller ones
                    dq_launch = None
                    continue
                launch = launch.shrink() if launch.shrink is not None else None
                if launch is None:
                    raise
        return (None, None, None, dq, dk, dv, *(d_in.get(n) for n in ctx.names))


# ----------------------------------------------------------------- what users read
def emit(pattern: ir.PatternIR, *, n: int | None = None, nk: int | None = None, heads: int = 1,
         sizes: dict | None = None, q_tile=None, kv_tile=None, device: str = "cpu", dk: int = 128) -> str:
    """The kernel source a call at these sizes would run (``attnc emit``): the
    schedule shape only depends on the sizes and tiles, not on the lists. ``dk``: the head dim, which sizes an
    input declared over ``dk`` (music_relative's ``E``, cluster_mask's ``centroids``) as a call's q does."""
    if not isinstance(pattern, ir.PatternIR):
        raise SpecError(f"'{pattern.name}' is a recurrence: no softmax kernel to emit", where="argument pattern")
    bound = E.bind_sizes(pattern, n=n, nk=nk, heads=heads, sizes=sizes, dk=dk)
    config = default_config(pattern, bound, q_tile, kv_tile, device=torch.device(device))
    q_ext, kv_ext = schedule_extents(pattern, bound, config)
    shape = ScheduleShape(q_ext, kv_ext, tuple(config.q_tile), tuple(config.kv_tile))
    return generate_source(pattern, bound, shape, config)


def schedule_extents(pattern: ir.PatternIR, bound: E.Bound, config: KernelConfig
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The query and key grids a config's tiles cover: the layouts' extents, or one flat extent for 1-D tiles of a
    grid (its row-major token order)."""
    q_ext = layout_extents(pattern.queries, bound, bound.n)
    kv_ext = layout_extents(pattern.keys, bound, bound.nk)
    return ((math.prod(q_ext),) if len(config.q_tile) == 1 else tuple(q_ext),
            (math.prod(kv_ext),) if len(config.kv_tile) == 1 else tuple(kv_ext))


def describe_source(runner: TritonRunner | None, pattern: ir.PatternIR) -> str:
    """``Attention.source`` on the Triton backend: the kernels of the latest call."""
    if runner is not None and runner.last_source is not None:
        return runner.last_source
    return (f"# triton backend for '{pattern.name}': the kernels are generated at the first call (per shapes)\n"
            "# see them before with: attnc emit FILE --sizes ... (or --n N)\n")
