"""Layer freezing and (gradual) unfreezing that also holds under DDP.

Built on Lightning's ``BaseFinetuning`` for its hooks and its freeze/BatchNorm utilities, but
it never adds parameter groups: every module already puts each block in its own named group
from the first step (see :mod:`lit_finetune.transfer.param_groups`), so schedulers and
``LearningRateMonitor`` keep working when a phase begins.

How a module is "frozen":

* one process: ``requires_grad=False`` (no backward through it, the cheap way);
* several processes (DDP): ``requires_grad`` stays ``True``, because DDP records which
  parameters need gradients when it wraps the model and never syncs parameters that were
  unfrozen later (Lightning #20340). Their gradients are instead dropped after backward and
  before the update, so the optimizer skips them (no update, no weight decay, no momentum):
  in ``on_before_optimizer_step`` under Lightning (which runs forward and backward *inside*
  ``optimizer.step(closure)``, i.e. after any step pre-hook), and in an optimizer step
  pre-hook for plain loops that call ``step()`` without a closure.

Either way frozen BatchNorm layers run in eval mode (running statistics fixed) unless
``train_bn=True``; this is re-applied before every training batch because Lightning switches
the whole model back to train mode at epoch and validation boundaries. With ``train_bn=True``
the BatchNorm affine parameters of a frozen module train too (as in ``BaseFinetuning``).

The callback acts only while fitting: validate / test / predict leave the model as it is.

Optimizers built over trainable parameters only (``filter(lambda p: p.requires_grad, ...)``,
as Lightning's ``BaseFinetuning`` docs show) miss the frozen modules. Those parameters are
added as a new named group when their module unfreezes (``BaseFinetuning``'s own way, which
also restores such groups on resume). A learning-rate scheduler cannot follow a group added
mid-run, so that combination stops at fit start with a message saying what to change.

Parameters a module fixes by design stay frozen: any submodule with a ``fixed_parameters()`` method
(e.g. :class:`~lit_finetune.transfer.peft.PEFT`, which trains only a selection of the backbone) lists
parameters that unfreezing leaves alone, so a freeze phase composes with parameter-efficient fine-tuning.
Parameters a module declares new by design keep training: a module with a ``new_parameters()`` method
(e.g. :class:`~lit_finetune.ImageClassifier`'s small-input stem under torchvision weights, which no source
fills) lists parameters that freezing leaves alone, since a random layer frozen under pretrained ones
would only feed them noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from lit_finetune.transfer.lr_factors import install_lr_factor_hooks, set_lr_factor


def _optimizer_param_ids(optimizer: Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def _declared_parameter_ids(pl_module: nn.Module, method: str) -> set[int]:
    """Ids of the parameters ``pl_module``'s modules list with their ``method()``, if they have one."""
    return {id(p) for m in pl_module.modules() if hasattr(m, method) for p in getattr(m, method)()}


def fixed_parameter_ids(pl_module: nn.Module) -> set[int]:
    """Ids of the parameters that ``pl_module``'s submodules fix by design (``fixed_parameters()``)."""
    return _declared_parameter_ids(pl_module, "fixed_parameters")


def new_parameter_ids(pl_module: nn.Module) -> set[int]:
    """Ids of the parameters ``pl_module``'s modules declare new by design (``new_parameters()``): kept training."""
    return _declared_parameter_ids(pl_module, "new_parameters")


def get_submodule(pl_module: nn.Module, name: str) -> nn.Module:
    """``pl_module.get_submodule`` with an error that lists the valid names."""
    try:
        return pl_module.get_submodule(name)
    except AttributeError as err:
        names = [n for n, _ in pl_module.named_modules() if n and n.count(".") <= 1]
        raise ValueError(f"LayerFreezing: module {name!r} not found; top-level names include {names[:20]}") from err


class LayerFreezing(BaseFinetuning):
    """Freeze named submodules, then unfreeze each at its epoch.

    Args:
        modules: dotted names of submodules of the LightningModule to freeze, e.g.
            ``["backbone"]`` or, for gradual unfreezing from the top,
            ``["backbone.layer4", "backbone.layer3", "backbone.layer2", "backbone.layer1"]``; none may
            contain another (each parameter has one schedule).
        unfreeze_at_epoch: epoch at which each module starts training: one int for all, a list
            (one per module) for gradual unfreezing, or ``None`` to keep them frozen (linear probe).
        train_bn: keep BatchNorm layers of frozen modules training (affine and statistics).
        unfreeze_lr_scale: LR multiplier for the parameter groups of a module once unfrozen,
            one for all or one per module (fastai's lower LR for the unfrozen body).

    Example::

        trainer = L.Trainer(callbacks=[LayerFreezing(["backbone"], unfreeze_at_epoch=2)])
    """

    def __init__(
        self,
        modules: Sequence[str] | str = ("backbone",),
        unfreeze_at_epoch: int | Sequence[int] | None = 1,
        train_bn: bool = False,
        unfreeze_lr_scale: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__()
        self.module_names = [modules] if isinstance(modules, str) else list(modules)
        for i, outer in enumerate(self.module_names):
            for j, inner in enumerate(self.module_names):
                if i != j and (inner == outer or inner.startswith(outer + ".")):
                    # one parameter would have two schedules, and the outer module's would win silently
                    raise ValueError(
                        f"LayerFreezing: {outer!r} contains {inner!r}; list modules that do not contain each other, "
                        f"e.g. {inner!r} and the other blocks of {outer!r}, each with its own unfreeze epoch."
                    )
        n = len(self.module_names)
        if unfreeze_at_epoch is None or isinstance(unfreeze_at_epoch, int):
            self.milestones: list[int | None] = [unfreeze_at_epoch] * n
        else:
            self.milestones = list(unfreeze_at_epoch)
        scales = [unfreeze_lr_scale] * n if isinstance(unfreeze_lr_scale, (int, float)) else list(unfreeze_lr_scale)
        self.lr_scales = [float(s) for s in scales]
        if len(self.milestones) != n or len(self.lr_scales) != n:
            raise ValueError(
                f"LayerFreezing: {n} modules but {len(self.milestones)} unfreeze epochs and "
                f"{len(self.lr_scales)} LR scales; give one value or one per module."
            )
        self.train_bn = train_bn
        self._distributed = False
        self._frozen: dict[str, bool] = {}
        self._frozen_param_ids: set[int] = set()
        self._adds_groups_to: Optimizer | None = None

    # -- state --------------------------------------------------------------------------------
    def is_frozen(self, name: str) -> bool:
        return self._frozen.get(name, False)

    def _set_frozen(self, pl_module: L.LightningModule, name: str, frozen: bool) -> None:
        module = get_submodule(pl_module, name)
        self._frozen[name] = frozen
        if frozen and not self._distributed:
            self.freeze(module, train_bn=self.train_bn)
        elif not frozen:
            self.make_trainable(module)
            module.train(pl_module.training)  # frozen BatchNorm layers were put in eval mode
        fixed, new = fixed_parameter_ids(pl_module), new_parameter_ids(pl_module)
        for p in module.parameters():
            if id(p) in fixed:  # fixed by design (e.g. outside a PEFT selection): unfreezing and train_bn leave them
                p.requires_grad_(False)
            elif id(p) in new:  # new by design (e.g. a fresh stem under pretrained layers): never frozen
                p.requires_grad_(True)
        self._frozen_param_ids = {
            id(p)
            for n in self.module_names
            if self._frozen.get(n)
            for m in self.flatten_modules(get_submodule(pl_module, n))
            if self.train_bn is False or not isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in m.parameters(recurse=False)
            if id(p) not in new
        }

    def _apply_bn_mode(self, pl_module: L.LightningModule) -> None:
        if self.train_bn:
            return
        for name in self.module_names:
            if self._frozen.get(name):
                for m in self.flatten_modules(get_submodule(pl_module, name)):
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def _drop_frozen_grads(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in self._frozen_param_ids:
                    p.grad = None

    def _mark_groups(self, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        """Flag groups whose parameters are all frozen; give unfrozen modules' groups their LR scale."""
        for group in optimizer.param_groups:
            ids = {id(p) for p in group["params"]}
            group["frozen"] = bool(ids) and ids <= self._frozen_param_ids
        for name, scale in zip(self.module_names, self.lr_scales):
            if self._frozen.get(name) or scale == 1.0:
                continue
            ids = {id(p) for p in get_submodule(pl_module, name).parameters()}
            for group in optimizer.param_groups:
                if ids & {id(p) for p in group["params"]}:
                    set_lr_factor(group, "unfreeze", scale)

    # -- BaseFinetuning API -------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":  # validate / test / predict: leave the model as it is
            return
        self._distributed = trainer.world_size > 1
        super().setup(trainer, pl_module, stage)  # -> freeze_before_training, before any DDP wrap

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        for name in self.module_names:
            self._set_frozen(pl_module, name, True)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        for name, milestone in zip(self.module_names, self.milestones):
            should_freeze = milestone is None or epoch < milestone
            if should_freeze != self.is_frozen(name):
                self._set_frozen(pl_module, name, should_freeze)
                if not should_freeze and optimizer is self._adds_groups_to:
                    self._add_missing_group(pl_module, name, optimizer)
        self._mark_groups(pl_module, optimizer)

    def _missing_params(self, pl_module: L.LightningModule, name: str, optimizer: Optimizer) -> list:
        present = _optimizer_param_ids(optimizer) | fixed_parameter_ids(pl_module)
        return [p for p in get_submodule(pl_module, name).parameters() if id(p) not in present]

    def _add_missing_group(self, pl_module: L.LightningModule, name: str, optimizer: Optimizer) -> None:
        """Give an unfrozen module's parameters that no group holds a group of their own, named ``name``."""
        missing = self._missing_params(pl_module, name, optimizer)
        if missing:
            optimizer.add_param_group({"name": name, "params": missing, "lr": optimizer.param_groups[0]["lr"]})

    def _check_optimizers_hold_frozen(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Decide, at fit start, what to do with frozen parameters that no optimizer holds."""
        self._adds_groups_to = None
        to_unfreeze = [n for n, m in zip(self.module_names, self.milestones) if m is not None]
        all_ids = set().union(*(_optimizer_param_ids(o) for o in trainer.optimizers)) if trainer.optimizers else set()
        all_ids |= fixed_parameter_ids(pl_module)  # they never train, so no optimizer needs them
        lacking = [
            n for n in to_unfreeze if any(id(p) not in all_ids for p in get_submodule(pl_module, n).parameters())
        ]
        if not lacking:
            return
        fix = (
            "Build the optimizer over all parameters (e.g. `self.parameters()`): LayerFreezing freezes them itself, "
            "and frozen parameters get no update."
        )
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"LayerFreezing: {lacking} will be unfrozen but their parameters are in none of the "
                f"{len(trainer.optimizers)} optimizers, and it cannot tell which one should train them. {fix}"
            )
        if trainer.lr_scheduler_configs:
            raise ValueError(
                f"LayerFreezing: {lacking} will be unfrozen but their parameters are not in the optimizer (was it "
                "built from `filter(lambda p: p.requires_grad, ...)`?), and a learning-rate scheduler cannot follow a "
                "parameter "
                f"group added mid-run. {fix}"
            )
        self._adds_groups_to = trainer.optimizers[0]

    # -- Lightning hooks ----------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)  # re-creates groups added before a checkpoint
        self._check_optimizers_hold_frozen(trainer, pl_module)
        for optimizer in trainer.optimizers:
            if not getattr(optimizer, "_lit_finetune_freeze_hook", False):
                optimizer.register_step_pre_hook(self._drop_frozen_grads)
                optimizer._lit_finetune_freeze_hook = True
            install_lr_factor_hooks(optimizer)
            self._mark_groups(pl_module, optimizer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Resumed inside an epoch, Lightning skips that epoch's on_train_epoch_start, where the phase is
        # applied; the loops (so current_epoch) are restored only after on_fit_start, hence here.
        if trainer.fit_loop.restarted_mid_epoch:
            self.on_train_epoch_start(trainer, pl_module)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._apply_bn_mode(pl_module)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Optimizer) -> None:
        # Lightning calls optimizer.step(closure): the step pre-hook runs before the closure's
        # backward, so the frozen gradients only exist from here on (before clipping and the update).
        self._drop_frozen_grads(optimizer, (), {})
