"""The GPU profile's device work in one prepared call: both GPU results files from one lent device session.

A session lent a device gets about 15 minutes of device time, the machine's start included, and one command may
run 10 minutes. This script runs, in one command on the device, every piece the two GPU results files need, in
order of what they cost, each under ``timeout`` so that the call ends inside ``--budget`` seconds:

1. ``gpu_check.py --piece classifier``: the classifier's speed rows (about 1 min on an H100/H200);
2. ``gpu_check.py --piece gan_vae``: the DCGAN's and the VAE's speed rows (about 1 min);
3. ``full_dataset.py --profile gpu``: all of Fashion-MNIST, ResNet-18, 30 epochs (about 3.5 min);
4. ``gpu_check.py --piece tta``: the classifier's time to 93 % (fits of 2, 3, 4 and 6 epochs, about 3 min).

A piece that would start with less time left than it needs (:data:`PIECES`) is skipped and says so; a piece that
fails or runs out of time is reported, and the ones after it still run. Everything a piece writes (its ``.md`` and
``.json`` with provenance, its log) is packed into ``$OUT/gpu_session.tgz`` after every piece, so a call cut short
still returns what finished (the device returns at most 8 files). The device copy of the repository has no git
history: ``--bundle`` writes the commit (and whether the tree was dirty) into the bundle, and the pieces record it.

    python benchmarks/full_dataset.py --bundle runs/gpu_bundle      # here: data, LightningCLI's deps, the commit
    # the device (carry runs/gpu_bundle; timeout_s 600):
    python3 benchmarks/gpu_session.py --out "$OUT"
    # here, with the returned folder:
    python benchmarks/gpu_session.py --merge /work/.device/.../gpu_session.tgz   # -> benchmarks/results/

``--merge`` unpacks the archive, merges the ``gpu_check`` pieces that finished into ``gpu_check.md`` and copies
``fashion_mnist_full_gpu.md`` (and its ``.json``) into the results folder. ``--dry-run`` runs the same pieces at
toy sizes on the CPU (``tests/test_gpu_session.py``); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"
ARCHIVE = "gpu_session.tgz"
#: the file in a bundle holding ``<commit>`` or ``<commit>-dirty`` (read by provenance.git_state without git)
COMMIT_FILE = "COMMIT"


@dataclass(frozen=True)
class Piece:
    """One command of the session: its name, the seconds it needs at least to be started, its arguments."""

    name: str
    needs_s: int
    script: str
    args: tuple[str, ...]
    dry_args: tuple[str, ...]


PIECES = (
    Piece("classifier", 90, "gpu_check.py", ("--models", "classifier", "--piece", "classifier"),
          ("--variants", "fp32", "bf16+device")),
    Piece("gan_vae", 90, "gpu_check.py", ("--models", "dcgan", "vae", "--piece", "gan_vae"),
          ("--variants", "fp32", "bf16+device")),
    Piece("full", 240, "full_dataset.py", ("--profile", "gpu"), ()),
    Piece("tta", 150, "gpu_check.py", ("--models", "--tta-epochs", "2", "3", "4", "6", "--piece", "tta"),
          ("--variants", "fp32", "bf16+device", "--tta-epochs", "1", "--tta-limit-batches", "0.02")),
)  # fmt: skip


def command(piece: Piece, data_root: Path, out: Path, work: Path, dry_run: bool) -> list[str]:
    """The piece's command line (at toy sizes on the CPU with ``dry_run``)."""
    cmd = [sys.executable, str(BENCH / piece.script), "--data-root", str(data_root), "--out", str(out)]
    if piece.script == "full_dataset.py":
        cmd += ["--workdir", str(work / "full")]
        if dry_run:  # the CPU profile for two steps: the same fit-and-test path, another results file name
            return cmd + ["--profile", "cpu", "--", "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
                          "--trainer.limit_test_batches", "1"]  # fmt: skip
        return cmd + list(piece.args)
    if dry_run:  # every piece the same toy settings (merging refuses pieces of other settings)
        return cmd + ["--dry-run", *piece.args, *piece.dry_args, "--tta-variant", "fp32"]
    return cmd + list(piece.args)


def pack(folder: Path, out: Path) -> Path:
    """``folder``'s files into ``out/gpu_session.tgz`` (written whole, then renamed: a cut call keeps the last)."""
    target = out / ARCHIVE
    partial = out / (ARCHIVE + ".partial")
    with tarfile.open(partial, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            if path.is_file():
                tar.add(path, arcname=path.name)
    partial.replace(target)
    return target


def run_session(out: Path, bundle: Path, budget_s: float, dry_run: bool, data_root: Path | None = None) -> list[str]:
    """Run :data:`PIECES` within ``budget_s``; return one status line per piece (also in ``session.log``)."""
    start = time.monotonic()
    data_root = data_root or bundle / "fashion-mnist"
    if not data_root.is_dir():
        sys.exit(f"no Fashion-MNIST files in {data_root}: make the bundle first "
                 "(python benchmarks/full_dataset.py --bundle runs/gpu_bundle) and carry it")  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(bundle / "site"), env.get("PYTHONPATH")) if p)
    commit_file = bundle / COMMIT_FILE
    if commit_file.is_file():
        env["LIT_FINETUNE_COMMIT"] = commit_file.read_text().strip()
    out.mkdir(parents=True, exist_ok=True)
    status: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        files, work = Path(tmp) / "files", Path(tmp) / "work"
        files.mkdir()
        log = files / "session.log"
        for piece in PIECES:
            left = budget_s - (time.monotonic() - start)
            if left < piece.needs_s:
                status.append(f"{piece.name}: skipped, {left:.0f} s left of the budget, needs about {piece.needs_s} s")
            else:
                cmd = command(piece, data_root, files, work, dry_run)
                began = time.monotonic()
                with (files / f"{piece.name}.log").open("w") as piece_log:
                    try:
                        rc = subprocess.run(cmd, stdout=piece_log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                            timeout=left).returncode  # fmt: skip
                        outcome = "ok" if rc == 0 else f"failed (exit {rc}; see {piece.name}.log)"
                    except subprocess.TimeoutExpired:
                        outcome = f"stopped at the budget's end after {left:.0f} s"
                status.append(f"{piece.name}: {outcome}, {time.monotonic() - began:.0f} s")
            print(status[-1], flush=True)
            log.write_text("\n".join(status) + "\n")
            pack(files, out)
    return status


def merge(archive: Path, results: Path) -> list[Path]:
    """Unpack a session's archive; merge its gpu_check pieces into ``results/gpu_check.md`` and copy the full
    dataset's result; return the files written."""
    sys.path.insert(0, str(BENCH))
    import gpu_check

    written = []
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        folder = Path(tmp)
        print((folder / "session.log").read_text() if (folder / "session.log").is_file() else "(no session.log)")
        pieces = [folder / f"{p.name}.json" for p in PIECES if (folder / f"{p.name}.json").is_file()]
        if pieces:
            written.append(gpu_check.main(["--merge", *map(str, pieces), "--out", str(results)]))
        for name in ("fashion_mnist_full_gpu", "fashion_mnist_full"):
            for suffix in (".md", ".json"):
                source = folder / (name + suffix)
                if source.is_file():
                    written.append(results / source.name)
                    written[-1].write_bytes(source.read_bytes())
    if not written:
        sys.exit(f"{archive} holds no finished piece: see its session.log")
    return written


def main(argv: list[str] | None = None) -> list[str] | list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/gpu_session")),
                        help="where gpu_session.tgz goes (default $OUT)")  # fmt: skip
    parser.add_argument("--bundle", type=Path, default=REPO / "runs" / "gpu_bundle")
    parser.add_argument("--data-root", type=Path, default=None, help="default: the bundle's fashion-mnist folder")
    parser.add_argument("--budget", type=float, default=570.0, help="seconds for all pieces (one call: under 600)")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU: checks the mechanics")
    parser.add_argument("--merge", type=Path, default=None, metavar="ARCHIVE", help="a returned gpu_session.tgz")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where --merge writes")
    args = parser.parse_args(argv)
    if args.merge is not None:
        return merge(args.merge, args.results)
    return run_session(args.out, args.bundle, args.budget, args.dry_run, args.data_root)


if __name__ == "__main__":
    main()
