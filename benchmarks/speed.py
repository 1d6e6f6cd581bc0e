"""Speed: ``ImageClassifier`` under ``lightning.Trainer`` vs a hand-written PyTorch loop, and the data path.

The "Speed" protocol of docs/ARCHITECTURE.md, in one process:

* **Same model, data and batch.** Each arm builds a fresh ``ImageClassifier(num_classes=5)``
  (resnet_small, 28x28 grayscale) from the same seed and trains it on the same
  ``FashionMNISTDataModule(classes=[0, 1, 2, 3, 4], batch_size=128)`` train loader (the batches
  come in the same order), with the AdamW over named groups that ``configure_optimizers()`` builds.
  The hand-written arm calls ``model(x)`` + ``F.cross_entropy``; the Trainer arm runs the module's
  own ``training_step`` (which also updates its torchmetrics and calls ``self.log``).
* **Same timing.** A step is timed from the end of one optimizer step to the end of the next, so
  it holds fetching the batch, forward, backward and the optimizer step: for the Trainer through a
  callback's ``on_train_batch_end``, for the hand-written loop right after ``optimizer.step()``.
  Warm-up steps are excluded; Trainer construction and ``fit`` setup fall outside the window.
* **Interleaved repeats.** Each repeat times the data path, then both arms, alternating which
  arm goes first. The Trainer / hand-written figure is the median over repeats of the ratio
  within a repeat (its two runs are back to back, under the same load), shown with its range
  and with the same ratio from median step times (robust to bursts of other processes). Both arms
  run with the same ``torch.set_num_threads`` (``--threads``, default 1: steadiest on a small
  or shared CPU).
* **Same computation.** Both arms start from the same weights and see the same batches, so they
  must compute the same loss at every step and end with the same weights; the report shows the
  largest difference of each (a loop that skipped a step or fed other data would show it).
* **Data path alone.** The same train loader iterated without a model (batches/s, images/s),
  compared with the model step alone (the hand-written step minus its batch fetch).

    python benchmarks/speed.py            # ~2-3 min on a 2-core CPU; writes benchmarks/results/speed.md
    python benchmarks/speed.py --quick    # a smoke test of a few steps (no file unless --output)
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_finetune import ImageClassifier
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.data.fashion_mnist import DEBIAN_ROOT

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "speed.md"
CLASSES = [0, 1, 2, 3, 4]
TARGET_TRAINER_RATIO = 0.95  # Trainer steps/s >= 0.95 x hand-written loop
TARGET_DATA_RATIO = 10.0  # data path batches/s >= 10 x model steps/s
#: both arms run the same computation: per-step losses and final weights agree to float rounding
AGREEMENT_TOLERANCE = 1e-4
TIMING_METHOD = (
    "per-step wall time (`time.perf_counter`) from the end of one optimizer step to the end of the next, "
    "after the warm-up steps: Trainer arm via a callback's `on_train_batch_end`, hand-written arm right after "
    "`optimizer.step()`; both include fetching the batch"
)


@dataclass
class ArmTiming:
    """Wall seconds of each timed step of one arm in one repeat, and the batch-fetch part of each (if known)."""

    step_s: list[float]
    fetch_s: list[float] = field(default_factory=list)
    threads: int = 0
    #: the training loss of every step, warm-up included
    losses: list[float] = field(default_factory=list)
    #: the trained model and its optimizer (dropped once the arms were compared)
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)

    @property
    def steps_per_s(self) -> float:
        """Timed steps over their total wall time."""
        return len(self.step_s) / sum(self.step_s)

    @property
    def median_steps_per_s(self) -> float:
        """One over the median step time: robust to bursts of other processes on the machine."""
        return 1.0 / statistics.median(self.step_s)

    @property
    def compute_steps_per_s(self) -> float:
        """Steps/s without the batch fetch: the model step alone."""
        return len(self.step_s) / (sum(self.step_s) - sum(self.fetch_s))

    @property
    def fetch_share(self) -> float:
        """Fraction of the step time spent fetching the batch."""
        return sum(self.fetch_s) / sum(self.step_s)


class StepTimer(L.Callback):
    """Records ``time.perf_counter()`` and the loss at the end of every training batch, and the thread count."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.losses: list[float] = []
        self.threads = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, *args: object) -> None:
        self.times.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))  # the loss of the step that just ended


def step_durations(times: list[float], warmup: int, steps: int) -> list[float]:
    """Wall seconds of each step after the warm-up, from step-end timestamps."""
    if len(times) < warmup + steps:
        raise RuntimeError(f"only {len(times)} steps ran; expected {warmup + steps}")
    timed = times[warmup - 1 : warmup + steps]
    return [end - start for start, end in zip(timed, timed[1:])]


def endless(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``loader`` epoch after epoch, calling ``set_epoch`` on its sampler as Lightning does."""
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def fresh_model(seed: int) -> ImageClassifier:
    """The benchmarked model, with the same initial weights in every arm."""
    torch.manual_seed(seed)
    return ImageClassifier(num_classes=len(CLASSES))


def time_trainer(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """``Trainer.fit`` for ``warmup + steps`` steps; steps/s over the steps after warm-up."""
    torch.set_num_threads(args.threads)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    model = fresh_model(args.seed)
    trainer.fit(model, datamodule=dm)
    durations = step_durations(timer.times, args.warmup, args.steps)
    return ArmTiming(durations, threads=timer.threads, losses=timer.losses, model=model, optimizer=trainer.optimizers[0])


def time_plain(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """A hand-written loop of the same model, optimizer, loader and step count."""
    torch.set_num_threads(args.threads)
    model = fresh_model(args.seed).train()
    optimizer = model.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    batches = endless(dm.train_dataloader())
    times, fetches, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        x, y = next(batches)
        fetches.append(time.perf_counter() - start)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter())
        losses.append(loss.item())
    fetch = fetches[args.warmup : args.warmup + args.steps]
    durations = step_durations(times, args.warmup, args.steps)
    return ArmTiming(durations, fetch, torch.get_num_threads(), losses, model, optimizer)


def arm_difference(a: ArmTiming, b: ArmTiming) -> tuple[float, float]:
    """(largest per-step loss difference, largest final weight/buffer difference) of two arms' runs."""
    if len(a.losses) != len(b.losses):
        return float("inf"), float("inf")
    loss_diff = max((abs(x - y) for x, y in zip(a.losses, b.losses)), default=0.0)
    state_a, state_b = a.model.state_dict(), b.model.state_dict()
    if state_a.keys() != state_b.keys():
        return loss_diff, float("inf")
    weight_diff = max(
        ((state_a[k].double() - state_b[k].double()).abs().max().item() for k in state_a if state_a[k].numel()),
        default=0.0,
    )
    return loss_diff, weight_diff


def time_data(dm: FashionMNISTDataModule, args: argparse.Namespace) -> tuple[float, float]:
    """(batches/s, images/s) of iterating the train loader alone."""
    torch.set_num_threads(args.threads)
    batches = endless(dm.train_dataloader())
    for _ in range(args.warmup):
        next(batches)
    images = 0
    start = time.perf_counter()
    for _ in range(args.data_batches):
        images += len(next(batches)[0])
    seconds = time.perf_counter() - start
    return args.data_batches / seconds, images / seconds


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    """The 1-minute load average (other processes share the CPU), or ``n/a``."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "n/a"


def fmt(value: float) -> str:
    """About three significant figures, never in scientific notation."""
    decimals = 0 if value >= 100 else 1 if value >= 10 else 2
    return f"{value:,.{decimals}f}"


def report(
    args: argparse.Namespace,
    trainer: list[ArmTiming],
    plain: list[ArmTiming],
    data: list[tuple[float, float]],
    loads: tuple[str, str],
    elapsed: float,
    agreement: list[tuple[float, float]],
) -> str:
    """The markdown report: setup, machine, the figures against their targets, and every repeat."""
    med = statistics.median
    loss_diff = max(a[0] for a in agreement)
    weight_diff = max(a[1] for a in agreement)
    trainer_sps = med(t.steps_per_s for t in trainer)
    plain_sps = med(p.steps_per_s for p in plain)
    model_sps = med(p.compute_steps_per_s for p in plain)
    data_bps = med(d[0] for d in data)
    paired = [t.steps_per_s / p.steps_per_s for t, p in zip(trainer, plain)]
    ratio = med(paired)
    robust = med(t.median_steps_per_s / p.median_steps_per_s for t, p in zip(trainer, plain))
    data_ratio = data_bps / model_sps
    threads = ", ".join(map(str, sorted({a.threads for a in trainer + plain})))

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    lines = [
        "# Speed: `ImageClassifier` under `lightning.Trainer` vs a hand-written PyTorch loop",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads}; torch {torch.__version__}, "
        f"lightning {L.__version__}, Python {platform.python_version()}. 1-minute load average {loads[0]} at start, "
        f"{loads[1]} at end (other processes on the machine slow both arms; the ratios are the figures).",
        "",
        f"Setup: `ImageClassifier(num_classes={len(CLASSES)})` (resnet_small, 28x28x1), "
        f"`FashionMNISTDataModule(classes={CLASSES}, batch_size={args.batch_size})` train loader "
        "(augmentation on, `num_workers=0`), AdamW from `configure_optimizers()`, CPU, fp32. "
        f"{args.repeats} repeat(s) x {args.steps} timed steps after {args.warmup} warm-up step(s) per arm, "
        f"arm order alternating; data path: {args.data_batches} batches after {args.warmup} warm-up batch(es). "
        f"Total run {elapsed:.0f} s.{' **--quick: a smoke test, not a measurement.**' if args.quick else ''}",
        "",
        f"Timing: {TIMING_METHOD}. Steps/s of a run: timed steps over their total time. Trainer / hand-written: "
        "the median over repeats of the ratio within each repeat (the two arms of a repeat run back to back, so "
        "they share the machine's load); 'from median step times' uses each run's median step time instead, "
        "which ignores bursts of other processes. Trainer: no logger, no checkpointing, no progress bar, no model summary, "
        "no validation. The Trainer arm runs the module's `training_step` (torchmetrics update and `self.log` "
        "included); the hand-written arm only `model(x)` + `F.cross_entropy`. Both arms start from the same "
        "weights and see the same batches, so they compute the same losses and end with the same weights "
        "(the 'Arms agree' rows, over every step and repeat).",
        "",
        "| Figure | Measured (median of repeats) | Target | Met |",
        "|---|---|---|---|",
        f"| Hand-written loop (steps/s) | {fmt(plain_sps)} | | |",
        f"| Trainer.fit (steps/s) | {fmt(trainer_sps)} | | |",
        f"| Trainer / hand-written | {ratio:.3f} | >= {TARGET_TRAINER_RATIO} | {met(ratio >= TARGET_TRAINER_RATIO)} |",
        f"| Trainer / hand-written, range over repeats | {min(paired):.3f} to {max(paired):.3f} | | |",
        f"| Trainer / hand-written, from median step times | {robust:.3f} | | |",
        f"| Trainer / hand-written, ratio of the steps/s above | {trainer_sps / plain_sps:.3f} | | |",
        f"| Data path (batches/s) | {fmt(data_bps)} | | |",
        f"| Data path (images/s) | {fmt(med(d[1] for d in data))} | | |",
        f"| Model step alone (steps/s, hand-written minus batch fetch) | {fmt(model_sps)} | | |",
        f"| Data path / model step | {data_ratio:.1f} | >= {TARGET_DATA_RATIO:g} | "
        f"{met(data_ratio >= TARGET_DATA_RATIO)} |",
        f"| Batch fetch share of a hand-written step | {100 * med(p.fetch_share for p in plain):.1f}% | | |",
        f"| Arms agree: largest per-step loss difference | {loss_diff:.1e} | <= {AGREEMENT_TOLERANCE:g} | "
        f"{met(loss_diff <= AGREEMENT_TOLERANCE)} |",
        f"| Arms agree: largest final weight difference | {weight_diff:.1e} | <= {AGREEMENT_TOLERANCE:g} | "
        f"{met(weight_diff <= AGREEMENT_TOLERANCE)} |",
        "",
        "Per repeat (the arm that ran first in a repeat is marked *):",
        "",
        "| Repeat | Hand-written (steps/s) | Trainer (steps/s) | Trainer / hand-written | Data (batches/s) |",
        "|---|---|---|---|---|",
    ]
    for i, (t, p, d, r) in enumerate(zip(trainer, plain, data, paired)):
        t_mark, p_mark = ("*", "") if i % 2 == 0 else ("", "*")
        lines.append(f"| {i + 1} | {fmt(p.steps_per_s)}{p_mark} | {fmt(t.steps_per_s)}{t_mark} | {r:.3f} | {fmt(d[0])} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=25, help="timed steps per arm and repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (and data batches) first, >= 1")
    parser.add_argument("--repeats", type=int, default=6, help="repeats of every arm, order alternating")
    parser.add_argument("--data-batches", type=int, default=150, help="timed batches of the data path")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, both arms (1: steadiest on a small or shared CPU, where OpenMP threads "
        "spin-waiting for a busy core can slow a step several times over)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", default=DEBIAN_ROOT, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--quick", action="store_true", help="a few steps, one repeat: a smoke test")
    parser.add_argument(
        "--output", type=Path, default=None, help=f"markdown file (default {DEFAULT_OUTPUT}; none with --quick)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.data_batches = 2, 1, 1, 5
    if args.output is None and not args.quick:
        args.output = DEFAULT_OUTPUT
    if min(args.steps, args.warmup, args.repeats, args.data_batches, args.threads) < 1:
        parser.error("--steps, --warmup, --repeats, --data-batches and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown and write it to ``--output``; return it."""
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)  # torch 2.14 vs lightning 2.6, once per fit
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started, load_start = time.perf_counter(), load_average()

    dm = FashionMNISTDataModule(root=args.root, classes=CLASSES, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")  # once: the Trainer's own setup call then finds the splits built
    trainer, plain, data, agreement = [], [], [], []
    for repeat in range(args.repeats):
        data.append(time_data(dm, args))
        arms = [(time_trainer, trainer), (time_plain, plain)]
        for arm, results in arms if repeat % 2 == 0 else arms[::-1]:
            gc.collect()
            results.append(arm(dm, args))
        agreement.append(arm_difference(trainer[-1], plain[-1]))
        for timing in (trainer[-1], plain[-1]):
            timing.model = timing.optimizer = None  # compared; free them before the next repeat
        print(
            f"repeat {repeat + 1}/{args.repeats}: hand-written {plain[-1].steps_per_s:.3f} steps/s, "
            f"Trainer {trainer[-1].steps_per_s:.3f} steps/s, data {data[-1][0]:.1f} batches/s, "
            f"arms differ by {agreement[-1][0]:.1e} (loss) / {agreement[-1][1]:.1e} (weights)",
            flush=True,
        )

    loads = (load_start, load_average())
    markdown = report(args, trainer, plain, data, loads, time.perf_counter() - started, agreement)
    print(markdown)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(markdown)
        print(f"wrote {args.output}")
    return markdown


if __name__ == "__main__":
    main()
