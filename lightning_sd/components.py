"""The parts of a diffusers Stable Diffusion pipeline that training needs, loaded frozen.

One loader serves every family (SD1.x/2.x, SDXL with Playground v2.5, SD3): the folder's
``model_index.json`` says which family it is and which classes its parts are, so nothing is
configured by hand and a hub id, a local folder and ``HF_HUB_OFFLINE=1`` behave alike.
"""

from __future__ import annotations

import torch

from lightning_sd.families.base import Components, ModelFamily

__all__ = [
    "BUILTIN_MODELS",
    "Components",
    "load_components",
    "load_scheduler",
    "resolve_model",
]

# Pipelines that ship inside the package, loadable by name from Python and YAML.
BUILTIN_MODELS = ("tiny-pretrained",)


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


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    vae_name_or_path: str | None = None,
    family: ModelFamily | None = None,
) -> Components:
    """Load a pipeline's parts from a hub id or a local folder, frozen and in eval mode.

    The family (SD1.x/2.x, SDXL, SD3) comes from the folder's ``model_index.json``; loading
    goes through each class's ``from_pretrained`` with ``subfolder=``, exactly as diffusers does.

    Args:
        pretrained_model_name_or_path: e.g. ``stable-diffusion-v1-5/stable-diffusion-v1-5``,
            ``stabilityai/stable-diffusion-3.5-medium`` or a folder written by
            ``lightning-sd tiny-pipeline``.
        revision: a hub branch, tag or commit.
        variant: a weight-file variant such as ``fp16``.
        dtype: dtype of the frozen weights; adapters added later are kept in float32.
        vae_name_or_path: a standalone VAE (hub id or folder with the VAE's config at its root)
            used instead of the pipeline's, e.g. ``madebyollin/sdxl-vae-fp16-fix``.
        family: the family with its settings (e.g. ``SD3(t5=False)``); default detected.
    """
    from lightning_sd.families import check_family, family_from_index

    path = resolve_model(pretrained_model_name_or_path)
    try:
        index = _model_index(path, revision)
        where = repr(pretrained_model_name_or_path)
        family = check_family(family, family_from_index(index), where)
        return family.load(
            path, index, revision, variant, dtype, vae_name_or_path,
            scheduler=load_scheduler(path, revision),
        )  # fmt: skip
    except OSError as err:
        raise OSError(
            f"could not load a Stable Diffusion pipeline from {pretrained_model_name_or_path!r} "
            "(expected a hub id or a folder with model_index.json, vae/, text_encoder/, "
            f"tokenizer/, unet/ or transformer/, scheduler/ ...): {err}"
        ) from err


def _model_index(pretrained_model_name_or_path: str, revision: str | None = None) -> dict:
    """The pipeline's ``model_index.json``: its class and each component's [library, class]."""
    from diffusers import DiffusionPipeline

    path = resolve_model(pretrained_model_name_or_path)
    return dict(DiffusionPipeline.load_config(path, revision=revision))


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
