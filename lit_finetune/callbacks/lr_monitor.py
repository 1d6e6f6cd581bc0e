"""Log the learning rate each optimizer step actually used, per named parameter group."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_finetune.log_steps import lightning_writes_step
from lit_finetune.transfer.lr_factors import install_lr_factor_hooks


class AppliedLRMonitor(Callback):
    """Log ``lr/<group name>``: the LR of the last optimizer step, 0 for a group that did not train.

    Lightning's ``LearningRateMonitor`` logs ``group["lr"]``, the scheduler's value: it misses
    the LR factors (warm-up, unfreeze scale, discriminative ratio) that apply only while the
    optimizer steps (:mod:`lit_finetune.transfer.lr_factors`), and shows a full LR for frozen
    groups. This monitor logs what the step used instead, recorded by the step wrapper as
    ``group["applied_lr"]``. It also works with ``logger=False`` (the values then only reach
    ``trainer.callback_metrics``), where ``LearningRateMonitor`` raises.

    A step that mixed precision's ``GradScaler`` skips (non-finite gradients) logs 0.

    Groups without a ``name`` are logged as ``lr/opt<i>/group<j>``.

    Args:
        prefix: key prefix.
    """

    def __init__(self, prefix: str = "lr") -> None:
        self.prefix = prefix

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            install_lr_factor_hooks(optimizer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        # the step wrapper writes the LR the step used; a step that does not run (mixed precision's
        # GradScaler skips one whose gradients are not finite) then leaves 0, not the previous step's LR
        for group in optimizer.param_groups:
            group["applied_lr"] = 0.0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # logging steps Lightning does not write costs time for nothing (a quarter of a tiny GAN step)
        if trainer.loggers and not lightning_writes_step(trainer):
            return
        values = {}
        for i, optimizer in enumerate(trainer.optimizers):
            for j, group in enumerate(optimizer.param_groups):
                if "applied_lr" in group:
                    values[f"{self.prefix}/{group.get('name') or f'opt{i}/group{j}'}"] = float(group["applied_lr"])
        if values:
            pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=1)
