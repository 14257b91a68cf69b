"""The parts of a diffusers Stable Diffusion pipeline that training needs, loaded frozen.

One loader serves SD1.x/2.x and SDXL-family pipelines (SDXL, Playground v2.5): the folder's
``model_index.json`` says which text encoders exist and which classes they are, so nothing is
configured by hand and a hub id, a local folder and ``HF_HUB_OFFLINE=1`` behave alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BUILTIN_MODELS",
    "Components",
    "load_components",
    "load_scheduler",
    "pipeline_class",
    "resolve_model",
]

# Pipelines that ship inside the package, loadable by name from Python and YAML.
BUILTIN_MODELS = ("tiny-pretrained",)


@dataclass
class Components:
    """A pipeline's parts, as separate modules so each can be frozen, cast and adapted alone.

    ``text_encoder_2`` / ``tokenizer_2`` are SDXL's second (OpenCLIP bigG) encoder and its
    tokenizer; ``None`` for SD1.x/2.x.
    """

    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    unet: Any  # diffusers UNet2DConditionModel
    scheduler: Any  # the checkpoint's training noise schedule (a diffusers scheduler)
    text_encoder_2: Any = None  # transformers CLIPTextModelWithProjection (SDXL)
    tokenizer_2: Any = None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def pipeline_class(self) -> type:
        """The diffusers pipeline that loads these parts' LoRA files and runs them."""
        import diffusers

        name = "StableDiffusionXLPipeline" if self.is_sdxl else "StableDiffusionPipeline"
        return getattr(diffusers, name)

    def text_encoders(self) -> dict[str, Any]:
        """The text encoders by diffusers name (``text_encoder``, ``text_encoder_2``)."""
        encoders = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in encoders.items() if v is not None}


def resolve_model(pretrained_model_name_or_path: str) -> str:
    """A shipped pipeline's folder for its name (``tiny-pretrained``); anything else unchanged.

    A local folder of the same name wins, so the name never hides a user's directory.
    """
    import os

    if pretrained_model_name_or_path in BUILTIN_MODELS and not os.path.isdir(
        pretrained_model_name_or_path
    ):
        from lightning_sd.pretrained.base import pretrained_path

        return str(pretrained_path())
    return pretrained_model_name_or_path


def _class(entry: list | None, default: str, library: str) -> Any:
    """A model_index.json entry ``[library, class]`` to the class (default when absent)."""
    import importlib

    lib, name = entry if entry and entry[0] else (library, default)
    return getattr(importlib.import_module(lib), name)


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_name_or_path: str | None = None,
) -> Components:
    """Load a pipeline's parts from a hub id or a local folder, frozen and in eval mode.

    Loading goes through each class's ``from_pretrained`` with ``subfolder=``, exactly as
    diffusers does.

    Args:
        pretrained_model_name_or_path: e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            ``stabilityai/stable-diffusion-xl-base-1.0`` or a folder written by
            ``lightning-sd tiny-pipeline``.
        revision: a hub branch, tag or commit.
        variant: a weight-file variant such as ``fp16``.
        dtype: dtype of the frozen weights; adapters added later are kept in float32.
        vae_name_or_path: a standalone VAE (hub id or folder with the VAE's config at its root)
            used instead of the pipeline's, e.g. ``madebyollin/sdxl-vae-fp16-fix``.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    pretrained_model_name_or_path = resolve_model(pretrained_model_name_or_path)
    src = dict(pretrained_model_name_or_path=pretrained_model_name_or_path, revision=revision)
    weights = dict(src, variant=variant, torch_dtype=dtype)
    try:
        index = _model_index(pretrained_model_name_or_path, revision)
        te_cls = _class(index.get("text_encoder"), "CLIPTextModel", "transformers")
        tok_cls = _class(index.get("tokenizer"), "CLIPTokenizer", "transformers")
        vae = (
            AutoencoderKL.from_pretrained(vae_name_or_path, torch_dtype=dtype)
            if vae_name_or_path
            else AutoencoderKL.from_pretrained(subfolder="vae", **weights)
        )
        parts = Components(
            vae=vae,
            text_encoder=te_cls.from_pretrained(subfolder="text_encoder", **weights),
            tokenizer=tok_cls.from_pretrained(subfolder="tokenizer", **src),
            unet=UNet2DConditionModel.from_pretrained(subfolder="unet", **weights),
            scheduler=load_scheduler(**src),
        )
        if (index.get("text_encoder_2") or [None])[0]:
            te2_cls = _class(index["text_encoder_2"], "CLIPTextModelWithProjection", "transformers")
            tok2_cls = _class(index.get("tokenizer_2"), "CLIPTokenizer", "transformers")
            parts.text_encoder_2 = te2_cls.from_pretrained(subfolder="text_encoder_2", **weights)
            parts.tokenizer_2 = tok2_cls.from_pretrained(subfolder="tokenizer_2", **src)
    except OSError as err:
        raise OSError(
            f"could not load a Stable Diffusion pipeline from {pretrained_model_name_or_path!r} "
            "(expected a hub id or a folder with vae/, text_encoder/, tokenizer/, unet/, "
            f"scheduler/, and for SDXL text_encoder_2/, tokenizer_2/): {err}"
        ) from err
    for module in (parts.vae, parts.unet, *parts.text_encoders().values()):
        module.requires_grad_(False)
        module.eval()
    return parts


def _model_index(pretrained_model_name_or_path: str, revision: str | None = None) -> dict:
    """The pipeline's ``model_index.json``: its class and each component's [library, class]."""
    from diffusers import DiffusionPipeline

    path = resolve_model(pretrained_model_name_or_path)
    return dict(DiffusionPipeline.load_config(path, revision=revision))


def pipeline_class(pretrained_model_name_or_path: str, revision: str | None = None) -> type:
    """The diffusers pipeline class for a base model: SDXL when it has a second text encoder.

    Playground v2.5 and other SDXL derivatives load as ``StableDiffusionXLPipeline``.
    """
    import diffusers

    index = _model_index(pretrained_model_name_or_path, revision)
    sdxl = bool((index.get("text_encoder_2") or [None])[0])
    return diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline


def load_scheduler(pretrained_model_name_or_path: str, revision: str | None = None):
    """The checkpoint's own scheduler class and config: the schedule is never set by hand.

    The class matters: an EDM-native model (``EDMEulerScheduler``, Playground v2.5's
    ``EDMDPMSolverMultistepScheduler``) has no DDPM alphas, and ``EDMSchedule`` is picked for it.
    """
    import diffusers

    config = diffusers.DDPMScheduler.load_config(
        resolve_model(pretrained_model_name_or_path), subfolder="scheduler", revision=revision
    )
    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    return cls.from_config(config)
