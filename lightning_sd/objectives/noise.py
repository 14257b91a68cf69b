"""Structured training noise: multi-resolution (pyramid) noise.

Whitaker 2023 ("Multi-Resolution Noise for Diffusion Model Training", a W&B report) adds
upsampled low-resolution noise to the i.i.d. Gaussian, so that training also destroys the
coarse structure of an image, which plain noise leaves almost intact at moderate sigma. The
formula is kohya sd-scripts' ``pyramid_noise_like``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PyramidNoise"]


class PyramidNoise:
    """Multi-resolution noise, as kohya's ``pyramid_noise_like(noise, iterations, discount)``.

    For i = 0 .. iterations - 1, with r_i ~ U[2, 4): add ``discount**i`` times Gaussian noise
    of size (H / r_i^i, W / r_i^i) (at least 1x1; i = 0 is full size), bilinearly upsampled to
    (H, W); stop after a level reaches one pixel. The sum is divided by its standard deviation
    over the whole batch, so the noise keeps roughly unit variance.

    Args:
        iterations: Number of levels; kohya's ``--multires_noise_iterations`` (6-10 usual).
        discount: Weight ratio between levels; kohya's ``--multires_noise_discount`` (0.3-0.8;
            higher keeps more low-frequency noise).
    """

    def __init__(self, iterations: int = 6, discount: float = 0.4) -> None:
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not 0 < discount <= 1:
            raise ValueError(f"discount must be in (0, 1], got {discount}")
        self.iterations = iterations
        self.discount = discount

    def __call__(self, noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``noise`` (B, C, H, W) with the coarser levels added, renormalised; not in place."""
        b, c, h, w = noise.shape
        device = generator.device if generator is not None else noise.device
        out = noise.clone()
        for i in range(self.iterations):
            r = float(torch.rand((), generator=generator, device=device)) * 2 + 2
            hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
            level = torch.randn((b, c, hn, wn), generator=generator, device=device)
            level = F.interpolate(level.to(noise), size=(h, w), mode="bilinear")
            out = out + level * self.discount**i
            if hn == 1 or wn == 1:
                break
        return out / out.std()

    def __repr__(self) -> str:
        return f"PyramidNoise(iterations={self.iterations}, discount={self.discount})"
