"""Image tensors for metric networks: reference folders, resizing, normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from lightning_sd.data.images import list_images, open_rgb

__all__ = ["load_image_folder", "normalize", "resize_center_crop"]


def resize_center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic, antialiased) and crop the centre square.

    What CLIP's and timm's evaluation transforms do, on tensors, so generated images need no
    round trip through PIL. Images already at ``size`` pass through untouched.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    images = F.interpolate(
        images.float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False
    )
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size].clamp(0, 1)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std``, the input convention of ImageNet and CLIP networks."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_t) / std_t


def load_image_folder(folder: str | Path, side: int) -> torch.Tensor:
    """Every image of a folder as centre-cropped squares of ``side`` pixels, (N, 3, side, side).

    Reference images are brought to the generated images' size first, so both sets then go
    through the same resizing into each metric network.
    """
    tiles = []
    for path in list_images(folder):
        image = open_rgb(path)
        crop = min(image.size)
        left, top = (image.width - crop) // 2, (image.height - crop) // 2
        image = image.crop((left, top, left + crop, top + crop))
        image = image.resize((side, side), Image.BICUBIC)
        tiles.append(pil_to_tensor(image))
    return torch.stack(tiles).float() / 255
