"""SD3 training step time: ``lightning-sd fit`` next to diffusers' ``train_dreambooth_lora_sd3.py``.

Both train a rank-4 LoRA on the same tiny SD3.5-Medium-architecture pipeline
(``--preset tiny-sd3``, with attn2) from the same instance photos, batch 1, 32 px, float32,
the same LoRA modules (the joint attention of both streams and attn2: diffusers' script gets
them through ``--lora_layers``), the text encoders frozen with the prompt encoded once (the
script does this by itself; ours through ``cache.text_embeddings``), the VAE run every step
by both, and the same number of threads.

Each program runs in its own process through this file (``--child``), which registers one
global optimizer step hook (``torch.optim.optimizer.register_optimizer_step_post_hook``): a
step is the time between two consecutive optimizer steps, the same clock for both (data,
encoding, forward, backward, update and the framework's own work). The first ``--warmup``
steps are dropped. With ``--rounds`` > 1 the programs alternate, so a neighbour on a shared
CPU slows both alike; each row pools its rounds.

The script is not part of the diffusers wheel: pass it from a diffusers checkout
(``examples/dreambooth/train_dreambooth_lora_sd3.py``; it needs ``accelerate``).

    python benchmarks/sd3_step_time.py --script PATH/train_dreambooth_lora_sd3.py
    # -> benchmarks/results/sd3_step_time.md and .csv
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, describe_machine, machine_info  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a photo of sks cat"
RANK = 4
# The same modules for both: peft matches suffixes, so these reach attn and attn2.
LORA_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                "to_add_out"]  # fmt: skip
PROGRAMS = ("diffusers", "lightning-sd")


def child(out: str, threads: int, program: str, argv: list[str]) -> None:
    """Run one program in this process, recording (wall, CPU) at every optimizer step."""
    import runpy
    import time

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(threads)
    marks: list[tuple[float, float]] = []
    register_optimizer_step_post_hook(
        lambda *_: marks.append((time.perf_counter(), time.process_time()))
    )
    try:
        if program == "lightning-sd":
            from lightning_sd.cli import main

            main(argv)
        else:
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        Path(out).write_text(json.dumps(marks))


def diffusers_args(script: str, base: Path, images: Path, out: Path, steps: int) -> list[str]:
    return [
        script, "--pretrained_model_name_or_path", str(base),
        "--instance_data_dir", str(images), "--instance_prompt", PROMPT,
        "--resolution", "32", "--train_batch_size", "1", "--max_train_steps", str(steps),
        "--rank", str(RANK), "--lora_layers", ",".join(LORA_MODULES),
        "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_sequence_length", "77", "--mixed_precision", "no", "--seed", "0",
        "--checkpointing_steps", "1000000", "--dataloader_num_workers", "0",
        "--output_dir", str(out),
    ]  # fmt: skip


def ours_args(base: Path, images: Path, out: Path, steps: int) -> list[str]:
    adapter = json.dumps({"kind": "lora", "rank": RANK, "alpha": RANK, "targets": LORA_MODULES})
    return [
        "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--config", str(ROOT / "configs" / "experiments" / "sd3_tiny.yaml"),
        "--model.pretrained_model_name_or_path", str(base), "--model.adapter", adapter,
        "--model.text_encoder_adapter", "null", "--model.text_encoder_2_adapter", "null",
        "--model.learning_rate", "1e-4",
        "--data.instance_data_dir", str(images), "--data.instance_prompt", PROMPT,
        "--data.resolution", "32", "--data.loader.batch_size", "1", "--data.random_flip", "false",
        "--data.cache.text_embeddings", "true", "--data.cache.dir", str(out / "cache"),
        "--trainer.max_steps", str(steps), "--trainer.default_root_dir", str(out),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.limit_val_batches", "0",
        "--export.dirpath", str(out / "lora"),
    ]  # fmt: skip


def run(program: str, argv: list[str], threads: int, work: Path) -> list[tuple[float, float]]:
    marks = work / f"marks_{program}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, __file__, "--child", str(marks), "--threads", str(threads),
           "--program", program, "--", *argv]  # fmt: skip
    done = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{program} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    ends = json.loads(marks.read_text())
    return [(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends, ends[1:], strict=False)]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--script", help="diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py"
    )
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps dropped")
    parser.add_argument("--rounds", type=int, default=1, help="alternating runs per program")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child")
    parser.add_argument("--program", choices=PROGRAMS)
    parser.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.threads, args.program, args.rest)
        return {}
    if not args.script or not Path(args.script).is_file():
        parser.error(f"--script {args.script!r}: give diffusers' train_dreambooth_lora_sd3.py")
    from lightning_sd.demo import write_instance_photos
    from lightning_sd.tiny_sd3 import build_tiny_sd3_pipeline

    info = machine_info("cpu")  # its load average: at the start
    steps: dict[str, list[tuple[float, float]]] = {p: [] for p in PROGRAMS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_sd3_pipeline(tmp / "tiny-sd3", seed=0)
        images = write_instance_photos(tmp / "instance", count=4, side=48)
        for r in range(args.rounds):
            for program in PROGRAMS if r % 2 == 0 else PROGRAMS[::-1]:
                work = tmp / f"{program}_{r}"
                work.mkdir()
                out = work / "out"
                cmd = (diffusers_args(args.script, base, images, out, args.steps)
                       if program == "diffusers" else ours_args(base, images, out, args.steps))  # fmt: skip
                timed = run(program, cmd, args.threads, work)[args.warmup :]
                steps[program] += timed
                print(f"round {r} {program}: median {statistics.median(w for w, _ in timed):.4f} s")
    rows = []
    for program in PROGRAMS:
        wall = [w for w, _ in steps[program]]
        rows.append({
            "program": program, "steps": len(wall),
            "median_step_s": round(statistics.median(wall), 5), "min_step_s": round(min(wall), 5),
            "cpu_step_s": round(statistics.median(c for _, c in steps[program]), 5),
        })  # fmt: skip
    ratios = {
        key: rows[1][column] / rows[0][column]
        for key, column in (("median", "median_step_s"), ("fastest", "min_step_s"),
                            ("cpu", "cpu_step_s"))
    }  # fmt: skip
    write_results(args, rows, ratios, describe_machine(info, os.getloadavg()[0]))
    return ratios


def write_results(args, rows: list[dict], ratios: dict[str, float], machine: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "sd3_step_time.csv", buf.getvalue())
    lines = [
        "# SD3 step time: `lightning-sd fit` vs diffusers' `train_dreambooth_lora_sd3.py`", "",
        f"Tiny SD3.5-Medium-architecture pipeline (`--preset tiny-sd3`), 4 instance photos, "
        f"batch 1, 32 px, float32, LoRA rank {RANK} on {', '.join(LORA_MODULES)} (attn and "
        f"attn2), prompt encoded once, {args.threads} thread(s), {args.steps} steps per run, "
        f"first {args.warmup} dropped, {args.rounds} run(s) per program "
        f"({'alternating' if args.rounds > 1 else 'diffusers first'}). "
        "A step is the time between two optimizer steps, recorded by the same hook in both.", "",
        machine, "",
        "| program | steps | median step (s) | fastest step (s) | median CPU per step (s) |",
        "| --- | --- | --- | --- | --- |",
        *(f"| {r['program']} | {r['steps']} | {r['median_step_s']} | {r['min_step_s']} | "
          f"{r['cpu_step_s']} |" for r in rows),  # fmt: skip
        "",
        f"**Ratio lightning-sd / diffusers: {ratios['median']:.3f}x median wall, "
        f"{ratios['fastest']:.3f}x fastest wall, {ratios['cpu']:.3f}x median CPU time per "
        "step** (goal: at most 1.0x). When the load average exceeds the core count, a wall "
        "step is mostly time spent waiting for a core and depends on what the neighbours do "
        "at that moment; the process CPU time per step is the steadier comparison then.", "",
        f"Command: `python benchmarks/sd3_step_time.py --script {Path(args.script).name} "
        f"--steps {args.steps} --warmup {args.warmup} --rounds {args.rounds} "
        f"--threads {args.threads}`", "",
    ]  # fmt: skip
    atomic_write(args.out / "sd3_step_time.md", "\n".join(lines))


if __name__ == "__main__":
    main()
