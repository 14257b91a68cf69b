"""An exponential moving average of the adapter weights, exported as the LoRA file.

Lightning's ``WeightAveraging`` does not fit here: it deep-copies the whole module when the
trainer is set up, before ``configure_model`` has loaded anything (so it would average an
empty module, and for a loaded base it would copy the frozen network too), and it reloads the
current weights with a strict ``load_state_dict`` that adapter-only checkpoints fail. This
callback keeps a float32 shadow of the trainable tensors only, in the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from lightning import Callback, LightningModule, Trainer

__all__ = ["AdapterEMA"]


class AdapterEMA(Callback):
    """EMA of the trainable weights: shadow <- d * shadow + (1 - d) * weight each optimizer step.

    With ``warmup`` the decay is min(decay, (1 + t) / (10 + t)) at the t-th update (the
    schedule diffusers' ``EMAModel`` uses), so early shadows are not dominated by the start.
    The shadow is in the checkpoint (``callbacks`` state) and checkpoints keep the raw weights,
    so a resumed run averages and trains exactly as an uninterrupted one. With
    ``export="ema"`` ``LoRAExport`` writes the EMA weights (every export, periodic ones too)
    and the module holds them after ``fit``; ``export="raw"`` writes and keeps the raw ones.

    Args:
        decay: the EMA decay d (0.999 averages over about the last 1000 steps).
        warmup: ramp the decay up from 0.1 over the first steps.
        every_n_steps: update the shadow every N optimizer steps.
        export: ``ema`` or ``raw``: which weights the module holds (and exports) after fit.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = True,
        every_n_steps: int = 1,
        export: Literal["ema", "raw"] = "ema",
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.decay = decay
        self.warmup = warmup
        self.every_n_steps = every_n_steps
        self.export = export
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0
        self._last_step = -1

    @staticmethod
    def _trainable(pl_module: LightningModule) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After any checkpoint (and this callback's state) has been restored.
        params = self._trainable(pl_module)
        if self.shadow is None:  # a fresh run; a resumed one has its shadow from the checkpoint
            self.shadow = {n: p.detach().float().clone() for n, p in params.items()}
        else:
            missing = sorted(set(params) - set(self.shadow))
            if missing:
                raise KeyError(f"the checkpoint's EMA lacks {len(missing)} adapters: {missing[:3]}")
            self.shadow = {n: t.to(params[n].device) for n, t in self.shadow.items()}
        self._last_step = trainer.global_step

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        t = self.updates
        return min(self.decay, (1 + t) / (10 + t))

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every_n_steps:  # mid-accumulation
            return
        self._last_step = step
        d = self.current_decay()
        for name, param in self._trainable(pl_module).items():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After on_train_end, where the last checkpoint (raw weights) is written.
        if self.export == "ema" and self.shadow is not None:
            self.copy_to(pl_module)

    @contextmanager
    def exported_weights(self, pl_module: LightningModule) -> Iterator[None]:
        """The weights ``export`` names in the module for the duration (then restored)."""
        if self.export == "raw" or self.shadow is None:
            yield
            return
        raw = {n: p.detach().clone() for n, p in self._trainable(pl_module).items()}
        self.copy_to(pl_module)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in self._trainable(pl_module).items():
                    param.copy_(raw[name])

    @torch.no_grad()
    def copy_to(self, pl_module: LightningModule) -> None:
        """Put the EMA weights into the module's trainable tensors."""
        for name, param in self._trainable(pl_module).items():
            param.copy_(self.shadow[name].to(param.dtype))

    def state_dict(self) -> dict[str, Any]:
        shadow = {n: t.cpu() for n, t in (self.shadow or {}).items()}
        return {"shadow": shadow, "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.shadow = dict(state_dict["shadow"]) or None
        self.updates = int(state_dict["updates"])
