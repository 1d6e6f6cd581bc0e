"""Checkpoint I/O: atomic writes on the checkpoint's own filesystem, clear errors on bad reads."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file in the target folder, fsync, then ``os.replace``.

    Lightning's own writer stages the file in the system temp dir and moves it into place; when
    that dir is on another filesystem the move is a copy, and a crash mid-copy leaves a
    truncated ``last.ckpt``. A rename within one folder is atomic, so a reader sees the old
    checkpoint or the new one, never half of one. Remote paths (``s3://``...) go to Lightning.
    The file gets the permissions of an ordinary new file (0666 less the umask, e.g. 0644), as with
    Lightning's writer; ``tempfile.mkstemp`` would make every checkpoint 0600, unreadable to others.

    Reading a file that is truncated, not a checkpoint, or a pickle that wants to run code
    (refused by ``weights_only=True``) raises one error that names the file and the way out.
    """

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        # ``None`` would leave the choice to the installed Lightning/torch; resumed files are untrusted too
        weights_only = True if weights_only is None else weights_only
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except FileNotFoundError:
            raise
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
            raise RuntimeError(
                f"Cannot resume from {str(path)!r}: it is truncated, not a Lightning checkpoint, or holds objects "
                f"that weights_only loading refuses ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). "
                "Delete it and resume from another checkpoint (e.g. an epoch checkpoint beside it)."
            ) from err

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file beside ``path``, ``fsync``, then ``os.replace`` onto ``path``:
    a reader sees the old file or the new one, never half of one (checkpoints, the zoo's manifests)."""
    fd, tmp = _create_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_temp_file(path: Path) -> tuple[int, Path]:
    """A new, uniquely named file beside ``path``, opened for writing with the umask's permissions."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
