"""A grid of images with each one's caption written under it, for looking at text-to-image samples."""
from __future__ import annotations

import math
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 128  # smaller images are enlarged (nearest neighbour) so that a caption line fits under them
CAPTION_LINES = 3
PAD = 2


def captioned_grid(pixels: np.ndarray, captions: Sequence[str], columns: int = 8) -> Image.Image:
    """uint8 images (N, H, W, 3) as one RGB image, `columns` per row, each above the first lines of its caption
    (PIL's default font; characters it cannot draw become '?')."""
    count, height, width = pixels.shape[:3]
    scale = math.ceil(MIN_CELL / width) if width < MIN_CELL else 1
    cell_w, cell_h = width * scale, height * scale
    font = ImageFont.load_default()
    line_h = font.getbbox("Ag")[3] + 2
    chars_per_line = max(8, int(cell_w // font.getlength("n")))
    band = CAPTION_LINES * line_h + 2 * PAD
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    grid = Image.new("RGB", (columns * (cell_w + PAD) + PAD, rows * (cell_h + band + PAD) + PAD), "white")
    pen = ImageDraw.Draw(grid)
    for index, (image, caption) in enumerate(zip(pixels, captions)):
        x = PAD + (index % columns) * (cell_w + PAD)
        y = PAD + (index // columns) * (cell_h + band + PAD)
        grid.paste(Image.fromarray(image).resize((cell_w, cell_h), Image.NEAREST), (x, y))
        if not isinstance(font, ImageFont.FreeTypeFont):  # the bitmap fallback font draws Latin-1 only
            caption = caption.encode("latin-1", "replace").decode("latin-1")
        lines = textwrap.wrap(" ".join(caption.split()), chars_per_line, max_lines=CAPTION_LINES, placeholder=" ...")
        for number, line in enumerate(lines):
            pen.text((x + 1, y + cell_h + PAD + number * line_h), line, fill="black", font=font)
    return grid
