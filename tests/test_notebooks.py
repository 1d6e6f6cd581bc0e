"""Notebooks run, show pictures, and are stored with the outputs of that same run.

``notebooks/run_notebooks.py`` executes each notebook top to bottom in a fresh ``python3`` kernel
(the notebooks folder as working directory); the slow test runs it exactly so and checks the
outputs: no cell error, the expected pictures (``image/png``) and printed markers. The fast tests
check the committed files: stored with outputs from one top-to-bottom run of the code as it is now
(the digest that ``run_notebooks.py --write`` stamps), with the same pictures and markers, and
importing the installed package (no ``sys.path`` edits).
"""

from __future__ import annotations

import base64
import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType

import nbformat  # the dev extra: nbclient, nbformat, ipykernel
import pytest
from nbclient.exceptions import CellExecutionError
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
REFRESH = "python3 notebooks/run_notebooks.py --write"

#: regexes that must appear in a notebook's outputs
EXPECTED_OUTPUTS = {
    "01_classifier_finetuning.ipynb": [
        r"RESULT fine-tuned: test/acc=(0\.\d+|1\.0+) on 5000 test images",
        r"RESULT scratch: test/acc=(0\.\d+|1\.0+) on 5000 test images",
        r"clean \(nothing reshaped, missing or unexpected\): True",
    ],
}
#: pictures a notebook must draw: the source/target batches, the learning curves, the confusion matrices
EXPECTED_IMAGES = {"01_classifier_finetuning.ipynb": 3}


def load_runner() -> ModuleType:
    """``notebooks/run_notebooks.py`` as a module (notebooks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_notebooks", NOTEBOOK_DIR / "run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


runner = load_runner()


def output_text(nb) -> str:
    """All text a notebook's code cells printed or returned (stdout, stderr, plain-text results)."""
    parts = []
    for out in runner.outputs_of(nb):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif out.get("output_type") in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.get("output_type") == "error":
            parts.append("\n".join(out.get("traceback", [])))
    return "\n".join(parts)


def drawn_images(nb) -> list[Image.Image]:
    """The PNG pictures among a notebook's outputs, decoded."""
    return [
        Image.open(io.BytesIO(base64.b64decode(out["data"]["image/png"])))
        for out in runner.outputs_of(nb)
        if "image/png" in out.get("data", {})
    ]


def check_outputs(nb, name: str) -> None:
    """No errors, the expected pictures (each more than one flat colour) and printed markers."""
    errors = [out for out in runner.outputs_of(nb) if out.get("output_type") == "error"]
    assert not errors, f"{name}: cells raised:\n" + "\n".join("\n".join(e.get("traceback", [])) for e in errors)
    images = drawn_images(nb)
    assert len(images) >= EXPECTED_IMAGES.get(name, 1), f"{name}: {len(images)} images (image/png) in its outputs"
    for image in images:
        assert image.width >= 200 and image.height >= 100, image.size
        lo, hi = image.convert("L").getextrema()
        assert hi - lo > 50, f"{name}: a drawn image is (nearly) blank"
    text = output_text(nb)
    for pattern in EXPECTED_OUTPUTS.get(name, []):
        assert re.search(pattern, text), f"{name}: no output matches {pattern!r}; outputs were:\n{text[-3000:]}"


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"
    assert set(EXPECTED_OUTPUTS) <= {p.name for p in NOTEBOOKS}, "EXPECTED_OUTPUTS names a missing notebook"
    assert set(EXPECTED_IMAGES) <= {p.name for p in NOTEBOOKS}, "EXPECTED_IMAGES names a missing notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_imports_the_installed_package(path):
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "sys.path" not in code and "PYTHONPATH" not in code, f"{path.name} edits the import path"
    assert re.search(r"^from lit_finetune\b|^import lit_finetune\b", code, re.MULTILINE), f"{path.name}: no import"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stored_with_the_outputs_of_its_current_code(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stamped = nb.metadata.get(runner.METADATA_KEY, {}).get("executed_code_sha256")
    assert stamped == runner.code_digest(nb), (
        f"{path.name}: its code changed after its outputs were stored (or they never were); run `{REFRESH}`"
    )
    counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not one top-to-bottom run ({counts}); run `{REFRESH}`"
    check_outputs(nb, path.name)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path):
    try:
        nb = runner.execute(path, runner.ensure_kernel())
    except CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    assert nb.metadata[runner.METADATA_KEY]["executed_code_sha256"] == runner.code_digest(nbformat.read(path, 4))
    check_outputs(nb, path.name)
