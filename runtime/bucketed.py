"""Bucketed patterns at run time (``ir.BucketedIR``: ``route buckets(WINDOW) by nearest(CENTROIDS)``, e.g.
stdlib ``routing_transformer``): gather each bucket's tokens, attend within it, scatter the outputs back and
average them per token.

One implementation serves every backend: the buckets are chosen by sort on the tensors' device (no host
read) and attended as dense ``window x window`` blocks by batched matmuls, as the Routing Transformer's own
code does; the work is ``B * H * clusters * window^2 * d``, not ``n^2``. Differentiable in q, k and v; the
choice of buckets is not differentiated (nor is it in the authors' code).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..compiler.analysis import evaluate as E
from ..core import ir
from ..core.errors import SpecError
from .checks import check_qkv, resolve_scale
from .frontends.layouts import check_layout, sequence_qkv
from .numerics import compute_dtype, expand_kv
from .plan.cache import PlanCache


def not_served(pat: ir.BucketedIR, what: str, where: str, hint: str | None = None) -> SpecError:
    """The one refusal of a bucketed pattern where a fixed mask, a generated kernel or a model is asked for."""
    return SpecError(f"'{pat.name}' chooses its buckets from q and k at every call and attends them in torch: "
                     f"{what}", where=where, hint=hint)


def bucket_members(x: torch.Tensor, centroids: torch.Tensor, window: int) -> torch.Tensor:
    """The tokens of each bucket, ``[B, H, clusters, window]`` int64 in ascending order: per head h and
    centroid c, the ``window`` tokens of ``x`` ``[B, H, N, D]`` whose L2-normalised vectors have the largest
    dot product with ``centroids[..., h, c, :]`` (``[H | B, H, clusters, D]``); ties to the lower index. In
    fp32 (fp64 for fp64 inputs), not differentiated."""
    dt = compute_dtype(x.dtype)
    with torch.no_grad():
        unit = F.normalize(x.detach().to(dt), dim=-1)
        c = centroids.detach().to(dt)
        c = c.unsqueeze(0) if c.dim() == 3 else c
        scores = torch.einsum("bhnd,bhcd->bhcn", unit, c.expand(x.shape[0], *c.shape[1:]))
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :window]
        return order.sort(dim=-1).values


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[B, H, C, W]`` of ``x`` ``[B, H, N, D]``: ``[B, H, C, W, D]``."""
    B, H, C, W = index.shape
    flat = index.reshape(B, H, C * W, 1).expand(B, H, C * W, x.shape[-1])
    return x.gather(2, flat).view(B, H, C, W, x.shape[-1])


def bucket_mask(pat: ir.PatternIR, bound: E.Bound, q_index: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
    """The mask within each bucket, bool ``[B, H, C, W, W]``: ``pat``'s mask at the gathered query and key
    positions (a mask of positions, heads and sizes: ``check_buckets``)."""
    B, H, C, W = q_index.shape
    head = torch.arange(H, device=q_index.device).view(1, H, 1, 1, 1)
    env = E.token_env(pat, bound, q_index[..., :, None], k_index[..., None, :], head)
    value = E.Evaluator(env, {}, set(), None)(E.substitute(pat.mask, bound))
    if not isinstance(value, torch.Tensor):  # a mask of sizes alone (true): made on the device, no copy
        value = torch.full((), bool(value), device=q_index.device)
    return torch.broadcast_to(value.to(torch.bool), (B, H, C, W, W))


def bucketed_attention(pattern: ir.BucketedIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       centroids: torch.Tensor, window: int, scale: float) -> torch.Tensor:
    """``[B, Hq, n, Dv]`` in q's dtype (k, v with Hkv heads: each query head routes and reads the keys of
    its KV head). A query attends, in each bucket it is in, the bucket's keys the mask allows (none: that
    bucket adds 0); its output is the sum over its buckets divided by their count + ``ir.BUCKET_EPS``."""
    k, v = expand_kv(k, q.shape[1]), expand_kv(v, q.shape[1])
    return attend_buckets(pattern.pattern, bound, q, k, v, bucket_members(q, centroids, window),
                          bucket_members(k, centroids, window), scale)


def attend_buckets(pat: ir.PatternIR, bound: E.Bound, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   q_index: torch.Tensor, k_index: torch.Tensor, scale: float) -> torch.Tensor:
    """The bucketed form whatever chose the buckets (k-means here; an LSH sort would give its buckets the
    same way): q, k, v ``[B, H, N, D]`` (as many heads), the buckets' query and key rows ``[B, H, C, W]``;
    each bucket's queries attend its keys where ``pat``'s mask allows, softmax of ``scale * q . k``, and a
    query's outputs are summed over its buckets and divided by their count + ``ir.BUCKET_EPS``; in q's dtype."""
    dt = compute_dtype(q.dtype)
    qb, kb, vb = _gather(q.to(dt), q_index), _gather(k.to(dt), k_index), _gather(v.to(dt), k_index)
    scores = scale * (qb @ kb.transpose(-1, -2))
    allowed = bucket_mask(pat, bound, q_index, k_index)
    scores = scores.masked_fill(~allowed, -math.inf)
    empty = ~allowed.any(-1, keepdim=True)  # a query with no key in this bucket: it adds 0
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    out_b = p @ vb  # [B, H, C, W, Dv]
    B, H, C, W, DV = out_b.shape
    flat = q_index.reshape(B, H, C * W)
    total = out_b.new_zeros(B, H, q.shape[2], DV).scatter_add(2, flat[..., None].expand(B, H, C * W, DV),
                                                              out_b.reshape(B, H, C * W, DV))
    count = out_b.new_zeros(B, H, q.shape[2]).scatter_add(2, flat, out_b.new_ones(B, H, C * W))
    return (total / (count[..., None] + ir.BUCKET_EPS)).to(q.dtype)


class BucketedAttention(torch.nn.Module):
    """A compiled bucketed pattern; call it as ``attn(q, k, v, CENTROIDS=...)``: q ``[B, Hq, n, D]``, k and v
    ``[B, Hkv, n, D]`` (``layout="bnhd"``: ``[B, n, H, D]``), the centroids ``[Hq, clusters, D]`` or
    ``[B, Hq, clusters, D]``; returns ``[B, Hq, n, Dv]`` in q's dtype, differentiable in q, k and v.

    The buckets are chosen among the call's own tokens, so a call takes as many keys as queries: queries
    after a KV cache, packed sequences and paged caches are refused, as are ``return_lse`` (a token's output
    averages several attentions) and recurrent state. Every backend runs the same torch computation."""

    def __init__(self, pattern: ir.BucketedIR, backend: str, layout: str = "bhnd"):
        super().__init__()
        self.pattern = pattern
        self.backend = backend
        self.layout = layout
        self._bounds = PlanCache()

    @property
    def source(self) -> str:
        return (f"# '{self.pattern.name}': buckets chosen per call and attended in torch "
                "(runtime/bucketed.py); no generated kernel\n")

    def extra_repr(self) -> str:
        return f"bucketed {self.pattern.name!r}, backend={self.backend!r}"

    #: No tile schedule (the buckets are attended as dense blocks) and no backend choice (one torch path).
    schedule = None
    chosen_backend = None

    def report(self, *args, **kwargs):
        """Refused: the simulator has no model of bucketed patterns in this version."""
        raise not_served(self.pattern, "the simulator has no model of it in this version", "report")

    def _refuse(self, return_lse, initial_state, return_state, cu_seqlens, block_table, cache_seqlens,
                key_summary=None) -> None:
        name = self.pattern.name
        if key_summary is not None:
            raise SpecError(f"'{name}' attends buckets, not key blocks: it keeps no key summary",
                            where="argument key_summary",
                            hint="key_summary= is for routes scored by q @ bound(k) or q @ mean(k) (quest, moba)")
        if return_lse:
            raise SpecError(f"'{name}' averages a token's attentions over its buckets: it has no single "
                            "log-sum-exp", where="argument return_lse")
        if initial_state is not None or return_state:
            raise SpecError("only recurrences carry a state",
                            where="argument initial_state" if initial_state is not None else "argument return_state")
        for what, value in (("cu_seqlens", cu_seqlens), ("block_table", block_table),
                            ("cache_seqlens", cache_seqlens)):
            if value is not None:
                raise SpecError(f"'{name}' chooses its buckets among one sequence's tokens: {what} is not "
                                "supported in this version", where=f"argument {what}",
                                hint="call it on each sequence, with all its tokens")

    @torch.compiler.disable  # plain torch (a sort, gathers, a scatter): under torch.compile it runs eagerly
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                return_lse: bool = False, layout: str | None = None, sizes: dict | None = None,
                cu_seqlens: torch.Tensor | None = None, initial_state=None, return_state: bool = False,
                block_table: torch.Tensor | None = None, cache_seqlens: torch.Tensor | None = None,
                key_summary=None, **inputs) -> torch.Tensor:
        self._refuse(return_lse, initial_state, return_state, cu_seqlens, block_table, cache_seqlens, key_summary)
        layout = self.layout if layout is None else check_layout(layout)
        bnhd = layout == "bnhd"
        q, k, v = sequence_qkv(layout, q, k, v)
        check_qkv(q, k, v)
        if sizes is not None and not isinstance(sizes, dict):
            raise SpecError(f"expected a dict of sizes by name, got {type(sizes).__name__}", where="argument sizes")
        B, H, n, D = q.shape
        if k.shape[2] != n:
            raise SpecError(f"'{self.pattern.name}' chooses its buckets among the call's queries and keys: "
                            f"{k.shape[2]} keys for {n} queries (queries after a KV cache) are not supported",
                            where="argument k", hint="call it with every token (as many queries as keys)")
        key = (n, H, D, tuple(sorted((sizes or {}).items())))
        bound = self._bounds.get(key)
        if bound is None:
            bound = self._bounds[key] = E.bind_sizes(self.pattern.pattern, n=n, nk=n, heads=H, sizes=sizes, dk=D)
        tensors, _ = E.bind_inputs(self.pattern.pattern, bound, inputs, B, device=q.device)
        window = int(E.substitute(self.pattern.window, bound))
        if not 1 <= window <= n:
            raise SpecError(f"'{self.pattern.name}': a bucket of {window} tokens does not fit the call's {n} tokens",
                            where="argument window" if "window" in dict(self.pattern.params) else "argument q",
                            hint="a window of at least 1 and at most n")
        out = bucketed_attention(self.pattern, bound, q, k, v, tensors[self.pattern.centroids], window,
                                 resolve_scale(scale, D))
        return out.transpose(1, 2) if bnhd else out
