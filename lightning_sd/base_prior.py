"""Prior preservation without class images: the base model's own prediction is the target.

DreamBooth's prior loss (Ruiz et al. 2023) needs class images sampled from the base before
training. Here the frozen base itself (the same network with its adapters switched off) is the
teacher: for every training sample, the adapted network's output for the *class* prompt is
pulled towards the base's output for that prompt at the very same noisy latents and timestep,
so no images are generated or stored, and the prior is held exactly where training moves the
model. The cost is one more forward pass (the teacher's, without gradient) and a class-prompt
row in the adapted forward per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BasePrior", "adapters_disabled"]


@dataclass
class BasePrior:
    """Prior preservation against the base model's prediction on class prompts.

    Attributes:
        class_prompt: the class prompt (``a photo of a cat``); no class images are needed.
        weight: the prior term's weight, as DreamBooth's ``prior_loss_weight``.
    """

    class_prompt: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"BasePrior weight must be >= 0, got {self.weight}")


@contextmanager
def adapters_disabled(models: list[nn.Module]) -> Iterator[None]:
    """The base networks: every peft adapter layer of ``models`` switched off for the duration
    (peft's ``enable_adapters``; their trainable flags are restored with them)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("BasePrior needs adapters to switch off: the parts have none")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def with_base_prior(
    denoiser_fn: Callable[..., torch.Tensor],
    student_cond: dict,
    teacher_cond: dict,
    parts: list[nn.Module],
    losses: list[torch.Tensor],
) -> Callable[..., torch.Tensor]:
    """The network call, extended: it also runs the class prompt at the same noisy input.

    The objective calls the returned function once with the noisy latents and timesteps it
    drew; the instance rows and the class rows go through the adapted network in one batch,
    the class rows once more through the base (no gradient), and the per-sample mean squared
    difference of the two class-row outputs (in the network's output space) is appended to
    ``losses``.
    """

    def call(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        n = len(x)
        joint = _cat(cond, student_cond)
        out = denoiser_fn(torch.cat([x, x]), torch.cat([t, t]), **joint)
        with torch.no_grad(), adapters_disabled(parts):
            target = denoiser_fn(x, t, **teacher_cond)
        diff = (out[n:].float() - target.float()) ** 2
        losses.append(diff.mean(dim=tuple(range(1, diff.ndim))))
        return out[:n]

    return call


def _cat(a, b):
    """Two conditioning dicts stacked along the batch (SDXL's ``added_cond_kwargs`` nested)."""
    if isinstance(a, dict):
        return {k: _cat(v, b[k]) for k, v in a.items()}
    return torch.cat([a, b]) if isinstance(a, torch.Tensor) else a
