"""The backward pass of the generated Triton kernels: the row term, the dQ and dK/dV kernels (or one
kernel adding dQ by atomics), the FoX gate's and the float bias inputs' gradients."""

from __future__ import annotations

import torch

from ....compiler.analysis import evaluate as E
from ....compiler.codegen.triton.bias import bias_input_names, bias_input_sites
from ....compiler.cost.model import KernelConfig
from ....compiler.cost.search import padded_head_dim
from ....core import ir
from ....core import symbols as S
from ... import kernel_fit
from ...numerics import FOX_GATE_FLOOR
from ...plan.route_scores import placed
from ...tritonenv import interpreting
from . import kernel_launch as KL
from . import tma
from .kernel_launch import Launch


def _row_term(launch: Launch, out, lse, dout, dlse) -> tuple[torch.Tensor, torch.Tensor]:
    """``rowsum(dO * O) - dlse`` and the lse in log2 units (+inf where it is -inf: rows without a key), both
    fp32 ``[B, H, N]`` in token order: one kernel reading each once (the eager torch form made two fp32 copies
    of dO and O and a product before the sum)."""
    B, H, N, DV = out.shape
    delta = torch.empty(B, H, N, dtype=torch.float32, device=out.device)
    lse_l2 = torch.empty_like(delta)
    block_dv = padded_head_dim(DV)
    block_r = max(8, min(128, 8192 // block_dv))  # 8K elements of each tile per program
    named = {"O": (out, *out.stride()), "DO": (dout, *dout.stride()),
             "DLSE": (dlse, *dlse.stride()) if dlse is not None else (KL.dummy(out.device), 0, 0, 0),
             "ROW_TERMS": (lse_l2, delta, *delta.stride()[:2]), "LSE": (lse, *lse.stride()), "N": N, "DV": DV}
    # 4 warps: at 8, ptxas spills it on sm_100 (48 registers, 32 B; Triton 3.9)
    meta = dict(HAS_DLSE=dlse is not None, BLOCK_R=block_r, BLOCK_DV=block_dv, num_warps=4)
    with interpreting(launch.interpret):
        KL.launch_kernel(launch, launch.module.attnc_bwd_delta, (-(-N // block_r), B * H),
                         *KL.bound_args(launch.module.attnc_bwd_delta, named, meta), backward=True)
    return delta, lse_l2


def _backward_inputs(launch: Launch, q, k, v, dout, lse_l2, delta) -> tuple:
    """q, k, v, dO, the lse in log2 units and delta in a launch's token order (``KL.to_tiles``)."""
    return (KL.to_tiles(launch, q, "q"), KL.to_tiles(launch, k, "k"), KL.to_tiles(launch, v, "k"),
            KL.to_tiles(launch, dout.to(q.dtype), "q"),
            KL.to_tiles(launch, lse_l2.unsqueeze(-1), "q").squeeze(-1).contiguous(),
            KL.to_tiles(launch, delta.unsqueeze(-1), "q").squeeze(-1).contiguous())


def _row_sum_buffers(launch: Launch, row_sums: bool, B: int, Hq: int, Nq: int, Nk: int, device) -> tuple:
    """The FoX gate gradient's row sums ``(dsq, dsk, their batch and head strides)`` (dummies where the gate
    takes no gradient): stored at token positions (``q_tok``, ``k_tok``), so a block's are absolute, over the
    whole gate."""
    if not row_sums:
        return KL.dummy(device), KL.dummy(device), (0, 0)
    n_q, n_k = (launch.tensors[launch.pattern.decay].shape[-1],) * 2 if launch.bound.is_block else (Nq, Nk)
    dsq = torch.zeros(B, Hq, n_q, dtype=torch.float32, device=device)
    dsk = torch.zeros(B, Hq, n_k, dtype=torch.float32, device=device)
    return dsq, dsk, (dsq.stride(0), dsq.stride(1))


def _head_args(inputs: tuple) -> dict:
    """What both backward kernels stream, by name: q, k, v, dO and the row terms (the lse in log2 units and
    delta, which share their strides), in a launch's token order."""
    qp, kp, vp, dop, lsep, deltap = inputs
    return {**KL.streamed(qp, kp, vp), "DO": (dop, *dop.stride()[:3]), "ROW_TERMS": (lsep, deltap, *lsep.stride()[:2])}


def backward(launch: Launch, q, k, v, out, lse, dout, dlse, scale: float, wrt: list[str],
             dq_launch: Launch | None = None):
    """(dq, dk, dv, {input: grad}); deterministic (no atomics) unless the config asks for dQ by atomics
    and the call allows it (``atomic_dq_applies``), or the bias reads float inputs: their gradients are added by
    fp32 atomics in a second pass of the dQ kernel (``ADD_GRADS``, ``_bias_grads``), and under torch's deterministic
    mode summed on the host from dS per pair instead (``_bias_input_grads``: memory of every visited pair).
    ``dq_launch``: the dQ kernel's own
    launch (its tiles, ``KernelConfig.dq_q_tile``); None: ``launch``'s, as the dK/dV kernel."""
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
    decay_c = KL.decay_cumsum(launch, device)
    if atomic:
        dq = torch.zeros(qp.shape, dtype=torch.float32, device=device)
        dqa = (dq, *dq.stride()[:3])
    else:
        dq = torch.empty_like(q_side[0])
        dqa = (None,) * 4  # constants to Triton: the kernel without ATOMIC_DQ has no such parameters (ORDER's way)
    dsq, dsk, sr = _row_sum_buffers(launch, row_sums, B, Hq, Nq, Nk, device)
    tail = KL.sizes(scale, Hq // Hkv, D, DV)
    ieee = KL.dot_mode(launch, q.dtype)
    # the dQ kernel (its own launch where it has tiles of its own); dS for the bias inputs' gradients at its tiles
    qsched, qblocks = qlaunch.plan.schedule, KL.block_sizes(qlaunch, D, DV)
    ds_w = qlaunch.lists["FULL_I"].shape[-1] + qlaunch.lists["PART_I"].shape[-1]
    on_host = bool(bias_wrt) and torch.are_deterministic_algorithms_enabled()
    ds_buf = (torch.zeros(B * Hq, qsched.num_q_tiles, ds_w, qblocks["BLOCK_M"], qblocks["BLOCK_N"],
                          dtype=torch.float32, device=device) if on_host else KL.dummy(device))
    bias_grads, grad_args = _bias_grad_buffers(launch, bias_wrt and not on_host, device)

    def dq_call(add_grads: bool = False) -> tuple:
        """The dQ kernel's (grid, args, meta); ``add_grads``: its pass of the bias inputs' gradients (no dQ)."""
        q_order, q_ordered = KL.order_arg(KL.launch_orders(qlaunch, B, Hq, Hkv, device), "Q")
        # the tiles each kernel streams as descriptor boxes (``KernelConfig.tma``): dQ's Q, dO, K, V; dK/dV's Q, dO
        q_descs, q_desc = tma.descriptors(qlaunch, {
            "QD": (q_side[0], "q", qblocks["BLOCK_D"]), "KD": (q_side[1], "k", qblocks["BLOCK_D"]),
            "VD": (q_side[2], "k", qblocks["BLOCK_DV"]), "DOD": (q_side[3], "q", qblocks["BLOCK_DV"])})
        named = {**_head_args(q_side), "DQ": (dq, *dq.stride()[:3]), "DSQ": (dsq, *sr), "DS": (ds_buf, ds_w),
                 **grad_args, **KL.common_args(qlaunch, device, decay_c), "ORDER": q_order, **q_descs, **tail}
        meta = dict(**qblocks, DOT=ieee, ROW_SUMS=row_sums, STORE_DS=on_host, ADD_GRADS=add_grads, **q_ordered,
                    **KL.runs_meta(qlaunch, "FULL", "PART"), **q_desc)
        return ((qsched.num_q_tiles, B * Hq), *KL.bound_args(qlaunch.module.attnc_bwd_dq, named, meta))

    kblocks = KL.block_sizes(launch, D, DV)
    k_descs, k_desc = tma.descriptors(launch, {"QD": (qp, "q", kblocks["BLOCK_D"]), "DOD": (dop, "q", kblocks["BLOCK_DV"])})
    L = launch.lists

    def dkdv_call(split: int) -> tuple:
        """The dK/dV kernel's (grid, args, meta, outputs) with ``split`` programs per K/V head: its own
        dK and dV, or (more than one) fp32 partials, one per share of the group, at the share's offset."""
        if split == 1:
            outs = (torch.empty_like(kp), torch.empty_like(vp))
            dk_dv = [(t, *t.stride()[:3], 0) for t in outs]
        else:
            outs = tuple(torch.empty(split, *t.shape, dtype=torch.float32, device=device) for t in (kp, vp))
            dk_dv = [(t, *t.stride()[1:4], t.stride(0)) for t in outs]
        k_order, k_ordered = KL.order_arg(KL.launch_orders(launch, B, Hq, Hkv, device, split), "K")
        named = {**_head_args((qp, kp, vp, dop, lsep, deltap)), "DK": dk_dv[0], "DV_": dk_dv[1], "DSK": (dsk, *sr),
                 "DQA": dqa, "T_FULL": KL.list_group(L, "T_FULL"),
                 "T_PART": KL.list_group(L, "T_PART"),
                 **KL.common_args(launch, device, decay_c), "ORDER": k_order, **k_descs, **tail}
        meta = dict(**kblocks, DOT=ieee, ROW_SUMS=row_sums, QT_VIEW=KL.qt_view(q.device), **k_ordered,
                    **KL.runs_meta(launch, "T_FULL", "T_PART"), **k_desc, SPLIT=split, SHARE=Hq // Hkv // split,
                    ATOMIC_DQ=atomic)
        return ((launch.plan.schedule.num_kv_tiles, B * Hkv * split),
                *KL.bound_args(launch.module.attnc_bwd_dkdv, named, meta), outs)

    split = KL.fitting_group_split(launch, dkdv_call, B, Hq, Hkv, device, D, q.element_size(), kernel_fit.on_gpu([q]),
                                 atomic)
    with interpreting(launch.interpret):
        if not atomic:  # else the dK/dV kernel adds dQ
            KL.launch_kernel(qlaunch, qlaunch.module.attnc_bwd_dq, *dq_call(), backward=True)
        if bias_grads:  # the bias inputs' gradients: the dQ kernel's second pass, added by atomics
            KL.launch_kernel(qlaunch, qlaunch.module.attnc_bwd_dq, *dq_call(add_grads=True), backward=True)
        grid, args, meta, (dk, dv) = dkdv_call(split)
        KL.launch_kernel(launch, launch.module.attnc_bwd_dkdv, grid, args, meta, backward=True)
    if atomic:
        dq = dq.to(qp.dtype)
    if split > 1:  # the shares' partials in a fixed order (deterministic), rounded once
        dk, dv = dk.sum(0).to(kp.dtype), dv.sum(0).to(vp.dtype)
    grads: dict[str, torch.Tensor] = {pat.decay: _decay_gate_grad(launch, dsq, dsk)} if row_sums else {}
    if bias_wrt:
        made = bias_grads or _bias_input_grads(qlaunch, ds_buf, bias_wrt, qblocks, B, Hq)
        for name, grad in ((n, made[n]) for n in bias_wrt):
            grads[name] = grads[name] + grad if name in grads else grad
    out_grads = {n: g.to(launch.tensors[n].dtype) for n, g in grads.items()}
    return (KL.from_tiles(qlaunch, dq, "q", Nq), KL.from_tiles(launch, dk, "k", Nk), KL.from_tiles(launch, dv, "k", Nk),
            out_grads)


def _decay_gate_grad(launch: Launch, dsq: torch.Tensor, dsk: torch.Tensor) -> torch.Tensor:
    """The FoX decay gates' gradient from the kernels' per-query and per-key sums of dS."""
    pat = launch.pattern
    dc = dsq - dsk  # d loss / d cumsum(g): + as the query's term, - as the key's
    # reverse cumsum, accumulated in float64 so that its rounding does not grow with n
    dg = torch.flip(torch.cumsum(torch.flip(dc.double(), [-1]), -1), [-1]).to(dc.dtype)
    # a reset gate (-inf) gets exactly 0, the limit (its pairs have weight 0; the sums only cancel)
    # (and a gate below the floor the prefix sums count it at, numerics.fox_prefix: clamped, its gradient 0)
    dg = dg.masked_fill(launch.tensors[pat.decay].to(dsq.device) < FOX_GATE_FLOOR, 0.0)
    return dg if pat.decay in launch.batched else dg.sum(0)


def atomic_dq_applies(config: KernelConfig, *, row_sums: bool, bias_grads: bool) -> bool:
    """Whether a backward runs in one kernel, dQ added by the dK/dV kernel's atomics (``KernelConfig.atomic_dq``):
    where the config asks for it, unless torch is told to be deterministic (atomics add in no fixed order) or
    the call needs the decay gates' gradient (per-query sums of dS) or a float bias input's (dS per pair),
    which the dQ kernel computes."""
    return config.atomic_dq and not (row_sums or bias_grads or torch.are_deterministic_algorithms_enabled())


def _bias_grad_buffers(launch: Launch, in_kernel: bool, device) -> tuple[dict, dict]:
    """The fp32 buffers the dQ kernel adds the bias inputs' gradients to (``_bias_grads``; zeros, one per float input
    of the bias, those not asked for too: the kernel adds to each), by input name, and their arguments by
    parameter name (``GIN{i}``, the batch stride first: 0 for an input shared by the batch); without ``in_kernel``
    no buffer, and placeholders for the parameters (the kernel then adds nothing)."""
    pat = launch.pattern
    names = bias_input_names(pat) if pat.bias is not None else set()
    buffers, args = {}, {}
    for i, decl in enumerate(pat.inputs):
        if decl.name not in names:
            continue
        if not in_kernel:
            args[f"GIN{i}"] = (KL.dummy(device), *(0,) * (len(decl.dims) + 1))
            continue
        t = launch.tensors[decl.name]
        g = buffers[decl.name] = torch.zeros(t.shape, dtype=torch.float32, device=device)
        args[f"GIN{i}"] = (g, g.stride(0), *g.stride()[1:]) if decl.name in launch.batched else (g, 0, *g.stride())
    return buffers, args


# the pairs one chunk of heads evaluates a bias input's gradient on (float64 dS, values and indices: ~100 MB each)
BIAS_GRAD_PAIRS = 1 << 24


def _block_env(pat: ir.PatternIR, bound: E.Bound, q_tok: torch.Tensor, k_tok: torch.Tensor, h: torch.Tensor) -> dict:
    return E.token_env(pat, bound, q_tok, k_tok, h)


def _bias_input_grads(launch: Launch, ds_buf: torch.Tensor, names: list[str], blocks: dict, B: int, Hq: int) -> dict:
    """Gradients of float inputs of the bias from the kernel's dS per visited pair:
    for each place the bias reads an input, ``grad[index] += dS * d bias / d input``, summed in float64 with
    ``index_put_(accumulate=True)`` on dS's device (no copy to the host; deterministic where torch is asked to
    be, as torch's own accumulation is), heads in chunks of at most ``BIAS_GRAD_PAIRS`` pairs."""
    pat, bound, plan = launch.pattern, launch.bound, launch.plan
    derivs = bias_input_sites(E.substitute(pat.bias, bound), names)
    device = ds_buf.device
    BM, BN = blocks["BLOCK_M"], blocks["BLOCK_N"]
    kt_all = torch.cat([launch.lists["FULL_I"], launch.lists["PART_I"]], -1).to(torch.int64)  # [C, nQ, W]

    def padded(tokens, width):  # the plan's tokens per tile, padded to the kernel's block, once per plan and device
        index = torch.zeros(tokens.index.shape[0], width, dtype=torch.int64)
        valid = torch.zeros(tokens.index.shape[0], width, dtype=torch.bool)
        index[:, :tokens.index.shape[1]] = tokens.index
        valid[:, :tokens.index.shape[1]] = tokens.valid
        return index.to(device), valid.to(device)

    q_idx, q_ok = plan.on_device(("bias grad q", str(device), BM), lambda: padded(plan.q_tokens, BM))
    k_idx, k_ok = plan.on_device(("bias grad k", str(device), BN), lambda: padded(plan.k_tokens, BN))
    ds_all = ds_buf.detach().view(B, Hq, plan.schedule.num_q_tiles, -1, BM, BN)
    chunk = max(1, BIAS_GRAD_PAIRS // ds_all[0, 0].numel())
    grads = {n: torch.zeros(launch.tensors[n].shape, dtype=torch.float64, device=device) for n in names}
    zero = torch.zeros((), dtype=torch.float64, device=device)
    for b in range(B):
        inputs = {n: (t[b] if n in launch.batched else t).detach() for n, t in launch.tensors.items()}
        for h0 in range(0, Hq, chunk):
            heads = torch.arange(h0, min(Hq, h0 + chunk), device=device)
            kt = kt_all[b * launch.cls[0] + heads * launch.cls[1]]  # [h, nQ, W]
            present = kt >= 0
            kts = kt.clamp(min=0)
            q_tok = q_idx[None, :, None, :, None]  # [1, nQ, 1, BM, 1]
            k_tok = k_idx[kts][..., None, :]  # [h, nQ, W, 1, BN]
            weight = present[..., None, None] & q_ok[None, :, None, :, None] & k_ok[kts][..., None, :]
            ds = ds_all[b, heads].to(torch.float64) * weight
            # indices were checked on attended pairs by the forward; elsewhere dS is 0 and they read element 0
            env = _block_env(pat, bound, q_tok, k_tok, heads.view(-1, 1, 1, 1, 1))
            ev = E.Evaluator(env, inputs, set(), None, guard=torch.zeros((), dtype=torch.bool, device=device))
            for site, deriv in derivs:
                name = S.input_name(site.func)
                value = placed(E.as_tensor(ev(deriv), torch.float64), device)
                contrib = torch.where(ds != 0, ds * value, zero).reshape(-1)
                target = grads[name][b] if name in launch.batched else grads[name]
                index = []
                for a, size in zip(site.args, target.shape, strict=True):
                    ix = torch.broadcast_to(placed(E.as_tensor(ev(a)), device), ds.shape).reshape(-1)
                    outside = (ix < 0) | (ix >= size)  # on pairs not attended (dS = 0): read element 0
                    contrib = torch.where(outside, zero, contrib)
                    index.append(torch.where(outside, torch.zeros((), dtype=ix.dtype, device=device), ix))
                target.index_put_(tuple(index), contrib, accumulate=True)
    return grads
