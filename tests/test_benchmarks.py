"""Smoke tests: each training benchmark runs one tiny cell end to end and writes its tables."""

from __future__ import annotations

import csv
import importlib
import logging
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    """The scripts as modules; the logging levels they quiet are restored afterwards."""
    names = ("lightning.pytorch", "lightning.fabric", "lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    sys.path.insert(0, str(BENCHMARKS))
    yield lambda name: importlib.import_module(name)
    sys.path.remove(str(BENCHMARKS))
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    import diffusers
    import transformers

    diffusers.utils.logging.enable_progress_bar()
    transformers.utils.logging.enable_progress_bar()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_finite(rows: list[dict], columns: list[str]) -> None:
    for row in rows:
        for column in columns:
            assert math.isfinite(float(row[column])), (column, row)


def test_lora_vs_dora_random_base_one_rank(bench, tmp_path):
    out = tmp_path / "lora_vs_dora_random_base"
    bench("lora_vs_dora_random_base").main(
        ["--preset", "tiny", "--ranks", "4", "--kinds", "lora", "dora", "--steps", "2",
         "--warmup", "0", "--images", "8", "--eval-prompts", "2", "--eval-seeds", "2",
         "--eval-steps", "2", "--clip-model", "tiny", "--out", str(out)]
    )  # fmt: skip
    rows = read_csv(out.with_suffix(".csv"))
    assert [(r["kind"], r["rank"]) for r in rows] == [("lora", "4"), ("dora", "4")]
    numeric = ["trainable_params", "adapter_file_mb", "median_step_ms", "min_step_ms",
               "cpu_step_ms", "peak_mem_mb", "mem_increase_mb", "train_loss_final",
               "val_loss_before", "val_loss", "fid_efficientnet_lite0",
               "kid_efficientnet_lite0", "clip_score"]  # fmt: skip
    assert set(numeric) <= set(rows[0])
    assert_finite(rows, numeric)
    lora, dora = rows
    assert float(dora["trainable_params"]) > float(lora["trainable_params"])  # + magnitudes
    assert len(read_csv(tmp_path / "lora_vs_dora_random_base_runs.csv")) == 2
    md = out.with_suffix(".md").read_text()
    assert "What DoRA costs" in md and "| dora | 4 |" in md
    assert (tmp_path / "lora_vs_dora_random_base_quality.png").stat().st_size > 0
    assert (tmp_path / "lora_vs_dora_random_base_cost.png").stat().st_size > 0


def test_lora_vs_dora_on_the_pretrained_base_one_rank(bench, tmp_path):
    out = tmp_path / "lora_vs_dora"
    bench("lora_vs_dora").main(
        ["--ranks", "4", "--kinds", "lora", "dora", "--seeds", "0", "--steps", "2",
         "--probe-seeds", "1", "--probe-steps", "2", "--out", str(out)]
    )  # fmt: skip
    rows = read_csv(out.with_suffix(".csv"))
    assert [(r["kind"], r["rank"]) for r in rows] == [("lora", "4"), ("dora", "4")]
    numeric = ["fidelity", "drift_class", "drift_unrelated", "heldout_loss", "step_ms",
               "params", "file_mb"]  # fmt: skip
    assert_finite(rows, numeric)
    lora, dora = rows
    assert float(dora["params"]) > float(lora["params"])  # + magnitudes
    # Cosine distances of the class samples from the base's: an adapter trained 2 steps
    # changes them a little, never more than opposite features would.
    assert 0 <= float(lora["drift_class"]) < 1
    assert "| dora | 4 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 0


def test_throughput_one_cell_per_switch(bench, tmp_path):
    out = tmp_path / "throughput"
    bench("throughput").main(
        ["--preset", "tiny", "--cache-presets", "tiny", "--ranks", "4", "--kinds", "lora",
         "--resolutions", "--precisions", "--steps", "2", "--warmup", "0", "--repeats", "1",
         "--images", "8", "--out", str(out)]
    )  # fmt: skip
    rows = read_csv(out.with_suffix(".csv"))
    loops = {r["loop"] for r in rows}
    assert loops == {"lightning", "reference", "lightning+ui", "encode"}
    assert {r["group"] for r in rows} == {
        "framework", "cache", "checkpointing", "precision", "rank", "resolution"
    }  # fmt: skip
    timed = [r for r in rows if r["loop"] != "encode"]
    assert_finite(timed, ["median_step_ms", "min_step_ms", "cpu_step_ms", "peak_mem_mb"])
    encode = [r for r in rows if r["loop"] == "encode"]
    assert_finite(encode, ["vae_encode_ms", "text_encode_ms", "peak_mem_mb"])
    cached = [r for r in rows if r["cache"] == "True"]
    assert_finite(cached, ["cache_fill_s"])
    md = out.with_suffix(".md").read_text()
    for goal in ("Framework overhead", "Cache, tiny", "## All setups"):
        assert goal in md
    assert (tmp_path / "throughput_rank.png").stat().st_size > 0


def test_adapters_at_matched_counts_and_both_preservations(bench, tmp_path):
    out = tmp_path / "adapters"
    bench("adapters").main(
        ["--variants", "loha", "lokr", "lora+", "pissa", "--rank", "2", "--max-rank", "8",
         "--seeds", "0", "--steps", "3", "--probe-seeds", "1", "--probe-steps", "2",
         "--preservation", "--class-images", "2", "--class-steps", "2", "--out", str(out)]
    )  # fmt: skip
    rows = {r["variant"]: r for r in read_csv(out.with_suffix(".csv"))}
    assert list(rows) == ["lora", "loha", "lokr", "lora+", "pissa", "prior:class-images",
                          "prior:base-model"]  # fmt: skip
    numeric = ["fidelity", "drift_class", "drift_unrelated", "heldout_loss", "step_ms",
               "params", "file_mb", "prep_s"]  # fmt: skip
    assert_finite(list(rows.values()), numeric)
    budget = float(rows["lora"]["params"])
    # matched counts: LoRA+ and PiSSA have LoRA's shapes; LoHa (2x LoRA's per rank) sits at
    # half the rank; LoKr at whatever rank comes closest
    assert float(rows["lora+"]["params"]) == float(rows["pissa"]["params"]) == budget
    assert rows["loha"]["rank"] == "1" and float(rows["loha"]["params"]) == budget
    bench_mod = bench("adapters")
    counts = bench_mod.matched_ranks("tiny-pretrained", ["lokr"], 2, 8)
    assert float(rows["lokr"]["params"]) == counts["lokr"][1]
    assert float(rows["prior:class-images"]["prep_s"]) > 0 == float(rows["lora"]["prep_s"])
    md = out.with_suffix(".md").read_text()
    assert "python benchmarks/adapters.py --variants loha" in md and "| loha | 1 |" in md
    assert (tmp_path / "adapters.png").stat().st_size > 0
