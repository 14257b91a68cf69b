"""Optimizers as configs, and learning-rate schedules per parameter group.

An optimizer is a callable from parameter groups to a ``torch.optim.Optimizer``: a class, a
``functools.partial`` of one, or what LightningCLI makes of ``class_path``/``init_args`` YAML
(also a partial). It is stored in checkpoints in that YAML form, so any optimizer class by
import path works, e.g.::

    optimizer:
      class_path: bitsandbytes.optim.AdamW8bit   # pip install lightning-sd[bnb]
      init_args: {weight_decay: 1.0e-2}

Every group carries its own ``lr`` (UNet, text encoders, pivotal tokens), which overrides the
optimizer's ``lr`` argument.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch

from lightning_sd.serialization import import_class

__all__ = [
    "LRSchedule",
    "OptimizerFactory",
    "build_optimizer",
    "lr_lambda",
    "optimizer_config",
    "optimizer_factory",
]

LRSchedule = Literal["constant", "linear", "cosine", "polynomial"]
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]

DEFAULT_WEIGHT_DECAY = 1e-2


def optimizer_config(factory: OptimizerFactory | dict | None) -> dict | None:
    """The ``class_path``/``init_args`` form of an optimizer callable (None stays None)."""
    if factory is None or isinstance(factory, dict):
        return factory
    init_args: dict[str, Any] = {}
    cls = factory
    if isinstance(factory, functools.partial):
        # jsonargparse's partial holds the class among its positional arguments.
        classes = [a for a in (factory.func, *factory.args) if isinstance(a, type)]
        if not classes:
            raise TypeError(f"cannot tell which optimizer class {factory!r} builds")
        cls, init_args = classes[-1], dict(factory.keywords)
    if not isinstance(cls, type):
        raise TypeError(
            f"optimizer must be an optimizer class or a functools.partial of one, got {factory!r}"
        )
    init_args = {k: list(v) if isinstance(v, tuple) else v for k, v in init_args.items()}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def optimizer_factory(config: dict) -> OptimizerFactory:
    """The callable a ``class_path``/``init_args`` dict describes."""
    cls = import_class(config["class_path"])
    args = {k: tuple(v) if k == "betas" else v for k, v in config.get("init_args", {}).items()}
    return functools.partial(cls, **args)


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
