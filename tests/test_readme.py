"""The README (short, two commands first) and its Python snippets, and the recipes of docs/python.md, run as
written in an empty folder; long documents list every section; every document is one link from the README."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_docs import slug

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
PYTHON_MD = (REPO / "docs" / "python.md").read_text()
#: docs/python.md's recipes by section: (the section's anchor, its python block); a section holds at most one
RECIPES = [
    (slug(heading), code)
    for heading, body in re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", PYTHON_MD, re.S | re.M)
    for code in re.findall(r"```python\n(.*?)```", body, re.S)
]


def run_snippet(snippet: str, folder: Path) -> subprocess.CompletedProcess:
    """Run ``snippet`` as a script in the empty ``folder``; fail with its stderr when it fails. It gets this
    process's thread count (one per pytest-xdist worker, see conftest), 2 when none is set."""
    script = folder / "snippet.py"
    script.write_text(snippet)
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=folder, capture_output=True, text=True, timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


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
    """A document longer than a screen (80 lines) lists every one of its sections, each link resolving to a heading."""
    text = doc.read_text()
    if len(text.splitlines()) <= 80:
        return
    assert "Contents:" in text[:3000], f"{doc.name} has no contents list near its top"
    headings = {slug(h) for h in re.findall(r"^##+ (.+)$", text, re.M)}
    anchors = re.findall(r"^- \[[^]]+\]\(#([^)]+)\)", text, re.M)
    assert anchors and set(anchors) <= headings
    sections = [slug(h) for h in re.findall(r"^## (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M), re.M)]
    unlisted = [s for s in sections if s not in anchors]
    assert not unlisted, f"{doc.name}: sections missing from its contents list: {unlisted}"


def test_the_readme_links_every_document():
    """Nothing moved out of the README is lost: every page of docs/ is one link away from it."""
    text = (REPO / "README.md").read_text()
    for doc in sorted((REPO / "docs").glob("*.md")):
        assert f"](docs/{doc.name})" in text, f"README.md does not link docs/{doc.name}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs(index, tmp_path, fashion_root):
    proc = run_snippet(SNIPPETS[index], tmp_path)
    assert "load_pretrained(" in proc.stdout + proc.stderr  # the load report was printed


#: per recipe of docs/python.md (by section anchor): patterns its output must match, files it must leave behind
RECIPE_CHECKS = {
    "your-own-source-model": (
        [r"load_pretrained\(source\.ckpt\): [1-9]\d* tensors loaded"], ["source.ckpt"],
    ),
    "a-gan-source-of-your-own-adapted-with-freezed": (
        [r"load_pretrained\(dcgan_source\.ckpt\): [1-9]\d* tensors loaded", r"torch\.Size\(\[16, 1, 28, 28\]\)"],
        ["dcgan_source.ckpt"],
    ),
    "gan-augmented-classification-with-any-generator": (
        [r"torch\.Size\(\[10, 1, 28, 28\]\) \[(\d, ){9}\d\]"], [],
    ),
    "train-a-few-parameters-peft-and-delta-checkpoints": (
        [
            r"load_pretrained\(source\.ckpt\): [1-9]\d* tensors loaded", r"\n[\d,]+ parameters trained",
            r"same outputs: True \['Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot'\]",
        ],
        ["source.ckpt", "delta.pt"],
    ),
    "the-networks-and-the-vae-without-a-trainer": (
        [
            r"torch\.Size\(\[8, 1, 28, 28\]\) torch\.Size\(\[8\]\) torch\.Size\(\[8, 16\]\) "
            r"torch\.Size\(\[8, \d+\]\) \d+",
            r"torch\.Size\(\[8, 1, 28, 28\]\) torch\.Size\(\[16, 1, 28, 28\]\) torch\.Size\(\[8, 1, 28, 28\]\)",
        ],
        [],
    ),
}  # fmt: skip


def test_every_python_md_recipe_is_checked():
    assert RECIPES, "docs/python.md has no python blocks"
    names = [name for name, _ in RECIPES]
    assert len(set(names)) == len(names), "one python block per section of docs/python.md"
    assert sorted(names) == sorted(RECIPE_CHECKS), "RECIPE_CHECKS must name each recipe of docs/python.md"


def test_python_md_names_real_arguments():
    """Every ``name=`` written in docs/python.md's prose is an argument of one of the classes the page uses."""
    from lit_finetune import DCGAN, VAE, GANAugmentedClassifier, ImageClassifier
    from lit_finetune.data import FashionMNISTDataModule
    from lit_finetune.data.base import ImageDataModule

    arguments = {
        name
        for cls in (DCGAN, VAE, GANAugmentedClassifier, ImageClassifier, FashionMNISTDataModule, ImageDataModule)
        for name in inspect.signature(cls.__init__).parameters
    }
    prose = re.sub(r"^```.*?^```", "", PYTHON_MD, flags=re.S | re.M)
    written = {m for span in re.findall(r"`([^`\n]+)`", prose) for m in re.findall(r"\b(\w+)=", span)}
    assert written, "no argument found in docs/python.md's prose"
    assert not written - arguments, f"docs/python.md names arguments that do not exist: {sorted(written - arguments)}"


@pytest.mark.slow
@pytest.mark.parametrize("name, snippet", RECIPES, ids=[f"python.md-{name}" for name, _ in RECIPES])
def test_python_md_recipe_runs(name, snippet, tmp_path, fashion_root):
    """Each recipe of docs/python.md runs as written in an empty folder and prints and writes what it says."""
    proc = run_snippet(snippet, tmp_path)
    patterns, files = RECIPE_CHECKS[name]
    for pattern in patterns:
        assert re.search(pattern, proc.stdout), f"{name}: no match for {pattern!r} in:\n{proc.stdout[-3000:]}"
    for file in files:
        assert (tmp_path / file).is_file(), f"{name} did not write {file}"
