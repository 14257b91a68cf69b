"""``lightning-sd convert-checkpoint``: a training checkpoint to LoRA files.

Works on Lightning checkpoints (``.ckpt`` files) and DeepSpeed checkpoints (folders), so a run
whose LoRA export did not happen (killed, or a checkpoint from the middle of a run) still
gives ``pytorch_lora_weights.safetensors`` and the kohya file. The base model is the one the
checkpoint's hyper-parameters name; it is loaded as training loaded it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from lightning_sd.callbacks.export import Format, export_adapters

__all__ = ["convert_checkpoint", "load_checkpoint"]


def load_checkpoint(path: str | Path) -> dict:
    """A Lightning checkpoint as a dict; a DeepSpeed folder is consolidated to fp32 first.

    DeepSpeed (ZeRO) checkpoints are folders of partitioned states: Lightning's
    ``convert_zero_checkpoint_to_fp32_state_dict`` merges them into one ``state_dict``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(merged))
        # DeepSpeed's client state holds plain Python objects besides tensors: not weights-only.
        return torch.load(merged, map_location="cpu", weights_only=False)


def convert_checkpoint(
    checkpoint: str,
    out_dir: str,
    formats: list[Format] | None = None,
    pretrained_model_name_or_path: str | None = None,
) -> list[str]:
    """Write the adapters of a training checkpoint as LoRA files.

    Args:
        checkpoint: a ``.ckpt`` file, or a DeepSpeed checkpoint folder.
        out_dir: where the files go (written atomically).
        formats: ``diffusers`` and/or ``kohya`` (default both).
        pretrained_model_name_or_path: the base model, when it moved since training.

    Returns:
        The written paths.
    """
    from lightning_sd.module import StableDiffusionLoRA

    ckpt = load_checkpoint(checkpoint)
    hparams = dict(ckpt["hyper_parameters"])
    if pretrained_model_name_or_path is not None:
        hparams["pretrained_model_name_or_path"] = pretrained_model_name_or_path
    hparams.pop("lora_weights", None)  # the checkpoint holds the trained weights
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}  # CLI bookkeeping
    module = StableDiffusionLoRA(**hparams)
    module.on_load_checkpoint(ckpt)  # builds the model; refuses a checkpoint that misses adapters
    module.load_state_dict(ckpt["state_dict"], strict=False)
    written = export_adapters(module, out_dir, formats or ["diffusers", "kohya"])
    return [str(p) for p in written.values()]
