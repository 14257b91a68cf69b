"""The held-out DreamBooth subject of the pretrained base, and what learning it means in numbers.

The base never saw a cat: every emoji whose name contains "cat" was held out of pretraining.
``SubjectProbe`` samples a model on fixed prompts and seeds (the subject prompt, its class
prompt, unrelated prompts the base knows) and compares two models' samples on
EfficientNet-Lite0 features: subject fidelity of each, and the prior drift between them. The
demo, the slow test and the LoRA-vs-DoRA benchmark all measure through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from lightning_sd.metrics.subject import FeatureSpace, prior_drift, subject_fidelity

__all__ = ["CLASS_PROMPT", "SUBJECT_PROMPT", "UNRELATED_PROMPTS", "SubjectProbe", "subject_dir"]

SUBJECT_PROMPT = "sks cat face"
CLASS_PROMPT = "cat face"
# Training captions of the base, far from cats.
UNRELATED_PROMPTS = ["hot dog", "crescent moon", "grinning face", "rocket"]


def subject_dir(split: str = "instance") -> Path:
    """``instance`` (DreamBooth's training images) or ``heldout`` (fidelity's references)."""
    return Path(str(resources.files("lightning_sd") / "assets" / "subject" / split))


def load_images(folder: Path, side: int) -> torch.Tensor:
    """PNG files of a folder, sorted by name, as (N, 3, side, side) in [0, 1]."""
    import numpy as np
    from PIL import Image

    files = sorted(folder.glob("*.png"))
    arrays = [
        np.asarray(Image.open(f).convert("RGB").resize((side, side), Image.BICUBIC)) for f in files
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


@dataclass
class SubjectProbe:
    """Fixed prompts and seeds, and the features of the real held-out subject images.

    Args:
        seeds: one sample per seed and prompt.
        steps: sampler steps.
        guidance_scale: classifier-free guidance weight.
    """

    seeds: list[int] = field(default_factory=lambda: list(range(4)))
    steps: int = 20
    guidance_scale: float = 4.0

    def __post_init__(self):
        self.features = FeatureSpace()
        self.heldout = self.features(load_images(subject_dir("heldout"), 64))

    @torch.no_grad()
    def sample(self, module) -> dict[str, torch.Tensor]:
        """Images in [0, 1] for ``subject``, ``class`` and ``unrelated`` prompts."""
        module.eval()
        groups = {
            "subject": [SUBJECT_PROMPT],
            "class": [CLASS_PROMPT],
            "unrelated": UNRELATED_PROMPTS,
        }
        out = {}
        for name, prompts in groups.items():
            pairs = [(p, s) for p in prompts for s in self.seeds]
            out[name] = module.generate(
                [p for p, _ in pairs],
                [s for _, s in pairs],
                steps=self.steps,
                guidance_scale=self.guidance_scale,
            )
        return out

    def fidelity(self, samples: dict[str, torch.Tensor]) -> float:
        """Subject fidelity of the subject prompt's samples."""
        return subject_fidelity(self.features(samples["subject"]), self.heldout)

    def drift(self, before: dict, after: dict) -> dict[str, float]:
        """Prior drift of the class and the unrelated prompts between two models' samples."""
        return {
            name: prior_drift(self.features(before[name]), self.features(after[name]))
            for name in ("class", "unrelated")
        }
