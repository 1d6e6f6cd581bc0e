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
    "overhead": "benchmarks/speed.py --models overhead --output benchmarks/results/overhead.md",
    "overhead_profile": "benchmarks/speed.py --models overhead --output benchmarks/results/overhead.md "
    "--overhead-profile benchmarks/results/overhead_profile.md",
    "ema_variants": "benchmarks/ema_variants.py --extractor <FID extractor checkpoint>",
}


class MissingProvenance(ValueError):
    """Results files without a complete provenance block."""


def problems_of(sources: list[Path]) -> dict[Path, str]:
    """Each file in ``sources`` whose provenance is incomplete, with what it lacks and the script to rerun."""
    problems = {}
    for source in sources:
        text = source.read_text()
        absent = provenance.missing(text)
        if absent:
            script = SCRIPTS.get(source.stem, f"the script that writes {source.name}")
            what = "no provenance block" if provenance.read(text) is None else "provenance lacks"
            problems[source] = f"  {source}: {what} ({', '.join(absent)}); rerun: python {script}"
    return problems


def update(readme: Path = REPO / "README.md", results: Path = REPO / "benchmarks" / "results") -> list[str]:
    """Rewrite the result blocks of ``readme`` whose results files carry complete provenance; return their names.

    A results file without it is refused: its block is left as it was, and :class:`MissingProvenance`
    (raised after the others were written) names each refused file and the script to rerun.
    """
    text = readme.read_text()
    names = [m["name"] for m in BLOCK.finditer(text)]
    problems = problems_of([results / f"{name}.md" for name in names if (results / f"{name}.md").is_file()])
    updated: list[str] = []

    def fill(match: re.Match) -> str:
        source = results / f"{match['name']}.md"
        if not source.is_file() or source in problems:
            return match.group(0)
        updated.append(match["name"])
        return match.group(1) + source.read_text().rstrip() + "\n" + match.group(4)

    readme.write_text(BLOCK.sub(fill, text))
    if problems:
        raise MissingProvenance(
            f"updated: {', '.join(updated) or 'nothing'}; refused results without provenance (their README blocks "
            "were left as they were):\n" + "\n".join(problems.values())
        )
    return updated


if __name__ == "__main__":
    try:
        print("updated:", ", ".join(update()) or "nothing")
    except MissingProvenance as error:
        sys.exit(str(error))
