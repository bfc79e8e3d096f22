"""Context parallelism: one compiled pattern over a sequence sharded across several devices
(torch.distributed: NCCL on GPUs, gloo on CPUs)::

    from attnc.distributed import ContextParallel
    cp = ContextParallel(attn, group=None, ulysses_degree=1, kv="ring")
    q_l, k_l, v_l = (cp.shard(t) for t in (q, k, v))
    out = cp.unshard(cp(q_l, k_l, v_l))

See ``attnc.runtime.parallel``.
"""

from .runtime.parallel.context import ContextParallel

__all__ = ["ContextParallel"]
