"""L2-SP: pull fine-tuned weights toward their pretrained starting point (Li et al., 2018)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class L2SP(nn.Module):
    """``alpha * sum(1/2 * ||theta - theta_0||^2)`` over ``module``'s parameters.

    ``theta_0`` (the anchor) is a detached snapshot of ``module``'s parameters, held in
    persistent buffers: a checkpoint carries its anchor, so a resumed or re-loaded module
    regularises toward the same point without the pretrained file. Call :meth:`reset_anchor`
    right after loading pretrained weights. ``alpha=0`` disables the term.

    With ``trainable_only`` only the parameters that require gradients when it is built are anchored
    (e.g. under parameter-efficient fine-tuning, whose frozen parameters never move: their terms are 0,
    and their anchors would only take memory and checkpoint space).

    Only weights the source provided are pulled back: L2-SP's ``||w_S - w_S^0||^2`` covers the pretrained
    part, and a layer the source lacks (a fresh small-input stem, CDC's patch head, a conditional D's label
    embedding) has no starting point worth holding. ``reset_anchor(from_source=...)`` says which those are
    (``LoadReport.parameters_from_source``); without it every parameter is anchored.
    """

    def __init__(self, module: nn.Module, alpha: float, trainable_only: bool = False) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
        self._names = list(self._params)
        for i, param in enumerate(self._params.values()):
            self.register_buffer(f"anchor_{i}", param.detach().clone())
        #: per parameter: 1.0 if it is pulled toward its anchor, 0.0 if the source did not provide it
        self.register_buffer("pulled", torch.ones(len(self._names)))

    @torch.no_grad()
    def reset_anchor(self, from_source: Iterable[nn.Parameter] | None = None) -> None:
        """Take the module's current parameters as the new anchor; with ``from_source``, pull back only those."""
        for i, name in enumerate(self._names):
            getattr(self, f"anchor_{i}").copy_(self._params[name])
        if from_source is not None:
            given = {id(p) for p in from_source}
            self.pulled.copy_(torch.tensor([float(id(p) in given) for p in self._params.values()]))

    @property
    def pulled_names(self) -> list[str]:
        """The names (within the module) of the parameters pulled toward their anchor."""
        return [name for name, flag in zip(self._names, self.pulled.tolist()) if flag]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        # checkpoints written before `pulled` existed anchored every parameter
        state_dict.setdefault(prefix + "pulled", torch.ones(len(self._names)))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)

    def forward(self) -> torch.Tensor:
        if self.alpha == 0 or not self._names:
            return torch.zeros((), device=getattr(self, "anchor_0", torch.zeros(())).device)
        # a product with the flag rather than a Python filter: no device-to-host sync in the training step
        total = sum(
            (self._params[name] - getattr(self, f"anchor_{i}")).pow(2).sum() * self.pulled[i]
            for i, name in enumerate(self._names)
        )
        return 0.5 * self.alpha * total
