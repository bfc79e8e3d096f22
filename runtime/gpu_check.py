"""Offline GPU compile check: the Triton kernels a call would launch on CUDA, compiled for
sm_80 / sm_90 (sm_100 where the installed Triton targets it) without a GPU, with what a real
launch would meet: registers, spill bytes, shared memory against the per-block limit, and the
tensor-core instructions in the PTX.

The launches are not guessed: the pattern's own launch path runs on CPU tensors (the softmax
kernels of ``runtime.backends.triton`` at the config the schedule search picks on the target's
hardware model; the recurrence kernels of ``runtime.recurrences.decay.triton`` at the chunk the
simulator picks), and every ``kernel[grid](...)`` it makes is recorded instead of run
(``capture_launches``). Each record is then bound and specialised exactly as
``JITFunction.run`` would (Triton's own binder and ``_pack_args``: signature, constexprs,
alignment attributes, ``num_warps``/``num_stages``) and compiled with ``triton.compile`` for a
``GPUTarget``. Whatever kernels the launch path uses, today's or tomorrow's, are checked.

Registers and spills come from ``ptxas -v`` (Triton's bundled ptxas, run on the PTX with the
flags Triton uses); ``CompiledKernel.n_regs`` needs a driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass, field

import sympy
import torch

from ..compiler.cost import checked_group_split, checked_kv_heads
from ..core import ir
from ..core.errors import SpecError
from . import kernel_fit
from .gpu_report import HEADER, summary, table  # noqa: F401 (this module's public names)
from .numerics import TORCH_DTYPES
from .plan.clusters import SCORE_TABLES
from .tritonenv import interpreting

#: Shared memory one block may use (bytes): the opt-in maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin).
#: A local table on purpose: ``compiler.hardware`` models per-SM capacity for the cost model.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
#: The simulator's hardware model whose schedule a call on this architecture runs.
ARCH_HARDWARE = {80: "a100", 86: "a100", 89: "a100", 90: "h100", 100: "b200", 120: "b200"}
DEFAULT_ARCHS = (80, 90)
DTYPES = TORCH_DTYPES
#: Batch and heads of the recorded call: the kernels do not depend on them beyond the grid.
BATCH, HEADS = 1, 2


def call_heads(pat) -> int:
    """The query heads of a recorded call: ``HEADS``, or the count a parameter given one value per head
    fixes (``NAME[heads]``)."""
    counts = {count for _, count in getattr(pat, "head_params", ())}
    return counts.pop() if counts else HEADS

_LOCK = threading.RLock()


# ----------------------------------------------------------------- recording launches
@dataclass
class Recorded:
    """One ``kernel[grid](*args, **kwargs)`` of the launch path (not run)."""

    name: str
    fn: object  # the JITFunction (or InterpretedFunction) launched
    grid: tuple
    args: tuple
    kwargs: dict
    branch: str | None = None  # the branch of a combined pattern that launched it
    config: str = ""  # that branch's config in words (``describe_launch``)


@contextlib.contextmanager
def launching_for(arch: int):
    """CPU tensors launched as on ``sm_<arch>``'s GPU: the launch order decided for its SMs and
    architecture (``runtime.backends.triton.kernel_launch``: ``CPU_SMS``, ``CPU_ARCH``)."""
    from ..compiler.hardware import get_hardware
    from .backends.triton import kernel_launch as KL

    saved = KL.CPU_SMS, KL.CPU_ARCH
    KL.CPU_SMS, KL.CPU_ARCH = get_hardware(ARCH_HARDWARE.get(arch, "h100")).sms, f"sm{arch}"
    try:
        yield
    finally:
        KL.CPU_SMS, KL.CPU_ARCH = saved


@contextlib.contextmanager
def capture_launches():
    """Record every Triton kernel launch in the block instead of running it (native and
    interpreted launches alike); yields the list the records go to. Outputs of recorded
    launches are left as allocated (garbage): only the launches matter."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    records: list[Recorded] = []

    def record(self, *args, grid, warmup, **kwargs):
        if warmup:
            raise SpecError("a warm-up compile inside a recorded launch path", where="gpu check")
        name = getattr(getattr(self, "fn", None), "__name__", None) or str(self)
        records.append(Recorded(name, self, tuple(grid) if not callable(grid) else grid, args, dict(kwargs)))

    with _LOCK:
        saved = (JITFunction.run, InterpretedFunction.run)
        JITFunction.run = record
        InterpretedFunction.run = record
        try:
            yield records
        finally:
            JITFunction.run, InterpretedFunction.run = saved


def native_kernel(fn):
    """The CUDA ``JITFunction`` of a recorded kernel: itself when native; for an interpreted one, the
    native twin from its module (generated kernel modules are reloaded natively, modules with a
    ``kernels(interpret)`` table are asked for theirs), else the plain function jitted."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    raw = fn.fn
    module = sys.modules.get(raw.__module__)
    if raw.__module__.startswith("attnc_kernels_"):
        from .backends.triton.runner import load_kernels

        return getattr(load_kernels(inspect.getsourcefile(raw), interpret=False), raw.__name__)
    table = getattr(module, "kernels", None)
    if callable(table):
        with contextlib.suppress(Exception):
            return table(False)[raw.__name__]
    import triton

    with interpreting(False):
        return triton.jit(raw)


# ----------------------------------------------------------------- compiling one launch
@dataclass
class KernelReport:
    """What a launch of one kernel would meet on one architecture."""

    pattern: str
    kernel: str
    arch: int
    head_dim: int
    dtype: str
    config: str = ""
    num_warps: int = 0
    num_stages: int = 0
    shared: int = 0
    smem_limit: int = 0
    regs: int = 0
    spill_bytes: int = 0  # spill stores + spill loads per thread (ptxas)
    stack: int = 0
    wgmma: int = 0
    mma: int = 0
    tcgen05: int = 0  # Blackwell's tcgen05.mma
    dots: int = 0  # tt.dot operations in the kernel's Triton IR
    error: str | None = None
    #: the rungs of ``kernel_fit``'s ladder tried before this one, and why each was passed over
    #: ("w8 s3: spills 8 B"); empty where the recorded launch parameters fit
    fell_back: list = field(default_factory=list)
    #: launched on the ladder's rung that reads the tile lists by index (its runs passed over)
    indexed: bool = False
    #: the kernel's first instruction is ``trap``: Triton lowered it to an abort rather than failing the compile
    #: (Triton 3.9, sm_100: a dK/dV kernel whose accumulators outgrew tensor memory's 512 columns)
    traps: bool = False
    #: SASS instructions a step of each innermost loop that issues tensor-core instructions runs (the fewest, where
    #: it branches), in program order (the forward's and the dQ kernel's FULL then PARTIAL KV tile step, dK/dV's
    #: per Q tile): what one step of a loop costs besides its matmuls, an offline measure of a change to the
    #: loops (``loop_instructions``); counted from ``cubin`` when first read (``cuobjdump`` takes about as long
    #: as ptxas, and most checks never read it), None until then
    loop_counts: list | None = field(default=None, repr=False)
    constexprs: dict = field(default_factory=dict, repr=False)
    #: the compiled kernel's cubin, kept for ``loop_instructions``
    cubin: bytes = field(default=b"", repr=False, compare=False)

    @property
    def loop_instructions(self) -> list:
        """The SASS instructions of a step of each innermost tensor-core loop (empty without a cubin, or where
        ``cuobjdump`` is missing)."""
        if self.loop_counts is None:
            self.loop_counts = []
            if self.cubin:
                with contextlib.suppress(OSError, subprocess.SubprocessError):  # no cuobjdump: no counts
                    self.loop_counts = loop_instructions(sass(self.cubin))
        return self.loop_counts

    @property
    def problems(self) -> list[str]:
        """Why this kernel would fail or run badly: a compile error, shared memory over the limit, spills."""
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
            return out
        if self.traps:
            out.append("compiles to a trap at entry (the kernel would abort on launch)")
            return out
        if self.shared > self.smem_limit:
            out.append(f"shared memory {self.shared / 1024:.1f} KiB > {self.smem_limit // 1024} KiB")
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B")
        if self.dots and self.dtype in ("fp16", "bf16"):
            # a 16-bit dot off the tensor cores runs at a fraction of the rate; on Blackwell, mma.sync is
            # legal but far below tcgen05.mma (wgmma does not exist there)
            if not (self.wgmma or self.mma or self.tcgen05):
                out.append(f"{self.dots} dots, none on tensor cores (FMA)")
            elif self.arch >= 100 and not self.tcgen05:
                out.append(f"{self.dots} dots, none on tcgen05.mma")
        return out

    @property
    def notes(self) -> list[str]:
        """Findings that are not failures: the launch parameters a GPU passes over (``fell_back``), sm_90
        dots on mma.sync rather than wgmma (legal, slower)."""
        out = [f"launched at w{self.num_warps} s{self.num_stages}{' indexed' if self.indexed else ''}; "
               + ", ".join(self.fell_back)] if self.fell_back else []
        if self.error or not self.dots or self.dtype not in ("fp16", "bf16"):
            return out
        if self.arch == 90 and self.mma and not self.wgmma:
            out.append(f"{self.dots} dots on mma.sync, not wgmma")
        return out

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("pattern", "kernel", "arch", "head_dim", "dtype", "config", "num_warps",
                                              "num_stages", "shared", "smem_limit", "regs", "spill_bytes", "stack",
                                              "wgmma", "mma", "tcgen05", "dots", "error", "fell_back", "indexed",
                                              "traps", "loop_instructions")}


def _knob(path: str, default=None):
    obj = __import__("triton").knobs
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return default
    return obj


def compile_launch(rec: Recorded, arch: int):
    """``triton.compile`` of a recorded launch for ``sm_<arch>``, bound and specialised as
    ``JITFunction.run`` does (Triton's binder on the real arguments)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = native_kernel(rec.fn)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(rec.kwargs)
    if "QT_VIEW" in kwargs:  # the dK/dV kernel's per-arch form (triton_backend.qt_view), recorded on CPU
        kwargs["QT_VIEW"] = arch >= 90
    kwargs["debug"] = kwargs.get("debug", fn.debug) or bool(_knob("runtime.debug", False))
    for opt, knob in (("instrumentation_mode", "compilation.instrumentation_mode"),
                      ("fpsan_homomorphic_casts", "compilation.fpsan_homomorphic_casts")):
        if opt in inspect.getsource(type(fn).run):
            kwargs[opt] = _knob(knob)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*rec.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    log = io.StringIO()
    # Triton prints ptxas's -v log when it runs ptxas (not for a kernel from its cache)
    with _env("TRITON_DUMP_PTXAS_LOG", "1"), contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
        kernel = triton.compile(src, target=target, options=options.__dict__)
    usage = _parse_ptxas(log.getvalue())
    if usage is not None:
        _PTXAS_CACHE[_ptx_key(kernel.asm["ptx"], arch)] = usage
    # a parameter's constant by its name; a group's value's by the group's name and its place in it (``Q[3]``)
    consts = {(k if not isinstance(k, tuple) else fn.arg_names[k[0]] + "".join(f"[{i}]" for i in k[1:])): v
              for k, v in constexprs.items()}
    return kernel, options, consts


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _ptx_key(ptx: str, arch: int) -> str:
    return hashlib.sha256(f"{arch}\0{ptx}".encode()).hexdigest()


def _parse_ptxas(log: str) -> tuple[int, int, int] | None:
    if "registers" not in log:
        return None
    regs = max((int(x) for x in re.findall(r"Used (\d+) registers", log)), default=0)
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    stack = max((int(x) for x in re.findall(r"(\d+) bytes stack frame", log)), default=0)
    return regs, spills, stack


_PTXAS_CACHE: dict[str, tuple[int, int, int]] = {}


def _ptxas_path(arch: int) -> str:
    """Triton's bundled ptxas for ``sm_<arch>`` (Triton 3.9 picks one per architecture)."""
    from triton.backends.nvidia import compiler as nv

    return nv.get_ptxas(arch).path if "arch" in inspect.signature(nv.get_ptxas).parameters else nv.get_ptxas().path


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill bytes (stores + loads), stack frame bytes) per thread, from ``ptxas -v``
    on the PTX with the flags Triton's ``make_cubin`` uses (Triton's bundled ptxas)."""
    from triton.backends.nvidia import compiler as nv

    key = _ptx_key(ptx, arch)
    if key in _PTXAS_CACHE:
        return _PTXAS_CACHE[key]
    ptxas = _ptxas_path(arch)
    flags = ["-lineinfo", "-v"]
    if "regAllocOptLevel" in inspect.getsource(nv.CUDABackend.make_cubin):
        flags.append("--regAllocOptLevel=2")
    with tempfile.TemporaryDirectory(prefix="attnc-ptxas-") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w", encoding="utf-8") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, *flags, f"--gpu-name={nv.sm_arch_from_capability(arch)}", src, "-o",
                               os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    usage = _parse_ptxas(log)
    if proc.returncode or usage is None:
        raise RuntimeError(f"ptxas failed: {log.strip()[-300:]}")
    _PTXAS_CACHE[key] = usage
    return usage


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of a compiled kernel's SASS, from ``cuobjdump -sass`` (Triton's bundled one)."""
    from triton import knobs

    tool = getattr(getattr(knobs.nvidia, "cuobjdump", None), "path", None) or os.path.join(
        os.path.dirname(_ptxas_path(90)), "cuobjdump")  # Triton's, beside its ptxas
    with tempfile.TemporaryDirectory(prefix="attnc-sass-") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in re.finditer(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", out, re.M)]


#: SASS opcodes of tensor-core matrix instructions: Ampere's HMMA, Hopper's HGMMA, Blackwell's UTC*MMA
_TENSOR_CORE_SASS = re.compile(r"\b(?:HMMA|HGMMA|UTC\w*MMA)\b")


def loop_instructions(code: list[tuple[int, str]]) -> list[int]:
    """The fewest instructions a step of each innermost loop of ``sass`` code that issues tensor-core instructions
    runs, in program order: a branch forward inside the loop taken where that is shorter (the forward's branch
    around an edge tile's padding, which every other tile takes). A loop is a header and the branches back to
    it, up to the last; innermost: it holds no other loop that issues tensor-core instructions (a loop without
    them inside one is counted once through)."""
    index = {addr: i for i, (addr, _) in enumerate(code)}

    def target(text: str) -> int | None:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        return index.get(int(m.group(1), 16)) if m else None

    back: dict[int, list[int]] = {}  # header -> its branches back
    for i, (_, text) in enumerate(code):
        if (t := target(text)) is not None and t < i:
            back.setdefault(t, []).append(i)
    loops = [(lo, max(ends), ends) for lo, ends in back.items()
             if any(_TENSOR_CORE_SASS.search(text) for _, text in code[lo:max(ends) + 1])]
    out = []
    for lo, hi, ends in sorted(loops):
        if any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b, _ in loops):
            continue
        fewest = {lo: 1}  # instructions run to reach each one, on forward edges only
        for i in range(lo, hi):
            if i not in fewest:
                continue
            text = code[i][1]
            jump = target(text)
            # falls through unless it always leaves: an exit, or a branch with no guard and no predicate operand
            nexts = [] if re.match(r"(?:EXIT|RET)\b", text) or re.match(r"BRA\b[^,]*$", text) else [i + 1]
            if jump is not None and i < jump <= hi:
                nexts.append(jump)
            for j in nexts:
                fewest[j] = min(fewest.get(j, fewest[i] + 1), fewest[i] + 1)
        out.append(min((fewest[e] for e in ends if e in fewest), default=hi - lo + 1))
    return out


# An instruction may carry a predicate guard (``@%p1 tcgen05.mma...``: Blackwell's single-thread issue).
_GUARD = r"^\s*(?:@!?%\w+\s+)?"


def tensor_core_counts(ptx: str) -> tuple[int, int, int]:
    """(``wgmma.mma_async``, ``mma.sync``, ``tcgen05.mma``) instructions in the PTX."""
    wgmma = len(re.findall(_GUARD + r"wgmma\.mma_async\b", ptx, re.M))
    mma = len(re.findall(_GUARD + r"mma\.sync\b", ptx, re.M))
    tcgen05 = len(re.findall(_GUARD + r"tcgen05\.mma\b", ptx, re.M))
    return wgmma, mma, tcgen05


def check_launch(rec: Recorded, arch: int, *, pattern: str, head_dim: int, dtype: str, config: str = "") -> KernelReport:
    """Compile one recorded launch for ``sm_<arch>`` and report the launch parameters a GPU runs it with:
    ``kernel_fit``'s ladder from the recorded ones, walked as a GPU walks it (``kernel_fit.choose``), a rung
    over the block's shared memory or with local memory (spills) passed over (``KernelReport.fell_back``).
    A compile failure of the recorded rung becomes the report's error; of a lower one, that rung is passed over."""
    reports: dict = {}
    ladder = kernel_fit.rungs(*(rec.kwargs.get(key, default) for key, default in kernel_fit.TRITON_DEFAULTS.items()),
                              kernel_fit.steps_runs(rec.kwargs))

    def probe(rung: kernel_fit.Rung) -> kernel_fit.Fit:
        rep = _compiled_report(dataclasses.replace(rec, kwargs={**rec.kwargs, **rung.options(rec.kwargs)}), arch,
                               pattern=pattern, head_dim=head_dim, dtype=dtype, config=config)
        reports[rung] = rep
        if rep.error:
            if rung == ladder[0]:
                raise _CompileFailed(rep)
            return kernel_fit.Fit(False, why=f"compile error: {rep.error.split(':')[0]}")
        local = rep.stack or rep.spill_bytes  # the stack frame is the local memory a GPU's loader reports
        why = "; ".join(rep.problems) or (f"local memory {local} B" if local else "")
        return kernel_fit.Fit(rep.shared <= rep.smem_limit and not rep.traps, local, why)

    try:
        rung, tried = kernel_fit.choose(ladder, probe)
    except _CompileFailed as failed:
        return failed.report
    if rung is None:  # no rung fits shared memory: the recorded one, with its problem
        return reports[ladder[0]]
    rep = reports[rung]
    rep.fell_back = [f"{r}: {fit.why}" for r, fit in tried if r != rung]
    rep.indexed = rung.indexed
    return rep


class _CompileFailed(Exception):
    def __init__(self, report: KernelReport):
        super().__init__(report.error)
        self.report = report


def _compiled_report(rec: Recorded, arch: int, *, pattern: str, head_dim: int, dtype: str, config: str) -> KernelReport:
    """Compile one recorded launch as recorded; a compile failure becomes the report's error."""
    rep = KernelReport(pattern, _kernel_name(rec.name), arch, head_dim, dtype, config,
                       smem_limit=SMEM_LIMIT.get(arch, 0))
    try:
        with warnings.catch_warnings():  # Triton 3.9's notice about its future fp-fusion default
            warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
            kernel, options, consts = compile_launch(rec, arch)
        rep.num_warps, rep.num_stages = options.num_warps, options.num_stages
        rep.constexprs = consts
        rep.shared = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        rep.regs, rep.spill_bytes, rep.stack = ptxas_usage(ptx, arch)
        rep.wgmma, rep.mma, rep.tcgen05 = tensor_core_counts(ptx)
        rep.traps = kernel_fit.traps_at_entry(ptx)
        rep.dots = len(re.findall(r"\btt\.dot(?:_scaled)?\b", kernel.asm.get("ttir", "")))
    except Exception as err:  # noqa: BLE001 - any compile failure is this kernel's finding
        rep.error = f"{type(err).__name__}: {' '.join(str(err).split())[:240]}"
        return rep
    rep.cubin = kernel.asm["cubin"]
    return rep


def _kernel_name(name: str) -> str:
    return {"attnc_fwd": "fwd", "attnc_bwd_delta": "bwd_delta", "attnc_bwd_dq": "bwd_dq",
            "attnc_bwd_dkdv": "bwd_dkdv"}.get(name, name.lstrip("_"))


# ----------------------------------------------------------------- driving the launch path
def targets_available(arch: int) -> bool:
    """Whether the installed Triton (and its ptxas) compiles for ``sm_<arch>``."""
    with _LOCK:
        if arch not in _TARGETS:
            _TARGETS[arch] = _probe(arch)
        return _TARGETS[arch]


_TARGETS: dict[int, bool] = {}


def _probe(arch: int) -> bool:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def _attnc_probe(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.arange(0, BLOCK).to(tl.float32))

    try:
        from triton.backends.nvidia import compiler as nv

        with interpreting(False):  # TRITON_INTERPRET=1 in the environment would make it an interpreted function
            probe = triton.jit(_attnc_probe)
        src = ASTSource(probe, {"X": "*fp32"}, {"BLOCK": 16})
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*FP_FUSION.*")
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 1})
        ptxas_usage(k.asm["ptx"], arch)
        return nv is not None
    except Exception:  # noqa: BLE001 - an unsupported target
        return False


def _inputs(pat, bound, gen: torch.Generator, score_tables: bool = False) -> dict:
    """Call-time inputs of the declared shapes: floats in (-0.5, 0) (log gates; a recurrence's rates in (0.25, 0.75)),
    sorted small ints for int ones (ids, flags); the score tables too (relative(), landmark()) with ``score_tables``."""
    rates = set(getattr(pat, "rates", None) or ())
    out = {}
    for decl in pat.inputs:
        if decl.derived and not (score_tables and decl.derived[0] in SCORE_TABLES):  # made by the call from q, k
            continue
        shape = tuple(int(sympy.sympify(d).subs(bound.subs)) for d in decl.dims)
        if decl.dtype == "float":
            low, span = (0.25, 0.5) if decl.name in rates else (0.0, -0.5)
            out[decl.name] = low + span * torch.rand(shape, generator=gen, dtype=torch.float32)
        else:
            out[decl.name] = torch.sort(torch.randint(0, 4, shape, generator=gen), dim=-1).values
    return out


def record_call(pattern, *, arch: int, head_dim: int, dtype: str, n: int | None = None,
                sizes: dict | None = None, config=None, block: bool = False, kv_heads: int | None = None,
                group_split: int = 1) -> tuple[list[Recorded], str]:
    """Run the pattern's forward and backward through its launch path on CPU tensors as a CUDA
    call on ``sm_<arch>`` would, recording the launches; returns them and the config in words.
    ``config`` (a ``KernelConfig``) replaces the search's pick (softmax patterns; sweeps).
    ``block``: a context-parallel block instead (``record_block``). ``kv_heads``: K/V heads shared by the
    call's ``HEADS`` query heads (grouped-query attention: the kernels loop over a group of more than one);
    ``group_split``: the dK/dV programs per K/V head (as a GPU's cost model may pick them; softmax patterns)."""
    if getattr(pattern, "kind", None) == "bucketed":
        from .bucketed import not_served

        raise not_served(pattern, "it has no generated kernel to check", "argument pattern")
    if block:
        return record_block(pattern, arch=arch, head_dim=head_dim, dtype=dtype, n=n, sizes=sizes)
    from ..compiler import evaluate as E
    from ..compiler.hardware import get_hardware
    from . import api

    hw = get_hardware(ARCH_HARDWARE.get(arch, "h100"))
    tdtype = DTYPES[dtype]
    attn = api.compile_attention(pattern, backend="triton")
    pat = attn.pattern
    gen = torch.Generator().manual_seed(0)
    heads = call_heads(pat)
    kv = checked_kv_heads(heads, kv_heads)
    checked_group_split(heads // kv, group_split)
    if getattr(pat, "kind", None) == "combined":
        return _record_combined(attn, hw, arch=arch, head_dim=head_dim, dtype=tdtype, n=n, sizes=sizes,
                                config=config, gen=gen, kv_heads=kv, group_split=group_split)
    bound = E.bind_sizes(pat, n=n, heads=heads, sizes=sizes, dk=head_dim)  # dk: a state's or centroids' shape
    N = bound.n
    q, k, v = (torch.randn(BATCH, h, N, head_dim, generator=gen).to(tdtype).requires_grad_() for h in (heads, kv, kv))
    inputs = {name: t.requires_grad_() if t.is_floating_point() else t for name, t in _inputs(pat, bound, gen).items()}
    described = ""
    with capture_launches() as records, launching_for(arch), _group_split_of(group_split):
        if isinstance(pat, ir.PatternIR):
            runner = _native_runner(pat, hw, config)
            attn.runner = runner  # the runner injected: the kernels native, the config the search picks for hw
            out = attn(q, k, v, sizes=sizes, **inputs)
            described = describe_launch(runner.last_config)
        else:
            from .recurrences.runner import RecurrenceRunner

            # the runner injected: Triton's kernels compiled natively, the chunk chosen for hw
            attn.runner = RecurrenceRunner(pat, "triton", None, hardware=hw, native=True)
            out = attn(q, k, v, sizes=sizes, **inputs)
            described = f"chunk {attn._last_call.get('q_tile')}"
        out.float().sum().backward()
    return records, described


@contextlib.contextmanager
def _group_split_of(split: int):
    """The dK/dV kernel launched with ``split`` programs per K/V head (a CPU call launches 1)."""
    from .backends.triton import kernel_launch as KL

    if split == 1:
        yield
        return
    saved = KL._group_split
    KL._group_split = lambda *args: split
    try:
        yield
    finally:
        KL._group_split = saved


def _native_runner(pat: ir.PatternIR, hw, config=None, branch: str | None = None):
    """A Triton runner of ``pat`` whose kernels are the native (CUDA) ones whatever the tensors' device, at
    ``config`` or the config the search picks for ``hw``; it keeps the kernel modules it loads (``modules``).
    ``branch``: its sources end in a comment naming it, so that each branch loads modules of its own."""
    from .backends.triton import runner as TB

    class Native(TB.TritonRunner):
        native = True
        if branch is not None:
            source_hook = staticmethod(lambda pat, bound, shape, config, source:
                                       TB.write_source(f"{source}\n# branch {branch}\n"))

        def __init__(self, pattern):
            super().__init__(pattern)
            self.modules: list = []

        def _config(self, bound, q, inputs, kv_heads=None):
            if config is not None:
                return config
            return TB.search_config(self.pattern, bound, hw, head_dim=q.shape[-1], dtype=q.dtype, inputs=inputs,
                                    kv_heads=kv_heads)

        def prepare(self, *args, **kwargs):
            launch = super().prepare(*args, **kwargs)
            self.modules.append(launch.module)
            return launch

    return Native(pat)


def _record_combined(attn, hw, *, arch: int, head_dim: int, dtype: torch.dtype, n: int | None, sizes: dict | None,
                     config, gen: torch.Generator, kv_heads: int = HEADS,
                     group_split: int = 1) -> tuple[list[Recorded], str]:
    """A combined pattern's call (every branch on its native runner), forward and backward, recorded; each
    launch names its branch (``Recorded.branch``), and the config in words is each branch's."""
    from ..compiler import evaluate as E

    pat = attn.pattern
    runners = {}
    for b in pat.branches:
        if not isinstance(b.pattern, ir.PatternIR):
            raise SpecError(f"branch '{b.name}' of '{pat.name}' is not a softmax pattern", where="argument pattern")
        runners[b.name] = attn.branches[b.name].runner = _native_runner(b.pattern, hw, config, branch=b.name)
    whole = next((b.pattern for b in pat.branches if b.pool is None), pat.branches[0].pattern)  # keys = queries
    N = E.bind_sizes(whole, n=n, nk=n, heads=HEADS, sizes=sizes, dk=head_dim).n
    q, k, v = (torch.randn(BATCH, h, N, head_dim, generator=gen).to(dtype).requires_grad_()
               for h in (HEADS, kv_heads, kv_heads))
    inputs = {d.name: torch.rand(HEADS, N, generator=gen).requires_grad_() for d in pat.gates}
    declared = {x.name for x in pat.inputs}
    for b in pat.branches:  # a branch's own inputs, of the shapes it declares
        own = [d.name for d in b.pattern.inputs if d.name in declared and d.name not in inputs]
        if own:
            bound = E.bind_sizes(b.pattern, n=N, heads=HEADS, sizes=sizes, dk=head_dim)
            made = _inputs(b.pattern, bound, gen)
            inputs.update({name: made[name].requires_grad_() if made[name].is_floating_point() else made[name]
                           for name in own})
    with capture_launches() as records, launching_for(arch), _group_split_of(group_split):
        out = attn(q, k, v, sizes=sizes, **inputs)
        out.float().sum().backward()
    described = {name: describe_launch(r.last_config) for name, r in runners.items() if r.last_config is not None}
    for rec in records:
        rec.branch = next((name for name, r in runners.items()
                           if any(getattr(m, rec.name, None) is rec.fn for m in r.modules)), None)
        rec.config = described.get(rec.branch, "")
    return records, "; ".join(f"{name}: {text}" for name, text in described.items())


def record_block(pattern, *, arch: int, head_dim: int, dtype: str, n: int | None = None,
                 sizes: dict | None = None) -> tuple[list[Recorded], str]:
    """A context-parallel block's launches (``runtime.parallel.blocks``; offsets as run-time arguments):
    the last half of the queries against the middle half of the keys, forward and backward, with the
    lse's gradient and the gradients of the float inputs the scores read (FoX's row sums, bias inputs)."""
    from ..compiler import evaluate as E
    from ..compiler.hardware import get_hardware
    from . import api
    from .backends.triton import runner as TB
    from .plan.cache import score_input_names

    attn = api.compile_attention(pattern, backend="triton")
    pat = attn.pattern
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is a recurrence: context parallelism chains its state, it has no blocks",
                        where="argument --block")
    if pat.route is not None:
        raise SpecError(f"'{pat.name}' routes: its blocks read a selection made across ranks; the offline "
                        "check of blocks takes patterns without a route", where="argument --block")
    gen = torch.Generator().manual_seed(0)
    heads = call_heads(pat)
    whole = E.bind_sizes(pat, n=n, heads=heads, sizes=sizes, dk=head_dim)
    N = whole.n
    q0, k0, half = N - N // 2, N // 4, N // 2
    bound = E.block_bound(whole, q0, half, k0, half)
    tdtype = DTYPES[dtype]
    q, k, v = (torch.randn(BATCH, heads, half, head_dim, generator=gen).to(tdtype) for _ in range(3))
    tensors, _ = E.bind_inputs(pat, whole, _inputs(pat, whole, gen, score_tables=True), batch=BATCH)
    wrt = tuple(name for name in tensors if name in score_input_names(pat) and tensors[name].is_floating_point())

    class Native(TB.TritonRunner):
        native = True
        hardware = get_hardware(ARCH_HARDWARE.get(arch, "h100"))  # the block's launch sized for this arch

    runner = Native(pat)
    with capture_launches() as records, launching_for(arch):
        out, lse = runner.block_forward(bound, q, k, v, tensors, head_dim**-0.5)
        runner.block_backward(bound, q, k, v, out.to(tdtype), lse, torch.randn_like(q), tensors, head_dim**-0.5,
                              dlse=torch.randn_like(lse), wrt=wrt)
    cfg = next(iter(runner.block_plans.values()))[1][0]
    return records, f"block {q0}+{half} x {k0}+{half}: " + describe_launch(cfg)


def describe_launch(cfg) -> str:
    """``64/64 flat w4 s3 | bwd 32/64 w8 s2``: a config's tiles and launch parameters, the
    backward's where it has its own."""
    tiles = "x".join(map(str, cfg.q_tile)) + "/" + "x".join(map(str, cfg.kv_tile))
    text = f"{tiles} {cfg.layout} w{cfg.num_warps} s{cfg.num_stages}"
    bw, bs = getattr(cfg, "bwd_num_warps", None), getattr(cfg, "bwd_num_stages", None)
    if bw or bs:
        own = getattr(cfg, "own_backward_tiles", False)
        b = cfg.backward_config() if own else cfg
        tiles = ("x".join(map(str, b.q_tile)) + "/" + "x".join(map(str, b.kv_tile)) + " ") if own else ""
        text += f" | bwd {tiles}w{bw or cfg.num_warps} s{bs or cfg.num_stages}"
        if getattr(cfg, "own_dq_tiles", False):
            dq = cfg.dq_config()
            text += " | dQ " + "x".join(map(str, dq.q_tile)) + "/" + "x".join(map(str, dq.kv_tile))
    return (text + (" | tma" if getattr(cfg, "tma", False) else "")
            + (" | dQ by atomics" if getattr(cfg, "atomic_dq", False) else "")
            + (" | forward warp-specialized" if getattr(cfg, "warp_specialize", False) else ""))


def check_pattern(pattern, *, archs=DEFAULT_ARCHS, head_dims=(64, 128), dtypes=("fp16",), n: int | None = None,
                  sizes: dict | None = None, label: str | None = None, block: bool = False,
                  kv_heads: int | None = None, group_split: int = 1, record=None) -> list[KernelReport]:
    """Every kernel of the pattern's forward and backward, per architecture, head dim and dtype.
    ``pattern``: a loaded pattern, a path or ``stdlib:NAME`` (as ``compile_attention``); ``block``: the
    kernels of a context-parallel block (``record_block``); ``kv_heads``, ``group_split``: as ``record_call``'s;
    ``record``: the call whose launches are checked, ``record_call``'s signature (default: ``record_call``; one
    launch over a paged KV cache: ``gpu_paged_check.check_paged``)."""
    name = label or getattr(pattern, "name", None) or str(pattern).removeprefix("stdlib:")
    if isinstance(pattern, str | os.PathLike):
        from ..spec.library import load

        pattern = load(pattern)
    if block and getattr(pattern, "kind", None) == "combined":
        raise SpecError(f"'{pattern.name}' combines several attentions (branches): the offline check of blocks "
                        "takes one softmax pattern", where="argument block",
                        hint="write a branch as its own declaration to check its blocks")
    archs, head_dims, dtypes = _check_args(archs, head_dims, dtypes)
    reports: list[KernelReport] = []
    for arch in archs:
        for d in head_dims:
            for dt in dtypes:
                records, config = (record or functools.partial(
                    record_call, block=block, kv_heads=kv_heads, group_split=group_split))(
                    pattern, arch=arch, head_dim=d, dtype=dt, n=n, sizes=sizes)
                if not records:
                    raise SpecError(f"'{name}' launched no Triton kernel", where="gpu check")
                for rec in records:
                    label = name if rec.branch is None else f"{name}/{rec.branch}"
                    reports.append(check_launch(rec, arch, pattern=label, head_dim=d, dtype=dt,
                                                config=rec.config or config))
    return reports


def _check_args(archs, head_dims, dtypes):
    archs = tuple(archs)
    for a in archs:
        if isinstance(a, bool) or not isinstance(a, int) or a not in SMEM_LIMIT:
            raise SpecError(f"unknown architecture {a!r}", where="argument arch",
                            hint="one of " + ", ".join(map(str, SMEM_LIMIT)))
        if not targets_available(a):
            raise SpecError(f"the installed Triton cannot compile for sm_{a}", where="argument arch")
    head_dims = tuple(head_dims)
    for d in head_dims:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 256:
            raise SpecError(f"head dims are ints in 1..256, got {d!r}", where="argument head_dim")
    dtypes = tuple(dtypes)
    for dt in dtypes:
        if dt not in DTYPES:
            raise SpecError(f"unknown dtype {dt!r}", where="argument dtype", hint="fp16, bf16 or fp32")
    return archs, head_dims, dtypes


def default_archs() -> tuple[int, ...]:
    """sm_80, sm_90, and sm_100 when the installed Triton targets it."""
    return DEFAULT_ARCHS + ((100,) if targets_available(100) else ())


__all__ = ["ARCH_HARDWARE", "KernelReport", "Recorded", "SMEM_LIMIT", "capture_launches", "check_launch",
           "check_pattern", "compile_launch", "default_archs", "loop_instructions", "native_kernel", "ptxas_usage",
           "record_call", "sass", "summary", "table", "targets_available", "tensor_core_counts"]
