"""Diffusion training objectives as composable parts (see docs/objectives.md).

A :class:`DiffusionObjective` combines a :class:`Parameterization` (what the network predicts),
a :class:`SigmaSampler` (which noise levels it trains on), a :class:`Weighting` (how each noise
level counts), a :class:`Distance` (how an output error counts) and the checkpoint's
:class:`DiscreteSchedule`.
"""

from lightning_sd.objectives.distance import Distance, Huber, SmoothL1, SquaredError
from lightning_sd.objectives.flow import FlowMatching, FlowSchedule, FlowTimesteps, SD3Weighting
from lightning_sd.objectives.noise import PyramidNoise
from lightning_sd.objectives.objective import DiffusionObjective, Model
from lightning_sd.objectives.parameterization import (
    EDM,
    Epsilon,
    Parameterization,
    Sample,
    Scalings,
    VPrediction,
)
from lightning_sd.objectives.schedule import DiscreteSchedule, EDMSchedule
from lightning_sd.objectives.sigma_sampling import (
    DiscreteLogitNormal,
    DiscreteUniform,
    LogNormal,
    SigmaSampler,
    TimestepBias,
)
from lightning_sd.objectives.weighting import (
    Canonical,
    DebiasedEstimation,
    EDMWeighting,
    MinSNR,
    Weighting,
)

__all__ = [
    "FlowMatching",
    "FlowSchedule",
    "FlowTimesteps",
    "SD3Weighting",
    "EDM",
    "Canonical",
    "DebiasedEstimation",
    "Distance",
    "Huber",
    "PyramidNoise",
    "SmoothL1",
    "SquaredError",
    "TimestepBias",
    "DiffusionObjective",
    "DiscreteLogitNormal",
    "DiscreteSchedule",
    "DiscreteUniform",
    "EDMSchedule",
    "EDMWeighting",
    "Epsilon",
    "LogNormal",
    "MinSNR",
    "Model",
    "Parameterization",
    "Sample",
    "Scalings",
    "SigmaSampler",
    "VPrediction",
    "Weighting",
]
