"""torch's fused CPU attention kernel, as the executor and the decoding rows call it."""

from __future__ import annotations

import torch


def flash_op():
    """torch's fused CPU attention kernel (online softmax, returns the log-sum-exp), if present
    with the signature used here (a float ``attn_mask`` and ``scale``)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return None
    names = {a.name for a in op.default._schema.arguments}
    return op if {"attn_mask", "scale"} <= names else None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of ``flash_op``'s kernel. q, k and v go to it with a unit stride on their last dimension:
    it reads each row as contiguous whatever that stride is (torch 2.13; SDPA copies such inputs before it
    calls the kernel), so a K^T cache's ``k`` or a ``[..., ::2]`` view gave wrong outputs. The mask may have any
    strides."""
    q, k, v = (x.contiguous() if x.shape[-1] > 1 and x.stride(-1) != 1 else x for x in (q, k, v))
    return flash_op()(q, k, v, 0.0, False, attn_mask=attn_mask, scale=scale)


def fused_shapes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's fused CPU attention kernel takes these tensors: on CPU, Dv == D."""
    return flash_op() is not None and not q.is_cuda and q.shape[-1] == v.shape[-1]
