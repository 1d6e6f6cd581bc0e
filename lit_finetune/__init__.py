"""lit_finetune: Lightning modules, datamodules and callbacks for fine-tuning and transfer learning."""

from lit_finetune.modules import DCGAN, VAE, GANAugmentedClassifier, ImageClassifier, MetaPretrainer, TransferModule

__version__ = "0.1.0"
__all__ = ["DCGAN", "VAE", "GANAugmentedClassifier", "ImageClassifier", "MetaPretrainer", "TransferModule", "__version__"]
