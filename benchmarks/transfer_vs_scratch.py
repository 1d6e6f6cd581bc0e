"""The main job on the embedded default: source pretraining, target fine-tuning vs scratch.

1. Pretrain ``configs/classifier/pretrain_source.yaml`` (Fashion-MNIST classes 0-4).
2. For each seed: fine-tune ``finetune_target.yaml`` from that checkpoint and train
   ``scratch_target.yaml`` from random init: classes 5-9, 20 labelled images per class, the same
   steps, batch, augmentation and model. Each arm's best-on-validation checkpoint is tested on
   the full target test split (5,000 images).
3. Print a table of mean +- std test accuracy, write it to ``benchmarks/results/transfer_vs_scratch.md``
   and a bar chart to ``benchmarks/results/transfer_vs_scratch.png``.

Everything runs through the same LightningCLI as ``lit-finetune``; the configs are used as is,
each stage in its own working directory under ``--workdir``.

    python benchmarks/transfer_vs_scratch.py                 # ~9-12 min on a 2-core CPU (5 seeds)
    python benchmarks/transfer_vs_scratch.py --seeds 0 --pretrain-epochs 1   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402
CONFIGS = REPO / "configs" / "classifier"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@contextlib.contextmanager
def working_dir(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    old = Path.cwd()
    os.chdir(path)
    try:
        yield path
    finally:
        os.chdir(old)


def run_cli(args: list[str]) -> dict[str, float]:
    """Run one ``lit-finetune`` command in-process; return the trainer's final metrics."""
    from lit_finetune.cli import cli_main

    cli = cli_main(args)
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import lightning
    import torch

    return (
        f"{cpu}, {os.cpu_count()} cores, CPU only; torch {torch.__version__}, lightning {lightning.__version__}"
    )


def arm(config: str, workdir: Path, seed: int, extra: list[str]) -> float:
    """Fit one target arm for ``seed`` and return its test accuracy (best validation checkpoint)."""
    seed_args = ["--seed_everything", str(seed), "--data.init_args.seed", str(seed)]
    with working_dir(workdir):
        run_cli(["fit", "--config", str(CONFIGS / config), *seed_args, *extra, *QUIET])
        ckpt = Path("runs/classifier") / config.removesuffix(".yaml") / "checkpoints" / "best.ckpt"
        metrics = run_cli(["test", "--config", str(CONFIGS / config), *seed_args, *extra, *QUIET, "--ckpt_path", str(ckpt)])
    return metrics["test/acc"]


def bar_chart(results: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means = [statistics.mean(v) for v in results.values()]
    stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in results.values()]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.bar(names, [100 * m for m in means], yerr=[100 * s for s in stds], capsize=6, color=["#4c72b0", "#dd8452"])
    for i, (m, s) in enumerate(zip(means, stds)):
        ax.text(i, 100 * (m + s) + 2, f"{100 * m:.1f}", ha="center")
    ax.set_ylabel("target test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--target-epochs", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "main_job")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (sets its own log level on import; quiet it afterwards)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()

    print(f"[1/3] pretraining on source classes 0-4 ({args.pretrain_epochs} epochs)", flush=True)
    with working_dir(args.workdir / "source"):
        source = run_cli(
            ["fit", "--config", str(CONFIGS / "pretrain_source.yaml"), *QUIET,
             "--trainer.max_epochs", str(args.pretrain_epochs),
             "--model.init_args.lr_scheduler.init_args.T_max", str(args.pretrain_epochs)]
        )  # fmt: skip
        pretrained = (Path.cwd() / "runs/classifier/pretrain_source/checkpoints/best.ckpt").resolve()
    print(f"      source val/acc {source['val/acc']:.3f} -> {pretrained}", flush=True)

    results: dict[str, list[float]] = {"fine-tuned": [], "scratch": []}
    epochs = ["--trainer.max_epochs", str(args.target_epochs)]
    for i, seed in enumerate(args.seeds):
        print(f"[2/3] seed {seed} ({i + 1}/{len(args.seeds)}): fine-tune and scratch on 20 images/class", flush=True)
        results["fine-tuned"].append(
            arm("finetune_target.yaml", args.workdir / f"seed{seed}", seed, [*epochs, "--model.init_args.pretrained", str(pretrained)])
        )
        results["scratch"].append(arm("scratch_target.yaml", args.workdir / f"seed{seed}", seed, epochs))
        print(f"      fine-tuned {results['fine-tuned'][-1]:.3f}   scratch {results['scratch'][-1]:.3f}", flush=True)

    minutes = (time.perf_counter() - start) / 60
    where = machine()
    lines = [
        "| arm | target test accuracy (mean ± std) | per seed |",
        "|---|---|---|",
    ]
    for name, accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {name} | {100 * statistics.mean(accs):.1f} ± {100 * std:.1f} % | "
            + ", ".join(f"{100 * a:.1f}" for a in accs)
            + " |"
        )
    if len(args.seeds) > 1:
        test = stats.paired_t_test(results["fine-tuned"], results["scratch"])
        lines.append(
            f"| *fine-tuned − scratch, paired by seed (points)* | {100 * test.mean:+.1f} ± {100 * test.std:.1f}, "
            f"paired t-test p = {test.p:.3f}, worst seed {100 * test.worst:+.1f} | "
            + ", ".join(f"{100 * d:+.1f}" for d in test.diffs)
            + " |"
        )
    setup = (
        f"Fashion-MNIST: source classes 0-4 ({args.pretrain_epochs} epochs), target classes 5-9 with 20 labelled "
        f"images/class, {args.target_epochs} epochs per arm, seeds {args.seeds}; tested on the 5,000 target test "
        f"images. Measured on {where}; {minutes:.1f} min in all."
    )
    table = "\n".join(lines)
    print("\n[3/3] results\n" + table + "\n\n" + setup)
    run.write(args.results / "transfer_vs_scratch.md", table + "\n\n" + setup, {"source checkpoint": pretrained},
              data={"test_accuracy": results})
    bar_chart(results, args.results / "transfer_vs_scratch.png", "Fashion-MNIST 5-9, 20 labels/class")
    print(f"wrote {args.results / 'transfer_vs_scratch.md'} and transfer_vs_scratch.png")


if __name__ == "__main__":
    main()
