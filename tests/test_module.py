"""End to end on the tiny pipeline: fit, held-out loss, export, reload in plain diffusers."""

import pytest
import torch
from lightning import Trainer, seed_everything

from lightning_sd import AdapterConfig, DreamBoothDataModule, LoRAExport, StableDiffusionLoRA
from lightning_sd.data.settings import LoaderSettings

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
PROMPT = "a photo of sks cat"


def heldout(module, data) -> float:
    return Trainer(**QUIET).validate(module, data, verbose=False)[0]["val/loss"]


@pytest.fixture(scope="session")
def fitted(tiny_pipeline_dir, instance_dir, tmp_path_factory):
    """40 steps of LoRA rank 4 with alpha = 2 x rank, exported by the LoRAExport callback."""
    seed_everything(0)
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, alpha=8), learning_rate=1e-2
    )
    data = DreamBoothDataModule(
        str(instance_dir), PROMPT, resolution=32, loader=LoaderSettings(batch_size=4)
    )
    before = heldout(module, data)
    export = LoRAExport(dirpath=str(tmp_path_factory.mktemp("export")))
    trainer = Trainer(
        max_steps=40,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[export],
        **QUIET,
    )
    trainer.fit(module, data)
    return module, data, before, heldout(module, data), export.written_lora


def unet_out(unet, module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        cond = module.encode_text([PROMPT, "a dog"])["encoder_hidden_states"]
        return unet(x, t, encoder_hidden_states=cond).sample


def test_fit_lowers_heldout_loss_and_the_same_weights_give_the_same_number(fitted):
    module, data, before, after, _ = fitted
    assert after < 0.9 * before, (before, after)
    assert heldout(module, data) == after


def test_export_reloads_in_plain_diffusers_with_alpha_twice_rank(fitted, tiny_pipeline_dir):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    module, _, _, _, path = fitted
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        assert "lora_adapter_metadata" in f.metadata()
    assert keys and all(k.startswith("unet.") for k in keys)
    module.eval()
    trained = unet_out(module.unet, module)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    base = unet_out(pipe.unet, module)
    pipe.load_lora_weights(path.parent)
    reloaded = unet_out(pipe.unet, module)
    assert (reloaded - trained).abs().max() <= 1e-5
    assert (base - trained).abs().max() > 1e-2  # the LoRA changed the model
    # alpha (8) != rank (4): a loader that assumed alpha == rank would halve the update.
    assert pipe.unet.peft_config["default_0"].lora_alpha == 8
    assert pipe.unet.peft_config["default_0"].r == 4


def test_checkpoint_holds_only_adapters_and_restores_them(fitted, tmp_path, tiny_pipeline_dir):
    module, data, _, after, _ = fitted
    state = module.state_dict()
    assert state and all("lora_" in k for k in state)
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert sum(v.numel() for v in state.values()) == n_trainable

    trainer = Trainer(**QUIET)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    restored = StableDiffusionLoRA.load_from_checkpoint(tmp_path / "a.ckpt")
    assert heldout(restored, data) == after

    other = StableDiffusionLoRA(
        str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, targets=["to_q"])
    )
    with pytest.raises(KeyError, match="lacks"):
        other.on_load_checkpoint({"state_dict": {"unet.x": torch.zeros(1)}})
