"""Rectified flow (Stable Diffusion 3; Esser et al. 2024) in the package's VE identity.

SD3 trains on x_t = (1 - s) x0 + s eps, s in (0, 1], and its network predicts the velocity
v = eps - x0, conditioned on the timestep t = 1000 s. Divided by (1 - s) that is the VE point
x = x0 + sigma eps with sigma = s / (1 - s), i.e. x_t = x / (1 + sigma). So flow matching is
one more (c_skip, c_out, c_in) of Karras et al. 2022, eq. 7, and everything else (the loss
in network space, Min-SNR with SNR = 1/sigma^2, the samplers) applies unchanged:

- :class:`FlowMatching`: c_in = c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma);
- :class:`FlowSchedule`: the training grid of the checkpoint's ``FlowMatchEulerDiscreteScheduler``
  (its shift included) as sigmas, conditioned on t = 1000 s;
- :class:`FlowTimesteps`: SD3's timestep densities (logit-normal, mode, cosmap, uniform);
- :class:`SD3Weighting`: SD3's loss weightings (none, sigma_sqrt, cosmap), as x0-space lambdas.

s = 1 (pure noise) has sigma = infinity; the schedule caps s at 1 - 2^-24, which changes the
network input there by about 6e-8 (diffusers' Euler scheduler caps zero-terminal-SNR DDPM
schedules the same way).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_sd.objectives.parameterization import Parameterization, Scalings
from lightning_sd.objectives.schedule import DiscreteSchedule
from lightning_sd.objectives.sigma_sampling import SigmaSampler, _draw_device
from lightning_sd.objectives.weighting import Weighting

__all__ = ["FlowMatching", "FlowSchedule", "FlowTimesteps", "SD3Weighting"]

_S_MAX = 1.0 - 2.0**-24  # the largest s whose sigma = s / (1 - s) is finite in float32


def flow_s(sigma: Tensor) -> Tensor:
    """s = sigma / (1 + sigma): the flow time of a VE noise level (computed in float64)."""
    wide = sigma.to(torch.float32 if sigma.device.type == "mps" else torch.float64)
    return wide / (1.0 + wide)


class FlowMatching(Parameterization):
    """Predict the velocity eps - x0 of the straight path x_t = (1 - s) x0 + s eps (SD3).

    With sigma = s / (1 - s) and x = x0 + sigma eps = x_t (1 + sigma): the network input is
    x_t = c_in x with c_in = 1 / (1 + sigma), and x0 = x_t - s v = c_skip x + c_out v with
    c_skip = 1 / (1 + sigma), c_out = -sigma / (1 + sigma) (Esser et al. 2024, Sec. 2 and 3.1,
    in the preconditioning of Karras et al. 2022, eq. 7). The target (x0 - c_skip x) / c_out
    is eps - x0, what the SD3 DreamBooth script regresses without ``precondition_outputs``.
    """

    prediction_type = "flow_prediction"

    def __call__(self, sigma: Tensor) -> Scalings:
        c = 1.0 / (1.0 + sigma)
        return Scalings(c, -sigma * c, c)


class FlowSchedule(DiscreteSchedule):
    """The training grid of a ``FlowMatchEulerDiscreteScheduler``, as VE sigmas.

    Built by :meth:`DiscreteSchedule.from_scheduler`. ``sigmas`` ascend (index 0 is the least
    noisy), mirroring diffusers' descending ``scheduler.sigmas``; the network is conditioned
    on t = num_train_timesteps * s.

    Args:
        sigmas: Ascending VE noise levels s / (1 - s).
        num_train_timesteps: What t = 1 s maps to (1000 for SD3).
    """

    def __init__(self, sigmas: Tensor, num_train_timesteps: int = 1000) -> None:
        super().__init__(sigmas)
        self.num_train_timesteps = num_train_timesteps

    @classmethod
    def from_flow_scheduler(cls, scheduler: object) -> FlowSchedule:
        """Read the grid a fresh copy of ``scheduler`` trains on (as the SD3 script does).

        Its shift is already applied; with ``use_dynamic_shifting`` the grid is unshifted,
        since the shift then depends on the image size at sampling time.
        """
        fresh = type(scheduler).from_config(scheduler.config)
        s = fresh.sigmas.double().flip(0).clamp(max=_S_MAX)
        return cls((s / (1.0 - s)).float(), fresh.config.num_train_timesteps)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """t = num_train_timesteps * s, s = sigma / (1 + sigma)."""
        return (self.num_train_timesteps * flow_s(sigma)).float()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t`."""
        s = (t.double() / self.num_train_timesteps).clamp(max=_S_MAX)
        return (s / (1.0 - s)).float()


class FlowTimesteps(SigmaSampler):
    """SD3's training-timestep densities over the schedule's grid (Esser et al. 2024, Sec. 3.1).

    u in [0, 1] is drawn as the SD3 DreamBooth script draws it (diffusers'
    ``compute_density_for_timestep_sampling`` for ``logit_normal``, ``mode`` and ``uniform``;
    the paper's ``cosmap`` u = 1 - 1 / (tan(pi x / 2) + 1), x uniform), and picks the grid entry
    ``int(u * N)`` counted from the noisiest, as the script indexes the scheduler's
    descending timesteps. ``mode`` can return u = 1 exactly: that index is clamped.

    Args:
        scheme: ``logit_normal`` (SD3's default), ``mode``, ``cosmap`` or ``uniform``.
        logit_mean: Mean of the logit of ``logit_normal``.
        logit_std: Standard deviation of the logit of ``logit_normal``.
        mode_scale: Scale of ``mode`` (1.29 in the paper).
    """

    def __init__(
        self,
        scheme: Literal["logit_normal", "mode", "cosmap", "uniform"] = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
    ) -> None:
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        self.scheme = scheme
        self.logit_mean = logit_mean
        self.logit_std = logit_std
        self.mode_scale = mode_scale

    def draw_u(self, batch_size: int, generator=None, device="cpu") -> Tensor:
        """u in [0, 1], one per sample; 0 is the noisiest end of the grid."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        if self.scheme == "cosmap":
            x = torch.rand((batch_size,), generator=generator, device=device)
            return 1.0 - 1.0 / (torch.tan(math.pi * x / 2) + 1.0)
        return compute_density_for_timestep_sampling(
            self.scheme, batch_size, self.logit_mean, self.logit_std, self.mode_scale,
            device=device, generator=generator,
        )  # fmt: skip

    def __call__(
        self,
        batch_size: int,
        schedule: DiscreteSchedule,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        u = self.draw_u(batch_size, generator, _draw_device(generator, device))
        n = schedule.num_timesteps
        from_noisiest = (u * n).long().clamp(0, n - 1)
        sigmas = schedule.sigmas
        sigma = sigmas[(n - 1 - from_noisiest).to(sigmas.device)]
        return sigma.to(device) if device is not None else sigma

    def __repr__(self) -> str:
        return (
            f"FlowTimesteps(scheme={self.scheme!r}, logit_mean={self.logit_mean}, "
            f"logit_std={self.logit_std}, mode_scale={self.mode_scale})"
        )


class SD3Weighting(Weighting):
    """SD3's loss weightings as x0-space lambdas (diffusers' ``compute_loss_weighting_for_sd3``).

    The SD3 DreamBooth script weights the x0 error (its default ``precondition_outputs``) by
    ``none``: 1, ``sigma_sqrt``: s^-2, or ``cosmap``: 2 / (pi (1 - 2 s + 2 s^2)), with s the
    flow time. Times c_out^2 = s^2 this is the network-space weight, so ``sigma_sqrt`` is the
    plain velocity MSE (= :class:`Canonical` under :class:`FlowMatching`).

    Args:
        scheme: ``none``, ``sigma_sqrt`` or ``cosmap``.
    """

    def __init__(self, scheme: Literal["none", "sigma_sqrt", "cosmap"] = "none") -> None:
        self.scheme = scheme

    def __call__(self, sigma: Tensor, scalings: Scalings) -> Tensor:
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        lam = compute_loss_weighting_for_sd3(self.scheme, flow_s(sigma.float()).float())
        return lam.float() * scalings.c_out.float() ** 2

    def __repr__(self) -> str:
        return f"SD3Weighting(scheme={self.scheme!r})"
