"""Per-group LR factors applied only for the duration of ``optimizer.step()``.

Warm-up and unfreezing both need to scale a group's LR on top of whatever the module's
scheduler set. Writing the scaled value into ``group["lr"]`` breaks chainable schedulers
(they read the previous LR back), so instead an optimizer step pre-hook multiplies each
group's LR by the product of its ``lr_factors`` and a post-hook restores the scheduler's value.
This works for automatic and manual optimisation, AMP's GradScaler and plain PyTorch loops.
"""

from __future__ import annotations

import math
from typing import Any

from torch.optim import Optimizer

_HOOKED = "_lit_finetune_lr_factor_hooks"


def set_lr_factor(group: dict[str, Any], name: str, value: float) -> None:
    """Set factor ``name`` of a parameter group (1.0 removes its effect)."""
    group.setdefault("lr_factors", {})[name] = float(value)


def effective_lr(group: dict[str, Any]) -> float:
    """The LR the next step uses: scheduler LR times every factor."""
    return group["lr"] * math.prod(group.get("lr_factors", {}).values())


def _scale(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        group["unscaled_lr"] = group["lr"]
        group["lr"] = effective_lr(group)


def _restore(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        if "unscaled_lr" in group:
            group["lr"] = group.pop("unscaled_lr")


def install_lr_factor_hooks(optimizer: Optimizer) -> None:
    """Register the scale/restore hooks once per optimizer (idempotent)."""
    if getattr(optimizer, _HOOKED, False):
        return
    optimizer.register_step_pre_hook(_scale)
    optimizer.register_step_post_hook(_restore)
    setattr(optimizer, _HOOKED, True)
