"""What the network predicts, written as the preconditioning of Karras et al. 2022.

Every parameterization is one choice of (c_skip, c_out, c_in) in

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),

where x = x0 + sigma * eps and D estimates x0. The loss (see ``objective.py``) regresses F on
the target (x0 - c_skip x) / c_out, so no code elsewhere needs to know which one is in use.
c_noise is the schedule's business (``DiscreteSchedule.sigma_to_t``), not the
parameterization's: a discrete model keeps its timestep conditioning whatever it predicts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Scalings(NamedTuple):
    """Preconditioning coefficients, each shaped like the sigma they were computed from."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor


def _variance_preserving_c_in(sigma: Tensor) -> Tensor:
    # x / sqrt(sigma^2 + 1) = sqrt(ac) x0 + sqrt(1 - ac) eps: the DDPM input (Ho et al. 2020).
    return torch.rsqrt(sigma**2 + 1.0)


class Parameterization:
    """Base class: maps noise levels sigma to :class:`Scalings`.

    Attributes:
        prediction_type: The name diffusers gives this target in a scheduler config, used when
            exporting or sampling with diffusers pipelines.
    """

    prediction_type: str = ""

    def __call__(self, sigma: Tensor) -> Scalings:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Epsilon(Parameterization):
    """Predict the noise eps (Ho et al. 2020): the target of Stable Diffusion 1.x/2-base/XL.

    D = x - sigma F, so c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1).
    """

    prediction_type = "epsilon"

    def __call__(self, sigma: Tensor) -> Scalings:
        return Scalings(torch.ones_like(sigma), -sigma, _variance_preserving_c_in(sigma))


class VPrediction(Parameterization):
    """Predict the velocity v = alpha eps - sigma_t x0 (Salimans & Ho 2022, Sec. 4; SD 2.x 768).

    In VE form: c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1),
    c_in = 1 / sqrt(sigma^2 + 1). The target equals diffusers' ``get_velocity``. It is
    ``EDM(sigma_data=1)`` with the sign of c_out flipped.
    """

    prediction_type = "v_prediction"

    def __call__(self, sigma: Tensor) -> Scalings:
        c_in = _variance_preserving_c_in(sigma)
        return Scalings(c_in**2, -sigma * c_in, c_in)


class Sample(Parameterization):
    """Predict x0 directly: c_skip = 0, c_out = 1, c_in = 1 / sqrt(sigma^2 + 1)."""

    prediction_type = "sample"

    def __call__(self, sigma: Tensor) -> Scalings:
        return Scalings(
            torch.zeros_like(sigma), torch.ones_like(sigma), _variance_preserving_c_in(sigma)
        )


class EDM(Parameterization):
    """EDM preconditioning (Karras et al. 2022, Table 1, "Network and preconditioning").

    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2), c_out = sigma sigma_data /
    sqrt(sigma^2 + sigma_data^2), c_in = 1 / sqrt(sigma^2 + sigma_data^2): unit-variance input
    and target at every sigma when the data has standard deviation sigma_data.

    diffusers' ``EDMEulerScheduler`` applies the same formulas under prediction_type
    "epsilon" (and negates c_out under "v_prediction"); here the name is "edm" because the
    target is neither eps nor v.

    Args:
        sigma_data: Standard deviation of the data (latents); 0.5 in the paper and in diffusers.
    """

    prediction_type = "edm"

    def __init__(self, sigma_data: float = 0.5) -> None:
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.sigma_data = sigma_data

    def __call__(self, sigma: Tensor) -> Scalings:
        sd2 = self.sigma_data**2
        c_in = torch.rsqrt(sigma**2 + sd2)
        return Scalings(sd2 * c_in**2, sigma * self.sigma_data * c_in, c_in)

    def __repr__(self) -> str:
        return f"EDM(sigma_data={self.sigma_data})"
