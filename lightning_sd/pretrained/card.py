"""The model card of the tiny pretrained base: data, steps, loss curves, samples, licences."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from lightning_sd.pretrained.emoji import LICENCE

__all__ = ["write_card"]

CARD_PROMPTS = ["hot dog", "crescent moon", "grinning face", "rocket", "red apple", "snowman",
                "sunflower", "pile of poo"]  # fmt: skip


def _read(path: Path, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            if row.get(key):
                steps.append(int(row["step"]))
                values.append(float(row[key]))
    return steps, values


def merged_metrics(work: Path) -> Path:
    """One metrics.csv over every run version (a resumed run logs to a new version; its steps
    replace the interrupted run's from the checkpoint on)."""
    by_step: dict[int, str] = {}
    for path in sorted(work.glob("lightning_logs/version_*/metrics.csv")):
        steps, values = _read(path, "train/loss")
        if steps:
            by_step = {k: v for k, v in by_step.items() if k < steps[0]}
            by_step.update({k: str(v) for k, v in zip(steps, values, strict=True)})
    out = work / "metrics_merged.csv"
    lines = ["step,train/loss"] + [f"{k},{v}" for k, v in sorted(by_step.items())]
    out.write_text("\n".join(lines) + "\n")
    return out


def plot_losses(panels: list[tuple[Path, str, str]], out: Path) -> None:
    """The training losses, one (csv, column, title) panel per stage, to one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2))
    for ax, (path, key, title) in zip(axes, panels, strict=True):
        steps, values = _read(path, key)
        ax.plot(steps, values, lw=0.8)
        ax.set(title=title, xlabel="step", yscale="log")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def sample_grid(pipeline_dir: Path, out: Path) -> None:
    """Samples of training captions, four seeds each, through the package's sampler."""
    from lightning_sd.adapters import AdapterConfig
    from lightning_sd.grid import image_grid, save_image_atomic
    from lightning_sd.module import StableDiffusionLoRA

    module = StableDiffusionLoRA(str(pipeline_dir), adapter=AdapterConfig(rank=1))
    module.configure_model()
    seeds = [0, 1, 2, 3]
    prompts = [p for p in CARD_PROMPTS for _ in seeds]
    images = module.generate(prompts, seeds * len(CARD_PROMPTS), steps=20, guidance_scale=4.0)
    images = images.view(len(CARD_PROMPTS), len(seeds), *images.shape[1:]).transpose(0, 1)
    grid = image_grid(images.reshape(-1, *images.shape[2:]), ncols=len(CARD_PROMPTS),
                      col_labels=CARD_PROMPTS, cell=64)  # fmt: skip
    save_image_atomic(grid, out)


def write_card(pipeline_dir: str | Path, work: str | Path) -> Path:
    """README.md, loss_curves.png and samples.png in the pipeline folder."""
    pipeline_dir, work = Path(pipeline_dir), Path(work)
    unet_csv = merged_metrics(work)
    decoder_csv = work / "vae_decoder" / "decoder_loss.csv"
    plot_losses(
        [
            (work / "vae" / "loss.csv", "rec", "VAE: L1 + MSE"),
            (unet_csv, "train/loss", "UNet + text encoder"),
            (decoder_csv, "rec", "VAE decoder fine-tune: L1 + MSE"),
        ],
        pipeline_dir / "loss_curves.png",
    )
    with torch.no_grad():
        sample_grid(pipeline_dir, pipeline_dir / "samples.png")
    steps, losses = _read(unet_csv, "train/loss")
    vae_steps, vae_losses = _read(work / "vae" / "loss.csv", "rec")
    dec_steps, dec_losses = _read(decoder_csv, "rec")
    counts = {
        split: len((work / "emoji" / split / "metadata.jsonl").read_text().splitlines())
        for split in ("train", "heldout", "subject")
    }
    facts = json.loads((work / "facts.json").read_text()) if (work / "facts.json").is_file() else {}
    text = CARD.format(
        counts=counts,
        steps=steps[-1] + 1,
        loss_first=sum(losses[:4]) / len(losses[:4]),
        loss_last=sum(losses[-4:]) / len(losses[-4:]),
        vae_steps=vae_steps[-1] + 1,
        vae_first=vae_losses[0],
        vae_last=sum(vae_losses[-20:]) / len(vae_losses[-20:]),
        dec_steps=dec_steps[-1] + 1,
        dec_first=dec_losses[0],
        dec_last=sum(dec_losses[-20:]) / len(dec_losses[-20:]),
        licence=LICENCE,
        facts="\n".join(f"- {k}: {v}" for k, v in facts.items()),
    )
    (pipeline_dir / "README.md").write_text(text)
    return pipeline_dir / "README.md"


CARD = """\
---
license: other
library_name: diffusers
pipeline_tag: text-to-image
---
# tiny-pretrained: an SD1.x-architecture pipeline pretrained from scratch on emoji, on a CPU

A 32 px Stable Diffusion 1.x-architecture pipeline (`AutoencoderKL`, `CLIPTextModel` with the
real CLIP BPE tokenizer, `UNet2DConditionModel`, SD1.5's scaled-linear DDPM schedule), trained
here from random weights, so that the demo, the tests and the benchmarks of lightning_sd show
real learning offline. It loads with

```python
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained("lightning_sd/assets/tiny-pretrained")
# or, in lightning_sd: StableDiffusionLoRA("tiny-pretrained", ...); YAML:
#   model: {{pretrained_model_name_or_path: tiny-pretrained}}
```

It is a toy: 32 px, ~10 M parameters, about an hour of two (shared) CPU cores. Prompts are Unicode emoji
names ("hot dog", "crescent moon"); it draws the gist (colour, layout) of the emoji it saw.

## Data
Noto Color Emoji drawn with Pillow, each single-codepoint emoji cropped to its ink, centred on
white, resized to 32 px; its lower-cased Unicode name is the caption
(`lightning_sd/pretrained/emoji.py`). Splits: {counts[train]} training images,
{counts[heldout]} held out for evaluation (by name hash), and {counts[subject]} in the held-out
subject family (every emoji whose name contains "cat"), never seen: the DreamBooth subject of
`make demo`.

## Training
1. VAE (4x downsampling, 4 latent channels, no mid-block attention): {vae_steps} steps, batch
   16 random 16 px crops, AdamW 1e-3 cosine to 5 %, L1 + MSE + 1e-6 KL, a near-deterministic
   posterior (log-variance output initialised to -20); reconstruction loss
   {vae_first:.3f} -> {vae_last:.3f}. `scaling_factor` = 1 / std of the training latents.
2. UNet (64/128/128 channels, cross-attention at 8x8 and 4x4 and in the middle block) and text
   encoder (width 64, 3 layers) trained in full with `StableDiffusionLoRA` (adapter kind
   `full`) and `CaptionDataModule`: {steps} steps, batch 32, AdamW 1e-3 (100 warm-up steps,
   then cosine to 0), gradient clipping 1.0, epsilon prediction with Min-SNR-5 weighting, 10 %
   caption dropout (for classifier-free guidance), cached latents. Loss {loss_first:.3f}
   (first steps) -> {loss_last:.3f} (last steps).
3. VAE decoder fine-tuned with the encoder frozen (as SD's ft-MSE VAE was made): {dec_steps}
   steps, batch 16 whole 32 px images, AdamW 5e-4 cosine to 0, L1 + MSE; reconstruction loss
   {dec_first:.3f} -> {dec_last:.3f}. The latents do not change, so the UNet's training is
   unaffected; this stage runs on one thread, beside stage 2.
{facts}

![loss curves](loss_curves.png)

## Samples
Training captions, four seeds each (rows), 20 DPM++ steps, guidance 4:

![samples](samples.png)

Quality numbers (VAE PSNR, prompt-following retrieval, FD-Lite0) are in
`benchmarks/results/pretrained_quality.md`.

## Reproduce
```bash
apt-get install fonts-noto-color-emoji        # only to draw the data set
python -m lightning_sd.pretrained.recipe --work runs/pretrain --out runs/pretrain/tiny-pretrained \\
    --vae-steps {vae_steps} --steps {steps} --decoder-steps {dec_steps}
```
Every stage is seeded; on CPU with fixed threads (two, one for the decoder stage) the loss
curves repeat from the seed. The UNet is
stored in float16 (diffusers loads it as float32) to keep the folder small.

## Licences
- Weights: Apache-2.0, like lightning_sd.
- Training images: {licence}
- Tokenizer: OpenAI CLIP's BPE vocabulary (MIT), as shipped in open_clip.
"""
