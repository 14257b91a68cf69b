"""Harmful values refused where they are given, in one sentence (issue 19, items 4 and 6):
alpha 0, a negative learning rate, sides that are not a multiple of the model's downsampling,
rank/batch size 0, a resume with another rank or alpha."""

from __future__ import annotations

import pytest
from lightning import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_sd import AdapterConfig, CaptionDataModule, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.data.settings import LoaderSettings


def trainer(root, max_steps=1, **kwargs):
    return Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_last=True)],
        **kwargs,
    )


def data(instance_dir, resolution=32):
    return DreamBoothDataModule(
        str(instance_dir),
        "a photo of sks cat",
        resolution=resolution,
        loader=LoaderSettings(batch_size=2),
    )


def test_alpha_must_be_positive():
    """Before: alpha 0 exported a LoRA that changes nothing."""
    with pytest.raises(ValueError, match="adapter alpha must be > 0 .* got 0"):
        AdapterConfig(alpha=0)
    with pytest.raises(ValueError, match="got -2"):
        AdapterConfig(alpha=-2)
    assert AdapterConfig(rank=4).lora_alpha == 4.0


@pytest.mark.parametrize("name", ["learning_rate", "text_encoder_lr", "text_encoder_2_lr"])
def test_learning_rates_must_be_finite_and_not_negative(name):
    """Before: learning_rate -1 trained (away from the data)."""
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got -1"):
        StableDiffusionLoRA("unused", **{name: -1.0})
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got nan"):
        StableDiffusionLoRA("unused", **{name: float("nan")})


def test_counts_must_be_at_least_one(tmp_path):
    """Before: rank 0 and batch size 0 failed deep in a traceback."""
    with pytest.raises(ValueError, match="adapter rank must be >= 1, got 0"):
        AdapterConfig(rank=0)
    with pytest.raises(ValueError, match="data batch_size must be >= 1, got 0"):
        DreamBoothDataModule(str(tmp_path), "a photo", loader=LoaderSettings(batch_size=0))
    with pytest.raises(ValueError, match="data resolution must be >= 1, got 0"):
        CaptionDataModule(source={"class_path": "unused"}, resolution=0)


@pytest.mark.parametrize("resolution", [30, 31])
def test_sides_not_a_multiple_of_the_downsampling_are_refused(
    tiny_pipeline_dir, instance_dir, tmp_path, resolution
):
    """Before: 30 and 31 px trained (the tiny VAE halves, its UNet halves once more: 4)."""
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    with pytest.raises(ValueError) as caught:
        trainer(tmp_path).fit(module, data(instance_dir, resolution))
    assert str(caught.value) == (
        f"training images of {resolution}x{resolution} px: each side must be a multiple of 4 "
        "(the VAE's downsampling times the UNet's); set the data's resolution to e.g. "
        f"{round(resolution / 4) * 4}"
    )


@pytest.mark.parametrize(
    ("adapter", "expected"),
    [
        (
            AdapterConfig(rank=8, alpha=4),
            "cannot resume: the checkpoint's adapter differs (rank 4 in the checkpoint, 8 "
            "configured). Configure the checkpoint's values (e.g. --model.adapter.rank) or "
            "start a new run",
        ),
        (
            AdapterConfig(rank=4, alpha=8),
            "cannot resume: the checkpoint's adapter differs (alpha 4.0 in the checkpoint, 8.0 "
            "configured). Configure the checkpoint's values (e.g. --model.adapter.alpha) or "
            "start a new run",
        ),
    ],
    ids=["rank", "alpha"],
)
def test_a_resume_with_another_rank_or_alpha_is_one_sentence(
    tiny_pipeline_dir, instance_dir, tmp_path, adapter, expected
):
    """Before: another alpha was accepted; another rank printed 64 ``size mismatch`` lines."""
    seed_everything(0)
    first = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, alpha=4))
    trainer(tmp_path).fit(first, data(instance_dir))
    again = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=adapter)
    with pytest.raises(ValueError) as caught:
        trainer(tmp_path, max_steps=2).fit(again, data(instance_dir), ckpt_path="last")
    assert str(caught.value) == expected
