"""Post-training static int8 quantisation of a fine-tuned classifier, for CPU inference.

Why ``torch.ao.quantization`` FX graph mode (``prepare_fx`` / ``convert_fx``), although torch marks it
deprecated in favour of torchao's pt2e flow: with torch 2.14.1 (the newest this package allows) the
maintained path does not work offline here. torchao 0.18.0 installs from the package index and loads
with torch 2.14.1, but its ``X86InductorQuantizer`` fails while annotating a stock torchvision ResNet-18
exported by this torch ("Input partition has more than one output node"), and a pt2e model runs on
int8 kernels only after ``torch.compile`` lowering (a C++ toolchain and minutes of compiling on a small
CPU). FX mode traces a torchvision-layout ResNet as it is, fuses conv + BatchNorm + ReLU, and its
converted model runs fbgemm / oneDNN int8 kernels in eager mode. The deprecation warnings are
silenced where this module calls it; when torch removes the API, :func:`quantize_int8` is the one
place to change.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from lit_finetune.compress.pruning import has_pruning_masks, remove_pruning
from lit_finetune.nets.resnet import ResNetClassifierNet
from lit_finetune.transfer.peft import merge_into_state

#: int8 backends torch's quantised kernels know; which of them this build has: ``torch.backends.quantized.supported_engines``
QUANT_BACKENDS = ("x86", "fbgemm", "onednn", "qnnpack")


class QuantizationError(RuntimeError):
    """Quantisation cannot run as asked (unsupported backend, no calibration data, a model it cannot trace)."""


def classifier_network(model: nn.Module) -> nn.Module:
    """A plain, CPU, eval-mode copy of a classifier for inference, compression and export.

    An :class:`~lit_finetune.ImageClassifier` becomes a :class:`~lit_finetune.nets.ResNetClassifierNet`
    (input normalisation, backbone, head: the same weights, PEFT updates merged in, no metrics, no L2-SP anchor,
    no input checks with Python control flow, so FX and ``torch.export`` trace it); any other ``nn.Module`` is
    copied.
    Pruning masks are made permanent in the copy. The module's ``num_classes``, ``in_channels``,
    ``image_size`` and ``class_names`` are kept as attributes (what an exported file records).
    """
    from lit_finetune.modules.classifier import ImageClassifier

    if isinstance(model, ImageClassifier):
        hp = model.hparams
        net = ResNetClassifierNet(
            hp.num_classes, hp.backbone, hp.in_channels, hp.image_size, small_input=model.small_input
        )
        # PEFT updates (adapters, LoRA) live outside the backbone's weights until merged: fold them in, or the
        # copy would compute the source backbone with the new head
        state, _ = merge_into_state(remove_pruning(copy.deepcopy(model)).state_dict())
        net.load_state_dict({k: v for k, v in state.items() if k in net.state_dict()})
        net.class_names = list(model.class_names)
    else:
        net = copy.deepcopy(model)
        if has_pruning_masks(net):
            remove_pruning(net)
    head = getattr(net, "head", None)
    if not hasattr(net, "num_classes") and isinstance(head, nn.Linear):
        net.num_classes = head.out_features
    return net.cpu().eval()


@contextlib.contextmanager
def int8_kernels_allowed() -> Iterator[None]:
    """Run torch.ao's int8 CPU kernels under ``torch.use_deterministic_algorithms(True)`` (e.g. a
    ``Trainer(deterministic=True)``): their output allocation (``quantized_resize_cpu_``) has no
    "deterministic" flag and is refused there, although the kernels give the same result on every run.
    The setting is turned off inside the block only, and restored after it."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled:
        torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=warn_only)


def _images(batch: Any) -> torch.Tensor:
    """The image tensor of a batch: a tensor, or the first item of an ``(images, labels, ...)`` sequence."""
    x = batch[0] if isinstance(batch, (list, tuple)) else batch
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise QuantizationError(f"Calibration batches must be images (B, C, H, W) or (images, labels); got {got}.")
    return x.float().cpu()


def check_backend(backend: str) -> str:
    """``backend`` if this torch build has int8 kernels for it, else a :class:`QuantizationError` with the choices."""
    supported = [name for name in torch.backends.quantized.supported_engines if name != "none"]
    if backend not in supported:
        raise QuantizationError(
            f"Quantisation backend {backend!r} is not available in this torch build (it has {supported}). "
            "Use 'x86' (or 'fbgemm') on Intel/AMD CPUs and 'qnnpack' on ARM."
        )
    return backend


@torch.no_grad()
def quantize_int8(
    model: nn.Module,
    calib_loader: Iterable[Any],
    backend: str = "x86",
    num_batches: int | None = None,
) -> Int8Classifier:
    """Static int8 quantisation (per-channel int8 weights, uint8 activations) with calibration.

    Args:
        model: an :class:`~lit_finetune.ImageClassifier` or a plain classifier network; left unchanged
            (a CPU copy is quantised, pruning masks made permanent).
        calib_loader: batches of ``[-1, 1]`` images, ``(images, labels)`` or tensors, e.g. a training
            ``DataLoader`` (a few hundred images are enough to set the activation ranges; prefer them
            unaugmented). They run through the model once, in eval mode.
        backend: ``"x86"`` (default; Intel/AMD), ``"fbgemm"``, ``"onednn"`` or ``"qnnpack"`` (ARM). It
            becomes ``torch.backends.quantized.engine`` (process-wide): the int8 kernels need it at
            inference too (:func:`~lit_finetune.compress.load_exported` sets it from the file).
        num_batches: calibrate on at most this many batches (``None``: all).

    Returns:
        An :class:`Int8Classifier` (CPU) taking the same ``[-1, 1]`` float images and returning float logits,
        with ``num_classes``, ``in_channels``, ``image_size``, ``class_names`` and ``quant_backend`` kept.

    Raises:
        QuantizationError: the backend is not in this torch build, the loader gives no batch or no image
            batch, or the model cannot be traced.
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = check_backend(backend)
    net = classifier_network(model)
    batches = iter(calib_loader)
    first = next(batches, None)
    if first is None:
        raise QuantizationError("quantize_int8 needs at least one calibration batch; calib_loader gave none.")
    example = _images(first)
    kept = [name for name in ("num_classes", "in_channels", "image_size", "class_names") if hasattr(net, name)]
    with warnings.catch_warnings(), int8_kernels_allowed():
        # deliberate use of the deprecated FX API: see the module docstring
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        try:
            prepared = prepare_fx(net, get_default_qconfig_mapping(backend), (example[:1],))
        except torch.fx.proxy.TraceError as err:
            raise QuantizationError(
                f"FX cannot trace {type(net).__name__} ({err}). Pass an ImageClassifier or a network without "
                "data-dependent Python control flow in forward."
            ) from err
        prepared(example)
        for i, batch in enumerate(batches, start=1):
            if num_batches is not None and i >= num_batches:
                break
            prepared(_images(batch))
        quantized = convert_fx(prepared)
    return Int8Classifier(quantized, backend, **{name: getattr(net, name) for name in kept})


class Int8Classifier(nn.Module):
    """What :func:`quantize_int8` returns: the converted int8 graph (``graph``, a CPU ``GraphModule``) run
    under :func:`int8_kernels_allowed`, with the float model's ``num_classes``, ``in_channels``,
    ``image_size``, ``class_names`` and the ``quant_backend`` it was converted for."""

    def __init__(self, graph: torch.fx.GraphModule, quant_backend: str, **attributes: Any) -> None:
        super().__init__()
        self.graph, self.quant_backend = graph, quant_backend
        for name, value in attributes.items():
            setattr(self, name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with int8_kernels_allowed():
            return self.graph(x)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds int8 (``torch.ao.nn.quantized``) layers."""
    return any(type(layer).__module__.startswith("torch.ao.nn.quantized") for layer in model.modules())
