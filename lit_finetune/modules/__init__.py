"""The LightningModules."""

from lit_finetune.modules.base import Network, TransferModule
from lit_finetune.modules.classifier import ImageClassifier

__all__ = ["ImageClassifier", "Network", "TransferModule"]
