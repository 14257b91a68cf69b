"""DreamBooth outcome measures on offline ImageNet features (EfficientNet-Lite0 from a wheel).

- subject fidelity: mean cosine similarity between samples of the subject prompt and real,
  held-out images of the subject (the DINO / CLIP-I score of Ruiz et al. 2023, on another
  backbone);
- prior drift: mean cosine distance between what the base and the fine-tuned model draw for
  the same prompt and seed (how far fine-tuning moved the model's prior, ideally small for
  unrelated prompts);
- retrieval: for generated images of N captions, the rank of the real image of the same
  caption among the N real images (top-k accuracy; chance is k / N).

The demo, the slow test and the benchmarks share these functions, so they report one thing.
"""

from __future__ import annotations

import torch

from lightning_sd.metrics.backbones import EfficientNetLite0

__all__ = ["FeatureSpace", "prior_drift", "retrieval_accuracy", "subject_fidelity"]


class FeatureSpace:
    """L2-normalised EfficientNet-Lite0 pooled features (1280-d) of images in [0, 1].

    Args:
        device: where the network runs.
        size: the side images are resized to; 128 px by default rather than the network's
            224: the images compared here are 32-64 px, and a third of the compute keeps the
            demo within minutes on two CPU cores.
    """

    def __init__(self, device: torch.device | str = "cpu", size: int = 128):
        self.device = torch.device(device)
        self.net = EfficientNetLite0().load(self.device)
        self.net.size = size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        feats = [self.net(b.to(self.device)).float() for b in images.split(batch_size)]
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1).cpu()


def subject_fidelity(samples: torch.Tensor, subject: torch.Tensor) -> float:
    """Mean cosine similarity over all (sample, real subject image) feature pairs."""
    return float((samples @ subject.T).mean())


def prior_drift(base: torch.Tensor, tuned: torch.Tensor) -> float:
    """Mean cosine distance between paired features (same prompt and seed)."""
    return float(1 - (base * tuned).sum(-1).mean())


def retrieval_accuracy(
    generated: torch.Tensor, real: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """Top-k accuracy of finding real[i] among all real images from generated[i] (paired rows)."""
    sims = generated @ real.T
    target = sims.diagonal().unsqueeze(1)
    rank = (sims > target).sum(1)  # 0 = the right image ranks first
    return {k: float((rank < k).float().mean()) for k in ks}
