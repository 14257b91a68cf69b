"""The DreamBooth DataModule: instance photos for training and a fixed held-out view of them."""

from __future__ import annotations

from lightning import LightningDataModule
from torch.utils.data import DataLoader

from lightning_sd.data.dreambooth import InstanceDataset
from lightning_sd.data.transforms import ImageTransform

__all__ = ["DreamBoothDataModule"]


class DreamBoothDataModule(LightningDataModule):
    """Instance images of one subject with an instance prompt (Ruiz et al. 2023).

    Validation sees the same images, center-cropped and unflipped, so the module's held-out
    denoising loss (fixed noise and timesteps) measures how well the subject is learned.

    Args:
        instance_data_dir: folder of photos of the subject.
        instance_prompt: the prompt with the identifier, e.g. ``a photo of sks dog``.
        resolution: training image side in pixels.
        center_crop: center instead of random crops for training.
        random_flip: random horizontal flips for training.
        batch_size: images per batch (per device).
        num_workers: DataLoader worker processes.
        repeats: how many times each image appears per epoch.
    """

    def __init__(
        self,
        instance_data_dir: str,
        instance_prompt: str,
        resolution: int = 512,
        center_crop: bool = False,
        random_flip: bool = False,
        batch_size: int = 1,
        num_workers: int = 0,
        repeats: int = 1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_set: InstanceDataset | None = None
        self.val_set: InstanceDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None:
            train = ImageTransform(h.resolution, h.center_crop, h.random_flip)
            self.train_set = InstanceDataset(
                h.instance_data_dir, h.instance_prompt, train, repeats=h.repeats
            )
            held_out = ImageTransform(h.resolution, center_crop=True, random_flip=False)
            self.val_set = InstanceDataset(h.instance_data_dir, h.instance_prompt, held_out)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        h = self.hparams
        return DataLoader(
            dataset,
            batch_size=h.batch_size,
            shuffle=shuffle,
            num_workers=h.num_workers,
            persistent_workers=h.num_workers > 0,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
