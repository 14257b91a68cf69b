"""The frozen encoders as plain functions: VAE in and out, prompts to UNet conditioning.

Training, validation sampling, class-image generation and ``lightning-sd generate`` all call
these, so every path scales latents and applies clip skip the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "encode_prompts",
    "unet_fn",
    "vae_decode",
    "vae_encode",
    "vae_posterior",
    "vae_scale_factor",
]


def vae_scale_factor(vae: nn.Module) -> int:
    """How much the VAE downsamples (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def vae_posterior(vae: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) in scaled latent space: ``(z - shift) * scaling``.

    Latent caches store these two and draw ``mean + std * eps`` per step: the same
    distribution as encoding every step.
    """
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    shift = vae.config.shift_factor or 0.0
    scale = vae.config.scaling_factor
    return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()


def vae_encode(vae: nn.Module, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] to scaled latents: a draw from the posterior, or its mode."""
    mean, std = vae_posterior(vae, pixel_values)
    return mean + std * torch.randn_like(std) if sample else mean


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to images in [0, 1]."""
    shift = vae.config.shift_factor or 0.0
    z = latents / vae.config.scaling_factor + shift
    images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def encode_prompts(
    tokenizer, text_encoder: nn.Module, prompts: list[str], clip_skip: int = 0
) -> dict[str, torch.Tensor]:
    """Prompts to the UNet's conditioning keyword arguments (SD1.x: ``encoder_hidden_states``).

    Args:
        tokenizer: the pipeline's CLIP tokenizer.
        text_encoder: the pipeline's CLIP text model.
        prompts: the prompts, already free of placeholders.
        clip_skip: take the hidden state this many layers before the last, through the final
            layer norm, as diffusers' ``clip_skip`` does (0 = the last layer).
    """
    device = next(text_encoder.parameters()).device
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    out = text_encoder(ids, output_hidden_states=clip_skip > 0)
    if clip_skip == 0:
        return {"encoder_hidden_states": out.last_hidden_state}
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return {"encoder_hidden_states": final_norm(out.hidden_states[-(clip_skip + 1)])}


def unet_fn(unet: nn.Module) -> Callable[..., torch.Tensor]:
    """The UNet as objectives call it: ``model(x_in, t, **cond) -> output``."""

    def call(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return unet(x, t, **cond, return_dict=False)[0]

    return call
