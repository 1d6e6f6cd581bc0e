"""Where a benchmark figure came from: one block every results file ends with.

A results file is only as good as what it says about its run: the command line, the git commit
(and whether the tree had uncommitted changes), the machine, torch's thread count, the 1-minute
load average at start and end (other jobs slow a CPU run and move FIDs through thread counts),
the duration, and the sha256 of every reused input (a source checkpoint, the FID extractor), so a
rerun can tell whether it started from the same files. ``update_readme.py`` refuses a results file
without this block.

    run = Provenance.start(threads=torch.get_num_threads())
    ...                                      # the benchmark
    text += run.block(inputs={"extractor": path})
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- provenance -->", "<!-- /provenance -->"
#: rows a block must hold (update_readme.py checks them)
REQUIRED = ("command", "commit", "machine", "torch threads", "1-minute load at start / end", "duration")


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def git_commit() -> str:
    """``<sha> (clean)`` or ``<sha> (dirty: uncommitted changes)``; ``unknown`` outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    dirty = any(line and not line.endswith(".md") and "benchmarks/results/" not in line for line in status.stdout.splitlines())
    return f"{sha.stdout.strip()[:12]} ({'dirty: uncommitted changes' if dirty else 'clean'})"


def machine() -> str:
    """CPU model and cores, GPU if any, torch and lightning versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}; torch {torch.__version__}, lightning {lightning.__version__}"


def load_average() -> float:
    return os.getloadavg()[0]


@dataclass
class Provenance:
    """Facts of one benchmark run, collected at its start and written at its end."""

    threads: int
    command: str = field(default_factory=lambda: " ".join(shlex.quote(a) for a in ["python", *sys.argv]))
    commit: str = field(default_factory=git_commit)
    load_start: float = field(default_factory=load_average)
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def start(cls, threads: int) -> Provenance:
        return cls(threads=threads)

    def block(self, inputs: dict[str, str | Path] | None = None, note: str = "") -> str:
        """The markdown block (a table between markers) to append to the results file."""
        rows = [
            ("command", f"`{self.command}`"),
            ("commit", self.commit),
            ("machine", machine()),
            ("torch threads", str(self.threads)),
            ("1-minute load at start / end", f"{self.load_start:.2f} / {load_average():.2f}"),
            ("duration", f"{(time.perf_counter() - self.started) / 60:.1f} min"),
        ]
        for name, path in (inputs or {}).items():
            rows.append((f"sha256 of {name}", f"`{sha256(path)}` ({Path(path).name})"))
        if note:
            rows.append(("note", note))
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return f"\n{BEGIN}\n\n| provenance | |\n|---|---|\n{table}\n\n{END}\n"


def missing_fields(text: str) -> list[str]:
    """The required rows a results file's provenance block lacks (all of them when it has no block)."""
    match = re.search(re.escape(BEGIN) + r"(.*?)" + re.escape(END), text, re.S)
    if match is None:
        return list(REQUIRED)
    present = {line.split("|")[1].strip() for line in match.group(1).splitlines() if line.startswith("| ")}
    return [name for name in REQUIRED if name not in present]
