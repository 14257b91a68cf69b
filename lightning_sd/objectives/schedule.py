"""The checkpoint's noise schedule as a table of noise levels sigma.

Every objective and sampler in this package speaks the variance-exploding (VE) language of
Karras et al. 2022: a noisy sample is x = x0 + sigma * eps. A discrete DDPM model (Ho et al.
2020) trained with alphas_cumprod ac[t] sees the same point scaled to unit variance,
sqrt(ac) x0 + sqrt(1 - ac) eps = x / sqrt(sigma^2 + 1), with sigma = sqrt((1 - ac) / ac).
The schedule is the bridge between the two: it owns the sigma table and converts a sigma to
whatever the network is conditioned on (a fractional timestep, or EDM's c_noise).

The schedule is never configured by hand: it is read from the checkpoint's diffusers scheduler
so that training, validation sampling and export agree with the base model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

# diffusers' EulerDiscreteScheduler clamps the terminal alphas_cumprod of a zero-terminal-SNR
# schedule to this value so that sigma_max stays finite (sigma_max ~ 4096).
_TERMINAL_ALPHA_CUMPROD = 2.0**-24


def is_edm_scheduler(scheduler) -> bool:
    """Whether the scheduler's network takes c_noise = ln(sigma) / 4, not a DDPM timestep."""
    # diffusers is imported here, where a scheduler exists: importing the objectives stays light.
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    return isinstance(scheduler, EDMEulerScheduler | EDMDPMSolverMultistepScheduler)


class DiscreteSchedule(nn.Module):
    """A discrete DDPM-style schedule: sigma table and sigma <-> timestep conversion.

    Build it with :meth:`from_scheduler`; the constructor only stores a table. ``sigmas[t]`` is
    the noise level of training timestep ``t`` (ascending: ``t = 0`` is the least noisy). The
    tables are non-persistent buffers: they follow ``.to(device)`` but never enter a checkpoint,
    because they are a property of the base model, reloaded with it.

    Args:
        sigmas: Ascending noise levels, one per training timestep.
        zero_terminal_snr: Whether the table was rescaled to zero terminal SNR (recorded so an
            objective can check that the schedule it is given matches what it was asked for).
    """

    sigmas: Tensor
    log_sigmas: Tensor

    def __init__(self, sigmas: Tensor, zero_terminal_snr: bool = False) -> None:
        super().__init__()
        sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
        if sigmas.ndim != 1 or sigmas.numel() < 2:
            raise ValueError(
                f"sigmas must be a 1-D table of length >= 2, got {tuple(sigmas.shape)}"
            )
        if not bool((sigmas[1:] > sigmas[:-1]).all()) or not bool(sigmas[0] > 0):
            raise ValueError("sigmas must be positive and strictly ascending")
        if not bool(torch.isfinite(sigmas).all()):
            raise ValueError("sigmas must be finite (clamp the terminal alphas_cumprod)")
        self._table = sigmas.clone()  # float32 master copy on the CPU, see _apply
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.zero_terminal_snr = zero_terminal_snr

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> DiscreteSchedule:
        # Follow device moves but not dtype casts: a parent's .half() or a "16-true" precision
        # would otherwise round the table and shift sigma_to_t by whole timesteps.
        super()._apply(fn, recurse)
        self.sigmas = self._table.to(self.sigmas.device)
        self.log_sigmas = self.sigmas.log()
        return self

    @classmethod
    def from_scheduler(cls, scheduler: object, zero_terminal_snr: bool = False) -> DiscreteSchedule:
        """Read the training schedule of a diffusers scheduler.

        Args:
            scheduler: A diffusers scheduler (DDPM, DDIM, Euler, DPM-Solver, ... or an EDM one).
                Its config is re-instantiated, so a scheduler already used for inference (whose
                ``sigmas`` were overwritten by ``set_timesteps``) gives the same table.
            zero_terminal_snr: Rescale the betas to zero terminal SNR (Lin et al. 2024,
                Algorithm 1, via diffusers' ``rescale_zero_terminal_snr``). A scheduler whose own
                config sets ``rescale_betas_zero_snr`` is honoured without this flag.

        Returns:
            A :class:`DiscreteSchedule`, an :class:`EDMSchedule` for EDM-native schedulers, or a
            :class:`~lightning_sd.objectives.flow.FlowSchedule` for rectified-flow ones (SD3).
        """
        if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
            if zero_terminal_snr:
                raise ValueError("zero_terminal_snr applies to DDPM beta schedules, not flows")
            from lightning_sd.objectives.flow import FlowSchedule

            return FlowSchedule.from_flow_scheduler(scheduler)
        fresh = type(scheduler).from_config(scheduler.config)
        if is_edm_scheduler(fresh):
            if zero_terminal_snr:
                raise ValueError("zero_terminal_snr applies to DDPM beta schedules, not EDM ones")
            # Their sigma grid is descending and ends with an appended final sigma; drop it.
            return EDMSchedule(fresh.sigmas[:-1].flip(0))
        if not hasattr(fresh, "alphas_cumprod"):
            raise TypeError(f"{type(scheduler).__name__} has no alphas_cumprod or EDM sigma grid")

        already_rescaled = bool(fresh.config.get("rescale_betas_zero_snr", False))
        if zero_terminal_snr and not already_rescaled:
            from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

            betas = rescale_zero_terminal_snr(fresh.betas.float())
            alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        else:
            alphas_cumprod = fresh.alphas_cumprod.float()
        # SNR (hence sigma) is taken after the rescale (kohya-ss/sd-scripts#1263); the clamp keeps
        # sigma_max finite at the last step, as diffusers' EulerDiscreteScheduler does.
        alphas_cumprod = alphas_cumprod.clamp_min(_TERMINAL_ALPHA_CUMPROD)
        sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()
        return cls(sigmas, zero_terminal_snr=zero_terminal_snr or already_rescaled)

    @property
    def num_timesteps(self) -> int:
        """Number of entries in the sigma table (the training timesteps)."""
        return self.sigmas.numel()

    @property
    def sigma_min(self) -> float:
        """Smallest noise level the model was trained on."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """Largest noise level the model was trained on."""
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Map noise levels to the (fractional) timesteps the network is conditioned on.

        Linear interpolation of log-sigma over the table, the convention of k-diffusion and
        diffusers' ``_sigma_to_t``; sigmas outside the table clamp to its ends. A sigma taken
        from the table maps to its integer timestep exactly.
        """
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.float().log()
        low = torch.searchsorted(log_sigmas, log_sigma.contiguous(), right=True) - 1
        low = low.clamp(0, log_sigmas.numel() - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0.0, 1.0)
        return low.to(torch.float32) + w

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t`: log-sigma interpolation at fractional timesteps."""
        sigmas, log_sigmas = self.sigmas.to(t.device), self.log_sigmas.to(t.device)
        last = sigmas.numel() - 1
        t = t.float().clamp(0, last)
        low = t.floor().long()
        w = t - low
        # sigma_lo * exp(w * dlog): an integer t returns its table entry bit for bit.
        return sigmas[low] * (w * (log_sigmas[(low + 1).clamp(max=last)] - log_sigmas[low])).exp()

    def extra_repr(self) -> str:
        return (
            f"num_timesteps={self.num_timesteps}, sigma_min={self.sigma_min:.4g}, "
            f"sigma_max={self.sigma_max:.4g}, zero_terminal_snr={self.zero_terminal_snr}"
        )


class EDMSchedule(DiscreteSchedule):
    """An EDM-native schedule (Playground v2.5, diffusers' ``EDMEulerScheduler``).

    The table is the scheduler's own training sigma grid (used by the discrete sigma samplers);
    the network is conditioned on c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1), which is
    what ``EDMEulerScheduler.precondition_noise`` computes.
    """

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """c_noise = ln(sigma) / 4 (Karras et al. 2022, Table 1)."""
        return 0.25 * sigma.float().log()

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of c_noise: sigma = exp(4 c_noise)."""
        return (4.0 * t.float()).exp()
