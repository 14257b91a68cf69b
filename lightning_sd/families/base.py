"""What a model family is: everything that differs between SD1.x/2.x, SDXL and SD3.

The LightningModule, ``generate``, export, merge, the callbacks and the model card hold a
:class:`ModelFamily` and ask it; none of them tests which family it is. A family is a small
constructor part (YAML: ``model.family: {class_path: lightning_sd.families.SD3}``), detected from
the pipeline's ``model_index.json`` when not configured.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["Components", "ModelFamily", "default_objective"]


@dataclass
class Components:
    """A pipeline's parts, as separate modules so each can be frozen, cast and adapted alone.

    ``text_encoders`` and ``tokenizers`` are keyed by their diffusers names (``text_encoder``,
    ``text_encoder_2``, ``text_encoder_3``); an optional part left out (SD3's T5) is absent.
    """

    family: ModelFamily
    vae: Any  # diffusers AutoencoderKL
    denoiser: Any  # UNet2DConditionModel or SD3Transformer2DModel
    scheduler: Any  # the checkpoint's training noise schedule (a diffusers scheduler)
    text_encoders: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, Any] = field(default_factory=dict)

    def modules(self) -> dict[str, nn.Module]:
        """Every network by its diffusers name: what a pipeline's attributes are called."""
        return {"vae": self.vae, self.family.denoiser_name: self.denoiser, **self.text_encoders}


def _class(entry: list | None, default: tuple[str, str]) -> Any:
    """A model_index.json entry ``[library, class]`` to the class (default when absent)."""
    lib, name = entry if entry and entry[0] else default
    return getattr(importlib.import_module(lib), name)


class ModelFamily:
    """Base class: the facts and functions one family of pipelines shares.

    Subclasses set the class attributes and implement :meth:`text_embeddings` and
    :meth:`conditioning`; the rest is shared.
    """

    pipeline_name: ClassVar[str]  # the diffusers pipeline that generates and reads LoRA files
    description: ClassVar[str]  # for error messages: "SD1.x/2.x (one text encoder)"
    denoiser_name: ClassVar[str] = "unet"
    denoiser_class: ClassVar[tuple[str, str]] = ("diffusers", "UNet2DConditionModel")
    # diffusers name -> (library, class) used when model_index.json names none
    text_encoder_classes: ClassVar[dict[str, tuple[str, str]]] = {
        "text_encoder": ("transformers", "CLIPTextModel")
    }
    optional_parts: ClassVar[tuple[str, ...]] = ()  # parts a user may leave out (SD3's T5)
    kohya_prefixes: ClassVar[dict[str, str]] = {}
    # pivotal-tuning embeddings: diffusers text-encoder name -> key in the A1111 layout
    embedding_keys: ClassVar[dict[str, str]] = {"text_encoder": "clip_l"}

    @property
    def name(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        return f"{self.name}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash(type(self))

    # -- parts ----------------------------------------------------------------------------
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_name)

    def skipped_parts(self) -> tuple[str, ...]:
        """Optional parts this configuration leaves out (not loaded, not used)."""
        return ()

    def pipeline_kwargs(self, index: dict) -> dict:
        """Extra ``from_pretrained`` arguments of the pipeline class: the optional parts left
        out by this configuration or absent from the folder (``model_index.json``) are None."""
        absent = [p for p in self.optional_parts if not (index.get(p) or [None])[0]]
        parts = set(self.skipped_parts()) | set(absent)
        return {name: None for part in parts for name in (part, _tokenizer_name(part))}

    def load(
        self,
        path: str,
        index: dict,
        revision: str | None = None,
        variant: str | None = None,
        dtype: torch.dtype = torch.float32,
        vae_name_or_path: str | None = None,
        scheduler: Any = None,
    ) -> Components:
        """The pipeline's parts through each class's ``from_pretrained(subfolder=...)``,
        frozen and in eval mode, as diffusers loads them."""
        from diffusers import AutoencoderKL

        src = dict(pretrained_model_name_or_path=path, revision=revision)
        weights = dict(src, variant=variant, torch_dtype=dtype)
        vae = (
            AutoencoderKL.from_pretrained(vae_name_or_path, torch_dtype=dtype)
            if vae_name_or_path
            else AutoencoderKL.from_pretrained(subfolder="vae", **weights)
        )
        denoiser_cls = _class(index.get(self.denoiser_name), self.denoiser_class)
        encoders, tokenizers = {}, {}
        for name, default in self.text_encoder_classes.items():
            if name in self.skipped_parts() or (
                name in self.optional_parts and not (index.get(name) or [None])[0]
            ):
                continue
            tok = _tokenizer_name(name)
            encoders[name] = _class(index.get(name), default).from_pretrained(
                subfolder=name, **weights
            )
            tokenizers[name] = _class(
                index.get(tok), ("transformers", "CLIPTokenizer")
            ).from_pretrained(subfolder=tok, **src)
        parts = Components(
            family=self,
            vae=vae,
            denoiser=denoiser_cls.from_pretrained(subfolder=self.denoiser_name, **weights),
            scheduler=scheduler,
            text_encoders=encoders,
            tokenizers=tokenizers,
        )
        for module in parts.modules().values():
            module.requires_grad_(False)
            module.eval()
        return parts

    def load_part(self, path: str, name: str) -> nn.Module:
        """One network of the pipeline (the denoiser or a text encoder), frozen, in eval mode."""
        from lightning_sd.components import _model_index

        index = _model_index(path)
        default = (
            self.denoiser_class if name == self.denoiser_name else self.text_encoder_classes[name]
        )
        return _class(index.get(name), default).from_pretrained(path, subfolder=name).eval()

    # -- text and conditioning ---------------------------------------------------------------
    def text_embeddings(
        self, tokenizers: dict, encoders: dict, prompts: list[str], clip_skip: int = 0
    ) -> dict[str, torch.Tensor]:
        """Prompts to what depends on the prompt alone (what the text cache stores).

        Training, validation grids, class images and ``generate`` all call this.
        """
        raise NotImplementedError

    def conditioning(
        self, text: dict, image_size: tuple[int, int], batch: dict | None = None
    ) -> dict:
        """Text embeddings to the denoiser's keyword arguments, adding what depends on the
        image (SDXL's size and crop conditioning, from the batch's sizes when it has them)."""
        raise NotImplementedError

    def denoiser_fn(self, denoiser: nn.Module) -> Callable[..., torch.Tensor]:
        """The network as objectives call it: ``model(x_in, t, **cond) -> output``."""

        def call(x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
            return denoiser(x, t, **cond, return_dict=False)[0]

        return call

    def unused_last_layers(self, name: str, clip_skip: int) -> int:
        """Last layers of a text encoder whose output nothing reads: they get no adapter
        (an adapter without gradient breaks DDP)."""
        return clip_skip if name == "text_encoder" else 0

    # -- files and facts ---------------------------------------------------------------------
    def lora_writer(self) -> type:
        """The diffusers class whose ``save_lora_weights`` writes this family's LoRA file."""
        return self.pipeline_class()

    def facts(self) -> dict:
        """What the model card and the file header say about the base."""
        return {"pipeline": self.pipeline_name, "family": self.name}

    def default_objective(self, scheduler: Any):
        """The objective the checkpoint was trained with: read from its scheduler config."""
        return default_objective(scheduler)


def _tokenizer_name(encoder_name: str) -> str:
    return encoder_name.replace("text_encoder", "tokenizer")


def default_objective(scheduler: Any):
    """Epsilon or v from ``prediction_type`` (SD1.5, SD2.x-v), EDM for EDM-native schedulers
    (Playground v2.5), rectified flow for ``FlowMatchEulerDiscreteScheduler`` (SD3)."""
    from lightning_sd.objectives import (
        EDM,
        DiffusionObjective,
        Epsilon,
        FlowMatching,
        FlowTimesteps,
        Sample,
        SD3Weighting,
        VPrediction,
    )
    from lightning_sd.objectives.schedule import is_edm_scheduler

    if type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler":
        return DiffusionObjective(FlowMatching(), FlowTimesteps(), SD3Weighting())
    if is_edm_scheduler(scheduler):
        return DiffusionObjective(EDM(sigma_data=scheduler.config.get("sigma_data", 0.5)))
    prediction = scheduler.config.get("prediction_type", "epsilon")
    by_prediction = {"epsilon": Epsilon, "v_prediction": VPrediction, "sample": Sample}
    return DiffusionObjective(by_prediction[prediction]())


def warn_if_contradicts(objective, scheduler) -> None:
    """One warning when a configured parameterization is not what the checkpoint predicts.

    Flow and EDM mismatches are already warned about by ``set_schedule``; this covers the
    DDPM-family ones (epsilon on a v-prediction base and the reverse).
    """
    expected = default_objective(scheduler).parameterization
    given = objective.parameterization
    names = {"FlowMatching", "EDM"}
    if type(given) is type(expected) or names & {type(given).__name__, type(expected).__name__}:
        return
    warnings.warn(
        f"the objective predicts with {given}, but the base model's scheduler says it predicts "
        f"{expected} (prediction_type={scheduler.config.get('prediction_type')!r}); "
        "leave model.objective unset to train with what the checkpoint was trained with",
        stacklevel=3,
    )
