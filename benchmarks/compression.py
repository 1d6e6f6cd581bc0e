"""Compression of the fine-tuned classifier: target accuracy vs sparsity, size on disk, CPU latency, fp32 vs int8.

For every seed and sparsity, the main job's fine-tune (``configs/classifier/finetune_target.yaml``'s
recipe: ``resnet_small`` from ``zoo:fashion-mnist-0-4/classifier``, Fashion-MNIST classes 5-9, 20
labelled images per class, 40 epochs of 2 batches of 50, backbone frozen for the first epoch, AdamW
3e-3, warm-up 10 steps, label smoothing 0.1) runs with ``MagnitudePruning`` of the backbone's conv
weights to that sparsity (global L1, cubic schedule over the starts of epochs 0-9; sparsity 0 = no
pruning, the plain fine-tune). Then, from the state chosen on validation:

* **fp32**: the fine-tuned model (pruning made permanent);
* **int8**: ``quantize_int8`` of it (FX static quantisation, x86 backend, per-channel weights),
  calibrated on the same 100 training images, unaugmented;

each tested on the full target test split (5,000 images), exported (fp32: ``.pt2`` and ``.ts``; int8:
``.ts``) and timed on the CPU, per image at batch 1 and batch 64, with a fixed thread count. Sizes are
the files' bytes and their gzip-compressed bytes (pruned zeros do not shrink a dense file; they
compress). The exported files' outputs are checked against the eager models'.

Held fixed across arms: everything but the sparsity (data, order, augmentation, steps, recipe, seed
of the head). Selection, on validation only: the epoch (from epoch 9 on, the first at the target
sparsity, for every arm alike) with the best accuracy on the 500 validation images (ties: the
lower loss). Statistics: paired t-tests over seeds (same seed = same training images and head
init), Holm-corrected over all comparisons of the table (``benchmarks/stats.py``).

    OMP_NUM_THREADS=1 python benchmarks/compression.py                 # quick: 3 seeds x 6 sparsities, ~18 min
    python benchmarks/compression.py --seeds 0 --sparsities 0 0.9      # a look
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402

SOURCE = "zoo:fashion-mnist-0-4/classifier"
LR, WEIGHT_DECAY, LABEL_SMOOTHING, WARMUP_STEPS, BATCH_SIZE = 3e-3, 1e-4, 0.1, 10, 50


@dataclass(frozen=True)
class Profile:
    seeds: tuple[int, ...]
    sparsities: tuple[float, ...]
    epochs: int  #: of 2 batches (100 training images, batch 50)
    end_epoch: int  #: pruning reaches the target at the start of this epoch; selection from it on
    samples_per_class: int = 20
    val_split: int = 500
    latency_reps: tuple[int, int] = (200, 20)  #: timed calls at batch 1 and batch 64 (after warm-up)
    threads: int = 1
    test_limit: int | None = None  #: first test images only (tests of this script; the profiles use all)


PROFILES = {
    # ~25-40 s of training per run on one thread of a 2-core Xeon, ~15 s of testing, export and timing
    "quick": Profile(seeds=(0, 1, 2), sparsities=(0.0, 0.5, 0.75, 0.9, 0.95, 0.98), epochs=40, end_epoch=9),
    "full": Profile(seeds=(0, 1, 2, 3, 4), sparsities=(0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95), epochs=40, end_epoch=9),
}


@dataclass
class Run:
    """What one (sparsity, seed) run measured."""

    chosen_epoch: int
    val_acc: float
    sparsity: float  #: share of zeros among the pruned (backbone conv) weights
    zero_share: float  #: share of zeros among all parameters
    test_acc: dict[str, float]  #: "fp32" / "int8" -> accuracy on the test split
    size: dict[str, int]  #: file -> bytes
    size_gz: dict[str, int]  #: file -> gzip bytes
    latency_ms: dict[str, dict[str, float]]  #: format -> {"b1": ms/image, "b64": ms/image}
    export_max_diff: dict[str, float]  #: exported file vs its eager model, max |logit difference|
    int8_agreement: float  #: share of test images where int8 and fp32 predict the same label
    train_s: float


@dataclass
class Results:
    runs: dict[str, list[Run]] = field(default_factory=dict)  #: str(sparsity) -> one Run per seed


# -- measuring ---------------------------------------------------------------------------------
def effective_state(module) -> dict[str, Any]:
    """A CPU copy of ``module``'s state with pruning masks multiplied in (plain keys, as a checkpoint has)."""
    state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    for key in [k for k in state if k.endswith("_orig")]:
        base = key.removesuffix("_orig")
        state[base] = state.pop(key) * state.pop(base + "_mask")
    return state


def evaluate(model, images, labels, chunk: int = 500) -> tuple[float, float, Any]:
    """(accuracy, mean cross-entropy, logits) in eval mode; restores the mode."""
    import torch
    import torch.nn.functional as F

    was_training = getattr(model, "training", False)
    model.eval()
    outs = []
    with torch.inference_mode():
        for x in images.split(chunk):
            outs.append(model(x))
    model.train(was_training)
    logits = torch.cat(outs)
    return float((logits.argmax(1) == labels).float().mean()), float(F.cross_entropy(logits, labels)), logits


def select_callback(val: tuple[Any, Any], from_epoch: int):
    from lightning.pytorch.callbacks import Callback

    class SelectOnValidation(Callback):
        """After each training epoch from ``from_epoch`` on, keep the state with the best validation accuracy."""

        def __init__(self) -> None:
            self.best: tuple[float, float, int] | None = None
            self.state: dict[str, Any] | None = None

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if trainer.current_epoch < from_epoch:
                return
            acc, loss, _ = evaluate(pl_module, *val)
            if self.best is None or (acc, -loss) > self.best[:2]:
                self.best, self.state = (acc, -loss, trainer.current_epoch), effective_state(pl_module)

    return SelectOnValidation()


def latency_ms(model, image_shape: tuple[int, ...], batch: int, reps: int) -> float:
    """Median milliseconds per image over ``reps`` timed calls at ``batch`` (after 5 warm-up calls)."""
    import torch

    x = torch.rand(batch, *image_shape) * 2 - 1
    times = []
    with torch.inference_mode():
        for i in range(reps + 5):
            start = time.perf_counter()
            model(x)
            if i >= 5:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / batch


def run_one(sparsity: float, seed: int, profile: Profile, source: str, fashion_root: str | None, workdir: Path) -> Run:
    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from lit_finetune import ImageClassifier
    from lit_finetune.callbacks import LayerFreezing, LRWarmup
    from lit_finetune.compress import (
        MagnitudePruning, classifier_network, export_model, load_exported, quantize_int8, sparsity as share_zero,
    )  # fmt: skip
    from lit_finetune.data import FashionMNISTDataModule
    from lit_finetune.data.tensor_dataset import TensorImageDataset, collate_batched

    root = {"root": fashion_root} if fashion_root else {}
    dm = FashionMNISTDataModule(
        classes=[5, 6, 7, 8, 9], samples_per_class=profile.samples_per_class, val_split=profile.val_split,
        batch_size=BATCH_SIZE, seed=seed, **root,
    )  # fmt: skip
    dm.setup("fit")
    dm.setup("test")
    k = len(dm.test_set) if profile.test_limit is None else min(profile.test_limit, len(dm.test_set))
    test = dm.test_set.__getitems__(range(k))
    val = dm.val_set.__getitems__(range(len(dm.val_set)))

    L.seed_everything(seed, verbose=False)
    model = ImageClassifier(
        num_classes=5, pretrained=source, label_smoothing=LABEL_SMOOTHING,
        optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
    )  # fmt: skip
    select = select_callback(val, profile.end_epoch)
    callbacks = [LayerFreezing(["backbone"], unfreeze_at_epoch=1), LRWarmup(WARMUP_STEPS), select]
    if sparsity > 0:
        callbacks.insert(0, MagnitudePruning(sparsity, ["backbone"], start_epoch=0, end_epoch=profile.end_epoch))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=profile.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        deterministic=True, callbacks=callbacks,
    )  # fmt: skip
    started = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    train_s = time.perf_counter() - started
    model.load_state_dict(select.state)
    model.eval()

    fp32 = classifier_network(model)
    acc_fp32, _, logits_fp32 = evaluate(fp32, *test)
    calib = DataLoader(TensorImageDataset(dm.train_set.images, dm.train_set.labels), batch_size=BATCH_SIZE,
                       collate_fn=collate_batched)  # fmt: skip
    int8 = quantize_int8(model, calib)
    acc_int8, _, logits_int8 = evaluate(int8, *test)

    files = {
        "fp32.pt2": export_model(fp32, workdir / "fp32.pt2"),
        "fp32.ts": export_model(fp32, workdir / "fp32.ts"),
        "int8.ts": export_model(int8, workdir / "int8.ts"),
    }
    loaded = {name: load_exported(path) for name, path in files.items()}
    check = test[0][:256]
    with torch.inference_mode():
        diffs = {
            name: float((loaded[name](check) - (int8 if name.startswith("int8") else fp32)(check)).abs().max())
            for name in files
        }
    shape = tuple(test[0].shape[1:])
    timed = {"fp32 eager": fp32, "fp32 .pt2": loaded["fp32.pt2"], "fp32 .ts": loaded["fp32.ts"], "int8 .ts": loaded["int8.ts"]}
    b1, b64 = profile.latency_reps
    latency = {
        name: {"b1": latency_ms(m, shape, 1, b1), "b64": latency_ms(m, shape, 64, b64)} for name, m in timed.items()
    }
    params = [p for p in fp32.parameters()]
    return Run(
        chosen_epoch=select.best[2], val_acc=select.best[0], sparsity=share_zero(model, ["backbone"]),
        zero_share=sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params),
        test_acc={"fp32": acc_fp32, "int8": acc_int8},
        size={name: path.stat().st_size for name, path in files.items()},
        size_gz={name: len(gzip.compress(path.read_bytes())) for name, path in files.items()},
        latency_ms=latency, export_max_diff=diffs,
        int8_agreement=float((logits_fp32.argmax(1) == logits_int8.argmax(1)).float().mean()), train_s=train_s,
    )  # fmt: skip


def run_benchmark(
    profile: Profile, source: str, fashion_root: str | None = None, log: Callable[[str], None] = print
) -> Results:
    results = Results()
    with tempfile.TemporaryDirectory(prefix="compression_") as tmp:
        for seed in profile.seeds:
            for s in profile.sparsities:
                run = run_one(s, seed, profile, source, fashion_root, Path(tmp))
                results.runs.setdefault(str(s), []).append(run)
                log(
                    f"  sparsity {s:.2f} seed {seed}: fp32 {100 * run.test_acc['fp32']:.1f}  int8 "
                    f"{100 * run.test_acc['int8']:.1f}  (epoch {run.chosen_epoch}, reached {run.sparsity:.3f}, "
                    f"train {run.train_s:.0f} s)"
                )
    return results


# -- reporting ---------------------------------------------------------------------------------
def mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{scale * statistics.fmean(values):.{digits}f} ± {scale * sd:.{digits}f}"


def comparisons(results: Results) -> list[tuple[str, stats.PairedTest, float]]:
    """Every paired comparison of the table with its Holm-adjusted p: each sparsity vs 0 (fp32), int8 vs fp32."""
    runs = results.runs
    tests: list[tuple[str, stats.PairedTest]] = []
    base = [r.test_acc["fp32"] for r in runs.get("0.0", [])]
    for key, rs in runs.items():
        if key != "0.0" and base:
            tests.append((f"fp32, sparsity {float(key):.2f} − sparsity 0", stats.paired_t_test([r.test_acc["fp32"] for r in rs], base)))
    for key, rs in runs.items():
        tests.append((f"sparsity {float(key):.2f}, int8 − fp32",
                      stats.paired_t_test([r.test_acc["int8"] for r in rs], [r.test_acc["fp32"] for r in rs])))  # fmt: skip
    adjusted = stats.holm([t.p for _, t in tests])
    return [(name, t, p) for (name, t), p in zip(tests, adjusted)]


def markdown(results: Results, profile_name: str, profile: Profile, where: str, minutes: str) -> str:
    runs = results.runs
    seeds = len(next(iter(runs.values())))
    lines = [
        "## Compressing the fine-tuned classifier: pruning, int8, export",
        "",
        f"`benchmarks/compression.py`, profile `{profile_name}`: {seeds} seeds × sparsity "
        f"{', '.join(f'{float(k):.2f}' for k in runs)} of the backbone's conv weights; {where}; {minutes}. "
        f"Fine-tuned from `{SOURCE}` on Fashion-MNIST 5-9, {profile.samples_per_class} images per class, "
        f"{profile.epochs} epochs (the recipe of `finetune_target.yaml`), pruning reaching its target at the start "
        f"of epoch {profile.end_epoch}; the state with the best validation accuracy from that epoch on is tested on "
        f"{'the full target test split (5,000 images)' if profile.test_limit is None else f'{profile.test_limit} test images'}. "
        f"Latency: {profile.threads} torch thread, median per image over {profile.latency_reps[0]} calls at batch 1 "
        f"and {profile.latency_reps[1]} at batch 64 (random inputs), each run timed; medians over runs shown.",
        "",
        "| sparsity | reached | zero share (all params) | test acc fp32 (%) | test acc int8 (%) | same label int8/fp32 "
        "| fp32 .pt2 kB (gzip) | fp32 .ts kB (gzip) | int8 .ts kB (gzip) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    med = lambda rs, f: statistics.median(f(r) for r in rs)  # noqa: E731
    for key, rs in runs.items():
        size = lambda name: f"{med(rs, lambda r: r.size[name]) / 1e3:.0f} ({med(rs, lambda r: r.size_gz[name]) / 1e3:.0f})"  # noqa: E731
        lines.append(
            f"| {float(key):.2f} | {statistics.fmean(r.sparsity for r in rs):.3f} | {statistics.fmean(r.zero_share for r in rs):.3f} "
            f"| {mean_std([r.test_acc['fp32'] for r in rs])} | {mean_std([r.test_acc['int8'] for r in rs])} "
            f"| {100 * statistics.fmean(r.int8_agreement for r in rs):.1f}% | {size('fp32.pt2')} | {size('fp32.ts')} | {size('int8.ts')} |"
        )
    formats = ["fp32 eager", "fp32 .pt2", "fp32 .ts", "int8 .ts"]
    lines += ["", "CPU latency, ms per image (median over the runs of each row; batch 1 | batch 64):", "",
              "| sparsity | " + " | ".join(f"{f} b1" for f in formats) + " | " + " | ".join(f"{f} b64" for f in formats) + " |",
              "|---|" + "---|" * 2 * len(formats)]  # fmt: skip
    for key, rs in runs.items():
        cells = [f"{med(rs, lambda r: r.latency_ms[f][b]):.3f}" for b in ("b1", "b64") for f in formats]
        lines.append(f"| {float(key):.2f} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences in test accuracy (points; one pair per seed), Holm-adjusted over the table:", "",
              "| comparison | mean diff | std | worst seed | p (Holm) |", "|---|---|---|---|---|"]  # fmt: skip
    for name, t, p in comparisons(results):
        lines.append(f"| {name} | {100 * t.mean:+.2f} | {100 * t.std:.2f} | {100 * t.worst:+.2f} | "
                     f"{'n/a' if math.isnan(p) else f'{p:.3f}'} |")  # fmt: skip
    lines += ["", "Every run (test accuracy %, chosen epoch, training seconds, fp32 .ts ms/img b1 / b64; exported vs eager max |Δlogit|):", "",
              "| sparsity | seed | fp32 | int8 | epoch | train s | fp32 .ts b1 | b64 | .pt2 Δ | fp32 .ts Δ | int8 .ts Δ |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for key, rs in runs.items():
        for seed, r in zip(profile.seeds, rs):
            lines.append(
                f"| {float(key):.2f} | {seed} | {100 * r.test_acc['fp32']:.2f} | {100 * r.test_acc['int8']:.2f} | "
                f"{r.chosen_epoch} | {r.train_s:.0f} | {r.latency_ms['fp32 .ts']['b1']:.3f} | "
                f"{r.latency_ms['fp32 .ts']['b64']:.3f} | {r.export_max_diff['fp32.pt2']:.1e} | "
                f"{r.export_max_diff['fp32.ts']:.1e} | {r.export_max_diff['int8.ts']:.1e} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results.runs)
    xs = [float(k) for k in keys]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for fmt, marker, shift in (("fp32", "o", -0.004), ("int8", "s", 0.004)):
        means = [100 * statistics.fmean(r.test_acc[fmt] for r in results.runs[k]) for k in keys]
        ax.plot(xs, means, marker=marker, label=fmt)
        for x, k in zip(xs, keys):
            ax.scatter([x + shift] * len(results.runs[k]), [100 * r.test_acc[fmt] for r in results.runs[k]], s=10, alpha=0.5,
                       marker=marker, color=ax.lines[-1].get_color())  # fmt: skip
    ax.set(xlabel="sparsity of the backbone's conv weights", ylabel="target test accuracy (%)",
           title="accuracy (each seed a dot)")  # fmt: skip
    ax.legend()
    ax = axes[1]
    for name, marker in (("fp32.pt2", "o"), ("int8.ts", "s")):
        line = ax.plot(xs, [statistics.median(r.size[name] for r in results.runs[k]) / 1e3 for k in keys],
                       marker=marker, label=name)[0]  # fmt: skip
        ax.plot(xs, [statistics.median(r.size_gz[name] for r in results.runs[k]) / 1e3 for k in keys], marker=marker,
                linestyle="--", color=line.get_color(), label=f"{name}, gzip")  # fmt: skip
    ax.set(xlabel="sparsity", ylabel="kB on disk", title="file size", ylim=(0, None))
    ax.legend()
    ax = axes[2]
    formats = ["fp32 eager", "fp32 .pt2", "fp32 .ts", "int8 .ts"]
    width = 0.35
    first = results.runs[keys[0]]
    for i, batch in enumerate(("b1", "b64")):
        values = [statistics.median(r.latency_ms[f][batch] for k in keys for r in results.runs[k]) for f in formats]
        ax.bar([j + (i - 0.5) * width for j in range(len(formats))], values, width, label=f"batch {batch[1:]}")
    ax.set_xticks(range(len(formats)), formats)
    ax.set(ylabel="ms per image (1 thread)", title=f"CPU latency (median of {len(keys) * len(first)} runs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--sparsities", type=float, nargs="+")
    parser.add_argument("--source", default=SOURCE, help="source checkpoint (default: the zoo's)")
    parser.add_argument("--fashion-root", help="folder with the Fashion-MNIST IDX files (default: Debian's copy)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))
    if args.sparsities:
        profile = dataclasses.replace(profile, sparsities=tuple(args.sparsities))
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401
    import torch

    from lit_finetune.zoo import resolve_source

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(profile.threads)
    source = str(resolve_source(args.source, role="source"))
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    results = run_benchmark(profile, source, args.fashion_root)
    minutes = (
        f"{(time.perf_counter() - start) / 60:.1f} min in all (own CPU time {(time.process_time() - cpu_start) / 60:.1f} "
        f"min; 1-minute load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end)"
    )
    m = provenance.machine()
    where = f"{m['cpu']}, {m['cores']} cores, {profile.threads} torch thread, torch {torch.__version__}, int8 backend x86"
    text = markdown(results, args.profile, profile, where, minutes)
    args.results.mkdir(parents=True, exist_ok=True)
    run.write(args.results / "compression.md", text, {"source checkpoint": source},
              data={"results": results, "seeds": list(profile.seeds)},
              config={"profile": args.profile, **provenance.settings(profile, "seeds", "sparsities")})  # fmt: skip
    plot(results, args.results / "compression.png")
    print("\n" + text + f"\nwrote {args.results / 'compression.md'} and compression.png")


if __name__ == "__main__":
    main()
