"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet conditioned on its hidden states."""

from __future__ import annotations

import torch

from lightning_sd.encoding import encode_prompts
from lightning_sd.families.base import ModelFamily

__all__ = ["SD1"]


class SD1(ModelFamily):
    """SD1.x/2.x: ``StableDiffusionPipeline``; clip skip through the final layer norm, as
    diffusers applies it; kohya prefixes ``lora_unet_`` / ``lora_te_``."""

    pipeline_name = "StableDiffusionPipeline"
    description = "SD1.x/2.x (one text encoder)"
    kohya_prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te_"}

    def pipeline_kwargs(self, index: dict) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def text_embeddings(
        self, tokenizers: dict, encoders: dict, prompts: list[str], clip_skip: int = 0
    ) -> dict[str, torch.Tensor]:
        return encode_prompts(
            tokenizers["text_encoder"], encoders["text_encoder"], prompts, clip_skip
        )

    def conditioning(
        self, text: dict, image_size: tuple[int, int], batch: dict | None = None
    ) -> dict:
        return {"encoder_hidden_states": text["encoder_hidden_states"]}
