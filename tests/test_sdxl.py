"""SDXL and Playground v2.5 (tiny, CPU): conditioning equal to diffusers' pipeline, training with
every objective, LoRA files on three components that reload in plain diffusers (both layouts),
the EDM-native schedule, the text cache and ``lightning-sd generate``."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from lightning import Trainer
from PIL import Image
from safetensors import safe_open

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.encoding import unet_conditioning
from lightning_sd.families.sdxl import time_ids
from lightning_sd.lora_io import load_lora_into
from lightning_sd.pivotal import PivotalTuning
from lightning_sd.sampling import Euler

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
PROMPT = "a photo of TOK cat"
PROMPTS = [PROMPT, "a dog on the moon"]
OBJECTIVES = {
    "eps": {"class_path": "lightning_sd.objectives.DiffusionObjective"},
    "v": {
        "class_path": "lightning_sd.objectives.DiffusionObjective",
        "init_args": {"parameterization": {"class_path": "lightning_sd.objectives.VPrediction"}},
    },
    "edm": {
        "class_path": "lightning_sd.objectives.DiffusionObjective",
        "init_args": {
            "parameterization": {"class_path": "lightning_sd.objectives.EDM"},
            "sigma_sampler": {"class_path": "lightning_sd.objectives.LogNormal"},
            "weighting": {"class_path": "lightning_sd.objectives.EDMWeighting"},
        },
    },
}
ROUND_TRIP: dict[str, float] = {}  # max abs differences, printed by the last test


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def unet_out(unet, cond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10.0, 700.0]), **cond).sample


def train_steps(module, steps=2, lr=5e-2):
    """Real optimisation steps of the module's own loss on an SDXL-shaped batch."""
    module.configure_model()
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "prompt": PROMPTS,
        "loss_weight": torch.ones(2),
        "original_size": torch.tensor([[64, 48], [40, 40]]),
        "crop_top_left": torch.tensor([[8, 0], [4, 4]]),
        "target_size": torch.tensor([[32, 32], [32, 32]]),
    }
    optimizer = torch.optim.AdamW([{**g, "lr": lr} for g in module.param_groups()])
    for _ in range(steps):
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    return module.eval()


@pytest.fixture(scope="module")
def trained(tiny_sdxl_dir, tmp_path_factory):
    """LoRA on the UNet and both text encoders (alpha != rank), pivotal tokens on both,
    a few real steps, exported in both layouts."""
    module = StableDiffusionLoRA(
        str(tiny_sdxl_dir),
        adapter=AdapterConfig(rank=4, alpha=8, targets="attn_ff"),
        text_encoder_adapter=AdapterConfig(rank=2, alpha=4),
        text_encoder_2_adapter=AdapterConfig(rank=4, alpha=2),
        text_encoder_2_lr=3e-4,
        pivotal_tuning=PivotalTuning(num_tokens=2, initializer="cat"),
    )
    module.configure_model()
    before = base_outputs(module)
    train_steps(module)
    after = base_outputs(module)
    for name, base in before.items():
        assert max_diff(base, after[name]) > 1e-3, f"training did not move {name}"
    files = export_adapters(module, tmp_path_factory.mktemp("sdxl_export"), trigger=PROMPT)
    return module, files


def base_outputs(module) -> dict[str, torch.Tensor]:
    """Each adapted part's output on a prompt without new tokens (zero-init adapters: the base)."""
    (te1, _), (te2, pooled) = encoder_outputs(
        [module.tokenizer, module.tokenizer_2],
        [module.text_encoder, module.text_encoder_2],
        PROMPTS[1],
    )
    cond = module.encode_text(PROMPTS[1:] * 2)
    return {"text_encoder": te1, "text_encoder_2": pooled, "unet": unet_out(module.unet, cond)}


def reloaded(tiny_sdxl_dir, weights, embeddings=None):
    """The base in plain diffusers with a LoRA file (and the pivotal tokens) loaded."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_lora_weights(str(weights))
    if embeddings is not None:
        with safe_open(str(embeddings), "pt") as f:
            rows = {k: f.get_tensor(k) for k in f.keys()}
        tokens = ["<s0>", "<s1>"]
        pipe.load_textual_inversion(
            list(rows["clip_l"]), token=tokens, text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
        )  # fmt: skip
        pipe.load_textual_inversion(
            list(rows["clip_g"]), token=tokens, text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )  # fmt: skip
    return pipe


def encoder_outputs(tokenizers, encoders, prompt):
    """Per encoder: the penultimate hidden state and (encoder 2) the pooled projection."""
    outs = []
    for tok, enc in zip(tokenizers, encoders, strict=True):
        ids = tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        outs.append((out.hidden_states[-2], out[0]))
    return outs


def compare_with_diffusers(module, pipe, layout):
    """Text encoders, their joint conditioning and the UNet, module vs reloaded pipeline."""
    prompt = module.pivotal_tuning.substitute(PROMPT)
    ours = encoder_outputs(
        [module.tokenizer, module.tokenizer_2], [module.text_encoder, module.text_encoder_2], prompt
    )
    theirs = encoder_outputs(
        [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], prompt
    )
    ROUND_TRIP[f"{layout}/text_encoder"] = max_diff(ours[0][0], theirs[0][0])
    ROUND_TRIP[f"{layout}/text_encoder_2"] = max(
        max_diff(ours[1][0], theirs[1][0]), max_diff(ours[1][1], theirs[1][1])
    )
    with torch.no_grad():
        text = module.text_embeddings(PROMPTS)
        embeds, _, pooled, _ = pipe.encode_prompt(
            [module.pivotal_tuning.substitute(p) for p in PROMPTS],
            device="cpu",
            do_classifier_free_guidance=False,
        )
    ROUND_TRIP[f"{layout}/encode_prompt"] = max(
        max_diff(text["encoder_hidden_states"], embeds), max_diff(text["text_embeds"], pooled)
    )
    cond = module.encode_text(PROMPTS)
    ROUND_TRIP[f"{layout}/unet"] = max_diff(unet_out(pipe.unet, cond), unet_out(module.unet, cond))
    for part in ("text_encoder", "text_encoder_2", "encode_prompt", "unet"):
        assert ROUND_TRIP[f"{layout}/{part}"] <= 1e-5, (layout, part, ROUND_TRIP)


def test_time_ids_match_the_pipeline_for_data_crops(tiny_sdxl_dir, tmp_path):
    from skimage import data as photos

    cat = Image.fromarray(photos.chelsea())
    for i, size in enumerate([(56, 40), (40, 72), (48, 48), (64, 36)]):
        cat.resize(size).save(tmp_path / f"{i}.png")
    data = DreamBoothDataModule(
        str(tmp_path), PROMPT, resolution=32, loader=LoaderSettings(batch_size=4)
    )
    data.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(data.train_dataloader()))
    assert batch["crop_top_left"].any() and (batch["original_size"] != 32).any()
    module = StableDiffusionLoRA(str(tiny_sdxl_dir))
    module.configure_model()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    proj = pipe.text_encoder_2.config.projection_dim
    expected = torch.cat(
        [
            pipe._get_add_time_ids(tuple(o), tuple(c), tuple(t), torch.float32, proj)
            for o, c, t in zip(*(batch[k].tolist() for k in ("original_size", "crop_top_left",
                                                              "target_size")), strict=True)
        ]
    )  # fmt: skip
    assert torch.equal(module.batch_cond(batch)["added_cond_kwargs"]["time_ids"], expected)
    # Generation: the generated size, uncropped (the pipeline's defaults at height = width).
    native = module.encode_text(["a"])["added_cond_kwargs"]["time_ids"]
    assert torch.equal(
        native, pipe._get_add_time_ids((32, 32), (0, 0), (32, 32), torch.float32, proj)
    )


def test_param_groups_give_text_encoder_2_its_own_rate(trained):
    module, _ = trained
    groups = {g["name"]: g for g in module.param_groups()}
    assert sorted(groups) == ["embeddings", "text_encoder", "text_encoder_2", "unet"]
    assert groups["text_encoder_2"]["lr"] == 3e-4
    assert groups["text_encoder"]["lr"] == groups["unet"]["lr"] == 1e-4
    assert len(groups["embeddings"]["params"]) == 2  # clip_l and clip_g rows
    # SDXL reads encoder 1's penultimate layer: its last layer carries no adapter (DDP-safe).
    te1 = {n for n, _ in module.text_encoder.named_parameters() if "lora_A" in n}
    assert te1 and not any(".layers.1." in n for n in te1)
    assert any(
        ".layers.1." in n for n, _ in module.text_encoder_2.named_parameters() if "lora_A" in n
    )


def test_diffusers_file_reproduces_unet_and_both_text_encoders(trained, tiny_sdxl_dir):
    module, files = trained
    with safe_open(str(files["diffusers"]), "pt") as f:
        prefixes = {k.split(".", 1)[0] for k in f.keys()}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    pipe = reloaded(tiny_sdxl_dir, files["diffusers"].parent, files["embeddings"])
    assert pipe.text_encoder_2.peft_config["default_0"].lora_alpha == 2
    compare_with_diffusers(module, pipe, "diffusers")
    card = files["card"].read_text()
    assert "state['clip_g']" in card and "lora_te2_" in card


def test_kohya_file_loads_with_the_diffusers_kohya_loader(trained, tiny_sdxl_dir):
    module, files = trained
    with safe_open(str(files["kohya"]), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert {k.split("_text_model")[0] for k in keys if k.startswith("lora_te")} == {
        "lora_te1",
        "lora_te2",
    }
    assert alphas == {8.0, 4.0, 2.0}  # the real alphas, not the ranks
    pipe = reloaded(tiny_sdxl_dir, files["kohya"], files["embeddings"])
    compare_with_diffusers(module, pipe, "kohya")


def test_continue_training_from_either_layout(trained, tiny_sdxl_dir):
    module, files = trained
    want = {n: p for n, p in module.named_parameters() if p.requires_grad and "lora_" in n}
    for layout in ("diffusers", "kohya"):
        fresh = StableDiffusionLoRA(
            str(tiny_sdxl_dir),
            adapter=AdapterConfig(rank=4, alpha=8, targets="attn_ff"),
            text_encoder_adapter=AdapterConfig(rank=2, alpha=4),
            text_encoder_2_adapter=AdapterConfig(rank=4, alpha=2),
        )
        fresh.configure_model()
        load_lora_into(files[layout], fresh.adapted_components(), fresh.family)
        got = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
        assert want.keys() == got.keys()
        for name, p in want.items():
            assert torch.equal(got[name].reshape(p.shape), p), (layout, name)


def test_generate_command_matches_the_trained_module(trained, tiny_sdxl_dir, tmp_path):
    from lightning_sd.generate import generate

    module, files = trained
    kwargs = dict(steps=1, guidance_scale=4.0, seeds=[0])
    paths = generate(
        str(tiny_sdxl_dir), [PROMPT], loras=[str(files["diffusers"].parent)], sampler="euler",
        out_dir=str(tmp_path), device="cpu", **kwargs,
    )  # fmt: skip
    image = np.asarray(Image.open(paths[0]), dtype=np.int16)
    ours = module.generate([PROMPT], sampler=Euler(), **kwargs)[0]
    ours = (ours * 255).round().permute(1, 2, 0).numpy().astype(np.int16)
    assert image.shape == (32, 32, 3)
    assert np.abs(image - ours).max() <= 1


def test_v_prediction_fit_trains_unet_and_text_encoder_2(tiny_sdxl_dir, instance_dir):
    module = StableDiffusionLoRA(
        str(tiny_sdxl_dir),
        adapter=AdapterConfig(rank=4),
        text_encoder_2_adapter=AdapterConfig(rank=2),
        objective=OBJECTIVES["v"],
        learning_rate=1e-2,
    )
    data = DreamBoothDataModule(
        str(instance_dir), PROMPT, resolution=32, loader=LoaderSettings(batch_size=2)
    )
    trainer = Trainer(max_steps=2, limit_val_batches=0, enable_checkpointing=False, **QUIET)
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    moved = [n for n, p in module.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert any(n.startswith("unet.") for n in moved)
    assert any(n.startswith("text_encoder_2.") for n in moved)


def test_playground_recipe_fits_with_edm_and_exports(tiny_playground_dir, instance_dir, tmp_path):
    from pathlib import Path

    from lightning_sd.cli import main

    configs = Path(__file__).parents[1] / "configs"
    main(
        [
            "fit",
            "--config", str(configs / "tiny.yaml"),
            "--config", str(configs / "experiments" / "playground_tiny.yaml"),
            "--model.pretrained_model_name_or_path", str(tiny_playground_dir),
            "--data.instance_data_dir", str(instance_dir),
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1",
        ]
    )  # fmt: skip
    out = tmp_path / "lightning_logs" / "version_0" / "lora"
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        facts = json.loads(f.metadata()["lightning_sd"])
        assert any(k.startswith("unet.") for k in f.keys())
    assert facts["pipeline"] == "StableDiffusionXLPipeline"
    assert facts["objective"]["init_args"]["parameterization"]["class_path"].endswith(".EDM")


def test_edm_native_model_trains_and_samples_with_its_own_schedule(tiny_playground_dir):
    from diffusers import EDMEulerScheduler

    from lightning_sd.encoding import vae_decode, vae_encode
    from lightning_sd.objectives.schedule import EDMSchedule

    module = StableDiffusionLoRA(str(tiny_playground_dir), objective=OBJECTIVES["edm"])
    module.configure_model()
    scheduler = EDMEulerScheduler.from_pretrained(tiny_playground_dir, subfolder="scheduler")
    schedule = module.objective.schedule
    assert isinstance(schedule, EDMSchedule)
    assert (schedule.sigma_min, schedule.sigma_max) == pytest.approx((0.002, 80.0))
    # D(x; sigma) equals the scheduler's own preconditioning around the same UNet call.
    cond = module.encode_text(PROMPTS)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    for sigma in scheduler.sigmas[[0, 500, 998]]:
        with torch.no_grad():
            ours = module.objective.denoise(module.denoiser_fn, x, sigma.expand(2), **cond)
            f = module.unet(
                scheduler.precondition_inputs(x, sigma),
                scheduler.precondition_noise(sigma).expand(2),
                **cond,
            ).sample
        torch.testing.assert_close(ours, scheduler.precondition_outputs(x, f, sigma))
    # Playground's per-channel latent statistics, as diffusers' SDXL pipeline applies them.
    vae = module.vae
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        raw = vae.encode(pixels).latent_dist.mean
        z = vae_encode(vae, pixels, sample=False)
        torch.testing.assert_close(z, (raw - mean) * vae.config.scaling_factor / std)
        decoded = vae.decode(z * std / vae.config.scaling_factor + mean).sample
        torch.testing.assert_close(vae_decode(vae, z), (decoded / 2 + 0.5).clamp(0, 1))
    images = module.generate(PROMPTS, [0, 1], steps=2)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    assert max_diff(images[0], images[1]) > 1e-3


def test_text_cache_holds_pooled_embeddings(tiny_sdxl_dir, instance_dir, tmp_path):
    module = StableDiffusionLoRA(str(tiny_sdxl_dir))
    data = DreamBoothDataModule(
        str(instance_dir),
        PROMPT,
        resolution=32,
        center_crop=True,
        loader=LoaderSettings(batch_size=2),
        cache=CacheSettings(dir=str(tmp_path), latents=True, text_embeddings=True),
    )
    data.setup("fit")
    data.fill_cache(module)
    batch = next(iter(data.train_dataloader()))
    fresh = module.batch_cond({k: v for k, v in batch.items() if k != "cond"})
    cached = module.batch_cond(batch)
    assert sorted(batch["cond"]) == ["encoder_hidden_states", "text_embeds"]
    torch.testing.assert_close(cached["encoder_hidden_states"], fresh["encoder_hidden_states"])
    for key in ("text_embeds", "time_ids"):
        torch.testing.assert_close(
            cached["added_cond_kwargs"][key], fresh["added_cond_kwargs"][key]
        )
    assert torch.equal(
        fresh["added_cond_kwargs"]["time_ids"], time_ids((32, 32), batch, 2)
    )  # time ids come from the batch's sizes, never from the cache
    # A trainable second text encoder makes cached embeddings stale: refused.
    module.text_encoder_2.get_input_embeddings().weight.requires_grad_(True)
    again = DreamBoothDataModule(
        str(instance_dir),
        PROMPT,
        resolution=32,
        center_crop=True,
        cache=CacheSettings(dir=str(tmp_path), text_embeddings=True),
    )
    again.setup("fit")
    with pytest.raises(ValueError, match="frozen text encoder"):
        again.fill_cache(module)


def test_vae_by_path_and_sd1_adapter_errors(tiny_sdxl_dir, tiny_playground_dir, tiny_pipeline_dir):
    module = StableDiffusionLoRA(
        str(tiny_sdxl_dir), vae_name_or_path=str(tiny_playground_dir / "vae")
    )
    module.configure_model()
    assert module.vae.config.latents_mean is not None  # the given VAE, not the pipeline's
    sd1 = StableDiffusionLoRA(str(tiny_pipeline_dir), text_encoder_2_adapter=AdapterConfig())
    with pytest.raises(ValueError, match="pipeline without text_encoder_2"):
        sd1.configure_model()
    assert unet_conditioning({"encoder_hidden_states": torch.zeros(1)}).keys() == {
        "encoder_hidden_states"
    }


def test_report_round_trip_errors():
    """Print the measured round-trip errors (run with -s); the asserts are in the tests above."""
    for key, value in sorted(ROUND_TRIP.items()):
        print(f"round-trip max abs diff {key}: {value:.3g}")
    assert all(v <= 1e-5 for v in ROUND_TRIP.values())
