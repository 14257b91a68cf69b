"""lightning_sd: LoRA and DoRA fine-tuning of Stable Diffusion-family models with Lightning.

Names resolve lazily: ``import lightning_sd.objectives`` (or ``.sampling``) in a paper's code
loads PyTorch and the objective, not Lightning, the data stack or the callbacks.
"""

from __future__ import annotations

import importlib

from lightning_sd._version import __version__
from lightning_sd.console import quiet_known_noise

quiet_known_noise()  # before anything imports the libraries that make the noise

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the system and its parts
    "StableDiffusionLoRA": "lightning_sd.module",
    "AdapterConfig": "lightning_sd.adapters",
    "PivotalTuning": "lightning_sd.pivotal",
    "Components": "lightning_sd.components",
    "load_components": "lightning_sd.components",
    # objectives and sampling, plain PyTorch
    "DiffusionObjective": "lightning_sd.objectives",
    "Euler": "lightning_sd.sampling",
    "Heun": "lightning_sd.sampling",
    "DPMPP2M": "lightning_sd.sampling",
    "SamplingSpec": "lightning_sd.sampling_spec",
    # data
    "DreamBoothDataModule": "lightning_sd.data",
    "CaptionDataModule": "lightning_sd.data",
    "LoaderSettings": "lightning_sd.data.settings",
    "CacheSettings": "lightning_sd.data.settings",
    # callbacks
    "LoRAExport": "lightning_sd.callbacks",
    "AdapterEMA": "lightning_sd.callbacks",
    "ValidationSampling": "lightning_sd.callbacks",
    "Evaluation": "lightning_sd.callbacks",
    "FaultTolerance": "lightning_sd.callbacks",
    "LastCheckpoint": "lightning_sd.callbacks",
    "StepProgressBar": "lightning_sd.callbacks",
    # LoRA files, sampling from them, combining them
    "save_diffusers_lora": "lightning_sd.lora_io",
    "load_lora_into": "lightning_sd.lora_io",
    "generate": "lightning_sd.generate",
    "merge_loras": "lightning_sd.merge",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lightning_sd' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolve once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
