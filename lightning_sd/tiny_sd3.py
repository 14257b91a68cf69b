"""A tiny Stable Diffusion 3 / 3.5 pipeline built offline, for tests and benchmarks.

The SD3 architecture at tiny width (Esser et al. 2024): an MMDiT ``SD3Transformer2DModel``
(with SD3.5 Medium's second attention ``attn2`` in its first block and RMS q/k norms), two
CLIP text encoders with projections whose pooled outputs are concatenated, an optional T5
encoder, a 16-channel VAE with a ``shift_factor`` and no quant convs, and the rectified-flow
``FlowMatchEulerDiscreteScheduler`` with SD3's shift of 3.

No T5 tokenizer can be downloaded here, so one is trained offline: a small unigram
(SentencePiece-style) model over the words of CLIP's BPE vocabulary, with T5's special ids
(pad 0, ``</s>`` 1, ``<unk>`` 2). It tokenizes English prompts into pieces as T5's does, with
another vocabulary: enough for shapes, padding and the loading path, not for T5's meaning.
"""

from __future__ import annotations

import gzip
import shutil
import tempfile
from pathlib import Path

import torch

from lightning_sd.tiny import NUM_MERGES, _clip_text_config, build_clip_tokenizer

__all__ = ["build_t5_tokenizer", "build_tiny_sd3_pipeline"]

T5_VOCAB = 1000
CLIP_WIDTHS = (16, 16)  # CLIP-L and CLIP-G stand-ins; pooled projections concatenate: 32
T5_WIDTH = 32  # = the transformer's joint_attention_dim (>= the CLIP widths' sum)


def build_t5_tokenizer(out_dir: str | Path, vocab_size: int = T5_VOCAB):
    """Train and save a T5-style unigram tokenizer (``T5TokenizerFast``) offline."""
    from open_clip.tokenizer import default_bpe
    from tokenizers import SentencePieceUnigramTokenizer
    from transformers import T5TokenizerFast

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : NUM_MERGES + 1]
    words = ["".join(line.split()).replace("</w>", " ") for line in lines]
    unigram = SentencePieceUnigramTokenizer()
    unigram.train_from_iterator(
        words, vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>", show_progress=False,
    )  # fmt: skip
    tokenizer = T5TokenizerFast(
        tokenizer_object=unigram._tokenizer, pad_token="<pad>", eos_token="</s>",
        unk_token="<unk>", extra_ids=0, model_max_length=256,
    )  # fmt: skip
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _components(seed: int, resolution: int, t5: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=16, layers_per_block=1, norm_num_groups=8, sample_size=resolution,
        scaling_factor=1.5305, shift_factor=0.0609,  # SD3's
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    torch.manual_seed(seed + 1)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2, patch_size=2, in_channels=16, out_channels=16,
        num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=sum(CLIP_WIDTHS), pos_embed_max_size=32,
        dual_attention_layers=(0,), qk_norm="rms_norm",  # SD3.5 Medium's layout
    )  # fmt: skip
    encoders = []
    styles = zip(CLIP_WIDTHS, ("quick_gelu", "gelu"), (49407, 0), strict=True)
    for i, (width, act, pad) in enumerate(styles):
        torch.manual_seed(seed + 2 + i)
        encoders.append(CLIPTextModelWithProjection(_clip_text_config(width, 2, act, pad)))
    text_encoder_3 = None
    if t5:
        torch.manual_seed(seed + 4)
        config = T5Config(
            vocab_size=T5_VOCAB, d_model=T5_WIDTH, d_ff=64, d_kv=8, num_layers=1, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        )  # fmt: skip
        text_encoder_3 = T5EncoderModel(config)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return vae, transformer, encoders, text_encoder_3, scheduler


def build_tiny_sd3_pipeline(
    out_dir: str | Path, seed: int = 0, resolution: int = 32, t5: bool = True
) -> Path:
    """Write a ``StableDiffusion3Pipeline`` folder with random weights, offline.

    Args:
        out_dir: destination folder; it must not exist yet or must be empty.
        seed: seeds every component's initialisation.
        resolution: image side (the transformer sees resolution / 2 latents, patch size 2).
        t5: include the T5 encoder and tokenizer; without them the folder loads with
            ``from_pretrained(dir, text_encoder_3=None, tokenizer_3=None)``, as SD3 allows.

    Returns:
        The folder, loadable with ``StableDiffusion3Pipeline.from_pretrained``.
    """
    from diffusers import StableDiffusion3Pipeline

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        tmp = Path(tmp)
        vae, transformer, (clip_l, clip_g), t5_encoder, scheduler = _components(
            seed, resolution, t5
        )
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=clip_l, tokenizer=build_clip_tokenizer(tmp / "tok"),
            text_encoder_2=clip_g, tokenizer_2=build_clip_tokenizer(tmp / "tok2", pad_token="!"),
            text_encoder_3=t5_encoder,
            tokenizer_3=build_t5_tokenizer(tmp / "tok3") if t5 else None,
        )  # fmt: skip
        staged = tmp / "pipeline"
        pipe.save_pretrained(staged, safe_serialization=True)
        if out_dir.exists():
            out_dir.rmdir()
        shutil.move(str(staged), str(out_dir))
    return out_dir
