"""The whole recipe of the tiny pretrained base, one stage after another, seeded.

    python -m lightning_sd.pretrained.recipe --work runs/pretrain \
        --out lightning_sd/assets/tiny-pretrained

1. draw the emoji set (needs Debian's ``fonts-noto-color-emoji``);
2. train the VAE (``vae_training``), then freeze it;
3. write the initial pipeline: trained VAE, random UNet and text encoder (``base``);
4. train the UNet and the text encoder in full with ``lightning-sd fit`` and
   ``configs/pretrain/emoji_base.yaml`` (the package's own module and data module);
5. fine-tune the VAE decoder with the encoder frozen (SD's ft-MSE recipe): the latents the UNet
   learned do not change, so this stage is independent of stage 4 (one thread, so it can run
   beside it);
6. assemble the folder, write the model card (loss curves, sample grid).

Each stage skips itself when its output exists, so an interrupted recipe continues. CPU
training is deterministic with fixed threads: the same seed gives the same loss curve.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_sd.pretrained.base import assemble, build_initial_pipeline
from lightning_sd.pretrained.emoji import build_emoji_dataset
from lightning_sd.pretrained.vae_training import finetune_decoder, train_vae

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "emoji_base.yaml"


def fit_args(work: Path, max_steps: int, config: Path = CONFIG) -> list[str]:
    """The ``lightning-sd fit`` arguments of stage 4, with every path under ``work``."""
    return [
        "fit",
        "--config",
        str(config),
        "--model.pretrained_model_name_or_path",
        str(work / "initial"),
        "--data.init_args.source.init_args.folder",
        str(work / "emoji" / "train"),
        "--data.init_args.cache.dir",
        str(work / "cache"),
        "--trainer.default_root_dir",
        str(work),
        "--trainer.logger.init_args.save_dir",
        str(work),
        "--trainer.max_steps",
        str(max_steps),
        "--export.dirpath",
        str(work / "trained"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/pretrain", help="data, logs, checkpoints")
    parser.add_argument("--out", default="runs/pretrain/tiny-pretrained")
    parser.add_argument("--vae-steps", type=int, default=16000)
    parser.add_argument("--steps", type=int, default=6000, help="UNet + text encoder steps")
    parser.add_argument("--decoder-steps", type=int, default=4000)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    work = Path(args.work)
    if not (work / "emoji" / "train").is_dir():
        print(build_emoji_dataset(work / "emoji", size=32))
    if not (work / "vae" / "config.json").is_file():
        emoji = work / "emoji"
        train_vae(emoji / "train", work / "vae", args.vae_steps, heldout_dir=emoji / "heldout")
    if not (work / "initial" / "model_index.json").is_file():
        build_initial_pipeline(work / "vae", work / "initial", seed=0)
    if not (work / "trained" / "unet").is_dir():
        from lightning_sd.cli import build_cli

        build_cli(fit_args(work, args.steps))
    if not (work / "vae_decoder" / "config.json").is_file():
        torch.set_num_threads(1)
        finetune_decoder(work / "vae", work / "emoji" / "train", work / "vae_decoder",
                         args.decoder_steps)  # fmt: skip
        torch.set_num_threads(2)
    out = assemble(work / "initial", work / "trained", args.out, vae_dir=work / "vae_decoder")
    from lightning_sd.pretrained.card import write_card

    write_card(out, work)
    print(f"pretrained pipeline written to {out}")


if __name__ == "__main__":
    main()
