"""Sample grids: the right files at the right steps, to loggers, and no effect on training."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image, ImageFont

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks.validation_sampling import ValidationSampling, log_grid
from lightning_sd.data.settings import LoaderSettings
from lightning_sd.metrics.samples import undisturbed
from lightning_sd.sampling import Euler
from lightning_sd.sampling_spec import SamplingSpec, sample_grid

PROMPTS = ["a photo of sks cat", "a dog"]
SEEDS = [0, 1, 2]
CELL = 40


class LossRecorder(Callback):
    """Every training loss, exactly as the optimizer saw it."""

    def __init__(self):
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())


def fit(pipeline, instance_dir, root, callbacks, logger=False):
    """Four steps of LoRA on the tiny pipeline; returns the module and the recorded losses."""
    seed_everything(0)
    module = StableDiffusionLoRA(
        str(pipeline), adapter=AdapterConfig(rank=4, alpha=8), learning_rate=1e-2
    )
    data = DreamBoothDataModule(
        str(instance_dir),
        "a photo of sks cat",
        resolution=32,
        random_flip=True,
        loader=LoaderSettings(batch_size=2),
    )
    recorder = LossRecorder()
    trainer = Trainer(
        max_steps=4,
        default_root_dir=str(root),
        logger=logger,
        callbacks=[*callbacks, recorder],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return module, recorder.losses


@pytest.fixture(scope="module")
def runs(tiny_pipeline_dir, instance_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    _, plain = fit(tiny_pipeline_dir, instance_dir, root / "plain", [])
    sampling = ValidationSampling(
        SamplingSpec(PROMPTS, SEEDS, steps=3, sampler=Euler()), every_n_steps=2,
        before_training=True, cell_size=CELL,
    )  # fmt: skip
    loggers = [TensorBoardLogger(root / "logs"), CSVLogger(root / "logs")]
    module, losses = fit(tiny_pipeline_dir, instance_dir, root, [sampling], loggers)
    return SimpleNamespace(plain=plain, losses=losses, sampling=sampling, module=module)


def test_training_losses_are_bit_identical_with_sampling(runs):
    assert len(runs.losses) == len(runs.plain) == 4
    for with_cb, without in zip(runs.losses, runs.plain, strict=True):
        assert torch.equal(with_cb, without)


def test_grids_at_steps_0_2_4_with_the_computed_size(runs):
    names = [p.name for p in runs.sampling.written]
    assert names == ["step_000000.png", "step_000002.png", "step_000004.png"]
    assert all(
        p.parent.name == "samples" and p.parent.parent.name == "version_0"
        for p in runs.sampling.written
    )
    font = ImageFont.load_default()
    label_width = 8 + max(int(font.getlength(p)) for p in PROMPTS)
    pad, caption = 2, 16  # grid.image_grid's spacing and column-caption band
    expected = (
        label_width + len(SEEDS) * (CELL + pad) + pad,
        caption + len(PROMPTS) * (CELL + pad) + pad,
    )
    for path in runs.sampling.written:
        assert Image.open(path).size == expected


def test_the_baseline_grid_shows_the_base_model_samples(runs, tiny_pipeline_dir):
    """LoRA starts as a no-op (B = 0), so step 0 must be what the untouched model samples."""
    base = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, alpha=8))
    base.configure_model()
    base.eval()
    # The callback samples each row as one batch; so does this, for bit-equal kernels.
    expected = base.generate(PROMPTS[1:] * len(SEEDS), SEEDS, steps=3, sampler=Euler())[0]
    expected = (expected * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(expected).resize((CELL, CELL), Image.NEAREST))
    grid = np.asarray(Image.open(runs.sampling.written[0]))
    font = ImageFont.load_default()
    left, top = 8 + max(int(font.getlength(p)) for p in PROMPTS) + 2, 16 + 2 + (CELL + 2)
    cell = grid[top : top + CELL, left : left + CELL]  # row "a dog", column seed 0
    assert np.array_equal(cell, expected)


def test_tensorboard_holds_one_image_per_event(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log_dir = runs.sampling.written[0].parent.parent
    events = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [0, 2, 4]


def test_log_grid_uses_wandb_log_image_and_names_loggers_without_images(tmp_path):
    calls = []

    class RecordingWandb(WandbLogger):
        def log_image(self, key, images, step=None, **kwargs):
            calls.append((key, images, step, kwargs))

    grid = Image.new("RGB", (8, 4))
    loggers = [RecordingWandb(offline=True, save_dir=str(tmp_path)), CSVLogger(tmp_path)]
    skipped = log_grid(loggers, grid, "samples", 7, "rows a | b")
    assert skipped == ["CSVLogger"]
    assert calls == [("samples", [grid], 7, {"caption": ["rows a | b"]})]


def test_other_ranks_do_not_sample(tmp_path):
    sampling = ValidationSampling(SamplingSpec(["x"], [0]), dirpath=str(tmp_path))
    trainer = SimpleNamespace(is_global_zero=False, global_step=2)
    assert sampling.sample(trainer, pl_module=None) is None
    assert not any(tmp_path.iterdir())


def test_undisturbed_restores_modes_and_every_rng():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5), torch.nn.Linear(2, 2))
    net.train()
    net[2].eval()  # a frozen part left in eval mode on purpose must stay so
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    reference = (torch.rand(1), random.random(), np.random.rand())
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    with undisturbed(net):
        assert not any(m.training for m in net.modules())
        torch.rand(5), random.random(), np.random.rand(5)
    assert (torch.rand(1), random.random(), np.random.rand()) == reference
    assert [m.training for m in net.modules()] == [True, True, True, False]


def test_negative_prompts_one_or_one_per_prompt():
    assert SamplingSpec(["a", "b"], negative_prompt="blurry").negative_prompts == [
        "blurry",
        "blurry",
    ]
    assert SamplingSpec(["a", "b"], negative_prompt=["x", "y"]).negative_prompts == ["x", "y"]
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        SamplingSpec(["a", "b", "c"], negative_prompt=["x", "y"])
    with pytest.raises(ValueError, match="at least one prompt and one seed"):
        SamplingSpec(["a"], seeds=[])
    with pytest.raises(ValueError, match="steps must be at least 1"):
        SamplingSpec(["a"], steps=0)


def test_sample_grid_samples_row_by_row_with_the_spec_settings():
    """The one grid loop: a batch per prompt, its seeds, its negative prompt, the settings."""
    calls = []

    def fake(prompts, seeds, **settings):
        calls.append((prompts, seeds, settings))
        return torch.full((len(seeds), 3, 2, 2), float(len(calls)))

    sampler = Euler()
    spec = SamplingSpec(["a", "b"], [7, 8, 9], ["na", "nb"], 3, 2.5, sampler, 64)
    images = sample_grid(spec, fake)
    settings = dict(steps=3, guidance_scale=2.5, resolution=64, sampler=sampler)
    assert calls == [
        (["a"] * 3, [7, 8, 9], {**settings, "negative_prompt": "na"}),
        (["b"] * 3, [7, 8, 9], {**settings, "negative_prompt": "nb"}),
    ]
    assert images[:, 0, 0, 0].tolist() == [1, 1, 1, 2, 2, 2]  # row-major: prompt i, seed j
    assert spec.image_prompts() == ["a", "a", "a", "b", "b", "b"] and spec.size == 6


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ddp_ranks_finish_and_only_rank_0_samples(
    tiny_pipeline_dir, instance_dir, tmp_path, monkeypatch
):
    """Sampling and evaluation on rank 0 while rank 1 trains on: no collective, no deadlock."""
    # An earlier ddp_spawn in this process left its MASTER_PORT in os.environ; take a fresh one.
    monkeypatch.delenv("MASTER_PORT", raising=False)
    from lightning_sd.callbacks.evaluation import Evaluation
    from lightning_sd.metrics import CLIPMetrics
    from lightning_sd.metrics.tiny import write_tiny_clip

    clip = write_tiny_clip(tmp_path / "clip")
    sampling = ValidationSampling(
        SamplingSpec(PROMPTS, SEEDS, steps=2), every_n_steps=1, cell_size=CELL
    )
    evaluation = Evaluation(
        [CLIPMetrics(f"local-dir:{clip}", None)],
        SamplingSpec(PROMPTS, [0], steps=2),
        every_n_steps=1,
    )
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4))
    data = DreamBoothDataModule(
        str(instance_dir), "a photo of sks cat", resolution=32, loader=LoaderSettings(batch_size=2)
    )
    trainer = Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=2,
        default_root_dir=str(tmp_path),
        logger=CSVLogger(tmp_path),
        callbacks=[sampling, evaluation],
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    grids = sorted(p.name for p in tmp_path.rglob("step_*.png"))
    assert grids == ["step_000000.png", "step_000001.png", "step_000002.png"]
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "eval/clip_score" in metrics
