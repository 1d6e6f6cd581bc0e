"""A user's own images: ``root/train/<class>/*.png`` (and ``root/test/<class>/...``)."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_finetune.data.base import DatasetNotFoundError, ImageDataModule, list_image_files, read_image_files


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders, read once into memory at ``image_size``.

    Layout: ``root/train/<class_name>/<images>`` and optionally ``root/test/<class_name>/...``
    (``root/<class_name>/...`` alone is read as train). Class names are the sorted folder names
    of the train split; the test split must use the same names. Meant for datasets that fit in
    memory at the chosen size (e.g. 50k images at 64x64x3 is 600 MB).
    """

    def __init__(self, root: str = "data/images", channels: int = 3, image_size: int = 32, **kwargs) -> None:
        super().__init__(channels=channels, image_size=image_size, **kwargs)
        self.root = Path(root)
        train_dir = self._split_dir("train")
        if train_dir is None:
            self.all_class_names = ()
        else:
            self.all_class_names = tuple(sorted(p.name for p in train_dir.iterdir() if p.is_dir()))

    def _split_dir(self, split: str) -> Path | None:
        if (self.root / split).is_dir():
            return self.root / split
        if split == "train" and self.root.is_dir():
            return self.root
        return None

    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self._split_dir(split)
        if folder is None:
            raise DatasetNotFoundError(
                f"No {split} images: expected folder {str(self.root / split)!r} with one sub-folder per class."
            )
        if not self.all_class_names:
            raise DatasetNotFoundError(f"{str(self.root)!r} has no class sub-folders (root/train/<class>/*.png).")
        paths, labels = [], []
        for label, name in enumerate(self.all_class_names):
            class_dir = folder / name
            if not class_dir.is_dir():
                raise DatasetNotFoundError(f"{split} split lacks class folder {str(class_dir)!r}.")
            files = list_image_files(class_dir)
            paths += files
            labels += [label] * len(files)
        images = read_image_files(paths, self.image_size, self.channels)
        return images, torch.tensor(labels, dtype=torch.long)
