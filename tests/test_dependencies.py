"""The lock, the tested-versions table, and adapter errors that name the real problem."""

import re
from pathlib import Path

import peft
import pytest
from diffusers import StableDiffusionPipeline

from lightning_sd import AdapterConfig
from lightning_sd.adapters import add_adapter
from lightning_sd.dependencies import TESTED_VERSIONS, installed_versions, versions_hint

LOCK = Path(__file__).parents[1] / "requirements" / "lock.txt"


def test_tested_versions_are_the_locked_ones():
    pins = dict(re.findall(r"^([a-z0-9_.\-]+)==(\S+)", LOCK.read_text(), flags=re.M))
    assert {name: pins[name] for name in TESTED_VERSIONS} == TESTED_VERSIONS


def test_versions_hint_names_installed_and_tested_versions(monkeypatch):
    monkeypatch.setattr(
        "lightning_sd.dependencies.installed_versions",
        lambda: {**TESTED_VERSIONS, "transformers": "5.24.0"},
    )
    hint = versions_hint()
    assert "transformers 5.24.0 (tested: 5.23.0)" in hint
    assert "peft 0.21.2" in hint and "peft 0.21.2 (" not in hint
    assert "requirements/lock.txt" in hint
    assert installed_versions()["peft"] == peft.__version__


def test_a_version_problem_is_reported_as_one(tiny_pipeline_dir, monkeypatch):
    """What transformers 5.24 raised: our message must not blame the targets."""

    def refuse(*args, **kwargs):
        raise ValueError("The version of PEFT you are using is not compatible, use >= 0.22")

    monkeypatch.setattr(peft, "inject_adapter_in_model", refuse)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(RuntimeError) as caught:
        add_adapter(pipe.text_encoder, AdapterConfig(targets="attn"))
    message = str(caught.value)
    assert "not compatible" in message and f"peft {peft.__version__}" in message
    assert "match no" not in message


def test_targets_that_match_nothing_list_the_closest_module_names(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    with pytest.raises(ValueError, match=r"match no Linear/Conv2d module of UNet2DCondition"):
        add_adapter(pipe.unet, AdapterConfig(targets=["to_qq"]))
    with pytest.raises(ValueError, match=r"close module names: \['fc1'\]"):
        add_adapter(pipe.text_encoder, AdapterConfig(targets=["fc_1"]))


def test_text_encoder_adapter_is_injected_by_peft_with_its_config(tiny_pipeline_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    add_adapter(pipe.text_encoder, AdapterConfig(rank=2, alpha=4, targets="attn"))
    config = pipe.text_encoder.peft_config["default"]
    assert (config.r, config.lora_alpha) == (2, 4)
    lora = [n for n, p in pipe.text_encoder.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n for n in lora)
