"""Exact resume: 2N steps straight equal N steps, then N more from the checkpoint.

The checkpoint falls mid-epoch (8 images, batch 4: two batches per epoch, N = 3), data is
augmented (random crops and flips), LoRA dropout draws from the global RNG, and validation
(with its sanity check) runs: every source of randomness a real run has.
"""

from __future__ import annotations

import pytest
import torch
from lightning import Callback, Trainer, seed_everything

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks import FaultTolerance, LastCheckpoint
from lightning_sd.data.settings import LoaderSettings

N = 3


class LossRecorder(Callback):
    """Every step's loss; stops the run after ``stop_at`` steps, as an interruption would
    (``max_steps`` would change the learning-rate schedule)."""

    def __init__(self, stop_at: int | None = None):
        self.losses: dict[int, float] = {}
        self.stop_at = stop_at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True


def fit(
    pipeline,
    instance_dir,
    ckpt_dir,
    stop_at=None,
    ckpt_path=None,
    max_steps=2 * N,
    lr_scheduler="cosine",
):
    seed_everything(0)
    module = StableDiffusionLoRA(
        str(pipeline),
        adapter=AdapterConfig(rank=2, alpha=2, dropout=0.1),
        learning_rate=1e-3,
        lr_scheduler=lr_scheduler,
        lr_warmup_steps=2,
    )
    data = DreamBoothDataModule(
        str(instance_dir),
        "a photo of sks cat",
        resolution=32,
        random_flip=True,
        loader=LoaderSettings(batch_size=4),
    )
    recorder = LossRecorder(stop_at)
    trainer = Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
        callbacks=[
            LastCheckpoint(dirpath=ckpt_dir, every_n_train_steps=N, save_last=True),
            FaultTolerance(),
            recorder,
        ],
    )
    trainer.fit(module, data, ckpt_path=ckpt_path)
    adapters = {k: v.clone() for k, v in module.state_dict().items()}
    return recorder.losses, adapters, trainer


@pytest.fixture(scope="module")
def straight(tiny_pipeline_dir, instance_dir, tmp_path_factory):
    return fit(tiny_pipeline_dir, instance_dir, tmp_path_factory.mktemp("straight"))


def test_resumed_run_matches_the_uninterrupted_one_exactly(
    straight, tiny_pipeline_dir, instance_dir, tmp_path
):
    losses, adapters, _ = straight
    first, _, trainer = fit(tiny_pipeline_dir, instance_dir, tmp_path, N)
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == N  # mid-epoch: 1 of 2 batches done
    second, resumed, trainer = fit(tiny_pipeline_dir, instance_dir, tmp_path, None, "last")
    assert trainer.global_step == 2 * N
    assert sorted(first) == list(range(1, N + 1)) and sorted(second) == list(
        range(N + 1, 2 * N + 1)
    )
    assert {**first, **second} == losses  # every step's loss, bit for bit
    assert adapters.keys() == resumed.keys() and len(adapters) > 0
    for name, tensor in adapters.items():
        assert torch.equal(tensor, resumed[name]), name


def test_checkpoint_holds_adapters_optimizer_schedule_loops_and_rng(straight, tmp_path):
    _, adapters, trainer = straight
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert set(ckpt["state_dict"]) == set(adapters)  # the frozen base is not in it
    assert all("lora_" in k for k in ckpt["state_dict"])
    assert len(ckpt["optimizer_states"][0]["state"]) == len(adapters)
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 2 * N
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"] == 2 * N
    assert len(ckpt["rng_states"]) == 1 and ckpt["rng_states"][0].dtype == torch.uint8
    # The training loader's state: epoch and batches trained (the last of epoch 2's two).
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 2, "batches": 2}
    ]


@pytest.fixture(scope="module")
def straight_constant(tiny_pipeline_dir, instance_dir, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("straight_constant")
    return fit(tiny_pipeline_dir, instance_dir, ckpt_dir, lr_scheduler="constant")


@pytest.mark.parametrize("first", [2, 4, 5], ids=["epoch_boundary", "after_a_save", "mid_epoch"])
def test_extending_a_finished_run_matches_the_longer_run_exactly(
    straight_constant, tiny_pipeline_dir, instance_dir, tmp_path, first
):
    """Train ``first`` steps to the end of ``fit``, then extend to 2N from its last.ckpt.

    Two batches an epoch, a checkpoint every N = 3 steps. The end-of-fit checkpoint is written
    in ``on_train_end``: before the fix the extension trained its second step on the wrong
    batch (Lightning carried the finished epoch's batch counters into the next epoch), and
    after a step-3 save plain ``ModelCheckpoint`` left last.ckpt at step 3.
    """
    losses, adapters, _ = straight_constant
    run = dict(lr_scheduler="constant")
    head, _, trainer = fit(tiny_pipeline_dir, instance_dir, tmp_path, max_steps=first, **run)
    ckpt = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert ckpt["global_step"] == first
    tail, extended, trainer = fit(
        tiny_pipeline_dir, instance_dir, tmp_path, ckpt_path="last", **run
    )
    assert trainer.global_step == 2 * N and sorted(tail) == list(range(first + 1, 2 * N + 1))
    assert {**head, **tail} == losses  # every step's loss, bit for bit
    for name, tensor in adapters.items():
        assert torch.equal(tensor, extended[name]), name


def test_extending_a_cosine_schedule_warns_that_it_cannot_be_exact(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    fit(tiny_pipeline_dir, instance_dir, tmp_path, max_steps=2)
    with pytest.warns(UserWarning, match="planned for 2 optimizer steps with 6: the 'cosine'"):
        fit(tiny_pipeline_dir, instance_dir, tmp_path, ckpt_path="last", max_steps=6)
