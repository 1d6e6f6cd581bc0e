"""VAE: the ELBO's terms, the importance-weighted bound, transfer, freezing, bad inputs, checkpoints."""

from __future__ import annotations

import math
import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import quiet_trainer, save_lightning_checkpoint
from lit_finetune import VAE
from lit_finetune.callbacks import LayerFreezing
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.nets import ConvDecoder, ConvEncoder

TINY = dict(latent_dim=4, encoder_width=4, decoder_width=4)


@pytest.fixture
def vae_data(fashion_root):
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=20, augment=False
    )


def _images(fashion_root, n=16) -> torch.Tensor:
    dm = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6, 7, 8, 9], val_split=10)
    dm.setup("test")
    return dm.test_set[list(range(n))][0]


def _source(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    source = VAE(**TINY)
    path = save_lightning_checkpoint(source, tmp_path / "vae_source.ckpt")
    return path, {k: v.clone() for k, v in source.state_dict().items()}


def test_nets_shapes_and_errors():
    for size in (28, 32, 64):
        encoder, decoder = ConvEncoder(size, 3, 6, 4), ConvDecoder(size, 3, 6, 4)
        mu, logvar = encoder(torch.randn(2, 3, size, size))
        assert mu.shape == logvar.shape == (2, 6) and decoder(mu).shape == (2, 3, size, size)
    with pytest.raises(ValueError, match=r"ConvEncoder expects images \(B, 1, 28, 28\)"):
        ConvEncoder()(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="image_size must be one of"):
        ConvDecoder(image_size=30)


def test_logged_elbo_is_minus_rec_plus_kl(tmp_path, vae_data):
    model = VAE(**TINY)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=2)
    trainer.fit(model, datamodule=vae_data)
    m = trainer.callback_metrics
    for split in ("train", "val"):
        assert m[f"{split}/elbo"].item() == pytest.approx(-(m[f"{split}/rec"] + m[f"{split}/kl"]).item(), rel=1e-5)
    assert m["val/kl"] > 0 and m["val/rec"] > 0


class _Records(L.pytorch.loggers.logger.Logger):
    """A logger that keeps what Lightning writes: ``{step: {train key: value}}``."""

    name, version = "records", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step=None) -> None:
        train = {k: float(v) for k, v in metrics.items() if k.startswith("train/")}
        if train:
            self.rows[step] = train

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class _StopAt(L.Callback):
    """Stops the fit in ``on_train_batch_end`` once ``global_step`` reaches ``step`` (as ``Timer`` does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def _train_records(tmp_path, data, **trainer_kwargs) -> dict[int, dict[str, float]]:
    torch.manual_seed(0)
    model, logger = VAE(**TINY, kl_warmup_steps=4), _Records()
    kwargs = dict(max_epochs=10, logger=logger, enable_checkpointing=False, limit_val_batches=0, **trainer_kwargs)
    trainer = quiet_trainer(tmp_path, **kwargs)
    trainer.fit(model, datamodule=data)
    return logger.rows


def test_train_terms_reach_the_loggers_with_their_own_steps_values(tmp_path, fashion_root):
    """Logged only where read, the loggers still get every written step's own values (see VAE's docstring)."""
    vae_data = FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=5, augment=False
    )  # 8 batches an epoch: all 7 steps in one, so a value left from an earlier step could reach a later record
    every = _train_records(tmp_path / "every", vae_data, max_steps=7, log_every_n_steps=1)
    assert sorted(every) == list(range(7))
    assert all(set(row) == {"train/rec", "train/kl", "train/elbo", "train/beta"} for row in every.values())
    assert [every[i]["train/beta"] for i in range(5)] == [0, 0.25, 0.5, 0.75, 1]
    # every 3rd step (2, 5), plus step 4, where a callback stops the fit after training_step; min_steps goes on
    sparse = _train_records(
        tmp_path / "sparse", vae_data, max_steps=7, log_every_n_steps=3, min_steps=7, callbacks=[_StopAt(5)]
    )
    assert sorted(sparse) == [2, 4, 5, 6] and all(sparse[step] == every[step] for step in sparse)


def test_iwae_bound_equals_elbo_for_one_sample_and_tightens(fashion_root):
    torch.manual_seed(0)
    model = VAE(**TINY).eval()
    x = _images(fashion_root)
    torch.manual_seed(1)
    elbo = torch.stack([-(sum(model.terms(x).values())) for _ in range(200)]).mean(0)  # E[ELBO] per image
    torch.manual_seed(1)
    iwae_1 = torch.stack([-model.iwae_nll(x, 1) for _ in range(200)]).mean(0)
    assert torch.allclose(iwae_1, elbo, rtol=2e-3)  # k = 1: the ELBO, in expectation
    bounds = [(-model.iwae_nll(x, k)).mean().item() for k in (1, 8, 64)]
    assert bounds[0] < bounds[1] < bounds[2]  # log-likelihood bounds rise with k


def test_kl_warmup_ramps_beta(tmp_path, vae_data):
    model = VAE(**TINY, kl_warmup_steps=4, beta=0.5)
    assert model.kl_weight() == 0
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=vae_data)
    assert model.kl_weight() == pytest.approx(0.5 * 2 / 4)


def test_transfer_loads_exactly_encoder_and_decoder_and_frozen_parts_stay(tmp_path, vae_data):
    source, state = _source(tmp_path)
    model = VAE(**TINY, pretrained=source)
    report = model.load_pretrained_weights()
    assert sorted(report.loaded) == sorted(k for k in state if k.startswith(("encoder.", "decoder.")))
    assert report.clean and "fixed_z" in report.excluded
    freeze = LayerFreezing(["encoder"], unfreeze_at_epoch=None)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[freeze], limit_val_batches=1).fit(model, datamodule=vae_data)
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state if k.startswith("encoder."))  # frozen: unchanged
    assert any(not torch.equal(after[k], state[k]) for k in state if k.startswith("decoder."))


def test_l2sp_zero_at_source_and_test_metrics(tmp_path, vae_data):
    source, _ = _source(tmp_path)
    model = VAE(**TINY, pretrained=source, l2sp_alpha=1.0, iw_samples=4)
    model.load_pretrained_weights()
    assert model.l2sp().item() == 0
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0, limit_test_batches=2)
    trainer.fit(model, datamodule=vae_data)
    assert model.l2sp().item() > 0
    m = trainer.test(model, datamodule=vae_data)[0]
    assert m["test/bits_per_dim"] == pytest.approx(m["test/nll_iwae"] / (784 * math.log(2)), rel=1e-5)
    assert m["test/nll_iwae"] <= -m["test/elbo"] + 5  # a bound at least about as tight as the one-sample ELBO
    assert 0 <= m["test/recon_mse"] <= 4


def test_encode_decode_sample_reconstruct_and_bad_channels(fashion_root):
    model = VAE(**TINY)
    x = _images(fashion_root, 4)
    mu, logvar = model.encode(x)
    assert mu.shape == (4, 4) and model.decode(mu).shape == x.shape
    assert model.sample(3).abs().max() <= 1 and model.reconstruct(x).shape == x.shape
    with pytest.raises(ValueError, match="expects images"):
        model.encode(torch.zeros(2, 3, 28, 28))


def test_checkpoint_without_its_source_tests_and_resumes(tmp_path, vae_data):
    source, _ = _source(tmp_path)
    model = VAE(**TINY, pretrained=source, l2sp_alpha=0.1, iw_samples=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, enable_version_counter=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[ckpt], limit_val_batches=1).fit(model, datamodule=vae_data)
    anchor = model.l2sp.anchor_0.clone()
    moved = tmp_path / "moved.ckpt"
    shutil.copy(tmp_path / "ckpt/last.ckpt", moved)
    (tmp_path / "vae_source.ckpt").unlink()
    loaded = VAE.load_from_checkpoint(moved, weights_only=True)
    assert torch.equal(loaded.l2sp.anchor_0, anchor) and loaded.load_report is None
    again = VAE(**TINY, pretrained=source, l2sp_alpha=0.1, iw_samples=2)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[ckpt], limit_val_batches=1, limit_test_batches=1)
    trainer.fit(again, datamodule=vae_data, ckpt_path=str(moved))
    assert trainer.current_epoch == 2 and torch.equal(again.l2sp.anchor_0, anchor)
    assert "test/nll_iwae" in trainer.test(again, datamodule=vae_data)[0]


def test_sample_command_writes_vae_samples(tmp_path):
    from lit_finetune.sample import load_module, write_samples

    source, _ = _source(tmp_path)
    paths = write_samples(load_module(source), 5, tmp_path / "samples")
    assert len(paths) == 6 and paths[-1].name == "grid.png"


def test_a_checkpoint_of_another_module_or_a_missing_file_is_refused_clearly(tmp_path):
    from lit_finetune import DCGAN
    from lit_finetune.transfer import PretrainedLoadError

    torch.save(
        {"state_dict": DCGAN(latent_dim=4, generator_width=4, discriminator_width=4).state_dict()},
        tmp_path / "gan.ckpt",
    )
    with pytest.raises(PretrainedLoadError, match="Nothing in .*gan.ckpt matches the model's keys"):
        VAE(**TINY, pretrained=str(tmp_path / "gan.ckpt")).load_pretrained_weights()
    with pytest.raises(PretrainedLoadError, match="missing.ckpt.*does not exist"):
        VAE(**TINY, pretrained=str(tmp_path / "missing.ckpt")).load_pretrained_weights()


def _resume_run(tmp_path, data, max_epochs, ckpt_path=None):
    L.seed_everything(0)
    model = VAE(**TINY, kl_warmup_steps=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, enable_version_counter=False)
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, deterministic=True, callbacks=[ckpt], limit_val_batches=1)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_resume_is_exact(tmp_path, vae_data):
    """The reparameterisation noise comes from the global RNG, which checkpoints carry."""
    full = _resume_run(tmp_path / "full", vae_data, 3)
    _resume_run(tmp_path / "part", vae_data, 2)
    resumed = _resume_run(tmp_path / "part", vae_data, 3, str(tmp_path / "part/ckpt/last.ckpt"))
    a, b = full.state_dict(), resumed.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
