"""Masked loss: the objective's weighted reduction, and masks that follow their image through
loading, resizing, cropping, flipping and buckets."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image

from lightning_sd.data import BadImageError, CaptionDataModule, SidecarCaptions
from lightning_sd.data.dataset import ImageCaptionDataset
from lightning_sd.data.images import list_images
from lightning_sd.data.records import FileRef, SourceItem, scan_items
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.data.transforms import ImageTransform
from lightning_sd.objectives import DiffusionObjective, DiscreteSchedule, Huber, VPrediction
from lightning_sd.objectives.masking import reduce_per_sample


@pytest.fixture(scope="module")
def objective():
    schedule = DiscreteSchedule.from_scheduler(DDPMScheduler())
    return DiffusionObjective(VPrediction(), distance=Huber(0.1, "snr"), schedule=schedule)


def _loss_and_output_grad(objective, mask):
    g = torch.Generator().manual_seed(0)
    x0, noise, out = torch.randn(3, 2, 4, 4, 4, generator=g)
    out.requires_grad_(True)
    sigma = objective.schedule.sigmas[torch.tensor([10, 500])]
    loss = objective.loss(lambda x, t: out, x0, noise=noise, sigma=sigma, mask=mask)
    loss.sum().backward()
    return loss.detach(), out.grad


def test_masked_out_latent_cells_get_exactly_zero_gradient(objective):
    mask = torch.ones(2, 1, 32, 32)  # pixel resolution: 8 x 8 pixels per latent cell
    mask[:, :, :, :16] = 0.0  # left half of the image: the left two latent columns
    mask[1, :, :8, 16:24] = 0.5  # a half-kept cell
    _, grad = _loss_and_output_grad(objective, mask)
    assert torch.count_nonzero(grad[:, :, :, :2]) == 0
    assert (grad[:, :, :, 2:] != 0).all()


def test_full_mask_is_no_mask_and_the_reduction_is_kohyas_over_the_mask_mean(objective):
    no_mask, _ = _loss_and_output_grad(objective, None)
    full, _ = _loss_and_output_grad(objective, torch.ones(2, 32, 32))
    assert torch.allclose(full, no_mask, rtol=1e-6, atol=0)
    g = torch.Generator().manual_seed(1)
    error = torch.rand(2, 4, 4, 4, generator=g)
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.3).float()
    # kohya's apply_masked_loss: area-resize the mask to the loss, multiply, then mean.
    kohya_mask = F.interpolate(mask, size=(4, 4), mode="area")
    kohya = (error * kohya_mask).flatten(1).mean(1)
    ours = reduce_per_sample(error, mask)
    assert torch.allclose(ours * kohya_mask.flatten(1).mean(1), kohya, rtol=1e-6)
    assert torch.allclose(reduce_per_sample(error, kohya_mask), ours, rtol=1e-6)  # latent grid


def test_a_mask_off_the_latent_grid_is_refused(objective):
    with pytest.raises(ValueError, match="loss mask of 30x30 does not cover the 4x4 latent grid"):
        _loss_and_output_grad(objective, torch.ones(2, 1, 30, 30))


# --- masks on disk ------------------------------------------------------------------------


def _pattern(w, h, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def masked_dir(tmp_path_factory):
    """Three images: one with a .mask.png, one with alpha, one with neither."""
    folder = tmp_path_factory.mktemp("masked")
    rgb = _pattern(48, 40)
    Image.fromarray(rgb).save(folder / "sidecar.tif")  # lossless, and not a .png
    # The mask is the image's red channel: after any crop/flip the two must still agree.
    Image.fromarray(rgb[..., 0]).save(folder / "sidecar.mask.png")
    # Black with alpha = red: composited over white its red channel reads 255 - alpha.
    rgba = np.concatenate([np.zeros_like(rgb), rgb[..., :1]], axis=-1)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rgb).save(folder / "plain.png")
    for name in ("sidecar", "alpha", "plain"):
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    return folder


def test_mask_files_are_not_images_and_sources_are_found(masked_dir):
    assert [p.name for p in list_images(masked_dir)] == ["alpha.png", "plain.png", "sidecar.tif"]
    records = {
        r.name.split("/")[-1]: r
        for r in scan_items(SidecarCaptions(str(masked_dir)).items(), lambda *a: None, False, "x")
    }
    red = _pattern(48, 40)[..., 0]
    assert np.array_equal(np.asarray(records["sidecar.tif"].open_mask()), red)
    assert np.array_equal(np.asarray(records["alpha.png"].open_mask()), red)
    assert np.asarray(records["plain.png"].open_mask()).min() == 255  # full mask


def test_a_mask_of_another_size_is_refused_naming_the_image(tmp_path):
    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    Image.new("L", (20, 40)).save(tmp_path / "a.mask.png")
    item = SourceItem(str(tmp_path / "a.png"), FileRef(tmp_path / "a.png"), "a")
    record = scan_items([item], lambda *a: None, False, "x")[0]
    with pytest.raises(BadImageError, match=r"a.png: its mask is 20x40 px but the image is 40x40"):
        record.open_mask()


@pytest.mark.parametrize(
    "transform",
    [ImageTransform(32, random_flip=True), ImageTransform(32, center_crop=True, random_flip=True),
     ImageTransform(32, random_flip=True, buckets=[(32, 32), (24, 40), (40, 24)])],
    ids=["random-crop", "center-crop", "buckets"],
)  # fmt: skip
def test_crops_and_flips_keep_mask_and_image_aligned(masked_dir, transform):
    items = SidecarCaptions(str(masked_dir)).items()
    records = scan_items(items, lambda *a: None, False, "x")
    dataset = ImageCaptionDataset(records, transform, seed=3, masks=True)
    flips = set()
    for key in range(len(records) * 8):
        sample = dataset[key]
        red = (sample["pixel_values"][0] + 1.0) * 127.5  # the same resize, crop, flip
        mask = sample["mask"]
        assert mask.shape == (1, *sample["pixel_values"].shape[-2:])
        name = records[key % len(records)].name
        if "plain" in name:
            assert torch.equal(mask, torch.ones_like(mask))
        elif "alpha" in name:  # resized as uint8 apart: 255 - round(x) vs round(255 - x)
            assert (mask[0] * 255.0 - (255.0 - red)).abs().max() <= 1.0 + 1e-3
        else:
            assert (mask[0] * 255.0 - red).abs().max() < 1e-3
        flips.add((name, tuple(sample["mask"][0, 0, :4].tolist())))
    assert len(flips) > len(records)  # some image was seen cropped or flipped two ways


def test_caption_datamodule_serves_masks_to_a_training_step(masked_dir, tiny_pipeline_dir):
    from lightning_sd.module import StableDiffusionLoRA

    dm = CaptionDataModule(
        SidecarCaptions(str(masked_dir)),
        resolution=32,
        masked_loss=True,
        loader=LoaderSettings(batch_size=3),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (3, 1, 32, 32)
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    module.configure_model()
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss) and loss > 0


def test_cached_masks_are_the_area_averaged_masks_flipped_with_their_latents(
    masked_dir, tiny_pipeline_dir, tmp_path
):
    from lightning_sd.module import StableDiffusionLoRA
    from lightning_sd.objectives.masking import latent_mask

    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    module.configure_model()
    kwargs = dict(resolution=32, bucketing=True, bucket_multiple=8, random_flip=True)
    cached = CaptionDataModule(
        SidecarCaptions(str(masked_dir)), cache=CacheSettings(latents=True, dir=str(tmp_path)),
        masked_loss=True, **kwargs,
    )  # fmt: skip
    cached.setup("fit")
    assert cached.fill_cache(module).latents_encoded == 6  # 3 images x (image, mirror)
    fresh = CaptionDataModule(SidecarCaptions(str(masked_dir)), masked_loss=True, **kwargs)
    fresh.setup("fit")
    for key in range(12):
        from_cache, pixels = cached.train_set[key], fresh.train_set[key]
        grid = tuple(from_cache["latents"].shape[-2:])
        expected = latent_mask(pixels["mask"][None], grid)[0]
        assert torch.allclose(from_cache["mask"], expected, atol=1e-6)
    # Another mask file gives another cache entry: nothing stale is served.
    keys = cached.train_set.cached.latent_keys
    mask_file = masked_dir / "sidecar.mask.png"
    original = mask_file.read_bytes()
    try:
        Image.new("L", (48, 40), 7).save(mask_file)
        again = CaptionDataModule(
            SidecarCaptions(str(masked_dir)), cache=CacheSettings(latents=True, dir=str(tmp_path)),
            masked_loss=True, **kwargs,
        )  # fmt: skip
        again.setup("fit")
        assert again.fill_cache(module).latents_encoded == 2
        assert again.train_set.cached.latent_keys != keys
    finally:
        mask_file.write_bytes(original)
