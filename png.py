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


# ----------------------------------------------------------------- one query's keys on its grid
#: A 3 x 5 pixel font (rows top to bottom, '#' set) for axis labels and the legend: upper case, digits and
#: the few signs the labels use (lower case is drawn as upper case).
FONT = {
    "A": ("###", "#.#", "###", "#.#", "#.#"), "B": ("##.", "#.#", "##.", "#.#", "##."),
    "C": ("###", "#..", "#..", "#..", "###"), "D": ("##.", "#.#", "#.#", "#.#", "##."),
    "E": ("###", "#..", "##.", "#..", "###"), "F": ("###", "#..", "##.", "#..", "#.."),
    "G": ("###", "#..", "#.#", "#.#", "###"), "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "I": ("###", ".#.", ".#.", ".#.", "###"), "J": ("..#", "..#", "..#", "#.#", "###"),
    "K": ("#.#", "#.#", "##.", "#.#", "#.#"), "L": ("#..", "#..", "#..", "#..", "###"),
    "M": ("#.#", "###", "###", "#.#", "#.#"), "N": ("##.", "#.#", "#.#", "#.#", "#.#"),
    "O": ("###", "#.#", "#.#", "#.#", "###"), "P": ("###", "#.#", "###", "#..", "#.."),
    "Q": ("###", "#.#", "#.#", "###", "..#"), "R": ("##.", "#.#", "##.", "#.#", "#.#"),
    "S": ("###", "#..", "###", "..#", "###"), "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"), "V": ("#.#", "#.#", "#.#", "#.#", ".#."),
    "W": ("#.#", "#.#", "###", "###", "#.#"), "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Y": ("#.#", "#.#", ".#.", ".#.", ".#."), "Z": ("###", "..#", ".#.", "#..", "###"),
    "0": ("###", "#.#", "#.#", "#.#", "###"), "1": (".#.", "##.", ".#.", ".#.", "###"),
    "2": ("###", "..#", "###", "#..", "###"), "3": ("###", "..#", "###", "..#", "###"),
    "4": ("#.#", "#.#", "###", "..#", "..#"), "5": ("###", "#..", "###", "..#", "###"),
    "6": ("###", "#..", "###", "#.#", "###"), "7": ("###", "..#", "..#", "..#", "..#"),
    "8": ("###", "#.#", "###", "#.#", "###"), "9": ("###", "#.#", "###", "..#", "###"),
    "=": ("...", "###", "...", "###", "..."), ":": ("...", ".#.", "...", ".#.", "..."),
    ",": ("...", "...", "...", ".#.", "#.."), ".": ("...", "...", "...", "...", ".#."),
    "(": (".#.", "#..", "#..", "#..", ".#."), ")": (".#.", "..#", "..#", "..#", ".#."),
    "-": ("...", "...", "###", "...", "..."), "/": ("..#", "..#", ".#.", "#..", "#.."),
    "_": ("...", "...", "...", "...", "###"), "'": (".#.", ".#.", "...", "...", "..."),
    " ": ("...", "...", "...", "...", "..."),
}
WHITE, BLACK, GRID_LINE = (255, 255, 255), (0, 0, 0), (190, 190, 190)
#: A query's cell is outlined in red; the keys it attends are dark blue, the others light.
QUERY_RED, ATTENDED, NOT_ATTENDED = (220, 30, 30), (30, 30, 120), (235, 235, 235)


class Canvas:
    """An RGB picture drawn with rectangles and the 3 x 5 font, written with ``save``."""

    def __init__(self, width: int, height: int):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(WHITE) * (width * height))

    def rect(self, x: int, y: int, w: int, h: int, colour: tuple[int, int, int]) -> None:
        x0, y0, x1, y1 = max(0, x), max(0, y), min(self.width, x + w), min(self.height, y + h)
        if x1 <= x0:
            return
        row = bytes(colour) * (x1 - x0)
        for yy in range(y0, y1):
            start = 3 * (yy * self.width + x0)
            self.pixels[start:start + len(row)] = row

    def outline(self, x: int, y: int, w: int, h: int, colour, thick: int) -> None:
        self.rect(x, y, w, thick, colour)
        self.rect(x, y + h - thick, w, thick, colour)
        self.rect(x, y, thick, h, colour)
        self.rect(x + w - thick, y, thick, h, colour)

    def text(self, x: int, y: int, text: str, scale: int = 2, colour=BLACK) -> int:
        """Draws ``text`` with its top left at (x, y); returns its width in pixels."""
        for i, ch in enumerate(text.upper()):
            glyph = FONT.get(ch, FONT["."])
            for r, bits in enumerate(glyph):
                for c, bit in enumerate(bits):
                    if bit == "#":
                        self.rect(x + (4 * i + c) * scale, y + r * scale, scale, scale, colour)
        return text_width(text, scale)

    def save(self, path: str) -> None:
        stride = 3 * self.width
        rows = [b"\x00" + bytes(self.pixels[i * stride:(i + 1) * stride]) for i in range(self.height)]
        _write_rgb(path, self.width, self.height, rows)


def text_width(text: str, scale: int = 2) -> int:
    return max(0, 4 * len(text) - 1) * scale


def write_query_png(path: str, panels: list[tuple[str, torch.Tensor, tuple[int, int] | None]], row_axis: str | None,
                    col_axis: str, title: str) -> None:
    """One query's keys on its grid: ``panels`` are (caption, bool ``[rows, cols]`` of the keys it attends,
    the query's (row, col) when it lies in that panel), side by side (a 3-D grid: one per frame), each with
    its axes' tick labels and names; a legend and ``title`` below."""
    rows, cols = panels[0][1].shape
    cell = max(4, min(24, 480 // max(rows, cols)))
    s = 2  # font scale: 6 x 10 pixel characters
    tick = max(1, -(-10 * s * 2 // cell))  # label every tick-th row / column so labels do not touch
    left = text_width(str(rows - 1), s) + (text_width(row_axis, s) + 3 * s if row_axis else 0) + 4 * s
    top = 10 * s + 4 * s  # the panel's caption
    grid_w, grid_h = cols * cell + 1, rows * cell + 1
    bottom = 7 * s + 10 * s  # the column ticks and the column axis name
    panel_w = left + grid_w + 6 * s
    legend = [(QUERY_RED, "query (outlined)"), (ATTENDED, "key it attends"), (NOT_ATTENDED, "key it does not")]
    legend_h = 3 * 9 * s + 10 * s
    width = max(len(panels) * panel_w + 4 * s, text_width(title, s) + 8 * s,
                max(text_width(t, s) for _, t in legend) + 20 * s)
    height = top + grid_h + bottom + legend_h + 4 * s
    canvas = Canvas(width, height)
    for p, (caption, keys, query) in enumerate(panels):
        x0, y0 = 2 * s + p * panel_w + left, top
        canvas.text(x0, 2 * s, caption, s)
        canvas.rect(x0, y0, grid_w, grid_h, GRID_LINE)
        for r in range(rows):
            for c in range(cols):
                canvas.rect(x0 + c * cell + 1, y0 + r * cell + 1, cell - 1, cell - 1,
                            ATTENDED if keys[r, c] else NOT_ATTENDED)
        if query is not None:
            qr, qc = query
            canvas.outline(x0 + qc * cell, y0 + qr * cell, cell + 1, cell + 1, QUERY_RED, max(2, cell // 6))
        for r in range(0, rows, tick):  # row ticks, right-aligned against the grid
            label = str(r)
            canvas.text(x0 - 2 * s - text_width(label, s), y0 + r * cell + (cell - 5 * s) // 2, label, s)
        if row_axis:
            canvas.text(x0 - left + 2 * s, y0 + (grid_h - 5 * s) // 2, row_axis, s)
        for c in range(0, cols, tick):
            label = str(c)
            canvas.text(x0 + c * cell + (cell - text_width(label, s)) // 2, y0 + grid_h + 2 * s, label, s)
        canvas.text(x0 + (grid_w - text_width(col_axis, s)) // 2, y0 + grid_h + 9 * s, col_axis, s)
    y = top + grid_h + bottom + 2 * s
    for colour, words in legend:
        if colour == QUERY_RED:
            canvas.rect(2 * s, y, 7 * s, 7 * s, NOT_ATTENDED)
            canvas.outline(2 * s, y, 7 * s, 7 * s, QUERY_RED, s)
        else:
            canvas.rect(2 * s, y, 7 * s, 7 * s, colour)
        canvas.text(12 * s, y + s, words, s)
        y += 9 * s
    canvas.text(2 * s, y + 2 * s, title, s)
    canvas.save(path)
