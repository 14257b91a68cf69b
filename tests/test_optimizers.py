"""Optimizers: each builds over the module's groups and takes a step; configs round-trip;
schedules follow their formulas."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from lightning.pytorch.cli import OptimizerCallable

from lightning_sd import StableDiffusionLoRA
from lightning_sd.cli import build_cli
from lightning_sd.optim import build_optimizer, lr_lambda
from lightning_sd.serialization import from_config, to_config


@pytest.fixture(scope="module")
def module(tiny_pipeline_dir):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    module.configure_model()
    return module


def take_step(optimizer, groups):
    params = [p for g in groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, params, strict=True)]
    with torch.no_grad():
        for b, p in zip(before, params, strict=True):
            p.copy_(b)  # leave the shared module as it was
    return sum(changed) / len(changed)


def factories():
    import bitsandbytes as bnb
    from prodigyopt import Prodigy

    return {
        # min_8bit_size: tiny tensors get 8-bit states too (the default 4096 elements skips them).
        "adamw8bit": functools.partial(bnb.optim.AdamW8bit, weight_decay=1e-2, min_8bit_size=16),
        "prodigy": functools.partial(Prodigy, safeguard_warmup=True, use_bias_correction=True),
    }


def test_default_is_fused_adamw_with_per_group_learning_rates(module):
    groups = module.param_groups()
    optimizer = build_optimizer(None, groups)
    assert type(optimizer) is torch.optim.AdamW and optimizer.defaults["fused"] is True
    assert optimizer.defaults["weight_decay"] == 1e-2
    assert [g["lr"] for g in optimizer.param_groups] == [module.hparams.learning_rate]
    assert take_step(optimizer, groups) == 1.0


@pytest.mark.parametrize("name", ["adamw8bit", "prodigy"])
def test_optional_optimizers_build_and_step(module, name):
    groups = module.param_groups()
    if name == "prodigy":  # Prodigy estimates the step size; its lr is a multiplier, 1.0
        groups = [{**g, "lr": 1.0} for g in groups]
    optimizer = build_optimizer(factories()[name], groups)
    assert take_step(optimizer, groups) == 1.0
    if name == "adamw8bit":  # 8-bit states for the large tensors
        big = max((p for g in groups for p in g["params"]), key=torch.numel)
        assert optimizer.state[big]["state1"].dtype == torch.uint8
    else:
        assert optimizer.param_groups[0]["safeguard_warmup"] is True


@pytest.mark.slow
def test_deepspeed_cpu_adam_is_the_default_under_optimizer_offload(module):
    """DeepSpeed compiles its C++ AdamW on first use (about two minutes on two cores)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = module.param_groups()
    optimizer = build_optimizer(None, groups, cpu_offload=True)
    assert type(optimizer) is DeepSpeedCPUAdam and optimizer.adam_w_mode
    assert take_step(optimizer, groups) == 1.0


def test_optimizer_configs_round_trip_through_hparams_and_yaml(module, tiny_pipeline_dir):
    factory = factories()["prodigy"]
    config = to_config(factory)
    assert config == {
        "class_path": "prodigyopt.prodigy.Prodigy",
        "init_args": {"safeguard_warmup": True, "use_bias_correction": True},
    }
    rebuilt = from_config(config, OptimizerCallable)
    assert rebuilt.func is factory.func and rebuilt.keywords == factory.keywords
    # betas is a tuple in Python and a list in YAML; the optimizer takes either.
    adam = to_config(functools.partial(torch.optim.AdamW, betas=(0.8, 0.9)))
    assert adam["init_args"] == {"betas": [0.8, 0.9]}
    params = [torch.nn.Parameter(torch.ones(2))]
    assert from_config(adam, OptimizerCallable)(params).param_groups[0]["betas"] == (0.8, 0.9)
    # From YAML: LightningCLI's partial; stored in hparams as plain data, rebuilt on load.
    cli = build_cli(
        [
            "--config", "configs/tiny.yaml",
            "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
            "--model.optimizer", "bitsandbytes.optim.AdamW8bit",
            "--model.optimizer.weight_decay", "0.05",
        ],
        run=False,
    )  # fmt: skip
    stored = cli.model.hparams.optimizer
    assert stored["class_path"] == "bitsandbytes.optim.adamw.AdamW8bit"
    assert stored["init_args"]["weight_decay"] == 0.05
    again = StableDiffusionLoRA(**{k: v for k, v in cli.model.hparams.items() if k[0] != "_"})
    assert again.hparams.optimizer == stored
    with pytest.raises(TypeError, match="optimizer class"):
        to_config(lambda params: torch.optim.SGD(params, lr=1))


def test_schedules_follow_their_formulas():
    total, warmup = 10, 2
    for step in range(total):
        progress = (step - warmup) / (total - warmup)
        expected = {
            "constant": 1.0,
            "linear": 1 - progress,
            "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
            "polynomial": (1 - progress) ** 2,
        }
        for name, value in expected.items():
            factor = lr_lambda(name, warmup, total, power=2.0)(step)
            assert factor == pytest.approx((step + 1) / warmup if step < warmup else value)
    assert lr_lambda("constant", 0, total, stop_step=4)(4) == 0.0  # pivotal tokens stop


def test_accumulation_and_clipping_are_the_trainers(tiny_pipeline_dir, instance_dir):
    """``accumulate_grad_batches`` and ``gradient_clip_val`` act on the module's optimizer."""
    from lightning import Trainer

    from lightning_sd import DreamBoothDataModule

    class Probe(StableDiffusionLoRA):
        norms: list[float] = []

        def configure_gradient_clipping(self, optimizer, *args, **kwargs):
            super().configure_gradient_clipping(optimizer, *args, **kwargs)
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            self.norms.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads if g is not None]
            ))))  # fmt: skip

    module = Probe(str(tiny_pipeline_dir), learning_rate=1e-3)
    data = DreamBoothDataModule(str(instance_dir), "a photo of sks cat", resolution=32)
    trainer = Trainer(
        max_steps=2, accumulate_grad_batches=3, gradient_clip_val=1e-3, accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6  # 3 per step
    assert len(module.norms) == 2 and all(n <= 1e-3 * 1.0001 for n in module.norms)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 2
