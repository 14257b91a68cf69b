"""Fill the latent / text cache with the module's own encoders, then serve datasets from it.

Called by the DataModules' dataloader hooks, where the module is configured and on its device.
Every rank computes the same list of missing entries (after a barrier, before anyone writes),
encodes its share, and waits for the others; then every entry exists and every rank serves
from disk. Entries already present are hits: with all hits the VAE and the text encoder are
never called.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lightning_sd.data.cache_store import LatentCache, latent_key, model_fingerprint, text_key
from lightning_sd.data.dataset import CachedView, ImageCaptionDataset
from lightning_sd.data.records import ImageRecord
from lightning_sd.data.transforms import CropPlan
from lightning_sd.encoding import vae_posterior
from lightning_sd.objectives.masking import latent_mask

if TYPE_CHECKING:
    from lightning_sd.module import StableDiffusionLoRA

__all__ = ["CacheStats", "check_fixed_crops", "fill_cache"]


@dataclass
class CacheStats:
    """How many entries this rank encoded and how many were already cached, over all ranks."""

    latents_encoded: int = 0
    latents_cached: int = 0
    texts_encoded: int = 0
    texts_cached: int = 0


@torch.no_grad()
def fill_cache(
    datasets: Sequence[tuple[ImageCaptionDataset, bool]],
    module: StableDiffusionLoRA,
    cache: LatentCache,
    latents: bool,
    text: bool,
    batch_size: int = 8,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> tuple[CacheStats, list[CachedView]]:
    """Encode what is missing; return the stats and, per dataset, the view that serves it
    from the cache (``dataset.served_from(view)``; the datasets themselves are not changed).

    Args:
        datasets: (dataset, sample_latents) pairs: training sets draw from the posterior,
            held-out sets get its mean.
        module: a configured ``StableDiffusionLoRA`` (its ``vae``, ``text_embeddings``). For
            SDXL the text entry holds the pooled ``text_embeds`` too; the time ids depend on
            each sample's crop and are computed by the module every step.
        cache: the store.
        latents: cache VAE latents (needs deterministic crops).
        text: cache text embeddings (needs a frozen text encoder and fixed captions).
        batch_size: images or prompts per encoder call.
        rank: this process's rank.
        world_size: how many processes share the work.
        barrier: waits for every rank (the strategy's barrier under DDP).

    Raises:
        ValueError: random crops with ``latents``, or a trainable text encoder or tag shuffling
            with ``text``.
    """
    for dataset, _ in datasets:
        check_cacheable(dataset, module, latents, text)
    barrier()  # nobody writes before every rank has listed what is missing
    stats = CacheStats()
    vae_id = model_fingerprint(module.vae) if latents else ""
    text_id = _text_identity(module) if text else ""
    jobs: dict[str, tuple[ImageRecord, CropPlan, bool, ImageCaptionDataset]] = {}
    views = []
    for dataset, sample_latents in datasets:
        latent_keys = _latent_keys(dataset, vae_id, jobs) if latents else None
        text_keys = {p: text_key(p, text_id) for p in dataset.prompts()} if text else None
        views.append(CachedView(cache, latent_keys, text_keys, sample_latents))
    missing = sorted(k for k in jobs if not cache.has("latents", k))
    stats.latents_cached = len(jobs) - len(missing)
    stats.latents_encoded = _encode_images(
        module, cache, [(k, *jobs[k]) for k in missing[rank::world_size]], batch_size
    )
    prompts = {p: k for v in views if v.text_keys for p, k in v.text_keys.items()}
    todo = sorted(p for p, k in prompts.items() if not cache.has("text", k))
    stats.texts_cached = len(prompts) - len(todo)
    stats.texts_encoded = _encode_texts(
        module, cache, [(p, prompts[p]) for p in todo[rank::world_size]], batch_size
    )
    barrier()
    absent = [k for k in missing if not cache.has("latents", k)]
    absent += [prompts[p] for p in todo if not cache.has("text", prompts[p])]
    if absent:
        raise RuntimeError(f"{len(absent)} cache entries missing in {cache.root} after filling")
    return stats, views


def check_fixed_crops(
    cache_latents: bool, fixed: bool, fix: str = "center_crop: true or bucketing: true"
) -> None:
    """Latents are cacheable only when every image has one crop; ``fix`` says how to get one."""
    if cache_latents and not fixed:
        raise ValueError(
            f"cache.latents needs a fixed crop per image, but random crops are on: set {fix} "
            "(random crops change the pixels every step, so their latents cannot be cached)"
        )


def check_cacheable(
    dataset: ImageCaptionDataset, module: StableDiffusionLoRA, latents: bool, text: bool
) -> None:
    """Refuse caching that would serve the wrong tensors."""
    check_fixed_crops(latents, dataset.transform.deterministic)
    encoders = module.text_encoders().values()
    if text and any(p.requires_grad for e in encoders for p in e.parameters()):
        raise ValueError(
            "cache.text_embeddings needs a frozen text encoder, but it trains (a LoRA or new "
            "token embeddings): its outputs change every step; set cache.text_embeddings: false"
        )
    if text and dataset.captions is not None and dataset.captions.varies:
        raise ValueError(
            "cache.text_embeddings cannot serve shuffled tags (every step makes a new caption): "
            "set shuffle_tags: false or cache.text_embeddings: false"
        )


def _text_identity(module) -> str:
    # The module says which of its settings may change its text embeddings.
    settings = module.text_settings()
    identity = [type(module).__qualname__, json.dumps(settings, sort_keys=True, default=str)]
    for tok in module.tokenizers.values():
        identity.append(f"{type(tok).__qualname__}:{len(tok)}:{tok.model_max_length}")
    first, *others = module.text_encoders().values()
    # Every encoder's weights enter the key (SDXL's second, SD3's T5 when it is used).
    identity += [model_fingerprint(encoder) for encoder in others]
    return model_fingerprint(first, *identity)


def _latent_keys(dataset: ImageCaptionDataset, vae_id: str, jobs: dict) -> list:
    keys = []
    for record in dataset.records:
        plan = dataset.transform.plan(record.size)
        settings = dataset.transform.settings()
        if dataset.masks:  # the entry holds the mask too: key it on the mask file's bytes
            settings += f";mask={hashlib.sha256(record.ref.read_mask() or b'').hexdigest()}"
        pair = []
        for flipped in (False, True) if dataset.transform.random_flip else (False,):
            key = latent_key(record.digest, plan, flipped, settings, vae_id)
            jobs.setdefault(key, (record, plan, flipped, dataset))
            pair.append(key)
        keys.append((pair[0], pair[1] if len(pair) > 1 else None))
    return keys


def _encode_images(module, cache: LatentCache, jobs: list, batch_size: int) -> int:
    by_shape: dict[tuple[int, int], list] = {}
    for job in jobs:
        by_shape.setdefault(job[2].target, []).append(job)
    for group in by_shape.values():
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            pixels = torch.stack(
                [ds.transform.apply(rec.open(), plan, flip) for _, rec, plan, flip, ds in chunk]
            )
            mean, std = vae_posterior(module.vae, pixels)
            for (key, rec, plan, flip, ds), m, s in zip(chunk, mean, std, strict=True):
                entry = {"mean": m, "std": s}
                if ds.masks:  # area-averaged onto the latent grid, flipped with the latents
                    mask = ds.transform.apply_mask(rec.open_mask(), plan, flip)
                    entry["mask"] = latent_mask(mask[None], tuple(m.shape[-2:]))[0]
                cache.save("latents", key, entry)
    return len(jobs)


@torch.no_grad()
def _encode_texts(module, cache: LatentCache, jobs: list[tuple[str, str]], batch_size: int) -> int:
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        cond = module.text_embeddings([prompt for prompt, _ in chunk])
        for i, (_, key) in enumerate(chunk):
            cache.save("text", key, {name: value[i] for name, value in cond.items()})
    return len(jobs)
