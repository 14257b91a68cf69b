"""The shipped tiny-pretrained base: it loads offline in plain diffusers, its VAE reconstructs
unseen images, and a short DreamBooth LoRA learns the held-out subject (slow)."""

import pytest
import torch

from lightning_sd.data.settings import LoaderSettings
from lightning_sd.pretrained.base import pretrained_path
from lightning_sd.pretrained.subject import load_images, subject_dir

pytestmark = pytest.mark.skipif(
    not (pretrained_path() / "model_index.json").is_file(), reason="no shipped tiny-pretrained"
)


def test_ships_under_40_mb_and_loads_in_plain_diffusers():
    from diffusers import StableDiffusionPipeline

    size = sum(f.stat().st_size for f in pretrained_path().rglob("*") if f.is_file())
    assert size < 40e6
    assert not list(pretrained_path().rglob("*.bin"))  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(pretrained_path())
    assert pipe.unet.dtype == torch.float32
    assert pipe.unet.config.sample_size * 4 == 32


def test_resolves_by_name_and_its_vae_reconstructs_unseen_images():
    from lightning_sd.components import load_components, resolve_model
    from lightning_sd.pretrained.vae_training import psnr

    assert resolve_model("tiny-pretrained") == str(pretrained_path())
    assert resolve_model("some/hub-id") == "some/hub-id"
    vae = load_components("tiny-pretrained").vae
    # The cat faces were held out of the VAE's training too.
    images = load_images(subject_dir("heldout"), 32) * 2 - 1
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    # Measured 20.8 dB on these five cat faces (24.5 dB on the 81 held-out emoji of
    # benchmarks/results/pretrained_quality.md): a regression guard on the shipped weights.
    assert psnr(images, recon) == pytest.approx(20.81, abs=0.3)


@pytest.mark.slow
def test_short_dreambooth_learns_the_held_out_subject(tmp_path):
    """A learning outcome: samples of 'sks cat face' get closer to unseen cat faces."""
    from lightning import Trainer, seed_everything

    from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
    from lightning_sd.pretrained.subject import SUBJECT_PROMPT, SubjectProbe

    seed_everything(0)
    module = StableDiffusionLoRA(
        "tiny-pretrained", adapter=AdapterConfig(rank=8), learning_rate=1e-3, lr_warmup_steps=10
    )
    data = DreamBoothDataModule(
        str(subject_dir("instance")),
        SUBJECT_PROMPT,
        resolution=32,
        loader=LoaderSettings(batch_size=4),
    )
    module.configure_model()
    probe = SubjectProbe(seeds=[0, 1, 2, 3], steps=10)
    before = probe.fidelity(probe.sample(module))
    trainer = Trainer(
        max_steps=150,
        limit_val_batches=0,
        enable_checkpointing=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, data)
    after = probe.fidelity(probe.sample(module))
    assert after > before + 0.05, (before, after)
