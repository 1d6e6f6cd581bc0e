"""The README's Python snippets run as written, in an empty folder."""

import re
import subprocess
import sys

import pytest

from conftest import REPO
from test_docs import slug

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_the_snippets():
    """One Python quick start per module."""
    for module in ("ImageClassifier", "DCGAN", "VAE", "GANAugmentedClassifier"):
        assert any(f"from lit_finetune import {module}" in s for s in SNIPPETS), module


def test_readme_is_short_and_starts_with_exactly_two_commands():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 260, "the README is for a newcomer: move details to docs/"
    first_block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert first_block.start() < text.index("\n## ")  # before any section
    commands = [line for line in first_block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].startswith("bash .ci/install && python3 benchmarks/tour.py")
    assert commands[1].startswith("bash .ci/install && python3 -m pytest -q")
    # the second command is what CI runs
    assert "bash .ci/install && python3 -m pytest -q" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("doc", sorted((REPO / "docs").glob("*.md")), ids=lambda p: p.name)
def test_long_docs_have_a_contents_list(doc):
    """A document longer than a screen (80 lines) lists its sections, each link resolving to a heading."""
    text = doc.read_text()
    if len(text.splitlines()) <= 80:
        return
    assert "Contents:" in text[:3000], f"{doc.name} has no contents list near its top"
    headings = {slug(h) for h in re.findall(r"^##+ (.+)$", text, re.M)}
    anchors = re.findall(r"^- \[[^]]+\]\(#([^)]+)\)", text, re.M)
    assert anchors and set(anchors) <= headings



@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(index, tmp_path, fashion_root):
    script = tmp_path / "snippet.py"
    script.write_text(SNIPPETS[index])
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "load_pretrained(" in proc.stdout + proc.stderr  # the load report was printed
