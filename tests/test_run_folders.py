"""One run per folder, resume into last.ckpt, SIGTERM's exit status, leftovers, a full disk
(issue 19, items 1 and 6)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning import Callback

from lightning_sd import checkpoint_io
from lightning_sd.callbacks.fault_tolerance import EXIT_SIGTERM
from lightning_sd.checkpoint_io import AtomicCheckpointIO
from lightning_sd.cli import main
from lightning_sd.lora_io import read_safetensors, write_safetensors
from lightning_sd.run_dir import FolderInUseError

ROOT = Path(__file__).parents[1]


def fit_args(pipeline, instance_dir, root, *extra):
    return [
        "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--model.pretrained_model_name_or_path", str(pipeline),
        "--data.instance_data_dir", str(instance_dir),
        "--trainer.default_root_dir", str(root),
        "--trainer.val_check_interval", "null",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.max_steps", "2",
        *extra,
    ]  # fmt: skip


class TermAtStep2(Callback):
    """Sends this process SIGTERM when the batch of step 2 starts (a pre-emption notice)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run lock on ``folder``, as a live run does."""
    code = (
        "import sys; from lightning_sd.run_dir import FolderLock; "
        f"FolderLock({str(folder)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"  # blocks until the lock is held
    return proc


def test_a_second_run_into_a_live_runs_folder_is_refused_before_writing(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    """Before: two concurrent runs mixed config, LoRA and checkpoints in one version_0."""
    other = hold_lock(tmp_path / "checkpoints")
    try:
        with pytest.raises(FolderInUseError) as caught:
            main(fit_args(tiny_pipeline_dir, instance_dir, tmp_path))
    finally:
        other.stdin.close()
        other.wait(timeout=60)
    message = str(caught.value)
    assert f"another run is writing into {tmp_path / 'checkpoints'}" in message
    assert f'"pid": {other.pid}' in message
    assert not list(tmp_path.rglob("config.yaml")) and not list(tmp_path.rglob("*.safetensors"))


def test_a_new_run_into_a_finished_runs_folder_is_refused_and_its_files_survive(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    """Before: run B (rank 8) overwrote run A's (rank 4) LoRA and forked last-v1.ckpt."""
    main(fit_args(tiny_pipeline_dir, instance_dir, tmp_path, "--trainer.logger", "false"))
    config = (tmp_path / "config.yaml").read_text()
    lora = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    before = read_safetensors(lora)[0]
    with pytest.raises(FolderInUseError) as caught:
        main(
            fit_args(
                tiny_pipeline_dir, instance_dir, tmp_path,
                "--trainer.logger", "false", "--model.adapter.rank", "8",
            )
        )  # fmt: skip
    assert f"{tmp_path / 'checkpoints'} holds the checkpoints of an earlier run" in str(
        caught.value
    )
    assert "--ckpt_path last" in str(caught.value)
    assert (tmp_path / "config.yaml").read_text() == config
    after = read_safetensors(lora)[0]
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["last.ckpt"]


def test_sigterm_exits_143_and_the_resume_updates_last_ckpt_and_clears_leftovers(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    """Before: exit status 0 after SIGTERM; the resume wrote last-v1.ckpt; .tmp files stayed."""
    quiet = ["--trainer.logger", "false"]  # log dir = root: the LoRA goes to root/lora
    term = [*quiet, "--trainer.max_steps", "4", "--trainer.callbacks+=test_run_folders.TermAtStep2"]
    with pytest.raises(SystemExit) as stopped:
        main(fit_args(tiny_pipeline_dir, instance_dir, tmp_path, *term))
    assert stopped.value.code == EXIT_SIGTERM == 143
    folder = tmp_path / "checkpoints"
    last = folder / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    # What a SIGKILL mid-write leaves: a checkpoint's temporary file, an export's staging.
    leftovers = [folder / ".last.ckpt.k1ll3d.tmp", tmp_path / "lora" / ".README.md.x.tmp"]
    for path in leftovers:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half a file")
    (tmp_path / "lora" / ".staging-k1ll3d").mkdir()
    resume = [*quiet, "--trainer.max_steps", "5", "--ckpt_path", "last"]
    main(fit_args(tiny_pipeline_dir, instance_dir, tmp_path, *resume))
    assert torch.load(last, weights_only=True)["global_step"] == 5
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["last.ckpt"]
    assert not any(p.exists() for p in leftovers)
    assert [p.name for p in (tmp_path / "lora").iterdir() if p.name.startswith(".")] == []


def test_a_full_disk_says_so_naming_the_file_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    """Before: RuntimeError: [enforce fail at inline_container.cc:672]. /dev/full fails every
    write with ENOSPC, as a full filesystem does."""
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1}, target)

    def full_disk(fd):
        os.close(fd)
        return open("/dev/full", "wb")

    monkeypatch.setattr(checkpoint_io, "_open", full_disk)
    with pytest.raises(OSError) as caught:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(100_000)}, target)
    assert caught.value.errno == errno.ENOSPC
    assert f"no space left on device while writing the checkpoint {target}" in str(caught.value)
    assert "the previous last.ckpt is intact" in str(caught.value)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_while_writing_a_lora_file_says_so(tmp_path, monkeypatch):
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    target = tmp_path / "pytorch_lora_weights.safetensors"
    with pytest.raises(OSError, match=f"no space left on device while writing the file {target}"):
        write_safetensors(target, {"a": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []
