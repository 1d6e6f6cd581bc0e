"""Choose the fine-tune recipe of ``configs/classifier/finetune_target.yaml`` on validation only.

Grid: the epoch at which the backbone unfreezes x the backbone LR ratio, each arm with the same
budget as the config (40 epochs, batch 50, 20 images/class, AdamW 3e-3, warm-up 10 steps).
Reports the best validation accuracy per arm and seed; the test split is never touched.

    python benchmarks/finetune_recipe_val.py --pretrained runs/main_job/source/runs/classifier/pretrain_source/checkpoints/best.ckpt
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import warnings
from functools import partial

GRID = [(5, 0.1), (2, 0.3), (1, 1.0), (0, 1.0)]  # (unfreeze_at_epoch, backbone_lr_ratio)


def best_val_acc(pretrained: str, unfreeze: int, ratio: float, seed: int, epochs: int) -> float:
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_finetune import ImageClassifier
    from lit_finetune.callbacks import LayerFreezing, LRWarmup
    from lit_finetune.data import FashionMNISTDataModule

    L.seed_everything(seed)
    data = FashionMNISTDataModule(classes=[5, 6, 7, 8, 9], samples_per_class=20, val_split=500, batch_size=50, seed=seed)
    model = ImageClassifier(
        num_classes=5,
        pretrained=pretrained,
        backbone_lr_ratio=ratio,
        label_smoothing=0.1,
        optimizer=partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4),
    )
    with tempfile.TemporaryDirectory() as tmp:
        best = ModelCheckpoint(dirpath=tmp, monitor="val/acc", mode="max")
        callbacks = [best, LRWarmup(10)] + ([LayerFreezing(["backbone"], unfreeze_at_epoch=unfreeze)] if unfreeze else [])
        trainer = L.Trainer(
            max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=callbacks, deterministic=True,
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
        return float(best.best_model_score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="source checkpoint (pretrain_source.yaml's best.ckpt)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    print("| unfreeze at epoch | backbone LR ratio | best val/acc per seed | mean |\n|---|---|---|---|")
    for unfreeze, ratio in GRID:
        accs = [best_val_acc(args.pretrained, unfreeze, ratio, seed, args.epochs) for seed in args.seeds]
        print(f"| {unfreeze} | {ratio} | {', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} |", flush=True)
    from transfer_vs_scratch import machine  # benchmarks/ is on sys.path when run as a script

    print(f"\nSeeds {args.seeds}, {args.epochs} epochs per arm, validation only. Measured on {machine()}.")


if __name__ == "__main__":
    main()
