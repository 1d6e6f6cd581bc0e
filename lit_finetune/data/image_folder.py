"""A user's own images: ``root/train/<class>/*.png`` (and ``root/test/<class>/...``)."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_finetune.data.base import (
    IMAGE_SUFFIXES,
    DatasetNotFoundError,
    ImageDataModule,
    list_image_files,
    read_image_files,
)

_LAYOUT = "expected root/train/<class>/<images> (and optionally root/test/<class>/<images>)"


def _describe(path: Path) -> str:
    """``'data/imgs'`` plus the absolute path when they differ, so a relative typo is easy to spot."""
    resolved = path.expanduser().absolute()
    return repr(str(path)) if str(resolved) == str(path) else f"{str(path)!r} (= {str(resolved)!r})"


def _class_dirs(folder: Path) -> list[str]:
    """Sorted names of the class sub-folders of ``folder`` (hidden folders such as ``.ipynb_checkpoints`` skipped)."""
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_image(folder: Path) -> bool:
    """Whether ``folder`` holds at least one image file (stops at the first one found)."""
    return any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in folder.rglob("*"))


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders, read once into memory at ``image_size``.

    Layout: ``root/train/<class_name>/<images>`` and optionally ``root/test/<class_name>/...``
    (``root/<class_name>/...`` alone is read as train). Class names are the sorted folder names
    of the train split; the test split must use the same names. Meant for datasets that fit in
    memory at the chosen size (e.g. 50k images at 64x64x3 is 600 MB).

    The layout is checked when the datamodule is built, so a mistyped ``root``, a train folder
    without class sub-folders, an empty class folder, or a test class folder that train does
    not have stops at once with the path in the message (rather than as ``num_classes=0``
    later, or a test class silently dropped).
    """

    def __init__(self, root: str = "data/images", channels: int = 3, image_size: int = 32, **kwargs) -> None:
        super().__init__(channels=channels, image_size=image_size, **kwargs)
        self.root = Path(root)
        self.all_class_names = tuple(self._check_layout())

    def _split_dir(self, split: str) -> Path | None:
        if (self.root / split).is_dir():
            return self.root / split
        if split == "train" and self.root.is_dir() and not (self.root / "test").is_dir():
            return self.root
        return None

    def _check_layout(self) -> list[str]:
        """Validate the folder tree and return the class names (from train)."""
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise DatasetNotFoundError(f"ImageFolderDataModule root {_describe(self.root)} {what}; {_LAYOUT}.")
        train_dir = self._split_dir("train")
        if train_dir is None:  # root/test exists but root/train does not
            raise DatasetNotFoundError(
                f"ImageFolderDataModule root {_describe(self.root)} has a test/ folder but no train/ folder "
                f"{_describe(self.root / 'train')}; {_LAYOUT}."
            )
        names = _class_dirs(train_dir)
        if not names:
            raise DatasetNotFoundError(
                f"Train folder {_describe(train_dir)} has no class sub-folders; {_LAYOUT}."
            )
        empty = [n for n in names if not _has_image(train_dir / n)]
        if empty:
            raise DatasetNotFoundError(
                f"Class folder(s) {[str(train_dir / n) for n in empty]} hold no image files "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove them or add images."
            )
        test_dir = self.root / "test"
        if test_dir.is_dir():
            test_names = _class_dirs(test_dir)
            only_test = sorted(set(test_names) - set(names))
            if only_test:
                raise DatasetNotFoundError(
                    f"Test class folder(s) {[str(test_dir / n) for n in only_test]} have no counterpart in the train "
                    f"folder {_describe(train_dir)} (train classes: {names}); rename or remove them, or add the class "
                    "to train."
                )
            missing = sorted(set(names) - set(test_names))
            if missing:
                raise DatasetNotFoundError(
                    f"Test folder {_describe(test_dir)} lacks class folder(s) {missing} that train has; "
                    "add them (each with at least one image) or remove the test folder."
                )
        return names

    def read_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self._split_dir(split)
        if folder is None:
            raise DatasetNotFoundError(
                f"No {split} images: expected folder {str(self.root / split)!r} with one sub-folder per class."
            )
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
