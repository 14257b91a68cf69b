"""Checkpoints written to a temporary file and renamed: a killed run never leaves half a file.

Lightning's ``TorchCheckpointIO`` writes the final path directly, so a SIGKILL (or a full disk)
mid-write leaves a truncated ``last.ckpt`` that the next ``--ckpt_path last`` fails on. Here the
bytes go to a hidden temporary file in the same folder, are flushed to disk, and replace the
target in one ``os.replace``, which POSIX makes atomic. A full disk is reported as such, naming
the file (torch's zip writer turns the ``ENOSPC`` of a write into an opaque
``[enforce fail at inline_container.cc]``).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_sd.atomic import atomic_path, no_space_error

__all__ = ["AtomicCheckpointIO", "no_space_error"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-then-rename saving (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        with atomic_path(path, "checkpoint") as tmp:
            writer = None
            try:
                with _open(os.open(tmp, os.O_WRONLY | os.O_TRUNC)) as f:  # closing flushes
                    writer = _RecordingWriter(f)
                    torch.save(checkpoint, writer)
            except RuntimeError as err:
                # torch's zip writer hides the ENOSPC of a write behind its own message
                cause = (writer and writer.error) or err
                if getattr(cause, "errno", None) == errno.ENOSPC:
                    raise no_space_error(path, "checkpoint") from cause
                raise


def _open(fd: int):
    return os.fdopen(fd, "wb")


class _RecordingWriter:
    """Keeps the ``OSError`` of a failed write, which torch's writer replaces with its own."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()
