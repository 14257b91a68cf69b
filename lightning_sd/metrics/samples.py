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

from lightning_sd.sampling import Sampler

__all__ = ["generate_grid", "per_prompt", "undisturbed"]


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


def generate_grid(
    trainer: Trainer,
    pl_module: LightningModule,
    prompts: list[str],
    seeds: list[int],
    negative_prompts: list[str],
    steps: int,
    guidance_scale: float,
    resolution: int | None,
    sampler: Sampler | None,
) -> torch.Tensor:
    """Images (len(prompts) * len(seeds), 3, H, W) in [0, 1], row-major: prompt i, seed j.

    Runs in the trainer's precision context (autocast under mixed precision), as training does.
    The caller holds ``undisturbed``.
    """
    rows = []
    with trainer.precision_plugin.forward_context():
        for prompt, negative in zip(prompts, negative_prompts, strict=True):
            rows.append(
                pl_module.generate(
                    [prompt] * len(seeds),
                    seeds,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    negative_prompt=negative,
                    resolution=resolution,
                    sampler=sampler,
                ).float()
            )
    return torch.cat(rows)


def per_prompt(negative_prompt: str | list[str], prompts: list[str]) -> list[str]:
    """One negative prompt per prompt: a single string is shared, a list must match."""
    if isinstance(negative_prompt, str):
        return [negative_prompt] * len(prompts)
    if len(negative_prompt) != len(prompts):
        raise ValueError(
            f"{len(negative_prompt)} negative prompts for {len(prompts)} prompts: give one, "
            "or one per prompt"
        )
    return list(negative_prompt)
