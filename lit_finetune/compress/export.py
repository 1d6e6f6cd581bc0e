"""Export a fine-tuned classifier to one self-contained file, and run it without the package's model code.

Two formats, chosen by the file's suffix:

* ``.pt2`` — ``torch.export`` (``torch.export.save``; the maintained path): float models, pruned or
  not. The batch dimension is dynamic.
* ``.ts`` — TorchScript (``torch.jit.trace`` + ``torch.jit.freeze``): float models, and the only one that
  holds an int8 model of :func:`~lit_finetune.compress.quantize_int8`: ``torch.export`` cannot serialise
  the packed weights of ``torch.ao``'s int8 kernels. torch marks TorchScript deprecated; its warnings are
  silenced here (the choice is deliberate) and the ``.pt2`` path is preferred for float models.

Both files carry ``lit_finetune.json``: classes, input channels and size, dtype, the int8 backend. An
exported file is a program: ``torch.export.load`` unpickles and TorchScript runs the code it holds, so
load only files you made or trust (unlike checkpoints, which are read with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_finetune.compress.quantize import check_backend, classifier_network, int8_kernels_allowed, is_quantized

META_FILE = "lit_finetune.json"
FORMATS = {".pt2": "torch.export", ".ts": "TorchScript"}


class ExportError(ValueError):
    """A model cannot be exported as asked, or a file cannot be loaded as an exported model."""


def _format(path: Path) -> str:
    if path.suffix not in FORMATS:
        raise ExportError(
            f"{str(path)!r}: name the file .pt2 (torch.export, float models) or .ts (TorchScript, float or int8)."
        )
    return path.suffix


def _metadata(net: nn.Module, quantized: bool) -> dict[str, Any]:
    num_classes = getattr(net, "num_classes", None)
    return {
        "lit_finetune_export": 1,
        "dtype": "int8" if quantized else "float32",
        "quant_backend": getattr(net, "quant_backend", None) if quantized else None,
        "num_classes": num_classes,
        "in_channels": getattr(net, "in_channels", None),
        "image_size": getattr(net, "image_size", None),
        "class_names": list(getattr(net, "class_names", None) or [str(i) for i in range(num_classes or 0)]),
        "input": "float images (B, C, H, W) in [-1, 1]; returns logits (B, num_classes)",
        "torch": torch.__version__,
    }


def export_model(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None) -> Path:
    """Write ``model`` to ``path`` (``.pt2``: torch.export; ``.ts``: TorchScript) for inference.

    Args:
        model: an :class:`~lit_finetune.ImageClassifier` (exported as its plain network, see
            :func:`~lit_finetune.compress.classifier_network`; pruning masks made permanent), an int8 model of
            :func:`~lit_finetune.compress.quantize_int8` (``.ts`` only), or any float ``nn.Module``.
        path: the file to write (atomically: a reader never sees half of it).
        example_input: one input batch to trace with; default two blank images of the model's
            ``in_channels`` and ``image_size``.

    Returns:
        ``path``; load it with :func:`load_exported`.

    Raises:
        ExportError: an unknown suffix, an int8 model to ``.pt2``, or no example input and no size to make one.
    """
    path = Path(path)
    suffix = _format(path)
    quantized = is_quantized(model)
    if quantized and suffix == ".pt2":
        raise ExportError(
            f"{str(path)!r}: an int8 model exports to TorchScript only (name it .ts); torch.export cannot "
            "serialise the packed weights of torch.ao's int8 kernels."
        )
    net = model if quantized else classifier_network(model)
    if example_input is None:
        channels, size = getattr(net, "in_channels", None), getattr(net, "image_size", None)
        if channels is None or size is None:
            raise ExportError(
                f"{type(model).__name__} has no in_channels / image_size: pass example_input, one input batch."
            )
        example_input = torch.zeros(2, channels, size, size)
    example_input = example_input.cpu().float()
    meta = json.dumps(_metadata(net, quantized))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export.save wants the .pt2 suffix
    with torch.no_grad():
        if suffix == ".pt2":
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            program = torch.export.export(net, (example_input,), dynamic_shapes=({0: batch},))
            torch.export.save(program, tmp, extra_files={META_FILE: meta})
        else:
            # tracing runs the model (and checks the trace by running it again): int8 kernels need int8_kernels_allowed
            with warnings.catch_warnings(), int8_kernels_allowed() if quantized else contextlib.nullcontext():
                warnings.filterwarnings("ignore", category=FutureWarning)  # TorchScript's deprecation: see above
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
                traced = torch.jit.freeze(torch.jit.trace(net, example_input).eval())
                torch.jit.save(traced, str(tmp), _extra_files={META_FILE: meta})
    os.replace(tmp, path)
    return path


class ExportedModel(nn.Module):
    """An exported classifier loaded for inference: ``[-1, 1]`` images in, logits out.

    ``meta`` is the file's record (``num_classes``, ``in_channels``, ``image_size``, ``class_names``,
    ``dtype``, ``quant_backend``). The program's mode was fixed at export (eval: BatchNorm statistics,
    no dropout), so :meth:`train` only sets the flag. A ``.pt2`` program is a submodule (``.to(device)``
    moves it); a TorchScript program is not (a frozen script module lacks the attributes Lightning
    reads from every submodule) and runs on the CPU.
    """

    def __init__(self, program: nn.Module, meta: dict[str, Any], path: str = "") -> None:
        super().__init__()
        self.meta, self.path = meta, path
        self.torchscript = isinstance(program, torch.jit.ScriptModule)
        if self.torchscript:
            self._script = [program]  # a list hides it from nn.Module's registry
        else:
            self.program = program

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    @property
    def in_channels(self) -> int | None:
        return self.meta.get("in_channels")

    @property
    def image_size(self) -> int | None:
        return self.meta.get("image_size")

    @property
    def is_int8(self) -> bool:
        return self.meta.get("dtype") == "int8"

    def train(self, mode: bool = True) -> ExportedModel:
        # torch.export's modules refuse train()/eval(); the exported graph is already in eval mode
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.in_channels
        if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
            raise ValueError(
                f"The exported model {self.path!r} takes images (B, {channels}, H, W); got {tuple(x.shape)}. "
                f"Set the datamodule's channels={channels}."
            )
        if not self.torchscript:
            return self.program(x)
        if x.device.type != "cpu":
            raise ValueError(
                f"The TorchScript model {self.path!r} runs on the CPU; got inputs on {x.device} "
                "(pass --trainer.accelerator cpu, or export a float model to .pt2)."
            )
        if self.is_int8:
            with int8_kernels_allowed():
                return self._script[0](x)
        return self._script[0](x)


def load_exported(path: str | Path) -> ExportedModel:
    """Load a file written by :func:`export_model` (sets the int8 backend it was quantised for).

    Only load files you trust: an exported file is a program (see the module docstring).

    Raises:
        ExportError: no such file, an unknown suffix, or a file without lit_finetune's record (not written by :func:`export_model`).
        QuantizationError: an int8 file whose backend this torch build lacks.
    """
    path = Path(path)
    suffix = _format(path)
    if not path.is_file():
        raise ExportError(f"No exported model at {str(path)!r}; write one with lit-finetune-export or export_model().")
    extra = {META_FILE: ""}
    try:
        if suffix == ".pt2":
            program = torch.export.load(path, extra_files=extra).module()
        else:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", category=FutureWarning)
                program = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, OSError, KeyError) as err:
        raise ExportError(f"{str(path)!r} is not a {FORMATS[suffix]} file ({type(err).__name__}: {err}).") from err
    raw = extra.get(META_FILE) or ""
    try:
        meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or meta.get("lit_finetune_export") != 1:
        raise ExportError(f"{str(path)!r} has no {META_FILE} record: export it with lit_finetune.compress.export_model.")
    if meta["dtype"] == "int8":
        torch.backends.quantized.engine = check_backend(meta["quant_backend"])
    return ExportedModel(program, meta, str(path))
