"""LoRA vs DoRA on the pretrained tiny base: DreamBooth on the held-out subject, across ranks.

Every cell (kind x rank x seed) trains the package's ``StableDiffusionLoRA`` (adapter on the
UNet's attention, alpha = rank) on the five instance cat faces with ``sks cat face`` and
measures what the adapter learned and what it broke (``SubjectProbe``, EfficientNet-Lite0):

- subject fidelity of samples to five held-out cat faces, before (the base) and after;
- prior drift of the class prompt and of unrelated prompts from the base's samples;
- held-out loss (fixed noise and timesteps) on the held-out cat faces;
- median step time, trainable parameters, diffusers adapter file size.

    python benchmarks/lora_vs_dora.py --seeds 0 1 2
        # -> benchmarks/results/lora_vs_dora{.md,.csv,_runs.csv,.png}
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning import Trainer, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    StepTimer,
    atomic_write,
    describe_machine,
    machine_info,
    markdown_table,
    mean_over_seeds,
    quiet,
    save_figure,
    summarize_steps,
    trainer_kwargs,
    write_csv,
)

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA  # noqa: E402
from lightning_sd.callbacks.export import export_adapters  # noqa: E402
from lightning_sd.data.settings import LoaderSettings  # noqa: E402
from lightning_sd.pretrained.subject import SUBJECT_PROMPT, SubjectProbe, subject_dir  # noqa: E402


def cell(kind, rank, seed, args, probe, base_samples, tmp: Path) -> dict:
    seed_everything(seed, verbose=False)
    module = StableDiffusionLoRA(
        args.model, adapter=AdapterConfig(kind=kind, rank=rank), learning_rate=args.learning_rate,
        lr_warmup_steps=10,
    )  # fmt: skip
    data = DreamBoothDataModule(
        str(subject_dir("instance")),
        SUBJECT_PROMPT,
        resolution=32,
        random_flip=True,
        loader=LoaderSettings(batch_size=4),
    )
    held = DreamBoothDataModule(
        str(subject_dir("heldout")),
        SUBJECT_PROMPT,
        resolution=32,
        loader=LoaderSettings(batch_size=5),
    )
    kwargs = trainer_kwargs("cpu", "32-true", args.steps)
    timer = StepTimer()
    Trainer(callbacks=[timer], limit_val_batches=0, **kwargs).fit(module, data)
    val = Trainer(**kwargs).validate(module, held, verbose=False)[0]["val/loss"]
    after = probe.sample(module)
    drift = probe.drift(base_samples, after)
    export = export_adapters(module, tmp / f"{kind}-{rank}-{seed}", ["diffusers"])
    return dict(
        kind=kind, rank=rank, seed=seed,
        fidelity=probe.fidelity(after),
        drift_class=drift["class"], drift_unrelated=drift["unrelated"],
        heldout_loss=float(val),
        step_ms=summarize_steps(timer.steps(min(5, args.steps - 2)))["median_step_s"] * 1e3,
        params=sum(p.numel() for p in module.parameters() if p.requires_grad),
        file_mb=export["diffusers"].stat().st_size / 2**20,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-pretrained")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--kinds", nargs="+", default=["lora", "dora"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--probe-seeds", type=int, default=4, help="samples per probe prompt")
    parser.add_argument("--probe-steps", type=int, default=20, help="sampler steps of the probe")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 beside a job)")
    parser.add_argument("--out", default="benchmarks/results/lora_vs_dora")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    info, start = machine_info("cpu"), time.time()
    probe = SubjectProbe(seeds=list(range(args.probe_seeds)), steps=args.probe_steps)
    base = StableDiffusionLoRA(args.model, adapter=AdapterConfig(rank=1))
    base.configure_model()
    base_samples = probe.sample(base)
    base_fidelity = probe.fidelity(base_samples)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for rank in args.ranks:
                for kind in args.kinds:
                    runs.append(cell(kind, rank, seed, args, probe, base_samples, Path(tmp)))
                    print({k: round(v, 4) if isinstance(v, float) else v
                           for k, v in runs[-1].items()}, flush=True)  # fmt: skip
    rows = mean_over_seeds(runs, ("kind", "rank"))
    out = Path(args.out)
    write_csv(out.with_name(out.name + "_runs.csv"), runs)
    write_csv(out.with_suffix(".csv"), rows)
    cols = ["fidelity", "drift_class", "drift_unrelated", "heldout_loss", "step_ms"]
    table = markdown_table(
        ["kind", "rank", "fidelity", "drift (class)", "drift (unrelated)", "held-out loss",
         "step ms", "params", "file MB"],
        [[r["kind"], r["rank"]] + [f"{r[c]:.3f} ± {r[c + '_std']:.3f}" for c in cols[:4]]
         + [f"{r['step_ms']:.0f}", f"{r['params']:,.0f}", f"{r['file_mb']:.2f}"] for r in rows],
    )  # fmt: skip
    text = [
        "# LoRA vs DoRA on the pretrained tiny base (DreamBooth, held-out subject)",
        "",
        f"`python benchmarks/lora_vs_dora.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
        f"{args.steps} steps, batch 4, lr {args.learning_rate}, alpha = rank, attention targets; "
        f"mean ± std over {len(args.seeds)} seed(s). Base subject fidelity {base_fidelity:.3f}.",
        "",
        *table,
        "",
        "Fidelity: mean cosine similarity (EfficientNet-Lite0) of `sks cat face` samples to five "
        "held-out cat faces. Drift: mean cosine distance of class-prompt (`cat face`) and "
        "unrelated-prompt samples from the base's, same seeds.",
        "",
        describe_machine(info, os.getloadavg()[0]) + f" Wall time {time.time() - start:.0f} s.",
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(text) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for kind, marker in (("lora", "o"), ("dora", "s")):
        sel = [r for r in rows if r["kind"] == kind]
        ax.errorbar([r["drift_unrelated"] for r in sel], [r["fidelity"] for r in sel],
                    xerr=[r["drift_unrelated_std"] for r in sel],
                    yerr=[r["fidelity_std"] for r in sel], marker=marker, label=kind)  # fmt: skip
        for r in sel:
            ax.annotate(str(r["rank"]), (r["drift_unrelated"], r["fidelity"]), fontsize=7)
    ax.axhline(base_fidelity, color="gray", lw=0.8, ls="--", label="base")
    ax.set(xlabel="prior drift (unrelated prompts)", ylabel="subject fidelity")
    ax.legend()
    save_figure(fig, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
