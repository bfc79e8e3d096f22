"""Argument checks at the API boundary, shared by the module, the runners and the decoding step:
clear errors naming the argument, before any work."""

from __future__ import annotations

import math
import numbers
import os

import torch

from ..compiler.analysis import evaluate as E
from ..compiler.codegen.triton.exprs import FP32_MAX
from ..core import ir
from ..core.errors import SpecError


def resolve_scale(scale, head_dim: int, dtype: torch.dtype | None = None) -> float:
    """``scale`` as a float: ``1/sqrt(head_dim)`` for None; anything but a finite number is refused, and with
    ``dtype`` (q's) one beyond the range of the dtype the scores are computed in (float32 but for float64 q: the
    scores were inf and the outputs NaN on some backends)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):  # numpy's scalars and Fraction are numbers
        hint = "pass float(scale)" if isinstance(scale, torch.Tensor) and scale.dim() == 0 else None
        raise SpecError(f"scale must be a number, got {type(scale).__name__}", where="argument scale", hint=hint)
    if not math.isfinite(scale):
        raise SpecError(f"scale must be a finite number, got {scale!r}", where="argument scale")
    if dtype is not None and dtype != torch.float64 and abs(scale) > FP32_MAX:
        raise SpecError(f"scale {scale:g} is beyond the float32 range ({FP32_MAX:.4g}) the scores of {dtype} inputs are "
                        "computed in", where="argument scale", hint="use a smaller scale, or float64 inputs")
    return float(scale)


#: The device assert's message of a paged call whose values break a rule (the runner's check on the device, or
#: ``frontends.paged_checks.check_on_device``): on the CPU the caller then names the argument and the row on the host.
PAGED_VALUES_FAILED = "attnc: a paged call's block_table, cache_seqlens or cu_seqlens_q is out of range"
#: The device assert's message of a paged call whose pattern's ``scale E`` is not finite at one of its queries
#: (``backends.triton.paged_queries.score_scaled``): on the CPU the caller then names the argument.
SCORE_SCALE_FAILED = "attnc: a paged call's score scale is not finite at one of its queries"
#: The device assert's message of a paged call of a prefill method (XAttention's selection across a block's queries)
#: with a row whose queries are not all its keys (``backends.triton.paged_antidiagonal.refuse_cached_rows``): on the
#: CPU the caller then gives the contiguous call's error.
PREFILL_ROWS_FAILED = "attnc: a paged call of a prefill method has a row with cached keys before its queries"

#: Bytes of int64 work per evaluated (query, key) pair beside the result (the
#: positions and one intermediate at least): the floor of what evaluation needs.
WORK_BYTES_PER_PAIR = 8


def _memory(device: torch.device | None) -> int | None:
    """Bytes of memory where the work runs: the host's RAM, or the CUDA device's; None if unknown."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device is not None and device.type != "cpu":
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system: no check
        return None


def check_fits(what: str, nbytes: int, where: str, device: torch.device | None = None) -> None:
    """Refuse, before allocating anything, work that cannot fit in the memory where it would run."""
    total = _memory(device)
    if total is not None and nbytes > total:
        raise SpecError(f"{what}; at least {float(nbytes):.3g} bytes in all, more than the "
                        f"{float(total):.3g} of this {'GPU' if device is not None and device.type == 'cuda' else 'machine'}",
                        where=where, hint="use smaller sizes" + (" (or a tile backend)" if "reference" in what else ""))


def check_softcap(pat: ir.PatternIR, bound: E.Bound) -> None:
    """A per-head softcap must be positive on every head (a constant one is checked when loading)."""
    if pat.softcap is None or not pat.softcap.free_symbols:
        return
    caps = E.head_values(pat.softcap, bound.subs, bound.heads)
    bad = torch.nonzero(~(caps > 0) | ~torch.isfinite(caps)).flatten()
    if len(bad):
        h = int(bad[0])
        raise SpecError(f"softcap must be a positive finite number on every head; {pat.softcap} is {float(caps[h])!r} "
                        f"at h = {h}", where="softcap")


def check_flag(what: str, value) -> bool:
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy's bool too
        return bool(value)
    raise SpecError(f"expected True or False, got {value!r}", where=f"argument {what}")


def state_heads(q: torch.Tensor, v: torch.Tensor) -> int:
    """The heads of a recurrence's state and output: q's heads, or v's where v has more (the delta
    rule's grouped value attention, GVA)."""
    return max(q.shape[1], v.shape[1])


def check_qkv(q, k, v, gva: bool = False, packed: bool = False) -> None:
    """q, k, v as every backend takes them (``[B, H, N, D]``, one dtype and device; q's heads a multiple
    of k's and v's, GQA). ``gva``: the delta rule, whose v may also have more heads than q and k
    (grouped value attention, as flash-linear-attention: value head j reads q/k head j // (Hv // H)).
    ``packed``: sequences packed along the tokens (``cu_seqlens``), where zero tokens are every sequence
    empty, which runs (empty, differentiable results)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
        if t.dim() != 4:
            raise SpecError(f"expected 4 dimensions [B, H, N, D], got shape {list(t.shape)}", where=f"argument {name}")
        if not t.dtype.is_floating_point:
            raise SpecError(f"expected a floating-point tensor, got {t.dtype}", where=f"argument {name}")
        if t.dtype.itemsize == 1:  # float8: no backend computes attention on it (Flex's and torch's CPU ops lack it)
            raise SpecError(f"float8 inputs are not supported, got {t.dtype}", where=f"argument {name}",
                            hint="cast q, k and v to bfloat16 or float16 (a float8 pool: dequantize the pages read)")
        if t.is_meta:  # no data: a kernel would read uninitialised memory
            raise SpecError("a meta tensor holds no data", where=f"argument {name}",
                            hint="pass a tensor on the CPU or a CUDA device")
        # zero tokens are refused here, before any input is derived from q and k (a landmark table, a
        # vertical-slash selection): every pattern then gives this one error (an empty batch runs)
        for axis, what in ((1, "heads"), (2, "tokens"), (3, "head dim")):
            if t.shape[axis] == 0 and not (packed and axis == 2):
                raise SpecError(f"has {what} 0 (shape {list(t.shape)})", where=f"argument {name}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise SpecError(f"q, k, v must share a dtype: q is {q.dtype}, {name} is {t.dtype}", where=f"argument {name}")
        if t.device != q.device:
            raise SpecError(f"q, k, v must be on one device: q is on {q.device}, {name} on {t.device}",
                            where=f"argument {name}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise SpecError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}, v {v.shape[0]}", where="argument k")
    if k.shape[3] != q.shape[3]:
        raise SpecError(f"head dim of k ({k.shape[3]}) differs from q's ({q.shape[3]})", where="argument k")
    if gva and v.shape[1] > q.shape[1]:  # grouped value attention: q and k share heads, v has a multiple
        if v.shape[2] != k.shape[2]:
            raise SpecError(f"v {list(v.shape)} must match k {list(k.shape)} in tokens", where="argument v")
        if k.shape[1] != q.shape[1]:
            raise SpecError(f"with more value heads ({v.shape[1]}) than query heads (GVA), k must have q's "
                            f"{q.shape[1]} heads, got {k.shape[1]}", where="argument k")
        if v.shape[1] % q.shape[1] != 0:
            raise SpecError(f"value heads ({v.shape[1]}) must be a multiple of query/key heads ({q.shape[1]}) "
                            "(GVA: value head j reads q/k head j // (Hv // H))", where="argument v")
        return
    if v.shape[1] != k.shape[1] or v.shape[2] != k.shape[2]:
        raise SpecError(f"v {list(v.shape)} must match k {list(k.shape)} in heads and tokens", where="argument v",
                        hint="more value heads than query heads (GVA) is the delta rule's"
                        if v.shape[1] > q.shape[1] else None)
    if q.shape[1] % k.shape[1] != 0:
        raise SpecError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})",
                        where="argument k")


def check_state(state, q: torch.Tensor, where: str, want: tuple | None = None) -> None:
    """A recurrence state: a tensor holding data on q's device and, when ``want`` is given, a
    float tensor of that shape (refused before any work). None (zeros) passes."""
    if state is None:
        return
    if isinstance(state, torch.Tensor) and (state.is_meta or state.device != q.device):
        raise SpecError(f"{where} is on {state.device}, q on {q.device}"
                        + (": a meta tensor holds no data" if state.is_meta else ""), where=f"argument {where}")
    if want is None:
        return
    if not isinstance(state, torch.Tensor) or tuple(state.shape) != want:
        got = list(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
        raise SpecError(f"{where} must be {list(want)}, got {got}", where=f"argument {where}")
    if not state.dtype.is_floating_point:
        raise SpecError(f"{where} must be a floating-point tensor, got {state.dtype}", where=f"argument {where}")
    if q.dtype.is_floating_point and torch.finfo(state.dtype).bits < torch.finfo(q.dtype).bits:
        raise SpecError(f"{where} is {state.dtype} but q is {q.dtype}: the state would carry fewer bits than the "
                        "inputs (a call returns its state in float32, float64 for float64 inputs)",
                        where=f"argument {where}", hint=f"pass the state a {q.dtype} call returned, or convert it")


FLA_HINT = ("flash-linear-attention's q, k, v and gates are [B, T, H, K] and [B, T, H]: pass layout='bnhd' (to "
            "compile_attention or the call); for [B, H, T, K] tensors, pass layout='bhnd'")


def check_fla_reading(q, v, initial_state) -> None:
    """A recurrence's call under a layout named nowhere (read as ``"bhnd"``): refuse q, v that read as fla's
    ``[B, T, H, K]`` tensors, which would otherwise run silently as T heads of H tokens (every shape
    fits both readings when q, k and v share their heads). The state's heads, the same in both layouts,
    decide where it is given: as many as q's heads runs, as many as q's tokens (v's, under GVA) is
    refused. Without a state, q reading as more heads than tokens (and more than one token) is refused:
    a prefill's tokens outnumber its heads, while fla's tensors read the other way. One token (a
    decoding step as a forward) is not refused."""
    if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, v)):
        return  # check_qkv names it
    heads, tokens = state_heads(q, v), q.shape[2]
    shape = f"q {list(q.shape)} reads as [B, H, N, D] (layout 'bhnd', the default)"
    if isinstance(initial_state, torch.Tensor) and initial_state.dim() == 4:
        given = initial_state.shape[1]
        if given != heads and given == max(tokens, v.shape[2]):
            raise SpecError(f"{shape}: {heads} heads of {tokens} tokens, but initial_state "
                            f"{list(initial_state.shape)} has {given} heads", where="argument q", hint=FLA_HINT)
        return
    if q.shape[1] > tokens > 1:
        raise SpecError(f"{shape}: {q.shape[1]} heads of {tokens} tokens, which is how fla's [B, T, H, K] "
                        "tensors read in it", where="argument q", hint=FLA_HINT)
