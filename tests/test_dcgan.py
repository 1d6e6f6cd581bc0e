"""DCGAN: manual optimisation, fine-tuning strategies, EMA, divergence, self-contained checkpoints, resume."""

from __future__ import annotations

import shutil
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import assert_same_training_state, quiet_trainer, save_lightning_checkpoint
from lit_finetune import DCGAN
from lit_finetune.callbacks import LayerFreezing
from lit_finetune.checkpoint_io import AtomicCheckpointIO
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.modules.dcgan import TrainingDiverged

TINY = dict(latent_dim=16, generator_width=8, discriminator_width=8)


@pytest.fixture
def gan_data(fashion_root):
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=20, augment=False
    )


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _save_source(tmp_path, **kwargs) -> tuple[str, dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    source = DCGAN(**TINY, **kwargs)
    return save_lightning_checkpoint(source, tmp_path / "source.ckpt"), _state(source)


def test_two_optimizers_named_groups_and_losses(tmp_path, gan_data):
    model = DCGAN(**TINY, n_critic=2)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=1)
    trainer.fit(model, datamodule=gan_data)
    opt_g, opt_d = trainer.optimizers
    assert all(g["name"].startswith("generator") for g in opt_g.param_groups)
    assert {"discriminator.blocks.0", "discriminator.blocks.1", "discriminator.head"} <= {g["name"] for g in opt_d.param_groups}
    # n_critic=2: two D steps per G step; global_step counts optimizer steps of both
    assert opt_d.param_groups[0]["steps_trained"] == 2 * opt_g.param_groups[0]["steps_trained"]
    assert {"train/d_loss", "train/g_loss", "val/d_loss"} <= trainer.callback_metrics.keys()
    assert model.sample(3).shape == (3, 1, 28, 28)


def test_freezed_keeps_lowest_discriminator_block_fixed(tmp_path, gan_data):
    model = DCGAN(**TINY)
    before = _state(model)
    freezing = LayerFreezing(["discriminator.blocks.0"], unfreeze_at_epoch=None)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[freezing], limit_val_batches=1).fit(model, datamodule=gan_data)
    after = _state(model)
    frozen = [k for k in before if k.startswith("discriminator.blocks.0.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for prefix in ("discriminator.blocks.1.", "discriminator.head.", "generator.blocks.0."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_diffaugment_applies_to_real_and_fake_in_both_steps(tmp_path, gan_data):
    model = DCGAN(**TINY, diffaugment="translation", n_critic=2)
    calls: list[tuple[int, bool]] = []  # (batch size, needs grad: a fake in the G step)
    model.augment.register_forward_pre_hook(lambda module, args: calls.append((args[0].shape[0], args[0].requires_grad)))
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=gan_data)
    # per D step: the real batch and a detached fake; then the G step's fake, with gradients to G
    assert calls == [(20, False), (20, False), (20, False), (20, False), (20, True)]


def test_l2sp_is_zero_at_the_pretrained_weights_and_pulls_back(tmp_path, gan_data):
    source, source_state = _save_source(tmp_path)
    model = DCGAN(**TINY, pretrained=source, l2sp_generator=1.0, l2sp_discriminator=1.0)
    report = model.load_pretrained_weights()
    assert report.loaded and not report.missing and not report.reshaped
    assert model.l2sp_g().item() == 0 and model.l2sp_d().item() == 0
    assert torch.equal(model.generator_ema.project.conv.weight, source_state["generator.project.conv.weight"])
    quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(model, datamodule=gan_data)
    assert model.l2sp_g().item() > 0 and model.l2sp_d().item() > 0


def test_conditional_from_unconditional_source_reports_new_label_weights(tmp_path):
    source, _ = _save_source(tmp_path)
    model = DCGAN(**TINY, num_classes=5, conditional=True, pretrained=source)
    report = model.load_pretrained_weights()
    assert "generator.embed.weight" in report.missing and "discriminator.embed.weight" in report.missing
    labels = torch.tensor([0, 1, 2, 3, 4])
    assert model.sample(5, labels=labels).shape == (5, 1, 28, 28)


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_conditional_adaptation_starts_as_the_source_discriminator(tmp_path, spectral_norm):
    """The projection term starts at 0, so D(x, y) = source D(x): under spectral norm through the term's gain (the
    normalised embedding cannot be 0)."""
    source, _ = _save_source(tmp_path, spectral_norm=spectral_norm)
    model = DCGAN(**TINY, num_classes=5, conditional=True, pretrained=source, spectral_norm=spectral_norm)
    model.load_pretrained_weights()
    unconditional = DCGAN(**TINY, spectral_norm=spectral_norm)
    unconditional.load_state_dict(torch.load(source, weights_only=True)["state_dict"])
    x, y = torch.rand(4, 1, 28, 28) * 2 - 1, torch.tensor([0, 1, 2, 3])
    model.eval(), unconditional.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.discriminator(x, y), unconditional.discriminator(x), rtol=0, atol=1e-6)
    assert (model.discriminator.embed_gain is not None) == spectral_norm
    fresh = DCGAN(**TINY, num_classes=5, conditional=True, spectral_norm=spectral_norm)
    if spectral_norm:  # a conditional D trained from scratch uses its projection at full weight
        assert fresh.discriminator.embed_gain.item() == 1.0


def test_l2sp_pulls_back_only_what_the_source_provided(tmp_path):
    """L2-SP holds the pretrained part (Li et al.): the label embeddings the source lacks are not pulled toward
    their fresh values, whatever a checkpoint round trip does."""
    source, _ = _save_source(tmp_path)
    model = DCGAN(**TINY, num_classes=5, conditional=True, pretrained=source, l2sp_generator=1.0,
                  l2sp_discriminator=1.0)  # fmt: skip
    model.load_pretrained_weights()
    assert "embed.weight" not in model.l2sp_g.pulled_names and "embed.weight" not in model.l2sp_d.pulled_names
    assert "project.conv.weight" in model.l2sp_g.pulled_names  # adapted (label rows added): still the source's
    with torch.no_grad():
        model.generator.embed.weight.add_(1.0)
        model.discriminator.embed.weight.add_(1.0)
    assert model.l2sp_g().item() == 0 and model.l2sp_d().item() == 0
    with torch.no_grad():
        model.generator.project.conv.weight.add_(0.1)
    assert model.l2sp_g().item() > 0
    reloaded = DCGAN(**TINY, num_classes=5, conditional=True, l2sp_generator=1.0, l2sp_discriminator=1.0)
    state = model.state_dict()
    reloaded.load_state_dict(state)
    assert reloaded.l2sp_g.pulled_names == model.l2sp_g.pulled_names
    del state["l2sp_g.pulled"]  # a checkpoint from before the flag: every parameter was anchored
    reloaded.load_state_dict(state)
    assert reloaded.l2sp_g.pulled_names == reloaded.l2sp_g._names


def test_divergence_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, gan_data):
    model = DCGAN(**TINY)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, save_top_k=1, enable_version_counter=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[ckpt], limit_val_batches=0, plugins=[AtomicCheckpointIO()]).fit(
        model, datamodule=gan_data
    )
    last = tmp_path / "ckpt" / "last.ckpt"
    good = last.read_bytes()
    forward = model.discriminator.forward
    model.discriminator.forward = lambda x, y=None: forward(x, y) * float("nan")
    trainer = quiet_trainer(tmp_path, max_epochs=3, callbacks=[ckpt], limit_val_batches=0, plugins=[AtomicCheckpointIO()])
    with pytest.raises(TrainingDiverged, match=r"discriminator loss is nan at global step \d+"):
        trainer.fit(model, datamodule=gan_data, ckpt_path=str(last))
    assert last.read_bytes() == good


def _resume_run(tmp_path, gan_data, max_epochs, ckpt_path=None):
    L.seed_everything(0)
    model = DCGAN(**TINY, n_critic=2, diffaugment="color,translation,cutout", ema_decay=0.9,
                  generator_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))  # fmt: skip
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, enable_version_counter=False)
    trainer = quiet_trainer(tmp_path, max_epochs=max_epochs, deterministic=True, callbacks=[ckpt], limit_val_batches=1)
    trainer.fit(model, datamodule=gan_data, ckpt_path=ckpt_path)
    return model, trainer


def test_resume_continues_both_optimizers_the_ema_and_schedulers_exactly(tmp_path, gan_data):
    full, full_trainer = _resume_run(tmp_path / "full", gan_data, max_epochs=3)
    _resume_run(tmp_path / "part", gan_data, max_epochs=2)
    resumed, resumed_trainer = _resume_run(tmp_path / "part", gan_data, 3, str(tmp_path / "part/ckpt/last.ckpt"))
    assert_same_training_state(full, full_trainer, resumed, resumed_trainer)  # G, D, EMA, Adam moments, LRs


def test_fine_tuned_checkpoint_samples_and_resumes_without_its_source(tmp_path, gan_data):
    from lit_finetune.sample import load_module, write_samples

    source, _ = _save_source(tmp_path, num_classes=5, conditional=True)
    model = DCGAN(**TINY, num_classes=5, conditional=True, pretrained=source, l2sp_generator=0.1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="last", monitor=None, enable_version_counter=False)
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[ckpt], limit_val_batches=1).fit(model, datamodule=gan_data)
    anchor = model.l2sp_g.anchor_0.clone()
    moved = tmp_path / "moved.ckpt"
    shutil.copy(tmp_path / "ckpt/last.ckpt", moved)
    (tmp_path / "source.ckpt").unlink()

    loaded = load_module(moved)
    assert isinstance(loaded, DCGAN) and torch.equal(loaded.l2sp_g.anchor_0, anchor)
    paths = write_samples(loaded, 7, tmp_path / "samples", labels=[0, 4])
    assert len(paths) == 8 and paths[-1].name == "grid.png" and all(p.stat().st_size > 100 for p in paths)
    again = DCGAN(**TINY, num_classes=5, conditional=True, pretrained=source, l2sp_generator=0.1)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[ckpt], limit_val_batches=1).fit(
        again, datamodule=gan_data, ckpt_path=str(moved)
    )
    assert torch.equal(again.l2sp_g.anchor_0, anchor)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="conditional DCGAN needs num_classes"):
        DCGAN(conditional=True)
    with pytest.raises(ValueError, match="loss must be one of"):
        DCGAN(loss="wasserstein")
    with pytest.raises(ValueError, match="expects images"):
        DCGAN(**TINY, in_channels=3).training_step((torch.zeros(2, 1, 28, 28), torch.zeros(2)), 0)


@pytest.fixture
def tiny_extractor(tmp_path):
    """An (untrained) 10-class extractor checkpoint: FID/KID mechanics need features, not good ones."""
    from lit_finetune import ImageClassifier

    return save_lightning_checkpoint(ImageClassifier(num_classes=10), tmp_path / "extractor.ckpt")


def test_fid_kid_class_counts_and_label_agreement_at_validation_and_test(tmp_path, gan_data, tiny_extractor):
    model = DCGAN(**TINY, num_classes=5, conditional=True, feature_extractor=tiny_extractor)
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, datamodule=gan_data)
    assert {"val/fid", "val/kid_mean", "val/kid_std", "val/label_agreement"} <= trainer.callback_metrics.keys()
    results = trainer.test(model, datamodule=gan_data)[0]
    assert results["test/fid"] > 0 and 0 <= results["test/label_agreement"] <= 1
    counts = [results[f"test/class_count/{i}"] for i in range(10)]
    assert sum(counts) == 40  # 2 test batches of 20: as many fakes as real images
    assert "generative_metrics" not in "".join(model.state_dict())  # the checkpoint stays metric-free


def test_missing_feature_extractor_names_the_command(tmp_path, gan_data):
    from lit_finetune.metrics import ExtractorNotFoundError

    model = DCGAN(**TINY, feature_extractor=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ExtractorNotFoundError, match="configs/metrics/feature_extractor.yaml"):
        quiet_trainer(tmp_path, max_steps=1).fit(model, datamodule=gan_data)


def test_evaluate_raw_generator_instead_of_ema(tmp_path, gan_data, tiny_extractor):
    model = DCGAN(**TINY, feature_extractor=tiny_extractor, ema_decay=0.999)
    trainer = quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, limit_test_batches=2)
    trainer.fit(model, datamodule=gan_data)
    torch.manual_seed(0)
    ema = trainer.test(model, datamodule=gan_data)[0]["test/fid"]
    model.hparams.evaluate_ema = False
    torch.manual_seed(0)
    raw = trainer.test(model, datamodule=gan_data)[0]["test/fid"]
    assert ema != raw  # different generators (the EMA has barely moved from the initial G after 2 steps)
    torch.manual_seed(0)
    assert torch.equal(model.sample(2), (torch.manual_seed(0), model.generator(torch.randn(2, 16)))[1])


@pytest.mark.parametrize("conditioning, spectral_norm", [("projection", False), ("concat", False), ("concat", True)])
def test_conditional_fine_tune_from_an_unconditional_source_starts_as_the_source(tmp_path, conditioning, spectral_norm):
    """G(z, y) = source G(z) and D(x, y) = source D(x) for every label right after loading; the report says so.

    With concat conditioning D's first conv keeps the image filters unscaled and its label channels start at 0
    (with spectral norm, its power-iteration vector is extended the same way, so sigma is the source's)."""
    from lit_finetune import DCGAN

    shape = {"latent_dim": 16, "generator_width": 8, "discriminator_width": 8, "spectral_norm": spectral_norm}
    torch.manual_seed(0)
    source = DCGAN(**shape)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "source.ckpt")
    source_path = str(tmp_path / "source.ckpt")
    model = DCGAN(**shape, conditional=True, num_classes=5, conditioning=conditioning, pretrained=source_path)
    report = model.load_pretrained_weights()
    expected = ["generator.project.conv.weight (label rows zero)"]
    if conditioning == "concat":
        key = "discriminator.blocks.0.conv." + ("parametrizations.weight.original" if spectral_norm else "weight")
        expected.append(f"{key} (label channels zero)")
        if spectral_norm:
            expected.append("discriminator.blocks.0.conv.parametrizations.weight.0._v (label channels zero)")
        d_weight = model.state_dict()[key]
        assert torch.equal(d_weight[:, :1], source.state_dict()[key])  # unscaled
        assert d_weight[:, 1:].abs().sum() == 0
    assert report.adapted == expected and not report.reshaped
    source.eval(), model.eval()
    z, x = torch.randn(10, 16), torch.rand(10, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        for label in range(5):
            y = torch.full((10,), label)
            assert torch.allclose(model.generator(z, y), source.generator(z), atol=1e-6)
            assert torch.allclose(model.generator_ema(z, y), source.generator(z), atol=1e-6)
            assert torch.allclose(model.discriminator(x, y), source.discriminator(x), atol=1e-6)
    assert model.generator.project.conv.weight[16:].abs().sum() == 0  # the label's rows: zero, then learned


def test_reduce_lr_on_plateau_steps_on_its_monitored_metric(tmp_path, gan_data):
    """Manual optimisation: Lightning drops `monitor`, the module keeps it and steps the plateau scheduler."""
    from functools import partial

    # an improvement must beat the best by 10 (never): every epoch after the first halves the LR
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, factor=0.5, patience=0, threshold=10.0,
                      threshold_mode="abs")  # fmt: skip
    model = DCGAN(**TINY, generator_lr_scheduler=plateau)
    trainer = quiet_trainer(tmp_path, max_epochs=4, limit_train_batches=1, limit_val_batches=1, logger=False,
                            enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=gan_data)
    opt_g, opt_d = trainer.optimizers
    assert [g["lr"] for g in opt_g.param_groups] == pytest.approx([2e-4 * 0.5**3] * len(opt_g.param_groups))
    assert opt_d.param_groups[0]["lr"] == pytest.approx(2e-4)  # no scheduler

    model = DCGAN(**TINY, generator_lr_scheduler=plateau, scheduler_monitor="val/fid")  # not logged: no extractor
    with pytest.raises(ValueError, match="monitors 'val/fid', which this run does not log.*val/d_loss.*scheduler_monitor"):
        quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                      enable_checkpointing=False).fit(model, datamodule=gan_data)  # fmt: skip


def test_metrics_gating_with_validation_every_n_steps(tmp_path, gan_data, tiny_extractor):
    """check_val_every_n_epoch=None (validate every val_check_interval batches): metrics in every n-th validation."""
    model = DCGAN(**TINY, feature_extractor=tiny_extractor, metrics_every_n_epochs=2)
    computed = []

    class Spy(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            computed.append(pl_module._metrics_on())

    trainer = quiet_trainer(tmp_path, max_steps=8, max_epochs=-1, check_val_every_n_epoch=None, val_check_interval=1,
                            limit_val_batches=1, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                            callbacks=[Spy()])  # fmt: skip
    trainer.fit(model, datamodule=gan_data)  # 4 batches (2 optimizer steps each), validated after each
    assert computed == [True, False, True, False]
    assert "val/fid" in trainer.callback_metrics


def test_a_standalone_validate_after_fit_computes_the_metrics(tmp_path, gan_data, tiny_extractor):
    """After a fit, current_epoch is max_epochs: the every-n-th-epoch gate must not skip FID in trainer.validate()."""
    model = DCGAN(**TINY, feature_extractor=tiny_extractor, metrics_every_n_epochs=2)
    trainer = quiet_trainer(tmp_path, max_epochs=3, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                            logger=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=gan_data)  # epochs 0 and 2 get metrics; current_epoch ends at 3
    assert trainer.current_epoch == 3
    metrics = trainer.validate(model, datamodule=gan_data, verbose=False)[0]
    assert "val/fid" in metrics and any(k.startswith("val/kid") for k in metrics)


def test_sample_cli_labels_out_of_range_is_a_one_line_error(tmp_path):
    """`lit-finetune-sample --labels 5 9` on a 5-class generator: one line naming the valid labels, no traceback."""
    import subprocess
    import sys

    source, _ = _save_source(tmp_path, num_classes=5, conditional=True)
    out_dir = str(tmp_path / "s")
    run = [sys.executable, "-m", "lit_finetune.sample", "--ckpt_path", source, "--num", "2", "--out", out_dir]
    out = subprocess.run([*run, "--labels", "5", "9"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "lit-finetune-sample: error: --labels 5 9: the generator has 5 classes, labels 0 to 4."
    ]
    assert subprocess.run([*run, "--labels", "0", "4"], capture_output=True, timeout=120).returncode == 0


def test_evaluation_noise_is_fixed_per_batch_differs_per_rank_and_leaves_the_global_rng(tmp_path, gan_data):
    model = DCGAN(**TINY)
    first = model.evaluation_noise(4, batch_idx=0)
    assert torch.equal(first, model.evaluation_noise(4, batch_idx=0))  # every validation sees the same z
    assert not torch.equal(first, model.evaluation_noise(4, batch_idx=1))

    class _Rank1:
        global_rank = 1

    model._trainer = _Rank1()
    assert not torch.equal(first, model.evaluation_noise(4, batch_idx=0))  # rank 1 draws other fakes than rank 0
    model._trainer = None

    # two validations of the same weights give the same loss, and validation draws nothing from the global RNG
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=2)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    losses = [trainer.validate(model, datamodule=gan_data, verbose=False)[0]["val/d_loss"] for _ in range(2)]
    assert losses[0] == losses[1]
    assert torch.equal(state, torch.get_rng_state())


def test_sampling_before_the_source_is_read_warns(tmp_path):
    source, _ = _save_source(tmp_path)
    model = DCGAN(**TINY, pretrained=source)
    with pytest.warns(UserWarning, match="before its pretrained weights"):
        model.sample(2)
    model = DCGAN(**TINY, pretrained=source)
    model.load_pretrained_weights()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.sample(2)
