"""``last.ckpt`` that always holds the run's last step, so "train N steps, then extend" works.

Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` when fit ends only if it
never saved one before: a 300-step run checkpointing every 250 steps ends with ``last.ckpt`` at
step 250, and extending it from ``--ckpt_path last`` silently redoes 50 steps.
"""

from __future__ import annotations

from lightning import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["LastCheckpoint"]


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is rewritten when fit ends, if it lags behind.

    Takes ``ModelCheckpoint``'s arguments. The end-of-fit checkpoint resumes exactly: see
    :func:`lightning_sd.resume.reopen_last_epoch`.
    """

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
