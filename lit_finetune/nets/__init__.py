"""Plain ``nn.Module`` networks (no Lightning)."""

from lit_finetune.nets.dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_init_
from lit_finetune.nets.resnet import AVAILABLE_BACKBONES, NarrowResNet, build_resnet

__all__ = ["AVAILABLE_BACKBONES", "DCGANDiscriminator", "DCGANGenerator", "NarrowResNet", "build_resnet", "dcgan_init_"]
