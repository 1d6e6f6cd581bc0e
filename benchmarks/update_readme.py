"""Copy the measured tables in ``benchmarks/results/*.md`` into README.md, between markers.

README.md holds ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` blocks; this replaces
each block's body with ``benchmarks/results/NAME.md`` so that no figure in the README is typed
by hand. Run it after the benchmarks:

    python benchmarks/transfer_vs_scratch.py && python benchmarks/speed.py && python benchmarks/update_readme.py

A results file must end with the provenance block that ``benchmarks/provenance.py`` writes (command,
commit, threads, load, machine, versions, duration, input hashes). Files without it, such as those
written before the block existed, are refused: nothing is copied, and the error names each file, the
fields it lacks and the script to rerun. The README is left as it was.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)
# which script writes each results file (to say what to rerun)
SCRIPTS = {
    "transfer_vs_scratch": "benchmarks/transfer_vs_scratch.py",
    "finetune_recipe_val": "benchmarks/finetune_recipe_val.py",
    "transfer_sweep": "benchmarks/transfer_sweep.py",
    "gan_finetune": "benchmarks/gan_finetune.py",
    "vae_transfer": "benchmarks/vae_transfer.py",
    "gan_augmented": "benchmarks/gan_augmented.py",
    "fashion_mnist_full": "benchmarks/full_dataset.py",
    "fashion_mnist_full_gpu": "benchmarks/full_dataset.py --profile gpu",
    "fashion_mnist_full_recipe_val": "benchmarks/full_dataset.py --search",
    "gpu_check": "benchmarks/gpu_check.py",
    "speed": "benchmarks/speed.py",
}


class MissingProvenance(ValueError):
    """Results files without a complete provenance block."""


def check(sources: list[Path]) -> None:
    """Raise :class:`MissingProvenance` naming every file in ``sources`` whose provenance is incomplete."""
    problems = []
    for source in sources:
        text = source.read_text()
        absent = provenance.missing(text)
        if absent:
            script = SCRIPTS.get(source.stem, f"the script that writes {source.name}")
            what = "no provenance block" if provenance.read(text) is None else "provenance lacks"
            problems.append(f"  {source}: {what} ({', '.join(absent)}); rerun: python {script}")
    if problems:
        raise MissingProvenance(
            "refusing to copy results without provenance into the README (nothing was changed):\n" + "\n".join(problems)
        )


def update(readme: Path = REPO / "README.md", results: Path = REPO / "benchmarks" / "results") -> list[str]:
    """Rewrite the result blocks of ``readme``; return the names updated.

    Every results file a block names must carry complete provenance; otherwise :class:`MissingProvenance`
    is raised before anything is written.
    """
    text = readme.read_text()
    names = [m["name"] for m in BLOCK.finditer(text)]
    check([results / f"{name}.md" for name in names if (results / f"{name}.md").is_file()])
    updated: list[str] = []

    def fill(match: re.Match) -> str:
        source = results / f"{match['name']}.md"
        if not source.is_file():
            return match.group(0)
        updated.append(match["name"])
        return match.group(1) + source.read_text().rstrip() + "\n" + match.group(4)

    readme.write_text(BLOCK.sub(fill, text))
    return updated


if __name__ == "__main__":
    try:
        print("updated:", ", ".join(update()) or "nothing")
    except MissingProvenance as error:
        sys.exit(str(error))
