"""GPU paths of the classifier: fp32, bf16-mixed, channels_last and torch.compile, each checked and timed.

Each variant fits ``ImageClassifier`` (ResNet-18 with the small-input stem, Fashion-MNIST 28x28, all
10 classes) for a fixed number of optimizer steps under ``lightning.Trainer`` and reports: steps/s
over the timed steps (after warm-up, which also absorbs torch.compile's compilation), the first and
last training loss (finite, and lower at the end), the LR the last step applied (``AppliedLRMonitor``),
and whether the conv weights really were channels_last. Ratios are against the fp32 variant measured
in the same process.

    PYTHONPATH=. python3 benchmarks/gpu_check.py --data-root DIR --out DIR     # on a CUDA machine
    python3 benchmarks/gpu_check.py --device cpu --steps 3 --warmup 1 --variants fp32 bf16-mixed --out /tmp/x

Writes ``<out>/gpu_check.md`` (default ``benchmarks/results/gpu_check.md``).
"""

from __future__ import annotations

import argparse
import sys
import math
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
VARIANTS = {
    # name: (precision, channels_last, compile)
    "fp32": ("32-true", False, False),
    "bf16-mixed": ("bf16-mixed", False, False),
    "bf16-mixed+channels_last": ("bf16-mixed", True, False),
    "bf16-mixed+channels_last+compile": ("bf16-mixed", True, True),
    # the GAN: manual optimisation of two optimizers, logit losses and DiffAugment under autocast
    "dcgan fp32": ("32-true", False, False),
    "dcgan bf16-mixed": ("bf16-mixed", False, False),
}


def run_variant(name: str, args: argparse.Namespace) -> dict:
    import lightning as L
    import torch

    from lit_finetune import DCGAN, ImageClassifier
    from lit_finetune.callbacks import AppliedLRMonitor
    from lit_finetune.callbacks.channels_last import ChannelsLast
    from lit_finetune.data import FashionMNISTDataModule

    precision, channels_last, compile_ = VARIANTS[name]

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            loss = outputs["loss"] if outputs else trainer.callback_metrics["train/d_loss"]
            self.losses.append(float(loss))

    L.seed_everything(0)
    root = {"root": args.data_root} if args.data_root else {}
    data = FashionMNISTDataModule(**root, batch_size=args.batch_size, val_split=1000, augment=True)
    if name.startswith("dcgan"):
        model = DCGAN(num_classes=10, conditional=True, diffaugment="color,translation,cutout")
    else:
        model = ImageClassifier(num_classes=10, backbone=args.backbone, label_smoothing=0.1)
    clock = Clock()
    callbacks = [clock, AppliedLRMonitor()] + ([ChannelsLast()] if channels_last else [])
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
        max_steps=args.warmup + args.steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(torch.compile(model) if compile_ else model, datamodule=data)
    timed = clock.times[args.warmup - 1 :]
    steps_per_s = (len(timed) - 1) / (timed[-1] - timed[0])
    # a (C_out, C_in > 1, k, k) weight: its layout tells the formats apart
    conv = model.discriminator.blocks[1].conv.weight if name.startswith("dcgan") else model.backbone.layer1[0].conv1.weight
    return {
        "variant": name,
        "steps_per_s": steps_per_s,
        "first_loss": clock.losses[0],
        "last_loss": clock.losses[-1],
        "finite": all(math.isfinite(x) for x in clock.losses),
        "lr_head": float(trainer.callback_metrics.get("lr/head", trainer.callback_metrics.get("lr/generator.project", 0))),
        "channels_last": conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(),
    }


def machine(device: str) -> str:
    import platform

    import lightning
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    return f"{where}; torch {torch.__version__}, lightning {lightning.__version__}"


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, cuDNN autotune)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)

    start = time.perf_counter()
    rows: list[dict] = []
    for name in args.variants:
        try:
            rows.append(run_variant(name, args))
        except Exception as err:  # report a broken path instead of losing the others
            rows.append({"variant": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
        print(rows[-1], flush=True)
        write_table(rows, args, time.perf_counter() - start, run)  # after each variant: a cut-off run keeps its rows
    print((Path(args.out) / "gpu_check.md").read_text())


def write_table(rows: list[dict], args: argparse.Namespace, seconds: float, run: provenance.Run) -> None:
    bases = {r["variant"]: r["steps_per_s"] for r in rows if "error" not in r and r["variant"] in ("fp32", "dcgan fp32")}
    lines = [
        "| variant | steps/s | vs fp32 | loss first → last | finite | LR applied (head; G for the GAN) | conv weights channels_last |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | |")
            continue
        base = bases.get("dcgan fp32" if r["variant"].startswith("dcgan") else "fp32")
        ratio = f"{r['steps_per_s'] / base:.2f}x" if base else ""
        lines.append(
            f"| {r['variant']} | {r['steps_per_s']:.1f} | {ratio} | {r['first_loss']:.3f} → {r['last_loss']:.3f} | "
            f"{'yes' if r['finite'] else 'NO'} | {r['lr_head']:.2e} | {'yes' if r['channels_last'] else 'no'} |"
        )
    lines.append(
        f"\n`ImageClassifier(backbone={args.backbone!r})` (AdamW) and a conditional `DCGAN` with DiffAugment (one D and "
        f"one G step per batch; loss column: D's), Fashion-MNIST 28x28, batch {args.batch_size}; "
        f"{args.steps} timed steps after {args.warmup} warm-up steps per variant (`benchmarks/gpu_check.py`). "
        f"Measured on {machine(args.device)}; {seconds / 60:.1f} min in all."
    )
    run.write(Path(args.out) / "gpu_check.md", "\n".join(lines), data={"rows": rows})


if __name__ == "__main__":
    main()
