"""Autotuning: time the simulator's best schedules on the GPU, keep the winner.

Candidates (``trials``) are the ``top`` distinct schedules of ``ScheduleSearch`` (tile
shapes and token layout, the simulator's ranking) crossed with the launch
parameters of each pass (forward, backward: ``num_warps`` x ``num_stages``;
configurations whose shared memory or registers do not fit a pass are dropped).
Each candidate's kernels are generated, loaded and timed over a training step,
forward and backward (``triton.testing.do_bench``, median); a
candidate that fails to compile or run is skipped, and so is one whose step
(output, lse, dq, dk, dv) holds a NaN or differs from the first candidate's (the
simulator's pick, where it runs) by more than its dtype's tolerance
(``ANSWER_TOLERANCE``): a variant that a compiler gets wrong on some GPU is
never timed, cached or run. The pick itself is the reference: the GPU
conformance run (``benchmarks/gpu_conformance.py``) checks it against float64. The fastest wins, ties
going to the simulator's favourite, and is stored in the ``KernelCache``
with its source; the next call with the same key (same IR, shape bucket,
dtype, GPU, Triton and attnc versions) reuses it without timing anything.

Grouped-query attention (``kv_heads`` K/V heads shared by the query heads) is
ranked, timed and keyed as it runs: the search weighs the dK/dV kernel's CTAs
by K/V head, the candidates run on k and v of ``kv_heads`` heads (the
backward's split of a group over programs included), and the bucket keys the
group size.

The pieces that touch a GPU are behind two small interfaces so that the
selection logic runs anywhere: a ``KernelBuilder`` (candidate -> source ->
loaded kernels -> a zero-argument callable that runs them) and a timer
(callable -> milliseconds). Without CUDA, tuning is refused with a clean
``AutotuneError`` unless a timer is injected (tests do so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ...compiler.analysis import evaluate as E
from ...compiler.analysis.schedule import TileSchedule
from ...compiler.cost.hardware import get_hardware, hardware_for_gpu
from ...compiler.cost.model import KernelConfig, checked_kv_heads
from ...compiler.cost.search import ScheduleSearch
from ...core import ir
from ...core.errors import SpecError
from ..numerics import timing_inputs
from . import kernel_cache as KC
from .trials import (  # re-exported: the tuner's callers and tests read the trials from here
    BLACKWELL_WS_WARPS,
    HOPPER_WS_Q_TOKENS,
    HOPPER_WS_WARPS,
    LAUNCH,
    TOP,
    Trial,
    atomic_dq_backward,
    candidates,
    for_device,
    warp_specialized_forward,
    wide_kv_backward,
    without_tma,
)

#: Largest difference (``step_difference``) of a candidate's training step from the first candidate's before it
#: is refused, per dtype: two correct bf16 kernels differ by about 1e-3 (their blocks round differently); the GPU
#: suite's bf16 bar against float32 is 2e-2. float32: attnc's kernels take exact dots, FlexAttention's follow
#: torch's float32 matmul precision (TF32 under ``set_float32_matmul_precision("high")``: about 1e-3).
ANSWER_TOLERANCE = {"bf16": 2e-2, "fp16": 1e-2, "fp32": 5e-3}
DTYPES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4}
CANONICAL_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}

Timer = Callable[[Callable[[], object]], float]


class AutotuneError(SpecError):
    """Tuning cannot run here or every candidate failed; rendered as one clean line."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message, where="autotune", hint=hint)


# ----------------------------------------------------------------- interfaces
class KernelBuilder(Protocol):
    """Turns a candidate into runnable kernels: what a backend provides to the tuner."""

    name = "abstract"

    def source(self, pat: ir.PatternIR, bound: E.Bound, schedule: TileSchedule, config: KernelConfig) -> str: ...

    def load(self, path: Path): ...

    def runner(self, kernels, pat: ir.PatternIR, bound: E.Bound, schedule: TileSchedule, config: KernelConfig, *,
               head_dim: int, dtype: str, batch: int, device, inputs: dict | None,
               kv_heads: int | None = None) -> Callable[[], object]: ...


class TritonBuilder(KernelBuilder):
    """The generated Triton kernels (``compiler.codegen.triton.source`` + ``runtime.backends.triton``).

    ``runner`` times a training step's kernels, forward then backward (dQ, dK/dV, each
    with its pass's launch parameters), on random q, k, v of the tuned shape: through the backend's
    ``benchmark_runner`` when it has one, else a ``TritonRunner`` pinned to the
    candidate's config; k and v have ``kv_heads`` heads (None: one per query head). ``interpret`` loads the kernels for Triton's interpreter
    (CPU tensors; tests)."""

    name = "triton"

    def __init__(self, interpret: bool | None = None):
        try:
            from ...compiler.codegen.triton import source as codegen
        except ImportError as err:
            raise AutotuneError(f"the Triton code generator is not available ({err})") from None
        self.codegen, self.interpret = codegen, interpret

    @property
    def backend(self):
        try:
            from ..backends.triton import runner as triton_backend
        except ImportError as err:
            raise AutotuneError(f"the Triton backend is not available ({err})") from None
        return triton_backend

    def source(self, pat, bound, schedule, config):
        shape = getattr(self.codegen, "ScheduleShape", None)
        return self.codegen.generate_source(pat, bound, shape.of(schedule) if shape else schedule, config)

    def load(self, path):
        interpret = self.interpret if self.interpret is not None else not cuda_available()
        return self.backend.load_kernels(str(path), interpret=interpret)

    def runner(self, kernels, pat, bound, schedule, config, *, head_dim, dtype, batch, device, inputs,
               kv_heads=None):
        backend = self.backend
        make = getattr(backend, "benchmark_runner", None)
        if make is not None:
            return make(kernels, pat, bound, schedule, config, head_dim=head_dim, dtype=dtype, batch=batch,
                        device=device, inputs=inputs, kv_heads=kv_heads)
        q, k, v, dout = timing_inputs(bound, head_dim=head_dim, dtype=dtype, batch=batch, device=device,
                                     kv_heads=kv_heads)

        class Pinned(backend.TritonRunner):
            def _config(self, *_args):
                return config

        launch = Pinned(pat).prepare(bound, q, k, dict(inputs or {}))
        # the backward on its own tiles and the dQ kernel on its own, where the config gives them some, as a
        # call's backward runs them (planned once, before the timing)
        bwd_launch, dq_launch = launch.backward_launch(), launch.dq_launch()
        scale = head_dim ** -0.5

        def step():  # a training step's kernels: forward, then backward (dQ, dK/dV); (out, lse, dq, dk, dv)
            out, lse = backend.forward(launch, q, k, v, scale)
            return (out, lse, *backend.backward(bwd_launch, q, k, v, out, lse, dout, None, scale, [], dq_launch)[:3])

        return step


def do_bench_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench``."""
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except TypeError:  # an old do_bench without return_mode
        return float(do_bench(fn, warmup=25, rep=100))


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------- progress
class Progress:
    """A one-line text progress bar on ``stream`` (stderr); silent unless enabled
    (default: when the stream is a terminal)."""

    def __init__(self, total: int, label: str = "tuning", *, stream=None, enabled: bool | None = None,
                 width: int = 24):
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            try:
                enabled = bool(isatty()) if isatty else False
            except (OSError, ValueError):
                enabled = False
        self.enabled, self.total, self.label, self.width = enabled, max(total, 0), label, width
        self.done, self._last = 0, 0

    def update(self, note: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        self.draw(note)

    def draw(self, note: str = "") -> None:
        if not self.enabled:
            return
        filled = self.width * self.done // self.total if self.total else self.width
        line = f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
        if note:
            line += f" {note}"
        pad = max(0, self._last - len(line))
        self._last = len(line)
        with contextlib.suppress(OSError, ValueError):
            self.stream.write("\r" + line + " " * pad)
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._last:
            with contextlib.suppress(OSError, ValueError):
                self.stream.write("\n")
                self.stream.flush()
            self._last = 0


# ----------------------------------------------------------------- results
@dataclass
class TuneResult:
    """The configuration to run, its kernel source, and where it came from."""

    key: KC.CacheKey
    config: KernelConfig
    source: str
    source_path: Path
    from_cache: bool
    trials: list[Trial] = field(default_factory=list)
    cached_trials: list[dict] = field(default_factory=list)
    #: the fastest candidate's backend: "triton", or "flex" when the Flex lowering beat every Triton
    #: candidate (``config`` and ``source`` stay the best Triton kernel's)
    winner: str = "triton"
    #: the rank of the best Triton trial (the cached kernel), None from the cache
    best_rank: int | None = None

    @property
    def best_ms(self) -> float | None:
        ok = [t.measured_ms for t in self.trials if t.error is None]
        return min(ok) if ok else None


def config_from_dict(d: dict) -> KernelConfig:
    """A cached config (``kernel_cache.validate_config`` checked the forward's fields; the backward's
    are optional: entries written before per-pass configs lack them, and 0 means the forward's)."""
    def opt(name: str, ok) -> int:
        v = d.get(name, 0)
        return v if isinstance(v, int) and not isinstance(v, bool) and ok(v) else 0

    def tile(name: str, like: tuple) -> tuple[int, ...]:
        v = d.get(name)
        ok = (isinstance(v, list) and len(v) == len(like)
              and all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in v))
        return tuple(v) if ok else ()

    q_tile, kv_tile = tuple(d["q_tile"]), tuple(d["kv_tile"])
    return KernelConfig(q_tile, kv_tile, d["layout"], d["num_warps"], d["num_stages"],
                        opt("bwd_num_warps", lambda w: 0 < w <= 32 and not w & (w - 1)),
                        opt("bwd_num_stages", lambda st: 0 < st <= 16),
                        tile("bwd_q_tile", q_tile), tile("bwd_kv_tile", kv_tile),
                        tile("dq_q_tile", q_tile), tile("dq_kv_tile", kv_tile), tma=d.get("tma") is True,
                        atomic_dq=d.get("atomic_dq") is True, warp_specialize=d.get("warp_specialize") is True)


def config_dict(cfg: KernelConfig) -> dict:
    return {"q_tile": list(cfg.q_tile), "kv_tile": list(cfg.kv_tile), "layout": cfg.layout,
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "bwd_num_warps": cfg.bwd_warps,
            "bwd_num_stages": cfg.bwd_stages,
            **({"bwd_q_tile": list(cfg.backward_config().q_tile), "bwd_kv_tile": list(cfg.backward_config().kv_tile)}
               if cfg.own_backward_tiles else {}),
            **({"dq_q_tile": list(cfg.dq_config().q_tile), "dq_kv_tile": list(cfg.dq_config().kv_tile)}
               if cfg.own_dq_tiles else {}),
            **({"tma": True} if cfg.tma else {}), **({"atomic_dq": True} if cfg.atomic_dq else {}),
            **({"warp_specialize": True} if cfg.warp_specialize else {})}


def canonical_dtype(dtype) -> str:
    import torch

    if isinstance(dtype, torch.dtype):
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))
    key = str(dtype).lower()
    if key not in DTYPES:
        raise SpecError(f"unsupported dtype {dtype!r}", where="argument dtype", hint="bf16, fp16 or fp32")
    return CANONICAL_DTYPE.get(key, key)


#: The simulator's model of a GPU by its device name (``compiler.cost.hardware.hardware_for_gpu``).
hardware_for = hardware_for_gpu




# ----------------------------------------------------------------- the tuner
def autotune(
    pattern: ir.PatternIR,
    bound: E.Bound,
    *,
    head_dim: int = 128,
    dtype="bf16",
    batch: int = 1,
    device=None,
    inputs: dict | None = None,
    top: int = TOP,
    launch: Sequence[tuple[int, int]] | None = None,
    builder: KernelBuilder | None = None,
    timer: Timer | None = None,
    cache: KC.KernelCache | None = None,
    hardware=None,
    retune: bool = False,
    progress: bool | None = None,
    stream=None,
    flex_builder: KernelBuilder | None = None,
    flex: bool | None = None,
    kv_heads: int | None = None,
) -> TuneResult:
    """The tuned configuration and kernel source of ``pattern`` at ``bound``: from the
    cache when a valid entry exists (unless ``retune``), else by timing candidates and
    storing the winner. ``progress``: None = a bar when ``stream`` (stderr) is a TTY.
    ``flex``: time the FlexAttention lowering too (``flex_builder``, default
    ``flex_backend.FlexBuilder``), like the others; None: on CUDA devices. ``TuneResult.winner``
    and the cache entry's ``meta["winner"]`` say which candidate won. ``kv_heads``: the K/V heads the
    query heads share (grouped-query attention; None: one per head), ranked, timed and keyed so."""
    import torch

    _check_tuning_arguments(pattern, head_dim=head_dim, batch=batch, top=top)
    checked_kv_heads(bound.heads, kv_heads)  # with the other arguments, before the device
    dtype = canonical_dtype(dtype)
    dev = torch.device(device if device is not None else ("cuda" if cuda_available() else "cpu"))
    on_gpu = _check_tuning_device(dev, timer)
    gpu = KC.device_name(dev) if on_gpu else KC.CPU_DEVICE
    cache = cache if cache is not None else KC.KernelCache()
    key = KC.CacheKey.make(pattern, bound, head_dim=head_dim, dtype=dtype, batch=batch, device=gpu,
                           kv_heads=kv_heads)
    shape = KC.exact_shape(bound, head_dim=head_dim, batch=batch, kv_heads=kv_heads)
    hw = get_hardware(hardware) if hardware is not None else (hardware_for(gpu) if on_gpu else get_hardware("h100"))
    search = ScheduleSearch(pattern, bound, hw, head_dim=head_dim, batch=batch, nbytes=min(DTYPES[dtype], 2),
                            inputs=inputs, kv_heads=kv_heads)

    if not retune:
        entry = cache.get(key)
        if entry is not None:
            return _reuse_cached(entry, pattern, bound, key, shape, search, builder)

    builder = builder if builder is not None else TritonBuilder()
    timer = timer if timer is not None else do_bench_timer
    trials = candidates(search, top=top, launch=launch if launch is not None else LAUNCH,
                        nbytes=min(DTYPES[dtype], 2))
    if on_gpu and torch.cuda.is_available():  # the trials this GPU runs as timed, whatever its hardware model
        trials = for_device(trials, "sm{}{}".format(*torch.cuda.get_device_capability(dev)))
    if (flex if flex is not None else on_gpu) and trials:
        flex_builder = _add_flex_trial(trials, flex_builder)
    bar = Progress(len(trials), f"tuning {pattern.name}", stream=stream,
                   enabled=progress if progress is not None else None)
    run_args = {"head_dim": head_dim, "dtype": dtype, "batch": batch, "device": dev, "inputs": inputs,
                "kv_heads": kv_heads}
    best, sources = _time_trials(pattern, bound, trials, builder, flex_builder, timer, run_args, bar)
    return _store_winner(cache, key, shape, trials, best, sources, builder, hw)


def _check_tuning_arguments(pattern, *, head_dim, batch, top) -> None:
    """Only softmax patterns are tuned, at positive int sizes."""
    if not isinstance(pattern, ir.PatternIR):
        raise SpecError(f"'{getattr(pattern, 'name', pattern)}' is not a softmax pattern: only those are autotuned",
                        where="argument pattern")
    for what, value in (("head_dim", head_dim), ("batch", batch), ("top", top)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"must be a positive int, got {value!r}", where=f"argument {what}")


def _check_tuning_device(dev, timer: Timer | None) -> bool:
    """Whether ``dev`` is a GPU; tuning needs a working one unless a timer is injected."""
    on_gpu = dev.type == "cuda"
    if on_gpu and not cuda_available():
        raise AutotuneError("CUDA is not available on this machine", hint="autotuning times kernels on a GPU")
    if not on_gpu and timer is None:
        raise AutotuneError("autotuning needs a CUDA GPU, and none is available",
                            hint="on CPU, kernels run with the simulator's schedule (no tuning needed)")
    return on_gpu


def _reuse_cached(entry, pattern, bound: E.Bound, key, shape, search: ScheduleSearch,
                  builder: KernelBuilder | None) -> TuneResult:
    """The cached winner, its source regenerated when the entry was stored for another
    exact shape of the same bucket."""
    config = _fit(search, config_from_dict(entry.config))
    if entry.shape == shape:
        source, path = entry.source, entry.source_path
    else:  # same bucket, another exact shape: reuse the winner, regenerate its source
        builder = builder if builder is not None else TritonBuilder()
        sched = _schedule_of(search, config)
        source = builder.source(pattern, bound, sched, config)
        path = scratch_source(source)  # this process's: the cache directory may be read-only, and holds entries only
    return TuneResult(key, config, source, path, True, [], list(entry.meta.get("trials", [])),
                      entry.meta.get("winner", "triton"))


def _add_flex_trial(trials: list[Trial], flex_builder: KernelBuilder | None) -> KernelBuilder:
    """Append the FlexAttention candidate (on the first trial's schedule); the builder that makes it."""
    if flex_builder is None:
        from ..backends.flex.runner import FlexBuilder

        flex_builder = FlexBuilder()
    trials.append(Trial(len(trials), trials[0].config, trials[0].schedule, math.nan, backend="flex"))
    return flex_builder


def _time_trials(pattern, bound: E.Bound, trials: list[Trial], builder: KernelBuilder,
                 flex_builder: KernelBuilder | None, timer: Timer, run_args: dict,
                 bar: Progress) -> tuple[Trial, dict[int, str]]:
    """Time every trial, recording the error of one that fails: the fastest Triton trial and
    the source of each timed one. Raises ``AutotuneError`` when no Triton trial ran."""
    sources: dict[int, str] = {}
    best: Trial | None = None
    expected: list = []  # the first candidate's step, which the others' must match (``ANSWER_TOLERANCE``)
    bar.draw()
    try:
        with tempfile.TemporaryDirectory(prefix="attnc-tune-") as tmp:
            for trial in trials:
                try:
                    make = flex_builder if trial.backend == "flex" else builder
                    sources[trial.rank] = _time_trial(make, trial, pattern, bound, timer, run_args, Path(tmp),
                                                      expected)
                    if trial.backend == "flex":
                        pass  # compared with the best Triton kernel below; the cache keeps a Triton kernel
                    elif best is None or trial.measured_ms < best.measured_ms:
                        best = trial
                except (KeyboardInterrupt, AutotuneError):
                    raise
                except Exception as err:  # noqa: BLE001 - out of resources, compile errors: skip it
                    trial.error = f"{type(err).__name__}: {err}"[:300]
                bar.update(f"best {best.measured_ms:.3f} ms" if best else "")
    finally:
        bar.close()
    if best is None:
        first = next((t.error for t in trials if t.error), "no candidates")
        raise AutotuneError(f"every candidate failed ({len(trials)} tried); the first: {first}")
    return best, sources


def _time_trial(make: KernelBuilder, trial: Trial, pattern, bound: E.Bound, timer: Timer, run_args: dict,
                tmp: Path, expected: list) -> str:
    """Generate, load and time one candidate, setting its ``measured_ms``; its source. Its step's tensors are
    compared with ``expected`` (the first candidate's, which an empty list takes) before the timing."""
    source = make.source(pattern, bound, trial.schedule, trial.config)
    path = tmp / f"candidate_{trial.rank}.py"
    path.write_text(source, encoding="utf-8")
    kernels = make.load(path)
    fn = make.runner(kernels, pattern, bound, trial.schedule, trial.config, **run_args)
    _check_answer(fn(), expected, run_args["dtype"])
    ms = float(timer(fn))
    if not math.isfinite(ms) or ms <= 0:
        raise ValueError(f"timer returned {ms!r}")
    trial.measured_ms = ms
    return source


#: Elements compared at a time (``step_difference``): its temporaries stay near 200 MB whatever the tensors' size.
COMPARE_CHUNK = 1 << 24


def step_difference(got, expected) -> float | None:
    """How far apart two training steps' tensors are, pair by pair, as a multiple of ``ANSWER_TOLERANCE``'s
    scale: the largest of each pair's relative norm (``||a - b|| / ||b||``) and, so that a few wrong rows or tiles
    are not averaged away, its largest element difference over ``4 x`` the largest element of ``b``
    (``max |a - b| / (4 max |b|)``). -inf must stand where it stands in ``b`` (an lse row with no allowed key);
    any other value that is not finite, in either, is ``inf``. None where either is not a tuple of tensors (a
    builder that returns something else is not compared). Computed in float32 chunks of ``COMPARE_CHUNK``
    elements, on the tensors' device."""
    import torch

    if not (isinstance(got, tuple) and isinstance(expected, tuple) and len(got) == len(expected)
            and all(isinstance(t, torch.Tensor) for t in (*got, *expected))):
        return None
    worst = 0.0
    for a, b in zip(got, expected, strict=True):
        if a.shape != b.shape:
            return math.inf
        sq_diff = sq_ref = max_diff = max_ref = 0.0
        for a_c, b_c in zip(a.detach().reshape(-1).split(COMPARE_CHUNK), b.detach().reshape(-1).split(COMPARE_CHUNK),
                            strict=True):
            a_c, b_c = a_c.float(), b_c.float()
            empty = torch.isneginf(b_c)  # a row with no allowed key: its lse
            if not torch.equal(empty, torch.isneginf(a_c)) or not bool(
                    (torch.isfinite(a_c) | empty).all() and (torch.isfinite(b_c) | empty).all()):
                return math.inf
            diff = torch.where(empty, 0.0, a_c - b_c)
            ref = torch.where(empty, 0.0, b_c)
            sq_diff += float(diff.double().square().sum())
            sq_ref += float(ref.double().square().sum())
            max_diff = max(max_diff, float(diff.abs().max())) if diff.numel() else max_diff
            max_ref = max(max_ref, float(ref.abs().max())) if ref.numel() else max_ref
        norm = math.sqrt(sq_diff) / max(math.sqrt(sq_ref), 1e-30)
        worst = max(worst, norm, max_diff / max(4.0 * max_ref, 1e-30))
    return worst


def _check_answer(got, expected: list, dtype: str) -> None:
    """Refuse (``ValueError``: the trial fails) a step with a NaN or an infinity other than an lse row's -inf,
    or one that differs from ``expected`` (the first step taken) by more than ``ANSWER_TOLERANCE``; take the
    first step that passes as ``expected``."""
    diff = step_difference(got, got if not expected else expected[0])
    if not expected:
        if diff is not None and not diff == 0.0:
            raise ValueError("its training step holds a NaN or an infinity (other than an lse of -inf)")
        expected.append(got)
        return
    if diff is not None and not diff <= ANSWER_TOLERANCE[dtype]:
        raise ValueError(f"its training step differs from the first candidate's by {diff:.2e} (relative), over "
                         f"the {ANSWER_TOLERANCE[dtype]:.0e} a {dtype} kernel may")


def _store_winner(cache: KC.KernelCache, key, shape, trials: list[Trial], best: Trial, sources: dict[int, str],
                  builder: KernelBuilder, hw) -> TuneResult:
    """Name the winner (Flex when it beat the best Triton kernel) and cache the best Triton
    kernel with every trial's timing; a cache that cannot be written only warns."""
    flex_ms = min((t.measured_ms for t in trials if t.backend == "flex" and t.error is None), default=math.inf)
    winner = "flex" if flex_ms < best.measured_ms else "triton"
    meta = {"trials": [t.to_dict() for t in trials], "builder": getattr(builder, "name", type(builder).__name__),
            "hardware_model": hw.name, "winner": winner}
    try:
        entry = cache.put(key, sources[best.rank], config_dict(best.config), shape=shape, meta=meta)
        path = entry.source_path
    except OSError as err:  # a read-only or full cache: still return the winner
        print(f"attnc: warning: could not write the kernel cache ({err})", file=sys.stderr)
        path = scratch_source(sources[best.rank])
    return TuneResult(key, best.config, sources[best.rank], path, False, trials, winner=winner, best_rank=best.rank)


def _cached_entry(pattern, bound: E.Bound, *, head_dim: int, dtype, batch: int, device, cache,
                  kv_heads: int | None = None):
    """The cache entry for this key, or None (never tunes)."""
    if not isinstance(pattern, ir.PatternIR):
        return None
    import torch

    dev = torch.device(device) if device is not None else None
    gpu = KC.device_name(dev) if dev is not None and dev.type == "cuda" else KC.CPU_DEVICE
    cache = cache if cache is not None else KC.KernelCache()
    key = KC.CacheKey.make(pattern, bound, head_dim=head_dim, dtype=canonical_dtype(dtype), batch=batch, device=gpu,
                           kv_heads=kv_heads)
    return cache.get(key)


def lookup(pattern: ir.PatternIR, bound: E.Bound, *, head_dim: int, dtype="bf16", batch: int = 1, device=None,
           cache: KC.KernelCache | None = None, kv_heads: int | None = None) -> KernelConfig | None:
    """The cached winning configuration for this key, or None (never tunes)."""
    entry = _cached_entry(pattern, bound, head_dim=head_dim, dtype=dtype, batch=batch, device=device, cache=cache,
                          kv_heads=kv_heads)
    return config_from_dict(entry.config) if entry is not None else None


def tuned_winner(pattern: ir.PatternIR, bound: E.Bound, *, head_dim: int, dtype="bf16", batch: int = 1,
                 device=None, cache: KC.KernelCache | None = None, kv_heads: int | None = None) -> str | None:
    """The cached winner's backend for this key ("triton" or "flex"), or None (never tunes)."""
    entry = _cached_entry(pattern, bound, head_dim=head_dim, dtype=dtype, batch=batch, device=device, cache=cache,
                          kv_heads=kv_heads)
    return entry.meta.get("winner", "triton") if entry is not None else None


def _fit(search: ScheduleSearch, config: KernelConfig) -> KernelConfig:
    """A cached config clipped to this exact shape's extents (a bucket spans sizes up to its bound)."""
    flat = search.grid and len(config.q_tile) == 1 and len(search.q_ext) > 1
    q_ext = (math.prod(search.q_ext),) if flat else search.q_ext
    kv_ext = (math.prod(search.kv_ext),) if flat else search.kv_ext
    if len(config.q_tile) != len(q_ext) or len(config.kv_tile) != len(kv_ext):
        return config
    return dataclasses.replace(config, q_tile=tuple(min(t, L) for t, L in zip(config.q_tile, q_ext, strict=True)),
                               kv_tile=tuple(min(t, L) for t, L in zip(config.kv_tile, kv_ext, strict=True)))


def config_hook(pattern, bound: E.Bound, q, inputs: dict | None = None, *,
                kv_heads: int | None = None) -> KernelConfig | None:
    """For ``TritonRunner.config_hook``: the autotuned config on CUDA tensors (tuning
    on the first call of a shape bucket, cached on disk after), None elsewhere (the
    backend's default then); ``kv_heads``: the call's K/V heads."""
    if q.device.type != "cuda" or not isinstance(pattern, ir.PatternIR):
        return None
    static = None if not inputs else {n: t.detach().cpu() for n, t in inputs.items()}
    return autotune(pattern, bound, head_dim=int(q.shape[-1]), dtype=q.dtype, batch=int(q.shape[0]), device=q.device,
                    inputs=static, kv_heads=kv_heads).config


def install() -> None:
    """Route the Triton backend's config choice through the autotuner and its cache."""
    from ..backends.triton import runner as triton_backend

    triton_backend.TritonRunner.config_hook = staticmethod(config_hook)


def _schedule_of(search: ScheduleSearch, config: KernelConfig) -> TileSchedule:
    flat = search.grid and len(config.q_tile) == 1 and len(search.q_ext) > 1
    return search.schedule(config.q_tile, config.kv_tile, flat)


def scratch_source(source: str) -> Path:
    """A file holding ``source`` (content-addressed, atomic) for ``load_kernels``, in this process's private source
    folder (never a shared, predictable temp path another user could plant files in, nor the cache directory: a
    cached winner's source regenerated for another exact shape of its bucket is this process's, and there it was
    an OSError under a read-only cache and a file left per length in a writable one)."""
    from ..backends.triton.runner import source_dir

    raw = source.encode("utf-8")
    sha = hashlib.sha256(raw).hexdigest()
    base = Path(source_dir())
    base.mkdir(parents=True, exist_ok=True)
    path = base / f"src-{sha[:16]}.py"
    if not (path.exists() and hashlib.sha256(path.read_bytes()).hexdigest() == sha):
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{sha[:32]}-", dir=base)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return path


__all__ = ["AutotuneError", "BLACKWELL_WS_WARPS", "HOPPER_WS_Q_TOKENS", "HOPPER_WS_WARPS", "KernelBuilder",
           "atomic_dq_backward", "LAUNCH", "Progress", "TOP", "Trial", "TritonBuilder", "TuneResult",
           "autotune", "candidates", "canonical_dtype", "config_dict", "config_from_dict", "config_hook",
           "cuda_available", "do_bench_timer", "for_device", "hardware_for", "install", "lookup", "scratch_source",
           "step_difference", "tuned_winner", "warp_specialized_forward", "wide_kv_backward",
           "without_tma"]
