"""Optimizers as configs, and learning-rate schedules per parameter group.

An optimizer is a callable from parameter groups to a ``torch.optim.Optimizer``: a class, a
``functools.partial`` of one, or what LightningCLI makes of ``class_path``/``init_args`` YAML
(also a partial). It is stored in checkpoints in that YAML form, so any optimizer class by
import path works, e.g.::

    optimizer:
      class_path: bitsandbytes.optim.AdamW8bit   # pip install lightning-sd[bnb]
      init_args: {weight_decay: 1.0e-2}

``serialization.to_config``/``from_config`` store and rebuild it like every other part.
Every group carries its own ``lr`` (UNet, text encoders, pivotal tokens), which overrides the
optimizer's ``lr`` argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch

__all__ = [
    "LRSchedule",
    "OptimizerFactory",
    "build_optimizer",
    "lr_lambda",
]

LRSchedule = Literal["constant", "linear", "cosine", "polynomial"]
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]

DEFAULT_WEIGHT_DECAY = 1e-2


def build_optimizer(
    factory: OptimizerFactory | None, groups: list[dict], cpu_offload: bool = False
) -> torch.optim.Optimizer:
    """The optimizer over ``groups``; ``None`` picks the default for where the states live.

    The default is AdamW with weight decay 1e-2: fused (one kernel for all tensors) when every
    parameter is on a device with a fused kernel, and DeepSpeed's ``DeepSpeedCPUAdam`` when
    DeepSpeed offloads the optimizer to the CPU (its C++ AdamW; torch's would be far slower).
    """
    if factory is not None:
        return factory(groups)
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, weight_decay=DEFAULT_WEIGHT_DECAY, adamw_mode=True)
    devices = {p.device.type for g in groups for p in g["params"]}
    fused = bool(devices) and devices <= {"cuda", "cpu"}
    return torch.optim.AdamW(groups, weight_decay=DEFAULT_WEIGHT_DECAY, fused=fused)


def lr_lambda(
    schedule: LRSchedule,
    warmup_steps: int,
    total_steps: int,
    stop_step: int | None = None,
    power: float = 1.0,
) -> Callable[[int], float]:
    """The multiplier of a group's learning rate at each optimizer step.

    Args:
        schedule: shape after the linear warm-up: ``constant``, ``linear`` decay to 0,
            half-period ``cosine`` decay to 0 (Loshchilov & Hutter 2017), or ``polynomial``
            decay ``(1 - progress) ** power`` to 0.
        warmup_steps: linear warm-up from 0.
        total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).
        stop_step: from this step on the multiplier is 0: how pivotal-tuning embeddings stop
            training without flipping ``requires_grad`` mid-run.
        power: the exponent of ``polynomial`` (1 is ``linear``).
    """

    def factor(step: int) -> float:
        if stop_step is not None and step >= stop_step:
            return 0.0
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "polynomial":
            return (1.0 - progress) ** power
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
