"""CLIP score (Hessel et al. 2021), DreamBooth's CLIP-T and CLIP-I (Ruiz et al. 2023): open_clip."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from lightning_sd.metrics.base import ImageMetric, MetricWeightsError
from lightning_sd.metrics.images import normalize, resize_center_crop

__all__ = ["CLIPMetrics", "load_open_clip", "pairwise_cosine"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over every (row of ``a``, row of ``b``) pair."""
    return (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T).mean()


def load_open_clip(model_name: str, pretrained: str | None, device: torch.device, metric: str):
    """An open_clip model and its tokenizer, or a :class:`MetricWeightsError` saying how to fix it.

    ``require_pretrained`` makes open_clip refuse to hand back random weights when a folder or
    tag resolves to no checkpoint.
    """
    import open_clip

    is_path = pretrained is not None and (
        os.sep in pretrained or pretrained.endswith(WEIGHT_SUFFIXES)
    )
    if is_path and not os.path.isfile(pretrained):
        raise MetricWeightsError(
            f"{metric}: CLIP weights file {pretrained!r} does not exist; set pretrained to an "
            "open_clip checkpoint (.safetensors/.bin/.pt) or to a pretrained tag"
        )
    where = model_name if pretrained is None else f"{model_name}/{pretrained}"
    if model_name.startswith("local-dir:"):
        fix = "the folder must hold open_clip_config.json and the weights file"
    else:
        fix = (
            'download it once with `python -c "import open_clip; open_clip.create_model('
            f"'{model_name}', pretrained='{pretrained}')\"` (it fills the Hugging Face cache), "
            "or set pretrained to a local .safetensors/.bin file, or model_name to "
            "'local-dir:/folder' holding open_clip_config.json and the weights"
        )
    try:
        model = open_clip.create_model(
            model_name, pretrained=pretrained, device=device, require_pretrained=True
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except Exception as err:
        raise MetricWeightsError(
            f"{metric}: open_clip could not load {where} offline ({err}); {fix}"
        ) from err
    return model.eval().requires_grad_(False), tokenizer


class CLIPMetrics(ImageMetric):
    """Text-image and image-image agreement measured with one CLIP model.

    Logs, over N generated images x_i with prompts c_i and CLIP embeddings E:

    - ``clip_score`` = mean_i 100 * max(cos(E_I(x_i), E_T(c_i)), 0) (Hessel et al. 2021, with
      the weight w = 100 of torchmetrics' ``CLIPScore``);
    - ``clip_t`` = mean_i cos(E_I(x_i), E_T(c_i)), DreamBooth's prompt fidelity (Ruiz et al.
      2023, Sec. 4.1);
    - ``clip_i`` = mean over (generated, reference) pairs of cos(E_I(x), E_I(r)), DreamBooth's
      subject fidelity; only when the callback has reference images.

    Args:
        model_name: open_clip architecture (``ViT-L-14-quickgelu``: the activation OpenAI's
            weights were trained with), ``local-dir:/folder`` (a folder with
            ``open_clip_config.json`` and the weights, the layout of open_clip hub repos) or
            ``hf-hub:org/repo``.
        pretrained: open_clip pretrained tag (``openai``) or a local weights file; ignored
            (use None) with ``local-dir:`` and ``hf-hub:`` names, which carry their weights.
        batch_size: images or prompts per network call.
    """

    def __init__(
        self,
        model_name: str = "ViT-L-14-quickgelu",
        pretrained: str | None = "openai",
        batch_size: int = 16,
    ):
        self.model_name = model_name
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.model = self.tokenizer = None
        self.reference: torch.Tensor | None = None

    def load(self, device: torch.device) -> None:
        self.model, self.tokenizer = load_open_clip(
            self.model_name, self.pretrained, device, metric="CLIP score"
        )
        from open_clip import get_model_preprocess_cfg

        cfg = get_model_preprocess_cfg(self.model)
        size = cfg["size"]
        self.size = size if isinstance(size, int) else size[0]
        self.mean, self.std = cfg["mean"], cfg["std"]
        self.device = device

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm CLIP image embeddings of images (N, 3, H, W) in [0, 1]."""
        out = []
        for chunk in images.split(self.batch_size):
            x = normalize(
                resize_center_crop(chunk.to(self.device).float(), self.size), self.mean, self.std
            )
            out.append(self.model.encode_image(x).float())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm CLIP text embeddings, one per prompt."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.tokenizer(prompts[start : start + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(out), dim=-1)

    def set_reference(self, images: torch.Tensor) -> None:
        self.reference = self.image_embeddings(images)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        image_emb = self.image_embeddings(images)
        cos = (image_emb * self.text_embeddings(prompts)).sum(-1)
        values = {
            "clip_score": float((100 * cos.clamp(min=0)).mean()),
            "clip_t": float(cos.mean()),
        }
        if self.reference is not None:
            values["clip_i"] = float(pairwise_cosine(image_emb, self.reference))
        return values
