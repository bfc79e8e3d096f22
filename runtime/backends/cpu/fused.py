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


def fused_shapes(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether torch's fused CPU attention kernel takes these tensors: on CPU, Dv == D."""
    return flash_op() is not None and not q.is_cuda and q.shape[-1] == v.shape[-1]
