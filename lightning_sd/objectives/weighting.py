"""Loss weightings, each defined once in x0 space.

The objective regresses the network output F on its target; since
||D - x0||^2 = c_out^2 ||F - target||^2, a weighting lambda(sigma) on the x0 error becomes the
network-space weight lambda(sigma) c_out(sigma)^2. Defining weightings in x0 space is what lets
Min-SNR give the right epsilon and v weights from one formula, with no branch on what the
network predicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sd.objectives.parameterization import Scalings


class Weighting:
    """Base class: per-sample network-space loss weights from sigma and the scalings."""

    def __call__(self, sigma: Tensor, scalings: Scalings) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Canonical(Weighting):
    """Unit weight on the network output: the plain ``mse_loss(model_pred, target)``.

    In x0 space this is lambda = 1 / c_out^2, i.e. 1/sigma^2 = SNR for epsilon (Ho et al. 2020's
    "simple" loss) and SNR + 1 for v.
    """

    def __call__(self, sigma: Tensor, scalings: Scalings) -> Tensor:
        return torch.ones_like(sigma)


class MinSNR(Weighting):
    """Min-SNR-gamma (Hang et al. 2023): lambda = min(SNR, gamma), SNR = 1 / sigma^2.

    Times c_out^2 this gives min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1)
    for v (the form of diffusers PR #6307), and stays finite at zero terminal SNR, where the
    epsilon-form quotient would be 0 / 0.

    Args:
        gamma: Clamp on the SNR; 5 in the paper.
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.gamma = gamma

    def __call__(self, sigma: Tensor, scalings: Scalings) -> Tensor:
        snr = sigma.float() ** -2
        return snr.clamp(max=self.gamma) * scalings.c_out.float() ** 2

    def __repr__(self) -> str:
        return f"MinSNR(gamma={self.gamma})"


class EDMWeighting(Weighting):
    """EDM's lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, eq. 8).

    Chosen so that, with EDM preconditioning, the network-space weight is exactly 1 (Table 1).

    Args:
        sigma_data: Standard deviation of the data; keep it equal to the EDM parameterization's.
    """

    def __init__(self, sigma_data: float = 0.5) -> None:
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: Tensor, scalings: Scalings) -> Tensor:
        sigma = sigma.float()
        lam = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return lam * scalings.c_out.float() ** 2

    def __repr__(self) -> str:
        return f"EDMWeighting(sigma_data={self.sigma_data})"


class DebiasedEstimation(Weighting):
    """Debiased estimation (Yu et al. 2023): the epsilon loss weighted by 1 / sqrt(SNR).

    In x0 space lambda = SNR / sqrt(min(SNR, snr_max)), so the epsilon weight is exactly kohya
    sd-scripts' ``apply_debiased_estimation``, 1 / sqrt(min(SNR, 1000)) (its clamp keeps the
    weight finite near t = 0), and the v weight follows from the same lambda:
    sqrt(SNR) / (SNR + 1) below the clamp. kohya's v form 1 / (SNR + 1) is not the paper's
    weighting (it is lambda = 1); the objective here has no v-specific branch to copy it into.

    Args:
        snr_max: Clamp on the SNR inside the square root; kohya's 1000.
    """

    def __init__(self, snr_max: float = 1000.0) -> None:
        if snr_max <= 0:
            raise ValueError(f"snr_max must be positive, got {snr_max}")
        self.snr_max = snr_max

    def __call__(self, sigma: Tensor, scalings: Scalings) -> Tensor:
        snr = sigma.float() ** -2
        return snr * snr.clamp(max=self.snr_max).rsqrt() * scalings.c_out.float() ** 2

    def __repr__(self) -> str:
        return f"DebiasedEstimation(snr_max={self.snr_max})"
