"""GPU speed profile: classifier, DCGAN and VAE steps/s and achieved TFLOP/s, eager vs compiled vs data on the device.

For each module (``--models``) and variant (``--variants``) a ``lightning.Trainer`` fits the module for
``warmup + steps`` batches on all of Fashion-MNIST (28x28, 10 classes) and reports:

* **steps/s** over the timed batches: the clock is read (after ``torch.cuda.synchronize()``) only at the end of
  the warm-up and at the end of the last batch, so the CPU may run ahead of the GPU as it would in training;
  the warm-up absorbs compilation, CUDA-graph recording and cuDNN autotuning (``benchmark=True`` everywhere);
* **achieved TFLOP/s** = FLOPs per batch x steps/s, and its share of the device's dense bf16 tensor-core peak
  (NVIDIA's datasheet figure, :data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``). FLOPs per batch are counted once
  per module with ``torch.utils.flop_counter.FlopCounterMode`` over one eager fp32 training batch under the
  same Trainer (matrix products and convolutions, forward and backward; a DCGAN batch is a D and a G step);
* the first and last training loss (D's for the GAN), finite or not: a variant must still train.

Variants (:data:`VARIANTS`): ``fp32`` (today's path: eager, batches built on the host and copied over),
``bf16`` (bf16-mixed + channels_last), ``+device`` (``data_on_device=True``: the training set and its
augmentation on the GPU), ``+compile`` (``compile_mode="default"``), ``+cudagraphs``
(``compile_mode="reduce-overhead"``). Ratios are against ``fp32`` of the same module in the same run.

Also, with the speed rows: whether batches built on the device equal the host's (``data on device`` check), and,
with ``--tta-epochs``, **time to 93 %** for the classifier: fits of the given numbers of epochs (fastest
variant, OneCycleLR over each schedule, validated every epoch on the 5,000 held-out images), each timed end to
end from the datamodule's setup to the end of the fit, compilation included; the headline is the shortest
schedule whose final validation accuracy reached 93 % (selected on validation), with its test accuracy.

``benchmarks/gpu_session.py`` runs the three pieces below and the full-dataset GPU profile in one device call.
By hand, run on a CUDA machine in pieces (each well under 8 minutes), then merge:

    python benchmarks/full_dataset.py --bundle runs/gpu_bundle     # here: the IDX files travel in runs/
    # on the device (carry runs/gpu_bundle), one piece per call:
    PYTHONPATH=. python benchmarks/gpu_check.py --data-root runs/gpu_bundle/fashion-mnist --models classifier \\
        --piece classifier --out "$OUT"
    PYTHONPATH=. python benchmarks/gpu_check.py --data-root runs/gpu_bundle/fashion-mnist --models dcgan vae \\
        --piece gan_vae --out "$OUT"
    PYTHONPATH=. python benchmarks/gpu_check.py --data-root runs/gpu_bundle/fashion-mnist --models \\
        --tta-epochs 2 3 4 6 --piece tta --out "$OUT"
    # here, with the pieces' JSON files:
    python benchmarks/gpu_check.py --merge classifier.json gan_vae.json tta.json    # -> benchmarks/results/gpu_check.md

Without a CUDA device the script refuses, unless ``--dry-run``: tiny networks and batches, a few steps, on the
CPU, to check the mechanics (``tests/test_gpu_check.py``); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

MODELS = ("classifier", "dcgan", "vae")
#: name: (precision, channels_last, data_on_device, compile_mode)
VARIANTS: dict[str, tuple[str, bool, bool, str | None]] = {
    "fp32": ("32-true", False, False, None),
    "bf16": ("bf16-mixed", True, False, None),
    "bf16+device": ("bf16-mixed", True, True, None),
    "bf16+device+compile": ("bf16-mixed", True, True, "default"),
    "bf16+device+cudagraphs": ("bf16-mixed", True, True, "reduce-overhead"),
}
#: dense bf16 tensor-core peak (TFLOP/s) by device name, from NVIDIA's datasheets; the first match wins
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0),
    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)  # fmt: skip
TARGET_ACCURACY = 0.93
#: the classifier recipe of the time-to-accuracy fits (configs/classifier/fashion_mnist_full.yaml's optimizer)
TTA_LR, TTA_WEIGHT_DECAY, TTA_LABEL_SMOOTHING = 1e-2, 1e-4, 0.1
#: the settings every piece of one table shares (the rest choose what a piece runs)
PIECE_SETTINGS = ("backbone", "batch_size", "steps", "warmup", "dry_run", "tta_variant", "peak_tflops")


def peak_bf16_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device named ``device_name`` (``torch.cuda.get_device_name()``), if known."""
    for marker, peak in PEAK_BF16_TFLOPS:
        if marker in device_name:
            return peak
    return None


def datamodule(args: argparse.Namespace, model: str, on_device: bool, val_split: int | None = None):
    from lit_finetune.data import FashionMNISTDataModule

    root = {"root": args.data_root} if args.data_root else {}
    return FashionMNISTDataModule(
        **root, batch_size=args.batch_size, val_split=val_split or args.val_split, augment=model != "vae",
        data_on_device=on_device,
    )  # fmt: skip


def build_model(model: str, args: argparse.Namespace, compile_mode: str | None, **overrides: Any):
    """The benchmarked module: a ResNet classifier, a conditional DCGAN with DiffAugment, a VAE (dry run: tiny)."""
    from lit_finetune import DCGAN, VAE, ImageClassifier

    tiny = args.dry_run
    if model == "classifier":
        kwargs = dict(num_classes=10, backbone=args.backbone, label_smoothing=TTA_LABEL_SMOOTHING)
        return ImageClassifier(**{**kwargs, **overrides}, compile_mode=compile_mode)
    if model == "dcgan":
        sizes = dict(latent_dim=16, generator_width=8, discriminator_width=8) if tiny else {}
        return DCGAN(num_classes=10, conditional=True, diffaugment="color,translation,cutout", **sizes,
                     compile_mode=compile_mode)  # fmt: skip
    sizes = dict(latent_dim=4, encoder_width=8, decoder_width=8) if tiny else {}
    return VAE(**sizes, compile_mode=compile_mode)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def make_clock(warmup: int, steps: int, device: str):
    """A callback that reads the clock at the end of the warm-up and of the last timed batch (synchronised),
    and keeps the first back-propagated loss of every batch without reading it back (no sync per step)."""
    import lightning as L

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.batches, self.marks, self.losses = 0, {}, []
            self._new_batch = True

        def on_train_start(self, *args: object) -> None:
            self.marks[0] = time.perf_counter()

        def on_train_batch_start(self, *args: object) -> None:
            self._new_batch = True

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if self._new_batch:
                self.losses.append(loss.detach().float())
                self._new_batch = False

        def on_train_batch_end(self, *args: object) -> None:
            self.batches += 1
            if self.batches in (1, warmup, warmup + steps):  # the first: when compilation and autotuning are done
                synchronize(device)
                self.marks[self.batches] = time.perf_counter()

    return Clock()


def trainer_for(args: argparse.Namespace, precision: str, channels_last: bool, callbacks: list, **kwargs):
    import lightning as L

    from lit_finetune.callbacks.channels_last import ChannelsLast

    return L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision, benchmark=True,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks + ([ChannelsLast()] if channels_last else []), **kwargs,
    )  # fmt: skip


def optimizer_steps(model: str, batches: int) -> int:
    """``max_steps`` for ``batches`` batches: Lightning counts each optimizer's steps (a GAN batch has two)."""
    return 2 * batches if model == "dcgan" else batches


def count_flops(model: str, args: argparse.Namespace) -> float:
    """FLOPs of one eager fp32 training batch (forward and backward; a GAN's D and G steps), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    data = datamodule(args, model, on_device=False)
    module = build_model(model, args, None)
    trainer = trainer_for(args, "32-true", False, [], max_steps=optimizer_steps(model, 1), limit_val_batches=0)
    with FlopCounterMode(display=False) as counter:
        trainer.fit(module, datamodule=data)
    return float(counter.get_total_flops())


def run_variant(model: str, name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    precision, channels_last, on_device, compile_mode = VARIANTS[name]
    torch.manual_seed(0)
    data = datamodule(args, model, on_device)
    module = build_model(model, args, compile_mode)
    clock = make_clock(args.warmup, args.steps, args.device)
    trainer = trainer_for(args, precision, channels_last, [clock], limit_val_batches=0,
                          max_steps=optimizer_steps(model, args.warmup + args.steps))  # fmt: skip
    trainer.fit(module, datamodule=data)
    seconds = clock.marks[args.warmup + args.steps] - clock.marks[args.warmup]
    losses = [float(loss) for loss in clock.losses]
    return {
        "model": model, "variant": name, "steps_per_s": args.steps / seconds, "first_loss": losses[0],
        "last_loss": losses[-1], "finite": all(math.isfinite(x) for x in losses),
        "warmup_s": clock.marks[args.warmup] - clock.marks[0],
        "data_on_device": str(data.train_set.device),
    }  # fmt: skip


def check_device_batches(args: argparse.Namespace, batches: int = 4) -> dict[str, Any]:
    """The first ``batches`` training batches of epochs 0 and 1, built on the host and on the device: the largest
    difference (0: the same batches)."""
    import torch

    host, device = datamodule(args, "classifier", False), datamodule(args, "classifier", False)
    for dm in (host, device):
        dm.setup("fit")
    target = torch.device(args.device)
    device.train_set.to(target)
    worst, count = 0.0, 0
    for epoch in (0, 1):
        loaders = [dm.train_dataloader() for dm in (host, device)]
        for loader in loaders:
            loader.sampler.set_epoch(epoch)
        for (x_host, y_host), (x_dev, y_dev) in zip(*loaders):
            assert x_dev.device.type == target.type, f"a batch came back on {x_dev.device}"
            worst = max(worst, (x_dev.cpu() - x_host).abs().max().item())
            worst = max(worst, float((y_dev.cpu() != y_host).any()))
            count += 1
            if count % batches == 0:
                break
    return {"batches": count, "max_abs_difference": worst, "device": str(target)}


def run_tta(epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """Fit the classifier for ``epochs`` epochs (OneCycleLR over them), timed end to end; validation accuracy per
    epoch (and when it first reached the target), then the test accuracy."""
    import functools

    import lightning as L
    import torch

    precision, channels_last, on_device, compile_mode = VARIANTS[args.tta_variant]
    started = time.perf_counter()
    data = datamodule(args, "classifier", on_device, val_split=args.val_split)
    data.setup("fit")  # read and converted here, inside the timed span
    total = epochs * math.ceil(len(data.train_set) / args.batch_size)
    module = build_model(
        "classifier", args, compile_mode,
        optimizer=functools.partial(torch.optim.AdamW, lr=TTA_LR, weight_decay=TTA_WEIGHT_DECAY),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=TTA_LR, total_steps=total),
        scheduler_interval="step",
    )  # fmt: skip
    accuracy: list[tuple[float, float]] = []  # (seconds since start, val acc) per validation

    class Validated(L.Callback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                accuracy.append((time.perf_counter() - started, float(trainer.callback_metrics["val/acc"])))

    clock = make_clock(1, 1, args.device)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:  # the test's confusion-matrix PNG goes here
        trainer = trainer_for(args, precision, channels_last, [clock, Validated()], max_epochs=epochs,
                              num_sanity_val_steps=0, limit_train_batches=args.tta_limit_batches,
                              limit_val_batches=args.tta_limit_batches, default_root_dir=scratch)  # fmt: skip
        trainer.fit(module, datamodule=data)
        synchronize(args.device)
        fit_s = time.perf_counter() - started
        test = trainer.test(module, datamodule=data, verbose=False)[0]
    reached = next((s for s, acc in accuracy if acc >= TARGET_ACCURACY), None)
    return {
        "epochs": epochs, "fit_s": fit_s, "first_step_s": clock.marks[1] - started, "val_acc": accuracy,
        "reached_s": reached, "test_acc": float(test["test/acc"]),
    }  # fmt: skip


def machine(device: str) -> str:
    import platform

    import lightning
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    return f"{where}; torch {torch.__version__}, lightning {lightning.__version__}"


def speed_rows(rows: list[dict], flops: dict[str, float], peak: float | None) -> list[str]:
    lines = [
        "| module | variant | steps/s | vs fp32 | GFLOP per batch | TFLOP/s | % of bf16 peak | loss first → last | "
        "finite | warm-up (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    bases = {r["model"]: r["steps_per_s"] for r in rows if r.get("variant") == "fp32" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed: {r['error']} | | | | | | | |")
            continue
        base, gflop = bases.get(r["model"]), flops.get(r["model"], 0.0) / 1e9
        tflops = gflop * r["steps_per_s"] / 1e3
        share = f"{100 * tflops / peak:.2f}%" if peak else "n/a"
        ratio = f"{r['steps_per_s'] / base:.2f}x" if base else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['steps_per_s']:.1f} | {ratio} | {gflop:.3g} | {tflops:.3g} | {share} | "
            f"{r['first_loss']:.3f} → {r['last_loss']:.3f} | {'yes' if r['finite'] else 'NO'} | {r['warmup_s']:.1f} |"
        )
    return lines


def tta_rows(runs: list[dict]) -> list[str]:
    lines = [
        "| epochs | fit, end to end (s) | of which until the first step ended (s) | val acc after each epoch | "
        f"val >= {100 * TARGET_ACCURACY:.0f} % first at (s) | test acc |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r['epochs']} | failed: {r['error']} | | | | |")
            continue
        accs = ", ".join(f"{100 * acc:.2f}" for _, acc in r["val_acc"])
        reached = f"{r['reached_s']:.1f}" if r["reached_s"] is not None else "not reached"
        lines.append(f"| {r['epochs']} | {r['fit_s']:.1f} | {r['first_step_s']:.1f} | {accs} | {reached} | "
                     f"{100 * r['test_acc']:.2f} % |")  # fmt: skip
    done = [r for r in runs if "error" not in r and r["val_acc"] and r["val_acc"][-1][1] >= TARGET_ACCURACY]
    if done:
        best = min(done, key=lambda r: r["epochs"])
        lines.insert(0, f"**Time to {100 * TARGET_ACCURACY:.0f} % (the shortest schedule whose final validation "
                        f"accuracy reached it): {best['fit_s']:.1f} s end to end, {best['epochs']} epoch(s); test "
                        f"accuracy {100 * best['test_acc']:.2f} %.**\n")  # fmt: skip
    elif runs:
        lines.insert(0, f"**No schedule reached {100 * TARGET_ACCURACY:.0f} % validation accuracy.**\n")
    return lines


def render(data: dict[str, Any], args: dict[str, Any], setup: str) -> str:
    """The markdown of one piece's (or merged pieces') results."""
    peak = args.get("peak_tflops") or data.get("peak_bf16_tflops")
    lines = []
    if data.get("rows"):
        lines += [*speed_rows(data["rows"], data.get("flops", {}), peak), ""]
    for check in data.get("device_batches", []):
        lines.append(
            f"Data on the device ({check['device']}): {check['batches']} training batches over 2 epochs built there "
            f"and on the host differ by at most {check['max_abs_difference']:.1e}."
        )
    if data.get("tta"):
        lines += ["", *tta_rows(data["tta"])]
    peak_text = f"{peak:g} TFLOP/s dense bf16 (NVIDIA's datasheet)" if peak else "unknown (pass --peak-tflops)"
    lines += ["", setup + f" Peak used: {peak_text}."]
    return "\n".join(lines).strip() + "\n"


def setup_text(args: argparse.Namespace, seconds: float) -> str:
    return (
        f"`benchmarks/gpu_check.py`: `ImageClassifier(backbone={args.backbone!r})`, a conditional `DCGAN` with "
        f"DiffAugment (a batch: one D and one G step; loss column: D's) and a `VAE`, all of Fashion-MNIST (28x28, "
        f"{args.val_split} images held out), batch {args.batch_size}; {args.steps} timed batches after "
        f"{args.warmup} warm-up batches per variant, the clock synchronised only at both ends. Time to accuracy: "
        f"variant `{args.tta_variant}`, AdamW(lr={TTA_LR:g}, weight_decay={TTA_WEIGHT_DECAY:g}) with a per-step "
        f"OneCycleLR, label smoothing {TTA_LABEL_SMOOTHING}. Measured on {machine(args.device)}; "
        f"{seconds / 60:.1f} min in all.{' **--dry-run: mechanics only, the figures mean nothing.**' if args.dry_run else ''}"
    )


def merge(paths: list[Path], out: Path, run: provenance.Run) -> Path:
    """One table from pieces run with the same settings (and commit): rows, FLOPs, checks and fits united."""
    datas, summary = provenance.merge_pieces(paths, run=run)
    merged: dict[str, Any] = {"rows": [], "flops": {}, "device_batches": [], "tta": [], "setup": []}
    for data in datas:
        merged["rows"] += data.get("rows", [])
        merged["flops"].update(data.get("flops", {}))
        # pieces on one machine at one commit build the same batches: show each distinct check once
        merged["device_batches"] += [b for b in data.get("device_batches", []) if b not in merged["device_batches"]]
        merged["tta"] += data.get("tta", [])
        merged["peak_bf16_tflops"] = merged.get("peak_bf16_tflops") or data.get("peak_bf16_tflops")
        merged["setup"].append(data["setup"])
    setup = provenance.merged_setup(summary, [{"setup": s} for s in merged["setup"]])
    target = out / "gpu_check.md"
    run.write(target, render(merged, summary["config"], setup), data=merged, config=summary["config"],
              pieces=summary["pieces"])  # fmt: skip
    return target


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS, help="speed rows of these")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--val-split", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--steps", type=int, default=100, help="timed batches per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed batches first (compilation, autotuning)")
    parser.add_argument("--tta-epochs", nargs="*", type=int, default=[], help="time-to-accuracy fits of these lengths")
    parser.add_argument("--tta-variant", default="bf16+device+compile", choices=list(VARIANTS))
    parser.add_argument("--tta-limit-batches", type=float, default=1.0, help="(dry run) train/val batches per epoch")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if unlisted")
    parser.add_argument("--piece", default=None, help="write <out>/<piece>.md (+ .json) instead of gpu_check.md")
    parser.add_argument("--merge", nargs="+", type=Path, default=None, help="pieces' .json files to merge")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on whatever device there is (the CPU)")
    args = parser.parse_args(argv)
    if args.merge:
        return args
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.dry_run:
        parser.error(
            "gpu_check measures a CUDA device and this machine has none (torch.cuda.is_available() is False). Run it "
            "on a GPU machine, or pass --dry-run to check the script's mechanics here with tiny sizes."
        )
    if args.dry_run:
        args.backbone, args.batch_size, args.val_split = "resnet_small", 16, 1000
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if min(args.steps, args.warmup, args.batch_size) < 1:
        parser.error("--steps, --warmup and --batch-size must be >= 1")
    return args


def main(argv: list[str] | None = None) -> Path:
    run = provenance.Run.start(__file__, argv)
    args = parse_args(argv)
    if args.merge:
        target = merge(args.merge, args.out, run)
        print(target.read_text())
        return target
    import warnings

    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")
    warnings.filterwarnings("ignore", ".*FID/KID skipped.*")
    start = time.perf_counter()
    import torch

    peak = args.peak_tflops or (peak_bf16_tflops(torch.cuda.get_device_name()) if args.device == "cuda" else None)
    data: dict[str, Any] = {"rows": [], "flops": {}, "device_batches": [], "tta": [], "peak_bf16_tflops": peak}
    target = args.out / f"{args.piece or 'gpu_check'}.md"
    config = {k: v for k, v in sorted(vars(args).items()) if k in PIECE_SETTINGS}

    def write() -> None:  # after every row: a run cut off at its time limit keeps what it measured
        data["setup"] = setup_text(args, time.perf_counter() - start)
        run.write(target, render(data, vars(args), data["setup"]), data=data, record=run.record(config=config))

    def attempt(what: str, fn, *fn_args, **failed: Any) -> Any:
        try:
            return fn(*fn_args)
        except Exception as err:  # report a broken path instead of losing the others
            return {**failed, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
        finally:
            print(f"{what} done after {time.perf_counter() - start:.0f} s", flush=True)

    if args.models and any(VARIANTS[v][2] for v in args.variants):
        data["device_batches"].append(attempt("data-on-device check", check_device_batches, args))
        if "error" in data["device_batches"][-1]:
            print(data["device_batches"].pop(), flush=True)
    for model in args.models:
        flops = attempt(f"{model} FLOP count", count_flops, model, args)
        if not isinstance(flops, dict):
            data["flops"][model] = flops
        for name in args.variants:
            data["rows"].append(attempt(f"{model} {name}", run_variant, model, name, args, model=model, variant=name))
            print(data["rows"][-1], flush=True)
            write()
    for epochs in args.tta_epochs:
        data["tta"].append(attempt(f"time to accuracy, {epochs} epochs", run_tta, epochs, args, epochs=epochs))
        print(data["tta"][-1], flush=True)
        write()
    write()
    print(target.read_text())
    return target


if __name__ == "__main__":
    main()
