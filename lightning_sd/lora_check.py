"""Refuse LoRA files that would silently do the wrong thing, before any loader sees them.

A file with NaN weights samples black images and merges into NaN; a file without rank/alpha
metadata loads at scale 1 whatever it was trained with; a pickle (``.bin``) made diffusers
report a missing safetensors file; an SDXL file on an SD1.x base was told to configure more
adapters. Each case gets a sentence naming the file, here, for generate, merge and fit alike.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from lightning_sd.families.base import ModelFamily
from lightning_sd.lora_io import (
    KOHYA_WEIGHT_NAME,
    LORA_WEIGHT_NAME,
    METADATA_KEY,
    LoRAFileError,
    read_safetensors,
)

__all__ = [
    "check_architecture",
    "check_finite",
    "has_scale",
    "lora_file",
    "read_lora_file",
    "warn_if_no_scale",
]

_PICKLES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}


def lora_file(path: str | Path) -> Path:
    """The weight file of a path (a folder means its ``pytorch_lora_weights.safetensors``, or
    its ``lora_kohya.safetensors`` when it has only that)."""
    path = Path(path)
    if path.is_dir():
        # LoHa/LoKr export folders hold the kohya/LyCORIS file only.
        only_kohya = (
            not (path / LORA_WEIGHT_NAME).is_file() and (path / KOHYA_WEIGHT_NAME).is_file()
        )
        path = path / (KOHYA_WEIGHT_NAME if only_kohya else LORA_WEIGHT_NAME)
    if path.suffix in _PICKLES:
        raise LoRAFileError(
            f"{path} is a PyTorch pickle ({path.suffix}); only .safetensors LoRA files are read "
            '(a pickle can run code when loaded). Convert it once: python -c "import torch, '
            f"safetensors.torch as s; s.save_file(torch.load('{path}', weights_only=True), "
            f"'{path.with_suffix('.safetensors')}')\""
        )
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    return path


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """NaN or inf in a LoRA file: it was saved from a diverged run."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise LoRAFileError(
            f"{path}: {len(bad)} of {len(tensors)} tensors hold NaN or inf (e.g. {bad[:2]}): the "
            "file was saved from a diverged run and would give black images or NaN weights. "
            "Export it again from an earlier checkpoint (lightning-sd convert-checkpoint)"
        )


def has_scale(tensors: dict, header: dict[str, str]) -> bool:
    """Whether the file says its alpha: diffusers' adapter metadata or kohya ``.alpha`` tensors."""
    return "lora_adapter_metadata" in header or any(k.endswith(".alpha") for k in tensors)


def warn_if_no_scale(tensors: dict, header: dict[str, str], path: str | Path) -> None:
    if not has_scale(tensors, header):
        warnings.warn(
            f"{path} has no rank/alpha metadata: it is loaded with alpha = rank (scale 1). If "
            "it was trained with another alpha it applies at the wrong strength",
            stacklevel=3,
        )


def _components(tensors: dict) -> set[str]:
    found = set()
    for key in tensors:
        if key.startswith("text_encoder_2.") or key.startswith("lora_te2_"):
            found.add("text_encoder_2")
        elif key.startswith(("text_encoder.", "lora_te_", "lora_te1_")):
            found.add("text_encoder")
        elif key.startswith(("unet.", "lora_unet_")):
            found.add("unet")
        elif key.startswith(("transformer.", "lora_transformer_")):
            found.add("transformer")
    return found


def _trained_pipeline(tensors: dict, header: dict[str, str]) -> str | None:
    """The pipeline class a file was trained for: its header's word, else what its keys
    imply (a UNet-only file fits SD1.x and SDXL alike: None)."""
    facts = json.loads(header.get(METADATA_KEY, "{}"))
    if facts.get("pipeline"):
        return facts["pipeline"]
    found = _components(tensors)
    if "transformer" in found:
        return "StableDiffusion3Pipeline"
    if "unet" in found and (
        "text_encoder_2" in found or any(k.startswith("lora_te1_") for k in tensors)
    ):
        return "StableDiffusionXLPipeline"
    return None


def check_architecture(
    tensors: dict, header: dict[str, str], path: str | Path, base: str, family: ModelFamily
) -> None:
    """A LoRA for another family than the base's (SDXL on SD1.x, SD1.x on SD3 ...) fails
    here, saying so."""
    from lightning_sd.families import family_from_index

    trained = _trained_pipeline(tensors, header)
    if trained is not None and trained != family.pipeline_name:
        other = family_from_index({"_class_name": trained})
        raise LoRAFileError(
            f"{path} is a LoRA for an {other.description} base, but {base} is "
            f"{family.description}: use a base of the family it was trained on"
        )


def read_lora_file(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The file, its tensors and header, refused when unusable (pickle, missing, NaN)."""
    path = lora_file(path)
    tensors, header = read_safetensors(path)
    check_finite(tensors, path)
    return path, tensors, header
