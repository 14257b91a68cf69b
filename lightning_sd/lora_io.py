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
from lightning_sd.lycoris import LYCORIS_PARTS

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
    initial = getattr(model, "_lightning_sd_initial_adapter", None)
    if initial is not None:
        state = residual_free(state, initial)
    return {k: v.contiguous() for k, v in state.items()}


def residual_free(state: dict, initial: dict) -> dict:
    """A PiSSA/OLoRA adapter as a plain LoRA on the original base: rank 2r, same scale.

    The base holds W - s B0 A0 and the adapter adds s B A, so the update of the original W is
    ``s (B A - B0 A0) = s [B, B0] [A; -A0]`` (peft's ``path_initial_model_for_weight_conversion``).
    """
    out = {}
    for key, tensor in state.items():
        if key.endswith("lora_A.weight"):
            out[key] = torch.cat([tensor, -initial[key].to(tensor)], dim=0)
        elif key.endswith("lora_B.weight"):
            out[key] = torch.cat([tensor, initial[key].to(tensor)], dim=1)
        else:
            out[key] = tensor
    return out


def file_config(model: nn.Module, adapter_name: str = "default") -> dict:
    """The adapter's peft config as files carry it: a PiSSA/OLoRA adapter's is the rank-2r
    plain LoRA of :func:`residual_free` (alpha doubled, or times sqrt 2 under rsLoRA)."""
    config = model.peft_config[adapter_name].to_dict()
    if getattr(model, "_lightning_sd_initial_adapter", None) is None:
        return config
    factor = 2**0.5 if config.get("use_rslora") else 2.0
    config.update(
        r=2 * config["r"],
        lora_alpha=factor * config["lora_alpha"],
        init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: factor * v for k, v in (config.get("alpha_pattern") or {}).items()},
    )
    return config


def module_scales(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[int, float]]:
    """Each adapted module's (rank, scale), as peft applies them: rank/alpha patterns and
    rsLoRA included; PiSSA/OLoRA modules as their rank-2r files hold them."""
    doubled = getattr(model, "_lightning_sd_initial_adapter", None) is not None
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and adapter_name in scaling:
            rank = module.r[adapter_name] * (2 if doubled else 1)
            out[name] = (rank, float(scaling[adapter_name]))
    return out


def _lycoris(config) -> str | None:
    """``loha`` / ``lokr`` for those peft configs, else None."""
    kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1].lower()
    return kind if kind in ("loha", "lokr") else None


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
    lycoris = {n: k for n, m in parts.items() if (k := _lycoris(m.peft_config[adapter_name]))}
    if lycoris:
        raise LoRAFileError(
            f"{lycoris} adapters are not written in the diffusers layout: "
            "StableDiffusionPipeline.load_lora_weights reads LoRA keys only. They go to the "
            f"kohya/LyCORIS file ({KOHYA_WEIGHT_NAME}), which ComfyUI, A1111 and lightning-sd "
            "generate read"
        )
    kwargs = {}
    for name, model in parts.items():
        layers = (
            _text_encoder_layers(model, adapter_name)
            if name.startswith("text_encoder")
            else adapter_state_dict(model, adapter_name)
        )
        kwargs[f"{name}_lora_layers"] = layers
        kwargs[f"{name}_lora_adapter_metadata"] = file_config(model, adapter_name)
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

    Every module's ``.alpha`` is the one that gives its scale as alpha / (its rank), so rank and
    alpha patterns and rsLoRA's alpha / sqrt(r) load at their trained strength. LoHa and LoKr
    are written with LyCORIS's keys (``hada_*``, ``lokr_*``); a LoKr module whose two factors
    are whole matrices gets its scale folded into ``lokr_w1``, since readers apply no alpha
    there. DoRA is refused: diffusers' kohya loader drops ``dora_scale`` (it would load as a
    different model), so a DoRA adapter goes to the diffusers layout only.
    """
    parts = adapted(components)
    dora = [n for n, m in parts.items() if getattr(m.peft_config[adapter_name], "use_dora", 0)]
    if dora:
        raise LoRAFileError(
            f"DoRA adapters ({', '.join(dora)}) are not written in the kohya layout: diffusers' "
            "kohya loader drops dora_scale and would load a different model. Use the diffusers "
            f"file ({LORA_WEIGHT_NAME}), which keeps the DoRA magnitudes."
        )
    states = {n: adapter_state_dict(m, adapter_name) for n, m in parts.items()}
    alphas = {}
    for name, model in parts.items():
        scales = module_scales(model, adapter_name)
        alphas[name] = {module: rank * scale for module, (rank, scale) in scales.items()}
        for module, (_, scale) in scales.items():
            if f"{module}.lokr_w1" in states[name] and f"{module}.lokr_w2" in states[name]:
                states[name][f"{module}.lokr_w1"] = states[name][f"{module}.lokr_w1"] * scale
    denoiser = family.denoiser_name
    kinds = {_lycoris(m.peft_config[adapter_name]) for m in parts.values()} - {None}
    header = {"ss_network_module": "lycoris.kohya" if kinds else "networks.lora"}
    if denoiser in parts:
        config = parts[denoiser].peft_config[adapter_name]
        header["ss_network_dim"] = str(config.r)
        header["ss_network_alpha"] = str(getattr(config, "lora_alpha", None) or config.alpha)
    if kinds:
        args = {"algo": kinds.pop()}
        if args["algo"] == "lokr" and denoiser in parts:
            args["factor"] = parts[denoiser].peft_config[adapter_name].decompose_factor
        header["ss_network_args"] = json.dumps(args)
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
    **{part: part for part in LYCORIS_PARTS},
}
_PEFT_PART = re.compile(
    r"\.(?:lora_A\.weight|lora_B\.weight|lora_magnitude_vector|hada_w[12]_[ab]|lokr_w[12](?:_[ab])?)$"
)


def _module_of(key: str) -> str:
    """``<module>.lora_A.weight`` / ``<module>.hada_w1_a`` ... -> ``<module>``."""
    return _PEFT_PART.sub("", key)


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
    if any(getattr(m, "_lightning_sd_initial_adapter", None) is not None for m in parts.values()):
        raise LoRAFileError(
            f"{path}: continuing a PiSSA/OLoRA adapter from a file is refused: its files hold "
            "the update as a plain rank-2r LoRA of the original base. Continue with kind lora, "
            "init default and twice the rank"
        )
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
        unknown = sorted({_module_of(k) for k in given} - {_module_of(k) for k in expected})
        if unknown:
            raise LoRAFileError(
                f"{path}: {len(unknown)} {component} modules of the file are not adapted in this "
                f"model (another base architecture or target set?), e.g. {unknown[:4]}"
            )
        missing = sorted(set(expected) - set(given))
        if missing:
            raise LoRAFileError(
                f"{path}: the file lacks {len(missing)} {component} adapter tensors this model "
                f"has (targets, kind or DoRA differ), e.g. {missing[:4]}"
            )
        wrong = [
            f"{k}: file {tuple(given[k].shape)} vs model {tuple(v.shape)}"
            for k, v in expected.items()
            if given[k].numel() != v.numel()
        ]
        if wrong:
            raise LoRAFileError(f"{path}: {component} shapes differ (rank?): {wrong[:3]}")
        scales = module_scales(model, adapter_name)
        _check_scale(path, component, model.peft_config[adapter_name], scales, scale_known,
                     {strip_text_model(m, model): a for m, a in kohya_alphas.get(component, {}).items()},
                     {k.split(".", 1)[1]: v for k, v in file_meta.items() if k.startswith(component + ".")})  # fmt: skip
        for module, (_, scale) in scales.items():  # LoKr with whole factors: scale in lokr_w1
            if kohya_alphas and f"{module}.lokr_w1" in given and f"{module}.lokr_w2" in given:
                given[f"{module}.lokr_w1"] = given[f"{module}.lokr_w1"] / scale
        state = {k: given[k].reshape(v.shape).to(v.dtype) for k, v in expected.items()}
        set_peft_model_state_dict(model, state, adapter_name=adapter_name)


_SCALE_FIELDS = ("lora_alpha", "alpha", "use_rslora", "rank_pattern", "alpha_pattern")


def _check_scale(
    path: Path,
    component: str,
    config,
    scales: dict[str, tuple[int, float]],
    scale_known: bool,
    kohya_alphas: dict[str, float],
    file_fields: dict,
) -> None:
    """The file must give every module the scale this model's adapter applies: kohya files
    by each module's ``.alpha`` / rank, diffusers files by their peft config fields."""
    if not scale_known and any(abs(s - 1.0) > 1e-9 for _, s in scales.values()):
        alpha = getattr(config, "lora_alpha", None) or getattr(config, "alpha", None)
        raise LoRAFileError(
            f"{path} has no rank/alpha metadata, so loaders take alpha = rank = {config.r}, "
            f"but this run configures {component} alpha {alpha}: set the "
            "adapter's alpha to the one the file was trained with (unset means = rank)"
        )
    off = [
        f"{m}: file alpha {kohya_alphas[m]:g}, this model {r * s:g}"
        for m, (r, s) in scales.items()
        if m in kohya_alphas and abs(kohya_alphas[m] - r * s) > 1e-4 * max(1.0, r * s)
    ]
    mine = config.to_dict()
    off += [
        f"{k}: file {file_fields[k]!r}, this model {mine.get(k)!r}"
        for k in _SCALE_FIELDS
        if k in file_fields and _normalised(file_fields[k]) != _normalised(mine.get(k))
    ]
    if off:
        raise LoRAFileError(
            f"{path}: {component} alpha differs from the configured adapter's ({len(off)} "
            f"differences, e.g. {off[:3]}); set the adapter's alpha, use_rslora and patterns "
            "to those the file was trained with"
        )


def _normalised(value):
    """Numbers as floats and empty patterns as {}, so 8 == 8.0 and None == {}."""
    if isinstance(value, dict) or value is None:
        return {k: float(v) for k, v in (value or {}).items()}
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
