"""How many random examples the property tests draw: a CI budget per test, raised for a longer local sweep by
``ATTNC_FUZZ_EXAMPLES`` (the random differential sweeps' setting: ``ATTNC_FUZZ_EXAMPLES=500 python -m pytest``)."""

from __future__ import annotations

import os


def examples(ci: int) -> int:
    """``ci`` examples, or ``ATTNC_FUZZ_EXAMPLES`` where that is more."""
    return max(ci, int(os.environ.get("ATTNC_FUZZ_EXAMPLES", "0")))
