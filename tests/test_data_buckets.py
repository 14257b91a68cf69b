"""Aspect-ratio bucketing: the buckets, one shape per batch, every image once, DDP shards."""

import json
from collections import Counter

import pytest
import torch
from lightning import LightningModule
from lightning.fabric.utilities.data import _replace_dunder_methods, _set_sampler_epoch
from lightning.pytorch.utilities.data import _update_dataloader
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from lightning_sd.data import (
    BucketBatchSampler,
    CaptionDataModule,
    ImageTransform,
    SidecarCaptions,
    make_buckets,
)
from lightning_sd.data.keys import sample_key, split_key
from lightning_sd.data.settings import LoaderSettings


def test_buckets_hold_about_the_pixel_budget_in_multiples():
    assert make_buckets(512) == [(640, 384), (576, 448), (512, 512), (448, 576), (384, 640)]
    buckets = make_buckets(1024, 64, max_aspect_ratio=2.0)
    assert (1024, 1024) in buckets and (1344, 768) in buckets and (768, 1344) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert 0.9 * 1024**2 <= h * w <= 1024**2
        assert max(h / w, w / h) <= 2.0
        assert (w, h) in buckets
    assert make_buckets(32, 8) == [(40, 24), (32, 32), (24, 40)]
    with pytest.raises(ValueError, match="not a multiple of 64"):
        make_buckets(500)


def test_images_go_to_the_nearest_aspect_bucket_with_their_crop_recorded():
    transform = ImageTransform(32, buckets=make_buckets(32, 8), random_flip=False)
    image = Image.new("RGB", (60, 36))  # landscape 5:3
    sample = transform(image)
    assert sample["pixel_values"].shape == (3, 24, 40)
    assert sample["original_size"].tolist() == [36, 60]
    assert sample["target_size"].tolist() == [24, 40]
    # Scaled to cover 24x40: 60x36 -> 40x24 exactly, so no crop.
    assert sample["crop_top_left"].tolist() == [0, 0]
    plan = transform.plan((100, 50))  # portrait 1:2 -> 40x24, resized 48x24, crop 4 rows
    assert (plan.target, plan.resized, plan.top, plan.left) == ((40, 24), (48, 24), 4, 0)
    flipping = ImageTransform(32, center_crop=True, random_flip=True)
    plan = flipping.plan((40, 50))  # resized 32x40: 8 spare columns, centered at left 4
    assert plan.crop_top_left(flipped=False) == (0, 4)
    assert plan.crop_top_left(flipped=True) == (0, 4)  # centered: mirror-symmetric
    plan = ImageTransform(32).plan((32, 50))  # a random crop of 18 spare columns
    assert plan.crop_top_left(flipped=True) == (0, 50 - plan.left - 32)


def test_batch_sampler_uses_every_index_once_per_epoch_in_one_bucket_batches():
    bucket_ids = [i % 3 for i in range(23)]
    sampler = BucketBatchSampler(None, bucket_ids, batch_size=4, shuffle=True, seed=1)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)  # what Lightning does through sampler.sampler.set_epoch
        epochs.append(list(sampler))
    for epoch, keys in enumerate(epochs):
        assert all(split_key(k, 23)[0] == epoch for b in keys for k in b)  # keys carry the epoch
        batches = [[split_key(k, 23)[1] for k in b] for b in keys]
        assert len(batches) == len(sampler) == 6  # buckets of 8, 8, 7: 2 + 2 + 2 (one short)
        assert sorted(i for b in batches for i in b) == list(range(23))
        assert all(len({bucket_ids[i] for i in b}) == 1 for b in batches)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    loader = DataLoader(list(range(23 * 8)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 7)  # Lightning, before every epoch (and after a resume)
    expected = [[sample_key(7, i, 23) for i in b] for b in sampler.all_batches(epoch=7)]
    assert list(loader.batch_sampler) == expected
    dropping = BucketBatchSampler(None, bucket_ids, batch_size=4, drop_last=True, shuffle=False)
    assert len(list(dropping)) == len(dropping) == 5 and all(len(b) == 4 for b in dropping)


def test_lightning_injected_distributed_sampler_shards_whole_batches():
    """What Lightning does under DDP: re-create the batch sampler with a DistributedSampler."""
    dataset = [i % 25 for i in range(25 * 6)]  # key -> index
    bucket_ids = [i % 3 for i in range(25)]
    with _replace_dunder_methods(BatchSampler):  # Lightning wraps the dataloader hooks so
        loader = DataLoader(
            dataset, batch_sampler=BucketBatchSampler(None, bucket_ids, 4, seed=3)
        )  # fmt: skip
    shards = []
    for rank in range(2):
        dist = DistributedSampler(bucket_ids, num_replicas=2, rank=rank, shuffle=True, seed=0)
        dist.set_epoch(5)  # Lightning sets the epoch on the sampler it injected
        injected = _update_dataloader(loader, dist)
        assert isinstance(injected.batch_sampler, BucketBatchSampler)
        shards.append([b.tolist() for b in injected])
    assert len(shards[0]) == len(shards[1]) == 4  # 3 + 2 + 2 batches padded to 8
    everything = BucketBatchSampler(None, bucket_ids, 4, seed=3).all_batches(epoch=5)
    assert shards[0] + shards[1] != everything
    assert sorted(map(tuple, shards[0] + shards[1])) == sorted(
        map(tuple, everything + everything[:1])
    )


def test_resumed_epoch_continues_with_the_batches_an_uninterrupted_one_serves():
    bucket_ids = [0] * 10
    straight = BucketBatchSampler(None, bucket_ids, 3, seed=4)
    straight.set_epoch(2)
    resumed = BucketBatchSampler(None, bucket_ids, 3, seed=4)
    resumed.set_epoch(2)
    resumed.skip(2, 2)
    assert len(resumed) == 4  # Lightning counts the epoch's full length
    assert list(resumed) == list(straight)[2:]
    assert list(resumed) == list(straight)  # the skip applies to the first iteration only


SIZES = [(48, 48), (56, 40), (40, 56), (54, 36), (36, 54), (60, 30), (44, 44), (50, 34)]


def _bucketed_photos(folder):
    """Eight crops of a real photo in three aspect buckets (32x32, 24x40, 40x24 at 32 px)."""
    from skimage import data

    folder.mkdir()
    photo = Image.fromarray(data.coffee())
    for i, (w, h) in enumerate(SIZES):
        photo.resize((w, h)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"caption {i}")
    return folder


def test_bucketed_datamodule_batches_have_one_shape_and_cover_every_image(tmp_path):
    sizes = SIZES
    source = SidecarCaptions(str(_bucketed_photos(tmp_path / "photos")))
    dm = CaptionDataModule(
        source,
        resolution=32,
        bucketing=True,
        bucket_multiple=8,
        random_flip=True,
        repeats=2,
        loader=LoaderSettings(batch_size=2),
    )
    dm.setup("fit")
    seen = Counter()
    shapes = set()
    for batch in dm.train_dataloader():
        pixels = batch["pixel_values"]
        assert torch.equal(batch["target_size"], torch.tensor([pixels.shape[-2:]] * len(pixels)))
        shapes.add(tuple(pixels.shape[-2:]))
        seen.update(batch["prompt"])
        for (h, w), caption in zip(batch["original_size"].tolist(), batch["prompt"], strict=True):
            assert sizes[int(caption.split()[-1])] == (w, h)
    assert seen == Counter({f"caption {i}": 2 for i in range(8)})  # repeats=2: each twice
    assert shapes == {(32, 32), (40, 24), (24, 40)}


class _Recorder(LightningModule):
    """Writes each rank's batches to a file: the parent sees nothing of spawned ranks' state."""

    def __init__(self, out: str):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.out = out

    def training_step(self, batch, batch_idx):
        shapes = {tuple(batch["pixel_values"].shape[-2:])}
        with open(f"{self.out}/rank{self.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"shapes": list(shapes), "prompts": batch["prompt"]}) + "\n")
        return self.layer(batch["pixel_values"].mean().reshape(1, 1)).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_ddp_ranks_run_equal_steps_on_one_bucket_batches(tmp_path):
    """Real DDP (two CPU processes, gloo): Lightning injects its sampler, ranks shard batches."""
    from lightning import Trainer

    folder = _bucketed_photos(tmp_path / "photos")
    dm = CaptionDataModule(
        SidecarCaptions(str(folder)),
        resolution=32,
        bucketing=True,
        bucket_multiple=8,
        loader=LoaderSettings(batch_size=2),
    )
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(_Recorder(str(tmp_path)), dm)
    ranks = [
        [json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    # Buckets of 2 square, 4 landscape, 2 portrait images: 4 batches, 2 per rank.
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert all(len(step["shapes"]) == 1 for rank in ranks for step in rank)
    seen = Counter(p for rank in ranks for step in rank for p in step["prompts"])
    assert seen == Counter({f"caption {i}": 1 for i in range(8)})  # each image on one rank
