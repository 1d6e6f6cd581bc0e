"""benchmarks/tour.py (README command 1) end to end at its smoke size: zoo sources built (smoke-sized, in the
session's zoo home), the four comparisons for two seeds, one report with its provenance, one figure."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import provenance
import tour

from lit_finetune.zoo import lookup


@pytest.fixture(scope="module")
def smoke_tour(tmp_path_factory, fashion_root):
    """One smoke tour, with a budget that allows no seed past the minimum of two (of at most three)."""
    tmp = tmp_path_factory.mktemp("tour")
    patch = pytest.MonkeyPatch()
    patch.setitem(tour.PROFILES, "smoke", dataclasses.replace(tour.PROFILES["smoke"], max_seeds=3))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            results = tour.main(["--profile", "smoke", "--budget-min", "0", "--workdir", str(tmp / "work"),
                                 "--results", str(tmp / "results")])  # fmt: skip
    finally:
        patch.undo()
    return results, tmp / "results", printed.getvalue()


def test_the_tour_reads_the_zoo_versions_the_configs_read():
    """The tour pins its sources; they are the latest versions, so the tour's builds are the configs' cache."""
    for name in tour.SOURCES.values():
        assert lookup(name) == lookup(name.split("@")[0]), name


def test_report_has_every_section_and_its_provenance(smoke_tour):
    results, out, _ = smoke_tour
    text = (out / "tour.md").read_text()
    for heading in ("## Summary", "## 1. Classifier", "## 2. DCGAN", "## 3. VAE", "## 4. GAN-augmented"):
        assert heading in text
    assert "reduced tour" in text and "remain the source of the\nREADME's claims" in text
    assert provenance.missing(text) == []
    record = provenance.read(text)
    assert set(record["inputs"]) == set(tour.SOURCES.values())  # every zoo source hashed
    assert record["timing"]["wall_s"] > 0 and record["timing"]["cpu_s"] > 0
    summary = text.split("## Summary")[1].split("## 1.")[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| comparison")]
    assert [r.split("|")[1].strip() for r in rows] == ["classifier", "DCGAN", "VAE", "GAN-augmented"]
    assert "real vs real" in text.lower() and "FID" in text  # the floor beside the arms' FID
    data = json.loads((out / "tour.json").read_text())["data"]
    assert data["seeds"] == [0, 1] and "samples" not in json.dumps(data)  # numbers only; images are in the png


def test_at_least_two_seeds_pair_every_arm_and_the_budget_stops_the_third(smoke_tour):
    results, _, _ = smoke_tour
    assert results["seeds"] == [0, 1] and "budget" in results["seed_note"]
    for comparison in tour.comparisons(results):
        assert len(comparison.values) >= 2
        assert all(len(v) == 2 for v in comparison.values.values()), comparison.section
        for test in comparison.tests().values():
            assert len(test.diffs) == 2
    gan = results["per_seed"][0]["dcgan"]
    assert set(gan) == {"scratch", "TransferGAN", "FreezeD"} and all(r.fid >= 0 for r in gan.values())


def test_figure_is_written(smoke_tour):
    _, out, _ = smoke_tour
    png = (out / "tour.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width >= 1000 and height >= 600  # grids upscaled and four bar charts: big enough to see


def test_it_prints_the_summary_the_time_and_what_it_is(smoke_tour):
    results, _, printed = smoke_tour
    assert tour.summary_table(tour.comparisons(results), len(results["seeds"])) in printed
    assert "a reduced tour" in printed and "remain the source of the README's claims" in printed
    assert "2 seeds (as many as fit" in printed
    for what in ("Wall time", "CPU", "1-min load", "torch thread"):
        assert what in printed
