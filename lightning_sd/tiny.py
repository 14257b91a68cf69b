"""Tiny Stable Diffusion pipelines built offline from configs, for tests, the demo and benchmarks.

Two architectures, only the widths shrink:
- SD1.x: UNet2DConditionModel, AutoencoderKL, CLIPTextModel, SD1.5's scaled-linear DDPM schedule.
- SDXL (Podell et al. 2023): two text encoders (``CLIPTextModel`` and
  ``CLIPTextModelWithProjection``), a UNet conditioned on their concatenated penultimate states
  and on the pooled embedding plus the six size/crop ``time_ids``. The ``edm`` variant stands in
  for Playground v2.5: an EDM-native ``EDMEulerScheduler`` and a VAE with per-channel latent
  statistics (``latents_mean`` / ``latents_std``).

The tokenizers are the real CLIP BPE vocabulary that ships inside open_clip, so prompts
tokenize exactly as they do for SD1.5 and SDXL.
"""

from __future__ import annotations

import gzip
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "PRESETS",
    "SD3_PRESETS",
    "TinyPreset",
    "build_clip_tokenizer",
    "build_tiny_pipeline",
    "sd15_training_scheduler",
]

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
        text_width_2: width of SDXL's second text encoder (``CLIPTextModelWithProjection``);
            0 builds an SD1.x pipeline, anything else an SDXL one.
        edm: an EDM-native SDXL (Playground v2.5 stand-in): ``EDMEulerScheduler`` and a VAE
            with latent statistics.
    """

    resolution: int
    unet_channels: tuple[int, ...]
    vae_channels: tuple[int, ...]
    text_width: int
    text_layers: int
    text_width_2: int = 0
    edm: bool = False


PRESETS: dict[str, TinyPreset] = {
    # A training step in well under a second on two CPU cores.
    "tiny": TinyPreset(32, (32, 64), (32, 64), 32, 2),
    # Benchmarks: 64 px, 16x16 latents, a step of order 0.2 s on two CPU cores.
    "small": TinyPreset(64, (32, 64, 64), (32, 64, 64), 64, 2),
    # SD1.5's 8x VAE downsampling, for measuring what latent caching saves at 256 px.
    "small-vae8": TinyPreset(256, (32, 64, 64), (16, 32, 64, 64), 64, 2),
    # SDXL architecture (two text encoders, text_time conditioning), as small as "tiny".
    "tiny-sdxl": TinyPreset(32, (32, 64), (32, 64), 32, 2, text_width_2=48),
    # The same with Playground v2.5's EDM-native schedule and latent statistics.
    "tiny-playground": TinyPreset(32, (32, 64), (32, 64), 32, 2, text_width_2=48, edm=True),
}
# The SD3.5-Medium architecture (lightning_sd.tiny_sd3), with and without T5: preset -> t5.
SD3_PRESETS: dict[str, bool] = {"tiny-sd3": True, "tiny-sd3-no-t5": False}


def build_clip_tokenizer(out_dir: str | Path, pad_token: str = EOS):
    """Write and load a CLIPTokenizer made from open_clip's bundled CLIP BPE vocabulary.

    open_clip ships the merges file OpenAI released with CLIP; the id order (byte tokens,
    byte tokens + ``</w>``, merges, specials) is the one CLIP was trained with, so ids match
    SD1.5's tokenizer.

    Args:
        out_dir: where vocab.json, merges.txt and the tokenizer config go.
        pad_token: ``<|endoftext|>`` as SD1.5 and SDXL's first tokenizer pad; SDXL's second
            tokenizer (OpenCLIP's) pads with ``!``.
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
        pad_token=pad_token,
        model_max_length=77,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _components(preset: TinyPreset, seed: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

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
    vae = _tiny_vae(p)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        _clip_text_config(p.text_width, p.text_layers, "quick_gelu", pad_token_id=49407)
    )
    return unet, vae, text_encoder, sd15_training_scheduler()


def sd15_training_scheduler():
    """SD1.5's training schedule (its model_index ships PNDM for sampling; we train with DDPM)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


def _tiny_vae(p, **config):
    """A small ``AutoencoderKL`` of the preset's widths; ``config`` adds SDXL/EDM settings."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=p.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(p.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(p.vae_channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=p.resolution,
        **config,
    )


def _clip_text_config(width: int, layers: int, act: str, pad_token_id: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=width * 4,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
        hidden_act=act,
    )


def _sdxl_components(preset: TinyPreset, seed: int):
    """SDXL's layout at tiny width: no attention in the first block, linear projections,
    cross-attention over both encoders' states, and the pooled + time-id added embedding."""
    from diffusers import (
        EDMEulerScheduler,
        EulerDiscreteScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    p = preset
    vae_factor = 2 ** (len(p.vae_channels) - 1)
    n_unet = len(p.unet_channels)
    time_dim = 8  # SDXL: 256 per size/crop number
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=p.resolution // vae_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=p.unet_channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n_unet - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n_unet - 1) + ("UpBlock2D",),
        cross_attention_dim=p.text_width + p.text_width_2,
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + p.text_width_2,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    # Playground v2.5 normalises latents per channel; these statistics are stand-ins.
    stats = dict(latents_mean=(0.1, -0.2, 0.3, -0.1), latents_std=(1.5, 2.0, 1.2, 1.8))
    vae = _tiny_vae(
        p, scaling_factor=0.5 if p.edm else 0.13025, force_upcast=True, **(stats if p.edm else {})
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        _clip_text_config(p.text_width, p.text_layers, "quick_gelu", 49407)
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(p.text_width_2, p.text_layers, "gelu", 0)
    )
    if p.edm:
        scheduler = EDMEulerScheduler(
            sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="exponential"
        )
    else:  # what SDXL base ships
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            prediction_type="epsilon",
            steps_offset=1,
            timestep_spacing="leading",
        )
    return unet, vae, text_encoder, text_encoder_2, scheduler


def _pipeline(preset: TinyPreset, seed: int, tmp: Path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    tokenizer = build_clip_tokenizer(tmp / "tokenizer_build")
    if not preset.text_width_2:
        unet, vae, text_encoder, scheduler = _components(preset, seed)
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    unet, vae, text_encoder, text_encoder_2, scheduler = _sdxl_components(preset, seed)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(tmp / "tokenizer_2_build", pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_tiny_pipeline(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a pipeline folder of SD1.x or SDXL architecture with random weights.

    The folder is written next to its destination and renamed into place, so an interrupted
    build never leaves a folder that ``from_pretrained`` half-loads.

    Args:
        out_dir: destination folder; it must not exist yet or must be empty.
        preset: one of ``PRESETS`` (``tiny`` for tests, ``small`` for benchmarks,
            ``tiny-sdxl`` / ``tiny-playground`` for the SDXL architecture), ``tiny-sd3`` /
            ``tiny-sd3-no-t5`` for SD3.5 Medium's (``lightning_sd.tiny_sd3``), or
            ``tiny-pretrained``: a copy of the shipped pretrained base (32 px, trained on
            emoji; ``lightning_sd.pretrained``), which ``seed`` does not change.
        seed: seeds every component's initialisation, so a preset and seed name one model.

    Returns:
        The folder, loadable with ``StableDiffusionPipeline.from_pretrained(out_dir)`` (SDXL
        presets: ``StableDiffusionXLPipeline``; SD3: ``StableDiffusion3Pipeline``).
    """
    if preset in SD3_PRESETS:
        from lightning_sd.tiny_sd3 import build_tiny_sd3_pipeline

        return build_tiny_sd3_pipeline(out_dir, seed, t5=SD3_PRESETS[preset])
    if preset not in PRESETS and preset != "tiny-pretrained":
        choices = sorted(PRESETS) + sorted(SD3_PRESETS) + ["tiny-pretrained"]
        raise ValueError(f"unknown tiny preset {preset!r}; choose one of {choices}")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    if preset == "tiny-pretrained":
        from lightning_sd.pretrained.base import pretrained_path

        shutil.copytree(pretrained_path(), out_dir, dirs_exist_ok=True)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        pipe = _pipeline(PRESETS[preset], seed, Path(tmp))
        staged = Path(tmp) / "pipeline"
        pipe.save_pretrained(staged, safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staged), str(out_dir))
    return out_dir
