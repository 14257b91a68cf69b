"""One hyperparameter scheme: every constructor part is stored as YAML writes it and rebuilt by
``from_config``; checkpoints load with ``weights_only=True``."""

import functools
import io

import pytest
import torch
from lightning import Trainer

from lightning_sd import AdapterConfig, PivotalTuning, StableDiffusionLoRA
from lightning_sd.families import SD1
from lightning_sd.objectives import DiffusionObjective, Epsilon, MinSNR
from lightning_sd.serialization import from_config, to_config

PLAIN = (bool, int, float, str, type(None))


def parts():
    return dict(
        adapter=AdapterConfig(rank=4, alpha=8),
        text_encoder_adapter=AdapterConfig(rank=2, alpha=2),
        pivotal_tuning=PivotalTuning(token_abstraction="TOK", num_tokens=2),
        objective=DiffusionObjective(Epsilon(), weighting=MinSNR(5.0)),
        optimizer=functools.partial(torch.optim.AdamW, betas=(0.8, 0.95), weight_decay=0.1),
        family=SD1(),
    )


def plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, PLAIN)


def test_every_part_is_stored_as_yaml_writes_it(tiny_pipeline_dir):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), **parts())
    h = module.hparams
    assert plain(dict(h))
    assert h.adapter["rank"] == 4 and "class_path" not in h.adapter  # a dataclass: its fields
    assert h.pivotal_tuning["token_abstraction"] == "TOK"
    assert h.objective["class_path"] == "lightning_sd.objectives.objective.DiffusionObjective"
    assert h.objective["init_args"]["weighting"]["init_args"]["gamma"] == 5.0
    assert h.optimizer == {
        "class_path": "torch.optim.adamw.AdamW",
        "init_args": {"betas": [0.8, 0.95], "weight_decay": 0.1},
    }
    assert h.family["class_path"] == "lightning_sd.families.sd1.SD1"
    assert h.text_encoder_2_adapter is None


def test_the_stored_form_rebuilds_the_same_parts(tiny_pipeline_dir):
    first = StableDiffusionLoRA(str(tiny_pipeline_dir), **parts())
    buffer = io.BytesIO()
    torch.save(dict(first.hparams), buffer)
    buffer.seek(0)
    stored = torch.load(buffer, weights_only=True)  # plain data only
    again = StableDiffusionLoRA(**stored)
    assert dict(again.hparams) == dict(first.hparams)
    assert again.adapter == first.adapter and again.pivotal_tuning == first.pivotal_tuning
    assert type(again.objective.weighting) is MinSNR and again.objective.weighting.gamma == 5.0
    assert isinstance(again.family, SD1)
    assert again.optimizer.func is torch.optim.AdamW
    params = [torch.nn.Parameter(torch.ones(2))]
    assert again.optimizer(params).param_groups[0]["betas"] == (0.8, 0.95)


def test_from_config_uses_the_annotation_to_tell_dataclasses_and_callables():
    assert from_config({"rank": 2}, AdapterConfig | None) == AdapterConfig(rank=2)
    assert from_config({"rank": 2}) == {"rank": 2}  # no hint: a plain dict stays one
    config = to_config(torch.optim.SGD)
    assert config == {"class_path": "torch.optim.sgd.SGD", "init_args": {}}
    with pytest.raises(TypeError, match="optimizer class"):
        to_config(lambda params: torch.optim.SGD(params, lr=1))


def test_load_from_checkpoint_with_weights_only(tiny_pipeline_dir, tmp_path):
    module = StableDiffusionLoRA(str(tiny_pipeline_dir), **parts())
    module.configure_model()
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    restored = StableDiffusionLoRA.load_from_checkpoint(tmp_path / "a.ckpt", weights_only=True)
    assert dict(restored.hparams) == dict(module.hparams)
    assert restored.text_encoder_adapter == AdapterConfig(rank=2, alpha=2)
    trained = {k: v for k, v in module.state_dict().items()}
    assert trained and all(torch.equal(restored.state_dict()[k], v) for k, v in trained.items())
