"""How a Flex plan runs (the seam after planning: ``runner`` plans, this runs): Flex's fused kernel,
``torch.compile(flex_attention)`` kept per plan (one code object per plan, so one compile cache; ``kernel_key``,
``namespace_of``), what refuses it (``fused_refusal``, ``block_refusal``) and the kernel options a call takes; else
Flex's dense implementation at the level of its higher-order op (``dense_call``), the captured tensors explicit
operands; FoX gates as the prefix sums a score_mod reads (``prefix_sums``)."""

from __future__ import annotations

import hashlib
import math
import sys
import threading
import types

import torch

from ....compiler.analysis.weights import LOG_WEIGHTS
from ....compiler.codegen.flex import FlexSource
from ....core import ir
from ...numerics import fox_prefix
from .block_masks import FlexPlan

_CALL_SOURCE = '''

def flex_call(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, kernel_options=None):
    """The Flex call this plan compiles (its own code object: its own compile cache)."""
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=enable_gqa, return_lse=return_lse, kernel_options=kernel_options)
'''

#: Flex's backward on smaller tiles where the score_mod's captured tensor is differentiated (``relative()``'s
#: table) and the head dim is over 64, on a GPU: with its own tiles, Inductor found no backward config within
#: the shared memory (233,472 bytes asked of 232,448 at head dim 128 in bf16 on an H100, torch 2.11,
#: 2026-11-26) and the backward failed to compile. Chosen before the call: the backward compiles at the
#: first ``backward()``, after the forward has returned.
BUFFER_GRAD_BACKWARD = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32}


def kernel_options(device: torch.device, head_dim: int, score_bufs: tuple) -> dict | None:
    """The options a compiled Flex call of these shapes is given (None: Flex's own choice)."""
    if device.type == "cuda" and head_dim > 64 and any(t.requires_grad for t in score_bufs):
        return BUFFER_GRAD_BACKWARD
    return None


def fused_refusal(device: torch.device, dtype: torch.dtype, grad: bool, need_lse: bool) -> str | None:
    """Why Flex's fused kernel cannot serve a call on ``device`` (None: it can). On CPU (torch 2.13)
    the compiled kernel is inference only: no backward, no lse, no float64."""
    if device.type != "cpu":
        return None
    if grad:
        return "gradients are needed: the CPU kernel has no backward"
    if need_lse:
        return "the lse is requested: the CPU kernel does not return it"
    if dtype == torch.float64:
        return "float64: the CPU kernel does not take it"
    return None


def fused_ok(plan: FlexPlan, dtype: torch.dtype, grad: bool, need_lse: bool) -> bool:
    """Whether Flex's fused CPU kernel (torch 2.13) serves this call: ``fused_refusal`` and
    ``block_refusal``."""
    return fused_refusal(torch.device("cpu"), dtype, grad, need_lse) is None and block_refusal(plan) is None


def block_refusal(plan: FlexPlan) -> str | None:
    """Why Flex's fused CPU kernel (torch 2.13) cannot take this plan's blocks (None: it can).
    Measured on a causal band (fp32, 200 tokens): wrong results with a KV block smaller than the Q
    block (16 and 8) and with equal blocks of 8, 24 or 40 tokens; right with 16, 32, 48, 64 and 128.
    Accepted: equal power-of-two blocks of at least 16 tokens (what the planner picks). The dense
    implementation is exact with any blocks."""
    bq, bk = plan.block_size
    if bq != bk:
        return f"unequal Q and KV blocks ({bq}, {bk})"
    if bq & (bq - 1) or bq < 16:
        return f"blocks of {bq} tokens (the kernel needs a power of two of at least 16)"
    return None


def compile_errors() -> tuple[type, ...]:
    """The exceptions of a failed torch.compile (imported at the first compiled call: importing
    inductor takes seconds, which a first call served by the executor does not pay)."""
    from torch._dynamo.exc import TorchDynamoException
    from torch._inductor.exc import InductorError

    return TorchDynamoException, InductorError


#: Measured seconds of the calls that compiled a Flex kernel in this process (the compile and one
#: run), oldest first: ``backend_choice`` estimates the next compile from them.
COMPILE_SECONDS: list[float] = []


def kernel_key(plan: FlexPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, need_lse: bool) -> tuple:
    """What a compiled Flex kernel of these mods is specialised on: ((Q length, KV length), the rest:
    batch, heads, head dims, dtype, block sizes, lse)."""
    return ((q.shape[2], k.shape[2]),
            (q.shape[0], q.shape[1], k.shape[1], q.shape[3], v.shape[3], q.dtype, plan.block_size, need_lse))


#: Generated mods by their text (without the header): plans whose mods read alike (a 1-D pattern at
#: another sequence length, the same pattern compiled twice) share one namespace, hence one compiled
#: Flex call; a bounded process-wide cache (oldest dropped first).
_NAMESPACES: dict[str, dict] = {}


NAMESPACE_CACHE_SIZE = 64


def namespace_of(source: FlexSource, pat: ir.PatternIR) -> dict:
    ns = _NAMESPACES.pop(source.body, None)
    if ns is None:
        ns = _module_globals(source.body)
        exec(compile(source.text + _CALL_SOURCE, f"<attnc flex {pat.key()[:12]}>", "exec"),  # noqa: S102
             ns)
        while len(_NAMESPACES) >= NAMESPACE_CACHE_SIZE:
            sys.modules.pop(_NAMESPACES.pop(next(iter(_NAMESPACES)))["__name__"], None)
    _NAMESPACES[source.body] = ns  # most recently used last
    return ns


def _module_globals(body: str) -> dict:
    """The globals of a new module for the generated mods, registered in ``sys.modules``: dynamo
    re-imports a traced function's module by its ``__name__`` (seen compiling the CUDA kernel,
    torch 2.11), so the name must resolve. One module per mods text."""
    from torch.nn.attention.flex_attention import flex_attention

    name = f"attnc_flex_generated_{hashlib.sha1(body.encode()).hexdigest()[:16]}"
    module = types.ModuleType(name)
    module.__dict__.update({"torch": torch, "flex_attention": flex_attention,
                            **{fn.__name__: fn for fn in LOG_WEIGHTS.values()}})  # weights F(s) ** P
    sys.modules[name] = module
    return module.__dict__


#: Held while a thread compiles Flex's kernel or runs its dense implementation (which traces the mods with fx):
#: dynamo's compile and fx's patching are the process's, and two threads' calls at once failed in fx
#: ("CURRENT_PATCHER is None"). A compiled kernel's calls take no lock.
TRACE_LOCK = threading.RLock()


def compiled_call(ns: dict):
    """The compiled Flex call of these mods (made once; dynamo's cache lives on its code object).
    ``dynamic=None``: the first shapes compile static; a second set of shapes recompiles once with
    dynamic sizes, which later sequence lengths reuse (measured on CPU, torch 2.13: a 1-D mask at
    1024, 2048, 1536 and 3072 tokens compiled twice, the last two calls reused the dynamic kernel)."""
    if "compiled_call" not in ns:
        ns["compiled_call"] = torch.compile(ns["flex_call"], fullgraph=True, dynamic=None)
    return ns["compiled_call"]


def prefix_sums(gates: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """FoX: ``reference.fox_prefix`` of the gates in the compute dtype (hi + lo prefix sums, exact
    to rounding at any length, and the last reset: a gate of -inf), each ``[B | 1, H, N]``."""
    g = gates.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if g.dim() == 2:
        g = g.unsqueeze(0)
    return fox_prefix(g)


#: Weights x value entries held at once when non-finite value rows are added apart (``dense_call``).
NONFINITE_SLAB = 1 << 24


def dense_call(q, k, v, ns: dict, bm, scale: float, mask_bufs: tuple, score_bufs: tuple):
    """Flex's dense implementation at the level of its higher-order op, with the captured
    tensors as explicit operands (so their gradients are computed). Returns lse in natural log.

    A non-finite value (NaN, inf) reaches only the queries that give its key a nonzero weight, as in
    the reference (``reference.dense.attend_values``): the op's ``p @ v`` multiplies every masked
    key's value by its weight 0, which made one NaN in v reach every query. Value rows with a
    non-finite entry are zeroed there and added apart, where their weight (the op on one-hot values:
    exact, one nonzero term) is nonzero. The check is one pass over v, on the CPU (the only device
    this path serves), beside the N x N scores of the op."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options

    options = _apply_kernel_options(q, k, v, True, None)
    score = ns.get("score_mod") or _identity_score
    mask_tuple = (*bm.as_tuple()[:-1], ns["mask_mod"])

    def attend(values):
        out, lse, _ = flex_hop(q, k, values, score, mask_tuple, scale, options, score_bufs, mask_bufs)
        return out, lse * math.log(2.0)  # the op's lse is in base 2

    bad = ~torch.isfinite(v).all(-1)  # [B, Hkv, Nk]
    if not bool(bad.any()):
        return attend(v)
    zero = torch.zeros((), dtype=v.dtype, device=v.device)
    out, lse = attend(torch.where(bad[..., None], zero, v))
    keys = bad.flatten(0, -2).any(0).nonzero().flatten()
    onehot = torch.zeros(*v.shape[:3], len(keys), dtype=v.dtype, device=v.device)
    onehot[:, :, keys, torch.arange(len(keys), device=v.device)] = 1
    weights, _ = attend(onehot)  # [B, Hq, Nq, c]: the weights of the keys with a non-finite value
    rows = torch.where(bad[..., keys, None], v[..., keys, :], zero)  # their non-finite rows only
    rows = rows.repeat_interleave(q.shape[1] // v.shape[1], dim=1)  # GQA: query head h reads KV head h // G
    B, Hq, Nq, Dv = *q.shape[:3], v.shape[-1]
    step = max(1, NONFINITE_SLAB // max(1, B * Hq * Nq * Dv))
    for i in range(0, len(keys), step):
        w = weights[..., i:i + step, None]  # [B, Hq, Nq, c, 1]
        # the rows zeroed where the weight is 0 (not the product: its gradient would be 0 * NaN)
        out = out + (w * torch.where(w != 0, rows[:, :, None, i:i + step], zero)).sum(-2)
    return out, lse


def _identity_score(score, b, h, q_idx, kv_idx):
    return score


def nan_kept(score_mod):
    """``score_mod`` (None: the identity) for Flex's compiled CPU kernel, with a NaN score made +inf. That kernel
    (torch 2.13) drops a NaN score from its row's softmax: a NaN in k, or a NaN FoX gate, left the rows that attend
    it finite and wrong, where the reference, eager Flex and the GPU kernels give NaN. A score of +inf reaches the
    row as NaN there (its max is inf, and exp(inf - inf) is NaN), as a NaN does everywhere else; a masked pair is
    still masked."""
    inner = score_mod or _identity_score

    def score(s, b, h, q_idx, kv_idx):
        s = inner(s, b, h, q_idx, kv_idx)
        return torch.where(s != s, float("inf"), s)

    return score
