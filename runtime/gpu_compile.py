"""A recorded launch compiled for ``sm_<arch>`` without a GPU, and what it would meet (the seam: the compiler's
output, not the call): ``compile_launch`` binds and specialises a record as ``JITFunction.run`` would and compiles
it with ``triton.compile`` for a ``GPUTarget``; ``ptxas_usage`` reads registers and spills from ``ptxas -v``,
``sass`` and ``tensor_core_counts`` the instructions; ``check_launch`` gives a ``KernelReport``."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import os
import re
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field

from . import kernel_fit
from .gpu_launches import SMEM_LIMIT, Recorded, native_kernel


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

