"""benchmarks/compression.py at a tiny size: the pruned arm reaches its sparsity and is selected at it,
exported files match their eager models, int8 files are smaller, and the results carry provenance."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_provenance

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def compression(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("compression")


def test_compression_benchmark_tiny(compression, fashion_root: Path, tmp_path: Path, monkeypatch) -> None:
    from lit_finetune import ImageClassifier

    torch.manual_seed(1234)
    source = tmp_path / "source.pt"
    torch.save(ImageClassifier(num_classes=5).state_dict(), source)  # a stand-in source: random weights
    tiny = compression.Profile(seeds=(0,), sparsities=(0.0, 0.5), epochs=3, end_epoch=1, test_limit=100, latency_reps=(2, 1))
    monkeypatch.setitem(compression.PROFILES, "tiny", tiny)
    compression.main(["--profile", "tiny", "--source", str(source), "--fashion-root", str(fashion_root),
                      "--results", str(tmp_path / "results")])  # fmt: skip

    md = tmp_path / "results" / "compression.md"
    assert_provenance(md, "compression.py", {"source checkpoint": source})
    assert (tmp_path / "results" / "compression.png").stat().st_size > 0
    runs = json.loads(md.with_suffix(".json").read_text())["data"]["results"]["runs"]
    assert set(runs) == {"0.0", "0.5"}
    dense, pruned = runs["0.0"][0], runs["0.5"][0]
    assert dense["sparsity"] == 0 and pruned["sparsity"] == pytest.approx(0.5, abs=1e-3)
    for run in (dense, pruned):
        assert run["chosen_epoch"] >= tiny.end_epoch  # selected among epochs at the target sparsity
        assert run["export_max_diff"]["fp32.pt2"] == 0 and run["export_max_diff"]["int8.ts"] == 0
        assert run["export_max_diff"]["fp32.ts"] < 1e-4
        assert run["size"]["int8.ts"] < 0.4 * run["size"]["fp32.ts"]
        assert set(run["latency_ms"]) == {"fp32 eager", "fp32 .pt2", "fp32 .ts", "int8 .ts"}
    assert pruned["size_gz"]["fp32.pt2"] < dense["size_gz"]["fp32.pt2"]  # zeros compress
    text = md.read_text()
    assert "| 0.50 | 0.500 |" in text and "int8 − fp32" in text
