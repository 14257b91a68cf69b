"""Adapter weights to and from disk: diffusers and kohya layouts, with metadata, atomically.

Writing goes through diffusers' ``save_lora_weights`` (the diffusers layout) or ``kohya.py``
(the A1111/ComfyUI layout); reading maps either layout back onto the modules of a model that
already carries the configured adapter, so a file for another architecture, rank or target set
fails with the names of the modules that do not match.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_sd.atomic import atomic_path
from lightning_sd.families.base import ModelFamily
from lightning_sd.kohya import to_kohya

__all__ = [
    "KOHYA_WEIGHT_NAME",
    "LORA_WEIGHT_NAME",
    "LoRAFileError",
    "adapter_state_dict",
    "load_lora_into",
    "read_safetensors",
    "read_safetensors_metadata",
    "save_diffusers_lora",
    "save_kohya_lora",
    "write_safetensors",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"
METADATA_KEY = "lightning_sd"


class LoRAFileError(ValueError):
    """A LoRA file that cannot be used with this model; the message says which modules and why."""


# -- plain safetensors I/O ---------------------------------------------------------------------
def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None):
    """``safetensors.torch.save_file`` through a temporary file and a rename: never half a file."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return Path(path)


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata, with an error that names the file when it is damaged."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        msg = f"{path}: not a readable safetensors file, truncated or corrupt ({err})"
        raise LoRAFileError(msg) from err


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Only the header metadata: no tensor is read (LoRA files can be hundreds of MB)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        msg = f"{path}: not a readable safetensors file, truncated or corrupt ({err})"
        raise LoRAFileError(msg) from err


# -- writing -----------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's weights with peft key names (``<module>.lora_A.weight`` ...).

    diffusers' loader reads peft names directly. Its ``convert_state_dict_to_diffusers`` is
    not used: it renames attention projections only, and a file that mixes both namings (e.g.
    with ``proj_in`` targets) loses the renamed modules on load.
    """
    from peft.utils import get_peft_model_state_dict

    # contiguous: merged adapters (SVD slices) are views that safetensors refuses to write.
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {k: v.contiguous() for k, v in state.items()}


def _text_encoder_layers(model: nn.Module, adapter_name: str) -> dict:
    """Text-encoder keys in the layout every loader reads.

    transformers 5 dropped ``text_model.`` from ``CLIPTextModel`` keys; files keep it. DoRA
    magnitudes need a ``.weight`` suffix for diffusers' text-encoder loader to apply them.
    """
    state = adapter_state_dict(model, adapter_name)
    prefix = "" if hasattr(model, "text_model") else "text_model."
    return {
        prefix + (k + ".weight" if k.endswith("lora_magnitude_vector") else k): v
        for k, v in state.items()
    }


def adapted(components: dict[str, nn.Module | None]) -> dict[str, nn.Module]:
    """The components that carry a peft adapter."""
    return {
        n: m for n, m in components.items() if m is not None and getattr(m, "peft_config", None)
    }


def save_diffusers_lora(
    out_dir: str | Path,
    components: dict[str, nn.Module | None],
    family: ModelFamily,
    metadata: dict | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipeline.load_lora_weights`` reads.

    The adapter metadata (rank, alpha, targets, DoRA) goes into the file: without it the loader
    assumes alpha == rank and reloads at the wrong scale. ``metadata`` (training facts: base
    model, objective, steps ...) is added to the header as JSON under ``lightning_sd``.

    Args:
        out_dir: the folder to write into.
        components: ``{"unet": unet, "text_encoder": te, ...}`` (SD3: ``transformer``); those
            without an adapter are left out.
        family: the base's family: its pipeline class's ``save_lora_weights`` writes the file.
        metadata: JSON-serialisable training facts.
        adapter_name: the peft adapter to save.
    """
    parts = adapted(components)
    kwargs = {}
    for name, model in parts.items():
        layers = (
            _text_encoder_layers(model, adapter_name)
            if name.startswith("text_encoder")
            else adapter_state_dict(model, adapter_name)
        )
        kwargs[f"{name}_lora_layers"] = layers
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config[adapter_name].to_dict()
    writer = family.lora_writer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".staging-") as staging:
        writer.save_lora_weights(
            staging, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs
        )
        tensors, header = read_safetensors(Path(staging) / LORA_WEIGHT_NAME)
    if metadata:
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    return write_safetensors(out_dir / LORA_WEIGHT_NAME, tensors, header)


def save_kohya_lora(
    path: str | Path,
    components: dict[str, nn.Module | None],
    family: ModelFamily,
    metadata: dict | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write the kohya / A1111 / ComfyUI layout (``lora_unet_*``, ``lora_te_*``, real ``.alpha``;
    the family's prefixes: SDXL ``lora_te1_``/``lora_te2_``, SD3 ``lora_transformer_``).

    DoRA is refused: diffusers' kohya loader drops ``dora_scale`` (it would load as a different
    model), so a DoRA adapter goes to the diffusers layout only.
    """
    from peft.utils import get_peft_model_state_dict

    parts = adapted(components)
    dora = [n for n, m in parts.items() if m.peft_config[adapter_name].use_dora]
    if dora:
        raise LoRAFileError(
            f"DoRA adapters ({', '.join(dora)}) are not written in the kohya layout: diffusers' "
            "kohya loader drops dora_scale and would load a different model. Use the diffusers "
            f"file ({LORA_WEIGHT_NAME}), which keeps the DoRA magnitudes."
        )
    states = {n: get_peft_model_state_dict(m, adapter_name=adapter_name) for n, m in parts.items()}
    alphas = {n: m.peft_config[adapter_name].lora_alpha for n, m in parts.items()}
    header = {"ss_network_module": "networks.lora"}
    denoiser = family.denoiser_name
    if denoiser in parts:
        header["ss_network_dim"] = str(parts[denoiser].peft_config[adapter_name].r)
        header["ss_network_alpha"] = str(alphas[denoiser])
    if metadata:
        header[METADATA_KEY] = json.dumps(metadata, sort_keys=True)
    return write_safetensors(path, to_kohya(states, alphas, family.kohya_prefixes), header)


# -- reading -----------------------------------------------------------------------------------
_DIFFUSERS_KEY = re.compile(
    r"^(?P<component>unet|transformer|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
    r"(?P<part>lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight|"
    r"lora_linear_layer\.up\.weight|lora_A\.weight|lora_B\.weight|"
    r"lora_magnitude_vector(?:\.weight)?)$"
)
_KOHYA_KEY = re.compile(r"^(?P<name>lora_(?:unet|transformer|te1?|te2)_[^.]+)\.(?P<part>.+)$")
_PART = {
    "lora.down.weight": "lora_A.weight",
    "lora_linear_layer.down.weight": "lora_A.weight",
    "lora_A.weight": "lora_A.weight",
    "lora_down.weight": "lora_A.weight",
    "lora.up.weight": "lora_B.weight",
    "lora_linear_layer.up.weight": "lora_B.weight",
    "lora_B.weight": "lora_B.weight",
    "lora_up.weight": "lora_B.weight",
    "lora_magnitude_vector": "lora_magnitude_vector",
    "lora_magnitude_vector.weight": "lora_magnitude_vector",
    "dora_scale": "lora_magnitude_vector",
}


def _flat_module_names(component: str, model: nn.Module) -> dict[str, str]:
    """kohya's flattened names (dots -> underscores) back to the model's module names."""
    names = {}
    for name, _ in model.named_modules():
        names[name.replace(".", "_")] = name
        if component.startswith("text_encoder") and not hasattr(model, "text_model"):
            names[f"text_model_{name}".replace(".", "_")] = name
    return names


def _component_of_kohya(name: str) -> str:
    if name.startswith("lora_unet_"):
        return "unet"
    if name.startswith("lora_transformer_"):
        return "transformer"
    if name.startswith("lora_te2_"):
        return "text_encoder_2"
    return "text_encoder"


def split_lora_tensors(tensors: dict, components: dict) -> tuple[dict, dict]:
    """File tensors -> ({component: {module: {part: tensor}}}, {component: {module: alpha}})."""
    weights: dict[str, dict[str, dict]] = {}
    alphas: dict[str, dict[str, float]] = {}
    flat_names = {c: _flat_module_names(c, m) for c, m in components.items()}
    for key, tensor in tensors.items():
        if (m := _DIFFUSERS_KEY.match(key)) is not None:
            component, module, part = m["component"], m["module"], m["part"]
        elif (m := _KOHYA_KEY.match(key)) is not None:
            component = _component_of_kohya(m["name"])
            flat = m["name"].split("_", 2)[2]  # lora_unet_<flat>, lora_te1_<flat> ...
            module = flat_names.get(component, {}).get(flat, flat)
            part = m["part"]
            if part == "alpha":
                alphas.setdefault(component, {})[module] = float(tensor)
                continue
        else:
            raise LoRAFileError(f"unrecognised LoRA key {key!r}")
        if part not in _PART:
            raise LoRAFileError(f"unrecognised LoRA key {key!r}")
        weights.setdefault(component, {}).setdefault(module, {})[_PART[part]] = tensor
    return weights, alphas


def strip_text_model(module: str, model: nn.Module) -> str:
    if not hasattr(model, "text_model") and module.startswith("text_model."):
        return module[len("text_model.") :]
    return module


def load_lora_into(
    path: str | Path,
    components: dict[str, nn.Module | None],
    family: ModelFamily,
    adapter_name: str = "default",
) -> None:
    """Load a LoRA file (diffusers or kohya layout) into adapters the components already carry.

    Used to continue training from an existing file. Every module of the file must exist in the
    model with the same shapes, and the model's adapters must all be in the file; otherwise the
    error names the mismatched modules (a file for another base architecture, rank or targets).
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from lightning_sd.lora_check import check_architecture, has_scale, read_lora_file

    path, tensors, header = read_lora_file(path)
    check_architecture(tensors, header, path, "this model's base", family)
    parts = adapted(components)
    weights, kohya_alphas = split_lora_tensors(tensors, parts)
    file_meta = json.loads(header.get("lora_adapter_metadata", "{}"))
    scale_known = has_scale(tensors, header)
    for component in weights:
        if component not in components:
            raise LoRAFileError(
                f"{path} adapts {component}, which this model's base does not have: it is a "
                "LoRA for another base architecture"
            )
        if component not in parts:
            raise LoRAFileError(
                f"{path} has {component} adapters but this model has no {component} adapter: "
                "configure one (e.g. text_encoder_adapter) or drop them from the file"
            )
    for component, model in parts.items():
        expected = get_peft_model_state_dict(model, adapter_name=adapter_name)
        given = {}
        for module, tensor_parts in weights.get(component, {}).items():
            module = strip_text_model(module, model)
            for part, tensor in tensor_parts.items():
                given[f"{module}.{part}"] = tensor
        unknown = sorted(
            {k.rsplit(".lora_", 1)[0] for k in given} - {k.rsplit(".lora_", 1)[0] for k in expected}
        )
        if unknown:
            raise LoRAFileError(
                f"{path}: {len(unknown)} {component} modules of the file are not adapted in this "
                f"model (another base architecture or target set?), e.g. {unknown[:4]}"
            )
        missing = sorted(set(expected) - set(given))
        if missing:
            raise LoRAFileError(
                f"{path}: the file lacks {len(missing)} {component} adapter tensors this model "
                f"has (targets or DoRA differ), e.g. {missing[:4]}"
            )
        wrong = [
            f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if given[k].numel() != v.numel()
        ]
        if wrong:
            raise LoRAFileError(f"{path}: {component} shapes differ (rank?): {wrong[:3]}")
        config = model.peft_config[adapter_name]
        file_alpha = file_meta.get(f"{component}.lora_alpha")
        alphas = set(kohya_alphas.get(component, {}).values()) | (
            {float(file_alpha)} if file_alpha is not None else set()
        )
        if not scale_known and float(config.lora_alpha) != config.r:
            raise LoRAFileError(
                f"{path} has no rank/alpha metadata, so loaders take alpha = rank = {config.r}, "
                f"but this run configures {component} alpha {config.lora_alpha}: set the "
                "adapter's alpha to the one the file was trained with (unset means = rank)"
            )
        if alphas and alphas != {float(config.lora_alpha)}:
            raise LoRAFileError(
                f"{path}: {component} alpha {sorted(alphas)} differs from the configured "
                f"{config.lora_alpha}; set the adapter's alpha to match"
            )
        state = {k: given[k].reshape(v.shape).to(v.dtype) for k, v in expected.items()}
        set_peft_model_state_dict(model, state, adapter_name=adapter_name)
