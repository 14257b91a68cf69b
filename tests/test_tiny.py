import pytest
import torch

from lightning_sd.tiny import build_tiny_pipeline

PROMPTS = [
    "a photo of sks dog",
    "A Photo of an astronaut riding a horse on the moon, 4k, trending!",
    "portrait of TOK man, oil painting by Rembrandt; dramatic lighting",
    "",
]


def test_pipeline_loads_offline_with_sd15_schedule(tiny_pipeline_dir):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert isinstance(pipe.scheduler, DDPMScheduler)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps) == (
        "scaled_linear",
        0.00085,
        0.012,
        1000,
    )
    # SD1.5's schedule: alphas_cumprod at the last step is 0.00466 (sigma_max 14.61).
    assert pipe.scheduler.alphas_cumprod[-1].item() == pytest.approx(0.0046601, rel=1e-4)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae_scale_factor == 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_open_clip(tiny_pipeline_dir, prompt):
    import open_clip
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(tiny_pipeline_dir, subfolder="tokenizer")
    ref = open_clip.get_tokenizer("ViT-L-14")([prompt])[0]
    ids = ours(prompt, padding="max_length", max_length=77).input_ids
    # open_clip pads with 0, SD1.5's tokenizer with <|endoftext|>; compare up to the padding.
    n = int((ref != 0).sum())
    assert ids[:n] == ref[:n].tolist()
    assert ids[n:] == [49407] * (77 - n)


def test_same_seed_same_weights_and_refuses_nonempty_folder(tmp_path, tiny_pipeline_dir):
    from diffusers import UNet2DConditionModel

    again = build_tiny_pipeline(tmp_path / "again", "tiny", seed=0)
    a = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    b = UNet2DConditionModel.from_pretrained(again, subfolder="unet")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(FileExistsError, match="not empty"):
        build_tiny_pipeline(again, "tiny")
    with pytest.raises(ValueError, match="unknown tiny preset"):
        build_tiny_pipeline(tmp_path / "x", "huge")
