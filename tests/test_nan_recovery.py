"""NaN recovery: a diverged checkpoint is never named as good, non-finite weights are never
saved, and a resume honours a newly configured learning rate (issue 19, item 2)."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks import FaultTolerance, NonFiniteLossError
from lightning_sd.data.settings import LoaderSettings


class AtStep(Callback):
    """``action(trainer, module)`` at the start (or end) of the batch of ``step``."""

    def __init__(self, step, action, at_end=False):
        self.step, self.action, self.at_end = step, action, at_end

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.at_end and trainer.global_step == self.step:
            self.action(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.at_end and trainer.global_step == self.step:
            self.action(trainer, pl_module)


def make_trainer(root, *callbacks, max_steps=6):
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True),
            FaultTolerance(),
            *callbacks,
        ],
    )


def make_run(pipeline, instance_dir, learning_rate=1e-3):
    seed_everything(0)
    module = StableDiffusionLoRA(
        str(pipeline), adapter=AdapterConfig(rank=2), learning_rate=learning_rate
    )
    data = DreamBoothDataModule(
        str(instance_dir), "a photo of sks cat", resolution=32, loader=LoaderSettings(batch_size=2)
    )
    return module, data


def spike_learning_rate(trainer, module):
    for group in trainer.optimizers[0].param_groups:
        group["lr"] = 1e6


def max_abs_weight(path) -> float:
    state = torch.load(path, weights_only=True)["state_dict"]
    return max(float(v.abs().max()) for v in state.values())


def test_a_diverged_checkpoint_is_moved_aside_and_last_is_the_last_finite_one(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    """Before: the error named last.ckpt of step 3, whose weights (|w| ~1e6) gave the NaN."""
    module, data = make_run(tiny_pipeline_dir, instance_dir)
    trainer = make_trainer(tmp_path, AtStep(2, spike_learning_rate))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(module, data)
    message = str(caught.value)
    last, diverged = tmp_path / "ckpt" / "last.ckpt", tmp_path / "ckpt" / "diverged-step=3.ckpt"
    assert "non-finite loss at step 3" in message
    assert f"Last finite checkpoint: {last} (step 2)" in message
    assert f"moved to {diverged}" in message
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert max_abs_weight(last) < 10 < 1e4 < max_abs_weight(diverged)


def test_resume_after_divergence_honours_the_new_learning_rate_and_says_so(
    tiny_pipeline_dir, instance_dir, tmp_path, caplog
):
    """Before: the optimizer kept the checkpoint's rate while hparams showed the new one."""
    module, data = make_run(tiny_pipeline_dir, instance_dir)
    with pytest.raises(NonFiniteLossError):
        make_trainer(tmp_path, AtStep(2, spike_learning_rate)).fit(module, data)
    module, data = make_run(tiny_pipeline_dir, instance_dir, learning_rate=2e-4)
    seen = []
    record = AtStep(2, lambda t, m: seen.append(t.optimizers[0].param_groups[0]["lr"]))
    trainer = make_trainer(tmp_path, record, max_steps=5)
    with caplog.at_level(logging.INFO):
        trainer.fit(module, data, ckpt_path="last")
    assert trainer.global_step == 5
    assert seen == [2e-4]
    assert "learning rate of unet: 0.001 in the checkpoint, 0.0002 configured" in caplog.text
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_no_finite_checkpoint_yet_says_so_and_leaves_no_last_ckpt(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    """A learning rate of 1e6 diverges at the first update: there is nothing good to name."""
    module, data = make_run(tiny_pipeline_dir, instance_dir, learning_rate=1e6)
    with pytest.raises(NonFiniteLossError) as caught:
        make_trainer(tmp_path, max_steps=4).fit(module, data)
    assert "No finite checkpoint was saved yet" in str(caught.value)
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()
    module, data = make_run(tiny_pipeline_dir, instance_dir)
    trainer = make_trainer(tmp_path, max_steps=3)  # "last" finds nothing: a fresh start
    trainer.fit(module, data, ckpt_path="last")
    assert trainer.global_step == 3


def test_non_finite_weights_are_never_saved(tiny_pipeline_dir, instance_dir, tmp_path):
    def poison(trainer, module):
        with torch.no_grad():
            next(p for p in module.unet.parameters() if p.requires_grad).fill_(float("inf"))

    module, data = make_run(tiny_pipeline_dir, instance_dir)
    trainer = make_trainer(tmp_path, AtStep(3, poison, at_end=True))
    with pytest.raises(NonFiniteLossError, match="trainable weights are non-finite at step 3"):
        trainer.fit(module, data)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in torch.load(last)["state_dict"].values())
