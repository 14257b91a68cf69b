"""Elementwise distances between the network output F and its target.

The objective reduces ``distance(F, target)`` over each sample (optionally under a mask) and
multiplies by the weighting, so a robust loss changes only how an error counts, never which
target is regressed: nothing here knows what the network predicts.

The pseudo-Huber forms are kohya sd-scripts' ``conditional_loss`` (``huber``, ``smooth_l1``)
with the threshold c per sample from ``get_huber_threshold_if_needed`` (its ``constant``,
``exponential`` and ``snr`` schedules).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_sd.objectives.schedule import DiscreteSchedule, EDMSchedule

__all__ = ["Distance", "Huber", "SmoothL1", "SquaredError"]

HuberSchedule = Literal["constant", "exponential", "snr"]


def _per_sample(values: Tensor, ndim: int) -> Tensor:
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


class Distance:
    """Base class: ``distance(prediction, target, sigma, schedule) -> tensor like prediction``."""

    def __call__(
        self, prediction: Tensor, target: Tensor, sigma: Tensor, schedule: DiscreteSchedule
    ) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SquaredError(Distance):
    """(F - target)^2: reduced by a mean, the MSE every diffusion paper trains with."""

    def __call__(
        self, prediction: Tensor, target: Tensor, sigma: Tensor, schedule: DiscreteSchedule
    ) -> Tensor:
        return (prediction - target).pow(2)


class _PseudoHuber(Distance):
    """Shared threshold schedule of the pseudo-Huber distances.

    Args:
        huber_c: The threshold c (``constant``), its value at the noisiest timestep
            (``exponential``), or its floor at infinite noise (``snr``); kohya's default 0.1.
        schedule: ``constant``: c * scale; ``exponential``: scale * c^(t/T), from scale at
            t = 0 down to c * scale at t = T; ``snr``: (1 - c) / (1 + sigma)^2 + c, near 1 at
            low noise and c at high noise (kohya's default; it ignores ``huber_scale``, as
            kohya's does).
        huber_scale: Multiplies c under ``constant`` and ``exponential``.
    """

    def __init__(
        self, huber_c: float = 0.1, schedule: HuberSchedule = "snr", huber_scale: float = 1.0
    ) -> None:
        if not 0 < huber_c <= 1:
            raise ValueError(f"huber_c must be in (0, 1], got {huber_c}")
        if huber_scale <= 0:
            raise ValueError(f"huber_scale must be positive, got {huber_scale}")
        if schedule not in ("constant", "exponential", "snr"):
            raise ValueError(f"schedule must be constant, exponential or snr, got {schedule!r}")
        self.huber_c = huber_c
        self.schedule = schedule
        self.huber_scale = huber_scale

    def threshold(self, sigma: Tensor, schedule: DiscreteSchedule) -> Tensor:
        """c per sample (kohya's ``get_huber_threshold_if_needed``), in float32."""
        sigma = sigma.float()
        if self.schedule == "constant":
            return torch.full_like(sigma, self.huber_c * self.huber_scale)
        if self.schedule == "snr":  # sigma = sqrt((1 - ac) / ac), as kohya computes it
            return (1.0 - self.huber_c) / (1.0 + sigma) ** 2 + self.huber_c
        if isinstance(schedule, EDMSchedule):
            raise ValueError(
                "Huber schedule 'exponential' needs DDPM timesteps, but an EDM-native schedule "
                "conditions on c_noise: use schedule 'snr' or 'constant'"
            )
        t = schedule.sigma_to_t(sigma)  # the integer timestep for a table sigma
        alpha = -math.log(self.huber_c) / schedule.num_timesteps
        return torch.exp(-alpha * t) * self.huber_scale

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(huber_c={self.huber_c}, schedule={self.schedule!r}, "
            f"huber_scale={self.huber_scale})"
        )


class Huber(_PseudoHuber):
    """Pseudo-Huber 2c (sqrt(d^2 + c^2) - c), d = F - target (kohya's ``huber``).

    ~ d^2 for |d| << c (the MSE) and ~ 2c |d| beyond: large errors (outliers, mislabelled
    images) pull with a bounded force. See :class:`_PseudoHuber` for the threshold schedules.
    """

    def __call__(
        self, prediction: Tensor, target: Tensor, sigma: Tensor, schedule: DiscreteSchedule
    ) -> Tensor:
        c = _per_sample(self.threshold(sigma, schedule), prediction.ndim)
        return 2 * c * (torch.sqrt((prediction - target) ** 2 + c**2) - c)


class SmoothL1(_PseudoHuber):
    """2 (sqrt(d^2 + c^2) - c) (kohya's ``smooth_l1``): the Huber form divided by c.

    ~ d^2 / c for |d| << c and ~ 2 |d| beyond, so its scale does not shrink with c.
    """

    def __call__(
        self, prediction: Tensor, target: Tensor, sigma: Tensor, schedule: DiscreteSchedule
    ) -> Tensor:
        c = _per_sample(self.threshold(sigma, schedule), prediction.ndim)
        return 2 * (torch.sqrt((prediction - target) ** 2 + c**2) - c)
