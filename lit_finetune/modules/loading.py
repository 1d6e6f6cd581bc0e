"""Rebuild a whole module from a lit-finetune checkpoint: a generator to sample from, a teacher to
filter with, a module to draw images from (``lit-finetune-sample``).

Weights for initialising a network go through :func:`~lit_finetune.transfer.load_pretrained`; this
is for using a trained module as it is. The checkpoint is read with ``weights_only=True`` and the
class it names (``_class_path`` in its hyper-parameters) must be one of this package's, so a file
cannot make the loader import or run anything else.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from lit_finetune.modules.base import TransferModule
from lit_finetune.transfer.pretrained import PretrainedLoadError, load_checkpoint_file
from lit_finetune.zoo import resolve_source


class CheckpointLoadError(PretrainedLoadError):
    """A module checkpoint is missing, unreadable, or of a module that cannot play the asked role."""


def _read_hparams(path: Path, role: str) -> dict[str, Any]:
    try:
        checkpoint = load_checkpoint_file(path, role=f"The {role}")
    except PretrainedLoadError as err:
        raise CheckpointLoadError(str(err)) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("hyper_parameters"), dict):
        raise CheckpointLoadError(
            f"The {role} {str(path)!r} holds no module hyper-parameters (is it a plain state dict?); "
            "point to a .ckpt written by lit-finetune fit."
        )
    return checkpoint["hyper_parameters"]


def load_module_checkpoint(path: str | Path, role: str = "checkpoint") -> TransferModule:
    """The module saved in ``path``, in eval mode on the CPU.

    Args:
        path: a ``.ckpt`` written by ``lit-finetune fit`` or by a Trainer, or a ``zoo:`` name.
        role: what the file is for, named in errors (e.g. ``"generator (--model.generator)"``).

    Raises:
        CheckpointLoadError: the file is missing, unreadable, refused by ``weights_only=True``, or
            names no lit-finetune module.
    """
    path = Path(resolve_source(path, role=role))
    if not path.is_file():
        raise CheckpointLoadError(
            f"The {role} {str(path)!r} does not exist; pass a .ckpt written by lit-finetune fit "
            "(e.g. <run dir>/checkpoints/last.ckpt)."
        )
    class_path = str(_read_hparams(path, role).get("_class_path", ""))
    module_name, _, class_name = class_path.rpartition(".")
    if module_name != "lit_finetune" and not module_name.startswith("lit_finetune."):
        raise CheckpointLoadError(
            f"The {role} {str(path)!r} does not name a lit_finetune module (its _class_path is {class_path!r})."
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, TransferModule)):
        raise CheckpointLoadError(f"The {role} {str(path)!r} names {class_path!r}, which is not a lit_finetune module.")
    return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True).eval()
