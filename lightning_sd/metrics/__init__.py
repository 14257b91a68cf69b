"""Image metrics for evaluation callbacks: CLIP score, FID/KID, DreamBooth CLIP-I/CLIP-T/DINO.

Importing this package is cheap: open_clip, timm and torchmetrics' image metrics load only when
a metric's ``load`` runs, at the start of a run.
"""

from lightning_sd.metrics.backbones import EfficientNetLite0, FeatureBackbone, InceptionV3
from lightning_sd.metrics.base import ImageMetric, MetricWeightsError
from lightning_sd.metrics.clip import CLIPMetrics
from lightning_sd.metrics.dino import DINOSimilarity
from lightning_sd.metrics.frechet import FrechetDistance

__all__ = [
    "CLIPMetrics",
    "DINOSimilarity",
    "EfficientNetLite0",
    "FeatureBackbone",
    "FrechetDistance",
    "ImageMetric",
    "InceptionV3",
    "MetricWeightsError",
]
