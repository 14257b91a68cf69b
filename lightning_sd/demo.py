"""The embedded default: a DreamBooth LoRA on a tiny pipeline with real photos, all offline.

``make demo`` runs ``python -m lightning_sd.demo``: it builds a tiny SD1.x-architecture
pipeline (random weights), cuts a small instance set from scikit-image's cat photo, measures
the held-out denoising loss, trains a LoRA with the same ``StableDiffusionLoRA`` and
``DreamBoothDataModule`` that ``lightning-sd fit`` builds from YAML, exports the diffusers LoRA
file, measures again, and writes a before/after sample grid.

The base model is random, so the samples are not cats: what the demo shows is the training
loop, the numbers moving, and the files a real run writes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything

from lightning_sd.adapters import AdapterConfig
from lightning_sd.callbacks.export import LoRAExport
from lightning_sd.data import DreamBoothDataModule
from lightning_sd.grid import image_grid, save_image_atomic
from lightning_sd.module import StableDiffusionLoRA
from lightning_sd.tiny import PRESETS, build_tiny_pipeline

PROMPT = "a photo of sks cat"


def write_instance_photos(out_dir: Path, count: int = 8, side: int = 128, seed: int = 0) -> Path:
    """Random square crops of a real photo (scikit-image's ``chelsea``) as the instance set."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out", help="output folder")
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    start = time.time()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out = Path(args.out)
    pipe_dir = out / f"tiny-pipeline-{args.preset}"
    if not pipe_dir.exists():
        build_tiny_pipeline(pipe_dir, args.preset, seed=0)
    resolution = PRESETS[args.preset].resolution
    instance_dir = write_instance_photos(out / "instance", side=max(128, resolution))

    seed_everything(0)
    module = StableDiffusionLoRA(
        str(pipe_dir),
        adapter=AdapterConfig(rank=args.rank, alpha=args.rank),
        learning_rate=1e-3,
        lr_warmup_steps=20,
    )
    data = DreamBoothDataModule(
        str(instance_dir), PROMPT, resolution=resolution, batch_size=4, random_flip=True
    )
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    before = Trainer(**quiet).validate(module, data, verbose=False)[0]["val/loss"]
    seeds, prompts = [0, 1, 2, 3], [PROMPT] * 4
    module.eval()
    samples_before = module.generate(prompts, seeds, steps=20)

    history, export = LossHistory(), LoRAExport()
    trainer = Trainer(
        max_steps=args.steps,
        default_root_dir=str(out / "runs"),
        log_every_n_steps=10,
        check_val_every_n_epoch=None,
        val_check_interval=100,
        callbacks=[history, export],
    )
    trainer.fit(module, data)
    after = Trainer(**quiet).validate(module, data, verbose=False)[0]["val/loss"]
    module.eval()
    samples_after = module.generate(prompts, seeds, steps=20)

    photos = torch.stack([data.val_set[i]["pixel_values"] for i in range(4)]) / 2 + 0.5
    grid = image_grid(
        torch.cat([photos, samples_before, samples_after]),
        ncols=4,
        row_labels=["instance photos", "base model", f"+ LoRA, {args.steps} steps"],
        col_labels=[f"seed {s}" for s in seeds],
        cell=128,
    )
    grid_path = save_image_atomic(grid, out / "samples_before_after.png")

    first, last = history.losses[:10], history.losses[-10:]
    print("\n== lightning_sd demo ==")
    print(f"pipeline            {pipe_dir} (preset {args.preset}, {resolution} px, random weights)")
    print(f"instance images     {instance_dir} ({len(data.train_set)} crops of skimage 'chelsea')")
    print(f"steps               {trainer.global_step}")
    print(
        f"train loss          first 10 steps mean {sum(first) / len(first):.4f}"
        f" -> last 10 steps mean {sum(last) / len(last):.4f}"
    )
    print(
        f"held-out loss       before {before:.4f} -> after {after:.4f}"
        " (fixed noise and timesteps, instance images)"
    )
    print(f"LoRA (diffusers)    {export.written_lora}")
    print(f"LoRA (kohya)        {export.written.get('kohya')}")
    print(f"model card          {export.written.get('card')}")
    print(f"sample grid         {grid_path}")
    print(f"logs + checkpoints  {trainer.log_dir}")
    print(f"wall time           {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
