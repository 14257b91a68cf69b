"""Pivotal tuning: new tokens whose embeddings train with the LoRA (textual inversion + LoRA).

As in the diffusers advanced DreamBooth script: prompts name the subject with an abstraction
(``TOK``) that becomes N new tokens ``<s0><s1>...``; their embeddings train at their own rate
for the first part of training and then stay fixed while the LoRA goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ExtendedEmbedding", "PivotalTuning", "add_tokens"]


@dataclass
class PivotalTuning:
    """Settings of the new tokens.

    Attributes:
        token_abstraction: the placeholder used in prompts and captions.
        num_tokens: how many new tokens replace it.
        initializer: a word whose token embedding starts every new token; ``None`` starts them
            random with the vocabulary's standard deviation, as the diffusers script does.
        learning_rate: the embeddings' learning rate.
        train_fraction: the fraction of training steps during which the embeddings train; their
            learning rate is 0 afterwards (never ``requires_grad`` flips mid-run, which breaks DDP).
    """

    token_abstraction: str = "TOK"
    num_tokens: int = 2
    initializer: str | None = None
    learning_rate: float = 5e-4
    train_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"pivotal tuning needs num_tokens >= 1, got {self.num_tokens}")
        if not 0.0 <= self.train_fraction <= 1.0:
            raise ValueError(f"train_fraction must be in [0, 1], got {self.train_fraction}")

    @property
    def tokens(self) -> list[str]:
        return [f"<s{i}>" for i in range(self.num_tokens)]

    def substitute(self, prompt: str) -> str:
        """Replace the abstraction by the new tokens, e.g. ``a TOK dog`` -> ``a <s0><s1> dog``."""
        return prompt.replace(self.token_abstraction, "".join(self.tokens))


class ExtendedEmbedding(nn.Module):
    """A frozen vocabulary plus trainable rows for new token ids (``>= base.num_embeddings``).

    Only the new rows are parameters that train, so the optimizer state, the checkpoint and
    weight decay touch nothing else: the other rows are unchanged by construction.
    """

    def __init__(self, base: nn.Embedding, new_rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.new = nn.Parameter(new_rows.detach().float().clone())

    @property
    def num_base(self) -> int:
        return self.base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        """The full table, for code that reads ``get_input_embeddings().weight``."""
        return torch.cat([self.base.weight, self.new.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.num_base).unsqueeze(-1)
        out = self.base(ids.clamp(max=self.num_base - 1))
        new = self.new[(ids - self.num_base).clamp(min=0, max=len(self.new) - 1)]
        return torch.where(is_new, new.to(out.dtype), out)


def add_tokens(tokenizer, text_encoder: nn.Module, config: PivotalTuning) -> list[int]:
    """Add the new tokens to the tokenizer and trainable rows for them to the text encoder.

    Returns:
        The new token ids.
    """
    embedding = text_encoder.get_input_embeddings()
    if isinstance(embedding, ExtendedEmbedding):
        raise RuntimeError("this text encoder already has pivotal-tuning tokens")
    existing = [t for t in config.tokens if t in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"tokens {existing} already exist in the tokenizer; pick other names")
    tokenizer.add_tokens(config.tokens)
    ids = tokenizer.convert_tokens_to_ids(config.tokens)
    expected = list(range(embedding.num_embeddings, embedding.num_embeddings + config.num_tokens))
    if ids != expected:
        raise RuntimeError(
            f"new token ids {ids} do not follow the embedding table (size "
            f"{embedding.num_embeddings}): tokenizer and text encoder vocabularies differ"
        )
    weight = embedding.weight.detach()
    if config.initializer is None:
        rows = torch.randn(config.num_tokens, weight.shape[1]) * weight.float().std()
    else:
        init_ids = tokenizer(config.initializer, add_special_tokens=False).input_ids
        if len(init_ids) != 1:
            raise ValueError(
                f"initializer {config.initializer!r} must be a single token, got {len(init_ids)}"
            )
        rows = weight[init_ids[0]].float().expand(config.num_tokens, -1)
    text_encoder.set_input_embeddings(ExtendedEmbedding(embedding, rows))
    return ids
