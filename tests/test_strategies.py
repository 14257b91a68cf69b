"""Strategies: every configs/strategy YAML builds its strategy; DeepSpeed's checkpoint filter
and param groups on CPU; a real two-process DDP run (gloo); a GPU fit/save/resume/convert."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy

from lightning_sd import StableDiffusionLoRA
from lightning_sd.cli import build_cli
from lightning_sd.lora_io import read_safetensors

ROOT = Path(__file__).parents[1]
STRATEGIES = ROOT / "configs" / "strategy"


def cli_for(strategy: str, pipeline, tmp_path, *extra):
    return build_cli(
        [
            "--config", str(ROOT / "configs" / "tiny.yaml"),
            "--config", str(STRATEGIES / f"{strategy}.yaml"),
            "--model.pretrained_model_name_or_path", str(pipeline),
            "--trainer.default_root_dir", str(tmp_path),
            *extra,
        ],
        run=False,
    )  # fmt: skip


def test_single_and_ddp_configs_build_their_strategies(tiny_pipeline_dir, tmp_path):
    cli = cli_for("single", tiny_pipeline_dir, tmp_path)
    assert cli.trainer.num_devices == 1
    cli = cli_for(
        "ddp", tiny_pipeline_dir, tmp_path, "--trainer.accelerator", "cpu", "--trainer.devices", "2"
    )
    assert isinstance(cli.trainer.strategy, DDPStrategy)
    kwargs = cli.trainer.strategy._ddp_kwargs
    assert kwargs["find_unused_parameters"] is False and kwargs["gradient_as_bucket_view"] is True


def test_deepspeed_config_builds_stage2_offload_and_filters_checkpoints(
    tiny_pipeline_dir, tmp_path
):
    cli = cli_for("deepspeed_stage2_offload", tiny_pipeline_dir, tmp_path,
                  "--trainer.accelerator", "cpu", "--trainer.devices", "1",
                  "--trainer.precision", "32-true")  # fmt: skip
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"]["device"] == "cpu"
    assert strategy.exclude_frozen_parameters
    module = cli.model
    module.trainer = cli.trainer
    module.configure_model()
    assert module._cpu_offload()  # -> DeepSpeedCPUAdam by default (test_optimizers)
    groups = module.param_groups()
    assert groups and all(g["params"] for g in groups)  # DeepSpeed rejects empty groups
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    # DeepSpeed (and FSDP) call state_dict with destination/prefix, and read the destination.
    destination = collections.OrderedDict()
    module.state_dict(destination=destination, prefix="module.", keep_vars=False)
    assert set(destination) == {"module." + n for n in trainable}
    parent = torch.nn.Module()
    parent.add_module("_forward_module", module)
    assert set(parent.state_dict()) == {"_forward_module." + n for n in trainable}


def test_fsdp_config_wraps_blocks_the_model_has(tiny_pipeline_dir):
    """Lightning's FSDP needs CUDA to build a Trainer: the strategy is checked on its own."""
    config = yaml.safe_load((STRATEGIES / "fsdp.yaml").read_text())["trainer"]["strategy"]
    parser = ArgumentParser()
    parser.add_class_arguments(FSDPStrategy, "strategy")
    strategy = parser.instantiate(parser.parse_object({"strategy": config["init_args"]})).strategy
    assert strategy.kwargs["use_orig_params"] is True  # frozen base + adapters in one shard
    assert strategy._state_dict_type == "full"
    classes = strategy.kwargs["auto_wrap_policy"]._module_classes
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    module.configure_model()
    for cls in classes:
        assert any(isinstance(m, cls) for m in module.modules()), cls


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_adapters_and_export_once(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    """``ddp`` (not spawn) through the CLI, as a user launches it, gloo on two processes."""
    reports = tmp_path / "reports"
    class_dir = tmp_path / "class"
    args = [
        sys.executable, "-m", "lightning_sd.cli", "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--config", str(STRATEGIES / "ddp.yaml"),
        "--trainer.accelerator", "cpu",
        "--trainer.devices", "2",
        "--trainer.max_steps", "4",
        "--trainer.val_check_interval", "null",
        "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--data.instance_data_dir", str(instance_dir),
        "--data.loader.batch_size", "2",
        "--data.class_data_dir", str(class_dir),
        "--data.class_prompt", "a photo of a cat",
        "--data.num_class_images", "3",
        "--data.class_generation_steps", "2",
        "--export.dirpath", str(tmp_path / "lora"),
        "--checkpoint.every_n_train_steps", "2",
        "--trainer.callbacks+=ddp_probe.RankReport",
        "--trainer.callbacks.folder", str(reports),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((reports / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["pid"] != ranks[1]["pid"]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 4
    assert ranks[0]["tensors"] > 0 and ranks[0]["adapters"] == ranks[1]["adapters"]
    assert [r["exported"] for r in ranks] == [True, False]  # rank 0 writes, rank 1 waits
    assert done.stderr.count("generated 3 class images") == 1  # prepare_data: one process
    assert len(list(class_dir.glob("*.png"))) == 3
    tensors, _ = read_safetensors(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert tensors
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    states = ckpt["rng_states"]  # gathered from both ranks, which draw different noise
    assert ckpt["global_step"] == 4 and len(states) == 2 and not torch.equal(*states)


@pytest.mark.gpu
def test_deepspeed_fit_save_resume_convert_on_gpu(tiny_pipeline_dir, instance_dir, tmp_path):
    """5 steps under DeepSpeed stage 2 + CPU offload, resumed to 10, converted to LoRA files."""
    from lightning_sd.convert import convert_checkpoint

    common = [
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--config", str(STRATEGIES / "deepspeed_stage2_offload.yaml"),
        "--trainer.devices", "1",
        "--trainer.val_check_interval", "null",
        "--trainer.limit_val_batches", "0",
        "--trainer.default_root_dir", str(tmp_path),
        "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--data.instance_data_dir", str(instance_dir),
        "--checkpoint.every_n_train_steps", "5",
    ]  # fmt: skip
    build_cli(["fit", *common, "--trainer.max_steps", "5"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.is_dir()  # a DeepSpeed checkpoint folder
    size = sum(p.stat().st_size for p in last.rglob("*") if p.is_file())
    print(f"DeepSpeed checkpoint: {size / 1e6:.2f} MB")
    cli = build_cli(["fit", *common, "--trainer.max_steps", "10", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 10
    written = convert_checkpoint(str(last), str(tmp_path / "converted"))
    tensors, _ = read_safetensors(next(p for p in written if p.endswith("weights.safetensors")))
    assert tensors
