"""The CLI: every shipped YAML parses, and fit -> export -> validate --ckpt_path runs."""

from pathlib import Path

import pytest
import torch

from lightning_sd.cli import build_cli, main
from lightning_sd.lora_io import read_safetensors
from lightning_sd.objectives import DiffusionObjective

# Strategy configs ask for GPUs: tests/test_strategies.py builds them with CPU overrides.
CONFIGS = sorted(
    p for p in Path(__file__).parents[1].joinpath("configs").rglob("*.yaml")
    if p.parent.name != "strategy"
)  # fmt: skip
BASE = Path(__file__).parents[1] / "configs" / "tiny.yaml"


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(BASE.parent)))
def test_every_config_parses_and_instantiates(config, tmp_path):
    """Each YAML composes with the tiny recipe (a second --config) and builds its objects."""
    cli = build_cli(
        [
            "--config",
            str(BASE),
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(tmp_path),
        ],
        run=False,
    )
    # A config that names an objective builds it; otherwise the base's scheduler chooses it
    # when the model is loaded (configure_model).
    if "objective:" in config.read_text():
        assert isinstance(cli.model.objective, DiffusionObjective)
    else:
        assert cli.model.objective is None
    assert cli.datamodule is not None and cli.trainer.max_steps > 0


def test_fit_exports_then_validate_from_checkpoint(
    tiny_pipeline_dir, instance_dir, tmp_path, caplog
):
    common = [
        "--config", str(BASE),
        "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--data.instance_data_dir", str(instance_dir),
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2"])
    lora = tmp_path / "lightning_logs" / "version_0" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.is_file()
    assert f"LoRA weights written to {lora}" in caplog.text
    ckpt = sorted(tmp_path.rglob("*.ckpt"))[-1]
    first = build_cli(["validate", *common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    again = build_cli(["validate", *common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    assert float(first["val/loss"]) == float(again["val/loss"]) > 0


@pytest.fixture(scope="module")
def cli_args(tiny_fit_args):
    def args(root: Path, max_steps: int) -> list[str]:
        return tiny_fit_args(
            root, max_steps,
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--export.dirpath", str(root / f"lora_{max_steps}"),
        )  # fmt: skip

    return args


@pytest.fixture(scope="module")
def straight_six(cli_args, tmp_path_factory):
    root = tmp_path_factory.mktemp("straight_six")
    main(cli_args(root, 6))
    return read_safetensors(root / "lora_6" / "pytorch_lora_weights.safetensors")[0]


@pytest.mark.parametrize("first", [3, 4], ids=["mid_epoch", "epoch_boundary"])
def test_extending_a_finished_cli_run_matches_the_longer_run_exactly(
    cli_args, straight_six, tmp_path, first
):
    """``fit --trainer.max_steps 3`` (or 4), then ``--trainer.max_steps 6 --ckpt_path last``
    (two batches an epoch) writes the very LoRA a straight 6-step run writes."""
    main(cli_args(tmp_path, first))
    main([*cli_args(tmp_path, 6), "--ckpt_path", "last"])
    extended = read_safetensors(tmp_path / "lora_6" / "pytorch_lora_weights.safetensors")[0]
    assert extended.keys() == straight_six.keys()
    for key, tensor in straight_six.items():
        assert torch.equal(tensor, extended[key]), key


def test_sampling_callbacks_read_one_spec_from_yaml(tmp_path):
    """The grids' and the metrics' prompts, seeds and sampler settings are one ``sampling:``."""
    from lightning_sd.callbacks import Evaluation, ValidationSampling
    from lightning_sd.sampling import DPMPP2M
    from lightning_sd.sampling_spec import SamplingSpec

    configs = [
        BASE.parent / "callbacks" / f"{n}.yaml" for n in ("validation_sampling", "evaluation")
    ]
    args = ["--config", str(BASE), "--trainer.default_root_dir", str(tmp_path)]
    cli = build_cli([*args, "--config", str(configs[0]), "--config", str(configs[1])], run=False)
    sampling = next(c for c in cli.trainer.callbacks if isinstance(c, ValidationSampling)).sampling
    evaluation = next(c for c in cli.trainer.callbacks if isinstance(c, Evaluation)).sampling
    assert isinstance(sampling, SamplingSpec) and isinstance(evaluation, SamplingSpec)
    assert sampling.prompts[0] == "a photo of sks cat" and sampling.seeds == [0, 1, 2, 3]
    assert (sampling.steps, sampling.guidance_scale) == (25, 5.0)
    assert isinstance(sampling.sampler, DPMPP2M) and evaluation.sampler is None
    assert evaluation.size == 16
