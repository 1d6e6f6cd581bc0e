"""Per-group LR factors applied only for the duration of ``optimizer.step()``.

Every LR change that is not the scheduler's own (``lr_scale`` of discriminative LRs and layer
decay, warm-up, the unfreeze scale) is a named factor on a parameter group. Writing the scaled
value into ``group["lr"]`` would break schedulers: chainable ones read the previous LR back, and
OneCycleLR / CyclicLR overwrite it with absolute values, erasing any ratio baked into it. So
the optimizer's ``step`` is wrapped: it multiplies each group's LR by the product of its
``lr_factors``, runs the real step (hooks, closure and all), and restores the scheduler's value
in a ``finally`` block, so an exception inside the closure never leaves a scaled LR behind.

The wrapper also keeps, per group, what the step did:

* ``applied_lr``: the LR the last step used for that group, 0.0 when the group had no
  gradients (frozen, or untouched by the loss), which is what :class:`AppliedLRMonitor` logs;
* ``steps_trained``: how many steps updated the group; warm-up counts these, so every
  optimizer (a GAN's G and D, with any number of D steps per batch) has its own clock.

Both live in the group dict and therefore in ``optimizer.state_dict()``: a resumed run
continues them exactly. Factor *functions* (:func:`add_lr_factor_fn`) are evaluated right
before each step, from the group itself.

The wrapper is an instance attribute (not a step pre-hook) because pre-hooks run before the
closure, and no hook runs after a closure that raised. So it is not in the optimizer's
``state_dict()``: groups loaded into a fresh optimizer (plain PyTorch resuming a lit-finetune
run) carry their factors but nothing applies them; such an optimizer warns at its first step
(:func:`_warn_unapplied_factors`) until :func:`install_lr_factor_hooks` is called on it.
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_pre_hook

_WRAPPED = "_lit_finetune_lr_factors"
_WARNED = "_lit_finetune_warned_unapplied_factors"
FactorFn = Callable[[dict[str, Any]], float]


def set_lr_factor(group: dict[str, Any], name: str, value: float) -> None:
    """Set factor ``name`` of a parameter group (1.0 removes its effect)."""
    group.setdefault("lr_factors", {})[name] = float(value)


def effective_lr(group: dict[str, Any]) -> float:
    """The LR the next step uses: scheduler LR times every factor."""
    return group["lr"] * math.prod(group.get("lr_factors", {}).values())


def _has_grad(group: dict[str, Any]) -> bool:
    return any(p.grad is not None for p in group["params"])


def install_lr_factor_hooks(optimizer: Optimizer) -> Optimizer:
    """Wrap ``optimizer.step`` so the groups' LR factors apply during it (idempotent)."""
    if getattr(optimizer, _WRAPPED, None) is not None:
        return optimizer
    factor_fns: dict[str, FactorFn] = {}
    setattr(optimizer, _WRAPPED, factor_fns)
    inner_step = optimizer.step

    @functools.wraps(inner_step)
    def step(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        groups = self.param_groups
        for group in groups:
            for name, fn in factor_fns.items():
                set_lr_factor(group, name, fn(group))
        scheduled = [group["lr"] for group in groups]
        for group in groups:
            group["lr"] = effective_lr(group)
        try:
            result = inner_step(*args, **kwargs)
            for group in groups:
                trained = _has_grad(group)
                group["applied_lr"] = group["lr"] if trained else 0.0
                group["steps_trained"] = group.get("steps_trained", 0) + int(trained)
            return result
        finally:
            for group, lr in zip(groups, scheduled):
                group["lr"] = lr

    # a bound method, like the original: torch's schedulers re-wrap ``step`` through ``__func__``
    optimizer.step = types.MethodType(step, optimizer)  # type: ignore[method-assign]
    return optimizer


def add_lr_factor_fn(optimizer: Optimizer, name: str, fn: FactorFn) -> None:
    """Evaluate ``fn(group)`` as factor ``name`` of every group right before each step."""
    install_lr_factor_hooks(optimizer)
    getattr(optimizer, _WRAPPED)[name] = fn


def install_lr_scale(optimizer: Optimizer) -> Optimizer:
    """Turn each group's ``lr_scale`` (discriminative LR, layer decay) into its ``lr_scale`` factor.

    A factor, not a change of ``group["lr"]``: the ratio between groups then holds under every
    torch scheduler, including OneCycleLR and CyclicLR, which set absolute LRs.
    """
    install_lr_factor_hooks(optimizer)
    for group in optimizer.param_groups:
        set_lr_factor(group, "lr_scale", group.get("lr_scale", 1.0))
    return optimizer


def _warn_unapplied_factors(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    """Global step pre-hook: warn (once per optimizer) when groups carry LR factors that its step ignores."""
    if getattr(optimizer, _WRAPPED, None) is not None or getattr(optimizer, _WARNED, False):
        return
    ignored = [
        group.get("name", str(i))
        for i, group in enumerate(optimizer.param_groups)
        if math.prod(group.get("lr_factors", {}).values()) != 1.0
    ]
    if ignored:
        setattr(optimizer, _WARNED, True)
        warnings.warn(
            f"{type(optimizer).__name__}: parameter groups {ignored} carry lit_finetune lr_factors (e.g. loaded "
            "with load_state_dict from a lit-finetune run) that this optimizer's step does not apply; call "
            "lit_finetune.transfer.install_lr_factor_hooks(optimizer) after building it.",
            stacklevel=2,
        )


register_optimizer_step_pre_hook(_warn_unapplied_factors)
