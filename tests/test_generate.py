"""``lightning-sd generate``: base + LoRA files -> prompts x seeds images and a grid."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.cli import main
from lightning_sd.generate import generate


@pytest.fixture(scope="module")
def lora_dir(tiny_pipeline_dir, tmp_path_factory):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, alpha=8))
    module.configure_model()
    torch.manual_seed(0)
    for name, p in module.unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return export_adapters(module, tmp_path_factory.mktemp("lora"))["diffusers"].parent


def pixels(path):
    return np.asarray(Image.open(path), dtype=np.int16)


def test_writes_prompts_times_seeds_deterministically(tiny_pipeline_dir, lora_dir, tmp_path):
    kwargs = dict(prompts=["a photo of a cat", "a dog"], seeds=[0, 1], steps=4, device="cpu")
    first = generate(
        str(tiny_pipeline_dir), loras=[str(lora_dir)], out_dir=str(tmp_path / "a"), **kwargs
    )
    again = generate(
        str(tiny_pipeline_dir), loras=[str(lora_dir)], out_dir=str(tmp_path / "b"), **kwargs
    )
    images = [p for p in first if p.name != "grid.png"]
    assert len(images) == 4 and first[-1].name == "grid.png"
    assert sorted(p.name for p in images) == ["000_0.png", "000_1.png", "001_0.png", "001_1.png"]
    for a, b in zip(first, again, strict=True):
        assert np.array_equal(pixels(a), pixels(b)), a.name
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # seeds differ
    grid = Image.open(first[-1])
    assert grid.width > 2 * 128 and grid.height > 2 * 128

    base = generate(str(tiny_pipeline_dir), out_dir=str(tmp_path / "c"), **kwargs)
    assert np.abs(pixels(base[0]) - pixels(first[0])).max() > 2  # the LoRA changes the image
    fused = generate(
        str(tiny_pipeline_dir),
        loras=[str(lora_dir)],
        fuse=True,
        out_dir=str(tmp_path / "d"),
        **kwargs,
    )
    assert np.abs(pixels(fused[0]) - pixels(first[0])).max() <= 2  # fusing is the same model


def test_command_line(tiny_pipeline_dir, lora_dir, tmp_path, capsys):
    main([
        "generate", str(tiny_pipeline_dir), '["a photo of a cat"]',
        "--loras", f'["{lora_dir}"]', "--lora_scales", "[0.5]", "--seeds", "[3, 4, 5]",
        "--steps", "3", "--sampler", "euler", "--out_dir", str(tmp_path), "--device", "cpu",
    ])  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "000_3.png",
        "000_4.png",
        "000_5.png",
        "grid.png",
    ]
    assert str(tmp_path / "grid.png") in capsys.readouterr().out
