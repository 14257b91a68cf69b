"""Training-checkpoint size against the base model, on SD1.5's UNet, per rank and per GPU.

A checkpoint holds what trains (the adapters) and AdamW's two moments for it, never the frozen
base. The sizes here are measured: SD1.5's UNet architecture is built with random weights (no
download), the package's ``add_adapter`` and default optimizer take one step, and the
checkpoint's ``state_dict`` (the module's filter) and ``optimizer_states`` are written with
``torch.save`` and measured on disk. Per GPU: under DDP rank 0 writes the whole file; under
DeepSpeed ZeRO-2 each rank writes its 1/N share of the optimizer states (fp32 master weights
and both moments), and rank 0 the trainable weights too: those rows are this arithmetic on the
measured parts, labelled as such.

    python benchmarks/checkpoint_size.py     # -> benchmarks/results/checkpoint_size.{csv,md}
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, markdown_table, sd15_unet, write_csv  # noqa: E402


def nbytes(obj) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getbuffer().nbytes


def main(argv: list[str] | None = None) -> None:
    from lightning_sd.adapters import AdapterConfig, add_adapter
    from lightning_sd.optim import build_optimizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--kinds", nargs="+", default=["lora", "dora"])
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--out", default="benchmarks/results/checkpoint_size")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    base = sd15_unet().requires_grad_(False)
    base_fp32 = sum(p.numel() * 4 for p in base.parameters())
    rows = []
    for kind in args.kinds:
        for rank in args.ranks:
            unet = copy.deepcopy(base)
            add_adapter(unet, AdapterConfig(kind=kind, rank=rank, alpha=rank))
            trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
            optimizer = build_optimizer(None, [{"params": list(trainable.values()), "lr": 1e-4}])
            for p in trainable.values():
                p.grad = torch.randn_like(p)
            optimizer.step()
            weights = nbytes({n: p.detach() for n, p in trainable.items()})
            states = nbytes(optimizer.state_dict())
            for gpus in args.gpus:
                ddp = weights + states  # one file, written by rank 0
                zero2 = (
                    weights + (states + weights) / gpus
                )  # rank 0: weights + 1/N of fp32 master + moments
                rows.append(
                    dict(kind=kind, rank=rank, params=sum(p.numel() for p in trainable.values()),
                         gpus=gpus, weights_mib=round(weights / 2**20, 2),
                         optimizer_mib=round(states / 2**20, 2),
                         ddp_checkpoint_mib=round(ddp / 2**20, 2),
                         zero2_rank0_mib=round(zero2 / 2**20, 2),
                         percent_of_fp32_unet=round(100 * ddp / base_fp32, 3))
                )  # fmt: skip
            print(rows[-1], flush=True)
            del unet, optimizer
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"), rows)
    header = ["kind", "rank", "params", "GPUs", "adapters MiB", "AdamW states MiB",
              "DDP/single checkpoint MiB", "ZeRO-2 rank-0 share MiB (computed)",
              "% of the fp32 UNet"]  # fmt: skip
    table = [
        [r["kind"], r["rank"], f"{r['params']:,}", r["gpus"], r["weights_mib"],
         r["optimizer_mib"], r["ddp_checkpoint_mib"], r["zero2_rank0_mib"],
         r["percent_of_fp32_unet"]]
        for r in rows
    ]  # fmt: skip
    lines = [
        "# Training-checkpoint size on SD1.5's UNet (adapters + AdamW states; the base is not in it)",
        "",
        f"SD1.5 UNet: {sum(p.numel() for p in base.parameters()) / 1e6:.0f} M parameters, "
        f"{base_fp32 / 2**20:.0f} MiB in fp32 ({base_fp32 / 2**21:.0f} MiB in fp16). Targets: "
        "`attn`. Command: `python benchmarks/checkpoint_size.py`.",
        "",
        *markdown_table(header, table),
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
