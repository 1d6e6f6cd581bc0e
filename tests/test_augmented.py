"""GANAugmentedClassifier: a frozen G(z, y) feeds labelled synthetic images into the classifier's batches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import quiet_trainer, save_lightning_checkpoint
from torch import nn

from lit_finetune import DCGAN, GANAugmentedClassifier, ImageClassifier
from lit_finetune.cli import cli_main
from lit_finetune.modules.augmented import balanced_labels
from lit_finetune.modules.loading import CheckpointLoadError

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "augmented"
QUIET = [
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.enable_model_summary",
    "false",
    "--trainer.logger",
    "false",
]


class MarkedGenerator(nn.Module):
    """A user's own G(z, y) (no num_classes attribute): constant images whose value encodes the label and z[:, 0].

    Pixel value ``0.1 * y - 0.45`` plus ``0.01 * tanh(z0)``: never a real Fashion-MNIST image, label readable.
    """

    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))  # a weight that must never change

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        value = self.scale * (0.1 * y.float() - 0.45 + 0.01 * torch.tanh(z[:, 0]))
        return value.view(-1, 1, 1, 1).expand(-1, 1, 28, 28).contiguous()


def marked_labels(x: torch.Tensor) -> torch.Tensor:
    """Labels of MarkedGenerator images."""
    return torch.round((x[:, 0, 0, 0] + 0.45) / 0.1).long()


def is_marked(x: torch.Tensor) -> torch.Tensor:
    """True for constant images (every MarkedGenerator image; no real one)."""
    flat = x.flatten(1)
    return (flat.max(1).values - flat.min(1).values) < 1e-6


class ThresholdTeacher(nn.Module):
    """A teacher that gives an image its marked label with probability ~1 if its z0 part is positive, else ~0."""

    num_classes = 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        labels = marked_labels(x)
        z_part = x[:, 0, 0, 0] - (0.1 * labels.float() - 0.45)
        logits = torch.full((len(x), 5), 0.0)
        logits[torch.arange(len(x)), labels] = torch.where(z_part > 0, 50.0, -50.0)
        return logits


def record_training_batches(model: GANAugmentedClassifier) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every (x, y) the classifier's loss sees in training."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    shared = model._shared_step

    def recorder(batch, metrics):
        if model.training:  # training_step (validation and test run in eval mode)
            seen.append((batch[0].detach().clone(), batch[1].clone()))
        return shared(batch, metrics)

    model._shared_step = recorder
    return seen


def test_balanced_labels_counts_differ_by_at_most_one():
    for n in (0, 1, 7, 10, 23):
        for offset in range(5):
            counts = torch.bincount(balanced_labels(n, 5, offset), minlength=5)
            assert counts.sum() == n and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_batches_hold_the_configured_ratio_with_balanced_labels(ratio, tiny_target, tmp_path):
    model = GANAugmentedClassifier(5, generator=MarkedGenerator(), synthetic_ratio=ratio, synthetic_seed=1)
    seen = record_training_batches(model)
    quiet_trainer(tmp_path, max_steps=4, max_epochs=-1, logger=False, enable_checkpointing=False).fit(
        model, datamodule=tiny_target
    )
    assert len(seen) == 4
    for x, y in seen:
        synthetic = is_marked(x)
        real = int((~synthetic).sum())
        assert real == 20  # tiny_target's batch size
        assert int(synthetic.sum()) == round(ratio * real)
        assert synthetic[real:].all() and not synthetic[:real].any()  # real first, then synthetic
        assert torch.equal(marked_labels(x[synthetic]), y[synthetic])  # each image carries the label it was drawn for
        counts = torch.bincount(y[synthetic], minlength=5)
        assert counts.max() - counts.min() <= 1


def test_generator_never_changes_and_gets_no_gradient(tiny_target, tmp_path):
    dcgan = DCGAN(latent_dim=8, num_classes=5, conditional=True, generator_width=8, discriminator_width=8)
    generator = dcgan.generator_network()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    model = GANAugmentedClassifier(5, generator=generator, synthetic_ratio=1.0)
    backbone_before = model.backbone.conv1.weight.detach().clone()
    trainer = quiet_trainer(tmp_path, max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=tiny_target)
    assert not torch.equal(model.backbone.conv1.weight, backbone_before)  # the classifier did train
    for key, value in generator.state_dict().items():
        assert torch.equal(value, before[key]), key  # BatchNorm running statistics included: eval mode
    assert all(p.grad is None and not p.requires_grad for p in generator.parameters())
    assert not generator.training
    optimized = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in generator.parameters()}
    assert not any(k.startswith(("generator", "_frozen")) for k in model.state_dict())


def test_filter_keeps_only_samples_the_teacher_agrees_with():
    model = GANAugmentedClassifier(5, generator=MarkedGenerator(), teacher=ThresholdTeacher(), confidence_threshold=0.9)
    x, y, stats = model.draw_synthetic(200)
    teacher_prob = ThresholdTeacher()(x).softmax(-1).gather(1, y[:, None]).squeeze(1)
    assert (teacher_prob >= 0.9).all()  # every kept sample passes
    # half of the draws have z0 < 0 and are rejected, so about 2 draws per kept sample
    assert 0.35 < stats["synthetic_acceptance"] < 0.65
    assert stats["synthetic_filled"] == len(x) / 200 > 0.99  # redrawing fills nearly every slot (10 rounds)
    counts = torch.bincount(y, minlength=5)
    assert counts.max() - counts.min() <= 1  # redraws keep each slot's label: still balanced


def test_filter_leaves_a_slot_empty_when_the_teacher_always_disagrees():
    class OnlyClassZero(nn.Module):
        def forward(self, x):
            return torch.tensor([[20.0, 0, 0, 0, 0]]).expand(len(x), -1)

    model = GANAugmentedClassifier(
        5, generator=MarkedGenerator(), teacher=OnlyClassZero(), confidence_threshold=0.9, filter_max_rounds=3
    )
    _, y, stats = model.draw_synthetic(10)
    assert y.tolist() == [0, 0]  # only label-0 slots survive
    assert stats["synthetic_acceptance"] == pytest.approx(2 / (10 + 8 + 8))  # 8 rejected slots redrawn twice
    assert stats["synthetic_filled"] == pytest.approx(0.2)


def test_cas_mode_skips_a_batch_the_teacher_rejects_whole(tiny_target, tmp_path):
    """A synthetic-only batch with every draw rejected has nothing to train on: skipped with the fix named, no NaN
    loss, no update, and the epoch still ends."""

    class Uniform(nn.Module):
        def forward(self, x):
            return torch.zeros(len(x), 5)  # probability 0.2 for every class: below any threshold above it

    model = GANAugmentedClassifier(5, generator=MarkedGenerator(), teacher=Uniform(), confidence_threshold=0.5,
                                   synthetic_only=True, filter_max_rounds=2)  # fmt: skip
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = quiet_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False,
                            enable_checkpointing=False)  # fmt: skip
    with pytest.warns(UserWarning, match="rejected every synthetic image.*lower confidence_threshold"):
        trainer.fit(model, datamodule=tiny_target)
    assert trainer.state.finished
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith(("backbone.", "head.")))


def test_cas_mode_trains_on_no_real_image(tiny_target, tmp_path):
    model = GANAugmentedClassifier(5, generator=MarkedGenerator(), synthetic_only=True)
    seen = record_training_batches(model)
    quiet_trainer(tmp_path, max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False).fit(
        model, datamodule=tiny_target
    )
    assert len(seen) == 3
    for x, _ in seen:
        assert len(x) == 20 and is_marked(x).all()  # a batch's worth of synthetic images, no real one


def test_real_only_with_ratio_zero_needs_no_generator(tiny_target, tmp_path):
    model = GANAugmentedClassifier(5, synthetic_ratio=0)
    seen = record_training_batches(model)
    quiet_trainer(tmp_path, max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False).fit(
        model, datamodule=tiny_target
    )
    assert all(not is_marked(x).any() and len(x) == 20 for x, _ in seen)


def test_missing_generator_is_a_clear_error(tiny_target, tmp_path):
    with pytest.raises(ValueError, match="needs a generator.*--model.generator"):
        quiet_trainer(tmp_path, max_steps=1, max_epochs=-1, logger=False).fit(
            GANAugmentedClassifier(5), datamodule=tiny_target
        )


@pytest.mark.parametrize(
    ("dcgan_args", "message"),
    [
        ({"num_classes": 3, "conditional": True}, "trained on 3 classes.*num_classes=5"),
        ({}, "unconditional"),
    ],
    ids=["wrong_num_classes", "unconditional"],
)
def test_a_generator_that_cannot_label_gives_a_clear_error(dcgan_args, message, tiny_target, tmp_path):
    ckpt = save_lightning_checkpoint(
        DCGAN(latent_dim=8, generator_width=8, discriminator_width=8, **dcgan_args), tmp_path / "g.ckpt"
    )
    model = GANAugmentedClassifier(5, generator=ckpt)
    with pytest.raises(ValueError, match=message):
        quiet_trainer(tmp_path, max_steps=1, max_epochs=-1, logger=False).fit(model, datamodule=tiny_target)


def test_a_users_generator_with_too_few_classes_gives_a_clear_error():
    class ThreeClassGenerator(nn.Module):
        latent_dim = 4

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(3, 28 * 28)

        def forward(self, z, y):
            return self.embed(y).view(-1, 1, 28, 28).tanh()

    with pytest.raises(ValueError, match="failed on labels 0..4.*num_classes=5"):
        GANAugmentedClassifier(5, generator=ThreeClassGenerator()).check_generator()


def test_a_generator_of_another_image_shape_gives_a_clear_error():
    dcgan = DCGAN(
        latent_dim=8, num_classes=5, conditional=True, image_size=32, generator_width=8, discriminator_width=8
    )
    with pytest.raises(ValueError, match=r"shape \(1, 32, 32\).*\(1, 28, 28\)"):
        GANAugmentedClassifier(5, generator=dcgan.generator_network()).check_generator()


def test_a_classifier_checkpoint_is_not_a_generator(tmp_path):
    ckpt = save_lightning_checkpoint(ImageClassifier(num_classes=5), tmp_path / "clf.ckpt")
    with pytest.raises(CheckpointLoadError, match="no G\\(z, y\\).*conditional DCGAN"):
        GANAugmentedClassifier(5, generator=ckpt).check_generator()
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointLoadError, match="generator.*not a readable"):
        GANAugmentedClassifier(5, generator=str(tmp_path / "bad.ckpt")).check_generator()


def test_generator_seeds_differ_by_rank_and_batch_and_survive_a_checkpoint():
    model = GANAugmentedClassifier(5, generator=MarkedGenerator(), synthetic_seed=3)
    first, _, _ = model.draw_synthetic(8)
    second, _, _ = model.draw_synthetic(8)
    assert not torch.equal(first, second)  # each batch draws new noise
    checkpoint: dict = {}
    model.on_save_checkpoint(checkpoint)
    third, _, _ = model.draw_synthetic(8)
    restored = GANAugmentedClassifier(5, generator=MarkedGenerator(), synthetic_seed=3)
    restored.on_load_checkpoint(checkpoint)
    assert torch.equal(restored.draw_synthetic(8)[0], third)  # a resumed fit draws what the uninterrupted one would


def test_fit_from_checkpoints_then_test_and_predict_without_the_generator_file(tiny_target, tmp_path, monkeypatch):
    """The CLI path of the issue: a conditional DCGAN checkpoint as --model.generator, a pretrained source; then
    the generator (and the source) are deleted and the copied classifier checkpoint still tests and predicts."""
    monkeypatch.chdir(tmp_path)
    source = ImageClassifier(num_classes=5)
    save_lightning_checkpoint(source, tmp_path / "source.ckpt")
    dcgan = DCGAN(latent_dim=64, generator_width=32, discriminator_width=32, num_classes=5, conditional=True)
    save_lightning_checkpoint(dcgan, tmp_path / "cdcgan.ckpt")
    data = ["--data.init_args.root", str(tiny_target.root), "--data.init_args.samples_per_class", "8",
            "--data.init_args.val_split", "50", "--data.init_args.batch_size", "20"]  # fmt: skip
    cli = cli_main(["fit", "--config", str(CONFIGS / "classifier.yaml"), "--model.init_args.generator", "cdcgan.ckpt",
                    "--model.init_args.pretrained", "source.ckpt", "--trainer.max_epochs", "2", *data, *QUIET])  # fmt: skip
    model = cli.model
    assert model.load_report is not None and model.load_report.loaded  # augmentation and fine-tuning combine
    assert torch.equal(model.generator.project[0].weight, dcgan.generator_ema.project[0].weight)  # evaluate_ema default
    best = tmp_path / "runs/augmented/classifier/checkpoints/best.ckpt"
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(best, moved)
    shutil.rmtree(tmp_path / "runs")
    (tmp_path / "cdcgan.ckpt").unlink()
    (tmp_path / "source.ckpt").unlink()

    checkpoint = torch.load(moved, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["generator"] == "cdcgan.ckpt"  # provenance only
    assert not any("generator" in key for key in checkpoint["state_dict"])
    restored = GANAugmentedClassifier.load_from_checkpoint(moved, weights_only=True)
    trainer = quiet_trainer(tmp_path, logger=False)
    [result] = trainer.test(restored, datamodule=tiny_target, verbose=False)
    assert 0 <= result["test/acc"] <= 1
    predictions = trainer.predict(restored, datamodule=tiny_target)
    assert sum(len(p["label"]) for p in predictions) == len(tiny_target.predict_dataloader().dataset) > 0
    test_cli = cli_main(
        ["test", "--config", str(CONFIGS / "classifier.yaml"), "--ckpt_path", str(moved), *data, *QUIET]
    )
    assert test_cli.trainer.callback_metrics["test/acc"] == pytest.approx(result["test/acc"])


def test_resume_needs_the_generator_and_says_so(tiny_target, tmp_path):
    generator_ckpt = save_lightning_checkpoint(
        DCGAN(latent_dim=8, num_classes=5, conditional=True, generator_width=8, discriminator_width=8),
        tmp_path / "g.ckpt",
    )
    model = GANAugmentedClassifier(5, generator=generator_ckpt)
    trainer = quiet_trainer(tmp_path, max_steps=1, max_epochs=-1, logger=False)
    trainer.fit(model, datamodule=tiny_target)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    Path(generator_ckpt).unlink()
    with pytest.raises(CheckpointLoadError, match="generator \\(--model.generator\\).*does not exist"):
        quiet_trainer(tmp_path, max_steps=2, max_epochs=-1, logger=False).fit(
            GANAugmentedClassifier(5, generator=generator_ckpt), datamodule=tiny_target, ckpt_path=ckpt
        )


def test_resumed_fit_equals_the_uninterrupted_one(fashion_root, tmp_path):
    """Resume mid-epoch from a step checkpoint: same synthetic draws, same weights, bit for bit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_finetune.data import FashionMNISTDataModule

    def fit(ckpt_path=None, callbacks=()) -> GANAugmentedClassifier:
        torch.manual_seed(0)
        model = GANAugmentedClassifier(5, generator=MarkedGenerator(), synthetic_ratio=0.5)
        data = FashionMNISTDataModule(root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8,
                                      val_split=50, batch_size=20)  # fmt: skip
        trainer = quiet_trainer(tmp_path, max_steps=3, max_epochs=-1, logger=False, callbacks=list(callbacks),
                                enable_checkpointing=bool(callbacks))  # fmt: skip
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
        return model

    full = fit()
    fit(callbacks=[ModelCheckpoint(tmp_path / "steps", "{step}", every_n_train_steps=1, save_top_k=-1)])
    resumed = fit(ckpt_path=tmp_path / "steps" / "step=1.ckpt")  # mid-epoch: 2 batches per epoch
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert resumed.noise_stream.state == full.noise_stream.state


def test_a_cli_written_checkpoint_loads_as_generator(tmp_path):
    """LightningCLI records the class as written in the config (``lit_finetune.DCGAN``), not its defining module."""
    from lit_finetune.modules.loading import load_module_checkpoint

    path = save_lightning_checkpoint(DCGAN(latent_dim=8, num_classes=5, conditional=True), tmp_path / "g.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["_class_path"] = "lit_finetune.DCGAN"
    torch.save(checkpoint, path)
    assert isinstance(load_module_checkpoint(path), DCGAN)
    checkpoint["hyper_parameters"]["_class_path"] = "os.system"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointLoadError, match="does not name a lit_finetune module"):
        load_module_checkpoint(path)


def test_a_plain_python_checkpoint_loads_as_itself_and_as_teacher(tmp_path):
    """``on_save_checkpoint`` writes ``_class_path`` into the hyper-parameters: it must not reach
    ``**classifier_args``."""
    from lit_finetune.modules.augmented import load_teacher

    model = GANAugmentedClassifier(5, backbone="resnet10", synthetic_ratio=0.25, synthetic_seed=3)
    path = save_lightning_checkpoint(model, tmp_path / "aug.ckpt")
    assert torch.load(path, weights_only=True)["hyper_parameters"]["_class_path"].endswith("GANAugmentedClassifier")
    restored = GANAugmentedClassifier.load_from_checkpoint(path, weights_only=True)
    assert restored.hparams.synthetic_ratio == 0.25 and restored.hparams.backbone == "resnet10"
    assert "_class_path" not in restored.hparams
    teacher = load_teacher(path)
    assert isinstance(teacher, GANAugmentedClassifier)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(teacher(x), model.eval()(x))


class BufferGenerator(nn.Module):
    """A user's G(z, y) without parameters: a fixed buffer maps labels to pixel values."""

    latent_dim = 4

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("values", torch.linspace(-0.5, 0.5, 5))

    def forward(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.values[y].view(-1, 1, 1, 1).expand(-1, 1, 28, 28) + 0 * z[:, :1, None, None]


def test_a_users_generator_moves_whole_to_the_classifiers_device():
    """Every parameter and buffer follows the classifier (here to the meta device, which any machine has):
    a generator without parameters, and one spread over devices, included. The caller's module is used in
    place, as the docstring says."""
    spread = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    spread[0].to("meta")  # its first parameter already where the classifier will be, the rest not
    for user_module in (BufferGenerator(), spread):
        model = GANAugmentedClassifier(5, backbone="resnet10", generator=user_module).to("meta")
        generator = model.generator
        assert generator is user_module and not generator.training
        devices = {t.device.type for t in [*generator.parameters(), *generator.buffers()]}
        assert devices == {"meta"}, type(user_module).__name__
        assert not any(p.requires_grad for p in generator.parameters())
    assert "not copied" in GANAugmentedClassifier.__doc__ and "deepcopy" in GANAugmentedClassifier.__doc__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fit_on_cuda_with_bf16_mixed_moves_generator_and_teacher(tiny_target, tmp_path):
    dcgan = DCGAN(latent_dim=16, num_classes=5, conditional=True, generator_width=16, discriminator_width=16)
    generator = dcgan.generator_network()
    before = {k: v.clone() for k, v in generator.state_dict().items()}
    model = GANAugmentedClassifier(
        5, generator=generator, teacher=ImageClassifier(5), confidence_threshold=0.1, synthetic_ratio=1.0
    )
    seen = record_training_batches(model)
    trainer = quiet_trainer(tmp_path, accelerator="cuda", precision="bf16-mixed", max_steps=3, max_epochs=-1,
                            logger=False, enable_checkpointing=False)  # fmt: skip
    trainer.fit(model, datamodule=tiny_target)
    # synthetic images joined the real ones on the GPU (a generator or teacher left on the CPU would raise);
    # Lightning moves the classifier back to the CPU after the fit, and the frozen nets follow it on next use
    assert len(seen) == 3 and all(x.is_cuda and len(x) > 20 for x, _ in seen)
    assert all(torch.equal(v.cpu(), before[k]) for k, v in generator.state_dict().items())
    assert 0 < float(trainer.callback_metrics["train/synthetic_acceptance"]) <= 1


def test_draws_before_a_fit_do_not_shift_the_fits_synthetic_stream(tiny_target, tmp_path):
    def fit(draw_first: bool) -> list[torch.Tensor]:
        model = GANAugmentedClassifier(5, generator=MarkedGenerator(), synthetic_ratio=0.5, synthetic_seed=7)
        if draw_first:
            model.draw_synthetic(8)  # e.g. a notebook looking at samples before training
        seen = record_training_batches(model)
        quiet_trainer(tmp_path, max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False).fit(
            model, datamodule=tiny_target
        )
        return [x[is_marked(x)] for x, _ in seen]

    assert all(torch.equal(a, b) for a, b in zip(fit(False), fit(True), strict=True))


def test_a_generator_trained_on_other_classes_is_refused(tiny_target, fashion_root, tmp_path):
    """The class count alone would pass G(z, y) trained on classes 5-9 to a classifier of classes 0-4: its labels would
    name other classes. A DCGAN's generator knows its data's class names (kept in its checkpoint) and they must match."""
    from lit_finetune.data import FashionMNISTDataModule

    gan = DCGAN(latent_dim=8, num_classes=5, conditional=True, generator_width=8, discriminator_width=8)
    trainer = quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False)
    trainer.fit(gan, datamodule=tiny_target)  # classes 5-9: Sandal ... Ankle boot
    trainer.save_checkpoint(tmp_path / "g.ckpt")
    source_classes = FashionMNISTDataModule(root=str(fashion_root), classes=[0, 1, 2, 3, 4], samples_per_class=4,
                                            val_split=10, batch_size=10)  # fmt: skip
    for generator in (str(tmp_path / "g.ckpt"), gan.generator_network()):  # from its checkpoint, or in memory
        assert list(GANAugmentedClassifier(5, generator=generator).generator.class_names) == tiny_target.class_names
        model = GANAugmentedClassifier(5, generator=generator, synthetic_ratio=0.5)
        with pytest.raises(ValueError, match=r"are the classes \['Sandal'.*data has \['T-shirt/top'.*same order"):
            quiet_trainer(tmp_path, max_steps=1, logger=False).fit(model, datamodule=source_classes)
    model = GANAugmentedClassifier(5, generator=str(tmp_path / "g.ckpt"), synthetic_ratio=0.5)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False).fit(
        model, datamodule=tiny_target
    )  # the same classes: fine
