"""Merging LoRA files: each combination against plain diffusers (or peft's own maths), both
input layouts, both output layouts, and clear errors for files that cannot be merged."""

import json
import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft.utils.merge_utils import ties
from safetensors import safe_open

from lightning_sd import AdapterConfig
from lightning_sd.adapters import add_adapter
from lightning_sd.cli import main
from lightning_sd.families import SD1
from lightning_sd.lora_io import LoRAFileError, save_diffusers_lora, save_kohya_lora
from lightning_sd.merge import merge_loras

PROMPT = "a photo of a cat"


def make_lora(base, path, seed, targets="attn_ff", rank=4, kind="lora", text_encoder=True):
    """An adapter with random lora_A and lora_B (alpha = 8), so every module changes."""
    pipe = StableDiffusionPipeline.from_pretrained(base)
    torch.manual_seed(seed)  # lora_A's kaiming init
    parts = {"unet": pipe.unet}
    add_adapter(pipe.unet, AdapterConfig(kind=kind, rank=rank, alpha=8, targets=targets))
    if text_encoder:
        add_adapter(pipe.text_encoder, AdapterConfig(kind=kind, rank=rank, alpha=8))
        parts["text_encoder"] = pipe.text_encoder
    gen = torch.Generator().manual_seed(seed)
    for model in parts.values():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1, generator=gen)
    if path.suffix == ".safetensors":
        return save_kohya_lora(path, parts, SD1())
    return save_diffusers_lora(path, parts, SD1())


def outputs(pipe):
    """Text-encoder output for a prompt and UNet output for fixed latents and conditioning."""
    ids = pipe.tokenizer(
        [PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with torch.no_grad():
        te = pipe.text_encoder(ids)[0]
        unet = pipe.unet(x, torch.tensor([10, 700]), encoder_hidden_states=cond).sample
    return te, unet


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    """One plain diffusers pipeline; ``loaded`` swaps the LoRAs in and out of it."""
    return StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)


def loaded(pipe, files, weights=None):
    """Outputs of plain diffusers with the files loaded together (``set_adapters``)."""
    pipe.unload_lora_weights()
    names = [f"f{i}" for i in range(len(files))]
    for name, path in zip(names, files, strict=True):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=weights or [1.0] * len(files))
    return outputs(pipe)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def sources(tiny_pipeline_dir, pipe, tmp_path_factory):
    """A diffusers-layout file and a kohya-layout one, UNet + text encoder, rank 4, alpha 8."""
    root = tmp_path_factory.mktemp("sources")
    a = make_lora(tiny_pipeline_dir, root / "a", seed=1)
    b = make_lora(tiny_pipeline_dir, root / "b_kohya.safetensors", seed=2)
    return a, b, loaded(pipe, [a]), loaded(pipe, [b])


@pytest.fixture(scope="module")
def cat_merge(tiny_pipeline_dir, sources, tmp_path_factory):
    a, b, _, _ = sources
    out = tmp_path_factory.mktemp("cat")
    return merge_loras(str(tiny_pipeline_dir), [str(a), str(b)], [1.0, 1.0], str(out), "cat")


def test_linear_merge_with_one_weight_reproduces_that_file(
    sources, pipe, tiny_pipeline_dir, tmp_path
):
    a, b, want_a, want_b = sources
    base = str(tiny_pipeline_dir)
    plain = loaded(pipe, [])
    assert min(max_diff(plain, want_a), max_diff(plain, want_b), max_diff(want_a, want_b)) > 1e-2
    # Through the CLI (jsonargparse over the signature), as `lightning-sd merge` runs it.
    main(["merge", base, f"[{a}, {b}]", "[1, 0]", str(tmp_path / "first"), "--combination=linear"])
    second = merge_loras(base, [str(a), str(b)], [0, 1], str(tmp_path / "second"), "linear")
    for out, want in ((tmp_path / "first", want_a), (second["diffusers"].parent, want_b)):
        assert max_diff(loaded(pipe, [out]), want) <= 1e-5
        # The sources' alpha / rank = 2 is folded into the weights: the merge has alpha = rank.
        config = pipe.unet.peft_config["f0"]
        assert (config.r, config.lora_alpha) == (4, 4)


def test_cat_merge_is_the_exact_sum_and_svd_at_full_rank_too(
    sources, cat_merge, pipe, tiny_pipeline_dir, tmp_path
):
    a, b, _, _ = sources
    want = loaded(pipe, [a, b], [1.0, 1.0])
    assert max_diff(loaded(pipe, [cat_merge["diffusers"]]), want) <= 1e-5
    assert pipe.unet.peft_config["f0"].r == 8  # rank 4 + 4

    # Weighted, through the SVD of the full updates: rank 8 holds a sum of two rank-4 updates.
    weights = [0.7, -0.4]
    base = str(tiny_pipeline_dir)
    svd = merge_loras(base, [str(a), str(b)], weights, str(tmp_path), "svd", svd_rank=8)
    assert max_diff(loaded(pipe, [svd["diffusers"]]), loaded(pipe, [a, b], weights)) <= 1e-5


@pytest.mark.parametrize("combination", ["ties", "dare_ties"])
def test_pruning_merges_load_and_differ_from_both_sources(
    combination, sources, pipe, tiny_pipeline_dir, tmp_path
):
    a, b, want_a, want_b = sources
    weights, density = [0.6, 0.8], 0.5
    base = str(tiny_pipeline_dir)
    files = merge_loras(base, [str(a), str(b)], weights, str(tmp_path), combination, density)
    got = loaded(pipe, [files["diffusers"]])
    assert min(max_diff(got, want_a), max_diff(got, want_b)) > 0.1
    key = "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"
    with safe_open(str(files["diffusers"]), "pt") as f:
        facts = json.loads(f.metadata()["lightning_sd"])["merge"]
        merged_A = f.get_tensor(key)
    assert facts["sources"] == [str(a), str(b)]
    assert (facts["weights"], facts["combination"], facts["density"]) == (
        weights,
        combination,
        density,
    )
    if combination == "ties":  # deterministic: pin against peft's TIES on the source matrices
        with safe_open(str(a), "pt") as f:
            a_A = f.get_tensor(key)
        with safe_open(str(b), "pt") as f:
            b_A = f.get_tensor("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight")
        scaled = torch.tensor([math.sqrt(w * 8 / 4) for w in weights])  # sqrt(weight * alpha / r)
        want = ties([a_A, b_A], scaled, density, "total")
        assert torch.allclose(merged_A, want, atol=1e-6)
        assert 0.2 < (merged_A == 0).float().mean() < 0.8
    else:  # random: the seed makes it reproducible
        again = merge_loras(
            base, [str(a), str(b)], weights, str(tmp_path / "again"), combination, density,
            formats=("diffusers",),
        )  # fmt: skip
        with safe_open(str(again["diffusers"]), "pt") as f:
            assert torch.equal(f.get_tensor(key), merged_A)


def test_kohya_output_loads_like_the_diffusers_output(cat_merge, pipe):
    diffusers, kohya = loaded(pipe, [cat_merge["diffusers"]]), loaded(pipe, [cat_merge["kohya"]])
    assert max_diff(diffusers, kohya) <= 1e-5
    with safe_open(str(cat_merge["kohya"]), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert alphas == {8.0}  # rank 8, alpha 8: the sources' scale 2 lives in the weights


def test_files_that_cannot_be_merged_are_refused(sources, tiny_pipeline_dir, tmp_path):
    a, b, _, _ = sources
    base = str(tiny_pipeline_dir)
    unet_only = make_lora(tiny_pipeline_dir, tmp_path / "unet_only", 3, text_encoder=False)
    with pytest.raises(LoRAFileError, match="same components") as err:
        merge_loras(base, [str(a), str(unet_only)], [1, 1], str(tmp_path / "out"))
    assert "unet_only" in str(err.value) and "text_encoder" in str(err.value)

    attn = make_lora(tiny_pipeline_dir, tmp_path / "attn.safetensors", 4, targets="attn")
    with pytest.raises(LoRAFileError, match="different unet modules") as err:
        merge_loras(base, [str(a), str(attn)], [1, 1], str(tmp_path / "out"))
    assert "attn.safetensors" in str(err.value) and "ff.net.0.proj" in str(err.value)

    rank8 = make_lora(tiny_pipeline_dir, tmp_path / "rank8", 5, rank=8)
    with pytest.raises(LoRAFileError, match=r"ranks differ .*'ties'.* use 'cat'"):
        merge_loras(base, [str(a), str(rank8)], [1, 1], str(tmp_path / "out"), "ties", 0.5)

    dora = make_lora(tiny_pipeline_dir, tmp_path / "dora", 6, kind="dora", text_encoder=False)
    with pytest.raises(LoRAFileError, match="DoRA"):
        merge_loras(base, [str(dora), str(dora)], [1, 1], str(tmp_path / "out"))
    with pytest.raises(ValueError, match="one weight per file"):
        merge_loras(base, [str(a), str(b)], [1], str(tmp_path / "out"))
