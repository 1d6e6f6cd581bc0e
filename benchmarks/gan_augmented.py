"""GAN-augmented classification, measured fairly: does adding samples of a class-conditional GAN help?

Target: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), relabelled 0-4, seen
through N in {10, 50, 200} labelled training images per class. For each N and seed:

1. **Data.** ``FashionMNISTDataModule(samples_per_class=N, val_split=500, seed=seed)``: a class-balanced
   validation set of 100 images per class taken from train first (it depends on the seed, never on N),
   then N training images per class from the rest. Testing uses the full target test split (5,000 images).
2. **Generator.** A class-conditional ``DCGAN`` trained with DiffAugment on those N images per class
   and no other target image. It starts from an unconditional DCGAN pretrained on the source classes 0-4
   (``configs/dcgan/pretrain.yaml``, cached in the work dir), the label entering at zero weight, as
   ``configs/augmented/cdcgan_target.yaml`` does (``gan_source_epochs=0``: from scratch, which on so few
   images drew nearly one image per class). Every ``snapshot_every`` generator steps its raw and its EMA generator
   are scored by FID against the validation images (as many class-matched samples as validation images),
   in the penultimate features of the *source* classifier (trained on classes 0-4 only, so the extractor
   saw no target image). The snapshot with the lowest validation FID is the generator of every arm of
   that (N, seed); the test split plays no part in choosing it.
3. **Classifiers.** For both inits (fine-tuned from the source classifier, and scratch), the same
   ``GANAugmentedClassifier`` recipe with only the treatment changed (``ARMS``):

   ===========================  ==================================================================
   real only                    ``synthetic_ratio=0`` (the baseline)
   real + G, ratio r            ``round(r * B)`` class-balanced samples of ``G(z, y)`` added to every
                                batch of ``B`` real images, r in {0.25, 0.5, 1}
   real + G, ratio r, filtered  the same, a sample kept only if the teacher (this (N, seed, init)'s
                                real-only classifier) gives its label probability >= ``THRESHOLD``;
                                rejected slots are redrawn up to ``FILTER_ROUNDS`` times
   CAS                          ``synthetic_only=True``: B synthetic images per step, no real image
                                (Classification Accuracy Score, Ravuri & Vinyals 2019)
   ===========================  ==================================================================

   Held fixed: model (``resnet_small``), AdamW (LR 3e-3, weight decay 1e-4; none on norms and biases),
   ``LRWarmup(10)``, label smoothing 0.1, the real batch size, real-image augmentation (2-pixel shifts
   and flips; synthetic images are not augmented), the optimizer steps (checked after each run), the
   real images and their order, the head's initialisation (``seed_everything(seed)`` before each arm)
   and the synthetic stream's seed. Each run is scored on the validation set at ``evals`` evenly spaced
   steps and its best state (ties: lower validation loss) is tested, ``transfer_sweep.py``'s rule.
   **Ratio chosen on validation**: per (N, seed, init), the real + G arm (ratio and filter) with the best
   validation accuracy (ties: lower validation loss), reported by its test accuracy. It is a best of six
   runs against the single real-only run, so run-to-run noise alone favours it; the md says so.
4. ``benchmarks/results/gan_augmented.md`` (tables, CAS gaps, acceptance rates, the chosen generators,
   the published figures, a verdict computed from the numbers: per (init, N, real + G arm) cell a two-sided
   paired t-test against real only over the seeds (``stats.paired_t_test``; with 5 seeds Wilcoxon's test
   cannot reach p < 0.0625), Holm-corrected over the family of those cells (``stats.holm``), the worst seed
   of each cell shown; the "ratio chosen on validation" row repeats one of the arms and is not counted) and ``gan_augmented.png`` (test accuracy
   against N per arm, one panel per init).

Choices (none tuned on test): the classifier recipe is ``transfer_sweep.py``'s full fine-tune, fixed
before any run, and so is its selection rule: a first quick run that tested each run's final state
instead gave seed spreads of up to ±15 points (e.g. real-only N=200 from 61 to 84 %), so the project's
checkpoint selection on validation replaced it, for every arm alike, before the run reported here. The
GAN is ``configs/augmented/cdcgan_target.yaml``'s (latent 64, projection discriminator, non-saturating
loss, DiffAugment color/translation/cutout, EMA 0.99, Adam 2e-4). τ = ``THRESHOLD`` = 0.8 because label
smoothing 0.1 over 5 classes caps a well-trained teacher's probability near 0.92, so the usual 0.9
would reject nearly everything.

Profiles (``--profile``):

* ``quick`` (default): source classifier 2 epochs of ``pretrain_source.yaml`` (cached in the work dir
  and reused by later runs), a 2-epoch unconditional source DCGAN (cached too), seeds 0-4, batch 25 real
  images, 80 classifier steps per arm with 5 validation points, 200 GAN steps with snapshots every 50,
  1 torch thread (2 threads ran ~10x slower with other jobs on the 2 cores). Measured: 24.3 min wall
  (source classifier and source DCGAN ~2 min, ~17 s per GAN, ~8.5 s per arm run) at a load average of
  0.3 to 1.0, with 3 seeds; 5 seeds: ~2 + 15 x 2.6 min = ~40 min (estimated). A first version with 35 classifier steps (18.6 min) left the real-only classifiers
  under-trained (75-83 % instead of 88-89 %) with seed spreads up to ±13 points; 80 steps replaced it.
* ``full``: for one GPU (``--device cuda``): source 5 epochs, batch 50, 200 classifier steps, 1,000
  GAN steps (widths 64) with snapshots every 100, seeds 0-4, torch's default threads. Estimated, not
  measured (no GPU here), for an H200 where small steps cost Python/Lightning overhead (~5-10 ms):
  ~0.5 min source + 9 x ~15 s GANs + 144 x ~2 s arms = ~7-8 min; ``--seeds 0 1 2 3 4`` for more.
  Measured on one H200 (torch 2.11, 2026-11-26): that estimate was wrong. The run was stopped at its
  7.8-minute limit after N=10 and one arm pair of N=50 (log: ``results/gan_augmented_full_h200_partial.log``):
  0.4 min source classifier, 1.5 min source DCGAN, 18-33 s per generator, 40-50 s per (N, seed, init),
  i.e. ~5.5 s per classifier arm, Lightning's per-run overhead more than the GPU work. The whole
  profile needs about 25 minutes on that GPU.
* ``tiny``: a few steps of everything on 200 test images: checks the pipeline (the test runs it);
  its numbers mean nothing.

    python benchmarks/gan_augmented.py                                   # quick profile, CPU
    python benchmarks/gan_augmented.py --profile full --device cuda      # on a GPU
    python benchmarks/gan_augmented.py --pretrained S.ckpt               # a given source classifier
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gan_finetune import pretrain_source as pretrain_gan_source
from gan_finetune import quiet_lightning
from transfer_sweep import (
    LABEL_SMOOTHING,
    LR,
    WARMUP_STEPS,
    WEIGHT_DECAY,
    SelectOnValidation,
    eval_steps,
    evaluate,
    mean_std,
    pretrain,
    row,
    sample_std,
)  # fmt: skip
from stats import PairedTest, holm, paired_t_test
from transfer_vs_scratch import machine

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
TARGET_CLASSES = [5, 6, 7, 8, 9]
NUM_CLASSES = len(TARGET_CLASSES)
RATIOS = (0.25, 0.5, 1.0)
THRESHOLD = 0.8  #: τ of the confidence filter (see the module docstring)
FILTER_ROUNDS = 5  #: draws per synthetic slot before the filter leaves it empty
#: published CAS figures, for orientation (other data, models and budgets)
PUBLISHED = (
    "GaFi reports a CAS gap of 2.03 % on Fashion-MNIST (a classifier trained on its generator's samples "
    "vs one trained on the real training set); Ravuri & Vinyals (2019) found BigGAN-deep's CAS on ImageNet "
    "27.9 % (Top-1) and 41.6 % (Top-5) below the accuracy reached with the real data (at 256×256: 42.65 % vs "
    "73.09 % Top-1), and that naive real + synthetic augmentation helps only in limited circumstances."
)


@dataclass(frozen=True)
class Arm:
    """One treatment: how many synthetic images per real one, filtered or not, or synthetic only."""

    key: str
    label: str
    ratio: float = 0.0
    filtered: bool = False
    cas: bool = False

    @property
    def augments(self) -> bool:
        """A real + G arm (a candidate of the ratio chosen on validation)."""
        return self.ratio > 0 and not self.cas


ARMS: list[Arm] = [
    Arm("real", "real only"),
    *(Arm(f"r{r:g}", f"real + G, ratio {r:g}", r) for r in RATIOS),
    *(Arm(f"r{r:g}f", f"real + G, ratio {r:g}, filtered", r, filtered=True) for r in RATIOS),
    Arm("cas", "CAS (G only)", cas=True),
]
ARM_BY_KEY = {a.key: a for a in ARMS}
CHOSEN = "chosen"  #: key of the "ratio chosen on validation" row
INITS = {"finetuned": "fine-tuned from source", "scratch": "scratch"}


@dataclass(frozen=True)
class Profile:
    seeds: tuple[int, ...]
    shots: tuple[int, ...]
    batch_size: int  #: real images per classifier step
    steps: int  #: optimizer steps of every classifier arm
    gan_steps: int  #: generator steps (one discriminator step each)
    snapshot_every: int  #: generator steps between scored snapshots
    gan_width: int
    gan_batch: int
    pretrain_epochs: int
    evals: int  #: validation points per classifier run (evenly spaced steps, the last included)
    gan_source_epochs: int = 0  #: epochs of the unconditional source DCGAN (0: the generator starts from scratch)
    gan_source_batches: int | None = None  #: batches per source epoch (None: all; tiny only)
    val_per_class: int = 100
    test_limit: int | None = None  #: first images of the test split only (tiny); None: all 5,000
    threads: int | None = 1  #: torch threads (None: torch's default)


PROFILES = {
    "quick": Profile(
        seeds=(0, 1, 2, 3, 4), shots=(10, 50, 200), batch_size=25, steps=80, gan_steps=200, snapshot_every=50,
        gan_width=32, gan_batch=50, pretrain_epochs=2, evals=5, gan_source_epochs=2,
    ),
    "full": Profile(
        seeds=(0, 1, 2, 3, 4), shots=(10, 50, 200), batch_size=50, steps=200, gan_steps=1000, snapshot_every=100,
        gan_width=64, gan_batch=50, pretrain_epochs=5, evals=10, threads=None, gan_source_epochs=10,
    ),
    "tiny": Profile(
        seeds=(0,), shots=(4,), batch_size=10, steps=3, gan_steps=4, snapshot_every=2, gan_width=8, gan_batch=20,
        pretrain_epochs=0, evals=2, val_per_class=10, test_limit=200,
        gan_source_epochs=1, gan_source_batches=2,
    ),
}  # fmt: skip


@dataclass
class Snapshot:
    step: int  #: generator steps done
    ema: bool
    fid: float  #: against the validation images, in the source classifier's features


@dataclass
class Selection:
    """The generator of one (N, seed): every scored snapshot and the chosen one."""

    snapshots: list[Snapshot]
    chosen: Snapshot
    generator_steps: int
    seconds: float


@dataclass
class Run:
    """What one (N, seed, init, arm) classifier run measured."""

    test_acc: float
    val_acc: float
    val_loss: float
    steps: int
    chosen_step: int = 0  #: the step whose state was tested (best validation accuracy)
    acceptance: float | None = None  #: filter: kept / drawn, mean over steps
    filled: float | None = None  #: filter: kept / asked for, mean over steps
    seconds: float = 0.0
    arm: str = ""  #: for the chosen row: the arm that validation picked
    model: Any = field(default=None, repr=False)  #: kept only when asked (tests)


#: results[N][init][arm key] -> one Run per seed (CHOSEN included); selections[N] -> one per seed
Results = dict[int, dict[str, dict[str, list[Run]]]]


# -- the generator -----------------------------------------------------------------------------------
class SnapshotSelector(Callback):
    """Every ``every`` generator steps, score the raw and the EMA generator by FID against the
    validation images (fixed noise, the validation labels) and keep a copy of the best one."""

    def __init__(self, every: int, val: tuple[torch.Tensor, torch.Tensor], metrics, seed: int) -> None:
        self.every, self.val, self.metrics, self.seed = every, val, metrics, seed
        self.snapshots: list[Snapshot] = []
        self.best: tuple[Snapshot, torch.nn.Module] | None = None
        self.steps = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1  # one generator step per batch (n_critic = 1)
        if self.steps % self.every == 0:
            for ema in (False, True):
                self.score(pl_module.generator_network(ema), ema, pl_module.device)

    @torch.no_grad()
    def score(self, net: torch.nn.Module, ema: bool, device: torch.device) -> None:
        was_training = net.training
        net.eval()  # the raw generator too: BatchNorm with its running statistics, as it will sample
        x, y = self.val
        noise = torch.Generator(device=device).manual_seed(self.seed)  # the same z at every snapshot
        fake = net(torch.randn(len(y), net.latent_dim, generator=noise, device=device), y.to(device))
        net.train(was_training)
        self.metrics.reset()
        self.metrics.update(real=x.to(device), fake=fake)
        snap = Snapshot(self.steps, ema, float(self.metrics.compute()["fid"]))
        self.snapshots.append(snap)
        if self.best is None or snap.fid < self.best[0].fid:
            self.best = (snap, copy.deepcopy(net).eval().requires_grad_(False))


def train_generator(
    dm, val: tuple[torch.Tensor, torch.Tensor], extractor, profile: Profile, seed: int, device: str,
    gan_source: str | None = None,
) -> tuple[torch.nn.Module, Selection]:  # fmt: skip
    """A conditional DCGAN on ``dm``'s training images, from the unconditional ``gan_source`` (or from
    scratch); the snapshot with the lowest validation FID, and the record of the selection."""
    import lightning as L

    from lit_finetune import DCGAN
    from lit_finetune.metrics import GenerativeMetrics

    L.seed_everything(seed, verbose=False)
    gan = DCGAN(
        latent_dim=64, num_classes=NUM_CLASSES, conditional=True, generator_width=profile.gan_width,
        discriminator_width=profile.gan_width, conditioning="projection", loss="nonsaturating",
        diffaugment="color,translation,cutout", ema_decay=0.99, pretrained=gan_source,
    )  # fmt: skip
    metrics = GenerativeMetrics(extractor, kid_subset_size=max(2, min(1000, len(val[1])))).to(device)
    selector = SnapshotSelector(profile.snapshot_every, val, metrics, seed)
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=2 * profile.gan_steps, max_epochs=-1,  # G and D steps
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[selector],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(gan, datamodule=dm)
    if selector.best is None:
        raise RuntimeError(f"no snapshot scored: gan_steps={profile.gan_steps} < snapshot_every")
    chosen, net = selector.best
    return net, Selection(selector.snapshots, chosen, selector.steps, time.perf_counter() - start)


# -- the classifiers ---------------------------------------------------------------------------------
class FilterStats(Callback):
    """The confidence filter's per-step ``train/synthetic_acceptance`` and ``train/synthetic_filled``."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {"synthetic_acceptance": [], "synthetic_filled": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for name, values in self.values.items():
            value = trainer.callback_metrics.get(f"train/{name}")
            if value is not None:
                values.append(float(value))

    def mean(self, name: str) -> float | None:
        values = self.values[name]
        return statistics.mean(values) if values else None


def train_arm(
    arm: Arm, init: str, dm, generator: torch.nn.Module, teacher: torch.nn.Module | None, seed: int,
    profile: Profile, source: str, val: tuple, test: tuple, device: str, keep_model: bool = False,
) -> Run:  # fmt: skip
    """Fit one classifier arm for ``profile.steps`` steps; test its best state on validation."""
    import lightning as L

    from lit_finetune import GANAugmentedClassifier
    from lit_finetune.callbacks import LRWarmup

    L.seed_everything(seed, verbose=False)
    model = GANAugmentedClassifier(
        num_classes=NUM_CLASSES,
        generator=generator if arm.ratio > 0 or arm.cas else None,
        synthetic_ratio=arm.ratio,
        synthetic_only=arm.cas,
        teacher=teacher if arm.filtered else None,
        confidence_threshold=THRESHOLD,
        filter_max_rounds=FILTER_ROUNDS,
        synthetic_seed=seed,
        pretrained=source if init == "finetuned" else None,
        label_smoothing=LABEL_SMOOTHING,
        optimizer=partial(torch.optim.AdamW, lr=LR, weight_decay=WEIGHT_DECAY),
    )
    stats = FilterStats()
    select = SelectOnValidation(eval_steps(profile.steps, profile.evals), {"val": val})
    trainer = L.Trainer(
        accelerator=device, devices=1, max_steps=profile.steps, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[LRWarmup(WARMUP_STEPS), stats, select],
        deterministic=True if device == "cpu" else "warn",
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    if trainer.global_step != profile.steps or select.batches != profile.steps:
        raise RuntimeError(
            f"{arm.label} ran {trainer.global_step} steps / {select.batches} batches, not {profile.steps}"
        )
    val_acc, neg_val_loss, step = select.best["val"]
    model.load_state_dict(select.states[step])
    model.to(torch.device(device))
    test_acc = evaluate(model, *test, model.device, chunk=250)[0]
    return Run(
        test_acc, val_acc, -neg_val_loss, trainer.global_step, step, stats.mean("synthetic_acceptance"),
        stats.mean("synthetic_filled"), time.perf_counter() - start, arm.key, model if keep_model else None,
    )  # fmt: skip


def chosen_on_validation(runs: dict[str, Run]) -> Run:
    """The real + G arm with the best validation accuracy (ties: lower validation loss)."""
    best = max((r for k, r in runs.items() if ARM_BY_KEY[k].augments), key=lambda r: (r.val_acc, -r.val_loss))
    return dataclasses.replace(best, model=None)


def run_cell(
    n: int, seed: int, dm, generator: torch.nn.Module, profile: Profile, source: str, val: tuple, test: tuple,
    device: str, arms: Sequence[Arm] = ARMS, keep_models: bool = False, log: Callable[[str], None] = print,
) -> dict[str, dict[str, Run]]:  # fmt: skip
    """Every arm of one (N, seed) for both inits: ``{init: {arm key: Run}}`` (plus the chosen row)."""
    out: dict[str, dict[str, Run]] = {}
    for init in INITS:
        runs: dict[str, Run] = {}
        teacher = None
        for arm in arms:
            runs[arm.key] = train_arm(
                arm, init, dm, generator, teacher, seed, profile, source, val, test, device,
                keep_model=keep_models or arm.key == "real",
            )  # fmt: skip
            if arm.key == "real":
                teacher = runs["real"].model  # the filter's teacher: this (N, seed, init)'s real-only classifier
                if not keep_models:
                    runs["real"].model = None
        if any(a.augments for a in arms):
            runs[CHOSEN] = chosen_on_validation(runs)
        out[init] = runs
        accs = "  ".join(f"{k} {100 * r.test_acc:.1f}" for k, r in runs.items())
        log(f"    N={n} seed {seed} {init}: {accs}  ({sum(r.seconds for k, r in runs.items() if k != CHOSEN):.0f} s)")
    return out


def target_data(n: int, seed: int, profile: Profile, batch_size: int, augment: bool, root: str | None):
    from lit_finetune.data import FashionMNISTDataModule

    dm = FashionMNISTDataModule(
        **({"root": root} if root else {}), classes=TARGET_CLASSES, samples_per_class=n,
        val_split=profile.val_per_class * NUM_CLASSES, batch_size=batch_size, augment=augment, seed=seed,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def run_all(
    profile: Profile, source: str, device: str = "cpu", fashion_root: str | None = None,
    log: Callable[[str], None] = print, keep_models: bool = False, gan_source: str | None = None,
) -> tuple[Results, dict[int, list[Selection]], tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Every N x seed: train and select the generator, then every arm for both inits."""
    from lit_finetune.metrics import FeatureExtractor

    extractor = FeatureExtractor.from_checkpoint(source).to(device)  # saw classes 0-4 only
    results: Results = {}
    selections: dict[int, list[Selection]] = {}
    test = None
    for n in profile.shots:
        results[n] = {init: {} for init in INITS}
        selections[n] = []
        for seed in profile.seeds:
            dm = target_data(n, seed, profile, profile.batch_size, True, fashion_root)
            if test is None:
                dm.setup("test")
                k = len(dm.test_set) if profile.test_limit is None else min(profile.test_limit, len(dm.test_set))
                test = dm.test_set.__getitems__(range(k))
            val = dm.val_set.__getitems__(range(len(dm.val_set)))
            gan_dm = target_data(n, seed, profile, min(profile.gan_batch, n * NUM_CLASSES), False, fashion_root)
            assert torch.equal(gan_dm.train_set.images, dm.train_set.images)  # the GAN sees the same N images
            generator, selection = train_generator(gan_dm, val, extractor, profile, seed, device, gan_source)
            selections[n].append(selection)
            chosen = selection.chosen
            log(
                f"  N={n} seed {seed}: generator {'EMA' if chosen.ema else 'raw'} at step {chosen.step}, "
                f"val FID {chosen.fid:.1f} ({selection.seconds:.0f} s)"
            )
            cell = run_cell(
                n, seed, dm, generator, profile, source, val, test, device, keep_models=keep_models, log=log
            )
            for init, runs in cell.items():
                for key, run in runs.items():
                    results[n][init].setdefault(key, []).append(run)
    return results, selections, test


# -- reporting ---------------------------------------------------------------------------------------
def label(key: str) -> str:
    return "real + G, ratio chosen on validation" if key == CHOSEN else ARM_BY_KEY[key].label


def accs(results: Results, n: int, init: str, key: str) -> list[float]:
    return [r.test_acc for r in results[n][init][key]]


def diffs(results: Results, n: int, init: str, key: str, base: str = "real") -> list[float]:
    """Per-seed differences to ``base`` (paired: same seed, same real images, same generator)."""
    return [a - b for a, b in zip(accs(results, n, init, key), accs(results, n, init, base))]


ALPHA = 0.05  #: family-wise error rate of the verdict (Holm)


def family(results: Results) -> list[tuple[str, int, str, PairedTest]]:
    """Every (init, N, real + G arm) cell's paired t-test against real only, over seeds. The family of
    the verdict: the "ratio chosen on validation" row duplicates one of these arms and is not in it."""
    return [
        (init, n, key, paired_t_test(accs(results, n, init, key), accs(results, n, init, "real")))
        for init in INITS
        for n in results
        for key in results[n][init]
        if key in ARM_BY_KEY and ARM_BY_KEY[key].augments
    ]


def verdict(results: Results) -> str:
    """Plain sentences and a per-cell table, computed from the numbers: a two-sided paired t-test per cell
    (real + G vs real only, paired by seed) with Holm's correction over the family of cells."""
    cells = family(results)
    if not cells:
        return ""
    adjusted = holm([t.p for _, _, _, t in cells])
    helped = sum(1 for (*_, t), q in zip(cells, adjusted) if q <= ALPHA and t.mean > 0)
    hurt = sum(1 for (*_, t), q in zip(cells, adjusted) if q <= ALPHA and t.mean < 0)
    seeds = len(cells[0][3].diffs)
    lines = [
        (
            f"Verdict: per (init, N, real + G arm) cell, a two-sided paired t-test of the per-seed differences to "
            f"real only ({seeds} seeds, df {seeds - 1}), Holm-corrected over the family of {len(cells)} cells "
            f"(family-wise α = {ALPHA}; the ratio-chosen-on-validation row repeats one of these arms and is not "
            f"counted). Augmentation helped significantly in {helped}, hurt significantly in {hurt}, and was not "
            f"distinguishable from real only in {len(cells) - helped - hurt}: "
            + (
                "on this evidence GAN augmentation did not help."
                if helped == 0
                else "it helped in some cells only (see the table)."
                if hurt or helped < len(cells) / 2
                else "it helped in most cells."
            )
        ),
        "",
        "| init | N | arm | difference (points) | worst seed | t | p | Holm p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (init, n, key, t), q in zip(cells, adjusted):
        lines.append(
            row([INITS[init], str(n), label(key), _points(list(t.diffs)), _signed(t.worst), f"{t.t:.2f}",
                 f"{t.p:.3f}", f"{q:.3f}{' *' if q <= ALPHA else ''}"])  # fmt: skip
        )
    return "\n".join(lines)


def _short(key: str) -> str:
    arm = ARM_BY_KEY[key]
    return f"ratio {arm.ratio:g}{' filtered' if arm.filtered else ''}"


def _signed(value: float) -> str:
    return f"{100 * value:+.1f}"


def _points(d: list[float]) -> str:
    return f"{_signed(statistics.mean(d))} ± {100 * sample_std(d):.1f}"


def _head(columns: list[str], shots: list[int], suffix: str = "") -> list[str]:
    """A table's header and separator: ``columns`` then one column per N."""
    cells = [*columns, *(f"N={n}{suffix}" for n in shots)]
    return [row(cells), "|" + "---|" * len(cells)]


def markdown(results: Results, selections: dict[int, list[Selection]], profile: Profile, setup: str) -> str:
    shots = list(results)
    inits = [i for i in INITS if results[shots[0]][i]]
    keys = list(results[shots[0]][inits[0]])
    seeds = len(results[shots[0]][inits[0]]["real"])
    lines = [
        (
            f"Target test accuracy (%) on Fashion-MNIST classes 5-9, mean ± std over {seeds} seed(s); N = real "
            "labelled images per class; every arm of a cell ran the same optimizer steps on the same real batches."
        ),
        "",
        *_head(["init", "arm"], shots),
    ]
    for init in inits:
        for key in keys:
            lines.append(row([INITS[init], label(key), *(mean_std(accs(results, n, init, key)) for n in shots)]))
    lines += [
        "",
        "Difference to real only (points; mean ± std of the per-seed differences, paired by seed):",
        "",
        *_head(["init", "arm"], shots),
    ]
    for init in inits:
        for key in keys:
            if key != "real":
                lines.append(row([INITS[init], label(key), *(_points(diffs(results, n, init, key)) for n in shots)]))
    filtered = [k for k in keys if k in ARM_BY_KEY and ARM_BY_KEY[k].filtered]
    if filtered:
        lines += [
            "",
            (
                f"Confidence filter (τ = {THRESHOLD}, up to {FILTER_ROUNDS} draws per slot; teacher = the real-only "
                "classifier of the same N, seed and init): acceptance = kept / drawn, filled = kept / asked for, "
                "mean over steps and seeds (%)."
            ),
            "",
            *_head(["init", "ratio"], shots, " accepted / filled"),
        ]
        for init in inits:
            for key in filtered:
                cells = []
                for n in shots:
                    runs = results[n][init][key]
                    acc = statistics.mean(r.acceptance for r in runs if r.acceptance is not None)
                    fill = statistics.mean(r.filled for r in runs if r.filled is not None)
                    cells.append(f"{100 * acc:.0f} / {100 * fill:.0f}")
                lines.append(row([INITS[init], f"{ARM_BY_KEY[key].ratio:g}", *cells]))
    if "cas" in keys:
        lines += [
            "",
            "CAS gap = real-only accuracy − CAS accuracy (points, paired by seed). " + PUBLISHED,
            "",
            *_head(["init"], shots),
        ]
        for init in inits:
            gaps = (_points([-d for d in diffs(results, n, init, "cas")]) for n in shots)
            lines.append(row([INITS[init], *gaps]))
    if CHOSEN in keys:
        counts = []
        for n in shots:
            picked = [r.arm for init in inits for r in results[n][init][CHOSEN]]
            counts.append(", ".join(f"{_short(k)} ×{picked.count(k)}" for k in dict.fromkeys(picked)))
        lines += ["", "Arms chosen on validation (over seeds and inits): "
                  + "; ".join(f"N={n}: {c}" for n, c in zip(shots, counts)) + ". The chosen row is the best "
                  "of six runs on validation against one real-only run: run-to-run noise alone lifts it, so "
                  "read it with the per-arm rows. A real + G step also trains on more images than a real-only "
                  "step (same real batch, plus the synthetic ones)."]  # fmt: skip
    lines += [
        "",
        (
            "Generator of each (N, seed), chosen on validation FID (lower is better; validation images vs as many "
            "class-matched samples, in the source classifier's features): the chosen snapshot, and the last raw "
            "and EMA snapshots for comparison."
        ),
        "",
        "| N | seed | chosen | val FID | last raw | last EMA |",
        "|---|---|---|---|---|---|",
    ]
    for n, sels in selections.items():
        for seed, sel in zip(profile.seeds, sels):
            last = {s.ema: s.fid for s in sel.snapshots if s.step == sel.generator_steps}
            lines.append(
                f"| {n} | {seed} | {'EMA' if sel.chosen.ema else 'raw'}, step {sel.chosen.step} | {sel.chosen.fid:.1f} "
                f"| {last.get(False, math.nan):.1f} | {last.get(True, math.nan):.1f} |"
            )
    lines += ["", verdict(results), "", setup, "", "<details><summary>per seed (test accuracy %)</summary>", "",
              "| init | N | arm | per seed |", "|---|---|---|---|"]  # fmt: skip
    for init in inits:
        for n in shots:
            for key in keys:
                values = ", ".join(f"{100 * a:.1f}" for a in accs(results, n, init, key))
                lines.append(row([INITS[init], str(n), label(key), values]))
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def figure(results: Results, path: Path) -> None:
    """Test accuracy against N, one line per arm, one panel per init."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = list(results)
    inits = [i for i in INITS if results[shots[0]][i]]
    fig, axes = plt.subplots(1, len(inits), figsize=(6 * len(inits), 4.6), squeeze=False, sharey=True)
    keys = list(results[shots[0]][inits[0]])
    colors = {"real": "black", "cas": "#c44e52", CHOSEN: "#55a868"}
    for ax, init in zip(axes[0], inits):
        for i, key in enumerate(keys):
            arm = ARM_BY_KEY.get(key)
            color = colors.get(key) or plt.cm.Blues(0.45 + 0.5 * RATIOS.index(arm.ratio) / len(RATIOS))
            if arm is not None and arm.filtered:
                color = plt.cm.Oranges(0.45 + 0.5 * RATIOS.index(arm.ratio) / len(RATIOS))
            jitter = [n * 1.03 ** (i - (len(keys) - 1) / 2) for n in shots]
            means = [100 * statistics.mean(accs(results, n, init, key)) for n in shots]
            stds = [100 * sample_std(accs(results, n, init, key)) for n in shots]
            style = "--" if key == CHOSEN else "-"
            ax.errorbar(jitter, means, yerr=stds, marker="o", ms=4, capsize=3, ls=style, color=color, label=label(key),
                        lw=2.2 if key in colors else 1.2)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(shots, [str(n) for n in shots])
        ax.minorticks_off()
        ax.set_xlabel("real labelled images per class (N)")
        ax.set_title(f"classifier {INITS[init]}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("target test accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Fashion-MNIST 5-9: real only vs real + class-conditional DCGAN samples", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------------
def cached_or_trained(
    cached: Path, what: str, name: str, train: Callable[[], str | Path], log: Callable[[str], None]
) -> tuple[str, str]:
    """``cached`` if an earlier run wrote it, else ``train()`` now (timed): the checkpoint and a note for the md."""
    if cached.is_file():
        log(f"{name}: reusing {cached}")
        return str(cached.resolve()), f"{what} (cached from an earlier run, not timed here)"
    log(f"pretraining the {name} on classes 0-4: {what}")
    start = time.perf_counter()
    path = train()
    return str(path), f"{what} ({(time.perf_counter() - start) / 60:.1f} min, in this run)"


def source_classifier(args, profile: Profile, device: str, log: Callable[[str], None]) -> tuple[str, str]:
    """The source classifier (classes 0-4): given, cached in the work dir, or pretrained now (and cached)."""
    if args.pretrained:
        return str(args.pretrained), f"given checkpoint `{Path(args.pretrained).name}`"
    workdir = args.workdir / f"source_{profile.pretrain_epochs}ep"
    return cached_or_trained(
        workdir / "source/runs/classifier/pretrain_source/checkpoints/best.ckpt",  # where pretrain() writes
        f"{profile.pretrain_epochs} epoch(s) of `pretrain_source.yaml`",
        "source classifier",
        lambda: pretrain(workdir, profile.pretrain_epochs, "gpu" if device == "cuda" else "cpu", args.fashion_root),
        log,
    )


def source_generator(args, profile: Profile, device: str, log: Callable[[str], None]) -> tuple[str | None, str]:
    """The unconditional source DCGAN (classes 0-4), cached in the work dir; ``None`` for a scratch generator."""
    if profile.gan_source_epochs == 0:
        return None, "none: the conditional generator starts from scratch"
    epochs, width = profile.gan_source_epochs, profile.gan_width
    workdir = args.workdir / f"dcgan_source_w{width}_{epochs}ep"
    extra = ["--model.init_args.conditional", "false", "--model.init_args.generator_width", str(width),
             "--model.init_args.discriminator_width", str(width), "--trainer.logger", "false",
             "--trainer.accelerator", "gpu" if device == "cuda" else "cpu"]  # fmt: skip
    if args.fashion_root:
        extra += ["--data.init_args.root", str(args.fashion_root)]
    if profile.gan_source_batches:
        extra += ["--trainer.limit_train_batches", str(profile.gan_source_batches), "--trainer.limit_val_batches", "0"]
    return cached_or_trained(
        workdir / "runs/dcgan/pretrain/checkpoints/last.ckpt",  # where pretrain_gan_source() writes
        f"{epochs} epoch(s) of `configs/dcgan/pretrain.yaml` (unconditional, widths {width})",
        "source DCGAN",
        lambda: pretrain_gan_source(workdir, epochs, extra),
        log,
    )


def main(argv: Sequence[str] | None = None, keep_models: bool = False) -> tuple[Results, dict[int, list[Selection]]]:
    """Run the benchmark and write its results; returns them too (``keep_models``: with every
    classifier, for tests)."""
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="profile", help="= --profile tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pretrained", type=Path, help="source classifier checkpoint (skips the pretraining)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument("--shots", type=int, nargs="+", help="override the profile's N (images per class)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PIECE_JSON",
                        help="merge pieces' gan_augmented.json (same commit, profile, inputs) into one table")
    parser.add_argument("--fashion-root", help="folder with the Fashion-MNIST IDX files (default: Debian's copy)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "gan_augmented")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.merge:
        return merge_main(args.merge, args.results, run)
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))
    if args.shots:
        profile = dataclasses.replace(profile, shots=tuple(args.shots))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")
    quiet_lightning()
    if profile.threads:
        torch.set_num_threads(profile.threads)
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), os.getloadavg()[0]

    def log(text: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {text}", flush=True)

    source, source_note = source_classifier(args, profile, args.device, log)
    gan_source, gan_source_note = source_generator(args, profile, args.device, log)
    results, selections, test = run_all(
        profile, source, args.device, args.fashion_root, log, keep_models, gan_source=gan_source
    )

    wall, cpu = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    where = machine()
    if args.device == "cuda":
        where = where.replace("CPU only", f"GPU {torch.cuda.get_device_name()}")
    threads = torch.get_num_threads()
    sel = next(iter(selections.values()))[0]
    setup = (
        f"Setup (profile `{args.profile}`): source classifier `resnet_small` on Fashion-MNIST classes 0-4, "
        f"{source_note}. Per N and seed {list(profile.seeds)}: a class-conditional DCGAN (latent 64, widths "
        f"{profile.gan_width}, projection D, DiffAugment, EMA 0.99) trained on the same N images per class and "
        f"no other target image, starting from an unconditional source DCGAN trained on classes 0-4 with the "
        f"label entering at zero weight (source DCGAN: {gan_source_note}), {profile.gan_steps} generator steps of batch min({profile.gan_batch}, 5N), raw and EMA "
        f"generator scored every {profile.snapshot_every} steps ({len(sel.snapshots)} "
        f"snapshots) by FID against the {profile.val_per_class} validation images per class (taken from train, "
        "the same for every N of a seed) in the source classifier's features; the lowest is used. Classifiers: "
        f"`resnet_small`, {profile.steps} optimizer steps per arm, {profile.batch_size} real images per step "
        f"(+ round(ratio × {profile.batch_size}) synthetic), AdamW LR {LR:g}, weight decay {WEIGHT_DECAY:g}, "
        f"warm-up {WARMUP_STEPS} steps, label smoothing {LABEL_SMOOTHING}, real images shifted/flipped; "
        f"each run's state with the best validation accuracy at {profile.evals} evenly spaced steps (ties: lower "
        f"validation loss; transfer_sweep.py's rule) tested on {len(test[1]):,} target test images. "
        f"Measured on {where}, {threads} torch thread(s); {wall:.1f} min wall, {cpu:.1f} min CPU time of this "
        f"process; 1-minute load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end (other jobs "
        f"shared the machine). Command: `python benchmarks/gan_augmented.py --profile {args.profile}"
        f"{' --device cuda' if args.device == 'cuda' else ''}`."
    )
    text = markdown(results, selections, profile, setup)
    config = {"profile": args.profile, "device": args.device, **provenance.settings(profile, "seeds", "shots")}
    run.write(args.results / "gan_augmented.md", text, {"source classifier": source, "source DCGAN": gan_source},
              data={"results": results, "selections": selections, "seeds": list(profile.seeds), "setup": setup},
              config=config)  # fmt: skip
    figure(results, args.results / "gan_augmented.png")
    print("\n" + text + f"\nwrote {args.results / 'gan_augmented.md'} and gan_augmented.png", flush=True)
    return results, selections


def merge_main(paths: list[Path], out: Path, run: provenance.Run) -> tuple[Results, dict[int, list[Selection]]]:
    """``--merge``: one table from pieces (other seeds or N) of one profile; where each ran goes into the text."""
    pieces, summary = provenance.merge_pieces(paths)
    trees = [{"results": p["results"], "selections": p["selections"]} for p in pieces]
    tree, seeds = provenance.merge_seed_lists(trees, [p["seeds"] for p in pieces])
    order = sorted(tree["results"], key=int)
    results: Results = {
        int(n): {init: {key: [Run(**{**r, "model": None}) for r in runs] for key, runs in arms.items()}
                 for init, arms in tree["results"][n].items()}
        for n in order
    }  # fmt: skip
    selections = {
        int(n): [
            Selection(**{**s, "snapshots": [Snapshot(**x) for x in s["snapshots"]], "chosen": Snapshot(**s["chosen"])})
            for s in tree["selections"][n]
        ]
        for n in order
    }  # fmt: skip
    profile = dataclasses.replace(PROFILES[summary["config"]["profile"]], seeds=tuple(seeds), shots=tuple(results))
    setup = provenance.merged_setup(summary, pieces)
    text = markdown(results, selections, profile, setup)
    run.write(out / "gan_augmented.md", text, data={"results": results, "selections": selections, "seeds": seeds,
              "setup": setup}, config=summary["config"], pieces=summary["pieces"])  # fmt: skip
    figure(results, out / "gan_augmented.png")
    print("\n" + text + f"\nwrote {out / 'gan_augmented.md'} and gan_augmented.png", flush=True)
    return results, selections


if __name__ == "__main__":
    main()
