"""Random-number-generator states in checkpoints, one per rank.

Lightning restores weights, optimizer, scheduler and loop counters, but not the RNG: without it
a resumed run draws other noise and timesteps than the run it continues. Every rank's state is
kept (ranks draw different noise under DDP), gathered on save and restored on resume.
Data randomness does not need this: it is a function of the sample key (``data/keys.py``).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["gather_rng_states", "restore_rng_states"]


def _local_state() -> torch.Tensor:
    """This process's torch CPU (and current CUDA device) generator states, as one byte row."""
    parts = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        parts.append(torch.cuda.get_rng_state())
    return torch.cat(parts)


def gather_rng_states(strategy=None) -> list[torch.Tensor]:
    """Every rank's RNG state, in rank order (a collective: all ranks must call it)."""
    state = _local_state()
    if strategy is None or strategy.world_size == 1:
        return [state]
    gathered = strategy.all_gather(state.to(strategy.root_device))
    return [row.cpu() for row in gathered]


def restore_rng_states(states: list[torch.Tensor], rank: int) -> None:
    """Set this rank's RNG from the states :func:`gather_rng_states` saved."""
    if rank >= len(states):
        rank_zero_warn(
            f"the checkpoint holds RNG states of {len(states)} ranks, this run has more: "
            "ranks without one keep their seed, so the noise differs from an uninterrupted run"
        )
        return
    state = states[rank].cpu().to(torch.uint8)
    cpu_size = torch.get_rng_state().numel()
    torch.set_rng_state(state[:cpu_size])
    if state.numel() > cpu_size and torch.cuda.is_available():
        torch.cuda.set_rng_state(state[cpu_size:])
