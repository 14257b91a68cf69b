"""Training step time and peak memory for the main switches, and Lightning's own overhead.

Every setup trains the package's ``StableDiffusionLoRA`` on ``CaptionDataModule`` (real
captioned photos, center crops, random flips, ``num_workers=0`` so loading is on the clock),
changing one switch from the baseline (``--preset`` pipeline at its resolution, LoRA rank 4 on
the UNet's attention, no cache, no gradient checkpointing, float32, bare Trainer):

- framework: the bare Trainer vs a plain-PyTorch reference loop doing the same maths (same
  module, UNet + LoRA, same ``objective.loss`` call, same AdamW param groups, same DataLoader),
  and vs a Trainer with its default progress bar and TensorBoard logger;
- cache: latent + text-embedding cache off / on, on each ``--cache-presets`` pipeline, and the
  VAE-encode and text-encode time of one batch measured alone (what the cache can remove);
- gradient checkpointing; precision (``--precisions``); rank and kind (``--ranks``,
  ``--kinds``); resolution (``--resolutions``).

A step is the wall time between two consecutive step ends (loading, encoding, forward,
backward, update, framework). The first ``--warmup`` steps of every run are dropped; runs of
all setups alternate ``--repeats`` times, so a busy neighbour on a shared CPU slows all alike;
each row pools its repeats: median, fastest, p10/p90 step and median process CPU time per step.
This file is long (~300 lines) because it holds the setups, the reference loop and the report.

    python benchmarks/throughput.py   # ~12 min on 2 CPU cores -> benchmarks/results/throughput.*
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from lightning import Trainer, seed_everything
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    PeakMemory,
    StepTimer,
    atomic_write,
    describe_machine,
    machine_info,
    make_datamodule,
    make_module,
    markdown_table,
    memory_label,
    quiet,
    save_figure,
    summarize_steps,
    sync,
    trainer_kwargs,
    write_csv,
    write_photo_set,
)  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """One measured configuration. ``loop``: ``lightning`` (bare Trainer), ``lightning+ui``
    (progress bar + TensorBoard logger), ``reference`` (plain PyTorch) or ``encode`` (only the
    VAE and text encoders on uncached batches)."""

    preset: str
    resolution: int
    kind: str = "lora"
    rank: int = 4
    cache: bool = False
    checkpointing: bool = False
    precision: str = "32-true"
    loop: str = "lightning"

    def label(self) -> str:
        parts = [self.loop, self.preset, f"{self.resolution}px", f"{self.kind}{self.rank}"]
        parts += ["cache"] * self.cache + ["ckpt"] * self.checkpointing + [self.precision]
        return " ".join(parts)


def setups(args, resolution_of) -> list[tuple[str, Setup]]:
    """(group, setup) pairs; the baseline appears in several groups but runs once a repeat."""
    base = Setup(args.preset, args.resolution or resolution_of(args.preset))
    out = [("framework", base), ("framework", replace(base, loop="reference")),
           ("framework", replace(base, loop="lightning+ui"))]  # fmt: skip
    for preset in args.cache_presets:
        off = Setup(preset, resolution_of(preset))
        out += [("cache", off), ("cache", replace(off, cache=True)),
                ("cache", replace(off, loop="encode"))]  # fmt: skip
    out += [("checkpointing", base), ("checkpointing", replace(base, checkpointing=True))]
    out += [("precision", replace(base, precision=p)) for p in ["32-true", *args.precisions]]
    out += [("rank", replace(base, kind=k, rank=r)) for k in args.kinds for r in args.ranks]
    resolutions = sorted({base.resolution, *args.resolutions})
    out += [("resolution", replace(base, resolution=r)) for r in resolutions]
    return out


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def reference_loop(module, dm, device: torch.device, max_steps: int, timer: StepTimer) -> None:
    """What the Trainer does for one optimizer step, in plain PyTorch: the same module's
    latents, conditioning and objective call (as ``training_step``), the optimizer
    ``configure_optimizers`` builds (``lightning_sd.optim.build_optimizer``) over the module's
    own param groups, zero_grad / backward / step. No LR scheduler (a constant one is a no-op)."""
    from lightning_sd.optim import build_optimizer

    module.configure_model()
    module.to(device)
    # the optimizer configure_optimizers builds (default AdamW), over the same param groups
    optimizer = build_optimizer(getattr(module, "optimizer", None), module.param_groups())
    loader, step = dm.train_dataloader(), 0
    while step < max_steps:
        for batch in loader:
            batch = to_device(batch, device)
            latents, cond = module.batch_latents(batch), module.batch_cond(batch)
            per_sample = module.objective.loss(module.denoiser_fn, latents, **cond)
            loss = (per_sample * batch["loss_weight"]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync(device)
            timer.mark(loss)
            step += 1
            if step == max_steps:
                break


@torch.no_grad()
def encode_times(module, dm, device: torch.device, batches: int) -> list[tuple[float, float]]:
    """(VAE-encode s, text-encode s) of ``batches`` uncached training batches, each timed alone."""
    module.configure_model()
    module.to(device)
    out = []
    for i, batch in enumerate(dm.train_dataloader()):
        if i == batches:
            break
        batch = to_device(batch, device)
        start = time.perf_counter()
        module.encode_latents(batch["pixel_values"])
        sync(device)
        middle = time.perf_counter()
        module.encode_text(batch["prompt"])
        sync(device)
        out.append((middle - start, time.perf_counter() - middle))
    return out[1:] if len(out) > 1 else out  # the first call warms up


def run(setup: Setup, args, model: str, photos: Path, tmp: Path) -> dict:
    """Train one setup; its step times (after warm-up), peak memory and cache-fill time."""
    seed_everything(0, verbose=False)
    gc.collect()
    device = torch.device(args.device)
    cache_dir = Path(tempfile.mkdtemp(dir=tmp, prefix="cache-")) if setup.cache else None
    module = make_module(model, setup.kind, setup.rank, setup.checkpointing)
    dm = make_datamodule(photos, setup.resolution, args.batch_size, cache_dir)
    dm.setup("fit")
    timer, fill_s, encode = StepTimer(), float("nan"), []
    max_steps = args.warmup + args.steps + 1
    with PeakMemory(device) as memory:
        if setup.cache:
            start = time.perf_counter()
            dm.fill_cache(module)  # what fit would do first, timed apart from the steps
            fill_s = time.perf_counter() - start
        if setup.loop == "reference":
            reference_loop(module, dm, device, max_steps, timer)
        elif setup.loop == "encode":
            encode = encode_times(module, dm, device, args.warmup + args.steps)
        else:
            ui = setup.loop == "lightning+ui"
            kwargs = trainer_kwargs(args.device, setup.precision, max_steps)
            kwargs.update(enable_progress_bar=ui, logger=ui, default_root_dir=str(tmp / "logs"))
            trainer = Trainer(callbacks=[timer], limit_val_batches=0, **kwargs)
            # the progress bar still renders every step; only its text is discarded
            with contextlib.redirect_stderr(io.StringIO()) if ui else contextlib.nullcontext():
                trainer.fit(module, dm)
    return dict(steps=timer.steps(args.warmup), peak_mb=memory.peak_mb, fill_s=fill_s,
                encode=encode)  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    from lightning_sd.tiny import PRESETS, build_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="tiny pipeline of the baseline")
    parser.add_argument("--model", help="hub id or folder of a real pipeline (replaces presets)")
    parser.add_argument("--cache-presets", nargs="*", default=["small", "small-vae8"])
    parser.add_argument("--resolution", type=int, help="baseline px (default: the preset's)")
    parser.add_argument("--resolutions", type=int, nargs="*", default=[32, 128])
    parser.add_argument("--ranks", type=int, nargs="*", default=[4, 16, 64])
    parser.add_argument("--kinds", nargs="*", default=["lora", "dora"])
    parser.add_argument("--precisions", nargs="*", help="besides 32-true; default bf16-mixed "
                        "on CPU, 16-mixed and bf16-mixed on CUDA")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--data", default="auto", help="tuxpaint, skimage or auto")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per setup")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch CPU threads; 1 because on a shared CPU a multi-threaded step spins waiting "
        "for threads a neighbour's job has descheduled, and measures that job instead",
    )  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results/throughput")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    if args.precisions is None:
        args.precisions = ["16-mixed", "bf16-mixed"] if args.device == "cuda" else ["bf16-mixed"]
    if args.model:  # one real pipeline stands in for every preset
        args.cache_presets = ["model"] if args.cache_presets else []
        args.preset = "model"
    info = machine_info(args.device)

    def resolution_of(preset: str) -> int:
        return args.resolution or 512 if preset == "model" else PRESETS[preset].resolution

    pairs = setups(args, resolution_of)
    unique = list(dict.fromkeys(s for _, s in pairs))
    results: dict[Setup, dict] = {s: dict(steps=[], peak=[], fill=[], encode=[]) for s in unique}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models, photo_sets, data_desc = {}, {}, ""
        for s in unique:
            if s.preset not in models:
                models[s.preset] = args.model or str(
                    build_tiny_pipeline(tmp / s.preset, s.preset, seed=0)
                )
            if s.resolution not in photo_sets:
                folder = tmp / f"photos-{s.resolution}"
                data_desc = write_photo_set(folder, args.images, s.resolution, args.data)
                photo_sets[s.resolution] = folder
        bar = tqdm(total=len(unique) * args.repeats, desc="throughput", file=sys.stdout)
        for repeat in range(args.repeats):
            # rotate the order each repeat, so no setup always runs right after the same one
            order = unique[repeat % len(unique) :] + unique[: repeat % len(unique)]
            for s in order:
                bar.set_postfix_str(s.label())
                r = run(s, args, models[s.preset], photo_sets[s.resolution], tmp)
                acc = results[s]
                acc["steps"] += r["steps"]
                acc["encode"] += r["encode"]
                acc["peak"].append(r["peak_mb"])
                acc["fill"].append(r["fill_s"])
                done = r["steps"] or [(a + b, 0.0) for a, b in r["encode"]]
                bar.write(f"repeat {repeat}: {s.label():55s} median "
                          f"{statistics.median(w for w, _ in done) * 1e3:8.1f} ms")  # fmt: skip
                bar.update()
        bar.close()
    rows = [make_row(group, s, results[s]) for group, s in pairs]
    report(Path(args.out), rows, args, info, data_desc)
    return rows


def make_row(group: str, s: Setup, acc: dict) -> dict:
    row = dict(group=group, setup=s.label(), **asdict(s))
    blank = dict.fromkeys(["median_step_ms", "min_step_ms", "p10_step_ms", "p90_step_ms",
                           "cpu_step_ms"], "")  # fmt: skip
    if acc["steps"]:
        summary = summarize_steps(acc["steps"])
        row.update({k[: -len("_s")] + "_ms": v * 1e3 for k, v in summary.items()})
    else:
        row.update(blank)
    row["steps_timed"] = len(acc["steps"]) or len(acc["encode"])
    row["peak_mem_mb"] = max(acc["peak"])
    fills = [f for f in acc["fill"] if not math.isnan(f)]
    row["cache_fill_s"] = statistics.median(fills) if fills else ""
    encode = acc["encode"]
    row["vae_encode_ms"] = statistics.median(v for v, _ in encode) * 1e3 if encode else ""
    row["text_encode_ms"] = statistics.median(t for _, t in encode) * 1e3 if encode else ""
    row["min_vae_encode_ms"] = min(v for v, _ in encode) * 1e3 if encode else ""
    row["min_text_encode_ms"] = min(t for _, t in encode) * 1e3 if encode else ""
    return row


def find(rows: list[dict], group: str, **match) -> dict | None:
    return next(
        (r for r in rows if r["group"] == group and all(r[k] == v for k, v in match.items())), None
    )


def goals(rows: list[dict]) -> list[str]:
    """The three measured goals, each with median, fastest-step and CPU-time estimates."""
    lines = []
    ours, ref = find(rows, "framework", loop="lightning"), find(rows, "framework", loop="reference")
    ui = find(rows, "framework", loop="lightning+ui")
    if ours and ref:
        o = {k: ours[k] / ref[k] - 1 for k in ("median_step_ms", "min_step_ms", "cpu_step_ms")}
        lines.append(
            f"- **Framework overhead** (goal: within 5% of the plain loop, cache off): bare "
            f"Trainer {ours['median_step_ms']:.1f} ms vs reference {ref['median_step_ms']:.1f} ms "
            f"median ({o['median_step_ms']:+.1%}); fastest step {o['min_step_ms']:+.1%}; CPU "
            f"time {o['cpu_step_ms']:+.1%}. **{'met' if o['median_step_ms'] <= 0.05 else 'NOT met'}"
            "** (median)."
            + (f" With the default progress bar and TensorBoard logger: "
               f"{ui['median_step_ms'] / ref['median_step_ms'] - 1:+.1%} median, "
               f"{ui['cpu_step_ms'] / ref['cpu_step_ms'] - 1:+.1%} CPU." if ui else "")
        )  # fmt: skip
    for preset in dict.fromkeys(r["preset"] for r in rows if r["group"] == "cache"):
        off = find(rows, "cache", preset=preset, loop="lightning", cache=False)
        on = find(rows, "cache", preset=preset, loop="lightning", cache=True)
        enc = find(rows, "cache", preset=preset, loop="encode")
        if not (off and on and enc):
            continue
        bound = off["median_step_ms"] - enc["vae_encode_ms"] - enc["text_encode_ms"]
        fast = off["min_step_ms"] - enc["min_vae_encode_ms"] - enc["min_text_encode_ms"]
        lines.append(
            f"- **Cache, {preset} ({off['resolution']} px)** (goal: cached <= uncached - VAE "
            f"encode - text encode, within 5%): uncached {off['median_step_ms']:.1f} ms - VAE "
            f"{enc['vae_encode_ms']:.1f} ms - text {enc['text_encode_ms']:.1f} ms = "
            f"{bound:.1f} ms; cached {on['median_step_ms']:.1f} ms "
            f"({on['median_step_ms'] / bound - 1:+.1%}); fastest steps: {fast:.1f} vs "
            f"{on['min_step_ms']:.1f} ms ({on['min_step_ms'] / fast - 1:+.1%}). "
            f"**{'met' if on['median_step_ms'] <= 1.05 * bound else 'NOT met'}** (median)."
        )
    ranks = sorted((r for r in rows if r["group"] == "rank" and r["kind"] == "lora"),
                   key=lambda r: r["rank"])  # fmt: skip
    if len(ranks) > 1:
        lo, hi = ranks[0], ranks[-1]
        g = {k: hi[k] / lo[k] - 1 for k in ("median_step_ms", "min_step_ms", "cpu_step_ms")}
        lines.append(
            f"- **LoRA rank {lo['rank']} -> {hi['rank']}** (goal: step time grows < 10%): "
            f"{lo['median_step_ms']:.1f} -> {hi['median_step_ms']:.1f} ms median "
            f"({g['median_step_ms']:+.1%}); fastest {g['min_step_ms']:+.1%}; CPU "
            f"{g['cpu_step_ms']:+.1%}. **{'met' if g['median_step_ms'] < 0.10 else 'NOT met'}** "
            "(median)."
        )
    return lines


def fmt(v, digits: int = 1) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def report(out: Path, rows: list[dict], args, info: dict, data_desc: str) -> None:
    write_csv(out.with_suffix(".csv"), rows)
    header = ["group", "setup", "median step ms", "fastest ms", "p10 ms", "p90 ms",
              "CPU ms/step", f"peak MiB ({memory_label(args.device)})", "cache fill s",
              "VAE encode ms", "text encode ms"]  # fmt: skip
    table = [[r["group"], r["setup"], *(fmt(r[k]) for k in ("median_step_ms", "min_step_ms",
              "p10_step_ms", "p90_step_ms", "cpu_step_ms", "peak_mem_mb")),
              fmt(r["cache_fill_s"], 2), fmt(r["vae_encode_ms"]), fmt(r["text_encode_ms"])]
             for r in rows]  # fmt: skip
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training throughput: step time and peak memory per switch",
        "",
        f"Command: `{command.strip()}`. {describe_machine(info, os.getloadavg()[0])}",
        f"Data: {data_desc}; batch {args.batch_size}; center crop + random flip; "
        f"{args.repeats} interleaved runs per setup x {args.steps} timed steps "
        f"({args.warmup} warm-up steps dropped from each run). Tiny pipelines have random "
        "weights (step time and memory depend on shapes only). Setup names: loop, pipeline, "
        "px, adapter kind + rank, switches, precision. `encode` rows time the VAE and text "
        "encoders alone on uncached batches. Peak memory is the maximum over the repeats and "
        "includes the Python process (libraries, models).",
        "",
        "## Goals",
        "",
        *goals(rows),
        "",
        "## All setups",
        "",
        *markdown_table(header, table),
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    written = [out.with_suffix(".csv"), out.with_suffix(".md")]
    if not args.no_plots:
        written += plots(out, rows, args.device)
    print("\n".join(goals(rows)))
    print("wrote " + ", ".join(map(str, written)))


def plots(out: Path, rows: list[dict], device: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for group, x, name in (("rank", "rank", "rank"), ("resolution", "resolution", "resolution")):
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
        for kind in dict.fromkeys(r["kind"] for r in rows if r["group"] == group):
            sel = sorted((r for r in rows if r["group"] == group and r["kind"] == kind),
                         key=lambda r: r[x])  # fmt: skip
            xs = [r[x] for r in sel]
            med = [r["median_step_ms"] for r in sel]
            ax_t.plot(xs, med, "o-", label=f"{kind} median")
            ax_t.fill_between(xs, [r["p10_step_ms"] for r in sel],
                              [r["p90_step_ms"] for r in sel], alpha=0.2)  # fmt: skip
            ax_t.plot(xs, [r["min_step_ms"] for r in sel], "x--", label=f"{kind} fastest")
            ax_m.plot(xs, [r["peak_mem_mb"] for r in sel], "o-", label=kind)
        for ax in (ax_t, ax_m):
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(v) for v in xs])
            ax.set_xlabel(f"{name} (px)" if name == "resolution" else "adapter rank")
            ax.grid(alpha=0.3)
            ax.legend()
        ax_t.set_ylabel("step time (ms); band p10-p90")
        ax_t.set_ylim(bottom=0)
        ax_m.set_ylabel(f"peak MiB ({memory_label(device)})")
        fig.suptitle(f"Training step time and peak memory vs {name}")
        path = out.parent / f"{out.name}_{name}.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
