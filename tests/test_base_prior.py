"""BasePrior: prior preservation without class images, against the base model's prediction
on the class prompt at the same noisy latents."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from test_adapters import train_steps
from transformers import CLIPTextModel

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.base_prior import BasePrior

CLASS = "a photo of a cat"


def make(tiny_pipeline_dir, **kwargs):
    return StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(rank=4, alpha=8),
        base_prior=BasePrior(CLASS, weight=0.5),
        **kwargs,
    )


def batch():
    return {
        "pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2
        - 1,
        "prompt": ["a photo of sks cat", "a photo of sks cat"],
        "loss_weight": torch.ones(2),
    }


def test_prior_term_is_the_distance_to_the_base_models_prediction(tiny_pipeline_dir):
    module = make(tiny_pipeline_dir, text_encoder_adapter=AdapterConfig(rank=2))
    module.configure_model()
    b = batch()
    latents = module.batch_latents(b, sample=False)
    cond = module.batch_cond(b, latents)
    priors = []
    torch.manual_seed(0)
    module.objective.loss(module.training_denoiser(b, latents, priors), latents, **cond)
    assert priors[0].max() <= 1e-10  # B = 0: the adapted model is the base

    train_steps(module)  # the adapters move (UNet and text encoder)
    seen = {}

    def recorder(x, t, **c):
        seen.update(x=x, t=t)
        return module.denoiser_fn(x, t, **c)

    torch.manual_seed(0)
    plain = module.objective.loss(recorder, latents, **cond)
    priors = []
    torch.manual_seed(0)
    wrapped = module.objective.loss(module.training_denoiser(b, latents, priors), latents, **cond)
    assert (wrapped - plain).abs().max() <= 1e-5  # the instance loss is unchanged

    # reference: the pipeline's own UNet and text encoder, never adapted
    base_unet = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    base_te = CLIPTextModel.from_pretrained(tiny_pipeline_dir, subfolder="text_encoder")
    ids = module.tokenizer([CLASS] * 2, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        teacher = base_unet(
            seen["x"], seen["t"], encoder_hidden_states=base_te(ids.input_ids)[0]
        ).sample
        student = module.denoiser_fn(seen["x"], seen["t"], **module.encode_text([CLASS] * 2))
    reference = ((student - teacher) ** 2).mean(dim=(1, 2, 3))
    assert reference.min() > 1e-6
    assert (priors[0] - reference).abs().max() <= 1e-5 * max(1.0, float(reference.max()))
    # adapters are back on and trainable after the teacher's pass
    assert all(p.requires_grad for n, p in module.unet.named_parameters() if "lora_" in n)
    with torch.no_grad():
        again = module.denoiser_fn(seen["x"], seen["t"], **module.encode_text([CLASS] * 2))
    assert torch.equal(again, student)


def test_training_step_adds_the_weighted_term(tiny_pipeline_dir):
    module = make(tiny_pipeline_dir)
    train_steps(module)
    b = batch()
    torch.manual_seed(1)
    total = module.training_step(b, 0)
    torch.manual_seed(1)  # the same draws as the step made, in the same order
    latents = module.batch_latents(b)
    cond = module.batch_cond(b, latents)
    priors = []
    per_sample = module.objective.loss(
        module.training_denoiser(b, latents, priors), latents, **cond
    )
    assert float(total) == pytest.approx(
        float(per_sample.mean() + 0.5 * priors[0].mean()), rel=1e-5
    )


def test_refused_where_switching_adapters_off_is_not_the_base(tiny_pipeline_dir):
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(rank=4, init="pissa"),
        base_prior=BasePrior(CLASS),
    )
    with pytest.raises(ValueError, match="base_prior needs the base model"):
        module.configure_model()
