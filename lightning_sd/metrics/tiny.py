"""Tiny random CLIP and DINO checkpoints, so the evaluation plumbing runs offline.

``python -m lightning_sd.metrics.tiny OUT`` (``write_tiny_metric_models``) writes ``OUT/clip``
(an open_clip ``local-dir:`` folder) and ``OUT/dino-test_vit.safetensors`` (timm's
``test_vit``). Their weights are random: the numbers they give mean nothing except that every
stage ran. Real runs use real CLIP and DINO weights (docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

__all__ = ["TINY_CLIP_CONFIG", "write_tiny_clip", "write_tiny_dino", "write_tiny_metric_models"]

# CLIP ViT at 32 px with the real 49408-token BPE vocabulary, so the real tokenizer applies.
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def write_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A random tiny open_clip model as a folder; load it with ``model_name='local-dir:OUT'``."""
    import open_clip
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CONFIG)
    config = {
        "model_cfg": TINY_CLIP_CONFIG,
        "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD},
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / "open_clip_model.safetensors")
    return out_dir


def write_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """Random weights for timm's ``test_vit``; load with ``DINOSimilarity(path, "test_vit")``."""
    import timm
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model("test_vit", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return path


def write_tiny_metric_models(out_dir: str, seed: int = 0) -> list[Path]:
    """Write a tiny random open_clip CLIP and DINO-architecture ViT, offline, for plumbing.

    ``configs/experiments/eval_tiny.yaml`` reads them from ``demo_out/tiny-metrics``. Their
    weights are random: the metrics they give only show that evaluation runs end to end.

    Args:
        out_dir: destination folder; gets ``clip/`` and ``dino-test_vit.safetensors``.
        seed: seeds both initialisations.
    """
    out = Path(out_dir)
    return [
        write_tiny_clip(out / "clip", seed),
        write_tiny_dino(out / "dino-test_vit.safetensors", seed),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="destination folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in write_tiny_metric_models(args.out, args.seed):
        print(path)


if __name__ == "__main__":
    main()
