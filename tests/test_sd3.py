"""SD3.5 Medium end to end on the tiny pipeline (CPU): ``lightning-sd fit`` with LoRA on the
transformer (attn2 included) and both CLIPs, then the files in plain diffusers, the kohya /
ComfyUI layout applied as ComfyUI applies it, ``generate`` against the validation grid, and
``merge``."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from PIL import Image, ImageFont
from safetensors.torch import load_file

from lightning_sd.cli import build_cli
from lightning_sd.families import SD3
from lightning_sd.lora_io import read_safetensors

PROMPT = "a photo of sks cat"
CLIP_SKIP = 1
CONFIGS = Path(__file__).parents[1] / "configs"
SAMPLING = """
trainer:
  callbacks+:
    - class_path: lightning_sd.callbacks.validation_sampling.ValidationSampling
      init_args:
        sampling:
          prompts: ["a photo of sks cat"]
          seeds: [0]
          steps: 2
          guidance_scale: 4.0
          sampler: {{class_path: lightning_sd.sampling.Euler}}
        every_n_steps: 3
        before_training: false
        dirpath: {dirpath}
"""


@pytest.fixture(scope="module")
def fitted(tiny_sd3_dir, instance_dir, tmp_path_factory):
    """Three steps of ``lightning-sd fit`` with the tiny SD3 recipe (alpha != rank everywhere,
    clip skip 1) and a grid at the last step; returns the trained module and the run folder."""
    root = tmp_path_factory.mktemp("sd3_fit")
    sampling = root / "sampling.yaml"
    sampling.write_text(SAMPLING.format(dirpath=root / "samples"))
    cli = build_cli(
        [
            "fit", "--config", str(CONFIGS / "tiny.yaml"),
            "--config", str(CONFIGS / "experiments" / "sd3_tiny.yaml"), "--config", str(sampling),
            "--model.pretrained_model_name_or_path", str(tiny_sd3_dir),
            "--data.instance_data_dir", str(instance_dir), "--data.loader.batch_size", "2",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--export.dirpath", str(root / "lora"),
            "--model.adapter", "{kind: lora, rank: 4, alpha: 8, targets: attn}",
            "--model.text_encoder_adapter", "{kind: lora, rank: 2, alpha: 4}",
            "--model.text_encoder_2_adapter", "{kind: lora, rank: 2, alpha: 1}",
            "--model.clip_skip", str(CLIP_SKIP), "--model.learning_rate", "0.05",
        ]
    )  # fmt: skip
    cli.model.eval()
    return cli.model, root


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 16, 16, generator=gen), torch.tensor([50.0, 900.0])


def transformer_out(family, transformer, cond):
    x, t = inputs()
    with torch.no_grad():
        return family.denoiser_fn(transformer)(x, t, **cond)


def pipeline_text(pipe, prompts):
    """``StableDiffusion3Pipeline.encode_prompt`` with the run's clip skip and T5 length."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, None, None, device="cpu", do_classifier_free_guidance=False,
            clip_skip=CLIP_SKIP, max_sequence_length=77,
        )  # fmt: skip
    return embeds, pooled


def max_diff(a, b) -> float:
    return float((a - b).detach().abs().max())


@pytest.fixture(scope="module")
def reloaded(fitted, tiny_sd3_dir):
    """The base in plain diffusers, and the same with the run's diffusers-layout file."""
    _, root = fitted
    base = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.load_lora_weights(str(root / "lora"))
    return base, pipe


def test_fit_trains_attn2_and_both_clips(fitted):
    module, root = fitted
    assert isinstance(module.family, SD3)
    tensors, header = read_safetensors(root / "lora" / "pytorch_lora_weights.safetensors")
    prefixes = {k.split(".", 1)[0] for k in tensors}
    assert prefixes == {"transformer", "text_encoder", "text_encoder_2"}
    attn2 = [k for k in tensors if ".attn2." in k and "lora_B" in k]
    assert len(attn2) == 4 and all(tensors[k].abs().max() > 1e-3 for k in attn2)
    assert any(".attn.add_q_proj." in k for k in tensors)  # the context stream too


def test_plain_pipeline_reproduces_the_trained_transformer_and_encoders(fitted, reloaded):
    """Same transformer output (alpha != rank: the metadata gives the scale) and same prompt
    embeddings as the module, and different from the base."""
    module, _ = fitted
    base, pipe = reloaded
    text = module.text_embeddings([PROMPT, "a dog"])
    embeds, pooled = pipeline_text(pipe, [PROMPT, "a dog"])
    ours = torch.cat([text["clip_hidden_states"], text["t5_hidden_states"]], dim=1)
    assert max_diff(ours, embeds) <= 1e-5 and max_diff(text["pooled_projections"], pooled) <= 1e-5
    base_embeds, base_pooled = pipeline_text(base, [PROMPT, "a dog"])
    assert max_diff(base_pooled, pooled) > 1e-3  # the CLIP LoRAs act
    family = module.family
    cond = module.family.conditioning(text, (32, 32))
    theirs = transformer_out(family, pipe.transformer, cond)
    assert max_diff(transformer_out(family, module.transformer, cond), theirs) <= 1e-5
    assert max_diff(transformer_out(family, base.transformer, cond), theirs) > 1e-3


def test_plain_pipeline_output_changes_and_attn2_contributes(fitted, reloaded):
    module, _ = fitted
    base, pipe = reloaded

    def image(p):
        return p(
            PROMPT, num_inference_steps=2, height=32, width=32, output_type="pt",
            max_sequence_length=77, generator=torch.Generator().manual_seed(0),
        ).images  # fmt: skip

    assert max_diff(image(base), image(pipe)) > 1e-2
    cond = module.family.conditioning(module.text_embeddings([PROMPT, PROMPT]), (32, 32))
    full = transformer_out(module.family, pipe.transformer, cond)
    attn2_B = [
        p for n, p in pipe.transformer.named_parameters() if ".attn2." in n and "lora_B" in n
    ]
    assert len(attn2_B) == 4
    kept = [p.detach().clone() for p in attn2_B]
    with torch.no_grad():
        for p in attn2_B:
            p.zero_()
        without_attn2 = transformer_out(module.family, pipe.transformer, cond)
        for p, value in zip(attn2_B, kept, strict=True):
            p.copy_(value)
    assert max_diff(full, without_attn2) > 1e-4


def comfy_apply(pipe, kohya: dict[str, torch.Tensor], prefixes: dict[str, str]) -> set[str]:
    """Apply a kohya-layout file as ComfyUI's loader does: a key is the prefix plus a module's
    diffusers name with dots as underscores (``lora_transformer_``, ``lora_te1_text_model_...``);
    W += alpha / rank * up @ down. Returns the keys no module matched (ComfyUI skips those)."""
    names = {}
    for part, prefix in prefixes.items():
        for name, module in getattr(pipe, part).named_modules():
            if isinstance(module, torch.nn.Linear):
                names[prefix + name.replace(".", "_")] = module
    stems = {k.rsplit(".", 2)[0] if "weight" in k else k.rsplit(".", 1)[0] for k in kohya}
    with torch.no_grad():
        for stem in stems & names.keys():
            down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
            scale = float(kohya[f"{stem}.alpha"]) / down.shape[0]
            names[stem].weight += scale * up @ down
    return stems - names.keys()


def test_kohya_layout_applies_as_comfyui_maps_it(fitted, reloaded, tiny_sd3_dir):
    module, root = fitted
    _, pipe = reloaded
    kohya = load_file(str(root / "lora" / "lora_kohya.safetensors"))
    assert {k.split("_", 2)[1] for k in kohya} == {"transformer", "te1", "te2"}
    assert any(k.startswith("lora_transformer_transformer_blocks_0_attn2_to_q") for k in kohya)
    comfy = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    assert comfy_apply(comfy, kohya, module.family.kohya_prefixes) == set()
    embeds, pooled = pipeline_text(comfy, [PROMPT])
    want_embeds, want_pooled = pipeline_text(pipe, [PROMPT])
    assert max_diff(embeds, want_embeds) <= 1e-5 and max_diff(pooled, want_pooled) <= 1e-5
    cond = module.family.conditioning(module.text_embeddings([PROMPT, PROMPT]), (32, 32))
    want = transformer_out(module.family, module.transformer, cond)
    assert max_diff(transformer_out(module.family, comfy.transformer, cond), want) <= 1e-5


def test_generate_gives_the_validation_grid_image(fitted, tiny_sd3_dir, tmp_path):
    """Same LoRA, seed, sampler and clip skip (read from the file): the grid's cell."""
    from lightning_sd.generate import generate

    module, root = fitted
    _, header = read_safetensors(root / "lora" / "pytorch_lora_weights.safetensors")
    assert f'"clip_skip": {CLIP_SKIP}' in header["lightning_sd"]
    paths = generate(
        str(tiny_sd3_dir), [PROMPT], loras=[str(root / "lora")], seeds=[0], steps=2,
        guidance_scale=4.0, sampler="euler", out_dir=str(tmp_path), device="cpu",
    )  # fmt: skip
    image = np.asarray(Image.open(paths[0]), dtype=np.int16)
    grid = np.asarray(Image.open(root / "samples" / "step_000003.png"), dtype=np.int16)
    left = 8 + int(ImageFont.load_default().getlength(PROMPT)) + 2  # grid.image_grid's layout
    cell = grid[16 + 2 : 16 + 2 + 32, left : left + 32]
    assert image.shape == cell.shape == (32, 32, 3)
    assert np.abs(image - cell).max() <= 1
    assert image.std() > 5  # an image, not a flat cell


def test_merge_on_sd3_reproduces_the_single_file(fitted, reloaded, tiny_sd3_dir, tmp_path):
    from lightning_sd.merge import merge_loras

    module, root = fitted
    written = merge_loras(str(tiny_sd3_dir), [str(root / "lora")], [1.0], str(tmp_path), "cat")
    merged = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    merged.load_lora_weights(str(written["diffusers"]))
    cond = module.family.conditioning(module.text_embeddings([PROMPT, PROMPT]), (32, 32))
    want = transformer_out(module.family, module.transformer, cond)
    assert max_diff(transformer_out(module.family, merged.transformer, cond), want) <= 1e-5
    assert max_diff(pipeline_text(merged, [PROMPT])[1], module.text_embeddings([PROMPT])[
        "pooled_projections"]) <= 1e-5  # fmt: skip


def test_text_cache_holds_t5_states_keyed_on_the_t5_length(tiny_sd3_dir, instance_dir, tmp_path):
    from lightning_sd import DreamBoothDataModule, StableDiffusionLoRA
    from lightning_sd.data.settings import CacheSettings, LoaderSettings

    def filled(length):
        module = StableDiffusionLoRA(str(tiny_sd3_dir), family=SD3(max_sequence_length=length))
        data = DreamBoothDataModule(
            str(instance_dir), PROMPT, resolution=32, loader=LoaderSettings(batch_size=2),
            cache=CacheSettings(text_embeddings=True, dir=str(tmp_path)),
        )  # fmt: skip
        data.setup("fit")
        stats = data.fill_cache(module)
        return module, next(iter(data.train_dataloader())), stats

    module, batch, stats = filled(77)
    assert (stats.texts_encoded, stats.texts_cached) == (1, 0)
    cond = batch["cond"]
    assert sorted(cond) == ["clip_hidden_states", "pooled_projections", "t5_hidden_states"]
    assert cond["t5_hidden_states"].shape == (2, 77, 32)
    fresh = module.batch_cond({k: v for k, v in batch.items() if k != "cond"})
    for key, value in module.batch_cond(batch).items():
        torch.testing.assert_close(value, fresh[key])
    _, again, stats = filled(77)
    assert (stats.texts_encoded, stats.texts_cached) == (0, 1)  # served from disk
    _, shorter, stats = filled(16)
    assert (stats.texts_encoded, stats.texts_cached) == (1, 0)  # another length, another entry
    assert shorter["cond"]["t5_hidden_states"].shape == (2, 16, 32)


def test_dreambooth_prior_on_sd3_generates_class_images_and_resumes_exactly(
    tiny_sd3_dir, instance_dir, tmp_path
):
    """Prior preservation with class images the SD3 base generates, and a run continued from
    its checkpoint ending with the uninterrupted run's LoRA, bit for bit."""
    from lightning_sd.cli import main

    def fit(root, steps, *extra):
        main([
            "fit", "--config", str(CONFIGS / "tiny.yaml"),
            "--config", str(CONFIGS / "experiments" / "sd3_tiny.yaml"),
            "--model.pretrained_model_name_or_path", str(tiny_sd3_dir),
            "--model.learning_rate", "0.01",
            "--data.instance_data_dir", str(instance_dir),
            "--data.class_data_dir", str(tmp_path / "class"),
            "--data.class_prompt", "a photo of a cat", "--data.num_class_images", "2",
            "--data.class_generation_steps", "2", "--data.loader.batch_size", "1",
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.limit_val_batches", "0", "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--export.dirpath", str(root / f"{steps}"),
            *extra,
        ])  # fmt: skip
        return read_safetensors(root / f"{steps}" / "pytorch_lora_weights.safetensors")[0]

    straight = fit(tmp_path / "straight", 4)
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == [
        "class_00000.png",
        "class_00001.png",
    ]
    fit(tmp_path / "resumed", 2)
    resumed = fit(tmp_path / "resumed", 4, "--ckpt_path", "last")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(".attn2." in k and straight[k].abs().max() > 0 for k in straight if "lora_B" in k)
