"""LoHa and LoKr files in the kohya / LyCORIS layout, read from the layout alone.

ComfyUI and A1111 read ``lora_unet_<module>.hada_w1_a`` ... / ``.lokr_w1`` ... keys with a real
``.alpha``; diffusers 0.42 reads LoKr for a few transformer pipelines only and LoHa for none,
so SD1.x/SDXL files of these kinds cannot go through ``load_lora_weights``. This module is the
reading those programs make, written from the layout (not from peft, which trains the
adapters): each module's weight update, which ``generate`` adds to the base weights and which
the tests compare with the trained model.
"""

from __future__ import annotations

import re

import torch
from torch import nn

__all__ = ["LYCORIS_PARTS", "apply_lycoris", "is_lycoris", "lycoris_delta", "lycoris_deltas"]

LYCORIS_PARTS = (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
)  # fmt: skip
_KEY = re.compile(r"^(?P<name>lora_[a-z0-9]+_[^.]+)\.(?P<part>[a-z0-9_]+)$")


def is_lycoris(tensors: dict) -> bool:
    """Whether a file's tensors are LoHa or LoKr (rather than LoRA)."""
    return any(k.rsplit(".", 1)[-1] in LYCORIS_PARTS for k in tensors)


def lycoris_delta(parts: dict[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """One module's weight update from its file tensors, shaped like the weight.

    LoHa: (w1_a w1_b) * (w2_a w2_b) * alpha / r, r = rows of w1_b.
    LoKr: w1 (x) w2, each factor stored whole or as a product ``_a @ _b``; the scale alpha / r
    applies only when a factor is a product (r = its inner size), else 1 (LyCORIS's rule).
    Conv updates are stored flattened to (out, in * k * k) or as (out, in, k, k).
    """
    alpha = parts.get("alpha")
    if "hada_w1_a" in parts:
        w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        rank = parts["hada_w1_b"].shape[0]
        scale = float(alpha) / rank if alpha is not None else 1.0
        return (w1 * w2 * scale).reshape(shape)
    rank = None
    factors = []
    for i in (1, 2):
        if f"lokr_w{i}" in parts:
            factors.append(parts[f"lokr_w{i}"].float())
        else:
            a, b = parts[f"lokr_w{i}_a"].float(), parts[f"lokr_w{i}_b"].float()
            factors.append(a @ b)
            rank = b.shape[0]
    scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0
    w1, w2 = factors
    delta = torch.kron(w1, w2.reshape(w2.shape[0], -1))
    return (delta * scale).reshape(shape)


def lycoris_deltas(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A file's tensors grouped by kohya module name: ``{name: {part: tensor, "alpha": a}}``."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None or match["part"] not in (*LYCORIS_PARTS, "alpha"):
            raise ValueError(f"not a LoHa/LoKr key in the kohya layout: {key!r}")
        modules.setdefault(match["name"], {})[match["part"]] = tensor
    return modules


@torch.no_grad()
def apply_lycoris(
    models: dict[str, nn.Module],
    tensors: dict[str, torch.Tensor],
    prefixes: dict[str, str],
    scale: float = 1.0,
) -> int:
    """Add a LoHa/LoKr file's updates (times ``scale``) to the weights of ``models``.

    Args:
        models: component name (``unet``, ``text_encoder`` ...) -> the network.
        tensors: the file's tensors.
        prefixes: component name -> kohya prefix (``ModelFamily.kohya_prefixes``).
        scale: the strength, as a LoRA scale.

    Returns:
        The number of modules changed; a module of the file the models lack is an error.
    """
    flat = {}
    for component, model in models.items():
        prefix = prefixes[component]
        for name, module in model.named_modules():
            flat[prefix + name.replace(".", "_")] = module
            if component.startswith("text_encoder"):  # the layout keeps text_model.
                flat[prefix + f"text_model.{name}".replace(".", "_")] = module
    changed = 0
    for name, parts in lycoris_deltas(tensors).items():
        module = flat.get(name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(f"the LoHa/LoKr file adapts {name}, which the model does not have")
        weight = module.weight
        weight += (scale * lycoris_delta(parts, weight.shape)).to(weight.dtype)
        changed += 1
    return changed
