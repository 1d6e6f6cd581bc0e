"""GAN fine-tuning on the embedded default: scratch vs TransferGAN vs FreezeD, each with and without DiffAugment.

1. Train the FID/KID feature extractor (``configs/metrics/feature_extractor.yaml``), unless ``--extractor``.
2. Pretrain a class-conditional source DCGAN on Fashion-MNIST classes 0-4 (``configs/dcgan/pretrain.yaml``
   with ``conditional: true``), unless ``--source``.
3. For each seed and arm, fit on the few-shot target (classes 5-9, 20 images per class, 100 in all:
   the data of ``configs/dcgan/finetune.yaml``) and test the EMA generator on the full target test
   split (5,000 images, one class-matched sample per real image): FID, KID (with its std over KID
   subsets), the extractor's count of generated samples per class, and label agreement (how often the
   extractor assigns a sample the label it was generated for); the same test with the raw generator.
4. The real-vs-real floor of the same extractor (``real_floor``): the target test images against as
   many class-matched real target *training* images (the arms' sample sizes), and two disjoint
   class-stratified halves of the test images (half the sample size, which shows FID's sample-size bias).
5. Write ``benchmarks/results/gan_finetune.md`` (tables; FID paired by seed over a fixed family of 9 comparisons,
   :data:`MAIN_COMPARISONS`, Holm's correction over them) and ``gan_finetune.png`` (one sample grid per
   arm for the first seed, and FID bars with the std over seeds).

Arms (every one from the shipped configs, only the treatment changes):

* ``scratch``: ``finetune.yaml`` with ``pretrained: null`` (random G and D);
* ``TransferGAN``: ``finetune.yaml`` (G and D initialised from the source, all trained);
* ``FreezeD``: ``finetune_freezed.yaml`` (as TransferGAN, ``discriminator.blocks.0`` frozen);
* each ``+ DiffAugment`` (color, translation, cutout; the configs' default) and without it
  (``diffaugment: ""``).

Few-shot regularisers (``--fewshot``; writes ``benchmarks/results/gan_fewshot.md`` + ``.png`` + ``.json``):
CDC (``finetune_cdc.yaml``: cross-domain distance consistency and the anchor-based patch discriminator,
Ojha et al. 2021) and EWC on G (``finetune_ewc.yaml``, Li et al. 2020) against TransferGAN and FreezeD, all
four with DiffAugment, at ``--images`` 10 and 100 target images (2 and 20 per class), from the given
``--source`` and ``--extractor``. Besides FID/KID, the intra-cluster diversity of the samples around the
training images (``lit_finetune.metrics.diversity``; the real test images' value beside it), since few-shot
GANs fail by memorising. Each regulariser against each baseline at each N: paired by seed, two-sided paired
t-tests, Holm's correction over that family (per metric). ``--merge`` joins pieces of other seeds.

Recipe choices (fixed before looking at any result, never chosen on test):

* Same budget: every arm runs the same number of generator steps (one D step per G step,
  ``n_critic: 1``), batch 50 (the config's), the same nets (latent 64, widths 32, conditional),
  Adam(2e-4, betas 0.5/0.999) and EMA decay 0.99 from the configs. The final EMA generator is tested; no
  checkpoint is picked, so validation is switched off (``limit_val_batches: 0``) to save time.
* Seed ``s`` seeds everything (``seed_everything``) and picks the 20 images per class
  (``data.seed``); within a seed, all arms see the same 100 images. 5 seeds: 3 understated the spread.
* Reproducible: the torch thread count is fixed (``--threads``, default 1) and recorded, because CPU
  kernels sum in a thread-dependent order and a GAN amplifies the rounding (two runs of the same seed that
  differed only in thread count moved FID by up to 23). With the same threads and seed a rerun gives the
  same FID (``tests/test_benchmarks_gan.py``).
* FID is biased upward at finite sample size (the bias falls roughly as 1/n; Chong & Forsyth 2020), so
  FIDs are compared only at equal numbers of real and fake images, and the real-vs-real floor is
  measured at the same sizes. KID is unbiased; it is shown with its std over KID subsets.
* The source generator is conditional on 5 labels (classes 0-4), the target's on 5 labels
  (classes 5-9): all weights load, the label embedding is re-purposed by fine-tuning.
* FID in this feature space (an in-project Fashion-MNIST classifier's penultimate layer) is
  comparable only inside this project, and only at equal sample sizes (5,000 real, 5,000 fake here).

Profiles:

* ``quick`` (default): extractor 2 epochs, source 3 epochs, 300 generator steps per arm, seeds 0-4.
  Timings below are from the 3-seed version; 5 seeds and the floor add 12 x ~47 s + ~30 s: ~41 min (estimated).
  Planned from measured step times on a 2-core AMD EPYC with 1 torch thread (other jobs running):
  extractor ~0.54 s per batch of 128 (430 batches/epoch), source GAN ~0.37 s per batch of 128 (230/epoch),
  target GAN ~0.15 s per batch of 50, testing an arm ~20-25 s (10,000 extractor forwards): about
  8 + 4 + 18 x (45 + 25 s) = ~33 min under that load, less on an idle machine. Measured: 30.7 min
  (16.7 extractor + source, 14.0 for the 18 arm runs) with three other benchmarks running (load average 7-8).
* ``full``: extractor 10 epochs, source 20 epochs, 2,000 generator steps per arm, seeds 0-4: sized for a
  GPU (not run for the README table).
* ``smoke``: a few batches of everything, one seed: checks the pipeline, its numbers mean nothing.

    OMP_NUM_THREADS=1 python benchmarks/gan_finetune.py                    # quick profile, 1 thread
    python benchmarks/gan_finetune.py --profile full                      # on a GPU
    python benchmarks/gan_finetune.py --extractor E.ckpt --source S.ckpt  # reuse trained ones
    python benchmarks/gan_finetune.py --fewshot --extractor E.ckpt --source S.ckpt --seeds 0 1 2 --no-raw-generator
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer_vs_scratch import QUIET, machine, working_dir  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
from stats import PairedTest, comparison_family, holm, paired_t_test, paired_table  # noqa: E402
CONFIGS = REPO / "configs"
#: extractor class names, short (Fashion-MNIST ids 0-9)
SHORT_NAMES = ("top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
TARGET_CLASSES = (5, 6, 7, 8, 9)
PROFILES = {
    "quick": dict(extractor_epochs=2, source_epochs=3, steps=300, seeds=[0, 1, 2, 3, 4]),
    "full": dict(extractor_epochs=10, source_epochs=20, steps=2000, seeds=[0, 1, 2, 3, 4]),
    # the pipeline end to end in a minute or two; its numbers mean nothing
    "smoke": dict(
        extractor_epochs=1, source_epochs=1, steps=5, seeds=[0],
        extractor_args=["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2"],
        source_args=["--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "1"],
        arm_args=["--trainer.limit_test_batches", "4"],
    ),  # fmt: skip
}
#: images per sample grid row (one row per target class)
GRID_COLUMNS = 8
#: the intra-cluster diversity the DCGAN logs at test (``test/<key>``)
DIVERSITY_KEYS = ("intra_cluster_distance", "clusters_occupied", "intra_cluster_distance_real", "clusters_occupied_real")


@dataclass(frozen=True)
class Arm:
    """One treatment: a shipped config, whether it starts from the source, DiffAugment on or off."""

    name: str
    config: str
    pretrained: bool
    diffaugment: bool
    overrides: tuple[str, ...] = ()  # command-line overrides of the config (an ablation's switches)

    @property
    def key(self) -> str:
        return self.name.lower().replace(" + ", "_").replace(" ", "_")

    @property
    def freezed(self) -> bool:
        return self.config == "finetune_freezed.yaml"

    @property
    def cdc(self) -> bool:
        return self.config == "finetune_cdc.yaml"


ARMS = [
    Arm(f"{base}{' + DiffAugment' if aug else ''}", config, pretrained, aug)
    for base, config, pretrained in (
        ("scratch", "finetune.yaml", False),
        ("TransferGAN", "finetune.yaml", True),
        ("FreezeD", "finetune_freezed.yaml", True),
    )
    for aug in (False, True)
]
#: few-shot regularisers beyond FreezeD, each from its shipped config (DiffAugment on, as the configs)
REGULARISER_ARMS = [
    Arm("CDC + DiffAugment", "finetune_cdc.yaml", True, True),
    Arm("EWC + DiffAugment", "finetune_ewc.yaml", True, True),
]
#: CDC's two parts alone (``--arms``): which of them does what
CDC_ABLATION_ARMS = [
    Arm("CDC loss only + DiffAugment", "finetune_cdc.yaml", True, True, ("--model.init_args.cdc_patch_block", "null")),
    Arm("CDC patch D only + DiffAugment", "finetune_cdc.yaml", True, True, ("--model.init_args.cdc_weight", "0")),
]
ALL_ARMS = ARMS + REGULARISER_ARMS + CDC_ABLATION_ARMS
#: ``--fewshot``: the regularisers against the two baselines they must beat, at 10 and 100 target images
FEWSHOT_ARMS = [next(a for a in ARMS if a.name == n) for n in ("TransferGAN + DiffAugment", "FreezeD + DiffAugment")]
FEWSHOT_ARMS += REGULARISER_ARMS
FEWSHOT_BASELINES = ("TransferGAN + DiffAugment", "FreezeD + DiffAugment")
FEWSHOT_IMAGES = (10, 100)


@dataclass
class ArmResult:
    """What one (arm, seed) run measured."""

    fid: float
    kid_mean: float
    kid_std: float
    label_agreement: float
    class_counts: list[float]
    generator_steps: int
    discriminator_steps: int
    block0_equals_source: bool  # discriminator.blocks.0 equals the source's after fitting (FreezeD: must hold)
    fit_seconds: float
    test_seconds: float
    diffaugment_on: bool = False  # the fitted module really augmented (not the identity)
    samples: torch.Tensor | None = field(default=None, repr=False)
    fid_raw_generator: float | None = None  # the same test with the raw generator instead of its EMA
    images: int = 100  # target training images (all classes)
    # intra-cluster diversity around the training images (lit_finetune.metrics.diversity); None: not measured
    intra_cluster_distance: float | None = None
    clusters_occupied: float | None = None
    intra_cluster_distance_real: float | None = None  # the real test images around the same training images
    clusters_occupied_real: float | None = None
    regulariser: float | None = None  # the last logged train/cdc or train/ewc (the term was on)


def quiet_lightning() -> None:
    warnings.filterwarnings("ignore")
    import lightning.pytorch  # noqa: F401  (sets its own log level on import; quiet it afterwards)

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def train_extractor(workdir: Path, epochs: int, extra: list[str] = ()) -> tuple[Path, float]:
    """Fit the shipped extractor config for ``epochs``; return its best checkpoint and validation accuracy."""
    from lit_finetune.cli import cli_main

    with working_dir(workdir):
        cli = cli_main(
            ["fit", "--config", str(CONFIGS / "metrics/feature_extractor.yaml"), *QUIET,
             "--trainer.max_epochs", str(epochs), "--model.init_args.lr_scheduler.init_args.T_max", str(epochs), *extra]
        )  # fmt: skip
        best = cli.trainer.checkpoint_callback.best_model_score
        return (Path.cwd() / "runs/metrics/feature_extractor/checkpoints/best.ckpt").resolve(), float(best)


def pretrain_source(workdir: Path, epochs: int, extra: list[str] = ()) -> Path:
    """Fit the shipped source config as a conditional DCGAN (labels 0-4 = classes 0-4); return ``last.ckpt``."""
    from lit_finetune.cli import cli_main

    with working_dir(workdir):
        cli_main(
            ["fit", "--config", str(CONFIGS / "dcgan/pretrain.yaml"), *QUIET, "--model.init_args.conditional", "true",
             "--trainer.max_epochs", str(epochs), *extra]
        )  # fmt: skip
        return (Path.cwd() / "runs/dcgan/pretrain/checkpoints/last.ckpt").resolve()


def optimizer_steps(optimizer: torch.optim.Optimizer) -> int:
    """Updates an Adam optimizer applied: its ``step`` count on the last parameter it updated."""
    counts = [int(state["step"]) for state in optimizer.state.values() if "step" in state]
    return max(counts, default=0)


def draw_grid(model, num_classes: int, seed: int = 1234) -> torch.Tensor:
    """``num_classes x GRID_COLUMNS`` EMA samples, one row per label, from fixed noise."""
    labels = torch.arange(num_classes).repeat_interleave(GRID_COLUMNS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model.sample(len(labels), labels.to(model.device)).cpu()


def run_arm(
    arm: Arm, seed: int, source: Path, extractor: Path, steps: int, workdir: Path,
    extra: list[str] = (), keep_samples: bool = False, images: int = 100, raw_generator: bool = True,
) -> ArmResult:  # fmt: skip
    """Fit ``arm`` for ``steps`` generator steps on ``images`` target images, then test its EMA generator
    (and, with ``raw_generator``, the raw one)."""
    from lit_finetune.cli import cli_main

    if images % len(TARGET_CLASSES):
        raise ValueError(f"images must be a multiple of {len(TARGET_CLASSES)} (one share per class), got {images}")
    args = [
        "--config", str(CONFIGS / "dcgan" / arm.config), *QUIET,
        "--seed_everything", str(seed), "--data.init_args.seed", str(seed),
        "--model.init_args.conditional", "true",
        "--model.init_args.pretrained", str(source) if arm.pretrained else "null",
        "--model.init_args.feature_extractor", str(extractor),
        "--trainer.max_steps", str(2 * steps),  # global_step counts both optimizers' steps (n_critic = 1)
        "--trainer.max_epochs", "-1",
        "--trainer.limit_val_batches", "0",  # nothing is selected on validation: the final EMA generator is tested
        *([] if arm.diffaugment else ["--model.init_args.diffaugment", ""]),
        "--data.init_args.samples_per_class", str(images // len(TARGET_CLASSES)),
        # CDC's anchors: one per training image, as the reference code (n_train)
        *(["--model.init_args.cdc_anchors", str(images)] if arm.cdc else []),
        *arm.overrides,
        *extra,
    ]  # fmt: skip
    with working_dir(workdir):
        start = time.perf_counter()
        cli = cli_main(["fit", *args])
        fit_seconds = time.perf_counter() - start
        model, trainer = cli.model, cli.trainer
        logged = trainer.callback_metrics
        regulariser = next((float(logged[k]) for k in ("train/cdc", "train/ewc") if k in logged), None)
        opt_g, opt_d = trainer.optimizers
        source_state = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
        block0_equals_source = all(
            torch.equal(v.cpu(), source_state[f"discriminator.blocks.0.{k}"])
            for k, v in model.discriminator.blocks[0].state_dict().items()
        )
        start = time.perf_counter()
        metrics = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]
        test_seconds = time.perf_counter() - start
        fid_raw = None
        if raw_generator:
            model.hparams.evaluate_ema = False  # what is the EMA worth at this scale? the raw generator, same test
            fid_raw = trainer.test(model, datamodule=cli.datamodule, verbose=False)[0]["test/fid"]
            model.hparams.evaluate_ema = True
        samples = draw_grid(model, model.hparams.num_classes) if keep_samples else None
    counts = [metrics[f"test/class_count/{i}"] for i in range(len(SHORT_NAMES))]
    return ArmResult(
        fid=metrics["test/fid"], kid_mean=metrics["test/kid_mean"], kid_std=metrics["test/kid_std"],
        label_agreement=metrics["test/label_agreement"], class_counts=counts,
        generator_steps=optimizer_steps(opt_g), discriminator_steps=optimizer_steps(opt_d),
        block0_equals_source=block0_equals_source, fit_seconds=fit_seconds, test_seconds=test_seconds,
        diffaugment_on=bool(getattr(model.augment, "policy", ())), samples=samples, fid_raw_generator=fid_raw,
        images=len(cli.datamodule.train_set), regulariser=regulariser,
        **{k: metrics.get(f"test/{k}") for k in DIVERSITY_KEYS},
    )  # fmt: skip


def run_arms(
    arms: list[Arm], seeds: list[int], source: Path, extractor: Path, steps: int, workdir: Path,
    extra: list[str] = (), log=print, save_to: Path | None = None, images: int = 100, raw_generator: bool = True,
) -> dict[str, list[ArmResult]]:  # fmt: skip
    """Every arm for every seed (seed-major, so a cut-off run has whole seeds); samples kept for the first seed."""
    results: dict[str, list[ArmResult]] = {arm.name: [] for arm in arms}
    for i, seed in enumerate(seeds):
        for arm in arms:
            where = workdir / f"seed{seed}" / arm.key
            result = run_arm(
                arm, seed, source, extractor, steps, where, extra, keep_samples=i == 0, images=images,
                raw_generator=raw_generator,
            )  # fmt: skip
            results[arm.name].append(result)
            if save_to is not None:  # after every run: a cut-off benchmark keeps what it measured
                torch.save({name: [asdict(r) for r in runs] for name, runs in results.items()}, save_to)
            intra = "" if result.intra_cluster_distance is None else f"  intra {result.intra_cluster_distance:.3f}"
            log(
                f"      N={images} seed {seed} {arm.name:<26} FID {result.fid:8.2f}  KID {result.kid_mean:.4f}{intra}  "
                f"agree {result.label_agreement:.2f}  G/D steps {result.generator_steps}/{result.discriminator_steps}  "
                f"fit {result.fit_seconds:.0f}s test {result.test_seconds:.0f}s"
            )
    return results


def real_class_counts(extractor: Path) -> list[int]:
    """The extractor's class counts on the real target test images: what a perfect generator would score."""
    from lit_finetune.data import FashionMNISTDataModule
    from lit_finetune.metrics import GenerativeMetrics

    images, labels = FashionMNISTDataModule().read_split("test")
    real = images[torch.isin(labels, torch.tensor(TARGET_CLASSES))].float() / 127.5 - 1  # uint8 -> [-1, 1]
    return GenerativeMetrics(extractor).class_counts(real).tolist()


@dataclass
class Floor:
    """FID/KID of real images against other real images through the same extractor."""

    what: str
    num_a: int
    num_b: int
    fid: float
    kid_mean: float
    kid_std: float


def _per_class(labels: torch.Tensor, counts: dict[int, int], generator: torch.Generator) -> torch.Tensor:
    """Indices of ``counts[c]`` random images of each class ``c`` in ``labels``."""
    picks = []
    for c, k in counts.items():
        where = torch.nonzero(labels == c).flatten()
        if len(where) < k:
            raise ValueError(f"class {c}: {k} images asked, {len(where)} available")
        picks.append(where[torch.randperm(len(where), generator=generator)[:k]])
    return torch.cat(picks)


def real_floor(extractor: Path, num_test: int | None = None, root: str | None = None, seed: int = 0) -> list[Floor]:
    """What a perfect generator would score, with the sample sizes of the arms' test: the first
    ``num_test`` (None: all) target test images against as many class-matched target training images,
    and two disjoint class-stratified halves of those test images (half the size: FID's bias shows)."""
    from lit_finetune.data import FashionMNISTDataModule
    from lit_finetune.metrics import GenerativeMetrics

    data = FashionMNISTDataModule(**({"root": root} if root else {}))
    split = {}
    for name in ("test", "train"):
        images, labels = data.read_split(name)
        keep = torch.isin(labels, torch.tensor(TARGET_CLASSES))
        split[name] = (images[keep].float() / 127.5 - 1, labels[keep])  # uint8 -> [-1, 1]
    test, test_labels = (t[:num_test] for t in split["test"])
    counts = {c: int((test_labels == c).sum()) for c in TARGET_CLASSES}
    generator = torch.Generator().manual_seed(seed)
    train = split["train"][0][_per_class(split["train"][1], counts, generator)]
    first = _per_class(test_labels, {c: k // 2 for c, k in counts.items()}, generator)
    rest = torch.ones(len(test), dtype=torch.bool)
    rest[first] = False
    metrics = GenerativeMetrics(extractor)
    out = []
    for what, a, b in (
        ("target test vs target train images (the arms' sample sizes)", test, train),
        ("two disjoint halves of the target test images", test[first], test[rest]),
    ):
        metrics.reset()
        metrics.update(real=a, fake=b)
        values = metrics.compute()
        out.append(Floor(what, len(a), len(b), *(float(values[k]) for k in ("fid", "kid_mean", "kid_std"))))
    return out


# -- reporting -----------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


#: the main table's paired FID comparisons, fixed before any result (``(a, b)`` for ``a - b``): with and without
#: DiffAugment, each source-initialised arm against scratch and FreezeD against TransferGAN; then DiffAugment's
#: effect for each initialisation
MAIN_COMPARISONS = (
    *((f"{a}{aug}", f"{b}{aug}") for aug in ("", " + DiffAugment")
      for a, b in (("TransferGAN", "scratch"), ("FreezeD", "scratch"), ("FreezeD", "TransferGAN"))),
    *((f"{init} + DiffAugment", init) for init in ("scratch", "TransferGAN", "FreezeD")),
)  # fmt: skip


def paired_lines(results: dict[str, list[ArmResult]]) -> list[str]:
    """FID paired by seed over :data:`MAIN_COMPARISONS`, one Holm family (a comparison whose arms did not run is
    left out)."""
    family = comparison_family({(): results}, MAIN_COMPARISONS, lambda r: r.fid)
    if not family:
        return []
    intro = (
        "Paired differences of FID (lower is better, so a negative difference favours the first arm), paired by seed "
        "(the same 100 images and source): the family, fixed in advance, is TransferGAN − scratch, FreezeD − scratch "
        "and FreezeD − TransferGAN, each without and with DiffAugment, and DiffAugment's effect for each "
        "initialisation (X + DiffAugment − X)."
    )
    return ["", *paired_table(family, ["comparison (FID)"], intro, lower_is_better=True)]


def markdown(
    results: dict[str, list[ArmResult]], seeds: list[int], real_counts: list[int] | None, setup: str,
    floors: list[Floor] = (),
) -> str:  # fmt: skip
    """The metrics table, the real-vs-real floor, the paired FID differences (Holm over their family), the
    per-class count table and the setup paragraph."""
    lines = [
        "| arm | FID ↓ | KID ×10³ ↓ | KID subset std ×10³ | label agreement ↑ | FID, raw G (no EMA) | G / D steps "
        "| FID per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        fid, fid_sd = _mean_std([r.fid for r in runs])
        kid, kid_sd = _mean_std([1e3 * r.kid_mean for r in runs])
        kid_subset = statistics.mean(1e3 * r.kid_std for r in runs)
        agree, agree_sd = _mean_std([100 * r.label_agreement for r in runs])
        steps = sorted({f"{r.generator_steps} / {r.discriminator_steps}" for r in runs})
        raw_cell = _cell([r.fid_raw_generator for r in runs])  # "not measured" when no run tested the raw G
        lines.append(
            f"| {name} | {fid:.1f} ± {fid_sd:.1f} | {kid:.1f} ± {kid_sd:.1f} | {kid_subset:.1f} | "
            f"{agree:.1f} ± {agree_sd:.1f} % | {raw_cell} | {', '.join(steps)} | {', '.join(f'{r.fid:.1f}' for r in runs)} |"
        )
    lines += [
        "",
        "FID and KID: mean ± std over seeds; KID subset std: the std of KID over its random subsets (one run's "
        "own uncertainty), mean over seeds. FID is biased upward at finite sample size (roughly as 1/n; Chong & "
        "Forsyth 2020): it is comparable only at equal numbers of real and fake images, and its zero is not "
        "reachable. The real-vs-real floor below, through the same extractor, is what a perfect generator would "
        "score at these sizes; KID is unbiased, so its floor is about 0.",
    ]
    if floors:
        lines += ["", "| real vs real (same extractor) | images | FID | KID ×10³ ± subset std |", "|---|---|---|---|"]
        lines += [
            f"| {f.what} | {f.num_a:,} vs {f.num_b:,} | {f.fid:.2f} | {1e3 * f.kid_mean:.2f} ± {1e3 * f.kid_std:.2f} |"
            for f in floors
        ]
    lines += paired_lines(results)
    counts = [
        "Generated samples per class as the extractor's classifier sees them (mean over seeds; class-matched "
        "sampling, so a perfect generator matches the real row):",
        "",
        "| arm | " + " | ".join(SHORT_NAMES) + " |",
        "|---|" + "---|" * len(SHORT_NAMES),
    ]
    if real_counts is not None:
        counts.append("| *real target test images* | " + " | ".join(str(int(c)) for c in real_counts) + " |")
    for name, runs in results.items():
        mean = [statistics.mean(r.class_counts[i] for r in runs) for i in range(len(SHORT_NAMES))]
        counts.append(f"| {name} | " + " | ".join(f"{c:.0f}" for c in mean) + " |")
    freezed = [r.block0_equals_source for name, runs in results.items() for r in runs if name.startswith("FreezeD")]
    others = [r.block0_equals_source for name, runs in results.items() for r in runs if not name.startswith("FreezeD")]
    check = (
        f" Check: the lowest discriminator block (`discriminator.blocks.0`) equals the source's after training in "
        f"{sum(freezed)}/{len(freezed)} FreezeD runs and {sum(others)}/{len(others)} other runs."
    )
    return "\n".join(lines) + "\n\n" + "\n".join(counts) + "\n\n" + setup + check + "\n"


def figure(results: dict[str, list[ArmResult]], path: Path, title: str) -> None:
    """One sample grid per arm (first seed; rows = target classes) and FID bars (mean ± std over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    names = list(results)
    cols = (len(names) + 1) // 2
    fig = plt.figure(figsize=(2.4 * cols + 4.4, 3.9), layout="constrained")
    grid = fig.add_gridspec(2, cols + 1, width_ratios=[1] * cols + [1.7])
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[i % 2, i // 2])
        samples = results[name][0].samples
        if samples is not None:
            image = make_grid(samples, nrow=GRID_COLUMNS, value_range=(-1, 1), normalize=True, padding=1)
            ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[:, cols])
    means = [_mean_std([r.fid for r in results[n]]) for n in names]
    colors = ["#8c8c8c" if "scratch" in n else "#4c72b0" if "TransferGAN" in n else "#dd8452" for n in names]
    bars = ax.barh(range(len(names)), [m for m, _ in means], xerr=[s for _, s in means], capsize=4, color=colors)
    for bar, name in zip(bars, names):
        if "DiffAugment" in name:
            bar.set_hatch("//")
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("target test FID (lower is better)", fontsize=8)
    for i, (m, s) in enumerate(means):
        ax.text(m + s, i, f" {m:.1f}", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the few-shot regularisers (--fewshot) -------------------------------------------------------------
def _cell(values: list[float | None], fmt: str = "{:.1f}", scale: float = 1.0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not measured"
    mean, sd = _mean_std([scale * v for v in values])
    return f"{fmt.format(mean)} ± {fmt.format(sd)}"


def fewshot_tests(
    results: dict[int, dict[str, list[ArmResult]]], metric: str
) -> list[tuple[int, str, str, PairedTest, float]]:
    """Each regulariser against each baseline at each N, paired by seed on ``metric`` (regulariser minus
    baseline), with Holm's correction over the whole family: ``(N, arm, baseline, test, adjusted p)``."""
    rows = []
    for n, arms in results.items():
        for arm in arms:
            if arm in FEWSHOT_BASELINES:
                continue
            for base in FEWSHOT_BASELINES:
                if base in arms:
                    a, b = [getattr(r, metric) for r in arms[arm]], [getattr(r, metric) for r in arms[base]]
                    rows.append((n, arm, base, paired_t_test(a, b)))
    adjusted = holm([t.p for *_, t in rows])
    return [(*row, p) for row, p in zip(rows, adjusted)]


def fewshot_markdown(results: dict[int, dict[str, list[ArmResult]]], seeds: list[int], setup: str) -> str:
    """Per N: the metrics of every arm (every run shown), the real images' diversity, class counts; then the
    paired verdicts of each regulariser against each baseline on FID and on the intra-cluster distance."""
    lines = []
    for n, arms in results.items():
        lines += [
            f"**{n} target images** ({n // len(TARGET_CLASSES)} per class)",
            "",
            "| arm | FID ↓ | KID ×10³ ↓ | intra-cluster distance ↑ | clusters occupied ↑ | label agreement ↑ | "
            "regulariser at the end | G / D steps | FID per seed | intra-cluster distance per seed |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, runs in arms.items():
            steps = sorted({f"{r.generator_steps} / {r.discriminator_steps}" for r in runs})
            reg = [r.regulariser for r in runs if r.regulariser is not None]
            reg_cell = ", ".join(f"{v:.3g}" for v in reg) if reg else "—"
            intra = ", ".join("—" if v is None else f"{v:.3f}" for v in (r.intra_cluster_distance for r in runs))
            lines.append(
                f"| {name} | {_cell([r.fid for r in runs])} | {_cell([r.kid_mean for r in runs], scale=1e3)} | "
                f"{_cell([r.intra_cluster_distance for r in runs], '{:.3f}')} | "
                f"{_cell([r.clusters_occupied for r in runs], '{:.0f}', 100)} % | "
                f"{_cell([r.label_agreement for r in runs], '{:.1f}', 100)} % | {reg_cell} | {', '.join(steps)} | "
                f"{', '.join(f'{r.fid:.1f}' for r in runs)} | {intra} |"
            )
        real = [r for runs in arms.values() for r in runs if r.intra_cluster_distance_real is not None]
        if real:
            lines.append(
                f"| *real target test images* | | | {_cell([r.intra_cluster_distance_real for r in real], '{:.3f}')} | "
                f"{_cell([r.clusters_occupied_real for r in real], '{:.0f}', 100)} % | | | | | |"
            )
        lines += ["", "| arm | " + " | ".join(SHORT_NAMES) + " |", "|---|" + "---|" * len(SHORT_NAMES)]
        for name, runs in arms.items():
            mean = [statistics.mean(r.class_counts[i] for r in runs) for i in range(len(SHORT_NAMES))]
            lines.append(f"| {name} | " + " | ".join(f"{c:.0f}" for c in mean) + " |")
        lines.append("")
    lines += [
        "Paired by seed (the same training images, source and budget), regulariser minus baseline; two-sided paired "
        "t-tests with Holm's correction over each family of comparisons (all N, both regularisers, both baselines):",
        "",
        "| N | regulariser | baseline | FID difference ↓ (mean ± sd) | per seed | Holm p | intra-cluster distance "
        "difference ↑ (mean ± sd) | per seed | Holm p |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    fid_tests = fewshot_tests(results, "fid")
    intra_tests = fewshot_tests(results, "intra_cluster_distance") if all(
        r.intra_cluster_distance is not None for arms in results.values() for runs in arms.values() for r in runs
    ) else [None] * len(fid_tests)  # fmt: skip

    def p_cell(p: float) -> str:
        return "n/a (< 2 seeds)" if p != p else f"{p:.3f}"

    for (n, arm, base, fid, fid_p), intra in zip(fid_tests, intra_tests):
        intra_cells = "not measured | | "
        if intra is not None:
            t, p = intra[3], intra[4]
            intra_cells = f"{t.mean:+.3f} ± {t.std:.3f} | {', '.join(f'{d:+.3f}' for d in t.diffs)} | {p_cell(p)}"
        lines.append(
            f"| {n} | {arm} | {base} | {fid.mean:+.1f} ± {fid.std:.1f} | "
            f"{', '.join(f'{d:+.1f}' for d in fid.diffs)} | {p_cell(fid_p)} | {intra_cells} |"
        )
    lines += [
        "",
        "Intra-cluster distance: each generated test sample joins the cluster of its nearest training image in the "
        "extractor's feature space (unit-normalised); the mean pairwise distance within each cluster, averaged over "
        "clusters (an intra-LPIPS-like measure, Ojha et al. 2021; 0 = copies of the training images). Clusters "
        "occupied: the share of training images that at least one sample is nearest to. The real row clusters the "
        "real test images around the same training images: what a generator as diverse as the data reaches.",
    ]
    return "\n".join(lines) + "\n\n" + setup + "\n"


def fewshot_figure(results: dict[int, dict[str, list[ArmResult]]], path: Path, title: str) -> None:
    """One sample grid per (N, arm) (first seed; rows = target classes), FID and intra-cluster distance bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    sizes = list(results)
    names = list(dict.fromkeys(name for arms in results.values() for name in arms))
    fig = plt.figure(figsize=(2.3 * len(names) + 6.5, 2.5 * len(sizes) + 0.6), layout="constrained")
    grid = fig.add_gridspec(len(sizes), len(names) + 2, width_ratios=[1] * len(names) + [1.6, 1.6])
    for row, n in enumerate(sizes):
        for col, name in enumerate(names):
            ax = fig.add_subplot(grid[row, col])
            runs = results[n].get(name, [])
            if runs and runs[0].samples is not None:
                image = make_grid(torch.as_tensor(runs[0].samples), nrow=GRID_COLUMNS, value_range=(-1, 1),
                                  normalize=True, padding=1)  # fmt: skip
                ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_title(f"{name}, N={n}", fontsize=8)
            ax.axis("off")
        for col, (metric, label) in enumerate(
            (("fid", "test FID ↓"), ("intra_cluster_distance", "intra-cluster distance ↑")), start=len(names)
        ):
            ax = fig.add_subplot(grid[row, col])
            stats = [
                _mean_std([getattr(r, metric) for r in results[n][name] if getattr(r, metric) is not None] or [0.0])
                for name in names
            ]
            ax.barh(range(len(names)), [m for m, _ in stats], xerr=[sd for _, sd in stats], capsize=3,
                    color=["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"][: len(names)])  # fmt: skip
            if metric == "intra_cluster_distance":
                real = [r.intra_cluster_distance_real for runs in results[n].values() for r in runs]
                real = [v for v in real if v is not None]
                if real:
                    ax.axvline(statistics.mean(real), color="k", ls="--", lw=1, label="real test images")
                    ax.legend(fontsize=7, loc="lower right")
            ax.set_yticks(range(len(names)), names if col == len(names) else [], fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(f"{label}, N={n}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: the seed of the run that sizes the regularisers (not a benchmark seed)
CALIBRATION_SEED = 100


def regulariser_scales(source: Path, steps: int, workdir: Path, extra: list[str] = ()) -> dict[str, float]:
    """How large EWC's and CDC's terms are where plain fine-tuning ends: training quantities only, no test metric.

    Fits TransferGAN + DiffAugment (``finetune.yaml``) for ``steps`` generator steps on 100 target images with
    seed :data:`CALIBRATION_SEED`, then measures, against the source: ``sum F (theta - theta_src)^2`` over G
    (Fisher as ``finetune_ewc.yaml`` estimates it; EWC's penalty is lambda times this), CDC's loss at the
    reference weight 1000 (mean over 20 batches of the config's 4 extra samples) and the generator's last
    adversarial loss. ``finetune_ewc.yaml``'s lambda = 20 was set from this measurement (so the penalty is
    about the adversarial loss there) before any arm was tested; every run re-measures it.
    """
    import inspect

    from lit_finetune import DCGAN
    from lit_finetune.cli import cli_main

    args = [
        "--config", str(CONFIGS / "dcgan/finetune.yaml"), *QUIET, "--seed_everything", str(CALIBRATION_SEED),
        "--data.init_args.seed", str(CALIBRATION_SEED), "--data.init_args.samples_per_class", "20",
        "--model.init_args.conditional", "true", "--model.init_args.pretrained", str(source),
        "--model.init_args.feature_extractor", "null", "--trainer.max_steps", str(2 * steps),
        "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0", *extra,
    ]  # fmt: skip
    with working_dir(workdir):
        cli = cli_main(["fit", *args])
    fitted = cli.model
    names = set(inspect.signature(DCGAN).parameters)
    hparams = {k: v for k, v in fitted.hparams.items() if k in names}
    probe = DCGAN(**{**hparams, "ewc_generator": 1.0, "cdc_weight": 1000.0, "feature_extractor": None})
    probe.load_pretrained_weights()  # the source's G and D: Fisher, anchors, CDC's frozen copy
    probe.generator.load_state_dict(fitted.generator.state_dict())
    probe.train()
    rng = torch.Generator().manual_seed(0)
    n, k, classes = 50, probe.hparams.cdc_batch, probe.hparams.num_classes
    cdc = []
    with torch.no_grad():
        for _ in range(20):
            z = torch.randn(n + k, probe.hparams.latent_dim, generator=rng)
            y = torch.randint(classes, (n + k,), generator=rng)
            _, features = probe.generator(z, y, return_features=True)
            layer = torch.randint(len(features), (k,), generator=rng)
            cdc.append(float(probe.cdc(features, z, y, layer, rows=slice(n, None))))
    return {
        "ewc_sum_f_dtheta2": float(probe.ewc_g().detach()), "cdc_loss_weight_1000": statistics.mean(cdc),
        "g_loss": float(cli.trainer.callback_metrics["train/g_loss"]), "seed": CALIBRATION_SEED, "steps": steps,
    }  # fmt: skip


def fewshot_main(args: argparse.Namespace, run: provenance.Run, seeds: list[int], steps: int, profile: dict) -> None:
    """``--fewshot``: the regularisers and their baselines at each N; writes ``<name>.md`` / ``.json`` / ``.png``."""
    torch.set_num_threads(args.threads)
    quiet_lightning()
    if args.extractor is None or args.source is None:
        raise SystemExit("--fewshot compares arms fine-tuned from one source: give --extractor and --source")
    start = time.perf_counter()
    arms = [a for a in ALL_ARMS if a.name in args.arms] if args.arms else FEWSHOT_ARMS
    print(f"[calibration] TransferGAN + DiffAugment, seed {CALIBRATION_SEED}, 100 images", flush=True)
    scales = regulariser_scales(args.source, steps, args.workdir / "calibration", profile.get("arm_args", []))
    print(f"      {scales}", flush=True)
    results: dict[int, dict[str, list[ArmResult]]] = {}
    for n in args.images:
        print(f"[N={n}] {len(arms)} arms x seeds {seeds}, {steps} generator steps each", flush=True)
        results[n] = run_arms(
            arms, seeds, args.source, args.extractor, steps, args.workdir / f"n{n}", profile.get("arm_args", []),
            log=lambda s: print(s, flush=True), images=n, raw_generator=not args.no_raw_generator,
        )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    n_test = int(sum(next(iter(results[args.images[0]].values()))[0].class_counts))
    setup = (
        f"Profile `{args.profile}`, `--fewshot`. The conditional source DCGAN (latent 64, widths 32; given) is "
        f"fine-tuned for {steps} generator steps (and as many discriminator steps) on Fashion-MNIST target classes "
        f"5-9 with N = {', '.join(map(str, args.images))} training images (N/5 per class, picked by the seed; batch "
        f"min(50, N): at N = 10 every batch is all 10 images), seeds {seeds}; every arm from its shipped config with "
        "DiffAugment (color, translation, cutout): TransferGAN (`finetune.yaml`), FreezeD (`finetune_freezed.yaml`), "
        "CDC (`finetune_cdc.yaml`: the reference code's kl_wt 1000, 4 extra samples, anchor regions every 4th batch "
        "with std 0.1, one anchor per training image, patch D on the last 7x7 map) and EWC (`finetune_ewc.yaml`: "
        "lambda 20, Fisher from 512 samples). The final EMA generator is tested on "
        f"{n_test:,} target test images with as many class-matched samples (FID, KID, intra-cluster diversity in "
        "the penultimate features of the in-project extractor; comparable only inside this project). "
        "How large the regularisers are (training quantities only, no test metric): where plain fine-tuning "
        f"(TransferGAN + DiffAugment, seed {CALIBRATION_SEED}, not a benchmark seed, N = 100, {steps} G steps) ends, "
        f"sum F (theta - theta_src)^2 = {scales['ewc_sum_f_dtheta2']:.3f}, so EWC's lambda = 20 (set before any arm "
        "was tested from a first such run, 0.045, which had EWC at lambda = 1 and CDC on: both under 5 % of the "
        "adversarial loss) makes a penalty of "
        f"{20 * scales['ewc_sum_f_dtheta2']:.2f} there, against an adversarial generator loss of "
        f"{scales['g_loss']:.2f}; CDC's loss at the reference weight is {scales['cdc_loss_weight_1000']:.3f} there. "
        f"Measured on {machine()}, {torch.get_num_threads()} torch thread(s); {minutes:.1f} min in all"
        f"{'' if not args.no_raw_generator else ' (the raw-generator test skipped)'}."
    )
    text = fewshot_markdown(results, seeds, setup)
    print("\n" + text)
    title = f"Few-shot regularisers on Fashion-MNIST 5-9, {steps} G steps (seed {seeds[0]} samples)"
    name = args.name or "gan_fewshot"
    config = {"profile": args.profile, "steps": steps, "images": args.images, "arms": [a.name for a in arms],
              "raw_generator": not args.no_raw_generator}  # fmt: skip
    run.write(args.results / f"{name}.md", text, {"feature extractor": args.extractor, "source DCGAN": args.source},
              data={"results": results, "seeds": seeds, "setup": setup, "title": title, "scales": scales},
              config=config)  # fmt: skip
    fewshot_figure(results, args.results / f"{name}.png", title)
    print(f"wrote {args.results / name}.md and .png")


def fewshot_merge_main(paths: list[Path], out: Path, name: str, run: provenance.Run) -> None:
    """``--fewshot --merge``: one table from pieces (other seeds) of one few-shot configuration."""
    pieces, summary = provenance.merge_pieces(paths, run=run)
    tree, seeds = provenance.merge_seed_lists([p["results"] for p in pieces], [p["seeds"] for p in pieces])

    def arm_result(r: dict) -> ArmResult:
        return ArmResult(**{**r, "samples": None if r["samples"] is None else torch.tensor(r["samples"])})

    results = {int(n): {arm: [arm_result(r) for r in runs] for arm, runs in arms.items()} for n, arms in tree.items()}
    setup = provenance.merged_setup(summary, pieces)
    text = fewshot_markdown(results, seeds, setup)
    inputs = {k: Path(v["path"]) for k, v in summary["pieces"][0]["inputs"].items()}
    data = {"results": results, "seeds": seeds, "setup": setup, "title": pieces[0]["title"]}
    run.write(out / f"{name}.md", text, inputs, data=data, config=summary["config"], pieces=summary["pieces"])
    fewshot_figure(results, out / f"{name}.png", pieces[0]["title"])
    print(text + f"\nwrote {out / name}.md")


def main(argv: list[str] | None = None) -> None:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--extractor", type=Path, help="a trained feature extractor checkpoint (skips step 1)")
    parser.add_argument("--source", type=Path, help="a conditional source DCGAN checkpoint (skips step 2)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the profile's seeds")
    parser.add_argument("--steps", type=int, help="override the profile's generator steps per arm")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (fixed: FID depends on it; recorded in the results)"
    )
    parser.add_argument("--merge", type=Path, nargs="+", metavar="PIECE_JSON",
                        help="merge pieces' gan_finetune.json (same commit, profile, steps, inputs) into one table")
    parser.add_argument("--fewshot", action="store_true",
                        help="the few-shot regularisers (CDC, EWC) against TransferGAN and FreezeD at --images N "
                             "(default 10 and 100), into <name>.md (default gan_fewshot); needs --extractor and --source")
    parser.add_argument("--images", type=int, nargs="+", default=list(FEWSHOT_IMAGES),
                        help="--fewshot: target training images (multiples of 5)")
    parser.add_argument("--arms", nargs="+", choices=[a.name for a in ALL_ARMS], help="--fewshot: other arms")
    parser.add_argument("--no-raw-generator", action="store_true", help="--fewshot: skip the raw generator's test")
    parser.add_argument("--name", help="--fewshot: results file name (default gan_fewshot)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "gan_finetune")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    profile = dict(PROFILES[args.profile])
    seeds = args.seeds or profile["seeds"]
    steps = args.steps or profile["steps"]
    if args.fewshot and args.merge:
        return fewshot_merge_main(args.merge, args.results, args.name or "gan_fewshot", run)
    if args.merge:
        return merge_main(args.merge, args.results, run)
    if args.fewshot:
        return fewshot_main(args, run, seeds, steps, profile)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    start = time.perf_counter()

    extractor, extractor_note = args.extractor, "given"
    if extractor is None:
        print(f"[1/4] feature extractor: all 10 classes, {profile['extractor_epochs']} epochs", flush=True)
        extractor, acc = train_extractor(
            args.workdir / "extractor", profile["extractor_epochs"], profile.get("extractor_args", [])
        )
        extractor_note = f"{profile['extractor_epochs']} epoch(s), validation accuracy {100 * acc:.1f} %"
        print(f"      {extractor_note} -> {extractor}", flush=True)
    source, source_note = args.source, "given"
    if source is None:
        print(f"[2/4] conditional source DCGAN on classes 0-4, {profile['source_epochs']} epochs", flush=True)
        source = pretrain_source(args.workdir / "source", profile["source_epochs"], profile.get("source_args", []))
        source_note = f"{profile['source_epochs']} epoch(s) on the ~29,500 training images of classes 0-4"
        print(f"      -> {source}", flush=True)
    source_minutes = (time.perf_counter() - start) / 60

    print(f"[3/4] {len(ARMS)} arms x seeds {seeds}, {steps} generator steps each", flush=True)
    results = run_arms(
        ARMS, seeds, source, extractor, steps, args.workdir, profile.get("arm_args", []),
        log=lambda s: print(s, flush=True), save_to=args.workdir / "results.pt",
    )  # fmt: skip
    real_counts = real_class_counts(extractor)
    n_test = int(sum(results[ARMS[0].name][0].class_counts))  # one class-matched sample per real test image
    floors = real_floor(extractor, n_test)

    minutes = (time.perf_counter() - start) / 60
    arm_minutes = sum(r.fit_seconds + r.test_seconds for runs in results.values() for r in runs) / 60
    setup = (
        f"Profile `{args.profile}`. Fashion-MNIST: class-conditional DCGAN (latent 64, widths 32) pretrained on source "
        f"classes 0-4 ({source_note}); each arm then trains {steps} generator steps (and as many discriminator steps, "
        f"batch 50) on target classes 5-9 with 20 images per class, seeds {seeds} (a seed also picks the 100 images). "
        f"The final EMA generator is tested on {n_test:,} target test images with as many class-matched samples: "
        f"FID and KID (mean ± std over seeds) in the penultimate features of an in-project Fashion-MNIST classifier "
        f"({extractor_note}), so these FIDs are comparable only inside this project; label agreement is how often "
        f"that classifier assigns a sample the class it was generated for. Measured on {machine()}, "
        f"{torch.get_num_threads()} torch thread(s) (fixed with `--threads`: a rerun with the same threads and seed "
        f"gives the same FID); "
        f"{minutes:.1f} min in all ({source_minutes:.1f} min extractor + source, {arm_minutes:.1f} min for the arms)."
    )
    text = markdown(results, seeds, real_counts, setup, floors)
    print("\n[4/4] results\n" + text)
    title = f"Fashion-MNIST 5-9 from 100 images, {steps} G steps (seed {seeds[0]} samples)"
    config = {"profile": args.profile, "steps": steps}
    run.write(args.results / "gan_finetune.md", text, {"feature extractor": extractor, "source DCGAN": source},
              data={"results": results, "seeds": seeds, "real_counts": real_counts, "setup": setup, "title": title},
              config=config)  # fmt: skip
    figure(results, args.results / "gan_finetune.png", title)
    print(f"wrote {args.results / 'gan_finetune.md'} and gan_finetune.png")


def merge_main(paths: list[Path], out: Path, run: provenance.Run) -> None:
    """``--merge``: one table from pieces (other seeds) of one profile; where each ran goes into the text."""
    pieces, summary = provenance.merge_pieces(paths, run=run)
    tree, seeds = provenance.merge_seed_lists([p["results"] for p in pieces], [p["seeds"] for p in pieces])

    def arm_result(r: dict) -> ArmResult:
        samples = None if r["samples"] is None else torch.tensor(r["samples"])
        return ArmResult(**{**r, "samples": samples})

    results = {arm: [arm_result(r) for r in runs] for arm, runs in tree.items()}
    setup = provenance.merged_setup(summary, pieces)
    # the real-vs-real floor depends only on the extractor (the same file in every piece: merge_pieces checked
    # its sha256) and the test size: recomputed here, as each piece computed it
    extractor = Path(summary["pieces"][0]["inputs"]["feature extractor"]["path"])
    n_test = int(sum(next(iter(results.values()))[0].class_counts))
    floors = real_floor(extractor, n_test) if extractor.is_file() else []
    text = markdown(results, seeds, pieces[0]["real_counts"], setup, floors)
    data = {"results": results, "seeds": seeds, "real_counts": pieces[0]["real_counts"], "setup": setup,
            "title": pieces[0]["title"]}  # fmt: skip
    run.write(out / "gan_finetune.md", text, {"feature extractor": extractor}, data=data, config=summary["config"],
              pieces=summary["pieces"])  # fmt: skip
    figure(results, out / "gan_finetune.png", pieces[0]["title"])
    print(text + f"\nwrote {out / 'gan_finetune.md'}")


if __name__ == "__main__":
    main()
