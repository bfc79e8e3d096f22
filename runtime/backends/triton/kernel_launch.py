"""One call's launch state (``Launch``) and what every kernel launch of the Triton backend shares: the
arguments the generated kernels have in common, their launch orders and group splits, the token order of a
``permute`` layout, and ``launch_kernel`` with its fallbacks to fewer pipeline stages.

Tests and the offline GPU check replace ``CPU_SMS``, ``CPU_ARCH``, ``launch_kernel`` and ``runs_meta`` on this
module: the forward and backward passes call them through it."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.triton.run_values import run_values
from ....compiler.codegen.triton.source import ScheduleShape
from ....compiler.cost.launch_order import choose_order, ordered_arch
from ....compiler.cost.model import KernelConfig
from ....compiler.cost.search import padded_head_dim
from ....core import ir
from ... import kernel_fit
from ...numerics import fox_prefix
from ...plan import tile_plan

#: The smallest tile (tokens) an out-of-resources fallback goes down to (``tl.dot`` takes 16).
MIN_FALLBACK_TOKENS = 16


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
    #: inputs the kernels do not read, not bound (a paged call's route scores them before the launch)
    unread: frozenset = frozenset()

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


def dummy(device, dtype=torch.float32) -> torch.Tensor:
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


def sms_of(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SMS


def arch_of(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm{major}{minor}"
    return CPU_ARCH


def launch_orders(launch: Launch, batch: int, heads: int, kv_heads: int, device, group_split: int = 1) -> dict:
    """The launch orders of a launch's kernels (``compiler.cost.launch_order``): ``"Q"`` for the forward and dQ
    kernels (per list class), ``"K"`` for the dK/dV kernel (one list class only; ``group_split`` programs per
    K/V head, ``_group_split``); None keeps tile order. Decided once per plan, batch and heads (the rounds of
    the launch), as the simulator decides (a routed plan is made at every call, and so is its decision)."""
    sched = launch.plan.schedule

    def make():
        if not ordered_arch(arch_of(torch.device(device))):  # before Hopper: tile order (launch_order)
            return {"Q": None, "K": None}
        sms = sms_of(torch.device(device))
        classes = sched.heads_stored
        per_class = batch * heads // classes if (batch * heads) % classes == 0 else 1
        q = choose_order(sched.full_count, sched.partial_count, per_class, sms)
        k = (choose_order(sched.t_full_count, sched.t_partial_count, batch * kv_heads * group_split, sms)
             if classes == 1 else None)
        return {name: None if o is None else o.to(torch.int32).contiguous().to(device)
                for name, o in (("Q", q), ("K", k))}

    return launch.plan.on_device(("order", device, batch, heads, kv_heads, group_split), make)


def fitting_group_split(launch: Launch, dkdv_call: Callable[[int], tuple], batch: int, heads: int, kv_heads: int,
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
        from ....compiler.cost.hardware import hardware_for_gpu
        from ....compiler.cost.model import group_split_may_pay, predict

        hw = hardware_for_gpu(torch.cuda.get_device_name(device))
        sched = launch.plan.schedule
        if not group_split_may_pay(sched.t_full_count, sched.t_partial_count, heads, kv_heads, batch, hw.sms):
            return 1  # many waves of dK/dV CTAs: no split can pay (and none is priced)
        return predict(launch.plan.schedule, launch.config.backward_config(), hw, head_dim=head_dim, batch=batch,
                       nbytes=nbytes, kv_heads=kv_heads).group_split

    return launch.plan.on_device(("group_split", device, batch, heads, kv_heads, head_dim, nbytes), make)


def order_arg(orders: dict, name: str) -> tuple[torch.Tensor | None, dict]:
    """The ``ORDER`` argument and the ``ORDERED`` constexpr of one kernel. Without a table ``ORDER`` is
    None, which Triton takes as a constant: the kernel has no such parameter at all (one unused pointer
    more tipped a dQ kernel at ptxas's 128-register target into an 8 B spill on sm_80)."""
    table = orders[name]
    return table, {"ORDERED": table is not None}


def runs_meta(launch: Launch, *kinds: str) -> dict:
    """The ``{kind}_RUN`` constexprs of a kernel: its lists each one run of consecutive tiles
    (``TileSchedule.runs``, once per plan). A route's lists, selected per call (on a GPU, on the GPU: asking
    would wait for it), are read by index, so a CPU recording compiles the kernels a GPU runs."""
    if launch.pattern.route is not None:
        return {f"{kind}_RUN": False for kind in kinds}
    runs = launch.plan.on_device(("runs",), launch.plan.schedule.runs)
    return {f"{kind}_RUN": runs[kind] for kind in kinds}


# ----------------------------------------------------------------- launching
def _tokens_order(launch: Launch, role: str) -> torch.Tensor:
    tok = launch.plan.q_tokens if role == "q" else launch.plan.k_tokens
    return tok.index.reshape(-1)


def to_tiles(launch: Launch, x: torch.Tensor, role: str) -> torch.Tensor:
    """Permute the token dimension (dim 2) into tile order (``permute`` layout only). Otherwise ``x`` as it is
    where its features are contiguous: the kernels take the other three strides, so a KV cache's first ``nk``
    keys (a slice of a longer buffer) are read in place, not copied every decode step."""
    if launch.config.layout != "permute":
        return x if x.stride(-1) == 1 else x.contiguous()
    return x[:, :, _tokens_order(launch, role).to(x.device)].contiguous()


def from_tiles(launch: Launch, x: torch.Tensor, role: str, n: int) -> torch.Tensor:
    if launch.config.layout != "permute":
        return x
    tok = launch.plan.q_tokens if role == "q" else launch.plan.k_tokens
    valid = tok.valid.reshape(-1).to(x.device)
    out = x.new_zeros(*x.shape[:2], n, *x.shape[3:])
    out[:, :, tok.index.reshape(-1).to(x.device)[valid]] = x[:, :, valid]
    return out


#: Launch options a launch's meta may carry beside a kernel's constexprs.
LAUNCH_OPTIONS = ("num_warps", "num_stages")


#: kernel -> its run-time parameters in order and the names of its constexprs (read once from its ``def``)
_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parameters(kernel) -> tuple[tuple[str, ...], frozenset]:
    made = _PARAMETERS.get(kernel)
    if made is None:
        fn = kernel.fn
        while not inspect.isfunction(fn):  # a wrapper of a kernel (a test's, a tool's): the function it runs
            fn = fn.__func__ if inspect.ismethod(fn) else fn.fn
        runtime, constant = [], set()
        for p in inspect.signature(fn).parameters.values():
            if p.annotation is not inspect.Parameter.empty and "constexpr" in str(p.annotation):
                constant.add(p.name)
            else:
                runtime.append(p.name)
        made = _PARAMETERS[kernel] = (tuple(runtime), frozenset(constant))
    return made


def bound_args(kernel, named: dict, meta: dict) -> tuple[list, dict]:
    """A launch's arguments in ``kernel``'s parameter order, each taken by its name from ``named`` (a group as its
    tuple, ``compiler.codegen.triton.signature``), and the constexprs of ``meta`` it declares (with the launch
    options). A generated kernel takes only what its body reads: ``named`` and ``meta`` may hold more."""
    runtime, constant = _parameters(kernel)
    missing = [name for name in runtime if name not in named]
    if missing:
        raise RuntimeError(f"internal error: {kernel.fn.__name__} takes {missing}, which its launch does not name")
    return ([named[name] for name in runtime],
            {k: v for k, v in meta.items() if k in constant or k in LAUNCH_OPTIONS})


@functools.lru_cache(maxsize=64)
def head_table(values: tuple[int, ...], device) -> torch.Tensor:
    """A per-head run-time parameter's values as the kernels read them (``tl.load(p_NAME + h)``): int32 on
    ``device``, made once and kept (a captured CUDA graph replays the same table)."""
    return torch.tensor(values, dtype=torch.int32, device=device)


def common_args(launch: Launch, device, decay_c: tuple[torch.Tensor, torch.Tensor] | None, *,
                row_sizes: bool = True) -> dict:
    """The arguments the three kernels share, by their parameters' names (``kernels.KernelBodies._common_params``).
    ``row_sizes=False``: a block's tile counts without its offsets and rows (``attnc_fwd_paged`` reads each row's
    on the device)."""
    L, X = launch.lists, launch.extra
    sel = X.get("SEL")
    named = {
        "FULL": list_group(L, "FULL"),
        "PART": list_group(L, "PART"),
        "CLS": tuple(launch.cls),
        "SEL": (sel, *sel.stride()[:3]) if sel is not None else (dummy(device, torch.int8), 0, 0, 0),
        "KEY_BLOCK": X.get("KEY_BLOCK", dummy(device, torch.int32)),
        "SOFTCAP": X.get("SOFTCAP", dummy(device)),
    }
    if decay_c is not None:
        dc, dr = decay_c
        named["DECAY"] = (dc, dc.stride(0) if dc.shape[0] > 1 else 0, dc.stride(1), dc.stride(2),
                          dr, dr.stride(0) if dr.shape[0] > 1 else 0, dr.stride(1))
    else:
        named["DECAY"] = (dummy(device), 0, 0, 0, dummy(device, torch.int32), 0, 0)
    for i, decl in enumerate(launch.pattern.inputs):
        if decl.name in launch.unread:
            continue
        t = _device_input(launch, decl, device)
        named[f"IN{i}"] = (t, t.stride(0), *t.stride()[1:]) if decl.name in launch.batched else (t, 0, *t.stride())
        if launch.bound.is_block:  # a block's inputs: their extents at run time (InputSlot.runtime_extents)
            for j, n in enumerate(t.shape[1:] if decl.name in launch.batched else t.shape):
                named[f"in{i}_n{j}"] = n
    # the mask's parameters read at run time (p_window, ...; one value per head: a table on the device)
    named.update({name: head_table(v, device) if isinstance(v, tuple) else v
                  for name, v in run_values(launch.pattern).items()})
    if launch.checks:
        named["ERR"] = launch.extra["ERR"]
    if launch.bound.is_block:  # a block's offsets (rows -> absolute positions), rows and tile counts
        s = launch.shape  # (compiler.codegen.triton.params.BLOCK_PARAMS: one module serves every block)
        q_rows, k_rows = math.prod(s.q_extents), math.prod(s.kv_extents)
        if row_sizes:
            named.update(Q_OFF=launch.bound.q_offset, K_OFF=launch.bound.k_offset, Q_EXT=q_rows, K_EXT=k_rows)
        named.update(TILES_Q=-(-q_rows // math.prod(s.q_tile)), TILES_K=-(-k_rows // math.prod(s.kv_tile)))
    return named


def list_group(lists: dict, kind: str) -> tuple:
    """A tile list as its kernel parameter takes it (``params.tile_list``): its counts, entries and row width."""
    return lists[f"{kind}_N"], lists[f"{kind}_I"], lists[f"{kind}_I"].shape[-1]


def streamed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    """The ``Q``, ``K`` and ``V`` groups of a launch: each tensor with its batch, head and row strides."""
    return {"Q": (q, *q.stride()[:3]), "K": (k, *k.stride()[:3]), "V": (v, *v.stride()[:3])}


def sizes(scale: float, group: int, D: int, DV: int) -> dict:
    """The scale, and the query heads per K/V head with the head dims (``HEADS``), as every attention kernel takes
    them."""
    return {"scale": float(scale), "HEADS": (group, D, DV)}


def _device_input(launch: Launch, decl, device) -> torch.Tensor:
    key = f"in:{decl.name}"
    if key not in launch.extra:
        t = launch.tensors[decl.name]
        # a derived input (cluster ids, vertical-slash flags) holds small values: int32 loads (int64 ones
        # spilled vertical-slash's sm_90 d128 dQ on Triton 3.9); a caller's ints may be any int64
        t = (t.to(torch.int32 if decl.derived else torch.int64) if decl.dtype == "int"
             else t.detach().to(torch.float32))
        t = t.contiguous()
        launch.extra[key] = t if t.device == torch.device(device) else t.to(device)
    return launch.extra[key]


def decay_cumsum(launch: Launch, device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FoX gates as the kernels read them (``reference.fox_prefix``): prefix sums ``[B | 1, H, 2, N]``
    (hi, lo; fp32) and the last reset position ``[B | 1, H, N]`` (int32)."""
    name = launch.pattern.decay
    if name is None:
        return None
    g = launch.tensors[name].detach().to(torch.float32)
    g = g if g.device == torch.device(device) else g.to(device)  # no copy onto its own device (a call to ask for)
    hi, lo, reset = fox_prefix(g if g.dim() == 3 else g.unsqueeze(0))
    return torch.stack((hi, lo), dim=2).contiguous(), reset.to(torch.int32).contiguous()


def block_sizes(launch: Launch, D: int, DV: int) -> dict:
    return {"BLOCK_M": launch.shape.block_m, "BLOCK_N": launch.shape.block_n,
            "BLOCK_D": padded_head_dim(D), "BLOCK_DV": padded_head_dim(DV)}


def dot_mode(launch: Launch, dtype: torch.dtype) -> int:
    """How the kernels multiply (``_dot``): ``dot_mode_of`` the launch's mode."""
    return dot_mode_of(launch.interpret, dtype)


def dot_mode_of(interpret: bool, dtype: torch.dtype) -> int:
    """How a kernel multiplies operands of ``dtype`` (``_dot``): 1 exact fp32 for fp32; 2 widened to fp32 for bf16
    under the interpreter (its bf16 tl.dot is wrong in Triton 3.9); 0 native otherwise."""
    if dtype == torch.float32:
        return 1
    return 2 if interpret and dtype == torch.bfloat16 else 0


def _launch_opts(launch: Launch, backward: bool = False) -> dict:
    """``num_warps``/``num_stages`` of a pass (the config's per-pass launch parameters)."""
    cfg = launch.config
    if backward:
        return {"num_warps": cfg.bwd_warps, "num_stages": cfg.bwd_stages}
    return {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def out_of_resources() -> tuple[type, ...]:
    try:
        from triton.runtime.errors import OutOfResources
    except ImportError:  # pragma: no cover - Triton without the class
        return ()
    return (OutOfResources,)


def launch_kernel(launch: Launch, kernel, grid, args: list, meta: dict, *, backward: bool) -> None:
    """Launch one kernel with its pass's ``num_warps``/``num_stages``, on a GPU those of the first rung
    of ``kernel_fit``'s ladder that runs without spilling (per kernel: the dQ and dK/dV kernels of one
    pass fit apart). When Triton raises ``OutOfResources`` (shared memory over the block's limit), again
    with fewer pipeline stages (stages hold the streamed tiles' buffers), down to one. Still out of
    resources: re-raised, for the runner to fall back to smaller tiles (``TritonRunner.__call__``)."""
    parts = grid_parts(kernel, grid)
    if len(parts) > 1:  # past CUDA's limit on the second axis: one launch per part, each from its offset
        for part, y0 in parts:
            launch_kernel(launch, kernel, part, args, {**meta, "GRID_Y0": y0}, backward=backward)
        return
    kernel_fit.check_grid(grid, ("batch entries x heads", "split-KV parts"))
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
                _with_scratch(run, next(a.device for a in kernel_fit.leaves(args) if isinstance(a, torch.Tensor)))
            else:
                run()
            return
        except out_of_resources():
            if opts["num_stages"] <= 1:
                raise
            opts = {**opts, "num_stages": opts["num_stages"] - 1}
            _note_fallback(launch, backward, opts)


def grid_parts(kernel, grid) -> list[tuple[tuple, int]]:
    """``grid`` as the launches that run it: itself, or, where its second axis holds more than CUDA launches
    (``kernel_fit.MAX_GRID_YZ``) and ``kernel`` reads its offset there (``GRID_Y0``), parts of at most that many
    programs, each with its first program's place. A part's offset is a compile-time constant: the usual launch of
    one part compiles as before, and a batch past the limit compiles one kernel per part, once."""
    limit = kernel_fit.MAX_GRID_YZ
    if not isinstance(grid, tuple) or len(grid) < 2 or grid[1] <= limit or "GRID_Y0" not in _parameters(kernel)[1]:
        return [(grid, 0)]
    return [((grid[0], min(limit, grid[1] - y0), *grid[2:]), y0) for y0 in range(0, grid[1], limit)]


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
    from ....compiler.cost.search import halved as halve

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
