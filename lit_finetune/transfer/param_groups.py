"""Named parameter groups: discriminative learning rates, one group per block.

Every module builds its optimizer from these groups, so that freezing, warm-up, schedulers and
``LearningRateMonitor`` all see the same named groups from the first step (groups added later
break schedulers, Lightning #8720). Each group carries ``lr_scale``; :func:`apply_lr_scale`
turns it into the group's LR once the optimizer exists (timm's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.optim import Optimizer


def block_groups(
    module: nn.Module,
    prefix: str,
    lr_scale: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """One group per direct child of ``module`` holding parameters, named ``prefix.child``.

    With ``layer_decay < 1`` the last child gets ``lr_scale`` and each earlier child is scaled
    down by another factor of ``layer_decay`` (timm's layer-wise LR decay).
    """
    children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    own = list(module.parameters(recurse=False))
    groups = []
    if own:
        groups.append({"name": prefix, "params": own, "lr_scale": lr_scale * layer_decay ** len(children)})
    for depth, (name, child) in enumerate(children):
        scale = lr_scale * layer_decay ** (len(children) - 1 - depth)
        groups.append({"name": f"{prefix}.{name}", "params": list(child.parameters()), "lr_scale": scale})
    return groups


def module_group(module: nn.Module, name: str, lr_scale: float = 1.0) -> dict[str, Any]:
    """A single named group for all of ``module``'s parameters."""
    return {"name": name, "params": list(module.parameters()), "lr_scale": lr_scale}


def apply_lr_scale(optimizer: Optimizer) -> Optimizer:
    """Multiply each group's LR by its ``lr_scale`` (call before building a scheduler)."""
    for group in optimizer.param_groups:
        group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
    return optimizer


def check_groups_cover(module: nn.Module, groups: Sequence[dict[str, Any]]) -> None:
    """Every trainable parameter in exactly one group (guards against silently untrained weights)."""
    seen: dict[int, str] = {}
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"Parameter in two groups: {seen[id(p)]} and {group['name']}")
            seen[id(p)] = group["name"]
    left = [n for n, p in module.named_parameters() if id(p) not in seen]
    if left:
        raise ValueError(f"Parameters in no optimizer group: {left[:5]}")
