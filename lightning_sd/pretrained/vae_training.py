"""Train the tiny base's ``AutoencoderKL`` from scratch: a plain, seeded loop over images in memory.

The VAE is trained before the UNet and then frozen, as in Stable Diffusion (Rombach et al.
2022): reconstruction (L1 + MSE) plus a small KL term, no adversarial or perceptual loss:
flat-coloured emoji at 32 px need neither. The loop is deterministic on CPU with fixed threads.
Afterwards ``scaling_factor`` is set to 1 / std of the training latents, as SD did.

The VAE has no mid-block attention, so it is fully convolutional and trains on random crops
(half the side, aligned to the downsampling grid): a quarter of the compute per image, which
is what makes it trainable in minutes on two CPU cores.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import torch

__all__ = ["finetune_decoder", "load_images", "psnr", "train_vae", "tiny_vae"]


def load_images(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """An imagefolder's images as (N, 3, H, W) in [-1, 1], with their captions."""
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    arrays = [np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in rows]
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [r["text"] for r in rows]


def psnr(reference: torch.Tensor, images: torch.Tensor) -> float:
    """Mean PSNR (dB) over images in [-1, 1], each with its own MSE in [0, 1] pixel units."""
    mse = ((reference - images) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def tiny_vae(resolution: int, channels: tuple[int, ...] = (32, 64, 64)):
    """An SD1.x-layout ``AutoencoderKL`` (4 latent channels), downsampling 2 ** (len - 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=resolution,
        mid_block_add_attention=False,
    )


def train_vae(
    train_dir: str | Path,
    out_dir: str | Path,
    steps: int = 300,
    batch_size: int = 16,
    crop: int = 16,
    learning_rate: float = 1e-3,
    kl_weight: float = 1e-6,
    channels: tuple[int, ...] = (32, 64, 64),
    seed: int = 0,
    heldout_dir: str | Path | None = None,
):
    """Train, set the latent scaling factor, save with ``save_pretrained`` (safetensors).

    Writes ``loss.csv`` (step, loss, rec, kl) next to the weights and returns the VAE.
    """
    torch.manual_seed(seed)
    images, _ = load_images(train_dir)
    vae = tiny_vae(images.shape[-1], channels)
    # A near-deterministic posterior (std e^-10): a randomly initialised log-variance of 0
    # buries the latents in unit noise and stalls training for hundreds of steps; SD's VAE
    # ends with a tiny std anyway (KL weight 1e-6). The KL term then only bounds the means.
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -20.0
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    # Cosine decay to 5 %: the last steps polish the reconstructions.
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    gen = torch.Generator().manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = [("step", "loss", "rec", "kl", "seconds")]
    start = time.time()
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = images[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        factor = 2 ** (len(channels) - 1)
        top, left = (
            torch.randint(0, (x.shape[-1] - crop) // factor + 1, (2,), generator=gen) * factor
        ).tolist()
        x = x[..., top : top + crop, left : left + crop]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        rec_loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append((step, loss.item(), rec_loss.item(), kl.item(), round(time.time() - start, 1)))
        if step % 20 == 0:
            print(
                f"vae step {step} loss {loss.item():.4f} ({time.time() - start:.0f} s)", flush=True
            )
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(b).latent_dist.mean for b in images.split(64)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(out_dir, safe_serialization=True)
    with open(out_dir / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows(log)
    if heldout_dir is not None:
        held, _ = load_images(heldout_dir)
        with torch.no_grad():
            recon = vae.decode(vae.encode(held).latent_dist.mode()).sample.clamp(-1, 1)
        print(f"held-out PSNR {psnr(held, recon):.2f} dB over {len(held)} images")
    return vae


def finetune_decoder(
    vae_dir: str | Path,
    train_dir: str | Path,
    out_dir: str | Path,
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 5e-4,
    seed: int = 1,
):
    """Train the decoder further with the encoder frozen, as SD's ft-MSE VAE was made.

    The latents do not change, so this can run while (or after) the UNet trains on them.
    """
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    images, _ = load_images(train_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.requires_grad_(False)
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))
    )
    gen = torch.Generator().manual_seed(seed)
    log = [("step", "rec")]
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)]
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mode()
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.append((step, loss.item()))
        if step % 20 == 0:
            print(f"decoder step {step} loss {loss.item():.4f}", flush=True)
    vae.eval().save_pretrained(out_dir, safe_serialization=True)
    with open(Path(out_dir) / "decoder_loss.csv", "w", newline="") as f:
        csv.writer(f).writerows(log)
    return vae


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="the emoji set (train/ and heldout/ inside)")
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    data = Path(args.data_dir)
    train_vae(
        data / "train",
        args.out_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        heldout_dir=data / "heldout",
    )
