"""One LightningDataModule base for every image dataset of the package.

Subclasses only say how to read a split as a uint8 tensor (:meth:`ImageDataModule.read_split`).
The base does the rest, the same way for every dataset: class subsets with labels remapped to
``0..k-1``, a seeded class-balanced validation split taken from train, seeded few-shot sampling
(``samples_per_class``), resizing and channel conversion once at setup, batched augmentation,
and prediction on a folder of image files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from lit_finetune.data.resumable import ResumableDataLoader
from lit_finetune.data.tensor_dataset import (
    EpochSeededRandomSampler,
    TensorImageDataset,
    collate_batched,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are missing or unreadable; the message says how to get them."""


def convert_images(images: torch.Tensor, image_size: int, channels: int) -> torch.Tensor:
    """uint8 ``(N, C, H, W)`` -> uint8 ``(N, channels, image_size, image_size)``, in chunks."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    out = []
    for chunk in images.split(4096):
        if chunk.shape[1] != channels:
            chunk = TF.rgb_to_grayscale(chunk) if channels == 1 else chunk[:, :1].expand(-1, 3, -1, -1)
        if chunk.shape[-2:] != (image_size, image_size):
            chunk = TF.resize(chunk, [image_size, image_size], antialias=True)
        out.append(chunk.contiguous())
    return torch.cat(out) if out else images.new_zeros((0, channels, image_size, image_size))


def read_image_files(paths: Sequence[Path], image_size: int, channels: int) -> torch.Tensor:
    """Read image files into one uint8 ``(N, channels, image_size, image_size)`` tensor."""
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as img:
                img = img.convert(mode).resize((image_size, image_size), Image.BILINEAR)
                arrays.append(np.asarray(img, dtype=np.uint8).reshape(image_size, image_size, channels))
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetNotFoundError(f"Cannot read image {str(path)!r} ({err}); remove or replace it.") from err
    if not arrays:
        return torch.zeros((0, channels, image_size, image_size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def list_image_files(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted); hidden files and folders (``.x``) are skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetNotFoundError(f"Image folder {str(folder)!r} does not exist.")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)  # macOS ._x.png, checkpoints
    )
    if not files:
        raise DatasetNotFoundError(f"No image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(folder)!r}.")
    return files


def split_indices(
    labels: np.ndarray,
    val_split: int | float,
    samples_per_class: int | None,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-balanced (train, val) indices.

    Validation comes first out of each class (a fraction, or an absolute count spread evenly
    over classes), then ``samples_per_class`` training images per class from what is left.
    The validation set does not depend on ``samples_per_class``, so few-shot arms of one seed
    are selected on the same validation images.
    """
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    train, val = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_split * len(idx))) if isinstance(val_split, float) else int(val_split) // len(classes)
        if n_val >= len(idx):
            raise ValueError(f"val_split={val_split} leaves no training images for class {c}")
        val.append(idx[:n_val])
        rest = idx[n_val:]
        if samples_per_class is not None:
            if samples_per_class > len(rest):
                raise ValueError(
                    f"samples_per_class={samples_per_class} but class {c} has only {len(rest)} training images "
                    "after the validation split; lower samples_per_class or val_split."
                )
            rest = rest[:samples_per_class]
        train.append(rest)
    if val_split > 0 and not sum(len(v) for v in val):
        why = "a count is spread evenly over the classes" if isinstance(val_split, int) else "it rounds to 0 per class"
        raise ValueError(
            f"val_split={val_split} puts no image in the validation split ({why}, {len(classes)} classes): pass "
            f"val_split={len(classes)} or more (one image per class) or a larger fraction."
        )
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class ImageDataModule(L.LightningDataModule):
    """Base for image datamodules: batches of ``(B, C, H, W)`` float32 in ``[-1, 1]`` and int labels.

    Args:
        classes: original class ids to keep, relabelled ``0..k-1`` in the given order
            (``None`` keeps all).
        samples_per_class: few-shot size: this many training images per class (``None``: all).
        val_split: validation images taken from train: a fraction per class, or a total count; ``0``: no
            validation (the Trainer then runs none).
        image_size: square side the images are resized to, once, at setup.
        channels: 1 (grayscale) or 3 (RGB); converted at setup.
        batch_size: training batch size (evaluation uses the same).
        num_workers: DataLoader workers; 0 is fastest for in-memory data on small machines.
        augment: random translation (and flips if ``hflip``) on training batches.
        hflip: allow left-right flips (off for digits and text).
        seed: seeds the split, the few-shot sample, the shuffling and the augmentation. Under DDP
            Lightning replaces the shuffling sampler with its ``DistributedSampler``, which shuffles by
            ``seed_everything``'s seed instead (the split, sample and augmentation still follow this one).
        predict_dir: folder of image files for ``predict``; defaults to the test split.
        data_on_device: keep the images on the Trainer's device and build (and augment) batches there,
            so a step never waits for a host-to-device copy of its batch or for DataLoader workers.
            ``None`` (auto): on for a CUDA device when ``num_workers=0`` and every split fits in
            :attr:`DEVICE_MEMORY_SHARE` of its free memory; ``True`` also elsewhere (needs
            ``num_workers=0``); ``False`` keeps them in host memory. Batches are the same either way
            (the random draws stay on the CPU generator). Decided at every ``setup``, from the
            Trainer the datamodule is attached to (none: the CPU).
    """

    #: the share of a device's free memory the images may take for ``data_on_device=None`` to put them there
    DEVICE_MEMORY_SHARE = 0.25

    #: names of all classes of the dataset, by original class id
    all_class_names: Sequence[str] = ()

    def __init__(
        self,
        classes: list[int] | None = None,
        samples_per_class: int | None = None,
        val_split: int | float = 0.1,
        image_size: int = 28,
        channels: int = 1,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: bool = True,
        hflip: bool = True,
        seed: int = 0,
        predict_dir: str | None = None,
        data_on_device: bool | None = None,
    ) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if data_on_device and num_workers > 0:
            raise ValueError(
                f"data_on_device=True builds batches on the device, in the training process; it needs num_workers=0 "
                f"(got {num_workers}). Set num_workers=0, or data_on_device=False to use workers."
            )
        if samples_per_class is not None and samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1 or None, got {samples_per_class}")
        self.classes = list(classes) if classes is not None else None
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            repeated = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise ValueError(f"classes {self.classes} names {repeated} more than once: list each class id once.")
        self.samples_per_class = samples_per_class
        self.val_split = val_split
        self.image_size = image_size
        self.channels = channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.hflip = hflip
        self.seed = seed
        self.predict_dir = predict_dir
        self.data_on_device = data_on_device
        self.train_set: TensorImageDataset | None = None
        self.val_set: TensorImageDataset | None = None
        self.test_set: TensorImageDataset | None = None
        self.predict_set: TensorImageDataset | None = None
        self.predict_paths: list[Path] = []

    # -- what subclasses provide ------------------------------------------------------------
    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(uint8 images (N, C, H, W), int64 labels)`` for ``split`` in {"train", "test"}."""
        raise NotImplementedError

    # -- derived facts ----------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else len(self.all_class_names)

    @property
    def class_names(self) -> list[str]:
        ids = self.classes if self.classes is not None else range(len(self.all_class_names))
        return [str(self.all_class_names[i]) for i in ids]

    # -- building ---------------------------------------------------------------------------
    def _select_classes(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.classes is None:
            return images, labels
        unknown = sorted(set(self.classes) - set(range(len(self.all_class_names))))
        if unknown:
            raise ValueError(f"classes {unknown} do not exist; valid ids are 0..{len(self.all_class_names) - 1}")
        remap = torch.full((len(self.all_class_names),), -1, dtype=torch.long)
        remap[torch.tensor(self.classes)] = torch.arange(len(self.classes))
        new_labels = remap[labels]
        keep = new_labels >= 0
        return images[keep], new_labels[keep]

    def _load(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.read_split(split)
        images, labels = self._select_classes(images, labels)
        return convert_images(images, self.image_size, self.channels), labels

    def _dataset(self, images: torch.Tensor, labels: torch.Tensor, train: bool) -> TensorImageDataset:
        return TensorImageDataset(images, labels, augment=train and self.augment, hflip=self.hflip, seed=self.seed)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load("train")
            train_idx, val_idx = split_indices(labels.numpy(), self.val_split, self.samples_per_class, self.seed)
            train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
            self.train_set = self._dataset(images[train_idx], labels[train_idx], train=True)
            self.val_set = self._dataset(images[val_idx], labels[val_idx], train=False)
        if stage in (None, "test") and self.test_set is None:
            self.test_set = self._dataset(*self._load("test"), train=False)
        if stage == "predict" and self.predict_set is None:
            if self.predict_dir is None:
                images, labels = self._load("test")
                self.predict_paths = []
            else:
                self.predict_paths = list_image_files(self.predict_dir)
                images = read_image_files(self.predict_paths, self.image_size, self.channels)
                labels = torch.full((len(images),), -1, dtype=torch.long)
            self.predict_set = self._dataset(images, labels, train=False)
        self._place_data()

    # -- where batches are built ------------------------------------------------------------
    def _datasets(self) -> list[TensorImageDataset]:
        return [d for d in (self.train_set, self.val_set, self.test_set, self.predict_set) if d is not None]

    def data_device(self) -> torch.device:
        """Where the images are kept and batches built: the Trainer's device when ``data_on_device`` holds there
        (see the class docstring), else the CPU."""
        trainer = getattr(self, "trainer", None)
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        if self.data_on_device is False or device.type == "cpu":
            return torch.device("cpu")
        if self.data_on_device is None:
            if device.type != "cuda" or self.num_workers > 0:
                return torch.device("cpu")
            free, _ = torch.cuda.mem_get_info(device)
            needed = sum(d.images.nbytes + d.labels.nbytes for d in self._datasets() if d.device != device)
            if needed > self.DEVICE_MEMORY_SHARE * free:
                return torch.device("cpu")
        return device

    def _place_data(self) -> None:
        device = self.data_device()
        for dataset in self._datasets():
            dataset.to(device)

    def _loader(self, dataset: TensorImageDataset | None, shuffle: bool, name: str) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built the {name} split yet.")
        if len(dataset) == 0:
            raise ValueError(
                f"The {name} split of {type(self).__name__} is empty; check classes/val_split (for no validation: "
                "val_split=0, or the Trainer's limit_val_batches=0)."
            )
        # the shuffled (training) loader is resumable mid-epoch; evaluation loaders always run whole
        loader_class = ResumableDataLoader if shuffle else DataLoader
        return loader_class(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochSeededRandomSampler(dataset, self.seed) if shuffle else None,
            collate_fn=collate_batched,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # each iterator draws a base seed; from its own generator it leaves the global RNG (dropout...)
            # untouched, so the global state a checkpoint saves is what the next training step uses
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True, name="train")

    def val_dataloader(self) -> DataLoader | list:
        if self.val_split == 0:  # no validation asked for: Lightning skips the loop for an empty list
            return []
        return self._loader(self.val_set, shuffle=False, name="validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False, name="test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, shuffle=False, name="predict")
