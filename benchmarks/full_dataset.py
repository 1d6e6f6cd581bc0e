"""Full-dataset sanity check of the classifier recipe: all of Fashion-MNIST, tested on its 10k test images.

Fits ``configs/classifier/fashion_mnist_full.yaml`` (10 classes, 55,000 training images, 5,000 held
out for validation), tests the best-on-validation checkpoint on the 10,000 test images, and writes
the test accuracy, wall time, epochs and machine to ``benchmarks/results/fashion_mnist_full.md``
(``fashion_mnist_full_gpu.md`` for the GPU profile). Everything runs through the same LightningCLI
as ``lit-finetune``, in-process.

Profiles:

* ``cpu`` (default): the config as it is (``resnet_small``, fp32, channels_last), one torch thread
  (``--threads``); about 30 minutes on a 2-core CPU.
* ``gpu``: one CUDA device, bf16-mixed precision, channels_last, ``resnet18``, batch 256, 30 epochs;
  ``deterministic: warn`` because some CUDA kernels used in training (adaptive average pooling's
  backward) have no deterministic implementation. A 7-minute ``max_time`` guards the fit; if it
  stops the run early the result file says so.

The recipe (optimizer, schedule, epochs) was chosen on validation accuracy only, never on test:
``--search`` trains each candidate recipe for a few epochs and writes its validation accuracy to
``fashion_mnist_full_recipe_val.md``. OneCycleLR needs the total number of optimizer steps; this
script computes it from the datamodule, the batch size and the epochs, so overrides stay consistent.

    python benchmarks/full_dataset.py               # CPU, ~30 min; writes benchmarks/results/fashion_mnist_full.md
    PYTHONPATH=. python benchmarks/full_dataset.py --profile gpu --data-root DIR --out DIR
    python benchmarks/full_dataset.py --search      # validation-only recipe comparison (~20 min of CPU)
    python benchmarks/full_dataset.py --out /tmp/x -- --trainer.max_steps 3   # extra args go to lit-finetune

``--data-root`` is the folder with the four Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]``...);
default ``$FASHION_MNIST_ROOT`` or Debian's ``/usr/share/datasets/fashion-mnist``.

A GPU machine without the dataset or without LightningCLI's pure-Python dependencies
(``jsonargparse``, ``docstring_parser``, ``typeshed_client``) gets them from a bundle made here:

    python benchmarks/full_dataset.py --bundle runs/gpu_bundle      # IDX files + those packages + the commit, ~35 MB
    # there, from the repository root (runs/ is git-ignored: carry runs/gpu_bundle):
    PYTHONPATH=.:runs/gpu_bundle/site python3 benchmarks/full_dataset.py --profile gpu \
        --data-root runs/gpu_bundle/fashion-mnist --out "$OUT"

``benchmarks/gpu_session.py`` runs this profile and ``gpu_check.py``'s pieces in one device call.
"""

from __future__ import annotations

import argparse
import sys
import importlib.metadata
import importlib.util
import logging
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
CONFIG = REPO / "configs" / "classifier" / "fashion_mnist_full.yaml"
RESULTS = REPO / "benchmarks" / "results"
DEFAULT_DATA_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@dataclass
class Profile:
    """How a profile changes the shipped config, and where its result goes."""

    name: str
    result_name: str
    overrides: list[str] = field(default_factory=list)
    description: str = ""


PROFILES = {
    "cpu": Profile("cpu", "fashion_mnist_full", [], "the config as shipped: fp32, channels_last"),
    "gpu": Profile(
        "gpu",
        "fashion_mnist_full_gpu",
        [
            "--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.precision", "bf16-mixed",
            "--trainer.deterministic", "warn", "--trainer.max_epochs", "30", "--trainer.max_time", "00:00:07:00",
            "--model.init_args.backbone", "resnet18", "--data.init_args.batch_size", "256",
        ],
        "bf16-mixed, channels_last, resnet18, batch 256, 30 epochs",
    ),  # fmt: skip
}

#: candidate recipes compared by ``--search`` (validation only), each a set of config overrides; every
#: candidate states its optimizer and LR, so the comparison does not change with the shipped config
ADAMW_3E3 = ["--model.init_args.optimizer.init_args.lr", "0.003",
             "--model.init_args.lr_scheduler.init_args.max_lr", "0.003"]  # fmt: skip
SEARCH = {
    "AdamW 3e-3, OneCycleLR": ADAMW_3E3,
    "AdamW 3e-3, cosine per step + 2% warm-up": [
        "--model.init_args.optimizer.init_args.lr", "0.003",
        "--model.init_args.lr_scheduler", "torch.optim.lr_scheduler.CosineAnnealingLR",
        "--model.init_args.lr_scheduler.init_args.T_max", "{total_steps}",
        "--trainer.callbacks+=lit_finetune.callbacks.LRWarmup", "--trainer.callbacks.warmup_steps", "{warmup_steps}",
    ],
    "AdamW 3e-3 wd 5e-2, OneCycleLR": [*ADAMW_3E3, "--model.init_args.optimizer.init_args.weight_decay", "0.05"],
    "AdamW 1e-2, OneCycleLR": ["--model.init_args.optimizer.init_args.lr", "0.01",
                               "--model.init_args.lr_scheduler.init_args.max_lr", "0.01"],
    "SGD nesterov 0.1 wd 5e-4, OneCycleLR": [
        "--model.init_args.optimizer", "torch.optim.SGD",
        "--model.init_args.optimizer.init_args.lr", "0.1", "--model.init_args.optimizer.init_args.momentum", "0.9",
        "--model.init_args.optimizer.init_args.nesterov", "true",
        "--model.init_args.optimizer.init_args.weight_decay", "0.0005",
        "--model.init_args.lr_scheduler.init_args.max_lr", "0.1",
    ],
}  # fmt: skip


#: LightningCLI's pure-Python dependencies that the GPU machines' image lacks
BUNDLE_PACKAGES = ("jsonargparse", "docstring_parser", "typeshed_client")


def bundle(dest: Path, data_root: str) -> list[Path]:
    """Copy the Fashion-MNIST IDX files and :data:`BUNDLE_PACKAGES` (with their metadata) into ``dest``.

    ``dest/fashion-mnist`` is then a ``--data-root`` and ``dest/site`` a ``PYTHONPATH`` entry on a
    machine that has torch and lightning but neither the dataset nor jsonargparse.
    """
    from lit_finetune.data.fashion_mnist import _FILES, find_idx

    copied = []
    for split_files in _FILES.values():
        for stem in split_files:
            source = find_idx(Path(data_root), stem)
            copied.append(dest / "fashion-mnist" / source.name)
            copied[-1].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copied[-1])
    for name in BUNDLE_PACKAGES:
        dist = importlib.metadata.distribution(name)
        for file in dist.files or []:
            if file.parts[0] == ".." or "__pycache__" in file.parts:
                continue  # console scripts live outside site-packages; bytecode is rebuilt there
            target = dest / "site" / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(dist.locate_file(file), target)
            copied.append(target)
    return copied


def _transfer_vs_scratch():
    """``benchmarks/transfer_vs_scratch.py`` as a module (benchmarks/ is not a package)."""
    path = Path(__file__).with_name("transfer_vs_scratch.py")
    spec = importlib.util.spec_from_file_location("transfer_vs_scratch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine(profile: str) -> str:
    """The machine line of ``transfer_vs_scratch.py``, naming the GPU when one was used."""
    where = _transfer_vs_scratch().machine()
    import torch

    if profile == "gpu" and torch.cuda.is_available():
        where = where.replace("CPU only", f"GPU {torch.cuda.get_device_name(0)}")
    return where


def steps_per_epoch(args: list[str]) -> tuple[int, int]:
    """``(optimizer steps per epoch, max_epochs)`` of the config with ``args`` applied."""
    from lit_finetune.cli import cli_main

    cli = cli_main(args, run=False)
    cli.datamodule.setup("fit")
    batches = len(cli.datamodule.train_dataloader())
    limit = cli.trainer.limit_train_batches
    batches = min(batches, int(limit)) if isinstance(limit, int) else max(1, int(batches * limit))
    return math.ceil(batches / cli.trainer.accumulate_grad_batches), cli.trainer.max_epochs


def with_schedule(args: list[str]) -> tuple[list[str], int]:
    """``args`` with ``{total_steps}`` / ``{warmup_steps}`` placeholders and OneCycleLR's ``total_steps`` filled in."""
    per_epoch, epochs = steps_per_epoch([a.replace("{total_steps}", "1").replace("{warmup_steps}", "1") for a in args])
    total = per_epoch * epochs
    args = [a.replace("{total_steps}", str(total)).replace("{warmup_steps}", str(max(1, total // 50))) for a in args]
    if _scheduler(args).endswith("OneCycleLR"):
        args = [*args, "--model.init_args.lr_scheduler.init_args.total_steps", str(total)]
    return args, total


def _scheduler(args: list[str]) -> str:
    """The scheduler class the config ends up with (the config's, unless overridden)."""
    import yaml

    name = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["lr_scheduler"]["class_path"]
    for flag, value in zip(args, args[1:]):
        if flag == "--model.init_args.lr_scheduler":
            name = value
    return name


def fit_and_test(args: list[str], workdir: Path, test: bool = True) -> dict[str, float]:
    """Fit the config with ``args`` in ``workdir``; test the best-on-validation checkpoint; return the figures."""
    from lit_finetune.cli import cli_main

    tvs = _transfer_vs_scratch()
    start, cpu_start = time.perf_counter(), time.process_time()
    with tvs.working_dir(workdir):
        args, total_steps = with_schedule(args)
        cli = cli_main(["fit", *args])
        fit_end = time.perf_counter()
        trainer = cli.trainer
        best = trainer.checkpoint_callback
        out = {
            "best_val_acc": float(best.best_model_score) if best.best_model_score is not None else float("nan"),
            "epochs": trainer.current_epoch,
            "steps": trainer.global_step,
            "planned_steps": total_steps,
            "max_epochs": trainer.max_epochs,
            "stopped_early": trainer.global_step < total_steps,
            "fit_s": fit_end - start,
        }
        if test:
            # no best checkpoint when a step limit ended the fit before its first validation (smoke runs)
            ckpt = best.best_model_path or None
            metrics = trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)[0]
            out["test_acc"] = metrics["test/acc"]
            out["test_f1_macro"] = metrics["test/f1_macro"]
            out["tested"] = "the best-on-validation checkpoint" if ckpt else "the final weights (no validation ran)"
    out["wall_s"] = time.perf_counter() - start
    out["cpu_s"] = time.process_time() - cpu_start
    return out


def report(
    profile: Profile, result: dict, where: str, threads: int, extra: list[str], load: tuple[float, float]
) -> str:
    """The markdown result table and its setup line."""
    lines = [
        "| figure | value |",
        "|---|---|",
        f"| test accuracy (10,000 test images) | {100 * result['test_acc']:.2f} % |",
        f"| test macro-F1 | {100 * result['test_f1_macro']:.2f} % |",
        f"| best validation accuracy (5,000 held-out train images) | {100 * result['best_val_acc']:.2f} % |",
        f"| epochs run / planned | {result['epochs']} / {result['max_epochs']} ({result['steps']} optimizer steps) |",
        f"| wall time, fit + test, data loading included | {result['wall_s'] / 60:.1f} min |",
        f"| CPU time of the process (all threads) | {result['cpu_s'] / 60:.1f} min |",
        "| target (ResNet-18 in the Fashion-MNIST benchmark table: 94.9 %) | >= 94.0 % |",
        f"| met | {'yes' if result['test_acc'] >= 0.94 else 'no'} |",
    ]
    notes = [
        f"Profile `{profile.name}` ({profile.description}) of `configs/classifier/fashion_mnist_full.yaml`: "
        "all 10 classes, "
        f"55,000 training images, 5,000 for validation; {result['tested']} is tested. "
        f"Measured on {where}; torch threads {threads}; "
        f"1-minute load average {load[0]:.2f} at start, {load[1]:.2f} at end."
    ]
    if result["stopped_early"]:
        notes.append(f"The fit stopped before its planned {result['planned_steps']} steps (max_time or a step limit).")
    if extra:
        notes.append(f"Extra arguments: `{' '.join(extra)}` (not the shipped recipe).")
    return "\n".join(lines) + "\n\n" + " ".join(notes) + "\n"


def search(args: argparse.Namespace, base: list[str], run: provenance.Run) -> None:
    """Train each candidate recipe briefly and write its best validation accuracy (no test)."""
    rows = []
    for name, overrides in SEARCH.items():
        run_args = [*base, "--trainer.max_epochs", str(args.search_epochs), *overrides, *args.extra]
        result = fit_and_test(run_args, args.workdir / "search" / str(len(rows)), test=False)
        rows.append((name, result))
        print(f"{name}: best val/acc {result['best_val_acc']:.4f} ({result['fit_s'] / 60:.1f} min)", flush=True)
    lines = ["| recipe | best val/acc | fit wall time |", "|---|---|---|"]
    lines += [f"| {n} | {100 * r['best_val_acc']:.2f} % | {r['fit_s'] / 60:.1f} min |" for n, r in rows]
    text = "\n".join(lines) + (
        f"\n\nEach candidate: `configs/classifier/fashion_mnist_full.yaml` with its overrides, "
        f"{args.search_epochs} epochs (the schedule compressed to them), seed 0, validation on 5,000 held-out "
        f"training images; the test set is not used. Measured on {machine('cpu')}; torch threads {args.threads}; "
        "wall times vary with other load on a shared machine.\n"
    )
    run.write(args.out / "fashion_mnist_full_recipe_val.md", text,
              data={"best_val_acc": {n: r["best_val_acc"] for n, r in rows}})
    print(text)


def main(argv: list[str] | None = None) -> Path | None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--data-root", default=os.environ.get("FASHION_MNIST_ROOT", DEFAULT_DATA_ROOT),
                        help="folder with the Fashion-MNIST IDX files")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the result .md goes")
    parser.add_argument("--workdir", type=Path, default=None, help="runs/ and checkpoints go here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (cpu profile default: 1)")
    parser.add_argument("--search", action="store_true", help="compare candidate recipes on validation instead")
    parser.add_argument("--search-epochs", type=int, default=3)
    parser.add_argument("--bundle", type=Path, default=None, metavar="DIR",
                        help="copy the IDX files and LightningCLI's pure-Python dependencies into DIR, then exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more lit-finetune arguments")
    args = parser.parse_args(argv)
    args.extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    profile = PROFILES[args.profile]
    args.workdir = args.workdir or REPO / "runs" / profile.result_name
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (sets its own log level on import; quiet it afterwards)
    import torch

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if args.threads is None and profile.name == "cpu":
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root!r} is not a folder (it must hold the Fashion-MNIST IDX files)")
    if args.bundle is not None:
        files = bundle(args.bundle, args.data_root)
        commit, dirty = provenance.git_state()  # the device's copy has no history: its results record this one
        files.append(args.bundle / "COMMIT")
        files[-1].write_text(commit + ("-dirty" if dirty else "") + "\n")
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"bundled {len(files)} files ({size:.1f} MiB) into {args.bundle}")
        return args.bundle
    data_root = str(Path(args.data_root).resolve())
    base = ["--config", str(CONFIG), *profile.overrides, "--data.init_args.root", data_root, *QUIET]
    if args.search:
        search(args, base, run)
        return args.out / "fashion_mnist_full_recipe_val.md"

    load_start = os.getloadavg()[0]
    print(f"fitting {CONFIG.name} (profile {profile.name}, {args.threads} torch threads) in {args.workdir}", flush=True)
    result = fit_and_test([*base, *args.extra], args.workdir)
    text = report(profile, result, machine(profile.name), args.threads, args.extra, (load_start, os.getloadavg()[0]))
    path = args.out / f"{profile.result_name}.md"
    run.write(path, text, data=result)
    print(text + f"\nwrote {path}")
    return path


if __name__ == "__main__":
    main()
