"""A module's warm calls: a plain call of a signature seen before replays the launches its runner bound for it
(``runner.launcher``: plan once, run many); every other call takes the module's ordinary path.

A signature is bound at its second call, so that a signature seen once (a decode step of a growing cache) binds
nothing; a runner that does not replay it (``launcher`` returns None) is asked once. The key says everything the
launches depend on (``WarmCalls.key``): a call that differs in any of it is another signature.
"""

from __future__ import annotations

import torch

from ..core import ir
from .checks import resolve_scale
from .numerics import unnormalized_output
from .plan import block_max
from .plan.cache import PlanCache

#: Bound launchers (and signatures seen once) kept per module; least recently used dropped.
LAUNCHER_CACHE_SIZE = 16


def replayable(pattern, runner) -> bool:
    """Whether a module's plain calls may be replayed by a bound launcher: a softmax pattern whose launches depend
    on the call's signature alone (no call-time or derived inputs, no route, no `scale E` clause multiplied into q
    per call) on a runner that binds launchers."""
    return (isinstance(pattern, ir.PatternIR) and hasattr(runner, "launcher") and not pattern.inputs
            and pattern.route is None and pattern.decay is None and pattern.score_scale is None)


class WarmCalls:
    """signature -> (bound launcher or None, calls seen), for one module (module docstring)."""

    __slots__ = ("entries",)

    def __init__(self):
        self.entries = PlanCache(LAUNCHER_CACHE_SIZE)

    def __len__(self) -> int:
        return len(self.entries)

    def bound(self) -> int:
        """How many signatures have a bound launcher."""
        return sum(1 for launcher, _ in self.entries.values() if launcher is not None)

    @staticmethod
    def key(attn, q, k, v, scale, return_lse) -> tuple | None:
        """The signature a bound launcher is kept by, or None where this call is not one to replay: not plain
        tensors, a gradient to record, a trace, autocast, a block max asked for, a scale or flag of another type."""
        if torch.compiler.is_compiling():  # a trace runs the ordinary path (its ops)
            return None
        if type(q) is not torch.Tensor or type(k) is not torch.Tensor or type(v) is not torch.Tensor:
            return None
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return None
        if torch.is_autocast_enabled(q.device.type) or block_max.requested() is not None:
            return None
        if not (scale is None or type(scale) is float or type(scale) is int) or type(return_lse) is not bool:
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
        result = ordinary(q, k, v, scale=scale, return_lse=return_lse)
        if entry is None:
            self.entries[key] = (None, 1)
        elif entry[1] == 1:  # seen twice and answered: bind it (None: the runner does not replay it)
            weights = getattr(attn.pattern, "weights", None)
            call = attn._bind_call(q, k, v, resolve_scale(scale, q.shape[-1]), return_lse or (
                weights is not None and not weights.normalized), dict(attn.sizes), {})
            launcher = attn.runner.launcher(call, q, k, v)
            self.entries[key] = (launcher, attn._last_call) if launcher is not None else (None, 2)
        return result
