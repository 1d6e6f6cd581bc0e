"""The speed benchmark runs end to end (``--quick``) and writes its table; speed targets are not asserted here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROWS = (
    "Hand-written loop (steps/s)",
    "Trainer.fit (steps/s)",
    "Trainer / hand-written",
    "Trainer / hand-written, from median step times",
    "Trainer / hand-written, ratio of the steps/s above",
    "Data path (batches/s)",
    "Data path (images/s)",
    "Data path / model step",
)


def row_value(markdown: str, label: str) -> float:
    """The measured number of the table row ``label``."""
    match = re.search(rf"^\| {re.escape(label)} \| ([0-9][0-9,]*\.?[0-9]*)", markdown, re.MULTILINE)
    assert match, f"row {label!r} missing from:\n{markdown}"
    return float(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_speed_benchmark_quick(tmp_path: Path, fashion_root: Path) -> None:
    output = tmp_path / "speed.md"
    cmd = [sys.executable, "benchmarks/speed.py", "--quick", "--root", str(fashion_root), "--output", str(output)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    markdown = output.read_text()
    assert "| Figure | Measured" in markdown and "| Target | Met |" in markdown
    assert "torch " in markdown and "lightning " in markdown
    values = {label: row_value(markdown, label) for label in ROWS}
    assert all(v > 0 for v in values.values()), values
    assert values["Trainer / hand-written, ratio of the steps/s above"] == pytest.approx(
        values["Trainer.fit (steps/s)"] / values["Hand-written loop (steps/s)"], rel=0.02
    )
