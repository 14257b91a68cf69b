"""Evaluation metrics pinned against direct computations, start-up failures, and the callback."""

import json

import pytest
import torch
import torch.nn.functional as F
from lightning import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import save_file

from lightning_sd import AdapterConfig, DreamBoothDataModule, StableDiffusionLoRA
from lightning_sd.callbacks.evaluation import Evaluation
from lightning_sd.data.settings import LoaderSettings
from lightning_sd.metrics import (
    CLIPMetrics,
    DINOSimilarity,
    EfficientNetLite0,
    FeatureBackbone,
    FrechetDistance,
    InceptionV3,
    MetricWeightsError,
)
from lightning_sd.metrics.tiny import write_tiny_dino
from lightning_sd.sampling_spec import SamplingSpec

QUIET = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
CPU = torch.device("cpu")
PROMPT = "a photo of sks cat"
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def photo_crops(name: str, count: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    """Random square crops of a real scikit-image photo, (count, 3, side, side) in [0, 1]."""
    from skimage import data

    photo = torch.from_numpy(getattr(data, name)()).permute(2, 0, 1).float() / 255
    gen = torch.Generator().manual_seed(seed)
    h, w = photo.shape[1:]
    crops = []
    for _ in range(count):
        c = int(torch.randint(min(h, w) // 2, min(h, w) + 1, (1,), generator=gen))
        y = int(torch.randint(0, h - c + 1, (1,), generator=gen))
        x = int(torch.randint(0, w - c + 1, (1,), generator=gen))
        crop = photo[None, :, y : y + c, x : x + c]
        crops.append(F.interpolate(crop, size=(side, side), mode="area")[0])
    return torch.stack(crops)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random open_clip CLIP with tiny widths and the real 49408-token BPE vocabulary."""
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 8,
            "width": 32,
            "layers": 2,
            "head_width": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 2,
        },
    }
    torch.manual_seed(3)  # a seed whose cosines below take both signs
    model = open_clip.CLIP(**config).eval()
    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config}))
    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    return model, folder


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    return write_tiny_dino(tmp_path_factory.mktemp("dino") / "dino-test_vit.safetensors")


def test_clip_score_clip_t_clip_i_equal_a_direct_computation(tiny_clip):
    import open_clip

    model, folder = tiny_clip
    metric = CLIPMetrics(f"local-dir:{folder}", pretrained=None)
    metric.load(CPU)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    references = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPT, "a dog", "a red car", "two cats", "an astronaut", "coffee"]
    metric.set_reference(references)
    got = metric(images, prompts)

    tokens = open_clip.get_tokenizer("ViT-B-32")(prompts)  # the real CLIP tokenizer
    with torch.no_grad():
        e_img = model.encode_image((images - OPENAI_MEAN) / OPENAI_STD)
        e_txt = model.encode_text(tokens)
        e_ref = model.encode_image((references - OPENAI_MEAN) / OPENAI_STD)
    cos = (e_img * e_txt).sum(-1) / (e_img.norm(dim=-1) * e_txt.norm(dim=-1))
    assert (cos < 0).any() and (cos > 0).any()  # so the max(cos, 0) clamp is exercised
    assert got["clip_score"] == pytest.approx(float((100 * cos.clamp(min=0)).mean()), rel=1e-5)
    assert got["clip_t"] == pytest.approx(float(cos.mean()), rel=1e-5, abs=1e-7)
    cos_ref = (e_img / e_img.norm(dim=-1, keepdim=True)) @ (
        e_ref / e_ref.norm(dim=-1, keepdim=True)
    ).T
    assert got["clip_i"] == pytest.approx(float(cos_ref.mean()), rel=1e-5)


def test_dino_similarity_equals_a_direct_computation(tiny_dino):
    import timm
    from safetensors.torch import load_file

    metric = DINOSimilarity(str(tiny_dino), model_name="test_vit")
    metric.load(CPU)
    images, references = photo_crops("chelsea", 3, 160), photo_crops("astronaut", 2, 160)
    metric.set_reference(references)
    got = metric(images, [PROMPT] * 3)

    net = timm.create_model("test_vit", num_classes=0)
    net.load_state_dict(load_file(tiny_dino), strict=False)  # the classifier head is unused
    with torch.no_grad():
        a, b = (F.normalize(net.eval()((x - 0.5) / 0.5), dim=-1) for x in (images, references))
    assert got["dino"] == pytest.approx(float((a @ b.T).mean()), rel=1e-5)


def test_efficientnet_lite0_from_the_wheel_classifies_the_cat():
    from timm.data import ImageNetInfo

    from lightning_sd.metrics.efficientnet import load_efficientnet_lite0
    from lightning_sd.metrics.images import normalize, resize_center_crop

    net = load_efficientnet_lite0()
    cat = photo_crops("chelsea", 1, 300)  # any crop of at least half the photo shows the cat
    with torch.no_grad():
        logits = net(normalize(resize_center_crop(cat, 224), [0.5] * 3, [0.5] * 3))
    assert ImageNetInfo().index_to_description(int(logits.argmax())) == "Egyptian cat"
    assert float(logits.softmax(-1).max()) > 0.5


def test_fid_kid_are_zero_on_identical_sets_and_positive_on_different_ones():
    metric = FrechetDistance(EfficientNetLite0())
    metric.load(CPU)
    cats = metric.features(photo_crops("chelsea", 6))
    others = metric.features(
        torch.cat([photo_crops(n, 2) for n in ("astronaut", "coffee", "rocket")])
    )
    same = metric.distances(cats, cats)
    far = metric.distances(cats, others)
    assert set(same) == {"fid_efficientnet_lite0", "kid_efficientnet_lite0"}
    assert abs(same["fid_efficientnet_lite0"]) < 1e-2
    assert far["fid_efficientnet_lite0"] > 100
    # KID is unbiased: on identical sets its estimate scatters around 0 (slightly negative at
    # six images), small against a real difference.
    assert abs(same["kid_efficientnet_lite0"]) < far["kid_efficientnet_lite0"] / 10
    assert far["kid_efficientnet_lite0"] > 0.1


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    ("metric", "message"),
    [
        (
            CLIPMetrics("ViT-B-32", "/nonexistent/clip.safetensors"),
            "CLIP score: CLIP weights file '/nonexistent/clip.safetensors' does not exist",
        ),
        (
            CLIPMetrics("local-dir:/nonexistent/clip", None),
            "CLIP score: open_clip could not load local-dir:/nonexistent/clip offline",
        ),
        (
            DINOSimilarity("/nonexistent/dino.pth"),
            "DINO: weights file '/nonexistent/dino.pth' does not exist; download it once",
        ),
        (
            FrechetDistance(InceptionV3("/nonexistent/inception.pth")),
            "FID \\(Inception\\): weights file '/nonexistent/inception.pth' does not exist",
        ),
    ],
    ids=["clip-file", "clip-folder", "dino", "inception"],
)
def test_missing_weights_fail_before_the_first_step(
    metric, message, tiny_pipeline_dir, instance_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    module = StableDiffusionLoRA(str(tiny_pipeline_dir))
    data = DreamBoothDataModule(
        str(instance_dir), PROMPT, resolution=32, loader=LoaderSettings(batch_size=2)
    )
    counter = StepCounter()
    evaluation = Evaluation([metric], SamplingSpec([PROMPT], [0, 1]))
    trainer = Trainer(max_steps=2, logger=False, callbacks=[evaluation, counter], **QUIET)
    with pytest.raises(MetricWeightsError, match=message):
        trainer.fit(module, data)
    assert counter.steps == 0


def test_metrics_needing_references_fail_without_them():
    evaluation = Evaluation([FrechetDistance(EfficientNetLite0())], SamplingSpec([PROMPT], [0, 1]))
    trainer = Trainer(logger=False, **QUIET)
    with pytest.raises(ValueError, match="FrechetDistance compare with real images"):
        evaluation.setup(trainer, None, "fit")


class PooledPixels(FeatureBackbone):
    """A 48-d plumbing backbone (4x4 average-pooled RGB): torchmetrics' FID on 1280-d
    EfficientNet features costs seconds per call on two cores, which the tests above pay once."""

    metric_suffix = "_pixels"

    def load(self, device):
        return torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten()).to(device)


@pytest.fixture(scope="module")
def evaluated_fit(tiny_pipeline_dir, instance_dir, tiny_clip, tiny_dino, tmp_path_factory):
    """Four steps with every metric, every 2 steps, before and after training."""
    seed_everything(0)
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), adapter=AdapterConfig(rank=4, alpha=8))
    module.configure_model()
    n_params = sum(p.numel() for p in module.parameters())
    data = DreamBoothDataModule(
        str(instance_dir), PROMPT, resolution=32, loader=LoaderSettings(batch_size=2)
    )
    metrics = [
        CLIPMetrics(f"local-dir:{tiny_clip[1]}", None),
        FrechetDistance(PooledPixels()),
        DINOSimilarity(str(tiny_dino), model_name="test_vit"),
    ]
    evaluation = Evaluation(
        metrics,
        SamplingSpec([PROMPT, "a dog"], [0, 1], steps=2),
        every_n_steps=2,
        before_training=True,
    )
    root = tmp_path_factory.mktemp("evaluated")
    trainer = Trainer(
        max_steps=4, logger=CSVLogger(root), callbacks=[evaluation], limit_val_batches=0, **QUIET
    )
    trainer.fit(module, data)
    return module, data, evaluation, trainer, n_params


def test_evaluation_logs_every_metric_at_steps_0_2_4(evaluated_fit):
    import csv

    module, _, evaluation, trainer, n_params = evaluated_fit
    names = {
        "eval/clip_score", "eval/clip_t", "eval/clip_i", "eval/dino",
        "eval/fid_pixels", "eval/kid_pixels",
    }  # fmt: skip
    assert set(evaluation.last_metrics) == names
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["eval/clip_score"]]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]  # after_training at step 4 is not repeated
    assert all(all(r[n] for n in names) for r in rows)
    # The metric networks stay on the callback: the LightningModule gained no parameter.
    assert sum(p.numel() for p in module.parameters()) == n_params


def test_heldout_loss_is_identical_across_evaluations_and_evaluation_in_validate(evaluated_fit):
    module, data, _, _, _ = evaluated_fit

    def validate(callbacks, seed):
        torch.manual_seed(seed)  # a different global RNG state must not change the numbers
        trainer = Trainer(logger=False, callbacks=callbacks, **QUIET)
        return trainer.validate(module, data, verbose=False)[0]

    first, second = validate([], 1), validate([], 2)
    assert first["val/loss"] == second["val/loss"] > 0
    evaluation = Evaluation(
        [FrechetDistance(PooledPixels())],
        SamplingSpec([PROMPT], [0, 1], steps=2),
        at_validation=True,
    )
    with_eval = validate([evaluation], 3)
    again = validate([evaluation], 4)
    assert with_eval["val/loss"] == first["val/loss"]
    assert with_eval["eval/fid_pixels"] == again["eval/fid_pixels"] > 0
    assert with_eval["eval/kid_pixels"] == again["eval/kid_pixels"]  # KID subsets are seeded


@pytest.mark.slow
def test_eval_tiny_recipe_fits_and_validate_reports_the_same_numbers(
    tiny_pipeline_dir, instance_dir, tmp_path, monkeypatch
):
    """configs/experiments/eval_tiny.yaml end to end through ``lightning-sd fit`` and
    ``lightning-sd validate --ckpt_path``, with the tiny metric networks where the recipe
    expects them (its paths are relative to the working directory)."""
    from pathlib import Path

    from lightning_sd.cli import build_cli, main
    from lightning_sd.metrics.tiny import main as write_tiny_metrics

    configs = Path(__file__).parents[1] / "configs"
    monkeypatch.chdir(tmp_path)
    write_tiny_metrics(["demo_out/tiny-metrics"])
    common = [
        "--config", str(configs / "tiny.yaml"),
        "--config", str(configs / "experiments" / "eval_tiny.yaml"),
        "--model.pretrained_model_name_or_path", str(tiny_pipeline_dir),
        "--data.instance_data_dir", str(instance_dir),
        "--trainer.default_root_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    main(["fit", *common, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2"])
    version = tmp_path / "run" / "lightning_logs" / "version_0"
    assert sorted(p.name for p in (version / "samples").iterdir()) == ["step_000000.png"]
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    first = build_cli(["validate", *common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    again = build_cli(["validate", *common, "--ckpt_path", str(ckpt)]).trainer.callback_metrics
    for name in ("val/loss", "eval/clip_score", "eval/fid_efficientnet_lite0", "eval/dino"):
        assert float(first[name]) == float(again[name]), name
