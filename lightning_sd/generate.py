"""``lightning-sd generate``: a base pipeline plus LoRA files, prompts x seeds -> images + grid."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from PIL import Image

from lightning_sd.components import _model_index, resolve_model
from lightning_sd.embeddings import EMBEDDINGS_NAME
from lightning_sd.families import ModelFamily, check_family, family_from_index
from lightning_sd.grid import image_grid, save_image_atomic
from lightning_sd.lora_check import (
    check_architecture,
    lora_file,
    read_lora_file,
    warn_if_no_scale,
)
from lightning_sd.lora_io import (
    METADATA_KEY,
    LoRAFileError,
    read_safetensors,
    read_safetensors_metadata,
)
from lightning_sd.lycoris import apply_lycoris, is_lycoris
from lightning_sd.objectives import DiffusionObjective
from lightning_sd.sampling import DPMPP2M, Euler, Heun
from lightning_sd.sampling_spec import SamplingSpec, sample_grid
from lightning_sd.serialization import from_config
from lightning_sd.text_to_image import generate_images

__all__ = ["generate"]

SAMPLERS = {"euler": Euler, "heun": Heun, "dpmpp_2m": DPMPP2M}


class _DropMissingKeysNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No LoRA keys associated to")


@contextmanager
def _quiet_missing_text_encoder_keys():
    """diffusers warns for every UNet-only LoRA that it has no text-encoder keys: expected."""
    loggers = [
        logging.getLogger(n) for n in ("diffusers.loaders.lora_base", "diffusers.loaders.peft")
    ]
    note = _DropMissingKeysNote()
    for logger in loggers:
        logger.addFilter(note)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(note)


def _training_facts(path: Path) -> dict:
    """The ``lightning_sd`` header of a LoRA file or export folder (empty for foreign files)."""
    header = read_safetensors_metadata(lora_file(path))  # refuses pickles and missing files
    return json.loads(header.get(METADATA_KEY, "{}"))


def _agreed(facts: list[dict], key: str, what: str):
    """The one value the files' headers give for ``key`` (None when none gives it)."""
    values = [f[key] for f in facts if key in f]
    if any(v != values[0] for v in values):
        raise ValueError(f"the LoRA files were trained with different {what}: {values}")
    return values[0] if values else None


def _objective(facts: list[dict], family: ModelFamily, scheduler) -> DiffusionObjective:
    """The objective the adapters were trained with (from their headers), else the base's own.

    A LoRA trained with v-prediction on an epsilon base predicts v: sampling it as epsilon
    would be wrong, so the training objective travels in the file.
    """
    config = _agreed(facts, "objective", "objectives (combine files that predict alike)")
    objective = from_config(config) if config else family.default_objective(scheduler)
    objective.set_schedule(scheduler)
    return objective


def _family(paths: list[Path], facts: list[dict], index: dict, base: str) -> ModelFamily:
    """The base's family, with the settings the files were trained with (SD3's T5 length).

    A file trained on another family is refused here, before any weight is read.
    """
    detected = family_from_index(index)
    for path, file_facts in zip(paths, facts, strict=True):
        trained = file_facts.get("family_config")
        if trained and type(from_config(trained)) is not type(detected):
            raise LoRAFileError(
                f"{path} is a LoRA for an {from_config(trained).description} base, but {base} "
                f"is {detected.description}: use a base of the family it was trained on"
            )
    config = _agreed(facts, "family_config", "family settings")
    return check_family(from_config(config) if config else None, detected, base)


def _load_embeddings(
    pipe, family: ModelFamily, lora_paths: list[Path], facts: list[dict]
) -> dict[str, str]:
    """Load pivotal-tuning tokens saved beside the LoRA; returns abstraction -> tokens."""
    substitutions = {}
    for path, file_facts in zip(lora_paths, facts, strict=True):
        folder = path if path.is_dir() else path.parent
        if not (folder / EMBEDDINGS_NAME).is_file():
            continue
        tensors, header = read_safetensors(folder / EMBEDDINGS_NAME)
        tokens = json.loads(header["tokens"])
        # clip_l into text_encoder; clip_g (SDXL, SD3) into text_encoder_2.
        for name, key in family.embedding_keys.items():
            if key in tensors:
                pipe.load_textual_inversion(
                    list(tensors[key]),
                    token=tokens,
                    text_encoder=getattr(pipe, name),
                    tokenizer=getattr(pipe, name.replace("text_encoder", "tokenizer")),
                )
        pivotal = file_facts.get("pivotal_tuning") or {}
        if pivotal.get("token_abstraction"):
            substitutions[pivotal["token_abstraction"]] = "".join(tokens)
    return substitutions


def _networks(pipe, family: ModelFamily) -> dict:
    """The pipeline's networks that kohya-layout files name, by component."""
    return {
        name: getattr(pipe, name)
        for name in family.kohya_prefixes
        if getattr(pipe, name, None) is not None
    }


def generate(
    pretrained_model_name_or_path: str,
    prompts: list[str],
    loras: list[str] | None = None,
    lora_scales: list[float] | None = None,
    fuse: bool = False,
    seeds: list[int] | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    negative_prompt: str = "",
    sampler: Literal["euler", "heun", "dpmpp_2m"] = "dpmpp_2m",
    resolution: int | None = None,
    out_dir: str = "samples",
    revision: str | None = None,
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
) -> list[Path]:
    """Generate one image per prompt and seed from a base model with LoRA adapters.

    SD1.x/2.x, SDXL-family (SDXL, Playground v2.5) and SD3 bases alike: the family comes from
    the base's ``model_index.json``. Prompts are encoded by the family's encoder, the one
    training and the validation grids use, with the clip skip (and SD3's T5 length) that the
    LoRA file records; and the prompts x seeds are sampled as a :class:`SamplingSpec`, row by
    row, as the validation grids are: so the same LoRA, seed and settings give the grid's image.

    Args:
        pretrained_model_name_or_path: the base pipeline (hub id or folder).
        prompts: the prompts; a pivotal-tuning abstraction (``TOK``) is replaced by the new
            tokens saved beside the LoRA.
        loras: LoRA files or export folders (diffusers or kohya layout). LoHa/LoKr files
            (LyCORIS keys), which diffusers does not load for these families, are added to
            the weights at their scale (always fused).
        lora_scales: one scale per LoRA (diffusers ``set_adapters``); default 1 each.
        fuse: merge the adapters into the base weights before sampling (faster steps).
        seeds: seeds; every prompt is drawn once per seed. Default ``[0]``.
        steps: sampler steps.
        guidance_scale: classifier-free guidance weight.
        negative_prompt: the unconditional prompt.
        sampler: ``euler``, ``heun`` or ``dpmpp_2m`` over the objective's denoiser.
        resolution: image side; default the UNet's native size.
        out_dir: where ``<prompt index>_<seed>.png`` and ``grid.png`` go.
        revision: hub revision of the base.
        device: where to run.

    Returns:
        The image paths, then the grid's.
    """
    loras = [Path(p) for p in loras or []]
    seeds = seeds if seeds is not None else [0]
    spec = SamplingSpec(  # the callbacks' spec; bad settings fail here, before any loading
        prompts, seeds, negative_prompt, steps, guidance_scale, SAMPLERS[sampler](), resolution
    )
    scales = lora_scales if lora_scales is not None else [1.0] * len(loras)
    if len(scales) != len(loras):
        raise ValueError(f"{len(loras)} LoRA files but {len(scales)} lora_scales")
    facts = [_training_facts(path) for path in loras]
    index = _model_index(pretrained_model_name_or_path, revision)
    family = _family(loras, facts, index, pretrained_model_name_or_path)
    pipe = family.pipeline_class().from_pretrained(
        resolve_model(pretrained_model_name_or_path),
        revision=revision,
        **family.pipeline_kwargs(index),
    )
    names, loaded_scales = [], []
    for i, (path, scale) in enumerate(zip(loras, scales, strict=True)):
        file, tensors, header = read_lora_file(path)  # refuses pickles, missing files, NaN
        check_architecture(tensors, header, file, pretrained_model_name_or_path, family)
        warn_if_no_scale(tensors, header, file)
        if is_lycoris(tensors):  # LoHa / LoKr: no diffusers loader; added to the weights
            apply_lycoris(_networks(pipe, family), tensors, family.kohya_prefixes, scale)
            continue
        with _quiet_missing_text_encoder_keys():
            pipe.load_lora_weights(str(file), adapter_name=f"lora_{i}")
        names.append(f"lora_{i}")
        loaded_scales.append(scale)
    if names:
        pipe.set_adapters(names, loaded_scales)
        if fuse:
            pipe.fuse_lora(adapter_names=names)
            pipe.unload_lora_weights()
    substitutions = _load_embeddings(pipe, family, loras, facts)
    objective = _objective(facts, family, pipe.scheduler)
    clip_skip = _agreed(facts, "clip_skip", "clip skips") or 0
    pipe.to(device)
    tokenizers = {
        n: getattr(pipe, n.replace("text_encoder", "tokenizer"))
        for n in family.text_encoder_classes
        if getattr(pipe, n, None) is not None
    }
    encoders = {n: getattr(pipe, n) for n in tokenizers}

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        for abstraction, tokens in substitutions.items():
            texts = [t.replace(abstraction, tokens) for t in texts]
        return family.text_embeddings(tokenizers, encoders, texts, clip_skip)

    denoiser = getattr(pipe, family.denoiser_name)

    def sample_images(image_prompts: list[str], image_seeds: list[int], **settings):
        return generate_images(
            objective, family, denoiser, pipe.vae, encode, image_prompts, image_seeds, **settings
        )

    images = sample_grid(spec, sample_images)
    out = Path(out_dir)
    paths = []
    all_seeds = [s for _ in prompts for s in spec.seeds]
    for i, (image, seed) in enumerate(zip(images, all_seeds, strict=True)):
        array = (image * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        paths.append(
            save_image_atomic(Image.fromarray(array), out / f"{i // len(seeds):03d}_{seed}.png")
        )
    grid = image_grid(
        images,
        ncols=len(seeds),
        row_labels=[p[:40] for p in prompts],
        col_labels=[f"seed {s}" for s in seeds],
        cell=max(images.shape[-1], 128),
    )
    paths.append(save_image_atomic(grid, out / "grid.png"))
    return paths
