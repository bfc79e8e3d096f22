"""A paged batch's query rows of their own counts: ``cu_seqlens_q=`` and ``max_seqlen_q=`` beside ``block_table=``
(the convention of ``flash_attn_varlen_func`` with a block table, and of vLLM's and FlashInfer's mixed batches).

q is one packed batch entry, ``[1, Hq, total, D]`` (``[1, total, Hq, D]`` under ``"bnhd"``); row b's queries are
q's rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1``, the last of its ``cache_seqlens[b]`` keys (a decode row
holds one, a chunked-prefill row many). ``cu_seqlens_q`` is an int32 ``[B + 1]`` tensor on q's device, B the
block table's rows: it starts at 0, never decreases and ends at ``total`` at most (q's rows past its end, a
serving loop's padding, come out as zeros with an lse of -inf). ``max_seqlen_q`` (an int, optional:
q's ``total`` where not given) bounds every row's count and sizes the launch; with it fixed, a CUDA graph replays
the launch for any counts. The offsets are never read on the host: they are checked on the device with the
pages (the runner's kernel checks each row; ``paged_checks.check_on_device`` before ``k=`` is appended).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...core.errors import SpecError

WHERE = "argument cu_seqlens_q"


@dataclass
class QueryRows:
    """The offsets of a packed paged call (``cu_seqlens_q``) and the most queries of one row."""

    cu: torch.Tensor
    max_q: int | None

    def counts(self) -> torch.Tensor:
        """Each row's query count, int64 on the device."""
        cu = self.cu.to(torch.int64)
        return cu[1:] - cu[:-1]

    def as_launched(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(first row, count, most)``: int32 device tensors, as ``attnc_fwd_paged`` reads them."""
        return self.cu[:-1], self.cu.diff(), self.max_q

    def consistent(self, total: int) -> torch.Tensor:
        """A device bool: the offsets start at 0, end within ``total``, never decrease, no count over
        ``max_q``."""
        counts = self.counts()
        return (
            (self.cu[0] == 0)
            & (self.cu[-1] <= total)
            & (counts >= 0).all()
            & (counts <= self.max_q).all()
        )

    def host_counts(self) -> list[int]:
        """Each row's count read on the host (only where a device check failed, to name the row)."""
        return [int(x) for x in self.counts().tolist()]

    def diagnose(self, total: int) -> None:
        """The offsets' rules on the host, raising the first one broken (after a device check failed)."""
        cu = [int(x) for x in self.cu.tolist()]
        if cu[0] != 0:
            raise SpecError(f"must start at 0, starts at {cu[0]}", where=WHERE)
        if cu[-1] > total:
            raise SpecError(
                f"must end within q's {total} packed query rows, ends at {cu[-1]}", where=WHERE
            )
        # every offset within q's rows before any count is weighed: an offset past them is the offsets' fault, not
        # max_seqlen_q's (whose launch bound is at most q's rows)
        past = next((b for b, x in enumerate(cu) if x > total), None)
        if past is not None:
            raise SpecError(
                f"cu_seqlens_q[{past}] = {cu[past]} runs past q's {total} packed query rows", where=WHERE
            )
        for b in range(len(cu) - 1):
            if cu[b + 1] < cu[b]:
                raise SpecError(
                    f"must be non-decreasing: cu_seqlens_q[{b}] = {cu[b]} > cu_seqlens_q[{b + 1}] = {cu[b + 1]}",
                    where=WHERE,
                )
            if cu[b + 1] - cu[b] > self.max_q:
                raise SpecError(
                    f"row {b} has {cu[b + 1] - cu[b]} queries, more than max_seqlen_q = {self.max_q}",
                    where="argument max_seqlen_q",
                )


def take(pat, inputs: dict) -> QueryRows | None:
    """``cu_seqlens_q`` and ``max_seqlen_q`` out of a paged call's keywords (unless the pattern declares inputs of
    those names), unchecked; None without ``cu_seqlens_q``."""
    declared = {d.name for d in getattr(pat, "inputs", ())}
    cu = (
        inputs.pop("cu_seqlens_q")
        if "cu_seqlens_q" in inputs and "cu_seqlens_q" not in declared
        else None
    )
    most = (
        inputs.pop("max_seqlen_q")
        if "max_seqlen_q" in inputs and "max_seqlen_q" not in declared
        else None
    )
    if cu is None:
        if most is not None:
            raise SpecError(
                "max_seqlen_q bounds the rows of cu_seqlens_q: given without it",
                where="argument max_seqlen_q",
                hint="pass cu_seqlens_q= too, or neither",
            )
        return None
    return QueryRows(cu, most)


def check(rows: QueryRows, q: torch.Tensor, block_table) -> QueryRows:
    """The offsets' type, shape and device and ``max_seqlen_q`` against q (``[1, Hq, total, D]``, oriented) and the
    block table's rows; their values are checked on the device (``consistent``)."""
    cu, total = rows.cu, q.shape[2]
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
        got = cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__
        raise SpecError(
            f"expected an int32 tensor, got {got}",
            where=WHERE,
            hint="flash_attn_varlen_func's convention: [0, n0, n0 + n1, ..., total], int32",
        )
    batch = (
        block_table.shape[0]
        if isinstance(block_table, torch.Tensor) and block_table.dim() == 2
        else None
    )
    if cu.dim() != 1 or batch is None or cu.shape[0] != batch + 1:
        raise SpecError(
            f"expected shape [B + 1] with B = the block table's rows ({batch}), got {list(cu.shape)}",
            where=WHERE,
        )
    if cu.device != q.device:
        raise SpecError(f"cu_seqlens_q is on {cu.device}, q on {q.device}", where=WHERE)
    if q.shape[0] != 1:
        raise SpecError(
            f"with cu_seqlens_q, q packs every row's queries in one batch entry: got batch {q.shape[0]}",
            where="argument q",
            hint="q [1, H, total, D] (layout 'bhnd') or [1, total, H, D] ('bnhd')",
        )
    most = rows.max_q
    if most is None:
        most = total
    elif isinstance(most, bool) or not isinstance(most, int) or most < 1:
        raise SpecError(f"expected a positive int, got {most!r}", where="argument max_seqlen_q")
    if cu.is_contiguous() is False:
        cu = cu.contiguous()
    return QueryRows(cu, launch_bound(most, total))


def launch_bound(most: int | None, total: int) -> int:
    """The most queries of a row that the launch is sized by: ``max_seqlen_q`` (q's ``total`` where not given),
    at most ``total``, at least 1."""
    return max(1, min(total if most is None else most, total))


__all__ = ["QueryRows", "check", "launch_bound", "take"]
