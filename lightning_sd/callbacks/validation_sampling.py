"""Sample grids for fixed prompts and seeds during training: to every logger and to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from lightning_sd.grid import image_grid, save_image_atomic
from lightning_sd.metrics.samples import generate_grid, undisturbed
from lightning_sd.sampling_spec import SamplingSpec

__all__ = ["ValidationSampling", "log_grid"]


def log_grid(
    loggers: list[Logger], grid: Image.Image, key: str, step: int, caption: str
) -> list[str]:
    """Send a grid to each logger that can hold images; return the names of those that cannot.

    TensorBoard gets ``add_image``, Weights & Biases ``log_image``; CSVLogger and others store
    numbers only, and the grid on disk stands in for them.
    """
    skipped = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, np.asarray(grid), step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], step=step, caption=[caption])
        else:
            skipped.append(type(logger).__name__)
    return skipped


class ValidationSampling(Callback):
    """Every ``every_n_steps`` optimizer steps (and once before training, the baseline), sample
    each prompt with each seed and save one captioned grid: a row per prompt, a column per seed.

    The grid goes to ``<dirpath>/step_<global step>.png`` (atomically) and to every logger that
    takes images, under ``samples``. Sampling runs on global rank 0 only and performs no
    collective call, so other ranks go on and never wait for it. It changes nothing in the
    training run: modules' train/eval flags and the torch, CUDA, numpy and Python RNG states are
    restored afterwards, and the noise of each sample comes from its own seed.

    Args:
        sampling: the prompts (one grid row each), seeds (one column each) and sampler settings.
        every_n_steps: optimizer steps between grids; None for none during training.
        before_training: also sample when training starts (step 0 of a new run), the baseline.
        cell_size: side of each grid cell in pixels (nearest upscaling keeps tiny samples
            visible); default the image side.
        dirpath: grid folder; default ``<the run's log dir>/samples``.
    """

    def __init__(
        self,
        sampling: SamplingSpec,
        every_n_steps: int | None = 500,
        before_training: bool = True,
        cell_size: int | None = None,
        dirpath: str | None = None,
    ):
        self.sampling = sampling
        self.every_n_steps = every_n_steps
        self.before_training = before_training
        self.cell_size = cell_size
        self.dirpath = dirpath
        self.written: list[Path] = []
        self._dir: Path | None = None
        self._last_step: int | None = None
        self._noted = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # On every rank: Trainer.log_dir broadcasts from rank 0, a collective that rank 0 alone
        # must never enter (the other ranks would pair it with their next DDP call and hang).
        log_dir = trainer.log_dir or trainer.default_root_dir
        self._dir = Path(self.dirpath) if self.dirpath else Path(log_dir) / "samples"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.before_training:
            self.sample(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self.sample(trainer, pl_module)

    def sample(self, trainer: Trainer, pl_module: LightningModule) -> Path | None:
        """Write and log the grid of the current step (once per step, on rank 0)."""
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return None
        self._last_step = step
        with undisturbed(pl_module):
            images = generate_grid(trainer, pl_module, self.sampling)
        spec = self.sampling
        grid = image_grid(
            images,
            ncols=len(spec.seeds),
            row_labels=spec.prompts,
            col_labels=[f"seed {s}" for s in spec.seeds],
            cell=self.cell_size,
        )
        path = save_image_atomic(grid, self._dir / f"step_{step:06d}.png")
        self.written.append(path)
        caption = f"step {step}: rows " + " | ".join(spec.prompts)
        skipped = log_grid(trainer.loggers, grid, "samples", step, caption)
        if skipped and not self._noted:
            rank_zero_info(
                f"{', '.join(skipped)} cannot store images: sample grids are in {path.parent}"
            )
            self._noted = True
        return path
