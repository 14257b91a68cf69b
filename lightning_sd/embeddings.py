"""Pivotal-tuning token embeddings on disk, in the layout A1111, ComfyUI and diffusers read."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from lightning_sd.lora_io import write_safetensors
from lightning_sd.pivotal import ExtendedEmbedding

__all__ = ["EMBEDDINGS_NAME", "save_embeddings"]

EMBEDDINGS_NAME = "embeddings.safetensors"


def save_embeddings(
    path: str | Path, text_encoders: dict[str, nn.Module], tokens: list[str]
) -> Path | None:
    """Write ``{"clip_l": [n, d], "clip_g": [n, d]}``: the new tokens' embedding rows.

    A1111 and ComfyUI read this layout directly; diffusers loads it with
    ``pipe.load_textual_inversion(state["clip_l"], token=tokens, text_encoder=..., tokenizer=...)``
    (the model card spells it out). The token names are in the header.

    Args:
        path: the file to write.
        text_encoders: layout key (``clip_l``, ``clip_g``) -> text encoder.
        tokens: the new tokens, in id order.

    Returns:
        The path, or None when no text encoder has new tokens.
    """
    tensors = {}
    for key, encoder in text_encoders.items():
        embedding = encoder.get_input_embeddings() if encoder is not None else None
        if isinstance(embedding, ExtendedEmbedding):
            tensors[key] = embedding.new.detach().float()
    if not tensors:
        return None
    return write_safetensors(path, tensors, {"tokens": json.dumps(tokens)})
