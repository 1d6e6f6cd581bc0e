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

The parameters :class:`PEFT` freezes are listed by :meth:`PEFT.fixed_parameters`: freezing callbacks
(``LayerFreezing``) never unfreeze them, so a freeze phase composes with PEFT (head first, then the
PEFT selection). A state dict holding unmerged updates can be folded into plain weights
(:func:`merge_into_state`), so a PEFT model's checkpoint is a source like any other.

Why not the ``peft`` library: it targets transformers and replaces modules (new state-dict keys), and
these four methods need only a forward hook and a parameter selection, which keep the source's keys.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
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
                base.in_channels, rank, base.kernel_size, base.stride, base.padding, base.dilation, bias=False,
                padding_mode=base.padding_mode,
            )  # fmt: skip
            self.up: nn.Module = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.down, self.up = nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)
        # a buffer, so that a state dict alone can be merged into plain weights (merge_into_state)
        self.register_buffer("scaling", torch.tensor(alpha / rank))
        self._scale = alpha / rank  # the same as a Python float: no device read in forward

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # state dicts written before the scale was stored lack it: they were built with this scale
        state_dict.setdefault(prefix + "scaling", self.scaling.detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._scale = float(self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * self._scale

    def delta_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The update in the base layer's weight shape, so that merging adds it to the weight."""
        return lora_delta(self.up.weight, self.down.weight, self._scale, weight)


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
        return adapter_delta(self.conv.weight, weight)


def lora_delta(up: torch.Tensor, down: torch.Tensor, scaling: float, weight: torch.Tensor) -> torch.Tensor:
    """``scaling * up @ down`` in ``weight``'s shape (a convolution's ``down`` carries its kernel)."""
    return (up.flatten(1) @ down.flatten(1)).view_as(weight) * scaling


def adapter_delta(conv: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 1x1 kernel ``conv`` placed at the centre of ``weight``'s ``k x k`` kernel (zeros elsewhere)."""
    delta = torch.zeros_like(weight)
    k_h, k_w = weight.shape[-2:]
    delta[:, :, k_h // 2, k_w // 2] = conv[:, :, 0, 0]
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
        # a buffer, so that a checkpoint of merged weights says so and is never merged twice; the hooks read
        # its Python twin (reading a GPU tensor in every hooked layer would wait for the device each time)
        self.register_buffer("merged_flag", torch.zeros((), dtype=torch.bool))
        self._merged = False
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
        # a plain list, not registered: the network's own parameters that stay frozen (see fixed_parameters)
        self._fixed: list[nn.Parameter] = [p for p in network.parameters() if not p.requires_grad]

    def _trains(self, network: nn.Module, parameter_name: str) -> bool:
        owner_name, _, leaf = parameter_name.rpartition(".")
        owner = network.get_submodule(owner_name) if owner_name else network
        if self.method == "bitfit":
            return leaf == "bias"
        if self.method in ("bn_only", "adapters"):
            return isinstance(owner, _NORMS)
        return False  # lora: only the added modules

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        self._merged = bool(self.merged_flag)

    def fixed_parameters(self) -> list[nn.Parameter]:
        """The network's parameters this method never trains: they stay the source's. Freezing callbacks
        (``LayerFreezing``) leave them frozen when they unfreeze a module; a delta checkpoint leaves them out."""
        return list(self._fixed)

    @property
    def fixed_count(self) -> int:
        """Elements of :meth:`fixed_parameters`."""
        return sum(p.numel() for p in self._fixed)

    def update_sq_norm(self) -> torch.Tensor:
        """``sum ||delta W||^2`` of the added modules: how far they move the effective weights from the
        network's own, which is what L2-SP measures for them (0 once merged: then the weights hold it)."""
        deltas = [] if self._merged else [added.delta_weight(target.weight) for target, added in self.added_modules()]
        if not deltas:
            return self.merged_flag.new_zeros((), dtype=torch.float32)
        return sum(delta.pow(2).sum() for delta in deltas)

    @property
    def merged(self) -> bool:
        """Whether the updates are in the weights (the hooks then add nothing)."""
        return self._merged

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
            self._merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (to train on), up to floating-point rounding."""
        if self.merged:
            for target, added in self.added_modules():
                target.weight -= added.delta_weight(target.weight)
            self.merged_flag.fill_(False)
            self._merged = False


def delta_state_dict(
    model: nn.Module, fixed: Iterable[nn.Parameter] | None = None, exclude: Sequence[str] = ()
) -> dict[str, torch.Tensor]:
    """What fine-tuning changed, to store on top of its source: every parameter but the ``fixed`` ones
    (default: those that do not require gradients) and every buffer (norm statistics follow the target
    data; buffers are small), less the keys under the ``exclude`` prefixes (what is rebuilt from the source)."""
    if fixed is None:
        fixed = [p for p in model.parameters() if not p.requires_grad]
    fixed_ids = {id(p) for p in fixed}
    kept = {name for name, p in model.named_parameters() if id(p) not in fixed_ids}
    kept |= {name for name, _ in model.named_buffers()}
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k in kept and not any(k.startswith(prefix) for prefix in exclude)
    }


def merge_into_state(
    state: Mapping[str, torch.Tensor], prefix: str = "peft.", network_prefix: str = "backbone."
) -> tuple[dict[str, torch.Tensor], int]:
    """``state`` (a model's state dict) with the unmerged updates of the :class:`PEFT` under ``prefix``
    added to the weights of the network under ``network_prefix``, and the PEFT keys dropped: plain
    weights that compute what the PEFT model computes. Returns it and how many updates were added
    (0 when there are none, or they were merged already)."""
    out = {k: v for k, v in state.items() if not k.startswith(prefix)}
    flag = state.get(f"{prefix}merged_flag")
    if flag is not None and bool(flag):
        return out, 0  # the weights hold the updates already
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(f"{prefix}added."):
            name, _, leaf = key.removeprefix(f"{prefix}added.").partition(".")
            modules.setdefault(name, {})[leaf] = value
    for name, tensors in modules.items():
        target = f"{network_prefix}{name.replace('__', '.')}.weight"
        if target not in out:
            raise ValueError(f"{prefix}added.{name} adapts {target}, which the state dict lacks")
        weight = out[target]
        if "conv.weight" in tensors:
            delta = adapter_delta(tensors["conv.weight"], weight)
        elif "scaling" in tensors:
            delta = lora_delta(tensors["up.weight"], tensors["down.weight"], float(tensors["scaling"]), weight)
        else:
            raise ValueError(
                f"{prefix}added.{name} is a LoRA update stored without its scale (written by an older version): load "
                "the model, call model.peft.merge() and save it again"
            )
        out[target] = weight + delta.to(weight.dtype)
    return out, len(modules)
