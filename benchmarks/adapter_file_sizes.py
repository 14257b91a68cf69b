"""Adapter file size and trainable parameters per rank, kind and target preset, on SD1.5's UNet.

The UNet is built from SD1.5's architecture with random weights (no download): sizes depend
only on shapes. Each adapter is written with the package's own exporter (diffusers layout,
float32 as trained) and the file on disk is measured.

    python benchmarks/adapter_file_sizes.py            # -> benchmarks/results/adapter_file_sizes.{csv,md}
"""

from __future__ import annotations

import argparse
import copy
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, sd15_unet, write_csv  # noqa: E402


def main() -> None:
    from lightning_sd.adapters import AdapterConfig, add_adapter
    from lightning_sd.families import SD1
    from lightning_sd.lora_io import save_diffusers_lora

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--out", default="benchmarks/results/adapter_file_sizes")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = sd15_unet().requires_grad_(False)
    base_bytes = sum(p.numel() * 2 for p in base.parameters())  # the fp16 weights users download
    rows = []
    for targets in ("attn", "attn_ff", "full"):
        for kind in ("lora", "dora"):
            for rank in args.ranks:
                unet = copy.deepcopy(base)
                add_adapter(unet, AdapterConfig(kind=kind, rank=rank, alpha=rank, targets=targets))
                params = sum(p.numel() for p in unet.parameters() if p.requires_grad)
                with tempfile.TemporaryDirectory() as tmp:
                    size = save_diffusers_lora(tmp, {"unet": unet}, SD1()).stat().st_size
                rows.append(
                    dict(targets=targets, kind=kind, rank=rank, trainable_params=params,
                         file_mb=round(size / 2**20, 2),
                         percent_of_fp16_unet=round(100 * size / base_bytes, 2))
                )  # fmt: skip
                print(rows[-1], flush=True)
                del unet
    out = Path(args.out)
    write_csv(out.with_suffix(".csv"), rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    lines = [
        "# Adapter file size on SD1.5's UNet (diffusers layout, float32)",
        "",
        f"SD1.5 UNet: {sum(p.numel() for p in base.parameters()) / 1e6:.0f} M parameters, "
        f"{base_bytes / 2**20:.0f} MiB in fp16. Machine: {platform.machine()}, "
        f"torch {torch.__version__}, commit {commit.stdout.strip()}.",
        "",
        "| targets | kind | rank | trainable params | file MiB | % of fp16 UNet |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['targets']} | {r['kind']} | {r['rank']} | {r['trainable_params']:,} | "
        f"{r['file_mb']} | {r['percent_of_fp16_unet']} |"
        for r in rows
    ]
    atomic_write(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
