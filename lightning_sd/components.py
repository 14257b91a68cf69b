"""The parts of a diffusers Stable Diffusion pipeline that training needs, loaded frozen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Components", "load_components", "load_scheduler"]


@dataclass
class Components:
    """A pipeline's parts, as separate modules so each can be frozen, cast and adapted alone."""

    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    unet: Any  # diffusers UNet2DConditionModel
    scheduler: Any  # the checkpoint's training noise schedule (a diffusers scheduler)


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Components:
    """Load a pipeline's parts from a hub id or a local folder, frozen and in eval mode.

    Loading goes through each class's ``from_pretrained`` with ``subfolder=``, exactly as
    diffusers does, so a hub id, a local folder and ``HF_HUB_OFFLINE=1`` behave as users expect.

    Args:
        pretrained_model_name_or_path: e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5`` or
            a folder written by ``lightning-sd tiny-pipeline``.
        revision: a hub branch, tag or commit.
        variant: a weight-file variant such as ``fp16``.
        dtype: dtype of the frozen weights; adapters added later are kept in float32.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    src = dict(pretrained_model_name_or_path=pretrained_model_name_or_path, revision=revision)
    weights = dict(src, variant=variant, torch_dtype=dtype)
    try:
        parts = Components(
            vae=AutoencoderKL.from_pretrained(subfolder="vae", **weights),
            text_encoder=CLIPTextModel.from_pretrained(subfolder="text_encoder", **weights),
            tokenizer=CLIPTokenizer.from_pretrained(subfolder="tokenizer", **src),
            unet=UNet2DConditionModel.from_pretrained(subfolder="unet", **weights),
            scheduler=load_scheduler(**src),
        )
    except OSError as err:
        raise OSError(
            f"could not load a Stable Diffusion pipeline from {pretrained_model_name_or_path!r} "
            "(expected a hub id or a folder with vae/, text_encoder/, tokenizer/, unet/, "
            f"scheduler/): {err}"
        ) from err
    for module in (parts.vae, parts.text_encoder, parts.unet):
        module.requires_grad_(False)
        module.eval()
    return parts


def load_scheduler(pretrained_model_name_or_path: str, revision: str | None = None):
    """The checkpoint's own scheduler class and config: the schedule is never set by hand.

    The class matters: an EDM-native model (``EDMEulerScheduler``) has no DDPM alphas.
    """
    import diffusers

    config = diffusers.DDPMScheduler.load_config(
        pretrained_model_name_or_path, subfolder="scheduler", revision=revision
    )
    cls = getattr(diffusers, config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
    return cls.from_config(config)
