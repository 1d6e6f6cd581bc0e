"""Plain ``nn.Module`` networks (no Lightning)."""

from lit_finetune.nets.resnet import AVAILABLE_BACKBONES, NarrowResNet, build_resnet

__all__ = ["AVAILABLE_BACKBONES", "NarrowResNet", "build_resnet"]
