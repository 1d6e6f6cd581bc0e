"""The LightningModules."""

from lit_finetune.modules.augmented import GANAugmentedClassifier
from lit_finetune.modules.base import Network, TransferModule
from lit_finetune.modules.classifier import ImageClassifier
from lit_finetune.modules.dcgan import DCGAN
from lit_finetune.modules.meta import MetaPretrainer
from lit_finetune.modules.vae import VAE

__all__ = ["DCGAN", "VAE", "GANAugmentedClassifier", "ImageClassifier", "MetaPretrainer", "Network", "TransferModule"]
