"""A module's warm calls: a plain call of a signature seen before replays the launches its runner bound for it
(``runner.launcher``: plan once, run many); a signature's first call that its runner reads as pages
(``runner.cache_as_pages``: a decode step of a contiguous cache that grows, a new shape at every step) runs the paged
kernel, which plans nothing per length; every other call takes the module's ordinary path.

A signature is bound at its second call, so that a signature seen once (a decode step of a growing cache) binds
nothing; a runner that does not replay it (``launcher`` returns None) is asked once. The key says everything the
launches depend on (``WarmCalls.key``): a call that differs in any of it is another signature.

Paged calls (``block_table=``, ``cache_seqlens=``, optionally ``cu_seqlens_q=`` and ``max_seqlen_q=``) that the
runner serves in one launch (``runner.paged_launcher``) are replayed the same way (``paged_key``, ``paged_call``):
their signature is the tensors' shapes, strides, dtypes and devices, never their values, so a decode loop over a
growing cache replays one bound launch at every step (the lengths, page ids and offsets are device tensors the
kernel reads and checks). A replay skips the host checks of the ordinary call, which passed for that signature;
the values are checked by the kernel and asserted on the device, and on the CPU a failed check takes the ordinary
call, which names the argument and the row at fault.
"""

from __future__ import annotations

import torch

from ..core import ir
from .checks import PAGED_VALUES_FAILED, resolve_scale
from .compiling import compiling
from .frontends import varlen_rows
from .frontends.layouts import Restore
from .numerics import unnormalized_output
from .plan import block_max
from .plan.cache import PlanCache

#: Bound launchers (and signatures seen once) kept per module; least recently used dropped.
LAUNCHER_CACHE_SIZE = 16
#: The keywords of a paged call that a replay takes besides the tensors (``paged_call``).
PAGED_KEYWORDS = frozenset({"cu_seqlens_q", "max_seqlen_q"})


def replayable(pattern, runner) -> bool:
    """Whether a module's plain calls may be replayed by a bound launcher: a softmax pattern whose launches depend
    on the call's signature alone (no call-time or derived inputs, no route, no `scale E` clause multiplied into q
    per call) on a runner that binds launchers."""
    return (isinstance(pattern, ir.PatternIR) and hasattr(runner, "launcher") and not pattern.inputs
            and pattern.route is None and pattern.decay is None and pattern.score_scale is None)


def _replayable_call(q, k, v, scale, return_lse) -> bool:
    """What every replayed call is: plain tensors, no gradient to record, no trace (it runs the ordinary path's ops),
    no autocast, no block max asked for, a scale and flag of the plain types."""
    if compiling():
        return False
    if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
        return False
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return False
    if q.device.type not in ("cpu", "cuda"):  # (meta tensors: the ordinary path's checks name them)
        return False
    if torch.is_autocast_enabled("cuda" if q.is_cuda else q.device.type) or block_max.requested() is not None:
        return False
    return (scale is None or type(scale) is float or type(scale) is int) and type(return_lse) is bool


def _but_caches(key: tuple) -> tuple:
    """A plain call's signature (``WarmCalls.key``) without k's and v's keys' count and strides: what two steps of
    one growing cache share."""
    (q, k, v), rest = key[:3], key[6:]
    return q, k[:2], k[3:], v[:2], v[3:], key[3], rest


class WarmCalls:
    """signature -> (bound launcher or None, calls seen), for one module (module docstring)."""

    __slots__ = ("entries", "last", "grown")

    def __init__(self):
        self.entries = PlanCache(LAUNCHER_CACHE_SIZE)
        self.last: tuple | None = None  # the signature of the last plain call (``_grown``)
        #: the growing cache last served as pages with a bound launch: (its call's signature but for k's and v's
        #: shapes and strides, its ``CachePages``, the bound launch), reused while the cache stays in its buffer;
        #: its pools are views of that buffer, kept alive until a call that is no such step (or another cache)
        self.grown: tuple | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def bound(self) -> int:
        """How many signatures have a bound launcher."""
        return sum(1 for launcher, _ in self.entries.values() if launcher is not None)

    @staticmethod
    def key(attn, q, k, v, scale, return_lse) -> tuple | None:
        """The signature a bound launcher is kept by, or None where this call is not one to replay: not plain
        tensors, a gradient to record, a trace, autocast, a block max asked for, a scale or flag of another type."""
        if not _replayable_call(q, k, v, scale, return_lse):
            return None
        # the data pointers' alignment: whether a kernel may load by tensor descriptors (TMA) differs with it
        return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device,
                k.device, v.device, q is k, k is v, q is v, (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16, scale,
                tuple(attn.sizes.items()), attn.runner.launch_knobs())  # not return_lse: the lse is made either way

    def call(self, attn, key: tuple, q, k, v, scale, return_lse: bool, ordinary):
        """A call of signature ``key``: its bound launcher replayed; else ``ordinary(q, k, v, scale=,
        return_lse=)``, the module's ordinary call, which runs every check (and binds the signature at its second
        call)."""
        entry = self.entries.get(key)
        if entry is not None and entry[0] is not None:
            got = entry[0](q, k, v)
            if got is not None:
                attn.__dict__["_last_call"] = entry[1]
                out = unnormalized_output(attn.pattern, *got)
                return (out, got[1]) if return_lse else out
            del self.entries[key]  # out of resources: the ordinary call falls back to smaller tiles
            entry = None
        if self._grown(key) and entry is None and hasattr(attn.runner, "cache_as_pages"):  # a growing cache's step
            got = self._as_pages(attn, key, q, k, v, scale)
            if got is not None:  # (its shape is not kept: one per step would push bound launchers out)
                out = unnormalized_output(attn.pattern, *got)
                return (out, got[1]) if return_lse else out
        self.grown = None  # a call that is no growing cache's step lets the last one's buffer go (its pools' views)
        result = ordinary(q, k, v, scale=scale, return_lse=return_lse)
        if entry is None:
            self.entries[key] = (None, 1)
        elif entry[1] == 1:  # seen twice and answered: bind it (None: the runner does not replay it)
            weights = getattr(attn.pattern, "weights", None)
            call = attn._bind_call(q, k, v, resolve_scale(scale, q.shape[-1], q.dtype), return_lse or (
                weights is not None and not weights.normalized), dict(attn.sizes), {})
            launcher = attn.runner.launcher(call, q, k, v)
            self.entries[key] = (launcher, attn._last_call) if launcher is not None else (None, 2)
        return result

    def _as_pages(self, attn, key: tuple, q, k, v, scale):
        """``(out, lse)`` of a growing contiguous cache's step read as pages (``runner.cache_as_pages``), or None
        where it is not served so: the paged launch bound for its pools (the same at every step of a cache kept in
        one buffer) replayed, else run and bound at its second call. A step of the cache last served so, in the
        same buffer, reuses its pools, table and launch (``CachePages.serves``): it makes only its lengths."""
        grown = self.grown
        if grown is not None and k.shape[2] > q.shape[2] and grown[0] == _but_caches(key) and grown[1].serves(k, v):
            got = grown[2](q, grown[1].k_pool, grown[1].v_pool, grown[1].table, grown[1].at(k.shape[2], q.device),
                           None, None)
            if got is not None:
                return got
        scale = resolve_scale(scale, q.shape[-1], q.dtype)
        paged = attn.runner.cache_as_pages(q, k, v)
        if paged is None:
            return None
        pk, pv, table, lengths = paged.k_pool, paged.v_pool, paged.table, paged.lengths
        pages_key = ("pages", q.shape, q.stride(), pk.shape, pk.stride(), pv.shape, pv.stride(), table.shape,
                     q.dtype, pk.dtype, q.device, scale, (q.data_ptr() | pk.data_ptr() | pv.data_ptr()) % 16,
                     attn.runner.launch_knobs())
        entry = self.entries.get(pages_key)
        if entry is not None and entry[0] is not None:
            got = entry[0](q, pk, pv, table, lengths, None, None)
            if got is not None:
                self.grown = (_but_caches(key), paged, entry[0])
                return got
        got = attn.runner.paged_forward(q, pk, pv, table, lengths, None, None, q.shape[2], scale)
        if entry is None:
            self.entries[pages_key] = (None, 1)
        elif entry[1] == 1:  # its second call: bind it (None: not replayable)
            bound = attn.runner.paged_launcher(q, pk, pv, table, lengths, None, None, q.shape[2], scale)
            self.entries[pages_key] = (bound, 2)
            if bound is not None:
                self.grown = (_but_caches(key), paged, bound)
        return got

    def _grown(self, key: tuple) -> bool:
        """Whether the call of signature ``key`` is the last call's with only the keys' count changed (a KV cache
        that grows, a new shape at every step); remembers ``key`` as the last call's. A shape's first call that
        is not such a step takes the ordinary path, so a decode loop over a fixed shape binds and replays it."""
        last, self.last = self.last, key
        if last is None or len(last) != len(key):
            return False
        (q, k, v), (q0, k0, v0) = key[:3], last[:3]
        return (q == q0 and k[:2] == k0[:2] and k[3:] == k0[3:] and v[:2] == v0[:2] and v[3:] == v0[3:]
                and k[2] != k0[2] and key[3] == last[3] and key[6:] == last[6:])  # (k's, v's strides may change)

    @staticmethod
    def paged_key(attn, q, k, v, block_table, cache_seqlens, scale, return_lse, layout, keywords: dict) -> tuple | None:
        """The signature of a paged call that a bound launcher may replay, or None where it is not one (as ``key``;
        and an int ``cache_seqlens``, offsets not contiguous, a keyword other than ``PAGED_KEYWORDS``)."""
        if not hasattr(attn.runner, "paged_launcher") or not _replayable_call(q, k, v, scale, return_lse):
            return None
        cu = keywords.get("cu_seqlens_q")
        most = keywords.get("max_seqlen_q")
        if keywords and (keywords.keys() - PAGED_KEYWORDS or cu is None or type(cu) is not torch.Tensor
                         or not cu.is_contiguous() or not (most is None or type(most) is int)):
            return None
        if type(block_table) is not torch.Tensor or type(cache_seqlens) is not torch.Tensor:
            return None
        device = q.device
        if k.device != device or v.device != device or block_table.device != device or cache_seqlens.device != device:
            return None  # the ordinary call names the argument on another device
        rows = None if cu is None else (cu.shape, cu.dtype, cu.device, most)
        return (q.shape, k.shape, v.shape, block_table.shape, cache_seqlens.shape, q.stride(), k.stride(), v.stride(),
                block_table.stride(), cache_seqlens.stride(), q.dtype, k.dtype, v.dtype, block_table.dtype,
                cache_seqlens.dtype, device, rows, k is v, scale, return_lse, layout, attn.layout, type(attn.layout),
                tuple(attn.sizes.items()), attn.runner.launch_knobs())

    def paged_call(self, attn, key: tuple, q, k, v, block_table, cache_seqlens, scale, return_lse: bool, layout,
                   keywords: dict, ordinary):
        """A paged call of signature ``key``: its bound launcher replayed; else ``ordinary(...)``, the module's
        ordinary call with every check (binding the signature at its second call)."""
        entry = self.entries.get(key)
        if entry is not None and entry[0] is not None:
            replay, bnhd, most = entry[0]
            cu = keywords.get("cu_seqlens_q")
            start, count = (None, None) if cu is None else varlen_rows.QueryRows(cu, most).as_launched()[:2]
            try:
                got = replay(q.transpose(1, 2) if bnhd else q, k, v, block_table, cache_seqlens, start, count)
            except RuntimeError as err:  # on the CPU: a value out of range; the ordinary call names it
                if PAGED_VALUES_FAILED not in str(err):
                    raise
                got = None
            if got is not None:
                attn.__dict__["_last_call"] = entry[1]
                out = unnormalized_output(attn.pattern, *got)
                result = (out, got[1]) if return_lse else out
                return Restore("bnhd").result(result, return_lse, False) if bnhd else result
        result = ordinary(q, k, v, scale=scale, return_lse=return_lse, layout=layout, block_table=block_table,
                          cache_seqlens=cache_seqlens, **keywords)
        if entry is None:
            self.entries[key] = (None, 1)
        elif entry[1] == 1:  # seen twice and answered: bind it (None: the runner does not replay it)
            bound = self._bind_paged(attn, q, k, v, block_table, cache_seqlens, scale, layout, keywords)
            self.entries[key] = (bound, attn.__dict__.get("_last_call")) if bound is not None else (None, 2)
        return result

    @staticmethod
    def _bind_paged(attn, q, k, v, block_table, cache_seqlens, scale, layout, keywords: dict):
        """``(replay, bnhd, most)`` of a paged call that the ordinary path ran in one launch, or None."""
        bnhd = str(attn.layout if layout is None else layout) == "bnhd"
        qv = q.transpose(1, 2) if bnhd else q
        runner = attn.runner
        if 0 in qv.shape[:3] or not runner.pages_in_one_launch(qv, k, v):
            return None
        cu = keywords.get("cu_seqlens_q")
        if cu is None:
            start = count = None
            most = qv.shape[2]
        else:  # as the ordinary call launches it (frontends.varlen_rows)
            most = varlen_rows.launch_bound(keywords.get("max_seqlen_q"), qv.shape[2])
            start, count, _ = varlen_rows.QueryRows(cu, most).as_launched()
        replay = runner.paged_launcher(qv, k, v, block_table, cache_seqlens, start, count, most,
                                       resolve_scale(scale, qv.shape[-1]))
        return None if replay is None else (replay, bnhd, most)
