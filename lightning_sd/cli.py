"""``lightning-sd``: LightningCLI for fit/validate, plus tools (generate, merge, ...).

The YAML configs are the constructors' signatures serialized; the CLI adds nothing the
Python API lacks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sd.callbacks.export import LoRAExport
from lightning_sd.callbacks.fault_tolerance import EXIT_SIGTERM, FaultTolerance
from lightning_sd.callbacks.last_checkpoint import LastCheckpoint
from lightning_sd.callbacks.progress import StepProgressBar
from lightning_sd.cli_tools import ShortUsageParser, run_tool
from lightning_sd.module import StableDiffusionLoRA
from lightning_sd.run_dir import check_fresh_run

__all__ = ["LightningSDCLI", "build_cli", "main"]


class _RawEpilogFormatter(DefaultHelpFormatter):
    """Keeps the epilog's one-command-a-line layout (argparse would reflow it)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class LightningSDCLI(LightningCLI):
    """LightningCLI with three callbacks always attached, each configurable by its group.

    - ``export``: :class:`LoRAExport` (``--export.dirpath`` moves the LoRA files).
    - ``checkpoint``: :class:`LastCheckpoint` (a ``ModelCheckpoint``) keeping ``last.ckpt``
      every 250 steps (``--checkpoint.every_n_train_steps``) and when fit ends, in
      ``<trainer.default_root_dir>/checkpoints``, the run's folder: ``--ckpt_path last``
      continues it (a finished run extends exactly), updating ``last.ckpt`` in place; a new run
      there is refused (it would overwrite the other run's checkpoint).
    - a :class:`StepProgressBar` unless another progress bar is configured or bars are off.
    - ``faults``: :class:`FaultTolerance`: one run per folder, atomic checkpoints, a
      checkpoint on SIGTERM (then exit status 143), a stop on a non-finite loss that names the
      last finite checkpoint.
    """

    def _instantiate_trainer(self, config: dict, callbacks: list[Callback]) -> Trainer:
        """Lightning's, with :class:`StepProgressBar` as the default progress bar."""
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        wants_bar = config.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in [*given, *callbacks]):
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LoRAExport, "export")
        parser.add_lightning_class_args(LastCheckpoint, "checkpoint")
        # One last.ckpt per recipe folder, updated in place by a resumed run (never last-v1),
        # and no per-step copies beside it.
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 250,
                "checkpoint.save_top_k": 0,
                "checkpoint.enable_version_counter": False,
            }
        )
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", _checkpoint_dir)
        parser.add_lightning_class_args(FaultTolerance, "faults")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit`` and ``validate``: the module has no ``test_step``/``predict_step`` (use
        ``validate`` for held-out loss and ``generate`` for images)."""
        subcommands = LightningCLI.subcommands()
        return {k: subcommands[k] for k in ("fit", "validate")}

    def instantiate_classes(self) -> None:
        """A value refused by a constructor is one line, not a jsonargparse traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            sys.stderr.write(f"lightning-sd {self.subcommand}: error: {root}\n")
            raise SystemExit(2) from None

    def before_fit(self) -> None:
        # Before SaveConfigCallback writes this run's config over the earlier run's.
        config = self.config[self.subcommand]
        root = config.trainer.default_root_dir
        check_fresh_run(_checkpoint_dir(root), resuming=bool(config.get("ckpt_path")))


def _checkpoint_dir(default_root_dir: str | None) -> str:
    return str(Path(default_root_dir or os.getcwd()) / "checkpoints")


def _tiny_pipeline(out_dir: str, preset: str = "tiny", seed: int = 0):
    """Write a tiny SD1.x-, SDXL- or SD3-architecture pipeline folder with random weights,
    offline.

    For tests, demos and benchmarks: ``StableDiffusionPipeline.from_pretrained(out_dir)``
    loads it with no network.

    Args:
        out_dir: destination folder (must not exist or be empty).
        preset: ``tiny`` (tests, 32 px), ``small`` (benchmarks, 64 px), ``small-vae8``
            (256 px with SD's 8x VAE downsampling), ``tiny-sdxl`` (SDXL architecture: two text
            encoders, micro-conditioning), ``tiny-playground`` (SDXL with an EDM-native
            scheduler, as Playground v2.5), ``tiny-sd3`` (SD3.5 Medium's architecture: MMDiT
            with attn2, two CLIPs, T5, 16-channel VAE, rectified flow), ``tiny-sd3-no-t5``, or
            ``tiny-pretrained``: a copy of the shipped base pretrained on emoji (32 px; not
            random).
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


TOOLS_HELP = {
    "generate": "sample images from a base model with LoRA files",
    "merge": "combine several LoRA files into one",
    "convert-checkpoint": "write the LoRA files of a training checkpoint",
    "tiny-pipeline": "write a tiny random pipeline (tests, demos), offline",
    "tiny-metrics": "write tiny metric backbones (tests), offline",
}


def _epilog() -> str:
    lines = [f"  {name:<20}{text}" for name, text in TOOLS_HELP.items()]
    return "other commands (lightning-sd COMMAND --help):\n" + "\n".join(lines)


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningSDCLI:
    """The CLI over ``StableDiffusionLoRA`` and any DataModule (given by ``class_path``)."""
    return LightningSDCLI(
        StableDiffusionLoRA,
        LightningDataModule,
        subclass_mode_data=True,
        parser_class=ShortUsageParser,
        parser_kwargs={
            "prog": "lightning-sd",
            "epilog": _epilog(),
            "formatter_class": _RawEpilogFormatter,
            "fit": {},
            "validate": {},
        },
        # A resumed run writes its config where the interrupted one did.
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in TOOLS:
        return run_tool(args[0], TOOLS[args[0]](), args[1:])
    try:
        build_cli(argv)  # None: LightningCLI reads sys.argv itself, without a warning
    except SIGTERMException:
        # Lightning's SIGTERMException is a SystemExit with status 0: a scheduler would think
        # the run finished. last.ckpt is saved (FaultTolerance); say it was pre-empted.
        raise SystemExit(EXIT_SIGTERM) from None


if __name__ == "__main__":
    main()
