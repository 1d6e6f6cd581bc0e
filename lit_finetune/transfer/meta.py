"""First-order meta-learning mechanics: an inner loop of plain SGD on a functional copy of a network,
and the outer directions of Reptile and first-order MAML (FOMAML).

No Lightning here (``MetaPretrainer`` drives it; research code can too). The network itself is never
changed by :func:`adapt` or :func:`query_step`: weights travel as ``{name: tensor}`` dicts through
``torch.func.functional_call``, so one module serves the meta weights and every episode's adapted copy.

BatchNorm in episodes (what the reference code does, and what this module does):

* The MAML and Reptile reference implementations run BatchNorm on batch statistics in every episode,
  at training and at evaluation ("transductive": the query images of an episode are normalised together;
  openai/supervised-reptile calls it that and offers a non-transductive evaluation as an option).
  learn2learn's vision models (CNN4, ResNet12) build their BatchNorm with ``track_running_stats=False``;
  MAML++ (Antoniou et al. 2019) keeps separate running statistics per inner step instead.
* Here every episode forward uses batch statistics (:func:`batch_statistics` forces BatchNorm into
  training mode), so training and meta-validation see the same normalisation.
* The running statistics are kept for the *meta* weights only, so the checkpoint is an ordinary source
  whose eval mode works: the first inner step of each training episode runs at the meta weights and
  updates the module's running buffers (momentum average over episodes, as in supervised training);
  every forward at adapted weights writes to a throw-away copy of the buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

Weights = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``model`` in training mode (batch statistics) inside the block; modes restored after."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.train()
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


def trainable_weights(model: nn.Module) -> Weights:
    """The parameters an inner loop adapts (those with ``requires_grad``), by name; the live tensors."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def scratch_buffers(model: nn.Module) -> Weights:
    """A copy of the module's buffers: forwards at adapted weights update these, never the module's own."""
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def adapt(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    start: Mapping[str, torch.Tensor],
    steps: int,
    lr: float,
    loss_fn: LossFn = F.cross_entropy,
    update_running_stats: bool = False,
) -> Weights:
    """``steps`` steps of plain SGD (``w <- w - lr * grad``) on the full support batch ``(x, y)``, from ``start``.

    First order: each step's weights are detached, so no graph spans the inner loop. Returns the adapted
    weights (detached). With ``update_running_stats`` the first step's forward writes the module's own
    BatchNorm buffers (use it when ``start`` holds the meta weights); every other forward writes a copy.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    weights = {name: w.detach().clone().requires_grad_(True) for name, w in start.items()}
    scratch = scratch_buffers(model)
    for step in range(steps):
        buffers = {} if (step == 0 and update_running_stats) else scratch
        loss = loss_fn(functional_call(model, {**weights, **buffers}, (x,)), y)
        grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
        weights = {
            name: (w if g is None else w - lr * g).detach().requires_grad_(True)
            for (name, w), g in zip(weights.items(), grads)
        }
    return {name: w.detach() for name, w in weights.items()}


def query_step(
    model: nn.Module,
    weights: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, Weights | None]:
    """The query loss and logits at ``weights`` (BatchNorm buffers: a throw-away copy); with ``grad``, also
    the loss's gradient with respect to ``weights``: FOMAML's outer gradient when ``weights`` are adapted."""
    leaves = {name: w.detach().requires_grad_(grad) for name, w in weights.items()}
    with torch.set_grad_enabled(grad):
        logits = functional_call(model, {**leaves, **scratch_buffers(model)}, (x,))
        loss = loss_fn(logits, y)
    grads = None
    if grad:
        values = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {name: torch.zeros_like(w) if g is None else g for (name, w), g in zip(leaves.items(), values)}
    return loss.detach(), logits.detach(), grads


def reptile_direction(meta: Mapping[str, torch.Tensor], adapted: Mapping[str, torch.Tensor]) -> Weights:
    """``theta - phi`` for each name: as a gradient, an SGD step of size ``eps`` on it is Reptile's update
    ``theta <- theta + eps * (phi - theta)`` (Nichol et al. 2018), and any other optimizer may take it too."""
    return {name: meta[name].detach() - adapted[name] for name in adapted}
