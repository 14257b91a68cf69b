"""``lightning-sd``: LightningCLI for fit/validate/test/predict, plus a few tools.

The YAML configs are the constructors' signatures serialized; the CLI adds nothing the
Python API lacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_sd.callbacks.export import LoRAExport
from lightning_sd.callbacks.fault_tolerance import FaultTolerance
from lightning_sd.module import StableDiffusionLoRA

__all__ = ["LightningSDCLI", "build_cli", "main"]


class LightningSDCLI(LightningCLI):
    """LightningCLI with three callbacks always attached, each configurable by its group.

    - ``export``: :class:`LoRAExport` (``--export.dirpath`` moves the LoRA files).
    - ``checkpoint``: ``ModelCheckpoint`` keeping ``last.ckpt`` every 250 steps
      (``--checkpoint.every_n_train_steps``) in ``<trainer.default_root_dir>/checkpoints``:
      one folder for every run of a recipe, so ``--ckpt_path last`` finds the latest.
    - ``faults``: :class:`FaultTolerance`: atomic checkpoints, a checkpoint on SIGTERM, a stop
      with a message on a non-finite loss.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LoRAExport, "export")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 250})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", _checkpoint_dir)
        parser.add_lightning_class_args(FaultTolerance, "faults")


def _checkpoint_dir(default_root_dir: str | None) -> str:
    return str(Path(default_root_dir or os.getcwd()) / "checkpoints")


def _tool(function):
    """A typed function as a sub-command: its signature is the schema, its docstring the help."""

    def run(argv: list[str]) -> None:
        from jsonargparse import CLI

        result = CLI(function, args=argv)
        for line in result if isinstance(result, list) else [result]:
            print(line)

    return run


def _tiny_pipeline(out_dir: str, preset: str = "tiny", seed: int = 0):
    """Write a tiny SD1.x- or SDXL-architecture pipeline folder with random weights, offline.

    For tests, demos and benchmarks: ``StableDiffusionPipeline.from_pretrained(out_dir)``
    loads it with no network.

    Args:
        out_dir: destination folder (must not exist or be empty).
        preset: ``tiny`` (tests, 32 px), ``small`` (benchmarks, 64 px), ``small-vae8``
            (256 px with SD's 8x VAE downsampling), ``tiny-sdxl`` (SDXL architecture: two text
            encoders, micro-conditioning), ``tiny-playground`` (SDXL with an EDM-native
            scheduler, as Playground v2.5), or ``tiny-pretrained``: a copy of the shipped base
            pretrained on emoji (32 px; not random).
        seed: seeds every component's initialisation.
    """
    from lightning_sd.tiny import build_tiny_pipeline

    return build_tiny_pipeline(out_dir, preset, seed)


def _generate():
    from lightning_sd.generate import generate

    return generate


def _merge():
    from lightning_sd.merge import merge_loras

    return merge_loras


def _convert():
    from lightning_sd.convert import convert_checkpoint

    return convert_checkpoint


def _tiny_metrics():
    from lightning_sd.metrics.tiny import write_tiny_metric_models

    return write_tiny_metric_models


# Sub-commands that are not Trainer entry points; imported only when called.
TOOLS = {
    "tiny-pipeline": lambda: _tiny_pipeline,
    "tiny-metrics": _tiny_metrics,
    "generate": _generate,
    "merge": _merge,
    "convert-checkpoint": _convert,
}


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningSDCLI:
    """The CLI over ``StableDiffusionLoRA`` and any DataModule (given by ``class_path``)."""
    return LightningSDCLI(
        StableDiffusionLoRA,
        LightningDataModule,
        subclass_mode_data=True,
        # A resumed run writes its config where the interrupted one did.
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        return _tool(TOOLS[argv[0]]())(argv[1:])
    build_cli(argv)


if __name__ == "__main__":
    main()
