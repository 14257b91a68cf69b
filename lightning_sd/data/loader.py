"""A DataLoader that Lightning can checkpoint mid-epoch and resume with the very next batch.

Lightning saves the ``state_dict`` of every training loader that has one, and hands it back
to ``load_state_dict`` when it resumes; a loader without them restarts its epoch from the
first batch, with a warning. The state here is just (epoch, batches trained): the
:class:`~lightning_sd.data.buckets.BucketBatchSampler` order is a function of the seed and the
epoch, so skipping that many batches lands on the batch an uninterrupted run would draw next.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import DataLoader

from lightning_sd.data.buckets import BucketBatchSampler

__all__ = ["ResumableDataLoader"]


class ResumableDataLoader(DataLoader):
    """``DataLoader`` over a ``BucketBatchSampler`` with Lightning's stateful-loader interface.

    Args:
        progress: returns (epoch, batches of that epoch trained so far); the DataModule reads
            them from its Trainer's loop. The loader cannot count them itself: workers and
            Lightning's prefetching draw batches before they are trained on.
        *args, **kwargs: ``DataLoader``'s; ``batch_sampler`` must be a ``BucketBatchSampler``.
    """

    def __init__(self, *args, progress: Callable[[], tuple[int, int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.batch_sampler, BucketBatchSampler):
            raise TypeError("ResumableDataLoader needs a BucketBatchSampler as batch_sampler")
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress() if self.progress is not None else (0, 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if 0 < state["batches"] < len(self.batch_sampler):  # mid-epoch
            self.batch_sampler.skip(state["epoch"], state["batches"])
