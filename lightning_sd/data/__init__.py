"""Training data: DreamBooth instance and class images, captioned sets, bucketing, caching."""

from lightning_sd.data.base import ImageDataModule
from lightning_sd.data.buckets import BucketBatchSampler, make_buckets
from lightning_sd.data.cache_fill import CacheStats, fill_cache
from lightning_sd.data.cache_store import LatentCache
from lightning_sd.data.caption_datamodule import CaptionDataModule
from lightning_sd.data.captions import CaptionTransform
from lightning_sd.data.class_images import generate_class_images
from lightning_sd.data.dataset import ImageCaptionDataset
from lightning_sd.data.dreambooth_datamodule import DreamBoothDataModule
from lightning_sd.data.dreambooth_datasets import (
    InstanceDataset,
    PriorPreservationDataset,
    collate_pairs,
)
from lightning_sd.data.images import BadImageError, MissingCaptionError, list_images, open_rgb
from lightning_sd.data.records import ImageRecord, scan_items
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.data.sources import CaptionSource, HFDataset, ImageFolder, SidecarCaptions
from lightning_sd.data.transforms import CropPlan, ImageTransform

__all__ = [
    "BadImageError",
    "BucketBatchSampler",
    "CacheSettings",
    "CacheStats",
    "CaptionDataModule",
    "CaptionSource",
    "CaptionTransform",
    "CropPlan",
    "DreamBoothDataModule",
    "HFDataset",
    "ImageCaptionDataset",
    "ImageDataModule",
    "ImageFolder",
    "ImageRecord",
    "ImageTransform",
    "InstanceDataset",
    "LatentCache",
    "LoaderSettings",
    "MissingCaptionError",
    "PriorPreservationDataset",
    "SidecarCaptions",
    "collate_pairs",
    "fill_cache",
    "generate_class_images",
    "list_images",
    "make_buckets",
    "open_rgb",
    "scan_items",
]
