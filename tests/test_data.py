import gzip
import re

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
from lit_finetune.data.resumable import ResumableDataLoader
from lit_finetune.data.tensor_dataset import EpochSeededRandomSampler, collate_batched


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


def _raw_idx(path, header: int) -> np.ndarray:
    """The raw bytes of an IDX file after its header, read independently of the package."""
    return np.frombuffer(gzip.open(path).read(), dtype=np.uint8, offset=header)


@pytest.mark.parametrize("classes", [[5, 6, 7, 8, 9], [9, 5, 7]])
def test_relabelled_subset_maps_back_to_raw_labels(fashion_root, classes):
    """Each image of a class subset carries label ``classes.index(raw label)``, checked image by image."""
    raw_test_y = _raw_idx(fashion_root / "t10k-labels-idx1-ubyte.gz", 8)
    raw_test_x = _raw_idx(fashion_root / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    raw_train_y = _raw_idx(fashion_root / "train-labels-idx1-ubyte.gz", 8)
    raw_train_x = _raw_idx(fashion_root / "train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=classes, samples_per_class=20, val_split=50, augment=False)
    dm.setup("fit")
    dm.setup("test")
    to_raw = np.asarray(classes)

    # test split: every kept image, in file order, with its label mapped back
    kept = np.flatnonzero(np.isin(raw_test_y, classes))
    assert np.array_equal(dm.test_set.images[:, 0].numpy(), raw_test_x[kept])
    assert np.array_equal(to_raw[dm.test_set.labels.numpy()], raw_test_y[kept])
    assert set(raw_test_y[kept]) == set(classes) and len(kept) == 1000 * len(classes)

    # train and validation: look each image up among the raw training images
    by_bytes: dict[bytes, set[int]] = {}
    for img, y in zip(raw_train_x, raw_train_y):
        by_bytes.setdefault(img.tobytes(), set()).add(int(y))
    for subset in (dm.train_set, dm.val_set):
        for img, label in zip(subset.images[:, 0].numpy(), subset.labels.tolist()):
            assert int(to_raw[label]) in by_bytes[img.tobytes()]

    # and what a batch delivers: the float image is the raw image scaled to [-1, 1], with the mapped label
    x, y = next(iter(dm.val_dataloader()))
    for xi, yi in zip(x[:8], y[:8].tolist()):
        raw = np.rint((xi[0].numpy() + 1.0) * 127.5).astype(np.uint8)
        assert int(to_raw[yi]) in by_bytes[raw.tobytes()]


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


def test_a_val_split_that_gives_no_validation_image_names_the_fix():
    labels = np.repeat(np.arange(5), 20)
    with pytest.raises(ValueError, match=r"val_split=3 puts no image.*spread evenly.*5 classes.*val_split=5 or more"):
        split_indices(labels, 3, None, seed=0)  # a total count below the class count: 0 per class
    with pytest.raises(ValueError, match=r"val_split=0.01 puts no image.*rounds to 0 per class"):
        split_indices(labels, 0.01, None, seed=0)
    _, val = split_indices(labels, 5, None, seed=0)
    assert sorted(labels[val]) == [0, 1, 2, 3, 4]


def test_val_split_zero_means_no_validation_and_repeated_classes_are_refused(fashion_root, tmp_path):
    from conftest import quiet_trainer
    from lit_finetune import ImageClassifier

    with pytest.raises(ValueError, match=r"names \[5\] more than once: list each class id once"):
        FashionMNISTDataModule(root=str(fashion_root), classes=[5, 5, 6])
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6], samples_per_class=4, val_split=0, batch_size=8)
    trainer = quiet_trainer(tmp_path, max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(ImageClassifier(num_classes=2), datamodule=dm)  # trains on every image, validates nothing
    assert trainer.state.finished and not any(k.startswith("val/") for k in trainer.callback_metrics)


def test_channels_and_size_conversion(fashion_root):
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[0], val_split=10, image_size=32, channels=3)
    dm.setup("fit")
    x, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1])  # grayscale replicated


def test_augmentation_is_batched_varies_across_epochs_and_a_rerun_repeats_it():
    """batch_size=1: an image's shift and flip change from epoch to epoch (the seed holds the epoch, not only
    the indices), and a second run sees exactly the same ones."""
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(12)
    x0, y0 = TensorImageDataset(images, labels).__getitems__(range(12))
    x1, _ = TensorImageDataset(images, labels, augment=True, seed=3).__getitems__(range(12))
    assert torch.equal(y0, labels) and x1.shape == x0.shape and not torch.equal(x0, x1)

    def run() -> list[torch.Tensor]:  # per epoch, the augmented images in index order
        data = TensorImageDataset(images, labels, augment=True, seed=3)
        loader = ResumableDataLoader(data, batch_size=1, sampler=EpochSeededRandomSampler(data, seed=1),
                                     collate_fn=collate_batched)  # fmt: skip
        epochs = []
        for epoch in range(5):
            seen = {int(y): x[0] for x, y in _epoch(loader, epoch)}
            epochs.append(torch.stack([seen[i] for i in range(12)]))
        return epochs

    first, again = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # a rerun is exact
    for i in range(12):  # every image: not the same augmentation in all five epochs
        assert len({epoch[i].numpy().tobytes() for epoch in first}) > 1


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
    assert torch.bincount(dm.train_set.labels).tolist() == [10] * 10
    assert torch.bincount(dm.val_set.labels).tolist() == [5] * 10
    # the fixed 70/30 split is stratified and partitions sklearn's 1,797 images exactly
    from sklearn.datasets import load_digits

    raw = load_digits()
    per_class = np.bincount(raw.target)
    assert torch.bincount(dm.test_set.labels).tolist() == [int(round(0.3 * n)) for n in per_class]
    scaled = np.clip(np.rint(raw.images * (255.0 / 16.0)), 0, 255).astype(np.uint8).reshape(len(raw.target), -1)
    pool, test = dm.read_split("train"), dm.read_split("test")
    assert len(pool[0]) + len(test[0]) == 1797
    rows = lambda imgs, labels: sorted(  # noqa: E731  (image bytes + label, as a multiset)
        bytes(i) + bytes([int(y)]) for i, y in zip(imgs.reshape(len(imgs), -1).numpy(), labels.tolist())
    )
    assert rows(torch.cat([pool[0], test[0]]), torch.cat([pool[1], test[1]])) == rows(
        torch.from_numpy(scaled), torch.from_numpy(raw.target)
    )
    assert int(dm.test_set.images.max()) == 255  # 0-16 scaled to the full uint8 range
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
        ImageFolderDataModule(root=str(tmp_path), predict_dir=str(tmp_path / "missing")).setup("predict")


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


def _image_tree(root, layout: dict[str, list[str]], per_class: int = 2) -> None:
    """``layout``: split folder ("train", "test" or "" for root itself) -> class folder names, each with images."""
    from PIL import Image

    for split, classes in layout.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")


def test_image_folder_missing_or_mistyped_root_fails_at_construction(tmp_path, monkeypatch):
    _image_tree(tmp_path / "imgs", {"train": ["ant", "bee"]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"'imsg' \(= '.*imsg'\) does not exist") as err:
        ImageFolderDataModule(root="imsg")  # a typo: fails here, not as num_classes=0 later
    assert str(tmp_path / "imsg") in str(err.value) and "root/train/<class>" in str(err.value)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DatasetNotFoundError, match="a_file.*is a file"):
        ImageFolderDataModule(root="a_file")
    assert ImageFolderDataModule(root="imgs").num_classes == 2  # the right path still works


def test_image_folder_without_class_folders_fails_at_construction(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loose.png").write_bytes(b"")  # images directly in train/, no class folders
    with pytest.raises(DatasetNotFoundError, match=re.escape(str(tmp_path / "train")) + ".* has no class sub-folders"):
        ImageFolderDataModule(root=str(tmp_path))
    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty.* has no class sub-folders"):
        ImageFolderDataModule(root=str(empty_root))
    only_test = tmp_path / "only_test"
    _image_tree(only_test, {"test": ["ant"]})
    with pytest.raises(DatasetNotFoundError, match="has a test/ folder but no train/ folder"):
        ImageFolderDataModule(root=str(only_test))  # was: one class named "test"
    empty_class = tmp_path / "empty_class"
    _image_tree(empty_class, {"train": ["ant"]})
    (empty_class / "train" / "bee").mkdir()
    with pytest.raises(DatasetNotFoundError, match="bee.* hold no image files"):
        ImageFolderDataModule(root=str(empty_class))


def test_image_folder_test_class_not_in_train_fails_at_construction(tmp_path):
    _image_tree(tmp_path, {"train": ["ant", "bee"], "test": ["ant", "bee", "wasp"]})
    with pytest.raises(DatasetNotFoundError, match="wasp") as err:
        ImageFolderDataModule(root=str(tmp_path))
    assert str(tmp_path / "test" / "wasp") in str(err.value)  # names the folder that would be dropped
    (tmp_path / "test" / "wasp").rename(tmp_path / "test" / ".hidden")  # hidden folders are not classes
    (tmp_path / "test" / "bee").rename(tmp_path / "test" / "Bee")  # a case typo: extra 'Bee', missing 'bee'
    with pytest.raises(DatasetNotFoundError, match="Bee"):
        ImageFolderDataModule(root=str(tmp_path))
    (tmp_path / "test" / "Bee").rename(tmp_path / "test" / "bee")
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_split=2)
    dm.setup("test")
    assert dm.class_names == ["ant", "bee"] and torch.bincount(dm.test_set.labels).tolist() == [2, 2]


def _resumable(n: int = 50, num_workers: int = 0, sampler_factory=None) -> ResumableDataLoader:
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = TensorImageDataset(images, torch.arange(n), augment=True)
    sampler = sampler_factory(data) if sampler_factory else EpochSeededRandomSampler(data, seed=1)
    return ResumableDataLoader(
        data, batch_size=7, sampler=sampler, collate_fn=collate_batched, num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )  # fmt: skip


def _epoch(loader, epoch: int) -> list:
    loader.sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_resumable_loader_resumes_at_the_next_batch_twice_in_one_epoch():
    ref = _resumable()
    epoch1 = _epoch(ref, 1)  # 50 images, batch 7: 8 batches
    assert len(epoch1) == len(ref) == 8
    first = _resumable()
    it = iter(first)
    first.sampler.set_epoch(1)  # Lightning sets the epoch after iter(): the iteration starts lazily
    got = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 1, "batches": 3}
    second = _resumable()
    second.load_state_dict(state)
    second.sampler.set_epoch(1)
    it = iter(second)
    got += [next(it) for _ in range(2)]
    assert second.state_dict() == {"epoch": 1, "batches": 5}  # counts the skipped batches too
    third = _resumable()
    third.load_state_dict(second.state_dict())
    got += _epoch(third, 1)
    assert _same(got, epoch1)
    assert third.state_dict() == {"epoch": 1, "batches": 8}
    assert _same(_epoch(third, 2), _epoch(ref, 2))  # a loaded state applies to one iteration only


def test_resumable_loader_ignores_a_state_from_another_or_a_finished_epoch():
    ref = _resumable()
    loader = _resumable()
    loader.load_state_dict({"epoch": 0, "batches": 3})
    assert _same(_epoch(loader, 1), _epoch(ref, 1))  # saved in epoch 0, resumed into epoch 1: whole epoch
    loader.load_state_dict({"epoch": 1, "batches": 8})
    assert _same(_epoch(loader, 1), _epoch(ref, 1))  # the epoch had ended: nothing to skip
    assert _resumable().state_dict() == {"epoch": None, "batches": 0}


def test_resumable_loader_with_a_persistent_worker_and_lightnings_ddp_sampler():
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import DistributedSampler

    ref = _epoch(_resumable(), 3)
    loader = _resumable(num_workers=1)
    it = iter(loader)
    loader.sampler.set_epoch(3)  # after iter(), as Lightning does on a resumed run: the worker must see it
    head = [next(it) for _ in range(2)]
    resumed = _resumable(num_workers=1)
    resumed.load_state_dict(loader.state_dict())
    assert _same(head + _epoch(resumed, 3), ref)
    assert _same(_epoch(resumed, 3), ref)  # the persistent worker's next epoch starts from its first batch

    # under DDP Lightning rebuilds the loader around a DistributedSampler: it stays resumable
    plain = _resumable()
    ddp = _update_dataloader(plain, DistributedSampler(plain.dataset, num_replicas=2, rank=1, shuffle=True, seed=4))
    assert type(ddp) is ResumableDataLoader and isinstance(ddp.sampler, DistributedSampler)
    whole = _epoch(ddp, 2)
    assert len(whole) == 4  # 25 of 50 images on this rank, batch 7
    it = iter(ddp)
    ddp.sampler.set_epoch(2)
    next(it)
    again = _update_dataloader(plain, DistributedSampler(plain.dataset, num_replicas=2, rank=1, shuffle=True, seed=4))
    again.load_state_dict(ddp.state_dict())
    assert ddp.state_dict() == {"epoch": 2, "batches": 1}
    assert _same(whole[:1] + _epoch(again, 2), whole)


def test_hidden_files_in_class_folders_are_skipped(tmp_path):
    from PIL import Image

    from lit_finetune.data.base import list_image_files

    (tmp_path / "cat" / ".ipynb_checkpoints").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    Image.new("L", (4, 4)).save(tmp_path / "cat" / ".ipynb_checkpoints" / "a-checkpoint.png")
    assert [p.name for p in list_image_files(tmp_path)] == ["a.png"]


# -- batches built where the data lives (data_on_device) ------------------------------------------------------
def _previous_getitems(data: TensorImageDataset, indices) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch path as it was before batches could be built on a device (draw and apply in one go, on the CPU)."""
    index = torch.as_tensor(list(indices), dtype=torch.long)
    x = data.images[index].float().div_(127.5).sub_(1.0)
    if data.augment:
        generator = torch.Generator().manual_seed(
            hash((data.seed, getattr(indices, "epoch", 0), *index.tolist())) & 0x7FFF_FFFF_FFFF
        )
        if data.max_shift > 0:
            n, c, h, w = x.shape
            padded = torch.nn.functional.pad(x, (data.max_shift,) * 4, value=-1.0)
            dy = torch.randint(0, 2 * data.max_shift + 1, (n,), generator=generator)
            dx = torch.randint(0, 2 * data.max_shift + 1, (n,), generator=generator)
            rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, padded.shape[3])
            cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
            x = padded.gather(2, rows).gather(3, cols)
        if data.hflip:
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x, data.labels[index]


@pytest.mark.parametrize("augment, hflip, max_shift", [(False, True, 2), (True, True, 2), (True, False, 2),
                                                       (True, True, 0), (True, False, 3)])  # fmt: skip
def test_batches_are_those_of_the_previous_batch_path(augment, hflip, max_shift):
    """Drawing on the CPU and applying anywhere changed no batch: same images, shifts, flips, per epoch."""
    from lit_finetune.data.tensor_dataset import EpochBatch

    images = torch.randint(0, 256, (40, 1, 9, 9), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = TensorImageDataset(images, torch.arange(40) % 4, augment=augment, hflip=hflip, max_shift=max_shift, seed=5)
    for epoch in range(3):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(epoch)).tolist()
        for start in range(0, 40, 16):
            batch = EpochBatch(order[start : start + 16], epoch)
            x, y = data.__getitems__(batch)
            x_ref, y_ref = _previous_getitems(data, batch)
            assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_a_dataset_on_another_device_builds_its_batches_there():
    """Every tensor of the batch path follows the images (here to the meta device, which checks devices and
    shapes without a GPU): no CPU tensor meets a device one, and the batch never comes back to the host."""
    from lit_finetune.data.tensor_dataset import EpochBatch

    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    data = TensorImageDataset(images, torch.arange(20), augment=True, seed=1).to("meta")
    assert data.device.type == "meta" and data.labels.device.type == "meta"
    x, y = data.__getitems__(EpochBatch(range(5, 12), 2))
    assert x.device.type == y.device.type == "meta"
    assert x.shape == (7, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (7,)
    cpu = TensorImageDataset(images, torch.arange(20))
    assert cpu.to("cpu") is cpu and cpu.images is images  # already there: nothing copied


class _FakeTrainer:
    """What ``data_device`` reads of a Trainer: the strategy's root device."""

    def __init__(self, device: str) -> None:
        self.strategy = type("Strategy", (), {"root_device": torch.device(device)})()


@pytest.mark.parametrize(
    "switch, device, workers, free, expected",
    [
        (None, "cpu", 0, 0, "cpu"),  # auto: never for the CPU (nothing to gain)
        (None, "cuda:0", 0, 10**9, "cuda:0"),  # auto: on for CUDA when the data fits
        (None, "cuda:0", 0, 10**4, "cpu"),  # ... not when it would take over a quarter of the free memory
        (None, "cuda:0", 2, 10**9, "cpu"),  # ... nor with DataLoader workers
        (False, "cuda:0", 0, 10**9, "cpu"),
        (True, "cuda:0", 0, 10**4, "cuda:0"),  # asked for: on even when large
        (True, "cpu", 0, 0, "cpu"),
    ],
)
def test_where_the_data_goes(monkeypatch, switch, device, workers, free, expected):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 10**10))
    dm = FashionMNISTDataModule(data_on_device=switch, num_workers=workers if switch is not True else 0)
    dm.train_set = TensorImageDataset(torch.zeros(100, 1, 28, 28, dtype=torch.uint8), torch.zeros(100))  # 78 KB
    assert dm.data_device() == torch.device("cpu")  # no Trainer attached
    dm.trainer = _FakeTrainer(device)
    assert dm.data_device() == torch.device(expected)


def test_data_on_device_with_workers_names_the_fix():
    with pytest.raises(ValueError, match="num_workers=0"):
        FashionMNISTDataModule(data_on_device=True, num_workers=2)


def test_a_fit_with_data_on_device_sees_the_same_batches_and_resumes_alike(tmp_path, fashion_root):
    """Through a Trainer (on the CPU here: the placement follows the Trainer's device), a fit that stops
    mid-epoch and resumes sees exactly the batches of an uninterrupted fit without the switch."""
    import lightning as L

    from lit_finetune import ImageClassifier

    class Batches(L.Callback):
        def __init__(self) -> None:
            self.seen = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append((batch[0].clone(), batch[1].clone()))

    def fit(on_device: bool | None, ckpt_path=None, save_steps=None):
        dm = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6], samples_per_class=12, val_split=10,
                                    batch_size=5, data_on_device=on_device)  # fmt: skip
        torch.manual_seed(0)
        batches = Batches()
        callbacks = [batches]
        if save_steps:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=save_steps, filename="{step}",
                                                                 every_n_train_steps=1, save_top_k=-1))  # fmt: skip
        trainer = L.Trainer(accelerator="cpu", max_steps=12, logger=False, enable_checkpointing=bool(save_steps),
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            callbacks=callbacks)  # fmt: skip
        trainer.fit(ImageClassifier(num_classes=2), datamodule=dm, ckpt_path=ckpt_path)
        return batches.seen

    whole = fit(False)  # 24 images, batch 5: 5 batches an epoch, so step 7 is mid-epoch
    assert _same(fit(True, save_steps=tmp_path), whole) and len(whole) == 12
    rest = fit(True, ckpt_path=tmp_path / "step=7.ckpt")
    assert _same(whole[:7] + rest, whole)
