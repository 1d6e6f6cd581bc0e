"""Load pretrained weights from any source, loudly.

``load_pretrained`` accepts a Lightning checkpoint written by this package, a plain state dict
file, or a torchvision weight name. It loads every tensor that fits and returns a
:class:`LoadReport` naming each key it loaded, adapted, skipped, or could not find, and the share
of the model's parameters that came from the source. Nothing is dropped silently (the
``strict=False`` trap of older libraries):

* a tensor whose shape differs is adapted only where that is meaningful: the **input
  convolutions** each net names in its ``input_convs`` attribute (the first conv that sees the
  images; its input-channel count may differ, timm's ``adapt_input_conv`` rule), or a key the
  caller passes in ``adapt=`` (e.g. a conditional DCGAN's label channels, started at zero);
* every other shape difference is an error naming the tensor and both shapes, unless the
  caller lists it in ``skip_mismatched`` (then it keeps its fresh initialisation, reported);
* a load that fills less than ``min_loaded_share`` of the model's parameters (not counting
  what the caller excludes or declares ``new``) is an error: a source of other sizes would
  otherwise "load" a few BatchNorm counters and biases and train from scratch unnoticed.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn


class PretrainedLoadError(RuntimeError):
    """A pretrained source could not be read or does not fit the model."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with each key."""

    source: str
    loaded: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)  # shape changed on purpose (input channels, adapt=)
    reshaped: list[str] = field(default_factory=list)  # shape mismatch: kept the fresh init
    missing: list[str] = field(default_factory=list)  # in the model, not in the source
    unexpected: list[str] = field(default_factory=list)  # in the source, not in the model
    excluded: list[str] = field(default_factory=list)  # matched, but left out on request (exclude=)
    #: parameter elements filled from the source (loaded or adapted) and the model's total that counts
    #: (all parameters but those excluded or declared new)
    loaded_params: int = 0
    counted_params: int = 0

    @property
    def clean(self) -> bool:
        return not (self.reshaped or self.missing or self.unexpected)

    @property
    def loaded_share(self) -> float:
        """Fraction of the model's counted parameters that came from the source."""
        return self.loaded_params / self.counted_params if self.counted_params else 0.0

    def __str__(self) -> str:
        lines = [
            f"load_pretrained({self.source}): {len(self.loaded)} tensors loaded, "
            f"{100 * self.loaded_share:.1f} % of the model's parameters ({self.loaded_params:,} of {self.counted_params:,}; "
            "excluded and new ones not counted)"
        ]
        for label, keys in (
            ("adapted to a new shape (input channels, or as noted)", self.adapted),
            ("skipped, shape differs (kept fresh init)", self.reshaped),
            ("missing from source (kept fresh init)", self.missing),
            ("unexpected in source (ignored)", self.unexpected),
            ("excluded on request (kept fresh init)", self.excluded),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {len(keys)} {label}: {shown}")
        return "\n".join(lines)


def is_torchvision_weight_name(source: str) -> bool:
    """True for names like ``IMAGENET1K_V1``, ``DEFAULT`` or ``ResNet18_Weights.IMAGENET1K_V1``."""
    tail = source.rsplit(".", 1)[-1]
    return Path(source).suffix.lower() not in {".ckpt", ".pt", ".pth", ".bin"} and (
        tail == "DEFAULT" or (tail.isupper() and "_" in tail and "/" not in source)
    )


def load_checkpoint_file(path: Path, role: str = "") -> object:
    """``torch.load(path, weights_only=True)`` of an existing file, every failure a :class:`PretrainedLoadError`
    naming the file (and its ``role``, e.g. ``"The generator (--model.generator)"``) and the fix."""
    name = f"{role} {str(path)!r}" if role else repr(str(path))
    with path.open("rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04") and not zipfile.is_zipfile(path):
        # a zip archive's directory sits at its end: a torch.save file cut short lost it
        raise PretrainedLoadError(
            f"{name} is truncated or corrupt: it starts as a torch.save zip archive but its end is missing "
            f"({path.stat().st_size} bytes), e.g. a copy or download that stopped part way. "
            "Copy or download it again, or re-create it."
        )
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise PretrainedLoadError(
            f"{name} is not a readable PyTorch checkpoint (neither a torch.save zip archive nor a pickle). "
            "Point to a .ckpt written by lit-finetune or a file written by torch.save."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PretrainedLoadError(
            f"Refused to load {name}: torch.load(weights_only=True) rejected it ({_first_line(err)}). "
            "Files that "
            "need arbitrary code to unpickle are never loaded; re-save the weights with "
            "torch.save(model.state_dict(), path) from a trusted environment."
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise PretrainedLoadError(
            f"{name} is not a readable PyTorch checkpoint ({type(err).__name__}: {err}). "
            "The file may be truncated or of another format; re-create it or point to another file."
        ) from err


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from a Lightning checkpoint or a plain state dict, with ``weights_only=True``.

    ``weights_only=True`` refuses pickles that would run code on load; such files, non-checkpoints
    and truncated files all raise :class:`PretrainedLoadError` naming the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise PretrainedLoadError(
            f"Pretrained file {str(path)!r} does not exist. Pass the path of a .ckpt written by lit-finetune "
            "(e.g. <run dir>/checkpoints/last.ckpt), a state-dict .pt file, or a torchvision weight name "
            "such as IMAGENET1K_V1."
        )
    obj = load_checkpoint_file(path)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedLoadError(
            f"{str(path)!r} holds no state dict (found {type(obj).__name__}). Expected a Lightning checkpoint or "
            "a mapping of parameter names to tensors."
        )
    return dict(obj)


def torchvision_state_dict(arch: str, weight_name: str) -> dict[str, torch.Tensor]:
    """Fetch torchvision weights (``IMAGENET1K_V1``) for ``arch``; a clear error when offline."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as err:
        raise PretrainedLoadError(f"torchvision has no weights for backbone {arch!r}.") from err
    tail = weight_name.rsplit(".", 1)[-1]
    try:
        weights = enum[tail] if tail != "DEFAULT" else enum.DEFAULT
    except KeyError as err:
        names = ", ".join(w.name for w in enum)
        raise PretrainedLoadError(f"{weight_name!r} is not a weight of {arch}; choose one of {names}.") from err
    # Not ``weights.get_state_dict()``: it reaches torch.hub with weights_only=False, so a file planted
    # in $TORCH_HOME/hub/checkpoints under the expected name would run code on load.
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as err:
        raise PretrainedLoadError(
            f"Refused to load the cached torchvision weights for {enum.__name__}.{weights.name}: "
            f"torch.load(weights_only=True) rejected the file in {torch.hub.get_dir()}/checkpoints "
            f"({_first_line(err)}). "
            "Delete it and download the weights again from a trusted source."
        ) from err
    except Exception as err:  # urllib/http errors differ by platform; all mean "could not fetch"
        raise PretrainedLoadError(
            f"Could not download torchvision weights {enum.__name__}.{weights.name} from {weights.url} ({err}). "
            "Without a network, copy that file into $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/"
            "checkpoints/) on this machine, or pass a local checkpoint path instead."
        ) from err


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(err).__name__)


def _map_key(key: str, key_map: Mapping[str, str], target: Mapping[str, torch.Tensor]) -> str | None:
    """Map a source key to a target key: as is, else through the longest matching prefix rule."""
    if key in target:
        return key
    for src_prefix in sorted(key_map, key=len, reverse=True):
        if key.startswith(src_prefix):
            mapped = key_map[src_prefix] + key[len(src_prefix) :]
            if mapped in target:
                return mapped
    return None


def _adapt_input_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fit a conv weight to another input channel count (timm's ``adapt_input_conv`` rule)."""
    out_c, src_c, kh, kw = weight.shape
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // src_c)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (src_c / in_channels)


def input_conv_keys(model: nn.Module) -> set[str]:
    """State-dict prefixes of the model's input convolutions: every submodule's ``input_convs``
    (names relative to it), e.g. ``{"backbone.conv1.", "discriminator.blocks.0.conv."}``."""
    keys = set()
    for name, module in model.named_modules():
        for conv in getattr(module, "input_convs", ()):
            keys.add(f"{name}.{conv}." if name else f"{conv}.")
    return keys


def _is_input_conv_change(key: str, value: torch.Tensor, want: torch.Tensor, input_convs: set[str]) -> bool:
    """A 4-D weight of a declared input conv that differs in its input channels only."""
    return (
        any(key.startswith(prefix) for prefix in input_convs)
        and value.ndim == want.ndim == 4
        and value.shape[0] == want.shape[0]
        and value.shape[2:] == want.shape[2:]
    )


def _matches(key: str, prefixes: Sequence[str]) -> bool:
    return any(key.startswith(prefix) for prefix in prefixes)


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    key_map: Mapping[str, str] | None = None,
    arch: str | None = None,
    strict: bool = False,
    exclude: Sequence[str] = (),
    adapt: Mapping[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]]] | None = None,
    skip_mismatched: Sequence[str] = (),
    new: Sequence[str] = (),
    min_loaded_share: float = 0.5,
    label: str | None = None,
) -> LoadReport:
    """Load what fits from ``source`` into ``model`` and report every key.

    Args:
        model: the module to fill.
        source: a path (Lightning ``.ckpt`` or state dict), a state dict, or a torchvision
            weight name (``IMAGENET1K_V1``, ``DEFAULT``; needs ``arch``).
        key_map: source-prefix to target-prefix rules tried when a key is not found as is,
            e.g. ``{"": "backbone.", "fc.": "head."}`` for torchvision ResNet weights.
        arch: torchvision architecture name for weight names (``"resnet18"``).
        strict: raise instead of reporting when anything is skipped, missing or unexpected.
        exclude: target-key prefixes never loaded (e.g. ``["head."]`` for a new task's head).
        adapt: for target keys whose shape differs from the source's on purpose: ``key -> (what,
            fn)``, ``fn(source_tensor, target_tensor)`` returning the tensor to load (the target's
            shape), or ``None`` to fall back to the rules below. Reported as adapted, ``"<key> (<what>)"``.
        skip_mismatched: target-key prefixes that keep their fresh initialisation when their shape
            differs (reported as skipped); any other shape difference outside the input
            convolutions raises :class:`PretrainedLoadError`.
        new: target-key prefixes the model has on purpose and the source cannot have (a label
            embedding a conditional model adds): not counted in the loaded share.
        min_loaded_share: raise when less than this fraction of the counted parameters loads.
        label: how the report names the source (default: the path or weight name).
    """
    if isinstance(source, Mapping):
        state, default_label = dict(source), "<state dict>"
    elif is_torchvision_weight_name(str(source)):
        if arch is None:
            raise PretrainedLoadError(f"Weight name {source!r} needs a torchvision architecture (arch=...).")
        state, default_label = torchvision_state_dict(arch, str(source)), f"{arch}:{source}"
    else:
        state, default_label = read_state_dict(source), str(source)
    label = label or default_label

    target = model.state_dict()
    input_convs = input_conv_keys(model)
    report = LoadReport(source=label)
    merged: dict[str, torch.Tensor] = {}
    mismatched: set[str] = set()
    refused: list[str] = []
    for key, value in state.items():
        mapped = _map_key(key, key_map or {}, target)
        if mapped is None:
            report.unexpected.append(key)
            continue
        if _matches(mapped, exclude):
            report.excluded.append(mapped)
            continue
        want = target[mapped]
        adapter = (adapt or {}).get(mapped)
        adapted = adapter[1](value, want) if adapter is not None and value.shape != want.shape else None
        if value.shape == want.shape:
            merged[mapped] = value
            report.loaded.append(mapped)
        elif adapted is not None:
            merged[mapped] = adapted
            report.adapted.append(f"{mapped} ({adapter[0]})")
        elif _is_input_conv_change(mapped, value, want, input_convs):
            merged[mapped] = _adapt_input_conv(value, want.shape[1])
            report.adapted.append(mapped)
        else:
            report.reshaped.append(f"{mapped} {tuple(value.shape)}->{tuple(want.shape)}")
            mismatched.add(mapped)
            if not _matches(mapped, skip_mismatched):
                refused.append(report.reshaped[-1])
    report.missing = [
        k
        for k in target
        if k not in merged and k not in mismatched and not k.endswith("num_batches_tracked") and not _matches(k, exclude)
    ]
    if refused:
        shown = "\n  ".join(refused[:12]) + (f"\n  ... (+{len(refused) - 12})" if len(refused) > 12 else "")
        raise PretrainedLoadError(
            f"{label} does not fit the model: {len(refused)} tensor(s) have another shape (source -> model):\n  {shown}\n"
            "Build the model with the source's sizes (e.g. latent_dim, widths, num_classes), or, to train those "
            "tensors from their fresh initialisation, list them in skip_mismatched (a new head: exclude it)."
        )
    params = dict(model.named_parameters())
    counted = [k for k in params if not _matches(k, exclude) and not _matches(k, new)]
    filled = set(merged)
    report.counted_params = sum(params[k].numel() for k in counted)
    report.loaded_params = sum(params[k].numel() for k in counted if k in filled)
    if strict and not report.clean:
        raise PretrainedLoadError(f"strict load failed:\n{report}")
    if not report.loaded and not report.adapted:
        raise PretrainedLoadError(
            f"Nothing in {label} matches the model's keys; wrong file, or a key_map is needed.\n{report}"
        )
    if report.loaded_share < min_loaded_share:
        raise PretrainedLoadError(
            f"Only {100 * report.loaded_share:.2f} % of the model's parameters load from {label} "
            f"(below min_loaded_share={min_loaded_share}): it is not a source of this model (another module, or "
            f"other sizes). Point to a checkpoint of the same architecture.\n{report}"
        )
    model.load_state_dict({**target, **merged}, strict=True)
    rank_zero_info(str(report))  # shown by the CLI; rank 0 only under DDP
    return report
