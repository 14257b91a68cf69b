"""Stable Diffusion 3 / 3.5: an MMDiT transformer, two CLIP encoders and an optional T5."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lightning_sd.encoding import token_ids
from lightning_sd.families.base import ModelFamily

__all__ = ["SD3"]


class SD3(ModelFamily):
    """SD3, SD3.5 Medium and Large (Esser et al. 2024), as ``StableDiffusion3Pipeline`` runs them.

    Text: both CLIP encoders' penultimate states (concatenated, zero-padded to the
    transformer's joint width) followed by T5's states, and the two pooled projections
    concatenated. Without T5 its part is zeros, as diffusers does. The text cache stores the
    CLIP and T5 states apart, so a run without T5 caches no zeros.

    Args:
        t5: load and use the T5 encoder; ``False`` saves its memory (diffusers allows it; the
            prompt then reaches the transformer through the CLIP encoders only).
        max_sequence_length: T5 tokens per prompt. The SD3 DreamBooth script trains with 77,
            the pipeline samples with 256; the LoRA file records the value so ``generate``
            samples with the one the model was trained with.
    """

    pipeline_name = "StableDiffusion3Pipeline"
    description = "SD3 (MMDiT transformer, two CLIP encoders and T5)"
    denoiser_name = "transformer"
    denoiser_class = ("diffusers", "SD3Transformer2DModel")
    text_encoder_classes = {
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
    }
    optional_parts = ("text_encoder_3",)
    # The names ComfyUI's LoRA loader maps for SD3 (comfy/lora.py, model_lora_keys_unet/clip).
    kohya_prefixes = {
        "transformer": "lora_transformer_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    embedding_keys = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}

    def __init__(self, t5: bool = True, max_sequence_length: int = 77) -> None:
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.t5 = t5
        self.max_sequence_length = max_sequence_length

    def __repr__(self) -> str:
        return f"SD3(t5={self.t5}, max_sequence_length={self.max_sequence_length})"

    def skipped_parts(self) -> tuple[str, ...]:
        return () if self.t5 else ("text_encoder_3",)

    def text_embeddings(
        self, tokenizers: dict, encoders: dict, prompts: list[str], clip_skip: int = 0
    ) -> dict[str, torch.Tensor]:
        states, pooled = [], []
        for name in ("text_encoder", "text_encoder_2"):
            encoder = encoders[name]
            ids = token_ids(tokenizers[name], prompts, next(encoder.parameters()).device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])  # text_embeds: the projected pooled output
            states.append(out.hidden_states[-(clip_skip + 2)])
        text = {
            "clip_hidden_states": torch.cat(states, dim=-1),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }
        t5 = encoders.get("text_encoder_3") if self.t5 else None
        if t5 is not None:
            ids = tokenizers["text_encoder_3"](
                list(prompts), padding="max_length", max_length=self.max_sequence_length,
                truncation=True, add_special_tokens=True, return_tensors="pt",
            ).input_ids.to(next(t5.parameters()).device)  # fmt: skip
            text["t5_hidden_states"] = t5(ids)[0]
        return text

    def conditioning(
        self, text: dict, image_size: tuple[int, int], batch: dict | None = None
    ) -> dict:
        return dict(text)  # no micro-conditioning; the sequence is assembled at the call

    def denoiser_fn(self, denoiser: nn.Module) -> Callable[..., torch.Tensor]:
        width = denoiser.config.joint_attention_dim
        length = self.max_sequence_length

        def call(
            x: torch.Tensor,
            t: torch.Tensor,
            clip_hidden_states: torch.Tensor,
            pooled_projections: torch.Tensor,
            t5_hidden_states: torch.Tensor | None = None,
        ) -> torch.Tensor:
            clip = nn.functional.pad(clip_hidden_states, (0, width - clip_hidden_states.shape[-1]))
            if t5_hidden_states is None:  # what diffusers feeds without T5
                t5_hidden_states = clip.new_zeros(len(clip), length, width)
            states = torch.cat([clip, t5_hidden_states.to(clip.dtype)], dim=-2)
            return denoiser(
                hidden_states=x, timestep=t, encoder_hidden_states=states,
                pooled_projections=pooled_projections, return_dict=False,
            )[0]  # fmt: skip

        return call

    def unused_last_layers(self, name: str, clip_skip: int) -> int:
        return 0  # both CLIP encoders' last layers feed the pooled projections
