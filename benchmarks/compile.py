"""Training step time with and without ``compile: true`` (torch.compile, inductor), same run.

Two ``StableDiffusionLoRA`` modules on one tiny pipeline, same adapter initialisation: one
eager, one with ``compile=True``. A step is the denoiser's forward and backward through the
objective plus an AdamW update, on a fixed batch of latents and cached text embeddings (what
the latent and text caches serve). The compiled module's first step (trace + inductor codegen
+ C++ build) is timed alone: its excess over an eager step is the compile cost. Then the two
alternate step by step (eager, compiled, eager, ...), so a busy neighbour on the shared CPU
slows both alike; wall and process CPU time per step are reported. Each compiled step's loss
is checked against the eager step's (same weights, same noise).

    python benchmarks/compile.py   # -> benchmarks/results/compile.{csv,md}
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, describe_machine, machine_info, write_csv  # noqa: E402

from lightning_sd import AdapterConfig, StableDiffusionLoRA  # noqa: E402
from lightning_sd.tiny import build_tiny_pipeline  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(pipeline: Path, compile: bool, args) -> tuple[StableDiffusionLoRA, torch.optim.AdamW]:
    torch.manual_seed(0)
    module = StableDiffusionLoRA(
        str(pipeline),
        adapter=AdapterConfig(kind=args.kind, rank=args.rank),
        gradient_checkpointing=args.checkpointing,
        compile=compile,
    )
    module.configure_model()
    params = [p for p in module.parameters() if p.requires_grad]
    return module, torch.optim.AdamW(params, lr=1e-4)


def step(module, optimizer, latents, cond, seed: int) -> tuple[float, float, float]:
    """One training step: (wall s, process CPU s, loss)."""
    wall, cpu = time.perf_counter(), time.process_time()
    gen = torch.Generator().manual_seed(seed)
    loss = module.objective.loss(module.denoiser_fn, latents, generator=gen, **cond).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu, float(loss)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="tiny-pipeline preset (tiny, small)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per setup")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--kind", default="lora", choices=["lora", "dora"])
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    parser.add_argument("--out", type=Path, default=RESULTS / "compile")
    args = parser.parse_args(argv)
    info = machine_info("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = build_tiny_pipeline(Path(tmp) / "p", args.preset, seed=0)
        eager, eager_opt = build(pipeline, False, args)
        compiled, compiled_opt = build(pipeline, True, args)
    side = eager.denoiser.config.sample_size
    latents = torch.randn(args.batch, 4, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cond = eager.encode_text(["a photo of a cat"] * args.batch)
    # Step 0: the eager step first (its own warm-up), then the compiled one that compiles.
    eager_first = step(eager, eager_opt, latents, cond, 0)
    compiled_first = step(compiled, compiled_opt, latents, cond, 0)
    times: dict[str, list[tuple[float, float]]] = {"eager": [], "compiled": []}
    worst = abs(compiled_first[2] - eager_first[2]) / abs(eager_first[2])
    for i in range(1, args.steps + 1):  # interleaved
        e = step(eager, eager_opt, latents, cond, i)
        c = step(compiled, compiled_opt, latents, cond, i)
        times["eager"].append(e[:2])
        times["compiled"].append(c[:2])
        worst = max(worst, abs(c[2] - e[2]) / abs(e[2]))
    rows = []
    for name, first in (("eager", eager_first), ("compiled", compiled_first)):
        wall = [w for w, _ in times[name]]
        rows.append(
            {
                "setup": name,
                "first_step_s": round(first[0], 3),
                "first_step_cpu_s": round(first[1], 3),
                "median_step_ms": round(1000 * statistics.median(wall), 1),
                "min_step_ms": round(1000 * min(wall), 1),
                "cpu_step_ms": round(1000 * statistics.median(c for _, c in times[name]), 1),
            }
        )
    write_csv(args.out.with_suffix(".csv"), rows)
    eager_row, comp_row = rows
    compile_cost = comp_row["first_step_s"] - eager_row["median_step_ms"] / 1000
    speedup = eager_row["median_step_ms"] / comp_row["median_step_ms"]
    cmd = "python benchmarks/compile.py" + ("" if argv is None else " " + " ".join(argv))
    lines = [
        "# torch.compile (inductor) of the denoiser: training step time on CPU",
        "",
        f"Command: `{cmd}`. Pipeline preset `{args.preset}` ({side}x{side} latents), batch "
        f"{args.batch}, {args.kind} rank {args.rank}, gradient checkpointing "
        f"{'on' if args.checkpointing else 'off'}; a step is forward + backward + AdamW on a "
        f"fixed batch (cached latents and text embeddings). {args.steps} steps per setup, "
        "eager and compiled alternating step by step.",
        "",
        "| setup | first step (s) | first step CPU (s) | median step (ms) | fastest step (ms) "
        "| median CPU / step (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['setup']} | {r['first_step_s']} | {r['first_step_cpu_s']} | "
            f"{r['median_step_ms']} | {r['min_step_ms']} | {r['cpu_step_ms']} |"
            for r in rows
        ],
        "",
        f"- First-step compile cost: {compile_cost:.1f} s wall (the compiled first step minus a "
        f"median eager step), {comp_row['first_step_cpu_s']:.1f} s of process CPU time (inductor "
        "also compiles C++ in worker processes, not counted there).",
        f"- Median step: eager / compiled = {speedup:.2f}x; it pays back the compile after "
        + (
            f"~{compile_cost / (eager_row['median_step_ms'] - comp_row['median_step_ms']) * 1000:.0f} steps."
            if eager_row["median_step_ms"] > comp_row["median_step_ms"]
            else "never on this setup."
        ),
        f"- Largest relative loss difference compiled vs eager, same weights and noise: {worst:.1e}.",
        "- The CPU is shared with another training job (2 cores): wall times include its share; "
        "the CPU-time column is less affected. A GPU was not available: compile on CUDA is "
        "unmeasured.",
        "",
        describe_machine(info, os.getloadavg()[0]),
        "",
    ]
    atomic_write(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
