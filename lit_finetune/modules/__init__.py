"""The LightningModules."""

from lit_finetune.modules.base import Network, TransferModule
from lit_finetune.modules.classifier import ImageClassifier
from lit_finetune.modules.dcgan import DCGAN

__all__ = ["DCGAN", "ImageClassifier", "Network", "TransferModule"]
