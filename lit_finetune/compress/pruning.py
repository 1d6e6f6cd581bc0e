"""Magnitude pruning: during fine-tuning (a Lightning ``ModelPruning`` callback) or once, after it.

Global unstructured L1 pruning (``torch.nn.utils.prune``) of the convolution and linear weights
under the named submodules: the smallest ``sparsity`` share of those weights, across all of them
together, is set to zero. During training the zeros are held by ``torch.nn.utils.prune``'s masks
(``<name>.weight_orig`` times the buffer ``<name>.weight_mask``); every checkpoint Lightning writes
and the model at the end of the fit have plain ``<name>.weight`` keys with the zeros in them, so a
pruned checkpoint loads like any other (``load_from_checkpoint``, ``pretrained=``, ``--ckpt_path``).

Zeros in a dense tensor do not make the file smaller or the model faster by themselves: they
compress (gzip, zip) and they are what sparse kernels would need. ``benchmarks/compression.py``
measures what they cost in accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from torch import nn
from torch.nn.utils import prune as torch_prune

#: the layer types whose ``weight`` is pruned
PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


def prunable_parameters(model: nn.Module, modules: Sequence[str] | None = None) -> list[tuple[nn.Module, str]]:
    """``(layer, "weight")`` of every :data:`PRUNABLE_TYPES` layer under the named submodules of ``model``.

    Args:
        model: the network (a LightningModule or any ``nn.Module``).
        modules: names of submodules of ``model`` (e.g. ``["backbone"]``, ``["backbone.layer4", "head"]``);
            ``None``: all of ``model``.

    Raises:
        ValueError: a name that is not a submodule (the message lists the top-level ones), or no layer to prune.
    """
    named = dict(model.named_modules())
    roots = [""] if modules is None else list(modules)
    missing = [name for name in roots if name not in named]
    if missing:
        children = [name for name, _ in model.named_children()]
        raise ValueError(f"No submodule {missing} in {type(model).__name__}; its submodules are {children}.")
    found: dict[int, tuple[nn.Module, str]] = {}
    for root in roots:
        for layer in named[root].modules():
            if isinstance(layer, PRUNABLE_TYPES) and isinstance(_orig(layer), nn.Parameter):
                found.setdefault(id(layer), (layer, "weight"))
    if not found:
        raise ValueError(f"No Conv2d or Linear layer under {roots} of {type(model).__name__} to prune.")
    return list(found.values())


def _orig(layer: nn.Module) -> Any:
    """The trained tensor of ``layer.weight`` (``weight_orig`` while a pruning mask is attached)."""
    return getattr(layer, "weight_orig", getattr(layer, "weight", None))


def _pruned_count(params: Sequence[tuple[nn.Module, str]]) -> tuple[int, int]:
    """(weights pruned or zero, weights) over ``params``: the mask where there is one, else exact zeros."""
    zeros = total = 0
    for layer, name in params:
        mask = getattr(layer, f"{name}_mask", None)
        tensor = getattr(layer, name) if mask is None else mask
        zeros += int((tensor == 0).sum())
        total += tensor.numel()
    return zeros, total


def sparsity(model: nn.Module, modules: Sequence[str] | None = None) -> float:
    """Share of the prunable weights under ``modules`` (see :func:`prunable_parameters`) that are zero."""
    zeros, total = _pruned_count(prunable_parameters(model, modules))
    return zeros / total


def remove_pruning(model: nn.Module) -> nn.Module:
    """Make pruning permanent: every mask multiplied into its tensor, hooks and ``*_orig`` / ``*_mask`` gone.

    The parameter objects stay the same (an optimizer or an L2-SP anchor holding them keeps working).
    Returns ``model``, changed in place.
    """
    for layer in model.modules():
        for key, hook in list(layer._forward_pre_hooks.items()):
            if isinstance(hook, torch_prune.BasePruningMethod):
                hook.remove(layer)
                del layer._forward_pre_hooks[key]
    return model


def has_pruning_masks(model: nn.Module) -> bool:
    """Whether any layer of ``model`` still carries a ``torch.nn.utils.prune`` mask."""
    return any(
        isinstance(hook, torch_prune.BasePruningMethod)
        for layer in model.modules()
        for hook in layer._forward_pre_hooks.values()
    )


def _check_sparsity(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"sparsity is the share of weights set to zero, in [0, 1); got {value}")
    return float(value)


def _prune_to(params: Sequence[tuple[nn.Module, str]], target: float) -> None:
    """Global L1 pruning of ``params`` until ``round(target * total)`` weights are pruned (never fewer than now)."""
    pruned, total = _pruned_count(params)
    more = round(target * total) - pruned
    if more > 0:
        # an int amount counts weights among those still unpruned (torch's PruningContainer), so the
        # share reached is exact however many times pruning ran before
        torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=more)


def _attach_masks_from_zeros(params: Sequence[tuple[nn.Module, str]]) -> None:
    """Attach a mask over each tensor's exact zeros (a pruned checkpoint has plain weights, no masks)."""
    for layer, name in params:
        if not hasattr(layer, f"{name}_mask"):
            weight = getattr(layer, name)
            if bool((weight == 0).any()):
                torch_prune.custom_from_mask(layer, name, mask=(weight != 0).to(weight.dtype))


@torch.no_grad()
def prune(model: nn.Module, sparsity: float, modules: Sequence[str] | None = None) -> float:
    """One-shot global magnitude pruning of ``model`` in place, made permanent (plain weights, no masks).

    Args:
        model: the network; already-zero weights count as pruned.
        sparsity: share of the prunable weights under ``modules`` to be zero afterwards.
        modules: submodule names to prune (see :func:`prunable_parameters`); ``None``: the whole model.

    Returns:
        The share of those weights that is zero afterwards.
    """
    params = prunable_parameters(model, modules)
    _attach_masks_from_zeros(params)
    _prune_to(params, _check_sparsity(sparsity))
    remove_pruning(model)
    zeros, total = _pruned_count(params)
    return zeros / total


class MagnitudePruning(ModelPruning):
    """Prune the conv and linear weights of ``modules`` to ``sparsity`` while fine-tuning.

    Lightning's :class:`~lightning.pytorch.callbacks.ModelPruning` does the pruning (global L1,
    ``torch.nn.utils.prune``), keeps the masks through training and writes checkpoints with the masks
    multiplied in (plain ``weight`` keys). What this subclass adds for fine-tuning:

    * **a sparsity, not an amount**: ``ModelPruning``'s float ``amount`` prunes that share of the weights
      *still unpruned* every time it runs; here each pruning step reaches an exact share of all of them;
    * **a schedule**: pruning at the *start* of each epoch from ``start_epoch`` to ``end_epoch``, the share
      rising as ``sparsity * (1 - (1 - k/n)^3)`` at the k-th of n steps (Zhu & Gupta, 2017), so training
      adapts between steps and from ``end_epoch`` on it trains and validates at the target sparsity.
      ``start_epoch = end_epoch = 0`` (default) prunes the pretrained weights once, before the first step;
    * **what it prunes**: only the ``Conv2d`` / ``Linear`` weights under ``modules`` (``ModelPruning``'s
      default would also prune biases and BatchNorm scales), and never the lottery-ticket rewind
      (``ModelPruning``'s default, which would reset the surviving weights to those the callback saw at
      setup: for this package, before the pretrained source is loaded);
    * **best checkpoint at the target**: when the target is reached, every ``ModelCheckpoint`` with a
      ``monitor`` forgets its best so far (and removes those files), so ``best.ckpt`` is chosen among
      epochs at the target sparsity only (``select_at_target=False`` keeps them);
    * **resuming**: a checkpoint holds plain weights; when a fit resumes, the exact zeros of the pruned
      tensors become masks again, so they stay zero (also when ``pretrained=`` names a pruned model);
    * ``pruning/sparsity`` is logged every epoch.

    Args:
        sparsity: target share of zero weights among the pruned tensors, in ``[0, 1)``.
        modules: submodules of the LightningModule to prune (``None``: all; default the backbone, as the new
            head is small and task-specific).
        start_epoch, end_epoch: first and last epoch at whose start pruning runs.
        select_at_target: reset monitored ``ModelCheckpoint``\\ s when the target is reached (see above).
        verbose: ``ModelPruning``'s (0 silent, 1 overall sparsity, 2 per layer).
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        modules: list[str] | None = None,
        start_epoch: int = 0,
        end_epoch: int = 0,
        select_at_target: bool = True,
        verbose: int = 0,
    ) -> None:
        if not 0 <= start_epoch <= end_epoch:
            raise ValueError(f"MagnitudePruning needs 0 <= start_epoch <= end_epoch; got {start_epoch}, {end_epoch}")
        super().__init__(
            "l1_unstructured",
            parameter_names=["weight"],
            use_global_unstructured=True,
            amount=0,  # unused: this callback prunes from on_train_epoch_start, with counts (see _prune_to)
            apply_pruning=False,  # ModelPruning's own epoch-end pruning stays off
            make_pruning_permanent=True,
            use_lottery_ticket_hypothesis=False,
            verbose=verbose,
        )
        self.sparsity = _check_sparsity(sparsity)
        self.modules = ["backbone"] if modules is None else list(modules)
        self.start_epoch, self.end_epoch = start_epoch, end_epoch
        self.select_at_target = select_at_target

    def filter_parameters_to_prune(self, parameters_to_prune: Any = ()) -> list[tuple[nn.Module, str]]:
        # ModelPruning.setup passes every weight and bias of the module; this callback chooses its own
        return prunable_parameters(self._pl_module, self.modules)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._pl_module = pl_module
        super().setup(trainer, pl_module, stage)

    def target_at(self, epoch: int) -> float:
        """The sparsity the schedule asks for after pruning at the start of ``epoch``."""
        if epoch < self.start_epoch:
            return 0.0
        n = self.end_epoch - self.start_epoch + 1
        k = min(epoch - self.start_epoch + 1, n)
        return self.sparsity * (1 - (1 - k / n) ** 3)

    def current_sparsity(self) -> float:
        """Share of the pruned tensors' weights that is pruned now."""
        zeros, total = _pruned_count(self._parameters_to_prune)
        return zeros / total

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the checkpoint is restored and the pretrained source is read (module.on_fit_start)
        with torch.no_grad():
            _attach_masks_from_zeros(self._parameters_to_prune)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.start_epoch <= epoch <= self.end_epoch and self.sparsity > 0:
            stats = lambda: [self._get_pruned_stats(layer, name) for layer, name in self._parameters_to_prune]  # noqa: E731
            before = stats() if self._verbose else []
            with torch.no_grad():
                _prune_to(self._parameters_to_prune, self.target_at(epoch))
            if self._verbose:
                self._log_sparsity_stats(before, stats(), amount=self.target_at(epoch))
            if epoch == self.end_epoch and self.select_at_target:
                self._forget_best(trainer)
        pl_module.log("pruning/sparsity", self.current_sparsity(), on_step=False, on_epoch=True)

    @staticmethod
    def _forget_best(trainer: L.Trainer) -> None:
        """Monitored checkpoints start choosing anew (files of the states before the target removed)."""
        for callback in trainer.checkpoint_callbacks:
            if not isinstance(callback, ModelCheckpoint) or callback.monitor is None:
                continue
            for path in list(callback.best_k_models):
                if path != callback.last_model_path:
                    trainer.strategy.remove_checkpoint(path)
            callback.best_k_models = {}
            callback.best_model_path = callback.kth_best_model_path = ""
            callback.best_model_score = None
            callback.kth_value = torch.tensor(torch.inf if callback.mode == "min" else -torch.inf)
