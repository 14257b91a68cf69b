"""Adapter families at matched parameter counts on the pretrained tiny base, and prior
preservation with class images against the base model's own prediction.

Every cell trains the package's ``StableDiffusionLoRA`` by DreamBooth on the five instance cat
faces (``sks cat face``, attention targets) and measures, as ``lora_vs_dora.py`` does,
through ``SubjectProbe`` (EfficientNet-Lite0): subject fidelity to five held-out cat faces,
prior drift of the class and unrelated prompts from the base's samples, held-out loss (fixed
noise and timesteps), median step time, trainable parameters and the exported file's size.

Variants: ``lora`` (the reference, rank ``--rank``), ``dora``, ``loha``, ``lokr``, ``lora+``
(B at 16 x the rate), ``rslora`` (alpha / sqrt(r)), ``pissa``; every one but the reference
gets the rank whose trainable parameter count is closest to the reference's, computed by
injecting each candidate rank into the base's UNet and counting (LoKr's count has gaps: its
``params`` column says what it got). With ``--preservation`` two more rows train the
reference LoRA with DreamBooth's class-image prior (class images generated once by the base,
their time in ``prep_s``) and with ``BasePrior`` (no images; the base's prediction).

The full run (the lead runs it on the new pretrained base; ~2 h on 2 CPU cores):

    python benchmarks/adapters.py --seeds 0 1 2 --preservation
        # -> benchmarks/results/adapters{.md,.csv,_runs.csv,.png}
"""

from __future__ import annotations

import argparse
import copy
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
from lightning_sd.base_prior import BasePrior  # noqa: E402
from lightning_sd.callbacks.export import export_adapters  # noqa: E402
from lightning_sd.data.settings import LoaderSettings  # noqa: E402
from lightning_sd.pretrained.subject import (  # noqa: E402
    CLASS_PROMPT,
    SUBJECT_PROMPT,
    SubjectProbe,
    subject_dir,
)

# variant -> AdapterConfig fields besides the rank (alpha = rank, attention targets)
VARIANTS = {
    "lora": {},
    "dora": {"kind": "dora"},
    "loha": {"kind": "loha"},
    "lokr": {"kind": "lokr"},
    "lora+": {"loraplus_lr_ratio": 16.0},
    "rslora": {"use_rslora": True},
    "pissa": {"init": "pissa"},
}
PRESERVATION = ("prior:class-images", "prior:base-model")


def adapter(variant: str, rank: int) -> AdapterConfig:
    return AdapterConfig(rank=rank, alpha=rank, **VARIANTS[variant])


def count_params(unet: torch.nn.Module, config: AdapterConfig) -> int:
    """Trainable parameters the adapter adds to (a copy of) the UNet; shapes only, so PiSSA is
    counted with the default start (same shapes, no SVD)."""
    from lightning_sd.adapters import add_adapter

    model = copy.deepcopy(unet)
    fields = {**vars(config), "init": "default"}
    add_adapter(model, AdapterConfig(**fields))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_ranks(model: str, variants: list[str], rank: int, max_rank: int = 64) -> dict:
    """variant -> (rank, params): the rank whose count is closest to LoRA's at ``rank``."""
    from lightning_sd.components import resolve_model
    from lightning_sd.families import family_of

    unet = family_of(model).load_part(resolve_model(model), "unet")
    unet.requires_grad_(False)
    budget = count_params(unet, adapter("lora", rank))
    out = {}
    for variant in variants:
        if variant == "lora":
            out[variant] = (rank, budget)
            continue
        counts = {}
        for r in range(1, max_rank + 1):
            counts[r] = count_params(unet, adapter(variant, r))
            if counts[r] > 2 * budget:  # counts grow with rank: the closest is behind
                break
        best = min(counts, key=lambda r: (abs(counts[r] - budget), r))
        out[variant] = (best, counts[best])
    return out


def cell(name, variant, rank, seed, args, probe, base_samples, tmp: Path, class_dir) -> dict:
    seed_everything(seed, verbose=False)
    config = adapter(variant, rank)
    base_prior = BasePrior(CLASS_PROMPT, weight=1.0) if name == "prior:base-model" else None
    module = StableDiffusionLoRA(
        args.model, adapter=config, learning_rate=args.learning_rate, lr_warmup_steps=10,
        base_prior=base_prior,
    )  # fmt: skip
    prior = dict(class_data_dir=str(class_dir), class_prompt=CLASS_PROMPT,
                 num_class_images=args.class_images) if name == "prior:class-images" else {}  # fmt: skip
    data = DreamBoothDataModule(str(subject_dir("instance")), SUBJECT_PROMPT, resolution=32,
                                random_flip=True, loader=LoaderSettings(batch_size=4),
                                **prior)  # fmt: skip
    held = DreamBoothDataModule(str(subject_dir("heldout")), SUBJECT_PROMPT, resolution=32,
                                loader=LoaderSettings(batch_size=5))  # fmt: skip
    kwargs = trainer_kwargs("cpu", "32-true", args.steps)
    timer = StepTimer()
    Trainer(callbacks=[timer], limit_val_batches=0, **kwargs).fit(module, data)
    val = Trainer(**kwargs).validate(module, held, verbose=False)[0]["val/loss"]
    after = probe.sample(module)
    drift = probe.drift(base_samples, after)
    with tempfile.TemporaryDirectory(dir=tmp) as out:
        import warnings

        with warnings.catch_warnings():  # LoHa/LoKr: "diffusers layout skipped"
            warnings.simplefilter("ignore")
            files = export_adapters(module, out, ["diffusers", "kohya"])
        file = files.get("diffusers") or files["kohya"]
        file_mb = file.stat().st_size / 2**20
    return dict(
        variant=name, rank=rank, seed=seed,
        fidelity=probe.fidelity(after),
        drift_class=drift["class"], drift_unrelated=drift["unrelated"],
        heldout_loss=float(val),
        step_ms=summarize_steps(timer.steps(min(5, args.steps - 2)))["median_step_s"] * 1e3,
        params=sum(p.numel() for p in module.parameters() if p.requires_grad),
        file_mb=file_mb,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-pretrained")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rank", type=int, default=8, help="the reference LoRA's rank")
    parser.add_argument("--max-rank", type=int, default=64)
    parser.add_argument("--preservation", action="store_true")
    parser.add_argument("--class-images", type=int, default=20)
    parser.add_argument("--class-steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--probe-seeds", type=int, default=4, help="samples per probe prompt")
    parser.add_argument("--probe-steps", type=int, default=20, help="sampler steps of the probe")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 beside a job)")
    parser.add_argument("--out", default="benchmarks/results/adapters")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    info, start = machine_info("cpu"), time.time()
    ranks = matched_ranks(args.model, ["lora", *args.variants], args.rank, args.max_rank)
    print({k: v for k, v in ranks.items()}, flush=True)
    probe = SubjectProbe(seeds=list(range(args.probe_seeds)), steps=args.probe_steps)
    base = StableDiffusionLoRA(args.model, adapter=AdapterConfig(rank=1))
    base.configure_model()
    base_samples = probe.sample(base)
    base_fidelity = probe.fidelity(base_samples)
    cells = [(v, v, ranks[v][0]) for v in dict.fromkeys(["lora", *args.variants])]
    if args.preservation:
        cells += [(name, "lora", args.rank) for name in PRESERVATION]
    runs, prep = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        class_dir = Path(tmp) / "class"
        if args.preservation:
            from lightning_sd.components import resolve_model
            from lightning_sd.data.class_images import generate_class_images

            began = time.perf_counter()
            generate_class_images(resolve_model(args.model), class_dir, CLASS_PROMPT,
                                  args.class_images, 32, num_inference_steps=args.class_steps,
                                  device="cpu")  # fmt: skip
            prep["prior:class-images"] = time.perf_counter() - began
        for seed in args.seeds:
            for name, variant, rank in cells:
                runs.append(cell(name, variant, rank, seed, args, probe, base_samples,
                                 Path(tmp), class_dir))  # fmt: skip
                runs[-1]["prep_s"] = prep.get(name, 0.0)
                print({k: round(v, 4) if isinstance(v, float) else v
                       for k, v in runs[-1].items()}, flush=True)  # fmt: skip
    rows = mean_over_seeds(runs, ("variant", "rank"))
    out = Path(args.out)
    write_csv(out.with_name(out.name + "_runs.csv"), runs)
    write_csv(out.with_suffix(".csv"), rows)
    cols = ["fidelity", "drift_class", "drift_unrelated", "heldout_loss"]
    table = markdown_table(
        ["variant", "rank", "params", "fidelity", "drift (class)", "drift (unrelated)",
         "held-out loss", "step ms", "prep s", "file MB"],
        [[r["variant"], r["rank"], f"{r['params']:,.0f}"]
         + [f"{r[c]:.3f} ± {r[c + '_std']:.3f}" for c in cols]
         + [f"{r['step_ms']:.0f} ± {r['step_ms_std']:.0f}", f"{r['prep_s']:.0f}",
            f"{r['file_mb']:.3f}"] for r in rows],
    )  # fmt: skip
    command = "python benchmarks/adapters.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    text = [
        "# Adapter families at matched parameter counts (DreamBooth, held-out subject)",
        "",
        f"`{command.strip()}`: base `{args.model}`, {args.steps} steps, batch 4, lr "
        f"{args.learning_rate}, alpha = rank, attention targets; reference LoRA rank "
        f"{args.rank}, the others at the rank with the closest parameter count; mean ± std over "
        f"{len(args.seeds)} seed(s). Base subject fidelity {base_fidelity:.3f}.",
        "",
        *table,
        "",
        "Fidelity: mean cosine similarity (EfficientNet-Lite0) of `sks cat face` samples to five "
        "held-out cat faces. Drift: mean cosine distance of class-prompt (`cat face`) and "
        "unrelated-prompt samples from the base's, same seeds. `prep s`: time to generate the "
        f"class images ({args.class_images}, {args.class_steps} steps), once per run. File: the "
        "diffusers file, or the kohya/LyCORIS one for LoHa and LoKr.",
        "",
        describe_machine(info, os.getloadavg()[0]) + f" Wall time {time.time() - start:.0f} s.",
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(text) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        ax.errorbar(r["drift_unrelated"], r["fidelity"], xerr=r["drift_unrelated_std"],
                    yerr=r["fidelity_std"], marker="o", label=r["variant"])  # fmt: skip
        bx.errorbar(r["step_ms"], r["heldout_loss"], xerr=r["step_ms_std"],
                    yerr=r["heldout_loss_std"], marker="o", label=r["variant"])  # fmt: skip
    ax.axhline(base_fidelity, color="gray", lw=0.8, ls="--", label="base")
    ax.set(xlabel="prior drift (unrelated prompts)", ylabel="subject fidelity")
    bx.set(xlabel="step time (ms)", ylabel="held-out loss")
    ax.legend(fontsize=7)
    save_figure(fig, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
