"""Load pretrained weights from any source, loudly.

``load_pretrained`` accepts a Lightning checkpoint written by this package, a plain state dict
file, or a torchvision weight name. It loads every tensor that fits, adapts the input convolutions
a net declares (``input_convs``) to another image channel count, and returns a :class:`LoadReport`
naming each key it loaded, adapted, skipped, or could not find, and the share of the model's
parameters that came from the source. Any other shape change is an error (unless the caller
asks to skip it), and so is a source that fills less than ``min_loaded_share`` of the model:
nothing is dropped silently (the ``strict=False`` trap of older libraries).
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.utils import parametrize


#: the least share of the model's parameters (those not declared new) a source must fill
MIN_LOADED_SHARE = 0.5

#: an ``adapt=`` entry: ``(what, fn)``, ``fn(source_tensor, target_tensor)`` -> the tensor to load, or ``None``
Adapter = tuple[str, Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]]

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
    loaded_params: int = 0  # parameter elements loaded or adapted from the source
    total_params: int = 0  # the model's parameter elements, less those excluded (declared new)

    @property
    def clean(self) -> bool:
        return not (self.reshaped or self.missing or self.unexpected)

    @property
    def loaded_share(self) -> float:
        """Share of the model's parameters (not buffers; excluded keys left out) filled from the source."""
        return self.loaded_params / self.total_params if self.total_params else 0.0

    @property
    def filled(self) -> set[str]:
        """The model's keys this load filled from the source: loaded or adapted (those read "<key> (<how>)")."""
        return {*self.loaded, *(entry.split(" ", 1)[0] for entry in self.adapted)}

    def parameters_from_source(self, model: nn.Module) -> list[nn.Parameter]:
        """``model``'s parameters that this load filled, e.g. what L2-SP may pull back."""
        filled = self.filled
        return [p for name, p in model.named_parameters() if name in filled]

    def __str__(self) -> str:
        lines = [
            f"load_pretrained({self.source}): {len(self.loaded)} tensors loaded, {len(self.adapted)} adapted; "
            f"{100 * self.loaded_share:.3g}% of the model's parameters "
            f"({self.loaded_params:,} of {self.total_params:,}{', excluded keys not counted' if self.excluded else ''})"
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


@dataclass(frozen=True)
class InputConvKey:
    """A state-dict tensor of a declared input convolution, and where its input channels lie."""

    key: str
    dim: int  # the input-channel dimension: 1 for a conv weight, 0 for spectral norm's vector ``_v``
    per_channel: int  # entries per input channel along ``dim``: 1 for a weight, the kernel's area for ``_v``


def input_conv_keys(model: nn.Module) -> list[InputConvKey]:
    """The tensors of the input convolutions the model's nets declare.

    A net lists the ``Conv2d`` layers that read its input images, by name relative to itself, in an
    ``input_convs`` attribute (e.g. ``("conv1",)``); only these may be adapted to another image
    channel count. A spectrally normalised conv holds its weight as
    ``<name>.parametrizations.weight.original`` and the power iteration's right singular vector
    ``<name>.parametrizations.weight.0._v`` (one entry per input channel and kernel position).
    """
    entries = []
    for prefix, module in model.named_modules():
        for name in getattr(module, "input_convs", ()):
            path, conv = f"{prefix}.{name}" if prefix else name, module.get_submodule(name)
            if not parametrize.is_parametrized(conv, "weight"):
                entries.append(InputConvKey(f"{path}.weight", 1, 1))
                continue
            entries.append(InputConvKey(f"{path}.parametrizations.weight.original", 1, 1))
            if hasattr(conv.parametrizations.weight[0], "_v"):
                area = conv.kernel_size[0] * conv.kernel_size[1]
                entries.append(InputConvKey(f"{path}.parametrizations.weight.0._v", 0, area))
    return entries


def _input_channel_rule(source: torch.Tensor, target: torch.Tensor, entry: InputConvKey) -> torch.Tensor | None:
    """The :func:`_adapt_input_conv` rule where only the input channels differ (a weight's out-channels and
    kernel must match); spectral norm's ``_v`` gets the same rule per kernel position, then unit length."""
    if entry.dim == 0:
        if source.ndim != 1 or source.numel() % entry.per_channel or target.numel() % entry.per_channel:
            return None
        vector = _adapt_input_conv(source.view(1, -1, entry.per_channel, 1), target.numel() // entry.per_channel)
        return F.normalize(vector.flatten(), dim=0)
    if source.ndim == target.ndim == 4 and source.shape[0] == target.shape[0] and source.shape[2:] == target.shape[2:]:
        return _adapt_input_conv(source, target.shape[1])
    return None


def _skipped(key: str, skip: bool | Iterable[str]) -> bool:
    return skip if isinstance(skip, bool) else any(key.startswith(prefix) for prefix in skip)


def load_pretrained(
    model: nn.Module,
    source: str | Path | Mapping[str, torch.Tensor],
    key_map: Mapping[str, str] | None = None,
    arch: str | None = None,
    strict: bool = False,
    exclude: Sequence[str] = (),
    adapt: Mapping[str, Adapter] | None = None,
    skip_mismatched: bool | Sequence[str] = False,
    min_loaded_share: float = MIN_LOADED_SHARE,
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
        exclude: target-key prefixes never loaded (e.g. ``["head."]`` for a new task's head); their
            parameters count as new, not in the loaded share.
        adapt: for target keys whose shape differs from the source's on purpose: ``key -> (what,
            fn)``, ``fn(source_tensor, target_tensor)`` returning the tensor to load (the target's
            shape), or ``None`` when it cannot. Reported as adapted, ``"<key> (<what>)"``. The
            input convolutions the model's nets declare (:func:`input_conv_keys`) get the
            input-channel rule unless ``adapt`` names them.
        skip_mismatched: target-key prefixes (or ``True``: all) whose shape mismatches are reported
            as skipped and keep the fresh init; any other mismatch raises :class:`PretrainedLoadError`.
        min_loaded_share: raise when less than this share of the model's parameters (excluded keys
            not counted) is loaded or adapted: a source of other sizes would otherwise load almost nothing.
        label: how the report and errors name a state-dict ``source`` (e.g. the file it was read from).
    """
    if isinstance(source, Mapping):
        state, label = dict(source), label or "<state dict>"
    elif is_torchvision_weight_name(str(source)):
        if arch is None:
            raise PretrainedLoadError(f"Weight name {source!r} needs a torchvision architecture (arch=...).")
        state, label = torchvision_state_dict(arch, str(source)), f"{arch}:{source}"
    else:
        state, label = read_state_dict(source), str(source)

    target = model.state_dict()
    report = LoadReport(source=label)
    inputs = {e.key: ("input channels", partial(_input_channel_rule, entry=e)) for e in input_conv_keys(model)}
    adapt = {**inputs, **(adapt or {})}
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
        adapter = adapt.get(mapped)
        adapted = adapter[1](value, want) if adapter is not None and value.shape != want.shape else None
        if value.shape == want.shape:
            merged[mapped] = value
            report.loaded.append(mapped)
        elif adapted is not None:
            merged[mapped] = adapted
            report.adapted.append(f"{mapped} ({adapter[0]})")
        else:
            report.reshaped.append(f"{mapped} {tuple(value.shape)}->{tuple(want.shape)}")
            mismatched.add(mapped)
    refused = [entry for entry in report.reshaped if not _skipped(entry, skip_mismatched)]
    if refused:
        shown = "\n  ".join(refused[:10]) + (f"\n  ... (+{len(refused) - 10})" if len(refused) > 10 else "")
        raise PretrainedLoadError(
            f"{label} does not fit the model: {len(refused)} tensor(s) differ in shape (source->model):\n  {shown}\n"
            f"Only the declared input convolutions (another image channel count) and the layers the module adapts "
            f"on purpose may change shape here: {', '.join(k for k in adapt if k in target) or 'none'}. Build the "
            "model with the source's sizes (widths, latent_dim, channels, classes), or load the rest and keep "
            "these fresh with load_pretrained(..., skip_mismatched=[<key prefixes>])."
        )
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
    filled = report.filled
    counted = {k: p.numel() for k, p in model.named_parameters() if not any(k.startswith(e) for e in exclude)}
    report.total_params = sum(counted.values())
    report.loaded_params = sum(n for k, n in counted.items() if k in filled)
    if not report.loaded and not report.adapted:
        raise PretrainedLoadError(
            f"Nothing in {label} matches the model's keys; wrong file, or a key_map is needed.\n{report}"
        )
    if report.loaded_share < min_loaded_share:
        raise PretrainedLoadError(
            f"Only {100 * report.loaded_share:.3g}% of the model's parameters would come from {label} (at least "
            f"{min_loaded_share:.0%} needed): the source is another network or has other sizes. Use a source "
            f"built like the model, or train from scratch (pretrained=None).\n{report}"
        )
    model.load_state_dict({**target, **merged}, strict=True)
    rank_zero_info(str(report))  # shown by the CLI; rank 0 only under DDP
    return report
