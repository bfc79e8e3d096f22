"""Deformable spatio-temporal attention (D2ST-Adapter's anisotropic form) with attnc: a recipe.

How attnc serves deformable attention, and why it is a recipe rather than a compiled route form:
in D2ST-Adapter (Tan et al., ICCV 2025; code github.com/qizhongtan/D2ST-Adapter, models/base/
adapter.py, ``ResNet_DeformAttention``), as in the Deformable Attention Transformer it follows, the
keys are not a subset of the tokens. A small grid of reference points (``Tp x Hp x Wp``, from a
strided depthwise convolution over the queries) is moved by learned, tanh-bounded fractional
offsets; the features are sampled there by trilinear interpolation (``grid_sample``,
``align_corners=True``); keys and values are projected from the samples; and EVERY query attends
EVERY sampled key. The attention is therefore a dense cross-attention of N queries against M << N
keys, with no mask to exploit: the part attnc compiles (which pairs to skip) is empty, and the
fractional sampling, which is what makes it deformable, is an interpolation, not a choice of keys.

So: sample with ``grid_sample`` (differentiable in the offsets), then run the cross-attention. The
attention can be ``torch.nn.functional.scaled_dot_product_attention`` or an attnc module compiled
from the three-line pattern below (``queries seq``, ``keys seq``, ``mask true``: a cross-attention).
``benchmarks/bench_deformable.py`` measures both at D2ST's sizes; SDPA is the faster there (see
benchmarks/results/), so the recipe uses SDPA by default and attnc only when asked, e.g. to combine
the sampled keys with a mask of your own (a spatio-temporal window over the reference grid), which
is where a compiled pattern earns its place.

Deformable DETR's attention (each query its own sampling points, weights from a linear layer rather
than a softmax of dot products) is not dot-product attention at all; attnc has nothing to add there.

Run it: ``python docs/examples/deformable_attention.py`` (CPU, a few seconds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import attnc

#: The cross-attention every query runs against the sampled keys, as an attnc pattern.
SAMPLED_KEYS = """
pattern sampled_keys
  queries seq
  keys seq
  mask true
"""


class DeformableAttention3D(nn.Module):
    """Attention of every token of a ``[B, C, T, H, W]`` feature map against keys sampled at
    ``Tp x Hp x Wp`` learned, moved reference points (D2ST-Adapter's rule; one offset group per
    head group, ``groups`` divides ``heads``).

    ``kernel_size`` / ``stride`` of the offset network set the reference grid: D2ST's spatial path
    uses a grid dense in space and sparse in time, its temporal path the converse. ``attention``:
    ``"sdpa"`` (torch) or ``"attnc"`` (the compiled ``SAMPLED_KEYS`` pattern, any backend)."""

    def __init__(self, dim: int, heads: int, groups: int, kernel_size, stride, *, factor: float = 2.0,
                 attention: str = "sdpa", backend: str = "auto"):
        super().__init__()
        if dim % heads or heads % groups:
            raise ValueError(f"dim ({dim}) must divide by heads ({heads}) and heads by groups ({groups})")
        if attention not in ("sdpa", "attnc"):
            raise ValueError(f"attention is 'sdpa' or 'attnc', got {attention!r}")
        self.heads, self.groups, self.factor = heads, groups, factor
        group_channels = dim // groups
        # offsets: a strided depthwise convolution over each group's queries, then 3 channels (t, y, x)
        self.offsets = nn.Sequential(
            nn.Conv3d(group_channels, group_channels, kernel_size, stride, groups=group_channels),
            nn.GroupNorm(1, group_channels), nn.GELU(),
            nn.Conv3d(group_channels, 3, 1, bias=False))
        self.proj_q, self.proj_k, self.proj_v, self.proj_out = (nn.Conv3d(dim, dim, 1) for _ in range(4))
        self.attention = attention
        self.attn = attnc.compile_attention(SAMPLED_KEYS, backend=backend) if attention == "attnc" else None

    def sample_points(self, q: torch.Tensor) -> torch.Tensor:
        """``[B * groups, Tp, Hp, Wp, 3]`` sampling positions in grid_sample's [-1, 1] units (t, y, x):
        the reference grid's cell centres moved by ``tanh(offset) * min(1, factor / size)``."""
        B, C = q.shape[:2]
        off = self.offsets(q.reshape(B * self.groups, C // self.groups, *q.shape[2:]))  # [B g, 3, Tp, Hp, Wp]
        sizes = off.shape[2:]
        reach = torch.tensor([min(1.0, self.factor / s) for s in sizes], dtype=off.dtype, device=off.device)
        axes = [(torch.arange(s, dtype=off.dtype, device=off.device) + 0.5) / s * 2 - 1 for s in sizes]
        ref = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # [Tp, Hp, Wp, 3]
        return ref + off.tanh().movedim(1, -1) * reach

    def sample(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """The features at ``points``, trilinear: ``[B, C, M]`` with M = Tp * Hp * Wp."""
        B, C = x.shape[:2]
        grid = points.flip(-1)  # grid_sample reads (x, y, t)
        s = F.grid_sample(x.reshape(B * self.groups, C // self.groups, *x.shape[2:]), grid, mode="bilinear",
                          align_corners=True)
        return s.reshape(B, C, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        q = self.proj_q(x)
        sampled = self.sample(x, self.sample_points(q)).unsqueeze(-1).unsqueeze(-1)  # [B, C, M, 1, 1]
        k, v = self.proj_k(sampled), self.proj_v(sampled)
        heads = lambda t: t.reshape(B, self.heads, C // self.heads, -1).transpose(-1, -2)  # noqa: E731
        qh, kh, vh = heads(q), heads(k), heads(v)  # [B, heads, N | M, C / heads]
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(qh, kh, vh)
        else:
            out = self.attn(qh, kh, vh)
        return self.proj_out(out.transpose(-1, -2).reshape(B, C, T, H, W))


if __name__ == "__main__":
    torch.manual_seed(0)
    x = torch.randn(2, 32, 8, 14, 14)
    # D2ST's spatial path at this width: kernel (4, 4, 4), stride (4, 3, 3): 2 x 4 x 4 = 32 sampled keys
    sdpa = DeformableAttention3D(32, heads=4, groups=4, kernel_size=(4, 4, 4), stride=(4, 3, 3))
    compiled = DeformableAttention3D(32, heads=4, groups=4, kernel_size=(4, 4, 4), stride=(4, 3, 3),
                                     attention="attnc")
    compiled.load_state_dict(sdpa.state_dict())
    a, b = sdpa(x), compiled(x)
    print(f"output {tuple(a.shape)}; sdpa vs attnc max difference {(a - b).abs().max().item():.2e}")
