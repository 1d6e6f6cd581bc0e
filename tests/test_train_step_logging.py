"""Training-step values are logged only on the steps something reads (``TransferModule.log_train_step``), and
the classifier's training accuracy and F1 once per epoch: the loggers must still get exactly what logging every
step gave them, the progress bar every step's loss, and the epoch metrics must be the epoch's own."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from conftest import quiet_trainer
from lit_finetune import DCGAN, ImageClassifier
from lit_finetune.data import FashionMNISTDataModule


class Records(L.pytorch.loggers.logger.Logger):
    """A logger that keeps what Lightning writes: ``{step: {train key: value}}`` (several rows per step merged)."""

    name, version = "records", 0

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = {}

    def log_metrics(self, metrics, step=None) -> None:
        train = {k: float(v) for k, v in metrics.items() if k.startswith("train/")}
        if train:
            self.rows.setdefault(step, {}).update(train)

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class StopAt(L.Callback):
    """Stops the fit in ``on_train_batch_end`` once ``global_step`` reaches ``step`` (as ``Timer`` does)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


@pytest.fixture(scope="module")
def small_data(fashion_root):
    """8 batches an epoch of 5 images."""
    return FashionMNISTDataModule(
        root=str(fashion_root), classes=[5, 6, 7, 8, 9], samples_per_class=8, val_split=50, batch_size=5
    )


def records(tmp_path, data, make_model, **trainer_kwargs) -> dict[int, dict[str, float]]:
    torch.manual_seed(0)
    logger = Records()
    kwargs = dict(max_epochs=10, logger=logger, enable_checkpointing=False, limit_val_batches=0, **trainer_kwargs)
    quiet_trainer(tmp_path, **kwargs).fit(make_model(), datamodule=data)
    return logger.rows


def classifier() -> ImageClassifier:
    return ImageClassifier(num_classes=5, backbone="resnet_small", l2sp_alpha=0.1)


def dcgan() -> DCGAN:
    return DCGAN(latent_dim=8, generator_width=4, discriminator_width=4)


@pytest.mark.parametrize("make_model, steps_per_batch", [(classifier, 1), (dcgan, 2)], ids=["classifier", "dcgan"])
def test_loggers_get_every_written_steps_own_values(tmp_path, small_data, make_model, steps_per_batch):
    every = records(tmp_path / "every", small_data, make_model, max_steps=7 * steps_per_batch, log_every_n_steps=1)
    assert len(every) == 7
    keys = {"train/loss", "train/l2sp"} if make_model is classifier else {"train/d_loss", "train/g_loss"}
    assert all(keys <= set(row) for row in every.values()), every
    # every 3rd step, plus the step where a callback stops the fit after training_step; min_steps goes on
    stop = 4 * steps_per_batch
    sparse = records(
        tmp_path / "sparse", small_data, make_model, max_steps=7 * steps_per_batch, log_every_n_steps=3,
        min_steps=7 * steps_per_batch, callbacks=[StopAt(stop)],
    )  # fmt: skip
    assert len(sparse) >= 3 and set(sparse) < set(every)
    assert any(step != max(sparse) and (step + 1) % 3 for step in sparse), "the stopped step was not written"
    for step, row in sparse.items():
        assert {k: row[k] for k in keys} == {k: every[step][k] for k in keys}, step


def test_progress_bar_shows_every_steps_loss(tmp_path, small_data):
    """A progress bar reads train/loss at every step: it is logged at every step while one is drawn."""

    class Seen(L.Callback):
        def __init__(self) -> None:
            self.losses, self.outputs = [], []

        def on_train_batch_end(self, trainer, pl_module, outputs, *args) -> None:
            self.losses.append(float(trainer.progress_bar_metrics["train/loss"]))
            self.outputs.append(float(outputs["loss"]))

    seen = Seen()
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=5)
    trainer = quiet_trainer(tmp_path, max_steps=4, enable_progress_bar=True, log_every_n_steps=50, callbacks=[seen])
    trainer.fit(model, datamodule=small_data)
    assert seen.losses == pytest.approx(seen.outputs) and len(set(seen.losses)) == 4


class RecordingClassifier(ImageClassifier):
    """Keeps every training batch's logits and labels with the epoch they belong to."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def _shared_step(self, batch, metrics):
        loss, logits = super()._shared_step(batch, metrics)
        if self.training:
            self.seen.append((self.current_epoch, logits.detach(), batch[1]))
        return loss, logits


def test_training_accuracy_and_f1_are_each_epochs_own(tmp_path, small_data):
    """Logged once per epoch, train/acc and train/f1_macro are the metrics of that epoch's batches alone."""
    epochs = {}

    class EpochRecords(Records):
        def log_metrics(self, metrics, step=None) -> None:
            if "train/acc" in metrics:
                epochs[int(metrics["epoch"])] = {k: float(metrics[k]) for k in ("train/acc", "train/f1_macro")}

    torch.manual_seed(0)
    model = RecordingClassifier(num_classes=5)
    trainer = quiet_trainer(tmp_path, max_epochs=2, logger=EpochRecords(), limit_val_batches=0)
    trainer.fit(model, datamodule=small_data)
    assert sorted(epochs) == [0, 1]
    for epoch, logged in epochs.items():
        logits = torch.cat([lg for e, lg, _ in model.seen if e == epoch])
        labels = torch.cat([y for e, _, y in model.seen if e == epoch])
        assert logged["train/acc"] == pytest.approx(MulticlassAccuracy(5, average="micro")(logits, labels).item())
        assert logged["train/f1_macro"] == pytest.approx(MulticlassF1Score(5, average="macro")(logits, labels).item())
    assert epochs[0] != epochs[1]


def test_a_fit_stopped_by_max_steps_mid_epoch_still_logs_the_training_metrics(tmp_path, small_data):
    model = ImageClassifier(num_classes=5)
    trainer = quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0)
    trainer.fit(model, datamodule=small_data)
    assert {"train/loss", "train/acc", "train/f1_macro"} <= trainer.callback_metrics.keys()


def test_training_metrics_skip_the_argument_check_that_waits_for_the_gpu(monkeypatch):
    """torchmetrics' argument check runs torch.unique on the labels (a device sync per step); the training
    metrics skip it, evaluation keeps it."""
    import importlib

    stat_scores = importlib.import_module("torchmetrics.classification.stat_scores")  # where the metrics call it

    calls = []
    check = stat_scores._multiclass_stat_scores_tensor_validation
    monkeypatch.setattr(stat_scores, "_multiclass_stat_scores_tensor_validation",
                        lambda *a, **k: calls.append(1) or check(*a, **k))  # fmt: skip
    model = ImageClassifier(num_classes=3)
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    model.train_metrics.update(logits, y)
    assert not calls
    model.val_metrics.update(logits, y)
    assert calls


def test_training_metrics_update_once_per_epoch_not_per_step(tmp_path, small_data, monkeypatch):
    """Their update (a bincount that waits for the GPU) runs at each epoch's end, on its predictions."""
    updates = []
    model = ImageClassifier(num_classes=5)
    inner = model.train_metrics.update
    monkeypatch.setattr(model.train_metrics, "update", lambda *a, **k: updates.append(len(a[0])) or inner(*a, **k))
    quiet_trainer(tmp_path, max_epochs=2, limit_train_batches=3, limit_val_batches=0).fit(model, datamodule=small_data)
    assert updates == [15, 15]  # two epochs of 3 batches of 5
