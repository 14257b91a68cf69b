"""A quantized frozen base (QLoRA): bitsandbytes NF4 / int8 layers on the CPU, float32 adapters
that get gradients, and exported files identical in layout to an unquantized base's, which load
into a plain unquantized diffusers pipeline and reproduce the unquantized model with them."""

from __future__ import annotations

import pytest
import torch

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.lora_io import read_safetensors
from lightning_sd.quantization import quantize_linear_layers

bnb = pytest.importorskip("bitsandbytes")
PROMPTS = ["a photo of sks cat", "a dog"]


def _out(unet, cond) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample


def _module(pipeline, quantize_base, kind="lora") -> StableDiffusionLoRA:
    torch.manual_seed(0)
    adapter = AdapterConfig(kind=kind, rank=4, alpha=4)
    module = StableDiffusionLoRA(str(pipeline), adapter=adapter, quantize_base=quantize_base)
    module.configure_model()
    return module


@pytest.mark.parametrize(
    "quantize_base,layer,max_error",
    [("nf4", "Linear4bit", 0.08), ("int8", "Linear8bitLt", 0.005)],
)
def test_quantized_base_trains_float32_adapters_and_exports_unquantized_files(
    tiny_pipeline_dir, tmp_path, quantize_base, layer, max_error
):
    from diffusers import StableDiffusionPipeline

    plain = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    n_linear = sum(type(m) is torch.nn.Linear for m in plain.unet.modules())
    module = _module(tiny_pipeline_dir, quantize_base)
    quantized = [m for m in module.unet.modules() if isinstance(m, getattr(bnb.nn, layer))]
    assert len(quantized) == n_linear > 0
    float_linear = [n for n, m in module.unet.named_modules() if type(m) is torch.nn.Linear]
    assert float_linear and all(".lora_" in n for n in float_linear)  # only the adapters
    trainable = {n: p for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(
        "lora_" in n and p.dtype == torch.float32 for n, p in trainable.items()
    )
    cond = module.encode_text(PROMPTS)["encoder_hidden_states"].detach()
    # B = 0: the quantized base alone, against the float32 base.
    base_error = (_out(module.unet, cond) - _out(plain.unet, cond)).norm() / _out(
        plain.unet, cond
    ).norm()
    assert 0 < base_error < max_error, base_error
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: non-zero B
        for p in trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    loss = module.objective.loss(
        module.denoiser_fn, latents, generator=gen, encoder_hidden_states=cond
    ).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trainable.values())

    # The same adapters on an unquantized module: same keys, and the same file.
    reference = _module(tiny_pipeline_dir, None)
    assert reference.load_state_dict(module.state_dict(), strict=False).unexpected_keys == []
    assert set(reference.state_dict()) == set(trainable)
    files = export_adapters(module, tmp_path / "q", formats=("diffusers",))
    ref_files = export_adapters(reference, tmp_path / "ref", formats=("diffusers",))
    tensors, _ = read_safetensors(files["diffusers"])
    ref_tensors, _ = read_safetensors(ref_files["diffusers"])
    assert tensors.keys() == ref_tensors.keys() and len(tensors) == len(trainable)
    assert all(torch.equal(tensors[k], ref_tensors[k]) for k in tensors)
    # The file on a plain float32 pipeline is the unquantized model with these adapters.
    plain.load_lora_weights(files["diffusers"].parent)
    loaded = _out(plain.unet, cond)
    assert (loaded - _out(reference.unet, cond)).abs().max() <= 1e-5
    assert (loaded - _out(module.unet, cond)).norm() / loaded.norm() < max_error


def test_dora_on_a_quantized_base_gets_gradients(tiny_pipeline_dir):
    module = _module(tiny_pipeline_dir, "int8", kind="dora")
    cond = module.encode_text(PROMPTS)["encoder_hidden_states"].detach()
    module.to("cpu")  # moving int8 layers after quantization keeps their scales
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # a second forward after the first moved the int8 state
        loss = module.objective.loss(module.denoiser_fn, latents, encoder_hidden_states=cond)
        loss.mean().backward()
        module.to("cpu")
    magnitudes = [p for n, p in module.named_parameters() if "lora_magnitude" in n]
    assert magnitudes and all(p.grad.abs().max() > 0 for p in magnitudes)


def test_quantizing_trainable_weights_or_full_finetuning_is_refused(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="quantize_base must be 'nf4' or 'int8', got 'fp4'"):
        quantize_linear_layers(torch.nn.Linear(2, 2), "fp4")
    with pytest.raises(ValueError, match="has trainable weights"):
        quantize_linear_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)), "nf4")
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir), adapter=AdapterConfig(kind="full"), quantize_base="nf4"
    )
    with pytest.raises(ValueError, match="quantize_base needs adapters"):
        module.configure_model()
