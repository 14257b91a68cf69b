"""Image to training tensor: resize, crop, flip, normalise to [-1, 1]."""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import v2 as T

__all__ = ["ImageTransform"]


class ImageTransform:
    """Resize the short side to ``resolution``, crop a square, optionally flip, scale to [-1, 1].

    Args:
        resolution: output side in pixels.
        center_crop: center crop (reproducible) instead of a random crop.
        random_flip: flip horizontally with probability 1/2.
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False):
        crop = T.CenterCrop(resolution) if center_crop else T.RandomCrop(resolution)
        self.pipeline = T.Compose(
            [
                T.PILToTensor(),
                T.Resize(resolution, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                crop,
                T.RandomHorizontalFlip() if random_flip else T.Identity(),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize([0.5], [0.5]),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)
