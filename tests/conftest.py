"""Session-wide fixtures: tiny pipelines (SD1.x, SDXL, EDM-native SDXL, SD3.5 Medium) and one
instance set, built offline, shared by all."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory):
    from lightning_sd.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "tiny", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    """SDXL architecture: two text encoders, pooled + time-id conditioning, Euler schedule."""
    from lightning_sd.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("pipelines") / "sdxl", "tiny-sdxl", seed=0)


@pytest.fixture(scope="session")
def tiny_playground_dir(tmp_path_factory):
    """The SDXL architecture with an EDM-native schedule, standing in for Playground v2.5."""
    from lightning_sd.tiny import build_tiny_pipeline

    out = tmp_path_factory.mktemp("pipelines") / "playground"
    return build_tiny_pipeline(out, "tiny-playground", seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """SD3.5 Medium's architecture (MMDiT with attn2, two CLIPs, T5), through the CLI's preset."""
    from lightning_sd.cli import main

    out = tmp_path_factory.mktemp("pipelines") / "sd3"
    main(["tiny-pipeline", str(out), "--preset", "tiny-sd3"])
    return out


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory):
    """Eight real photo crops (scikit-image's cat), as a DreamBooth instance folder."""
    from lightning_sd.demo import write_instance_photos

    return write_instance_photos(tmp_path_factory.mktemp("instance"), count=8, side=48)


@pytest.fixture(scope="session")
def tiny_fit_args(tiny_pipeline_dir, instance_dir):
    """``lightning-sd fit`` arguments: configs/tiny.yaml on the session's pipeline and photos."""
    config = Path(__file__).parents[1] / "configs" / "tiny.yaml"

    def args(root, max_steps: int, *extra: str) -> list[str]:
        return [
            "fit", "--config", str(config),
            "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
            "--data.instance_data_dir", str(instance_dir),
            "--trainer.default_root_dir", str(root),
            "--trainer.max_steps", str(max_steps),
            *extra,
        ]  # fmt: skip

    return args


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
