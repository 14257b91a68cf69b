"""Sample keys: which sample, in which epoch, and the random draws that belong to it.

Training batch samplers yield ``epoch * len(dataset) + index`` rather than a bare index, and a
sample's random crop, flip, caption dropout and latent draw come from a generator seeded by
that key. Data randomness is then a pure function of (seed, epoch, index): the same whatever
the number of workers, the prefetching, or an interruption, which is what lets a resumed run
continue exactly where it stopped. Plain indices (``epoch`` 0) work too, e.g. for validation.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["sample_generator", "sample_key", "split_key"]


def sample_key(epoch: int, index: int, length: int) -> int:
    """The key of dataset ``index`` in ``epoch`` for a dataset of ``length`` samples."""
    return epoch * length + index


def split_key(key: int, length: int) -> tuple[int, int]:
    """(epoch, index) of a key."""
    return divmod(int(key), length)


def sample_generator(seed: int, key: int) -> torch.Generator:
    """A generator for one sample's draws, seeded by a hash of (seed, key).

    Hashing decorrelates neighbouring keys, whose plain seeds would differ by one.
    """
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
