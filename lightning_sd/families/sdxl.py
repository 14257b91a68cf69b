"""SDXL (Playground v2.5 included): two CLIP encoders, pooled text and size/crop conditioning."""

from __future__ import annotations

import torch

from lightning_sd.encoding import add_time_ids, encode_prompts_sdxl, unet_conditioning
from lightning_sd.families.base import ModelFamily

__all__ = ["SDXL", "time_ids"]


def time_ids(image_size: tuple[int, int], batch: dict | None, batch_size: int) -> torch.Tensor:
    """SDXL's (B, 6) micro-conditioning (Podell et al. 2023, sec. 2.2): the data's original
    size, crop and target size when the batch has them (computed each step, never cached),
    else uncropped images of ``image_size``, as diffusers' pipeline does by default."""
    if batch is not None and "original_size" in batch:
        keys = ("original_size", "crop_top_left", "target_size")
        return add_time_ids(*(batch[k] for k in keys))
    sizes = torch.tensor(image_size).expand(batch_size, 2)
    return add_time_ids(sizes, torch.zeros_like(sizes), sizes)


class SDXL(ModelFamily):
    """SDXL and its derivatives (Playground v2.5: the same parts, an EDM schedule).

    Text: both encoders' penultimate states concatenated and the second's pooled projection;
    text encoder 1's last layer is unused. kohya prefixes ``lora_te1_`` / ``lora_te2_``.
    """

    pipeline_name = "StableDiffusionXLPipeline"
    description = "SDXL-family (two text encoders, a UNet)"
    text_encoder_classes = {
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    }
    kohya_prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

    def text_embeddings(
        self, tokenizers: dict, encoders: dict, prompts: list[str], clip_skip: int = 0
    ) -> dict[str, torch.Tensor]:
        names = ("text_encoder", "text_encoder_2")
        return encode_prompts_sdxl(
            [tokenizers[n] for n in names], [encoders[n] for n in names], prompts, clip_skip
        )

    def conditioning(
        self, text: dict, image_size: tuple[int, int], batch: dict | None = None
    ) -> dict:
        ids = time_ids(image_size, batch, len(text["text_embeds"]))
        return unet_conditioning(text, ids)

    def unused_last_layers(self, name: str, clip_skip: int) -> int:
        # Encoder 1 gives its penultimate state only; encoder 2's last layer feeds the pooled.
        return clip_skip + 1 if name == "text_encoder" else 0
