"""Context parallelism: one compiled pattern over a sequence sharded across the ranks of a
torch.distributed group (``attnc.distributed.ContextParallel`` is the public entry).

- ``sharding``: which tokens each rank holds (contiguous chunks, or zigzag for causal patterns).
- ``pairs``: which ranks' keys each rank's queries need, from the tile classification (plan time).
- ``blocks``: the attention of one block of queries against one block of keys at absolute positions,
  forward ``(out, lse)`` and the flash-style backward from the merged log-sum-exp.
- ``collectives``: the agreement check run before any transfer, point-to-point steps, all-to-all.
- ``softmax``: ring and all-gather attention as one autograd function; ``ulysses``: the all-to-all
  that trades sequence shards for head shards; ``recurrence``: states chained across ranks (across
  ring positions, on a share of the heads, under Ulysses).
- ``context``: ``ContextParallel``, which composes them.
"""
