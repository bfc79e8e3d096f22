"""The recurrence runner: runs a recurrence rule on a backend (chunked torch, Triton), its decoding
step, and the runner the custom op and ``Attention`` call."""

from __future__ import annotations

import dataclasses

import torch

from ...compiler.analysis import evaluate as E
from ...core import ir
from ...core.errors import SpecError
from ..checks import check_qkv, check_state, resolve_scale, state_heads
from ..numerics import compute_dtype, expand_kv
from ..ops.common import Registered
from ..runner import Support
from .common import bind, gate_tensor
from .rules import rule_of


def run(backend: str, rec: ir.RecurrenceIR, bound: E.Bound, q, k, v, tensors: dict, scale: float,
        initial_state, chunk: int | None, hardware=None, native: bool = False):
    """The recurrence on a backend ('cpu': chunked torch, 'triton', 'auto'), by its rule (``rules.rule_of``).
    Returns (out in q's dtype, final state in the compute dtype, the chunk size used). ``hardware``: choose the
    chunk for this GPU model; ``native``: Triton's compiled kernels even for CPU tensors (the offline GPU check)."""
    return rule_of(rec).run(backend, rec, bound, q, k, v, tensors, scale, initial_state, chunk, hardware, native)


def _one_token_shape(layout: str, lead: str, rest: str) -> str:
    """The 4-d one-token shape of q, k, v or a gate in ``layout``, as text."""
    return f"[{lead}1, H{rest}]" if layout == "bnhd" else f"[{lead}H, 1{rest}]"


def step_gates(rec: ir.RecurrenceIR, layout: str, inputs: dict, heads: int) -> tuple[dict, dict]:
    """A step's inputs declared ``[heads, n, ...]`` (the gates) as ``bind`` takes them (``[B, heads, 1, ...]``
    or ``[heads, 1, ...]``), and what each was given as (name -> the shape text of its layout), for errors.
    Each may come in the call's layout, ``[B, 1, heads, ...]`` under ``"bnhd"`` (fla's one-token gates) and
    ``[B, heads, 1, ...]`` under ``"bhnd"``, or without the token axis, ``[B, heads, ...]`` as q's 3-d form;
    the batch dimension optional. The readings cannot be confused: they differ in their leading extents
    except where they hold the same values in the same order (one head, one batch row)."""
    out, forms = dict(inputs), {}
    for decl in rec.inputs:
        t = inputs.get(decl.name)
        if decl.dim_names[:2] != ("heads", "n") or not isinstance(t, torch.Tensor):
            continue
        rank, full = len(decl.dims), ((1, heads) if layout == "bnhd" else (heads, 1))
        rest = "".join(f", {d}" for d in decl.dim_names[2:])
        forms[decl.name] = (f"{_one_token_shape(layout, 'B, ', rest)} or [B, H{rest}] (the batch optional; "
                            f"H = {heads})")
        if t.dim() == rank and tuple(t.shape[:2]) == full:  # the layout's one-token form, unbatched
            out[decl.name] = t.transpose(0, 1) if layout == "bnhd" else t
        elif t.dim() == rank + 1 and tuple(t.shape[1:3]) == full:  # ... batched
            out[decl.name] = t.transpose(1, 2) if layout == "bnhd" else t
        elif t.dim() == rank and t.shape[1] == heads:  # no token axis, batched
            out[decl.name] = t.unsqueeze(2)
        elif t.dim() == rank - 1 and t.dim() > 0 and t.shape[0] == heads:  # no token axis, unbatched
            out[decl.name] = t.unsqueeze(1)
        else:
            raise SpecError(f"input '{decl.name}' has shape {list(t.shape)}; one step under layout '{layout}' "
                            f"takes {forms[decl.name]}", where=f"argument {decl.name}",
                            hint="layout='bnhd' (to compile_attention or step) takes fla's [B, 1, H(, K)]"
                            if layout == "bhnd" and (1, heads) in (tuple(t.shape[:2]), tuple(t.shape[1:3]))
                            else None)
    return out, forms


def decode_step(rec: ir.RecurrenceIR, sizes: dict, q, k, v, state, scale, inputs: dict, layout: str = "bhnd"):
    """``Attention.step``: one token of the recurrent form, for inference loops.

    ``q`` ``[B, Hq, Dk]``, or 4-d with a token axis of 1 where ``layout`` puts it (``[B, Hq, 1, Dk]``;
    ``[B, 1, Hq, Dk]`` under ``"bnhd"``, fla's), ``k`` ``[B, Hkv, Dk]``, ``v`` ``[B, Hkv, Dv]`` (q's form),
    ``state`` ``[B, Hq, Dk, Dv]`` or None (zeros); gate inputs for this one token (``step_gates``: in the
    layout's one-token form, or without the token axis). Returns ``(o, new_state)``: ``o`` in q's form
    and dtype, the state in the compute dtype."""

    if not isinstance(q, torch.Tensor) or q.dim() not in (3, 4):
        got = list(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__
        raise SpecError(f"expected one token: q [B, H, Dk] or {_one_token_shape(layout, 'B, ', ', Dk')} "
                        f"(layout '{layout}'), got {got}", where="argument q")
    squeeze = q.dim() == 3
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != q.dim():
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise SpecError(f"expected {q.dim()} dimensions like q, got {got}", where=f"argument {name}")
    if squeeze:
        q, k, v = q.unsqueeze(2), k.unsqueeze(2), v.unsqueeze(2)
    elif layout == "bnhd":
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[1] != 1:
                raise SpecError(f"step takes one token: {name} [B, 1, H, D] under layout 'bnhd' (or [B, H, D]), "
                                f"got {list(t.shape)}", where=f"argument {name}",
                                hint="use the module's forward for a sequence" if t.shape[2] != 1 else
                                "[B, H, 1, D] is layout 'bhnd''s one-token form: pass layout='bhnd'")
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    rule = rule_of(rec)
    check_qkv(q, k, v, gva=rule.facts.grouped_values)
    if q.shape[2] != 1 or k.shape[2] != 1:  # before the gates: a sequence is the mistake, not its gates' shape
        raise SpecError(f"step takes one token, got {q.shape[2]} (use the module's forward for a sequence)",
                        where="argument q", hint="[B, 1, H, D] is layout 'bnhd''s one-token form: pass "
                        "layout='bnhd'" if q.shape[1] == 1 else None)
    given = inputs
    inputs, forms = step_gates(rec, layout, inputs, state_heads(q, v))
    q, k = rule.prepare(rec, q, k, v)  # the rule's options on q and k, and GVA, as the forward's
    B, H, _, Dk = q.shape
    Dv = v.shape[-1]
    scale = resolve_scale(scale, Dk)
    try:
        bound, tensors = bind(rec, sizes, inputs, n=1, heads=H, dk=Dk, batch=B, device=q.device)
    except SpecError as err:  # a gate's other dimensions: name the forms of the caller's layout
        name = err.where.removeprefix("argument ") if err.where else None
        if name not in forms or "has shape" not in err.message:
            raise
        raise SpecError(f"input '{name}' has shape {list(given[name].shape)}; one step under layout '{layout}' "
                        f"takes {forms[name]}", where=err.where, hint=err.hint) from None
    dt = compute_dtype(q.dtype)
    rows = rule.facts.state_rows * Dk  # Titans: the memory, then its momentum
    if state is None:
        state = torch.zeros(B, H, rows, Dv, dtype=dt, device=q.device)
    else:
        check_state(state, q, "state", (B, H, rows, Dv))
    g = gate_tensor(rec, bound, tensors, B, H, 1, dt, q.device)[:, :, 0]
    out, new = rule.step(rec, tensors, q[:, :, 0].to(dt), expand_kv(k, H)[:, :, 0].to(dt),
                         expand_kv(v, H)[:, :, 0].to(dt), g, state.to(dt), float(scale))
    out = out.to(q.dtype)
    if squeeze:
        return out, new
    return (out.unsqueeze(1) if layout == "bnhd" else out.unsqueeze(2)), new


class RecurrenceRunner(Registered):
    """What a recurrence module runs: the pattern, the backend ('reference': the naive loop; 'cpu':
    chunked torch; 'triton'; 'auto': Triton on CUDA tensors, else chunked torch) and a forced chunk
    size (or None); eager calls and ``attnc::recurrence`` both run it."""

    op = "recurrence"
    support = Support(kinds=frozenset({"recurrence"}), query_offset=None, routing=False, decode_step=True)

    def __init__(self, pattern: ir.RecurrenceIR, backend: str, chunk: int | None, *, hardware=None,
                 native: bool = False):
        self.pattern, self.backend, self.chunk = pattern, backend, chunk
        rule = rule_of(pattern)
        if backend == "triton" and not rule.has_triton:
            raise SpecError(f"'{pattern.name}' runs {rule.facts.title}, which has no Triton kernels yet",
                            where="argument backend",
                            hint="backend='cpu' or 'auto' runs its chunked torch form, on CUDA tensors too")
        # the naive loop is plain torch autograd: its gradients are differentiable again
        self.support = dataclasses.replace(RecurrenceRunner.support, double_backward=backend == "reference")
        # the offline GPU check injects a runner whose chunk is chosen for a GPU model (``hardware``) and
        # whose Triton kernels compile natively (``native``) although its tensors are on the CPU
        self.hardware, self.native = hardware, native
        self.last_chunk: int | None = None
        self.register_op()  # under torch.compile: attnc::recurrence

    @property
    def name(self) -> str:
        return self.backend

    @property
    def last_schedule(self):
        return None  # chunks, not tiles

    def describe(self) -> str:
        return rule_of(self.pattern).describe(self.pattern, self.backend, self.chunk or self.last_chunk)

    def run(self, q, k, v, inputs: dict, sizes: dict, scale: float, initial_state):
        """``(out, final state, chunk or None)``: binds the sizes and inputs (errors name the argument),
        then runs the naive loop ('reference') or the chunked form ('cpu', 'triton', 'auto')."""
        rec = self.pattern
        rule = rule_of(rec)
        q, k = rule.prepare(rec, q, k, v)  # the rule's options on q and k, and GVA, here for every backend
        bound, tensors = bind(rec, sizes, inputs, n=q.shape[2], heads=q.shape[1], dk=q.shape[3], batch=q.shape[0],
                              device=q.device)
        if self.backend == "reference":
            return (*rule.reference(rec, bound, q, k, v, tensors, scale, initial_state), None)
        return rule.run(self.backend, rec, bound, q, k, v, tensors, scale, initial_state, self.chunk, self.hardware,
                        self.native)

