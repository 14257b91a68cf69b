"""torch.compile of the denoiser: the same losses and gradients as eager, under LoRA, DoRA and
gradient checkpointing, the same checkpoint keys, and adapter weights loaded into an already
compiled module (what a resume does) used by its graph.

The tests compile with ``aot_eager``: dynamo's capture and AOTAutograd's joint graph (where a
compiled adapter or checkpointing bug would show) at a fraction of inductor's compile time on
two shared CPU cores. Inductor's numbers are in ``benchmarks/results/compile.md``, whose script
also checks its loss against eager's.
"""

from __future__ import annotations

import pytest
import torch

from lightning_sd import AdapterConfig, StableDiffusionLoRA
from lightning_sd.compilation import is_compiled

PROMPTS = ["a photo of sks cat", "a dog"]


def _module(
    pipeline, kind: str, checkpointing: bool, compile: bool, seed: int = 1
) -> StableDiffusionLoRA:
    torch.manual_seed(0)
    module = StableDiffusionLoRA(
        str(pipeline),
        adapter=AdapterConfig(kind=kind, rank=4, alpha=4),
        gradient_checkpointing=checkpointing,
        compile=compile,
        compile_backend="aot_eager",
    )
    module.configure_model()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B matrices: every adapter weight then gets a gradient
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(p + 0.05 * torch.randn(p.shape, generator=gen))
    return module


def _loss_and_grads(module: StableDiffusionLoRA) -> tuple[torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        cond = module.encode_text(PROMPTS)
    loss = module.objective.loss(module.denoiser_fn, latents, generator=gen, **cond).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind,checkpointing", [("lora", True), ("dora", False)], ids=["lora-checkpointing", "dora"]
)
def test_compiled_denoiser_gives_eager_loss_and_gradients(tiny_pipeline_dir, kind, checkpointing):
    eager = _module(tiny_pipeline_dir, kind, checkpointing, compile=False)
    compiled = _module(tiny_pipeline_dir, kind, checkpointing, compile=True, seed=9)
    assert is_compiled(compiled.denoiser) and not is_compiled(eager.denoiser)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    compiled.configure_model()  # idempotent: the same compiled module, not a second wrap
    assert is_compiled(compiled.denoiser)
    _loss_and_grads(compiled)  # compiled and run with its own (other) adapter weights
    compiled.zero_grad()
    # What resume does: load the checkpoint's adapter-only state into the compiled module.
    compiled.load_state_dict(eager.state_dict(), strict=False)
    loss, grads = _loss_and_grads(eager)
    loss_c, grads_c = _loss_and_grads(compiled)
    assert 0.01 < float(loss) < 10
    assert torch.allclose(loss_c, loss, rtol=1e-5, atol=0)
    assert grads.keys() == grads_c.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        assert torch.allclose(grads_c[name], grad, rtol=1e-4, atol=1e-6), name


def test_unknown_compile_backend_is_refused_by_name(tiny_pipeline_dir):
    with pytest.raises(ValueError, match="compile_backend 'inductr' is not a torch.compile"):
        StableDiffusionLoRA(str(tiny_pipeline_dir), compile=True, compile_backend="inductr")
