"""The Triton backend: generated kernels (``compiler.triton_codegen.source``), compiled from a
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
- ``KernelConfig`` (``compiler.cost.KernelConfig``: q_tile, kv_tile, layout,
  num_warps, num_stages); ``TritonRunner.config_hook`` may pick the config
  (and ``TritonRunner.source_hook`` the source file) instead of the defaults.
"""

from __future__ import annotations

import atexit
import contextvars
import dataclasses
import functools
import hashlib
import importlib.util
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import sympy
import torch

from ....compiler import evaluate as E
from ....compiler.cost import KernelConfig
from ....compiler.hardware import compute_capability
from ....compiler.launch_order import choose_order, ordered_arch
from ....compiler.schedule import TileSchedule
from ....compiler.search import (
    TMA_BOX,
    classify_flat,
    has_tma,
    padded_head_dim,
    tile_shapes,
    tma_fits,
)
from ....compiler.tile_args import parse_tiles
from ....compiler.tiles import classify_tiles, layout_extents
from ....compiler.triton_codegen.exprs import LOG2E
from ....compiler.triton_codegen.kernels import warp_specialized_form
from ....compiler.triton_codegen.scores import scale_in_exponent
from ....compiler.triton_codegen.source import (
    ScheduleShape,
    check_fp32_constants,
    derivative,
    generate_source,
)
from ....compiler.triton_codegen.tiles import box_tile, boxes_are_rows, layout_of
from ....core import ir
from ....core import symbols as S
from ....core.errors import SpecError
from ... import kernel_fit
from ...numerics import fox_prefix, needs_grad
from ...ops.common import Registered
from ...plan import device_routes, device_tiles, routing, tile_plan
from ...plan.cache import PlanCache, mask_input_names
from ...runner import Call, Support
from ...tritonenv import LOCK, interpreting, require_triton
from . import blocks, split_kv

__all__ = ["KernelConfig", "ScheduleShape", "TritonRunner", "generate_source", "interpreting", "load_kernels",
           "search_config", "write_source"]

#: Tile token count of the default schedule under the interpreter (bigger tiles: fewer, larger numpy ops).
INTERPRET_TILE_TOKENS = 64
#: The smallest tile (tokens) an out-of-resources fallback goes down to (``tl.dot`` takes 16).
MIN_FALLBACK_TOKENS = 16
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
    tiles = parse_tiles(pat, q_tile, kv_tile)  # the one convention (compiler.tile_args)
    if tiles.forced:
        qt, kt, flat = tiles.fit(q_ext, kv_ext)
        return KernelConfig(qt, kt, "flat" if flat else "address")
    if device.type == "cuda":
        from ....compiler.hardware import hardware_for_gpu

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
    from ....compiler.hardware import get_hardware
    from ....compiler.search import ScheduleSearch

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


# ----------------------------------------------------------------- one call's launch state
@dataclass
class Launch:
    """Everything a forward/backward launch needs besides q, k, v: the module, the
    plan (lists, maybe per (batch, head) for routing), inputs prepared on the device."""

    module: object
    interpret: bool
    config: KernelConfig
    shape: ScheduleShape
    plan: tile_plan.Plan
    pattern: ir.PatternIR
    bound: E.Bound
    tensors: dict  # checked call-time inputs (original dtypes)
    batched: frozenset
    lists: dict  # name -> device tensor
    cls: tuple[int, int]
    extra: dict  # SEL, KEY_BLOCK, DC (per call), SOFTCAP, inputs -> device tensors and strides
    checks: list  # (input, dimension, extent) of each bias index the forward kernel checks (its ERR slot)
    #: called with the config after a launch fell back to fewer stages (the runner keeps it)
    on_config: object = None
    #: ``() -> Launch | None``: the same call planned with smaller tiles (out-of-resources fallback)
    shrink: object = None
    #: ``() -> Launch``: the call planned on the config's own backward tiles (None: this launch)
    for_backward: object = None
    #: ``() -> Launch``: the call planned on the dQ kernel's own tiles (None: the backward's launch)
    for_dq: object = None

    def backward_launch(self) -> Launch:
        """The launch the backward kernels run: this one, or one re-planned on the backward's tiles
        (its own schedule, classified at them; inputs and gradients stay in token order)."""
        return self if self.for_backward is None else self.for_backward()

    def dq_launch(self) -> Launch | None:
        """The launch of the dQ kernel where it has tiles of its own (``KernelConfig.dq_q_tile``), else None
        (it runs the backward's)."""
        return None if self.for_dq is None else self.for_dq()


def qt_view(device: torch.device) -> bool:
    """The dK/dV kernel's ``QT_VIEW``: Q^T and dO^T as transposed shared-memory views where the
    tensor cores take them so (wgmma, sm_90+); separate transposed loads before (mma.sync, where
    the view is transposed in registers and spills). The offline check sets it per target arch."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


_DUMMIES: dict = {}


def _dummy(device, dtype=torch.float32) -> torch.Tensor:
    """A one-element placeholder for a pointer argument the kernel does not read (made once per device
    and dtype: a fresh one per call is an allocation and a fill per launch)."""
    key = (torch.device(device), dtype)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return _DUMMIES[key]


#: The SMs and architecture a launch on CPU tensors is ordered for (the interpreter; the offline GPU
#: check sets its target's): H100's.
CPU_SMS = 132
CPU_ARCH = "sm90"


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SMS


def _arch(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return CPU_ARCH


def _orders(launch: Launch, batch: int, heads: int, kv_heads: int, device, group_split: int = 1) -> dict:
    """The launch orders of a launch's kernels (``compiler.launch_order``): ``"Q"`` for the forward and dQ
    kernels (per list class), ``"K"`` for the dK/dV kernel (one list class only; ``group_split`` programs per
    K/V head, ``_group_split``); None keeps tile order. Decided once per plan, batch and heads (the rounds of
    the launch), as the simulator decides (a routed plan is made at every call, and so is its decision)."""
    sched = launch.plan.schedule

    def make():
        if not ordered_arch(_arch(torch.device(device))):  # before Hopper: tile order (launch_order)
            return {"Q": None, "K": None}
        sms = _sms(torch.device(device))
        classes = sched.heads_stored
        per_class = batch * heads // classes if (batch * heads) % classes == 0 else 1
        q = choose_order(sched.full_count, sched.partial_count, per_class, sms)
        k = (choose_order(sched.t_full_count, sched.t_partial_count, batch * kv_heads * group_split, sms)
             if classes == 1 else None)
        return {name: None if o is None else o.to(torch.int32).contiguous().to(device)
                for name, o in (("Q", q), ("K", k))}

    return launch.plan.on_device(("order", device, batch, heads, kv_heads, group_split), make)


def _fitting_group_split(launch: Launch, dkdv_call: Callable[[int], tuple], batch: int, heads: int, kv_heads: int,
                         device, head_dim: int, nbytes: int, on_gpu: bool, atomic: bool = False) -> int:
    """The dK/dV kernel's split (``_group_split``). On a GPU, a split whose programs loop over more than one
    query head is taken only where the fit ladder launches that kernel (``dkdv_call``'s) clean at its picked
    rung; else the next larger divisor of the group that does, at last one program per query head (the loop
    gone, as the multi-head kernel's: the compile matrices found the loop spilling where that kernel does not;
    its fp32 partials are the most memory). Decided once per plan, batch, heads and kernel (``atomic``: the one
    adding dQ by atomics, ``atomic_dq_applies``)."""
    split, group = _group_split(launch, batch, heads, kv_heads, device, head_dim, nbytes), heads // kv_heads
    if split == group or launch.interpret or not on_gpu:
        return split

    def choose() -> int:
        for s in [s for s in range(split, group) if group % s == 0]:
            grid, args, meta, _ = dkdv_call(s)
            if kernel_fit.launches_as_picked(launch.module.attnc_bwd_dkdv, grid, args, meta,
                                             _launch_opts(launch, backward=True)):
                return s
        return group

    return launch.plan.on_device(("group_split_fits", device, batch, heads, kv_heads, split, head_dim, nbytes, atomic),
                                 choose)


def _group_split(launch: Launch, batch: int, heads: int, kv_heads: int, device, head_dim: int, nbytes: int) -> int:
    """How many dK/dV programs share each (KV tile, K/V head) of grouped-query attention, each over its
    share of the query heads (the kernel's ``SPLIT``; fp32 partials summed after): the split the cost model
    predicts fastest on this GPU (``cost.predict``'s ``group_split``), decided once per plan, batch and
    heads. 1 with a K/V head per query head, for a route (its plan is made at every call) and off CUDA."""
    if heads == kv_heads or launch.pattern.route is not None or torch.device(device).type != "cuda":
        return 1

    def make():
        from ....compiler.cost import group_split_may_pay, predict
        from ....compiler.hardware import hardware_for_gpu

        hw = hardware_for_gpu(torch.cuda.get_device_name(device))
        sched = launch.plan.schedule
        if not group_split_may_pay(sched.t_full_count, sched.t_partial_count, heads, kv_heads, batch, hw.sms):
            return 1  # many waves of dK/dV CTAs: no split can pay (and none is priced)
        return predict(launch.plan.schedule, launch.config.backward_config(), hw, head_dim=head_dim, batch=batch,
                       nbytes=nbytes, kv_heads=kv_heads).group_split

    return launch.plan.on_device(("group_split", device, batch, heads, kv_heads, head_dim, nbytes), make)


def _order_args(orders: dict, name: str) -> tuple[list, dict]:
    """The ``ORDER`` argument and the ``ORDERED`` constexpr of one kernel. Without a table ``ORDER`` is
    None, which Triton takes as a constant: the kernel has no such parameter at all (one unused pointer
    more tipped a dQ kernel at ptxas's 128-register target into an 8 B spill on sm_80)."""
    table = orders[name]
    return [table], {"ORDERED": table is not None}


def _runs(launch: Launch, *kinds: str) -> dict:
    """The ``{kind}_RUN`` constexprs of a kernel: its lists each one run of consecutive tiles
    (``TileSchedule.runs``, once per plan). A route's lists, selected per call (on a GPU, on the GPU: asking
    would wait for it), are read by index, so a CPU recording compiles the kernels a GPU runs."""
    if launch.pattern.route is not None:
        return {f"{kind}_RUN": False for kind in kinds}
    runs = launch.plan.on_device(("runs",), launch.plan.schedule.runs)
    return {f"{kind}_RUN": runs[kind] for kind in kinds}


#: A descriptor argument as the runner gives it: (its tensor ``[B, H, rows, d]``, the role of its tiles,
#: 'q' or 'k', the tiles' padded head dim).
BoxSpec = tuple[torch.Tensor, str, int]


def box_of(launch: Launch, role: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(The grid's extents, the box a tile loads as) for ``role`` ('q' or 'k') tiles of ``launch``, as its kernels
    address them (``triton_tiles.box_tile``)."""
    s = launch.shape
    extents, tile = (s.q_extents, s.q_tile) if role == "q" else (s.kv_extents, s.kv_tile)
    return extents, box_tile(extents, tile, layout_of(launch.config) == "permute")


def _descriptors(launch: Launch, tensors: dict[str, BoxSpec]) -> tuple[list, dict]:
    """The tensor-descriptor arguments of a kernel (``KernelConfig.tma``), in order, and its ``DESC``
    constexpr. ``tensors`` maps each descriptor parameter to its ``BoxSpec``. Every parameter is None, a
    constant, and the kernel loads by pointer, where ``tma_applies`` says no."""
    views = _tma_views(launch, tensors)
    return _boxes(launch, tensors, views) if views is not None else ([None] * len(tensors), {"DESC": False})


def _boxes(launch: Launch, tensors: dict[str, BoxSpec], views: list) -> tuple[list, dict]:
    """``_descriptors``'s answer where TMA applies: each tensor's descriptor over its view (``_tma_views``), its box a
    tile."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    descs = []
    for (t, role, cols), (shape, strides) in zip(tensors.values(), views, strict=True):
        box = box_of(launch, role)[1]
        descs.append(TensorDescriptor(t, shape, strides, [1] * (len(shape) - len(box) - 1) + [*box, cols]))
    return descs, {"DESC": True}


def _box_view(launch: Launch, t: torch.Tensor, role: str) -> tuple[list[int], list[int]] | None:
    """The shape and strides of the view of ``t`` (``[B, H, rows, d]``) whose boxes ``role``'s tiles load
    (``triton_tiles.box_coordinates``): ``t`` as it is for runs of rows; ``[B, H, Y, X, d]`` for boxes of a 2-D
    grid; ``[B * H, T, Y, X, d]`` for a 3-D grid, None where batch and head do not merge (a batch stride other
    than H head strides: a descriptor has at most 5 dimensions)."""
    extents, box = box_of(launch, role)
    strides = _tma_strides(t)
    if len(box) == 1:
        return list(t.shape), strides
    B, H, _, d = t.shape
    axes = [strides[2] * math.prod(extents[a + 1:]) for a in range(len(extents))]
    if len(box) == 2:
        return [B, H, *extents, d], [strides[0], strides[1], *axes, strides[3]]
    if H == 1:  # the heads' stride moves nothing
        lead = strides[0]
    elif B == 1 or t.stride(0) == H * t.stride(1):
        lead = strides[1]
    else:
        return None
    return [B * H, *extents, d], [lead, *axes, strides[3]]


def _tma_strides(t: torch.Tensor) -> list[int]:
    """A tensor's strides as its descriptor takes them: a dimension of one element never moves the address, so its
    stride, whatever torch keeps, is given as 16 B."""
    strides = [st if n > 1 else 16 // t.element_size() for n, st in zip(t.shape, t.stride(), strict=True)]
    strides[-1] = t.stride(-1)
    return strides


def tma_applies(launch: Launch, tensors: dict[str, BoxSpec]) -> bool:
    """Whether a kernel loads the ``tensors`` (as ``_descriptors`` takes them) by TMA (``_tma_views``)."""
    return _tma_views(launch, tensors) is not None


def _tma_views(launch: Launch, tensors: dict[str, BoxSpec]) -> list | None:
    """Each tensor's view as its descriptor spans it (``_box_view``), or None where the kernel loads by pointer: the
    config asks for no TMA, the architecture has none (before sm_90; the interpreter loads them too), a tile is not
    one box (``search.tma_fits``), or a tensor is not addressable by TMA: a stride or base off 16 bytes, a feature
    stride other than 1, a padded head dim over ``TMA_BOX``, a 3-D grid's batch and head that do not merge."""
    if not launch.config.tma or not has_tma(_arch(next(iter(tensors.values()))[0].device)):
        return None
    if not tma_fits(launch.config, launch.shape.q_extents, launch.shape.kv_extents):
        return None
    views = []
    for t, role, cols in tensors.values():
        if cols > TMA_BOX or t.stride(-1) != 1 or t.numel() == 0:  # (an empty batch: no box)
            return None
        view = _box_view(launch, t, role)
        size = t.element_size()
        if view is None or t.data_ptr() % 16 or not all(st > 0 and st * size % 16 == 0 for st in view[1][:-1]):
            return None
        views.append(view)
    return views


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
                role: str = "bwd") -> Launch:
        pat = self.pattern
        if bound.q_offset and not bound.is_block:  # queries after a KV cache: their own rows, no padding
            return self._block_launch(self._offset_block(bound, q), q, inputs, route_keys=k)
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
        self.last_source, self.last_plan = source, plan
        if backward_of is None:
            self.last_config = config
        device = q.device
        if plan.call_lists is not None:  # lists made on the device from this call's inputs
            plan = plan.call_lists.call_plan(plan, tensors, batched, device)
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
        smaller = smaller_config(config, square)
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

    def __call__(self, bound: E.Bound, q, k, v, inputs: dict, scale: float):
        launch = self.prepare(bound, q, k, inputs)
        while True:
            names = tuple(launch.tensors)
            try:
                if not needs_grad(q, k, v, *launch.tensors.values()):  # forward only: it may split its KV tiles
                    return forward(launch, q, k, v, float(scale), may_split=True)
                return TritonAttention.apply(launch, float(scale), names, q, k, v, *(launch.tensors[n] for n in names))
            except _out_of_resources():
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
                      route_keys: torch.Tensor | None = None) -> Launch:
        """The launch of a block (planned by ``triton.blocks``): of context parallelism, with the selection
        made across ranks, or of queries after a KV cache (``route_keys``: the keys a route selects
        among, per call)."""
        interpret = q.device.type != "cuda" and not self.native
        config, plan, source, tensors, batched, cls, extra, checks = blocks.prepare(
            self, bound, q, inputs, selection, key_block, route_keys=route_keys)
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
        return forward(self.prepare(bound, q, k, inputs), q, k, v, scale)

    def traced_backward(self, bound: E.Bound, q, k, v, out, lse, dout, dlse, inputs: dict, scale: float,
                        wrt: list[str]):
        """The op's backward: ``(dq, dk, dv, {input: gradient})`` from the backward kernels (on their own
        tiles where the config gives them some, as eager calls run them)."""
        launch = self.prepare(bound, q, k, inputs)
        return backward(launch.backward_launch(), q, k, v, out, lse, dout, dlse, scale, wrt, launch.dq_launch())

    def describe(self) -> str:
        return describe_source(self, self.pattern)


# ----------------------------------------------------------------- launching
def _tokens_order(launch: Launch, role: str) -> torch.Tensor:
    tok = launch.plan.q_tokens if role == "q" else launch.plan.k_tokens
    return tok.index.reshape(-1)


def _to_tiles(launch: Launch, x: torch.Tensor, role: str) -> torch.Tensor:
    """Permute the token dimension (dim 2) into tile order (``permute`` layout only)."""
    if launch.config.layout != "permute":
        return x.contiguous()
    return x[:, :, _tokens_order(launch, role).to(x.device)].contiguous()


def _from_tiles(launch: Launch, x: torch.Tensor, role: str, n: int) -> torch.Tensor:
    if launch.config.layout != "permute":
        return x
    tok = launch.plan.q_tokens if role == "q" else launch.plan.k_tokens
    valid = tok.valid.reshape(-1).to(x.device)
    out = x.new_zeros(*x.shape[:2], n, *x.shape[3:])
    out[:, :, tok.index.reshape(-1).to(x.device)[valid]] = x[:, :, valid]
    return out


def _common_args(launch: Launch, device, decay_c: tuple[torch.Tensor, torch.Tensor] | None) -> list:
    """The arguments shared by the three kernels, in ``codegen``'s order."""
    L, X = launch.lists, launch.extra
    sel = X.get("SEL")
    args = [L["FULL_N"], L["FULL_I"], L["PART_N"], L["PART_I"], L["FULL_I"].shape[-1], L["PART_I"].shape[-1],
            launch.cls[0], launch.cls[1],
            sel if sel is not None else _dummy(device, torch.int8),
            X.get("KEY_BLOCK", _dummy(device, torch.int32)),
            *(sel.stride()[:3] if sel is not None else (0, 0, 0))]
    if decay_c is not None:
        dc, dr = decay_c
        args += [dc, dc.stride(0) if dc.shape[0] > 1 else 0, dc.stride(1), dc.stride(2),
                 dr, dr.stride(0) if dr.shape[0] > 1 else 0, dr.stride(1)]
    else:
        args += [_dummy(device), 0, 0, 0, _dummy(device, torch.int32), 0, 0]
    args.append(X.get("SOFTCAP", _dummy(device)))
    for decl in launch.pattern.inputs:
        t = _device_input(launch, decl, device)
        if decl.name in launch.batched:
            args += [t, t.stride(0), *t.stride()[1:]]
        else:
            args += [t, 0, *t.stride()]
    if launch.checks:
        args.append(launch.extra["ERR"])
    if launch.bound.is_block:  # a block's rows -> absolute positions (runtime.backends.triton.blocks)
        args += [launch.bound.q_offset, launch.bound.k_offset]
    return args


def _device_input(launch: Launch, decl, device) -> torch.Tensor:
    key = f"in:{decl.name}"
    if key not in launch.extra:
        t = launch.tensors[decl.name]
        # a derived input (cluster ids, vertical-slash flags) holds small values: int32 loads (int64 ones
        # spilled vertical-slash's sm_90 d128 dQ on Triton 3.9); a caller's ints may be any int64
        t = (t.to(torch.int32 if decl.derived else torch.int64) if decl.dtype == "int"
             else t.detach().to(torch.float32))
        launch.extra[key] = t.contiguous().to(device)
    return launch.extra[key]


def _decay_cumsum(launch: Launch, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FoX gates as the kernels read them (``reference.fox_prefix``): prefix sums ``[B | 1, H, 2, N]``
    (hi, lo; fp32) and the last reset position ``[B | 1, H, N]`` (int32)."""
    name = launch.pattern.decay
    if name is None:
        return None
    g = launch.tensors[name].detach().to(torch.float32)
    g = g if g.device == torch.device(device) else g.to(device)  # no copy onto its own device (a call to ask for)
    hi, lo, reset = fox_prefix(g if g.dim() == 3 else g.unsqueeze(0))
    return torch.stack((hi, lo), dim=2).contiguous(), reset.to(torch.int32).contiguous()


def _blocks(launch: Launch, D: int, DV: int) -> dict:
    return {"BLOCK_M": launch.shape.block_m, "BLOCK_N": launch.shape.block_n,
            "BLOCK_D": padded_head_dim(D), "BLOCK_DV": padded_head_dim(DV)}


def _dot_mode(launch: Launch, dtype: torch.dtype) -> int:
    """How the kernels multiply (``_dot``): 1 exact fp32 for fp32; 2 widened to fp32 for bf16
    under the interpreter (its bf16 tl.dot is wrong in Triton 3.9); 0 native otherwise."""
    if dtype == torch.float32:
        return 1
    return 2 if launch.interpret and dtype == torch.bfloat16 else 0


def _launch_opts(launch: Launch, backward: bool = False) -> dict:
    """``num_warps``/``num_stages`` of a pass (the config's per-pass launch parameters)."""
    cfg = launch.config
    if backward:
        return {"num_warps": cfg.bwd_warps, "num_stages": cfg.bwd_stages}
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _out_of_resources() -> tuple[type, ...]:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - Triton without the class
        return ()
    return (OutOfResources,)


def _launch_kernel(launch: Launch, kernel, grid, args: list, meta: dict, *, backward: bool) -> None:
    """Launch one kernel with its pass's ``num_warps``/``num_stages``, on a GPU those of the first rung
    of ``kernel_fit``'s ladder that runs without spilling (per kernel: the dQ and dK/dV kernels of one
    pass fit apart). When Triton raises ``OutOfResources`` (shared memory over the block's limit), again
    with fewer pipeline stages (stages hold the streamed tiles' buffers), down to one. Still out of
    resources: re-raised, for the runner to fall back to smaller tiles (``TritonRunner.__call__``)."""
    opts = _launch_opts(launch, backward)
    if "num_warps" in meta:  # a kernel with warps of its own (the backward's row term), not its pass's
        meta = dict(meta)
        opts = {**opts, "num_warps": meta.pop("num_warps")}
    if not launch.interpret and kernel_fit.on_gpu(args):
        opts = kernel_fit.fitted_options(kernel, grid, args, meta, opts)
    while True:
        try:
            run = functools.partial(kernel[grid], *args, **{**meta, **opts})  # the fitted rung may read lists by index
            if meta.get("ONE_LOOP") and not launch.interpret:  # it makes descriptors: global memory at launch
                _with_scratch(run, args[0].device)
            else:
                run()
            return
        except _out_of_resources():
            if opts["num_stages"] <= 1:
                raise
            opts = {**opts, "num_stages": opts["num_stages"] - 1}
            _note_fallback(launch, backward, opts)


def _with_scratch(run: Callable[[], None], device: torch.device) -> None:
    """``run()`` with Triton's allocator giving torch memory on ``device``: a kernel that makes tensor descriptors
    (the forward in one loop) asks it for their global memory at launch. Set in a copy of the context: an
    allocator the caller set stays as it was outside."""
    import triton

    def scratch(size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device=device)

    def with_allocator() -> None:
        triton.set_allocator(scratch)
        run()

    contextvars.copy_context().run(with_allocator)


def _note_fallback(launch: Launch, backward: bool, opts: dict) -> None:
    """Remember a pass's smaller launch parameters in the launch's config (the next launch of this
    config starts there)."""
    key = ("bwd_num_warps", "bwd_num_stages") if backward else ("num_warps", "num_stages")
    launch.config = dataclasses.replace(launch.config, **{key[0]: opts["num_warps"], key[1]: opts["num_stages"]})
    if launch.on_config is not None:
        launch.on_config(launch.config)


def smaller_config(config: KernelConfig, square: bool = False) -> KernelConfig | None:
    """The next smaller tiles after an out-of-resources launch: the KV tile halved on its largest
    (outermost of equals) axis (the Q tile's when the KV tile is down to ``MIN_FALLBACK_TOKENS``; both when ``square``,
    flat tiles of a grid), pipelines reset to two stages; None below the smallest tile ``tl.dot`` takes."""
    # the search's rule: the largest axis, ties the outer one
    from ....compiler.search import halved as halve

    q, kv = config.q_tile, config.kv_tile
    if square:
        if config.q_tokens <= MIN_FALLBACK_TOKENS:
            return None
        q, kv = halve(q), halve(kv)
    elif config.kv_tokens > MIN_FALLBACK_TOKENS:
        kv = halve(kv)
    elif config.q_tokens > MIN_FALLBACK_TOKENS:
        q = halve(q)
        kv = tuple(min(a, b) for a, b in zip(kv, q, strict=True)) if len(kv) == len(q) else kv
    else:
        return None
    return dataclasses.replace(config, q_tile=q, kv_tile=kv, num_stages=min(config.num_stages, 2),
                               bwd_num_stages=min(config.bwd_stages, 2) if config.bwd_num_stages else 0)


def forward(launch: Launch, q, k, v, scale: float, *, may_split: bool = False):
    """(out ``[B, Hq, Nq, Dv]`` in q's dtype, lse ``[B, Hq, Nq]`` fp32). ``may_split``: a forward-only call, whose
    KV tiles may be split over several programs per Q tile (``split_kv``: flash decoding), their partials merged
    by the module's ``attnc_fwd_combine``."""
    B, Hq, Nq, D = q.shape
    Hkv, DV = k.shape[1], v.shape[-1]
    device = q.device
    qp, kp, vp = _to_tiles(launch, q, "q"), _to_tiles(launch, k, "k"), _to_tiles(launch, v, "k")
    rows = qp.shape[2]
    out = torch.empty(B, Hq, rows, DV, dtype=q.dtype, device=device)
    lse = torch.empty(B, Hq, rows, dtype=torch.float32, device=device)
    nq_tiles = launch.plan.schedule.num_q_tiles
    splits = split_kv.choose_splits(launch.plan, B, Hq, _sms(torch.device(device))) if may_split else 1
    decay_c = _decay_cumsum(launch, device)
    order, ordered = _order_args(_orders(launch, B, Hq, Hkv, device), "Q")
    fblocks = _blocks(launch, D, DV)
    kv = {"KD": (kp, "k", fblocks["BLOCK_D"]), "VD": (vp, "k", fblocks["BLOCK_DV"])}
    views = _tma_views(launch, kv)
    by_tma = views is not None
    specialize = _warp_spec(launch, qp, kv, fblocks, by_tma)
    if splits > 1 and specialize.get("ONE_LOOP"):  # a split forward runs the two loops (split_kv)
        specialize = {}
    # a forward in one loop loads by descriptors of its own, not the host's
    descs, desc = _boxes(launch, kv, views) if by_tma and not specialize.get("ONE_LOOP") else ([None, None], {"DESC": False})
    partial = split_kv.partials(splits, B, Hq, rows, DV, device) if splits > 1 else None
    dest, dest_strides = _forward_outputs(out, lse, partial)
    args = [qp, kp, vp, *dest, *qp.stride()[:3], *kp.stride()[:3], *vp.stride()[:3], *dest_strides,
            *_common_args(launch, device, decay_c), *order, *descs, float(scale), Hq // Hkv, D, DV]
    grid, split_meta = ((nq_tiles, B * Hq, splits), {"SPLIT_KV": True}) if partial is not None else ((nq_tiles, B * Hq), {})
    with interpreting(launch.interpret):
        _launch_kernel(launch, launch.module.attnc_fwd, grid, args,
                       dict(**fblocks, DOT=_dot_mode(launch, q.dtype), **ordered,
                            **_runs(launch, "FULL", "PART"), **desc, **_scale_sign(launch, scale),
                            **specialize, **split_meta), backward=False)
        if partial is not None:
            _combine_splits(launch, *partial, out, lse)
    _raise_index_errors(launch)
    return _from_tiles(launch, out, "q", Nq), _from_tiles(launch, lse, "q", Nq)


def _forward_outputs(out: torch.Tensor, lse: torch.Tensor, partial: tuple | None) -> tuple[list, list]:
    """The forward's ``O``, ``LSE`` and their strides (``so_b, so_h, so_n, sl_b, sl_h, so_s, sl_s``): ``out`` and
    ``lse`` themselves, the split strides None (constants to Triton: the kernel without ``SPLIT_KV`` has no such
    parameters, as ``ORDER``); or the split-KV partials ``[splits, B, H, rows (, DV)]`` (``split_kv.partials``)."""
    if partial is None:
        return [out, lse], [*out.stride()[:3], *lse.stride()[:2], None, None]
    po, pl = partial
    return [po, pl], [*po.stride()[1:4], *pl.stride()[1:3], po.stride(0), pl.stride(0)]


def _combine_splits(launch: Launch, po: torch.Tensor, pl: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Merge the split forward's partials into ``out`` and ``lse`` (``attnc_fwd_combine``, by log-sum-exp on the
    device: no host read)."""
    splits, B, H, rows, DV = po.shape
    block_dv = padded_head_dim(DV)
    block_r = split_kv.combine_rows(block_dv, rows)
    _launch_kernel(launch, launch.module.attnc_fwd_combine, (-(-rows // block_r), B * H),
                   [po, pl, out, lse, *po.stride()[:4], *pl.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
                    rows, DV, splits],
                   dict(BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4), backward=False)


def _warp_spec(launch: Launch, qp: torch.Tensor, kv: dict[str, BoxSpec], blocks: dict, by_tma: bool) -> dict:
    """The forward's ``WARP_SPEC`` and ``ONE_LOOP`` (``KernelConfig.warp_specialize``) where its K/V tiles ``kv`` load
    by TMA (``by_tma``, ``tma_applies``: Triton specializes no loop of pointer loads), in the form the architecture takes
    (``warp_specialized_form``): on Blackwell and later the two loops; on Hopper one loop, where Q's tensor ``qp``
    is TMA-addressable too and the tensors hold the rows the kernel's own descriptors span (runs of rows)."""
    if not launch.config.warp_specialize or not by_tma:
        return {}
    form = warp_specialized_form(launch.pattern, compute_capability(_arch(qp.device)))
    if form == "two loops":
        return {"WARP_SPEC": True}
    rows = math.prod(launch.shape.q_extents), math.prod(launch.shape.kv_extents)  # the kernel's descriptors' rows
    if (form == "one loop" and qp.shape[2] == rows[0] and kv["KD"][0].shape[2] == rows[1]
            and boxes_are_rows(launch.shape, layout_of(launch.config))
            and tma_applies(launch, {"Q": (qp, "q", blocks["BLOCK_D"])})):
        return {"WARP_SPEC": True, "ONE_LOOP": True}
    return {}


#: The range of a scale the forward applies in its exponent: ``scale * log2(e)``, the kernel's float32
#: ``scale_l2``, a normal float32 (not 0 after rounding or flushing, not inf; a factor of 2 to spare for the
#: roundings), or a masked slot's ``-inf * scale_l2`` would be NaN rather than -inf.
EXPONENT_SCALES = (2.0**-125 / LOG2E, 2.0**127 / LOG2E)


def _scale_sign(launch: Launch, scale: float) -> dict:
    """The forward's ``POS_SCALE`` where its scores are the scaled q.k alone (``scale_in_exponent``): a positive
    scale (within ``EXPONENT_SCALES``) is applied in the exponent, one FMA a score; any other, to the scores
    first."""
    if not scale_in_exponent(launch.pattern):
        return {}
    return {"POS_SCALE": EXPONENT_SCALES[0] <= scale <= EXPONENT_SCALES[1]}


def _raise_index_errors(launch: Launch) -> None:
    """The error of a bias index the forward kernel found out of range on an attended pair
    (``ERR[slot]`` holds an offending index; 0 is always in range, so 0 means none)."""
    if not launch.checks:
        return
    found = launch.extra["ERR"].cpu()
    for (name, dim, size), value in zip(launch.checks, found.tolist(), strict=True):
        if value != 0:
            raise E.index_error(name, dim, value, size, guarded=True)


def _row_term(launch: Launch, out, lse, dout, dlse) -> tuple[torch.Tensor, torch.Tensor]:
    """``rowsum(dO * O) - dlse`` and the lse in log2 units (+inf where it is -inf: rows without a key), both
    fp32 ``[B, H, N]`` in token order: one kernel reading each once (the eager torch form made two fp32 copies
    of dO and O and a product before the sum)."""
    B, H, N, DV = out.shape
    delta = torch.empty(B, H, N, dtype=torch.float32, device=out.device)
    lse_l2 = torch.empty_like(delta)
    block_dv = padded_head_dim(DV)
    block_r = max(8, min(128, 8192 // block_dv))  # 8K elements of each tile per program
    dl = dlse if dlse is not None else _dummy(out.device)
    dl_strides = dlse.stride() if dlse is not None else (0, 0, 0)
    with interpreting(launch.interpret):
        _launch_kernel(launch, launch.module.attnc_bwd_delta, (-(-N // block_r), B * H),
                       [out, dout, dl, delta, lse, lse_l2, *out.stride(), *dout.stride(), *dl_strides,
                        *delta.stride()[:2], *lse.stride(), N, DV],
                       # 4 warps: at 8, ptxas spills it on sm_100 (48 registers, 32 B; Triton 3.9)
                       dict(HAS_DLSE=dlse is not None, BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4),
                       backward=True)
    return delta, lse_l2


def _backward_inputs(launch: Launch, q, k, v, dout, lse_l2, delta) -> tuple:
    """q, k, v, dO, the lse in log2 units and delta in a launch's token order (``_to_tiles``)."""
    return (_to_tiles(launch, q, "q"), _to_tiles(launch, k, "k"), _to_tiles(launch, v, "k"),
            _to_tiles(launch, dout.to(q.dtype), "q"),
            _to_tiles(launch, lse_l2.unsqueeze(-1), "q").squeeze(-1).contiguous(),
            _to_tiles(launch, delta.unsqueeze(-1), "q").squeeze(-1).contiguous())


def _row_sum_buffers(launch: Launch, row_sums: bool, B: int, Hq: int, Nq: int, Nk: int, device) -> tuple:
    """The FoX gate gradient's row sums ``(dsq, dsk, their batch and head strides)`` (dummies where the gate
    takes no gradient): stored at token positions (``q_tok``, ``k_tok``), so a block's are absolute, over the
    whole gate."""
    if not row_sums:
        return _dummy(device), _dummy(device), (0, 0)
    n_q, n_k = (launch.tensors[launch.pattern.decay].shape[-1],) * 2 if launch.bound.is_block else (Nq, Nk)
    dsq = torch.zeros(B, Hq, n_q, dtype=torch.float32, device=device)
    dsk = torch.zeros(B, Hq, n_k, dtype=torch.float32, device=device)
    return dsq, dsk, (dsq.stride(0), dsq.stride(1))


def _head_args(inputs: tuple) -> list:
    """The backward kernels' leading arguments: q, k, v, dO, lse, delta (in a launch's token order) and the
    strides of the first five."""
    qp, kp, vp, dop, lsep, deltap = inputs
    return [qp, kp, vp, dop, lsep, deltap, *qp.stride()[:3], *kp.stride()[:3], *vp.stride()[:3],
            *dop.stride()[:3], *lsep.stride()[:2]]


def backward(launch: Launch, q, k, v, out, lse, dout, dlse, scale: float, wrt: list[str],
             dq_launch: Launch | None = None):
    """(dq, dk, dv, {input: grad}); deterministic (no atomics) unless the config asks for dQ by atomics
    and the call allows it (``atomic_dq_applies``). ``dq_launch``: the dQ kernel's own launch (its tiles,
    ``KernelConfig.dq_q_tile``); None: ``launch``'s, as the dK/dV kernel."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk, DV = k.shape[1], k.shape[2], v.shape[-1]
    device = q.device
    pat = launch.pattern
    row_sums = pat.decay is not None and pat.decay in wrt
    bias_wrt = [n for n in wrt if pat.bias is not None and n in bias_input_names(pat)]
    # the backward in one kernel: dQ added by the dK/dV kernel's atomics, in fp32 at its tiles' token order
    atomic = atomic_dq_applies(launch.config, row_sums=row_sums, bias_grads=bool(bias_wrt))
    qlaunch = launch if dq_launch is None or atomic else dq_launch
    delta, lse_l2 = _row_term(launch, out, lse, dout, dlse)
    qp, kp, vp, dop, lsep, deltap = _backward_inputs(launch, q, k, v, dout, lse_l2, delta)
    q_side = (qp, kp, vp, dop, lsep, deltap) if qlaunch is launch else _backward_inputs(qlaunch, q, k, v, dout,
                                                                                          lse_l2, delta)
    decay_c = _decay_cumsum(launch, device)
    if atomic:
        dq = torch.zeros(qp.shape, dtype=torch.float32, device=device)
        dqa = [dq, *dq.stride()[:3]]
    else:
        dq = torch.empty_like(q_side[0])
        dqa = [None] * 4  # constants to Triton: the kernel without ATOMIC_DQ has no such parameters (ORDER's way)
    dsq, dsk, sr = _row_sum_buffers(launch, row_sums, B, Hq, Nq, Nk, device)
    tail = [float(scale), Hq // Hkv, D, DV]
    ieee = _dot_mode(launch, q.dtype)
    # the dQ kernel (its own launch where it has tiles of its own); dS for the bias inputs' gradients at its tiles
    qsched, qblocks = qlaunch.plan.schedule, _blocks(qlaunch, D, DV)
    ds_w = qlaunch.lists["FULL_I"].shape[-1] + qlaunch.lists["PART_I"].shape[-1]
    ds_buf = (torch.zeros(B * Hq, qsched.num_q_tiles, ds_w, qblocks["BLOCK_M"], qblocks["BLOCK_N"],
                          dtype=torch.float32, device=device) if bias_wrt else _dummy(device))

    def dq_call() -> tuple:
        """The dQ kernel's (grid, args, meta)."""
        q_order, q_ordered = _order_args(_orders(qlaunch, B, Hq, Hkv, device), "Q")
        # the tiles each kernel streams as descriptor boxes (``KernelConfig.tma``): dQ's Q, dO, K, V; dK/dV's Q, dO
        q_descs, q_desc = _descriptors(qlaunch, {
            "QD": (q_side[0], "q", qblocks["BLOCK_D"]), "KD": (q_side[1], "k", qblocks["BLOCK_D"]),
            "VD": (q_side[2], "k", qblocks["BLOCK_DV"]), "DOD": (q_side[3], "q", qblocks["BLOCK_DV"])})
        args = [*_head_args(q_side), dq, *dq.stride()[:3], dsq, *sr, ds_buf, ds_w,
                *_common_args(qlaunch, device, decay_c), *q_order, *q_descs, *tail]
        meta = dict(**qblocks, DOT=ieee, ROW_SUMS=row_sums, STORE_DS=bool(bias_wrt), **q_ordered,
                    **_runs(qlaunch, "FULL", "PART"), **q_desc)
        return (qsched.num_q_tiles, B * Hq), args, meta

    kblocks = _blocks(launch, D, DV)
    k_descs, k_desc = _descriptors(launch, {"QD": (qp, "q", kblocks["BLOCK_D"]), "DOD": (dop, "q", kblocks["BLOCK_DV"])})
    L = launch.lists

    def dkdv_call(split: int) -> tuple:
        """The dK/dV kernel's (grid, args, meta, outputs) with ``split`` programs per K/V head: its own
        dK and dV, or (more than one) fp32 partials, one per share of the group, at the share's offset."""
        if split == 1:
            outs = (torch.empty_like(kp), torch.empty_like(vp))
            strides = [*outs[0].stride()[:3], 0, *outs[1].stride()[:3], 0]
        else:
            outs = tuple(torch.empty(split, *t.shape, dtype=torch.float32, device=device) for t in (kp, vp))
            strides = [*outs[0].stride()[1:4], outs[0].stride(0), *outs[1].stride()[1:4], outs[1].stride(0)]
        k_order, k_ordered = _order_args(_orders(launch, B, Hq, Hkv, device, split), "K")
        args = [*_head_args((qp, kp, vp, dop, lsep, deltap)), *outs, *strides, dsk, *sr, *dqa, L["T_FULL_N"], L["T_FULL_I"],
                L["T_PART_N"], L["T_PART_I"], L["T_FULL_I"].shape[-1], L["T_PART_I"].shape[-1],
                *_common_args(launch, device, decay_c), *k_order, *k_descs, *tail]
        meta = dict(**kblocks, DOT=ieee, ROW_SUMS=row_sums, QT_VIEW=qt_view(q.device), **k_ordered,
                    **_runs(launch, "T_FULL", "T_PART"), **k_desc, SPLIT=split, SHARE=Hq // Hkv // split,
                    ATOMIC_DQ=atomic)
        return (launch.plan.schedule.num_kv_tiles, B * Hkv * split), args, meta, outs

    split = _fitting_group_split(launch, dkdv_call, B, Hq, Hkv, device, D, q.element_size(), kernel_fit.on_gpu([q]),
                                 atomic)
    with interpreting(launch.interpret):
        if not atomic:  # else the dK/dV kernel adds dQ
            _launch_kernel(qlaunch, qlaunch.module.attnc_bwd_dq, *dq_call(), backward=True)
        grid, args, meta, (dk, dv) = dkdv_call(split)
        _launch_kernel(launch, launch.module.attnc_bwd_dkdv, grid, args, meta, backward=True)
    if atomic:
        dq = dq.to(qp.dtype)
    if split > 1:  # the shares' partials in a fixed order (deterministic), rounded once
        dk, dv = dk.sum(0).to(kp.dtype), dv.sum(0).to(vp.dtype)
    grads: dict[str, torch.Tensor] = {}
    if row_sums:
        dc = dsq - dsk  # d loss / d cumsum(g): + as the query's term, - as the key's
        # reverse cumsum, accumulated in float64 so that its rounding does not grow with n
        dg = torch.flip(torch.cumsum(torch.flip(dc.double(), [-1]), -1), [-1]).to(dc.dtype)
        # a reset gate (-inf) gets exactly 0, the limit (its pairs have weight 0; the sums only cancel)
        dg = dg.masked_fill(torch.isneginf(launch.tensors[pat.decay].to(device)), 0.0)
        grads[pat.decay] = dg if pat.decay in launch.batched else dg.sum(0)
    if bias_wrt:
        for name, grad in _bias_input_grads(qlaunch, ds_buf, bias_wrt, qblocks, B, Hq).items():
            grads[name] = grads[name] + grad.to(device) if name in grads else grad.to(device)
    out_grads = {n: g.to(launch.tensors[n].dtype) for n, g in grads.items()}
    return (_from_tiles(qlaunch, dq, "q", Nq), _from_tiles(launch, dk, "k", Nk), _from_tiles(launch, dv, "k", Nk),
            out_grads)


def atomic_dq_applies(config: KernelConfig, *, row_sums: bool, bias_grads: bool) -> bool:
    """Whether a backward runs in one kernel, dQ added by the dK/dV kernel's atomics (``KernelConfig.atomic_dq``):
    where the config asks for it, unless torch is told to be deterministic (atomics add in no fixed order) or
    the call needs the decay gates' gradient (per-query sums of dS) or a float bias input's (dS per pair),
    which the dQ kernel computes."""
    return config.atomic_dq and not (row_sums or bias_grads or torch.are_deterministic_algorithms_enabled())


def bias_input_names(pat: ir.PatternIR) -> set[str]:
    """The float inputs the bias reads (their gradients take dS per pair: the dQ kernel's)."""
    return {name for f in pat.bias.atoms(sympy.Function) if (name := S.input_name(f.func))
            and pat.input(name).dtype == "float"}


def _block_env(pat: ir.PatternIR, bound: E.Bound, q_tok: torch.Tensor, k_tok: torch.Tensor, h: int) -> dict:
    return E.token_env(pat, bound, q_tok, k_tok, h)


def _bias_input_grads(launch: Launch, ds_buf: torch.Tensor, names: list[str], blocks: dict, B: int, Hq: int) -> dict:
    """Gradients of float inputs of the bias from the kernel's dS per visited pair:
    for each place the bias reads an input, ``grad[index] += dS * d bias / d input``
    (summed on the host with ``index_put_(accumulate=True)``; exact, deterministic)."""
    pat, bound, plan = launch.pattern, launch.bound, launch.plan
    bias = E.substitute(pat.bias, bound)
    sites = sorted((f for f in bias.atoms(sympy.Function) if S.input_name(f.func) in names), key=sympy.default_sort_key)
    derivs = []
    for site in sites:
        u = sympy.Dummy("u", real=True)
        derivs.append((site, derivative(bias.xreplace({site: u}), u).xreplace({u: site})))
    sched = plan.schedule
    BM, BN = blocks["BLOCK_M"], blocks["BLOCK_N"]
    kt_all = torch.cat([launch.lists["FULL_I"].cpu(), launch.lists["PART_I"].cpu()], -1).to(torch.int64)  # [C, nQ, W]

    def padded(tokens, width):
        index = torch.zeros(tokens.index.shape[0], width, dtype=torch.int64)
        valid = torch.zeros(tokens.index.shape[0], width, dtype=torch.bool)
        index[:, :tokens.index.shape[1]] = tokens.index
        valid[:, :tokens.index.shape[1]] = tokens.valid
        return index, valid

    q_idx, q_ok = padded(plan.q_tokens, BM)
    k_idx, k_ok = padded(plan.k_tokens, BN)
    ds_all = ds_buf.detach().cpu().view(B, Hq, sched.num_q_tiles, -1, BM, BN)
    grads = {n: torch.zeros(launch.tensors[n].shape, dtype=torch.float64) for n in names}
    for b in range(B):
        inputs = {n: (t[b] if n in launch.batched else t).detach().cpu() for n, t in launch.tensors.items()}
        for h in range(Hq):
            kt = kt_all[b * launch.cls[0] + h * launch.cls[1]]  # [nQ, W]
            present = kt >= 0
            kts = kt.clamp(min=0)
            q_tok = q_idx[:, None, :, None]  # [nQ, 1, BM, 1]
            k_tok = k_idx[kts][:, :, None, :]  # [nQ, W, 1, BN]
            weight = (present[:, :, None, None] & q_ok[:, None, :, None] & k_ok[kts][:, :, None, :])
            ds = ds_all[b, h].to(torch.float64) * weight
            # indices were checked on attended pairs by the forward; elsewhere dS is 0 and they read element 0
            ev = E.Evaluator(_block_env(pat, bound, q_tok, k_tok, h), inputs, set(), None, guard=torch.tensor(False))
            for site, deriv in derivs:
                name = S.input_name(site.func)
                value = E.as_tensor(ev(deriv), torch.float64)
                contrib = torch.where(ds != 0, ds * value, torch.zeros((), dtype=torch.float64)).reshape(-1)
                target = grads[name][b] if name in launch.batched else grads[name]
                index = []
                for a, size in zip(site.args, target.shape, strict=True):
                    ix = torch.broadcast_to(E.as_tensor(ev(a)), ds.shape).reshape(-1)
                    outside = (ix < 0) | (ix >= size)  # on pairs not attended (dS = 0): read element 0
                    contrib = torch.where(outside, torch.zeros((), dtype=torch.float64), contrib)
                    index.append(torch.where(outside, torch.zeros((), dtype=ix.dtype), ix))
                target.index_put_(tuple(index), contrib, accumulate=True)
    return grads


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
            except _out_of_resources():
                if dq_launch is not None:  # first the dQ kernel on the backward's tiles, then smaller ones
                    dq_launch = None
                    continue
                launch = launch.shrink() if launch.shrink is not None else None
                if launch is None:
                    raise
        return (None, None, None, dq, dk, dv, *(d_in.get(n) for n in ctx.names))


# ----------------------------------------------------------------- what users read
def emit(pattern: ir.PatternIR, *, n: int | None = None, nk: int | None = None, heads: int = 1,
         sizes: dict | None = None, q_tile=None, kv_tile=None, device: str = "cpu") -> str:
    """The kernel source a call at these sizes would run (``attnc emit``): the
    schedule shape only depends on the sizes and tiles, not on the lists."""
    if not isinstance(pattern, ir.PatternIR):
        raise SpecError(f"'{pattern.name}' is a recurrence: no softmax kernel to emit", where="argument pattern")
    bound = E.bind_sizes(pattern, n=n, nk=nk, heads=heads, sizes=sizes)
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
