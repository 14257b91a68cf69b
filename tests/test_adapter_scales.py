"""rsLoRA, PiSSA / OLoRA initialisation, rank/alpha patterns and LoRA+: the scale each module
gets, the start the methods promise, the files that reload at the trained strength, and the
B matrices' learning rate."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from test_adapters import PROMPT, text_ids, train_steps, unet_out

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.adapters import add_adapter
from lightning_sd.callbacks.export import export_adapters
from lightning_sd.lora_io import LoRAFileError, read_safetensors

PATTERNS = dict(
    rank_pattern={r"^up_blocks\.1\..*": 8, r".*attn2\.to_k$": 2},
    alpha_pattern={r"^down_blocks\.0\..*": 1.5},
)
CASES = {
    "rslora": AdapterConfig(rank=4, alpha=8, use_rslora=True, targets="attn_ff"),
    "pissa": AdapterConfig(rank=4, alpha=4, init="pissa", targets="attn"),
    "olora": AdapterConfig(rank=4, alpha=8, init="olora", targets="attn"),
    "patterns": AdapterConfig(rank=4, alpha=8, targets="attn_ff", **PATTERNS),
}


def layer(unet, name):
    return unet.get_submodule(name)


def test_rslora_scale_is_alpha_over_sqrt_rank(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    add_adapter(pipe.unet, AdapterConfig(rank=16, alpha=8, use_rslora=True))
    q = layer(pipe.unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert q.scaling["default"] == pytest.approx(8 / 16**0.5)


def test_patterns_give_per_module_rank_and_alpha(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    add_adapter(pipe.unet, CASES["patterns"])
    got = {
        n: (m.r["default"], m.scaling["default"])
        for n, m in pipe.unet.named_modules()
        if isinstance(getattr(m, "scaling", None), dict)
    }
    up = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    down = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k2 = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
    mid = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    assert got[up] == (8, 8 / 8) and got[down] == (4, 1.5 / 4)
    assert got[k2] == (2, 8 / 2) and got[mid] == (4, 8 / 4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_start_at_the_base_output_with_a_residual_base(tiny_pipeline_dir, init):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    base = unet_out(pipe.unet, cond)
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w0 = layer(pipe.unet, name).weight.detach().clone()
    with pytest.raises(ValueError, match="Linear layers only"):  # proj_in is a Conv2d here
        add_adapter(pipe.unet, AdapterConfig(rank=4, init=init, targets=["proj_in"]))
    add_adapter(pipe.unet, AdapterConfig(rank=4, alpha=4, init=init, targets="attn"))
    q = layer(pipe.unet, name)
    # The adapter took the principal part (PiSSA: top-r singular triplets): the base is
    # the residual W - s B A, and the sum is the original weight.
    delta = q.get_delta_weight("default").detach()
    assert (q.base_layer.weight - w0).abs().max() > 1e-2
    assert (q.base_layer.weight + delta - w0).abs().max() <= 1e-5
    if init == "pissa":
        s = torch.linalg.svdvals(w0)
        top = torch.linalg.svdvals(delta)[:4]
        torch.testing.assert_close(top, s[:4], rtol=1e-4, atol=1e-6)
    assert (unet_out(pipe.unet, cond) - base).abs().max() <= 1e-5


@pytest.fixture(scope="module", params=list(CASES))
def trained(request, tiny_pipeline_dir, tmp_path_factory):
    config = CASES[request.param]
    te = AdapterConfig(rank=2, alpha=4, use_rslora=request.param == "rslora")
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=config, text_encoder_adapter=te)
    train_steps(module)
    files = export_adapters(module, tmp_path_factory.mktemp(request.param), trigger=PROMPT)
    return request.param, module, files


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_files_reload_at_the_trained_strength(trained, tiny_pipeline_dir, layout):
    case, module, files = trained
    ids = text_ids(module.tokenizer, PROMPT)
    with torch.no_grad():
        te_trained = module.text_encoder(ids)[0]
    cond = te_trained.expand(2, -1, -1)
    unet_trained = unet_out(module.unet, cond)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    assert (unet_out(pipe.unet, cond) - unet_trained).abs().max() > 1e-3
    pipe.load_lora_weights(str(files[layout]))
    with torch.no_grad():
        assert (pipe.text_encoder(ids)[0] - te_trained).abs().max() <= 1e-5
    assert (unet_out(pipe.unet, cond) - unet_trained).abs().max() <= 1e-5
    if case in ("pissa", "olora"):  # the update of the original base: a plain rank-2r LoRA
        tensors, _ = read_safetensors(files[layout])
        down = [v for k, v in tensors.items() if k.endswith(("lora_A.weight", "lora_down.weight"))]
        assert {v.shape[0] for v in down} == {8, 2}  # UNet 2 x 4; text encoder (default init) 2


def test_continuing_needs_the_same_scales(trained, tiny_pipeline_dir):
    case, module, files = trained
    if case in ("pissa", "olora"):
        fresh = StableDiffusionLoRA(
            str(tiny_pipeline_dir), adapter=CASES[case], lora_weights=str(files["diffusers"])
        )
        with pytest.raises(LoRAFileError, match="PiSSA/OLoRA"):
            fresh.configure_model()
        return
    te = module.text_encoder_adapter
    for layout in ("diffusers", "kohya"):
        same = StableDiffusionLoRA(
            str(tiny_pipeline_dir),
            adapter=CASES[case],
            text_encoder_adapter=te,
            lora_weights=str(files[layout]),
        )
        same.configure_model()
        mine = dict(module.named_parameters())
        for name, param in same.named_parameters():
            if param.requires_grad:
                assert torch.equal(param, mine[name]), (layout, name)
        changed = {"rslora": {"use_rslora": False}, "patterns": {"alpha_pattern": {}}}[case]
        other = StableDiffusionLoRA(
            str(tiny_pipeline_dir),
            adapter=AdapterConfig(**{**vars(CASES[case]), **changed}),
            text_encoder_adapter=te,
            lora_weights=str(files[layout]),
        )
        with pytest.raises(LoRAFileError, match="alpha differs"):
            other.configure_model()


def test_loraplus_trains_b_at_ratio_times_the_rate(tiny_pipeline_dir):
    lr, ratio = 1e-3, 16.0
    module = StableDiffusionLoRA(
        str(tiny_pipeline_dir),
        adapter=AdapterConfig(rank=4, loraplus_lr_ratio=ratio),
        text_encoder_adapter=AdapterConfig(rank=2, loraplus_lr_ratio=4.0),
        learning_rate=lr,
        text_encoder_lr=lr / 2,
    )
    module.configure_model()
    torch.manual_seed(0)
    for name, p in module.named_parameters():
        if "lora_B" in name:  # B = 0 would leave A without gradient at the first step
            torch.nn.init.normal_(p, std=0.1)
    groups = module.param_groups()
    named = {id(p): n for n, p in module.named_parameters()}
    by_name = {g["name"]: g for g in groups}
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("unet", lr), ("unet.lora_B", lr * ratio),
        ("text_encoder", lr / 2), ("text_encoder.lora_B", lr / 2 * 4.0),
    ]  # fmt: skip
    assert all(".lora_B." in named[id(p)] for p in by_name["unet.lora_B"]["params"])
    assert all(".lora_A." in named[id(p)] for p in by_name["unet"]["params"])
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    # Adam's first step moves every entry by its group's rate (|m / sqrt(v)| = 1).
    for g in groups:
        g["weight_decay"] = 0.0
    before = {id(p): p.detach().clone() for p in trainable}
    batch = {
        "pixel_values": torch.rand(2, 3, 32, 32) * 2 - 1,
        "prompt": [PROMPT, "a dog"],
        "loss_weight": torch.ones(2),
    }
    torch.manual_seed(0)
    module.training_step(batch, 0).backward()
    torch.optim.AdamW(groups, eps=1e-30).step()
    for g in groups:
        steps = torch.cat([(p.detach() - before[id(p)]).abs().flatten() for p in g["params"]])
        moved = steps[steps > 0]
        assert moved.median() == pytest.approx(g["lr"], rel=1e-3), g["name"]
