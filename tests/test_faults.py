"""Faults: a NaN stops the run with a message; SIGTERM leaves a checkpoint to resume from;
SIGKILL mid-run leaves no half-written file; checkpoints convert to LoRA files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks import FaultTolerance, NonFiniteLossError
from lightning_sd.checkpoint_io import AtomicCheckpointIO
from lightning_sd.convert import convert_checkpoint
from lightning_sd.data.settings import LoaderSettings
from lightning_sd.lora_io import read_safetensors


class AtStep(Callback):
    """Run ``action(trainer, module)`` when a training batch of ``step`` starts."""

    def __init__(self, step, action):
        self.step, self.action = step, action

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
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
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_last=True),
            FaultTolerance(),
            *callbacks,
        ],
    )


def make_run(pipeline, instance_dir):
    seed_everything(0)
    module = StableDiffusionLoRA(str(pipeline), adapter=AdapterConfig(rank=2), learning_rate=1e-3)
    data = DreamBoothDataModule(
        str(instance_dir), "a photo of sks cat", resolution=32, loader=LoaderSettings(batch_size=2)
    )
    return module, data


def poison(trainer, module):
    with torch.no_grad():
        next(p for p in module.unet.parameters() if p.requires_grad).fill_(float("nan"))


def test_non_finite_loss_stops_before_the_update_with_step_value_and_checkpoint(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    module, data = make_run(tiny_pipeline_dir, instance_dir)
    trainer = make_trainer(tmp_path, AtStep(3, poison))
    with pytest.raises(NonFiniteLossError) as caught:
        trainer.fit(module, data)
    message = str(caught.value)
    assert "non-finite loss at step 3" in message and "nan" in message
    assert str(tmp_path / "ckpt" / "last.ckpt") in message  # step 2's checkpoint
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert trainer.global_step == 3  # no optimizer step was taken on the NaN loss


def test_sigterm_saves_last_ckpt_after_the_step_and_the_run_resumes_from_it(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    module, data = make_run(tiny_pipeline_dir, instance_dir)
    term = AtStep(3, lambda trainer, module: os.kill(os.getpid(), signal.SIGTERM))
    trainer = make_trainer(tmp_path, term)
    with pytest.raises(SIGTERMException):
        trainer.fit(module, data)
    last = tmp_path / "ckpt" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # step 3 finished first
    module, data = make_run(tiny_pipeline_dir, instance_dir)
    trainer = make_trainer(tmp_path)
    trainer.fit(module, data, ckpt_path="last")
    assert trainer.global_step == 6


def test_atomic_checkpoint_io_never_exposes_a_partial_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": 2}, target)
    assert torch.load(target, weights_only=True) == {"step": 1}  # the old file, intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left


def test_convert_checkpoint_writes_the_lora_the_export_writes(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    from lightning_sd.callbacks import LoRAExport

    module, data = make_run(tiny_pipeline_dir, instance_dir)
    export = LoRAExport(dirpath=str(tmp_path / "export"))
    make_trainer(tmp_path, export, max_steps=2).fit(module, data)
    written = convert_checkpoint(str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "converted"))
    assert {Path(p).name for p in written} >= {
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
    }
    exported, _ = read_safetensors(export.written_lora)
    converted, _ = read_safetensors(tmp_path / "converted" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == converted.keys()
    assert all(torch.equal(exported[k], converted[k]) for k in exported)


def kill_when(proc: subprocess.Popen, ready, limit_s: float = 600) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` sees the state it waits for in the files.

    The poll interval only paces the checks; what is killed, and when, is decided by the state
    observed. The limit only turns a hang into a failure.
    """
    deadline = time.monotonic() + limit_s
    while not ready():
        assert proc.poll() is None, "the run ended before the state to kill it in was reached"
        assert time.monotonic() < deadline, "the state to kill the run in never came"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def global_step(path: Path) -> int:
    try:
        return torch.load(path, weights_only=True)["global_step"]
    except FileNotFoundError:
        return -1


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_from_last_finishes_with_no_truncated_file(
    tiny_fit_args, tmp_path
):
    """A real process killed with SIGKILL while it checkpoints and exports every step.

    The run is planned for far more steps than it can take, so it cannot finish first; it is
    killed once ``last.ckpt`` holds step 4 or later while a write is under way (a hidden
    temporary file exists), or at the latest once it holds step 6. The resumed run then
    continues two steps past the kill, and every file on disk must load.
    """

    def args(max_steps: int) -> list[str]:
        return [
            sys.executable, "-m", "lightning_sd.cli",
            *tiny_fit_args(tmp_path, max_steps),
            "--trainer.logger", "false",
            "--trainer.val_check_interval", "null",
            "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false",
            "--checkpoint.every_n_train_steps", "1",
            "--export.dirpath", str(tmp_path / "lora"),
            "--export.every_n_steps", "1",
        ]  # fmt: skip

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    last = tmp_path / "checkpoints" / "last.ckpt"

    def mid_write() -> bool:
        step = global_step(last)
        writing = any(p.name.startswith(".") for p in tmp_path.rglob("*.tmp"))
        return step >= 6 or (step >= 4 and writing)

    proc = subprocess.Popen(
        args(100_000), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when(proc, mid_write)
    killed_at = global_step(last)
    assert 4 <= killed_at
    done = subprocess.run(
        [*args(killed_at + 2), "--ckpt_path", "last"], env=env, capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert global_step(last) == killed_at + 2
    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for path in files:
        if path.suffix == ".ckpt":
            torch.load(path, weights_only=True)
        elif path.suffix == ".safetensors":
            read_safetensors(path)
    assert any(p.suffix == ".safetensors" for p in files)
