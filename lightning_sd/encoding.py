"""The frozen encoders as plain functions: VAE in and out, prompts to UNet conditioning.

Training, validation sampling, class-image generation and ``lightning-sd generate`` all call
these, so every path scales latents and applies clip skip the same way.

Conditioning comes in two steps. The prompt encoders return the *text embeddings*, a flat dict
that depends on the prompt only (SD1.x: ``encoder_hidden_states``; SDXL: also the pooled
``text_embeds``), which is what the text cache stores. ``unet_conditioning`` then adds what
depends on the image (SDXL's ``time_ids``) and shapes the UNet's keyword arguments.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "add_time_ids",
    "encode_prompts",
    "encode_prompts_sdxl",
    "unet_conditioning",
    "vae_decode",
    "vae_encode",
    "vae_posterior",
    "vae_scale_factor",
]


def vae_scale_factor(vae: nn.Module) -> int:
    """How much the VAE downsamples (8 for SD's VAE)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _latent_affine(vae: nn.Module, like: torch.Tensor) -> tuple[torch.Tensor | float, ...]:
    """(shift, scale) with scaled = (z - shift) * scale.

    SD/SDXL: a global ``scaling_factor`` (and ``shift_factor``); Playground v2.5's VAE
    normalises per channel, ``(z - latents_mean) * scaling_factor / latents_std``, as
    diffusers' SDXL pipeline and training scripts do.
    """
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1) + (1,) * (like.dim() - 2)
        mean = torch.tensor(mean, dtype=torch.float32, device=like.device).view(view)
        std = torch.tensor(std, dtype=torch.float32, device=like.device).view(view)
        return mean, config.scaling_factor / std
    return (config.shift_factor or 0.0), config.scaling_factor


def vae_posterior(vae: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's (mean, std) in scaled latent space: ``(z - shift) * scaling``.

    Latent caches store these two and draw ``mean + std * eps`` per step: the same
    distribution as encoding every step.
    """
    dist = vae.encode(pixel_values.to(vae.device, vae.dtype)).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    shift, scale = _latent_affine(vae, mean)
    return (mean - shift) * scale, std * scale


def vae_encode(vae: nn.Module, pixel_values: torch.Tensor, sample: bool = True) -> torch.Tensor:
    """Images in [-1, 1] to scaled latents: a draw from the posterior, or its mode."""
    mean, std = vae_posterior(vae, pixel_values)
    return mean + std * torch.randn_like(std) if sample else mean


def vae_decode(vae: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents to images in [0, 1]."""
    shift, scale = _latent_affine(vae, latents)
    z = latents.float() / scale + shift
    images = vae.decode(z.to(vae.dtype), return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


def token_ids(tokenizer, prompts: list[str], device: torch.device) -> torch.Tensor:
    """Prompts to (B, 77) token ids, padded and truncated as CLIP was trained."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


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
    ids = token_ids(tokenizer, prompts, next(text_encoder.parameters()).device)
    out = text_encoder(ids, output_hidden_states=clip_skip > 0)
    if clip_skip == 0:
        return {"encoder_hidden_states": out.last_hidden_state}
    final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return {"encoder_hidden_states": final_norm(out.hidden_states[-(clip_skip + 1)])}


def encode_prompts_sdxl(
    tokenizers: list, text_encoders: list[nn.Module], prompts: list[str], clip_skip: int = 0
) -> dict[str, torch.Tensor]:
    """SDXL's text embeddings: both encoders' penultimate states, concatenated, and the pooled
    projection of the second (Podell et al. 2023, sec. 2.1), as ``encode_prompt`` of
    diffusers' ``StableDiffusionXLPipeline`` computes them.

    Args:
        tokenizers: the two tokenizers (the second pads with ``!``).
        text_encoders: ``CLIPTextModel`` and ``CLIPTextModelWithProjection``.
        prompts: the prompts, already free of placeholders.
        clip_skip: layers skipped before the penultimate one (no final layer norm, as in
            diffusers; 0 = the penultimate layer).

    Returns:
        ``{"encoder_hidden_states": (B, 77, d1 + d2), "text_embeds": (B, proj)}``.
    """
    states = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, text_encoders, strict=True):
        ids = token_ids(tokenizer, prompts, next(encoder.parameters()).device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-(clip_skip + 2)])
        pooled = out[0]  # the last encoder's projected pooled output (text_embeds)
    return {"encoder_hidden_states": torch.cat(states, dim=-1), "text_embeds": pooled}


def add_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor
) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): per sample the six numbers
    (original h, w, crop top, left, target h, w), in the order diffusers'
    ``_get_add_time_ids`` lays them out.

    Args:
        original_size: (B, 2) heights and widths of the source images.
        crop_top_left: (B, 2) crop offsets (top, left).
        target_size: (B, 2) the trained or generated image sizes.

    Returns:
        (B, 6) float32.
    """
    parts = [torch.as_tensor(t).reshape(-1, 2) for t in (original_size, crop_top_left, target_size)]
    return torch.cat(parts, dim=1).float()


def unet_conditioning(text: dict, time_ids: torch.Tensor | None = None) -> dict:
    """Text embeddings (+ SDXL's time ids) to the UNet's keyword arguments.

    SD1.x: ``{"encoder_hidden_states"}``. SDXL (the text carries ``text_embeds``):
    ``{"encoder_hidden_states", "added_cond_kwargs": {"text_embeds", "time_ids"}}``.
    """
    cond = {"encoder_hidden_states": text["encoder_hidden_states"]}
    if "text_embeds" not in text:
        return cond
    if time_ids is None:
        raise ValueError("an SDXL UNet needs time_ids (original size, crop, target size)")
    pooled = text["text_embeds"]
    time_ids = time_ids.to(pooled.device, pooled.dtype)
    if len(time_ids) == 1 and len(pooled) > 1:
        time_ids = time_ids.expand(len(pooled), -1)
    cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
    return cond
