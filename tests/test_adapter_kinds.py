"""LoHa and LoKr: trained through peft, written in the LyCORIS layout, read back by an
independent reading of that layout (diffusers has no LoHa/LoKr loader for SD1.x), by
``--model.lora_weights`` and by ``generate``; merge refuses them."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from test_adapters import PROMPT, text_ids, train_steps, unet_out

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.families import SD1
from lightning_sd.generate import generate
from lightning_sd.lora_io import LoRAFileError, read_safetensors
from lightning_sd.lycoris import apply_lycoris, lycoris_delta
from lightning_sd.merge import merge_loras

# (unet adapter, text-encoder adapter): LoKr with whole factors (rank >= half the factor size,
# so the scale is folded into lokr_w1) and LoKr with rank-decomposed factors on convolutions.
CASES = {
    "loha": (
        AdapterConfig(kind="loha", rank=4, alpha=8, targets="attn_ff"),
        AdapterConfig(kind="loha", rank=2, alpha=3),
    ),
    "lokr_whole": (
        AdapterConfig(kind="lokr", rank=4, alpha=8, targets="attn_ff"),
        AdapterConfig(kind="lokr", rank=4, alpha=2),
    ),
    "lokr_decomposed": (
        AdapterConfig(kind="lokr", rank=2, alpha=3, factor=4, decompose_both=True, targets="full"),
        None,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tiny_pipeline_dir, tmp_path_factory):
    unet_cfg, te_cfg = CASES[request.param]
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir), adapter=unet_cfg, text_encoder_adapter=te_cfg
    )
    train_steps(module)
    out = tmp_path_factory.mktemp(request.param)
    with pytest.warns(UserWarning, match="diffusers layout skipped"):
        files = export_adapters(module, out, trigger=PROMPT)
    return request.param, module, files


def outputs(unet, text_encoder, tokenizer):
    """The text encoder's embedding of PROMPT and the UNet's output conditioned on it."""
    with torch.no_grad():
        te = text_encoder(text_ids(tokenizer, PROMPT))[0]
    return te, unet_out(unet, te.expand(2, -1, -1))


@pytest.fixture
def pipe(tiny_pipeline_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


def test_file_is_the_lycoris_layout_with_real_alphas(trained):
    case, module, files = trained
    assert "diffusers" not in files  # no diffusers loader reads these kinds for SD1.x
    tensors, header = read_safetensors(files["kohya"])
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"])["algo"] == module.adapter.kind
    part = "hada_w1_a" if case == "loha" else "lokr_w1"
    unet_keys = [k for k in tensors if k.startswith("lora_unet_") and k.endswith(part)]
    assert len(unet_keys) == sum(1 for n, _ in module.unet.named_parameters() if part in n)
    if module.text_encoder_adapter is not None:
        assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in tensors)
    # every .alpha is the module's scale times its rank, as LyCORIS readers divide it back
    layer = module.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    flat = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert float(tensors[f"{flat}.alpha"]) == pytest.approx(module.adapter.lora_alpha)
    # the layout's formula gives peft's update for that module
    parts = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(flat + ".")}
    expected = layer.get_delta_weight("default")
    assert (lycoris_delta(parts, layer.weight.shape) - expected).abs().max() <= 1e-6
    assert expected.abs().max() > 1e-4  # training moved it


def test_independent_reading_reproduces_unet_and_text_encoder(trained, pipe):
    _, module, files = trained
    te_trained, unet_trained = outputs(module.unet, module.text_encoder, module.tokenizer)
    _, unet_base = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (unet_base - unet_trained).abs().max() > 1e-3
    tensors, _ = read_safetensors(files["kohya"])
    changed = apply_lycoris(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tensors, SD1.kohya_prefixes
    )
    assert changed == len({k.rsplit(".", 1)[0] for k in tensors})
    te_loaded, unet_loaded = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    assert (te_loaded - te_trained).abs().max() <= 1e-5
    assert (unet_loaded - unet_trained).abs().max() <= 1e-5


def test_continue_training_from_the_file(trained, tiny_pipeline_dir):
    case, module, files = trained
    unet_cfg, te_cfg = CASES[case]
    fresh = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=unet_cfg,
        text_encoder_adapter=te_cfg,
        lora_weights=str(files["kohya"]),
    )
    fresh.configure_model()
    trained_state = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert (param - trained_state[name]).abs().max() <= 1e-6, name
    other = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(**{**vars(unet_cfg), "alpha": 1.0}),
        text_encoder_adapter=te_cfg,
        lora_weights=str(files["kohya"]),
    )
    with pytest.raises(LoRAFileError, match="alpha differs"):
        other.configure_model()


def test_generate_reads_the_file_and_merge_refuses_it(trained, tiny_pipeline_dir, tmp_path):
    case, module, files = trained
    if case != "loha":
        pytest.skip("one kind is enough for the command paths")
    kwargs = dict(prompts=["a photo of a cat"], seeds=[0], steps=4, device="cpu")
    paths = generate(
        str(tiny_pipeline_dir), loras=[str(files["kohya"].parent)], out_dir=str(tmp_path), **kwargs
    )
    expected = module.generate(["a photo of a cat"], [0], steps=4, guidance_scale=7.5)
    image = np.asarray(Image.open(paths[0]), dtype=np.int16)
    reference = (expected[0] * 255).round().byte().permute(1, 2, 0).numpy().astype(np.int16)
    assert np.abs(image - reference).max() <= 2
    with pytest.raises(LoRAFileError, match="LoHa/LoKr file: merging it is refused"):
        merge_loras(
            str(tiny_pipeline_dir), [str(files["kohya"])] * 2, [1.0, 1.0], str(tmp_path / "m")
        )


def test_lycoris_options_are_lora_only():
    with pytest.raises(ValueError, match="does not take"):
        AdapterConfig(kind="loha", use_rslora=True)
    with pytest.raises(ValueError, match="does not take"):
        AdapterConfig(kind="lokr", loraplus_lr_ratio=16)
