"""Data inputs that failed with a library traceback or were dropped in silence (issue 19,
item 5): unreadable captions, damaged cache entries, subfolders, broken symlinks, empty
captions, and a held-out split that changed when the folder moved."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from PIL import Image

from lightning_sd.data import BadImageError, CaptionDataModule, SidecarCaptions
from lightning_sd.data.cache_store import LatentCache
from lightning_sd.data.images import list_images


def photo(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture()
def folder(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(6):
        photo(i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"photo number {i}")
    return folder


def setup(folder, **kwargs) -> CaptionDataModule:
    dm = CaptionDataModule(SidecarCaptions(str(folder)), resolution=32, **kwargs)
    dm.setup("fit")
    return dm


def test_an_unreadable_caption_names_its_file_and_is_skipped_when_asked(folder):
    """Before: UnicodeDecodeError naming no file, and skip_bad_images did not help."""
    (folder / "img2.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(BadImageError, match=r"img2\.txt: caption cannot be read \('utf-8'"):
        setup(folder)
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 of 6 images .*img2\.txt"):
        dm = setup(folder, skip_bad_images=True)
    assert len(dm.train_set) == 5


def test_left_out_files_and_empty_captions_are_counted_in_one_line(folder):
    """Before: images in subfolders, broken symlinks and empty captions vanished silently."""
    (folder / "more").mkdir()
    photo(9).save(folder / "more" / "nested.png")
    (folder / "gone.png").symlink_to(folder / "deleted.png")
    (folder / "img4.txt").write_text("  \n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        setup(folder)
    messages = [str(w.message) for w in caught]
    assert (
        f"{folder}: 6 images used; left out: 1 files in subfolders (not searched), "
        "1 broken symlinks (e.g. gone.png)"
    ) in messages
    assert any(
        m.startswith(f"1 of 6 images in {folder} have an empty caption") and "img4.png" in m
        for m in messages
    )
    assert len(list_images(folder, recursive=True)) == 7  # recursive sources do search


def test_the_held_out_split_does_not_depend_on_where_the_folder_is(folder, tmp_path):
    """Before: names (absolute paths) were hashed, so moving the dataset changed the split."""
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "renamed")

    def held_out(root):
        dm = setup(root, validation_split=0.5)
        return sorted(r.name.rsplit("/", 1)[1] for r in dm.val_set.records)

    assert held_out(folder) == held_out(moved)
    assert len(held_out(folder)) == 3


def test_a_damaged_cache_entry_is_recomputed_and_a_load_names_it(tmp_path):
    """Before: a truncated entry failed in safetensors with no file named."""
    cache = LatentCache(tmp_path)
    path = cache.save("latents", "ab" * 32, {"mean": torch.ones(4, 4, 4)})
    assert cache.has("latents", "ab" * 32)
    path.write_bytes(path.read_bytes()[:-10])
    assert not cache.has("latents", "ab" * 32)  # counted as missing: the cache refills it
    with pytest.raises(BadImageError, match=f"{path}: damaged cache entry"):
        cache.load("latents", "ab" * 32)
