"""Image metrics on samples of fixed prompts and seeds: CLIP score, FID/KID, DreamBooth fidelity."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_sd.data.images import list_images
from lightning_sd.metrics.base import ImageMetric
from lightning_sd.metrics.images import load_image_folder
from lightning_sd.metrics.samples import generate_grid, undisturbed
from lightning_sd.sampling_spec import SamplingSpec

__all__ = ["Evaluation"]


class Evaluation(Callback):
    """Generate every prompt with every seed, and log each metric's values as ``<prefix><name>``.

    Metric networks load in ``setup``, on the trainer's device, before any training or
    validation step, so missing weights stop a run at once with a message that says how to
    provide them, never hours in. They live on this callback, not on the LightningModule: no
    strategy casts or shards them, and checkpoints do not hold them. Evaluation runs on global
    rank 0 only (no collective call: other ranks never wait for it), restores train/eval flags
    and RNG states (training continues bit-identically), and skips the sanity check.

    Where values go: during ``fit``, straight to every logger at the current global step; at
    the end of a validation epoch (also ``lightning-sd validate``), through ``self.log`` so
    ``trainer.validate`` returns them. ``last_metrics`` holds the latest values.

    Args:
        metrics: metric families from ``lightning_sd.metrics`` (``CLIPMetrics``,
            ``FrechetDistance``, ``DINOSimilarity``); class_path entries in YAML.
        sampling: the prompts and seeds to sample (images = prompts x seeds) and how.
        reference_dir: folder of real images for FID/KID, CLIP-I and DINO; default the
            DataModule's ``instance_data_dir`` (the DreamBooth subject).
        every_n_steps: optimizer steps between evaluations during fit; None for none.
        before_training: evaluate when training starts (the baseline).
        after_training: evaluate when training ends.
        at_validation: evaluate at the end of every validation epoch (not the sanity check).
        prefix: prepended to every metric name.
    """

    def __init__(
        self,
        metrics: list[ImageMetric],
        sampling: SamplingSpec,
        reference_dir: str | None = None,
        every_n_steps: int | None = None,
        before_training: bool = False,
        after_training: bool = True,
        at_validation: bool = False,
        prefix: str = "eval/",
    ):
        self.metrics = list(metrics)
        self.sampling = sampling
        self.reference_dir = reference_dir
        self.every_n_steps = every_n_steps
        self.before_training = before_training
        self.after_training = after_training
        self.at_validation = at_validation
        self.prefix = prefix
        self.last_metrics: dict[str, float] = {}
        self._references: Path | None = None
        self._reference_side: int | None = None
        self._last_step: int | None = None

    # -- start-up: everything that can fail, fails here ---------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate") or not trainer.is_global_zero:
            return
        if stage == "validate" and not self.at_validation:
            return
        spec = self.sampling
        for metric in self.metrics:
            if spec.size < metric.min_images:
                raise ValueError(
                    f"{type(metric).__name__} needs at least {metric.min_images} images; "
                    f"{len(spec.prompts)} prompts x {len(spec.seeds)} seeds give {spec.size}"
                )
        self._references = self._find_references(trainer)
        for metric in self.metrics:
            metric.load(trainer.strategy.root_device)
        self._reference_side = None

    def _find_references(self, trainer: Trainer) -> Path | None:
        needing = [type(m).__name__ for m in self.metrics if m.needs_reference]
        folder = self.reference_dir
        if folder is None:
            data = getattr(trainer, "datamodule", None)
            folder = getattr(getattr(data, "hparams", None), "instance_data_dir", None)
        if folder is None:
            if needing:
                raise ValueError(
                    f"{', '.join(needing)} compare with real images: set the Evaluation "
                    "callback's reference_dir (no DataModule instance_data_dir to default to)"
                )
            return None
        list_images(folder)  # a missing or empty folder fails now, with its path
        return Path(folder)

    # -- events ---------------------------------------------------------------------------------
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.before_training:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.every_n_steps
        if n and trainer.global_step > 0 and trainer.global_step % n == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # on_train_end, not on_fit_end: by then the loggers are closed and the model moved off
        # the device.
        if self.after_training:
            self.evaluate(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.at_validation and not trainer.sanity_checking:
            self.evaluate(trainer, pl_module, in_validation=True)

    # -- work -----------------------------------------------------------------------------------
    def evaluate(
        self, trainer: Trainer, pl_module: LightningModule, in_validation: bool = False
    ) -> dict[str, float] | None:
        """Sample, measure and log, once per global step during fit; rank 0 only."""
        fitting = trainer.state.fn == "fit"
        if not trainer.is_global_zero or (fitting and trainer.global_step == self._last_step):
            return None
        self._last_step = trainer.global_step if fitting else None
        prompts = self.sampling.image_prompts()
        with undisturbed(pl_module):
            images = generate_grid(trainer, pl_module, self.sampling)
            self._set_references(images.shape[-1])
            values: dict[str, float] = {}
            for metric in self.metrics:
                values.update(metric(images, prompts))
        named = {self.prefix + k: v for k, v in values.items()}
        self.last_metrics = named
        if in_validation:
            pl_module.log_dict(named, rank_zero_only=True)
        else:
            for logger in trainer.loggers:
                logger.log_metrics(named, step=trainer.global_step)
            trainer.callback_metrics.update({k: torch.tensor(v) for k, v in named.items()})
        text = ", ".join(f"{k} {v:.4g}" for k, v in named.items())
        rank_zero_info(f"{f'step {trainer.global_step}' if fitting else trainer.state.fn}: {text}")
        return named

    def _set_references(self, side: int) -> None:
        """Reference features, once: the references are brought to the generated size first."""
        if self._references is None or side == self._reference_side:
            return
        references = load_image_folder(self._references, side)
        for metric in self.metrics:
            metric.set_reference(references)
        self._reference_side = side
