"""Learning-rate schedules per parameter group (warm-up, then constant, linear or cosine)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

__all__ = ["LRSchedule", "lr_lambda"]

LRSchedule = Literal["constant", "linear", "cosine"]


def lr_lambda(
    schedule: LRSchedule, warmup_steps: int, total_steps: int, stop_step: int | None = None
) -> Callable[[int], float]:
    """The multiplier of a group's learning rate at each optimizer step.

    Args:
        schedule: shape after the linear warm-up: ``constant``, ``linear`` decay to 0, or
            half-period ``cosine`` decay to 0 (Loshchilov & Hutter 2017).
        warmup_steps: linear warm-up from 0.
        total_steps: the run's optimizer steps (``trainer.estimated_stepping_batches``).
        stop_step: from this step on the multiplier is 0: how pivotal-tuning embeddings stop
            training without flipping ``requires_grad`` mid-run.
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
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
