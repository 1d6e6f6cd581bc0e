"""Parameter-efficient transfer for CNNs: BN-only, BitFit, residual adapters and LoRA.

A source network stays as it is (same modules, same state-dict keys, so pretrained loading, L2-SP and
the load report work unchanged); :class:`PEFT` decides which of its parameters train and, for adapters
and LoRA, adds small modules that a forward hook adds to the output of each target layer:

* ``bn_only``: only the affine parameters of the norm layers train (Frankle et al. 2021);
* ``bitfit``: only biases train (Ben Zaken et al. 2022). A torchvision ResNet's convolutions have no
  bias, so on a ResNet this is the norm layers' shifts (beta);
* ``adapters``: a zero-initialised 1x1 convolution beside every 3x3 convolution ("parallel residual
  adapters", Rebuffi et al. 2018), with the norm layers' affine parameters (their domain-specific BN);
* ``lora``: a rank-``r`` update ``(alpha / r) * B @ A`` of every convolution and linear weight, ``B``
  zero-initialised (Hu et al. 2022; on convolutions ``A`` has the layer's kernel and ``B`` is 1x1, as in
  the PEFT library).

The head of the model is not part of the network given to :class:`PEFT` and trains as usual. At
initialisation every method computes exactly what the source computes. Adapters and LoRA can be
merged into the weights for inference (:meth:`PEFT.merge`), which gives the same outputs without the
extra modules. Norm layers' running statistics follow the target data in training mode, for all methods.

Why not the ``peft`` library: it targets transformers and replaces modules (new state-dict keys), and
these four methods need only a forward hook and a parameter selection, which keep the source's keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

#: the methods :class:`PEFT` offers
PEFT_METHODS = ("bn_only", "bitfit", "adapters", "lora")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def trainable_parameter_count(module: nn.Module) -> int:
    """Elements of ``module``'s parameters that require gradients."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class LoRA(nn.Module):
    """The low-rank update of one ``Conv2d`` or ``Linear``: ``up(down(x)) * alpha / rank``, zero at init."""

    def __init__(self, base: nn.Conv2d | nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.down: nn.Module = nn.Conv2d(
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False
            )
            self.up: nn.Module = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self.scaling

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The update in the base layer's weight shape, so that merging adds it to the weight."""
        return (self.up.weight.flatten(1) @ self.down.weight.flatten(1)).view_as(weight) * self.scaling


class ParallelAdapter(nn.Module):
    """A 1x1 convolution beside a ``k x k`` convolution (same stride, padding ``k // 2``), zero at init."""

    def __init__(self, base: nn.Conv2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(base.in_channels, base.out_channels, 1, stride=base.stride, bias=False)
        nn.init.zeros_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The 1x1 kernel at the centre of the base's ``k x k`` one: the same output sampled at the same pixels."""
        delta = torch.zeros_like(weight)
        k_h, k_w = weight.shape[-2:]
        delta[:, :, k_h // 2, k_w // 2] = self.conv.weight[:, :, 0, 0]
        return delta


def _adapter_fits(module: nn.Module) -> bool:
    if not isinstance(module, nn.Conv2d) or module.groups != 1 or module.dilation != (1, 1):
        return False
    k_h, k_w = module.kernel_size
    return k_h == k_w and k_h % 2 == 1 and k_h > 1 and module.padding == (k_h // 2, k_w // 2)


def _lora_fits(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


class PEFT(nn.Module):
    """Parameter-efficient fine-tuning of ``network`` by ``method`` (see the module docstring).

    Build it after the network and before its optimizer: it sets ``requires_grad`` on the network's
    parameters (the selection is fixed from the first step, so every parameter group exists from the
    start) and hooks the added modules into the target layers.

    Args:
        network: the pretrained part to adapt (e.g. a classifier's backbone; its head is not in it).
        method: one of :data:`PEFT_METHODS`.
        rank: LoRA's rank ``r``.
        alpha: LoRA's scale numerator (``alpha / r`` multiplies the update); default ``rank`` (scale 1).
        trainable: dotted names of modules of ``network`` that train fully anyway (e.g. a new input stem).
    """

    def __init__(
        self, network: nn.Module, method: str, rank: int = 4, alpha: float | None = None, trainable: tuple[str, ...] = ()
    ) -> None:
        super().__init__()
        if method not in PEFT_METHODS:
            raise ValueError(f"peft must be one of {', '.join(PEFT_METHODS)} (or None for full fine-tuning); got {method!r}")
        if rank < 1:
            raise ValueError(f"peft_rank must be >= 1; got {rank}")
        self.method = method
        self.added = nn.ModuleDict()
        # the target layers, by the key of their added module; a plain dict so they are not registered twice
        self._targets: dict[str, nn.Module] = {}
        # a buffer, so that a checkpoint of merged weights says so and is never merged twice
        self.register_buffer("merged_flag", torch.zeros((), dtype=torch.bool))
        for name, module in network.named_modules():
            added: nn.Module | None = None
            if method == "lora" and _lora_fits(module):
                added = LoRA(module, rank, float(rank if alpha is None else alpha))
            elif method == "adapters" and _adapter_fits(module):
                added = ParallelAdapter(module)
            if added is not None:
                key = name.replace(".", "__")
                self.added[key] = added
                self._targets[key] = module
                module.register_forward_hook(partial(self._add_output, key))
        if method in ("adapters", "lora") and not self.added:
            raise ValueError(f"peft={method!r} found no layer to adapt in {type(network).__name__}")
        for name, parameter in network.named_parameters():
            parameter.requires_grad_(self._trains(network, name))
        for name in trainable:
            network.get_submodule(name).requires_grad_(True)

    def _trains(self, network: nn.Module, parameter_name: str) -> bool:
        owner_name, _, leaf = parameter_name.rpartition(".")
        owner = network.get_submodule(owner_name) if owner_name else network
        if self.method == "bitfit":
            return leaf == "bias"
        if self.method in ("bn_only", "adapters"):
            return isinstance(owner, _NORMS)
        return False  # lora: only the added modules

    @property
    def merged(self) -> bool:
        """Whether the updates are in the weights (the hooks then add nothing)."""
        return bool(self.merged_flag)

    def _add_output(self, key: str, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return output
        return output + self.added[key](args[0])

    def added_modules(self) -> Iterator[tuple[nn.Module, nn.Module]]:
        """``(target layer, added module)`` pairs."""
        for key, added in self.added.items():
            yield self._targets[key], added

    @torch.no_grad()
    def merge(self) -> None:
        """Add each update to its layer's weight and stop the hooks: the same function, no extra compute."""
        if not self.merged:
            for target, added in self.added_modules():
                target.weight += added.delta_weight(target.weight)
            self.merged_flag.fill_(True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (to train on), up to floating-point rounding."""
        if self.merged:
            for target, added in self.added_modules():
                target.weight -= added.delta_weight(target.weight)
            self.merged_flag.fill_(False)


def delta_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What fine-tuning changed, to store on top of its source: every trainable parameter and every buffer
    (norm statistics follow the target data; buffers are small)."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in trainable or k in buffers}
