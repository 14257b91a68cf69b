"""The kohya / A1111 / ComfyUI LoRA layout (and LyCORIS's LoHa / LoKr keys), from peft state dicts.

diffusers' ``convert_state_dict_to_kohya`` writes alpha = rank whatever the real alpha, emits
text-encoder names that no loader finds under transformers 5 (no ``text_model.`` level), and
drops DoRA magnitudes. The layout itself is a renaming, so it is done here and checked against
diffusers' own kohya-format loader in the tests.
"""

from __future__ import annotations

import re

import torch

__all__ = ["to_kohya"]

_PEFT_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_magnitude_vector|"
    r"hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$"
)


def _text_module(module: str) -> str:
    # transformers 5 dropped CLIPTextModel's text_model. level; the layout keeps it.
    return module if module.startswith("text_model.") else f"text_model.{module}"


def to_kohya(
    peft_state_dicts: dict[str, dict[str, torch.Tensor]],
    alphas: dict[str, float | dict[str, float]],
    prefixes: dict[str, str],
) -> dict[str, torch.Tensor]:
    """Rename peft adapter weights into kohya keys, with each module's real ``.alpha``.

    Args:
        peft_state_dicts: component name (``unet``/``transformer``, ``text_encoder`` ...) ->
            ``get_peft_model_state_dict`` of that component.
        alphas: component name -> the adapter's lora_alpha, or module name -> the alpha that
            gives the module's scale as alpha / (its rank) (rank/alpha patterns, rsLoRA).
        prefixes: component name -> kohya prefix, the family's (``ModelFamily.kohya_prefixes``:
            SD1.x ``lora_te_``, SDXL ``lora_te1_``/``lora_te2_``, SD3 ``lora_transformer_``).

    Returns:
        ``lora_unet_<module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` and, for
        DoRA, ``.dora_scale`` shaped (out, 1, ...) as kohya and LyCORIS store it (the norm is
        taken per output channel, the axis peft's ``lora_magnitude_vector`` uses). LoHa and
        LoKr keep their LyCORIS part names (``hada_w1_a`` ..., ``lokr_w1`` ...), which peft
        shares, with the same ``.alpha``.
    """
    out: dict[str, torch.Tensor] = {}
    for component, state in peft_state_dicts.items():
        for key, tensor in state.items():
            match = _PEFT_KEY.match(key)
            if match is None:
                raise ValueError(f"{component}: unexpected adapter key {key!r}")
            module = match["module"]
            if component.startswith("text_encoder"):
                module = _text_module(module)
            name = prefixes[component] + module.replace(".", "_")
            part = match["part"]
            alpha = alphas[component]
            if isinstance(alpha, dict):
                alpha = alpha[match["module"]]
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
            if part == "lora_A.weight":
                out[f"{name}.lora_down.weight"] = tensor
            elif part.startswith(("hada_", "lokr_")):
                out[f"{name}.{part}"] = tensor
            elif part == "lora_B.weight":
                out[f"{name}.lora_up.weight"] = tensor
            else:
                down = state[f"{match['module']}.lora_A.weight"]
                out[f"{name}.dora_scale"] = tensor.reshape(-1, *[1] * (down.dim() - 1))
    return {k: v.contiguous() for k, v in out.items()}
