"""What the image DataModules share: dataloaders and the hookup to the latent cache.

The cache is filled in the dataloader hooks rather than in ``setup``: Lightning calls ``setup``
before ``configure_model`` and before the strategy moves the model to its device, while by the
time it asks for dataloaders the module is built and on the accelerator, and every rank is
there to share the encoding.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lightning_sd.data.buckets import BucketBatchSampler
from lightning_sd.data.cache_fill import CacheStats, fill_cache
from lightning_sd.data.cache_store import LatentCache
from lightning_sd.data.loader import ResumableDataLoader
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.serialization import from_config, to_config

if TYPE_CHECKING:
    from lightning_sd.module import StableDiffusionLoRA

__all__ = ["ImageDataModule", "default_cache_dir"]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/lightning_sd`` (``~/.cache/lightning_sd``): entries are content-keyed,
    so one folder serves every run and dataset safely."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "lightning_sd"


def check_positive(**values: int) -> None:
    """Sizes and counts must be >= 1: say which one, here, not deep in a DataLoader traceback."""
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"data {name} must be >= 1, got {value}")


class ImageDataModule(LightningDataModule):
    """Base of the image DataModules; subclasses build ``train_set`` and ``val_set`` in setup.

    It owns the settings they share: ``loader`` (batch size, workers, the seed of every draw)
    and ``cache`` (latents, text embeddings, folder). Subclasses take them as constructor
    arguments, pass them here, and call :meth:`save_settings` instead of
    ``save_hyperparameters``.

    Training batches come from a :class:`BucketBatchSampler` (one bucket unless the data is
    bucketed): its order is a function of (seed, epoch) and it yields sample keys, so the data
    never draws from the global RNG. A run resumed mid-epoch skips the batches it already
    trained on, and continues with the very batches an uninterrupted run would see.
    """

    def __init__(
        self, loader: LoaderSettings | None = None, cache: CacheSettings | None = None
    ) -> None:
        super().__init__()
        self.loader: LoaderSettings = from_config(loader, LoaderSettings | None) or LoaderSettings()
        self.cache: CacheSettings = from_config(cache, CacheSettings | None) or CacheSettings()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.cache_stats: CacheStats | None = None

    def save_settings(self, *parts: str) -> None:
        """``save_hyperparameters`` for the subclass's ``__init__`` (its caller), with the
        loader, the cache and the named constructor ``parts`` stored in their YAML form:
        checkpoints hold plain data."""
        names = ["loader", "cache", *parts]
        self.save_hyperparameters(ignore=names, frame=inspect.currentframe().f_back)
        self.hparams.update({name: to_config(getattr(self, name)) for name in names})

    # -- cache ------------------------------------------------------------------------------
    @property
    def caching(self) -> bool:
        return self.cache.enabled

    def cached_datasets(self) -> dict[str, bool]:
        """Attribute name -> draw latents from the posterior, for every dataset the cache serves."""
        raise NotImplementedError

    def _assemble(self) -> None:
        """Rebuild what wraps the served datasets (DreamBooth's pairs); called after filling."""

    def fill_cache(self, module: StableDiffusionLoRA) -> CacheStats | None:
        """Encode what the cache lacks with ``module`` and serve the datasets from it.

        Runs once; the dataloader hooks call it with the trainer's module, and it may be
        called directly (after ``setup``) to use the DataModule without a Trainer.
        """
        if not self.caching or self.cache_stats is not None:
            return self.cache_stats
        rank, world, barrier = 0, 1, (lambda: None)
        if self.trainer is not None:
            strategy = self.trainer.strategy
            rank, world = self.trainer.global_rank, self.trainer.world_size
            barrier = lambda: strategy.barrier("lightning_sd_cache")  # noqa: E731
        module.configure_model()  # idempotent; a no-op under a Trainer
        served = self.cached_datasets()
        datasets = [(getattr(self, name), sample) for name, sample in served.items()]
        self.cache_stats, views = fill_cache(
            datasets,
            module,
            LatentCache(self.cache.dir or default_cache_dir()),
            latents=self.cache.latents,
            text=self.cache.text_embeddings,
            batch_size=max(self.loader.batch_size, 8),
            rank=rank,
            world_size=world,
            barrier=barrier,
        )
        # Cached copies replace the datasets; the ones setup built are left as they were.
        for name, (dataset, _), view in zip(served, datasets, views, strict=True):
            setattr(self, name, dataset.served_from(view))
        self._assemble()
        return self.cache_stats

    def _fill_cache_from_trainer(self) -> None:
        if self.caching and self.trainer is not None:
            self.fill_cache(self.trainer.lightning_module)

    # -- loaders ----------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, loader_class: type = DataLoader, **kwargs) -> DataLoader:
        settings = self.loader
        if "batch_sampler" not in kwargs:
            kwargs.update(batch_size=settings.batch_size, shuffle=False, drop_last=False)
        return loader_class(
            dataset,
            num_workers=settings.num_workers,
            persistent_workers=settings.num_workers > 0,
            # Its own generator: creating an iterator then draws nothing from the global RNG.
            generator=torch.Generator().manual_seed(settings.seed),
            **kwargs,
        )

    def _progress(self) -> tuple[int, int]:
        """(epoch, batches of it trained): what a checkpoint needs to resume mid-epoch."""
        if self.trainer is None:
            return (0, 0)
        loop = self.trainer.fit_loop
        # The epoch these batches belong to: ``current_epoch`` has already moved on when fit
        # ends at max_steps, since Lightning closes the epoch it stopped in.
        epoch = max(loop.epoch_progress.current.started - 1, 0)
        return (epoch, loop.epoch_loop.batch_progress.current.processed)

    def _train_loader(self, **kwargs) -> DataLoader:
        dataset, settings = self.train_set, self.loader
        buckets = dataset.bucket_ids() if hasattr(dataset, "bucket_ids") else [0] * len(dataset)
        sampler = BucketBatchSampler(None, buckets, settings.batch_size, False, True, settings.seed)
        return self._loader(
            dataset, batch_sampler=sampler, loader_class=ResumableDataLoader,
            progress=self._progress, **kwargs
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        self._fill_cache_from_trainer()
        return self._train_loader()

    def val_dataloader(self) -> DataLoader:
        self._fill_cache_from_trainer()
        return self._loader(self.val_set)
