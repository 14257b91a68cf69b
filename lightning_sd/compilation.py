"""torch.compile of the denoiser, in place, so nothing else notices it.

``nn.Module.compile`` swaps the module's call for a compiled one and keeps the module itself:
its parameter names, ``state_dict`` keys, peft adapters, checkpoints, resume and exported LoRA
files are exactly the eager module's. ``torch.compile(module)`` instead wraps it in an
``OptimizedModule`` whose keys gain an ``_orig_mod.`` prefix, which would break all of these.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["check_backend", "compile_denoiser", "is_compiled"]


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has already run on this module."""
    return getattr(module, "_compiled_call_impl", None) is not None


def check_backend(backend: str) -> None:
    """Refuse a name ``torch.compile`` does not know, listing the ones it does."""
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"compile_backend {backend!r} is not a torch.compile backend: {known}")


def compile_denoiser(denoiser: nn.Module, backend: str = "inductor") -> None:
    """Compile ``denoiser``'s forward once, after adapters and gradient checkpointing are set.

    The first call traces and compiles (its cost is in ``benchmarks/results/compile.md``);
    later calls reuse the graph while shapes, dtypes and grad mode match (a held-out loss
    under ``no_grad`` compiles a second graph; a second image size makes the sizes dynamic).

    Args:
        denoiser: the UNet or transformer, with its adapters already injected.
        backend: a ``torch.compile`` backend: ``inductor`` (generated kernels, CPU and GPU) or
            ``aot_eager`` (traced graphs run by eager kernels, fast to compile; for debugging).

    Raises:
        ValueError: an unknown backend, named with the ones this torch has.
    """
    check_backend(backend)
    if not is_compiled(denoiser):
        denoiser.compile(backend=backend)
