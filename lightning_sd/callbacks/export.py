"""Write the trained adapters as LoRA files (diffusers + kohya), embeddings and a model card."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_sd.adapters import is_adapter_parameter
from lightning_sd.embeddings import EMBEDDINGS_NAME, save_embeddings
from lightning_sd.lora_io import (
    KOHYA_WEIGHT_NAME,
    LoRAFileError,
    save_diffusers_lora,
    save_kohya_lora,
)
from lightning_sd.model_card import write_model_card
from lightning_sd.run_dir import held_by_this_process, remove_leftovers

__all__ = ["LoRAExport", "export_adapters"]

Format = Literal["diffusers", "kohya"]


def export_adapters(
    module: LightningModule,
    out_dir: str | Path,
    formats: list[Format] | tuple[Format, ...] = ("diffusers", "kohya"),
    trigger: str | None = None,
) -> dict[str, Path]:
    """Write a module's adapters in the requested layouts, its new-token embeddings, a card.

    Every file is written to a temporary name and renamed. A layout that cannot hold the
    adapter faithfully (kohya for DoRA, diffusers for LoHa/LoKr) is skipped with a warning
    that says why. Parts trained
    in full (adapter kind ``full``) have no LoRA: each is written as a diffusers component
    folder (``save_pretrained``, safetensors) under its name, e.g. ``<out_dir>/unet``.

    Returns:
        Layout or kind (``diffusers``, ``kohya``, ``embeddings``, ``card``, or a fully trained
        part's name) -> path.
    """
    out_dir = Path(out_dir)
    full = module.fully_trained_components()
    written: dict[str, Path] = {}
    for name, part in full.items():
        part.save_pretrained(out_dir / name, safe_serialization=True)
        written[name] = out_dir / name
    components = {k: v for k, v in module.adapted_components().items() if k not in full}
    if not any(_has_adapter(part) for part in components.values()):
        return written
    metadata = module.training_metadata()
    family = module.family
    if "diffusers" in formats:
        try:
            written["diffusers"] = save_diffusers_lora(out_dir, components, family, metadata)
        except LoRAFileError as err:
            rank_zero_warn(f"diffusers layout skipped: {err}")
    if "kohya" in formats:
        try:
            written["kohya"] = save_kohya_lora(
                out_dir / KOHYA_WEIGHT_NAME, components, family, metadata
            )
        except LoRAFileError as err:
            rank_zero_warn(f"kohya layout skipped: {err}")
    pivotal = getattr(module, "pivotal_tuning", None)
    tokens = pivotal.tokens if pivotal is not None else None
    if tokens:
        encoders = {key: components[name] for name, key in family.embedding_keys.items()}
        path = save_embeddings(out_dir / EMBEDDINGS_NAME, encoders, tokens)
        if path is not None:
            written["embeddings"] = path
    written["card"] = write_model_card(out_dir, metadata, dict(written), trigger, tokens, family)
    return written


def _ema_weights(trainer: Trainer, pl_module: LightningModule):
    """The weights an ``AdapterEMA`` callback says to export (its EMA by default)."""
    from contextlib import nullcontext

    from lightning_sd.callbacks.ema import AdapterEMA

    ema = [c for c in trainer.callbacks if isinstance(c, AdapterEMA)]
    return ema[0].exported_weights(pl_module) if ema else nullcontext()


def _has_adapter(model) -> bool:
    return any(is_adapter_parameter(name) for name, _ in model.named_parameters())


class LoRAExport(Callback):
    """Export the adapters when ``fit`` ends (and every N steps if asked).

    Args:
        dirpath: output folder; default ``<the run's log dir>/lora``, so runs never overwrite
            each other's files.
        formats: ``diffusers`` (``pytorch_lora_weights.safetensors``, what
            ``pipeline.load_lora_weights`` reads) and/or ``kohya`` (A1111 / ComfyUI).
        every_n_steps: also export every N optimizer steps (0: only at the end).

    With an ``AdapterEMA`` callback the files hold its EMA weights (or the raw ones, as its
    ``export`` says).
    """

    def __init__(
        self,
        dirpath: str | None = None,
        formats: list[Format] | None = None,
        every_n_steps: int = 0,
    ):
        self.dirpath = dirpath
        self.formats = list(formats) if formats is not None else ["diffusers", "kohya"]
        self.every_n_steps = every_n_steps
        self.written: dict[str, Path] = {}
        self._dir: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # On every rank: Trainer.log_dir broadcasts from rank 0, so rank 0 alone must not ask.
        self._dir = self.output_dir(trainer)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # A killed export's temporary files go when this run holds the folder (FaultTolerance
        # locks the log dir in its setup); the folder gets no lock file: users share it.
        if trainer.is_global_zero and held_by_this_process(self._dir):
            remove_leftovers(self._dir)

    def output_dir(self, trainer: Trainer) -> Path:
        return Path(self.dirpath or Path(trainer.log_dir or trainer.default_root_dir) / "lora")

    def _trigger(self, trainer: Trainer) -> str | None:
        data = getattr(trainer, "datamodule", None)
        return getattr(getattr(data, "hparams", None), "instance_prompt", None) if data else None

    def export(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Under DDP every rank holds the same adapters: one writes, all wait for the files.
        if trainer.is_global_zero:
            out = self._dir or self.output_dir(trainer)
            with _ema_weights(trainer, pl_module):
                self.written = export_adapters(pl_module, out, self.formats, self._trigger(trainer))
            main = self.written.get("diffusers") or next(iter(self.written.values()), out)
            rank_zero_info(f"LoRA weights written to {main}")
        trainer.strategy.barrier("lora_export")

    @property
    def written_lora(self) -> Path | None:
        """The diffusers-layout file of the last export (kohya/LyCORIS for LoHa and LoKr)."""
        return self.written.get("diffusers") or self.written.get("kohya")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step < trainer.max_steps:
            self.export(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.export(trainer, pl_module)
