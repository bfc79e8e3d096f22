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
import functools
import os
import warnings

import sympy
import torch

from ..compiler.analysis.binding import kernel_head_dim
from ..compiler.cost.model import checked_group_split, checked_kv_heads
from ..core import ir
from ..core.errors import SpecError
from .gpu_compile import (  # noqa: F401 (this module's public names)
    KernelReport,
    _kernel_name,
    check_launch,
    compile_launch,
    loop_instructions,
    ptxas_usage,
    sass,
    tensor_core_counts,
)
from .gpu_launches import (  # noqa: F401 (this module's public names)
    _LOCK,
    ARCH_HARDWARE,
    SMEM_LIMIT,
    Recorded,
    capture_launches,
    launching_for,
    native_kernel,
)
from .gpu_report import HEADER, summary, table  # noqa: F401 (this module's public names)
from .numerics import TORCH_DTYPES
from .plan.clusters import SCORE_TABLES
from .tritonenv import interpreting

DEFAULT_ARCHS = (80, 90)
DTYPES = TORCH_DTYPES
#: Batch and heads of the recorded call: the kernels do not depend on them beyond the grid.
BATCH, HEADS = 1, 2


def call_heads(pat) -> int:
    """The query heads of a recorded call: ``HEADS``, or the count a parameter given one value per head
    fixes (``NAME[heads]``)."""
    counts = {count for _, count in getattr(pat, "head_params", ())}
    return counts.pop() if counts else HEADS


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
    from ..compiler.analysis import evaluate as E
    from ..compiler.cost.hardware import get_hardware
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


def branch_of(rec: Recorded, runners: dict) -> str | None:
    """The branch whose native runner (``_native_runner``: it keeps the modules it loads) holds ``rec``'s kernel, or
    None (a kernel of a module no branch loaded)."""
    return next((name for name, r in runners.items() if any(getattr(m, rec.name, None) is rec.fn for m in r.modules)),
                None)


def _record_combined(attn, hw, *, arch: int, head_dim: int, dtype: torch.dtype, n: int | None, sizes: dict | None,
                     config, gen: torch.Generator, kv_heads: int = HEADS,
                     group_split: int = 1) -> tuple[list[Recorded], str]:
    """A combined pattern's call (every branch on its native runner), forward and backward, recorded; each
    launch names its branch (``Recorded.branch``), and the config in words is each branch's."""
    from ..compiler.analysis import evaluate as E

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
        rec.branch = branch_of(rec, runners)
        rec.config = described.get(rec.branch, "")
    return records, "; ".join(f"{name}: {text}" for name, text in described.items())


def record_block(pattern, *, arch: int, head_dim: int, dtype: str, n: int | None = None,
                 sizes: dict | None = None) -> tuple[list[Recorded], str]:
    """A context-parallel block's launches (``runtime.parallel.blocks``; offsets as run-time arguments):
    the last half of the queries against the middle half of the keys, forward and backward, with the
    lse's gradient and the gradients of the float inputs the scores read (FoX's row sums, bias inputs)."""
    from ..compiler.analysis import evaluate as E
    from ..compiler.cost.hardware import get_hardware
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
    head_dims = tuple(kernel_head_dim(d) for d in head_dims)
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

