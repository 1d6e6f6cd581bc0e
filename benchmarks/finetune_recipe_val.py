"""Choose the fine-tune recipe of ``configs/classifier/finetune_target.yaml`` on validation only.

Grid: the epoch at which the backbone unfreezes x the backbone LR ratio, each arm with the same
budget as the config (40 epochs, batch 50, 20 images/class, AdamW 3e-3, warm-up 10 steps).
Reports the best validation accuracy per arm and seed; the test split is never touched.
Prints the table and writes it, with the machine it ran on, to
``benchmarks/results/finetune_recipe_val.md`` (copied into the README by ``update_readme.py``).

    python benchmarks/finetune_recipe_val.py --pretrained runs/main_job/source/runs/classifier/pretrain_source/checkpoints/best.ckpt
    python benchmarks/finetune_recipe_val.py --pretrained <ckpt> --epochs 1 --seeds 0 --output /tmp/x.md   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "finetune_recipe_val.md"
GRID = [(5, 0.1), (2, 0.3), (1, 1.0), (0, 1.0)]  # (unfreeze_at_epoch, backbone_lr_ratio)


def best_val_acc(pretrained: str, unfreeze: int, ratio: float, seed: int, epochs: int, root: str | None) -> float:
    """Best validation accuracy of one arm and seed (fine-tuned from ``pretrained``)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_finetune import ImageClassifier
    from lit_finetune.callbacks import LayerFreezing, LRWarmup
    from lit_finetune.data import FashionMNISTDataModule

    L.seed_everything(seed)
    data = FashionMNISTDataModule(
        **({"root": root} if root else {}),
        classes=[5, 6, 7, 8, 9], samples_per_class=20, val_split=500, batch_size=50, seed=seed,
    )  # fmt: skip
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
            callbacks=callbacks, deterministic=True, default_root_dir=tmp,
        )  # fmt: skip
        trainer.fit(model, datamodule=data)
        return float(best.best_model_score)


def machine() -> str:
    """The machine line shared with the main job (``transfer_vs_scratch.machine``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (already there when run as a script)
    from transfer_vs_scratch import machine as main_job_machine

    return main_job_machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", required=True, help="source checkpoint (pretrain_source.yaml's best.ckpt)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--root", default=None, help="folder with the Fashion-MNIST IDX files (default: Debian's)")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help=f"markdown file to write (default {DEFAULT_OUTPUT})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    """Run the grid, print the markdown table and write it to ``--output``; return it."""
    run = provenance.Run.start(__file__, argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started = time.perf_counter()
    lines = ["| unfreeze at epoch | backbone LR ratio | best val/acc per seed | mean |", "|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for unfreeze, ratio in GRID:
        accs = [best_val_acc(args.pretrained, unfreeze, ratio, seed, args.epochs, args.root) for seed in args.seeds]
        lines.append(f"| {unfreeze} | {ratio} | {', '.join(f'{a:.3f}' for a in accs)} | {statistics.mean(accs):.3f} |")
        print(lines[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines += [
        "",
        f"Seeds {args.seeds}, {args.epochs} epochs per arm, validation only. "
        f"Measured on {machine()}; {minutes:.1f} min in all.",
    ]
    markdown = "\n".join(lines) + "\n"
    print(lines[-1])
    run.write(args.output, markdown, {"source checkpoint": args.pretrained}, data={"lines": lines})
    print(f"wrote {args.output}")
    return markdown


if __name__ == "__main__":
    main()
