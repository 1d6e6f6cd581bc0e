"""Interrupted training resumes from last.ckpt to the same weights as an uninterrupted run."""

import io
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer
from lit_finetune import ImageClassifier
from lit_finetune.callbacks import LayerFreezing, LRWarmup
from lit_finetune.checkpoint_io import AtomicCheckpointIO
from lit_finetune.data import FashionMNISTDataModule


def _run(tmp_path, fashion_root, max_epochs, ckpt_path=None, max_steps=-1, step_checkpoints=False, freezing=True, dropout=0.0):
    L.seed_everything(0)
    model = ImageClassifier(
        num_classes=5,
        dropout=dropout,
        optimizer=partial(torch.optim.AdamW, lr=3e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3),
    )
    dm = FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=12, val_split=25, batch_size=20
    )
    step_ckpt = ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = quiet_trainer(
        tmp_path,
        max_epochs=max_epochs,
        max_steps=max_steps,
        deterministic=True,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True),
            *([step_ckpt] if step_checkpoints else []),
            *([LayerFreezing(["backbone"], unfreeze_at_epoch=1)] if freezing else []),
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
    _assert_same_weights(full, resumed)


def _assert_same_weights(a, b):
    assert list(a.state_dict()) == list(b.state_dict())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def _loader_state(ckpt):
    return torch.load(ckpt, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]


def _stop_twice_and_resume(tmp_path, fashion_root, first: int, second: int, freezing: bool, dropout: float = 0.0):
    """Stop at step ``first``, resume from its step checkpoint, stop at ``second``, resume again to the end."""
    part = tmp_path / "part"
    kw = dict(max_epochs=3, freezing=freezing, dropout=dropout)
    _run(part, fashion_root, max_steps=first, step_checkpoints=True, **kw)
    step_a = part / "steps" / f"step={first}.ckpt"
    _run(part, fashion_root, max_steps=second, step_checkpoints=True, ckpt_path=str(step_a), **kw)
    step_b = part / "steps" / f"step={second}.ckpt"
    resumed = _run(part, fashion_root, ckpt_path=str(step_b), **kw)
    return resumed, step_a, step_b


def test_resume_mid_epoch_matches_uninterrupted(tmp_path, fashion_root):
    """Stopped mid-epoch twice, resumed from step checkpoints: bit-identical to a run that never stopped.

    60 images, batch 20: 3 steps per epoch, 9 in all. Stops at step 2 (mid-epoch 0, warm-up running)
    and step 7 (mid-epoch 2); the second resume starts from a run that was itself resumed.
    """
    full = _run(tmp_path / "full", fashion_root, max_epochs=3, freezing=False)
    resumed, step2, step7 = _stop_twice_and_resume(tmp_path, fashion_root, 2, 7, freezing=False)
    assert torch.load(step2, weights_only=True)["epoch"] == 0
    assert _loader_state(step2) == [{"epoch": 0, "batches": 2}]  # where the training loader stood
    assert _loader_state(step7) == [{"epoch": 2, "batches": 1}]
    _assert_same_weights(full, resumed)


def test_resume_mid_epoch_after_unfreeze_matches_uninterrupted(tmp_path, fashion_root):
    """As above with LayerFreezing(unfreeze_at_epoch=1): stops at step 2 (frozen) and step 4 (just unfrozen)."""
    full = _run(tmp_path / "full", fashion_root, max_epochs=3)
    resumed, _, _ = _stop_twice_and_resume(tmp_path, fashion_root, 2, 4, freezing=True)
    _assert_same_weights(full, resumed)


def test_resume_with_dropout_matches_uninterrupted(tmp_path, fashion_root):
    """Dropout draws from the global RNG, which the module saves in its checkpoints and restores."""
    full = _run(tmp_path / "full", fashion_root, max_epochs=3, dropout=0.3)
    resumed, _, _ = _stop_twice_and_resume(tmp_path, fashion_root, 2, 7, freezing=True, dropout=0.3)
    _assert_same_weights(full, resumed)


class _NaiveCheckpointIO(AtomicCheckpointIO):
    """Negative control: writes straight into the target file, as ``torch.save(ckpt, path)`` does."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with open(path, "wb") as f:
            torch.save(checkpoint, f)


def _inject(monkeypatch, fault: str) -> None:
    """Make the next checkpoint write fail part-way, the way a full disk or a killed process would."""
    import errno
    import os
    import shutil

    real_save = torch.save

    def half_then_fail(obj, f, *args, **kwargs):  # serialise fully, write half of the bytes, then fail
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def fsync_fails(fd):
        raise OSError(errno.EIO, "I/O error (injected)")

    def rename_cross_device(src, dst, *args, **kwargs):  # a temp dir on another filesystem than the target
        raise OSError(errno.EXDEV, "Invalid cross-device link (injected)")

    def copy_half_then_fail(src, dst, *args, **kwargs):
        data = open(src, "rb").read()
        with open(dst, "wb") as out:
            out.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    if fault == "serialize":
        monkeypatch.setattr(torch, "save", half_then_fail)
    elif fault == "fsync":
        monkeypatch.setattr(os, "fsync", fsync_fails)
    elif fault == "replace":
        monkeypatch.setattr(os, "replace", rename_cross_device)
    elif fault == "cross_device_move":
        monkeypatch.setattr(os, "rename", rename_cross_device)
        monkeypatch.setattr(shutil, "copyfile", copy_half_then_fail)


def _interrupted_save(checkpoint_io, folder, monkeypatch, fault: str) -> dict:
    """Save once, then save again under ``fault``; report what a reader would find afterwards."""
    folder.mkdir()
    target = folder / "last.ckpt"
    checkpoint_io.save_checkpoint({"step": 1, "w": torch.arange(4096.0)}, target)
    before = target.read_bytes()
    with monkeypatch.context() as patch:
        _inject(patch, fault)
        try:
            checkpoint_io.save_checkpoint({"step": 2, "w": torch.zeros(4096)}, target)
            error = None
        except OSError as err:
            error = err
    return {
        "error": error,
        "intact": target.read_bytes() == before,
        "left": sorted(p.name for p in folder.iterdir()),
    }


@pytest.mark.parametrize("fault", ["serialize", "fsync", "replace"])
def test_atomic_checkpoint_io_keeps_the_old_file_when_a_write_fails_part_way(tmp_path, monkeypatch, fault):
    """The error reaches the caller; the previous checkpoint is untouched, bit for bit; no temp file is left."""
    seen = _interrupted_save(AtomicCheckpointIO(), tmp_path / "ckpt", monkeypatch, fault)
    assert seen["error"] is not None and "injected" in str(seen["error"])
    assert seen["intact"] and seen["left"] == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["step"] == 1
    # and the same writer, without the fault, replaces the file completely
    AtomicCheckpointIO().save_checkpoint({"step": 3}, tmp_path / "ckpt" / "last.ckpt")
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_atomic_checkpoint_io_gives_files_the_permissions_lightnings_writer_gives(tmp_path, umask):
    """0666 less the umask (0644 usually), not the 0600 of a ``mkstemp`` file that others cannot read."""
    import os
    import stat

    from lightning.pytorch.plugins.io import TorchCheckpointIO

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "atomic.ckpt")
    TorchCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "stock.ckpt")  # (fsspec reads the umask once)
    assert mode("atomic.ckpt") == mode("stock.ckpt")
    old = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 2}, tmp_path / "new.ckpt")
    finally:
        os.umask(old)
    assert mode("new.ckpt") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["atomic.ckpt", "new.ckpt", "stock.ckpt"]  # no temp file


def test_atomic_checkpoint_io_never_moves_across_filesystems(tmp_path, monkeypatch):
    """The temp file sits beside the target, so no cross-device move (a copy) is ever needed."""
    seen = _interrupted_save(AtomicCheckpointIO(), tmp_path / "ckpt", monkeypatch, "cross_device_move")
    assert seen["error"] is None and seen["left"] == ["last.ckpt"]
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["step"] == 2


def test_interrupted_write_check_catches_writers_that_are_not_atomic(tmp_path, monkeypatch):
    """The check above is not vacuous: a writer that opens the target directly leaves half a file, and so
    does Lightning's stock writer when its system temp dir is on another filesystem (the move is a copy)."""
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    naive = _interrupted_save(_NaiveCheckpointIO(), tmp_path / "naive", monkeypatch, "serialize")
    assert naive["error"] is not None and not naive["intact"]
    stock = _interrupted_save(TorchCheckpointIO(), tmp_path / "stock", monkeypatch, "cross_device_move")
    assert stock["error"] is not None and not stock["intact"]


def test_corrupt_checkpoint_resume_error_names_the_file(tmp_path, tiny_target):
    import pytest

    bad = tmp_path / "last.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated zip")
    trainer = quiet_trainer(tmp_path, plugins=[AtomicCheckpointIO()])
    with pytest.raises(RuntimeError, match="Cannot resume from .*last.ckpt"):
        trainer.fit(ImageClassifier(num_classes=5), datamodule=tiny_target, ckpt_path=str(bad))


def test_resuming_a_code_running_checkpoint_is_refused(tmp_path, tiny_target):
    """Resume reads with weights_only=True: a checkpoint whose pickle runs code is refused, nothing runs."""
    import pickle

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "epoch": Exploit()}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    trainer = quiet_trainer(tmp_path, plugins=[AtomicCheckpointIO()])
    with pytest.raises(RuntimeError, match="Cannot resume from .*last.ckpt.*weights_only"):
        trainer.fit(ImageClassifier(num_classes=5), datamodule=tiny_target, ckpt_path=str(evil))
    assert not marker.exists()


class TrainingDraws(L.Callback):
    """What a fit draws in training: the global RNG's next numbers and the z of the DCGAN's first G forward."""

    def __init__(self) -> None:
        self.global_draws: list[torch.Tensor] = []
        self.z: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.generator.register_forward_pre_hook(
            lambda module, args: self.z.append(args[0][0, :4].clone()) if module.training else None
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.global_draws.append(torch.rand(4))


def test_a_new_fit_from_load_from_checkpoint_follows_seed_everything(tmp_path, tiny_target):
    """Only a resumed fit (ckpt_path) continues the checkpoint's random state; a new fit of a loaded module
    draws what its seed says, so a seed sweep from one checkpoint is a sweep."""
    from lit_finetune import DCGAN

    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, max_steps=1, logger=False, enable_checkpointing=False)
    trainer.fit(DCGAN(latent_dim=8, generator_width=8, discriminator_width=8), datamodule=tiny_target)
    ckpt = tmp_path / "trained.ckpt"
    trainer.save_checkpoint(ckpt)

    def draws(seed: int) -> TrainingDraws:
        L.seed_everything(seed)
        model = DCGAN.load_from_checkpoint(ckpt, weights_only=True)
        recorder = TrainingDraws()
        quiet_trainer(tmp_path, max_steps=2, logger=False, enable_checkpointing=False, callbacks=[recorder]).fit(
            model, datamodule=tiny_target
        )
        return recorder

    one, two, one_again = draws(1), draws(2), draws(1)
    assert not torch.equal(torch.stack(one.global_draws), torch.stack(two.global_draws))
    assert not torch.equal(torch.stack(one.z), torch.stack(two.z))
    assert torch.equal(torch.stack(one.global_draws), torch.stack(one_again.global_draws))
    assert torch.equal(torch.stack(one.z), torch.stack(one_again.z))
