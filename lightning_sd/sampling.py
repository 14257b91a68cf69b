"""ODE samplers over a denoiser, in the k-diffusion contract.

A denoiser is ``fn(x, sigma) -> x0_hat`` on VE-form latents x = x0 + sigma * eps, with sigma[B].
A sampler is ``sampler(denoiser, x, sigmas)`` where ``x`` is the initial noise already scaled by
``sigmas[0]`` and ``sigmas`` descends to 0. Because every parameterization exposes the same
denoiser (``DiffusionObjective.denoise``), validation and generation never need to know whether
the network predicts eps, v, x0 or EDM's F.

All samplers here integrate the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma
(Karras et al. 2022, eqs. 1 and 3 with sigma(t) = t).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_sd.objectives import DiffusionObjective
from lightning_sd.objectives.objective import Model

Denoiser = Callable[[Tensor, Tensor], Tensor]


def karras_sigmas(
    sigma_min: float,
    sigma_max: float,
    n: int,
    rho: float = 7.0,
    device: torch.device | str | None = None,
) -> Tensor:
    """Noise levels of Karras et al. 2022, eq. 5, with a final 0 appended (n + 1 values).

    sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho: steps
    concentrate at low noise as rho grows; rho = 7 is the paper's choice.
    """
    if n < 1:
        raise ValueError(f"need at least one step, got {n}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device=device, dtype=torch.float32)


class Sampler:
    """Base class: ``sampler(denoiser, x, sigmas) -> x0`` for a deterministic ODE solver."""

    def __call__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _per_sample(sigma: Tensor, x: Tensor) -> Tensor:
    return sigma.expand(x.shape[0])


class Euler(Sampler):
    """First-order Euler steps on the ODE (Karras et al. 2022, Algorithm 1 without the Heun
    correction); what diffusers' ``EulerDiscreteScheduler`` does without churn."""

    def __call__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            x = _euler_step(x, denoiser(x, _per_sample(sigma, x)), sigma, sigma_next)
        return x


def _euler_step(x: Tensor, denoised: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """x + (sigma_next - sigma) (x - D) / sigma, written as r x + (1 - r) D, r = sigma_next /
    sigma: the same step without subtracting two numbers of size sigma. A rectified-flow model
    (SD3) starts at sigma ~ 1.7e7, where the first form loses every digit of D in float32."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


class Heun(Sampler):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1, S_churn = 0).

    Two denoiser calls per step except the last, which is an Euler step to sigma = 0 where the
    correction would divide by zero.
    """

    def __call__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            denoised = denoiser(x, _per_sample(sigma, x))
            x_euler = _euler_step(x, denoised, sigma, sigma_next)
            if sigma_next == 0:
                x = x_euler
                continue
            d = (x - denoised) / sigma
            d_next = (x_euler - denoiser(x_euler, _per_sample(sigma_next, x))) / sigma_next
            x = x + 0.5 * (d + d_next) * (sigma_next - sigma)
        return x


class DPMPP2M(Sampler):
    """DPM-Solver++(2M), the multistep second-order data-prediction solver (Lu et al. 2022,
    Algorithm 2), in k-diffusion's VE form with lambda = -ln(sigma).

    Each step is exact for a denoised estimate that is linear in lambda; the estimate is
    extrapolated from the current and previous denoiser outputs. The first step has no history
    and the last step (to sigma = 0) returns the denoised estimate, both first order, as in
    diffusers' ``DPMSolverMultistepScheduler`` with final_sigmas_type "zero".
    """

    def __call__(self, denoiser: Denoiser, x: Tensor, sigmas: Tensor) -> Tensor:
        denoised_prev: Tensor | None = None
        h_prev: Tensor | None = None
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:], strict=True):
            denoised = denoiser(x, _per_sample(sigma, x))
            if sigma_next == 0:
                return denoised
            h = sigma.log() - sigma_next.log()  # lambda_next - lambda
            estimate = denoised
            if denoised_prev is not None and h_prev is not None:
                r = h_prev / h
                estimate = denoised + (denoised - denoised_prev) / (2 * r)
            # x_next = (sigma_next / sigma) x - (e^{-h} - 1) D, the exact step for constant D.
            x = (sigma_next / sigma) * x - torch.expm1(-h) * estimate
            denoised_prev, h_prev = denoised, h
        return x


def _batch_cond(uncond: Any, cond: Any) -> Any:
    """Concatenate unconditional and conditional kwargs along the batch (nested dicts allowed)."""
    if isinstance(cond, dict):
        return {k: _batch_cond(uncond[k], v) for k, v in cond.items()}
    if isinstance(cond, Tensor):
        if uncond.shape[0] == 1 and cond.shape[0] > 1:  # one shared negative prompt
            uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
        return torch.cat([uncond, cond])
    return cond


def guided_denoiser(
    objective: DiffusionObjective,
    model: Model,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance_scale: float = 1.0,
) -> Denoiser:
    """The objective's denoiser, with classifier-free guidance (Ho & Salimans 2022) when asked.

    Guidance D_u + w (D_c - D_u) is applied to x0 estimates; since D is affine in the network
    output with shared c_skip and c_out, this equals guiding eps or v, for every
    parameterization. Conditional and unconditional passes share one batched network call.

    Args:
        objective: Provides ``denoise`` (parameterization + schedule).
        model: The network call ``model(x_in, t, **cond)``.
        cond: Conditional kwargs for ``model`` (tensors with the batch first; nested dicts,
            e.g. SDXL's ``added_cond_kwargs``, are fine).
        uncond: Unconditional kwargs with the same keys; a batch of 1 is broadcast.
        guidance_scale: w; 1 (or no ``uncond``) disables guidance and its extra compute.
    """
    if uncond is None or guidance_scale == 1.0:
        return lambda x, sigma: objective.denoise(model, x, sigma, **cond)
    both = _batch_cond(uncond, cond)

    def denoiser(x: Tensor, sigma: Tensor) -> Tensor:
        d_uncond, d_cond = objective.denoise(
            model, torch.cat([x, x]), torch.cat([sigma, sigma]), **both
        ).chunk(2)
        return d_uncond + guidance_scale * (d_cond - d_uncond)

    return denoiser


def sample(
    objective: DiffusionObjective,
    model: Model,
    noise: Tensor,
    cond: dict[str, Any],
    uncond: dict[str, Any] | None = None,
    guidance_scale: float = 1.0,
    steps: int = 20,
    sampler: Sampler | None = None,
    sigmas: Tensor | None = None,
) -> Tensor:
    """Generate x0 latents from unit Gaussian noise.

    Runs with whatever grad mode the caller set; wrap it in ``torch.no_grad()`` unless you
    need gradients through the chain.

    Args:
        objective: The objective whose schedule and parameterization the model was trained with.
        model: The network call ``model(x_in, t, **cond)``.
        noise: Unit-variance noise [B, C, H, W]; scaled by ``sigmas[0]`` here.
        cond: Conditional kwargs for ``model``.
        uncond: Unconditional kwargs for classifier-free guidance.
        guidance_scale: Classifier-free guidance weight; 1 disables guidance.
        steps: Number of steps when ``sigmas`` is not given.
        sampler: The ODE solver; defaults to :class:`DPMPP2M`.
        sigmas: Descending noise levels ending in 0; defaults to Karras et al. 2022 sigmas
            over the objective's schedule range.

    Returns:
        The denoised latents (decode them with the VAE).
    """
    if sigmas is None:
        if objective.schedule is None:
            raise RuntimeError("no noise schedule: call objective.set_schedule(pipeline.scheduler)")
        sigmas = karras_sigmas(objective.schedule.sigma_min, objective.schedule.sigma_max, steps)
    sigmas = sigmas.to(device=noise.device, dtype=torch.float32)
    sampler = sampler if sampler is not None else DPMPP2M()
    denoiser = guided_denoiser(objective, model, cond, uncond, guidance_scale)
    return sampler(denoiser, noise * sigmas[0], sigmas)
