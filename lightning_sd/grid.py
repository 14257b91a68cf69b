"""Image grids with captions: what people look at to compare samples."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from lightning_sd.atomic import atomic_path

__all__ = ["image_grid", "save_image_atomic"]


def image_grid(
    images: torch.Tensor,
    ncols: int,
    row_labels: list[str] | None = None,
    col_labels: list[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """Lay (N, 3, H, W) images in [0, 1] out in rows, with optional row and column captions.

    Args:
        images: the images, row-major.
        ncols: images per row.
        row_labels: one caption per row, drawn to the left.
        col_labels: one caption per column, drawn on top.
        cell: upscale each image to this side (nearest), so tiny samples stay visible.
    """
    n, _, h, w = images.shape
    nrows = -(-n // ncols)
    side_h, side_w = (cell, cell) if cell else (h, w)
    font = ImageFont.load_default()
    left = 8 + max((int(font.getlength(s)) for s in row_labels or []), default=-8)
    top = 16 if col_labels else 0
    pad = 2
    grid = Image.new(
        "RGB", (left + ncols * (side_w + pad) + pad, top + nrows * (side_h + pad) + pad), "white"
    )
    draw = ImageDraw.Draw(grid)
    arrays = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(arrays):
        r, c = divmod(i, ncols)
        tile = Image.fromarray(array).resize((side_w, side_h), Image.NEAREST)
        grid.paste(tile, (left + pad + c * (side_w + pad), top + pad + r * (side_h + pad)))
    for r, label in enumerate(row_labels or []):
        draw.text(
            (4, top + pad + r * (side_h + pad) + side_h // 2 - 5), label, fill="black", font=font
        )
    for c, label in enumerate(col_labels or []):
        draw.text((left + pad + c * (side_w + pad), 2), label, fill="black", font=font)
    return grid


def save_image_atomic(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image through a temporary file and a rename: never a half-written PNG."""
    path = Path(path)
    with atomic_path(path, "image") as tmp:
        image.save(tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")
    return path
