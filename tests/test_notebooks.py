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
    "02_dcgan_finetuning.ipynb": [
        r"RESULT equal budget: 150 batches per arm",
        r"load_pretrained\(.*source\.ckpt\): \d+ tensors loaded",
        (
            r"loaded: [1-9]\d* generator and [1-9]\d* discriminator tensors; "
            r"clean \(nothing reshaped, missing or unexpected\): True"
        ),
        r"RESULT FreezeD: discriminator\.blocks\.0 unchanged: True",
        r"RESULT full fine-tune: discriminator\.blocks\.0 changed: True",
        r"RESULT FreezeD lr/discriminator\.blocks\.0: 0\.0 at all 150 logged steps",
        r"RESULT full fine-tune lr/discriminator\.blocks\.0: 2\.0e-04 or more",
        *(rf"RESULT FID {arm}: \d+\.\d" for arm in ("source GAN", "full fine-tune", "FreezeD", "scratch")),
    ],
    "03_vae_transfer.ipynb": [
        r"RESULT equal budget: 150 steps per arm",
        r"load_pretrained\(.*source\.ckpt\): \d+ tensors loaded",
        r"loaded: [1-9]\d* encoder and [1-9]\d* decoder tensors; clean \(nothing reshaped, missing or unexpected\): True",
        r"RESULT frozen encoder: encoder unchanged: True",
        r"RESULT frozen encoder: decoder changed: True",
        r"RESULT full transfer: encoder changed: True",
        *(
            re.escape(f"RESULT {arm}: ")
            + r"test/elbo=-\d+\.\d nats, test/nll_iwae=\d+\.\d nats on 500 target test images"
            for arm in ("source VAE (no transfer)", "scratch", "full transfer", "frozen encoder")
        ),
        r"RESULT IWAE bound \(k=64\) at or below -ELBO for every model: True",
    ],
    "04_gan_augmented_classification.ipynb": [
        r"RESULT equal budget: 30 steps per arm",
        (
            r"RESULT generator unchanged by classifier training: True \(requires_grad: False, "
            r"tensors in the classifier's state_dict: 0\)"
        ),
        *(
            re.escape(f"RESULT {arm}: ") + r"test/acc=(0\.\d+|1\.0+) on 5000 test images"
            for arm in ("real only", "real + synthetic (0.5)", "+ filter (τ=0.9)", "synthetic only (CAS)")
        ),
        r"RESULT filter: acceptance (0\.\d+|1\.00) \(mean over 30 steps",
        r"RESULT CAS gap: -?\d+\.\d points",
    ],
}
#: pictures a notebook must draw. 01: the source/target batches, the learning curves, the confusion matrices;
#: 02: the real images, the arms' samples, the samples during fine-tuning, the loss and LR curves;
#: 03: inputs beside each model's reconstructions, each model's prior samples, the ELBO curves;
#: 04: real images beside G(z, y) samples per class, one mixed training batch, the teacher's confidence and the
#: filter's acceptance rate
EXPECTED_IMAGES = {
    "01_classifier_finetuning.ipynb": 3,
    "02_dcgan_finetuning.ipynb": 4,
    "03_vae_transfer.ipynb": 3,
    "04_gan_augmented_classification.ipynb": 3,
}


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
    assert counts == list(range(1, len(counts) + 1)), (
        f"{path.name}: not one top-to-bottom run ({counts}); run `{REFRESH}`"
    )
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


# -- the runner itself ------------------------------------------------------------------------------
def _tiny_notebook(path: Path, source: str) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    nb.metadata["kernelspec"] = {"name": runner.KERNEL, "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_runner_refuses_a_missing_notebook_before_running_any(tmp_path, capsys):
    good = _tiny_notebook(tmp_path / "good.ipynb", "print('ran')")
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--write", str(good), str(tmp_path / "typo.ipynb")])
    assert exit_info.value.code == 2
    assert "typo.ipynb" in capsys.readouterr().err
    assert nbformat.read(good, 4).cells[0].outputs == []  # nothing ran, nothing was written


@pytest.mark.slow
def test_runner_writes_the_others_when_one_notebook_fails(tmp_path, capsys):
    failing = _tiny_notebook(tmp_path / "a_failing.ipynb", "raise RuntimeError('boom')")
    good = _tiny_notebook(tmp_path / "b_good.ipynb", "print('ran')")
    assert runner.main(["--write", str(failing), str(good)]) == 1
    stored = nbformat.read(good, 4)
    assert "ran" in output_text(stored)
    assert stored.metadata[runner.METADATA_KEY]["executed_code_sha256"] == runner.code_digest(stored)
    assert nbformat.read(failing, 4).cells[0].outputs == []  # a failed run is not stored
    err = capsys.readouterr().err
    assert "a_failing.ipynb: FAILED" in err and "boom" in err and "1 of 2 notebooks failed" in err
