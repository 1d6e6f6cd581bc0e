"""What every LightningModule of the package shares: optimizers over named groups, data checks."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from lit_finetune.transfer.lr_factors import install_lr_factor_hooks
from lit_finetune.transfer.param_groups import apply_lr_scale, check_groups_cover


class TransferModule(L.LightningModule):
    """Base class: builds the optimizer and scheduler from config over :meth:`param_groups`.

    Subclasses define what they optimise (``training_step``) and how their parameters split
    into named groups (:meth:`param_groups`). The optimizer is an ``OptimizerCallable`` (a class
    or ``functools.partial``) so LightningCLI configs set it without the CLI's automatic optimizer,
    which would cover frozen parameters with one group.

    Args:
        num_classes: classes in the data (linked from the datamodule by the CLI).
        in_channels: image channels (linked from the datamodule).
        image_size: image side in pixels (linked from the datamodule).
        optimizer: e.g. ``torch.optim.AdamW`` or ``functools.partial(torch.optim.SGD, lr=0.1)``.
        lr_scheduler: optional, e.g. ``functools.partial(CosineAnnealingLR, T_max=20)``.
        scheduler_interval: ``"epoch"`` or ``"step"``.
        scheduler_monitor: metric for ``ReduceLROnPlateau``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 28,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.image_size = image_size
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor

    # -- what subclasses provide ----------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Named parameter groups (``name``, ``params``, ``lr_scale``) covering every parameter."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        groups = self.param_groups()
        check_groups_cover(self, groups)
        optimizer = apply_lr_scale(self.optimizer_factory(groups))
        install_lr_factor_hooks(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval, "monitor": self.scheduler_monitor},
        }

    def check_input(self, x: torch.Tensor) -> None:
        """Fail early, with the fix, when a batch has another channel count than the model."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects images (B, {self.in_channels}, H, W) but got {tuple(x.shape)}. "
                f"Set the datamodule's channels={self.in_channels} or the model's in_channels={x.shape[1] if x.ndim == 4 else '?'}."
            )

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is None:
            return
        channels = getattr(dm, "channels", self.in_channels)
        if channels != self.in_channels:
            raise ValueError(
                f"Channel mismatch: {type(dm).__name__} yields {channels}-channel images, {type(self).__name__} "
                f"was built for in_channels={self.in_channels}. Set one to match the other "
                "(the CLI links them: pass --data.channels only)."
            )
        classes = getattr(dm, "num_classes", self.num_classes)
        if classes != self.num_classes:
            raise ValueError(
                f"num_classes mismatch: {type(dm).__name__} has {classes} classes, {type(self).__name__} was built "
                f"with num_classes={self.num_classes}. Build the model with num_classes={classes} "
                "(the CLI links it from the datamodule)."
            )
