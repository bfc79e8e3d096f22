"""attnc: a compiler for attention patterns.

Write a pattern in the ``.attn`` language, check it, look at its mask, and run
it exactly through the reference backend::

    import attnc
    pat = attnc.load("stdlib:neighborhood_2d", kernel_size=7)
    mask = attnc.materialize_mask(pat, sizes={"height": 16, "width": 16})
    attn = attnc.compile_attention(pat, sizes={"height": 16, "width": 16})
    out = attn(q, k, v)
"""

import logging
from importlib import import_module

from .core.errors import SpecError
from .core.version import __version__

# the package's loggers ("attnc" and below, e.g. "attnc.auto") print nothing unless the application
# configures logging
logging.getLogger("attnc").addHandler(logging.NullHandler())

#: The public names and the modules that define them, imported when first used (PEP 562): ``attnc list``
#: and ``attnc check`` do not pay for torch
_LAZY = {
    "PatternIR": ".core.ir", "RecurrenceIR": ".core.ir",
    "na1d": ".integrations.natten", "na2d": ".integrations.natten", "na3d": ".integrations.natten",
    "neighborhood_attention": ".integrations.natten",
    "Attention": ".runtime.api", "compile_attention": ".runtime.api", "materialize_mask": ".runtime.api",
    "simulate": ".runtime.api",
    "to_flex": ".integrations.flex",
    "kmeans_update": ".runtime.plan.clusters", "KeySummary": ".runtime.plan.kept_summary",
    "load": ".spec.library",
    "block_table_from_indptr": ".runtime.frontends.paged_layouts",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnc' has no attribute '{name}'")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value  # once: later reads find it here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "__version__",
    "Attention",
    "KeySummary",
    "PatternIR",
    "RecurrenceIR",
    "SpecError",
    "block_table_from_indptr",
    "compile_attention",
    "kmeans_update",
    "load",
    "materialize_mask",
    "na1d",
    "na2d",
    "na3d",
    "neighborhood_attention",
    "simulate",
    "to_flex",
]
