"""Launch parameters that fit: no kernel is launched spilling registers or over shared memory.

The schedule search sizes tiles with a register model and a shared-memory model; ptxas decides. Where
ptxas's kernel at the picked ``num_warps``/``num_stages`` spills registers to local memory, or asks a
block for more shared memory than the GPU has, the same kernel is tried on the next rung of one ladder
(``rungs``), and the first that fits without local memory is launched:

1. one pipeline stage fewer, down to one: stages hold the streamed tiles' buffers (shared memory) and,
   software-pipelined, the registers of the loads in flight;
2. then the other warp count of 4 and 8 at the picked stages: the register file a thread gets is the
   block's divided by its threads (the recurrences' chunk kernels run one stage already);
3. where the kernel steps through runs of consecutive tiles (a ``*_RUN`` constexpr set), each rung is
   followed by the same with its lists read by index: a run's loop, its loads affine, keeps one tile more in
   flight, and the registers of its loads with it (compiled for sm_100 on Triton 3.6, a window's dQ kernel
   spilled 24 B at 2 and 3 stages with runs, none without).

Warps, stages and runs do not change the answer: the tiles, and so the schedule and the order of every
reduction over keys, stay as picked (only the rounding of reductions across a tile's warps may differ in
the last bit; one machine picks the same rung every time). Where no rung runs without local memory, the
one with the least local memory that fits shared memory is launched; where none fits shared memory,
Triton's ``OutOfResources`` is raised (the softmax runner then plans smaller tiles). A rung below the
picked one that fails to compile is passed over; the picked one's failure is the kernel's.

Two probes answer for a rung: on a GPU, Triton's compiled kernel as its loader sees it (``native_probe``:
``n_spills``, the driver's local-memory size, and ``OutOfResources``); offline, ptxas's stack frame and
spills and the compiled kernel's shared memory against the architecture's limit (``runtime.gpu_check``).
Both walk the ladder with ``choose``, so the offline check reports the rung a GPU launches.

A GPU remembers its choice per kernel, launch parameters, compile-time constants and what Triton
specialises a compiled kernel on (``specialization``), so a call that compiles another kernel walks again.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.errors import SpecError

#: Triton's launch parameters where a launch names none (its CUDA backend's defaults).
TRITON_DEFAULTS = {"num_warps": 4, "num_stages": 3}
#: The warp counts the ladder moves between (16 warps put the dots of sm_100's kernels off tcgen05.mma and
#: spilled more, compiled offline: Triton 3.9).
WARPS = (4, 8)


@dataclass(frozen=True)
class Rung:
    """One pair of launch parameters, and whether the kernel's tile lists are read by index."""

    num_warps: int
    num_stages: int
    #: every ``*_RUN`` constexpr the launch set turned off (``compiler.codegen.triton.kernels.list_tile``)
    indexed: bool = False

    def options(self, meta: dict | None = None) -> dict:
        """The launch's keyword arguments this rung sets: its warps and stages and, ``indexed``, each run flag
        of ``meta`` (the launch's constexprs) False."""
        out = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.indexed:
            out.update({key: False for key, on in (meta or {}).items() if key.endswith("_RUN") and on})
        return out

    def __str__(self) -> str:
        return f"w{self.num_warps} s{self.num_stages}" + (" indexed" if self.indexed else "")


#: CUDA's most programs along a grid's second and third axes (the first takes 2^31 - 1).
MAX_GRID_YZ = 65535


def check_grid(grid, what: tuple[str, str] = ("batch entries x heads", "batch entries x heads")) -> None:
    """Refuses a grid CUDA would not launch, by what makes it so (``what``: what the kernel puts on the grid's
    second and third axes), under the interpreter as on a GPU, before anything runs."""
    if not isinstance(grid, tuple):
        return
    for axis in (1, 2):
        if len(grid) > axis and grid[axis] > MAX_GRID_YZ:
            raise SpecError(f"{grid[axis]:,} {what[axis - 1]} in one launch: CUDA launches at most {MAX_GRID_YZ:,} "
                            "along this axis of the grid; split the batch into calls of fewer entries",
                            where="argument q")


def steps_runs(meta: dict) -> bool:
    """Whether a launch's constexprs step through a tile list as a run (a ``*_RUN`` set)."""
    return any(key.endswith("_RUN") and on for key, on in meta.items())


@dataclass(frozen=True)
class Fit:
    """What a probe found of one rung: shared memory within the block's limit, and the local memory a
    thread uses (spilled registers; 0 runs from registers alone)."""

    fits: bool
    local_bytes: int = 0
    why: str = ""  # what is wrong, in words ("spills 8 B", "shared memory 240.5 KiB > 227 KiB")
    error: BaseException | None = field(default=None, compare=False, repr=False)  # the loader's refusal

    @property
    def clean(self) -> bool:
        return self.fits and not self.local_bytes


def rungs(num_warps: int, num_stages: int, runs: bool = False) -> list[Rung]:
    """The ladder from a kernel's picked launch parameters: stages down to one, then the other warp count of
    ``WARPS`` at the picked stages (``num_warps`` outside ``WARPS``: stages only); with ``runs``, each rung
    followed by the same with its lists read by index."""
    ways = (False, True) if runs else (False,)
    out = [Rung(num_warps, s, indexed) for s in range(max(num_stages, 1), 0, -1) for indexed in ways]
    if num_warps in WARPS:
        out += [Rung(w, num_stages, indexed) for w in WARPS if w != num_warps for indexed in ways]
    return out or [Rung(num_warps, num_stages)]


def choose(ladder: list[Rung], probe: Callable[[Rung], Fit]) -> tuple[Rung | None, list[tuple[Rung, Fit]]]:
    """The first rung of ``ladder`` that ``probe`` finds clean, else the fitting one with the least local
    memory (the earliest of equals), else None; with every rung probed on the way, in order."""
    tried = []
    for rung in ladder:
        fit = probe(rung)
        tried.append((rung, fit))
        if fit.clean:
            return rung, tried
    fitting = [(fit.local_bytes, i) for i, (_, fit) in enumerate(tried) if fit.fits]
    return (tried[min(fitting)[1]][0] if fitting else None), tried


# ----------------------------------------------------------------- on a GPU
#: kernel -> {(its launch parameters, argument specialization, compile-time constants): the rung it launches with}
FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


#: A kernel body whose first instruction is ``trap``: before it only labels, comments, ``.loc`` lines and
#: declarations (``.reg``, ``.shared``, ``.local``, ``.pragma``).
_TRAP_AT_ENTRY = re.compile(r"\.entry\s+\w+\s*\([^)]*\)[^{]*\{(?:\s*(?:\$?[\w.]+:|//[^\n]*|\.loc[^\n]*"
                            r"|\.(?:reg|shared|local|pragma)\b[^\n]*))*\s*trap;")


def traps_at_entry(ptx: str) -> bool:
    """Whether a kernel's PTX begins with ``trap``: compiled, but to an abort on launch. Triton 3.9 lowers a
    sm_100 dK/dV kernel whose accumulators outgrow tensor memory's 512 columns so, with no compile error."""
    return bool(_TRAP_AT_ENTRY.search(ptx))


def native_probe(kernel, grid, args: list, meta: dict, picked: Rung | None = None) -> Callable[[Rung], Fit]:
    """A probe that compiles ``kernel`` for this launch at a rung (Triton's ``warmup``: its cache, no
    launch) and loads it as a launch would: the driver's local-memory size, Triton's ``OutOfResources``.
    A compile failure of the ``picked`` rung propagates (the launch itself would fail); of another, that
    rung does not fit."""
    from triton.runtime.errors import OutOfResources

    def probe(rung: Rung) -> Fit:
        try:
            compiled = kernel.warmup(*args, grid=grid, **{**meta, **rung.options(meta)})
            if hasattr(compiled, "result"):  # an asynchronous compile
                compiled = compiled.result()
        except Exception as err:  # noqa: BLE001 - a lower rung that does not compile is passed over
            if picked is None or rung == picked:
                raise
            return Fit(False, why=f"compile error: {type(err).__name__}")
        if compiled is None:  # a cache hook took the compile over: nothing to load, taken as it is
            return Fit(True)
        if traps_at_entry(getattr(compiled, "asm", {}).get("ptx", "")):  # it would abort the CUDA context
            return Fit(False, why="compiles to a trap at entry", error=OutOfResources(
                "a kernel that does not trap", "none at these tiles", "a limit Triton lowered to a trap at entry"))
        try:
            compiled._init_handles()
        except OutOfResources as err:
            return Fit(False, why=str(err), error=err)
        spilled = 4 * int(getattr(compiled, "n_spills", 0) or 0)  # the driver's local bytes, in 4-byte words
        return Fit(True, spilled, f"local memory {spilled} B" if spilled else "")

    return probe


def leaves(args) -> list:
    """A launch's argument values, each group's (a tuple argument, ``compiler.codegen.triton.signature``) in it."""
    out = []
    for a in args:
        if isinstance(a, tuple):
            out += leaves(a)
        else:
            out.append(a)
    return out


def specialization(args: list) -> tuple:
    """What Triton compiles a kernel apart for, value by value (``JITFunction``'s binder; a group's values as
    parameters of their own): a tensor's dtype and 16-byte alignment, an int's being 1, divisible by 16 or wider
    than 32 bits; with the first tensor's device."""
    out = []
    device = None
    for a in args:
        if isinstance(a, tuple):
            inner_device, inner = specialization(a)
            out.append(inner)
            device = device if device is not None else inner_device
        elif isinstance(a, bool) or a is None or isinstance(a, float):
            out.append(a if a is None or isinstance(a, bool) else float)
        elif isinstance(a, int):
            out.append((a == 1, a % 16 == 0, -(2**31) <= a < 2**31))
        elif hasattr(a, "data_ptr"):
            out.append((a.dtype, a.data_ptr() % 16 == 0))
            device = device if device is not None else a.device
        else:
            out.append(type(a))
    return device, tuple(out)


#: kernel -> the ``FITTED`` keys whose rung is not clean (no rung was: the one with the least local memory)
UNCLEAN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fit_key(args: list, meta: dict, options: dict) -> tuple:
    return options["num_warps"], options["num_stages"], specialization(args), tuple(meta.items())


def fitted_options(kernel, grid, args: list, meta: dict, options: dict) -> dict:
    """The launch parameters ``kernel`` is launched with on a GPU for ``options`` (its pass's), chosen on
    the ladder the first time this kernel meets these options, compile-time constants and argument
    ``specialization`` (``FITTED``), the same dict after. Raises ``OutOfResources`` where no rung fits
    shared memory."""
    return _fitted(kernel, grid, args, meta, options, _fit_key(args, meta, options))


def _stepped_down(num_warps: int, num_stages: int, fitted: dict) -> bool:
    """Whether ``fitted`` (a rung's options) is below the picked warps and stages, or reads its lists by
    index where the picked rung steps through runs."""
    return (num_warps, num_stages) != (fitted["num_warps"], fitted["num_stages"]) or any(
        k.endswith("_RUN") for k in fitted)


def _fitted(kernel, grid, args: list, meta: dict, options: dict, key: tuple) -> dict:
    memo = FITTED.get(kernel)
    if memo is None:
        memo = FITTED[kernel] = {}
    if key not in memo:
        ladder = rungs(options["num_warps"], options["num_stages"], steps_runs(meta))
        rung, tried = choose(ladder, native_probe(kernel, grid, args, meta, picked=ladder[0]))
        if rung is None:  # no rung fits: the loader's refusal of the picked one (or the first it gave)
            raise next((fit.error for _, fit in tried if fit.error is not None), tried[0][1].error)
        memo[key] = rung.options(meta)
        unclean = UNCLEAN.setdefault(kernel, set())  # kept with the entry (a new entry replaces a stale flag)
        if dict(tried)[rung].clean:
            unclean.discard(key)
        else:
            unclean.add(key)
    return memo[key]


def launches_as_picked(kernel, grid, args: list, meta: dict, options: dict) -> bool:
    """Whether ``kernel`` launches on a GPU at the rung its pass picked (``options``), neither spilling nor
    over shared memory: ``fitted_options`` did not step down the ladder and found that rung clean. False
    where no rung fits shared memory."""
    from triton.runtime.errors import OutOfResources

    key = _fit_key(args, meta, options)
    try:
        fitted = _fitted(kernel, grid, args, meta, options, key)
    except OutOfResources:
        return False
    return not _stepped_down(options["num_warps"], options["num_stages"], fitted) and key not in UNCLEAN.get(
        kernel, set())


def lowered() -> list[str]:
    """The kernels launched on a GPU below the rung their launch picked, in words (``attnc_bwd_dkdv: w8 s2 ->
    w8 s1``, ``attnc_bwd_dq: w8 s3 -> w8 s3 indexed``), each pair once: what the fit ladder changed in this
    process."""
    out = []
    for kernel, memo in list(FITTED.items()):
        name = getattr(getattr(kernel, "fn", kernel), "__name__", str(kernel))
        for (w, s, *_), opts in memo.items():
            if _stepped_down(w, s, opts):
                indexed = any(key.endswith("_RUN") for key in opts)
                out.append(f"{name}: w{w} s{s} -> {Rung(opts['num_warps'], opts['num_stages'], indexed)}")
    return sorted(set(out))


def on_gpu(args: list) -> bool:
    """Whether a launch's tensors live on a GPU (its kernel compiles and loads there)."""
    return next((a.device.type == "cuda" for a in leaves(args) if hasattr(a, "device")), False)


__all__ = ["FITTED", "TRITON_DEFAULTS", "UNCLEAN", "WARPS", "Fit", "Rung", "choose", "fitted_options", "launches_as_picked",
           "leaves", "lowered", "native_probe", "on_gpu", "rungs",
           "specialization", "steps_runs", "traps_at_entry"]
