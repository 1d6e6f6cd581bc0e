"""Which generator should a DCGAN sample from? The raw generator against EMA variants, on the source config.

For each seed, ``configs/dcgan/pretrain.yaml`` (unconditional DCGAN on Fashion-MNIST classes 0-4, as shipped)
is fitted once; a callback keeps the alternative averages of the *same* run beside the module's own, so
every variant is measured on the same training trajectory (paired by seed):

* ``raw G``: the trained generator, eval mode (its own running BatchNorm statistics);
* ``EMA, recomputed BN`` (the module's default, ``ema_batchnorm="recompute"``): decay warm-up
  ``min(decay, (1 + t) / (10 + t))``, BatchNorm statistics recomputed for the averaged weights;
* ``EMA, averaged BN``: the same weights, BatchNorm statistics averaged like the weights (timm);
* ``EMA, copied BN``: the same weights with the raw generator's statistics;
* ``EMA, no warm-up, copied BN``: the module's behaviour before the fix (constant decay from step 0);
* ``EMA, no warm-up, recomputed BN``: what the warm-up alone is worth.

Each is scored against the source test split in the feature space of the project's FID extractor
(``configs/metrics/feature_extractor.yaml``): FID and KID of 2,500 samples against 2,500 test images
(half A), next to the **real-vs-real floor**: half A against the other 2,500 test images (half B), the
FID a perfect generator would get at this sample size (FID is biased upward at small N; compare only
at equal sizes). Also the extractor's class counts of the samples (a generator that draws all five
classes spreads them like the real row) and per-pixel statistics. Selection: none (nothing is chosen;
the final state of each run is measured). Verdict: each variant against the default by a paired
t-test over seeds with Holm's correction.

    OMP_NUM_THREADS=2 python benchmarks/ema_variants.py --extractor E.ckpt        # quick profile (CPU)
    python benchmarks/ema_variants.py --profile full --extractor E.ckpt           # on a GPU

Profiles: ``quick``: 10 epochs (the config's), seeds 0-2; ``full``: 30 epochs, seeds 0-4; ``smoke``: a
few batches, one seed (numbers mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
from stats import holm, paired_t_test  # noqa: E402
from transfer_vs_scratch import QUIET, working_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/dcgan/pretrain.yaml"
SOURCE_CLASSES = (0, 1, 2, 3, 4)
SHORT_NAMES = ("top", "trouser", "pullover", "dress", "coat")
PROFILES = {
    "quick": dict(epochs=10, seeds=[0, 1, 2], n_eval=2500, extra=[]),
    "full": dict(epochs=30, seeds=[0, 1, 2, 3, 4], n_eval=2500, extra=[]),
    "smoke": dict(epochs=1, seeds=[0], n_eval=200, extra=["--trainer.limit_train_batches", "4"]),
}
DEFAULT = "EMA, recomputed BN (default)"
VARIANTS = (
    "raw G",
    DEFAULT,
    "EMA, averaged BN",
    "EMA, copied BN",
    "EMA, no warm-up, copied BN (before the fix)",
    "EMA, no warm-up, recomputed BN",
)


class EMAShadows(Callback):
    """Alternative averages of the module's generator, updated after each of its EMA updates.

    ``averaged_buffers``: the raw generator's BatchNorm statistics averaged with the module's
    (warmed-up) decay; ``no_warmup``: the generator's weights averaged with the constant decay.
    """

    def on_train_start(self, trainer, pl_module) -> None:
        self.averaged_buffers = [b.detach().clone() for b in pl_module.generator_ema.buffers()]
        self.no_warmup = [p.detach().clone() for p in pl_module.generator_ema.parameters()]

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = int(pl_module.ema_updates) - 1  # the update training_step just made used decay(t)
        warm = min(pl_module.hparams.ema_decay, (1 + t) / (10 + t))
        for shadow, buffer in zip(self.averaged_buffers, pl_module.generator.buffers()):
            shadow.copy_(buffer) if not shadow.is_floating_point() else shadow.lerp_(buffer, 1 - warm)
        for shadow, param in zip(self.no_warmup, pl_module.generator.parameters()):
            shadow.lerp_(param, 1 - pl_module.hparams.ema_decay)


def variant_generators(model, shadows: EMAShadows) -> dict[str, torch.nn.Module]:
    """Every variant as an eval-mode generator (copies: the module is left as it was)."""

    def copy_with(params: list[torch.Tensor] | None = None, buffers: list[torch.Tensor] | None = None):
        net = copy.deepcopy(model.generator_ema).eval()
        with torch.no_grad():
            for p, v in zip(net.parameters(), params or []):
                p.copy_(v)
            for b, v in zip(net.buffers(), buffers or []):
                b.copy_(v)
        return net

    raw_buffers = [b.detach().clone() for b in model.generator.buffers()]
    generators = {
        "raw G": copy.deepcopy(model.generator).eval(),
        DEFAULT: copy.deepcopy(model.generator_network(True)).eval(),
        "EMA, averaged BN": copy_with(buffers=shadows.averaged_buffers),
        "EMA, copied BN": copy_with(buffers=raw_buffers),
        "EMA, no warm-up, copied BN (before the fix)": copy_with(shadows.no_warmup, raw_buffers),
    }
    # the module's own recompute, applied to the no-warm-up weights, then the module restored
    kept = [p.detach().clone() for p in model.generator_ema.parameters()]
    with torch.no_grad():
        for p, v in zip(model.generator_ema.parameters(), shadows.no_warmup):
            p.copy_(v)
        model._ema_bn_stale = True
        generators["EMA, no warm-up, recomputed BN"] = copy.deepcopy(model.generator_network(True)).eval()
        for p, v in zip(model.generator_ema.parameters(), kept):
            p.copy_(v)
        model._ema_bn_stale = True
    return generators


def source_test_halves(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The source test split (classes 0-4, 5,000 images) in [-1, 1], split into two fixed halves."""
    from lit_finetune.data import FashionMNISTDataModule

    images, labels = FashionMNISTDataModule().read_split("test")
    real = images[torch.isin(labels, torch.tensor(SOURCE_CLASSES))].float() / 127.5 - 1
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
    half = len(real) // 2
    return real[order[:half]], real[order[half:]]


def score(extractor, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
    """FID, KID (mean, std over subsets), class counts and pixel statistics of ``fake`` against ``real``."""
    from lit_finetune.metrics import GenerativeMetrics

    metrics = GenerativeMetrics(extractor, kid_subset_size=500)
    metrics.update(real=real, fake=fake)
    out = {k: float(v) for k, v in metrics.compute().items()}
    counts = metrics.class_counts(fake)
    out["class_counts"] = [int(c) for c in counts[list(SOURCE_CLASSES)]]
    out["other_classes"] = int(counts.sum() - counts[list(SOURCE_CLASSES)].sum())
    out["pixel_std_gap"] = float((fake.std(0) - real.std(0)).abs().mean())
    return out


def run_seed(seed: int, epochs: int, n_eval: int, extractor, extra: list[str], workdir: Path, log=print):
    """Fit the source config once with the shadows; score every variant; return scores and seed-0 grids."""
    from lit_finetune.cli import cli_main

    with working_dir(workdir / f"seed{seed}"):
        cli = cli_main(
            ["--config", str(CONFIG), *QUIET, "--seed_everything", str(seed), "--trainer.max_epochs", str(epochs),
             "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.callbacks", "[]", *extra],
            run=False,
        )  # fmt: skip
        shadows = EMAShadows()
        cli.trainer.callbacks.append(shadows)
        start = time.perf_counter()
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        fit_seconds = time.perf_counter() - start
    model = cli.model.cpu()
    half_a, _ = source_test_halves()
    generators = variant_generators(model, shadows)
    rng = torch.Generator().manual_seed(10_000 + seed)
    z = torch.randn(n_eval, model.hparams.latent_dim, generator=rng)
    scores, grids = {}, {}
    with torch.no_grad():
        for name, generator in generators.items():
            fake = torch.cat([generator(chunk) for chunk in z.split(500)])
            scores[name] = score(extractor, half_a[:n_eval], fake)
            grids[name] = fake[:40]
            log(f"      seed {seed} {name:<44} FID {scores[name]['fid']:7.2f}  KID {1000 * scores[name]['kid_mean']:6.2f}e-3")
    return {"scores": scores, "fit_seconds": fit_seconds, "g_updates": int(model.ema_updates)}, grids


def paired_verdict(results: list[dict], variant: str):
    """Paired FID test over seeds of ``variant`` against the default (difference: variant minus default)."""
    return paired_t_test([r["scores"][variant]["fid"] for r in results], [r["scores"][DEFAULT]["fid"] for r in results])


def markdown(results: list[dict], floor: dict[str, float], seeds: list[int], setup: str) -> str:
    lines = [
        "| generator | FID ↓ | KID ×10³ ↓ | FID per seed | FID − default (paired) | Holm p | pixel-std gap ↓ | "
        + " | ".join(SHORT_NAMES) + " | other |",
        "|---|---|---|---|---|---|---|" + "---|" * (len(SHORT_NAMES) + 1),
    ]
    others = [v for v in VARIANTS if v != DEFAULT]
    tests = {v: paired_verdict(results, v) for v in others}
    adjusted = dict(zip(others, holm([tests[v].p for v in others])))
    for v in VARIANTS:
        fids = [r["scores"][v]["fid"] for r in results]
        kids = [1000 * r["scores"][v]["kid_mean"] for r in results]
        sd = statistics.stdev(fids) if len(fids) > 1 else 0.0
        ksd = statistics.stdev(kids) if len(kids) > 1 else 0.0
        counts = [statistics.mean(r["scores"][v]["class_counts"][i] for r in results) for i in range(len(SHORT_NAMES))]
        other = statistics.mean(r["scores"][v]["other_classes"] for r in results)
        gap = statistics.mean(r["scores"][v]["pixel_std_gap"] for r in results)
        if v == DEFAULT:
            diff_cell, p_cell = "—", "—"
        else:
            test = tests[v]
            diff_cell = f"{test.mean:+.1f} ± {test.std:.1f} (worst seed {max(test.diffs):+.1f})"
            p_cell = "n/a" if adjusted[v] != adjusted[v] else f"{adjusted[v]:.3f}"
        lines.append(
            f"| {v} | {statistics.mean(fids):.1f} ± {sd:.1f} | {statistics.mean(kids):.1f} ± {ksd:.1f} | "
            f"{', '.join(f'{f:.1f}' for f in fids)} | {diff_cell} | {p_cell} | {gap:.3f} | "
            + " | ".join(f"{c:.0f}" for c in counts) + f" | {other:.0f} |"
        )
    lines.append(
        f"| *real vs real floor (test half A vs half B)* | {floor['fid']:.1f} | {1000 * floor['kid_mean']:.1f} | | | | "
        f"{floor['pixel_std_gap']:.3f} | " + " | ".join(str(c) for c in floor["class_counts"]) + f" | {floor['other_classes']} |"
    )
    return "\n".join(lines) + "\n\n" + setup + "\n"


def plot(grids: dict[str, torch.Tensor], path: Path, upscale: int = 3) -> None:
    """One 4x10 grid per variant (seed 0), upscaled so the 28-pixel samples are visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lit_finetune.callbacks import SampleImages

    gridder = SampleImages(nrow=10, upscale=upscale)  # the callback's grid: [-1, 1] to [0, 1], pixels enlarged

    fig, axes = plt.subplots(1, len(grids), figsize=(4.2 * len(grids), 2.2))
    for ax, (name, images) in zip(axes, grids.items()):
        grid = gridder.make_grid(name, images)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name.replace(" (default)", "\n(default)").replace(" (before the fix)", "\n(before the fix)"), fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--extractor", required=True, help="FID extractor checkpoint (configs/metrics/feature_extractor.yaml)")
    parser.add_argument("--seeds", type=int, nargs="*", help="override the profile's seeds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (fixed, recorded)")
    parser.add_argument("--workdir", default="/tmp/lit_finetune_ema_variants")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results"))
    args = parser.parse_args(argv)
    from gan_finetune import quiet_lightning

    quiet_lightning()
    torch.set_num_threads(args.threads)
    run = provenance.Run.start(__file__, argv)
    profile = PROFILES[args.profile]
    seeds = args.seeds if args.seeds is not None else profile["seeds"]
    from lit_finetune.metrics import FeatureExtractor

    extractor = FeatureExtractor.from_checkpoint(args.extractor)
    half_a, half_b = source_test_halves()
    n = profile["n_eval"]
    floor = score(extractor, half_a[:n], half_b[:n])
    start = time.perf_counter()
    results, first_grids = [], None
    for seed in seeds:
        result, grids = run_seed(seed, profile["epochs"], n, extractor, profile["extra"], Path(args.workdir))
        results.append(result)
        first_grids = first_grids or grids
    minutes = (time.perf_counter() - start) / 60
    setup = (
        f"Profile `{args.profile}`: `configs/dcgan/pretrain.yaml` as shipped (unconditional DCGAN, latent 64, widths 32, "
        f"EMA decay 0.999, batch 128, Fashion-MNIST classes 0-4), {profile['epochs']} epoch(s) = "
        f"{results[0]['g_updates']} generator updates per seed, seeds {seeds}; all variants of a seed come from one run "
        f"(a callback keeps the alternative averages). Scores: {n} samples against {n} source test images (half A) in the "
        f"features of the FID extractor (its hash below), KID subsets of min(500, N); the floor row "
        f"scores half A against the other {n} test images. FID − default: paired by seed (variant minus default; "
        f"positive = worse than the default), Holm-adjusted p of a two-sided paired t-test over the {len(VARIANTS) - 1} "
        f"comparisons. Class columns: the extractor's class of each sample (other: classes 5-9). {minutes:.1f} min in all."
    )
    text = markdown(results, floor, seeds, setup)
    out = Path(args.out)
    run.write(out / "ema_variants.md", text, {"FID extractor": args.extractor},
              data={"results": results, "floor": floor, "seeds": seeds}, config={"profile": args.profile})  # fmt: skip
    plot(first_grids, out / "ema_variants.png")
    print(text)


if __name__ == "__main__":
    main()
