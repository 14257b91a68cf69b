"""The tiny pretrained base: its architecture, its initial (random) pipeline and its final folder.

SD1.x architecture at 32 px: ``AutoencoderKL`` (4x downsampling, 4 latent channels, trained
first by ``vae_training``), ``CLIPTextModel`` over the real CLIP BPE tokenizer, a
``UNet2DConditionModel`` on 8x8 latents with cross-attention in its two finer levels and its
middle block, and SD1.5's scaled-linear DDPM schedule. The UNet and the text encoder start
random (``build_initial_pipeline``) and are trained in full by ``StableDiffusionLoRA``
(``configs/pretrain/emoji_base.yaml``); ``assemble`` writes the shipped folder.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch

__all__ = ["PRETRAINED_DIR", "assemble", "build_initial_pipeline", "pretrained_path"]

PRETRAINED_DIR = "tiny-pretrained"
RESOLUTION = 32
TEXT_WIDTH = 64
_NOT_WEIGHTS = shutil.ignore_patterns("*.csv")  # training logs beside a stage's weights


def pretrained_path() -> Path:
    """The shipped pretrained pipeline folder (package data: no download, no Debian package)."""
    return Path(str(resources.files("lightning_sd") / "assets" / PRETRAINED_DIR))


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _text_encoder():
    from transformers import CLIPTextModel

    from lightning_sd.tiny import _clip_text_config

    return CLIPTextModel(_clip_text_config(TEXT_WIDTH, 3, "quick_gelu", pad_token_id=49407))


def build_initial_pipeline(vae_dir: str | Path, out_dir: str | Path, seed: int = 0) -> Path:
    """A pipeline folder with the trained VAE and a random UNet and text encoder."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from lightning_sd.tiny import build_clip_tokenizer, sd15_training_scheduler

    torch.manual_seed(seed)
    unet = _unet()
    torch.manual_seed(seed + 1)
    text_encoder = _text_encoder()
    with tempfile.TemporaryDirectory() as tmp:
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(vae_dir),
            text_encoder=text_encoder,
            tokenizer=build_clip_tokenizer(Path(tmp) / "tokenizer"),
            unet=unet,
            scheduler=sd15_training_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def assemble(
    initial_dir: str | Path,
    trained_dir: str | Path,
    out_dir: str | Path,
    vae_dir: str | Path | None = None,
) -> Path:
    """The final folder: the initial pipeline with the trained ``unet/`` and ``text_encoder/``
    (and the decoder-fine-tuned VAE from ``vae_dir``, whose encoder is the initial one's).

    ``trained_dir`` is what the export callback wrote for the fully trained parts. The UNet
    is stored in float16 to halve its file (diffusers loads it as float32); the text
    encoder stays float32, because transformers would load it in float16.
    """
    from diffusers import UNet2DConditionModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in ("vae", "tokenizer", "scheduler", "model_index.json"):
        src = Path(initial_dir) / part
        if part == "vae" and vae_dir is not None:
            src = Path(vae_dir)
        (
            shutil.copytree(src, out_dir / part, dirs_exist_ok=True, ignore=_NOT_WEIGHTS)
            if src.is_dir()
            else shutil.copy(src, out_dir / part)
        )
    shutil.copytree(
        Path(trained_dir) / "text_encoder", out_dir / "text_encoder", dirs_exist_ok=True
    )
    unet = UNet2DConditionModel.from_pretrained(Path(trained_dir) / "unet")
    unet.half().save_pretrained(out_dir / "unet", safe_serialization=True)
    return out_dir
