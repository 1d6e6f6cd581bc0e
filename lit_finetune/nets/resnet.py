"""ResNet backbones: torchvision's ResNets plus a narrow variant sized for CPUs.

Every backbone returned by :func:`build_resnet` keeps torchvision's attribute layout
(``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``) so that pretrained state dicts,
layer-freezing names and parameter groups mean the same thing for every depth. The
classification layer ``fc`` is replaced by ``nn.Identity``: the LightningModule owns the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision import models
from torchvision.models.resnet import BasicBlock, conv1x1

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
SMALL_RESNETS = {
    # name: (blocks per stage, widths per stage); BasicBlock throughout.
    "resnet_small": ((1, 1, 1, 1), (16, 32, 64, 128)),
    "resnet10": ((1, 1, 1, 1), (64, 128, 256, 512)),
}
AVAILABLE_BACKBONES = tuple(SMALL_RESNETS) + TORCHVISION_RESNETS


class NarrowResNet(nn.Module):
    """A ResNet of BasicBlocks with configurable widths, laid out like torchvision's ResNet.

    torchvision's ``ResNet`` fixes the stage widths at 64-512; at 28x28 with a small-input
    stem that costs seconds per batch on a 2-core CPU, hence this narrow sibling.
    """

    #: the stem reads the images: the only layer a pretrained load may adapt to another channel count
    input_convs: tuple[str, ...] = ("conv1",)

    def __init__(self, layers: Sequence[int], widths: Sequence[int], in_channels: int = 3) -> None:
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(widths[0], layers[0], stride=1)
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc: nn.Module = nn.Linear(widths[3], 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_resnet(
    name: str = "resnet_small",
    in_channels: int = 3,
    small_input: bool = True,
) -> tuple[nn.Module, int]:
    """Build a ResNet feature extractor; returns ``(backbone, num_features)``.

    Args:
        name: one of :data:`AVAILABLE_BACKBONES`.
        in_channels: input channels (1 for grayscale, 3 for RGB; any count works).
        small_input: replace the ImageNet stem (7x7 stride-2 conv + max-pool) with a 3x3
            stride-1 conv and no pooling, the usual stem for 28-32 px images.

    Pretrained weights are not loaded here: :func:`lit_finetune.transfer.load_pretrained`
    does that for every source (checkpoint, state dict or torchvision weight name).
    """
    if name in SMALL_RESNETS:
        layers, widths = SMALL_RESNETS[name]
        net: nn.Module = NarrowResNet(layers, widths, in_channels)
    elif name in TORCHVISION_RESNETS:
        net = models.get_model(name, weights=None)
    else:
        raise ValueError(f"Unknown backbone {name!r}. Choose one of: {', '.join(AVAILABLE_BACKBONES)}.")
    stem_width = net.conv1.out_channels
    if small_input:
        net.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif net.conv1.in_channels != in_channels:
        net.conv1 = nn.Conv2d(in_channels, stem_width, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    num_features = net.fc.in_features
    net.fc = nn.Identity()
    net.input_convs = ("conv1",)  # as NarrowResNet declares it; torchvision's ResNet class has no such attribute
    return net, num_features


def normalize_input(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` images to the network's input statistics: ``((x + 1) / 2 - mean) / std``, per channel."""
    return x * (0.5 / std) + (0.5 - mean) / std


class ResNetClassifierNet(nn.Module):
    """A ResNet classifier as a plain module: ``backbone``, linear ``head`` and the input statistics
    (``input_mean``, ``input_std``), with the state-dict layout of :class:`~lit_finetune.ImageClassifier`.

    What code that only *uses* a trained classifier needs (e.g. the FID feature extractor), so it
    can rebuild one from a checkpoint without importing the LightningModule.
    """

    def __init__(
        self, num_classes: int, backbone: str = "resnet_small", in_channels: int = 1, image_size: int = 28,
        small_input: bool | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.in_channels, self.image_size = in_channels, image_size
        self.backbone, num_features = build_resnet(
            backbone, in_channels, small_input=image_size <= 64 if small_input is None else small_input
        )
        self.head = nn.Linear(num_features, num_classes)
        self.register_buffer("input_mean", torch.zeros(1, in_channels, 1, 1))
        self.register_buffer("input_std", torch.ones(1, in_channels, 1, 1))

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        return normalize_input(x, self.input_mean, self.input_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(self.normalize_input(x)))
