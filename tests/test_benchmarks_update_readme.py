"""``benchmarks/update_readme.py`` copies only results files that carry complete provenance."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import provenance  # noqa: E402
import stats  # noqa: E402
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
    """A refusal can always say which script to rerun; the README holds only the built headline block."""
    for document in update_readme.DOCUMENTS:
        names = {m["name"] for m in update_readme.BLOCK.finditer(document.read_text())} - {update_readme.HEADLINE}
        assert names <= set(update_readme.SCRIPTS), document
    assert {m["name"] for m in update_readme.BLOCK.finditer((REPO / "README.md").read_text())} == {"headline"}
    results_blocks = {m["name"] for m in update_readme.BLOCK.finditer((REPO / "docs" / "results.md").read_text())}
    assert {"transfer_vs_scratch", "gan_finetune", "vae_transfer", "speed"} <= results_blocks


def _write_transfer_result(results, tuned, scratch):
    run = provenance.Run.start(REPO / "benchmarks" / "transfer_vs_scratch.py", [])
    run.write(results / "transfer_vs_scratch.md", "| table |", {}, data={"test_accuracy": {"fine-tuned": tuned, "scratch": scratch}})


def test_headline_rows_are_computed_from_the_saved_data(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write_transfer_result(results, [0.90, 0.92, 0.91], [0.88, 0.91, 0.87])
    table = update_readme.headline_table(results)
    row = next(line for line in table.splitlines() if "transfer_vs_scratch" in line)
    # means, the paired difference (+2.3 points), the worst seed (+1.0) and the paired test's p, all from the data
    test = stats.paired_t_test([0.90, 0.92, 0.91], [0.88, 0.91, 0.87])
    assert "fine-tuned 91.0 % vs scratch 88.7 %" in row and "+2.3 points paired" in row and "worst seed +1.0" in row
    assert f"p = {test.p:.3f}" in row and "| 3 |" in row and "(docs/results.md#transfer-vs-scratch)" in row
    # benchmarks without saved results are named with the command that makes them, not invented
    assert "Not in this table until rerun with provenance" in table and "benchmarks/gan_finetune.py" in table


def test_a_headline_row_from_uncommitted_code_says_so(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    for dirty in (True, False):
        run = provenance.Run.start(REPO / "benchmarks" / "transfer_vs_scratch.py", [])
        run.git_at_start = ("d" * 40, dirty)
        run.write(results / "transfer_vs_scratch.md", "| table |", {},
                  data={"test_accuracy": {"fine-tuned": [0.9, 0.8], "scratch": [0.7, 0.6]}})  # fmt: skip
        row = next(line for line in update_readme.headline_table(results).splitlines() if "transfer_vs" in line)
        assert ("code with uncommitted changes at dddddddddd" in row) == dirty


def test_headline_skips_results_without_provenance(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write_transfer_result(results, [0.9, 0.8], [0.7, 0.6])
    (results / "transfer_vs_scratch.md").write_text("| table without provenance |\n")
    table = update_readme.headline_table(results)
    assert "fine-tuned" not in table and "`python benchmarks/transfer_vs_scratch.py`" in table


def test_update_all_fills_the_readme_headline_and_the_results_document(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    _write_transfer_result(results, [0.90, 0.92], [0.88, 0.91])
    readme, document = tmp_path / "README.md", tmp_path / "results.md"
    readme.write_text("# P\n<!-- results:headline -->\nold\n<!-- /results:headline -->\n")
    document.write_text("# R\n<!-- results:transfer_vs_scratch -->\nold\n<!-- /results:transfer_vs_scratch -->\n")
    assert update_readme.update_all((readme, document), results) == ["README.md:headline", "results.md:transfer_vs_scratch"]
    assert "fine-tuned 91.0 % vs scratch 89.5 %" in readme.read_text()
    assert "| table |" in document.read_text() and "old" not in document.read_text()


def test_the_committed_readme_headline_is_what_the_script_computes():
    """No figure in the README's headline table is typed by hand."""
    text = (REPO / "README.md").read_text()
    body = re.search(r"<!-- results:headline -->\n(.*?)<!-- /results:headline -->", text, re.S).group(1)
    assert body.strip() == update_readme.headline_table(REPO / "benchmarks" / "results").strip()


def test_committed_results_without_provenance_are_refused():
    """Results written before the provenance block existed are not copied until their benchmark is rerun."""
    files = sorted((REPO / "benchmarks" / "results").glob("*.md"))
    lacking = [f for f in files if provenance.missing(f.read_text())]
    assert set(update_readme.problems_of(files)) == set(lacking)


def test_the_vae_row_gives_the_holm_p_of_the_details_table():
    """The headline's uncorrected p comes with the Holm-adjusted one the details table prints for the same cell."""
    table = (REPO / "benchmarks" / "results" / "vae_transfer.md").read_text()
    cell = next(line for line in table.splitlines() if line.startswith("| 10 | full transfer − scratch |"))
    holm_p = cell.rstrip(" |").rsplit("|", 1)[-1].strip().strip("*")
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if "Does a source VAE help" in line)
    assert holm_p.startswith("p ") and holm_p.replace("p ", "p_Holm ", 1) in row
