"""lightning_sd: LoRA and DoRA fine-tuning of Stable Diffusion-family models with Lightning."""

from lightning_sd._version import __version__
from lightning_sd.adapters import AdapterConfig
from lightning_sd.callbacks import LoRAExport
from lightning_sd.components import Components, load_components
from lightning_sd.data import CaptionDataModule, DreamBoothDataModule
from lightning_sd.lora_io import save_diffusers_lora
from lightning_sd.module import StableDiffusionLoRA
from lightning_sd.tiny import build_tiny_pipeline

__all__ = [
    "__version__",
    "AdapterConfig",
    "Components",
    "CaptionDataModule",
    "DreamBoothDataModule",
    "LoRAExport",
    "StableDiffusionLoRA",
    "build_tiny_pipeline",
    "load_components",
    "save_diffusers_lora",
]
