import itertools
import warnings

import lightning as L
import pytest
import torch

from conftest import quiet_trainer
from lit_finetune import ImageClassifier
from lit_finetune.callbacks import PredictionWriter
from lit_finetune.data import DigitsDataModule, FashionMNISTDataModule, ImageFolderDataModule


def test_defaults_build_a_working_model(tmp_path):
    model = ImageClassifier(num_classes=5)
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "cat" / "0.png")
    for dm in (FashionMNISTDataModule(), DigitsDataModule(), ImageFolderDataModule(root=str(tmp_path))):
        assert dm.batch_size > 0  # every datamodule builds with defaults alone (a folder needs its root)
    from lit_finetune.callbacks import LayerFreezing, LRWarmup

    assert LayerFreezing().module_names == ["backbone"] and LRWarmup().warmup_steps > 0
    assert PredictionWriter().output_file.endswith(".csv")


def test_fit_test_logs_metrics_per_class_and_confusion_png(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5, l2sp_alpha=0.0)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_test_batches=3)
    trainer.fit(model, datamodule=tiny_target)
    metrics = trainer.test(model, datamodule=tiny_target)[0]
    for key in ("test/acc", "test/f1_macro", "test/loss", "test/acc_class/Ankle_boot", "test/acc_class/Sandal"):
        assert key in metrics
    # the logged accuracy is the accuracy of the model's predictions on the test split (recomputed here)
    tiny_target.setup("test")
    model.eval()
    batches = list(itertools.islice(tiny_target.test_dataloader(), 3))
    with torch.no_grad():
        preds = torch.cat([model(x).argmax(-1) for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert metrics["test/acc"] == pytest.approx((preds == labels).float().mean().item(), abs=1e-6)
    pngs = list(tmp_path.rglob("test_confusion_matrix_step*.png"))
    assert pngs and pngs[0].stat().st_size > 1000


def test_l2sp_pulls_toward_pretrained(tmp_path, tiny_target):
    source = ImageClassifier(num_classes=5)
    torch.save(source.state_dict(), tmp_path / "src.pt")

    def drift(alpha: float) -> float:
        L.seed_everything(0)
        model = ImageClassifier(num_classes=5, pretrained=str(tmp_path / "src.pt"), l2sp_alpha=alpha)
        quiet_trainer(tmp_path / str(alpha), max_epochs=3, limit_val_batches=1).fit(model, datamodule=tiny_target)
        return sum((p - source.state_dict()[f"backbone.{n}"]).pow(2).sum().item() for n, p in model.backbone.named_parameters())

    assert drift(50.0) < drift(0.0)


def test_channel_and_num_classes_mismatch_are_clear(tmp_path, tiny_target):
    with pytest.raises(ValueError, match="Channel mismatch.*in_channels=3"):
        quiet_trainer(tmp_path).fit(ImageClassifier(num_classes=5, in_channels=3), datamodule=tiny_target)
    with pytest.raises(ValueError, match="num_classes mismatch.*num_classes=5"):
        quiet_trainer(tmp_path).fit(ImageClassifier(num_classes=7), datamodule=tiny_target)
    with pytest.raises(ValueError, match="expects images"):
        ImageClassifier(num_classes=2)(torch.zeros(1, 3, 28, 28))


def test_class_names_travel_with_the_checkpoint(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(model, datamodule=tiny_target)
    assert model.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True)
    assert loaded.class_names == model.class_names  # without the datamodule: predictions and exports name them
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
    del checkpoint["class_names"]  # a checkpoint written before names were kept
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert ImageClassifier.load_from_checkpoint(tmp_path / "old.ckpt").class_names == ["0", "1", "2", "3", "4"]


def test_predict_writes_labels_for_a_folder(tmp_path, fashion_root):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6, 7, 8, 9], val_split=10)
    dm.setup("test")
    for i in range(5):
        arr = ((dm.test_set.images[i, 0].numpy().astype(np.float32)))
        Image.fromarray(arr.astype(np.uint8)).save(folder / f"img{i}.png")
    dm.predict_dir = str(folder)
    out = tmp_path / "pred.csv"
    trainer = quiet_trainer(tmp_path, callbacks=[PredictionWriter(str(out))])
    trainer.predict(ImageClassifier(num_classes=5), datamodule=dm, return_predictions=False)
    rows = out.read_text().splitlines()
    assert rows[0] == "index,file,label,class_name,confidence" and len(rows) == 6
    assert rows[1].split(",")[1].endswith("img0.png")
    assert rows[1].split(",")[3] in dm.class_names


def test_using_a_model_before_its_source_is_read_warns_once(tmp_path):
    """``pretrained`` is read when a Trainer's fit/validate/test/predict starts: ``model(x)`` right after the
    constructor computes with the random start, and says so once; after loading it is silent."""
    source = ImageClassifier(num_classes=5)
    torch.save(source.state_dict(), tmp_path / "src.pt")
    x = torch.zeros(2, 1, 28, 28)
    model = ImageClassifier(num_classes=5, pretrained=str(tmp_path / "src.pt"))
    with pytest.warns(UserWarning, match=r"before its pretrained weights .*load_pretrained_weights\(\)"):
        model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once
        loaded = ImageClassifier(num_classes=5, pretrained=str(tmp_path / "src.pt"))
        loaded.load_pretrained_weights()
        loaded(x)
        assert torch.equal(loaded.backbone.conv1.weight, source.backbone.conv1.weight)  # the head is new
        ImageClassifier(num_classes=5)(x)  # no source, nothing to warn about
