"""Image grids as PNG, with numpy and Pillow only (the torch-free sampler uses this too)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) float in [-1, 1] -> (N, H, W, C) uint8."""
    x = np.clip((np.asarray(images, dtype=np.float32) + 1) * 127.5 + 0.5, 0, 255)
    return x.astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, nrow: int, pad: int = 2) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H', ncol*W', C) uint8 grid, ``nrow`` images a row."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int, scale: int = 2,
              row_labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Save (N, C, H, W) images in [-1, 1] as a PNG grid, optionally with row labels."""
    from PIL import Image, ImageDraw

    grid = make_grid(to_uint8(images), nrow)
    im = Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid)
    im = im.convert("RGB").resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    left = 90 if row_labels else 0
    top = 18 if title else 0
    canvas = Image.new("RGB", (im.width + left, im.height + top), "white")
    canvas.paste(im, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 3), title, fill="black")
    if row_labels:
        h = images.shape[2]
        for r, label in enumerate(row_labels):
            y = top + (2 + r * (h + 2)) * scale + h * scale // 2 - 5
            draw.text((4, y), str(label)[:14], fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
