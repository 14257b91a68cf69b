"""One progress bar over the run's optimizer steps.

Runs here are planned in steps (``max_steps``), and a DreamBooth epoch is a couple of batches:
Lightning's per-epoch bar restarts every second and its rich variant shows ``Epoch 149/-2``
(``max_epochs`` is -1 in step-based runs). This bar counts ``global_step`` up to ``max_steps``,
starting where a resumed run starts, with the epoch beside it.
"""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` whose training bar runs over steps, not epochs, when ``max_steps``
    is set; otherwise it is Lightning's bar unchanged.

    Args:
        refresh_rate: update the bar every this many steps.
    """

    def __init__(self, refresh_rate: int = 1):
        super().__init__(refresh_rate=refresh_rate)

    @staticmethod
    def _step_based(trainer: Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._step_based(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.n = bar.initial = trainer.global_step
            bar.set_description("Training steps")
            bar.refresh()

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if not self._step_based(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if not self._step_based(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and self._should_update(step, bar.total) and not bar.disable:
            bar.n = step
            bar.set_postfix(
                {"epoch": trainer.current_epoch, **self.get_metrics(trainer, pl_module)}
            )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._step_based(trainer):
            super().on_train_epoch_end(trainer, pl_module)
