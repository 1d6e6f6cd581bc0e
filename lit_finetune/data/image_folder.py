"""A user's own images: ``root/train/<class>/*.png`` (and ``root/test/<class>/...``), or unlabelled ``root/*.png``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_finetune.data.base import (
    IMAGE_SUFFIXES,
    DatasetNotFoundError,
    ImageDataModule,
    list_image_files,
    read_image_files,
)

_LAYOUT = (
    "expected root/train/<class>/<images> (and optionally root/test/<class>/<images>), "
    "or, for unlabelled images, root/<images> (or root/train/<images>) with labelled=False"
)
_FLAT_CLASS = "images"  # the one class name of an unlabelled folder


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


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def _iter_unlabelled(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, skipping hidden files and folders
    (``.ipynb_checkpoints``, macOS ``._name.png`` resource forks, ...)."""
    for path in folder.rglob("*"):
        if _is_image(path) and not any(part.startswith(".") for part in path.relative_to(folder).parts):
            yield path


class ImageFolderDataModule(ImageDataModule):
    """Images in class folders, or one unlabelled folder, read once into memory at ``image_size``.

    Labelled layout: ``root/train/<class_name>/<images>`` and optionally ``root/test/<class_name>/...``
    (``root/<class_name>/...`` alone is read as train). Class names are the sorted folder names
    of the train split; the test split must use the same names.

    Unlabelled layout (``labelled=False``), for generative modules: every image under ``root``
    (or under ``root/train``, with optionally ``root/test`` as the test split), sub-folders
    included (so a class tree can also be read as one pool), hidden files and folders skipped.
    Batches are ``(image, 0)``: ``num_classes == 1``, ``class_names == ["images"]``.
    ``val_split`` and ``samples_per_class`` (then: images in all) work as for one class. Without a
    ``root/test`` folder there is no test split, and ``test`` (or ``predict`` without
    ``predict_dir``) stops with an error saying so: validation images are never reused as test
    images, since models are selected on them.

    ``labelled=None`` (default) decides from the folder: a ``root`` holding image files directly
    and no (non-hidden) sub-folders is unlabelled; one with sub-folders is labelled; one with both
    is ambiguous and stops with an error asking for ``labelled=True`` (class folders; loose files
    ignored) or ``labelled=False`` (every image). ``root/train/<images>`` without class folders
    needs ``labelled=False`` said explicitly.

    Meant for datasets that fit in memory at the chosen size (e.g. 50k images at 64x64x3 is 600 MB).
    The layout is checked when the datamodule is built, so a mistyped ``root``, a train folder
    without class sub-folders, an empty class or unlabelled folder, or a test class folder that
    train does not have stops at once with the path in the message (rather than as
    ``num_classes=0`` later, or a test class silently dropped).
    """

    def __init__(
        self,
        root: str = "data/images",
        channels: int = 3,
        image_size: int = 32,
        labelled: bool | None = None,
        **kwargs,
    ) -> None:
        super().__init__(channels=channels, image_size=image_size, **kwargs)
        self.root = Path(root)
        self.labelled = self._resolve_labelled(labelled)
        self.all_class_names = tuple(self._check_layout() if self.labelled else self._check_unlabelled_layout())

    def _split_dir(self, split: str) -> Path | None:
        if (self.root / split).is_dir():
            return self.root / split
        if split == "train" and self.root.is_dir() and not (self.root / "test").is_dir():
            return self.root
        return None

    def _check_root(self) -> None:
        if not self.root.is_dir():
            what = "is a file, not a folder" if self.root.exists() else "does not exist"
            raise DatasetNotFoundError(f"ImageFolderDataModule root {_describe(self.root)} {what}; {_LAYOUT}.")

    def _resolve_labelled(self, labelled: bool | None) -> bool:
        """``labelled`` as given, or decided from what ``root`` holds directly (see the class docstring)."""
        if labelled is not None:
            return labelled
        self._check_root()
        loose = any(_is_image(p) for p in self.root.iterdir())
        if not loose:
            return True
        sub_folders = _class_dirs(self.root)
        if sub_folders:
            raise DatasetNotFoundError(
                f"ImageFolderDataModule root {_describe(self.root)} holds both image files and sub-folders "
                f"{sub_folders}; say which layout it is: labelled=True (one sub-folder per class, the loose "
                "files ignored) or labelled=False (every image, sub-folders included, as one unlabelled set)."
            )
        rank_zero_info(f"ImageFolderDataModule: {str(self.root)!r} holds images and no sub-folders: read unlabelled.")
        return False

    def _checked_train_dir(self) -> Path:
        """The train folder of an existing root; an error naming both paths when only test/ exists."""
        self._check_root()
        train_dir = self._split_dir("train")
        if train_dir is None:  # root/test exists but root/train does not
            raise DatasetNotFoundError(
                f"ImageFolderDataModule root {_describe(self.root)} has a test/ folder but no train/ folder "
                f"{_describe(self.root / 'train')}; {_LAYOUT}."
            )
        return train_dir

    def _check_unlabelled_layout(self) -> list[str]:
        """Validate an unlabelled folder (some image in train, and in test if there is one)."""
        train_dir = self._checked_train_dir()
        for folder in (train_dir, self.root / "test"):
            if folder.is_dir() and next(_iter_unlabelled(folder), None) is None:
                raise DatasetNotFoundError(
                    f"Unlabelled image folder {_describe(folder)} holds no image files "
                    f"({', '.join(sorted(IMAGE_SUFFIXES))}; hidden files skipped); add images or fix the path."
                )
        return [_FLAT_CLASS]

    def _check_layout(self) -> list[str]:
        """Validate the folder tree and return the class names (from train)."""
        train_dir = self._checked_train_dir()
        names = _class_dirs(train_dir)
        if not names:
            raise DatasetNotFoundError(f"Train folder {_describe(train_dir)} has no class sub-folders; {_LAYOUT}.")
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
        if not self.labelled:
            return self._read_unlabelled(split, folder)
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

    def _read_unlabelled(self, split: str, folder: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        if folder is None:
            raise DatasetNotFoundError(
                f"No {split} split: the unlabelled folder {_describe(self.root)} has no {split}/ folder. Put the "
                f"training images in {str(self.root / 'train')!r} and the {split} images in "
                f"{str(self.root / split)!r}, or evaluate on the validation split (`validate`) instead."
            )
        files = sorted(_iter_unlabelled(folder))
        if not files:  # checked at construction; the folder changed since
            raise DatasetNotFoundError(f"Unlabelled image folder {_describe(folder)} holds no image files.")
        images = read_image_files(files, self.image_size, self.channels)
        return images, torch.zeros(len(files), dtype=torch.long)
