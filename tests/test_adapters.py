"""Adapters and their files: zero init, LoRA/DoRA round trips through plain diffusers, kohya,
text-encoder adapters, pivotal tuning, continuing from a file, clear errors."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.adapters import add_adapter
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.families import SD1
from lightning_sd.lora_io import LoRAFileError, load_lora_into
from lightning_sd.pivotal import PivotalTuning

PROMPT = "a photo of TOK cat"


def unet_out(unet, encoder_hidden_states, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=encoder_hidden_states).sample


def text_ids(tokenizer, prompt):
    return tokenizer(
        [prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids


def train_steps(module, steps=3, lr=5e-2):
    """A few real optimisation steps of the module's own loss, so every adapter moves."""
    module.configure_model()
    torch.manual_seed(0)
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "prompt": [PROMPT, "a photo of a dog"],
        "loss_weight": torch.ones(2),
    }
    groups = module.param_groups()
    for g in groups:
        g["lr"] = lr
    optimizer = torch.optim.AdamW(groups)
    for _ in range(steps):
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad()
    module.eval()
    return module


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("targets", ["attn", "attn_ff", "full"])
def test_zero_init_adapters_leave_the_unet_unchanged(tiny_pipeline_dir, kind, targets):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    base = unet_out(pipe.unet, cond)
    add_adapter(pipe.unet, AdapterConfig(kind=kind, rank=4, alpha=8, targets=targets))
    assert torch.equal(unet_out(pipe.unet, cond), base)
    names = {n.rsplit(".lora_", 1)[0] for n, p in pipe.unet.named_parameters() if p.requires_grad}
    assert any(n.endswith("to_q") for n in names)
    assert any(n.endswith("ff.net.2") for n in names) == (targets != "attn")
    assert any(n.endswith("resnets.0.conv1") for n in names) == (targets == "full")


@pytest.fixture(scope="module", params=["lora", "dora"])
def trained(request, tiny_pipeline_dir, tmp_path_factory):
    """UNet + text-encoder adapters (alpha = 2 x rank) after real steps, exported."""
    kind = request.param
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(kind=kind, rank=4, alpha=8, targets="attn_ff"),
        text_encoder_adapter=AdapterConfig(kind=kind, rank=2, alpha=4),
    )
    train_steps(module)
    out = tmp_path_factory.mktemp(f"export_{kind}")
    files = export_adapters(module, out, trigger=PROMPT)
    return kind, module, files


def test_diffusers_file_reproduces_unet_and_text_encoder(trained, tiny_pipeline_dir):
    kind, module, files = trained
    ids = text_ids(module.tokenizer, PROMPT)
    with torch.no_grad():
        te_trained = module.text_encoder(ids)[0]
    cond = te_trained.expand(2, -1, -1)
    unet_trained = unet_out(module.unet, cond)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert (unet_out(pipe.unet, cond) - unet_trained).abs().max() > 1e-3  # training moved it
    pipe.load_lora_weights(files["diffusers"].parent)
    with torch.no_grad():
        te_loaded = pipe.text_encoder(ids)[0]
    assert (te_loaded - te_trained).abs().max() <= 1e-5
    assert (unet_out(pipe.unet, cond) - unet_trained).abs().max() <= 1e-5
    config = pipe.unet.peft_config["default_0"]
    assert (config.r, config.lora_alpha, config.use_dora) == (4, 8, kind == "dora")


def test_metadata_and_model_card(trained):
    _, module, files = trained
    with safe_open(str(files["diffusers"]), "pt") as f:
        meta = f.metadata()
    import json

    facts = json.loads(meta["lightning_sd"])
    assert facts["base_model"] == module.hparams.pretrained_model_name_or_path
    assert facts["adapter"]["rank"] == 4 and facts["adapter"]["alpha"] == 8
    assert facts["objective"]["class_path"].endswith("DiffusionObjective")
    card = files["card"].read_text()
    assert f"base_model: {facts['base_model']}" in card
    assert f"instance_prompt: {PROMPT}" in card
    assert "load_lora_weights" in card


def test_kohya_file_loads_in_diffusers_kohya_loader(trained, tiny_pipeline_dir):
    kind, module, files = trained
    if kind == "dora":
        assert "kohya" not in files  # refused, never a silently different model
        return
    with safe_open(str(files["kohya"]), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
    assert any(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_") for k in keys)
    assert alphas == {8.0, 4.0}  # the real alphas, not the ranks
    ids = text_ids(module.tokenizer, PROMPT)
    with torch.no_grad():
        te_trained = module.text_encoder(ids)[0]
    cond = te_trained.expand(2, -1, -1)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_lora_weights(str(files["kohya"]))
    with torch.no_grad():
        assert (pipe.text_encoder(ids)[0] - te_trained).abs().max() <= 1e-5
    assert (unet_out(pipe.unet, cond) - unet_out(module.unet, cond)).abs().max() <= 1e-5


def test_continue_training_from_either_layout(trained, tiny_pipeline_dir):
    kind, module, files = trained
    for layout in ("diffusers", "kohya"):
        if layout not in files:
            continue
        fresh = StableDiffusionLoRA(
            str(tiny_pipeline_dir),
            adapter=AdapterConfig(kind=kind, rank=4, alpha=8, targets="attn_ff"),
            text_encoder_adapter=AdapterConfig(kind=kind, rank=2, alpha=4),
            lora_weights=str(files[layout]),
        )
        fresh.configure_model()
        want = {n: p for n, p in module.named_parameters() if p.requires_grad}
        got = {n: p for n, p in fresh.named_parameters() if p.requires_grad}
        assert want.keys() == got.keys()
        for name, p in want.items():
            assert torch.equal(got[name].reshape(p.shape), p), (layout, name)


def test_file_for_another_architecture_and_truncated_file(trained, tmp_path, tiny_pipeline_dir):
    from lightning_sd.tiny import build_tiny_pipeline

    _, _, files = trained
    other = StableDiffusionPipeline.from_pretrained(build_tiny_pipeline(tmp_path / "o", "small"))
    add_adapter(other.unet, AdapterConfig(rank=4, alpha=8, targets="attn_ff"))
    add_adapter(other.text_encoder, AdapterConfig(rank=2, alpha=4))
    parts = {"unet": other.unet, "text_encoder": other.text_encoder}
    with pytest.raises(LoRAFileError, match=r"modules of the file are not adapted") as err:
        load_lora_into(files["diffusers"], parts, SD1())
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn1" in str(err.value)

    data = files["diffusers"].read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoRAFileError, match=r"cut\.safetensors.*truncated or corrupt"):
        load_lora_into(cut, parts, SD1())


def test_alpha_mismatch_is_refused(trained, tiny_pipeline_dir):
    kind, _, files = trained
    wrong = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(kind=kind, rank=4, alpha=4, targets="attn_ff"),
        text_encoder_adapter=AdapterConfig(kind=kind, rank=2, alpha=4),
        lora_weights=str(files["diffusers"]),
    )
    with pytest.raises(LoRAFileError, match="alpha"):
        wrong.configure_model()


def test_pivotal_tuning_trains_only_new_rows_and_loads_as_textual_inversion(
    tiny_pipeline_dir, tmp_path
):
    pivotal = PivotalTuning(num_tokens=2, initializer="cat", learning_rate=5e-2)
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), pivotal_tuning=pivotal)
    module.configure_model()
    embedding = module.text_encoder.get_input_embeddings()
    before = embedding.weight.detach().clone()
    assert module.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"]) == [49408, 49409]
    assert module.tokenizer.tokenize(pivotal.substitute(PROMPT))[3:5] == ["<s0>", "<s1>"]
    train_steps(module, steps=2)
    after = embedding.weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [49408, 49409]

    files = export_adapters(module, tmp_path / "export", trigger=PROMPT)
    prompt = pivotal.substitute(PROMPT)
    with torch.no_grad():
        want = module.text_encoder(text_ids(module.tokenizer, prompt))[0]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    with safe_open(str(files["embeddings"]), "pt") as f:
        rows = f.get_tensor("clip_l")
    assert rows.shape == (2, 32)
    pipe.load_textual_inversion(
        list(rows), token=pivotal.tokens, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    with torch.no_grad():
        got = pipe.text_encoder(text_ids(pipe.tokenizer, prompt))[0]
    assert (got - want).abs().max() <= 1e-5
    assert "load_textual_inversion" in files["card"].read_text()


def test_embeddings_stop_training_after_train_fraction(tiny_pipeline_dir):
    from lightning_sd.optim import lr_lambda

    factor = lr_lambda("constant", warmup_steps=0, total_steps=10, stop_step=5)
    assert [factor(s) for s in range(10)] == [1.0] * 5 + [0.0] * 5
    cosine = lr_lambda("cosine", warmup_steps=2, total_steps=10)
    assert [round(cosine(s), 6) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_fit_with_every_adapter_fragment_exports_all_files(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    from pathlib import Path

    from lightning_sd.cli import main

    configs = Path(__file__).parents[1] / "configs"
    main(
        [
            "fit",
            "--config", str(configs / "tiny.yaml"),
            "--config", str(configs / "adapter" / "dora.yaml"),
            "--config", str(configs / "adapter" / "text_encoder.yaml"),
            "--config", str(configs / "adapter" / "pivotal.yaml"),
            "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
            "--data.instance_data_dir", str(instance_dir),
            "--data.instance_prompt", "a photo of TOK cat",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.max_steps", "2",
            "--trainer.val_check_interval", "2",
        ]
    )  # fmt: skip
    out = tmp_path / "lightning_logs" / "version_0" / "lora"
    names = sorted(p.name for p in out.iterdir())
    # DoRA: the diffusers layout only; the kohya layout is refused, not written wrong.
    assert names == ["README.md", "embeddings.safetensors", "pytorch_lora_weights.safetensors"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("text_encoder.") for k in keys)
    assert any(k.startswith("unet.") and "magnitude" in k for k in keys)
    assert "instance_prompt: a photo of TOK cat" in (out / "README.md").read_text()
