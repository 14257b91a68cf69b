"""Checkpoints written to a temporary file and renamed: a killed run never leaves half a file.

Lightning's ``TorchCheckpointIO`` writes the final path directly, so a SIGKILL (or a full disk)
mid-write leaves a truncated ``last.ckpt`` that the next ``--ckpt_path last`` fails on. Here the
bytes go to a hidden temporary file in the same folder, are flushed to disk, and replace the
target in one ``os.replace``, which POSIX makes atomic.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-then-rename saving (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
