"""The stdlib's test cases, one manifest: every stdlib softmax pattern at small sizes, as each conformance table
runs it (``Case``). A table reads its own rows from here (``claimed``), so a new stdlib pattern is one ``Case`` below
(and CONTRIBUTING.md's steps).

A ``Case`` holds the pattern's parameters, its grid sizes or token count, the builder of its call-time inputs and
the inputs that take a gradient; ``at`` holds, per path, what that path's table runs differently (its own parameters
and sizes, where it covers another corner of the pattern; its heads and tiles) and, by its keys, which paths claim
the pattern:

- ``triton``: the generated kernels in the interpreter, forward and backward (``tests/backends/test_triton.py``; the
  inference, host-read and kernel-signature tests read the same rows);
- ``cpu``: the CPU tile executor (``tests/backends/test_cpu_backend.py``);
- ``flex``: the FlexAttention lowering, GQA (``tests/backends/test_flex_backend.py``);
- ``tiles``: the tile classification against brute force (``tests/compiler/test_tiles.py``), for static masks;
- ``paged``: a paged batch in one launch of ``attnc_fwd_paged`` (``tests/inference/test_paged_one_launch.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Case:
    """One stdlib pattern at small sizes. ``inputs(case, n, heads, head_dim, generator) -> {name: tensor}``: its
    call-time inputs for ``n`` tokens and ``heads`` query heads, float64 (ids int64), no batch dimension; ``grads``:
    those a backward differentiates; ``heads``: query and K/V heads (an int: as many of each); ``tiles``: the
    path's tiles (its q_tile, or (q_tile, kv_tile)); ``at``: per path, the fields it overrides."""

    name: str
    params: dict
    sizes: dict | None = None
    n: int | None = None
    inputs: Callable | None = None
    grads: tuple[str, ...] = ()
    heads: tuple[int, int] | int = (2, 2)
    tiles: object = None
    at: dict = dataclasses.field(default_factory=dict)

    def on(self, path: str) -> Case:
        """This case as ``path`` runs it (its overrides applied)."""
        return dataclasses.replace(self, **self.at[path])

    @property
    def tokens(self) -> int:
        """The tokens of a call: ``n``, or the product of the grid sizes."""
        return self.n if self.n is not None else math.prod(self.sizes.values())

    def make_inputs(
        self, heads: int, head_dim: int, *, seed: int = 0, dtype: torch.dtype = torch.float64, n: int | None = None
    ) -> dict:
        """The call-time inputs at ``n`` tokens (the case's by default), floats in ``dtype``, the ``grads`` ones
        requiring a gradient."""
        if self.inputs is None:
            return {}
        made = self.inputs(self, self.tokens if n is None else n, heads, head_dim, torch.Generator().manual_seed(seed))
        return {
            name: t.to(dtype).requires_grad_(name in self.grads) if t.is_floating_point() else t
            for name, t in made.items()
        }


def claimed(path: str) -> dict[str, Case]:
    """The cases ``path`` claims, as it runs them, by name."""
    return {case.name: case.on(path) for case in CASES if path in case.at}


# ----------------------------------------------------------------- the inputs of the patterns that read some
def _document(c, n, H, D, g):  # document ids, sorted: a few documents
    return {"doc": torch.sort(torch.randint(0, 4, (n,), generator=g)).values}


def _longformer(c, n, H, D, g):  # about one global token in ten
    return {"is_global": (torch.rand(n, generator=g) < 0.1).to(torch.int64)}


def _forgetting(c, n, H, D, g):  # log forget gates
    return {"g": torch.nn.functional.logsigmoid(2 * torch.randn(H, n, generator=g, dtype=torch.float64))}


def _cluster_mask(c, n, H, D, g):
    return {"centroids": torch.randn(H, c.params["clusters"], D, generator=g, dtype=torch.float64)}


def _dma(c, n, H, D, g):  # a score per key and head
    return {"importance": torch.randn(H, n, generator=g, dtype=torch.float64)}


def _dsa(c, n, H, D, g):  # DeepSeek's lightning indexer
    heads, dim = c.params["index_heads"], c.params["index_dim"]
    return {
        "qi": torch.randn(n, heads, dim, generator=g, dtype=torch.float64),
        "ki": torch.randn(n, dim, generator=g, dtype=torch.float64),
        "w": torch.randn(n, heads, generator=g, dtype=torch.float64),
    }


def _music_relative(c, n, H, D, g):  # relative embeddings
    return {"E": torch.randn(H, c.params["max_relative"], D, generator=g, dtype=torch.float64)}


def _seer(c, n, H, D, g):  # a gate per key block
    return {"gate": torch.randn(H, n, -(-n // c.params["block"]), generator=g, dtype=torch.float64)}


def _sparsifiner(c, n, H, D, g):  # low-rank connectivity factors
    return {name: torch.randn(H, n, c.params["rank"], generator=g, dtype=torch.float64) for name in ("qi", "ki")}


GRADS = {"forgetting": ("g",), "dma": ("importance",), "music_relative": ("E",)}

#: Every stdlib softmax pattern on a sequence or a grid (combined and bucketed patterns have their own test files:
#: tests/patterns/test_nsa.py, test_combiner.py, test_bucketed.py).
CASES = [
    Case(
        "a_shape",
        {"sinks": 3, "local": 7},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"sinks": 3, "local": 9}, "n": 61},
            flex={"params": {"local": 6, "sinks": 3}, "n": 37, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"params": {"sinks": 3, "local": 6}, "n": 45, "heads": 1, "tiles": ((8,), (5,))},
            paged={"params": {"sinks": 2, "local": 6}},
        ),
    ),
    Case(
        "alibi",
        {},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 45},
            flex={"n": 29, "heads": (6, 2), "tiles": (8, 8)},
            tiles={"n": 30, "heads": 2, "tiles": ((7,), (4,))},
            paged={},
        ),
    ),
    Case(
        "anchor",
        {"block": 3, "step": 2, "init": 6, "theta": 0.5},
        n=40,
        at=dict(triton={"tiles": 16}, cpu={"n": 47}, flex={"n": 35, "heads": (4, 2), "tiles": (8, 4)}),
    ),
    Case(
        "biformer",
        {"region": 2, "topk": 3},
        sizes={"height": 6, "width": 8},
        at=dict(
            triton={"tiles": (2, 4)},
            cpu={"params": {"region": 3, "topk": 2}, "sizes": {"height": 8, "width": 7}},
            flex={"n": 48, "heads": (4, 2), "tiles": ((2, 4), (2, 2))},
        ),
    ),
    Case(
        "cluster_mask",
        {"clusters": 3},
        n=40,
        inputs=_cluster_mask,
        at=dict(triton={"tiles": 16}, cpu={"n": 58}, flex={"n": 39, "heads": (4, 2), "tiles": (8, 4)}, paged={}),
    ),
    Case(
        "dilated",
        {"segment": 16, "dilation": 2},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"segment": 16, "dilation": 3}, "n": 53},
            flex={
                "params": {"segment": 8, "dilation": 2, "is_causal": True},
                "n": 35,
                "heads": (4, 2),
                "tiles": (8, 4),
            },
            tiles={
                "params": {"segment": 12, "dilation": 3, "is_causal": True},
                "n": 50,
                "heads": 1,
                "tiles": ((8,), (6,)),
            },
            paged={"params": {"segment": 8, "dilation": 2}},
        ),
    ),
    Case(
        "dma",
        {"window": 6},
        n=40,
        inputs=_dma,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"window": 7}, "n": 45},
            flex={"n": 30, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"window": 5}},
        ),
    ),
    Case(
        "document",
        {},
        n=40,
        inputs=_document,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 50},
            flex={"n": 33, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"heads": 1, "tiles": ((8,), (8,))},
            paged={},
        ),
    ),
    Case(
        "dsa",
        {"topk": 5, "index_heads": 3, "index_dim": 4},
        n=40,
        inputs=_dsa,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"topk": 6, "index_heads": 3, "index_dim": 4}, "n": 45},
            flex={"n": 30, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"topk": 5, "index_heads": 3, "index_dim": 8}},
        ),
    ),
    Case(
        "forgetting",
        {},
        n=40,
        inputs=_forgetting,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 47},
            flex={"n": 27, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"n": 30, "heads": 2, "tiles": ((6,), (9,))},
            paged={},
        ),
    ),
    Case(
        "freeswim",
        {"half_height": 1, "half_width": 2},
        sizes={"frames": 2, "height": 4, "width": 6},
        at=dict(
            triton={"tiles": (1, 2, 4)},
            cpu={"sizes": {"frames": 2, "height": 5, "width": 7}},
            flex={
                "sizes": {"frames": 2, "height": 5, "width": 7},
                "n": 70,
                "heads": (4, 2),
                "tiles": ((1, 2, 4), (2, 2, 2)),
            },
            tiles={"sizes": {"frames": 3, "height": 6, "width": 8}, "heads": 1, "tiles": ((1, 2, 4), (2, 2, 4))},
        ),
    ),
    Case(
        "grid",
        {"stride": 3, "vision_start": 5, "vision_end": 36, "sink": 2, "local": 4, "block": 2},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={},
            flex={"heads": (4, 2), "tiles": (8, 4)},
            tiles={
                "params": {"stride": 3, "vision_start": 5, "vision_end": 60, "sink": 2, "local": 4, "block": 2},
                "n": 64,
                "heads": 1,
                "tiles": ((8,), (4,)),
            },
            paged={"params": {"stride": 5, "vision_start": 3, "vision_end": 30, "sink": 2, "local": 4, "block": 4}},
        ),
    ),
    Case(
        "halo_2d",
        {"block": 3, "halo": 1},
        sizes={"height": 6, "width": 8},
        at=dict(
            triton={"tiles": (3, 4)},
            cpu={"sizes": {"height": 7, "width": 9}},
            flex={"sizes": {"height": 8, "width": 7}, "n": 56, "heads": (4, 2), "tiles": ((2, 4), (2, 2))},
            tiles={"sizes": {"height": 7, "width": 9}, "heads": 1, "tiles": ((3, 3), (2, 4))},
        ),
    ),
    Case(
        "landmark",
        {"block": 5},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 47},
            flex={"n": 35, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"heads": 1, "tiles": ((8,), (8,))},
            paged={},
        ),
    ),
    Case(
        "logsparse",
        {},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 66},
            flex={"heads": (4, 2), "tiles": (8, 4)},
            tiles={"n": 64, "heads": 1, "tiles": ((8,), (8,))},
            paged={},
        ),
    ),
    Case(
        "longformer",
        {"window": 6},
        n=40,
        inputs=_longformer,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"window": 8}, "n": 57},
            flex={"n": 34, "heads": (4, 2), "tiles": (8, 8)},
            tiles={"heads": 1, "tiles": ((8,), (8,))},
            paged={"params": {"window": 4}},
        ),
    ),
    Case(
        "longnet",
        {"segment": 16, "dilation": 2},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 50},
            flex={
                "params": {"segment": 8, "dilation": 2, "is_causal": False},
                "n": 32,
                "heads": (4, 2),
                "tiles": (8, 4),
            },
            tiles={"params": {"segment": 12, "dilation": 3, "is_causal": False}, "heads": 3, "tiles": ((5,), (8,))},
            paged={"params": {"segment": 8, "dilation": 2}},
        ),
    ),
    Case(
        "moa",
        {"alpha": [-6, 9], "beta": [0.5, 0.1], "max_new_tokens": 4, "block": 4, "minimum": 8},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={
                "params": {
                    "alpha": [-6, 9, 20, 3],
                    "beta": [0.5, 0.1, 0.0, 0.25],
                    "max_new_tokens": 4,
                    "block": 4,
                    "minimum": 8,
                },
                "n": 53,
            },
            flex={
                "params": {
                    "alpha": [-6, 9, 20, 3],
                    "beta": [0.5, 0.1, 0.0, 0.25],
                    "max_new_tokens": 4,
                    "block": 4,
                    "minimum": 8,
                },
                "n": 45,
                "heads": (4, 2),
                "tiles": (8, 4),
            },
            tiles={
                "params": {
                    "alpha": [-6, 9, 20],
                    "beta": [0.5, 0.1, 0.0],
                    "max_new_tokens": 4,
                    "block": 4,
                    "minimum": 8,
                },
                "n": 61,
                "heads": 3,
                "tiles": ((8,), (4,)),
            },
            paged={
                "params": {
                    "alpha": [-6, 9, 3, 20],
                    "beta": [0.5, 0.1, 0.0, 0.2],
                    "max_new_tokens": 4,
                    "block": 4,
                    "minimum": 8,
                }
            },
        ),
    ),
    Case(
        "moba",
        {"block": 8, "topk": 2},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 61},
            flex={"params": {"block": 4, "topk": 3}, "n": 30, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"block": 4, "topk": 2}},
        ),
    ),
    Case(
        "music_relative",
        {"max_relative": 12},
        n=40,
        inputs=_music_relative,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"max_relative": 11}, "n": 45},
            flex={"params": {"max_relative": 9}, "n": 30, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"params": {"max_relative": 6}, "heads": 1, "tiles": ((8,), (8,))},
            paged={},
        ),
    ),
    Case(
        "neighborhood_1d",
        {"kernel_size": 5, "dilation": 2},
        n=36,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 45},
            flex={"params": {"kernel_size": 5, "dilation": 2, "stride": 2}, "n": 31, "heads": (4, 2), "tiles": (8, 4)},
            tiles={
                "params": {"kernel_size": 7, "dilation": 2, "stride": 3},
                "n": 37,
                "heads": 1,
                "tiles": ((6,), (5,)),
            },
            paged={"params": {"kernel_size": 5, "stride": 2}},
        ),
    ),
    Case(
        "neighborhood_2d",
        {"kernel_size_y": 3, "kernel_size_x": 5, "is_causal_x": True},
        sizes={"height": 6, "width": 8},
        at=dict(
            triton={"tiles": (4, 4)},
            cpu={
                "params": {"kernel_size_y": 3, "kernel_size_x": 5, "dilation_x": 2},
                "sizes": {"height": 7, "width": 11},
            },
            flex={
                "params": {"kernel_size": (3, 5), "stride": (1, 2), "is_causal": (True, False)},
                "sizes": {"height": 7, "width": 9},
                "n": 63,
                "heads": (4, 2),
                "tiles": ((2, 4), (2, 2)),
            },
            tiles={
                "params": {"kernel_size_y": 5, "kernel_size_x": 3, "dilation_y": 2, "stride_x": 2},
                "sizes": {"height": 11, "width": 9},
                "heads": 1,
                "tiles": ((4, 2), (3, 4)),
            },
        ),
    ),
    Case(
        "neighborhood_3d",
        {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 3, "stride_x": 2},
        sizes={"frames": 3, "height": 4, "width": 4},
        at=dict(
            triton={"tiles": (2, 2, 4)},
            cpu={
                "params": {"kernel_size_t": 3, "kernel_size_y": 3, "kernel_size_x": 3},
                "sizes": {"frames": 3, "height": 5, "width": 6},
            },
            flex={
                "params": {"kernel_size": 3, "dilation": (1, 1, 2)},
                "sizes": {"frames": 4, "height": 5, "width": 6},
                "n": 120,
                "heads": (4, 2),
                "tiles": ((2, 2, 4), (2, 2, 2)),
            },
            tiles={
                "params": {
                    "kernel_size_t": 3,
                    "kernel_size_y": 3,
                    "kernel_size_x": 5,
                    "is_causal_t": True,
                    "stride_y": 2,
                },
                "sizes": {"frames": 5, "height": 6, "width": 7},
                "heads": 1,
                "tiles": ((2, 4, 4), (3, 2, 8)),
            },
        ),
    ),
    Case(
        "power",
        {"block": 4, "local": 2},
        n=48,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 70},
            flex={"n": 41, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"n": 96, "heads": 1, "tiles": ((8,), (8,))},
            paged={},
        ),
    ),
    Case(
        "prefix_lm",
        {"prefix": 5},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"prefix": 9}},
            flex={"n": 23, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"params": {"prefix": 7}, "n": 33, "heads": 1, "tiles": ((8,), (4,))},
            paged={},
        ),
    ),
    Case(
        "quest",
        {"token_budget": 16, "page": 4},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 61},
            flex={"params": {"token_budget": 12, "page": 4}, "n": 30, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"token_budget": 12, "page": 4}},
        ),
    ),
    Case(
        "radial",
        {"block": 4},
        sizes={"frames": 4, "per_frame": 10},
        at=dict(
            triton={"tiles": (2, 8)},
            cpu={"sizes": {"frames": 4, "per_frame": 16}},
            flex={
                "params": {"block": 3, "sink": True},
                "sizes": {"frames": 6, "per_frame": 12},
                "n": 72,
                "heads": (4, 2),
                "tiles": ((2, 4), (2, 2)),
            },
            tiles={"sizes": {"frames": 6, "per_frame": 16}, "heads": 1, "tiles": ((2, 8), (1, 16))},
        ),
    ),
    Case(
        "s2",
        {"block": 4, "local": 2, "vert": 2},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"block": 4, "local": 2, "vert": 4}, "n": 64},
            flex={
                "params": {"block": 4, "local": 2, "vert": 4, "offset": 1, "kv_heads": 2},
                "heads": (4, 2),
                "tiles": (8, 4),
            },
            tiles={"params": {"block": 4, "local": 3, "vert": 3}, "n": 64, "heads": 2, "tiles": ((8,), (4,))},
            paged={},
        ),
    ),
    Case(
        "seer",
        {"block": 8, "topk": 2},
        n=40,
        inputs=_seer,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 45},
            flex={"n": 30, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"block": 4, "topk": 2}},
        ),
    ),
    Case(
        "sigmoid",
        {"length": 40, "is_causal": True},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"length": 45, "is_causal": True}, "n": 45},
            flex={"params": {"length": 30, "is_causal": True}, "n": 30, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"heads": 1, "tiles": ((8,), (8,))},
            paged={"params": {"length": 16}},
        ),
    ),
    Case(
        "sliding_tile",
        {"tile_t": 2, "tile_y": 2, "tile_x": 2, "wt": 1, "wy": 3, "wx": 1},
        sizes={"frames": 2, "height": 6, "width": 4},
        at=dict(
            triton={"tiles": (2, 2, 4)},
            cpu={
                "params": {"tile_t": 2, "tile_y": 3, "tile_x": 3, "wt": 1, "wy": 3, "wx": 1},
                "sizes": {"frames": 4, "height": 9, "width": 6},
            },
            flex={
                "params": {"tile_t": 2, "tile_y": 3, "tile_x": 2, "wt": 3, "wy": 3, "wx": 1},
                "sizes": {"frames": 5, "height": 7, "width": 4},
                "n": 140,
                "heads": (4, 2),
                "tiles": ((2, 2, 4), (2, 2, 2)),
            },
            tiles={
                "params": {"tile_t": 2, "tile_y": 2, "tile_x": 3, "wt": 1, "wy": 3, "wx": 3},
                "sizes": {"frames": 4, "height": 6, "width": 8},
                "heads": 1,
                "tiles": ((2, 2, 3), (2, 4, 3)),
            },
        ),
    ),
    Case(
        "sliding_window",
        {"window": 5},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"window": 9}, "n": 50},
            flex={"params": {"window": 7}, "n": 37, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"params": {"window": 9}, "n": 70, "heads": 1, "tiles": ((16,), (8,))},
            paged={"params": {"window": 9}},
        ),
    ),
    Case(
        "softcap",
        {"cap": 1.5},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"cap": 0.8}},
            flex={"params": {"cap": 2.0}, "n": 25, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"params": {}, "n": 30, "heads": 1, "tiles": ((8,), (8,))},
            paged={"params": {"cap": 5.0}},
        ),
    ),
    Case(
        "softplus",
        {},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 45},
            flex={"n": 30, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"heads": 1, "tiles": ((8,), (8,))},
            paged={},
        ),
    ),
    Case(
        "sparsifiner",
        {"budget": 5, "rank": 4},
        n=40,
        inputs=_sparsifiner,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"budget": 7, "rank": 4}, "n": 45},
            flex={"n": 30, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"budget": 5, "rank": 4, "cls": 1}},
        ),
    ),
    Case(
        "streaming",
        {"window": 6, "sinks": 2},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"window": 7, "sinks": 2}, "n": 50},
            flex={"params": {"window": 5, "sinks": 3}, "n": 37, "heads": (4, 2), "tiles": (8, 4)},
            tiles={"params": {"window": 7, "sinks": 3}, "n": 50, "heads": 1, "tiles": ((16,), (8,))},
            paged={},
        ),
    ),
    Case(
        "token_topk",
        {"topk": 5},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"n": 47},
            flex={"params": {"topk": 4}, "n": 35, "heads": (4, 2), "tiles": (8, 4)},
            paged={"params": {"topk": 3}},
        ),
    ),
    Case(
        "vertical_slash",
        {"vertical": 3, "slash": 4, "last_q": 8, "sinks": 2, "local": 3, "slash_min": 1},
        n=40,
        at=dict(triton={"tiles": 16}, cpu={"n": 50}, flex={"n": 37, "heads": (4, 2), "tiles": (8, 4)}, paged={}),
    ),
    Case(
        "vmoba",
        {"layer": 2, "st_chunk_t": 1, "st_chunk_y": 2, "st_chunk_x": 3},
        sizes={"frames": 2, "height": 4, "width": 6},
        at=dict(
            triton={"tiles": (2, 2, 4)},
            cpu={
                "params": {"layer": 1, "spatial_chunk_y": 2, "spatial_chunk_x": 3},
                "sizes": {"frames": 3, "height": 4, "width": 6},
            },
            flex={
                "params": {"layer": 2, "st_chunk_t": 2, "st_chunk_y": 2, "st_chunk_x": 3},
                "sizes": {"frames": 4, "height": 4, "width": 6},
                "n": 96,
                "heads": (4, 2),
                "tiles": ((2, 2, 4), (2, 2, 2)),
            },
        ),
    ),
    Case(
        "window_2d",
        {"window": 4, "shift": 2},
        sizes={"height": 6, "width": 8},
        at=dict(
            triton={"tiles": (4, 4)},
            cpu={"sizes": {"height": 8, "width": 7}},
            flex={
                "params": {"window": 3, "shift": 1},
                "sizes": {"height": 7, "width": 9},
                "n": 63,
                "heads": (4, 2),
                "tiles": ((2, 4), (2, 2)),
            },
            tiles={"sizes": {"height": 8, "width": 10}, "heads": 1, "tiles": ((4, 2), (2, 4))},
        ),
    ),
    Case(
        "xattention",
        {"block": 8, "stride": 4, "threshold": 0.8, "chunk": 24},
        n=40,
        at=dict(
            triton={"tiles": 16},
            cpu={"params": {"block": 8, "stride": 2, "threshold": 0.7, "chunk": 24}, "n": 61},
            flex={
                "params": {"block": 4, "stride": 2, "threshold": 0.7, "chunk": 16},
                "n": 30,
                "heads": (4, 2),
                "tiles": (8, 4),
            },
        ),
    ),
]
CASES = [dataclasses.replace(c, grads=GRADS.get(c.name, ())) for c in CASES]
