"""Make interruptions harmless: atomic checkpoints, a checkpoint on SIGTERM, no NaN training.

- Checkpoints are written through :class:`~lightning_sd.checkpoint_io.AtomicCheckpointIO`
  (installed on the strategy at setup, unless the strategy writes its own format, as
  DeepSpeed does).
- On SIGTERM (a cluster's pre-emption notice, ``kill``, Ctrl-\\ in some shells) Lightning stops
  after the current step; this callback then saves ``last.ckpt`` where ``ModelCheckpoint``
  keeps it, so ``--ckpt_path last`` continues from that very step.
- A non-finite loss stops the run before its backward pass with :class:`NonFiniteLossError`,
  which names the step, the value and the last checkpoint to resume from, instead of
  training on NaNs. Under DDP the ranks agree first, so none is left waiting in an all-reduce.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sd.checkpoint_io import AtomicCheckpointIO

__all__ = ["FaultTolerance", "NonFiniteLossError"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before updating on it."""


class FaultTolerance(Callback):
    """Atomic checkpoints, a checkpoint on SIGTERM, and a stop on a non-finite loss.

    Args:
        atomic_checkpoints: install ``AtomicCheckpointIO`` when the strategy uses Lightning's
            default ``TorchCheckpointIO``.
        checkpoint_on_sigterm: save ``last.ckpt`` when the run is stopped by SIGTERM.
        stop_on_non_finite_loss: raise :class:`NonFiniteLossError` on a NaN/inf loss.
    """

    def __init__(
        self,
        atomic_checkpoints: bool = True,
        checkpoint_on_sigterm: bool = True,
        stop_on_non_finite_loss: bool = True,
    ):
        self.atomic_checkpoints = atomic_checkpoints
        self.checkpoint_on_sigterm = checkpoint_on_sigterm
        self.stop_on_non_finite_loss = stop_on_non_finite_loss
        self.sigterm_checkpoint: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        io = getattr(strategy, "_checkpoint_io", None)
        if self.atomic_checkpoints and (io is None or type(io) is TorchCheckpointIO):
            if "DeepSpeed" not in type(strategy).__name__:  # it writes folders itself
                strategy.checkpoint_io = AtomicCheckpointIO()

    # -- non-finite loss --------------------------------------------------------------------
    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if not self.stop_on_non_finite_loss:
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        value = "finite here, not on another rank" if finite else loss.detach().float().item()
        raise NonFiniteLossError(
            f"non-finite loss at step {trainer.global_step} (epoch {trainer.current_epoch}): "
            f"{value}; the run stopped before updating on it. Last good checkpoint: "
            f"{self._last_checkpoint(trainer) or 'none saved yet'}. Lower the learning rate, "
            "check the data, or use bf16-mixed instead of 16-mixed"
        )

    # -- SIGTERM ----------------------------------------------------------------------------
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        if not (self.checkpoint_on_sigterm and isinstance(exception, SIGTERMException)):
            return
        if trainer.state.fn != "fit":
            return
        path = self.last_path(trainer)
        trainer.save_checkpoint(path)
        self.sigterm_checkpoint = path
        rank_zero_info(
            f"SIGTERM: checkpoint of step {trainer.global_step} saved to {path}; "
            "resume with --ckpt_path last"
        )

    @staticmethod
    def last_path(trainer: Trainer) -> Path:
        """Where ``ModelCheckpoint`` keeps ``last.ckpt`` (what ``ckpt_path="last"`` finds)."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
            return Path(callback.dirpath) / name
        root = trainer.log_dir or trainer.default_root_dir
        return Path(root) / "checkpoints" / "last.ckpt"

    @staticmethod
    def _last_checkpoint(trainer: Trainer) -> str | None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint):
            return callback.last_model_path or callback.best_model_path or None
        return None
