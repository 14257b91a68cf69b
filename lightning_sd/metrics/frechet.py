"""FID (Heusel et al. 2017) and KID (Binkowski et al. 2018) via torchmetrics, on any backbone."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lightning_sd.metrics.backbones import FeatureBackbone, InceptionV3
from lightning_sd.metrics.base import ImageMetric

__all__ = ["FrechetDistance"]


class _Features(nn.Module):
    """Passes precomputed features through, so FID and KID share one backbone pass."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class FrechetDistance(ImageMetric):
    """Distances between the feature distributions of generated and reference images.

    - ``fid<suffix>``: ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2)), the Frechet
      distance of Gaussians fitted to the features (Heusel et al. 2017);
    - ``kid<suffix>``: the unbiased squared MMD with kernel k(x, y) = (x.y / d + 1)^3,
      averaged over random subsets (Binkowski et al. 2018); unbiased, so usable at the small
      sample sizes of DreamBooth, where FID is strongly biased upwards.

    The suffix comes from the backbone (empty for Inception). Both are computed by torchmetrics'
    ``FrechetInceptionDistance`` and ``KernelInceptionDistance`` with ``sync_on_compute=False``:
    evaluation runs on rank 0 only, and a cross-process sync there would wait forever.

    Args:
        backbone: the feature network; default the standard Inception-v3.
        kid_subsets: number of random subsets KID averages over.
        kid_subset_size: KID subset size, capped by the number of images in each set.
    """

    needs_reference = True
    min_images = 2

    def __init__(
        self,
        backbone: FeatureBackbone | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
    ):
        self.backbone = backbone if backbone is not None else InceptionV3()
        self.kid_subsets = kid_subsets
        self.kid_subset_size = kid_subset_size
        self.net: nn.Module | None = None
        self.reference: torch.Tensor | None = None

    def load(self, device: torch.device) -> None:
        self.net = self.backbone.load(device)
        self.device = device

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Backbone features (N, D) of images (N, 3, H, W) in [0, 1]."""
        return torch.cat([self.net(b.to(self.device)).float() for b in images.split(batch_size)])

    def set_reference(self, images: torch.Tensor) -> None:
        self.reference = self.features(images)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        return self.distances(self.reference, self.features(images))

    def distances(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        """FID and KID between two feature sets (N, D) and (M, D)."""
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        dim = real.shape[1]
        subset = min(self.kid_subset_size, len(real), len(fake))
        fid = FrechetInceptionDistance(feature=_Features(dim), sync_on_compute=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            kid = KernelInceptionDistance(
                feature=_Features(dim),
                subsets=self.kid_subsets,
                subset_size=subset,
                sync_on_compute=False,
            )
        fid, kid = fid.to(real.device), kid.to(real.device)
        for metric in (fid, kid):
            metric.update(real, real=True)
            metric.update(fake, real=False)
        # KID draws its subsets with torch's global RNG: a fixed seed makes the same two sets
        # always give the same number, and leaves the caller's RNG stream alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            kid_mean = float(kid.compute()[0])
        suffix = self.backbone.metric_suffix
        return {f"fid{suffix}": float(fid.compute()), f"kid{suffix}": kid_mean}
