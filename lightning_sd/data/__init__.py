"""Training data: DreamBooth instance sets (and, later, class images and captioned sets)."""

from lightning_sd.data.datamodule import DreamBoothDataModule
from lightning_sd.data.dreambooth import InstanceDataset
from lightning_sd.data.images import BadImageError, list_images, open_rgb
from lightning_sd.data.transforms import ImageTransform

__all__ = [
    "BadImageError",
    "DreamBoothDataModule",
    "ImageTransform",
    "InstanceDataset",
    "list_images",
    "open_rgb",
]
