"""The public API: every exported name resolves, and the objective is importable alone."""

import subprocess
import sys

import lightning_sd

HEAVY = (
    "lightning", "pytorch_lightning", "datasets", "torchmetrics", "open_clip", "diffusers",
    "transformers",
)  # fmt: skip


def test_every_exported_name_resolves():
    for name in lightning_sd.__all__:
        assert getattr(lightning_sd, name) is not None, name
    assert "build_tiny_pipeline" not in lightning_sd.__all__  # a test helper, in .tiny


def test_objectives_and_sampling_import_without_lightning_or_the_data_stack():
    code = (
        "import sys, lightning_sd.objectives, lightning_sd.sampling\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "    or m.startswith(('lightning_sd.data', 'lightning_sd.callbacks', 'lightning_sd.module'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"
