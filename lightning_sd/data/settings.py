"""The settings every image DataModule shares, documented once: how batches are drawn, and the
latent / text-embedding cache. In YAML they are groups of the DataModule's ``init_args``::

    loader: {batch_size: 4, num_workers: 4, seed: 0}
    cache: {latents: true, text_embeddings: true, dir: runs/cache}
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CacheSettings", "LoaderSettings"]


@dataclass
class LoaderSettings:
    """How batches are drawn.

    Attributes:
        batch_size: samples per batch (per device); DreamBooth adds as many class samples.
        num_workers: DataLoader worker processes.
        seed: seeds the shuffle and every sample's crop, flip and caption draws (with the
            epoch and index), so a resumed run draws what an uninterrupted one would.
    """

    batch_size: int = 1
    num_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        # Said here, not deep in a DataLoader traceback.
        if self.batch_size < 1:
            raise ValueError(f"data batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"data num_workers must be >= 0, got {self.num_workers}")


@dataclass
class CacheSettings:
    """The latent / text-embedding cache (``data/cache_store.py``): entries are content-keyed, so one
    folder serves every run and dataset safely.

    Attributes:
        latents: encode each image once with the VAE and train from the stored posterior
            (needs a fixed crop per image; with ``random_flip`` the mirror is cached too).
        text_embeddings: encode each prompt once (needs a frozen text encoder and no tag
            shuffling; caption dropout is fine, the empty caption is cached too).
        dir: the cache folder; default ``~/.cache/lightning_sd``.
    """

    latents: bool = False
    text_embeddings: bool = False
    dir: str | None = None

    @property
    def enabled(self) -> bool:
        return self.latents or self.text_embeddings
