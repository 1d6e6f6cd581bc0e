import gzip

import numpy as np
import pytest
import torch

from lit_finetune.data import (
    DatasetNotFoundError,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    TensorImageDataset,
    split_indices,
)
from lit_finetune.data.tensor_dataset import EpochSeededRandomSampler


def test_fashion_subset_remaps_labels_and_few_shot_is_balanced(fashion_root):
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=20, val_split=500)
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 5 and dm.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert torch.bincount(dm.train_set.labels).tolist() == [20] * 5
    assert torch.bincount(dm.val_set.labels).tolist() == [100] * 5
    assert len(dm.test_set) == 5000 and set(dm.test_set.labels.tolist()) == {0, 1, 2, 3, 4}
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    assert x.min() >= -1 and x.max() <= 1 and y.max() < 5


def test_split_is_seeded_and_val_independent_of_few_shot():
    labels = np.repeat(np.arange(3), 50)
    a_train, a_val = split_indices(labels, 0.2, 5, seed=1)
    b_train, b_val = split_indices(labels, 0.2, 5, seed=1)
    _, c_val = split_indices(labels, 0.2, None, seed=1)
    _, d_val = split_indices(labels, 0.2, 5, seed=2)
    assert np.array_equal(a_train, b_train) and np.array_equal(a_val, b_val)
    assert np.array_equal(a_val, c_val)  # the few-shot size does not move the validation set
    assert not np.array_equal(a_val, d_val)
    assert not set(a_train) & set(a_val)
    with pytest.raises(ValueError, match="samples_per_class=100"):
        split_indices(labels, 0.2, 100, seed=0)


def test_channels_and_size_conversion(fashion_root):
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[0], val_split=10, image_size=32, channels=3)
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale replicated


def test_augmentation_is_batched_deterministic_and_changes_images():
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(16)
    plain = TensorImageDataset(images, labels)
    aug = TensorImageDataset(images, labels, augment=True, seed=3)
    x0, y0 = plain.__getitems__(range(16))
    x1, _ = aug.__getitems__(range(16))
    x2, _ = aug.__getitems__(range(16))
    assert torch.equal(y0, labels) and torch.equal(x1, x2)
    assert not torch.equal(x0, x1)
    assert x1.shape == x0.shape


def test_epoch_seeded_sampler_repeats_per_epoch():
    data = list(range(50))
    s = EpochSeededRandomSampler(data, seed=0)
    first = list(s)
    s.set_epoch(1)
    second = list(s)
    s.set_epoch(0)
    assert list(s) == first and second != first and sorted(second) == data


def test_digits_real_data_split_fixed():
    dm = DigitsDataModule(samples_per_class=10, val_split=50)
    dm.setup("fit")
    dm.setup("test")
    assert dm.num_classes == 10 and len(dm.train_set) == 100 and len(dm.val_set) == 50
    assert len(dm.test_set) + len(dm.val_set) + 1797 - len(dm.test_set) - 50 > 0
    other = DigitsDataModule(seed=5)
    other.setup("test")
    assert torch.equal(other.test_set.images, dm.test_set.images)  # test split does not depend on seed
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28)


def test_missing_dataset_path_says_how_to_get_it(tmp_path):
    dm = FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.setup("fit")


def test_corrupt_idx_file_is_reported(tmp_path, fashion_root):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        data = gzip.open(fashion_root / name).read()
        if "images" in name:
            data = data[: len(data) // 2]  # truncated
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(data)
    with pytest.raises(DatasetNotFoundError, match="corrupt"):
        FashionMNISTDataModule(root=str(tmp_path)).setup("fit")


def test_image_folder_reads_class_tree_and_predict_dir(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, val_split=2, predict_dir=str(tmp_path / "test"))
    assert dm.num_classes == 2 and dm.class_names == ["cat", "dog"]
    dm.setup("fit")
    dm.setup("test")
    dm.setup("predict")
    assert len(dm.train_set) == 10 and len(dm.val_set) == 2 and len(dm.test_set) == 4
    assert len(dm.predict_paths) == 4
    x, _ = next(iter(dm.predict_dataloader()))
    assert x.shape == (4, 3, 16, 16)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        ImageFolderDataModule(root=str(tmp_path / "missing"), predict_dir=str(tmp_path / "missing")).setup("predict")


def test_download_path_uses_torchvision_layout(tmp_path, fashion_root, monkeypatch):
    """download=True calls torchvision's downloader; files land in root/FashionMNIST/raw and are read."""
    import shutil

    import torchvision.datasets

    calls = []

    class FakeDownload:  # stands in for the network: copies the real files where torchvision puts them
        def __init__(self, root, train, download):
            calls.append(train)
            raw = tmp_path / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in fashion_root.iterdir():
                shutil.copy(f, raw / f.name)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)
    dm = FashionMNISTDataModule(root=str(tmp_path), download=True, classes=[1], val_split=10)
    dm.prepare_data()
    dm.setup("fit")
    assert calls == [True, False] and len(dm.val_set) == 10
    dm.prepare_data()  # already there: no second download
    assert calls == [True, False]
