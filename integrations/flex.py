"""A pattern written in ``.attn`` as FlexAttention's own objects: ``to_flex``.

For a FlexAttention user who calls ``flex_attention`` (or hands a ``mask_mod`` to a framework that
does: vLLM's FlexAttention backend reads a layer's ``logical_mask_mod``) and wants the mask authored,
checked and classified by attnc. What is exported, and what is refused, is
``runtime.backends.flex.export``'s (``REFUSED``).
"""

from __future__ import annotations

import torch

from ..compiler.analysis import evaluate as E
from ..core import ir
from ..core.errors import SpecError
from ..runtime.backends.flex.export import DEFAULT_BLOCK_SIZE, REFUSED, FlexExport, export, refuse
from ..spec.library import load

__all__ = ["REFUSED", "FlexExport", "to_flex"]


def to_flex(
    pattern,
    n: int | None = None,
    *,
    nk: int | None = None,
    heads: int = 1,
    dk: int | None = None,
    sizes: dict | None = None,
    inputs: dict | None = None,
    device: str | torch.device = "cpu",
    block_size: int | tuple[int, int] = DEFAULT_BLOCK_SIZE,
    name: str | None = None,
    **params,
) -> FlexExport:
    """FlexAttention's ``mask_mod``, ``score_mod`` and ``BlockMask`` of a pattern at fixed sizes.

    ``pattern``: a loaded pattern, a path, ``"stdlib:NAME"`` or spec text (then ``name=`` picks a
    declaration and other keywords set parameters). ``n``: the number of queries (on a grid implied
    by ``sizes``); ``nk``: the number of keys of a cross-attention pattern, or of a self-attention one
    after a KV cache (``nk > n``: the queries are the last n tokens). ``heads``: query heads (the
    mods and blocks are per head where the pattern reads ``h``). ``dk``: the head dimension, for a
    pattern whose terms read it (softplus's ``scale log(dk) * log(q + 1)``). ``inputs``: the
    pattern's call-time inputs by name (a document's ids, a bias table, FoX gates), captured by the mods on ``device``;
    a leading batch dimension is read through Flex's ``b``. ``block_size``: Flex's BLOCK_SIZE, one int
    or (Q, KV) (128, Flex's default, is what its CUDA kernels take without options).

    Returns a ``FlexExport``: ``.mask_mod``, ``.score_mod`` (None without score terms),
    ``.block_mask``, ``.source``, and calling it runs ``flex_attention`` with them on ``[B, heads,
    n, D]`` tensors (the token order of a grid is row-major). Patterns Flex cannot express
    (recurrences, combined and bucketed patterns, routing, masks or scores read from the q and k
    vectors, unnormalized weights: ``REFUSED``) raise a ``SpecError`` naming the pattern and what
    Flex lacks.
    """
    if isinstance(pattern, ir.PatternIR | ir.RecurrenceIR | ir.CombinedIR | ir.BucketedIR):
        if name is not None or params:
            raise SpecError(
                "name= and parameters apply when loading; this pattern is already loaded",
                where="argument pattern",
                hint="pass the source (path, 'stdlib:NAME' or text) instead",
            )
        pat = pattern
    else:
        pat = load(pattern, name=name, **params)
    refuse(pat)
    bq, bk = _block_size(block_size)
    device = _flex_device(device)
    bound = E.bind_sizes(pat, n=n, nk=nk, heads=heads, sizes=sizes, dk=dk, offset_ok=True)
    tensors, _ = E.bind_inputs(pat, bound, inputs)  # moved to device by export
    return export(pat, bound, tensors, device, (bq, bk))


def _block_size(value) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in pair)
    ):
        raise SpecError(
            f"expected a positive int or a (Q, KV) pair of them, got {value!r}",
            where="argument block_size",
        )
    return int(pair[0]), int(pair[1])


def _flex_device(device) -> torch.device:
    """``device`` as the mods' tensors are placed on: a CPU or an available CUDA device (FlexAttention runs there);
    torch's own errors (an unknown type, a torch built without CUDA, meta tensors that fail at the first call) name
    no argument."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise SpecError(f"not a device: {device!r} ({str(err).splitlines()[0]})", where="argument device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError("CUDA is not available to this torch", where="argument device", hint="device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise SpecError(f"FlexAttention runs on a CPU or a CUDA device, not {device.type!r}", where="argument device")
    return device
