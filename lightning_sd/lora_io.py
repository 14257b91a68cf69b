"""Adapter weights to and from disk in the diffusers LoRA format, written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["LORA_WEIGHT_NAME", "adapter_state_dict", "save_diffusers_lora"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def adapter_state_dict(model: torch.nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's weights under diffusers' LoRA key names (``lora_A`` -> ``lora.down`` ...)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    peft_sd = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return convert_state_dict_to_diffusers(peft_sd)


def save_diffusers_lora(
    out_dir: str | Path,
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights`` reads.

    The adapter metadata (rank, alpha, targets, DoRA) goes into the file: without it the
    loader assumes alpha == rank and reloads at the wrong scale. The file is staged in the
    same folder and renamed into place, so a crash never leaves a truncated file behind.

    Returns:
        The path of the written file.
    """
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {"unet_lora_layers": adapter_state_dict(unet, adapter_name)}
    metadata = {"unet_lora_adapter_metadata": unet.peft_config[adapter_name].to_dict()}
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        layers["text_encoder_lora_layers"] = adapter_state_dict(text_encoder, adapter_name)
        metadata["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config[
            adapter_name
        ].to_dict()
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging:
        StableDiffusionPipeline.save_lora_weights(
            staging, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **layers, **metadata
        )
        target = out_dir / LORA_WEIGHT_NAME
        os.replace(Path(staging) / LORA_WEIGHT_NAME, target)
    return target
