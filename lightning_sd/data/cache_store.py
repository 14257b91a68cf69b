"""A content-addressed disk cache of VAE latents and text embeddings, as safetensors files.

A key hashes everything that determines the stored tensors: for latents the image's bytes, the
crop (sizes and offsets), the flip and the transform's settings, and the VAE (class, config,
dtype and weights); for text the prompt and the text encoder and tokenizer. So an edited
image, a changed setting or another model gets a new key and is encoded afresh: nothing stale
is ever served, and nothing needs invalidating. Unused entries can be deleted freely.

Latents are stored as the VAE posterior's mean and standard deviation (both scaled as the
module scales latents), and each training step draws ``mean + std * eps``: the same
distribution as encoding the image every step, unlike caching one sample. Validation serves the
mean, as the module's uncached validation does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_sd.atomic import atomic_path
from lightning_sd.data.images import BadImageError
from lightning_sd.data.transforms import CropPlan

__all__ = ["LatentCache", "latent_key", "model_fingerprint", "text_key"]

FORMAT = "lightning_sd-cache-v1"


class LatentCache:
    """Safetensors entries under ``root/<kind>/<key[:2]>/<key>.safetensors``, written atomically.

    Args:
        root: the cache folder; safe to share between runs and datasets.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def has(self, kind: str, key: str) -> bool:
        """Whether a whole entry exists; a truncated or damaged one is missing (recomputed)."""
        return _intact(self.path(kind, key))

    def load(self, kind: str, key: str) -> dict[str, torch.Tensor]:
        path = self.path(kind, key)
        try:
            return load_file(path)
        except Exception as err:  # safetensors' own error type; OSError for a missing file
            raise BadImageError(
                f"{path}: damaged cache entry ({err}); delete it and it is recomputed"
            ) from err

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor]) -> Path:
        """Write through a temporary file and a rename: a reader never sees half an entry."""
        path = self.path(kind, key)
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic_path(path, "cache entry") as tmp:
            save_file(tensors, tmp, metadata={"format": FORMAT})
        return path


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x00".join((FORMAT, *parts)).encode()).hexdigest()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, *extra: str) -> str:
    """A hash of a model's class, config, dtype and every weight.

    Hashing the weights (a fraction of a second for an SD VAE or text encoder) instead of the
    path means a fine-tuned VAE saved over the old one is noticed, and a moved model folder
    keeps its cache.
    """
    h = hashlib.sha256(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for part in extra:
        h.update(part.encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latent_key(digest: str, plan: CropPlan, flipped: bool, settings: str, vae: str) -> str:
    """The key of one image's latents for one crop and flip under one VAE."""
    crop = f"{plan.original_size}{plan.resized}{plan.top},{plan.left}{plan.target}{flipped}"
    return _sha("latents", digest, crop, settings, vae)


def text_key(prompt: str, text_encoder: str) -> str:
    """The key of one prompt's embeddings under one text encoder (and tokenizer)."""
    return _sha("text", prompt, text_encoder)


def _intact(path: Path) -> bool:
    """A safetensors file whose header parses and whose size covers every tensor it lists.

    Reads only the header, so checking a whole cache at start-up stays cheap.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return path.stat().st_size == 8 + size + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
