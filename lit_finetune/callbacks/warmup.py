"""Linear learning-rate warm-up that composes with any scheduler and with unfreezing."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from lit_finetune.transfer.lr_factors import add_lr_factor_fn


class LRWarmup(Callback):
    """Scale each parameter group's LR linearly from ``start_factor`` to 1 over ``warmup_steps``.

    The factor multiplies whatever the module's scheduler set, only while the optimizer steps
    (:mod:`lit_finetune.transfer.lr_factors`), so cosine, step or plateau schedulers keep their
    own arithmetic. Steps are counted per parameter group, as the optimizer steps that updated
    it (``group["steps_trained"]``): each optimizer has its own clock (a GAN's D may step several
    times per G step), and a group frozen by :class:`~lit_finetune.callbacks.LayerFreezing` (or
    added later by another callback) is warmed up from the step it starts training. The count
    is part of the optimizer's state, so a resumed run continues the ramp where it stopped.

    Args:
        warmup_steps: length of the ramp in optimizer steps of a group; 0 disables warm-up.
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

    def group_factor(self, group: dict[str, Any]) -> float:
        """Factor for a parameter group's next step."""
        return self.factor(group.get("steps_trained", 0))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            add_lr_factor_fn(optimizer, "warmup", self.group_factor)
