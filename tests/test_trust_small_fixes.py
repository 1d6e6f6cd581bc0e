"""Small fixes found with the EMA work: truncated checkpoints, grayscale PNG samples, the LR a
skipped mixed-precision step applied."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from PIL import Image
from torch.amp import GradScaler

from conftest import quiet_trainer, save_lightning_checkpoint
from lit_finetune import DCGAN, ImageClassifier
from lit_finetune.callbacks import AppliedLRMonitor
from lit_finetune.sample import load_module, write_samples
from lit_finetune.transfer.pretrained import PretrainedLoadError, load_pretrained

TINY = dict(latent_dim=16, generator_width=8, discriminator_width=8)


def test_a_truncated_checkpoint_is_reported_as_truncated(tmp_path):
    full = save_lightning_checkpoint(ImageClassifier(num_classes=2), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainedLoadError, match="cut.ckpt' is truncated or corrupt"):
        load_pretrained(ImageClassifier(num_classes=2), tmp_path / "cut.ckpt")
    assert load_pretrained(ImageClassifier(num_classes=2), full).clean  # the whole file still loads


@pytest.mark.parametrize("channels", [1, 3])
def test_samples_are_written_with_the_models_channel_count(tmp_path, channels):
    ckpt = save_lightning_checkpoint(DCGAN(**TINY, in_channels=channels), tmp_path / "g.ckpt")
    paths = write_samples(load_module(ckpt), 3, tmp_path / "out", nrow=3)
    modes = {Image.open(p).mode for p in paths}
    assert modes == ({"L"} if channels == 1 else {"RGB"})
    with Image.open(paths[-1]) as grid:
        assert grid.size == (3 * 28 + 4 * 2, 28 + 2 * 2)  # make_grid's layout, padding 2


def test_applied_lr_is_0_for_a_step_the_grad_scaler_skipped(tmp_path, tiny_target):
    model = ImageClassifier(num_classes=5, optimizer=partial(torch.optim.SGD, lr=0.1))
    # a scale this large overflows the first step's gradients: GradScaler skips it, then lowers the scale
    precision = MixedPrecision("16-mixed", "cpu", GradScaler("cpu", init_scale=2.0**120, growth_interval=10**6))
    logged = []

    class Record(AppliedLRMonitor):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.append([g["applied_lr"] for g in trainer.optimizers[0].param_groups])

    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, plugins=[precision], callbacks=[Record()]).fit(
        model, datamodule=tiny_target
    )
    assert logged and all(lr == 0.0 for lr in logged[0])
    assert all(p.grad is None or torch.isfinite(p).all() for p in model.parameters())
