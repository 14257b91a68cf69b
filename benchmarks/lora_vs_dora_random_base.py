"""LoRA vs DoRA across ranks on any base, random weights by default: what each costs
(parameters, file, step time, memory), with losses and image metrics as a sanity check.

On a random-weight base only the cost columns mean something: the losses measure how fast an
adapter fits a random network and the image metrics compare noise with photos. The quality
question is asked on the pretrained base by ``lora_vs_dora.py``. With ``--model`` naming a
real checkpoint and ``--device cuda`` this script measures real costs.

Every cell (kind x rank x seed) trains the package's ``StableDiffusionLoRA`` (adapter on the
UNet's attention, alpha = rank) with the real Trainer on ``CaptionDataModule`` (real captioned
photos: Debian's Tux Paint stamps when installed, else scikit-image's; center crops, random
flips, a fixed held-out split by name hash), then measures:

- trainable parameters and the diffusers-layout adapter file (the package's exporter);
- step time after ``--warmup`` steps (median, fastest, p10/p90, process CPU time per step);
- peak memory of training (process peak RSS on CPU, max allocated on GPU), and its increase
  over what the process held when training started (the training's own memory);
- final training loss (mean of the last 10% of steps), held-out loss before and after training
  (``validation_step``: fixed noise and timesteps, so cells compare);
- the evaluation callback's metrics on samples of held-out captions: FID/KID on the offline
  EfficientNet-Lite0 backbone (real ImageNet weights; not Inception FID), and CLIP score when
  ``--clip-model`` names CLIP weights you have (none ship offline).

Kinds alternate within each rank (a busy neighbour slows both alike); with several seeds each
row is the mean over seeds with its standard deviation.

    python benchmarks/lora_vs_dora_random_base.py  # ~18 min, 2 CPU cores -> results/lora_vs_dora_random_base*
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import LambdaCallback
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
    mean_over_seeds,
    memory_label,
    quiet,
    save_figure,
    summarize_steps,
    trainer_kwargs,
    write_csv,
    write_photo_set,
)


def metrics(args, tmp: Path) -> list:
    from lightning_sd.metrics import CLIPMetrics, EfficientNetLite0, FrechetDistance

    out = [FrechetDistance(EfficientNetLite0(), kid_subset_size=args.eval_prompts)]
    if args.clip_model == "tiny":  # random weights: plumbing only (the smoke test)
        from lightning_sd.metrics.tiny import write_tiny_clip

        folder = tmp / "tiny-clip"
        if not folder.exists():
            write_tiny_clip(folder)
        out.append(CLIPMetrics(f"local-dir:{folder}", pretrained=None))
    elif args.clip_model:
        out.append(CLIPMetrics(args.clip_model, args.clip_pretrained))
    return out


def cell(kind: str, rank: int, seed: int, args, model: str, photos: Path, tmp: Path) -> dict:
    """Train one adapter and measure it."""
    from lightning_sd.callbacks import Evaluation
    from lightning_sd.callbacks.export import export_adapters
    from lightning_sd.sampling_spec import SamplingSpec

    seed_everything(seed, verbose=False)
    module = make_module(model, kind, rank, learning_rate=args.learning_rate)
    dm = make_datamodule(photos, args.resolution, args.batch_size,
                         validation_split=args.validation_split, seed=seed)  # fmt: skip
    dm.setup("fit")
    prompts = [r.caption for r in dm.val_set.records][: args.eval_prompts]
    kwargs = trainer_kwargs(args.device, args.precision, args.steps)
    before = Trainer(**kwargs).validate(module, dm, verbose=False)[0]["val/loss"]
    timer, memory = StepTimer(), PeakMemory(args.device)
    evaluation = Evaluation(
        metrics(args, tmp), SamplingSpec(prompts, list(range(args.eval_seeds)), steps=args.eval_steps),
        reference_dir=str(photos), after_training=True,
    )  # fmt: skip
    # The peak is read when training ends, before the evaluation samples.
    probe = LambdaCallback(on_train_start=lambda *_: memory.start(),
                           on_train_end=lambda *_: memory.read())  # fmt: skip
    trainer = Trainer(callbacks=[timer, probe, evaluation], limit_val_batches=0, **kwargs)
    trainer.fit(module, dm)
    after = Trainer(**kwargs).validate(module, dm, verbose=False)[0]["val/loss"]
    export = export_adapters(module, tmp / f"export-{kind}-{rank}-{seed}", ["diffusers"])
    tail = timer.losses[-max(1, len(timer.losses) // 10) :]
    row = dict(kind=kind, rank=rank, seed=seed)
    row["trainable_params"] = sum(p.numel() for p in module.parameters() if p.requires_grad)
    row["adapter_file_mb"] = export["diffusers"].stat().st_size / 2**20
    summary = summarize_steps(timer.steps(args.warmup))
    row.update({k[: -len("_s")] + "_ms": v * 1e3 for k, v in summary.items()})
    row["peak_mem_mb"] = memory.peak_mb
    row["mem_increase_mb"] = memory.peak_mb - memory.start_mb
    row["train_loss_final"] = statistics.fmean(tail)
    row["val_loss_before"] = float(before)
    row["val_loss"] = float(after)
    row.update({k.removeprefix("eval/"): float(v) for k, v in evaluation.last_metrics.items()})
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    from lightning_sd.tiny import PRESETS, build_tiny_pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--kinds", nargs="+", default=["lora", "dora"])
    parser.add_argument("--steps", type=int, default=200, help="training steps per cell")
    parser.add_argument("--warmup", type=int, default=10, help="steps left out of step time")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--preset", default="small", help="tiny pipeline (random weights)")
    parser.add_argument("--model", help="hub id or folder of a real pipeline (replaces --preset)")
    parser.add_argument("--resolution", type=int, help="px (default: the preset's, or 512)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--data", default="auto", help="tuxpaint, skimage or auto")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--validation-split", type=float, default=0.125)
    parser.add_argument("--eval-prompts", type=int, default=4, help="held-out captions sampled")
    parser.add_argument("--eval-seeds", type=int, default=4, help="samples per prompt")
    parser.add_argument("--eval-steps", type=int, default=20, help="sampler steps")
    parser.add_argument("--clip-model", help="open_clip name or local-dir:, for CLIP score")
    parser.add_argument("--clip-pretrained", default="openai")
    parser.add_argument("--out", default="benchmarks/results/lora_vs_dora_random_base")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    args.resolution = args.resolution or (512 if args.model else PRESETS[args.preset].resolution)
    info = machine_info(args.device)
    cells = [(s, r, k) for s in args.seeds for r in args.ranks for k in args.kinds]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or str(build_tiny_pipeline(tmp / "pipeline", args.preset, seed=0))
        data_desc = write_photo_set(tmp / "photos", args.images, args.resolution, args.data)
        bar = tqdm(cells, desc="lora_vs_dora_random_base", file=sys.stdout)
        for seed, rank, kind in bar:
            bar.set_postfix_str(f"{kind} r{rank} seed {seed}")
            runs.append(cell(kind, rank, seed, args, model, tmp / "photos", tmp))
            r = runs[-1]
            bar.write(
                f"{kind:4} rank {rank:3} seed {seed}: {r['trainable_params']:>9,} params, "
                f"step {r['median_step_ms']:7.1f} ms (fastest {r['min_step_ms']:.1f}), peak "
                f"{r['peak_mem_mb']:.0f} MiB, train loss {r['train_loss_final']:.4f}, val loss "
                f"{r['val_loss_before']:.4f} -> {r['val_loss']:.4f}, "
                f"FID-Lite0 {r['fid_efficientnet_lite0']:.2f}"
            )
    rows = mean_over_seeds(runs, ("kind", "rank"))
    report(Path(args.out), runs, rows, args, info, data_desc)
    return rows


def ratio_lines(rows: list[dict]) -> list[str]:
    """What DoRA costs over LoRA at each rank."""
    pairs = {(r["kind"], r["rank"]): r for r in rows}
    header = ["rank", "params", "step (median)", "step (fastest)", "CPU/step", "peak memory",
              "training memory", "val loss (DoRA - LoRA)"]  # fmt: skip
    table = []
    for rank in sorted({r["rank"] for r in rows}):
        lo, do = pairs.get(("lora", rank)), pairs.get(("dora", rank))
        if lo and do:
            table.append([rank] + [
                f"{do[c] / lo[c] - 1:+.1%}" for c in ("trainable_params", "median_step_ms",
                                                      "min_step_ms", "cpu_step_ms", "peak_mem_mb", "mem_increase_mb")
            ] + [f"{do['val_loss'] - lo['val_loss']:+.4f}"])  # fmt: skip
    return markdown_table(header, table) if table else []


def report(out: Path, runs, rows, args, info, data_desc: str) -> None:
    write_csv(out.with_suffix(".csv"), rows)
    write_csv(out.parent / f"{out.name}_runs.csv", runs)
    extra = [c for c in rows[0] if c.startswith(("clip", "kid")) and not c.endswith("_std")]

    def cell_text(r, col, digits):
        std = f" ± {r[f'{col}_std']:.{digits}f}" if r["seeds"] > 1 else ""
        return f"{r[col]:.{digits}f}" + std

    header = ["kind", "rank", "trainable params", "file MiB", "median step ms", "fastest ms",
              "CPU ms/step", f"peak MiB ({memory_label(args.device)})", "of which training MiB",
              "final train loss",
              "val loss before", "val loss after", "FID-Lite0", *extra]  # fmt: skip
    table = [[r["kind"], r["rank"], f"{r['trainable_params']:,.0f}", f"{r['adapter_file_mb']:.3f}",
              cell_text(r, "median_step_ms", 1), cell_text(r, "min_step_ms", 1),
              cell_text(r, "cpu_step_ms", 1), f"{r['peak_mem_mb']:.0f}", f"{r['mem_increase_mb']:.0f}",
              cell_text(r, "train_loss_final", 4), cell_text(r, "val_loss_before", 4),
              cell_text(r, "val_loss", 4), cell_text(r, "fid_efficientnet_lite0", 2),
              *(cell_text(r, c, 4) for c in extra)] for r in rows]  # fmt: skip
    command = "python benchmarks/lora_vs_dora_random_base.py " + " ".join(sys.argv[1:])
    lines = [
        "# LoRA vs DoRA across ranks",
        "",
        f"Command: `{command.strip()}`. {describe_machine(info, os.getloadavg()[0])}",
        f"Recipe: {args.model or f'tiny `{args.preset}` pipeline (random weights)'}, "
        f"{args.resolution} px; {data_desc}, {args.validation_split:.1%} held out by name hash; "
        f"batch {args.batch_size}, AdamW lr {args.learning_rate:g}, {args.steps} steps, "
        f"{args.precision}; adapter on the UNet attention, alpha = rank; seeds {args.seeds}"
        f"{' (mean ± std over seeds)' if len(args.seeds) > 1 else ''}. Step time after "
        f"{args.warmup} warm-up steps. Val loss: held-out loss with fixed noise and timesteps. "
        f"FID-Lite0/KID-Lite0: {args.eval_prompts} held-out captions x {args.eval_seeds} seeds "
        f"({args.eval_steps} DPM++ steps) against all {args.images} photos, on the offline "
        "EfficientNet-Lite0 backbone (not Inception FID; biased upwards at this sample size).",
        "",
        *markdown_table(header, table),
        "",
        "## What DoRA costs over LoRA (ratio of the means)",
        "",
        *ratio_lines(rows),
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    written = [out.with_suffix(".csv"), out.parent / f"{out.name}_runs.csv", out.with_suffix(".md")]
    if not args.no_plots:
        written += plots(out, rows, args.device)
    print("wrote " + ", ".join(map(str, written)))


def plots(out: Path, rows: list[dict], device: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {
        "quality": [("train_loss_final", "final training loss"),
                    ("val_loss", "held-out loss (fixed noise)"),
                    ("fid_efficientnet_lite0", "FID on EfficientNet-Lite0")],
        "cost": [("median_step_ms", "median step time (ms)"),
                 ("cpu_step_ms", "CPU time per step (ms)"),
                 ("mem_increase_mb", f"training MiB over start ({memory_label(device)})")],
    }  # fmt: skip
    written = []
    for name, cols in panels.items():
        fig, axes = plt.subplots(1, len(cols), figsize=(4.2 * len(cols), 3.6))
        for ax, (col, label) in zip(axes, cols, strict=True):
            for kind in dict.fromkeys(r["kind"] for r in rows):
                sel = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["rank"])
                xs = [r["rank"] for r in sel]
                std = [r.get(f"{col}_std", 0.0) for r in sel]
                ax.errorbar(xs, [r[col] for r in sel], yerr=std, fmt="o-", capsize=3, label=kind)
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.set_xlabel("adapter rank")
            ax.set_title(label, fontsize=10)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"LoRA vs DoRA: {name} vs rank")
        fig.tight_layout()
        path = out.parent / f"{out.name}_{name}.png"
        save_figure(fig, path)
        plt.close(fig)
        written.append(path)
    return written


if __name__ == "__main__":
    main()
