"""The CLI as people type it (issue 19, item 7): plain repeated list values, every command in
``--help``, no unimplemented subcommands, named positionals, one-line usage errors, no
diffusers note for UNet-only LoRA files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.cli import main

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def exit_code(argv) -> int:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    return stopped.value.code


@pytest.fixture(scope="module")
def unet_lora(tiny_pipeline_dir, tmp_path_factory):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4))
    module.configure_model()
    for name, p in module.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return export_adapters(module, tmp_path_factory.mktemp("lora"), ["diffusers"])["diffusers"]


def test_help_lists_every_command_and_hides_test_and_predict(capsys):
    assert exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "generate", "merge", "convert-checkpoint", "tiny-pipeline"):
        assert f"\n    {command} " in out or f"\n  {command} " in out, command
    assert "predict" not in out and "    test " not in out
    assert exit_code(["test"]) == 2
    assert "invalid choice: 'test' (choose from 'fit', 'validate')" in capsys.readouterr().err


def test_merge_help_names_its_positionals(capsys):
    assert exit_code(["merge", "--help"]) == 0
    out = capsys.readouterr().out
    assert "BASE LORAS WEIGHTS OUT_DIR" in out and "[ITEM,...] [ITEM,...]" not in out


def test_a_usage_error_is_three_lines_not_a_usage_dump(capsys):
    assert exit_code(["fit", "--config", TINY, "--trainer.max_stepz", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-3:] == [
        "usage: lightning-sd fit [-h] [options]",
        "tip: For details of accepted options run: lightning-sd fit --help",
        "error: unrecognized arguments: --trainer.max_stepz 3",
    ]
    assert not [line for line in err if "--trainer." in line and "max_stepz" not in line]


def test_a_refused_value_is_one_line(capsys):
    argv = ["fit", "--config", TINY, "--model.adapter.rank", "0"]
    assert exit_code(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "lightning-sd fit: error: adapter rank must be >= 1, got 0"
    assert not any("Traceback" in line for line in err)


def test_generate_takes_plain_repeated_values_and_is_quiet_about_text_encoders(
    tiny_pipeline_dir, unet_lora, tmp_path, capfd
):
    """Before: lists had to be JSON, and diffusers said "No LoRA keys associated to
    CLIPTextModel" for this UNet-only file."""
    main([
        "generate", str(tiny_pipeline_dir), "a photo of a cat",
        "--loras", str(unet_lora), "--lora_scales", "0.5", "--seeds", "3", "--seeds", "4",
        "--steps", "2", "--out_dir", str(tmp_path), "--device", "cpu",
    ])  # fmt: skip
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["000_3.png", "000_4.png", "grid.png"]
    captured = capfd.readouterr()
    assert "No LoRA keys associated" not in captured.out + captured.err


def test_a_tool_error_is_one_line(tiny_pipeline_dir, tmp_path, capsys):
    missing = tmp_path / "nowhere.safetensors"
    argv = ["generate", str(tiny_pipeline_dir), "a cat", "--loras", str(missing)]
    assert exit_code([*argv, "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()  # above: diffusers' loading bars
    assert err[-1] == f"lightning-sd generate: error: LoRA file {missing} does not exist"
    assert not any("Traceback" in line for line in err)
