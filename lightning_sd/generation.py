"""Text to image through an objective's denoiser: what validation grids and ``generate`` share."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_sd.encoding import (
    add_time_ids,
    unet_conditioning,
    unet_fn,
    vae_decode,
    vae_scale_factor,
)
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
    unet: nn.Module,
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
        objective: gives the denoiser D(x; sigma) for the parameterization the UNet predicts.
        unet: the (adapted) UNet.
        vae: decodes the latents.
        encode: prompts -> text embeddings (``encoder_hidden_states``, and SDXL's pooled
            ``text_embeds``); SDXL's time ids are added here for the generated size, uncropped,
            as diffusers' SDXL pipeline does by default.
        prompts: one prompt per image.
        seeds: one seed per image.
        steps: sampler steps over Karras sigmas of the checkpoint's sigma range.
        guidance_scale: classifier-free guidance weight (1 disables it).
        negative_prompt: the unconditional prompt of guidance.
        resolution: image side; default the UNet's native sample size.
        sampler: ``Euler``, ``Heun`` or ``DPMPP2M`` (default).

    Returns:
        Images in [0, 1], shape (N, 3, H, W).
    """
    if len(prompts) != len(seeds):
        raise ValueError(
            f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds"
        )
    factor = vae_scale_factor(vae)
    side = (resolution or unet.config.sample_size * factor) // factor
    device = next(unet.parameters()).device
    noise = seeded_noise((unet.config.in_channels, side, side), seeds, device)
    size = torch.tensor([side * factor, side * factor])
    time_ids = add_time_ids(size, torch.zeros(2, dtype=torch.long), size)

    def conditioning(texts: list[str]) -> dict:
        return unet_conditioning(encode(texts), time_ids)

    uncond = conditioning([negative_prompt] * len(prompts)) if guidance_scale != 1 else None
    latents = sample(
        objective,
        unet_fn(unet),
        noise,
        cond=conditioning(prompts),
        uncond=uncond,
        guidance_scale=guidance_scale,
        steps=steps,
        sampler=sampler,
    )
    return vae_decode(vae, latents)
