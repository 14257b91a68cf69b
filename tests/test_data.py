import pytest
import torch
from PIL import Image

from lightning_sd.data import (
    BadImageError,
    DreamBoothDataModule,
    ImageTransform,
    list_images,
    open_rgb,
)
from lightning_sd.data.settings import LoaderSettings


def test_batches_are_normalised_images_with_prompt_and_weight(instance_dir):
    dm = DreamBoothDataModule(
        str(instance_dir), "a photo of sks cat", resolution=32, loader=LoaderSettings(batch_size=3)
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert -1.0 <= batch["pixel_values"].min() < 0 < batch["pixel_values"].max() <= 1.0
    assert batch["prompt"] == ["a photo of sks cat"] * 3
    assert torch.equal(batch["loss_weight"], torch.ones(3))
    # Held-out view: center crop, no flip, so two passes agree exactly.
    a = next(iter(dm.val_dataloader()))["pixel_values"]
    b = next(iter(dm.val_dataloader()))["pixel_values"]
    assert torch.equal(a, b)


def test_empty_folder_names_the_path(tmp_path):
    (tmp_path / "captions.txt").write_text("not an image, and ignored")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        list_images(tmp_path)
    dm = DreamBoothDataModule(str(tmp_path / "missing"), "p")
    with pytest.raises(FileNotFoundError, match="missing"):
        dm.setup("fit")


def test_non_image_and_truncated_files_name_the_file(tmp_path, instance_dir):
    folder = tmp_path / "inst"
    folder.mkdir()
    Image.open(next(instance_dir.iterdir())).save(folder / "ok.png")
    (folder / "notes.pdf").write_bytes(b"%PDF-1.4 this is not an image")
    with pytest.raises(BadImageError, match=r"notes\.pdf.*not a readable image"):
        DreamBoothDataModule(str(folder), "p").setup("fit")
    (folder / "notes.pdf").unlink()
    data = (folder / "ok.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match=r"cut\.png.*corrupt or truncated"):
        DreamBoothDataModule(str(folder), "p").setup("fit")


def test_modes_become_rgb_with_alpha_over_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    rgba.save(tmp_path / "a.png")
    assert open_rgb(tmp_path / "a.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("I;16", (4, 4), 65535).save(tmp_path / "b.png")
    assert open_rgb(tmp_path / "b.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = open_rgb(tmp_path / "c.jpg").getpixel((0, 0))
    assert r > 200 and g < 50 and b < 50


def _png16(path, array):
    """A 16-bit-per-channel PNG (48-bit RGB or 64-bit RGBA), which PIL cannot write itself."""
    import struct
    import zlib

    h, w, c = array.shape
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if c == 3 else 6, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )  # fmt: skip


def test_more_modes_become_rgb(tmp_path):
    import numpy as np

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 1  # palette entry 1 (green) is transparent
    palette.save(tmp_path / "p.png", transparency=1)
    assert open_rgb(tmp_path / "p.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("LA", (4, 4), (80, 255)).save(tmp_path / "la.png")
    assert open_rgb(tmp_path / "la.png").getpixel((0, 0)) == (80, 80, 80)
    rgb48 = np.zeros((4, 4, 3), np.uint16)
    rgb48[..., 0], rgb48[..., 1] = 65535, 32768
    _png16(tmp_path / "rgb48.png", rgb48)
    assert open_rgb(tmp_path / "rgb48.png").getpixel((0, 0)) == (255, 128, 0)
    rgba64 = np.zeros((4, 4, 4), np.uint16)
    rgba64[..., 2] = 65535  # blue, fully transparent
    _png16(tmp_path / "rgba64.png", rgba64)
    assert open_rgb(tmp_path / "rgba64.png").getpixel((0, 0)) == (255, 255, 255)
    Image.new("F", (4, 4), 0.5).save(tmp_path / "f.tiff")
    assert open_rgb(tmp_path / "f.tiff").getpixel((0, 0)) in {(127, 127, 127), (128, 128, 128)}
    Image.new("1", (4, 4), 1).save(tmp_path / "one.png")
    assert open_rgb(tmp_path / "one.png").getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 20))  # blue stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 degrees clockwise to display"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = open_rgb(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    r, g, b = upright.getpixel((10, 3))  # the stripe is now at the top
    assert b > 200 and r < 60


def test_transform_records_the_crop_for_micro_conditioning():
    transform = ImageTransform(32, center_crop=True)
    sample = transform(Image.new("RGB", (64, 40)))  # resized to 51x32, 19 spare columns
    assert sample["pixel_values"].shape == (3, 32, 32)
    assert sample["original_size"].tolist() == [40, 64]
    assert sample["crop_top_left"].tolist() == [0, 9]
    assert sample["target_size"].tolist() == [32, 32]
    torch.manual_seed(0)
    lefts = {ImageTransform(32).plan((40, 64)).left for _ in range(200)}
    assert lefts == set(range(20))  # random crops reach every offset


def test_repeats_and_too_small_instance_images(instance_dir, tmp_path):
    dm = DreamBoothDataModule(
        str(instance_dir), "p", resolution=32, repeats=3, loader=LoaderSettings(batch_size=8)
    )
    dm.setup("fit")
    assert len(dm.train_set) == 24 and len(list(dm.train_dataloader())) == 3
    folder = tmp_path / "small"
    folder.mkdir()
    Image.open(next(instance_dir.iterdir())).save(folder / "ok.png")
    Image.new("RGB", (40, 24)).save(folder / "thumb.png")
    with pytest.raises(BadImageError, match=r"thumb\.png: 40x24 px is smaller than the 32 px"):
        DreamBoothDataModule(str(folder), "p", resolution=32).setup("fit")
    dm = DreamBoothDataModule(str(folder), "p", resolution=32, skip_bad_images=True)
    with pytest.warns(UserWarning, match=r"(?s)skipped 1 of 2 images.*thumb\.png"):
        dm.setup("fit")
    assert len(dm.train_set) == 1
