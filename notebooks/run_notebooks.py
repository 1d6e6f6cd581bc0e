"""Execute the notebooks top to bottom, the way the test suite does; ``--write`` stores the outputs.

The notebooks are committed with their outputs (pictures included), so a reader sees results without
running anything. Those outputs must come from this very execution: ``tests/test_notebooks.py``
calls :func:`execute` too, and :func:`write` stamps the notebook with a digest of the code it ran
(``metadata.lit_finetune.executed_code_sha256``), so a test can tell when code changed after the
outputs were stored.

    python3 notebooks/run_notebooks.py            # execute every notebook, report, store nothing
    python3 notebooks/run_notebooks.py --write    # execute and store the outputs in place
    python3 notebooks/run_notebooks.py --write notebooks/01_classifier_finetuning.ipynb
    python3 notebooks/run_notebooks.py --write notebooks/0[12]_*.ipynb   # several, in the order given

With several notebooks, each runs in its own fresh kernel; one that fails is reported and not
written, the others still run (and are written with ``--write``), and the exit status is 1.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import time
from pathlib import Path

import nbformat  # the dev extra: nbclient, nbformat, ipykernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent
KERNEL = "python3"
CELL_TIMEOUT_S = 300
METADATA_KEY = "lit_finetune"


def notebooks() -> list[Path]:
    """Every notebook of the folder, sorted."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def ensure_kernel(name: str = KERNEL) -> str:
    """Make sure kernelspec ``name`` exists; install ipykernel's for this interpreter if not.

    CI starts on a fresh machine where ipykernel is installed but no kernelspec may be registered.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--user", "--name", name], check=True, capture_output=True
        )
        KernelSpecManager().get_kernel_spec(name)  # raises if the install did not register it
    return name


def code_digest(nb: nbformat.NotebookNode) -> str:
    """SHA-256 of the code cells' sources, in order: what an execution ran."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def execute(path: Path, kernel: str = KERNEL, timeout: int = CELL_TIMEOUT_S) -> nbformat.NotebookNode:
    """Run ``path`` in a fresh kernel with ``notebooks/`` as working directory; return the executed notebook.

    Raises ``nbclient.exceptions.CellExecutionError`` at the first cell that fails.
    """
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # start clean: no stale outputs survive a partial run
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=timeout,
        record_timing=False,  # no per-cell timestamps: stored notebooks change only when outputs do
        resources={"metadata": {"path": str(path.parent)}},  # cwd of the kernel
    )
    client.execute()
    nb.metadata[METADATA_KEY] = {"executed_code_sha256": code_digest(nb)}
    return nb


def write(nb: nbformat.NotebookNode, path: Path) -> None:
    """Store an executed notebook (validated) at ``path``."""
    nbformat.validate(nb)
    nbformat.write(nb, path)


def outputs_of(nb: nbformat.NotebookNode) -> list[dict]:
    """Every output of every code cell, in order."""
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("paths", nargs="*", type=Path, help="notebooks to run (default: all in notebooks/)")
    parser.add_argument("--write", action="store_true", help="store each executed notebook in place")
    args = parser.parse_args(argv)
    paths = args.paths or notebooks()
    missing = [str(p) for p in paths if p.suffix != ".ipynb" or not p.is_file()]
    if missing:  # before any kernel starts: a typo should not cost the run of the notebooks before it
        parser.error(f"not a notebook file: {', '.join(missing)}")
    kernel = ensure_kernel()
    failed = []
    for path in paths:
        started = time.perf_counter()
        try:
            nb = execute(path.resolve(), kernel)
        except CellExecutionError as err:
            print(f"{path.name}: FAILED after {time.perf_counter() - started:.0f} s, not written\n{err}", file=sys.stderr)
            failed.append(path.name)
            continue
        images = sum("image/png" in out.get("data", {}) for out in outputs_of(nb))
        print(f"{path.name}: executed in {time.perf_counter() - started:.0f} s, {images} images", flush=True)
        if args.write:
            write(nb, path)
            print(f"  wrote {path}")
    if failed:
        print(f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
