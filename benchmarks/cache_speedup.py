"""Median training-step time with the latent + text-embedding cache off and on.

Each run trains a LoRA with the real Trainer and ``CaptionDataModule`` (sidecar captions,
center crops, random flips, ``num_workers=0`` so data loading is on the clock) on a tiny
pipeline with random weights. A step is the wall time between consecutive
``on_train_batch_end`` calls: loading, encoding (when not cached), forward, backward, update.
The first ``--warmup`` steps of each run are dropped; runs with the cache off and on alternate
``--repeats`` times (so a busy neighbour on a shared CPU slows both alike), and the median and
the fastest step over all their steps are reported, with the median process CPU time (all
threads) per step: on a shared CPU the fastest step and the CPU time are the better estimates
of an idle machine. Filling the cache is a one-off cost, timed separately. Presets:
``small`` (64 px, 4x VAE) and ``small-vae8`` (256 px, SD1.5's 8x VAE: the VAE encoder costs
most).

    python benchmarks/cache_speedup.py    # -> benchmarks/results/cache_speedup.{csv,md}
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from lightning import Callback, Trainer, seed_everything

PHOTOS = ["astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry", "hubble_deep_field"]


class StepTimer(Callback):
    """Wall-clock and process CPU time at the end of every step."""

    def __init__(self):
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.ends.append((time.perf_counter(), time.process_time()))


def write_photos(folder: Path, count: int, side: int) -> Path:
    """``count`` crops of scikit-image's photos, a little larger than ``side``, captioned."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        crop = min(photo.size) - 8 * (i // len(PHOTOS))
        tile = photo.crop((0, 0, crop, crop)).resize((side * 5 // 4, side * 5 // 4))
        tile.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of {name.replace('_', ' ')}, {i}")
    return folder


def run(pipeline: Path, photos: Path, cache_dir: Path | None, args, resolution: int):
    """((wall, cpu) seconds of each step after warm-up, seconds to fill the cache)."""
    from lightning_sd.data import CaptionDataModule, SidecarCaptions
    from lightning_sd.module import StableDiffusionLoRA

    seed_everything(0, verbose=False)
    cached = cache_dir is not None
    module = StableDiffusionLoRA(str(pipeline), learning_rate=1e-4)
    dm = CaptionDataModule(
        SidecarCaptions(str(photos)), resolution=resolution, center_crop=True, random_flip=True,
        batch_size=args.batch_size, cache_dir=str(cache_dir) if cached else None,
        cache_latents=cached, cache_text_embeddings=cached,
    )  # fmt: skip
    fill_s = 0.0
    if cached:
        dm.setup("fit")
        start = time.perf_counter()
        dm.fill_cache(module)  # what fit would do first; timed apart from the steps
        fill_s = time.perf_counter() - start
    timer = StepTimer()
    trainer = Trainer(
        max_steps=args.warmup + args.steps + 1, callbacks=[timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(module, dm)
    ends = timer.ends
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends, ends[1:], strict=False)]
    return steps[args.warmup :], fill_s


def summary(steps: list[tuple[float, float]], fill_s: float) -> dict:
    wall = [w for w, _ in steps]
    q = statistics.quantiles(wall, n=10)
    return dict(
        median_step_s=statistics.median(wall), min_step_s=min(wall), p10_s=q[0], p90_s=q[-1],
        median_cpu_s=statistics.median(c for _, c in steps), fill_s=fill_s,
    )  # fmt: skip


def main() -> None:
    from lightning_sd.tiny import PRESETS, build_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["small", "small-vae8"])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads; 1 by default because on a shared CPU a multi-threaded step spins "
        "waiting for threads a neighbour's job has descheduled, and measures that job instead",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/cache_speedup")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for preset in args.presets:
            resolution = PRESETS[preset].resolution
            pipeline = build_tiny_pipeline(tmp / preset, preset, seed=0)
            photos = write_photos(tmp / f"photos-{preset}", args.images, resolution)
            times = {"off": [], "on": []}
            fills = []
            for repeat in range(args.repeats):
                for cache in ("off", "on"):
                    cache_dir = tmp / f"cache-{preset}-{repeat}" if cache == "on" else None
                    steps, fill_s = run(pipeline, photos, cache_dir, args, resolution)
                    times[cache] += steps
                    fills += [fill_s] if cache == "on" else []
            for cache in ("off", "on"):
                result = summary(times[cache], statistics.median(fills) if cache == "on" else 0.0)
                rows.append(dict(preset=preset, resolution=resolution, cache=cache, **result))
                print(
                    f"{preset:>10} {resolution:>4} px  cache {cache:>3}: "
                    f"median step {result['median_step_s'] * 1e3:7.1f} ms, "
                    f"fastest {result['min_step_s'] * 1e3:7.1f} ms, "
                    f"median CPU time {result['median_cpu_s'] * 1e3:7.1f} ms"
                    + (f"  (cache filled in {result['fill_s']:.1f} s)" if cache == "on" else ""),
                    flush=True,
                )
    write_results(Path(args.out), rows, args)


def write_results(out: Path, rows: list[dict], args) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in rows
        )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line),
        platform.processor(),
    ) if os.path.exists("/proc/cpuinfo") else platform.processor()  # fmt: skip
    lines = [
        "# Training step time: latent + text-embedding cache off vs on",
        "",
        f"Tiny SD1.x-architecture pipelines (random weights), batch {args.batch_size}, "
        f"{args.images} captioned photos, center crop + random flip, LoRA rank 4 on the UNet; "
        f"median of {args.repeats} x {args.steps} steps (runs alternating off/on, "
        f"{args.warmup} warm-up steps dropped from each).",
        f"Machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
        f"{args.threads} thread(s) (on a CPU shared with other jobs a multi-threaded step spins "
        f"on descheduled threads and measures the neighbours), load average "
        f"{os.getloadavg()[0]:.1f} at the end, commit {commit.stdout.strip()}.",
        "What the cache removes per step: the VAE encoder (and the text encoder) forward; the "
        "UNet forward and backward remain, so the gain grows with the VAE's share of a step.",
        "",
        "| preset | px | cache | median step ms | fastest ms | p10 ms | p90 ms | median CPU ms "
        "| cache fill s | speed-up (median) | speed-up (fastest) | speed-up (CPU) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    off = {r["preset"]: r for r in rows if r["cache"] == "off"}
    for r in rows:
        base = off[r["preset"]]
        lines.append(
            f"| {r['preset']} | {r['resolution']} | {r['cache']} | {r['median_step_s'] * 1e3:.1f} "
            f"| {r['min_step_s'] * 1e3:.1f} | {r['p10_s'] * 1e3:.1f} | {r['p90_s'] * 1e3:.1f} "
            f"| {r['median_cpu_s'] * 1e3:.1f} | {r['fill_s']:.1f} "
            f"| {base['median_step_s'] / r['median_step_s']:.2f}x "
            f"| {base['min_step_s'] / r['min_step_s']:.2f}x "
            f"| {base['median_cpu_s'] / r['median_cpu_s']:.2f}x |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
