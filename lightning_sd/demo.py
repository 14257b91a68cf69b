"""The embedded default: DreamBooth LoRA on a subject the pretrained tiny base has never seen.

``make demo`` runs ``python -m lightning_sd.demo``: it loads the shipped ``tiny-pretrained``
base (32 px, pretrained here on Noto emoji with every cat held out), trains a LoRA on five
cat-face emoji with the prompt ``sks cat face`` through the same ``StableDiffusionLoRA`` and
``DreamBoothDataModule`` that ``lightning-sd fit`` builds from YAML, exports the diffusers LoRA
file, and prints what changed: subject fidelity (EfficientNet-Lite0 feature similarity of
samples to five other, held-out cat faces) before and after, and prior drift (how far samples
of the class prompt and of unrelated prompts moved from the base's). ``--preset`` picks a
random-weight tiny pipeline instead, to see the loop alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything

from lightning_sd.adapters import AdapterConfig
from lightning_sd.callbacks.export import LoRAExport
from lightning_sd.callbacks.progress import StepProgressBar
from lightning_sd.data import DreamBoothDataModule
from lightning_sd.data.settings import LoaderSettings
from lightning_sd.grid import image_grid, save_image_atomic
from lightning_sd.module import StableDiffusionLoRA
from lightning_sd.pretrained.subject import (
    CLASS_PROMPT,
    SUBJECT_PROMPT,
    UNRELATED_PROMPTS,
    SubjectProbe,
    load_images,
    subject_dir,
)
from lightning_sd.tiny import PRESETS, build_tiny_pipeline

PRETRAINED = "tiny-pretrained"


def write_instance_photos(out_dir: Path, count: int = 8, side: int = 128, seed: int = 0) -> Path:
    """Random square crops of a real photo (scikit-image's ``chelsea``): an instance set for
    tests on random-weight pipelines."""
    from PIL import Image
    from skimage import data

    photo = Image.fromarray(data.chelsea())  # 451 x 300, the cat
    gen = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        crop = int(torch.randint(200, 281, (1,), generator=gen))
        x = int(torch.randint(0, photo.width - crop + 1, (1,), generator=gen))
        y = int(torch.randint(0, photo.height - crop + 1, (1,), generator=gen))
        tile = photo.crop((x, y, x + crop, y + crop)).resize((side, side), Image.BICUBIC)
        save_image_atomic(tile, out_dir / f"cat_{i:02d}.png")
    return out_dir


class LossHistory(Callback):
    """Keeps every training loss, to report the first and last steps."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def base_model(out: Path, preset: str) -> tuple[str, int]:
    """The base pipeline (its name or folder) and its resolution."""
    if preset == PRETRAINED:
        return PRETRAINED, 32
    pipe_dir = out / f"tiny-pipeline-{preset}"
    if not pipe_dir.exists():
        build_tiny_pipeline(pipe_dir, preset, seed=0)
    return str(pipe_dir), PRESETS[preset].resolution


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--preset", default=PRETRAINED, choices=[PRETRAINED, *sorted(PRESETS)])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    base, resolution = base_model(out, args.preset)

    seed_everything(0)
    module = StableDiffusionLoRA(
        base,
        adapter=AdapterConfig(rank=args.rank, alpha=args.rank),
        learning_rate=1e-3,
        lr_warmup_steps=20,
    )
    data = DreamBoothDataModule(
        str(subject_dir("instance")),
        SUBJECT_PROMPT,
        resolution=resolution,
        random_flip=True,
        loader=LoaderSettings(batch_size=4),
    )
    module.configure_model()
    probe = SubjectProbe()
    before = probe.sample(module)

    history, export = LossHistory(), LoRAExport()
    trainer = Trainer(
        max_steps=args.steps,
        default_root_dir=str(out / "runs"),
        log_every_n_steps=10,
        limit_val_batches=0,
        enable_model_summary=False,
        callbacks=[history, export, StepProgressBar()],
    )
    trainer.fit(module, data)
    after = probe.sample(module)

    n = 4
    instance = load_images(subject_dir("instance"), resolution)[:n]
    rows = [instance, before["subject"][:n], after["subject"][:n]]
    k = len(probe.seeds)  # seed 0 of each unrelated prompt
    rows += [before["unrelated"][::k][:n], after["unrelated"][::k][:n]]
    grid = image_grid(
        torch.cat(rows),
        ncols=n,
        row_labels=[
            "instance images",
            f"base: {SUBJECT_PROMPT}",
            f"+ LoRA {args.steps} steps",
            "base: unrelated",
            "+ LoRA: unrelated",
        ],
        col_labels=[f"seed {s}" for s in probe.seeds[:n]],
        cell=96,
    )
    grid_path = save_image_atomic(grid, out / "samples_before_after.png")

    fid_before, fid_after = probe.fidelity(before), probe.fidelity(after)
    drift = probe.drift(before, after)
    first, last = history.losses[:10], history.losses[-10:]
    print("\n== lightning_sd demo ==")
    print(f"base model          {base} ({resolution} px)")
    print(f"instance images     {subject_dir('instance')} (5 cat-face emoji, unseen by the base)")
    print(f"steps               {trainer.global_step} (LoRA rank {args.rank}, '{SUBJECT_PROMPT}')")
    print(
        f"train loss          first 10 steps mean {sum(first) / len(first):.4f}"
        f" -> last 10 steps mean {sum(last) / len(last):.4f}"
    )
    print(
        f"subject fidelity    before {fid_before:.3f} -> after {fid_after:.3f}"
        f" (cosine, EfficientNet-Lite0, {len(probe.seeds)} samples vs 5 held-out cat faces)"
    )
    print(
        f"prior drift         class '{CLASS_PROMPT}' 0 -> {drift['class']:.3f};"
        f" unrelated {UNRELATED_PROMPTS} 0 -> {drift['unrelated']:.3f}"
        " (cosine distance to the base's samples, same seeds)"
    )
    print(f"LoRA (diffusers)    {export.written_lora}")
    print(f"sample grid         {grid_path}")
    print(f"logs + checkpoints  {trainer.log_dir}")
    print(f"wall time           {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
