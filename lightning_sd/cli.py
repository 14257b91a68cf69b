"""``lightning-sd``: LightningCLI for fit/validate/test/predict, plus a few tools.

The YAML configs are the constructors' signatures serialized; the CLI adds nothing the
Python API lacks.
"""

from __future__ import annotations

import argparse
import sys

from lightning import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sd.callbacks.export import LoRAExport
from lightning_sd.module import StableDiffusionLoRA

__all__ = ["LightningSDCLI", "build_cli", "main"]


class LightningSDCLI(LightningCLI):
    """LightningCLI with the LoRA export always attached (``--export.dirpath`` moves it)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LoRAExport, "export")


def tiny_pipeline(argv: list[str]) -> None:
    """``lightning-sd tiny-pipeline OUT [--preset tiny|small|small-vae8] [--seed N]``."""
    from lightning_sd.tiny import PRESETS, build_tiny_pipeline

    parser = argparse.ArgumentParser(
        prog="lightning-sd tiny-pipeline",
        description="Write a tiny SD1.x-architecture pipeline folder with random weights, "
        "offline, for tests, demos and benchmarks.",
    )
    parser.add_argument("out", help="destination folder (must not exist or be empty)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_pipeline(args.out, args.preset, args.seed))


TOOLS = {"tiny-pipeline": tiny_pipeline}


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningSDCLI:
    """The CLI over ``StableDiffusionLoRA`` and any DataModule (given by ``class_path``)."""
    return LightningSDCLI(
        StableDiffusionLoRA,
        LightningDataModule,
        subclass_mode_data=True,
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return TOOLS[argv[0]](argv[1:])
    build_cli(argv)


if __name__ == "__main__":
    main()
