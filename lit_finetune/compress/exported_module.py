"""``ExportedClassifier``: an exported file (``.pt2`` / ``.ts``) as a module that ``lit-finetune``
validates, tests and predicts with, through the same configs, datamodules and ``PredictionWriter``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lit_finetune.compress.export import load_exported
from lit_finetune.modules.base import TransferModule
from lit_finetune.modules.classifier import label_and_confidence


class ExportedClassifier(TransferModule):
    """Run a classifier written by :func:`~lit_finetune.compress.export_model` (float or int8).

    ``lit-finetune predict --config configs/classifier/finetune_target.yaml
    --config configs/classifier/predict_folder.yaml --config configs/classifier/exported.yaml
    --model.init_args.path model_int8.ts --data.init_args.predict_dir images/`` writes the same
    ``predictions.csv`` as the checkpoint would; ``lit-finetune test`` with the same configs tests the
    file on the datamodule's test split (``test/acc``, ``test/f1_macro``).

    Args:
        path: the exported file (load only files you trust: it is a program).
        num_classes, in_channels, image_size: what the datamodule yields (the CLI links them); checked
            against the file's record.

    It cannot be fitted: there are no trainable parameters; fine-tune the checkpoint it came from.
    """

    def __init__(self, path: str, num_classes: int | None = None, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__(num_classes, in_channels, image_size)
        self.path = path
        self.model = load_exported(path)
        meta = self.model.meta
        for name, given in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            stored = meta.get(name)
            if given is not None and stored is not None and given != stored:
                raise ValueError(
                    f"The exported model {path!r} was made for {name}={stored}, the data gives {given}: "
                    f"set the datamodule's {'channels' if name == 'in_channels' else name} to {stored}."
                )
        self.num_classes = meta.get("num_classes") or num_classes
        self.class_names = list(meta.get("class_names") or [])
        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(self.num_classes, average="micro"),
                "f1_macro": MulticlassF1Score(self.num_classes, average="macro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def param_groups(self) -> list[dict[str, Any]]:
        raise RuntimeError(
            f"ExportedClassifier ({self.path!r}) runs a fixed exported program: it validates, tests and predicts. "
            "To train, fit the ImageClassifier checkpoint it was exported from."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _check_device(self) -> None:
        if self.model.torchscript and self.device.type != "cpu":
            kind = "int8" if self.model.is_int8 else "TorchScript"
            raise RuntimeError(f"The {kind} model {self.path!r} runs on the CPU only: pass --trainer.accelerator cpu.")

    def on_validation_start(self) -> None:
        self._check_device()

    def on_test_start(self) -> None:
        self._check_device()

    def on_predict_start(self) -> None:
        self._check_device()

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, stage: str) -> None:
        x, y = batch
        logits = self(x)
        metrics.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log_dict(metrics)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return label_and_confidence(self(batch[0]))
