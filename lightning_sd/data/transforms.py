"""Image to training tensor: resize to cover the target, crop, flip, normalise to [-1, 1].

The crop is planned before it is applied, so a sample can carry SDXL's micro-conditioning
(original size, crop top-left, target size; Podell et al. 2023, sec. 2.2) and the latent cache
can key an entry on exactly the pixels it encodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from lightning_sd.data.images import BadImageError

__all__ = ["CropPlan", "ImageTransform"]

Size = tuple[int, int]  # (height, width), the order SDXL's micro-conditioning uses


@dataclass(frozen=True)
class CropPlan:
    """Where one image's training pixels come from.

    Attributes:
        original_size: (height, width) of the upright image.
        resized: (height, width) after scaling it to cover ``target``.
        top: crop offset in the resized image.
        left: crop offset in the resized image (unflipped).
        target: (height, width) of the output.
    """

    original_size: Size
    resized: Size
    top: int
    left: int
    target: Size

    def crop_top_left(self, flipped: bool) -> Size:
        """The crop offset as the model sees it: a mirrored crop starts from the other edge."""
        left = self.resized[1] - self.left - self.target[1] if flipped else self.left
        return (self.top, left)


class ImageTransform:
    """Scale to cover the target size, crop, optionally flip, scale to [-1, 1].

    The target is the square ``resolution`` or, with ``buckets``, the bucket nearest the image's
    aspect ratio. Bucketed images are always center-cropped: the image already fits its bucket
    but for a few pixels, and a fixed crop keeps their latents cacheable.

    Args:
        resolution: square output side in pixels (and the bucket area, as resolution ** 2).
        center_crop: center (reproducible) instead of random square crops.
        random_flip: flip horizontally with probability 1/2.
        buckets: (height, width) targets for aspect-ratio bucketing; None for square crops.
    """

    def __init__(
        self,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        buckets: list[Size] | None = None,
    ):
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.buckets = [tuple(b) for b in buckets] if buckets else None

    @property
    def deterministic(self) -> bool:
        """Whether an image always gives the same crop (the condition for caching latents)."""
        return self.center_crop or self.buckets is not None

    def settings(self) -> str:
        """What changes the pixels of a planned crop, for cache keys."""
        return f"resize=bilinear-antialias;normalize=[-1,1];buckets={self.buckets is not None}"

    def target_size(self, size: Size) -> Size:
        """The output size for an image of ``size``: the square, or the nearest-aspect bucket."""
        if self.buckets is None:
            return (self.resolution, self.resolution)
        ratio = math.log(size[1] / size[0])
        return min(self.buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))

    def check_size(self, name: str, size: Size) -> None:
        """Refuse images that would be upscaled: they train the model on blur.

        Square crops need a short side of at least ``resolution``; a bucketed image needs at
        least its bucket's pixel count.
        """
        th, tw = self.target_size(size)
        h, w = size
        if self.buckets is None and min(h, w) < self.resolution:
            raise BadImageError(
                f"{name}: {w}x{h} px is smaller than the {self.resolution} px training resolution"
            )
        if self.buckets is not None and h * w < th * tw:
            raise BadImageError(
                f"{name}: {w}x{h} px has fewer pixels than its {tw}x{th} bucket "
                f"(resolution {self.resolution})"
            )

    def plan(self, size: Size, generator: torch.Generator | None = None) -> CropPlan:
        """Resize and crop for an image of ``size``; random offsets come from ``generator``
        (torch's global RNG when None)."""
        th, tw = self.target_size(size)
        h, w = size
        scale = max(th / h, tw / w)
        rh, rw = max(th, round(h * scale)), max(tw, round(w * scale))
        if self.deterministic:
            top, left = (rh - th) // 2, (rw - tw) // 2
        else:
            top = int(torch.randint(0, rh - th + 1, (), generator=generator))
            left = int(torch.randint(0, rw - tw + 1, (), generator=generator))
        return CropPlan(size, (rh, rw), top, left, (th, tw))

    def draw_flip(self, generator: torch.Generator | None = None) -> bool:
        """Whether this sample is mirrored (drawn from ``generator``, else the global RNG)."""
        return self.random_flip and bool(torch.rand((), generator=generator) < 0.5)

    def apply(self, image: Image.Image, plan: CropPlan, flipped: bool) -> torch.Tensor:
        """The planned crop of ``image`` as a float tensor in [-1, 1], shape (3, H, W)."""
        return _place(image, plan, flipped).float() / 127.5 - 1.0

    def apply_mask(self, mask: Image.Image, plan: CropPlan, flipped: bool) -> torch.Tensor:
        """The same crop and flip of an image's greyscale loss mask, in [0, 1], shape (1, H, W).

        Resized, cropped and mirrored exactly as :meth:`apply` treats the image, so each mask
        pixel stays on the image pixel it was drawn on.
        """
        return _place(mask.convert("L"), plan, flipped).float() / 255.0

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """A random (or fixed) view of ``image`` with its micro-conditioning tensors."""
        plan = self.plan((image.height, image.width))
        flipped = self.draw_flip()
        return {
            "pixel_values": self.apply(image, plan, flipped),
            **micro_conditioning(plan, flipped),
        }


def micro_conditioning(plan: CropPlan, flipped: bool) -> dict[str, torch.Tensor]:
    """SDXL's size and crop conditioning of one sample, as (height, width) / (top, left)."""
    return {
        "original_size": torch.tensor(plan.original_size),
        "crop_top_left": torch.tensor(plan.crop_top_left(flipped)),
        "target_size": torch.tensor(plan.target),
    }


def _place(image: Image.Image, plan: CropPlan, flipped: bool) -> torch.Tensor:
    """Resize, crop and flip a PIL image as planned: uint8 (C, H, W)."""
    x = F.pil_to_tensor(image)
    x = F.resize(x, list(plan.resized), interpolation=F.InterpolationMode.BILINEAR)
    x = F.crop(x, plan.top, plan.left, *plan.target)
    return F.horizontal_flip(x) if flipped else x
