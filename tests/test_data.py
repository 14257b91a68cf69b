import pytest
import torch
from PIL import Image

from lightning_sd.data import BadImageError, DreamBoothDataModule, list_images, open_rgb


def test_batches_are_normalised_images_with_prompt_and_weight(instance_dir):
    dm = DreamBoothDataModule(str(instance_dir), "a photo of sks cat", resolution=32, batch_size=3)
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
