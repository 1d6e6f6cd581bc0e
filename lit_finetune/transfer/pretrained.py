"""Load pretrained weights from any source, loudly.

``load_pretrained`` accepts a Lightning checkpoint written by this package, a plain state dict
file, or a torchvision weight name. It loads every tensor that fits, adapts an input conv whose
channel count differs, keeps the fresh initialisation for everything else, and returns a
:class:`LoadReport` naming each key it loaded, adapted, skipped, or could not find. Nothing is
dropped silently (the ``strict=False`` trap of older libraries).
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

from lit_finetune.zoo import resolve_source


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

    @property
    def clean(self) -> bool:
        return not (self.reshaped or self.missing or self.unexpected)

    def __str__(self) -> str:
        lines = [f"load_pretrained({self.source}): {len(self.loaded)} tensors loaded"]
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
        head = f.read(2)
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
    path = Path(resolve_source(path, role="pretrained"))
    if not path.is_file():
        raise PretrainedLoadError(
            f"Pretrained file {str(path)!r} does not exist. Pass the path of a .ckpt written by lit-finetune "
            "(e.g. <run dir>/checkpoints/last.ckpt), a state-dict .pt file, a torchvision weight name "
            "such as IMAGENET1K_V1, or a zoo name such as zoo:fashion-mnist-0-4/classifier (lit-finetune-zoo list)."
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


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    key_map: Mapping[str, str] | None = None,
    arch: str | None = None,
    strict: bool = False,
    exclude: Sequence[str] = (),
    adapt: Mapping[str, tuple[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None]]] | None = None,
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
            shape), or ``None`` to keep the fresh init. Reported as adapted, ``"<key> (<what>)"``.
    """
    if isinstance(source, Mapping):
        state, label = dict(source), "<state dict>"
    elif is_torchvision_weight_name(str(source)):
        if arch is None:
            raise PretrainedLoadError(f"Weight name {source!r} needs a torchvision architecture (arch=...).")
        state, label = torchvision_state_dict(arch, str(source)), f"{arch}:{source}"
    else:
        state, label = read_state_dict(source), str(source)

    target = model.state_dict()
    report = LoadReport(source=label)
    merged: dict[str, torch.Tensor] = {}
    mismatched: set[str] = set()
    for key, value in state.items():
        mapped = _map_key(key, key_map or {}, target)
        if mapped is None:
            report.unexpected.append(key)
            continue
        if any(mapped.startswith(prefix) for prefix in exclude):
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
        elif (
            value.ndim == 4 and want.ndim == 4 and value.shape[0] == want.shape[0] and value.shape[2:] == want.shape[2:]
        ):
            merged[mapped] = _adapt_input_conv(value, want.shape[1])
            report.adapted.append(mapped)
        else:
            report.reshaped.append(f"{mapped} {tuple(value.shape)}->{tuple(want.shape)}")
            mismatched.add(mapped)
    report.missing = [
        k
        for k in target
        if k not in merged
        and k not in mismatched
        and not k.endswith("num_batches_tracked")
        and not any(k.startswith(p) for p in exclude)
    ]
    if strict and not report.clean:
        raise PretrainedLoadError(f"strict load failed:\n{report}")
    if not report.loaded and not report.adapted:
        raise PretrainedLoadError(
            f"Nothing in {label} matches the model's keys; wrong file, or a key_map is needed.\n{report}"
        )
    model.load_state_dict({**target, **merged}, strict=True)
    rank_zero_info(str(report))  # shown by the CLI; rank 0 only under DDP
    return report
