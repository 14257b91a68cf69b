"""Aspect-ratio bucketing: train on whole images instead of square crops of them.

Buckets are (height, width) pairs of about ``resolution ** 2`` pixels with sides a multiple of
the VAE x UNet downsampling (64 for SD models), as in NovelAI's aspect-ratio bucketing. Every
batch comes from one bucket, so its tensors stack.

Under DDP the batch sampler shards whole batches: all ranks build the same list of batches
(same seed and epoch), pad it to a multiple of the world size by repeating its first batches,
and take every ``world_size``-th one. Ranks thus run the same number of steps (a rank that ran
out early would hang the others' all-reduce), each on whole single-bucket batches. Lightning
injects a ``DistributedSampler`` into every batch sampler's ``sampler`` argument when it runs
distributed (``use_distributed_sampler=True``, the default); this sampler reads the rank, world
size and epoch from it and ignores its index order. With ``use_distributed_sampler=False`` it
takes rank and world size from ``torch.distributed``.

Batches hold sample keys (``epoch * len + index``, see ``keys.py``), so each sample's random
draws are new every epoch yet fixed by (seed, epoch, index). :meth:`BucketBatchSampler.skip`
makes the next iteration over an epoch skip the batches a resumed run has already trained on
(``loader.ResumableDataLoader`` calls it when Lightning restores a mid-epoch checkpoint).

The epoch seeds the shuffle. Lightning sets it every epoch (also after a resume) through
``batch_sampler.sampler.set_epoch``, so without a ``DistributedSampler`` the ``sampler`` is a
small :class:`EpochTracker`; outside Lightning, call ``set_epoch`` yourself, as with PyTorch's
``DistributedSampler``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DistributedSampler, Sampler

from lightning_sd.data.keys import sample_key

__all__ = ["BucketBatchSampler", "EpochTracker", "make_buckets"]


def make_buckets(
    resolution: int, multiple: int = 64, max_aspect_ratio: float = 2.0
) -> list[tuple[int, int]]:
    """(height, width) buckets of at most ``resolution ** 2`` pixels, sides multiples of
    ``multiple``, aspect ratios up to ``max_aspect_ratio``; the square is always one.

    For each width up to ``resolution``, the height is the largest multiple that keeps the area
    within budget, so all buckets hold about the same number of pixels; each bucket's transpose
    is one too, so portrait and landscape images are treated alike.
    """
    if resolution % multiple:
        raise ValueError(f"resolution {resolution} is not a multiple of {multiple}")
    area = resolution * resolution
    buckets = set()
    for width in range(multiple, resolution + 1, multiple):
        height = area // width // multiple * multiple
        if height / width <= max_aspect_ratio:
            buckets.update({(height, width), (width, height)})
    return sorted(buckets, key=lambda b: b[1] / b[0])


class EpochTracker:
    """Holds the epoch Lightning sets, where no ``DistributedSampler`` does."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class BucketBatchSampler(BatchSampler):
    """Batches of dataset indices, each from one bucket; shuffled per epoch; DDP-sharded.

    Args:
        sampler: ``None`` (an :class:`EpochTracker` is made), or the ``DistributedSampler``
            Lightning injects under DDP (only its rank, world size and epoch are used).
        bucket_ids: the bucket of every dataset index.
        batch_size: indices per batch.
        drop_last: drop each bucket's last, short batch.
        shuffle: shuffle within buckets and the order of batches, anew each epoch.
        seed: seeds the shuffle (with the epoch), identically on every rank.
    """

    def __init__(
        self,
        sampler: Sampler | None,
        bucket_ids: Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
    ):
        self.sampler = sampler if sampler is not None else EpochTracker()
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.shuffle = shuffle
        self.seed = seed
        self._resume: tuple[int, int] | None = None

    def skip(self, epoch: int, batches: int) -> None:
        """Make the next iteration over ``epoch`` skip this rank's first ``batches`` batches."""
        self._resume = (epoch, batches)

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (Lightning does this through ``self.sampler``)."""
        self.sampler.set_epoch(epoch)

    def _world(self) -> tuple[int, int, int]:
        """(rank, world size, epoch)."""
        epoch = getattr(self.sampler, "epoch", 0)
        if isinstance(self.sampler, DistributedSampler):
            return self.sampler.rank, self.sampler.num_replicas, epoch
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size(), epoch
        return 0, 1, epoch

    def all_batches(self, epoch: int) -> list[list[int]]:
        """Every rank's batches of one epoch, before sharding."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        groups: dict[int, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.bucket_ids):
            groups[bucket].append(index)
        batches = []
        for bucket in sorted(groups):
            indices = groups[bucket]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=gen)]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen)]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        rank, world, epoch = self._world()
        batches = self.all_batches(epoch)
        if world > 1 and batches:
            pad = -len(batches) % world  # equal step counts on every rank
            batches = (batches + [batches[i % len(batches)] for i in range(pad)])[rank::world]
        if self._resume is not None and self._resume[0] == epoch:
            batches = batches[self._resume[1] :]
        self._resume = None
        length = len(self.bucket_ids)
        for batch in batches:
            yield [sample_key(epoch, index, length) for index in batch]

    def __len__(self) -> int:
        counts = defaultdict(int)
        for bucket in self.bucket_ids:
            counts[bucket] += 1
        rounding = math.floor if self.drop_last else math.ceil
        total = sum(rounding(n / self.batch_size) for n in counts.values())
        world = self._world()[1]
        return math.ceil(total / world)
