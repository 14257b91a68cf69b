"""Tiny Stable Diffusion pipelines built offline from configs, for tests, the demo and benchmarks.

The architecture is SD1.x's (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, SD1.5's
scaled-linear DDPM schedule); only the widths shrink. The tokenizer is the real CLIP BPE
vocabulary that ships inside open_clip, so prompts tokenize exactly as they do for SD1.5.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PRESETS", "TinyPreset", "build_clip_tokenizer", "build_tiny_pipeline"]

# The special tokens as Hugging Face's CLIP tokenizer names them (open_clip: <start_of_text>).
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# open_clip keeps the first 48894 merges: 49408 ids = 512 byte tokens + merges + 2 specials.
NUM_MERGES = 49152 - 256 - 2


@dataclass(frozen=True)
class TinyPreset:
    """Widths of a tiny SD1.x-architecture pipeline.

    Attributes:
        resolution: the image size the preset is meant for (its UNet's sample size x VAE factor).
        unet_channels: UNet block widths; the first and last blocks carry cross-attention.
        vae_channels: VAE block widths; the VAE downsamples by 2 ** (len - 1).
        text_width: CLIP text hidden size (= the UNet's cross-attention dim).
        text_layers: CLIP text transformer depth.
    """

    resolution: int
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_width: int
    text_layers: int


PRESETS: dict[str, TinyPreset] = {
    # A training step in well under a second on two CPU cores.
    "tiny": TinyPreset(32, (32, 64), (32, 64), 32, 2),
    # Benchmarks: 64 px, 16x16 latents, a step of order 0.2 s on two CPU cores.
    "small": TinyPreset(64, (32, 64, 64), (32, 64, 64), 64, 2),
    # SD1.5's 8x VAE downsampling, for measuring what latent caching saves at 256 px.
    "small-vae8": TinyPreset(256, (32, 64, 64), (16, 32, 64, 64), 64, 2),
}


def build_clip_tokenizer(out_dir: str | Path):
    """Write and load a CLIPTokenizer made from open_clip's bundled CLIP BPE vocabulary.

    open_clip ships the merges file OpenAI released with CLIP; the id order (byte tokens,
    byte tokens + ``</w>``, merges, specials) is the one CLIP was trained with, so ids match
    SD1.5's tokenizer.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m.split()) for m in merges] + [BOS, EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(out_dir / "vocab.json"),
        str(out_dir / "merges.txt"),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,  # SD1.5 pads with <|endoftext|>
        model_max_length=77,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _components(preset: TinyPreset, seed: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    p = preset
    vae_factor = 2 ** (len(p.vae_channels) - 1)
    n_unet = len(p.unet_channels)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=p.resolution // vae_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=p.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) + ("DownBlock2D",) * (n_unet - 1),
        up_block_types=("UpBlock2D",) * (n_unet - 1) + ("CrossAttnUpBlock2D",),
        cross_attention_dim=p.text_width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=p.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=p.resolution,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=p.text_width,
            intermediate_size=p.text_width * 4,
            num_hidden_layers=p.text_layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=p.text_width,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
            hidden_act="quick_gelu",
        )
    )
    # SD1.5's training schedule (its model_index ships PNDM for sampling; we train with DDPM).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )
    return unet, vae, text_encoder, scheduler


def build_tiny_pipeline(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a ``StableDiffusionPipeline`` folder of SD1.x architecture with random weights.

    The folder is written next to its destination and renamed into place, so an interrupted
    build never leaves a folder that ``from_pretrained`` half-loads.

    Args:
        out_dir: destination folder; it must not exist yet or must be empty.
        preset: one of ``PRESETS`` (``tiny`` for tests, ``small`` for benchmarks).
        seed: seeds every component's initialisation, so a preset and seed name one model.

    Returns:
        The folder, loadable with ``StableDiffusionPipeline.from_pretrained(out_dir)``.
    """
    from diffusers import StableDiffusionPipeline

    if preset not in PRESETS:
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {sorted(PRESETS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    unet, vae, text_encoder, scheduler = _components(PRESETS[preset], seed)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tokenizer = build_clip_tokenizer(Path(tmp) / "tokenizer_build")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        staged = Path(tmp) / "pipeline"
        pipe.save_pretrained(staged, safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staged), str(out_dir))
    return out_dir
