"""Fashion-MNIST from its IDX files: Debian's copy, any folder, or a torchvision download."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from lit_finetune.data.base import DatasetNotFoundError, ImageDataModule

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_HOW_TO_GET = (
    "Install Debian's copy (apt-get install dataset-fashion-mnist, files land in "
    f"{DEBIAN_ROOT}), pass root=<folder with the IDX files>, or set download=True to fetch it through torchvision."
)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a uint8 array, validating its header and size."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetNotFoundError(f"{str(path)!r} is unreadable or truncated ({err}). {_HOW_TO_GET}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetNotFoundError(f"{str(path)!r} is not a uint8 IDX file (bad magic number). {_HOW_TO_GET}")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) - offset != int(np.prod(dims)):
        raise DatasetNotFoundError(
            f"{str(path)!r} is corrupt: header says {dims}, file holds {len(data) - offset} bytes. {_HOW_TO_GET}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def find_idx(root: Path, stem: str) -> Path:
    """``stem`` or ``stem.gz`` in ``root`` (or torchvision's ``FashionMNIST/raw`` below it)."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DatasetNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {str(root)!r}. {_HOW_TO_GET}")


class FashionMNISTDataModule(ImageDataModule):
    """Fashion-MNIST (10 classes, 60k train / 10k test, 28x28 grayscale).

    The embedded default uses classes 0-4 as the source domain and 5-9 as the target.

    Args:
        root: folder with the four IDX files (gzipped or not); defaults to Debian's copy.
        download: fetch the files with torchvision into ``root`` if they are missing (needs a network).
        **kwargs: see :class:`ImageDataModule`.
    """

    all_class_names = FASHION_MNIST_CLASSES

    def __init__(self, root: str = DEBIAN_ROOT, download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.download = download

    def prepare_data(self) -> None:
        if self.download:
            try:
                find_idx(Path(self.root), _FILES["train"][0])
                find_idx(Path(self.root), _FILES["test"][0])
            except DatasetNotFoundError:
                from torchvision.datasets import FashionMNIST

                FashionMNIST(self.root, train=True, download=True)
                FashionMNIST(self.root, train=False, download=True)

    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        root = Path(self.root)
        image_file, label_file = _FILES[split]
        images = read_idx(find_idx(root, image_file))
        labels = read_idx(find_idx(root, label_file))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DatasetNotFoundError(
                f"Fashion-MNIST {split} files in {str(root)!r} do not match: images {images.shape}, "
                f"labels {labels.shape}. {_HOW_TO_GET}"
            )
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
