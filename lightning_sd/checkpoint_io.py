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
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

__all__ = ["AtomicCheckpointIO", "no_space_error"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` with write-then-rename saving (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        writer = None
        try:
            try:
                with _open(fd) as f:  # closing flushes, which can fail too
                    writer = _RecordingWriter(f)
                    torch.save(checkpoint, writer)
                    f.flush()
                    os.fsync(f.fileno())
            except (RuntimeError, OSError) as err:
                cause = (writer and writer.error) or err
                if getattr(cause, "errno", None) == errno.ENOSPC:
                    raise no_space_error(path, "checkpoint") from cause
                raise
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


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


def no_space_error(path: str | Path, what: str) -> OSError:
    """``ENOSPC`` in words, naming the file; the previous file is untouched by the rename."""
    path = Path(path)
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    return OSError(
        errno.ENOSPC,
        f"no space left on device while writing the {what} {path} ({kept}); free space on "
        f"{path.parent}'s filesystem or point the output elsewhere",
    )
