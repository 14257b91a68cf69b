"""The tiny SD3.5-Medium-architecture pipeline: built offline, loaded by plain diffusers, with
or without T5; and which attention layers a LoRA's targets reach (SD3.5's ``attn2``)."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from peft import LoraConfig, inject_adapter_in_model

from lightning_sd.tiny_sd3 import build_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


def test_tiny_sd3_loads_offline_and_samples(sd3_dir):
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor == 0.0609
    assert pipe.transformer.config.dual_attention_layers == [0]
    ids = pipe.tokenizer_3(["a photo of a cat"], padding="max_length", max_length=12).input_ids
    assert ids[0][-1] == 0 and 1 in ids[0]  # padded with T5's pad 0 after its </s> 1
    images = pipe(
        "a photo of a cat", num_inference_steps=2, height=32, width=32, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert float(images.std()) > 0.01


def test_tiny_sd3_without_t5_loads_as_sd3_allows(tmp_path):
    folder = build_tiny_sd3_pipeline(tmp_path / "no-t5", t5=False)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    embeds, _, pooled, _ = pipe.encode_prompt(
        "a cat", None, None, do_classifier_free_guidance=False
    )
    assert pooled.shape == (1, 32) and embeds.shape[-1] == 32
    assert torch.count_nonzero(embeds[:, 77:]) == 0  # T5's part is zeros without T5


@pytest.mark.parametrize(
    ("targets", "in_attn2"),
    [(["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"], 0),
     (["to_q", "to_k", "to_v", "to_out.0"], 4)],
    ids=["diffusers_script_targets", "bare_targets"],
)  # fmt: skip
def test_which_targets_reach_sd35_second_attention(sd3_dir, targets, in_attn2):
    """peft matches target suffixes: diffusers' SD3 script targets never train attn2."""
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=targets), pipe.transformer)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in pipe.transformer.named_parameters()
               if ".lora_A" in n}  # fmt: skip
    assert sum(".attn2." in n for n in adapted) == in_attn2
    assert sum(".attn." in n for n in adapted) == 4 * 2  # both blocks' joint attention


def test_block_selection_adapts_only_those_transformer_blocks(sd3_dir):
    from diffusers import SD3Transformer2DModel

    from lightning_sd.adapters import AdapterConfig, add_adapter

    transformer = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer")
    add_adapter(transformer, AdapterConfig(rank=2, targets="attn", blocks=[1]))
    adapted = {n.split(".")[1] for n, _ in transformer.named_parameters() if ".lora_A" in n}
    assert adapted == {"1"}
    # Block 1 is SD3's last, context-pre-only block: its context stream has no output layer.
    modules = {n.split(".lora_A")[0].split(".", 2)[2] for n, _ in transformer.named_parameters()
               if ".lora_A" in n}  # fmt: skip
    assert modules == {f"attn.{m}" for m in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj",
                                             "add_k_proj", "add_v_proj")}  # fmt: skip
