"""attnc: a compiler for attention patterns.

Write a pattern in the ``.attn`` language, check it, look at its mask, and run
it exactly through the reference backend::

    import attnc
    pat = attnc.load("stdlib:neighborhood_2d", kernel_size=7)
    mask = attnc.materialize_mask(pat, sizes={"height": 16, "width": 16})
    attn = attnc.compile_attention(pat, sizes={"height": 16, "width": 16})
    out = attn(q, k, v)
"""

from .core.errors import SpecError
from .core.ir import PatternIR, RecurrenceIR
from .core.version import __version__
from .integrations.natten import na1d, na2d, na3d, neighborhood_attention
from .runtime.api import Attention, compile_attention, materialize_mask, simulate
from .runtime.plan.clusters import kmeans_update
from .spec.library import load

__all__ = [
    "__version__",
    "Attention",
    "PatternIR",
    "RecurrenceIR",
    "SpecError",
    "compile_attention",
    "kmeans_update",
    "load",
    "materialize_mask",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "simulate",
]
