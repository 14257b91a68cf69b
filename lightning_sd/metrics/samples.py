"""The images grids and metrics measure: prompts x seeds, sampled without disturbing training.

Both the sampling and the evaluation callback sample through here (neither depends on the
other), so "the same weights, prompts and seeds give the same images" holds for both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng

from lightning_sd.sampling_spec import SamplingSpec, sample_grid

__all__ = ["generate_grid", "undisturbed"]


@contextmanager
def undisturbed(pl_module: LightningModule) -> Iterator[None]:
    """Eval mode and no grad inside; every module's train/eval flag and the torch (CPU and
    CUDA), numpy and Python RNG states restored on exit, so training continues bit-identically.
    """
    modes = [(module, module.training) for module in pl_module.modules()]
    pl_module.eval()
    try:
        with isolate_rng(), torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def generate_grid(trainer: Trainer, pl_module: LightningModule, spec: SamplingSpec) -> torch.Tensor:
    """The spec's grid (``sample_grid``) from the module, in the trainer's precision context
    (autocast under mixed precision), as training runs. The caller holds ``undisturbed``.
    """
    with trainer.precision_plugin.forward_context():
        return sample_grid(spec, pl_module.generate)
