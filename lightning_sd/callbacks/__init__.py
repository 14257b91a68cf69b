"""Lightning callbacks, each independent of the others."""

from lightning_sd.callbacks.ema import AdapterEMA
from lightning_sd.callbacks.evaluation import Evaluation
from lightning_sd.callbacks.export import LoRAExport
from lightning_sd.callbacks.fault_tolerance import FaultTolerance, NonFiniteLossError
from lightning_sd.callbacks.last_checkpoint import LastCheckpoint
from lightning_sd.callbacks.progress import StepProgressBar
from lightning_sd.callbacks.validation_sampling import ValidationSampling

__all__ = [
    "AdapterEMA",
    "Evaluation",
    "FaultTolerance",
    "LastCheckpoint",
    "LoRAExport",
    "NonFiniteLossError",
    "StepProgressBar",
    "ValidationSampling",
]
