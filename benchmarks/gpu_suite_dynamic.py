"""The GPU suite, part two: run-time selection (routes), the delta rule and Titans, each against the
library its users run today, with the selection timed apart from the attention.

    python benchmarks/gpu_suite_dynamic.py              # on a GPU machine (a few minutes on an H100)
    python benchmarks/gpu_suite_dynamic.py --toy        # CPU, Triton interpreter, toy sizes (CI)
    python benchmarks/gpu_suite_dynamic.py --out FILE   # where the results go

Cost: GPU-only: without a CUDA device it exits at once (status 2), so on a CPU-only machine only
``--toy`` runs. On an H100 a few minutes (not measured as one run; ``--budget-s`` skips the timings
left after it). ``--toy`` on a 2-core CPU: took 15 s wall (14 s CPU, 2026-11-25, load average 4.5
from other jobs).

Runs on torch 2.11 + Triton 3.6 with no network, as benchmarks/gpu_suite.py (it imports that file's
helpers). flash-linear-attention (``fla``) is used where installed (carried as a wheel).

Routes (bf16, head dim 128, batch 1, 8 heads, T = 16,384; ``--toy``: float32, head dim 16, 1 head, T = 96):

- ``moba`` (blocks of 512, top 4) and ``token_topk`` (top 2,048): attnc ``backend="triton"``, whose every
  call selects on the device and then attends; the selection alone (attnc's routing step, timed by
  wrapping it); FlexAttention as its users write it, every call: the same rule in torch, a new
  ``create_block_mask`` from that selection, the compiled ``flex_attention``; SDPA causal (dense
  flash) for scale. Correctness: 256 sampled query rows against a float32 dense reference of the rule
  written here (independently of attnc), attnc's and Flex's.
- ``xattention`` and ``vertical_slash`` (the stdlib defaults, T = 8,192): the same, but the rule is not
  rewritten here: attnc's own selection of the inputs (``materialize_mask(q=, k=)``, checked against
  naive implementations of the authors' rules in the CPU tests) is the reference rows' mask and is
  handed to Flex for free (Flex's time then holds no selection; attnc's does).
- The delta rule: ``gated_delta_net`` and ``kda`` (qk_l2norm on) at T = 8,192 and 32,768, 16 heads,
  Dk = Dv = 128 (``--toy``: T = 96, 1 head, 16): attnc's Triton kernels against attnc's chunked torch
  form in float32 (the reference: output and every gradient) and fla's ``chunk_gated_delta_rule`` /
  ``chunk_kda`` (output), timed forward and forward + backward against fla.
- Titans' neural memory (``stdlib:titans``) at the same sizes: attnc's Triton kernels against attnc's chunked
  torch form in float32 (output and every gradient: q, k, v, the decay, theta, eta), timed forward and
  forward + backward against that torch form on the same GPU (no public library computes this rule).

Relative errors are ||a - b|| / ||b|` (pass below 2e-2 in bf16, as gpu_suite.py). Timings: medians
of ``triton.testing.do_bench`` on CUDA; ``--toy`` records one wall-clock call (the interpreter: the
numbers mean nothing there, the run proves the suite works).
"""

from __future__ import annotations

import datetime
import math
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_suite as base  # noqa: E402  (attnc's import from a checkout, rel, timed, Budget)
from bench_flex import StepTimer  # noqa: E402  (after gpu_suite: attnc is importable by then)

attnc = base.attnc
ROOT = base.ROOT
PASS_REL = base.PASS_REL

try:  # flash-linear-attention, if carried
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.kda import chunk_kda
except Exception as _fla_err:  # noqa: BLE001 (any import failure means: no fla baseline)
    chunk_gated_delta_rule = chunk_kda = None
    FLA_STATUS = f"skipped (fla's delta-rule ops not importable: {type(_fla_err).__name__}: {_fla_err})"
else:
    import fla

    FLA_STATUS = f"fla {getattr(fla, '__version__', '?')}"


def training_step(f, q, k, v, dout):
    """A closure running ``f``'s forward and backward on fresh leaves of q, k, v (their gradients dropped)."""
    qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def run():
        f(qg, kg, vg).backward(dout)
        qg.grad = kg.grad = vg.grad = None

    return run


# ----------------------------------------------------------------- routes: the users' own selection
def moba_selection(q: torch.Tensor, k: torch.Tensor, block: int, topk: int) -> torch.Tensor:
    """MoBA's rule written here: q . mean(k_block) (fp32, unscaled), blocks starting after the query
    excluded, the own block forced; bool ``[H, N, blocks]`` (batch 1; ties as torch.topk)."""
    _, H, N, _ = q.shape
    nb = -(-N // block)
    counts = torch.bincount(torch.arange(N, device=q.device) // block, minlength=nb).float()
    k_mean = F.pad(k[0].float(), (0, 0, 0, nb * block - N)).unflatten(1, (nb, block)).sum(2) / counts[None, :, None]
    score = q[0].float() @ k_mean.transpose(-1, -2)  # [H, N, nb]
    pos = torch.arange(N, device=q.device)
    score = score.masked_fill((torch.arange(nb, device=q.device) * block)[None, None] > pos[None, :, None], -math.inf)
    score = score.scatter(-1, (pos // block)[None, :, None].expand(H, N, 1), math.inf)
    chosen = score.topk(min(topk, nb), dim=-1).indices
    return torch.zeros(H, N, nb, dtype=torch.bool, device=q.device).scatter_(-1, chosen, True) & (score > -math.inf)


def token_selection(q: torch.Tensor, k: torch.Tensor, topk: int, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Token top-k written here: per query the ``topk`` causal keys of highest q . k (fp32, unscaled);
    bool ``[H, rows, N]`` (all rows, or the given query rows)."""
    N = k.shape[2]
    rows = torch.arange(N, device=q.device) if rows is None else rows
    out = torch.empty(q.shape[1], len(rows), N, dtype=torch.bool, device=q.device)
    for start in range(0, len(rows), 2048):  # scores of 2,048 rows at a time
        part = rows[start:start + 2048]
        score = q[0, :, part].float() @ k[0].float().transpose(-1, -2)
        score = score.masked_fill(torch.arange(N, device=q.device)[None, None] > part[None, :, None], -math.inf)
        chosen = score.topk(min(topk, N), dim=-1).indices
        out[:, start:start + 2048] = torch.zeros_like(score, dtype=torch.bool).scatter_(-1, chosen, True) & (
            score > -math.inf)
    return out


def route_cases(toy: bool) -> list[dict]:
    """``given``: the selection is attnc's own (``materialize_mask(q=, k=)``, its rule checked against naive
    implementations in the CPU tests), handed to the reference rows and to Flex for free."""
    if toy:
        return [{"name": "moba", "params": {"block": 16, "topk": 2}, "T": 96},
                {"name": "token_topk", "params": {"topk": 12}, "T": 96},
                {"name": "xattention", "params": {"block": 16, "stride": 4}, "T": 96, "given": True},
                {"name": "vertical_slash", "params": {"vertical": 8, "slash": 8, "last_q": 16, "sinks": 2,
                                                      "local": 4, "slash_min": 4}, "T": 96, "given": True}]
    return [{"name": "moba", "params": {"block": 512, "topk": 4}, "T": 16384},
            {"name": "token_topk", "params": {"topk": 2048}, "T": 16384},
            {"name": "xattention", "params": {}, "T": 8192, "given": True},
            {"name": "vertical_slash", "params": {}, "T": 8192, "given": True}]


def _keep_rows(case, q, k, rows, given) -> torch.Tensor:
    """The keys each sampled query row attends, ``[H, rows, N]``, by the rules written here (or given)."""
    if given is not None:
        return given[:, rows]
    T = k.shape[2]
    causal = torch.arange(T, device=q.device)[None, None] <= rows[None, :, None]
    if case["name"] == "moba":
        block = case["params"]["block"]
        sel = moba_selection(q, k, block, case["params"]["topk"])[:, rows]
        return causal & sel[..., torch.arange(T, device=q.device) // block]
    return causal & token_selection(q, k, case["params"]["topk"], rows)


def route_case(case, *, device, dtype, heads, head_dim, toy, budget, lines_c, lines_b) -> bool:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, name, params = case["T"], case["name"], case["params"]
    gen = torch.Generator(device="cpu").manual_seed(11)
    q, k, v, dout = (torch.randn(1, heads, T, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    rows = torch.randperm(T, generator=gen)[: min(256, T)].to(device)
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **params)

    given = None
    if case.get("given"):  # attnc's own selection of these q and k, on the CPU once: [H, T, T]
        given = attnc.materialize_mask(f"stdlib:{name}", n=T, heads=heads, q=q.float().cpu(), k=k.float().cpu(),
                                       **params)[0].to(device)

    def flex_user(qq, kk, vv):  # the selection (free when given), a new BlockMask and the kernel, every call
        if given is not None:
            def mask_mod(b, h, q_idx, kv_idx):
                return given[h, q_idx, kv_idx]
        elif name == "moba":
            block = params["block"]
            sel = moba_selection(qq.detach(), kk.detach(), block, params["topk"])

            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & sel[h, q_idx, kv_idx // block]
        else:
            sel = token_selection(qq.detach(), kk.detach(), params["topk"])

            def mask_mod(b, h, q_idx, kv_idx):
                return sel[h, q_idx, kv_idx]
        bm = create_block_mask(mask_mod, 1, heads, T, T, device=device)
        return flex(qq, kk, vv, block_mask=bm)

    flex = flex_attention if toy else torch.compile(flex_attention)
    # correctness on sampled rows: the loss restricted to them, so the reference can be exact
    keep = _keep_rows(case, q, k, rows, given)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    s = (qr[:, :, rows] @ kr.transpose(-1, -2)) / math.sqrt(head_dim)
    ref = torch.softmax(s.masked_fill(~keep, -math.inf), -1) @ vr
    ref.backward(dout[:, :, rows].float())
    mask_rows = torch.zeros(1, 1, T, 1, device=device, dtype=dtype)
    mask_rows[:, :, rows] = 1
    qa, ka, va = (t.detach().clone().requires_grad_() for t in (q, k, v))
    t0 = time.perf_counter()
    out = attn(qa, ka, va)
    out.backward(dout * mask_rows)
    first = time.perf_counter() - t0
    errs = {"out": base.rel(out[:, :, rows].detach(), ref.detach()), "dq": base.rel(qa.grad[:, :, rows], qr.grad[:, :, rows]),
            "dk": base.rel(ka.grad, kr.grad), "dv": base.rel(va.grad, vr.grad)}
    with torch.no_grad():
        ferr = base.rel(flex_user(q, k, v)[:, :, rows], ref.detach())
    ok = all(math.isfinite(e) and e < PASS_REL for e in errs.values())
    lines_c.append(f"| {name} {params} | T={T} | {errs['out']:.2e} | {errs['dq']:.2e} | {errs['dk']:.2e} | "
                   f"{errs['dv']:.2e} | {ferr:.2e} | {'PASS' if ok else 'FAIL'} |")

    t: dict = {"attnc_fb": first} if toy else {}
    if budget.left(f"{name} timings"):
        from attnc.runtime.plan import clusters, routing

        calls = []
        with torch.no_grad():
            # attnc's selection steps: the routing lists, or the derived flags of a vertical-slash route
            with StepTimer([(routing, "route_plan"), (clusters, "derive_inputs")]) as sel_timer:
                t["attnc_f"] = base.timed(lambda: (attn(q, k, v), calls.append(1)), toy)
            t["select"] = sum(sel_timer.seconds) / max(1, len(calls))  # per call, on average
            t["flex_f"] = base.timed(lambda: flex_user(q, k, v), toy)
            t["sdpa_f"] = base.timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), toy)
        if not toy:
            t["attnc_fb"] = base.timed(training_step(attn, q, k, v, dout), toy)
            t["flex_fb"] = base.timed(training_step(flex_user, q, k, v, dout), toy)
            t["sdpa_fb"] = base.timed(training_step(
                lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, dout), toy)
    ratio = (f"{t['flex_f'] / t['attnc_f']:.2f}x" if t.get("flex_f") and t.get("attnc_f") else "-")
    ratio_fb = (f"{t['flex_fb'] / t['attnc_fb']:.2f}x" if t.get("flex_fb") and t.get("attnc_fb") else "-")
    ms = base._fmt_ms
    lines_b.append(f"| {name} T={T} | attnc triton (selection inside) | {ms(t.get('attnc_f'))} | {ms(t.get('select'))} | "
                   f"{ms(t.get('attnc_fb'))} | {ratio} | {ratio_fb} |")
    lines_b.append(f"| {name} T={T} | Flex: selection + create_block_mask + flex_attention | {ms(t.get('flex_f'))} | | "
                   f"{ms(t.get('flex_fb'))} | 1.00x | 1.00x |")
    lines_b.append(f"| {name} T={T} | SDPA causal (dense) | {ms(t.get('sdpa_f'))} | | {ms(t.get('sdpa_fb'))} | | |")
    return ok


# ----------------------------------------------------------------- the delta rule
def delta_inputs(name: str, heads: int, T: int, head_dim: int, device, dtype, gen):
    """q, k, v, beta [H, T] in (0, 1), log gates g ([H, T] or [H, T, Dk], in (-0.7, 0)), dout."""
    q, k, v, dout = (torch.randn(1, heads, T, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    beta = torch.sigmoid(torch.randn(heads, T, generator=gen)).to(device)
    shape = (heads, T) if name == "gated_delta_net" else (heads, T, head_dim)
    g = F.logsigmoid(torch.randn(*shape, generator=gen) + 3).to(device)
    return q, k, v, beta, g, dout


def fla_delta(name: str, q, k, v, beta, g, scale):
    """fla's chunked op in its layout ([B, T, H, D]; beta, g [B, T, H(, D)]), qk_l2norm in the kernel."""
    fn = chunk_gated_delta_rule if name == "gated_delta_net" else chunk_kda
    o, _ = fn(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
              g=g.transpose(0, 1)[None].float().contiguous(), beta=beta.t()[None].contiguous().to(q.dtype),
              scale=scale, use_qk_l2norm_in_kernel=True)
    return o.transpose(1, 2)


def delta_case(name: str, T: int, *, device, dtype, heads, head_dim, toy, budget, lines_c, lines_b) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(13)
    q, k, v, beta, g, dout = delta_inputs(name, heads, T, head_dim, device, dtype, gen)
    scale = 1.0 / math.sqrt(head_dim)
    tri = attnc.compile_attention(f"stdlib:{name}", backend="triton", qk_l2norm=True)
    ref_mod = attnc.compile_attention(f"stdlib:{name}", backend="cpu", qk_l2norm=True)  # the chunked torch form

    def grads(mod, cast=None):
        qq, kk, vv = (x.detach().clone().to(cast or x.dtype).requires_grad_() for x in (q, k, v))
        bb, gg = beta.detach().clone().requires_grad_(), g.detach().clone().requires_grad_()
        o = mod(qq, kk, vv, beta=bb, g=gg, scale=scale)
        o.backward(dout.to(o.dtype))
        return o.detach(), qq.grad, kk.grad, vv.grad, bb.grad, gg.grad

    t0 = time.perf_counter()
    got = grads(tri)
    first = time.perf_counter() - t0
    ref = grads(ref_mod, cast=torch.float32)
    names = ["out", "dq", "dk", "dv", "dbeta", "dg"]
    errs = dict(zip(names, (base.rel(a, b) for a, b in zip(got, ref, strict=True)), strict=True))
    fla_err, fla_ok = "skipped", False
    if chunk_gated_delta_rule is not None and device.type == "cuda":
        try:
            fla_err = f"{base.rel(fla_delta(name, q, k, v, beta, g, scale), ref[0]):.2e}"
            fla_ok = True
        except Exception as err:  # noqa: BLE001 (a baseline that fails is reported, not fatal)
            fla_err = f"failed: {type(err).__name__}: {err}"
    ok = all(math.isfinite(e) and e < PASS_REL for e in errs.values())
    lines_c.append(f"| {name} | T={T} | " + " | ".join(f"{errs[n]:.2e}" for n in names)
                   + f" | {fla_err} | {'PASS' if ok else 'FAIL'} |")
    t: dict = {"attnc_fb": first} if toy else {}
    if not toy and budget.left(f"{name} T={T} timings"):
        with torch.no_grad():
            t["attnc_f"] = base.timed(lambda: tri(q, k, v, beta=beta, g=g, scale=scale), toy)
            if fla_ok:
                t["fla_f"] = base.timed(lambda: fla_delta(name, q, k, v, beta, g, scale), toy)
        t["attnc_fb"] = base.timed(training_step(lambda a, b, c: tri(a, b, c, beta=beta, g=g, scale=scale),
                                                 q, k, v, dout), toy)
        if fla_ok:
            t["fla_fb"] = base.timed(training_step(lambda a, b, c: fla_delta(name, a, b, c, beta, g, scale),
                                                   q, k, v, dout), toy)
    ms = base._fmt_ms
    ratio = f"{t['fla_f'] / t['attnc_f']:.2f}x" if t.get("fla_f") else "-"
    ratio_fb = f"{t['fla_fb'] / t['attnc_fb']:.2f}x" if t.get("fla_fb") else "-"
    lines_b.append(f"| {name} T={T} | attnc triton | {ms(t.get('attnc_f'))} | | {ms(t.get('attnc_fb'))} | {ratio} | "
                   f"{ratio_fb} |")
    lines_b.append(f"| {name} T={T} | fla chunk_{'gated_delta_rule' if name == 'gated_delta_net' else 'kda'} | "
                   f"{ms(t.get('fla_f'))} | | {ms(t.get('fla_fb'))} | 1.00x | 1.00x |")
    return ok


# ----------------------------------------------------------------- Titans' neural memory
def titans_case(T: int, *, device, dtype, heads, head_dim, toy, budget, lines_c, lines_b) -> bool:
    gen = torch.Generator(device="cpu").manual_seed(17)
    q, k, v, dout = (torch.randn(1, heads, T, head_dim, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    k = F.normalize(k.float(), dim=-1).to(dtype)  # a unit key: one step of gradient descent stays stable
    rates = {"a": F.logsigmoid(torch.randn(heads, T, generator=gen) + 4).to(device),
             "theta": (0.5 * torch.rand(heads, T, generator=gen)).to(device),
             "eta": (0.5 + 0.45 * torch.rand(heads, T, generator=gen)).to(device)}
    scale = 1.0 / math.sqrt(head_dim)
    tri = attnc.compile_attention("stdlib:titans", backend="triton")
    torch_form = attnc.compile_attention("stdlib:titans", backend="cpu")  # chunked torch, on q's device

    def grads(mod, cast=None):
        qq, kk, vv = (x.detach().clone().to(cast or x.dtype).requires_grad_() for x in (q, k, v))
        rr = {n: r.detach().clone().requires_grad_() for n, r in rates.items()}
        o = mod(qq, kk, vv, scale=scale, **rr)
        o.backward(dout.to(o.dtype))
        return (o.detach(), qq.grad, kk.grad, vv.grad, *(rr[n].grad for n in ("a", "theta", "eta")))

    t0 = time.perf_counter()
    got = grads(tri)
    first = time.perf_counter() - t0
    ref = grads(torch_form, cast=torch.float32)
    names = ["out", "dq", "dk", "dv", "da", "dtheta", "deta"]
    errs = dict(zip(names, (base.rel(a, b) for a, b in zip(got, ref, strict=True)), strict=True))
    ok = all(math.isfinite(e) and e < PASS_REL for e in errs.values())
    lines_c.append(f"| titans | T={T} | " + " | ".join(f"{errs[n]:.2e}" for n in names) + f" | {'PASS' if ok else 'FAIL'} |")
    t: dict = {"attnc_fb": first} if toy else {}
    if not toy and budget.left(f"titans T={T} timings"):
        for key, mod in (("attnc", tri), ("torch", torch_form)):
            with torch.no_grad():
                t[f"{key}_f"] = base.timed(lambda m=mod: m(q, k, v, scale=scale, **rates), toy)
            t[f"{key}_fb"] = base.timed(training_step(lambda a, b, c, m=mod: m(a, b, c, scale=scale, **rates),
                                                      q, k, v, dout), toy)
    ms = base._fmt_ms
    ratio = f"{t['torch_f'] / t['attnc_f']:.2f}x" if t.get("torch_f") else "-"
    ratio_fb = f"{t['torch_fb'] / t['attnc_fb']:.2f}x" if t.get("torch_fb") else "-"
    lines_b.append(f"| titans T={T} | attnc triton | {ms(t.get('attnc_f'))} | {ms(t.get('attnc_fb'))} | {ratio} | "
                   f"{ratio_fb} |")
    lines_b.append(f"| titans T={T} | attnc chunked torch (same GPU) | {ms(t.get('torch_f'))} | "
                   f"{ms(t.get('torch_fb'))} | 1.00x | 1.00x |")
    return ok


# ----------------------------------------------------------------- main
def main(argv=None) -> int:
    args = base.suite_args(argv, __doc__, "gpu-dynamic", 480.0)
    start, toy = time.perf_counter(), args.toy
    if not toy and not torch.cuda.is_available():
        print("no CUDA device: run with --toy for the interpreter check", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cpu" if toy else "cuda")
    dtype = torch.float32 if toy else torch.bfloat16
    heads, head_dim = (1, 16) if toy else (8, 128)
    delta_heads, delta_T = (1, [96]) if toy else (16, [8192, 32768])
    hw = base._hardware_name()
    gpu = "CPU (Triton interpreter, --toy)" if toy else torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    budget = base.Budget(args.budget_s)
    route_c = ["| case | size | out | dq | dk | dv | Flex out | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    route_b = ["| case | kernel | forward ms | of which selection ms | fwd+bwd ms | Flex / attnc forward | "
               "Flex / attnc fwd+bwd |", "| --- | --- | --- | --- | --- | --- | --- |"]
    delta_c = ["| pattern | size | out | dq | dk | dv | dbeta | dg | fla out | verdict |",
               "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    delta_b = ["| case | kernel | forward ms | | fwd+bwd ms | fla / attnc forward | fla / attnc fwd+bwd |",
               "| --- | --- | --- | --- | --- | --- | --- |"]
    titans_c = ["| pattern | size | out | dq | dk | dv | da | dtheta | deta | verdict |",
                "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    titans_b = ["| case | kernel | forward ms | fwd+bwd ms | torch / attnc forward | torch / attnc fwd+bwd |",
                "| --- | --- | --- | --- | --- | --- |"]
    out_path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        f"gpu-dynamic-{hw}-{date}.md" if not toy else f"gpu-dynamic-toy-{date}.md")
    failures: list[str] = []

    def write(final: bool) -> None:
        text = [
            f"# GPU suite: run-time selection, the delta rule and Titans ({date})", "",
            f"- device: {gpu}; torch {torch.__version__}; Triton {triton.__version__}; Python {platform.python_version()}",
            f"- flash-linear-attention: {FLA_STATUS}",
            f"- routes: dtype {str(dtype).replace('torch.', '')}, head dim {head_dim}, batch 1, {heads} heads; "
            f"delta rule: {delta_heads} heads, Dk = Dv = {head_dim}",
            f"- total {time.perf_counter() - start:.0f} s" + (
                f"; timings skipped over the {args.budget_s:.0f} s budget: " + ", ".join(budget.skipped)
                if budget.skipped else ""),
            f"- verdict: {'PASS' if not failures else 'FAIL: ' + ', '.join(failures)}"
            + ("" if final else " (so far: the run had not finished)"), "",
            "## Routes: correctness (relative error on 256 sampled query rows against a float32 dense reference "
            f"of the rule written in this file; pass < {PASS_REL:g})", "", *route_c, "",
            "## Routes: timings (every call selects; Flex rebuilds its BlockMask from the same rule every call)",
            "", *route_b, "",
            "## The delta rule: correctness (against attnc's chunked torch form in float32)", "", *delta_c, "",
            "## The delta rule: timings against flash-linear-attention", "", *delta_b, "",
            "## Titans' neural memory: correctness (against attnc's chunked torch form in float32)", "",
            *titans_c, "",
            "## Titans' neural memory: timings against attnc's chunked torch form on the same GPU", "",
            *titans_b, "",
        ]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text("\n".join(text))
        if final:
            print("\n".join(text))

    jobs = [(c["name"], lambda c=c: route_case(c, device=device, dtype=dtype, heads=heads, head_dim=head_dim, toy=toy,
                                               budget=budget, lines_c=route_c, lines_b=route_b))
            for c in route_cases(toy)]
    jobs += [(f"{name} T={T}", lambda name=name, T=T: delta_case(
        name, T, device=device, dtype=dtype, heads=delta_heads, head_dim=head_dim, toy=toy, budget=budget,
        lines_c=delta_c, lines_b=delta_b)) for name in ("gated_delta_net", "kda") for T in delta_T]
    jobs += [(f"titans T={T}", lambda T=T: titans_case(
        T, device=device, dtype=dtype, heads=delta_heads, head_dim=head_dim, toy=toy, budget=budget,
        lines_c=titans_c, lines_b=titans_b)) for T in delta_T]
    for label, job in jobs:
        print(f"[{time.perf_counter() - start:6.1f} s] {label}", flush=True)
        try:
            if not job():
                failures.append(label)
        except Exception:  # noqa: BLE001 (record and go on: one broken case must not hide the others)
            traceback.print_exc()
            failures.append(f"{label} (error)")
        write(False)
    write(True)
    print(f"wrote {out_path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
