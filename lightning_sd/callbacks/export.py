"""Write the trained adapters as LoRA files when fitting ends."""

from __future__ import annotations

from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from lightning_sd.lora_io import save_diffusers_lora

__all__ = ["LoRAExport"]


class LoRAExport(Callback):
    """Save ``pytorch_lora_weights.safetensors`` (diffusers format) at the end of ``fit``.

    Args:
        dirpath: output folder; default ``<the run's log dir>/lora``, so runs never overwrite
            each other's files.
    """

    def __init__(self, dirpath: str | None = None):
        self.dirpath = dirpath
        self.written: Path | None = None

    def output_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "lora")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under DDP every rank holds the same adapters: one writes, all wait for the file.
        if trainer.is_global_zero:
            self.written = save_diffusers_lora(
                self.output_dir(trainer), pl_module.unet, pl_module.text_encoder
            )
            rank_zero_info(f"LoRA weights written to {self.written}")
        trainer.strategy.barrier("lora_export")
