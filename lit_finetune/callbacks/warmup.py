"""Linear learning-rate warm-up that composes with any scheduler and with unfreezing."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_finetune.transfer.lr_factors import install_lr_factor_hooks, set_lr_factor


class LRWarmup(Callback):
    """Scale each parameter group's LR linearly from ``start_factor`` to 1 over ``warmup_steps``.

    The factor multiplies whatever the module's scheduler set, only while the optimizer steps
    (:mod:`lit_finetune.transfer.lr_factors`), so cosine, step or plateau schedulers keep their
    own arithmetic. Each group's warm-up starts at the first step in which it trains: a group
    still frozen by :class:`~lit_finetune.callbacks.LayerFreezing` (or added later by another
    callback) is warmed up from the step it joins. Steps are training batches.

    Args:
        warmup_steps: length of the ramp in batches; 0 disables warm-up.
        start_factor: LR factor on a group's first step.
    """

    def __init__(self, warmup_steps: int = 100, start_factor: float = 0.01) -> None:
        if warmup_steps < 0 or not 0 <= start_factor <= 1:
            raise ValueError("LRWarmup needs warmup_steps >= 0 and 0 <= start_factor <= 1")
        self.warmup_steps = warmup_steps
        self.start_factor = start_factor

    def factor(self, steps_trained: int) -> float:
        """LR factor for a group on its ``steps_trained``-th step (0-based)."""
        if self.warmup_steps == 0 or steps_trained >= self.warmup_steps:
            return 1.0
        return self.start_factor + (1.0 - self.start_factor) * steps_trained / self.warmup_steps

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            install_lr_factor_hooks(optimizer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step // max(1, len(trainer.optimizers))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if group.get("frozen", False):
                    continue
                start = group.setdefault("warmup_start_step", step)
                set_lr_factor(group, "warmup", self.factor(step - start))
