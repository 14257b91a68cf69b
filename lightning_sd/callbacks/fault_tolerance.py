"""Make interruptions harmless: one run per folder, atomic checkpoints, SIGTERM, no NaN training.

This file is longer than most: it holds every fault of a run in one callback, so that a user
attaches one thing and each fault's handling reads next to the others.

- One run per folder: the run holds a lock on its checkpoint and log folders (a second run into
  them is refused, naming the folder and the other run), removes the temporary files a killed
  run left there, and a new run (no ``ckpt_path``) refuses a folder holding another run's
  ``last.ckpt``.
- Checkpoints are written through :class:`~lightning_sd.checkpoint_io.AtomicCheckpointIO`
  (installed on the strategy at setup, unless the strategy writes its own format, as
  DeepSpeed does).
- On SIGTERM (a cluster's pre-emption notice, ``kill``, Ctrl-\\ in some shells) Lightning stops
  after the current step; this callback then saves ``last.ckpt`` where ``ModelCheckpoint``
  keeps it, so ``--ckpt_path last`` continues from that very step.
- A non-finite loss stops the run before its backward pass with :class:`NonFiniteLossError`,
  which names the step, the value and the last *finite* checkpoint, instead of training on NaNs.
  Under DDP the ranks agree first, so none is left waiting in an all-reduce. A checkpoint's
  weights count as finite once a loss computed with them was finite: the checkpoint of step k
  is confirmed by step k's loss. A kept hard link to the last confirmed ``last.ckpt`` lets a
  NaN at step k put it back as ``last.ckpt`` (the unconfirmed one is moved to
  ``diverged-step=k.ckpt``), so ``--ckpt_path last`` with a lower learning rate works. Weights
  that are already non-finite when a checkpoint is built are never saved.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sd.atomic import atomic_path
from lightning_sd.checkpoint_io import AtomicCheckpointIO
from lightning_sd.run_dir import FolderLock, check_fresh_run, lock_folders

__all__ = ["EXIT_SIGTERM", "FaultTolerance", "NonFiniteLossError"]

# The exit status of a run stopped by SIGTERM after saving last.ckpt: 128 + 15, what a shell
# reports for a process SIGTERM ended, so a scheduler sees a pre-empted run, not a finished one.
EXIT_SIGTERM = 143


class NonFiniteLossError(RuntimeError):
    """The loss (or the weights) became NaN or infinite; the run stopped before using them."""


class FaultTolerance(Callback):
    """One run per folder, atomic checkpoints, a checkpoint on SIGTERM, a stop on NaN.

    Args:
        atomic_checkpoints: install ``AtomicCheckpointIO`` when the strategy uses Lightning's
            default ``TorchCheckpointIO``.
        checkpoint_on_sigterm: save ``last.ckpt`` when the run is stopped by SIGTERM.
        stop_on_non_finite_loss: raise :class:`NonFiniteLossError` on a NaN/inf loss, and
            refuse to save non-finite weights.
        exclusive_folders: lock the checkpoint and log folders for this run, and refuse a new
            run into a checkpoint folder that holds another run's ``last.ckpt``.
    """

    def __init__(
        self,
        atomic_checkpoints: bool = True,
        checkpoint_on_sigterm: bool = True,
        stop_on_non_finite_loss: bool = True,
        exclusive_folders: bool = True,
    ):
        self.atomic_checkpoints = atomic_checkpoints
        self.checkpoint_on_sigterm = checkpoint_on_sigterm
        self.stop_on_non_finite_loss = stop_on_non_finite_loss
        self.exclusive_folders = exclusive_folders
        self.sigterm_checkpoint: Path | None = None
        self._locks: list[FolderLock] = []
        self._saved_step: int | None = None  # the step of this run's newest last.ckpt
        self._confirmed_step: int | None = None  # ... whose weights gave a finite loss
        self._resumed_step: int | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        io = getattr(strategy, "_checkpoint_io", None)
        if self.atomic_checkpoints and (io is None or type(io) is TorchCheckpointIO):
            if "DeepSpeed" not in type(strategy).__name__:  # it writes folders itself
                strategy.checkpoint_io = AtomicCheckpointIO()
        if stage == "fit":
            self._saved_step = self._confirmed_step = self._resumed_step = None
            if self.exclusive_folders:
                self._lock_folders(trainer)

    # -- one run per folder -----------------------------------------------------------------
    def _lock_folders(self, trainer: Trainer) -> None:
        # trainer.log_dir broadcasts from rank 0: every rank asks. Without a logger or a
        # default_root_dir the log dir is the working directory: no lock file is left there.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        folders = [self.last_path(trainer).parent]
        if log_dir.resolve() != Path.cwd().resolve():
            folders.append(log_dir)
        self._locks = lock_folders(trainer, folders)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._resumed_step = trainer.global_step if trainer.ckpt_path else None
        if self.exclusive_folders and trainer.is_global_zero:
            check_fresh_run(self.last_path(trainer).parent, resuming=trainer.ckpt_path is not None)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def _release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    # -- non-finite loss and weights --------------------------------------------------------
    def on_before_backward(
        self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor
    ) -> None:
        if not self.stop_on_non_finite_loss:
            return
        finite = bool(torch.isfinite(loss.detach()).all())
        step = trainer.global_step
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            if self._saved_step == step and self._confirmed_step != step:
                self._confirm(trainer)
            return
        value = "finite here, not on another rank" if finite else loss.detach().float().item()
        where = self._recover(trainer) if trainer.is_global_zero else "see rank 0"
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (epoch {trainer.current_epoch}): {value}; the run "
            f"stopped before updating on it. {where}. Lower the learning rate, check the data, "
            "or use bf16-mixed instead of 16-mixed"
        )

    def on_save_checkpoint(
        self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict
    ) -> None:
        """Never store non-finite weights; checkpoints hold only trainable tensors, so it is
        cheap."""
        if not self.stop_on_non_finite_loss:
            return
        bad = [k for k, v in checkpoint.get("state_dict", {}).items() if not _finite(v)]
        if bad:
            raise NonFiniteLossError(
                f"the trainable weights are non-finite at step {trainer.global_step} "
                f"({len(bad)} tensors, e.g. {bad[:2]}): this checkpoint was not saved. "
                f"{self._last_finite(trainer)}. Lower the learning rate or check the data"
            )
        self._saved_step = trainer.global_step

    def _confirmed_path(self, trainer: Trainer) -> Path:
        last = self.last_path(trainer)
        return last.with_name(f".{last.name}.finite")

    def _confirm(self, trainer: Trainer) -> None:
        """Keep a hard link to ``last.ckpt``: a later save replaces the name, not this file."""
        self._confirmed_step = trainer.global_step
        if not trainer.is_global_zero or not self.last_path(trainer).is_file():
            return
        _link_or_copy(self.last_path(trainer), self._confirmed_path(trainer))

    def _recover(self, trainer: Trainer) -> str:
        """Put the last confirmed checkpoint back as ``last.ckpt``; describe it for the error."""
        step, last = trainer.global_step, self.last_path(trainer)
        if self._saved_step != step:  # last.ckpt is older than this step: its loss was finite
            if self._resumed_step == step:
                return (
                    f"The checkpoint this run resumed from ({trainer.ckpt_path}) gives this "
                    "loss at its first step: its weights diverged; resume from an earlier one"
                )
            return self._last_finite(trainer)
        if not last.is_file():
            return self._last_finite(trainer)
        diverged = last.with_name(f"diverged-step={step}.ckpt")
        os.replace(last, diverged)
        confirmed = self._confirmed_path(trainer)
        note = f"The checkpoint of step {step} holds the weights that gave it: moved to {diverged}"
        if self._confirmed_step is not None and confirmed.is_file():
            os.replace(confirmed, last)
            return f"Last finite checkpoint: {last} (step {self._confirmed_step}). {note}"
        return f"No finite checkpoint was saved yet. {note}"

    def _last_finite(self, trainer: Trainer) -> str:
        path = self._last_checkpoint(trainer)
        return f"Last finite checkpoint: {path}" if path else "No checkpoint was saved yet"

    # -- SIGTERM ----------------------------------------------------------------------------
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        try:
            if self.checkpoint_on_sigterm and isinstance(exception, SIGTERMException):
                if trainer.state.fn == "fit":
                    self._save_on_sigterm(trainer)
        finally:
            self._release()

    def _save_on_sigterm(self, trainer: Trainer) -> None:
        path = self.last_path(trainer)
        trainer.save_checkpoint(path)
        self.sigterm_checkpoint = path
        rank_zero_info(
            f"SIGTERM: checkpoint of step {trainer.global_step} saved to {path}; "
            f"resume with --ckpt_path last (exit status {EXIT_SIGTERM})"
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


def _finite(value) -> bool:
    return (
        not torch.is_tensor(value) or not value.is_floating_point() or bool(value.isfinite().all())
    )


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link (no bytes copied), or a copy where the filesystem has none; atomic."""
    import shutil

    with atomic_path(target, "checkpoint") as tmp:
        tmp.unlink()  # os.link makes the name itself
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
