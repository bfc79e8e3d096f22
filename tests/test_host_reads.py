"""Host reads of a warm call: every read of a tensor's values on the host (``item``, ``tolist``, ``cpu``,
``numpy``, ``bool``, ``int``, ``float``, ``nonzero``, ``equal``, ``.to`` the CPU) is a device sync on a GPU
and keeps a call out of a CUDA graph. Counted with a ``TorchFunctionMode`` around the second call of a
module with the same shapes, on the Triton backend under the interpreter (there the call's device is the
CPU, so a plan built on the host and copied over counts too).

A pattern whose mask reads no input and routes nothing reads nothing, prefill or decode step. The
patterns that read inputs or route still build their plans on the host (issue 42): their counts are
held at most at today's, so that none grows while they are brought to 0.
"""

from __future__ import annotations

import collections
import os
import traceback

import pytest
import torch
from test_triton import STDLIB
from torch.overrides import TorchFunctionMode

import attnc

os.environ.setdefault("TRITON_INTERPRET", "1")

HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal"}

#: Host reads of a warm prefill (test_triton's STDLIB sizes) on 2026-11-25, where plans are still built on the
#: host (issue 42): a plan keyed by an input's values, a route's selection and tile lists.
PLANNED_ON_HOST = {"biformer": 44, "document": 6, "forgetting": 2, "longformer": 6, "moba": 43,
                   "routing_transformer": 14, "token_topk": 42, "vertical_slash": 13, "xattention": 53}


class HostReads(TorchFunctionMode):
    """Counts the host reads of the torch calls made under it, by (function, attnc file:line)."""

    def __init__(self):
        super().__init__()
        self.seen: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        hit = name in HOST_READS
        if name == "to":
            device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, str | torch.device)), None))
            hit = device is not None and torch.device(device).type == "cpu"
        if hit:
            ours = [f for f in traceback.extract_stack()[:-1] if "attnc" in f.filename or "/runtime/" in f.filename]
            self.seen[(name, f"{ours[-1].filename}:{ours[-1].lineno}" if ours else "?")] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def warm_reads(name: str, nk: int | None = None, rows: int | None = None) -> HostReads:
    """The host reads of the second call of stdlib pattern ``name`` (``rows`` queries after a cache of
    ``nk`` tokens where given)."""
    params, sizes, n, inputs, q_tile = STDLIB[name]
    n = n if sizes is None else None
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", sizes=sizes, q_tile=q_tile, **params)
    tokens = n if n is not None else int(torch.tensor(list(sizes.values())).prod())
    total = nk or tokens
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, rows or total, 16, generator=g)
    k, v = torch.randn(1, 2, total, 16, generator=g), torch.randn(1, 2, total, 16, generator=g)
    given = inputs(total) if inputs is not None else {}
    attn(q, k, v, **given)
    with HostReads() as reads:
        attn(q, k, v, **given)
    return reads


def _static(name: str) -> bool:
    return name not in PLANNED_ON_HOST


@pytest.mark.parametrize("name", sorted(n for n in STDLIB if _static(n)))
def test_a_warm_prefill_of_a_static_pattern_reads_nothing_on_the_host(name):
    reads = warm_reads(name)
    assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("name", ["sliding_window", "alibi"])
def test_a_warm_decode_step_of_a_static_pattern_reads_nothing_on_the_host(name):
    reads = warm_reads(name, nk=40, rows=1)
    assert reads.total == 0, dict(reads.seen)


@pytest.mark.parametrize("name", sorted(PLANNED_ON_HOST))
def test_patterns_planned_on_the_host_read_no_more_than_today(name):
    reads = warm_reads(name)
    assert 0 < reads.total <= PLANNED_ON_HOST[name], dict(reads.seen)
