"""Scanned image records to training samples, decoded per sample or served from the cache.

A sample is ``{"pixel_values" | "latents", "prompt", ("cond"), "loss_weight", "original_size",
"crop_top_left", "target_size", ("mask")}``: the module encodes what is not cached and weights each
sample's loss by ``loss_weight``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from lightning_sd.data.cache_store import LatentCache
from lightning_sd.data.captions import CaptionTransform
from lightning_sd.data.keys import sample_generator, split_key
from lightning_sd.data.records import ImageRecord
from lightning_sd.data.transforms import ImageTransform, micro_conditioning

__all__ = ["CachedView", "ImageCaptionDataset"]


@dataclass
class CachedView:
    """What a dataset serves from the cache instead of encoding.

    Attributes:
        cache: the store.
        latent_keys: per record, the keys of its (unflipped, flipped) latents; None when
            latents are not cached. The flipped key is None without random flips.
        text_keys: prompt -> key of its embeddings; None when text is not cached.
        sample_latents: draw ``mean + std * eps`` (training) or serve the mean (validation).
    """

    cache: LatentCache
    latent_keys: list[tuple[str, str | None]] | None
    text_keys: dict[str, str] | None
    sample_latents: bool


class ImageCaptionDataset(Dataset):
    """Records with a transform, a caption augmentation and a per-sample loss weight.

    Args:
        records: the scanned images (``records.scan_items``).
        transform: resize / crop / flip.
        captions: caption dropout and tag shuffling; None serves captions as they are.
        loss_weight: every sample's loss weight (``prior_loss_weight`` for class images).
        repeats: how many times each image appears per epoch.
        seed: with the sample key, seeds each sample's crop, flip, caption and latent draws.
        masks: emit each sample's loss ``mask`` (1, H, W) in [0, 1], cropped and flipped with
            its image: from ``name.mask.png`` beside the image, else its alpha channel, else
            full (``images.decode_mask``).

    Items are addressed by sample key (``lightning_sd.data.keys``): the index, plus the epoch
    that makes each epoch's draws new.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        transform: ImageTransform,
        captions: CaptionTransform | None = None,
        loss_weight: float = 1.0,
        repeats: int = 1,
        seed: int = 0,
        masks: bool = False,
    ):
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.records = records
        self.transform = transform
        self.captions = captions
        self.loss_weight = loss_weight
        self.repeats = repeats
        self.seed = seed
        self.masks = masks
        self.cached: CachedView | None = None

    def served_from(self, view: CachedView) -> ImageCaptionDataset:
        """A copy that serves what ``view`` caches instead of encoding it; ``self`` unchanged."""
        served = copy.copy(self)
        served.cached = view
        return served

    def __len__(self) -> int:
        return len(self.records) * self.repeats

    def bucket_ids(self) -> list[int]:
        """Every index's bucket (an index into ``transform.buckets``), for the batch sampler."""
        buckets = self.transform.buckets or [(self.transform.resolution,) * 2]
        ids = [buckets.index(self.transform.target_size(r.size)) for r in self.records]
        return ids * self.repeats

    def prompts(self) -> set[str]:
        """Every text this dataset can emit (the captions, and ``""`` with caption dropout)."""
        texts = {r.caption for r in self.records}
        return texts | {""} if self.captions is not None and self.captions.dropout else texts

    def __getitem__(self, key: int) -> dict:
        i = split_key(key, len(self))[1] % len(self.records)
        record = self.records[i]
        gen = sample_generator(self.seed, key)
        plan = self.transform.plan(record.size, gen)
        flipped = self.transform.draw_flip(gen)
        prompt = record.caption
        if self.captions is not None:
            prompt = self.captions(prompt, gen)
        sample = {
            "prompt": prompt,
            "loss_weight": torch.tensor(self.loss_weight, dtype=torch.float32),
            **micro_conditioning(plan, flipped),
        }
        cached = self.cached
        if cached is not None and cached.latent_keys is not None:
            entry = cached.cache.load("latents", cached.latent_keys[i][flipped])
            noise = 0.0
            if cached.sample_latents:
                noise = torch.randn(entry["std"].shape, generator=gen).to(entry["std"])
            sample["latents"] = entry["mean"] + entry["std"] * noise
            if self.masks:
                sample["mask"] = entry["mask"]  # on the latent grid, flipped with the latents
        else:
            sample["pixel_values"] = self.transform.apply(record.open(), plan, flipped)
        if self.masks and "mask" not in sample:
            sample["mask"] = self.transform.apply_mask(record.open_mask(), plan, flipped)
        if cached is not None and cached.text_keys is not None:
            sample["cond"] = cached.cache.load("text", cached.text_keys[prompt])
        return sample
