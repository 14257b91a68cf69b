"""Lightning callbacks, each independent of the others."""

from lightning_sd.callbacks.export import LoRAExport

__all__ = ["LoRAExport"]
