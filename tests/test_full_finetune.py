"""Full fine-tuning (adapter kind ``full``): every weight trains, checkpoints hold them all,
export writes diffusers component folders."""

import torch
from lightning import Trainer, seed_everything

from lightning_sd import AdapterConfig, DreamBoothDataModule, LoRAExport, StableDiffusionLoRA

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_full_mode_trains_every_weight_and_exports_component_folders(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    seed_everything(0)
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(kind="full"),
        text_encoder_adapter=AdapterConfig(kind="full"),
        learning_rate=1e-3,
    )
    module.configure_model()
    unet_before = {k: v.clone() for k, v in module.unet.state_dict().items()}
    n_unet = sum(p.numel() for p in module.unet.parameters())
    n_text = sum(p.numel() for p in module.text_encoder.parameters())
    groups = {g["name"]: sum(p.numel() for p in g["params"]) for g in module.param_groups()}
    assert groups == {"unet": n_unet, "text_encoder": n_text}
    assert not any(p.requires_grad for p in module.vae.parameters())
    # Checkpoints keep exactly what trains: the whole UNet and text encoder, not the VAE.
    keys = module.state_dict().keys()
    assert len(keys) == len(list(module.unet.parameters())) + len(
        list(module.text_encoder.parameters())
    )
    assert not any(k.startswith("vae.") for k in keys)

    data = DreamBoothDataModule(str(instance_dir), "a photo of sks cat", resolution=32)
    export = LoRAExport(dirpath=str(tmp_path / "export"))
    Trainer(max_steps=3, limit_val_batches=0, enable_checkpointing=False, callbacks=[export],
            **QUIET).fit(module, data)  # fmt: skip
    changed = [k for k, v in module.unet.state_dict().items() if not torch.equal(v, unet_before[k])]
    assert len(changed) > 0.9 * len(unet_before)  # not just attention: every layer moved
    assert set(export.written) == {"unet", "text_encoder"}  # no LoRA file, no card
    unet = UNet2DConditionModel.from_pretrained(export.written["unet"])
    for k, v in unet.state_dict().items():
        assert torch.equal(v, module.unet.state_dict()[k])
    text = CLIPTextModel.from_pretrained(export.written["text_encoder"])
    w = module.text_encoder.get_input_embeddings().weight
    assert torch.equal(text.get_input_embeddings().weight, w)


def test_full_adapter_config_in_yaml_form_round_trips(tiny_pipeline_dir):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter={"kind": "full"})
    assert module.hparams.adapter["kind"] == "full"
    assert module.fully_trained_components() == {}  # nothing loaded yet
    module.configure_model()
    assert list(module.fully_trained_components()) == ["unet"]
    assert not any(p.requires_grad for p in module.text_encoder.parameters())
