"""Decay gates in chunks, as the kernels and the decay family's torch path read them: tokens split into chunks
(``split_chunks``) and the in-chunk cumulative log gates kept as split prefix sums with the last hard reset
(``ChunkGates``)."""

import torch
import torch.nn.functional as F


def split_chunks(x: torch.Tensor, C: int) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, H, N, C, D]``, zero-padded at the end (k = v = 0 and g = 0 there leave
    the state unchanged)."""
    B, H, T, D = x.shape
    pad = (-T) % C
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.reshape(B, H, (T + pad) // C, C, D)


class ChunkGates:
    """The in-chunk cumulative log gates ``b_t = g_{c0} + .. + g_t`` of ``gc [.., C, Dg]``, kept so that
    every span ``b_t - b_j`` (the sum of the gates over ``(j, t]``) is exact to its own rounding:

    - ``hi + lo`` is the float64 cumulative sum of the finite gates split into two numbers of the compute
      dtype, and a span is ``(hi_t - hi_j) + (lo_t - lo_j)``. A single fp32 cumulative sum would lose
      ``eps * |b|`` in the difference (2.8e-4 with a gate of -1e4 inside the chunk);
    - a gate of ``-inf`` is a hard reset (decay exactly 0): it adds nothing to ``hi``/``lo``, and
      ``reset_t`` (the position of the last reset at or before ``t`` in the chunk, -1 if none) makes every
      span across it ``-inf``, so its weight is 0 forward and backward, never ``-inf - -inf = nan``."""

    def __init__(self, gc: torch.Tensor):
        C = gc.shape[-2]
        neg = torch.isneginf(gc)
        b = torch.where(neg, torch.zeros((), dtype=gc.dtype, device=gc.device), gc).to(torch.float64).cumsum(-2)
        self.hi = b.to(gc.dtype)
        self.lo = None if gc.dtype == torch.float64 else (b - self.hi.to(torch.float64)).to(gc.dtype)
        self.pos = torch.arange(C, device=gc.device).view(C, 1)
        self.reset = torch.where(neg, self.pos, -1).cummax(-2).values  # [.., C, Dg]
        # this runs eagerly (under torch.compile too: attnc::recurrence is opaque), so the reset masks
        # are skipped when there is no reset at all
        self.any_reset = bool(neg.any())

    def from_start(self) -> torch.Tensor:
        """``exp(b_t)``: the decay from the chunk start through t, ``[.., C, Dg]``."""
        b = self.hi if self.lo is None else self.hi + self.lo
        return torch.exp(b.masked_fill(self.reset >= 0, float("-inf")) if self.any_reset else b)

    def to_end(self) -> torch.Tensor:
        """``exp(b_last - b_t)``: the decay after t to the chunk end, ``[.., C, Dg]``."""
        d = self.hi[..., -1:, :] - self.hi
        if self.lo is not None:
            d += self.lo[..., -1:, :]
            d -= self.lo
        if self.any_reset:
            d.masked_fill_(self.reset[..., -1:, :] > self.pos, float("-inf"))
        return d.exp_()

    def total(self) -> torch.Tensor:
        """``exp(b_last)``: the whole chunk's decay, ``[.., 1, Dg]``."""
        return self.from_start()[..., -1:, :]

    def _pairs(self, hi_t, hi_j, lo_t, lo_j, reset_t, j_pos, not_causal) -> torch.Tensor:
        # (hi_t - hi_j) is exact for close values (Sterbenz) and rounded to its own size otherwise;
        # adding lo_t then subtracting lo_j keeps the error at a few eps of the span, with no temporary
        d = hi_t - hi_j
        if lo_t is not None:
            d += lo_t
            d -= lo_j
        d.masked_fill_(not_causal, float("-inf"))
        if self.any_reset:  # a reset in (j, t]: the last reset at or before t lies after j
            d.masked_fill_(reset_t > j_pos, float("-inf"))
        return d.exp_()

    def pairs(self, causal: torch.Tensor) -> torch.Tensor:
        """``exp(b_t - b_j)`` for ``j <= t`` and 0 above, ``[.., C(t), C(j)]`` (scalar gates, Dg = 1)."""
        lo = self.lo
        return self._pairs(self.hi, self.hi.transpose(-1, -2), lo, None if lo is None else lo.transpose(-1, -2),
                           self.reset, self.pos.view(-1), ~causal)

    def vector_pairs(self, sl: slice, causal: torch.Tensor) -> torch.Tensor:
        """``exp(b_td - b_jd)`` for ``j <= t`` (0 above) of the chunks ``sl``: ``[B, H, n, C(t), C(j), Dk]``;
        every exponent is a sum of gates over ``(j, t]``, never the difference of two sums across chunks."""
        hi, lo = self.hi[:, :, sl], None if self.lo is None else self.lo[:, :, sl]
        return self._pairs(hi.unsqueeze(-2), hi.unsqueeze(-3), None if lo is None else lo.unsqueeze(-2),
                           None if lo is None else lo.unsqueeze(-3), self.reset[:, :, sl].unsqueeze(-2), self.pos,
                           ~causal.unsqueeze(-1))
