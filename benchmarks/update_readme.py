"""Copy the measured tables in ``benchmarks/results/*.md`` into README.md, between markers.

README.md holds ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` blocks; this replaces
each block's body with ``benchmarks/results/NAME.md`` so that no figure in the README is typed
by hand. Run it after the benchmarks:

    python benchmarks/transfer_vs_scratch.py && python benchmarks/speed.py && python benchmarks/update_readme.py
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results:(?P=name) -->)", re.S)


def update(readme: Path = REPO / "README.md", results: Path = REPO / "benchmarks" / "results") -> list[str]:
    """Rewrite the result blocks of ``readme``; return the names updated."""
    text = readme.read_text()
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
    print("updated:", ", ".join(update()) or "nothing")
