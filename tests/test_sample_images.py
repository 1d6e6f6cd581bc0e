"""SampleImages: image grids from a module's ``image_samples()`` to W&B, TensorBoard and PNG files."""

from __future__ import annotations

import io
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import quiet_trainer
from lit_finetune.callbacks.sample_images import SampleImages
from test_wandb import offline_runs, read_wandb_records, wandb_offline  # noqa: F401  (fixture: offline W&B in tmp_path)

LATENT, SIZE, N = 4, 6, 5
# one known batch: a black, a mid-grey and a white image; values outside [-1, 1] are clipped
KNOWN = torch.stack([torch.full((1, SIZE, SIZE), v) for v in (-5.0, 0.0, 3.0)])


class TinyGenerator(L.LightningModule):
    """The smallest module with ``image_samples``: a linear 'generator' on a fixed-seed noise buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(LATENT)
        self.net = nn.Linear(LATENT, 3 * SIZE * SIZE)
        self.register_buffer("fixed_z", torch.randn(N, LATENT, generator=torch.Generator().manual_seed(0)))
        self.calls: list[tuple[bool, bool, bool]] = []  # (module training, norm training, grad enabled)

    def image_samples(self) -> dict[str, torch.Tensor]:
        self.calls.append((self.training, self.norm.training, torch.is_grad_enabled()))
        torch.randn(3)  # a sampler drawing from the global RNG: must not change the training run
        samples = torch.tanh(self.net(self.norm(self.fixed_z))).view(N, 3, SIZE, SIZE)
        return {"samples": samples, "known": KNOWN}

    def training_step(self, batch, batch_idx):
        return self.net(self.norm(batch[0])).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(8, LATENT)), batch_size=4)  # 2 steps per epoch


class NoSamples(TinyGenerator):
    image_samples = None  # a module that never implemented the protocol


def _fit(trainer: L.Trainer, every_n_epochs: int = 1) -> TinyGenerator:
    model = TinyGenerator()
    trainer.callbacks.append(SampleImages(every_n_epochs=every_n_epochs))
    trainer.fit(model)
    return model


def _pngs(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.png")}


def _pixels(source) -> np.ndarray:
    with Image.open(source) as img:
        return np.asarray(img.convert("RGB"))


def _check_known_grid(pixels: np.ndarray) -> None:
    """make_grid of KNOWN in one row: 2 px padding (0), then black, grey and white images."""
    assert pixels.shape == (SIZE + 4, 3 * SIZE + 8, 3)
    tiles = [pixels[2 : 2 + SIZE, 2 + i * (SIZE + 2) : 2 + i * (SIZE + 2) + SIZE] for i in range(3)]
    assert [np.unique(t).tolist() for t in tiles] == [[0], [128], [255]]  # -1 -> 0, 0 -> 127.5, +1 -> 255
    assert (pixels[:2] == 0).all() and (pixels[:, :2] == 0).all()  # padding


def test_csv_logger_pngs_every_n_epochs_and_at_fit_end(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=3)  # CSVLogger(tmp_path): images beside the checkpoints
    _fit(trainer, every_n_epochs=2)
    images = tmp_path / "lightning_logs" / "version_0" / "images"
    assert Path(trainer.checkpoint_callback.dirpath).parent / "images" == images
    # epoch 2 ends at step 4; fit ends at step 6 (epoch 3 is not a multiple of 2)
    expected = {f"images_{k}_step{s}.png" for k in ("samples", "known") for s in (4, 6)}
    assert _pngs(images) == expected
    _check_known_grid(_pixels(images / "images_known_step6.png"))
    samples = _pixels(images / "images_samples_step6.png")
    assert samples.shape == (SIZE + 4, N * (SIZE + 2) + 2, 3) and samples.std() > 0  # 5 images in one row of 8


def test_every_epoch_logs_once_per_epoch_without_a_duplicate_at_fit_end(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=2)
    _fit(trainer, every_n_epochs=1)
    images = tmp_path / "lightning_logs" / "version_0" / "images"
    assert _pngs(images) == {f"images_{k}_step{s}.png" for k in ("samples", "known") for s in (2, 4)}


def test_no_logger_writes_pngs_under_the_root_dir(tmp_path):
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=False)
    model = _fit(trainer, every_n_epochs=0)  # 0: only when fit ends
    assert _pngs(tmp_path / "images") == {"images_samples_step4.png", "images_known_step4.png"}
    assert len(model.calls) == 1
    no_ckpt = tmp_path / "no_ckpt"
    trainer = quiet_trainer(no_ckpt, max_epochs=1, logger=False, enable_checkpointing=False)
    _fit(trainer)
    assert _pngs(no_ckpt / "images") == {"images_samples_step2.png", "images_known_step2.png"}


def test_tensorboard_event_file_holds_the_grids(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=TensorBoardLogger(tmp_path, name="tb"))
    _fit(trainer)
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"images/samples", "images/known"} <= set(events.Tags()["images"])
    known = events.Images("images/known")
    assert [e.step for e in known] == [2, 4]
    pixels = _pixels(io.BytesIO(known[-1].encoded_image_string))
    _check_known_grid(pixels)
    assert np.array_equal(pixels, _pixels(Path(trainer.logger.log_dir) / "images" / "images_known_step4.png"))


def _wait_until_written(save_dir: Path, timeout: float = 30.0) -> None:
    """Wait for the run's exit record: wandb.finish() can return before wandb-core has written the
    transaction log (seen here: a 7-byte file right after finish(), the whole log a moment later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logs = list((save_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        try:
            if len(logs) == 1 and any(r.HasField("exit") for r in read_wandb_records(logs[0])):
                return
        except AssertionError:  # a record still being written
            pass
        time.sleep(0.1)
    raise AssertionError(f"no finished offline W&B run under {save_dir} after {timeout} s")


def test_wandb_offline_run_gets_the_grids(wandb_offline):  # noqa: F811  (the fixture imported above)
    import wandb

    save_dir = wandb_offline / "wandb_runs"
    trainer = quiet_trainer(wandb_offline, max_epochs=2, logger=WandbLogger(save_dir=str(save_dir), project="t"))
    _fit(trainer)
    wandb.finish()
    _wait_until_written(save_dir)
    (run,) = offline_runs(save_dir)
    assert run.exit_code == 0
    rows = [row for row in run.history if "images/known/filenames" in row]
    assert [row["trainer/global_step"] for row in rows] == [2, 4]
    (image_file,) = rows[-1]["images/known/filenames"]
    assert image_file in run.files and image_file.startswith("media/images/images/known")
    _check_known_grid(_pixels(run.dir / "files" / image_file))
    assert len([row for row in run.history if "images/samples/filenames" in row]) == 2


def test_drawn_in_eval_without_grad_and_every_modes_restored(tmp_path):
    model = TinyGenerator()
    model.train()
    model.norm.eval()  # a BatchNorm that LayerFreezing holds in eval mode while frozen
    trainer = quiet_trainer(tmp_path, logger=False)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    grids = SampleImages(nrow=2).log_grids(trainer, model)
    assert model.calls == [(False, False, False)]  # eval mode, no autograd
    assert model.training and not model.norm.training and model.net.training  # each module's own mode back
    assert torch.equal(torch.get_rng_state(), rng_before)  # the sampler's draw left the run's RNG alone
    assert grids["known"].shape == (3, 2 * SIZE + 6, 2 * SIZE + 6)  # nrow=2: two rows of two for three images
    assert grids["samples"].min() >= 0 and grids["samples"].max() <= 1


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    model = TinyGenerator()
    trainer = quiet_trainer(tmp_path, logger=False)
    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as on a second DDP process
    grids = SampleImages().log_grids(trainer, model)
    assert set(grids) == {"samples", "known"} and len(model.calls) == 1  # drawn on every rank...
    assert not (tmp_path / "images").exists()  # ...logged only on rank zero


def test_module_without_image_samples_fails_at_fit_start(tmp_path):
    model = NoSamples()
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[SampleImages()])
    with pytest.raises(MisconfigurationException, match=r"NoSamples to implement `def image_samples\(self\)"):
        trainer.fit(model)
    assert trainer.global_step == 0
    trainer = quiet_trainer(tmp_path, logger=False, callbacks=[SampleImages()])
    trainer.validate(model, dataloaders=model.train_dataloader(), verbose=False)  # fit only: others ignore it
    assert not (tmp_path / "images").exists()


def test_bad_image_batches_name_the_key(tmp_path):
    trainer = quiet_trainer(tmp_path, logger=False)
    model = TinyGenerator()
    model.image_samples = lambda: {"flat": torch.zeros(4, SIZE, SIZE)}
    with pytest.raises(ValueError, match=r"image_samples\(\)\['flat'\] must be a \(B, C, H, W\).*\(4, 6, 6\)"):
        SampleImages().log_grids(trainer, model)
    model.image_samples = lambda: [torch.zeros(1, 1, SIZE, SIZE)]
    with pytest.raises(TypeError, match="must return a dict"):
        SampleImages().log_grids(trainer, model)
    with pytest.raises(ValueError, match="every_n_epochs"):
        SampleImages(every_n_epochs=-1)


def test_upscale_enlarges_each_pixel_into_a_block(tmp_path):
    plain = SampleImages(every_n_epochs=0).make_grid("known", KNOWN)
    big = SampleImages(every_n_epochs=0, upscale=3).make_grid("known", KNOWN)
    assert big.shape == (3, 3 * plain.shape[1], 3 * plain.shape[2])
    assert torch.equal(big[:, ::3, ::3], plain) and torch.equal(big[:, 2::3, 1::3], plain)
    with pytest.raises(ValueError, match="upscale"):
        SampleImages(upscale=0)
