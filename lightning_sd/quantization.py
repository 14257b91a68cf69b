"""A quantized frozen base (QLoRA, Dettmers et al. 2023): the denoiser's linear layers stored in
4-bit NF4 or 8-bit integers by bitsandbytes, adapters on top in float32.

diffusers' own ``BitsAndBytesConfig`` loading refuses to run without a GPU, so the layers are
swapped here, after loading and before the adapters: each ``nn.Linear`` becomes a bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` holding the same weight, under the same name. peft then wraps
those (its bnb LoRA and DoRA layers), so adapter names, checkpoints and exported LoRA files are
exactly those of an unquantized base, and load on one. Convolutions, norms and embeddings stay
in their dtype. bitsandbytes 0.50 quantizes, runs forward and backward of both on the CPU
(checked here); peak memory and speed on a GPU are not measured (docs/training.md).
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from torch import nn

__all__ = ["QuantizedBase", "quantize_linear_layers"]

#: ``nf4``: 4-bit NormalFloat with double quantization (QLoRA's choice); ``int8``: LLM.int8()
#: row-wise 8-bit weights (Dettmers et al. 2022) without outlier decomposition.
QuantizedBase = Literal["nf4", "int8"]


def _import_bnb():
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "quantize_base needs bitsandbytes: pip install 'lightning-sd[bnb]'"
        ) from err
    return bitsandbytes


@functools.cache
def _int8_linear_class() -> type:
    bnb = _import_bnb()

    class Int8Linear(bnb.nn.Linear8bitLt):
        """``Linear8bitLt`` that keeps its row scales when its weight is moved after a forward.

        bitsandbytes 0.50's ``Int8Params.to`` gives the moved weight the int8 rows but no
        scales, and the next forward would copy those missing scales into the layer's state
        (checked on CPU: the forward then fails); the state's scales are kept instead.
        """

        def init_8bit_state(self) -> None:
            if self.weight.SCB is not None:
                self.state.SCB = self.weight.SCB
            self.state.CB = self.weight.CB
            self.weight.CB = self.weight.SCB = None

    return Int8Linear


def _quantized(linear: nn.Linear, kind: QuantizedBase, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _import_bnb()
    has_bias = linear.bias is not None
    weight = linear.weight.data
    if kind == "nf4":
        layer = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            compute_dtype=compute_dtype,
            compress_statistics=True,  # double quantization of the absmax constants
            quant_type="nf4",
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
        )
    else:
        layer = _int8_linear_class()(
            linear.in_features,
            linear.out_features,
            bias=has_bias,
            has_fp16_weights=False,
            threshold=0.0,
            device="meta",
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    layer = layer.to(weight.device)  # moving a bitsandbytes parameter quantizes it
    if kind == "int8":
        # The layer's state gets the int8 rows' scales now (its first forward would move them
        # there): peft's DoRA dequantizes the weight before any forward and reads them there.
        layer.state.CB, layer.state.SCB = layer.weight.CB, layer.weight.SCB
    return layer


def quantize_linear_layers(
    model: nn.Module, kind: QuantizedBase, compute_dtype: torch.dtype = torch.float32
) -> int:
    """Replace every ``nn.Linear`` of a frozen ``model`` by its bitsandbytes quantized form.

    Call before injecting adapters (peft then wraps the quantized layers).

    Args:
        model: the frozen denoiser.
        kind: ``nf4`` or ``int8``.
        compute_dtype: the dtype NF4 layers dequantize to for their matmul (the frozen base's
            mixed-precision dtype; float32 on the CPU).

    Returns:
        How many layers were replaced.

    Raises:
        ValueError: an unknown kind, or a model with trainable weights or adapters already.
    """
    if kind not in ("nf4", "int8"):
        raise ValueError(f"quantize_base must be 'nf4' or 'int8', got {kind!r}")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(
            f"quantize_base quantizes a frozen base, but {type(model).__name__} has trainable "
            f"weights (e.g. {trainable[0]}): quantize before adding adapters, and not under "
            "full fine-tuning"
        )
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _quantized(linear, kind, compute_dtype))
    # The flags diffusers sets on models it loads quantized: peft reads them to wrap these
    # layers with its bitsandbytes LoRA/DoRA classes (which dequantize for DoRA's norm).
    model.is_loaded_in_4bit = kind == "nf4"
    model.is_loaded_in_8bit = kind == "int8"
    return len(targets)
