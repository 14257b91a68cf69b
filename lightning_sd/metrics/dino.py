"""DreamBooth's DINO subject fidelity (Ruiz et al. 2023) with a DINO ViT through timm."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lightning_sd.metrics.base import ImageMetric, MetricWeightsError
from lightning_sd.metrics.clip import pairwise_cosine
from lightning_sd.metrics.images import normalize, resize_center_crop

__all__ = ["DINOSimilarity"]


class DINOSimilarity(ImageMetric):
    """``dino``: mean cosine similarity of DINO [CLS] embeddings over every (generated,
    reference) pair.

    Ruiz et al. 2023 (Sec. 4.1) prefer it to CLIP-I for subject fidelity: DINO's
    self-supervised training keeps apart subjects of one class that CLIP, trained on captions,
    maps close together. Their backbone is ViT-S/16 DINO (Caron et al. 2021), timm's
    ``vit_small_patch16_224.dino``.

    Args:
        weights: local timm-format weights file (e.g. ``model.safetensors`` of the hub repo
            ``timm/vit_small_patch16_224.dino``); default timm's pretrained weights from the
            Hugging Face cache (which ``HF_HUB_OFFLINE=1`` keeps from downloading).
        model_name: timm architecture (with tag) the weights belong to.
        batch_size: images per network call.
    """

    needs_reference = True

    def __init__(
        self,
        weights: str | None = None,
        model_name: str = "vit_small_patch16_224.dino",
        batch_size: int = 16,
    ):
        self.weights = weights
        self.model_name = model_name
        self.batch_size = batch_size
        self.model: torch.nn.Module | None = None
        self.reference: torch.Tensor | None = None

    def load(self, device: torch.device) -> None:
        import timm

        fix = (
            'download it once with `python -c "import timm; timm.create_model('
            f"'{self.model_name}', pretrained=True)\"` (it fills the Hugging Face cache) or set "
            "weights to a local .safetensors/.pth file"
        )
        if self.weights is not None and not os.path.isfile(self.weights):
            raise MetricWeightsError(f"DINO: weights file {self.weights!r} does not exist; {fix}")
        overlay = {"file": self.weights} if self.weights else None
        try:
            model = timm.create_model(
                self.model_name, pretrained=True, num_classes=0, pretrained_cfg_overlay=overlay
            )
        except Exception as err:
            raise MetricWeightsError(
                f"DINO: timm could not load {self.model_name} (offline, or not downloaded: "
                f"{err}); {fix}"
            ) from err
        self.model = model.to(device).eval().requires_grad_(False)
        cfg = model.pretrained_cfg
        self.size, self.mean, self.std = cfg["input_size"][-1], cfg["mean"], cfg["std"]
        self.device = device

    @torch.no_grad()
    def embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm [CLS] embeddings of images (N, 3, H, W) in [0, 1]."""
        out = []
        for chunk in images.split(self.batch_size):
            x = resize_center_crop(chunk.to(self.device).float(), self.size)
            out.append(self.model(normalize(x, self.mean, self.std)).float())
        return F.normalize(torch.cat(out), dim=-1)

    def set_reference(self, images: torch.Tensor) -> None:
        self.reference = self.embeddings(images)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        return {"dino": float(pairwise_cosine(self.embeddings(images), self.reference))}
