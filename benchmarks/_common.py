"""What the training benchmarks share: step timing, peak memory, a real captioned photo set,
the machine's description and atomic result files.

Not a benchmark itself; ``lora_vs_dora.py`` and ``throughput.py`` import it.
"""

from __future__ import annotations

import csv
import io
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from lightning import Callback

from lightning_sd.atomic import write_atomic
from lightning_sd.data.settings import CacheSettings, LoaderSettings

TUXPAINT_STAMPS = Path("/usr/share/tuxpaint/stamps")
SKIMAGE_PHOTOS = ["astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry",
                  "hubble_deep_field", "camera", "brick", "grass", "gravel"]  # fmt: skip


# -- timing -----------------------------------------------------------------------------------
class StepTimer(Callback):
    """Wall-clock time, process CPU time (all threads) and loss at the end of every step.

    A step is the time between two consecutive ``on_train_batch_end`` calls: data loading,
    encoding (when not cached), forward, backward, optimizer step and Lightning's own work.
    """

    def __init__(self):
        self.ends: list[tuple[float, float]] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mark(outputs["loss"] if isinstance(outputs, dict) else outputs)

    def mark(self, loss: torch.Tensor | None = None) -> None:
        """Record a step end; the plain-PyTorch loop calls this at the same point."""
        self.ends.append((time.perf_counter(), time.process_time()))
        if loss is not None:
            self.losses.append(float(loss.detach()))

    def steps(self, warmup: int) -> list[tuple[float, float]]:
        """(wall, CPU) seconds of each step after the first ``warmup`` steps."""
        pairs = zip(self.ends, self.ends[1:], strict=False)
        return [(b[0] - a[0], b[1] - a[1]) for a, b in pairs][warmup:]


def summarize_steps(steps: list[tuple[float, float]]) -> dict[str, float]:
    """Median, fastest, 10th/90th percentile wall seconds and median CPU seconds per step.

    On a CPU shared with other jobs the median wall time includes the neighbours' share; the
    fastest step and the CPU time approach what an idle machine would give.
    """
    wall = [w for w, _ in steps]
    q = statistics.quantiles(wall, n=10) if len(wall) > 1 else wall * 9
    return {
        "median_step_s": statistics.median(wall),
        "min_step_s": min(wall),
        "p10_step_s": q[0],
        "p90_step_s": q[-1],
        "cpu_step_s": statistics.median(c for _, c in steps),
    }


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so wall-clock timings mean what they say."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# -- memory -----------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one block: GPU max allocated on CUDA, else the process's peak RSS;
    ``start_mb`` is what was in use when the block began (RSS / allocated).

    On Linux, writing 5 to ``/proc/self/clear_refs`` resets the peak RSS (VmHWM) to the current
    RSS, so each block's peak is its own (it includes what the process held before it).
    """

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb = self.start_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.peak_mb != self.peak_mb:  # not read yet (NaN)
            self.read()

    def start(self) -> None:
        self.peak_mb = float("nan")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        if Path("/proc/self/status").exists():
            status = Path("/proc/self/status").read_text().splitlines()
            self.start_mb = int(next(x for x in status if x.startswith("VmRSS")).split()[1]) / 1024
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass  # peak since process start: an upper bound

    def read(self) -> float:
        """The peak since ``start``, in MiB (also kept in ``peak_mb``)."""
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif Path("/proc/self/status").exists():
            status = Path("/proc/self/status").read_text().splitlines()
            self.peak_mb = int(next(x for x in status if x.startswith("VmHWM")).split()[1]) / 1024
        else:  # macOS: ru_maxrss in bytes, never reset
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        return self.peak_mb


def memory_label(device: torch.device | str) -> str:
    return "GPU max allocated" if torch.device(device).type == "cuda" else "process peak RSS"


# -- data -------------------------------------------------------------------------------------
def tuxpaint_items() -> list[tuple[Path, str]]:
    """(PNG, English caption) of every Tux Paint stamp photo with a caption file, sorted."""
    items = []
    for png in sorted(TUXPAINT_STAMPS.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if txt.is_file():
            caption = txt.read_text(encoding="utf-8", errors="replace").splitlines()
            if caption and caption[0].strip():
                items.append((png, caption[0].strip().rstrip(".")))
    return items


def write_photo_set(folder: Path, count: int, side: int, source: str = "auto") -> str:
    """Write ``count`` captioned photos (``NNN.png`` + ``NNN.txt``) of ``side * 5 / 4`` px.

    Args:
        folder: destination (created).
        count: how many images.
        side: the training resolution; images are a little larger so crops have room.
        source: ``tuxpaint`` (Debian's ``tuxpaint-stamps-default``: real photo cut-outs with
            English captions, composited on white and padded square), ``skimage``
            (scikit-image's sample photos, crops captioned by name), or ``auto``: Tux Paint
            when installed, else scikit-image.

    Returns:
        A description of the set, for the results' header.
    """
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    size = side * 5 // 4
    if source == "auto":
        source = "tuxpaint" if TUXPAINT_STAMPS.is_dir() and tuxpaint_items() else "skimage"
    if source == "tuxpaint":
        items = tuxpaint_items()
        if not items:
            raise FileNotFoundError(
                f"no Tux Paint stamps in {TUXPAINT_STAMPS}: "
                "`sudo apt-get install tuxpaint-stamps-default`, or use --data skimage"
            )
        # Evenly spaced over the sorted list, so every category is represented.
        picked = [items[i * len(items) // count] for i in range(min(count, len(items)))]
        for i, (png, caption) in enumerate(picked):
            stamp = Image.open(png).convert("RGBA")
            square = Image.new("RGBA", (max(stamp.size),) * 2, (255, 255, 255, 255))
            offset = ((square.width - stamp.width) // 2, (square.height - stamp.height) // 2)
            square.alpha_composite(stamp, offset)
            square.convert("RGB").resize((size, size), Image.LANCZOS).save(folder / f"{i:03d}.png")
            (folder / f"{i:03d}.txt").write_text(f"a photo of {caption.lower()}")
        return f"{len(picked)} Tux Paint stamp photos (tuxpaint-stamps-default) with their captions"
    if source != "skimage":
        raise ValueError(f"unknown photo source {source!r}: tuxpaint, skimage or auto")
    from skimage import data

    for i in range(count):
        name = SKIMAGE_PHOTOS[i % len(SKIMAGE_PHOTOS)]
        photo = Image.fromarray(getattr(data, name)()).convert("RGB")
        crop = min(photo.size) - 8 * (i // len(SKIMAGE_PHOTOS))
        tile = photo.crop((0, 0, crop, crop)).resize((size, size))
        tile.save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"a photo of {name.replace('_', ' ')}, {i}")
    return f"{count} crops of scikit-image's sample photos, captioned by name"


# -- machine and files ------------------------------------------------------------------------
def machine_info(device: torch.device | str) -> dict[str, str]:
    """What produced the numbers: processor, versions, commit, load."""
    import diffusers
    import lightning
    import peft
    import transformers

    root = Path(__file__).resolve().parent.parent
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
    device = torch.device(device)
    if device.type == "cuda":
        processor = torch.cuda.get_device_name(device)
    elif os.path.exists("/proc/cpuinfo"):
        lines = open("/proc/cpuinfo").read().splitlines()
        processor = next((x.split(":", 1)[1].strip() for x in lines if "model name" in x), "?")
    else:
        processor = platform.processor() or platform.machine()
    return {
        "processor": processor,
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "versions": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"lightning {lightning.__version__}, diffusers {diffusers.__version__}, "
        f"peft {peft.__version__}, transformers {transformers.__version__}",
        "commit": commit.stdout.strip() + (" (uncommitted changes)" if dirty.stdout else ""),
        "load_average_1min": f"{os.getloadavg()[0]:.2f}",
    }


def describe_machine(info: dict[str, str], load_end: float) -> str:
    return (
        f"Machine: {info['processor']}, {info['cpus']} CPUs, {info['torch_threads']} torch "
        f"thread(s); {info['versions']}; commit {info['commit']}; 1-minute load average "
        f"{info['load_average_1min']} at the start, {load_end:.2f} at the end."
    )


def atomic_write(path: Path, data: str | bytes) -> None:
    """Results through the package's one atomic writer (unique temporary, fsync, rename)."""
    write_atomic(path, data, "result")


def mean_over_seeds(runs: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """One row per distinct ``keys`` (first-seen order): the mean of every other numeric
    column over its runs, ``<column>_std`` beside it (0 for one run) and ``seeds``."""
    import statistics

    out = []
    for key in dict.fromkeys(tuple(r[k] for k in keys) for r in runs):
        group = [r for r in runs if tuple(r[k] for k in keys) == key]
        row = dict(zip(keys, key, strict=True), seeds=len(group))
        for col in [c for c in group[0] if c not in (*keys, "seed")]:
            values = [float(r[col]) for r in group]
            row[col] = statistics.fmean(values)
            row[f"{col}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(row)
    return out


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(
        {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows
    )
    atomic_write(path, buf.getvalue())


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write(path, buf.getvalue())


@contextmanager
def threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- one training setup, shared by both benchmarks ---------------------------------------------
def make_module(model: str, kind: str = "lora", rank: int = 4, checkpointing: bool = False,
                learning_rate: float = 1e-4):  # fmt: skip
    """The package's ``StableDiffusionLoRA``: rank-r LoRA/DoRA on the UNet's attention, alpha = r."""
    from lightning_sd.adapters import AdapterConfig
    from lightning_sd.module import StableDiffusionLoRA

    return StableDiffusionLoRA(
        model,
        adapter=AdapterConfig(kind=kind, rank=rank),
        gradient_checkpointing=checkpointing,
        learning_rate=learning_rate,
    )


def make_datamodule(photos: Path, resolution: int, batch_size: int,
                    cache_dir: Path | None = None, validation_split: float = 0.0, seed: int = 0):  # fmt: skip
    """Sidecar-captioned photos, center crops + random flips, loading on the clock
    (``num_workers=0``); with ``cache_dir`` the VAE latents and text embeddings are cached."""
    from lightning_sd.data import CaptionDataModule, SidecarCaptions

    cached = cache_dir is not None
    return CaptionDataModule(
        SidecarCaptions(str(photos)),
        resolution=resolution,
        center_crop=True,
        random_flip=True,
        validation_split=validation_split,
        loader=LoaderSettings(batch_size=batch_size, seed=seed),
        cache=CacheSettings(
            dir=str(cache_dir) if cached else None, latents=cached, text_embeddings=cached
        ),
    )


def trainer_kwargs(device: str, precision: str, max_steps: int) -> dict:
    """A bare Trainer: no logger, checkpoints, progress bar or model summary."""
    return dict(
        max_steps=max_steps, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip


def quiet() -> None:
    """Silence per-run chatter (Lightning's device lines and tips, weight-loading bars), so each
    cell's one result line stays readable. Warnings still show."""
    import logging

    import diffusers
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def sd15_unet():
    """SD1.5's UNet architecture (stable-diffusion-v1-5/unet/config.json) with random weights:
    sizes and FLOPs depend only on shapes, so no download is needed. Build it under
    ``torch.device("meta")`` when only shapes are needed."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=768,
        attention_head_dim=8,
        layers_per_block=2,
    )
