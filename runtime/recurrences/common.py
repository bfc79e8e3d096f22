"""What every recurrence rule shares: chunk sizes, gate tensors from the IR, the state check, the
simulator entry and the description of what runs."""

from __future__ import annotations

import torch

from ...compiler.analysis import evaluate as E
from ...core import ir
from ...core.errors import SpecError
from ...core.recurrence_rules import RULES
from .rules import rule_of

#: The chunk sizes the simulator chooses from.
CHUNKS = (16, 32, 64)


def head_gates(rec: ir.RecurrenceIR, bound: E.Bound, heads: int, dtype, device) -> torch.Tensor:
    """The constant log decay per head of a 'head' gate, ``[heads]``."""
    return E.head_values(rec.decay, bound.subs, heads).to(dtype=dtype, device=device)


def gate_tensor(rec: ir.RecurrenceIR, bound: E.Bound, tensors: dict, B: int, H: int, T: int, dtype,
                device) -> torch.Tensor:
    """The log gates as ``[B, H, T, 1]`` (head and scalar gates) or ``[B, H, T, Dk]`` (vector gates), in
    ``dtype``; differentiable with respect to the call-time input (a broadcast batch is summed back)."""
    if rec.gate == "head":
        return head_gates(rec, bound, H, dtype, device).view(1, H, 1, 1).expand(B, H, T, 1)
    g = tensors[rec.decay].to(device=device, dtype=dtype)
    if RULES[rec.rule].log_decay_gates:
        # a gate whose decay exp(g) is 0 in the compute dtype is a hard reset, exactly (forward, and its gradient
        # exp(g) * .. = 0): taken as one, it keeps the chunks' float32 sums of the gates at their own size (a gate
        # of -1e6 in them took the decays after it to its rounding, 0.02-0.06 off)
        floor = -745.2 if dtype == torch.float64 else -104.0
        g = torch.where(g < floor, torch.full((), -torch.inf, dtype=g.dtype, device=g.device), g)
    if g.dim() == (2 if rec.gate == "scalar" else 3):
        g = g.unsqueeze(0)
    if rec.gate == "scalar":
        g = g.unsqueeze(-1)
    return g.expand(B, *g.shape[1:])


def rate_tensor(t: torch.Tensor, B: int, H: int, T: int, dtype, device) -> torch.Tensor:
    """A rate input (``float[heads, n]``, optionally with a batch dimension) as ``[B, H, T]`` in ``dtype``
    (differentiable; a broadcast batch is summed back)."""
    t = t.to(device=device, dtype=dtype)
    return (t.unsqueeze(0) if t.dim() == 2 else t).expand(B, H, T)


def gate_where(rec: ir.RecurrenceIR) -> str:
    """What an error about a recurrence's gates names: the gate input, or the ``decay`` clause."""
    return f"argument {rec.decay}" if isinstance(rec.decay, str) else "decay"


def check_gates(rec: ir.RecurrenceIR, bound: E.Bound, tensors: dict) -> None:
    """A rule's gates are log decays where its facts say so (``RuleFacts.log_decay_gates``: the delta rule's and
    Titans'; ``S_t = diag(exp(g_t)) S_(t-1)``, the published rules' ``g <= 0``): each must be finite and at most 0, or -inf (a hard reset). NaN, +inf and positive gates
    are refused, naming the gate: the chunked forms (torch, Triton) are exact only where every
    in-chunk decay ``exp(G_t - G_s)`` is at most 1; a positive gate makes them cancel terms as large as
    ``exp(chunk * g)``. Every path runs it on the call's gates through ``bind`` (the reference loop, the
    chunked torch form, the Triton kernels, ``Attention.step``, and each rank's part under context
    parallelism, before the ranks agree). The decay rule's gates are not checked here."""
    if not RULES[rec.rule].log_decay_gates:
        return
    if rec.gate == "head":
        if rec.decay == 0:  # DeltaNet: no decay
            return
        g = E.head_values(rec.decay, bound.subs, bound.heads)
        what = f"decay {rec.decay}"
    else:
        g = tensors[rec.decay]
        what = rec.decay
        if g.is_cuda and torch.cuda.is_current_stream_capturing():
            return  # a CUDA graph being captured reads no value on the host: eager calls check
    bad = ~(g <= 0)  # NaN, +inf and positive gates; -inf (a hard reset) passes
    if bool(bad.any()):
        at = [int(i) for i in torch.nonzero(bad)[0]]
        where = f"at h = {at[0]}" if rec.gate == "head" else f"at index {at}"
        raise SpecError(f"{RULES[rec.rule].title}'s gates are log decays: each must be finite or -inf (a hard reset), and "
                        f"<= 0; {what} is {float(g[tuple(at)])!r} {where}", where=gate_where(rec),
                        hint="pass log decays, e.g. logsigmoid(x) or -softplus(x)" if rec.gate != "head" else None)


def bind(rec: ir.RecurrenceIR, sizes: dict, inputs: dict, *, n: int, heads: int, dk: int, batch: int,
         device) -> tuple[E.Bound, dict]:
    """A call of a recurrence bound and checked: its sizes, its inputs (``evaluate.bind_inputs``) and its
    gates (``check_gates``); errors name the argument. Every path binds its call here."""
    bound = E.bind_sizes(rec, n=n, heads=heads, sizes=sizes, dk=dk)
    tensors, _ = E.bind_inputs(rec, bound, inputs, batch=batch, device=device)
    check_gates(rec, bound, tensors)
    rule = rule_of(rec)
    if rule.check_rates is not None:
        rule.check_rates(rec, tensors)
    return bound, tensors


# ----------------------------------------------------------------- dispatch (used by runtime.api)
def hardware_for(device: torch.device):
    """The simulator's hardware model for a device: the CUDA device's model when known, else H100."""
    from ...compiler.cost.hardware import get_hardware, hardware_for_gpu

    if device.type == "cuda" and torch.cuda.is_available():
        return hardware_for_gpu(torch.cuda.get_device_name(device))
    return get_hardware("h100")


def check_chunk(chunk) -> int | None:
    """``q_tile=`` of a recurrence: the chunk size (16, 32 or 64; one int or a one-element tuple)."""
    if chunk is None:
        return None
    if isinstance(chunk, tuple | list) and len(chunk) == 1:
        chunk = chunk[0]
    if isinstance(chunk, bool) or chunk not in CHUNKS:
        raise SpecError(f"a recurrence's chunk size (q_tile) must be one of {', '.join(map(str, CHUNKS))}, "
                        f"got {chunk!r}", where="argument q_tile")
    return int(chunk)


def choose_chunk(rec: ir.RecurrenceIR, T: int, H: int, Dk: int, B: int, device, dtype, hardware=None) -> int:
    """The simulator's chunk size for these shapes on the device's hardware model (``hardware``: that
    GPU model instead, as if the tensors were on it)."""
    from ...compiler.cost.recurrence_cost import best_chunk

    if hardware is not None:
        nbytes = 2 if dtype in (torch.float16, torch.bfloat16) else 4
        return best_chunk(rec.gate, max(T, 1), H, Dk, B, hardware, nbytes=nbytes, rule=rec.rule).chunk
    if torch.device(device).type == "cpu" and rec.gate == "vector":
        # On the CPU the per-channel gate's [C, C, Dk] in-chunk product dominates:
        # measured here (2 cores, T=4096, Dk=64), chunk 16 ran 1.7x faster than 32.
        return 16
    nbytes = 2 if dtype in (torch.float16, torch.bfloat16) else 4
    return best_chunk(rec.gate, max(T, 1), H, Dk, B, hardware_for(torch.device(device)), nbytes=nbytes,
                      rule=rec.rule).chunk


def simulate_recurrence(rec: ir.RecurrenceIR, *, n, sizes, heads, head_dim, batch, hardware, q_tile, kv_tile, dtype,
                        nk, inputs):
    """``attnc.simulate`` of a recurrence: the chunked form's FLOPs, bytes and predicted times, the chosen
    chunk size (``q_tile=`` forces one) and the length past which it beats causal softmax attention."""
    from ...compiler.cost.hardware import get_hardware
    from ...compiler.cost.model import dtype_bytes
    from ...compiler.cost.recurrence_cost import RULE_COSTS
    from ...compiler.cost.recurrence_cost import simulate_recurrence as simulate_chunks

    if rec.rule not in RULE_COSTS:
        raise SpecError(f"'{rec.name}' runs {RULES[rec.rule].title}, which has no cost model yet",
                        where="argument pattern")

    for what, value in (("nk", nk), ("kv_tile", kv_tile), ("inputs", inputs)):
        if value is not None:
            raise SpecError(f"a recurrence takes no {what}: its cost does not depend on it", where=f"argument {what}")
    if n is None:
        raise SpecError("the sequence length n is required", where="argument n")
    for what, value in (("n", n), ("heads", heads), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"must be a positive int, got {value!r}", where=f"argument {what}")
    limit = RULE_COSTS[rec.rule].max_head_dim
    past_limit = (limit is not None and isinstance(head_dim, int) and not isinstance(head_dim, bool)
                  and head_dim > limit)
    if not past_limit:  # the kernels' range, as check-gpu and emit refuse beyond it (a rule's stricter limit: below)
        head_dim = E.kernel_head_dim(head_dim)
    if limit is not None and head_dim > limit:
        raise SpecError(f"{RULES[rec.rule].title}'s Triton kernels take key head dims up to {limit}, got {head_dim}: "
                        "the chunked torch form runs beyond it, and it has no cost model", where="argument head_dim")
    E.bind_sizes(rec, n=n, heads=heads, sizes=sizes, dk=head_dim)  # parameters and sizes are checked
    chunk = check_chunk(q_tile)
    hw = get_hardware(hardware)
    nbytes = dtype_bytes(dtype)
    return simulate_chunks(rec.name, rec.gate, n, hw, heads=heads, head_dim=head_dim, batch=batch,
                           dtype=str(dtype).lower(), nbytes=nbytes, chunk=chunk, rule=rec.rule)
