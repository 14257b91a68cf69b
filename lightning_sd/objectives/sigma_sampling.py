"""Training noise-level distributions: which sigmas the loss is evaluated at.

Each sampler returns sigma[B] for a batch. The discrete ones draw training timesteps of the
checkpoint's schedule and look their sigma up in its table, so a discrete model is trained on
exactly the noise levels (and integer timesteps) it was pretrained on.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from lightning_sd.objectives.schedule import DiscreteSchedule


def _draw_device(
    generator: torch.Generator | None, device: torch.device | str | None
) -> torch.device | str:
    # A generator can only fill tensors on its own device; draw there and move afterwards, so one
    # seeded CPU generator gives the same sigmas on any accelerator.
    if generator is not None:
        return generator.device
    return device if device is not None else "cpu"


class SigmaSampler:
    """Base class: ``sampler(batch_size, schedule, generator=None, device=None) -> sigma[B]``."""

    def __call__(
        self,
        batch_size: int,
        schedule: DiscreteSchedule,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        raise NotImplementedError


class _DiscreteTimesteps(SigmaSampler):
    """Shared range handling: timesteps in [min_timestep, max_timestep) of the schedule."""

    def __init__(self, min_timestep: int = 0, max_timestep: int | None = None) -> None:
        if min_timestep < 0 or (max_timestep is not None and max_timestep <= min_timestep):
            raise ValueError(
                f"need 0 <= min_timestep < max_timestep, got {min_timestep}, {max_timestep}"
            )
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep

    def _range(self, schedule: DiscreteSchedule) -> tuple[int, int]:
        high = schedule.num_timesteps if self.max_timestep is None else self.max_timestep
        if high > schedule.num_timesteps:
            raise ValueError(f"max_timestep {high} exceeds the schedule's {schedule.num_timesteps}")
        return self.min_timestep, high

    def _timesteps(
        self,
        batch_size: int,
        low: int,
        high: int,
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> Tensor:
        raise NotImplementedError

    def __call__(
        self,
        batch_size: int,
        schedule: DiscreteSchedule,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        low, high = self._range(schedule)
        t = self._timesteps(batch_size, low, high, generator, _draw_device(generator, device))
        sigmas = schedule.sigmas
        return sigmas[t.to(sigmas.device)].to(device if device is not None else sigmas.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(min_timestep={self.min_timestep}, max_timestep={self.max_timestep})"


class DiscreteUniform(_DiscreteTimesteps):
    """Uniform integer timesteps, as DDPM (Ho et al. 2020) and Stable Diffusion training draw them.

    Args:
        min_timestep: Lowest timestep drawn (inclusive).
        max_timestep: Highest timestep drawn (exclusive, like ``torch.randint`` and kohya's
            ``--max_timestep``); None means the whole schedule. A sub-range trains only part
            of the noise levels, e.g. high timesteps for composition, low ones for detail.
    """

    def _timesteps(
        self,
        batch_size: int,
        low: int,
        high: int,
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> Tensor:
        return torch.randint(low, high, (batch_size,), generator=generator, device=device)


class DiscreteLogitNormal(_DiscreteTimesteps):
    """Logit-normal timesteps (Esser et al. 2024, Sec. 3.1, the SD3 default).

    u = sigmoid(loc + scale * n), n ~ N(0, 1), is spread over the timestep range, so the
    density peaks mid-schedule and vanishes at both ends. ``loc > 0`` biases training towards
    high noise (composition), ``loc < 0`` towards low noise (detail); ``loc=0, scale=1`` is
    SD3's choice.

    Args:
        loc: Mean of the logit (m in the paper).
        scale: Standard deviation of the logit (s in the paper).
        min_timestep: Lowest timestep drawn (inclusive).
        max_timestep: Highest timestep drawn (exclusive); None means the whole schedule.
    """

    def __init__(
        self,
        loc: float = 0.0,
        scale: float = 1.0,
        min_timestep: int = 0,
        max_timestep: int | None = None,
    ) -> None:
        super().__init__(min_timestep, max_timestep)
        if scale <= 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.loc = loc
        self.scale = scale

    def _timesteps(
        self,
        batch_size: int,
        low: int,
        high: int,
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> Tensor:
        n = torch.randn((batch_size,), generator=generator, device=device)
        u = torch.sigmoid(self.loc + self.scale * n)
        return (low + (u * (high - low)).long()).clamp(max=high - 1)

    def __repr__(self) -> str:
        return (
            f"DiscreteLogitNormal(loc={self.loc}, scale={self.scale}, "
            f"min_timestep={self.min_timestep}, max_timestep={self.max_timestep})"
        )


class LogNormal(SigmaSampler):
    """ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, "Training").

    Continuous sigmas, clamped to the schedule's range so a discrete model is never asked about
    a noise level it has no timestep for. The network then sees fractional timesteps.

    Args:
        P_mean: Mean of ln(sigma); -1.2 in the paper.
        P_std: Standard deviation of ln(sigma); 1.2 in the paper.
    """

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2) -> None:
        if P_std <= 0:
            raise ValueError(f"P_std must be positive, got {P_std}")
        self.P_mean = P_mean
        self.P_std = P_std

    def __call__(
        self,
        batch_size: int,
        schedule: DiscreteSchedule,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        n = torch.randn((batch_size,), generator=generator, device=_draw_device(generator, device))
        sigma = (self.P_mean + self.P_std * n).exp().clamp(schedule.sigma_min, schedule.sigma_max)
        return sigma.to(device) if device is not None else sigma

    def __repr__(self) -> str:
        return f"LogNormal(P_mean={self.P_mean}, P_std={self.P_std})"


class TimestepBias(_DiscreteTimesteps):
    """Integer timesteps drawn with a bias towards part of the schedule.

    The weights are diffusers' ``generate_timestep_weights`` (SDXL text-to-image example):
    one per timestep, times ``multiplier`` on the biased ones, normalised; timesteps are then
    drawn by ``torch.multinomial`` with replacement, as that script draws them.

    Args:
        strategy: ``earlier`` biases the first ``portion`` of the timesteps (low noise,
            detail), ``later`` the last ``portion`` (high noise, composition), ``range`` the
            timesteps in [begin, end); ``none`` draws uniformly.
        multiplier: Weight of the biased timesteps relative to the others; > 1 favours them,
            < 1 (but > 0) avoids them.
        portion: Share of the timesteps ``earlier`` / ``later`` bias (``int(portion * T)``).
        begin: First biased timestep of ``range`` (inclusive).
        end: End of ``range`` (exclusive); at most the schedule's length.
    """

    def __init__(
        self,
        strategy: Literal["none", "earlier", "later", "range"] = "none",
        multiplier: float = 1.0,
        portion: float = 0.25,
        begin: int = 0,
        end: int = 1000,
    ) -> None:
        if strategy not in ("none", "earlier", "later", "range"):
            raise ValueError(f"strategy must be none, earlier, later or range, got {strategy!r}")
        if multiplier <= 0:
            raise ValueError(
                f"multiplier must be positive, got {multiplier}; to train on part of the "
                "schedule only, use DiscreteUniform(min_timestep, max_timestep)"
            )
        if not 0 <= portion <= 1:
            raise ValueError(f"portion must be in [0, 1], got {portion}")
        if not 0 <= begin < end:
            raise ValueError(f"need 0 <= begin < end, got {begin}, {end}")
        super().__init__()
        self.strategy = strategy
        self.multiplier = multiplier
        self.portion = portion
        self.begin = begin
        self.end = end

    def weights(self, num_timesteps: int) -> Tensor:
        """The normalised probability of each timestep."""
        weights = torch.ones(num_timesteps)
        count = int(self.portion * num_timesteps)
        if self.strategy == "range" and self.end > num_timesteps:
            raise ValueError(f"range end {self.end} exceeds the schedule's {num_timesteps} steps")
        biased = {
            "none": slice(0, 0),
            "earlier": slice(0, count),
            "later": slice(num_timesteps - count, None),
            "range": slice(self.begin, self.end),
        }[self.strategy]
        weights[biased] *= self.multiplier
        return weights / weights.sum()

    def _timesteps(
        self,
        batch_size: int,
        low: int,
        high: int,
        generator: torch.Generator | None,
        device: torch.device | str,
    ) -> Tensor:
        weights = self.weights(high).to(device)
        return torch.multinomial(weights, batch_size, replacement=True, generator=generator)

    def __repr__(self) -> str:
        return (
            f"TimestepBias(strategy={self.strategy!r}, multiplier={self.multiplier}, "
            f"portion={self.portion}, begin={self.begin}, end={self.end})"
        )
