"""L2-SP: pull fine-tuned weights toward their pretrained starting point (Li et al., 2018)."""

from __future__ import annotations

import torch
from torch import nn


class L2SP(nn.Module):
    """``alpha * sum(1/2 * ||theta - theta_0||^2)`` over ``module``'s parameters.

    ``theta_0`` is a detached snapshot taken at construction (after pretrained loading). It is
    held in non-persistent buffers: checkpoints stay the size of the model, and a resumed run
    rebuilds the anchor from the same ``pretrained`` source. ``alpha=0`` disables the term.
    """

    def __init__(self, module: nn.Module, alpha: float) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self._params = dict(module.named_parameters())
        for i, (name, param) in enumerate(self._params.items()):
            self.register_buffer(f"anchor_{i}", param.detach().clone(), persistent=False)
        self._names = list(self._params)

    def forward(self) -> torch.Tensor:
        if self.alpha == 0 or not self._names:
            return torch.zeros((), device=getattr(self, "anchor_0", torch.zeros(())).device)
        total = sum(
            (self._params[name] - getattr(self, f"anchor_{i}")).pow(2).sum() for i, name in enumerate(self._names)
        )
        return 0.5 * self.alpha * total
