"""The host side of the delta rule's Triton kernels, for both gate forms: one forward (the WY form, the state pass,
the output) and one backward (the chunk-local dU, the reverse state pass, dq/dk, the WY backward), ``WYKernels``'
methods, that launch a gate form's kernels by pass (``delta.triton``'s ``WY_KERNELS``, a gate per token and head;
``delta.triton_kda``'s, a gate per key channel), each form keeping only its kernels, its configs and how its gates
reach the kernels and come back as gradients (``Gates``); ``library.host.ChunkedFunction`` runs them as one autograd
node."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..library.device import triton
from ..library.host import KernelTable, interprets

#: The passes, in launch order: the forward's three, then the backward's five.
PASSES = ("wy", "state", "out", "du_local", "state_bwd", "dqk", "wy_da", "wy_dk")


@dataclasses.dataclass(frozen=True)
class Gates:
    """A call's gates as the kernels take them: ``args`` after each kernel's own leading tensors, ``meta`` its
    constexprs, ``TP`` the length padded to whole chunks; ``grad_buffer(B, H, Dk, NKB, acc, device)`` the buffer
    the gates' gradient terms are stored in (None without a gate) and the arguments the dk pass takes after it;
    ``gate_grad(buffer, g, B, H, T, C)`` the gates' gradient from those terms."""

    args: tuple
    meta: dict
    TP: int
    grad_buffer: Callable
    gate_grad: Callable


@dataclasses.dataclass(frozen=True, eq=False)
class WYKernels:
    """A gate form's kernels (``table``) by pass (``names``, one per ``PASSES``), its per-kernel configs
    (``configs(Dk, Dv, C, dtype, interpret)``) and its ``gates(g, beta, C)``."""

    table: KernelTable
    names: dict
    configs: Callable
    gates: Callable
    #: ``library.host.ChunkedFunction``: the backward recomputes the states, it does not read the final one
    reads_final = False

    def __post_init__(self):
        if set(self.names) != set(PASSES):  # a form names one kernel per pass, by the pass's name
            raise ValueError(f"kernels by pass: {sorted(self.names)}, not {sorted(PASSES)}")

    def launch(self, step: str, grid, interp: bool, cfg: dict, *args, **meta) -> None:
        name = self.names[step]
        self.table.launch(name, grid, interp, *args, **meta, **cfg[name])

    def forward(self, q, k, v, g, beta, initial_state, scale: float, C: int, interpret: bool | None = None):
        """The forward (``ChunkedFunction``'s call): ``q [B, H, T, Dk]``, ``k [B, Hkv, T, Dk]``, ``v [B, Hkv, T, Dv]``
        (contiguous, one dtype; query head h reads kv head ``h // (H // Hkv)``), ``g`` the form's log gates or None,
        ``beta`` ``[B, H, T]`` (compute dtype). Returns (out in q's dtype, final state in the compute dtype).
        ``interpret``: Triton's interpreter (None: for CPU tensors or under TRITON_INTERPRET=1)."""
        B, H, T, Dk = q.shape
        Dv = v.shape[-1]
        interp = interprets(q) if interpret is None else interpret
        cfg = self.configs(Dk, Dv, C, q.dtype, interp)
        gates = self.gates(g, beta, C)
        s0 = initial_state.contiguous() if initial_state is not None else None
        _, _, HS, UN, final = _wy_and_states(self, q, k, v, gates, beta, s0, C, cfg, interp, False)
        out = torch.empty(B, H, T, Dv, dtype=q.dtype, device=q.device)
        NT = gates.TP // C
        BV = cfg[self.names["out"]]["BV"]
        self.launch("out", (triton.cdiv(Dv, BV), NT, B * H), interp, cfg, q, k, UN, *gates.args, HS, out, T, gates.TP,
                    NT, float(scale), H=H, GQ=H // k.shape[1], **gates.meta)
        return out, final

    def backward(self, q, k, v, g, beta, initial_state, final, do, dS_T, needs, scale: float, C: int,
                 interpret: bool | None = None):
        """The backward (``ChunkedFunction``'s call; ``final`` unread, ``needs`` the inputs' ``needs_input_grad``):
        ``(dq, dk, dv, dg | None, dbeta, dS0 | None)`` in the compute dtype, dk and dv per kv head."""
        need_g, need_s0 = g is not None and needs[3], needs[5]
        B, H, T, Dk = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        GQ = H // Hkv
        interp = interprets(q) if interpret is None else interpret
        cfg = self.configs(Dk, Dv, C, q.dtype, interp)
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        gates = self.gates(g, beta, C)
        TP, gate_args, gate_meta = gates.TP, gates.args, gates.meta
        NT = TP // C
        s0 = initial_state.contiguous() if initial_state is not None else None
        TI, W, HS, UN, _ = _wy_and_states(self, q, k, v, gates, beta, s0, C, cfg, interp, True)
        do = do.to(q.dtype).contiguous()  # the tensor-core dots take dO in the input dtype
        if dS_T is not None and cfg[self.names["state_bwd"]]["DOT"] != 1:
            dS_T = dS_T.to(q.dtype).to(acc)  # entering in the input dtype, as dO does (see decay.triton)
        dst = dS_T.contiguous() if dS_T is not None else None
        DHS = torch.empty(B * H, NT, Dk, Dv, dtype=HS.dtype, device=q.device)
        DU = torch.empty(B * H, T, Dv, dtype=acc, device=q.device)
        DS0 = torch.empty(B, H, Dk, Dv, dtype=acc, device=q.device)
        BV = cfg[self.names["du_local"]]["BV"]
        self.launch("du_local", (triton.cdiv(Dv, BV), NT, B * H), interp, cfg, q, k, *gate_args, do, DU, T, TP,
                    float(scale), H=H, GQ=GQ, **gate_meta)
        BV = cfg[self.names["state_bwd"]]["BV"]
        self.launch("state_bwd", (triton.cdiv(Dv, BV), B * H), interp, cfg, q, k, W, *gate_args, do,
                    dst if dst is not None else DS0, DHS, DU, DS0, T, TP, NT, float(scale), H=H, GQ=GQ,
                    HAS_DST=dst is not None, STORE_DS0=need_s0, **gate_meta)
        NKB = triton.cdiv(Dk, cfg[self.names["dqk"]]["BK"])
        dq = torch.empty(B, H, T, Dk, dtype=acc, device=q.device)
        dk = torch.empty(B, H, T, Dk, dtype=acc, device=q.device)  # per query head
        dW = torch.empty(B * H, T, Dk, dtype=acc, device=q.device)
        dG, dk_args = gates.grad_buffer(B, H, Dk, NKB, acc, q.device)
        self.launch("dqk", (NKB, NT, B * H), interp, cfg, q, k, UN, *gate_args, do, HS, DHS, DU, dq, dk, dW,
                    dq if dG is None else dG, T, TP, NT, float(scale), H=H, GQ=GQ, **gate_meta)
        dv = torch.empty(B, H, T, Dv, dtype=acc, device=q.device)  # per query head
        dbeta = torch.empty(B, H, T, dtype=acc, device=q.device)
        DA = torch.empty(B * H, TP, C, dtype=acc, device=q.device)
        self.launch("wy_da", (NT, B * H), interp, cfg, k, v, beta, *gate_args, TI, dW, DU, DA, dv, dbeta, T, TP,
                    H=H, GQ=GQ, **gate_meta)
        self.launch("wy_dk", (NT, B * H), interp, cfg, k, beta, *gate_args, TI, dW, DA, dk, dbeta,
                    dq if dG is None else dG, T, TP, *dk_args, H=H, GQ=GQ, **gate_meta)
        dg = gates.gate_grad(dG, g, B, H, T, C) if need_g and dG is not None else None
        if GQ > 1:  # a kv head's gradient is the sum over the query heads reading it
            dk = dk.view(B, Hkv, GQ, T, Dk).sum(2)
            dv = dv.view(B, Hkv, GQ, T, Dv).sum(2)
        return dq, dk, dv, dg, dbeta, (DS0 if need_s0 else None)

def _wy_and_states(rule: WYKernels, q, k, v, gates: Gates, beta, s0, C: int, cfg: dict, interp: bool, store_t: bool):
    """The WY form (W, U0, and T when ``store_t``) and the forward state pass: ``(T, W, h_n, U, final state)``."""
    B, H, T, Dk = q.shape
    Dv, GQ = v.shape[-1], H // k.shape[1]
    TP = gates.TP
    NT = TP // C
    wy = cfg[rule.names["wy"]]
    acc = torch.float64 if wy["F64"] else torch.float32
    store = acc if wy["DOT"] == 1 else q.dtype
    W = torch.empty(B * H, T, Dk, dtype=store, device=q.device)
    U0 = torch.empty(B * H, T, Dv, dtype=store, device=q.device)
    TI = torch.empty(B * H, TP, C, dtype=acc, device=q.device) if store_t else W
    rule.launch("wy", (NT, B * H), interp, cfg, k, v, beta, *gates.args, W, U0, TI, T, TP, H=H, GQ=GQ,
                STORE_T=store_t, **gates.meta)
    HS = torch.empty(B * H, NT, Dk, Dv, dtype=store, device=q.device)
    UN = torch.empty(B * H, T, Dv, dtype=store, device=q.device)
    ST = torch.empty(B, H, Dk, Dv, dtype=acc, device=q.device)
    BV = cfg[rule.names["state"]]["BV"]
    rule.launch("state", (triton.cdiv(Dv, BV), B * H), interp, cfg, k, W, U0, *gates.args,
                s0 if s0 is not None else ST, HS, UN, ST, T, TP, NT, H=H, GQ=GQ, HAS_S0=s0 is not None, **gates.meta)
    return TI, W, HS, UN, ST
