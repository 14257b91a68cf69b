"""The contract every image metric follows, and the error that missing weights raise."""

from __future__ import annotations

import torch

__all__ = ["ImageMetric", "MetricWeightsError"]


class MetricWeightsError(RuntimeError):
    """A metric's network could not be loaded; the message names the metric and the fix.

    Raised at start-up (the evaluation callback's ``setup``), never in the middle of a run.
    """


class ImageMetric:
    """One family of metrics over generated images (e.g. FID and KID on one backbone).

    Metrics are plain objects, not ``nn.Module``: they live on a callback, so no strategy
    casts, wraps or shards their networks, and no checkpoint stores them. Constructors only
    record settings (they are the YAML schema and must not touch files); ``load`` builds the
    networks, which is where missing weights fail.

    Attributes:
        needs_reference: whether ``set_reference`` must be called before ``__call__``.
        min_images: the fewest generated images the metric is defined for.
    """

    needs_reference: bool = False
    min_images: int = 1

    def load(self, device: torch.device) -> None:
        """Build the networks on ``device``; raise :class:`MetricWeightsError` if weights lack."""

    def set_reference(self, images: torch.Tensor) -> None:
        """Real images (N, 3, H, W) in [0, 1] to compare generated images with; kept as features."""

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Metric values for generated images (N, 3, H, W) in [0, 1] and their N prompts."""
        raise NotImplementedError
