"""The one atomic writer: unique temporaries, fsync before the rename, nothing left on failure."""

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_sd import atomic
from lightning_sd.atomic import atomic_path, write_atomic
from lightning_sd.data.cache_store import LatentCache
from lightning_sd.grid import save_image_atomic
from lightning_sd.lora_io import write_safetensors
from lightning_sd.model_card import write_model_card


def test_two_writers_in_one_folder_get_different_temporaries(tmp_path):
    """Before: grid.py and model_card.py used one fixed temporary name per target."""
    with (
        atomic_path(tmp_path / "README.md") as first,
        atomic_path(tmp_path / "README.md") as second,
    ):
        assert first != second and first.parent == second.parent == tmp_path
        assert first.name.startswith(".README.md.") and first.name.endswith(".tmp")
        first.write_text("one")
        second.write_text("two")
    assert (tmp_path / "README.md").read_text() == "one"  # the outer block finished last
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]


def test_concurrent_writers_never_expose_a_mixed_or_partial_file(tmp_path):
    target = tmp_path / "grid.png"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    threads = [threading.Thread(target=write_atomic, args=(target, p)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = write_atomic(tmp_path / "sub" / "results.csv", "a,b\n1,2\n")
    with pytest.raises(ValueError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("boom")
    assert target.read_text() == "a,b\n1,2\n"
    assert [p.name for p in target.parent.iterdir()] == ["results.csv"]


def test_the_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        atomic.os, "replace", lambda a, b: (events.append("rename"), real_replace(a, b))[1]
    )
    write_atomic(tmp_path / "x.bin", b"123")
    assert events == ["fsync", "rename", "fsync"]  # the file, the rename, the folder


def test_no_space_is_reported_in_words_whatever_type_the_library_raises(tmp_path):
    target = tmp_path / "entry.safetensors"

    class LibraryError(Exception):  # safetensors keeps only the OS message
        pass

    with pytest.raises(OSError) as caught, atomic_path(target, "cache entry"):
        raise LibraryError("No space left on device (os error 28)")
    assert caught.value.errno == errno.ENOSPC
    assert f"while writing the cache entry {target} (nothing was written)" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_every_writer_goes_through_the_helper(tmp_path, monkeypatch):
    """Checkpoints, LoRA files, cache entries, grids and model cards all use ``atomic_path``."""
    from lightning_sd.checkpoint_io import AtomicCheckpointIO

    written = []
    real = atomic.atomic_path

    def spy(path, what="file"):
        written.append((Path(path).name, what))
        return real(path, what)

    import lightning_sd.callbacks.fault_tolerance as fault_tolerance
    import lightning_sd.checkpoint_io as checkpoint_io
    import lightning_sd.data.cache_store as cache
    import lightning_sd.grid as grid
    import lightning_sd.lora_io as lora_io
    import lightning_sd.model_card as model_card

    for module in (checkpoint_io, cache, grid, lora_io, fault_tolerance):
        monkeypatch.setattr(module, "atomic_path", spy)
    monkeypatch.setattr(
        model_card, "write_atomic", lambda p, d, w: spy(p, w) and atomic.write_atomic(p, d, w)
    )
    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    write_safetensors(tmp_path / "lora.safetensors", {"a": torch.ones(2)})
    LatentCache(tmp_path / "cache").save("text", "ab" * 32, {"e": torch.ones(2)})
    save_image_atomic(Image.new("RGB", (4, 4)), tmp_path / "grid.png")
    fault_tolerance._link_or_copy(tmp_path / "last.ckpt", tmp_path / "confirmed.ckpt")
    write_model_card(tmp_path, {}, {})
    assert written == [
        ("last.ckpt", "checkpoint"),
        ("lora.safetensors", "file"),
        ("ab" * 32 + ".safetensors", "cache entry"),
        ("grid.png", "image"),
        ("confirmed.ckpt", "checkpoint"),
        ("README.md", "model card"),
    ]
    assert torch.load(tmp_path / "confirmed.ckpt", weights_only=True) == {"step": 1}
