"""Mixed precision: frozen base in half precision, adapters in float32, finite training."""

import pytest
import torch
from lightning import Trainer

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.data.settings import LoaderSettings

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_bf16_mixed_keeps_adapters_float32(tiny_pipeline_dir, instance_dir):
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(rank=4),
        text_encoder_adapter=AdapterConfig(rank=2),
        gradient_checkpointing=True,
    )
    data = DreamBoothDataModule(
        str(instance_dir), "a photo of sks cat", resolution=32, loader=LoaderSettings(batch_size=2)
    )
    trainer = Trainer(
        max_steps=3,
        precision="bf16-mixed",
        limit_val_batches=0,
        enable_checkpointing=False,
        **QUIET,
    )
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    frozen = {p.dtype for n, p in module.unet.named_parameters() if not p.requires_grad}
    trained = {p.dtype for p in module.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert {p.dtype for p in module.vae.parameters()} == {torch.float32}
    assert module.unet.is_gradient_checkpointing
    assert module.text_encoder.is_gradient_checkpointing
    moved = [p for n, p in module.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert moved, "adapters did not train under bf16-mixed with gradient checkpointing"


def test_true_half_precision_is_refused(tiny_pipeline_dir, instance_dir):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    data = DreamBoothDataModule(str(instance_dir), "p", resolution=32)
    with pytest.raises(ValueError, match="bf16-mixed"):
        Trainer(max_steps=1, precision="bf16-true", **QUIET).fit(module, data)


def test_attention_runs_through_sdpa_and_channels_last_is_applied(tiny_pipeline_dir):
    from diffusers.models.attention_processor import AttnProcessor2_0

    module = StableDiffusionLoRA(str(tiny_pipeline_dir), channels_last=True)
    module.configure_model()
    processors = module.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    convs = [m.weight for m in module.unet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    plain = StableDiffusionLoRA(str(tiny_pipeline_dir))
    plain.configure_model()
    conv = next(m.weight for m in plain.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert not conv.is_contiguous(memory_format=torch.channels_last)
