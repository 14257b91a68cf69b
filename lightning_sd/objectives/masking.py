"""Masked loss: per-pixel weights on the error, averaged down to the latent grid.

A mask (B, 1, H, W) in [0, 1] at any resolution that is a whole multiple of the latent grid is
area-averaged onto it (kohya sd-scripts' ``apply_masked_loss`` resizes the same way). Each
latent cell then weighs its error by the fraction of its pixels kept, and the sample's loss is
the weighted mean, sum(w d) / sum(w): a full mask is exactly no mask, and a sample's loss keeps
its scale whatever share of the image is kept (kohya's mean(w d) equals ours times mean(w)). A
masked-out cell (w = 0) gets exactly zero gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["latent_mask", "reduce_per_sample"]


def latent_mask(mask: Tensor, grid: tuple[int, int]) -> Tensor:
    """Area-average a (B, 1, H, W) or (B, H, W) mask onto the (h, w) latent grid.

    Raises:
        ValueError: a mask whose sides are not whole multiples of the grid's (a bucket or crop
            mismatch between the image and its mask).
    """
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    h, w = mask.shape[-2:]
    if h % grid[0] or w % grid[1]:
        raise ValueError(
            f"loss mask of {w}x{h} does not cover the {grid[1]}x{grid[0]} latent grid in whole "
            "cells: crop and resize the mask with its image"
        )
    return F.adaptive_avg_pool2d(mask.float(), grid)


def reduce_per_sample(per_element: Tensor, mask: Tensor | None = None) -> Tensor:
    """The mean of (B, C, h, w) errors per sample, weighted by ``mask`` when one is given."""
    if mask is None:
        return per_element.flatten(1).mean(1)
    w = latent_mask(mask.to(per_element.device), tuple(per_element.shape[-2:]))
    w = w.expand_as(per_element)
    kept = w.flatten(1).sum(1)
    return (per_element * w).flatten(1).sum(1) / kept.clamp_min(1e-12)
