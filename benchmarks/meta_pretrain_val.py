"""Choose the meta-pretraining recipe of ``configs/classifier/meta_pretrain_source.yaml`` on meta-validation only.

Each candidate meta-pretrains the source network on Fashion-MNIST classes 0-4 with the shipped config and its
budget (epochs, episodes, 5-way 5-shot, 5 inner steps), changing only the algorithm, the inner SGD step size
and the outer optimizer. The score is the best meta-validation accuracy over the epochs: query accuracy after
adapting on the support images of 50 fixed 5-way 5-shot episodes of the source's held-out validation images
(10% of its training split). No target image and no test image is used, so the target benchmark
(``transfer_sweep.py``) stays clean. For reference, the same validation episodes are scored from the supervised
source (``pretrain_source.yaml``) and from random weights, adapted the same way.

    OMP_NUM_THREADS=1 python benchmarks/meta_pretrain_val.py --pretrained <supervised best.ckpt>
    python benchmarks/meta_pretrain_val.py --epochs 1 --limit-train-batches 2 --results /tmp/x   # smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

CONFIG = REPO / "configs" / "classifier" / "meta_pretrain_source.yaml"
#: (algorithm, inner SGD step size, outer optimizer, outer LR); Reptile's outer SGD LR is its meta step size
GRID: list[tuple[str, float, str, float]] = [
    ("reptile", 0.03, "torch.optim.SGD", 1.0),
    ("reptile", 0.1, "torch.optim.SGD", 1.0),
    ("reptile", 0.3, "torch.optim.SGD", 1.0),
    ("fomaml", 0.1, "torch.optim.Adam", 1e-3),
]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def meta_pretrain(candidate: tuple[str, float, str, float], epochs: int, batches: int | None, root: str | None) -> dict[str, Any]:
    """One candidate through the CLI; its best meta-validation accuracy, the epoch of it, its cost."""
    import math

    import torch
    import yaml

    from lit_finetune.cli import cli_main

    algorithm, inner_lr, optimizer, lr = candidate
    data = yaml.safe_load(CONFIG.read_text())["data"]["init_args"]
    outer_steps = epochs * math.ceil(data["episodes_per_epoch"] / data["meta_batch_size"])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        old = Path.cwd()
        os.chdir(tmp)
        try:
            cli = cli_main(
                ["fit", "--config", str(CONFIG), *QUIET, "--trainer.logger", "false", "--trainer.max_epochs", str(epochs),
                 *(["--trainer.limit_train_batches", str(batches)] if batches else []), "--trainer.accelerator", "cpu",
                 "--model.init_args.algorithm", algorithm, "--model.init_args.inner_lr", str(inner_lr),
                 "--model.init_args.optimizer.class_path", optimizer, "--model.init_args.optimizer.init_args.lr", str(lr),
                 "--model.init_args.lr_scheduler.init_args.total_iters", str(outer_steps),
                 *(["--data.init_args.dataset.init_args.root", root] if root else [])]
            )  # fmt: skip
        finally:
            os.chdir(old)
        best = next(c for c in cli.trainer.checkpoint_callbacks if c.monitor == "val/acc")
        best_epoch = torch.load(best.best_model_path, map_location="cpu", weights_only=True)["epoch"]
    return {
        "algorithm": algorithm, "inner_lr": inner_lr, "optimizer": optimizer.rsplit(".", 1)[-1], "lr": lr,
        "best_val_acc": float(best.best_model_score), "best_epoch": best_epoch,
        "minutes": (time.perf_counter() - start) / 60, "outer_steps": cli.trainer.global_step,
        **{k: int(v) for k, v in cli.model.cost.items() if k != "train_seconds"},
    }  # fmt: skip


def reference_val_acc(pretrained: str | None, inner_lr: float, root: str | None) -> float:
    """The meta-validation accuracy of other weights (a supervised source, or random ones), adapted the same way."""
    import lightning as L
    import yaml

    from lit_finetune import MetaPretrainer
    from lit_finetune.data import EpisodicDataModule, FashionMNISTDataModule

    L.seed_everything(0)
    config = yaml.safe_load(CONFIG.read_text())
    data, model = config["data"]["init_args"], config["model"]["init_args"]
    images = FashionMNISTDataModule(**({"root": root} if root else {}), **data["dataset"]["init_args"])
    dm = EpisodicDataModule(images, **{k: v for k, v in data.items() if k != "dataset"})
    meta = MetaPretrainer(num_classes=data["ways"], pretrained=pretrained, inner_lr=inner_lr,
                          inner_steps=model["inner_steps"], backbone=model["backbone"])  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    return float(trainer.validate(meta, datamodule=dm, verbose=False)[0]["val/acc"])


def markdown(rows: list[dict[str, Any]], references: dict[str, dict[float, float]], epochs: int, where: str) -> str:
    best = max(rows, key=lambda r: r["best_val_acc"])
    lines = [
        "Meta-validation accuracy (%) of meta-pretraining recipes on Fashion-MNIST classes 0-4: query accuracy after "
        "5 inner SGD steps on the support images of 50 fixed 5-way 5-shot episodes of the source's validation split "
        f"(seed 0, best of {epochs} epochs). No target or test image is used.",
        "",
        "| algorithm | inner LR | outer optimizer, LR | best val acc | epoch | outer steps | episodes | images drawn | minutes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " **(chosen)**" if r is best else ""
        lines.append(
            f"| {r['algorithm']}{mark} | {r['inner_lr']:g} | {r['optimizer']} {r['lr']:g} | {100 * r['best_val_acc']:.1f} | "
            f"{r['best_epoch']} | {r['outer_steps']} | {r['episodes']:,} | {r['images']:,} | {r['minutes']:.1f} |"
        )
    lines += ["", "The same validation episodes from other weights, adapted the same way (no meta-training):", "",
              "| weights | " + " | ".join(f"inner LR {lr:g}" for lr in next(iter(references.values()))) + " |",
              "|---|" + "---|" * len(next(iter(references.values())))]  # fmt: skip
    for name, by_lr in references.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in by_lr.values()) + " |")
    lines += ["", f"Measured on {where}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="the supervised source's checkpoint (reference row; default: the zoo's)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per candidate (the shipped config's budget)")
    parser.add_argument("--limit-train-batches", type=int, help="outer steps per epoch (smoke runs; default: the config's)")
    parser.add_argument("--fashion-root", help="folder with the Fashion-MNIST IDX files (default: Debian's copy)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import torch

    from transfer_vs_scratch import machine

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    supervised = args.pretrained or "zoo:fashion-mnist-0-4/classifier"
    rows = []
    for candidate in GRID:
        rows.append(meta_pretrain(candidate, args.epochs, args.limit_train_batches, args.fashion_root))
        print(rows[-1], flush=True)
    inner_lrs = sorted({c[1] for c in GRID})
    references = {
        "supervised source": {lr: reference_val_acc(supervised, lr, args.fashion_root) for lr in inner_lrs},
        "random weights": {lr: reference_val_acc(None, lr, args.fashion_root) for lr in inner_lrs},
    }
    print(references, flush=True)
    where = machine().replace("CPU only", f"CPU only, {args.threads} torch thread(s)")
    where += f"; {(time.perf_counter() - start) / 60:.1f} min in all"
    text = markdown(rows, references, args.epochs, where)
    from lit_finetune.zoo import resolve_source

    run.write(args.results / "meta_pretrain_val.md", text, {"supervised source": resolve_source(supervised)},
              data={"rows": rows, "references": references}, config={"epochs": args.epochs, "grid": GRID})  # fmt: skip
    print("\n" + text)


if __name__ == "__main__":
    main()
