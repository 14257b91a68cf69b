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

from lightning_sd.lora_io import LORA_WEIGHT_NAME, METADATA_KEY, LoRAFileError, read_safetensors

__all__ = [
    "check_architecture",
    "check_finite",
    "has_scale",
    "lora_file",
    "read_lora_file",
    "warn_if_no_scale",
]

_PICKLES = {".bin", ".pt", ".pth", ".ckpt", ".pkl"}
_FAMILY = {True: "SDXL-family (two text encoders)", False: "SD1.x/2.x (one text encoder)"}


def lora_file(path: str | Path) -> Path:
    """The weight file of a path (a folder means its ``pytorch_lora_weights.safetensors``)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
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
    return found


def check_architecture(
    tensors: dict, header: dict[str, str], path: str | Path, base: str, base_is_sdxl: bool
) -> None:
    """An SDXL LoRA on an SD1.x base (or the reverse) fails here, saying so."""
    facts = json.loads(header.get(METADATA_KEY, "{}"))
    trained_sdxl = None
    if facts.get("pipeline"):
        trained_sdxl = "XL" in facts["pipeline"]
    elif "text_encoder_2" in _components(tensors) or any(
        k.startswith("lora_te1_") for k in tensors
    ):
        trained_sdxl = True
    if trained_sdxl is not None and trained_sdxl != base_is_sdxl:
        raise LoRAFileError(
            f"{path} is a LoRA for an {_FAMILY[trained_sdxl]} base, but {base} is "
            f"{_FAMILY[base_is_sdxl]}: use a base of the family it was trained on"
        )


def read_lora_file(path: str | Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The file, its tensors and header, refused when unusable (pickle, missing, NaN)."""
    path = lora_file(path)
    tensors, header = read_safetensors(path)
    check_finite(tensors, path)
    return path, tensors, header
