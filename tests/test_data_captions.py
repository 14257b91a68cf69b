"""Captioned data: three sources, caption augmentation, the held-out split, bad input, recipe."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_sd.cli import main
from lightning_sd.data import (
    BadImageError,
    CaptionDataModule,
    CaptionTransform,
    HFDataset,
    ImageFolder,
    MissingCaptionError,
    SidecarCaptions,
)

CONFIGS = Path(__file__).parents[1] / "configs"
# (scikit-image photo, width, height, caption): real photos, several aspect ratios.
PHOTOS = [
    ("astronaut", 48, 48, "TOK, an astronaut, portrait, flag"),
    ("coffee", 56, 40, "a cup of coffee, saucer, spoon"),
    ("rocket", 40, 56, "a rocket on the launch pad, sky"),
    ("chelsea", 54, 36, "a tabby cat, whiskers"),
    ("immunohistochemistry", 40, 40, "stained tissue, microscope"),
    ("hubble_deep_field", 56, 36, "galaxies, deep field, space"),
]


def photo(name: str, width: int, height: int) -> Image.Image:
    from skimage import data

    return Image.fromarray(getattr(data, name)()).convert("RGB").resize((width, height))


@pytest.fixture(scope="module")
def sidecar_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sidecar")
    for name, w, h, caption in PHOTOS:
        photo(name, w, h).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption + "\n")
    return folder


@pytest.fixture(scope="module")
def imagefolder_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagefolder")
    (folder / "sub").mkdir()
    lines = []
    for i, (name, w, h, caption) in enumerate(PHOTOS):
        rel = f"sub/{name}.png" if i % 2 else f"{name}.png"
        photo(name, w, h).save(folder / rel)
        lines.append(json.dumps({"file_name": rel, "text": caption, "other": i}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def saved_dataset_dir(tmp_path_factory):
    import datasets

    folder = tmp_path_factory.mktemp("hf") / "saved"
    ds = datasets.Dataset.from_dict(
        {
            "img": [photo(name, w, h) for name, w, h, _ in PHOTOS],
            "caption": [c for *_, c in PHOTOS],
        }
    ).cast_column("img", datasets.Image())
    ds.save_to_disk(str(folder))
    return folder


def pairs(source, resolution=32) -> dict[str, np.ndarray]:
    """caption -> the held-out (center-crop) pixels of its image."""
    dm = CaptionDataModule(source, resolution=resolution, center_crop=True)
    dm.setup("fit")
    out = {}
    for i in range(len(dm.train_set)):
        sample = dm.train_set[i]
        out[sample["prompt"]] = sample["pixel_values"].numpy()
    return out


def test_three_sources_yield_the_same_pairs(
    sidecar_dir, imagefolder_dir, saved_dataset_dir, monkeypatch, tmp_path
):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    reference = pairs(SidecarCaptions(str(sidecar_dir)))
    assert sorted(reference) == sorted(c for *_, c in PHOTOS)
    others = [
        ImageFolder(str(imagefolder_dir)),
        HFDataset(str(saved_dataset_dir), image_column="img", caption_column="caption"),
        HFDataset(str(imagefolder_dir)),  # datasets' own imagefolder builder, offline
    ]
    for source in others:
        got = pairs(source)
        assert sorted(got) == sorted(reference), source
        for caption, pixels in reference.items():
            np.testing.assert_array_equal(got[caption], pixels)


def test_caption_dropout_and_tag_shuffle_keep_the_first_tokens():
    torch.manual_seed(0)
    drop = CaptionTransform(dropout=0.2)
    dropped = sum(drop("TOK, a cat") == "" for _ in range(4000)) / 4000
    assert dropped == pytest.approx(0.2, abs=0.02)

    shuffle = CaptionTransform(shuffle_tags=True, keep_tokens=2)
    caption = "TOK, cat, red, sofa, window, sun"
    seen = Counter()
    for _ in range(600):
        tags = shuffle(caption).split(", ")
        assert tags[:2] == ["TOK", "cat"]  # kept in place, the abstraction untouched
        assert sorted(tags) == sorted(caption.split(", "))
        seen[tags[2]] += 1
    assert set(seen) == {"red", "sofa", "window", "sun"}  # every other tag comes first sometimes
    assert CaptionTransform()(caption) == caption


def test_held_out_split_is_deterministic_and_disjoint(sidecar_dir):
    def split():
        dm = CaptionDataModule(
            SidecarCaptions(str(sidecar_dir)), resolution=32, validation_split=0.34
        )
        dm.setup("fit")
        return [r.name for r in dm.train_set.records], [r.name for r in dm.val_set.records]

    train, val = split()
    assert len(val) == 2 and len(train) == 4 and not set(train) & set(val)
    assert split() == (train, val)
    dm = CaptionDataModule(
        SidecarCaptions(str(sidecar_dir)), resolution=32, validation_split=0.34, random_flip=True,
        caption_dropout=1.0,
    )  # fmt: skip
    dm.setup("fit")
    a, b = list(dm.val_dataloader()), list(dm.val_dataloader())
    assert torch.equal(a[0]["pixel_values"], b[0]["pixel_values"])  # no flip, no random crop
    assert all(p for batch in a for p in batch["prompt"])  # no caption dropout either


def _copy_sidecar(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_each_bad_input_names_the_file(sidecar_dir, imagefolder_dir, tmp_path):
    folder = _copy_sidecar(sidecar_dir, tmp_path / "bad")
    source = SidecarCaptions(str(folder))

    def setup():
        CaptionDataModule(source, resolution=32).setup("fit")

    (folder / "coffee.txt").unlink()
    with pytest.raises(MissingCaptionError, match=r"coffee\.png: missing caption.*coffee\.txt"):
        setup()
    (folder / "coffee.txt").write_text("coffee")
    data = (folder / "rocket.png").read_bytes()
    (folder / "rocket.png").write_bytes(data[: len(data) // 3])
    with pytest.raises(BadImageError, match=r"rocket\.png: corrupt or truncated"):
        setup()
    (folder / "rocket.png").write_bytes(data)
    (folder / "notes.doc").write_bytes(b"not an image")
    with pytest.raises(BadImageError, match=r"notes\.doc: not a readable image"):
        setup()
    (folder / "notes.doc").unlink()
    photo("camera", 30, 60).save(folder / "small.png")
    (folder / "small.txt").write_text("a camera")
    with pytest.raises(BadImageError, match=r"small\.png: 30x60 px is smaller than the 32 px"):
        setup()
    (folder / "small.png").unlink()
    setup()  # all repaired

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty holds no images"):
        CaptionDataModule(SidecarCaptions(str(empty)), resolution=32).setup("fit")

    # imagefolder: an image without a metadata line
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    (meta_dir / "metadata.jsonl").write_text(
        (imagefolder_dir / "metadata.jsonl").read_text().splitlines()[0] + "\n"
    )
    photo("astronaut", 48, 48).save(meta_dir / "astronaut.png")
    photo("coffee", 48, 48).save(meta_dir / "orphan.png")
    with pytest.raises(MissingCaptionError, match=r"orphan\.png: missing caption.*'text' entry"):
        CaptionDataModule(ImageFolder(str(meta_dir)), resolution=32).setup("fit")
    (meta_dir / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(FileNotFoundError, match=r"line 1 names .*gone\.png"):
        CaptionDataModule(ImageFolder(str(meta_dir)), resolution=32).setup("fit")


def test_dataset_problems_name_the_dataset(saved_dataset_dir, tmp_path):
    import datasets

    source = HFDataset(str(saved_dataset_dir), image_column="img", caption_column="text")
    with pytest.raises(KeyError, match=r"saved\[train\] has no caption column 'text'.*'caption'"):
        CaptionDataModule(source, resolution=32).setup("fit")
    ds = datasets.load_from_disk(str(saved_dataset_dir))
    ds = ds.map(lambda row, i: {"caption": None if i == 3 else row["caption"]}, with_indices=True)
    ds.save_to_disk(str(tmp_path / "holes"))
    source = HFDataset(str(tmp_path / "holes"), image_column="img", caption_column="caption")
    with pytest.raises(MissingCaptionError, match=r"holes\[train\] row 3: missing caption"):
        CaptionDataModule(source, resolution=32).setup("fit")


def test_skip_bad_images_skips_and_counts(sidecar_dir, tmp_path):
    folder = _copy_sidecar(sidecar_dir, tmp_path / "bad")
    (folder / "coffee.txt").unlink()
    (folder / "rocket.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    photo("camera", 20, 20).save(folder / "small.png")
    (folder / "small.txt").write_text("tiny")
    dm = CaptionDataModule(SidecarCaptions(str(folder)), resolution=32, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"skipped 3 of 7 images") as caught:
        dm.setup("fit")
    message = str(caught[0].message)
    assert "coffee.png" in message and "rocket.png" in message and "small.png" in message
    assert len(dm.train_set) == 4


def test_captions_recipe_fits_with_buckets_and_cache(tiny_pipeline_dir, sidecar_dir, tmp_path):
    main([
        "fit",
        "--config", str(CONFIGS / "tiny.yaml"),
        "--config", str(CONFIGS / "experiments" / "captions_tiny.yaml"),
        "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--data.source.init_args.folder", str(sidecar_dir),
        "--data.cache.dir", str(tmp_path / "cache"),
        "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    assert list((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert list((tmp_path / "cache" / "text").rglob("*.safetensors"))
    assert list(tmp_path.rglob("pytorch_lora_weights.safetensors"))
