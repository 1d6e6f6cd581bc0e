"""L2-SP: pull fine-tuned weights toward their pretrained starting point (Li et al., 2018)."""

from __future__ import annotations

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
    """

    def __init__(self, module: nn.Module, alpha: float, trainable_only: bool = False) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self._params = {n: p for n, p in module.named_parameters() if p.requires_grad or not trainable_only}
        self._names = list(self._params)
        for i, param in enumerate(self._params.values()):
            self.register_buffer(f"anchor_{i}", param.detach().clone())

    @torch.no_grad()
    def reset_anchor(self) -> None:
        """Take the module's current parameters as the new anchor."""
        for i, name in enumerate(self._names):
            getattr(self, f"anchor_{i}").copy_(self._params[name])

    def forward(self) -> torch.Tensor:
        if self.alpha == 0 or not self._names:
            return torch.zeros((), device=getattr(self, "anchor_0", torch.zeros(())).device)
        total = sum(
            (self._params[name] - getattr(self, f"anchor_{i}")).pow(2).sum() for i, name in enumerate(self._names)
        )
        return 0.5 * self.alpha * total
