"""Training FLOPs of one UNet step per adapter kind and rank: the tiny ``small`` preset vs SD1.5.

Step time on a CPU is noisy; FLOPs are exact. Each UNet (random weights, built on the ``meta``
device: shapes only, nothing computed or downloaded) gets the package's adapter
(``add_adapter``: attention targets, alpha = rank) and ``torch.utils.flop_counter`` counts one
forward + backward of a batch with 77 text tokens. The share rank adds explains why step time
grows with rank on the tiny preset (its attention is 32-64 channels wide, narrower than rank
64) and not on SD1.5 (320-1280 channels).

    python benchmarks/adapter_flops.py   # ~1 min -> benchmarks/results/adapter_flops.{csv,md}
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, markdown_table, sd15_unet, write_csv  # noqa: E402


def unets() -> dict[str, tuple[torch.nn.Module, int, int]]:
    """name -> (UNet on the meta device, latent side, text width)."""
    import tempfile

    from diffusers import UNet2DConditionModel

    from lightning_sd.tiny import build_tiny_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        config = UNet2DConditionModel.load_config(
            build_tiny_pipeline(Path(tmp) / "p", "small"), subfolder="unet"
        )
    with torch.device("meta"):
        small = UNet2DConditionModel.from_config(config)
        sd15 = sd15_unet()
    return {"small (64 px)": (small, 16, 64), "SD1.5 (512 px)": (sd15, 64, 768)}


def step_flops(unet, side: int, width: int, kind: str, rank: int, batch: int) -> int:
    from lightning_sd.adapters import AdapterConfig, add_adapter

    unet = copy.deepcopy(unet).requires_grad_(False)
    add_adapter(unet, AdapterConfig(kind=kind, rank=rank))
    x = torch.randn(batch, 4, side, side, device="meta")
    cond = torch.randn(batch, 77, width, device="meta")
    t = torch.full((batch,), 500, device="meta")
    with FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=cond, return_dict=False)[0].sum().backward()
    return counter.get_total_flops()


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--kinds", nargs="+", default=["lora", "dora"])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/adapter_flops")
    args = parser.parse_args(argv)
    rows = []
    for name, (unet, side, width) in unets().items():
        for kind in args.kinds:
            first = None
            for rank in args.ranks:
                flops = step_flops(unet, side, width, kind, rank, args.batch_size)
                first = first or flops
                rows.append(dict(unet=name, kind=kind, rank=rank, gflop_per_step=flops / 1e9,
                                 vs_lowest_rank=flops / first - 1))  # fmt: skip
                print(f"{name:15} {kind} r{rank:<3} {flops / 1e9:10.2f} GFLOP "
                      f"({rows[-1]['vs_lowest_rank']:+.1%})", flush=True)  # fmt: skip
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"), rows)
    lines = [
        "# Training FLOPs per UNet step by adapter rank (forward + backward)",
        "",
        f"Batch {args.batch_size}, 77 text tokens; adapter on the attention projections, "
        "frozen base; counted by torch.utils.flop_counter on the meta device (matmuls and "
        f"convolutions; exact, machine-independent). torch {torch.__version__}.",
        "",
        *markdown_table(
            ["UNet", "kind", "rank", "GFLOP / step", f"vs rank {args.ranks[0]}"],
            [
                [
                    r["unet"],
                    r["kind"],
                    r["rank"],
                    f"{r['gflop_per_step']:.2f}",
                    f"{r['vs_lowest_rank']:+.1%}",
                ]
                for r in rows
            ],
        ),  # fmt: skip
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
