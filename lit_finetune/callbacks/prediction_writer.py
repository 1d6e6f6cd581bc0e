"""Write predicted labels to CSV during ``predict``."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs and write ``output_file`` as CSV on rank 0.

    Columns: ``index``, ``file`` (when the datamodule predicted on a folder), ``label``,
    ``class_name``, ``confidence``. With several devices each rank writes its part to
    ``<output_file>.rank<N>`` instead (no cross-rank gather).
    """

    def __init__(self, output_file: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_file = output_file

    def write_on_epoch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        dm = trainer.datamodule
        paths = getattr(dm, "predict_paths", []) or []
        # the model's names first: they are those of its outputs (copied from the datamodule in setup when the
        # counts match, else kept from its checkpoint), where the datamodule may hold another label set
        names = getattr(pl_module, "class_names", None) or getattr(dm, "class_names", None) or []
        # Lightning nests both in one list per dataloader (there is one predict dataloader here)
        if predictions and isinstance(predictions[0], list):
            predictions = predictions[0]
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list):
            batch_indices = batch_indices[0]
        rows = []
        for batch, indices in zip(predictions, batch_indices):
            for index, label, conf in zip(indices, batch["label"].tolist(), batch["confidence"].tolist()):
                rows.append(
                    {
                        "index": index,
                        "file": str(paths[index]) if index < len(paths) else "",
                        "label": label,
                        "class_name": names[label] if label < len(names) else "",
                        "confidence": f"{conf:.4f}",
                    }
                )
        out = Path(self.output_file)
        if trainer.world_size > 1:
            out = out.with_name(f"{out.name}.rank{trainer.global_rank}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["index", "file", "label", "class_name", "confidence"])
            writer.writeheader()
            writer.writerows(sorted(rows, key=lambda r: r["index"]))
        tmp.replace(out)
