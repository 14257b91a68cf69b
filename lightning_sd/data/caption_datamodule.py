"""The captioned-images DataModule: any ``CaptionSource``, caption augmentation, aspect-ratio
bucketing, a deterministic held-out split and the latent / text cache."""

from __future__ import annotations

from torch.utils.data import DataLoader

from lightning_sd.data.base import ImageDataModule, check_positive
from lightning_sd.data.buckets import make_buckets
from lightning_sd.data.cache_fill import check_fixed_crops
from lightning_sd.data.captions import CaptionTransform
from lightning_sd.data.dataset import ImageCaptionDataset
from lightning_sd.data.records import ImageRecord, scan_items
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.data.sources import CaptionSource
from lightning_sd.data.transforms import ImageTransform
from lightning_sd.serialization import from_config

__all__ = ["CaptionDataModule", "split_held_out"]


def split_held_out(
    records: list[ImageRecord], fraction: float
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held out): the ``fraction`` of records whose content hashes lowest.

    Hashing content rather than drawing from an RNG keeps the split the same across runs,
    machines and worker counts, and mostly the same when images are added; rather than names,
    which hold the folder's absolute path, so moving or renaming the dataset keeps it too.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation_split must be in [0, 1), got {fraction}")
    if fraction == 0.0:
        return records, []
    count = min(max(1, round(fraction * len(records))), len(records) - 1)
    if count < 1:
        raise ValueError(f"validation_split needs at least 2 images, the source has {len(records)}")
    order = sorted(records, key=lambda r: (r.digest, r.caption))
    held = {id(r) for r in order[:count]}
    return [r for r in records if id(r) not in held], order[:count]


class CaptionDataModule(ImageDataModule):
    """Images with their own captions, from sidecar files, an imagefolder or a HF dataset.

    Args:
        source: where the images and captions come from: ``SidecarCaptions``,
            ``ImageFolder`` or ``HFDataset`` (a ``class_path`` with ``init_args`` in YAML).
        resolution: square side, or with bucketing the side of the buckets' pixel budget.
        center_crop: center instead of random square crops (bucketed images are always
            center-cropped).
        random_flip: random horizontal flips for training.
        bucketing: aspect-ratio buckets instead of square crops; every batch is one bucket.
        bucket_multiple: bucket sides are multiples of this (64 for SD models: VAE x UNet
            downsampling; 8 suits tiny test models).
        max_aspect_ratio: the most elongated bucket's long / short side.
        caption_dropout: probability of training a sample with an empty caption.
        shuffle_tags: shuffle comma-separated tags of each caption every time it is drawn.
        keep_tokens: with ``shuffle_tags``, this many leading tags stay in place.
        validation_split: fraction of images held out for validation (chosen by content hash,
            so the same on every run); 0 validates on nothing.
        repeats: how many times each training image appears per epoch.
        skip_bad_images: skip unusable images (corrupt, too small, uncaptioned) with a warning
            that counts them, instead of stopping with an error naming the first.
        loader: batch size, workers and seed: :class:`LoaderSettings`.
        cache: the latent / text-embedding cache, :class:`CacheSettings` (latents need
            ``center_crop`` or ``bucketing``; text embeddings need no tag shuffling).
        masked_loss: weigh each pixel's loss by the image's mask (``name.mask.png`` beside it,
            else its alpha channel; white trains, black is ignored), cropped and flipped with
            the image; images without either train in full.
    """

    def __init__(
        self,
        source: CaptionSource,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        bucketing: bool = False,
        bucket_multiple: int = 64,
        max_aspect_ratio: float = 2.0,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        validation_split: float = 0.0,
        repeats: int = 1,
        skip_bad_images: bool = False,
        masked_loss: bool = False,
        loader: LoaderSettings | None = None,
        cache: CacheSettings | None = None,
    ):
        super().__init__(loader, cache)
        check_positive(resolution=resolution, repeats=repeats)
        self.source = from_config(source, CaptionSource)
        check_fixed_crops(self.cache.latents, center_crop or bucketing)
        if self.cache.text_embeddings and shuffle_tags:
            raise ValueError("cache.text_embeddings cannot serve shuffled tags: choose one")
        self.captions = CaptionTransform(caption_dropout, shuffle_tags, keep_tokens)
        self.save_settings("source")

    def transform(self, train: bool) -> ImageTransform:
        h = self.hparams
        buckets = None
        if h.bucketing:
            buckets = make_buckets(h.resolution, h.bucket_multiple, h.max_aspect_ratio)
        return ImageTransform(
            h.resolution,
            center_crop=h.center_crop or not train,
            random_flip=h.random_flip and train,
            buckets=buckets,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        train = self.transform(train=True)
        records = scan_items(
            self.source.items(), train.check_size, h.skip_bad_images, self.source.describe()
        )
        train_records, held_out = split_held_out(records, h.validation_split)
        self.train_set = ImageCaptionDataset(
            train_records,
            train,
            self.captions,
            1.0,
            h.repeats,
            self.loader.seed,
            masks=h.masked_loss,
        )
        held_out_transform = self.transform(train=False)
        self.val_set = ImageCaptionDataset(held_out, held_out_transform, masks=h.masked_loss)

    def cached_datasets(self) -> dict[str, bool]:
        return {"train_set": True} | ({"val_set": False} if len(self.val_set) else {})

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None or len(self.val_set) == 0:
            return []
        return super().val_dataloader()
