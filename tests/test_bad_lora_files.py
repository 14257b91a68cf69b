"""LoRA files that used to pass silently: NaN weights, stripped rank/alpha metadata, a pickle,
a file for another architecture (issue 19, item 3). Each is refused (or warned about) by
generate, merge and fit, naming the file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.generate import generate
from lightning_sd.lora_io import LoRAFileError, read_safetensors
from lightning_sd.merge import merge_loras


def trained_like(module):
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)


@pytest.fixture(scope="module")
def lora_file(tiny_pipeline_dir, tmp_path_factory):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, alpha=8))
    module.configure_model()
    trained_like(module)
    return export_adapters(module, tmp_path_factory.mktemp("lora"), ["diffusers"])["diffusers"]


@pytest.fixture(scope="module")
def sdxl_lora_file(tiny_sdxl_dir, tmp_path_factory):
    module = StableDiffusionLoRA(
        str(tiny_sdxl_dir),
        adapter=AdapterConfig(rank=4),
        text_encoder_adapter=AdapterConfig(rank=4),
    )
    module.configure_model()
    trained_like(module)
    return export_adapters(module, tmp_path_factory.mktemp("sdxl"), ["diffusers"])["diffusers"]


@pytest.fixture()
def nan_file(lora_file, tmp_path):
    tensors, header = read_safetensors(lora_file)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, tmp_path / "nan.safetensors", metadata=header)
    return tmp_path / "nan.safetensors"


def fit_module(base, lora, **kwargs):
    kwargs.setdefault("adapter", AdapterConfig(rank=4, alpha=8))
    module = StableDiffusionLoRA(str(base), lora_weights=str(lora), **kwargs)
    module.configure_model()
    return module


def run_generate(base, lora, tmp_path):
    return generate(
        str(base), ["a cat"], loras=[str(lora)], steps=2, out_dir=str(tmp_path / "out"),
        device="cpu",
    )  # fmt: skip


def test_nan_weights_are_refused_by_generate_merge_and_fit(tiny_pipeline_dir, nan_file, tmp_path):
    """Before: a black image and exit 0; NaN merged tensors; fit blamed the learning rate."""
    match = f"{nan_file}: 1 of .* tensors hold NaN or inf"
    with pytest.raises(LoRAFileError, match=match):
        run_generate(tiny_pipeline_dir, nan_file, tmp_path)
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoRAFileError, match=match):
        merge_loras(str(tiny_pipeline_dir), [str(nan_file)], [1.0], str(tmp_path / "merged"))
    with pytest.raises(LoRAFileError, match=match):
        fit_module(tiny_pipeline_dir, nan_file)


def test_stripped_alpha_metadata_warns_in_generate_and_fails_fit_with_another_alpha(
    tiny_pipeline_dir, lora_file, tmp_path
):
    """Before: it sampled at scale 1 instead of 2 with no word, and fit skipped the alpha check."""
    tensors, _ = read_safetensors(lora_file)
    stripped = tmp_path / "stripped.safetensors"
    save_file(tensors, stripped)
    with pytest.warns(UserWarning, match=f"{stripped} has no rank/alpha metadata"):
        run_generate(tiny_pipeline_dir, stripped, tmp_path)
    with pytest.raises(LoRAFileError) as caught:
        fit_module(tiny_pipeline_dir, stripped)
    assert "loaders take alpha = rank = 4, but this run configures unet alpha 8.0" in str(
        caught.value
    )
    fit_module(tiny_pipeline_dir, stripped, adapter=AdapterConfig(rank=4))  # alpha = rank: fine


def test_a_pickle_lora_file_is_named_as_such(tiny_pipeline_dir, lora_file, tmp_path):
    """Before: "No such file" about a .safetensors file the user never named."""
    tensors, _ = read_safetensors(lora_file)
    pickle = tmp_path / "pytorch_lora_weights.bin"
    torch.save(tensors, pickle)
    with pytest.raises(LoRAFileError, match=rf"{pickle} is a PyTorch pickle \(\.bin\)"):
        run_generate(tiny_pipeline_dir, pickle, tmp_path)
    missing = tmp_path / "nowhere.safetensors"
    with pytest.raises(FileNotFoundError, match=f"LoRA file {missing} does not exist"):
        run_generate(tiny_pipeline_dir, missing, tmp_path)


def test_an_sdxl_lora_on_an_sd1_base_is_named_another_architecture(
    tiny_pipeline_dir, sdxl_lora_file, tmp_path
):
    """Before: fit told to configure more adapters; now: the file is for another family."""
    match = (
        f"{sdxl_lora_file} is a LoRA for an SDXL-family \\(two text encoders, a UNet\\) base, but "
        ".* is SD1.x/2.x \\(one text encoder\\)"
    )
    with pytest.raises(LoRAFileError, match=match):
        run_generate(tiny_pipeline_dir, sdxl_lora_file, tmp_path)
    with pytest.raises(LoRAFileError, match=match):
        fit_module(
            tiny_pipeline_dir,
            sdxl_lora_file,
            adapter=AdapterConfig(rank=4),
            text_encoder_adapter=AdapterConfig(rank=4),
        )
