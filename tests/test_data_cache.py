"""The latent / text-embedding cache: equal to fresh encodings, never stale, never re-encoding."""

import pytest
import torch
from lightning import Callback, Trainer
from PIL import Image

from lightning_sd.data import (
    CacheStats,
    CaptionDataModule,
    DreamBoothDataModule,
    LatentCache,
    SidecarCaptions,
)
from lightning_sd.data.cache_store import latent_key, model_fingerprint
from lightning_sd.data.keys import sample_generator, sample_key
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.encoding import vae_posterior
from lightning_sd.module import StableDiffusionLoRA

SIZES = [(48, 48), (56, 40), (40, 56), (54, 36), (44, 44), (50, 34)]


def write_photos(folder, sizes=SIZES, photo="coffee"):
    from skimage import data

    folder.mkdir(exist_ok=True)
    image = Image.fromarray(getattr(data, photo)())
    for i, (w, h) in enumerate(sizes):
        image.crop((i * 20, 0, i * 20 + 300, 300)).resize((w, h)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo number {i}")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "set")


@pytest.fixture
def module(tiny_pipeline_dir):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    module.configure_model()
    return module


def test_cached_latents_and_embeddings_equal_fresh_ones(module, photos, tmp_path):
    dm = CaptionDataModule(
        SidecarCaptions(str(photos)),
        resolution=32,
        bucketing=True,
        bucket_multiple=8,
        random_flip=True,
        validation_split=0.34,
        loader=LoaderSettings(batch_size=2),
        cache=CacheSettings(dir=str(tmp_path), latents=True, text_embeddings=True),
    )
    dm.setup("fit")
    built = dm.train_set
    stats = dm.fill_cache(module)
    # The fill serves cached copies and leaves the datasets setup built as they were.
    assert built.cached is None and dm.train_set.cached is not None
    assert dm.train_set is not built and dm.train_set.records is built.records
    # 4 training images x (image, mirror) + 2 held-out images unflipped; 6 captions.
    assert stats == CacheStats(latents_encoded=10, latents_cached=0, texts_encoded=6)
    cache = LatentCache(tmp_path)
    for dataset in (dm.train_set, dm.val_set):
        for record, keys in zip(dataset.records, dataset.cached.latent_keys, strict=True):
            plan = dataset.transform.plan(record.size)
            for flipped, key in enumerate(keys):
                if key is None:
                    continue
                pixels = dataset.transform.apply(record.open(), plan, bool(flipped))[None]
                fresh = module.encode_latents(pixels, sample=False)[0]
                torch.testing.assert_close(cache.load("latents", key)["mean"], fresh)
    # Held out: the posterior mean, exactly what the uncached validation step encodes.
    sample = dm.val_set[0]
    assert "pixel_values" not in sample
    record = dm.val_set.records[0]
    pixels = dm.val_set.transform.apply(record.open(), dm.val_set.transform.plan(record.size), 0)
    torch.testing.assert_close(sample["latents"], module.encode_latents(pixels[None], False)[0])
    torch.testing.assert_close(
        sample["cond"]["encoder_hidden_states"],
        module.encode_text([record.caption])["encoder_hidden_states"][0],
    )
    # Training: a fresh draw from the posterior, mean + std * eps, from the sample's generator.
    key = sample_key(3, 0, len(dm.train_set))  # epoch 3, index 0
    drawn = dm.train_set[key]
    gen = sample_generator(dm.train_set.seed, key)
    flipped = bool(torch.rand((), generator=gen) < 0.5)
    entry = cache.load("latents", dm.train_set.cached.latent_keys[0][flipped])
    expected = entry["mean"] + entry["std"] * torch.randn(entry["std"].shape, generator=gen)
    torch.testing.assert_close(drawn["latents"], expected)
    assert not torch.equal(drawn["latents"], entry["mean"])
    torch.testing.assert_close(dm.train_set[key]["latents"], drawn["latents"])  # a function of key


def test_std_is_the_posterior_std(module):
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = vae_posterior(module.vae, pixels)
    torch.testing.assert_close(mean, module.encode_latents(pixels, sample=False))
    dist = module.vae.encode(pixels).latent_dist
    torch.testing.assert_close(std, dist.std * module.vae.config.scaling_factor)


class EncoderCalls(Callback):
    """Counts VAE encodes and text-encoder forwards of every instance, per phase of a fit."""

    def __init__(self, monkeypatch):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel

        self.vae = self.text = 0
        self.at_epoch_start: list[tuple[int, int]] = []
        self.at_epoch_end: list[tuple[int, int]] = []
        for cls, method, counter in (
            (AutoencoderKL, "encode", "vae"),
            (CLIPTextModel, "forward", "text"),
        ):
            monkeypatch.setattr(cls, method, self._counted(getattr(cls, method), counter))

    def _counted(self, fn, counter):
        def counted(*args, **kwargs):
            setattr(self, counter, getattr(self, counter) + 1)
            return fn(*args, **kwargs)

        return counted

    def on_train_epoch_start(self, trainer, pl_module):
        self.at_epoch_start.append((self.vae, self.text))

    def on_train_epoch_end(self, trainer, pl_module):
        self.at_epoch_end.append((self.vae, self.text))


def _fit(pipeline, data, monkeypatch, epochs=2):
    calls = EncoderCalls(monkeypatch)
    trainer = Trainer(
        max_epochs=epochs, callbacks=[calls], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1,
        limit_train_batches=2, limit_val_batches=1,
    )  # fmt: skip
    trainer.fit(StableDiffusionLoRA(str(pipeline)), data)
    return calls


def test_training_from_the_cache_never_calls_the_encoders(
    tiny_pipeline_dir, instance_dir, photos, tmp_path, monkeypatch
):
    def data():
        return DreamBoothDataModule(
            str(instance_dir),
            "a photo of sks cat",
            resolution=32,
            center_crop=True,
            random_flip=True,
            class_data_dir=str(photos),
            class_prompt="a photo",
            num_class_images=4,
            loader=LoaderSettings(batch_size=2),
            cache=CacheSettings(dir=str(tmp_path), latents=True, text_embeddings=True),
        )

    dm = data()
    first = _fit(tiny_pipeline_dir, dm, monkeypatch)
    # (8 instance + 4 class) x (image, mirror); the held-out views equal the unflipped ones.
    assert dm.cache_stats == CacheStats(latents_encoded=24, texts_encoded=2)
    filled = first.at_epoch_start[0]
    assert filled[0] > 0 and filled[1] > 0  # the filling, before the first epoch
    assert first.at_epoch_start == first.at_epoch_end == [filled, filled]  # none in training

    monkeypatch.undo()
    dm = data()
    again = _fit(tiny_pipeline_dir, dm, monkeypatch, epochs=1)
    assert dm.cache_stats == CacheStats(latents_cached=24, texts_cached=2)
    assert (again.vae, again.text) == (0, 0)  # every entry a hit: no encoder call at all


def test_a_modified_image_setting_or_vae_is_encoded_afresh(module, tmp_path):
    folder = write_photos(tmp_path / "set")

    def fill(resolution=32):
        dm = CaptionDataModule(
            SidecarCaptions(str(folder)),
            resolution=resolution,
            center_crop=True,
            cache=CacheSettings(dir=str(tmp_path / "cache"), latents=True),
        )
        dm.setup("fit")
        return dm, dm.fill_cache(module)

    def served_mean(dm, i):
        return LatentCache(tmp_path / "cache").load(
            "latents", dm.train_set.cached.latent_keys[i][0]
        )

    dm, stats = fill()
    assert (stats.latents_encoded, stats.latents_cached) == (6, 0)
    old = served_mean(dm, 2)["mean"]
    Image.open(folder / "2.png").transpose(Image.Transpose.ROTATE_180).save(folder / "2.png")
    dm, stats = fill()
    assert (stats.latents_encoded, stats.latents_cached) == (1, 5)
    record = dm.train_set.records[2]
    pixels = dm.train_set.transform.apply(
        record.open(), dm.train_set.transform.plan(record.size), 0
    )
    fresh = module.encode_latents(pixels[None], sample=False)[0]
    served = served_mean(dm, 2)["mean"]
    torch.testing.assert_close(served, fresh)
    assert not torch.allclose(served, old)

    assert fill(resolution=24)[1].latents_encoded == 6  # another setting: other crops
    with torch.no_grad():
        module.vae.encoder.conv_in.weight.add_(1e-3)
    assert fill()[1].latents_encoded == 6  # another VAE


def test_keys_change_with_everything_that_changes_the_tensors(module):
    from lightning_sd.data.transforms import CropPlan

    plan = CropPlan((40, 50), (32, 40), 0, 4, (32, 32))
    vae = model_fingerprint(module.vae)
    key = latent_key("digest", plan, False, "settings", vae)
    assert key == latent_key("digest", plan, False, "settings", vae)
    others = [
        latent_key("other", plan, False, "settings", vae),
        latent_key("digest", CropPlan((40, 50), (32, 40), 0, 5, (32, 32)), False, "settings", vae),
        latent_key("digest", plan, True, "settings", vae),
        latent_key("digest", plan, False, "other", vae),
        latent_key("digest", plan, False, "settings", model_fingerprint(module.text_encoder)),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_caching_that_would_serve_wrong_tensors_is_refused(module, photos, tmp_path):
    source = SidecarCaptions(str(photos))
    with pytest.raises(ValueError, match="center_crop: true or bucketing: true"):
        CaptionDataModule(source, resolution=32, cache=CacheSettings(latents=True))
    with pytest.raises(ValueError, match="center_crop: true"):
        DreamBoothDataModule(str(photos), "p", resolution=32, cache=CacheSettings(latents=True))
    with pytest.raises(ValueError, match="shuffled tags"):
        CaptionDataModule(source, shuffle_tags=True, cache=CacheSettings(text_embeddings=True))
    dm = CaptionDataModule(
        source, resolution=32, cache=CacheSettings(text_embeddings=True, dir=str(tmp_path))
    )
    dm.setup("fit")
    module.text_encoder.get_input_embeddings().weight.requires_grad_(True)
    with pytest.raises(ValueError, match="needs a frozen text encoder"):
        dm.fill_cache(module)
