"""DreamBooth prior preservation: paired batches, per-sample weights, class-image generation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_sd.cli import main
from lightning_sd.data import DreamBoothDataModule, generate_class_images
from lightning_sd.data.settings import LoaderSettings
from lightning_sd.module import StableDiffusionLoRA

CONFIGS = Path(__file__).parents[1] / "configs"
INSTANCE, CLASS = "a photo of sks cat", "a photo of a cat"


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory):
    """Five real photos (scikit-image) standing in for generated class images."""
    from skimage import data

    folder = tmp_path_factory.mktemp("class")
    for i, name in enumerate(["astronaut", "coffee", "rocket", "chelsea", "immunohistochemistry"]):
        Image.fromarray(getattr(data, name)()).resize((40, 40)).save(folder / f"{i}.png")
    return folder


def test_batches_pair_instance_and_class_samples_with_their_weights(instance_dir, class_dir):
    dm = DreamBoothDataModule(
        str(instance_dir),
        INSTANCE,
        resolution=32,
        random_flip=True,
        class_data_dir=str(class_dir),
        class_prompt=CLASS,
        num_class_images=5,
        prior_loss_weight=0.25,
        loader=LoaderSettings(batch_size=2),
    )
    dm.setup("fit")
    assert len(dm.train_set) == 8  # max(8 instance photos, 5 class images)
    batches = list(dm.train_dataloader())
    assert len(batches) == 4
    for batch in batches:
        assert batch["pixel_values"].shape == (4, 3, 32, 32)
        assert batch["prompt"] == [INSTANCE, INSTANCE, CLASS, CLASS]
        assert batch["loss_weight"].tolist() == [1.0, 1.0, 0.25, 0.25]
    # Held out: the instance photos only, weight 1.
    val = next(iter(dm.val_dataloader()))
    assert set(val["prompt"]) == {INSTANCE} and torch.all(val["loss_weight"] == 1)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_module_loss_is_the_weighted_mean_of_per_sample_losses(
    tiny_pipeline_dir, instance_dir, class_dir
):
    dm = DreamBoothDataModule(
        str(instance_dir),
        INSTANCE,
        resolution=32,
        center_crop=True,
        class_data_dir=str(class_dir),
        class_prompt=CLASS,
        num_class_images=5,
        prior_loss_weight=0.3,
        loader=LoaderSettings(batch_size=2),
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    module.configure_model()
    with torch.no_grad():
        torch.manual_seed(7)
        loss = module.training_step(batch, 0)

        # By hand, with the same draws in the same order: VAE sample, then sigmas, then noise.
        torch.manual_seed(7)
        latents = module.encode_latents(batch["pixel_values"])
        cond = module.encode_text(batch["prompt"])["encoder_hidden_states"]
        objective = module.objective
        sigma = objective.sigma_sampler(4, objective.schedule, device=latents.device)
        noise = torch.randn(latents.shape)
        per_sample = [
            objective.loss(
                module.denoiser_fn, latents[i : i + 1], noise=noise[i : i + 1],
                sigma=sigma[i : i + 1], encoder_hidden_states=cond[i : i + 1],
            ).item()
            for i in range(4)
        ]  # fmt: skip
    weights = [1.0, 1.0, 0.3, 0.3]
    expected = sum(w * ell for w, ell in zip(weights, per_sample, strict=True)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    assert loss.item() != pytest.approx(sum(per_sample) / 4, rel=1e-3)  # the weights matter


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float32)


def test_class_generation_fills_only_what_is_missing(tiny_pipeline_dir, instance_dir, tmp_path):
    folder = tmp_path / "class"
    folder.mkdir()
    Image.open(next(instance_dir.iterdir())).save(folder / "mine.png")  # a user's own image
    kwargs = dict(num_images=4, resolution=32, num_inference_steps=2, batch_size=2)
    written = generate_class_images(str(tiny_pipeline_dir), folder, CLASS, **kwargs)
    assert [p.name for p in written] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in written] + ["mine.png"]
    assert Image.open(written[0]).size == (32, 32)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}
    original = _pixels(folder / "class_00001.png")

    assert generate_class_images(str(tiny_pipeline_dir), folder, CLASS, **kwargs) == []
    (folder / "class_00001.png").unlink()
    again = generate_class_images(str(tiny_pipeline_dir), folder, CLASS, **kwargs)
    assert [p.name for p in again] == ["class_00001.png"]
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.iterdir()}
    assert {k: v for k, v in after.items() if k != "class_00001.png"} == {
        k: v for k, v in before.items() if k != "class_00001.png"
    }
    # Seeded per image: regenerated alone (batch of 1), image 1 comes back the same.
    assert np.abs(_pixels(folder / "class_00001.png") - original).mean() < 1.0
    assert not list(folder.glob(".*"))  # no temporary files left behind


def test_prepare_data_without_a_generator_names_the_folder(instance_dir, tmp_path):
    dm = DreamBoothDataModule(
        str(instance_dir), INSTANCE, class_data_dir=str(tmp_path / "cls"), class_prompt=CLASS
    )
    with pytest.raises(ValueError, match=r"cls holds 0 of num_class_images=100"):
        dm.prepare_data()
    with pytest.raises(ValueError, match="class_prompt"):
        DreamBoothDataModule(str(instance_dir), INSTANCE, class_data_dir=str(tmp_path))


def test_dreambooth_prior_recipe_generates_class_images_and_fits(
    tiny_pipeline_dir, instance_dir, tmp_path
):
    class_folder = tmp_path / "class"
    main([
        "fit",
        "--config", str(CONFIGS / "tiny.yaml"),
        "--config", str(CONFIGS / "experiments" / "dreambooth_prior_tiny.yaml"),
        "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--data.instance_data_dir", str(instance_dir),
        "--data.class_data_dir", str(class_folder),
        "--trainer.max_steps", "3",
        "--trainer.default_root_dir", str(tmp_path),
    ])  # fmt: skip
    generated = sorted(p.name for p in class_folder.iterdir())
    assert generated == [f"class_{i:05d}.png" for i in range(8)]  # num_class_images: 8
    assert list(tmp_path.rglob("pytorch_lora_weights.safetensors"))


def test_a_class_folder_with_more_images_serves_only_num_class_images(instance_dir, class_dir):
    dm = DreamBoothDataModule(
        str(instance_dir),
        INSTANCE,
        resolution=32,
        class_data_dir=str(class_dir),
        class_prompt=CLASS,
        num_class_images=3,
        loader=LoaderSettings(batch_size=2),
    )
    dm.setup("fit")
    assert [r.ref.path.name for r in dm.class_set.records] == ["0.png", "1.png", "2.png"]
    assert dm.train_set.prior is dm.class_set and len(dm.train_set) == 8
