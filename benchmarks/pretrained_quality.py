"""How much the tiny pretrained base knows: VAE PSNR, prompt following, FD-Lite0.

    python benchmarks/pretrained_quality.py --data runs/pretrain/emoji

Needs the emoji set (``python -m lightning_sd.pretrained.emoji runs/pretrain/emoji --size 32``,
Debian's ``fonts-noto-color-emoji``). Writes ``results/pretrained_quality.{md,csv}``:

- VAE PSNR (dB) on the held-out emoji (never seen in training), at 32 px;
- prompt following: one sample per training caption (N captions, seed = index); every real
  image of those captions is ranked by EfficientNet-Lite0 cosine similarity to the sample;
  top-1 / top-5 retrieval accuracy against chance 1/N and 5/N;
- FD-Lite0: Frechet distance on EfficientNet-Lite0 features between those samples and the
  real images, for the pretrained base and a random-weight base of the same size (not
  Inception FID: an offline backbone, comparable only with itself).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, describe_machine, machine_info, markdown_table, quiet, write_csv  # noqa: E402

from lightning_sd.metrics import EfficientNetLite0, FrechetDistance  # noqa: E402
from lightning_sd.metrics.subject import FeatureSpace, retrieval_accuracy  # noqa: E402
from lightning_sd.module import StableDiffusionLoRA  # noqa: E402
from lightning_sd.pretrained.vae_training import load_images, psnr  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def vae_psnr(model: StableDiffusionLoRA, images: torch.Tensor) -> float:
    with torch.no_grad():
        latents = model.vae.encode(images).latent_dist.mode()
        return psnr(images, model.vae.decode(latents).sample.clamp(-1, 1))


def load(name: str) -> StableDiffusionLoRA:
    from lightning_sd.adapters import AdapterConfig

    # A frozen model: a zero-initialised adapter changes nothing, and nothing trains here.
    model = StableDiffusionLoRA(name, adapter=AdapterConfig(rank=1))
    model.configure_model()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="runs/pretrain/emoji")
    parser.add_argument("--model", default="tiny-pretrained")
    parser.add_argument("--random-model", default="runs/pretrain/initial",
                        help="the same architecture before UNet/text-encoder training")  # fmt: skip
    parser.add_argument("--captions", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0)
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(2)
    info, start = machine_info("cpu"), time.time()
    data = Path(args.data)
    train, captions = load_images(data / "train")
    heldout, _ = load_images(data / "heldout")
    pick = sorted(random.Random(0).sample(range(len(captions)), args.captions))
    real = (train[pick] + 1) / 2
    prompts = [captions[i] for i in pick]
    space = FeatureSpace()
    real_feats = space(real)
    fd = FrechetDistance(EfficientNetLite0())
    fd.load(torch.device("cpu"))
    raw_real = fd.features(real)
    rows = []
    for label, name in [
        ("pretrained", args.model),
        ("random UNet + text encoder", args.random_model),
    ]:
        if not os.path.exists(name) and name != "tiny-pretrained":
            continue
        model = load(name)
        with torch.no_grad():
            samples = model.generate(prompts, list(range(len(prompts))), steps=args.steps,
                                     guidance_scale=args.guidance)  # fmt: skip
        acc = retrieval_accuracy(space(samples), real_feats)
        dist = fd.distances(raw_real, fd.features(samples))
        rows.append({
            "model": label, "vae_psnr_db": vae_psnr(model, heldout), "captions": len(prompts),
            "top1": acc[1], "top5": acc[5], "chance_top1": 1 / len(prompts),
            "chance_top5": 5 / len(prompts), "fd_lite0": dist["fid_efficientnet_lite0"],
        })  # fmt: skip
        print(rows[-1], flush=True)
        if label == "pretrained":
            from lightning_sd.grid import image_grid, save_image_atomic

            grid = image_grid(torch.cat([real[:16], samples[:16]]), ncols=16, cell=48)
            save_image_atomic(grid, RESULTS / "pretrained_quality_samples.png")
    write_csv(RESULTS / "pretrained_quality.csv", rows)
    table = markdown_table(
        ["model", "VAE PSNR (held-out)", "top-1 (chance)", "top-5 (chance)", "FD-Lite0"],
        [[r["model"], f"{r['vae_psnr_db']:.2f} dB",
          f"{r['top1']:.1%} ({r['chance_top1']:.1%})", f"{r['top5']:.1%} ({r['chance_top5']:.1%})",
          f"{r['fd_lite0']:.1f}"] for r in rows],
    )  # fmt: skip
    text = [
        "# Tiny pretrained base: quality",
        "",
        f"`python benchmarks/pretrained_quality.py --data {args.data} --random-model "
        f"{args.random_model} --captions {args.captions}` "
        f"({args.captions} training captions, one sample each, {args.steps} DPM++ steps, "
        f"guidance {args.guidance}; retrieval and FD on EfficientNet-Lite0 features).",
        "",
        *table,
        "",
        "Top-k: the real image of a sample's caption is among the k real images most similar to "
        f"the sample (of {args.captions}). PSNR: VAE reconstruction of the "
        f"{len(heldout)} held-out emoji (never trained on). The second row is the same pipeline "
        "before the UNet and text encoder were trained (trained VAE).",
        "",
        "`pretrained_quality_samples.png`: real images (top) and samples of their captions.",
        "",
        describe_machine(info, os.getloadavg()[0]) + f" Wall time {time.time() - start:.0f} s.",
    ]
    atomic_write(RESULTS / "pretrained_quality.md", "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
