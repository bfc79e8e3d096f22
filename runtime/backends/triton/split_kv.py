"""Split-KV forward (flash decoding) on the generated kernels: how many programs share the KV tiles of each
(Q tile, batch x query head), and the fp32 buffers their partial results go to.

A forward launches one program per (Q tile, batch x query head), each over its Q tile's KV tile lists. A decode
step (queries after a KV cache: one Q tile) or any call with few Q tiles launches fewer programs than the GPU
has SMs, and each walks a long list alone. With ``splits`` > 1 the forward's third launch axis splits every
list into ``splits`` contiguous shares (``compiler.codegen.triton.kernels.split_share``); each split writes its
normalised partial out and lse (``-inf`` and zeros where its share holds no key of a row) to the buffers
``[splits, B, H, rows, DV]`` and ``[splits, B, H, rows]``, and the module's ``attnc_fwd_combine`` merges them
by log-sum-exp on the device.

The count is the decode model's rule (``compiler.cost.decode_cost.split_kv``: the smallest split count whose
makespan over the SMs is within ``SPLIT_SLACK`` of the best), on the plan's visited KV tiles per Q tile and
its programs; a launch of at least one program per SM keeps one split without asking. Only a forward-only
call splits (``TritonRunner.__call__``): a call that needs gradients keeps one program per Q tile, its
backward reading the merged out and lse as before.
"""

from __future__ import annotations

import torch

from ....core.errors import SpecError

#: The split count of every forward-only call, whatever the rule says (tests, measurements); None: the rule.
#: More splits than a list has tiles is allowed: the extra splits walk nothing and weigh nothing.
FORCE_SPLITS: int | None = None


def forced_splits() -> int | None:
    """``FORCE_SPLITS``, checked: a positive int or None."""
    n = FORCE_SPLITS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SpecError(
            f"FORCE_SPLITS is a positive int or None, got {n!r}", where="argument FORCE_SPLITS"
        )
    return n


def choose_splits(plan, batch: int, heads: int, sms: int) -> int:
    """The split count of a forward-only launch of ``plan`` over ``batch x heads`` query heads on ``sms`` SMs:
    ``FORCE_SPLITS`` where set; 1 where the programs (Q tiles x batch x heads) fill the SMs already; else
    ``decode_cost.split_kv`` on each list class's KV tiles per Q tile (FULL and PARTIAL), each class standing
    for the (batch, head) programs that read its lists. Decided once per plan, batch, heads, SM count and list width (a
    routed plan made on the host is new at every call, and so is its choice; a plan whose lists each call makes
    on the device keeps its first call's)."""
    forced = forced_splits()
    if forced is not None:
        return forced
    sched = plan.schedule
    if sched.num_q_tiles * batch * heads >= sms or batch * heads == 0:  # (an empty batch: no program to split)
        return 1

    def make() -> int:
        from ....compiler.cost.decode_cost import split_kv

        classes = sched.heads_stored
        repeat = batch * heads // classes if (batch * heads) % classes == 0 else 1
        return split_kv(row_tiles(sched), repeat, sms).splits

    # keyed by the lists' widths too: a decode step's lists, made on the device for a range of lengths
    # (plan.decode_lists), grow with the cache under one plan, and so does the split that suits them
    width = sched.full_index.shape[-1] + sched.partial_index.shape[-1]
    return plan.on_device(("kv_splits", batch, heads, sms, width), make)


def row_tiles(sched) -> list[int]:
    """The KV tiles each (list class, Q tile) row of ``sched`` visits, FULL and PARTIAL: its counts where they are
    on the host; for lists made on the device for each call (``plan.call_plan``), nothing is read back: each row
    is taken at its lists' widths, the most it may hold."""
    if sched.full_count.device.type != "cpu":
        return [
            sched.full_index.shape[-1] + sched.partial_index.shape[-1]
        ] * sched.full_count.numel()
    return (sched.full_count + sched.partial_count).reshape(-1).tolist()


def partials(
    splits: int, batch: int, heads: int, rows: int, dv: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The split forward's buffers: partial outputs ``[splits, B, H, rows, DV]`` and lse ``[splits, B, H, rows]``,
    fp32 (every split writes all its rows: no fill)."""
    out = torch.empty(splits, batch, heads, rows, dv, dtype=torch.float32, device=device)
    lse = torch.empty(splits, batch, heads, rows, dtype=torch.float32, device=device)
    return out, lse


def combine_rows(dv_block: int, rows: int) -> int:
    """Rows per program of the merge: 8K elements of a split's partial tile, at most 64 rows and no more than the
    launch's ``rows`` need (a power of two, at least 16: a decode step's one row pads to 16, not 64)."""
    need = 1 << max(0, rows - 1).bit_length()
    return max(16, min(64, 8192 // dv_block, need))


__all__ = [
    "FORCE_SPLITS",
    "choose_splits",
    "combine_rows",
    "forced_splits",
    "partials",
    "row_tiles",
]
