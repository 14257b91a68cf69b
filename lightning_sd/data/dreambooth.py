"""DreamBooth instance data: a folder of photos of one subject and the prompt that names it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from lightning_sd.data.images import list_images, open_rgb
from lightning_sd.data.transforms import ImageTransform

__all__ = ["InstanceDataset"]


class InstanceDataset(Dataset):
    """Every image of a folder with one prompt, each sample carrying its loss weight.

    The images are decoded once, up front: a DreamBooth set is a handful of photos, and a bad
    file should stop the run before training starts, not in a worker an hour in.
    """

    def __init__(
        self,
        folder: str | Path,
        prompt: str,
        transform: ImageTransform,
        repeats: int = 1,
        loss_weight: float = 1.0,
    ):
        self.paths = list_images(folder)
        self.images = [open_rgb(p) for p in self.paths]
        self.prompt = prompt
        self.transform = transform
        self.repeats = repeats
        self.loss_weight = loss_weight

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, index: int) -> dict:
        image = self.images[index % len(self.images)]
        return {
            "pixel_values": self.transform(image),
            "prompt": self.prompt,
            "loss_weight": torch.tensor(self.loss_weight),
        }
