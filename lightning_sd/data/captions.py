"""Caption augmentation: dropout (for classifier-free guidance) and tag shuffling."""

from __future__ import annotations

import torch

__all__ = ["CaptionTransform"]


class CaptionTransform:
    """Randomise a caption per sample, from the sample's generator (or torch's global RNG).

    Identifier tokens (``sks``, a pivotal-tuning ``TOK``) are left as written: the module
    substitutes them when it encodes the prompt.

    Args:
        dropout: probability of replacing the caption by ``""``, so the model also learns the
            unconditional prediction that classifier-free guidance needs.
        shuffle_tags: shuffle comma-separated tags, since tag order in booru-style captions
            carries no meaning and a fixed order over-binds the first tags.
        keep_tokens: with ``shuffle_tags``, this many leading tags stay in place (e.g. the
            subject's trigger word).
    """

    def __init__(self, dropout: float = 0.0, shuffle_tags: bool = False, keep_tokens: int = 0):
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"caption dropout must be a probability, got {dropout}")
        if keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {keep_tokens}")
        self.dropout = dropout
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens

    @property
    def varies(self) -> bool:
        """Whether one caption can become many texts (then text embeddings cannot be cached)."""
        return self.shuffle_tags

    def __call__(self, caption: str, generator: torch.Generator | None = None) -> str:
        if self.dropout and float(torch.rand((), generator=generator)) < self.dropout:
            return ""
        if not self.shuffle_tags:
            return caption
        tags = [t.strip() for t in caption.split(",")]
        head, tail = tags[: self.keep_tokens], tags[self.keep_tokens :]
        order = torch.randperm(len(tail), generator=generator).tolist()
        return ", ".join(head + [tail[i] for i in order])
