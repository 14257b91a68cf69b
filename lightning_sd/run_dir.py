"""One run per output folder: a lock that names the other run, and no stale temporary files.

Two runs started into the same ``default_root_dir`` used to interleave their files silently
(one's config, the other's LoRA, ``last.ckpt`` from one and ``last-v1.ckpt`` from the other).
A run now holds an exclusive ``flock`` on each folder it writes; the kernel drops it when the
process ends, even on SIGKILL, so a lock is never stale. While the lock is held no other writer
exists, so the hidden temporary files a killed run left behind can be deleted safely.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning import Trainer

__all__ = [
    "FolderInUseError",
    "FolderLock",
    "check_fresh_run",
    "held_by_this_process",
    "lock_folders",
    "remove_leftovers",
]

LOCK_NAME = ".lightning_sd.lock"


class FolderInUseError(RuntimeError):
    """Another live run writes into this folder, or it holds another run's checkpoints."""


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<folder>/.lightning_sd.lock``.

    The file records who holds it (host, pid, start time), which the refusal message repeats.
    Within one process the lock is shared (counted): a run's callbacks may lock one folder.
    """

    _held: dict[Path, list[int]] = {}  # folder -> [fd, count] held by this process

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self._acquired = False

    def acquire(self) -> FolderLock:
        if self.folder in self._held:
            self._held[self.folder][1] += 1
            self._acquired = True
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUseError(
                f"another run is writing into {self.folder} (lock {path}, held by {holder}); "
                "two runs there would overwrite each other's checkpoints and LoRA files. Wait "
                "for it to end or choose another --trainer.default_root_dir"
            ) from None
        os.ftruncate(fd, 0)
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.ctime()}
        os.write(fd, json.dumps(holder).encode())
        self._held[self.folder] = [fd, 1]
        self._acquired = True
        return self

    def release(self) -> None:
        if not self._acquired:
            return
        self._acquired = False
        entry = self._held[self.folder]
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[self.folder]
            fcntl.flock(entry[0], fcntl.LOCK_UN)
            os.close(entry[0])


def held_by_this_process(folder: str | Path) -> bool:
    """Whether this process locks ``folder`` or a folder above it."""
    folder = Path(folder).resolve()
    return any(folder == held or held in folder.parents for held in FolderLock._held)


def remove_leftovers(folder: str | Path) -> list[Path]:
    """Delete the hidden ``.<name>.*.tmp`` files and ``.staging-*`` folders of killed writers.

    Call only while holding the folder's lock: then no live writer owns them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in folder.iterdir():
        if path.name.startswith(".") and path.name.endswith(".tmp") and path.is_file():
            path.unlink()
        elif path.name.startswith(".staging-") and path.is_dir():
            shutil.rmtree(path)
        else:
            continue
        removed.append(path)
    return removed


def check_fresh_run(checkpoint_dir: str | Path, resuming: bool) -> None:
    """Refuse to start a new run into a folder that holds another run's ``last*.ckpt``.

    A new run there would overwrite that checkpoint (or fork it as ``last-v1.ckpt``), and
    ``--ckpt_path last`` would then continue whichever is newer.
    """
    folder = Path(checkpoint_dir)
    if resuming or not folder.is_dir():
        return
    found = sorted(p.name for p in folder.glob("last*.ckpt"))
    if found:
        raise FolderInUseError(
            f"{folder} holds the checkpoints of an earlier run ({', '.join(found)}): a new run "
            "would overwrite them. Continue that run with --ckpt_path last, or start this one "
            "in another --trainer.default_root_dir (or move that folder away)"
        )


def lock_folders(trainer: Trainer, folders: list[Path]) -> list[FolderLock]:
    """Rank 0 locks ``folders`` and clears their leftovers; every rank raises if it failed.

    The ranks agree first, so none is left waiting in a collective when rank 0 is refused.
    """
    locks, error = [], None
    if trainer.is_global_zero:
        try:
            for folder in dict.fromkeys(Path(f) for f in folders):
                locks.append(FolderLock(folder).acquire())
                remove_leftovers(folder)
        except FolderInUseError as err:
            error = err
            for lock in locks:
                lock.release()
            locks = []
    if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
        raise error or FolderInUseError(f"rank 0 found {[str(f) for f in folders]} in use")
    return locks
