"""DreamBooth data (Ruiz et al. 2023): instance photos of a subject, and class images that
preserve the prior, each sample weighted by its own ``loss_weight``.

Instance and class samples are drawn in pairs, as in the paper and diffusers' script: item i is
(instance i mod N_instance, class i mod N_class), and a batch of B items holds B of each. A few
instance photos then still meet every class image once per epoch, and no batch is all prior.
The module never splits the batch by position: each sample's loss is weighted by its
``loss_weight`` (1 or ``prior_loss_weight``) and the batch mean is taken, which is the paper's
L_instance + lambda L_prior up to a constant factor 1/2.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset, default_collate

from lightning_sd.data.dataset import ImageCaptionDataset
from lightning_sd.data.images import list_images
from lightning_sd.data.keys import sample_key, split_key
from lightning_sd.data.records import FileRef, SourceItem, scan_items
from lightning_sd.data.transforms import ImageTransform

__all__ = ["InstanceDataset", "PriorPreservationDataset", "collate_pairs"]


class InstanceDataset(ImageCaptionDataset):
    """Every image of a folder with one prompt, each sample carrying its loss weight.

    The images are decoded once, up front: a bad file should stop the run before training
    starts, not in a worker an hour in (or be skipped and counted, with ``skip_bad_images``).

    Args:
        folder: the image folder.
        prompt: the prompt of every image (instance or class prompt).
        transform: resize / crop / flip.
        repeats: how many times each image appears per epoch.
        loss_weight: every sample's loss weight.
        skip_bad_images: skip unusable images with a warning instead of raising.
        seed: seeds the per-sample crop and flip draws (with the sample key).
        max_images: serve only the first this many usable images (a class folder may hold
            more than a run asked for); None serves all.
    """

    def __init__(
        self,
        folder: str | Path,
        prompt: str,
        transform: ImageTransform,
        repeats: int = 1,
        loss_weight: float = 1.0,
        skip_bad_images: bool = False,
        seed: int = 0,
        max_images: int | None = None,
    ):
        items = [SourceItem(str(p), FileRef(p), prompt) for p in list_images(folder)]
        records = scan_items(items, transform.check_size, skip_bad_images, str(folder))
        records = records[:max_images]
        super().__init__(records, transform, loss_weight=loss_weight, repeats=repeats, seed=seed)
        self.prompt = prompt


class PriorPreservationDataset(Dataset):
    """Pairs (instance sample, class sample); ``collate_pairs`` flattens them into one batch.

    Args:
        instance: the instance set (loss weight 1).
        prior: the class set (loss weight ``prior_loss_weight``).
    """

    def __init__(self, instance: ImageCaptionDataset, prior: ImageCaptionDataset):
        self.instance = instance
        self.prior = prior

    def __len__(self) -> int:
        return max(len(self.instance), len(self.prior))

    def __getitem__(self, key: int) -> tuple[dict, dict]:
        epoch, index = split_key(key, len(self))
        return (
            self.instance[sample_key(epoch, index % len(self.instance), len(self.instance))],
            self.prior[sample_key(epoch, index % len(self.prior), len(self.prior))],
        )


def collate_pairs(pairs: list[tuple[dict, dict]]) -> dict:
    """B (instance, class) pairs -> one batch of 2B samples: the instance half, then the class."""
    return default_collate([p[0] for p in pairs] + [p[1] for p in pairs])
