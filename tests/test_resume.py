"""Interrupted training resumes from last.ckpt to the same weights as an uninterrupted run."""

from functools import partial

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from lit_finetune import ImageClassifier
from lit_finetune.callbacks import LayerFreezing, LRWarmup
from lit_finetune.checkpoint_io import AtomicCheckpointIO
from lit_finetune.data import FashionMNISTDataModule


def _run(tmp_path, fashion_root, max_epochs, ckpt_path=None):
    L.seed_everything(0)
    model = ImageClassifier(
        num_classes=5,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3),
    )
    dm = FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=12, val_split=25, batch_size=20
    )
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=max_epochs,
        deterministic=True,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
            LayerFreezing(["backbone"], unfreeze_at_epoch=1),
            LRWarmup(warmup_steps=4),
        ],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model


def test_resume_from_last_matches_uninterrupted(tmp_path, fashion_root):
    full = _run(tmp_path / "full", fashion_root, max_epochs=3)
    _run(tmp_path / "part", fashion_root, max_epochs=2)  # "interrupted" after epoch 2
    last = tmp_path / "part" / "ckpt" / "last.ckpt"
    assert last.is_file() and not list(last.parent.glob("*.tmp"))
    resumed = _run(tmp_path / "part", fashion_root, max_epochs=3, ckpt_path=str(last))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_atomic_checkpoint_io_leaves_old_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"a": torch.ones(2)}, target)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    try:
        io.save_checkpoint({"a": Boom()}, target)
    except RuntimeError:
        pass
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_corrupt_checkpoint_resume_error_names_the_file(tmp_path, tiny_target):
    import pytest

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    trainer = quiet_trainer(tmp_path, plugins=[AtomicCheckpointIO()])
    with pytest.raises(RuntimeError, match="Cannot resume from .*last.ckpt"):
        trainer.fit(ImageClassifier(num_classes=5), datamodule=tiny_target, ckpt_path=str(bad))
