"""Text to image through an objective's denoiser: what validation grids and ``generate`` share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_sd.encoding import vae_decode, vae_scale_factor
from lightning_sd.families import ModelFamily
from lightning_sd.objectives import DiffusionObjective
from lightning_sd.sampling import Sampler, sample

__all__ = ["generate_images", "seeded_noise"]


def seeded_noise(shape: tuple[int, ...], seeds: list[int], device=None) -> torch.Tensor:
    """One unit-Gaussian draw per seed from its own CPU generator: the same picture for the
    same seed on any device and batch size, and the global RNG untouched."""
    draws = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(draws).to(device)


@torch.no_grad()
def generate_images(
    objective: DiffusionObjective,
    family: ModelFamily,
    denoiser: nn.Module,
    vae: nn.Module,
    encode: Callable[[list[str]], dict[str, torch.Tensor]],
    prompts: list[str],
    seeds: list[int],
    steps: int = 20,
    guidance_scale: float = 5.0,
    negative_prompt: str = "",
    resolution: int | None = None,
    sampler: Sampler | None = None,
) -> torch.Tensor:
    """Sample one image per (prompt, seed) pair.

    Args:
        objective: gives the denoiser D(x; sigma) for the parameterization the network predicts.
        family: conditions and calls the network (SDXL's time ids are added here for the
            generated size, uncropped, as diffusers' SDXL pipeline does by default).
        denoiser: the (adapted) UNet or transformer.
        vae: decodes the latents.
        encode: prompts -> text embeddings: the family's encoder, as training uses it.
        prompts: one prompt per image.
        seeds: one seed per image.
        steps: sampler steps over Karras sigmas of the checkpoint's sigma range.
        guidance_scale: classifier-free guidance weight (1 disables it).
        negative_prompt: the unconditional prompt of guidance.
        resolution: image side; default the denoiser's native sample size.
        sampler: ``Euler``, ``Heun`` or ``DPMPP2M`` (default).

    Returns:
        Images in [0, 1], shape (N, 3, H, W).
    """
    if len(prompts) != len(seeds):
        raise ValueError(
            f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds"
        )
    factor = vae_scale_factor(vae)
    side = (resolution or denoiser.config.sample_size * factor) // factor
    device = next(denoiser.parameters()).device
    noise = seeded_noise((denoiser.config.in_channels, side, side), seeds, device)

    def conditioning(texts: list[str]) -> dict:
        return family.conditioning(encode(texts), (side * factor, side * factor))

    uncond = conditioning([negative_prompt] * len(prompts)) if guidance_scale != 1 else None
    latents = sample(
        objective,
        family.denoiser_fn(denoiser),
        noise,
        cond=conditioning(prompts),
        uncond=uncond,
        guidance_scale=guidance_scale,
        steps=steps,
        sampler=sampler,
    )
    return vae_decode(vae, latents)
