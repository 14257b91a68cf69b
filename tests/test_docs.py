"""The documentation site builds offline in strict mode: a broken API reference fails here."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_docs_build_strict_with_api_pages(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    objectives = (tmp_path / "api" / "objectives" / "index.html").read_text()
    assert "MinSNR" in objectives and "DiffusionObjective" in objectives
    assert "StableDiffusionLoRA" in (tmp_path / "api" / "module" / "index.html").read_text()
