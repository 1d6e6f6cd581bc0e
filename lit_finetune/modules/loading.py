"""Rebuild a whole module from a lit-finetune checkpoint: a generator to sample from, a teacher to
filter with, a module to draw images from (``lit-finetune-sample``).

Weights for initialising a network go through :func:`~lit_finetune.transfer.load_pretrained`; this
is for using a trained module as it is. The checkpoint is read with ``weights_only=True`` and the
class it names (``_class_path`` in its hyper-parameters) must be one of this package's, so a file
cannot make the loader import or run anything else: :func:`checked_module_class` is that check, shared
with ``lit-finetune <subcommand> --ckpt_path`` (:mod:`lit_finetune.cli`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lit_finetune.modules.base import TransferModule
from lit_finetune.transfer.pretrained import PretrainedLoadError, load_checkpoint_file
from lit_finetune.zoo import resolve_source


class CheckpointLoadError(PretrainedLoadError):
    """A module checkpoint is missing, unreadable, or of a module that cannot play the asked role."""


#: the only ``_instantiator`` values accepted in a checkpoint's hyper-parameters: the one LightningCLI writes.
#: Lightning imports and calls whatever this key names when it rebuilds a module (before 2.6.6 with no
#: allowlist of its own), so any other value is refused, and :func:`load_module_checkpoint` calls none.
LIGHTNING_INSTANTIATORS = frozenset(
    {"lightning.pytorch.cli.instantiate_module", "pytorch_lightning.cli.instantiate_module"}
)


def checked_module_class(hparams: Mapping[str, Any], name: str) -> type[TransferModule] | None:
    """The lit_finetune module class a checkpoint's hyper-parameters name (``None`` without ``_class_path``).

    Refuses, with a :class:`CheckpointLoadError` naming the file (``name``), every hyper-parameter Lightning
    turns into code: an ``_instantiator`` other than LightningCLI's; a ``_class_path`` outside this package,
    that does not import, or that is not a concrete module (the base :class:`TransferModule` has no network);
    and values LightningCLI would import while parsing them (a nested ``class_path``, a callable-typed
    argument such as ``optimizer``). Only ``lit_finetune`` modules are ever imported.
    """
    instantiator = hparams.get("_instantiator")
    if instantiator is not None and not (isinstance(instantiator, str) and instantiator in LIGHTNING_INSTANTIATORS):
        raise CheckpointLoadError(
            f"{name} names the instantiator {instantiator!r} in its hyper-parameters, which loading would import "
            "and call; refused (only LightningCLI's own is accepted). Use a checkpoint written by lit-finetune fit "
            "or Trainer.save_checkpoint."
        )
    if "_class_path" not in hparams:
        return None
    class_path = hparams["_class_path"]
    module_name, _, class_name = str(class_path).rpartition(".")
    if not isinstance(class_path, str) or not (
        module_name == "lit_finetune" or module_name.startswith("lit_finetune.")
    ):
        raise CheckpointLoadError(f"{name} does not name a lit_finetune module (its _class_path is {class_path!r}).")
    try:
        cls = getattr(importlib.import_module(module_name), class_name, None)
    except ImportError as err:
        raise CheckpointLoadError(
            f"{name} names {class_path!r}, which is not a lit_finetune module ({type(err).__name__}: {err}); "
            "was it written by another lit_finetune version?"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, TransferModule)) or cls is TransferModule:
        raise CheckpointLoadError(
            f"{name} names {class_path!r}, which is not a lit_finetune module (ImageClassifier, DCGAN, VAE, "
            "GANAugmentedClassifier...)."
        )
    # LightningCLI parses the other hyper-parameters against the constructor: a nested {"class_path": ...}, or
    # any value of a callable-typed argument (optimizer, lr_scheduler: never saved by these modules), is imported
    callables = _callable_arguments(cls)
    code = sorted(key for key, value in hparams.items() if key in callables or _names_a_class(value))
    if code:
        raise CheckpointLoadError(
            f"{name} sets {code} in its hyper-parameters, which would name code to import (lit_finetune modules "
            "never save these); refused. Use a checkpoint written by lit-finetune fit or Trainer.save_checkpoint."
        )
    return cls


def _names_a_class(value: Any) -> bool:
    """Whether ``value`` holds, at any depth, a jsonargparse class spec (a mapping with ``class_path``)."""
    if isinstance(value, Mapping):
        return "class_path" in value or "_class_path" in value or any(_names_a_class(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_names_a_class(v) for v in value)
    return False


def _callable_arguments(cls: type) -> set[str]:
    """Constructor arguments of ``cls`` and its bases (which its ``**kwargs`` may reach) typed as callables."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            names.update(p.name for p in inspect.signature(init).parameters.values() if "Callable" in str(p.annotation))
    return names


def read_hparams(path: Path, role: str, required: bool = True) -> dict[str, Any]:
    """The hyper-parameters of checkpoint ``path``, read with ``weights_only=True`` (``role`` names it in errors);
    ``{}`` for a file without them unless ``required``."""
    try:
        checkpoint = load_checkpoint_file(path, role=f"The {role}")
    except PretrainedLoadError as err:
        raise CheckpointLoadError(str(err)) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if isinstance(hparams, dict):
        return hparams
    if required:
        raise CheckpointLoadError(
            f"The {role} {str(path)!r} holds no module hyper-parameters (is it a plain state dict?); "
            "point to a .ckpt written by lit-finetune fit."
        )
    return {}


def load_module_checkpoint(path: str | Path, role: str = "checkpoint") -> TransferModule:
    """The module saved in ``path``, in eval mode on the CPU.

    Args:
        path: a ``.ckpt`` written by ``lit-finetune fit`` or by a Trainer, or a ``zoo:`` name.
        role: what the file is for, named in errors (e.g. ``"generator (--model.generator)"``).

    Raises:
        CheckpointLoadError: the file is missing, unreadable, refused by ``weights_only=True``, names
            no lit-finetune module or an instantiator (see :func:`checked_module_class`), or does not
            rebuild as the module it names.
    """
    path = Path(resolve_source(path, role=role))
    if not path.is_file():
        raise CheckpointLoadError(
            f"The {role} {str(path)!r} does not exist; pass a .ckpt written by lit-finetune fit "
            "(e.g. <run dir>/checkpoints/last.ckpt)."
        )
    name = f"The {role} {str(path)!r}"
    hparams = read_hparams(path, role)
    cls = checked_module_class(hparams, name)
    if cls is None:
        raise CheckpointLoadError(f"{name} does not name a lit_finetune module (it has no _class_path).")
    try:
        # ``_instantiator=None`` overrides the checkpoint's: the class's own constructor builds the module from
        # the plain hyper-parameters, and no instantiator (nor the config parser it runs) is called
        module = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, _instantiator=None)
    except PretrainedLoadError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError) as err:
        raise CheckpointLoadError(
            f"{name} names {hparams['_class_path']!r} but does not rebuild as one "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); is it that module's checkpoint?"
        ) from err
    return module.eval()
