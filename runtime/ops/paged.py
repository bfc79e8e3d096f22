"""A paged batch in one launch as a ``torch.library`` custom op, so that a model calling an attnc module on a paged
KV cache compiles with ``torch.compile(fullgraph=True)``.

``attnc::paged_attention(q, k_cache, v_cache, block_table, seqlens, q_start, q_count, inputs, names, key, max_q,
scale) -> (out, lse)`` (``inputs`` the call-time inputs the mask reads, ``names`` theirs, comma-separated) runs the runner's one-launch paged forward (``runner.paged_forward``: the Triton backend's
``attnc_fwd_paged``) inside its implementation; everything it reads is a tensor input, so nothing is read on the
host in the traced graph; the call's shapes and dtypes are checked at trace time (``frontends.paged``) and its
values by the kernel, whose row flags the runner asserts on the device inside the op. Forward only: a paged call refuses gradients. The fake
implementation gives the shapes: ``out`` ``[B | 1, Hq, rows, Dv]`` in q's dtype, ``lse`` ``[B | 1, Hq, rows]``
fp32.
"""

from __future__ import annotations

import torch

from . import common as C


def _forward_impl(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  seqlens: torch.Tensor, q_start: torch.Tensor | None, q_count: torch.Tensor | None,
                  inputs: list[torch.Tensor], names: str, key: str, max_q: int, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    runner = C._runner(key)
    given = dict(zip(names.split(","), inputs, strict=True)) if names else None
    with C.eager_dispatch(), torch.no_grad():
        out, lse = runner.paged_forward(q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q, scale,
                                        given)
    return out, lse


def _forward_fake(q, k_cache, v_cache, block_table, seqlens, q_start, q_count, inputs, names, key, max_q, scale):
    B, Hq, rows, _ = q.shape
    return q.new_empty(B, Hq, rows, v_cache.shape[-1]), q.new_empty(B, Hq, rows, dtype=torch.float32)


def _define():
    op = torch.library.custom_op("attnc::paged_attention", _forward_impl, mutates_args=())
    op.register_fake(_forward_fake)
    return op


#: ``torch.ops.attnc.paged_attention``
paged_attention = C.defined_once("paged_ops", _define)


def launcher(runner):
    """The one-launch callable of ``frontends.paged.run`` under ``torch.compile``: the op, for ``runner``."""

    def one_launch(q, k_cache, v_cache, block_table, seqlens, q_start, q_count, max_q: int, scale: float,
                   inputs: dict | None = None):
        inputs = inputs or {}
        return paged_attention(q, k_cache, v_cache, block_table, seqlens, q_start, q_count, list(inputs.values()),
                               ",".join(inputs), runner.op_key, max_q, scale)

    return one_launch
