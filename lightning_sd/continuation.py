"""Continuing a run from the checkpoint that ``fit`` wrote when it reached ``max_steps``.

"Train N steps, then extend to M" is the most common resume of all. Lightning (2.6) writes
that ``last.ckpt`` in ``on_train_end``, after the fit loop has closed the epoch it stopped in,
even mid-epoch: restored, the run starts a new epoch and keeps the old epoch's batch counters,
so from its second step on it trains on other batches than an uninterrupted run (checked:
10 steps, extended to 12, differ from step 12). A checkpoint written after a training batch
(every N steps, on SIGTERM) has no such problem, so an end-of-fit checkpoint is rewritten,
as it is loaded, into exactly the state a checkpoint after its last batch would hold.

Extending the step count also changes schedules that are a function of the total (cosine,
linear, polynomial decay, the pivotal-token stop step): that is inexact by nature, and said
once at resume.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["reopen_last_epoch", "schedule_changed_warning"]


def _settled(progress: dict[str, Any]) -> bool:
    """Every counter of a progress tracker's total agrees: nothing was in flight."""
    total = progress["total"]
    return len({total[k] for k in ("ready", "started", "processed", "completed")}) == 1


def reopen_last_epoch(checkpoint: dict[str, Any]) -> bool:
    """Rewrite an end-of-fit checkpoint's loop state into its after-the-last-batch form.

    Lightning then resumes it as it resumes any mid-run checkpoint: in the same epoch,
    after the same batch, or at the next epoch when that batch was the epoch's last. Returns
    whether the checkpoint was of that shape (other checkpoints are left as they are).
    """
    loop = checkpoint.get("loops", {}).get("fit_loop")
    if not loop or "epoch_progress" not in loop:
        return False
    epochs, batches = loop["epoch_progress"], loop["epoch_loop.batch_progress"]
    if not (_settled(epochs) and _settled(batches)) or batches["total"]["completed"] == 0:
        return False
    for part in ("total", "current"):
        epochs[part]["processed"] -= 1  # the epoch is started, not yet processed/completed
        epochs[part]["completed"] -= 1
        batches[part]["completed"] -= 1  # the last batch is processed; its end hook pending
    checkpoint["epoch"] -= 1
    return True


def schedule_changed_warning(saved_total: int | None, total: int, schedule: str) -> None:
    """Warn once when a resumed run's step total changes a total-dependent LR schedule."""
    if saved_total is None or saved_total == total or schedule == "constant":
        return
    rank_zero_warn(
        f"resuming a run planned for {saved_total} optimizer steps with {total}: the "
        f"{schedule!r} learning-rate schedule (and any pivotal-token stop step) is a function "
        "of the total, so from here on the learning rates differ from those of a run planned "
        f"for {total} from the start. Use lr_scheduler: constant to extend runs exactly"
    )
