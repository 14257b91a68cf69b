"""lightning_sd: LoRA and DoRA fine-tuning of Stable Diffusion-family models with Lightning."""

from lightning_sd.console import quiet_known_noise

quiet_known_noise()  # before the imports below pull in the libraries that make the noise

from lightning_sd._version import __version__  # noqa: E402
from lightning_sd.adapters import AdapterConfig  # noqa: E402
from lightning_sd.callbacks import LoRAExport  # noqa: E402
from lightning_sd.components import Components, load_components  # noqa: E402
from lightning_sd.data import CaptionDataModule, DreamBoothDataModule  # noqa: E402
from lightning_sd.lora_io import save_diffusers_lora  # noqa: E402
from lightning_sd.module import StableDiffusionLoRA  # noqa: E402
from lightning_sd.tiny import build_tiny_pipeline  # noqa: E402

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
