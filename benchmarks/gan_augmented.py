"""GAN-augmented classification: do samples of a class-conditional GAN help a few-shot classifier?

Target: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), relabelled 0-4, seen
through N labelled training images per class. For each N and seed:

1. **Data.** ``FashionMNISTDataModule(samples_per_class=N, val_split=500, seed=seed)``: a class-balanced
   validation set of 100 images per class taken from train first (it depends on the seed, never on N),
   then N training images per class from the rest. Testing uses the full target test split (5,000 images).
2. **Generator.** A class-conditional ``DCGAN`` trained with DiffAugment on those N images per class and no
   other target image. It starts from the unconditional source DCGAN (``--gan-source``, default
   ``zoo:fashion-mnist-0-4/dcgan``: ``configs/dcgan/pretrain.yaml``, classes 0-4; its widths and latent size
   are read from the checkpoint), the label entering at zero weight, as ``configs/augmented/cdcgan_target.yaml``
   does. Every ``snapshot_every`` generator steps its raw and its EMA generator are scored by FID against the
   validation images (as many class-matched samples as validation images) in the penultimate features of the
   *source* classifier (``--pretrained``, default ``zoo:fashion-mnist-0-4/classifier``: it saw no target
   image). The snapshot with the lowest validation FID is the generator of every arm of that (N, seed).
3. **Classifiers, trained to convergence on validation.** Every arm is the same ``GANAugmentedClassifier``
   recipe (``resnet_small``, AdamW LR 3e-3, weight decay 1e-4 but none on norms and biases, ``LRWarmup(10)``,
   label smoothing 0.1, real images shifted and flipped, synthetic ones not augmented,
   ``seed_everything(seed)`` before each arm, the synthetic stream seeded by the seed) with only the
   treatment changed. **Every optimizer step holds B images** (``batch_size``): real only takes B real
   images; real + G at ratio r takes ``b = B / (1 + r)`` real images and ``round(r b)`` class-balanced samples
   of ``G(z, y)`` (``b + round(r b) = B`` is checked), so samples compete with the real images they displace,
   never with a larger batch (the last step of a real epoch holds what the epoch has left, b' real plus
   round(r b') synthetic). **Budget**, in passes over the N real images (*real epochs*): real only gets
   at most ``E(N) = max(1, round(epochs_at_10 * sqrt(10 / N)))`` real epochs (epochs scaled with N: fewer
   passes but more steps as N grows), validation every ``k(N) = max(1, round(E / checks))`` real epochs.
   Lightning's ``EarlyStopping(monitor="val/acc", patience)`` (patience counted in validation checks) ends a
   run once validation accuracy has not risen for ``patience`` checks, and ``ModelCheckpoint(monitor="val/acc",
   mode="max")`` keeps its best state (ties: the earlier; both act on strict improvement), which is the one
   tested. Selection uses the 500 validation images only, never the test split.

   ==================================  ==============================================================================
   real only                           ``synthetic_ratio=0`` (the baseline): B real images per step
   real + G, ratio r, equal steps      (``r<r>@steps``) the real-only arm's step cap and validation steps: the same
                                       optimizer steps between checks and at the cap, the same images per step
                                       (B) and the same patience. It sees ``1 / (1 + r)`` as many real images per
                                       step, so at any step it has made fewer passes over the real data. Question:
                                       are the samples worth more than the real presentations they replace?
   real + G, ratio r, equal epochs     (``r<r>@epochs``) validation after the same number of passes over the real
                                       images, the same cap in passes, the same patience: about ``(1 + r)`` times
                                       the steps of real only (``ceil(5N / b)`` steps per real epoch instead of
                                       ``ceil(5N / B)``), B images per step. Question: do samples add anything on
                                       top of the same exposure to the real images? The extra steps are not an
                                       advantage real only lacked: real only ran until validation stopped
                                       improving (the budget table shows how many runs stopped before the cap).
   ..., filtered                       (``full``) the same, a sample kept only if the teacher (this (N, seed,
                                       init)'s real-only classifier) gives its label probability >= ``THRESHOLD``;
                                       rejected slots are redrawn up to ``FILTER_ROUNDS`` times
   CAS                                 ``synthetic_only=True``: B synthetic images per step and no real image, the
                                       real-only arm's steps (Classification Accuracy Score, Ravuri & Vinyals 2019)
   ==================================  ==============================================================================

   Inits: fine-tuned from the source classifier, and (``full``) scratch. **Ratio chosen on validation**
   (profiles with more than one real + G arm per budget): per (N, seed, init, budget) the real + G arm with the
   best validation accuracy (ties: lower validation loss), reported by its test accuracy. It is a selection
   among arms that are already in the table, not one more arm, so it is not in the verdict's family.
4. **Verdict.** Per (init, N, real + G arm) cell a two-sided paired t-test of the per-seed test-accuracy
   differences to real only (same seed: same real images, validation set, generator and head initialisation;
   ``stats.paired_t_test``; with 5 seeds Wilcoxon's test cannot reach p < 0.05), Holm-corrected over the family
   of all such cells, both budgets together (``stats.holm``, family-wise α = ``ALPHA``); each cell shows its
   worst seed. Every run is listed (test accuracy, best step, steps run).
5. ``benchmarks/results/gan_augmented.md`` (tables, budgets, CAS gaps, acceptance rates, the chosen
   generators, the verdict, every run, provenance), ``gan_augmented.png`` (test accuracy and the paired
   difference to real only against N) and ``gan_augmented.json`` (provenance and every run, for ``--merge``).

Choices (none tuned on test): the classifier recipe is ``transfer_sweep.py``'s full fine-tune. τ =
``THRESHOLD`` = 0.8 because label smoothing 0.1 over 5 classes caps a well-trained teacher's probability near
0.92, so the usual 0.9 would reject nearly everything. What changed from the first version of this benchmark
(issue 12): every arm ran a fixed 80 steps (real only did not rise with N: 88.2 / 89.2 / 87.6 %, under-trained
at N=200), real + G arms added their samples to a full real batch (more images per step, so the value of the
samples could not be told from the bigger batch), and the verdict counted "beyond one std of 3 differences"
over 42 cells including the chosen row, a copy of another arm.

Profiles (``--profile``; sizes of the classifier budget per N are in the results file's budget table):

* ``quick`` (default; one CPU thread, ~30 min): seeds 0-4, N in {10, 50}, the fine-tuned init only, ratio 1
  at both budgets, CAS; B = 30, ``epochs_at_10`` 150, ``checks`` 30, patience 6 (real only: caps of 150 / 67
  real epochs = 300 / 612 steps, validation every 10 / 18 steps); 200 generator steps (batch min(50, 5N))
  with snapshots every 50. No N=200, no scratch init, no other ratio, no filter: they did not fit the
  ~35-minute budget of one thread on a 2-core machine shared with other jobs (a trial with caps of 100
  epochs at N=10 left real only at N=50 still improving at its cap, so the caps grew and N=200 went);
  ``full`` has them.
* ``full``: for one GPU (``--device cuda``): seeds 0-4, N in {10, 50, 200}, both inits, ratios 0.25, 0.5 and 1,
  unfiltered and filtered, each at both budgets, CAS; B = 30, ``epochs_at_10`` 200, ``checks`` 30, patience 8
  (real only: caps of 406 / 810 / 1,564 steps);
  1,000 generator steps with snapshots every 100. Not run yet. From the last measurement on an H200 (~5.5 s
  per classifier run, mostly Lightning's per-run overhead, 18-33 s per generator) and the larger budgets,
  one (N, seed) is about 2 x 14 runs x ~10 s + ~30 s = ~5 min (estimated; N=200 longer): run one N and seed per device
  call (``--shots 10 --seeds 0``, ...; under 8 minutes each) and ``--merge`` the 15 pieces.
* ``tiny``: a few steps of everything on 200 test images: checks the pipeline (the tests run it); its
  numbers mean nothing.

Pieces: ``--seeds`` and ``--shots`` run a subset; ``--merge A.json B.json ...`` builds the one table (same
commit, profile, threads and input sha256, no seed twice, no cell missing). Pieces on other machines must
use the same input files: pass ``--pretrained`` and ``--gan-source`` as paths (copied with the code), not zoo
names that a fresh machine would rebuild with other bytes.

    python benchmarks/gan_augmented.py --threads 1                           # quick profile, CPU
    python benchmarks/gan_augmented.py --seeds 0 1 2 --results /tmp/a        # a piece
    python benchmarks/gan_augmented.py --merge /tmp/a/gan_augmented.json /tmp/b/gan_augmented.json
    python benchmarks/gan_augmented.py --profile full --device cuda --shots 10 --seeds 0 \\
        --pretrained S.ckpt --gan-source G.ckpt                              # one GPU piece
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gan_finetune import quiet_lightning
from transfer_sweep import LABEL_SMOOTHING, LR, WARMUP_STEPS, WEIGHT_DECAY, evaluate, mean_std, row, sample_std
from stats import PairedTest, holm, paired_t_test
from transfer_vs_scratch import machine

import provenance  # noqa: E402  (benchmarks/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
TARGET_CLASSES = [5, 6, 7, 8, 9]
NUM_CLASSES = len(TARGET_CLASSES)
RATIOS = (0.25, 0.5, 1.0)  #: every ratio an arm may use (the DESIGN's grid); a profile runs a subset
BUDGETS = {"steps": "equal steps", "epochs": "equal real epochs"}
THRESHOLD = 0.8  #: τ of the confidence filter (see the module docstring)
FILTER_ROUNDS = 5  #: draws per synthetic slot before the filter leaves it empty
ALPHA = 0.05  #: family-wise error rate of the verdict (Holm)
SOURCE_CLASSIFIER = "zoo:fashion-mnist-0-4/classifier"
SOURCE_DCGAN = "zoo:fashion-mnist-0-4/dcgan"
#: published CAS figures, for orientation (other data, models and budgets)
PUBLISHED = (
    "GaFi reports a CAS gap of 2.03 % on Fashion-MNIST (a classifier trained on its generator's samples "
    "vs one trained on the real training set); Ravuri & Vinyals (2019) found BigGAN-deep's CAS on ImageNet "
    "27.9 % (Top-1) and 41.6 % (Top-5) below the accuracy reached with the real data (at 256×256: 42.65 % vs "
    "73.09 % Top-1), and that naive real + synthetic augmentation helps only in limited circumstances."
)


@dataclass(frozen=True)
class Arm:
    """One treatment: synthetic images per real one (filtered or not) at one budget, or synthetic only."""

    key: str
    label: str
    ratio: float = 0.0
    filtered: bool = False
    cas: bool = False
    budget: str = "steps"  #: "steps": the real-only arm's steps; "epochs": its passes over the real images

    @property
    def augments(self) -> bool:
        """A real + G arm: a member of the verdict's family (and a candidate of the ratio chosen on validation)."""
        return self.ratio > 0 and not self.cas


def augmented_arm(ratio: float, filtered: bool, budget: str) -> Arm:
    key = f"r{ratio:g}{'f' if filtered else ''}@{budget}"
    label = f"real + G, ratio {ratio:g}{', filtered' if filtered else ''}, {BUDGETS[budget]}"
    return Arm(key, label, ratio, filtered, budget=budget)


REAL = Arm("real", "real only")
CAS = Arm("cas", "CAS (G only)", cas=True)
ALL_ARMS: list[Arm] = [
    REAL,
    *(augmented_arm(r, f, b) for b in BUDGETS for f in (False, True) for r in RATIOS),
    CAS,
]
ARM_BY_KEY = {a.key: a for a in ALL_ARMS}
CHOSEN = {b: f"chosen@{b}" for b in BUDGETS}  #: keys of the "ratio chosen on validation" rows
INITS = {"finetuned": "fine-tuned from source", "scratch": "scratch"}


@dataclass(frozen=True)
class Profile:
    seeds: tuple[int, ...]
    shots: tuple[int, ...]
    inits: tuple[str, ...]  #: keys of INITS
    ratios: tuple[float, ...]  #: a subset of RATIOS
    filtered: bool  #: also the confidence-filtered arms
    cas: bool
    batch_size: int  #: B: images per classifier step, real and synthetic together
    epochs_at_10: int  #: real-only cap in real epochs at N=10; E(N) = round(epochs_at_10 * sqrt(10 / N))
    checks: int  #: about this many validation checks fit in the real-only cap
    patience: int  #: EarlyStopping patience, in validation checks
    gan_steps: int  #: generator steps (one discriminator step each)
    snapshot_every: int  #: generator steps between scored snapshots
    gan_batch: int
    gan_width: int = 32  #: widths of a generator started from scratch (``--gan-source none``)
    val_per_class: int = 100
    test_limit: int | None = None  #: first images of the test split only (tiny); None: all 5,000
    threads: int | None = 1  #: torch threads unless ``--threads`` (None: torch's default)

    def arms(self) -> list[Arm]:
        """The arms this profile runs, in table order: real only, real + G per budget, CAS."""
        keep = [REAL]
        keep += [a for a in ALL_ARMS if a.augments and a.ratio in self.ratios and (self.filtered or not a.filtered)]
        return keep + ([CAS] if self.cas else [])


PROFILES = {
    "quick": Profile(
        seeds=(0, 1, 2, 3, 4), shots=(10, 50), inits=("finetuned",), ratios=(1.0,), filtered=False, cas=True,
        batch_size=30, epochs_at_10=150, checks=30, patience=6, gan_steps=200, snapshot_every=50, gan_batch=50,
    ),
    "full": Profile(
        seeds=(0, 1, 2, 3, 4), shots=(10, 50, 200), inits=("finetuned", "scratch"), ratios=RATIOS, filtered=True,
        cas=True, batch_size=30, epochs_at_10=200, checks=30, patience=8, gan_steps=1000, snapshot_every=100,
        gan_batch=50, gan_width=64, threads=None,
    ),
    "tiny": Profile(
        seeds=(0,), shots=(4,), inits=("finetuned", "scratch"), ratios=(1.0,), filtered=True, cas=True,
        batch_size=10, epochs_at_10=4, checks=3, patience=1, gan_steps=4, snapshot_every=2, gan_batch=20,
        gan_width=8, val_per_class=10, test_limit=200,
    ),
}  # fmt: skip


# -- the budget of an arm --------------------------------------------------------------------------------
def real_batch(batch_size: int, ratio: float) -> int:
    """Real images per step of an arm whose steps hold ``batch_size`` images: ``b`` with ``b + round(r b) = B``."""
    b = round(batch_size / (1 + ratio))
    if b < 1 or b + round(ratio * b) != batch_size:
        raise ValueError(
            f"batch_size {batch_size} does not split into b real + round({ratio:g} b) synthetic images; pick a B "
            f"that every ratio divides evenly (30 and 60 do for ratios {', '.join(f'{r:g}' for r in RATIOS)})"
        )
    return b


@dataclass(frozen=True)
class Schedule:
    """How one arm trains at one N: real images per step, validation cadence and cap (both in steps)."""

    real_batch: int
    steps_per_epoch: int  #: steps per pass over the 5N real images: ceil(5N / real_batch)
    val_every: int  #: steps between validation checks
    max_steps: int  #: the cap (a whole number of checks)

    @property
    def max_epochs(self) -> float:
        """The cap in real epochs."""
        return self.max_steps / self.steps_per_epoch

    @property
    def epochs_per_check(self) -> float:
        return self.val_every / self.steps_per_epoch


def real_only_epochs(n: int, profile: Profile) -> tuple[int, int]:
    """(cap, validation interval) of the real-only arm at N, both in real epochs: epochs scaled with N."""
    cap = max(1, round(profile.epochs_at_10 * math.sqrt(10 / n)))
    return cap, max(1, round(cap / profile.checks))


def schedule(arm: Arm, n: int, profile: Profile) -> Schedule:
    """The arm's budget at N. Real only and CAS: ``E(N)`` real epochs (B per step), a check every ``k(N)``
    epochs. ``@steps``: the same cadence and cap in steps. ``@epochs``: the same cadence and cap in real
    epochs (exactly: whole epochs at its own real batch)."""
    cap_epochs, every_epochs = real_only_epochs(n, profile)
    checks = math.ceil(cap_epochs / every_epochs)
    images = n * NUM_CLASSES
    base_spe = math.ceil(images / profile.batch_size)
    b = real_batch(profile.batch_size, arm.ratio) if arm.augments else profile.batch_size
    spe = math.ceil(images / b)
    val_every = every_epochs * (spe if arm.augments and arm.budget == "epochs" else base_spe)
    return Schedule(b, spe, val_every, checks * val_every)


# -- records ---------------------------------------------------------------------------------------------
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
    val_acc: float  #: at the tested (best) checkpoint
    val_loss: float
    steps: int  #: optimizer steps run (fewer than max_steps when early stopping ended the run)
    best_step: int  #: the step of the tested checkpoint
    max_steps: int
    val_every: int
    real_batch: int
    steps_per_epoch: int
    stopped_early: bool
    history: list[tuple[int, float, float]] = field(default_factory=list)  #: (step, val acc, val loss) per check
    acceptance: float | None = None  #: filter: kept / drawn, mean over steps
    filled: float | None = None  #: filter: kept / asked for, mean over steps
    seconds: float = 0.0
    arm: str = ""  #: the arm's key; for a chosen row, the arm that validation picked
    model: Any = field(default=None, repr=False)  #: kept only when asked (tests)

    @property
    def best_epochs(self) -> float:
        """Real epochs done at the tested checkpoint."""
        return self.best_step / self.steps_per_epoch


#: results[N][init][arm key] -> one Run per seed (chosen rows included); selections[N] -> one per seed
Results = dict[int, dict[str, dict[str, list[Run]]]]


# -- the generator ---------------------------------------------------------------------------------------
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


def generator_shape(gan_source: str | None, profile: Profile) -> dict[str, int]:
    """Latent size and widths of the conditional generator: the source DCGAN's (so every weight loads), or
    the profile's for a generator from scratch."""
    if gan_source is None:
        return {"latent_dim": 64, "generator_width": profile.gan_width, "discriminator_width": profile.gan_width}
    hparams = torch.load(gan_source, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    shape = {k: hparams.get(k) for k in ("latent_dim", "generator_width", "discriminator_width")}
    if None in shape.values() or "conditional" not in hparams:
        raise ValueError(f"{gan_source} is not a DCGAN checkpoint (its hyper-parameters lack {shape})")
    if hparams["conditional"]:
        raise ValueError(
            f"{gan_source} is a conditional DCGAN: its labels mean source classes. Pass an unconditional one "
            f"({SOURCE_DCGAN}, configs/dcgan/pretrain.yaml), or --gan-source none."
        )
    return shape


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
        num_classes=NUM_CLASSES, conditional=True, conditioning="projection", loss="nonsaturating",
        diffaugment="color,translation,cutout", ema_decay=0.99, pretrained=gan_source,
        **generator_shape(gan_source, profile),
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


# -- the classifiers -------------------------------------------------------------------------------------
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


class ValidationHistory(Callback):
    """``(step, val/acc, val/loss)`` after every validation run (the record behind early stopping)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            metrics = trainer.callback_metrics
            self.points.append((trainer.global_step, float(metrics["val/acc"]), float(metrics["val/loss"])))


def train_arm(
    arm: Arm, init: str, n: int, dm, generator: torch.nn.Module | None, teacher: torch.nn.Module | None, seed: int,
    profile: Profile, source: str, test: tuple, device: str, keep_model: bool = False,
) -> Run:  # fmt: skip
    """Fit one classifier arm until early stopping (or its cap); test its best state on validation.

    ``dm`` is the (N, seed) datamodule; its real batch size is set to the arm's for the fit.
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    from lit_finetune import GANAugmentedClassifier
    from lit_finetune.callbacks import LRWarmup

    plan = schedule(arm, n, profile)
    dm.batch_size = plan.real_batch
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
    stats, history = FilterStats(), ValidationHistory()
    stop = EarlyStopping(monitor="val/acc", mode="max", patience=profile.patience, check_on_train_epoch_end=False)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gan_augmented_") as tmp:
        best = ModelCheckpoint(
            dirpath=tmp, filename="best", monitor="val/acc", mode="max", save_top_k=1, save_weights_only=True,
            save_on_train_epoch_end=False, enable_version_counter=False,
        )  # fmt: skip
        trainer = L.Trainer(
            accelerator=device, devices=1, max_steps=plan.max_steps, max_epochs=-1,
            val_check_interval=plan.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
            logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[LRWarmup(WARMUP_STEPS), stats, history, stop, best],
            deterministic=True if device == "cpu" else "warn",
        )  # fmt: skip
        trainer.fit(model, datamodule=dm)
        checkpoint = torch.load(best.best_model_path, map_location="cpu", weights_only=False)  # written just now
    model.load_state_dict(checkpoint["state_dict"])
    model.to(torch.device(device))
    steps, stopped = trainer.global_step, stop.stopping_reason is not EarlyStoppingReason.NOT_STOPPED
    if steps > plan.max_steps or (steps < plan.max_steps and not stopped):
        raise RuntimeError(f"{arm.label} ran {steps} steps of a {plan.max_steps}-step cap without early stopping")
    best_step = int(checkpoint["global_step"])
    _, val_acc, val_loss = next(p for p in history.points if p[0] == best_step)
    test_acc = evaluate(model, *test, model.device, chunk=250)[0]
    return Run(
        test_acc, val_acc, val_loss, steps, best_step, plan.max_steps, plan.val_every, plan.real_batch,
        plan.steps_per_epoch, stopped, history.points, stats.mean("synthetic_acceptance"),
        stats.mean("synthetic_filled"), time.perf_counter() - start, arm.key, model if keep_model else None,
    )  # fmt: skip


def chosen_on_validation(runs: dict[str, Run], budget: str) -> Run | None:
    """The real + G arm of ``budget`` with the best validation accuracy (ties: lower validation loss); ``None``
    when there is nothing to choose (fewer than two candidates)."""
    candidates = [r for k, r in runs.items() if k in ARM_BY_KEY and ARM_BY_KEY[k].augments
                  and ARM_BY_KEY[k].budget == budget]  # fmt: skip
    if len(candidates) < 2:
        return None
    return dataclasses.replace(max(candidates, key=lambda r: (r.val_acc, -r.val_loss)), model=None)


def run_cell(
    n: int, seed: int, dm, generator: torch.nn.Module | None, profile: Profile, source: str, test: tuple,
    device: str, arms: Sequence[Arm] | None = None, keep_models: bool = False, log: Callable[[str], None] = print,
) -> dict[str, dict[str, Run]]:  # fmt: skip
    """Every arm of one (N, seed) for each init: ``{init: {arm key: Run}}`` (plus the chosen rows)."""
    arms = profile.arms() if arms is None else arms
    out: dict[str, dict[str, Run]] = {}
    for init in profile.inits:
        runs: dict[str, Run] = {}
        teacher = None
        for arm in arms:
            runs[arm.key] = train_arm(
                arm, init, n, dm, generator, teacher, seed, profile, source, test, device,
                keep_model=keep_models or arm.key == "real",
            )  # fmt: skip
            if arm.key == "real":
                teacher = runs["real"].model  # the filter's teacher: this (N, seed, init)'s real-only classifier
                if not keep_models:
                    runs["real"].model = None
        for budget, key in CHOSEN.items():
            chosen = chosen_on_validation(runs, budget)
            if chosen is not None:
                runs[key] = chosen
        out[init] = runs
        accs = "  ".join(f"{k} {100 * r.test_acc:.1f} ({r.best_step}/{r.steps})" for k, r in runs.items())
        seconds = sum(r.seconds for k, r in runs.items() if k in ARM_BY_KEY)
        log(f"    N={n} seed {seed} {init}: {accs}  ({seconds:.0f} s)")
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
    """Every N x seed: train and select the generator, then every arm for each init."""
    from lit_finetune.metrics import FeatureExtractor

    extractor = FeatureExtractor.from_checkpoint(source).to(device)  # saw classes 0-4 only
    uses_generator = any(a.augments or a.cas for a in profile.arms())
    results: Results = {}
    selections: dict[int, list[Selection]] = {}
    test = None
    for n in profile.shots:
        results[n] = {init: {} for init in profile.inits}
        selections[n] = []
        for seed in profile.seeds:
            dm = target_data(n, seed, profile, profile.batch_size, True, fashion_root)
            if test is None:
                dm.setup("test")
                k = len(dm.test_set) if profile.test_limit is None else min(profile.test_limit, len(dm.test_set))
                test = dm.test_set.__getitems__(range(k))
            generator = None
            if uses_generator:
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
            cell = run_cell(n, seed, dm, generator, profile, source, test, device, keep_models=keep_models, log=log)
            for init, runs in cell.items():
                for key, run in runs.items():
                    results[n][init].setdefault(key, []).append(run)
    return results, selections, test


# -- reporting -------------------------------------------------------------------------------------------
def label(key: str) -> str:
    for budget, chosen in CHOSEN.items():
        if key == chosen:
            return f"real + G, ratio chosen on validation, {BUDGETS[budget]}"
    return ARM_BY_KEY[key].label


def accs(results: Results, n: int, init: str, key: str) -> list[float]:
    return [r.test_acc for r in results[n][init][key]]


def diffs(results: Results, n: int, init: str, key: str, base: str = "real") -> list[float]:
    """Per-seed differences to ``base`` (paired: same seed, same real images, same generator)."""
    return [a - b for a, b in zip(accs(results, n, init, key), accs(results, n, init, base))]


def inits_of(results: Results) -> list[str]:
    first = next(iter(results.values()))
    return [i for i in INITS if first.get(i)]


def keys_of(results: Results) -> list[str]:
    """The rows of the tables, in order: the arms as run, then the chosen rows."""
    first = next(iter(results.values()))
    present = list(first[inits_of(results)[0]])
    return [k for k in present if k in ARM_BY_KEY] + [k for k in present if k not in ARM_BY_KEY]


def family(results: Results) -> list[tuple[str, int, str, PairedTest]]:
    """Every (init, N, real + G arm) cell's paired t-test against real only, over seeds, both budgets. The
    chosen rows are selections among these arms, not arms of their own, and are not in the family."""
    return [
        (init, n, key, paired_t_test(accs(results, n, init, key), accs(results, n, init, "real")))
        for init in inits_of(results)
        for key in keys_of(results)
        if key in ARM_BY_KEY and ARM_BY_KEY[key].augments
        for n in results
    ]


def verdict(results: Results) -> str:
    """Plain sentences and a per-cell table, computed from the numbers: a two-sided paired t-test per cell
    (real + G vs real only, paired by seed) with Holm's correction over the family of cells."""
    cells = family(results)
    if not cells:
        return ""
    adjusted = holm([t.p for _, _, _, t in cells])
    seeds = len(cells[0][3].diffs)
    sentences = []
    for budget, name in BUDGETS.items():
        mine = [(t, q) for (_, _, key, t), q in zip(cells, adjusted) if ARM_BY_KEY[key].budget == budget]
        if not mine:
            continue
        helped = sum(1 for t, q in mine if q <= ALPHA and t.mean > 0)
        hurt = sum(1 for t, q in mine if q <= ALPHA and t.mean < 0)
        worst = min(t.worst for t, _ in mine)
        sentences.append(
            f"at {name}, real + G was significantly better than real only in {helped} of {len(mine)} cells, "
            f"significantly worse in {hurt}, and not distinguishable in {len(mine) - helped - hurt} (mean "
            f"differences {_signed(min(t.mean for t, _ in mine))} to {_signed(max(t.mean for t, _ in mine))} points, "
            f"worst single seed {_signed(worst)})"
        )
    helped_any = sum(1 for (*_, t), q in zip(cells, adjusted) if q <= ALPHA and t.mean > 0)
    hurt_any = sum(1 for (*_, t), q in zip(cells, adjusted) if q <= ALPHA and t.mean < 0)
    summary = (
        "On this evidence GAN augmentation did not help: no cell improved significantly."
        if helped_any == 0
        else "GAN augmentation helped in some cells only (see the table)."
        if hurt_any or helped_any < len(cells) / 2
        else "GAN augmentation helped in most cells."
    )
    lines = [
        (
            f"**Verdict.** Per (init, N, real + G arm) cell, a two-sided paired t-test of the per-seed test-accuracy "
            f"differences to real only ({seeds} seeds, df {seeds - 1}), Holm-corrected over the family of "
            f"{len(cells)} cells, both budgets together (family-wise α = {ALPHA}; a ratio-chosen-on-validation row is "
            f"a selection among these arms, not a member): {'; '.join(sentences)}. {summary}"
        ),
        "",
        "| init | N | arm | difference (points, mean ± std) | worst seed | t | p | Holm p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (init, n, key, t), q in zip(cells, adjusted):
        lines.append(
            row([INITS[init], str(n), label(key), _points(list(t.diffs)), _signed(t.worst), f"{t.t:.2f}",
                 f"{t.p:.3f}", f"{q:.3f}{' *' if q <= ALPHA else ''}"])  # fmt: skip
        )
    return "\n".join(lines)


def fixed_text(profile: Profile) -> str:
    """What each comparison holds fixed, with this profile's numbers."""
    ratios = ", ".join(f"r = {r:g}: {real_batch(profile.batch_size, r)} real + "
                       f"{profile.batch_size - real_batch(profile.batch_size, r)} synthetic" for r in profile.ratios)  # fmt: skip
    return (
        f"**What each comparison holds fixed.** Every arm: the same model, optimizer, LR warm-up, label smoothing, "
        f"real images (and their augmentation), validation set, head initialisation and early-stopping rule "
        f"(stop after {profile.patience} validation checks without a rise in validation accuracy; test the best "
        f"checkpoint on validation), and {profile.batch_size} images per optimizer step ({ratios}; the last step of "
        f"a real epoch holds what the epoch has left). **Equal steps** holds the real-only arm's step cap and "
        f"validation steps: the real + G arm makes as many optimizer steps on as many images per step, but "
        f"1/(1 + r) as many real-image presentations, so at any step it has made fewer passes over the real "
        f"data: it asks whether samples are worth more than the real presentations they replace. **Equal real "
        f"epochs** holds the passes over the real images at each check and at the cap: the real + G arm makes "
        f"about (1 + r) times the steps (and sees every real image as often as real only does, plus the "
        f"samples): it asks whether samples add anything on top of the same exposure to the real data. Its "
        f"extra steps are no advantage real only was denied: real only trains until validation stops improving "
        f"(the budget table says how many runs stopped before their cap). CAS trains on {profile.batch_size} "
        f"samples per step and no real image, with the real-only arm's steps."
    )


def budget_table(results: Results) -> list[str]:
    """Per (init, N, arm): images per step, validation cadence and cap, and what the runs did."""
    lines = [
        "Budgets and convergence (per arm and N, over seeds): real + synthetic images per step; validation every "
        "… steps (real epochs); the cap; steps run (mean, min-max); the tested step (mean, in real epochs); runs "
        "that early stopping ended before the cap.",
        "",
        "| init | N | arm | images per step | validation every | cap | steps run | best step | stopped early |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for init in inits_of(results):
        for n in results:
            for key in keys_of(results):
                if key not in ARM_BY_KEY:
                    continue
                runs = results[n][init][key]
                r0, arm = runs[0], ARM_BY_KEY[key]
                b = r0.real_batch
                per_step = f"0 + {b}" if arm.cas else f"{b} + {round(arm.ratio * b)}"
                steps = [r.steps for r in runs]
                lines.append(row([
                    INITS[init], str(n), label(key), per_step,
                    f"{r0.val_every} ({r0.val_every / r0.steps_per_epoch:.3g} ep)",
                    f"{r0.max_steps} ({r0.max_steps / r0.steps_per_epoch:.3g} ep)",
                    f"{statistics.mean(steps):.0f} ({min(steps)}-{max(steps)})",
                    f"{statistics.mean(r.best_step for r in runs):.0f} "
                    f"({statistics.mean(r.best_epochs for r in runs):.3g} ep)",
                    f"{sum(r.stopped_early for r in runs)} of {len(runs)}",
                ]))  # fmt: skip
    return lines


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
    inits, keys = inits_of(results), keys_of(results)
    seeds = len(results[shots[0]][inits[0]]["real"])
    lines = [
        (
            f"Target test accuracy (%) on Fashion-MNIST classes 5-9 (5,000 test images unless the setup says "
            f"otherwise), mean ± std over {seeds} seed(s); N = real labelled images per class; every run trained "
            f"until early stopping on validation and was tested at its best validation checkpoint."
        ),
        "",
        *_head(["init", "arm"], shots),
    ]
    for init in inits:
        for key in keys:
            lines.append(row([INITS[init], label(key), *(mean_std(accs(results, n, init, key)) for n in shots)]))
    lines += ["", verdict(results), "", fixed_text(profile), "", *budget_table(results)]
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
            *_head(["init", "arm"], shots, " accepted / filled"),
        ]
        for init in inits:
            for key in filtered:
                cells = []
                for n in shots:
                    runs = results[n][init][key]
                    acc = statistics.mean(r.acceptance for r in runs if r.acceptance is not None)
                    fill = statistics.mean(r.filled for r in runs if r.filled is not None)
                    cells.append(f"{100 * acc:.0f} / {100 * fill:.0f}")
                lines.append(row([INITS[init], label(key), *cells]))
    if "cas" in keys:
        lines += [
            "",
            "CAS gap = real-only accuracy − CAS accuracy (points, mean ± std of the per-seed gaps). " + PUBLISHED,
            "",
            *_head(["init"], shots),
        ]
        for init in inits:
            gaps = (_points([-d for d in diffs(results, n, init, "cas")]) for n in shots)
            lines.append(row([INITS[init], *gaps]))
    chosen_keys = [k for k in keys if k not in ARM_BY_KEY]
    if chosen_keys:
        lines += ["", "Difference of the ratio-chosen-on-validation rows to real only (points, paired by seed; "
                  "not in the verdict's family: each is a selection among the arms above):", "",
                  *_head(["init", "row"], shots)]  # fmt: skip
        for init in inits:
            for key in chosen_keys:
                lines.append(row([INITS[init], label(key), *(_points(diffs(results, n, init, key)) for n in shots)]))
        for key in chosen_keys:
            counts = []
            for n in shots:
                picked = [r.arm for init in inits for r in results[n][init][key]]
                counts.append(", ".join(f"{_short(k)} ×{picked.count(k)}" for k in dict.fromkeys(picked)))
            lines += ["", f"Arms picked for '{label(key)}' (over seeds and inits): "
                      + "; ".join(f"N={n}: {c}" for n, c in zip(shots, counts)) + "."]  # fmt: skip
    if any(selections.values()):
        lines += [
            "",
            (
                "Generator of each (N, seed), chosen on validation FID (lower is better; validation images vs as "
                "many class-matched samples, in the source classifier's features): the chosen snapshot, and the "
                "last raw and EMA snapshots for comparison."
            ),
            "",
            "| N | seed | chosen | val FID | last raw | last EMA |",
            "|---|---|---|---|---|---|",
        ]
        for n, sels in selections.items():
            for seed, sel in zip(profile.seeds, sels):
                last = {s.ema: s.fid for s in sel.snapshots if s.step == sel.generator_steps}
                lines.append(
                    f"| {n} | {seed} | {'EMA' if sel.chosen.ema else 'raw'}, step {sel.chosen.step} "
                    f"| {sel.chosen.fid:.1f} | {last.get(False, math.nan):.1f} | {last.get(True, math.nan):.1f} |"
                )
    lines += ["", setup, "", "<details><summary>Every run: test accuracy % (tested step / steps run) per seed "
              f"{list(profile.seeds)}</summary>", "", "| init | N | arm | per seed |", "|---|---|---|---|"]  # fmt: skip
    for init in inits:
        for n in shots:
            for key in keys:
                runs = results[n][init][key]
                values = ", ".join(f"{100 * r.test_acc:.1f} ({r.best_step}/{r.steps})" for r in runs)
                lines.append(row([INITS[init], str(n), label(key), values]))
    lines += ["", "</details>"]
    return "\n".join(lines) + "\n"


def figure(results: Results, path: Path) -> None:
    """Per init: test accuracy against N (one line per arm), and the per-seed differences to real only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots, inits, keys = list(results), inits_of(results), keys_of(results)
    fig, axes = plt.subplots(len(inits), 2, figsize=(12, 4.4 * len(inits)), squeeze=False)
    fixed = {"real": "black", "cas": "#c44e52"}

    def style(key: str) -> dict[str, Any]:
        arm = ARM_BY_KEY.get(key)
        if arm is None:  # a chosen row
            return {"color": "#55a868", "ls": ":" if key.endswith("epochs") else "-.", "lw": 1.6}
        if key in fixed:
            return {"color": fixed[key], "ls": "-", "lw": 2.2}
        shade = 0.45 + 0.5 * RATIOS.index(arm.ratio) / len(RATIOS)
        maps = {(False, "steps"): plt.cm.Blues, (False, "epochs"): plt.cm.Purples,
                (True, "steps"): plt.cm.Oranges, (True, "epochs"): plt.cm.Reds}  # fmt: skip
        color = maps[arm.filtered, arm.budget](shade)
        return {"color": color, "ls": "--" if arm.budget == "epochs" else "-", "lw": 1.4}

    for (acc_ax, diff_ax), init in zip(axes, inits):
        for i, key in enumerate(keys):
            jitter = [n * 1.03 ** (i - (len(keys) - 1) / 2) for n in shots]
            means = [100 * statistics.mean(accs(results, n, init, key)) for n in shots]
            stds = [100 * sample_std(accs(results, n, init, key)) for n in shots]
            acc_ax.errorbar(jitter, means, yerr=stds, marker="o", ms=4, capsize=3, label=label(key), **style(key))
            if key == "real" or key == "cas":
                continue
            d = [[100 * x for x in diffs(results, n, init, key)] for n in shots]
            diff_ax.plot(jitter, [statistics.mean(x) for x in d], marker="o", ms=4, label=label(key), **style(key))
            for xj, values in zip(jitter, d):
                diff_ax.scatter([xj] * len(values), values, s=9, color=style(key)["color"], alpha=0.6)
        diff_ax.axhline(0, color="black", lw=1)
        for ax, ylabel in ((acc_ax, "target test accuracy (%)"), (diff_ax, "real + G − real only (points; dots: seeds)")):
            ax.set_xscale("log")
            ax.set_xticks(shots, [str(n) for n in shots])
            ax.minorticks_off()
            ax.set_xlabel("real labelled images per class (N)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"classifier {INITS[init]}", fontsize=10)
            ax.grid(alpha=0.3)
        acc_ax.legend(fontsize=7, loc="lower right")
        diff_ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Fashion-MNIST 5-9: real only vs real + class-conditional DCGAN samples (early stopping on "
                 "validation; solid: equal steps, dashed: equal real epochs)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------------------
def resolve(source: str | None, role: str) -> str | None:
    """A zoo name's file (built on first use), a path as it is, ``None`` for "none"."""
    if source is None or str(source).lower() == "none":
        return None
    from lit_finetune.zoo import resolve_source

    path = resolve_source(str(source), role=role)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{role}: {source} is not a file")
    return str(Path(path).resolve())


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="profile", help="= --profile tiny")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--pretrained", default=SOURCE_CLASSIFIER,
                        help="source classifier (classes 0-4): fine-tuned init and the FID extractor; zoo name or path")
    parser.add_argument("--gan-source", default=SOURCE_DCGAN,
                        help="unconditional source DCGAN the generators start from (zoo name, path, or none)")
    parser.add_argument("--seeds", type=int, nargs="+", help="a subset of seeds (a piece)")
    parser.add_argument("--shots", type=int, nargs="+", help="a subset of N, images per class (a piece)")
    parser.add_argument("--threads", type=int, help="torch threads (default: the profile's; recorded)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PIECE_JSON",
                        help="merge pieces' gan_augmented.json (same commit, profile, threads, inputs) into one table")
    parser.add_argument("--fashion-root", help="folder with the Fashion-MNIST IDX files (default: Debian's copy)")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")  # fmt: skip
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")
    return args


def main(argv: Sequence[str] | None = None, keep_models: bool = False) -> tuple[Results, dict[int, list[Selection]]]:
    """Run the benchmark and write its results; returns them too (``keep_models``: with every
    classifier, for tests)."""
    run = provenance.Run.start(__file__, argv)
    args = parse(argv)
    if args.merge:
        return merge_main(args.merge, args.results, run)
    profile = PROFILES[args.profile]
    if args.seeds:
        profile = dataclasses.replace(profile, seeds=tuple(args.seeds))
    if args.shots:
        profile = dataclasses.replace(profile, shots=tuple(args.shots))
    if args.threads:
        profile = dataclasses.replace(profile, threads=args.threads)
    for arm in profile.arms():  # a bad batch size fails now, not after the first generator
        for n in profile.shots:
            schedule(arm, n, profile)
    quiet_lightning()
    if profile.threads:
        torch.set_num_threads(profile.threads)
    start, cpu_start = time.perf_counter(), time.process_time()

    def log(text: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {text}", flush=True)

    source = resolve(args.pretrained, "source classifier (--pretrained)")
    gan_source = resolve(args.gan_source, "source DCGAN (--gan-source)")
    log(f"source classifier {source}; source DCGAN {gan_source}")
    results, selections, test = run_all(
        profile, source, args.device, args.fashion_root, log, keep_models, gan_source=gan_source
    )

    wall, cpu = (time.perf_counter() - start) / 60, (time.process_time() - cpu_start) / 60
    where = machine()
    if args.device == "cuda":
        where = where.replace("CPU only", f"GPU {torch.cuda.get_device_name()}")
    shape = generator_shape(gan_source, profile)
    per_n = "; ".join(
        f"N={n}: cap {real_only_epochs(n, profile)[0]} real epochs = {schedule(REAL, n, profile).max_steps} steps, "
        f"validation every {real_only_epochs(n, profile)[1]} epoch(s) = {schedule(REAL, n, profile).val_every} steps"
        for n in profile.shots
    )  # fmt: skip
    setup = (
        f"Setup (profile `{args.profile}`): seeds {list(profile.seeds)}, N in {list(profile.shots)}, inits "
        f"{', '.join(INITS[i] for i in profile.inits)}, ratios {', '.join(f'{r:g}' for r in profile.ratios)}"
        f"{' (unfiltered and filtered)' if profile.filtered else ' (no confidence filter)'}"
        f"{', CAS' if profile.cas else ''}. Source classifier `resnet_small` on Fashion-MNIST classes 0-4: "
        f"`{args.pretrained}`. Per (N, seed): a class-conditional DCGAN (latent {shape['latent_dim']}, widths "
        f"{shape['generator_width']}/{shape['discriminator_width']}, projection D, DiffAugment, EMA 0.99) trained "
        f"on the same N images per class and no other target image, from the unconditional source DCGAN "
        f"`{args.gan_source}` with the label entering at zero weight, {profile.gan_steps} generator steps of batch "
        f"min({profile.gan_batch}, 5N), raw and EMA generator scored every {profile.snapshot_every} steps by FID "
        f"against the {profile.val_per_class} validation images per class (taken from train, the same for every N "
        f"of a seed) in the source classifier's features; the lowest is used. Classifiers: `resnet_small`, "
        f"{profile.batch_size} images per step, AdamW LR {LR:g}, weight decay {WEIGHT_DECAY:g}, warm-up "
        f"{WARMUP_STEPS} steps, label smoothing {LABEL_SMOOTHING}; real only: {per_n}; EarlyStopping on val/acc "
        f"with patience {profile.patience} checks, ModelCheckpoint on val/acc (best state tested) on "
        f"{len(test[1]):,} target test images. Measured on {where}, {torch.get_num_threads()} torch thread(s); "
        f"{wall:.1f} min wall, {cpu:.1f} min CPU time of this process (other jobs shared the machine; load average "
        f"in the provenance). Command: `{run.command}`."
    )
    text = markdown(results, selections, profile, setup)
    config = {"profile": args.profile, "device": args.device, **provenance.settings(profile, "seeds", "shots")}
    data = {"results": results, "selections": selections, "seeds": list(profile.seeds), "setup": setup}
    run.write(args.results / "gan_augmented.md", text, {"source classifier": source, "source DCGAN": gan_source},
              data=data, config=config)  # fmt: skip
    figure(results, args.results / "gan_augmented.png")
    print("\n" + text + f"\nwrote {args.results / 'gan_augmented.md'}, .json and .png", flush=True)
    return results, selections


def runs_from_json(tree: dict[str, Any]) -> Results:
    """``results`` of a piece's JSON back into :class:`Run` objects (N as int, history as tuples)."""
    def run(r: dict[str, Any]) -> Run:
        return Run(**{**r, "history": [tuple(p) for p in r["history"]], "model": None})

    return {int(n): {init: {key: [run(r) for r in runs] for key, runs in arms.items()} for init, arms in inits.items()}
            for n, inits in sorted(tree.items(), key=lambda item: int(item[0]))}  # fmt: skip


def merge_main(paths: list[Path], out: Path, run: provenance.Run) -> tuple[Results, dict[int, list[Selection]]]:
    """``--merge``: one table from pieces (other seeds or N) of one profile; where each ran goes into the text."""
    pieces, summary = provenance.merge_pieces(paths, run=run)
    trees = [{"results": p["results"], "selections": p["selections"]} for p in pieces]
    tree, seeds = provenance.merge_seed_lists(trees, [p["seeds"] for p in pieces])
    results = runs_from_json(tree["results"])
    selections = {
        int(n): [
            Selection(**{**s, "snapshots": [Snapshot(**x) for x in s["snapshots"]], "chosen": Snapshot(**s["chosen"])})
            for s in sels
        ]
        for n, sels in sorted(tree["selections"].items(), key=lambda item: int(item[0]))
    }  # fmt: skip
    config = summary["config"]
    profile = dataclasses.replace(
        PROFILES[config["profile"]], seeds=tuple(seeds), shots=tuple(results), threads=config["threads"]
    )
    text = markdown(results, selections, profile, provenance.merged_setup(summary, pieces))
    data = {"results": results, "selections": selections, "seeds": seeds, "setup": provenance.merged_setup(summary, pieces)}
    inputs = {name: entry["path"] for name, entry in summary["pieces"][0]["inputs"].items()}  # the same in every piece
    run.write(out / "gan_augmented.md", text, inputs, data=data, config=config, pieces=summary["pieces"])
    figure(results, out / "gan_augmented.png")
    print("\n" + text + f"\nwrote {out / 'gan_augmented.md'}, .json and .png", flush=True)
    return results, selections


if __name__ == "__main__":
    main()
