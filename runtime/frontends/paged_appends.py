"""The keys and values a paged call appends (``k=``, ``v=``, ``flash_attn_with_kvcache``'s) as one list of tokens in
row order, and where each goes in the pools.

Two forms, one list: every row appends as many tokens (``[B, Hkv, n_new, D]``, ``"bhnd"``), or, with packed rows
(``cu_seqlens_q``), each row appends one token per query (``[1, Hkv, total, D]``, packed as q: row b's new tokens are
q's rows ``cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1``), so that a batch of chunked-prefill rows beside decode rows
appends its own count per row in the call that attends (FlashInfer's ``append_paged_kv_cache`` by ``indptr``, vLLM's
slot mapping). Row b's token t goes to the row's key ``cache_seqlens[b] + t``: slot ``key % page_size`` of page
``block_table[b, key // page_size]``. Everything is made on the device; no count is read on the host (a CUDA graph
replays the write for any counts). Packed tokens past ``cu_seqlens_q[-1]`` (a serving loop's padding) belong to no
row and change nothing in the pools."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class NewTokens:
    """The new keys and values of a paged call, checked (``paged_checks.check_new_tokens``): ``k`` ``[N, Hkv, D]`` and
    ``v`` ``[N, Hkv, Dv]`` in row order; ``starts`` (int64 ``[B + 1]`` on the device) each row's first token among
    them, its last entry the tokens that belong to rows (the rest are padding); ``each`` every row's count where
    they are alike (the uniform form: a count known on the host), else None."""

    k: torch.Tensor
    v: torch.Tensor
    starts: torch.Tensor
    each: int | None
    #: ``slots`` of a (table, lengths, page size) already asked for: the checks and the write of one call share them
    made: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def uniform(cls, k: torch.Tensor, v: torch.Tensor) -> NewTokens:
        """``[B, Hkv, n_new, D]`` and ``[B, Hkv, n_new, Dv]``: every row appends ``n_new``."""
        batch, count = k.shape[0], k.shape[2]
        starts = torch.arange(batch + 1, device=k.device, dtype=torch.int64) * count
        return cls(_tokens(k), _tokens(v), starts, count)

    @classmethod
    def packed(cls, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor) -> NewTokens:
        """``[1, Hkv, total, D]`` and ``[1, Hkv, total, Dv]`` packed as q by ``cu_seqlens_q``."""
        return cls(_tokens(k), _tokens(v), cu_seqlens_q.to(torch.int64), None)

    def counts(self) -> torch.Tensor:
        """Each row's count of new tokens, int64 ``[B]`` on the device."""
        return self.starts[1:] - self.starts[:-1]

    def host_counts(self) -> list[int]:
        """Each row's count on the host: the uniform form's without a device read, the packed one's read (only where
        the host checks run anyway: the path by length, or after a device check failed)."""
        if self.each is not None:
            return [self.each] * (self.starts.shape[0] - 1)
        return [int(x) for x in self.counts().tolist()]

    def slots(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int):
        """``(pages, offsets, real)`` ``[N]``: token i goes to slot ``offsets[i]`` of page ``pages[i]`` (``real[i]``:
        it belongs to a row; a padding token's slot is that of its row's clamp, never written by ``write``). A page
        index outside the table is clamped into it (a length the checks refuse: past the table, or negative). Made
        once per (table, lengths, page size) of a call."""
        key = (id(table), id(seqlens), page_size)
        if key not in self.made:
            self.made[key] = (table, seqlens, self._slots(table, seqlens, page_size))  # (kept alive: ids stay theirs)
        return self.made[key][2]

    def _slots(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int):
        tokens = torch.arange(self.k.shape[0], device=seqlens.device, dtype=torch.int64)
        starts = self.starts.to(seqlens.device)
        if self.each is not None:
            row = torch.div(tokens, max(self.each, 1), rounding_mode="floor")
        else:
            row = torch.searchsorted(starts[1:], tokens, right=True)  # the row whose tokens hold token i
        row = row.clamp(max=table.shape[0] - 1)
        pos = seqlens.long()[row] + tokens - starts[row]
        index = torch.div(pos, page_size, rounding_mode="floor").clamp(min=0, max=table.shape[1] - 1)
        return table.long()[row, index], pos % page_size, tokens < starts[-1]

    def write(self, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, seqlens: torch.Tensor) -> None:
        """Write the tokens into the pools in place (one ``index_put_`` each, any strided pool). Padding tokens are
        written where the last real token is, with its key and value (the same bytes twice: a put's duplicates agree),
        or, with no real token, over pool slot 0 of page 0 with what it holds; so nothing is read on the host to drop
        them and no other slot changes."""
        if self.k.shape[0] == 0:
            return
        pages, offsets, real = self.slots(table, seqlens, k_cache.shape[1])
        k, v = self.k, self.v
        if self.each is None:  # packed: the padding tokens past the rows' (the uniform form has none)
            last = (self.starts[-1:] - 1).clamp(min=0).to(pages.device)  # [1]: the last real token, or token 0
            anyone = self.starts[-1:].to(pages.device) > 0
            pages = torch.where(real, pages, torch.where(anyone, pages.index_select(0, last), 0))
            offsets = torch.where(real, offsets, torch.where(anyone, offsets.index_select(0, last), 0))
            keep = real.view(-1, 1, 1)
            k = torch.where(keep, k, torch.where(anyone.view(1, 1, 1), k.index_select(0, last), k_cache[0, :1]))
            v = torch.where(keep, v, torch.where(anyone.view(1, 1, 1), v.index_select(0, last), v_cache[0, :1]))
        k_cache.index_put_((pages, offsets), k)
        v_cache.index_put_((pages, offsets), v)

    def shared(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
        """Whether two of the rows' real tokens go to one slot, a 0-d bool made where the tensors are (padding tokens
        count as slots of their own)."""
        pages, offsets, real = self.slots(table, seqlens, page_size)
        slots = torch.where(real, pages * page_size + offsets, -1 - torch.arange(len(real), device=real.device))
        slots = slots.sort().values
        return (slots[1:] == slots[:-1]).any()

    def _overwrites(self, table, seqlens, page_size: int, num_pages: int, queries: torch.Tensor):
        """``(bad [N], pages, offsets)``: which real tokens go to a slot that another row attends as a key (a page
        shared among rows, a radix cache's prefix: the write would change that row's key, in this call)."""
        pages, offsets, real = self.slots(table, seqlens, page_size)
        lengths = seqlens.long() + self.counts().to(seqlens.device)
        most, row, second = _readers(table, lengths, page_size, num_pages, queries.to(seqlens.device) > 0)
        tokens = torch.arange(len(real), device=real.device)
        writer = torch.searchsorted(self.starts[1:].to(real.device), tokens, right=True)
        safe = pages.clamp(0, num_pages - 1)
        other = torch.where(row[safe] == writer, second[safe], most[safe])  # the most another row reads of the page
        return real & (pages >= 0) & (pages < num_pages) & (other > offsets), pages, offsets

    def overwrites(self, table, seqlens, page_size: int, num_pages: int, queries: torch.Tensor) -> torch.Tensor:
        """Whether a real token goes to a slot another row attends (``_overwrites``), a 0-d bool made where the
        tensors are (one scatter per pool page: no host read)."""
        return self._overwrites(table, seqlens, page_size, num_pages, queries)[0].any()

    def first_overwrite(self, table, seqlens, page_size: int, num_pages: int, queries: torch.Tensor):
        """On the host: ``(writer row, page, slot, reader row, reader's key)`` of the first token that goes to a slot
        another row attends, or None."""
        bad, pages, offsets = self._overwrites(table, seqlens, page_size, num_pages, queries)
        if not bool(bad.any()):
            return None
        i = int(torch.nonzero(bad)[0])
        writer = int(torch.searchsorted(self.starts[1:].cpu(), torch.tensor(i), right=True))
        page, slot = int(pages[i]), int(offsets[i])
        lengths = seqlens.long() + self.counts().cpu()
        for r in range(table.shape[0]):
            for j in range(table.shape[1]):
                key = j * page_size + slot
                if r != writer and int(queries[r]) > 0 and int(table[r, j]) == page and key < int(lengths[r]):
                    return writer, page, slot, r, key
        return None  # (not reached: the scatter found a reader)

    def _repeated(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
        """``[B, P]`` bool: the entries of a row's reached pages (its keys with the new ones) that list a page the
        row lists before (its keys would alias: a new token written over one of its own keys)."""
        lengths = seqlens.long() + self.counts().to(seqlens.device)
        starts = torch.arange(table.shape[1], device=table.device, dtype=torch.int64) * page_size
        reached = starts < lengths.unsqueeze(1)
        ids = torch.where(reached, table.long(), -1 - torch.arange(table.shape[1], device=table.device))
        order = ids.sort(dim=-1, stable=True)
        again = torch.zeros_like(reached)
        again.scatter_(1, order.indices[:, 1:], order.values[:, 1:] == order.values[:, :-1])
        return again & reached

    def repeats(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> torch.Tensor:
        """Whether a row that appends lists one of its reached pages twice, a 0-d bool made where the tensors are."""
        return self._repeated(table, seqlens, page_size).any()

    def first_repeat(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> tuple[int, int] | None:
        """On the host: ``(row, column)`` of the first entry that lists a reached page of its row again, or None."""
        hit = torch.nonzero(self._repeated(table, seqlens, page_size))
        return None if not len(hit) else (int(hit[0, 0]), int(hit[0, 1]))

    def first_shared(self, table: torch.Tensor, seqlens: torch.Tensor, page_size: int) -> tuple[int, int, int] | None:
        """On the host (tensors on the CPU): ``(row, other row, slot id)`` of the first slot two real tokens share,
        or None."""
        pages, offsets, real = self.slots(table, seqlens, page_size)
        rows = torch.searchsorted(self.starts[1:].cpu(), torch.arange(len(real)), right=True)
        slots = (pages * page_size + offsets)[real]
        rows = rows[real]
        order = slots.argsort(stable=True)
        same = torch.nonzero(slots[order][1:] == slots[order][:-1]).flatten()
        if not len(same):
            return None
        i = int(same[0])
        return int(rows[order[i]]), int(rows[order[i + 1]]), int(slots[order[i]])


def _readers(table: torch.Tensor, lengths: torch.Tensor, page_size: int, num_pages: int, reads: torch.Tensor):
    """Per page of the pool, what the rows that attend (``reads``: bool ``[B]``) read of it: ``(most, row,
    second)``, the most slots one table entry reads of the page (its first ``most`` slots), a row that reads
    that many, and the most that any other row reads. Rows read their keys ``0 .. lengths[b] - 1``."""
    starts = torch.arange(table.shape[1], device=table.device, dtype=torch.int64) * page_size
    extent = (lengths.long().unsqueeze(1) - starts).clamp(min=0, max=page_size)  # [B, P] slots read of the entry
    pages = table.long()
    valid = (extent > 0) & (pages >= 0) & (pages < num_pages) & reads.unsqueeze(1)
    extent = torch.where(valid, extent, 0).flatten()
    pages = torch.where(valid, pages, 0).flatten()
    rows = torch.arange(table.shape[0], device=table.device, dtype=torch.int64).repeat_interleave(table.shape[1])
    zeros = torch.zeros(num_pages, dtype=torch.int64, device=table.device)
    most = zeros.scatter_reduce(0, pages, extent, "amax")
    row = torch.full_like(zeros, -1).scatter_reduce(0, pages, torch.where(extent == most[pages], rows, -1), "amax")
    second = zeros.scatter_reduce(0, pages, torch.where(rows != row[pages], extent, 0), "amax")
    return most, row, second


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``[R, H, n, D]`` -> ``[R * n, H, D]``, row-major (row r's tokens, then row r + 1's)."""
    return t.transpose(1, 2).reshape(t.shape[0] * t.shape[2], t.shape[1], t.shape[3])


__all__ = ["NewTokens"]
