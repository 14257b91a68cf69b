"""CPU-side memory accounting of SD1.5-size 512 px LoRA training, per memory switch.

Nothing is downloaded or computed: SD1.5's UNet is built from its config on the ``meta``
device (shapes only), LoRA rank ``--rank`` is injected, and one training forward runs there at
512 px (64x64 latents, 77 tokens) under ``torch.autograd.graph.saved_tensors_hooks``, which
sees every tensor autograd keeps for the backward pass. Its bytes follow from shapes and
dtypes, so the activation count is exact for this graph at full resolution, with no scaling.
Saved tensors are counted once (by identity of the tensor or its base), frozen weights are
excluded (they are counted as parameters).

- Parameters: the frozen base at its dtype (fp32, fp16, or NF4: 4 bits per linear weight plus
  one fp32 absmax per 64 weights, double-quantized to ~0.127 bit/weight, convolutions and norms
  stay fp16), and the float32 adapters.
- Optimizer state: AdamW keeps two fp32 moments per adapter weight; bitsandbytes' 8-bit AdamW
  keeps two uint8 moments plus one fp32 absmax per 256 values for tensors of >= 4096 elements
  and fp32 moments for smaller ones (its ``min_8bit_size``). Gradients: one fp32 per adapter
  weight.
- Activations: PyTorch's CPU/meta SDPA saves the attention matrix (the math path); on a GPU
  the flash / memory-efficient kernels save only the output and a log-sum-exp, so the attention
  matrices are reported apart and left out of the GPU estimate.
- Not counted: the VAE and text encoder (the latent and text caches take them out of training;
  without caching add ~0.33 GB (VAE) + ~0.49 GB (CLIP-L) in fp32, half that in fp16), CUDA
  context (~0.3-0.5 GB), allocator fragmentation, temporary buffers within one op.

The GPU peak is unmeasured (no GPU was lent); these numbers are what it must hold.

    python benchmarks/memory_accounting.py   # -> benchmarks/results/memory.{csv,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import atomic_write, markdown_table, sd15_unet, write_csv  # noqa: E402

from lightning_sd.adapters import AdapterConfig, add_adapter  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1e9


def saved_activation_bytes(unet, batch: int, side: int, dtype: torch.dtype) -> tuple[int, int]:
    """(bytes autograd saves for backward, of which attention-probability matrices)."""
    params = {id(p) for p in unet.parameters()}
    seen: dict[int, torch.Tensor] = {}
    tokens = side * side

    def pack(t: torch.Tensor):
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            seen.setdefault(id(base), base)
        return t

    x = torch.randn(batch, 4, side, side, device="meta", dtype=dtype)
    cond = torch.randn(batch, 77, 768, device="meta", dtype=dtype)
    t = torch.full((batch,), 500, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    total = sum(b.numel() * b.element_size() for b in seen.values())
    attention = sum(
        b.numel() * b.element_size()
        for b in seen.values()
        if b.ndim >= 2
        and b.shape[-2] in (tokens, tokens // 4, tokens // 16, tokens // 64)
        and b.shape[-1] in (b.shape[-2], 77)
    )
    del out
    return total, attention


def adam_state_bytes(shapes: list[int], eight_bit: bool) -> int:
    if not eight_bit:
        return sum(2 * 4 * n for n in shapes)
    return sum((2 * n + 2 * 4 * -(-n // 256)) if n >= 4096 else 2 * 4 * n for n in shapes)


def linear_weights(unet) -> dict[int, int]:
    """id -> size of every frozen ``nn.Linear`` weight: what ``quantize_base`` quantizes."""
    return {
        id(m.weight): m.weight.numel()
        for m in unet.modules()
        if type(m) is torch.nn.Linear and not m.weight.requires_grad
    }


def base_bytes(unet, frozen: str) -> int:
    linear = linear_weights(unet)
    total = 0
    for p in unet.parameters():
        if p.requires_grad:
            continue
        if frozen == "nf4" and id(p) in linear:
            total += p.numel() * (4 + 0.127) / 8  # QLoRA: NF4 + double-quantized absmax
        else:
            total += p.numel() * (4 if frozen == "fp32" else 2)
    return int(total)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "memory")
    args = parser.parse_args(argv)
    with torch.device("meta"):
        unet = sd15_unet().requires_grad_(False)
    add_adapter(unet, AdapterConfig(rank=args.rank))
    adapters = [p.numel() for p in unet.parameters() if p.requires_grad]
    n_base = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    n_linear = sum(linear_weights(unet).values())
    activations = {}
    for checkpointing, dtype in (
        (False, torch.float32),
        (False, torch.float16),
        (True, torch.float16),
    ):
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.to(dtype)  # the fp16 pass runs the adapters in fp16 too: their activations are tiny
        activations[checkpointing, dtype] = saved_activation_bytes(unet, args.batch, 64, dtype)
    unet.float()
    setups = [  # name, frozen dtype, activation dtype, checkpointing, 8-bit Adam
        ("fp32, nothing on", "fp32", torch.float32, False, False),
        ("fp16 mixed precision", "fp16", torch.float16, False, False),
        ("+ gradient checkpointing", "fp16", torch.float16, True, False),
        ("+ 8-bit AdamW", "fp16", torch.float16, True, True),
        ("+ NF4 base (all on)", "nf4", torch.float16, True, True),
        ("NF4 base alone (fp16 compute)", "nf4", torch.float16, False, False),
    ]
    rows = []
    for name, frozen, act_dtype, ckpt, eight in setups:
        saved, attention = activations[ckpt, act_dtype]
        row = {
            "setup": name,
            "base_gb": base_bytes(unet, frozen) / GB,
            "adapters_gb": 4 * sum(adapters) / GB,
            "grads_gb": 4 * sum(adapters) / GB,
            "optimizer_gb": adam_state_bytes(adapters, eight) / GB,
            "activations_saved_gb": saved / GB,
            "of_which_attention_matrices_gb": attention / GB,
        }
        row["total_gpu_estimate_gb"] = (
            row["base_gb"] + 2 * row["adapters_gb"] + row["optimizer_gb"] + (saved - attention) / GB
        )
        rows.append({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    write_csv(args.out.with_suffix(".csv"), rows)
    cmd = "python benchmarks/memory_accounting.py" + ("" if argv is None else " " + " ".join(argv))
    header = list(rows[0])
    lines = [
        "# Memory accounting: SD1.5 UNet, 512 px, LoRA training (CPU-side, no GPU measured)",
        "",
        f"Command: `{cmd}`. SD1.5's UNet from its config on the meta device ({n_base / 1e6:.1f} M "
        f"frozen parameters, {n_linear / 1e6:.1f} M of them in linear layers, which NF4 "
        f"quantizes), LoRA rank {args.rank} on the attention projections "
        f"({sum(adapters) / 1e6:.2f} M float32 parameters), batch {args.batch}, 64x64 latents, "
        "77 tokens. Activations are the bytes autograd saves for the backward pass in one "
        "forward, counted exactly from shapes with saved-tensor hooks at full resolution (no "
        "scaling). GB = 1e9 bytes. The latent and text caches are assumed (VAE and text "
        "encoder not resident).",
        "",
        *markdown_table(header, [[r[k] for k in header] for r in rows]),
        "",
        "`total_gpu_estimate_gb` = base + adapters + gradients + optimizer state + saved "
        "activations without the attention matrices (a GPU's flash / memory-efficient "
        "attention does not store them; PyTorch's CPU path does). It leaves out the CUDA "
        "context (~0.3-0.5 GB), allocator fragmentation and per-op workspace, so a measured "
        "GPU peak will be higher. With gradient checkpointing, the backward pass also "
        "recomputes one checkpointed block's activations at a time (the largest, a 64x64 "
        "attention block), which the saved-tensor count does not include. **The GPU peak is unmeasured: no GPU was lent to this "
        "task.** Goal: at most 6 GB with all switches on.",
        "",
    ]
    atomic_write(args.out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
