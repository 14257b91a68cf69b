"""The one way files are written: a unique temporary file beside the target, renamed into place.

Every writer (checkpoints, LoRA files, cache entries, grids, model cards, benchmark results)
goes through :func:`atomic_path`, so each has the same guarantees: a reader never sees half a
file, two writers in one folder never share a temporary name, the bytes are on disk (fsync)
before the rename, a failure leaves no temporary behind, and a full disk is reported in words
naming the file. Temporaries are hidden ``.<name>.<random>.tmp`` files, which
``run_dir.remove_leftovers`` deletes after a SIGKILL. Plain Python: no torch import.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["NoSpaceError", "atomic_path", "no_space_error", "write_atomic"]


class NoSpaceError(OSError):
    """``ENOSPC`` in words (an ``OSError`` with ``errno.ENOSPC``)."""


def no_space_error(path: str | Path, what: str) -> NoSpaceError:
    """``ENOSPC`` in words, naming the file; the previous file is untouched by the rename."""
    path = Path(path)
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was written"
    return NoSpaceError(
        errno.ENOSPC,
        f"no space left on device while writing the {what} {path} ({kept}); free space on "
        f"{path.parent}'s filesystem or point the output elsewhere",
    )


def _is_no_space(err: BaseException) -> bool:
    # safetensors and PIL re-raise the OS error under their own types, keeping its message
    return getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)


@contextmanager
def atomic_path(path: str | Path, what: str = "file") -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success it replaces ``path``.

    Write the temporary however the library wants (a path or an open file); when the block
    ends without an error the file is fsynced and renamed over ``path`` (atomic on POSIX), and
    the folder is fsynced so the rename survives a power cut. On any error the temporary is
    deleted and ``path`` keeps its previous content.

    Args:
        path: the final file; its folder is created.
        what: how a full-disk error names the file ("checkpoint", "cache entry", ...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            yield tmp
            _fsync(tmp)
        except NoSpaceError:
            raise
        except Exception as err:
            if _is_no_space(err):
                raise no_space_error(path, what) from err
            raise
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes, what: str = "file") -> Path:
    """Write text (UTF-8) or bytes to ``path`` through :func:`atomic_path`."""
    with atomic_path(path, what) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without folder handles: the rename stands without it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
