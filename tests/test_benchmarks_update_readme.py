"""``benchmarks/update_readme.py`` copies only results files that carry complete provenance."""

from __future__ import annotations

import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402
import update_readme  # noqa: E402

README = "# Project\n\n<!-- results:speed -->\nold table\n<!-- /results:speed -->\n\ntext after\n"


@pytest.fixture
def layout(tmp_path):
    readme, results = tmp_path / "README.md", tmp_path / "results"
    readme.write_text(README)
    results.mkdir()
    return readme, results


def test_copies_a_results_file_with_provenance(layout, tmp_path):
    readme, results = layout
    source = tmp_path / "source.ckpt"
    source.write_bytes(b"weights")
    run = provenance.Run.start(REPO / "benchmarks" / "speed.py", ["--quick"])
    run.write(results / "speed.md", "| a | b |\n|---|---|\n| 1 | 2 |", {"source": source})
    assert update_readme.update(readme, results) == ["speed"]
    text = readme.read_text()
    assert "old table" not in text and "| 1 | 2 |" in text and text.endswith("text after\n")
    record = provenance.read(text)  # the block travels into the README with its table
    assert record["command"] == "python benchmarks/speed.py --quick"
    assert record["inputs"]["source"]["sha256"] == provenance.sha256(source)


def test_refuses_a_results_file_without_provenance(layout):
    readme, results = layout
    (results / "speed.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
    with pytest.raises(update_readme.MissingProvenance) as error:
        update_readme.update(readme, results)
    message = str(error.value)
    assert "speed.md" in message and "no provenance block" in message and "rerun: python benchmarks/speed.py" in message
    assert all(name in message for name in provenance.REQUIRED)
    assert readme.read_text() == README  # nothing written


def test_refuses_an_incomplete_block_naming_the_missing_fields(layout):
    readme, results = layout
    record = provenance.Run.start(REPO / "benchmarks" / "speed.py", []).record()
    del record["commit"], record["load_1min_end"]
    (results / "speed.md").write_text("| a |\n|---|\n\n" + provenance.block(record))
    with pytest.raises(update_readme.MissingProvenance, match=r"provenance lacks \(commit, load_1min_end\)"):
        update_readme.update(readme, results)
    assert readme.read_text() == README


def test_every_readme_block_names_its_script():
    """A refusal can always say which script to rerun."""
    names = {m["name"] for m in update_readme.BLOCK.finditer((REPO / "README.md").read_text())}
    assert names and names <= set(update_readme.SCRIPTS)


def test_committed_results_without_provenance_are_refused():
    """Results written before the provenance block existed are not copied until their benchmark is rerun."""
    files = sorted((REPO / "benchmarks" / "results").glob("*.md"))
    lacking = [f for f in files if provenance.missing(f.read_text())]
    assert set(update_readme.problems_of(files)) == set(lacking)
