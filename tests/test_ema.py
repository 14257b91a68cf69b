"""AdapterEMA: the average follows its formula, lives in the checkpoint (exact resume), and
is what the LoRA file holds (the raw weights on request)."""

from __future__ import annotations

import pytest
import torch
from lightning import Callback, Trainer, seed_everything

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks import AdapterEMA, LastCheckpoint, LoRAExport
from lightning_sd.data.settings import LoaderSettings
from lightning_sd.lora_io import read_safetensors

N = 3
DECAY = 0.8


class RawRecorder(Callback):
    """The trainable tensors after every optimizer step, and a stop after ``stop_at`` steps."""

    def __init__(self, stop_at: int | None = None):
        self.raw: list[dict[str, torch.Tensor]] = []
        self.stop_at = stop_at

    @staticmethod
    def trainable(pl_module):
        return {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer, pl_module):
        self.initial = self.trainable(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.raw.append(self.trainable(pl_module))
        if trainer.global_step == self.stop_at:
            trainer.should_stop = True


def fit(pipeline, instance_dir, root, stop_at=None, ckpt_path=None, export="ema"):
    seed_everything(0)
    module = StableDiffusionLoRA(
        str(pipeline), adapter=AdapterConfig(rank=2, alpha=2), learning_rate=1e-2
    )
    data = DreamBoothDataModule(
        str(instance_dir),
        "a photo of sks cat",
        resolution=32,
        random_flip=True,
        loader=LoaderSettings(batch_size=4),
    )
    recorder = RawRecorder(stop_at)
    ema = AdapterEMA(decay=DECAY, warmup=True, export=export)
    trainer = Trainer(
        max_steps=2 * N, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[
            LastCheckpoint(dirpath=root, every_n_train_steps=N, save_last=True),
            recorder, ema, LoRAExport(dirpath=str(root / "lora"), formats=["diffusers"]),
        ],
    )  # fmt: skip
    trainer.fit(module, data, ckpt_path=ckpt_path)
    return module, recorder, ema


@pytest.fixture(scope="module")
def straight(tiny_pipeline_dir, instance_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    return root, *fit(tiny_pipeline_dir, instance_dir, root)


def test_shadow_follows_the_ema_formula_and_is_exported(straight):
    root, module, recorder, ema = straight
    assert len(recorder.raw) == 2 * N and ema.updates == 2 * N
    params = dict(module.named_parameters())
    # reference: s_0 = w_0, s_t = d_t s_(t-1) + (1 - d_t) w_t, d_t = min(DECAY, (1+t)/(10+t))
    for name, shadow in recorder.initial.items():
        for t, raw in enumerate(recorder.raw):
            d = min(DECAY, (1 + t) / (10 + t))
            shadow = d * shadow + (1 - d) * raw[name]
        assert (ema.shadow[name] - shadow).abs().max() <= 1e-6, name
        assert torch.equal(params[name].detach(), ema.shadow[name])  # the module holds EMA
    moved = max((recorder.raw[-1][n] - s).abs().max() for n, s in ema.shadow.items())
    assert moved > 1e-3  # the average is not the last weights
    tensors, _ = read_safetensors(root / "lora" / "pytorch_lora_weights.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    name = "unet." + key.removeprefix("unet.").replace(".lora_B.weight", ".lora_B.default.weight")
    assert torch.equal(tensors[key], ema.shadow[name])
    # the last checkpoint keeps the raw weights, and the shadow beside them
    ckpt = torch.load(root / "last.ckpt", weights_only=True)
    assert torch.equal(ckpt["state_dict"][name], recorder.raw[-1][name])
    state = next(v for k, v in ckpt["callbacks"].items() if k.startswith("AdapterEMA"))
    assert torch.equal(state["shadow"][name], ema.shadow[name])


def test_resume_is_exact_and_raw_export_on_request(
    straight, tiny_pipeline_dir, instance_dir, tmp_path
):
    _, _, _, ema = straight
    fit(tiny_pipeline_dir, instance_dir, tmp_path, stop_at=N)
    module, _, resumed = fit(
        tiny_pipeline_dir, instance_dir, tmp_path, ckpt_path="last", export="raw"
    )
    assert resumed.updates == ema.updates
    for name, tensor in ema.shadow.items():
        assert torch.equal(resumed.shadow[name], tensor), name
    tensors, _ = read_safetensors(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    name = "unet." + key.removeprefix("unet.").replace(".lora_B.weight", ".lora_B.default.weight")
    assert torch.equal(tensors[key], dict(module.named_parameters())[name].detach())
    assert not torch.equal(tensors[key], resumed.shadow[name])
