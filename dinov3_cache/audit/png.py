"""Labelled image panels side by side, written as PNG with numpy and zlib only.

A preview needs RGB pixels and a few words of text. A PNG of 8-bit RGB rows is a
signature and three zlib-compressed, crc32-checked chunks, and a 5 x 7 bitmap font
covers titles, so the cache needs no imaging library for it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# 5 x 7 glyphs, rows top to bottom, '#' = ink. Lower case is drawn as upper case.
_GLYPH_ROWS = {
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "####. #...# #...# #...# #...# #...# ####.",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    " ": "..... ..... ..... ..... ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "-": "..... ..... ..... ##### ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "=": "..... ..... ##### ..... ##### ..... .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
}
GLYPHS = {c: np.array([[p == "#" for p in row] for row in rows.split()]) for c, rows in _GLYPH_ROWS.items()}
GLYPH_W, GLYPH_H = 5, 7

BACKGROUND = (24, 24, 24)
INK = (235, 235, 235)
TEXT_SCALE = 2
MARGIN = 8


def text_width(text: str, scale: int = TEXT_SCALE) -> int:
    return len(text) * (GLYPH_W + 1) * scale


def draw_text(image: np.ndarray, x: int, y: int, text: str, scale: int = TEXT_SCALE, color=INK) -> None:
    """Draw text with its top-left corner at (x, y), clipped to the image."""
    for i, char in enumerate(text.upper()):
        glyph = GLYPHS.get(char, GLYPHS["?"]).repeat(scale, 0).repeat(scale, 1)
        x0 = x + i * (GLYPH_W + 1) * scale
        region = image[y : y + glyph.shape[0], x0 : x0 + glyph.shape[1]]
        region[glyph[: region.shape[0], : region.shape[1]]] = color


def resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    return image[rows][:, cols]


def compose(panels: Sequence[tuple[str, np.ndarray]], header: str, panel_size: int) -> np.ndarray:
    """One RGB image: a header line, then each (title, HxWx3 uint8) panel scaled to
    panel_size, with its title above it."""
    line = GLYPH_H * TEXT_SCALE + MARGIN
    width = max(
        MARGIN + len(panels) * (panel_size + MARGIN),
        2 * MARGIN + max([text_width(header)] + [text_width(t) for t, _ in panels]),
    )
    height = MARGIN + line + line + panel_size + MARGIN
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = BACKGROUND
    draw_text(canvas, MARGIN, MARGIN, header)
    top = MARGIN + line
    for i, (title, pixels) in enumerate(panels):
        x = MARGIN + i * (panel_size + MARGIN)
        draw_text(canvas, x, top, title[: max(1, panel_size // ((GLYPH_W + 1) * TEXT_SCALE))])
        canvas[top + line : top + line + panel_size, x : x + panel_size] = resize_nearest(pixels, panel_size, panel_size)
    return canvas


def encode_png(rgb: np.ndarray) -> bytes:
    """8-bit RGB PNG; every row uses filter type 0 (none)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png needs an (H, W, 3) uint8 array, got {rgb.dtype} {rgb.shape}")
    height, width, _ = rgb.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> np.ndarray:
    """Read back a PNG written by encode_png (checks signature and chunk crc32s)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if crc != zlib.crc32(kind + body):
            raise ValueError(f"PNG chunk {kind!r} fails its crc32")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    if header is None or header[2:5] != (8, 2, 0):
        raise ValueError("only 8-bit RGB PNGs written by encode_png can be decoded")
    width, height = header[0], header[1]
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + width * 3)
    if rows[:, 0].any():
        raise ValueError("only PNG rows with filter type 0 can be decoded")
    return rows[:, 1:].reshape(height, width, 3)


def write_png(path: Path, rgb: np.ndarray) -> Path:
    """Write atomically (temporary name, then rename) so a reader never sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(encode_png(rgb))
    tmp.replace(path)
    return path
