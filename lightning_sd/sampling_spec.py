"""What to sample: a grid of prompts x seeds and the sampler settings, in one typed value.

``ValidationSampling``, ``Evaluation`` and ``lightning-sd generate`` all sample a
:class:`SamplingSpec` through :func:`sample_grid`, so the same weights and spec give the same
images in a training grid, a metric and a generated file. Plain Python over the samplers: no
Lightning import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_sd.sampling import Sampler

__all__ = ["SampleFn", "SamplingSpec", "sample_grid"]

# (prompts, seeds, steps=, guidance_scale=, negative_prompt=, resolution=, sampler=) -> images:
# one image per (prompt, seed) pair, as ``StableDiffusionLoRA.generate`` samples them.
SampleFn = Callable[..., torch.Tensor]


@dataclass
class SamplingSpec:
    """Prompts x seeds and how to sample them.

    Args:
        prompts: one grid row each.
        seeds: one grid column each (the initial noise of every row).
        negative_prompt: the unconditional prompt of guidance; one for all, or one per prompt.
        steps: sampler steps over Karras sigmas of the checkpoint's range.
        guidance_scale: classifier-free guidance weight (1 disables it).
        sampler: a ``lightning_sd.sampling.Sampler`` (class_path in YAML); default DPM++ 2M.
        resolution: image side; default the denoiser's native size.
    """

    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    negative_prompt: list[str] | str = ""
    steps: int = 20
    guidance_scale: float = 5.0
    sampler: Sampler | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        self.prompts, self.seeds = list(self.prompts), list(self.seeds)
        if not self.prompts or not self.seeds:
            raise ValueError(
                f"need at least one prompt and one seed, got {len(self.prompts)} prompts and "
                f"{len(self.seeds)} seeds"
            )
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        _ = self.negative_prompts  # a list of the wrong length fails here, at construction

    @property
    def negative_prompts(self) -> list[str]:
        """One negative prompt per prompt: a single string is shared, a list must match."""
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        if len(self.negative_prompt) != len(self.prompts):
            raise ValueError(
                f"{len(self.negative_prompt)} negative prompts for {len(self.prompts)} prompts: "
                "give one, or one per prompt"
            )
        return list(self.negative_prompt)

    @property
    def size(self) -> int:
        """Images in the grid: prompts x seeds."""
        return len(self.prompts) * len(self.seeds)

    def image_prompts(self) -> list[str]:
        """The prompt of each image, row-major (prompt i, seed j)."""
        return [p for p in self.prompts for _ in self.seeds]


def sample_grid(spec: SamplingSpec, sample: SampleFn) -> torch.Tensor:
    """Images (len(prompts) * len(seeds), 3, H, W) in [0, 1], row-major: prompt i, seed j.

    Each row is one batch (``len(seeds)`` images), whoever samples, so kernels see the same
    batch shape and the callbacks and ``generate`` give bit-equal images.
    """
    rows = [
        sample(
            [prompt] * len(spec.seeds),
            spec.seeds,
            steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            negative_prompt=negative,
            resolution=spec.resolution,
            sampler=spec.sampler,
        ).float()
        for prompt, negative in zip(spec.prompts, spec.negative_prompts, strict=True)
    ]
    return torch.cat(rows)
