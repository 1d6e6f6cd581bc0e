"""Provenance of a benchmark run, written at the end of every ``benchmarks/results/*.md``.

One mechanism for every script: :meth:`Run.start` at the start of ``main``, :meth:`Run.write` where the
results are written. The ``.md`` gets a "Provenance" block (a JSON object inside ``<details>``), and a
``.json`` beside it holds the same provenance with the script's machine-readable results, so pieces of
a profile run on different machines can be merged (:func:`merge_pieces`). ``update_readme.py`` refuses a
results file whose block is missing or lacks any of :data:`REQUIRED`.

A long profile in pieces (e.g. one device call each), then one table::

    python benchmarks/vae_transfer.py --profile full --seeds 0 1 --results /tmp/p1   # machine A
    python benchmarks/vae_transfer.py --profile full --seeds 2 3 4 --results /tmp/p2 # machine B
    python benchmarks/vae_transfer.py --merge /tmp/p1/vae_transfer.json /tmp/p2/vae_transfer.json

``--merge`` (``vae_transfer``, ``gan_finetune``, ``gan_augmented``, ``transfer_sweep``; ``--shots`` too except
in ``gan_finetune``, which has one N) refuses pieces from other commits, configurations or inputs (sha256),
a seed run twice or a grid left incomplete, and names each piece, its command, machine and duration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
REQUIRED = (
    "command", "commit", "dirty", "torch_threads", "load_1min_start", "load_1min_end", "machine",
    "torch", "lightning", "duration_s", "inputs",
)  # fmt: skip
BLOCK = re.compile(r"<summary>Provenance</summary>\s*```json\n(?P<json>.*?)\n```", re.S)


def sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_1min() -> float | None:
    """The 1-minute load average, or ``None`` where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def git_state(repo: Path = REPO) -> tuple[str, bool | None]:
    """(commit, whether tracked files differ from it). Outside a git checkout (a device machine gets a copy of the
    files, not the history): ``$LIT_FINETUNE_COMMIT`` (``<commit>`` or ``<commit>-dirty``, written into the GPU
    bundle by ``full_dataset.py --bundle``) if set, else ``("unknown", None)``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True,
        )  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        given = os.environ.get("LIT_FINETUNE_COMMIT", "").strip()
        if not given:
            return "unknown", None
        return given.removesuffix("-dirty"), given.endswith("-dirty")
    return commit.stdout.strip(), bool(status.stdout.strip())


def machine() -> dict[str, Any]:
    """CPU model, core count, GPU (or ``None``), host name, OS and Python."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return {
        "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "host": platform.node(),
        "os": platform.platform(), "python": platform.python_version(),
    }  # fmt: skip


@dataclass
class Run:
    """A benchmark run's provenance, from :meth:`start` to :meth:`record`."""

    script: str
    argv: list[str]
    started: float = field(default_factory=time.perf_counter)
    load_start: float | None = field(default_factory=load_1min)
    #: the code that runs: commit and dirty flag when the run starts (a commit made while it runs is not its code)
    git_at_start: tuple[str, bool | None] = field(default_factory=lambda: git_state())

    @classmethod
    def start(cls, script: str, argv: Sequence[str] | None = None) -> Run:
        """Start the clock; ``script``: the benchmark's ``__file__``; ``argv``: its arguments (default sys.argv)."""
        path = Path(script).resolve()
        name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        return cls(name, [str(a) for a in (sys.argv[1:] if argv is None else argv)])

    merged_at: tuple[str, bool | None] | None = None

    def adopt_pieces(self, commit: str, dirty: bool) -> None:
        """Record the pieces' commit (a merge publishes their figures); keep the merge's own as ``merged_at``."""
        self.merged_at = self.git_at_start
        self.git_at_start = (commit, dirty)

    @property
    def command(self) -> str:
        return shlex.join(["python", self.script, *self.argv])

    def record(self, inputs: Mapping[str, Path | str | None] | None = None, **extra: Any) -> dict[str, Any]:
        """The provenance now: every :data:`REQUIRED` field, the sha256 of each given input, ``extra`` keys."""
        import lightning
        import torch

        commit, dirty = self.git_at_start
        hashed = {
            name: {"path": str(path), "sha256": sha256(path)}
            for name, path in (inputs or {}).items()
            if path is not None and Path(path).is_file()
        }
        return {
            "command": self.command, "commit": commit, "dirty": dirty, "torch_threads": torch.get_num_threads(),
            "load_1min_start": self.load_start, "load_1min_end": load_1min(), "machine": machine(),
            "torch": torch.__version__, "lightning": lightning.__version__,
            "duration_s": round(time.perf_counter() - self.started, 1), "inputs": hashed,
            "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **({"merged_at": {"commit": self.merged_at[0], "dirty": self.merged_at[1]}} if self.merged_at else {}),
            **extra,
        }  # fmt: skip

    def write(
        self, path: Path, markdown: str, inputs: Mapping[str, Path | str | None] | None = None,
        data: Any = None, record: dict[str, Any] | None = None, **extra: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """Write ``markdown`` + the provenance block to ``path``, ``{provenance, data}`` to the ``.json`` beside it.

        ``record`` is a provenance taken earlier with :meth:`record` (default: taken now from ``inputs`` and ``extra``).
        """
        record = self.record(inputs, **extra) if record is None else record
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown.rstrip() + "\n\n" + block(record))
        piece = {"provenance": record, "data": data}
        path.with_suffix(".json").write_text(json.dumps(piece, separators=(",", ":"), default=jsonable) + "\n")
        return record


def jsonable(value: Any) -> Any:
    """JSON for what ``json`` cannot write itself: dataclasses as dicts, paths as strings, tensors as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "is_floating_point") and value.is_floating_point():
        return value.detach().cpu().float().round(decimals=4).tolist()  # e.g. sample images: 4 decimals suffice
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return repr(value)  # e.g. a trained model kept for tests: named, not serialised


def merge_seed_lists(trees: Sequence[Any], seeds: Sequence[Sequence[int]]) -> tuple[Any, list[int]]:
    """Merge pieces' nested dicts whose leaves are lists over that piece's ``seeds``; leaves come out in seed order.

    Keys are united (pieces may hold other N); a seed in two pieces at one leaf, or leaves that end with
    other seeds than the rest, raise :class:`PieceMismatch`. Returns the merged tree and its seeds.
    """
    leaves: list[list[int]] = []

    def merge(nodes: list[tuple[Any, Sequence[int]]], where: str) -> Any:
        if all(isinstance(node, dict) for node, _ in nodes):
            keys = list(dict.fromkeys(k for node, _ in nodes for k in node))
            return {k: merge([(node[k], s) for node, s in nodes if k in node], f"{where}/{k}") for k in keys}
        by_seed: dict[int, Any] = {}
        for node, node_seeds in nodes:
            if len(node) != len(node_seeds):
                raise PieceMismatch(f"{where}: {len(node)} runs for seeds {list(node_seeds)}")
            for seed, item in zip(node_seeds, node):
                if seed in by_seed:
                    raise PieceMismatch(f"{where}: seed {seed} is in more than one piece")
                by_seed[seed] = item
        leaves.append(sorted(by_seed))
        return [by_seed[seed] for seed in sorted(by_seed)]

    tree = merge(list(zip(trees, seeds)), "")
    if any(leaf != leaves[0] for leaf in leaves):
        raise PieceMismatch(f"the pieces leave cells with other seeds: {leaves}")
    return tree, leaves[0]


def merged_setup(summary: Mapping[str, Any], pieces: Sequence[Mapping[str, Any]]) -> str:
    """A merged table's setup: how many pieces, what each ran and where (details in the Provenance block), then
    the first piece's own setup paragraph (``setup`` in its data)."""
    parts = [
        f"piece {i}: {p['command'].split(' ', 2)[-1]} on {p['machine']['gpu'] or p['machine']['cpu']} "
        f"({p['duration_s'] / 60:.1f} min)"
        for i, p in enumerate(summary["pieces"], 1)
    ]
    return (
        f"Merged from {len(pieces)} piece{'' if len(pieces) == 1 else 's'} at commit {summary['commit'][:10]} "
        f"({'; '.join(parts)}). "
        f"Piece 1's setup (its own seeds, timings and machine): {pieces[0]['setup']}"
    )


def settings(profile: Any, *subset: str) -> dict[str, Any]:
    """A profile dataclass's fields except ``subset`` (e.g. seeds, shots): what the pieces of one table must share."""
    return {k: v for k, v in json.loads(json.dumps(profile, default=jsonable)).items() if k not in subset}


def block(record: Mapping[str, Any]) -> str:
    """The markdown block holding ``record`` (collapsed when rendered)."""
    return f"<details><summary>Provenance</summary>\n\n```json\n{json.dumps(record, indent=1)}\n```\n\n</details>\n"


def read(text: str) -> dict[str, Any] | None:
    """The provenance block of a results file's text, or ``None`` if it has none (or it does not parse)."""
    match = BLOCK.search(text)
    if match is None:
        return None
    try:
        record = json.loads(match["json"])
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def missing(text: str) -> list[str]:
    """The :data:`REQUIRED` fields the results file's text lacks (all of them without a block)."""
    record = read(text)
    return list(REQUIRED) if record is None else [name for name in REQUIRED if name not in record]


class PieceMismatch(ValueError):
    """Pieces of a profile that cannot be merged: other commits or other configurations."""


def merge_pieces(
    paths: Sequence[Path], config_key: str = "config", run: Run | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """Load piece ``.json`` files; check they share commit and configuration; return their data and a summary.

    Each piece's provenance must hold ``config_key`` (the run's settings apart from the subset it ran, e.g.
    profile and steps but not seeds). The summary goes into the merged file's provenance as ``pieces``:
    per piece its file, command, commit, machine, threads, load and duration. ``run`` (the merge's own) then
    records the pieces' commit, and dirty if any piece was: the figures are theirs; the commit the merge ran
    at goes beside it as ``merged_at``.
    """
    if len(paths) < 1:
        raise PieceMismatch("no pieces to merge")
    pieces = [json.loads(Path(p).read_text()) for p in paths]
    records = [piece["provenance"] for piece in pieces]
    for path, record in zip(paths, records):
        absent = [name for name in (*REQUIRED, config_key) if name not in record]
        if absent:
            raise PieceMismatch(f"{path}: provenance lacks {', '.join(absent)}")
    commits = {r["commit"] for r in records}
    if len(commits) > 1 or "unknown" in commits:
        raise PieceMismatch(f"pieces ran at different or unknown commits: {sorted(commits)}")
    configs = {json.dumps(r[config_key], sort_keys=True) for r in records}
    if len(configs) > 1:
        raise PieceMismatch(f"pieces ran with different configurations: {sorted(configs)}")
    hashes = {json.dumps({k: v["sha256"] for k, v in r["inputs"].items()}, sort_keys=True) for r in records}
    if len(hashes) > 1:
        raise PieceMismatch(f"pieces used different inputs (sha256): {sorted(hashes)}")
    summary = {
        "commit": records[0]["commit"],
        "dirty": any(bool(r.get("dirty")) for r in records),
        config_key: records[0][config_key],
        "pieces": [
            {"file": str(path), **{k: r[k] for k in ("command", "dirty", "machine", "torch_threads", "load_1min_start",
                                                       "load_1min_end", "duration_s", "inputs")}}
            for path, r in zip(paths, records)
        ],
    }  # fmt: skip
    if run is not None:
        run.adopt_pieces(summary["commit"], summary["dirty"])
    return [piece["data"] for piece in pieces], summary
