"""Images as half-block pixels: each character cell shows two pixels, one above the other.

A cell is '▀' with the top pixel as its foreground colour and the bottom pixel as its
background, so an H x W image takes ceil(H / 2) lines of W cells. Grey (1 channel) and RGB
(3 channels) uint8 images are drawn; an odd last row gets a black bottom half.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.color import Color
from rich.style import Style
from rich.text import Text

HALF = "▀"
Pixel = tuple[int, int, int]


def rgb(image: Sequence[Sequence[Sequence[int]]], y: int, x: int) -> Pixel:
    """The pixel (y, x) of a C x H x W nested sequence (C = 1 or 3) as an RGB triple."""
    if len(image) == 1:
        v = int(image[0][y][x])
        return v, v, v
    return int(image[0][y][x]), int(image[1][y][x]), int(image[2][y][x])


def half_blocks(image: Sequence[Sequence[Sequence[int]]], scale: int = 1) -> Text:
    """``image`` (C x H x W values 0..255, e.g. ``tensor.tolist()``) as lines of '▀' cells;
    ``scale`` repeats each pixel that many times across and down."""
    channels, height, width = len(image), len(image[0]), len(image[0][0])
    if channels not in (1, 3):
        raise ValueError(f"an image must have 1 or 3 channels, not {channels}")
    rows = [y for y in range(height) for _ in range(scale)]
    cols = [x for x in range(width) for _ in range(scale)]
    out = Text()
    for i in range(0, len(rows), 2):
        if i:
            out.append("\n")
        for x in cols:
            top = rgb(image, rows[i], x)
            bottom = rgb(image, rows[i + 1], x) if i + 1 < len(rows) else (0, 0, 0)
            out.append(HALF, Style(color=Color.from_rgb(*top), bgcolor=Color.from_rgb(*bottom)))
    return out


def pair_lines(clean: Text, adversarial: Text, caption: Text, gap: int = 1) -> list[Text]:
    """A clean image beside its adversarial example, the caption underneath, as equal-width lines."""
    left, right = clean.split("\n"), adversarial.split("\n")
    width = left[0].cell_len + gap + right[0].cell_len
    lines = [Text.assemble(a, " " * gap, b) for a, b in zip(left, right, strict=False)]
    caption = caption.copy()
    caption.truncate(width)
    caption.pad_right(width - caption.cell_len)
    return [*lines, caption]


def tile(blocks: list[list[Text]], width: int, gap: int = 3) -> Text:
    """Blocks of equal-width lines laid left to right, wrapping to a new band at ``width`` cells."""
    if not blocks:
        return Text()
    block_width = blocks[0][0].cell_len
    per_row = max(1, (width + gap) // (block_width + gap))
    bands: list[Text] = []
    for start in range(0, len(blocks), per_row):
        band = blocks[start:start + per_row]
        height = max(len(b) for b in band)
        for i in range(height):
            parts = [b[i] if i < len(b) else Text(" " * block_width) for b in band]
            bands.append(Text(" " * gap).join(parts))
        bands.append(Text(""))
    return Text("\n").join(bands[:-1])
