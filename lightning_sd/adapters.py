"""Adapter settings (LoRA, DoRA, LoHa, LoKr; rsLoRA, PiSSA/OLoRA, LoRA+, rank/alpha patterns),
turned into a peft config and injected into a model."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Literal

import torch

__all__ = [
    "TARGET_PRESETS",
    "AdapterConfig",
    "add_adapter",
    "is_adapter_parameter",
    "prepare_trainable",
    "part_groups",
    "train_fully",
    "trainable_parameters",
]

_UNET_ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
_UNET_FF = ["ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
# LoCon-style: also the ResNet and resampling convolutions.
_UNET_CONV = ["conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv"]
# SD3's MMDiT: joint attention (image stream, and the context stream's add_*), SD3.5 Medium's
# second attention attn2 (bare suffixes reach it; diffusers' "attn.to_q" ones do not), and
# both streams' feed-forwards.
_MMDIT_ATTN = [*_UNET_ATTN, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
_MMDIT_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
_MMDIT_NORM = ["norm1.linear", "norm1_context.linear"]
_CLIP_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
_CLIP_MLP = ["fc1", "fc2"]

# Module-name suffixes per preset, for each model family the presets apply to.
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "unet": {
        "attn": _UNET_ATTN,
        "attn_ff": _UNET_ATTN + _UNET_FF,
        "full": _UNET_ATTN + _UNET_FF + _UNET_CONV,
    },
    "transformer": {
        "attn": _MMDIT_ATTN,
        "attn_ff": _MMDIT_ATTN + _MMDIT_FF,
        "full": _MMDIT_ATTN + _MMDIT_FF + _MMDIT_NORM,
    },
    "text_encoder": {
        "attn": _CLIP_ATTN,
        "attn_ff": _CLIP_ATTN + _CLIP_MLP,
        "full": _CLIP_ATTN + _CLIP_MLP,
    },
}


_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
Kind = Literal["lora", "dora", "loha", "lokr", "full"]
LYCORIS_KINDS = ("loha", "lokr")
# Parameter-name fragments of the adapter weights peft adds, per kind.
ADAPTER_PARAM_MARKERS = ("lora_", "hada_", "lokr_")


@dataclass
class AdapterConfig:
    """One adapter: what kind, how big, where, how it starts and how fast its parts learn.

    Attributes:
        kind: ``lora`` (Hu et al. 2021), ``dora``, weight-decomposed LoRA (Liu et al. 2024),
            ``loha``, the Hadamard product of two low-rank products (Hyeon-Woo et al. 2022,
            LyCORIS), ``lokr``, a Kronecker product of two factors (Yeh et al. 2024, LyCORIS);
            or ``full``: no adapter, every weight of the part trains (full fine-tuning, the
            baseline LoRA is compared with, and how a base model is pretrained); the other
            fields are then unused.
        rank: the adapter rank r.
        alpha: the scale numerator: the update is (alpha / r) B A. Independent of rank; ``None``
            means alpha = rank (scale 1), which is what the diffusers scripts always use.
        dropout: dropout on the adapter input (lora/dora).
        init: ``default`` (B = 0, so training starts at the base model), ``gaussian``, or peft's
            SVD-based ``pissa`` (Meng et al. 2024) / ``olora`` (Büyükakyüz 2024): the adapter
            starts on the weight's principal (orthonormal) directions and the base keeps the
            residual, so the model's output is unchanged at the start. Their files hold the
            update relative to the original base (a rank-2r LoRA), which every loader reads.
            peft starts Linear layers only (not SD1.x's Conv2d ``proj_in``/``proj_out``).
        use_rslora: rank-stabilised scale alpha / sqrt(r) instead of alpha / r (Kalajdzievski
            2023), so the update's size stops shrinking with rank (lora/dora).
        loraplus_lr_ratio: LoRA+ (Hayou et al. 2024): the B matrices train at this multiple of
            the part's learning rate, in an optimizer group of their own (lora/dora; the
            paper suggests 16).
        factor: LoKr's Kronecker factor size (peft's ``decompose_factor``); -1 splits each
            dimension as evenly as it divides.
        decompose_both: LoKr: also decompose the first (small) factor into rank r.
        rank_pattern: per-module ranks, ``{regex over module names: rank}`` (peft's
            ``rank_pattern``), e.g. ``{"up_blocks.1.*": 16}``.
        alpha_pattern: per-module alphas in the same form.
        targets: a preset of ``TARGET_PRESETS`` (``attn``, ``attn_ff``, ``full``), or a list of
            module-name suffixes, or one regular expression over full module names (per-block
            targeting on a UNet: ``".*(down_blocks\\.1|mid_block).*attn.*to_(q|k|v)"``).
        blocks: adapt only these transformer blocks (SD3's ``transformer_blocks.<i>``); None
            adapts every block. UNets and text encoders take a regex ``targets`` instead.
    """

    kind: Kind = "lora"
    rank: int = 4
    alpha: float | None = None
    dropout: float = 0.0
    init: Literal["default", "gaussian", "pissa", "olora"] = "default"
    use_rslora: bool = False
    loraplus_lr_ratio: float | None = None
    factor: int = -1
    decompose_both: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    targets: list[str] | str = field(default="attn")
    blocks: list[int] | None = None

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"adapter rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(
                f"adapter alpha must be > 0 (the update is alpha / rank * B A; 0 trains an "
                f"adapter that changes nothing), got {self.alpha}; leave it unset for alpha = rank"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter dropout must be in [0, 1), got {self.dropout}")
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            raise ValueError(f"loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        bad = {k: v for k, v in self.rank_pattern.items() if int(v) < 1}
        bad |= {k: v for k, v in self.alpha_pattern.items() if not float(v) > 0}
        if bad:
            raise ValueError(f"rank_pattern ranks must be >= 1 and alpha_pattern alphas > 0: {bad}")
        if self.kind in LYCORIS_KINDS:
            lora_only = {
                "dropout": self.dropout != 0.0,
                "init": self.init != "default",
                "use_rslora": self.use_rslora,
                "loraplus_lr_ratio": self.loraplus_lr_ratio is not None,
            }
            if any(lora_only.values()):
                raise ValueError(
                    f"adapter kind {self.kind!r} does not take "
                    f"{[k for k, v in lora_only.items() if v]}: those are LoRA/DoRA options"
                )
        if self.kind == "dora" and self.init in ("pissa", "olora"):
            raise ValueError(
                f"init={self.init!r} with DoRA is refused: the file would need the magnitudes of "
                "the residual base, which no loader reads; use kind lora"
            )

    @property
    def is_lycoris(self) -> bool:
        """LoHa or LoKr: written in the LyCORIS layout only."""
        return self.kind in LYCORIS_KINDS

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def target_modules(self, family: str = "unet") -> list[str] | str:
        """peft's ``target_modules``: suffixes for a preset or list, a regex for a string."""
        if isinstance(self.targets, str):
            return TARGET_PRESETS[family].get(self.targets, self.targets)
        return list(self.targets)

    def to_peft(self, family: str = "unet", layers: list[int] | None = None):
        """The equivalent peft config: ``LoraConfig``, ``LoHaConfig`` or ``LoKrConfig``.

        Args:
            family: ``unet``, ``transformer`` or ``text_encoder``: which names the target
                presets expand to.
            layers: restrict a transformer's adapters to these layer indices (peft's
                ``layers_to_transform``), to leave out layers that receive no gradient.
        """
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        common = dict(
            r=self.rank,
            target_modules=self.target_modules(family),
            layers_to_transform=layers,
            layers_pattern=_LAYER_PATTERN[family] if layers is not None else None,
            rank_pattern=dict(self.rank_pattern),
            alpha_pattern={k: float(v) for k, v in self.alpha_pattern.items()},
        )
        if self.kind == "loha":
            return LoHaConfig(alpha=self.lora_alpha, **common)
        if self.kind == "lokr":
            return LoKrConfig(
                alpha=self.lora_alpha,
                decompose_factor=self.factor,
                decompose_both=self.decompose_both,
                **common,
            )
        return LoraConfig(
            lora_alpha=self.lora_alpha,
            lora_dropout=self.dropout,
            init_lora_weights=_INIT[self.init],
            use_rslora=self.use_rslora,
            use_dora=self.kind == "dora",
            **common,
        )


def add_adapter(
    model: torch.nn.Module,
    config: AdapterConfig,
    name: str = "default",
    skip_last_layers: int = 0,
) -> None:
    """Inject the adapter into a diffusers UNet or a CLIP text encoder through peft.

    Args:
        model: a ``UNet2DConditionModel``, an ``SD3Transformer2DModel`` or a transformers
            text model.
        config: the adapter.
        name: the peft adapter name.
        skip_last_layers: for text encoders, leave out the last layers. Their output is
            unused when the prompt embedding is taken before them (clip skip, SDXL's
            penultimate layer): adapters there get no gradient, which breaks DDP.

    peft's own ``inject_adapter_in_model`` does the work: the libraries' ``add_adapter``
    wrappers add nothing this package needs but version gates (transformers 5.24 refuses every
    peft published to date). The model gets ``peft_config`` as those wrappers leave it, so
    diffusers' and transformers' adapter methods still work on it.

    The adapter parameters are cast to float32 whatever the base dtype: peft gives them the
    base layer's dtype, and half-precision adapters underflow in Adam's updates. Lightning keeps
    each submodule's train/eval mode, so the adapter dropout is put in train mode here.
    """
    from peft import inject_adapter_in_model

    family = _preset_family(model)
    layers = None
    if family == "text_encoder" and skip_last_layers:
        layers = list(range(model.config.num_hidden_layers - skip_last_layers))
    if config.blocks is not None:
        if family != "transformer":
            raise ValueError(
                f"adapter blocks={config.blocks} selects transformer blocks, but "
                f"{type(model).__name__} has none; select modules with a regex in targets"
            )
        layers = list(config.blocks)
    peft_config = config.to_peft(family, layers)
    try:
        inject_adapter_in_model(peft_config, model, adapter_name=name)
    except ValueError as err:
        raise _injection_error(model, config, err) from err
    model._hf_peft_config_loaded = True  # what diffusers'/transformers' add_adapter set
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if config.init in ("pissa", "olora"):
        # The base now holds the residual: files must carry the update relative to the
        # original weights, B A - B0 A0, so the starting factors are kept (see lora_io).
        from peft.utils import get_peft_model_state_dict

        initial = get_peft_model_state_dict(model, adapter_name=name)
        model._lightning_sd_initial_adapter = {k: v.detach().clone() for k, v in initial.items()}
    # The frozen base stays in eval mode; the adapter's dropout must still act in training.
    for module_name, module in model.named_modules():
        if module_name.endswith("lora_dropout"):
            module.train()


_LAYER_PATTERN = {"text_encoder": "layers", "transformer": "transformer_blocks", "unet": None}


def _preset_family(model: torch.nn.Module) -> str:
    """Which presets a network's module names follow: a UNet's, an MMDiT's or a CLIP's."""
    if hasattr(model, "down_blocks"):
        return "unet"
    return "transformer" if hasattr(model, "transformer_blocks") else "text_encoder"


def _injection_error(model: torch.nn.Module, config: AdapterConfig, err: ValueError) -> Exception:
    """A no-match names the model's module names closest to the targets; anything else is
    reported with the installed and tested versions, since that is what it has been."""
    from lightning_sd.dependencies import versions_hint

    kind = type(model).__name__
    if "Unknown initialization" in str(err) and config.init in ("pissa", "olora"):
        return ValueError(
            f"init={config.init!r} starts from each weight's SVD/QR, which peft does for Linear "
            f"layers only, and targets {config.targets!r} match Conv2d layers of {kind} (SD1.x "
            "proj_in/proj_out and ResNet convolutions): use targets 'attn' or a list of Linear "
            "layers"
        )
    if "not found in the base model" not in str(err) and "target modules" not in str(err):
        return RuntimeError(f"peft could not add the adapter to {kind}: {err}; {versions_hint()}")
    names = {
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
    }
    suffixes = {".".join(n.split(".")[-k:]) for n in names for k in (1, 2)}
    wanted = config.targets if isinstance(config.targets, list) else [config.targets]
    close = sorted({c for t in wanted for c in difflib.get_close_matches(t, suffixes, n=4)})
    hint = f"; close module names: {close}" if close else ""
    return ValueError(
        f"adapter targets {config.targets!r} match no Linear/Conv2d module of {kind}{hint}. "
        f"Presets: {sorted(TARGET_PRESETS[_preset_family(model)])}"
    )


def train_fully(model: torch.nn.Module) -> None:
    """Full fine-tuning: every weight of the part trains, in float32 and in train mode."""
    model.requires_grad_(True)
    model.float()
    model.train()


def prepare_trainable(
    model: torch.nn.Module, config: AdapterConfig, skip_last_layers: int = 0
) -> None:
    """Make a part trainable as ``config`` says: unfreeze it (``full``) or inject the adapter."""
    if config.kind == "full":
        train_fully(model)
    else:
        add_adapter(model, config, skip_last_layers=skip_last_layers)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters an optimizer should see (the adapters; the base stays frozen)."""
    return [p for p in model.parameters() if p.requires_grad]


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter weight peft added (LoRA, DoRA, LoHa, LoKr)."""
    return any(marker in name for marker in ADAPTER_PARAM_MARKERS)


def part_groups(
    name: str, params: dict[str, torch.nn.Parameter], lr: float, config: AdapterConfig | None
) -> list[dict]:
    """A trained part's optimizer groups: one, or LoRA+'s two (Hayou et al. 2024): the B
    matrices in ``<name>.lora_B`` at ``loraplus_lr_ratio`` times ``lr``, the rest (A, DoRA
    magnitudes) at ``lr``. Empty groups are left out (DeepSpeed rejects them)."""
    ratio = config.loraplus_lr_ratio if config is not None else None
    if ratio is None:
        groups = [{"name": name, "params": list(params.values()), "lr": lr}]
    else:
        is_b = {n: ".lora_B." in n or ".lora_embedding_B." in n for n in params}
        groups = [
            {"name": name, "params": [p for n, p in params.items() if not is_b[n]], "lr": lr},
            {
                "name": f"{name}.lora_B",
                "params": [p for n, p in params.items() if is_b[n]],
                "lr": lr * ratio,
            },
        ]
    return [g for g in groups if g["params"]]
