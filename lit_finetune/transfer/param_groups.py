"""Named parameter groups: discriminative learning rates, one group per block, weight-decay rules.

Every module builds its optimizer from these groups, so that freezing, warm-up, schedulers and
the LR monitor all see the same named groups from the first step (groups added later break
schedulers, Lightning #8720). Each group carries ``lr_scale``, which
:func:`~lit_finetune.transfer.lr_factors.install_lr_scale` turns into an LR factor once the
optimizer exists, so the ratio survives every scheduler.

Weight decay follows two rules (applied by :func:`weight_decay_groups`):

* no decay on norm weights and biases (every parameter with ``ndim <= 1``), as in timm;
  they go to a sibling group named ``<name>.no_decay``;
* no decay on weights that L2-SP anchors: decay pulls them toward 0 while L2-SP pulls them
  toward their pretrained values, and Li et al. (2018) replace the one by the other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn


def block_groups(
    module: nn.Module,
    prefix: str,
    lr_scale: float = 1.0,
    layer_decay: float = 1.0,
    expand: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """One group per direct child of ``module`` holding parameters, named ``prefix.child``.

    Children named in ``expand`` (e.g. a GAN's ``blocks`` container) give one group per child
    of their own instead (``prefix.blocks.0``, ...), so each block can be frozen and scaled alone.
    With ``layer_decay < 1`` the last group gets ``lr_scale`` and each earlier one is scaled
    down by another factor of ``layer_decay`` (timm's layer-wise LR decay).
    """
    children = []
    for name, child in module.named_children():
        inner = child.named_children() if name in expand else [(None, child)]
        children += [(name if sub is None else f"{name}.{sub}", c) for sub, c in inner]
    children = [(n, c) for n, c in children if any(True for _ in c.parameters())]
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


def trainable_only(groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The groups with their frozen-from-the-start parameters (``requires_grad=False``, e.g. under
    parameter-efficient fine-tuning) left out; groups left empty are dropped."""
    out = [{**group, "params": [p for p in group["params"] if p.requires_grad]} for group in groups]
    return [group for group in out if group["params"]]


def weight_decay_groups(groups: Sequence[dict[str, Any]], anchored: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Split each group into decayed weights and a ``<name>.no_decay`` sibling (``ndim <= 1``).

    Groups whose name starts with one of ``anchored`` (weights held by L2-SP) get no weight
    decay at all. Other groups keep the optimizer's default decay. Empty groups are dropped.
    """
    out = []
    for group in groups:
        decay = [p for p in group["params"] if p.ndim > 1]
        flat = [p for p in group["params"] if p.ndim <= 1]
        is_anchored = any(group["name"] == a or group["name"].startswith(a + ".") for a in anchored)
        if decay:
            out.append({**group, "params": decay, **({"weight_decay": 0.0} if is_anchored else {})})
        if flat:
            out.append({**group, "name": f"{group['name']}.no_decay", "params": flat, "weight_decay": 0.0})
    return out


def check_groups_cover(module: nn.Module, groups: Sequence[dict[str, Any]]) -> None:
    """Every trainable parameter in exactly one group (guards against silently untrained weights).

    Parameters with ``requires_grad=False`` (a frozen generator, an EMA copy) may stay out.
    """
    seen: dict[int, str] = {}
    for group in groups:
        for p in group["params"]:
            if id(p) in seen:
                raise ValueError(f"Parameter in two groups: {seen[id(p)]} and {group['name']}")
            seen[id(p)] = group["name"]
    left = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
    if left:
        raise ValueError(f"Parameters in no optimizer group: {left[:5]}")
