"""Execute every notebook in notebooks/ so that none of them rots.

Each notebook runs top to bottom in a fresh ``python3`` kernel with the notebooks folder as working
directory; any cell error fails the test. Notebooks are stored without outputs, and some must print
markers (e.g. the test accuracy of every compared arm) that are checked here.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import nbformat  # the dev extra: nbclient, nbformat, ipykernel
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 300

#: regexes that must appear in a notebook's executed outputs
EXPECTED_OUTPUTS = {
    "01_classifier_finetuning.ipynb": [
        r"RESULT fine-tuned: test/acc=(0\.\d+|1\.0+) on 5000 test images",
        r"RESULT scratch: test/acc=(0\.\d+|1\.0+) on 5000 test images",
        r"clean \(nothing reshaped, missing or unexpected\): True",
    ],
}


@pytest.fixture(scope="session")
def python3_kernel() -> str:
    """Make sure a ``python3`` kernelspec exists; install ipykernel's for this interpreter if not.

    CI starts on a fresh machine where ipykernel is installed but no kernelspec may be registered.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--user", "--name", KERNEL], check=True, capture_output=True
        )
        KernelSpecManager().get_kernel_spec(KERNEL)  # raises if the install did not register it
    return KERNEL


def output_text(nb) -> str:
    """All text a notebook's code cells printed or returned (stdout, stderr, plain-text results)."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            elif out.get("output_type") in ("execute_result", "display_data"):
                parts.append(out.get("data", {}).get("text/plain", ""))
            elif out.get("output_type") == "error":
                parts.append("\n".join(out.get("traceback", [])))
    return "\n".join(parts)


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    assert set(EXPECTED_OUTPUTS) <= {p.name for p in NOTEBOOKS}, "EXPECTED_OUTPUTS names a missing notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} hold outputs; clear them before committing"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, python3_kernel):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=python3_kernel,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},  # cwd of the kernel
    )
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    errors = [c for c in nb.cells if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    assert not errors, f"{path.name}: {len(errors)} cells raised"
    text = output_text(nb)
    for pattern in EXPECTED_OUTPUTS.get(path.name, []):
        assert re.search(pattern, text), f"{path.name}: no output matches {pattern!r}; outputs were:\n{text[-3000:]}"
