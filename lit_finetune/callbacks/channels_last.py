"""Train and evaluate in ``torch.channels_last`` (NHWC) memory format.

Lightning has no built-in switch for this (neither a Trainer flag nor a callback; its docs leave
``model.to(memory_format=torch.channels_last)`` to the user), so this callback does it. NHWC lets
cuDNN use tensor-core convolution kernels under bf16/fp16 mixed precision, and oneDNN's NHWC
convolutions are often faster on CPUs too.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.hooks import RemovableHandle


def to_channels_last(value: Any) -> Any:
    """A 4-D floating-point tensor in channels_last; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.ndim == 4 and value.is_floating_point():
        return value.contiguous(memory_format=torch.channels_last)
    return value


class ChannelsLast(Callback):
    """Put the LightningModule's 4-D weights and its 4-D image inputs in channels_last.

    The module is converted in ``setup`` (before the strategy moves it to the device and wraps it,
    e.g. in DDP, which fixes gradient layouts at wrap time) and again at the start of every
    fit / validate / test / predict, which is a no-op for parameters already converted and catches
    any that the module's own ``setup`` or ``configure_model`` built or replaced afterwards.

    Batches: a callback cannot replace the batch that Lightning hands to ``training_step``
    (``on_train_batch_start`` receives it, but its return value is ignored and a tuple cannot be
    changed in place), and ``on_after_batch_transfer`` is a LightningModule hook, not a callback
    hook. So the callback registers a forward pre-hook on the LightningModule that converts every
    4-D floating-point tensor argument of ``forward`` (``self(x)`` in the steps). Convolutions
    with channels_last weights produce channels_last outputs, so the format holds through the net.
    The hook is removed at ``teardown``; the weights stay channels_last (checkpoints keep their
    values, and loading them into a contiguous model works as usual).
    """

    def __init__(self) -> None:
        self._handle: RemovableHandle | None = None

    @staticmethod
    def _convert_inputs(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return tuple(to_channels_last(a) for a in args), {k: to_channels_last(v) for k, v in kwargs.items()}

    def _apply(self, pl_module: L.LightningModule) -> None:
        pl_module.to(memory_format=torch.channels_last)
        if self._handle is None:
            self._handle = pl_module.register_forward_pre_hook(self._convert_inputs, with_kwargs=True)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._apply(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(pl_module)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
