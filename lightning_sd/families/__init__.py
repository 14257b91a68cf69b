"""Model families as types: SD1.x/2.x, SDXL (Playground included) and SD3.

See :mod:`lightning_sd.families.base` for what a family owns. :func:`family_of` reads a
pipeline's ``model_index.json`` and returns its family, so nothing is configured by hand.
"""

from __future__ import annotations

from lightning_sd.families.base import Components, ModelFamily, default_objective
from lightning_sd.families.sd1 import SD1
from lightning_sd.families.sd3 import SD3
from lightning_sd.families.sdxl import SDXL

__all__ = [
    "SD1",
    "SD3",
    "SDXL",
    "Components",
    "ModelFamily",
    "check_family",
    "default_objective",
    "family_from_index",
    "family_of",
]

_BY_PIPELINE = {cls.pipeline_name: cls for cls in (SD1, SDXL, SD3)}


def family_from_index(index: dict) -> ModelFamily:
    """The family of a pipeline from its ``model_index.json`` (class name, else its parts)."""
    cls = _BY_PIPELINE.get(index.get("_class_name", ""))
    if cls is None:
        has = {k for k, v in index.items() if isinstance(v, list) and v and v[0]}
        cls = SD3 if "transformer" in has else SDXL if "text_encoder_2" in has else SD1
    return cls()


def family_of(pretrained_model_name_or_path: str, revision: str | None = None) -> ModelFamily:
    """The family of a base model (hub id, folder or a shipped name), with default settings."""
    from lightning_sd.components import _model_index

    return family_from_index(_model_index(pretrained_model_name_or_path, revision))


def check_family(configured: ModelFamily | None, detected: ModelFamily, where: str) -> ModelFamily:
    """The configured family (its settings kept) when it is the detected one's type."""
    if configured is None:
        return detected
    if type(configured) is not type(detected):
        raise ValueError(
            f"family {configured!r} was configured, but {where} is a {detected.description} "
            f"pipeline ({detected.pipeline_name}); leave family unset or set {detected.name}"
        )
    return configured
