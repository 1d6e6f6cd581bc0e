"""Compression of a fine-tuned classifier: pruning while fine-tuning, int8 quantisation, export.

    from lit_finetune.compress import MagnitudePruning, quantize_int8, export_model, load_exported

    trainer = L.Trainer(callbacks=[MagnitudePruning(sparsity=0.5, end_epoch=9)])   # pruned while it fine-tunes
    int8 = quantize_int8(model, datamodule.train_dataloader())                       # CPU int8, calibrated
    export_model(int8, "model_int8.ts"); export_model(model, "model.pt2")            # one file each
    logits = load_exported("model.pt2")(images)                                      # no package model code

``lit-finetune-export CKPT OUT`` does the last steps from a checkpoint; ``ExportedClassifier`` runs an
exported file under ``lit-finetune test|predict``. See docs/ARCHITECTURE.md ("Compression").
"""

from lit_finetune.compress.export import ExportedModel, ExportError, export_model, load_exported
from lit_finetune.compress.exported_module import ExportedClassifier
from lit_finetune.compress.pruning import (
    MagnitudePruning,
    has_pruning_masks,
    prunable_parameters,
    prune,
    remove_pruning,
    sparsity,
)
from lit_finetune.compress.quantize import (
    Int8Classifier,
    QuantizationError,
    classifier_network,
    is_quantized,
    quantize_int8,
)

__all__ = [
    "ExportError",
    "ExportedClassifier",
    "ExportedModel",
    "Int8Classifier",
    "MagnitudePruning",
    "QuantizationError",
    "classifier_network",
    "export_model",
    "has_pruning_masks",
    "is_quantized",
    "load_exported",
    "prunable_parameters",
    "prune",
    "quantize_int8",
    "remove_pruning",
    "sparsity",
]
