"""ImageFolderDataModule on a user's unlabelled images: a flat folder, for generative modules."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lit_finetune.data import DatasetNotFoundError, ImageFolderDataModule

GREYS = [0, 30, 60, 90, 120, 150, 180, 210, 240, 255]  # one flat grey level per image


def _flat(folder: Path, levels=GREYS, size: int = 10) -> Path:
    """``folder/img<i>.png``: RGB images of one grey level each, plus files that must be skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, level in enumerate(levels):
        Image.fromarray(np.full((size, size + 2, 3), level, dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def _with_hidden_files(folder: Path) -> None:
    (folder / "._img0.png").write_bytes(b"\x00\x05\x16\x07")  # a macOS resource fork: not an image
    (folder / ".ipynb_checkpoints").mkdir()
    Image.new("RGB", (4, 4), "red").save(folder / ".ipynb_checkpoints" / "copy.png")
    (folder / "notes.txt").write_text("not an image")


def _all_images(dm: ImageFolderDataModule, *loaders) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(batch for loader in loaders for batch in loader))
    return torch.cat(xs), torch.cat(ys)


def test_flat_folder_is_detected_and_batches_are_images_in_range(tmp_path):
    _with_hidden_files(_flat(tmp_path / "imgs"))
    dm = ImageFolderDataModule(root=str(tmp_path / "imgs"), image_size=8, val_split=2, batch_size=3, augment=False)
    assert dm.labelled is False and dm.num_classes == 1 and dm.class_names == ["images"]
    dm.setup("fit")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2  # the hidden files are not read
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 8, 8) and x.dtype == torch.float32 and y.tolist() == [0, 0, 0]
    x, y = _all_images(dm, dm.train_dataloader(), dm.val_dataloader())
    assert x.min() == -1 and x.max() == 1 and (y == 0).all()
    # every file exactly once: its grey level maps to level / 127.5 - 1 at each pixel
    levels = sorted(round(float((img.mean() + 1) * 127.5)) for img in x)
    assert levels == GREYS and all(img.std() < 1e-6 for img in x)


def test_flat_folder_few_shot_fraction_split_and_grayscale(tmp_path):
    _flat(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=6, channels=1, val_split=0.2, samples_per_class=3)
    dm.setup("fit")
    assert len(dm.val_set) == 2 and len(dm.train_set) == 3  # samples_per_class: images in all, for one class
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 1, 6, 6) and -1 <= x.min() and x.max() <= 1 and (y == 0).all()
    again = ImageFolderDataModule(root=str(tmp_path), image_size=6, channels=1, val_split=0.2, samples_per_class=3)
    again.setup("fit")
    assert torch.equal(again.val_set.images, dm.val_set.images)  # the seeded split is reproducible


def test_flat_folder_has_no_test_split_unless_root_test_exists(tmp_path):
    dm = ImageFolderDataModule(root=str(_flat(tmp_path / "flat")), image_size=8)
    for stage in ("test", "predict"):  # predict without predict_dir reads the test split
        with pytest.raises(DatasetNotFoundError, match="No test split: the unlabelled folder") as err:
            dm.setup(stage)
        assert str(tmp_path / "flat" / "test") in str(err.value) and "`validate`" in str(err.value)
    dm = ImageFolderDataModule(root=str(tmp_path / "flat"), image_size=8, predict_dir=str(tmp_path / "flat"))
    dm.setup("predict")
    assert len(dm.predict_set) == len(GREYS)

    split = tmp_path / "split"
    _flat(split / "train")
    _flat(split / "test", levels=[0, 255, 128])
    dm = ImageFolderDataModule(root=str(split), image_size=8, labelled=False, val_split=2)
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2 and len(dm.test_set) == 3
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 0]
    with pytest.raises(DatasetNotFoundError, match="has no class sub-folders.*labelled=False"):
        ImageFolderDataModule(root=str(split))  # root/train/<images> is read unlabelled only when asked


def test_class_tree_read_unlabelled_pools_every_class_recursively(tmp_path):
    _flat(tmp_path / "train" / "ant", levels=[0, 50])
    _flat(tmp_path / "train" / "bee" / "more", levels=[100, 150, 200])  # nested: read too
    labelled = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_split=0)
    assert labelled.labelled is True and labelled.class_names == ["ant", "bee"]
    pooled = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_split=0, labelled=False)
    pooled.setup("fit")
    assert pooled.num_classes == 1 and len(pooled.train_set) == 5 and (pooled.train_set.labels == 0).all()


def test_flat_folder_fits_a_generative_style_module(tmp_path):
    """Through a plain Trainer: the module only sees (image, 0) batches in [-1, 1]."""

    class Seen(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.batches: list[tuple[tuple[int, ...], float, float, set[int]]] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.batches.append((tuple(x.shape), float(x.min()), float(x.max()), set(y.tolist())))
            return (self.w * x.mean()).pow(2).sum() + self.w.pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    model = Seen()
    dm = ImageFolderDataModule(root=str(_flat(tmp_path / "imgs")), image_size=8, val_split=2, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert [b[0] for b in model.batches] == [(4, 3, 8, 8), (4, 3, 8, 8)]
    assert all(-1 <= lo and hi <= 1 and labels == {0} for _, lo, hi, labels in model.batches)


def test_flat_folder_errors_name_the_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for labelled in (None, False):
        with pytest.raises(DatasetNotFoundError, match=r"'imsg' \(= '.*imsg'\) does not exist") as err:
            ImageFolderDataModule(root="imsg", labelled=labelled)
        assert str(tmp_path / "imsg") in str(err.value) and "root/<images>" in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    _with_hidden_files(empty)  # only hidden files and a text file: nothing to read
    with pytest.raises(DatasetNotFoundError, match=re.escape(repr(str(empty))) + " holds no image files"):
        ImageFolderDataModule(root=str(empty), labelled=False)
    no_classes = re.escape(str(empty)) + ".* has no class sub-folders.*labelled=False"
    with pytest.raises(DatasetNotFoundError, match=no_classes):
        ImageFolderDataModule(root=str(empty))  # not detectable as flat: no images in it
    flat = _flat(tmp_path / "flat")
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(flat)) + ".* has no class sub-folders"):
        ImageFolderDataModule(root=str(flat), labelled=True)  # said labelled: no guessing

    mixed = _flat(tmp_path / "mixed")
    _flat(mixed / "cats", levels=[10])
    with pytest.raises(DatasetNotFoundError, match=r"holds both image files and sub-folders \['cats'\].*labelled=True"):
        ImageFolderDataModule(root=str(mixed))
    assert ImageFolderDataModule(root=str(mixed), labelled=True).class_names == ["cats"]
    assert ImageFolderDataModule(root=str(mixed), labelled=False).class_names == ["images"]

    empty_test = _flat(tmp_path / "split" / "train").parent
    (empty_test / "test").mkdir()
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(empty_test / "test")) + ".* holds no image files"):
        ImageFolderDataModule(root=str(empty_test), labelled=False)
    only_test = _flat(tmp_path / "only_test" / "test").parent
    with pytest.raises(DatasetNotFoundError, match="has a test/ folder but no train/ folder"):
        ImageFolderDataModule(root=str(only_test), labelled=False)
