"""A minimal PNG writer (no imaging dependency) for ``attnc show --png``."""

from __future__ import annotations

import struct
import zlib

import torch

from .core.errors import SpecError


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


#: Mask colours: masked light, allowed dark blue.
MASK_COLOURS = {0: bytes([245, 245, 245]), 1: bytes([30, 30, 120])}
#: Tile class colours: EMPTY light, PARTIAL orange, FULL dark blue.
CLASS_COLOURS = {0: bytes([245, 245, 245]), 1: bytes([240, 150, 40]), 2: bytes([30, 30, 120])}


def write_mask_png(path: str, masks: torch.Tensor, scale: int | None = None) -> None:
    """Write bool masks ``[heads, Nq, Nk]`` side by side: allowed pairs dark, masked light."""
    _write_maps(path, masks.to(torch.int64), MASK_COLOURS, scale)


def write_classes_png(path: str, classes: torch.Tensor, scale: int | None = None) -> None:
    """Write tile class maps ``[heads, Q tiles, KV tiles]`` (0 EMPTY, 1 PARTIAL, 2 FULL) side by side."""
    _write_maps(path, classes, CLASS_COLOURS, scale)


def _write_maps(path: str, maps: torch.Tensor, colours: dict[int, bytes], scale: int | None) -> None:
    """Integer maps ``[heads, rows, cols]`` as coloured cells, heads side by side with a red gap."""
    heads, nq, nk = maps.shape
    if scale is None:
        scale = max(1, min(16, 512 // max(nq, nk * heads)))
    gap = 2
    width = heads * nk * scale + (heads - 1) * gap
    rows = []
    for i in range(nq):
        row = bytearray()
        for h in range(heads):
            if h:
                row += bytes([255, 80, 80]) * gap
            for c in maps[h, i].tolist():
                row += colours[int(c)] * scale
        rows.extend([b"\x00" + bytes(row)] * scale)
    _write_rgb(path, width, nq * scale, rows)


def _write_rgb(path: str, width: int, height: int, rows: list[bytes]) -> None:
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
    data += _chunk(b"IEND", b"")
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        import os

        os.replace(tmp, path)  # never leave a half-written picture
    except OSError as err:
        raise SpecError(f"cannot write {path}: {err.strerror}", where="argument --png") from None
