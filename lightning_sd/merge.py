"""Merge several LoRA files into one with peft's ``add_weighted_adapter``, written in both layouts.

Each file becomes a named peft adapter on the base UNet (and text encoders). They are attached
through ``peft.get_peft_model``, because ``add_weighted_adapter`` is a method of the resulting
``LoraModel``; the models are changed in place, so ``lora_io`` then writes the merged adapter
exactly as it writes a trained one. The combination maths (TIES, DARE, ...) is peft's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from lightning_sd.families import ModelFamily, family_of
from lightning_sd.lora_check import check_architecture, read_lora_file, warn_if_no_scale
from lightning_sd.lora_io import (
    KOHYA_WEIGHT_NAME,
    LoRAFileError,
    load_lora_into,
    save_diffusers_lora,
    save_kohya_lora,
    split_lora_tensors,
    strip_text_model,
)
from lightning_sd.lycoris import is_lycoris

if TYPE_CHECKING:
    from peft import LoraConfig

__all__ = ["Combination", "merge_loras"]

Combination = Literal[
    "linear",
    "cat",
    "svd",
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_linear_svd",
    "dare_ties",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
]
Format = Literal["diffusers", "kohya"]
MERGED = "merged"
# These combine lora_A and lora_B matrices entry by entry, so every file needs the same rank.
_SAME_RANK = {"linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"}


def _base_models(base: str, family: ModelFamily, components: list[str]) -> dict[str, nn.Module]:
    """Only the adapted parts of the pipeline: the VAE and tokenizer play no part in a merge."""
    from lightning_sd.components import resolve_model

    return {c: family.load_part(resolve_model(base), c) for c in components}


def _configs(path: Path, tensors: dict, header: dict, models: dict) -> dict[str, LoraConfig]:
    """One ``LoraConfig`` per component, from the file's header (diffusers) or tensors (kohya).

    Targets become the exact module names found in the file: files whose configs spell the
    same modules differently (suffixes, a regex) then merge, and the merged file says exactly
    which modules it adapts.
    """
    from peft import LoraConfig

    weights, kohya_alphas = split_lora_tensors(tensors, models)
    saved = json.loads(header.get("lora_adapter_metadata", "{}"))
    configs = {}
    for component, modules in weights.items():
        if any("lora_magnitude_vector" in parts for parts in modules.values()):
            raise LoRAFileError(
                f"{path}: its {component} adapter is DoRA. peft's add_weighted_adapter combines "
                "lora_A/lora_B only and would drop the DoRA magnitudes: merging DoRA is refused"
            )
        ranks = {p["lora_A.weight"].shape[0] for p in modules.values() if "lora_A.weight" in p}
        alphas = set(kohya_alphas.get(component, {}).values())
        if len(ranks) != 1 or len(alphas) > 1:
            raise LoRAFileError(
                f"{path}: {component} modules have several ranks {sorted(ranks)} or alphas "
                f"{sorted(alphas)}; merging needs one rank and one alpha per component"
            )
        fields = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(component + ".")}
        rank = ranks.pop()
        # No metadata and no .alpha: diffusers' own loader assumes alpha == rank.
        alpha = fields.get("lora_alpha", alphas.pop() if alphas else rank)
        configs[component] = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            use_rslora=fields.get("use_rslora", False),
            alpha_pattern=fields.get("alpha_pattern") or {},
            target_modules=sorted(strip_text_model(m, models[component]) for m in modules),
        )
    return configs


def _check_compatible(paths: list[Path], configs: list[dict], combination: str) -> None:
    """The same components, modules and (for entry-wise combinations) ranks in every file."""
    first, ref = paths[0], configs[0]
    for path, cfgs in zip(paths[1:], configs[1:], strict=True):
        for component in ref:
            a, b = ref[component].target_modules, cfgs[component].target_modules
            if a != b:
                raise LoRAFileError(
                    f"{first} and {path} adapt different {component} modules: "
                    f"only in the first {sorted(a - b)[:4]} ({len(a - b)}), "
                    f"only in the second {sorted(b - a)[:4]} ({len(b - a)})"
                )
            if combination in _SAME_RANK and ref[component].r != cfgs[component].r:
                raise LoRAFileError(
                    f"{component} ranks differ ({first}: {ref[component].r}, {path}: "
                    f"{cfgs[component].r}); '{combination}' combines the matrices entry by entry "
                    "and needs one rank: use 'cat' or an '_svd' combination"
                )


def _combine(
    models: dict[str, nn.Module],
    configs: list[dict],
    paths: list[Path],
    weights: list[float],
    seed: int,
    merge_args: dict,
    family: ModelFamily,
) -> None:
    """Attach every file as a named adapter, load it, and add peft's combination as ``MERGED``.

    The models are changed in place (peft swaps their layers), so they can be saved directly.
    """
    from peft import get_peft_model

    names = [f"source{i}" for i in range(len(paths))]
    tuners = {}
    for component, model in models.items():
        tuners[component] = get_peft_model(model, configs[0][component], adapter_name=names[0])
        for name, cfgs in zip(names[1:], configs[1:], strict=True):
            tuners[component].add_adapter(name, cfgs[component])
        # peft looks for config.json under this path (on the Hub for an id) whenever it takes a
        # state dict; a pipeline root has none, and the file header names the base model anyway.
        for config in tuners[component].peft_config.values():
            config.base_model_name_or_path = None
    for name, path in zip(names, paths, strict=True):
        load_lora_into(path, models, family, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for tuner in tuners.values():
            tuner.base_model.add_weighted_adapter(names, weights, MERGED, **merge_args)
            # Each file's scale is folded into the weights, so the merged scale must be 1;
            # peft keeps the first file's use_rslora, which would rescale by sqrt(r) on reload.
            tuner.peft_config[MERGED].use_rslora = False


def merge_loras(
    base: str,
    loras: list[str],
    weights: list[float],
    out_dir: str,
    combination: Combination = "cat",
    density: float = 1.0,
    svd_rank: int | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    seed: int = 0,
    formats: tuple[Format, ...] = ("diffusers", "kohya"),
) -> dict[str, Path]:
    """Combine several LoRA files into one adapter, to share one file instead of stacking many.

    Files in either layout (diffusers ``pytorch_lora_weights.safetensors`` or kohya) are loaded
    as peft adapters on the base model and combined by peft's ``add_weighted_adapter``. Every
    file must adapt the same components and modules. Each file's alpha / rank scale is folded
    into its weight, so the merged adapter has alpha = rank. DoRA files are refused (peft merges
    lora_A/lora_B only). The header records the sources, weights, combination and density.

    Args:
        base: the pipeline the files were trained on (hub id or folder); its UNet and text
            encoders give the module names and shapes.
        loras: LoRA files, or folders holding ``pytorch_lora_weights.safetensors``.
        weights: one weight per file; negative weights subtract.
        out_dir: folder for the merged files.
        combination: ``cat`` (the default) stacks the adapters (rank = sum of ranks):
            exactly the weighted sum of their updates, as if all were loaded together.
            ``linear`` sums the weighted lora_A and lora_B separately (same rank; the cross
            terms B_i A_j make it approximate unless a single weight is non-zero). ``ties``
            (Yadav et al. 2023), ``dare_linear`` / ``dare_ties`` (Yu et al. 2023) and
            ``magnitude_prune`` prune and sign-elect lora_A / lora_B entries (same rank).
            ``*svd`` applies the method to the full updates B A and keeps a rank-``svd_rank``
            SVD: the accurate choice at a fixed rank.
        density: the fraction of entries kept by the ties / dare / magnitude_prune methods.
        svd_rank: rank of ``*svd`` results; default the largest rank among the files.
        majority_sign_method: TIES sign election, by ``total`` magnitude or ``frequency``.
        seed: DARE drops entries at random; the seed makes a merge reproducible.
        formats: ``diffusers`` (what ``pipeline.load_lora_weights`` reads) and/or ``kohya``
            (A1111 / ComfyUI).

    Returns:
        Layout (``diffusers``, ``kohya``) -> path of the written file.
    """
    if not loras or len(weights) != len(loras):
        raise ValueError(f"need one weight per file, got {len(weights)} for {len(loras)} files")
    read = [read_lora_file(p) for p in loras]  # refuses pickles, missing files, NaN
    paths = [path for path, _, _ in read]
    files = [(tensors, header) for _, tensors, header in read]
    family = family_of(base)
    for path, (tensors, header) in zip(paths, files, strict=True):
        if is_lycoris(tensors):
            raise LoRAFileError(
                f"{path} is a LoHa/LoKr file: merging it is refused, since peft's "
                "add_weighted_adapter combines LoRA's A and B matrices only. Load LoHa/LoKr "
                "files side by side instead (lightning-sd generate --loras a --loras b)"
            )
        check_architecture(tensors, header, path, base, family)
        warn_if_no_scale(tensors, header, path)
    components = [sorted(split_lora_tensors(tensors, {})[0]) for tensors, _ in files]
    for path, found in zip(paths[1:], components[1:], strict=True):
        if found != components[0]:
            raise LoRAFileError(
                f"{paths[0]} adapts {components[0]} but {path} adapts {found}: every file must "
                "adapt the same components"
            )
    models = _base_models(base, family, components[0])
    configs = [_configs(p, t, h, models) for p, (t, h) in zip(paths, files, strict=True)]
    _check_compatible(paths, configs, combination)

    merge_args = dict(
        combination_type=combination,
        density=density,
        svd_rank=svd_rank,
        majority_sign_method=majority_sign_method,
    )
    _combine(models, configs, paths, weights, seed, merge_args, family)
    metadata = {
        "base_model": base,
        **family.facts(),
        "merge": {
            "sources": [str(p) for p in paths],
            "weights": list(weights),
            "combination": combination,
            "density": density,
            "svd_rank": svd_rank,
            "seed": seed,
        },
    }
    written: dict[str, Path] = {}
    if "diffusers" in formats:
        written["diffusers"] = save_diffusers_lora(out_dir, models, family, metadata, MERGED)
    if "kohya" in formats:
        written["kohya"] = save_kohya_lora(
            Path(out_dir) / KOHYA_WEIGHT_NAME, models, family, metadata, MERGED
        )
    return written
