"""Each objective config trains the tiny pipeline: finite losses, gradients on adapters only."""

from pathlib import Path

import pytest
import torch

from lightning_sd.cli import build_cli, main

CONFIGS = Path(__file__).parents[1] / "configs"
OBJECTIVES = sorted((CONFIGS / "objective").glob("*.yaml"))


@pytest.mark.parametrize("config", OBJECTIVES, ids=lambda p: p.stem)
def test_objective_config_trains_adapters_only(config, tiny_pipeline_dir, instance_dir, tmp_path):
    cli = build_cli(
        [
            "--config", str(CONFIGS / "tiny.yaml"),
            "--config", str(config),
            "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
            "--trainer.default_root_dir", str(tmp_path),
        ],
        run=False,
    )  # fmt: skip
    module = cli.model
    module.configure_model()
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.rand(4, 3, 32, 32) * 2 - 1,
        "prompt": ["a photo of sks cat"] * 4,
        "loss_weight": torch.ones(4),
    }
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        loss = module.training_step(batch, 0)
        assert torch.isfinite(loss) and loss > 0
        loss.backward()
        for name, p in module.named_parameters():
            if p.requires_grad:
                assert "lora_" in name
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
            else:
                assert p.grad is None, name
        optimizer.step()
        optimizer.zero_grad()
    lora_b = [p for n, p in module.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)  # B left its zero init


def test_fit_with_edm_min_snr_from_the_command_line(tiny_pipeline_dir, instance_dir, tmp_path):
    main(
        [
            "fit",
            "--config", str(CONFIGS / "tiny.yaml"),
            "--config", str(CONFIGS / "objective" / "edm_min_snr.yaml"),
            "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
            "--data.instance_data_dir", str(instance_dir),
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "3",
            "--trainer.val_check_interval", "3",
        ]
    )  # fmt: skip
    assert list(tmp_path.rglob("pytorch_lora_weights.safetensors"))
