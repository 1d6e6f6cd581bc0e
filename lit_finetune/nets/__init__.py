"""Plain ``nn.Module`` networks (no Lightning)."""

from lit_finetune.nets.dcgan import DCGANDiscriminator, DCGANGenerator, dcgan_init_
from lit_finetune.nets.resnet import AVAILABLE_BACKBONES, NarrowResNet, ResNetClassifierNet, build_resnet
from lit_finetune.nets.vae import ConvDecoder, ConvEncoder

__all__ = [
    "AVAILABLE_BACKBONES",
    "ConvDecoder",
    "ConvEncoder",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "NarrowResNet",
    "ResNetClassifierNet",
    "build_resnet",
    "dcgan_init_",
]
