"""The diffusion training objective, composed of small injected parts.

With x = x0 + sigma * eps and D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (Karras et al.
2022, eq. 7), the x0-space error factors as ||D - x0||^2 = c_out^2 ||F - (x0 - c_skip x)/c_out||^2
(eq. 8). So the loss is an MSE in network-output space against that target, weighted per sample
by lambda(sigma) c_out^2. The parameterization picks the c's, the sigma sampler picks sigma, the
weighting picks lambda, the distance how an error counts (squared, or a robust pseudo-Huber),
the schedule maps sigma to c_noise; nothing here branches on what the network predicts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sd.objectives.distance import Distance, SquaredError
from lightning_sd.objectives.masking import reduce_per_sample
from lightning_sd.objectives.noise import PyramidNoise
from lightning_sd.objectives.parameterization import EDM, Epsilon, Parameterization
from lightning_sd.objectives.schedule import DiscreteSchedule, EDMSchedule
from lightning_sd.objectives.sigma_sampling import DiscreteUniform, SigmaSampler
from lightning_sd.objectives.weighting import Canonical, Weighting

#: ``model(x_in, t, **cond) -> F``: the raw network call, e.g.
#: ``lambda x, t, **c: unet(x, t, encoder_hidden_states=c["encoder_hidden_states"]).sample``.
Model = Callable[..., Tensor]


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _randn(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    # Draw on the generator's device (so a seeded CPU generator is reproducible anywhere) in fp32.
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device).to(like.device)


class DiffusionObjective(nn.Module):
    """Per-sample denoising loss and the matching denoiser D(x; sigma) for samplers.

    The constructor signature is the YAML schema (``model.objective`` in configs/objective/).
    The noise schedule is not part of it: it belongs to the checkpoint, and the module calls
    :meth:`set_schedule` with the pipeline's scheduler after loading it.

    Args:
        parameterization: What the network predicts. Defaults to :class:`Epsilon`.
        sigma_sampler: Training noise-level distribution. Defaults to :class:`DiscreteUniform`.
        weighting: Per-sample loss weight. Defaults to :class:`Canonical` (plain MSE on the
            network output, what the diffusers scripts do without ``--snr_gamma``).
        distance: How an output error counts. Defaults to :class:`SquaredError` (the MSE);
            :class:`Huber` / :class:`SmoothL1` are kohya's robust pseudo-Huber losses.
        noise_offset: Adds ``noise_offset * randn(B, C, 1, 1)`` to the drawn noise so the model
            can learn to change an image's mean brightness (Guttenberg 2023); ~0.05-0.1 is
            typical. 0 disables it.
        pyramid_noise: Multi-resolution noise (:class:`PyramidNoise`), applied after the
            offset as kohya applies it; None disables it.
        input_perturbation: Feeds the network noise perturbed by
            ``input_perturbation * randn_like(noise)`` while regressing on the unperturbed noise,
            to reduce exposure bias (Ning et al. 2023); 0.1 in the paper. 0 disables it.
        zero_terminal_snr: Rescale the checkpoint's betas to zero terminal SNR (Lin et al. 2024);
            pair it with :class:`VPrediction`, since epsilon carries no signal at the last step.
        schedule: A ready schedule, for use outside the LightningModule (a paper's code).
    """

    config_exclude = ("schedule",)  # the checkpoint's, never serialized with the objective

    def __init__(
        self,
        parameterization: Parameterization | None = None,
        sigma_sampler: SigmaSampler | None = None,
        weighting: Weighting | None = None,
        distance: Distance | None = None,
        noise_offset: float = 0.0,
        pyramid_noise: PyramidNoise | None = None,
        input_perturbation: float = 0.0,
        zero_terminal_snr: bool = False,
        schedule: DiscreteSchedule | None = None,
    ) -> None:
        super().__init__()
        if noise_offset < 0 or input_perturbation < 0:
            raise ValueError("noise_offset and input_perturbation must be non-negative")
        self.parameterization = parameterization if parameterization is not None else Epsilon()
        self.sigma_sampler = sigma_sampler if sigma_sampler is not None else DiscreteUniform()
        self.weighting = weighting if weighting is not None else Canonical()
        self.distance = distance if distance is not None else SquaredError()
        self.noise_offset = noise_offset
        self.pyramid_noise = pyramid_noise
        self.input_perturbation = input_perturbation
        self.zero_terminal_snr = zero_terminal_snr
        self.schedule: DiscreteSchedule | None = None
        if schedule is not None:
            self.set_schedule(schedule)

    def set_schedule(self, scheduler: DiscreteSchedule | Any) -> None:
        """Adopt the base model's noise schedule.

        Args:
            scheduler: A diffusers scheduler (its training schedule is read, with
                ``zero_terminal_snr`` applied), or a :class:`DiscreteSchedule` used as is.
        """
        if isinstance(scheduler, DiscreteSchedule):
            if self.zero_terminal_snr and not scheduler.zero_terminal_snr:
                raise ValueError(
                    "zero_terminal_snr=True but the given schedule was not rescaled; build it with "
                    "DiscreteSchedule.from_scheduler(scheduler, zero_terminal_snr=True)"
                )
            self.schedule = scheduler
        else:
            self.schedule = DiscreteSchedule.from_scheduler(scheduler, self.zero_terminal_snr)
        from lightning_sd.objectives.flow import FlowMatching, FlowSchedule

        if isinstance(self.schedule, FlowSchedule) != isinstance(
            self.parameterization, FlowMatching
        ):
            warnings.warn(
                f"{self.parameterization} on a {type(self.schedule).__name__}: rectified-flow "
                "models (SD3) predict the velocity, so use FlowMatching() with a "
                "FlowMatchEulerDiscreteScheduler and not otherwise",
                stacklevel=2,
            )
        if isinstance(self.schedule, EDMSchedule) and not isinstance(self.parameterization, EDM):
            warnings.warn(
                "EDM-native base model (its scheduler preconditions the UNet the EDM way) trained "
                f"with {self.parameterization}; use EDM(sigma_data=scheduler.config.sigma_data)",
                stacklevel=2,
            )

    def _schedule_on(self, device: torch.device) -> DiscreteSchedule:
        if self.schedule is None:
            raise RuntimeError("no noise schedule: call objective.set_schedule(pipeline.scheduler)")
        if self.schedule.sigmas.device != device:
            self.schedule.to(device)
        return self.schedule

    def timestep(self, sigma: Tensor) -> Tensor:
        """What the network is conditioned on for noise level sigma (timestep or c_noise)."""
        return self._schedule_on(sigma.device).sigma_to_t(sigma)

    def _sigma_batch(self, sigma: Tensor | float, x: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.float()

    def loss(
        self,
        model: Model,
        x0: Tensor,
        *,
        noise: Tensor | None = None,
        sigma: Tensor | None = None,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
        **cond: Any,
    ) -> Tensor:
        """Per-sample weighted denoising loss.

        Args:
            model: The network call ``model(x_in, t, **cond) -> F``.
            x0: Clean latents [B, C, ...].
            noise: Fixed noise, used exactly as given (noise offset and input perturbation are
                part of drawing noise and are skipped), e.g. for a reproducible held-out loss.
                Drawn when None.
            sigma: Fixed noise levels [B] (or a scalar); drawn from the sigma sampler when None.
            generator: Random source for whatever is drawn.
            mask: Per-pixel loss weights in [0, 1], (B, 1, H, W) at the latent grid or any whole
                multiple of it (e.g. the image's pixels); area-averaged onto the grid, and the
                per-sample loss is the weighted mean (``masking.py``). None weighs all equally.
            **cond: Conditioning passed through to ``model`` (e.g. encoder_hidden_states).

        Returns:
            The loss of each sample, shape [B], in float32; reduce (and weight, e.g. for prior
            preservation) outside.
        """
        schedule = self._schedule_on(x0.device)
        if sigma is None:
            sigma = self.sigma_sampler(x0.shape[0], schedule, generator=generator, device=x0.device)
        sigma = self._sigma_batch(sigma, x0)
        x0_32 = x0.float()

        if noise is None:
            noise = _randn(tuple(x0.shape), x0_32, generator)
            if self.noise_offset:  # Guttenberg 2023: per-channel constant shift
                offset_shape = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)
                noise = noise + self.noise_offset * _randn(offset_shape, x0_32, generator)
            if self.pyramid_noise is not None:  # Whitaker 2023, after the offset as in kohya
                noise = self.pyramid_noise(noise, generator)
            net_noise = noise
            if self.input_perturbation:  # Ning et al. 2023: perturb the input, not the target
                net_noise = noise + self.input_perturbation * _randn(
                    tuple(x0.shape), x0_32, generator
                )
        else:
            noise = noise.float()
            net_noise = noise

        scalings = self.parameterization(sigma)
        c_in = _append_dims(scalings.c_in, x0.ndim)
        x = x0_32 + _append_dims(sigma, x0.ndim) * net_noise
        prediction = model((c_in * x).to(x0.dtype), schedule.sigma_to_t(sigma), **cond)
        target = self.target(x0_32, noise, sigma)
        error = self.distance(prediction.float(), target, sigma, schedule)
        return self.weighting(sigma, scalings) * reduce_per_sample(error, mask)

    def target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """The network-output target (x0 - c_skip x) / c_out for x = x0 + sigma * noise.

        It is the noise for :class:`Epsilon`, diffusers' ``get_velocity`` for
        :class:`VPrediction` and x0 for :class:`Sample`. Computed in float32.

        Args:
            x0: Clean latents [B, ...].
            noise: Unit Gaussian noise, same shape.
            sigma: Noise levels [B].
        """
        # target = a x0 + b eps with a = (1 - c_skip) / c_out, b = -c_skip sigma / c_out. The
        # per-sample coefficients are formed in float64 (cheap: B numbers) because 1 - c_skip
        # cancels badly in float32 at small sigma (1e-5 error in v at t = 0 otherwise).
        wide = torch.float32 if sigma.device.type == "mps" else torch.float64
        sigma = sigma.to(wide)
        c_skip, c_out, _ = self.parameterization(sigma)
        a = _append_dims(((1.0 - c_skip) / c_out).float(), x0.ndim)
        b = _append_dims((-c_skip * sigma / c_out).float(), x0.ndim)
        return a * x0.float() + b * noise.float()

    def denoise(self, model: Model, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        """D(x; sigma): the x0 estimate, the denoiser every sampler in ``sampling.py`` calls.

        Args:
            model: The network call ``model(x_in, t, **cond) -> F``.
            x: Noisy latents in VE form, x0 + sigma * eps (not divided by sqrt(sigma^2 + 1)).
            sigma: Noise level per sample [B], or a scalar for the whole batch.
            **cond: Conditioning passed through to ``model``.

        Returns:
            The x0 estimate, in x's dtype.
        """
        sigma = self._sigma_batch(sigma, x)
        c_skip, c_out, c_in = (_append_dims(c, x.ndim) for c in self.parameterization(sigma))
        prediction = model((c_in * x).to(x.dtype), self.timestep(sigma), **cond)
        return (c_skip * x + c_out * prediction.float()).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"parameterization={self.parameterization}, sigma_sampler={self.sigma_sampler}, "
            f"weighting={self.weighting}, distance={self.distance}, "
            f"noise_offset={self.noise_offset}, pyramid_noise={self.pyramid_noise}, "
            f"input_perturbation={self.input_perturbation}, "
            f"zero_terminal_snr={self.zero_terminal_snr}"
        )
