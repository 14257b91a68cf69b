"""What `lightning-sd fit` prints: progress and our own lines, none of the known noise."""

import csv
import os
import subprocess
import sys

import pytest

NOISE = [
    "not recommended to provide both",  # LightningCLI: args and sys.argv
    "module(s) in eval mode at the start of training",  # the frozen base, by design
    "/-2",  # the rich bar's epoch display in step-based runs
    "Tip:",  # litlogger / litmodels adverts
    "gemm_4bit_forward",  # bitsandbytes' optional kernel download
    "Setting accelerator to CPU",  # DeepSpeed, imported by accelerate
    "LeafSpec",  # Lightning's pytree deprecation
    "smaller than the logging interval",
]


@pytest.fixture(scope="module")
def fit_console(tiny_fit_args, tmp_path_factory):
    root = tmp_path_factory.mktemp("console")
    args = [
        sys.executable, "-m", "lightning_sd.cli",
        *tiny_fit_args(root, 6, "--trainer.log_every_n_steps", "3"),
        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.save_dir", str(root),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr, root


@pytest.mark.parametrize("noise", NOISE)
def test_fit_console_has_none_of_the_known_noise(fit_console, noise):
    console, _ = fit_console
    assert noise not in console


def test_fit_console_shows_step_progress_and_the_lora_path(fit_console):
    console, _ = fit_console
    assert "Training steps" in console and "6/6" in console
    assert "LoRA weights written to" in console


def test_two_batch_epochs_still_log_every_n_steps(fit_console):
    """The silenced logging-interval warning is a false alarm: 6 steps, 3 epochs, 2 rows."""
    _, root = fit_console
    (metrics,) = root.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.open()) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [2, 5]
