"""The DreamBooth DataModule: instance photos, optional class images for prior preservation, and
a fixed held-out view of the instance photos."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lightning_sd.data.base import ImageDataModule, check_positive
from lightning_sd.data.cache_fill import check_fixed_crops
from lightning_sd.data.class_images import count_images, generate_class_images
from lightning_sd.data.dataset import ImageCaptionDataset
from lightning_sd.data.dreambooth_datasets import (
    InstanceDataset,
    PriorPreservationDataset,
    collate_pairs,
)
from lightning_sd.data.settings import CacheSettings, LoaderSettings
from lightning_sd.data.transforms import ImageTransform

__all__ = ["DreamBoothDataModule"]


class DreamBoothDataModule(ImageDataModule):
    """Instance images of one subject with an instance prompt (Ruiz et al. 2023), and optionally
    class images with a class prompt whose loss, weighted by ``prior_loss_weight``, keeps the
    model's prior for the class.

    When ``class_data_dir`` holds fewer than ``num_class_images``, ``prepare_data`` (local rank 0
    only) generates the rest with the base model: resumable, seeded per image, see
    ``class_images``. With class images each batch holds ``batch_size`` instance samples and
    ``batch_size`` class samples. Validation sees the instance images, center-cropped and
    unflipped, so the module's held-out loss measures how well the subject is learned.

    Args:
        instance_data_dir: folder of photos of the subject.
        instance_prompt: the prompt with the identifier, e.g. ``a photo of sks dog``.
        resolution: training image side in pixels.
        center_crop: center instead of random crops for training.
        random_flip: random horizontal flips for training.
        repeats: how many times each instance image appears per epoch.
        class_data_dir: folder of class images; None trains without prior preservation.
        class_prompt: the prompt of the class images, e.g. ``a photo of a dog``.
        num_class_images: how many class images to train with; missing ones are generated.
        prior_loss_weight: the loss weight lambda of class samples (instance samples: 1).
        class_generator: the pipeline that generates class images; default the module's
            ``pretrained_model_name_or_path``.
        class_generation_steps: sampler steps per generated class image.
        class_generation_batch_size: class images per pipeline call.
        class_generation_seed: class image ``i`` is generated from seed ``seed + i``.
        skip_bad_images: skip unusable images (corrupt, too small) with a warning that counts
            them, instead of stopping with an error naming the first.
        loader: batch size (instance images per batch; as many class images join them),
            workers and seed: :class:`LoaderSettings`.
        cache: the latent / text-embedding cache, :class:`CacheSettings` (latents need
            ``center_crop``).
    """

    def __init__(
        self,
        instance_data_dir: str,
        instance_prompt: str,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        repeats: int = 1,
        class_data_dir: str | None = None,
        class_prompt: str | None = None,
        num_class_images: int = 100,
        prior_loss_weight: float = 1.0,
        class_generator: str | None = None,
        class_generation_steps: int = 50,
        class_generation_batch_size: int = 4,
        class_generation_seed: int = 0,
        skip_bad_images: bool = False,
        loader: LoaderSettings | None = None,
        cache: CacheSettings | None = None,
    ):
        super().__init__(loader, cache)
        check_positive(resolution=resolution, repeats=repeats)
        if class_data_dir is not None and not class_prompt:
            raise ValueError("class_data_dir is set but class_prompt is not: name the class")
        check_fixed_crops(self.cache.latents, center_crop, "center_crop: true")
        self.save_settings()

    @property
    def prior_preservation(self) -> bool:
        return self.hparams.class_data_dir is not None

    def class_generator_path(self) -> str:
        """The pipeline that generates class images: ``class_generator`` or the module's base."""
        h = self.hparams
        if h.class_generator:
            return h.class_generator
        module = self.trainer.lightning_module if self.trainer is not None else None
        base = getattr(getattr(module, "hparams", None), "pretrained_model_name_or_path", None)
        if base is None:
            raise ValueError(
                f"{h.class_data_dir} holds {count_images(h.class_data_dir)} of "
                f"num_class_images={h.num_class_images} images and no pipeline can make the "
                "rest: set class_generator, or attach the DataModule to a Trainer and module"
            )
        return base

    def prepare_data(self) -> None:
        """Generate missing class images (Lightning runs this on local rank 0 only)."""
        h = self.hparams
        if not self.prior_preservation or count_images(h.class_data_dir) >= h.num_class_images:
            return
        written = generate_class_images(
            self.class_generator_path(),
            h.class_data_dir,
            h.class_prompt,
            h.num_class_images,
            h.resolution,
            num_inference_steps=h.class_generation_steps,
            batch_size=h.class_generation_batch_size,
            seed=h.class_generation_seed,
        )
        rank_zero_info(f"generated {len(written)} class images in {h.class_data_dir}")

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is not None:
            return
        train = ImageTransform(h.resolution, h.center_crop, h.random_flip)
        skip, seed = h.skip_bad_images, self.loader.seed
        self.instance_set = InstanceDataset(
            h.instance_data_dir, h.instance_prompt, train, h.repeats, 1.0, skip, seed
        )
        self.class_set = None
        if self.prior_preservation:
            self.class_set = InstanceDataset(
                h.class_data_dir, h.class_prompt, train, 1, h.prior_loss_weight, skip, seed + 1,
                max_images=h.num_class_images,
            )  # fmt: skip
        held_out = ImageTransform(h.resolution, center_crop=True, random_flip=False)
        self.val_set = ImageCaptionDataset(self.instance_set.records, held_out)
        self._assemble()

    def _assemble(self) -> None:
        self.train_set = self.instance_set
        if self.class_set is not None:
            self.train_set = PriorPreservationDataset(self.instance_set, self.class_set)

    def cached_datasets(self) -> dict[str, bool]:
        sets = {"instance_set": True, "val_set": False}
        return sets | ({"class_set": True} if self.class_set is not None else {})

    def train_dataloader(self) -> DataLoader:
        if not self.prior_preservation:
            return super().train_dataloader()
        self._fill_cache_from_trainer()
        return self._train_loader(collate_fn=collate_pairs)
