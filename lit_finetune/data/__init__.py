"""LightningDataModules: batches of ``(B, C, H, W)`` float32 images in ``[-1, 1]`` with int labels."""

from lit_finetune.data.base import DatasetNotFoundError, ImageDataModule, split_indices
from lit_finetune.data.digits import DigitsDataModule
from lit_finetune.data.episodic import EpisodeDataset, EpisodicDataModule
from lit_finetune.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNISTDataModule
from lit_finetune.data.image_folder import ImageFolderDataModule
from lit_finetune.data.resumable import ResumableDataLoader
from lit_finetune.data.tensor_dataset import EpochSeededRandomSampler, TensorImageDataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "EpisodeDataset",
    "EpisodicDataModule",
    "EpochSeededRandomSampler",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageFolderDataModule",
    "ResumableDataLoader",
    "TensorImageDataset",
    "split_indices",
]
