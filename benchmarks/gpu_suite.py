"""The GPU suite: correctness at real sizes and timings against FlexAttention, SDPA
and flash-linear-attention, with the simulator's prediction beside each
measurement, written to one results file.

    python benchmarks/gpu_suite.py                 # on a GPU machine (about 5-8 minutes on an H100)
    python benchmarks/gpu_suite.py --toy           # CPU, Triton interpreter, toy sizes (CI)
    python benchmarks/gpu_suite.py --out FILE      # where the results go

Cost: GPU-only: without a CUDA device it exits at once (status 2), so on a CPU-only machine only
``--toy`` runs. On an H100 about 5-8 minutes (``--budget-s`` skips the timings left after it).
``--toy`` on a 2-core CPU: 25 s wall (24 s CPU, 2026-11-25, load average 4.5 from other jobs).

Runs on torch 2.11 + Triton 3.6 with no network. flash-linear-attention (``fla``)
is imported if installed (carried as a wheel); otherwise its baseline is skipped
and the file says so. attnc needs ``lark`` (carry it as a wheel where missing).

Cases (bf16, head dim 128, batch 1, 8 heads; ``--toy``: float32, head dim 16, 1 head):

- NATTEN neighborhood attention 1-D (32,768 tokens, window 2,048), 2-D (128x128,
  window 33x33) and 3-D (30x48x80, window 18x24x24): attnc's Triton kernels,
  forward and backward, against a float32 dense reference computed on 256
  sampled query rows with the window rule written here (independently of attnc);
  FlexAttention (a hand-written ``mask_mod``) measured against the same
  reference, for scale. Timed: attnc, FlexAttention, SDPA dense (flash; the
  dense baseline) and, where the boolean mask fits, SDPA with the mask.
- Causal attention (32,768 tokens): the schedule whose Q tiles do the most uneven work, where
  attnc's kernels launch longest first (``compiler.cost.launch_order``); the reference rule k <= q;
  timed also against SDPA with ``is_causal=True`` (FlashAttention's causal kernel).
- Variants, timed beside each softmax case where they apply: the same kernels in tile order where
  they took an order table, reading every tile index from the lists where they stepped through runs
  of consecutive tiles, the autotuner's Hopper backward trial (dK/dV on a KV tile of 128), the
  tiles loaded by TMA (tensor descriptors, Hopper and later), the forward warp-specialized on them (Hopper:
  its KV tiles in one loop, 4 warps a consumer group) and the backward in one kernel (dQ added
  by atomics, Hopper and later; its gradients compared with the kernels' own);
  one run measures what each is worth (``variant_rows``).
- The mamba2 recurrence (scalar gates) at T = 8,192, Dk = Dv = 128: attnc's
  Triton chunked kernels against attnc's chunked torch recurrence in float32
  (reference) and fla's ``chunk_simple_gla``; timed against fla.

Relative errors are ||a - b|| / ||b||; a bf16 result passes below 2e-2
(bf16 operands land between 1e-3 and 1e-2). The recurrence's gate gradient
``dg_t = sum_{s >= t} (q dq - k dk)_s`` amplifies dq's and dk's errors (its two
terms cancel): the row states the dg error that attnc's own dq and dk give through the
exact formula (``gate_grad_explained``), and dg passes under 2e-2, or within 1.5x of that
and under 5e-2. Timings: medians of
``triton.testing.do_bench`` on CUDA; in ``--toy`` the wall clock of the correctness
run (the interpreter: the numbers mean nothing there, the run proves the suite works).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _import_attnc():
    """``import attnc``; from a checkout that is not installed (the GPU machine), through a
    link named ``attnc`` to the repository root (the root is the package)."""
    try:
        import attnc  # noqa: F401
    except ImportError as err:
        if getattr(err, "name", "") == "lark":
            raise SystemExit("attnc needs lark: on a machine without network, copy its wheel there and pip install it") from err
        link_dir = Path(tempfile.mkdtemp(prefix="attnc-suite-"))
        (link_dir / "attnc").symlink_to(ROOT, target_is_directory=True)
        sys.path.insert(0, str(link_dir))
    import attnc

    return attnc


attnc = _import_attnc()

try:  # flash-linear-attention, if carried
    from fla.ops.simple_gla import chunk_simple_gla
except Exception as _fla_err:  # noqa: BLE001 (any import failure means: no fla baseline)
    chunk_simple_gla = None
    FLA_STATUS = f"skipped (fla not importable: {type(_fla_err).__name__}: {_fla_err})"
else:
    import fla

    FLA_STATUS = f"fla {getattr(fla, '__version__', '?')}"

PASS_REL = 2e-2


# ----------------------------------------------------------------- the cases
def _cases(toy: bool) -> list[dict]:
    if toy:
        return [
            {"name": "1-D", "pattern": "neighborhood_1d", "sizes": {"seq": 64}, "params": {"kernel_size": 16}},
            {"name": "2-D", "pattern": "neighborhood_2d", "sizes": {"height": 8, "width": 8},
             "params": {"kernel_size_y": 3, "kernel_size_x": 5}},
            {"name": "3-D", "pattern": "neighborhood_3d", "sizes": {"frames": 3, "height": 4, "width": 4},
             "params": {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 2}},
            {"name": "causal", "pattern": "causal", "sizes": {"seq": 64}, "params": {}},
        ]
    return [
        {"name": "1-D", "pattern": "neighborhood_1d", "sizes": {"seq": 32768}, "params": {"kernel_size": 2048}},
        {"name": "2-D", "pattern": "neighborhood_2d", "sizes": {"height": 128, "width": 128},
         "params": {"kernel_size_y": 33, "kernel_size_x": 33}},
        {"name": "3-D", "pattern": "neighborhood_3d", "sizes": {"frames": 30, "height": 48, "width": 80},
         "params": {"kernel_size_t": 18, "kernel_size_y": 24, "kernel_size_x": 24}},
        {"name": "causal", "pattern": "causal", "sizes": {"seq": 32768}, "params": {}},
    ]


#: The causal case's pattern (no stdlib entry: a sliding window as wide as the sequence is the same mask).
CAUSAL = "pattern causal\n  tokens seq\n  mask causal\n"


def _axes(case) -> tuple[list[int], list[int]]:
    """The case's token axes and its window per axis (none: causal)."""
    sizes = list(case["sizes"].values())
    p = case["params"]
    if case["pattern"] == "causal":
        return sizes, []
    if case["pattern"] == "neighborhood_1d":
        return sizes, [p["kernel_size"]]
    keys = ["kernel_size_y", "kernel_size_x"] if len(sizes) == 2 else ["kernel_size_t", "kernel_size_y", "kernel_size_x"]
    return sizes, [p[k] for k in keys]


def natten_keep(qi, ki, sizes: list[int], windows: list[int]):
    """NATTEN's non-causal window rule (stride 1, dilation 1) on flat row-major token
    indices, written out here independently of attnc: per axis, the w keys starting at
    clamp(i - w // 2, 0, L - w)."""
    keep = None
    stride = math.prod(sizes)
    for L, w in zip(sizes, windows, strict=True):
        stride //= L
        qc, kc = (qi // stride) % L, (ki // stride) % L
        start = torch.clamp(qc - w // 2, 0, L - w)
        ok = (kc >= start) & (kc < start + w)
        keep = ok if keep is None else keep & ok
    return keep


def case_label(case) -> str:
    """The case's name in the correctness table (with its pattern where that says more)."""
    return case["name"] if case["name"] == case["pattern"] else f"{case['name']} {case['pattern']}"


def case_keep(case, qi, ki, sizes: list[int], windows: list[int]):
    """The case's rule on flat token indices: k <= q for the causal case, NATTEN's window otherwise."""
    return ki <= qi if case["pattern"] == "causal" else natten_keep(qi, ki, sizes, windows)


# ----------------------------------------------------------------- helpers
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def gate_grad_from(q, k, dq, dk, vector: bool) -> torch.Tensor:
    """The log gates' gradient ``[H, T(, K)]`` from q, k and their gradients, for a call with no final-state
    gradient: ``dg_t = sum_{s >= t} (q dq - k dk)_s`` per channel (vector gates) or summed over channels,
    summed over the batch (float64). attnc's chunked backward and fla's both compute it so."""
    term = q.double() * dq.double() - k.double() * dk.double()
    if not vector:
        term = term.sum(-1)
    return term.sum(0).flip(1).cumsum(1).flip(1)


#: A gate gradient's relative error at most, whatever dq's and dk's explain (``gate_grad_ok``).
GATE_GRAD_CAP = 5e-2


def gate_grad_explained(q, k, dq, dk, dg_ref, vector: bool) -> float:
    """The relative error of the gate gradient computed exactly (float64, ``gate_grad_from``) from the
    run's own dq and dk: what their errors alone make of dg. The two terms of ``q dq - k dk`` largely
    cancel, so half-precision dq, dk errors near 2e-3 give dg errors near 2e-2 in any kernel that
    computes dg from them (perturbing a float64 mamba2 reference's dq, dk at T = 2048 by 2.4e-3
    relative moved dg by 2.6e-2; the H100 run measured dg 2.7e-2 with dq, dk at 2.4e-3)."""
    return rel(gate_grad_from(q, k, dq, dk, vector), dg_ref)


def gate_grad_ok(errs: dict, explained: float, tol: float) -> bool:
    """The gate gradient passes under ``tol``, or, when dq and dk pass, within 1.5x of the error that
    theirs explain (``gate_grad_explained``) and under ``GATE_GRAD_CAP``: a gate kernel that adds
    error of its own beyond that fails."""
    dg, dqk = errs["dg"], max(errs["dq"], errs["dk"])
    if not (math.isfinite(dg) and math.isfinite(dqk)):
        return False
    return dg < tol or (dqk < tol and dg <= 1.5 * explained and dg < GATE_GRAD_CAP)


def timed(fn, toy: bool) -> float:
    """Seconds per call: the median of do_bench on CUDA, one wall-clock call in --toy."""
    if toy:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3


def _hardware_name() -> str:
    if not torch.cuda.is_available():
        return "h100"
    name = torch.cuda.get_device_name().lower()
    for key in ("h200", "h100", "a100", "b200"):
        if key in name:
            return key
    return "h100"


def _fmt_ms(s) -> str:
    return "-" if s is None else f"{s * 1e3:.3f}"


class Budget:
    """Skips the remaining timings once the run's time budget is spent (recorded in the file)."""

    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def left(self, what: str) -> bool:
        if time.perf_counter() - self.start < self.seconds:
            return True
        self.skipped.append(what)
        return False


# ----------------------------------------------------------------- softmax cases
def softmax_case(case, *, device, dtype, heads, head_dim, toy, hw, budget, lines_c, lines_b):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sizes, windows = _axes(case)
    n = math.prod(sizes)
    gen = torch.Generator(device="cpu").manual_seed(len(case["sizes"]) + 10 * (case["pattern"] == "causal"))  # per case
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    dout = torch.randn(1, heads, n, head_dim, generator=gen).to(device=device, dtype=dtype)
    rows = torch.randperm(n, generator=gen)[: min(256, n)].to(device)
    flat = case["pattern"] in ("neighborhood_1d", "causal")
    spec = CAUSAL if case["pattern"] == "causal" else f"stdlib:{case['pattern']}"
    attn = attnc.compile_attention(spec, backend="triton", **case["params"], **({} if flat else {"sizes": case["sizes"]}))

    # attnc forward and backward (the loss restricted to the sampled rows, so the reference can be exact)
    mask_rows = torch.zeros(1, 1, n, 1, device=device, dtype=dtype)
    mask_rows[:, :, rows] = 1
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    out = attn(qa, ka, va)
    t1 = time.perf_counter()
    out.backward(dout * mask_rows)
    first = {"attnc_f": t1 - t0, "attnc_fb": time.perf_counter() - t0}  # --toy: these are its timings

    # the float32 reference on the sampled rows (dense over all keys, the rule above)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    keep = case_keep(case, rows[:, None], torch.arange(n, device=device)[None], sizes, windows)
    s = (qr[:, :, rows] @ kr.transpose(-1, -2)) / math.sqrt(head_dim)
    ref = torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ vr
    ref.backward(dout[:, :, rows].float())
    errs = {"out": rel(out[:, :, rows].detach(), ref.detach()), "dq": rel(qa.grad[:, :, rows], qr.grad[:, :, rows]),
            "dk": rel(ka.grad, kr.grad), "dv": rel(va.grad, vr.grad)}

    # FlexAttention with the rule above, against the same reference (for scale)
    def mask_mod(b, h, q_idx, kv_idx):
        return case_keep(case, q_idx, kv_idx, sizes, windows)

    try:  # on CUDA without materialising the n x n mask (115,200^2 at 3-D)
        bm = create_block_mask(mask_mod, 1, 1, n, n, device=device, _compile=not toy)
    except TypeError:
        bm = create_block_mask(mask_mod, 1, 1, n, n, device=device)
    flex = flex_attention if toy else torch.compile(flex_attention)
    # (FlexAttention has no backward on CPU: --toy checks its forward only)
    qf, kf, vf = (t.detach().clone().requires_grad_(not toy) for t in (q, k, v))
    fout = flex(qf, kf, vf, block_mask=bm)
    ferrs = {"out": rel(fout[:, :, rows].detach(), ref.detach()), "dk": math.nan}
    if not toy:
        fout.backward(dout * mask_rows)
        ferrs["dk"] = rel(kf.grad, kr.grad)
    ok = all(e < PASS_REL for e in errs.values()) and all(math.isfinite(e) for e in errs.values())
    lines_c.append(f"| {case_label(case)} | {'x'.join(map(str, sizes))} | "
                   f"{'x'.join(map(str, windows)) or 'causal'} | {errs['out']:.2e} | {errs['dq']:.2e} | {errs['dk']:.2e} | "
                   f"{errs['dv']:.2e} | {ferrs['out']:.2e} / {ferrs['dk']:.2e} | {'PASS' if ok else 'FAIL'} |")

    # timings, with the simulator's prediction beside them
    # the simulator on the schedule that ran (its tile shapes), on the model of this GPU
    rep = attn.report(hardware=hw, dtype="bf16")
    t = dict(first) if toy else {}
    if budget.left(f"{case['name']} timings"):
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

        def fwd_bwd(f):
            def run():
                o = f(qg, kg, vg)
                o.backward(dout)
                qg.grad = kg.grad = vg.grad = None
            return run

        with torch.no_grad():
            if not toy:  # (the interpreter is slow: --toy times the correctness run above instead)
                t["attnc_f"] = timed(lambda: attn(q, k, v), toy)
            t["flex_f"] = timed(lambda: flex(q, k, v, block_mask=bm), toy)
            t["sdpa_f"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), toy)
        if not toy:
            t["attnc_fb"] = timed(fwd_bwd(attn), toy)
            t["flex_fb"] = timed(fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=bm)), toy)
        t["sdpa_fb"] = timed(fwd_bwd(torch.nn.functional.scaled_dot_product_attention), toy)
        if case["pattern"] == "causal":  # the dense kernel's own causal form: the baseline that case has
            causal_sdpa = lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
            with torch.no_grad():
                t["sdpa_causal_f"] = timed(lambda: causal_sdpa(q, k, v), toy)
            t["sdpa_causal_fb"] = timed(fwd_bwd(causal_sdpa), toy)
        elif n * n <= 2**31:  # the boolean mask fits easily (2 GiB at most)
            dense_mask = natten_keep(torch.arange(n, device=device)[:, None], torch.arange(n, device=device)[None],
                                     sizes, windows)
            with torch.no_grad():
                t["sdpa_mask_f"] = timed(lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, attn_mask=dense_mask), toy)
            del dense_mask
    pf, pb = rep.best.forward_s, rep.best.backward_s
    # the config that ran (forward; backward and dQ tiles where they have their own), for later calibration
    from attnc.runtime.gpu_check import describe_launch

    cfg = getattr(attn.runner, "last_config", None)
    ran = f" ({describe_launch(cfg).replace(' | ', '; ')})" if cfg is not None else ""
    lines_b.append(
        f"| {case['name']} | attnc triton{ran} | {_fmt_ms(t.get('attnc_f'))} | {_fmt_ms(pf)} | "
        f"{_fmt_ms(t.get('attnc_fb'))} | {_fmt_ms(pf + pb)} | "
        + (f"{t['sdpa_f'] / t['attnc_f']:.2f}x" if t else "-") + f" | {rep.predicted_speedup:.2f}x |")
    lines_b.append(f"| {case['name']} | FlexAttention | {_fmt_ms(t.get('flex_f'))} | | {_fmt_ms(t.get('flex_fb'))} | | "
                   + (f"{t['sdpa_f'] / t['flex_f']:.2f}x" if t else "-") + " | |")
    lines_b.append(f"| {case['name']} | SDPA dense | {_fmt_ms(t.get('sdpa_f'))} | {_fmt_ms(rep.dense_forward_s)} | "
                   f"{_fmt_ms(t.get('sdpa_fb'))} | {_fmt_ms(rep.dense_forward_s + rep.dense_backward_s)} | 1.00x | |")
    if "sdpa_causal_f" in t:
        lines_b.append(f"| {case['name']} | SDPA causal (is_causal) | {_fmt_ms(t['sdpa_causal_f'])} | | "
                       f"{_fmt_ms(t['sdpa_causal_fb'])} | | {t['sdpa_f'] / t['sdpa_causal_f']:.2f}x | |")
    if "sdpa_mask_f" in t:
        lines_b.append(f"| {case['name']} | SDPA + bool mask | {_fmt_ms(t['sdpa_mask_f'])} | | | | "
                       f"{t['sdpa_f'] / t['sdpa_mask_f']:.2f}x | |")
    if t and budget.left(f"{case['name']} variants"):
        variant_rows(case, spec, flat, attn, (q, k, v, dout), t, toy=toy, hw=hw, head_dim=head_dim, lines_b=lines_b)
    return ok


def _used_order(attn) -> bool:
    """Whether the module's latest call launched a kernel through an order table (``compiler.cost.launch_order``)."""
    plan = getattr(attn.runner, "last_plan", None)
    state = plan.device_state if plan is not None else {}
    return any(table is not None for key, tables in state.items() if key[0] == "order" for table in tables.values())


def _used_runs(attn) -> bool:
    """Whether the module's latest call stepped through a tile list as a run of consecutive tiles
    (``TileSchedule.runs``: no index load in the kernel's loop)."""
    runs = getattr(getattr(attn.runner, "last_plan", None), "device_state", {}).get(("runs",), {})
    return any(runs.values())


def variant_rows(case, spec, flat, attn, tensors, t, *, toy, hw, head_dim, lines_b) -> None:
    """The same kernels launched otherwise, timed in this process beside the rows above, so that one GPU
    run decides what to keep: in tile order where the kernels took an order table (always on the toy
    causal case, whose sizes take none, to run the path); with the forward's scale applied to every score before
    the row max (``POS_SCALE`` off) where its scores are the scaled q.k alone; reading every tile index from the lists where
    the kernels stepped through runs of consecutive tiles; on the tuner's Hopper backward
    (``autotune.wide_kv_backward``) where it applies to the config that ran; with that config's streamed
    tiles loaded by TMA (``KernelConfig.tma``) where each tile is one box (``search.tma_fits``), and its forward
    warp-specialized on them (``autotune.warp_specialized_forward``), its output's relative difference from the
    config's own in the row's label; and with its
    backward in one kernel (``autotune.atomic_dq_backward``: dQ added by atomics), its gradients' relative
    difference from the config's own in the row's label (atomics add in no fixed order)."""
    from attnc.compiler.analysis import evaluate as E
    from attnc.compiler.codegen.triton.scores import scale_in_exponent
    from attnc.compiler.cost.hardware import get_hardware
    from attnc.compiler.cost.search import ScheduleSearch, has_tma, tma_fits
    from attnc.runtime.backends.triton import forward as FW
    from attnc.runtime.backends.triton import kernel_launch as KL
    from attnc.runtime.gpu_check import describe_launch
    from attnc.runtime.tuning.autotune import (
        atomic_dq_backward,
        warp_specialized_forward,
        wide_kv_backward,
    )

    q, k, v, dout = tensors
    with torch.no_grad():  # the forward's plan as the module's last (a backward on its own tiles plans its own)
        attn(q, k, v)

    def module():
        return attnc.compile_attention(spec, backend="triton", **case["params"], **({} if flat else {"sizes": case["sizes"]}))

    def time_module(mod) -> tuple[float, float]:
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

        def fb():
            o = mod(qg, kg, vg)
            o.backward(dout)
            qg.grad = kg.grad = vg.grad = None

        with torch.no_grad():
            f = timed(lambda: mod(q, k, v), toy)
        return f, timed(fb, toy)

    def row(label: str, f: float, fb: float) -> None:
        lines_b.append(f"| {case['name']} | attnc triton, {label} | {_fmt_ms(f)} | | {_fmt_ms(fb)} | | "
                       f"{t['sdpa_f'] / f:.2f}x | |")

    if _used_order(attn) or (toy and case["pattern"] == "causal"):
        saved = KL.choose_order
        KL.choose_order = lambda full, partial, repeat, sms: None
        try:
            row("tile order (no order tables)", *time_module(module()))
        finally:
            KL.choose_order = saved
    if scale_in_exponent(attn.pattern):
        saved_sign = FW.scale_sign
        FW.scale_sign = lambda launch, scale: dict.fromkeys(saved_sign(launch, scale), False)
        try:
            row("scale applied to the scores first (not in the exponent)", *time_module(module()))
        finally:
            FW.scale_sign = saved_sign
    if _used_runs(attn):
        saved_runs = KL.runs_meta
        KL.runs_meta = lambda launch, *kinds: {f"{kind}_RUN": False for kind in kinds}
        try:
            row("lists by index (no runs)", *time_module(module()))
        finally:
            KL.runs_meta = saved_runs
    pick = getattr(attn.runner, "last_config", None)
    if pick is None:
        return
    pat = attn.pattern
    n = math.prod(case["sizes"].values())
    bound = E.bind_sizes(pat, heads=q.shape[1], **({"n": n} if flat else {"sizes": case["sizes"]}))
    search = ScheduleSearch(pat, bound, get_hardware(hw), head_dim=head_dim)
    wide = wide_kv_backward(pick, search)
    if wide is not None:
        mod = module()
        mod.runner._config = lambda *args: wide  # this config instead of the search's pick
        row(f"wide-KV backward ({describe_launch(wide).replace(' | ', '; ')})", *time_module(mod))
    # the same config with its streamed tiles loaded by TMA, where each tile is one box (runs of rows, boxes of a grid; on
    # the toy run too: the interpreter loads descriptors, and CPU tensors launch as on an H100)
    sched = attn.runner.last_plan.schedule
    if (not pick.tma and tma_fits(pick, sched.q_extents, sched.kv_extents)
            and (toy or has_tma(get_hardware(hw).arch))):
        with_tma = dataclasses.replace(pick, tma=True)
        mod = module()
        mod.runner._config = lambda *args: with_tma
        row("TMA loads (tensor descriptors)", *time_module(mod))
        # and with its forward warp-specialized on those loads (the toy run's tiles take no Hopper trial: the
        # same launch specialized, to run the path)
        specialized = warp_specialized_forward(pick, pat, search.hw, sched.q_extents, sched.kv_extents) or (
            dataclasses.replace(with_tma, warp_specialize=True) if toy else None)
        if specialized is not None:
            mod = module()
            mod.runner._config = lambda *args: specialized
            with torch.no_grad():
                worst = rel(mod(q, k, v), attn(q, k, v))
            row(f"forward warp-specialized ({describe_launch(specialized).split(' | ')[0]}; "
                f"output within {worst:.1e} of the config's)", *time_module(mod))
    fused = atomic_dq_backward(pick, pat, search.hw)
    if fused is not None and not pick.atomic_dq:
        mod = module()
        mod.runner._config = lambda *args: fused
        own, one = (_grads(m, q, k, v, dout) for m in (attn, mod))  # the config that ran, and with the trial
        worst = max(rel(a, b) for a, b in zip(one, own, strict=True))
        row(f"backward in one kernel (dQ by atomics; gradients within {worst:.1e} of two kernels')",
            *time_module(mod))


def _grads(mod, q, k, v, dout) -> tuple:
    """dq, dk, dv of ``mod`` at q, k, v for the output's gradient ``dout``."""
    leaves = tuple(x.detach().clone().requires_grad_() for x in (q, k, v))
    return torch.autograd.grad(mod(*leaves), leaves, dout)


# ----------------------------------------------------------------- the recurrence
def recurrence_case(*, device, dtype, heads, head_dim, T, toy, hw, budget, lines_c, lines_b):
    gen = torch.Generator(device="cpu").manual_seed(7)
    q, k, v = (torch.randn(1, heads, T, head_dim, generator=gen).to(device=device, dtype=dtype) * 0.5 for _ in range(3))
    g = (-torch.rand(heads, T, generator=gen) * 0.1).to(device)  # log gates in [-0.1, 0]
    dout = torch.randn(1, heads, T, head_dim, generator=gen).to(device=device, dtype=dtype)
    scale = 1.0 / math.sqrt(head_dim)
    tri = attnc.compile_attention("stdlib:mamba2", backend="triton")
    ref_mod = attnc.compile_attention("stdlib:mamba2", backend="cpu")  # the chunked torch recurrence

    def grads(mod, qq, kk, vv, gg, cast=None):
        qq, kk, vv = (x.detach().clone().to(cast or x.dtype).requires_grad_() for x in (qq, kk, vv))
        gg = gg.detach().clone().requires_grad_()
        o = mod(qq, kk, vv, g=gg, scale=scale)
        o.backward(dout.to(o.dtype))
        return o.detach(), qq.grad, kk.grad, vv.grad, gg.grad

    t0 = time.perf_counter()
    got = grads(tri, q, k, v, g)
    first = {"attnc_fb": time.perf_counter() - t0}  # --toy: its timing
    ref = grads(ref_mod, q, k, v, g, cast=torch.float32)
    errs = [rel(a, b) for a, b in zip(got, ref, strict=True)]
    explained = gate_grad_explained(q.float(), k.float(), got[1], got[2], ref[4], vector=False)
    named = dict(zip(["out", "dq", "dk", "dv", "dg"], errs, strict=True))
    fla_err = "skipped"
    fla_fn = None
    if chunk_simple_gla is not None and device.type == "cuda":
        def fla_fn(qq, kk, vv, gg):  # fla's layout: [B, T, H, D], gates [B, T, H]
            o, _ = chunk_simple_gla(qq.transpose(1, 2).contiguous(), kk.transpose(1, 2).contiguous(),
                                    vv.transpose(1, 2).contiguous(), g=gg.t()[None].float().contiguous(), scale=scale)
            return o.transpose(1, 2)

        try:
            fo = fla_fn(q, k, v, g)
            fla_err = f"{rel(fo, ref[0]):.2e}"
        except Exception as err:  # noqa: BLE001 (a baseline that fails is reported, not fatal)
            fla_err = f"failed: {type(err).__name__}: {err}"
            fla_fn = None
    ok = all(math.isfinite(e) and e < PASS_REL for e in errs[:4]) and gate_grad_ok(named, explained, PASS_REL)
    lines_c.append(f"| mamba2 recurrence | T={T} | Dk=Dv={head_dim} | {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} | "
                   f"{errs[3]:.2e} (dg {errs[4]:.2e}; dq, dk's explain {explained:.2e}) | fla out: {fla_err} | "
                   f"{'PASS' if ok else 'FAIL'} |")

    rep = attnc.simulate("stdlib:mamba2", n=T, heads=heads, head_dim=head_dim, hardware=hw, dtype="bf16")
    t = dict(first) if toy else {}
    if not toy and budget.left("recurrence timings"):
        with torch.no_grad():
            t["attnc_f"] = timed(lambda: tri(q, k, v, g=g, scale=scale), toy)
            if fla_fn is not None:
                t["fla_f"] = timed(lambda: fla_fn(q, k, v, g), toy)
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

        def fb(f):
            def run():
                f(qg, kg, vg).backward(dout)
                qg.grad = kg.grad = vg.grad = None
            return run

        t["attnc_fb"] = timed(fb(lambda a, b, c: tri(a, b, c, g=g, scale=scale)), toy)
        if fla_fn is not None:
            t["fla_fb"] = timed(fb(lambda a, b, c: fla_fn(a, b, c, g)), toy)
    best = rep.best
    lines_b.append(f"| mamba2 T={T} | attnc triton | {_fmt_ms(t.get('attnc_f'))} | {_fmt_ms(best.forward_s)} | "
                   f"{_fmt_ms(t.get('attnc_fb'))} | {_fmt_ms(best.forward_s + best.backward_s)} | | |")
    lines_b.append(f"| mamba2 T={T} | fla chunk_simple_gla | {_fmt_ms(t.get('fla_f'))} | | {_fmt_ms(t.get('fla_fb'))} "
                   f"| | | {'' if fla_fn is not None else FLA_STATUS} |")
    return ok


# ----------------------------------------------------------------- main
def fit_ladder_lines(toy: bool) -> list[str]:
    """The kernels this run launched on a lower rung of the fit ladder than their config picked (fewer
    stages or warps, or lists read by index: ``runtime.kernel_fit``), so that a timing is read against
    what ran, not what the table's config says."""
    from attnc.runtime import kernel_fit

    if toy:
        return ["## Fit ladder", "", "- the interpreter launches every kernel as picked (no ladder)", ""]
    lowered = kernel_fit.lowered()
    return ["## Fit ladder (kernels launched below the rung their config picked)", "",
            *([f"- {x}" for x in lowered] or ["- none: every kernel launched as picked"]), ""]


def suite_args(argv, doc: str, results: str, budget_s: float) -> argparse.Namespace:
    """The command line every GPU suite takes: --toy, --out (default ``benchmarks/results/RESULTS-GPU-DATE.md``)
    and --budget-s."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="CPU, Triton interpreter, toy sizes")
    ap.add_argument("--out", default=None, help=f"results file (default: benchmarks/results/{results}-GPU-DATE.md)")
    ap.add_argument("--budget-s", type=float, default=budget_s, help="skip remaining timings after this many seconds")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = suite_args(argv, __doc__, "gpu-suite", 420.0)
    start = time.perf_counter()
    toy = args.toy
    if not toy and not torch.cuda.is_available():
        print("no CUDA device: run with --toy for the interpreter check", file=sys.stderr)
        return 2
    device = torch.device("cpu" if toy else "cuda")
    dtype = torch.float32 if toy else torch.bfloat16
    heads, head_dim, T = (1, 16, 64) if toy else (8, 128, 8192)
    hw = _hardware_name()
    import triton

    gpu = "CPU (Triton interpreter, --toy)" if toy else torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    budget = Budget(args.budget_s)
    lines_c = ["| case | sizes | window | out | dq | dk | dv | FlexAttention out / dk | verdict |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines_b = ["| case | kernel | forward ms | predicted | fwd+bwd ms | predicted | speedup vs SDPA dense "
               "(measured) | predicted |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"gpu-suite-{hw}-{date}.md" if not toy else f"gpu-suite-toy-{date}.md")

    def write(final: bool) -> None:
        """The results file; written after every case too (a run stopped at its limit keeps what it had)."""
        total = time.perf_counter() - start
        text = [
            f"# GPU suite ({date})", "",
            f"- device: {gpu}; torch {torch.__version__}; Triton {triton.__version__}; Python {platform.python_version()}",
            f"- flash-linear-attention: {FLA_STATUS}",
            f"- dtype {str(dtype).replace('torch.', '')}, head dim {head_dim}, batch 1, {heads} heads; simulator "
            f"hardware model: {hw}" + (" (toy sizes: the predictions are for that GPU, the times for the interpreter)"
                                       if toy else ""),
            f"- total {total:.0f} s" + (f"; timings skipped over the {args.budget_s:.0f} s budget: "
                                        + ", ".join(budget.skipped) if budget.skipped else ""),
            f"- verdict: {'PASS' if not failures else 'FAIL: ' + ', '.join(failures)}"
            + ("" if final else " (so far: the run had not finished)"),
            "", "## Correctness (relative error against a float32 dense reference on 256 sampled query rows; "
            f"recurrence: against attnc's chunked torch recurrence in float32; pass < {PASS_REL:g})", "", *lines_c,
            "", "## Timings (medians; the simulator's prediction beside each measurement)", "", *lines_b, "",
            *fit_ladder_lines(toy),
        ]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("\n".join(text))
        if final:
            print("\n".join(text))

    failures = []
    for case in _cases(toy):
        print(f"[{time.perf_counter() - start:6.1f} s] {case['name']} {case['pattern']}", flush=True)
        try:
            if not softmax_case(case, device=device, dtype=dtype, heads=heads, head_dim=head_dim, toy=toy, hw=hw,
                                budget=budget, lines_c=lines_c, lines_b=lines_b):
                failures.append(case["name"])
        except Exception:  # noqa: BLE001 (record and go on: one broken case must not hide the others)
            traceback.print_exc()
            failures.append(f"{case['name']} (error)")
            lines_c.append(f"| {case_label(case)} | error: see the log | | | | | | | FAIL |")
        write(False)
    print(f"[{time.perf_counter() - start:6.1f} s] mamba2 recurrence T={T}", flush=True)
    try:
        if not recurrence_case(device=device, dtype=dtype, heads=heads, head_dim=head_dim, T=T, toy=toy, hw=hw,
                               budget=budget, lines_c=lines_c, lines_b=lines_b):
            failures.append("recurrence")
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        failures.append("recurrence (error)")
        lines_c.append("| mamba2 recurrence | error: see the log | | | | | | | FAIL |")
    write(True)
    print(f"wrote {out_path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
