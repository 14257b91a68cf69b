"""Generate the class images DreamBooth's prior preservation needs, with the base model.

Generation is resumable and reproducible: image ``i`` is written as ``class_{i:05d}.png`` from
its own seed ``seed + i`` (a CPU generator, so the noise is the same on any device), and only
the missing count is generated, filling the lowest free indices. An interrupted run keeps what
it wrote; deleting one file and running again regenerates that one, identically up to
floating-point batch effects. Each PNG is written to a temporary name and renamed, so a crash
never leaves a half-written image for training to trip on.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_sd.grid import save_image_atomic

__all__ = ["count_images", "generate_class_images"]

NAME = "class_{:05d}.png"


def count_images(folder: str | Path) -> int:
    """How many images a class folder already holds (0 when it does not exist)."""
    from lightning_sd.data.images import list_images

    try:
        return len(list_images(folder))
    except FileNotFoundError:
        return 0


def missing_indices(folder: Path, num_images: int) -> list[int]:
    """The lowest free ``class_{i}`` indices, as many as the folder lacks of ``num_images``."""
    missing = num_images - count_images(folder)
    indices, i = [], 0
    while len(indices) < missing:
        if not (folder / NAME.format(i)).exists():
            indices.append(i)
        i += 1
    return indices


@torch.no_grad()
def generate_class_images(
    pipeline: str,
    folder: str | Path,
    prompt: str,
    num_images: int,
    resolution: int,
    num_inference_steps: int = 50,
    batch_size: int = 4,
    seed: int = 0,
    guidance_scale: float = 7.5,
    device: str | None = None,
) -> list[Path]:
    """Fill ``folder`` up to ``num_images`` images of ``prompt`` made by ``pipeline``.

    Args:
        pipeline: hub id or folder of a ``StableDiffusionPipeline`` (the base model).
        folder: the class image folder; created if needed. Images already there count.
        prompt: the class prompt, e.g. ``a photo of a dog``.
        num_images: how many images the folder should hold.
        resolution: image side in pixels (the training resolution).
        num_inference_steps: sampler steps per image.
        batch_size: images per pipeline call.
        seed: image ``i`` uses seed ``seed + i``.
        guidance_scale: classifier-free guidance of the pipeline.
        device: default CUDA when available (in float16), else CPU (float32).

    Returns:
        The files written by this call.
    """
    folder = Path(folder).expanduser()
    indices = missing_indices(folder, num_images)
    if not indices:
        return []
    from lightning_sd.components import _model_index, resolve_model
    from lightning_sd.families import family_from_index

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    index = _model_index(pipeline)
    family = family_from_index(index)  # SD1.x, SDXL (Playground v2.5 included) or SD3
    pipe = (
        family.pipeline_class()
        .from_pretrained(
            resolve_model(pipeline), torch_dtype=dtype, **family.pipeline_kwargs(index)
        )
        .to(device)
    )
    pipe.set_progress_bar_config(disable=True)
    written = []
    with tqdm(total=len(indices), desc=f"class images -> {folder}", unit="img") as bar:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            images = pipe(
                prompt=[prompt] * len(chunk),
                height=resolution,
                width=resolution,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=[torch.Generator().manual_seed(seed + i) for i in chunk],
            ).images
            for i, image in zip(chunk, images, strict=True):
                written.append(save_image_atomic(image, folder / NAME.format(i)))
            bar.update(len(chunk))
    del pipe
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return written
