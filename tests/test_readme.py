"""The README's Python snippets run as written, in an empty folder."""

import re
import subprocess
import sys

import pytest

from conftest import REPO

SNIPPETS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def test_readme_has_the_snippets():
    assert len(SNIPPETS) >= 2 and any("DCGAN" in s for s in SNIPPETS) and any("ImageClassifier" in s for s in SNIPPETS)


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
