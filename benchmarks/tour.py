"""The main job: a reduced tour of all four modules on Fashion-MNIST, in about 10 minutes on a 2-core CPU.

    bash .ci/install && python3 benchmarks/tour.py

The embedded default: Fashion-MNIST classes 0-4 (tops, trousers, pullovers, dresses, coats) are the
**source**, classes 5-9 (sandals, shirts, sneakers, bags, boots) the **target**, seen through 20 labelled
images per class (a seed picks them; within a seed every arm sees the same images).

1. **Sources.** The named source models it needs (:mod:`lit_finetune.zoo`) are built on first use into
   ``$LIT_FINETUNE_HOME`` (default ``~/.cache/lit_finetune``), two at a time (one torch thread each), with the
   zoo's own line saying what is trained, why and where it goes; a second run finds them cached.
2. **Four comparisons**, each through the library's public API (LightningModules, the datamodule,
   callbacks, ``lightning.Trainer``), seed-major so that a seed pairs the arms of every comparison:

   * *classifier* (``ImageClassifier``): fine-tuned from the source classifier (backbone frozen for the
     first epoch, ``LayerFreezing``) vs scratch, the same steps, batch and augmentation; the checkpoint with
     the best validation accuracy (``ModelCheckpoint``) is tested on the 5,000 target test images;
   * *DCGAN* (``DCGAN``, class-conditional, DiffAugment on real and fake): scratch vs TransferGAN (G and D
     from the unconditional source DCGAN, the labels entering at zero weight) vs FreezeD (TransferGAN with
     ``discriminator.blocks.0`` frozen), the same generator steps; the final EMA generator is tested by FID and
     KID against target test images with as many class-matched samples, in the feature space of the zoo's
     Fashion-MNIST feature extractor, beside the real-vs-real floor at the same sizes (what a perfect
     generator would score);
   * *VAE* (``VAE``): transfer from the source VAE vs scratch, the same steps; each arm's checkpoint with the
     best validation ELBO is tested: the importance-weighted bound on -log p(x) in nats per image;
   * *GAN-augmented classification* (``GANAugmentedClassifier``): real only vs real + G (``synthetic_ratio``
     0.5), both fine-tuned from the source classifier as in the classifier comparison; G is that seed's
     TransferGAN generator, trained on the same 100 real images and no other target image.
3. **Seeds**: at least 2; more while the projected end stays inside ``--budget-min`` (the output says how
   many ran and why). ``--seeds`` fixes the list instead.
4. **Report**: ``benchmarks/results/tour.md`` (summary, one section per module, the provenance block of
   ``benchmarks/provenance.py``) and ``tour.png`` (sample grids and bars with every seed's point); the
   summary table and the measured wall time, CPU time and load are printed.

This is a reduced tour, sized to show every module working end to end in minutes: fewer steps, seeds and
test images than the full benchmarks (``benchmarks/transfer_vs_scratch.py``, ``gan_finetune.py``,
``vae_transfer.py``, ``gan_augmented.py``), which remain the source of the README's claims. Recipes are the
shipped configs' (``configs/*/``), written out in Python here; nothing is chosen on the test split.

    python benchmarks/tour.py                        # the tour (profile quick)
    python benchmarks/tour.py --seeds 0 1 2 3 4      # fixed seeds, no budget
    python benchmarks/tour.py --profile smoke        # seconds; numbers mean nothing (tests)
"""

from __future__ import annotations

import argparse
import copy
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
import stats  # noqa: E402
from gan_finetune import real_floor, quiet_lightning  # noqa: E402
from transfer_vs_scratch import machine  # noqa: E402
from vae_transfer import val_images  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET_CLASSES = [5, 6, 7, 8, 9]
CLASS_NAMES = ["sandal", "shirt", "sneaker", "bag", "boot"]
#: the zoo entries the tour reads, pinned (a version is a recipe): the numbers below depend on them
SOURCES = {
    "extractor": "zoo:fashion-mnist/feature-extractor-quick@v1",
    "classifier": "zoo:fashion-mnist-0-4/classifier-quick@v1",
    "dcgan": "zoo:fashion-mnist-0-4/dcgan-quick@v1",
    "vae": "zoo:fashion-mnist-0-4/vae-quick@v1",
}
DIFFAUGMENT = "color,translation,cutout"
GRID_COLUMNS = 8


@dataclass(frozen=True)
class Profile:
    """What one tour runs; every arm of a comparison gets the same budget."""

    shots: int = 20  #: labelled target images per class
    val_images: int = 500  #: classifier validation images (the configs' val_split)
    batch_size: int = 50
    clf_steps: int = 80  #: classifier optimizer steps (40 epochs of 2 batches, the configs')
    clf_val_every: int = 5  #: epochs between validations
    clf_test_batches: int | None = None  #: None: all 5,000 target test images
    gan_steps: int = 200  #: generator steps (and as many discriminator steps)
    gan_test_batches: int = 40  #: FID/KID on the first 2,000 target test images and as many samples
    vae_steps: int = 300
    vae_val_every: int = 25  #: steps between validations (best checkpoint on val/elbo)
    vae_test_batches: int = 40  #: the bound on the first 2,000 target test images
    iw_samples: int = 16
    aug_ratio: float = 0.5  #: synthetic images per real one (configs/augmented/classifier.yaml)
    min_seeds: int = 2
    max_seeds: int = 5
    budget_min: float = 10.0


PROFILES = {
    "quick": Profile(),
    # the pipeline end to end in seconds; its numbers mean nothing
    "smoke": Profile(
        shots=4, val_images=20, batch_size=10, clf_steps=4, clf_val_every=1, clf_test_batches=2, gan_steps=3,
        gan_test_batches=3, vae_steps=4, vae_val_every=2, vae_test_batches=2, iw_samples=2, max_seeds=2,
    ),  # fmt: skip
}


# -- 1. sources ------------------------------------------------------------------------------------------
def build_sources(
    names: list[str], lanes: int, log_dir: Path, say: Callable[[str], None], heartbeat_s: float = 30.0
) -> dict[str, dict]:
    """``lit-finetune-zoo build NAME`` for each name, ``lanes`` builds at a time (longest first); cached entries
    return at once. Each build's output (its progress bar) goes to a file in ``log_dir``, since two bars would
    interleave; the zoo's own lines are relayed, and every ``heartbeat_s`` a line says what is still building."""
    from lit_finetune import zoo

    log_dir.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    running: dict[str, float] = {}  # entry key -> start
    env = {**os.environ, "OMP_NUM_THREADS": "1",  # one torch thread per build: two builds share two cores
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip

    def build(name: str) -> dict:
        entry = zoo.lookup(name)
        start = time.perf_counter()
        if zoo.status(entry)[0] == "ok":  # verified (sha256, recipe): no process to start
            return {"cached": True, "seconds": round(time.perf_counter() - start, 1), "path": str(zoo.entry_path(entry))}
        log = log_dir / f"{entry.key.replace('/', '--')}.log"
        running[entry.key] = start
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, "-m", "lit_finetune.zoo", "build", name], env=env,
                                    stdout=out, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
            for line in proc.stderr:
                out.write(line)
                if line.startswith("zoo:"):
                    with lock:
                        say(line.rstrip())
            code = proc.wait()
        running.pop(entry.key, None)
        if code != 0:
            raise zoo.ZooError(f"building {name} failed (exit code {code}); its output is in {log}")
        seconds = time.perf_counter() - start
        with lock:
            say(f"zoo: {entry.key} ready after {seconds:.0f} s")
        return {"cached": False, "seconds": round(seconds, 1), "path": str(zoo.entry_path(entry))}

    finished = threading.Event()

    def beat() -> None:
        while not finished.wait(heartbeat_s):
            now = time.perf_counter()
            busy = ", ".join(f"{key} ({now - t:.0f} s)" for key, t in list(running.items()))
            if busy:
                with lock:
                    say(f"zoo: still building {busy}; progress in {log_dir}")

    order = sorted(names, key=lambda n: -zoo.lookup(n).minutes)  # longest first: the lanes end together
    threading.Thread(target=beat, daemon=True).start()
    try:
        with ThreadPoolExecutor(max_workers=max(1, lanes)) as pool:
            done = dict(zip(order, pool.map(build, order)))
    finally:
        finished.set()
    return {name: done[name] for name in names}


# -- 2. the comparisons ------------------------------------------------------------------------------------
def target_data(p: Profile, seed: int, augment: bool, val_images: int | None = None):
    """The few-shot target: ``p.shots`` images per class of classes 5-9, picked by ``seed``."""
    from lit_finetune.data import FashionMNISTDataModule

    return FashionMNISTDataModule(
        classes=TARGET_CLASSES, samples_per_class=p.shots, val_split=val_images or p.val_images,
        batch_size=p.batch_size, augment=augment, seed=seed,
    )  # fmt: skip


def trainer(workdir: Path, **kwargs):
    """A quiet ``lightning.Trainer`` on the CPU (or the one GPU there is), nothing logged but what is asked."""
    import lightning as L

    return L.Trainer(
        accelerator="auto", devices=1, default_root_dir=str(workdir), logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
    )  # fmt: skip


def best_checkpoint(workdir: Path, monitor: str):
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=str(workdir), filename="best", monitor=monitor, mode="max",
                           enable_version_counter=False)  # fmt: skip


def classifier_run(make_model: Callable[[], torch.nn.Module], p: Profile, seed: int, workdir: Path,
                   freeze_backbone: bool) -> float:  # fmt: skip
    """Fit ``make_model()`` (built after seeding: the head's init is the seed's) ``p.clf_steps`` steps on the
    seed's target images; the test accuracy of its best-on-validation checkpoint."""
    import lightning as L

    from lit_finetune.callbacks import LayerFreezing, LRWarmup

    L.seed_everything(seed, verbose=False)
    model = make_model()
    dm = target_data(p, seed, augment=True)
    callbacks = [LRWarmup(warmup_steps=10), best_checkpoint(workdir, "val/acc")]
    if freeze_backbone:  # the fine-tuning recipe of configs/classifier/finetune_target.yaml: the head first
        callbacks.append(LayerFreezing(["backbone"], unfreeze_at_epoch=1, train_bn=False))
    fit = trainer(workdir, max_steps=p.clf_steps, max_epochs=-1, check_val_every_n_epoch=p.clf_val_every,
                  callbacks=callbacks, deterministic=True, limit_test_batches=p.clf_test_batches)  # fmt: skip
    fit.fit(model, datamodule=dm)
    return fit.test(ckpt_path="best", datamodule=dm, verbose=False)[0]["test/acc"]


def adamw():
    return partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-4)


def classifier_arms(p: Profile, seed: int, workdir: Path) -> dict[str, float]:
    """Classifier: fine-tuned from the source vs scratch (configs/classifier/finetune_target.yaml, scratch_target.yaml)."""
    from lit_finetune import ImageClassifier

    out = {}
    for arm, pretrained in (("scratch", None), ("fine-tuned", SOURCES["classifier"])):
        model = partial(ImageClassifier, num_classes=5, backbone="resnet_small", pretrained=pretrained,
                        label_smoothing=0.1, optimizer=adamw())  # fmt: skip
        out[arm] = classifier_run(model, p, seed, workdir / "classifier" / arm, freeze_backbone=pretrained is not None)
    return out


@dataclass
class GanResult:
    fid: float
    kid: float  #: KID mean, x 10^3
    label_agreement: float  #: how often the extractor gives a sample the class it was generated for
    samples: torch.Tensor | None = field(default=None, repr=False)  #: a 5 x 8 grid's images (first seed)


def gan_arms(p: Profile, seed: int, workdir: Path, keep: bool) -> tuple[dict[str, GanResult], torch.nn.Module]:
    """DCGAN: scratch vs TransferGAN vs FreezeD, all conditional with DiffAugment (configs/dcgan/finetune*.yaml,
    conditional as configs/augmented/cdcgan_target.yaml); returns the TransferGAN EMA generator too."""
    import lightning as L

    from lit_finetune import DCGAN
    from lit_finetune.callbacks import LayerFreezing

    out, transfer_g = {}, None
    for arm, pretrained, freeze in (("scratch", None, False), ("TransferGAN", SOURCES["dcgan"], False),
                                    ("FreezeD", SOURCES["dcgan"], True)):  # fmt: skip
        L.seed_everything(seed, verbose=False)
        model = DCGAN(
            latent_dim=64, num_classes=5, conditional=True, generator_width=32, discriminator_width=32,
            conditioning="projection", loss="nonsaturating", diffaugment=DIFFAUGMENT, ema_decay=0.99,
            pretrained=pretrained, feature_extractor=SOURCES["extractor"],
        )  # fmt: skip
        callbacks = [LayerFreezing(["discriminator.blocks.0"], unfreeze_at_epoch=None)] if freeze else []
        dm = target_data(p, seed, augment=False)
        fit = trainer(workdir / "dcgan" / arm, max_steps=2 * p.gan_steps, max_epochs=-1,  # G and D steps both count
                      limit_val_batches=0, limit_test_batches=p.gan_test_batches, callbacks=callbacks,
                      enable_checkpointing=False)  # fmt: skip
        fit.fit(model, datamodule=dm)
        metrics = fit.test(model, datamodule=dm, verbose=False)[0]  # the final EMA generator, class-matched samples
        samples = None
        if keep:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)  # the same noise in every arm's grid
                samples = model.sample(5 * GRID_COLUMNS, torch.arange(5).repeat_interleave(GRID_COLUMNS)).cpu()
        out[arm] = GanResult(metrics["test/fid"], 1e3 * metrics["test/kid_mean"], metrics["test/label_agreement"],
                             samples)  # fmt: skip
        if arm == "TransferGAN":
            transfer_g = copy.deepcopy(model.generator_network(ema=True)).cpu()
    assert transfer_g is not None
    return out, transfer_g


@dataclass
class VaeResult:
    nll: float  #: importance-weighted bound on -log p(x), nats per image, best-on-validation checkpoint
    elbo: float
    best_step: int
    samples: torch.Tensor | None = field(default=None, repr=False)
    reconstructions: torch.Tensor | None = field(default=None, repr=False)  #: input, output, input, ...


def vae_arms(p: Profile, seed: int, workdir: Path, keep: bool, shown: torch.Tensor) -> dict[str, VaeResult]:
    """VAE: transfer from the source vs scratch (configs/vae/transfer.yaml), each at its best validation ELBO."""
    import lightning as L

    from lit_finetune import VAE

    out = {}
    for arm, pretrained in (("scratch", None), ("transfer", SOURCES["vae"])):
        where = workdir / "vae" / arm
        L.seed_everything(seed, verbose=False)
        model = VAE(latent_dim=16, encoder_width=32, decoder_width=32, kl_warmup_steps=0, iw_samples=p.iw_samples,
                    pretrained=pretrained, optimizer=partial(torch.optim.Adam, lr=1e-3))  # fmt: skip
        dm = target_data(p, seed, augment=False, val_images=val_images(p.shots))
        best = best_checkpoint(where, "val/elbo")
        fit = trainer(where, max_steps=p.vae_steps, max_epochs=-1, check_val_every_n_epoch=None,
                      val_check_interval=p.vae_val_every, callbacks=[best], limit_test_batches=p.vae_test_batches)  # fmt: skip
        fit.fit(model, datamodule=dm)
        torch.manual_seed(seed)  # the test's sampling noise: the same for both arms
        metrics = fit.test(ckpt_path="best", datamodule=dm, verbose=False)[0]
        step = int(torch.load(best.best_model_path, map_location="cpu", weights_only=True)["global_step"])
        samples = recon = None
        if keep:
            chosen = VAE.load_from_checkpoint(best.best_model_path, map_location="cpu").eval()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1234)
                samples = chosen.sample(2 * GRID_COLUMNS).cpu()
            recon = torch.stack([shown, chosen.reconstruct(shown)], dim=1).flatten(0, 1)
        out[arm] = VaeResult(metrics["test/nll_iwae"], metrics["test/elbo"], step, samples, recon)
    return out


def augmented_arms(p: Profile, seed: int, workdir: Path, generator: torch.nn.Module) -> dict[str, float]:
    """GAN-augmented classification: real only vs real + G, fine-tuned from the source classifier
    (configs/augmented/classifier.yaml); G saw the same real images and no other target image."""
    from lit_finetune import GANAugmentedClassifier

    out = {}
    for arm, ratio in (("real only", 0.0), ("real + G", p.aug_ratio)):
        model = partial(
            GANAugmentedClassifier, num_classes=5, generator=copy.deepcopy(generator) if ratio else None,
            synthetic_ratio=ratio, synthetic_seed=seed, backbone="resnet_small", pretrained=SOURCES["classifier"],
            label_smoothing=0.1, optimizer=adamw(),
        )  # fmt: skip
        out[arm] = classifier_run(model, p, seed, workdir / "augmented" / arm.replace(" ", ""), freeze_backbone=True)
    return out


def shown_images(n: int = GRID_COLUMNS) -> torch.Tensor:
    """The first ``n`` target test images (for the reconstruction grids)."""
    dm = target_data(PROFILES["quick"], 0, augment=False)
    dm.setup("test")
    return dm.test_set.__getitems__(range(n))[0]


# -- 3. reporting ---------------------------------------------------------------------------------------------
@dataclass
class Comparison:
    """One row of the summary: arms, a metric per arm and seed, the baseline arm the others are compared to."""

    section: str
    metric: str
    better: str  #: "higher" or "lower"
    values: dict[str, list[float]]  #: arm -> one value per seed
    fmt: str = ".1f"

    @property
    def baseline(self) -> str:
        return next(iter(self.values))

    def tests(self) -> dict[str, stats.PairedTest]:
        base = self.values[self.baseline]
        return {arm: stats.paired_t_test(v, base) for arm, v in self.values.items() if arm != self.baseline}


def comparisons(results: dict) -> list[Comparison]:
    """The four comparisons, the baseline arm first (accuracies in %)."""
    seeds, per = results["seeds"], results["per_seed"]
    clf = {arm: [100 * per[s]["classifier"][arm] for s in seeds] for arm in ("scratch", "fine-tuned")}
    gan = {arm: [per[s]["dcgan"][arm].fid for s in seeds] for arm in ("scratch", "TransferGAN", "FreezeD")}
    vae = {arm: [per[s]["vae"][arm].nll for s in seeds] for arm in ("scratch", "transfer")}
    aug = {arm: [100 * per[s]["augmented"][arm] for s in seeds] for arm in ("real only", "real + G")}
    return [
        Comparison("classifier", "target test accuracy, %", "higher", clf),
        Comparison("DCGAN", "FID vs target test images", "lower", gan),
        Comparison("VAE", "-log p(x) bound, nats/image", "lower", vae),
        Comparison("GAN-augmented", "target test accuracy, %", "higher", aug),
    ]


def signed(x: float, fmt: str) -> str:
    return f"{x:+{fmt}}"


def summary_table(rows: list[Comparison], n_seeds: int) -> str:
    lines = ["| comparison | metric | mean per arm | per-seed difference vs the first arm |", "|---|---|---|---|"]
    for c in rows:
        means = ", ".join(f"{arm} {statistics.mean(v):{c.fmt}}" for arm, v in c.values.items())
        diffs = []
        for arm, t in c.tests().items():
            p = f", paired t {stats.format_p(t.p)}" if n_seeds >= 3 else ""
            diffs.append(f"{arm} − {c.baseline}: {', '.join(signed(d, c.fmt) for d in t.diffs)} "
                         f"(mean {signed(t.mean, c.fmt)}{p})")  # fmt: skip
        lines.append(f"| {c.section} | {c.metric} ({c.better} is better) | {means} | {'; '.join(diffs)} |")
    return "\n".join(lines)


def seed_table(c: Comparison, seeds: list[int]) -> str:
    head = "| arm | mean ± std | " + " | ".join(f"seed {s}" for s in seeds) + " |"
    lines = [head, "|---|---|" + "---|" * len(seeds)]
    for arm, v in c.values.items():
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        lines.append(f"| {arm} | {statistics.mean(v):{c.fmt}} ± {sd:{c.fmt}} | " + " | ".join(f"{x:{c.fmt}}" for x in v) + " |")
    for arm, t in c.tests().items():
        lines.append(f"| *{arm} − {c.baseline}* | {signed(t.mean, c.fmt)} | " + " | ".join(signed(d, c.fmt) for d in t.diffs) + " |")
    return "\n".join(lines)


def markdown(results: dict, p: Profile, timing: dict, setup: str) -> str:
    seeds = results["seeds"]
    rows = comparisons(results)
    per = results["per_seed"]
    floor = results["floor"]
    gan_extra = "\n".join(
        [
            "| arm | " + " | ".join(f"KID ×10³, seed {s}" for s in seeds) + " | "
            + " | ".join(f"label agreement, seed {s}" for s in seeds) + " |",
            "|---|" + "---|" * (2 * len(seeds)),
        ]
        + [
            f"| {arm} | " + " | ".join(f"{per[s]['dcgan'][arm].kid:.1f}" for s in seeds) + " | "
            + " | ".join(f"{100 * per[s]['dcgan'][arm].label_agreement:.0f} %" for s in seeds) + " |"
            for arm in ("scratch", "TransferGAN", "FreezeD")
        ]
    )  # fmt: skip
    steps = [per[s]["vae"][a].best_step for s in seeds for a in ("scratch", "transfer")]
    n_test_gan = p.gan_test_batches * p.batch_size
    n_test_vae = p.vae_test_batches * p.batch_size
    return f"""# The tour: all four modules, reduced

A reduced tour (`python benchmarks/tour.py`, profile `{results['profile']}`): {len(seeds)} seeds ({seeds};
{results['seed_note']}), fewer steps and test images than the full benchmarks, which remain the source of the
README's claims ([transfer_vs_scratch](transfer_vs_scratch.md), [gan_finetune](gan_finetune.md),
[vae_transfer](vae_transfer.md), [gan_augmented](gan_augmented.md)). With {len(seeds)} seeds of a reduced run, a
difference is a sanity check, not a claim{'' if len(seeds) >= 3 else ' (no p-value is shown under 3 seeds)'}: the p-values are uncorrected.
Target: Fashion-MNIST classes 5-9, {p.shots} labelled images per class (a seed picks them; every arm of a
seed sees the same ones). Figure: [tour.png](tour.png).

## Summary

{summary_table(rows, len(seeds))}

Measured: {timing['wall_s'] / 60:.1f} min wall ({timing['sources_s']:.0f} s for the zoo sources, \
{timing['comparisons_s']:.0f} s for the comparisons), {timing['cpu_s']:.0f} s CPU (this process and its \
children), 1-min load {timing['load_start']} at the start and {timing['load_end']} at the end, \
{timing['threads']} torch thread(s), on {timing['machine']}.

## 1. Classifier: fine-tuned vs scratch

`ImageClassifier(backbone="resnet_small")`, {p.clf_steps} AdamW steps (LR 3e-3, warm-up 10, label smoothing
0.1, batch {p.batch_size}, shifts and flips), validation every {p.clf_val_every} epochs on {p.val_images}
images; the best-on-validation checkpoint is tested on \
{'all 5,000' if p.clf_test_batches is None else f'{p.clf_test_batches * p.batch_size}'} target test images.
Fine-tuned: from `{SOURCES['classifier']}`, backbone frozen for the first epoch (`LayerFreezing`).

{seed_table(rows[0], seeds)}

## 2. DCGAN: scratch vs TransferGAN vs FreezeD (DiffAugment on)

Class-conditional `DCGAN` (latent 64, widths 32, projection discriminator, non-saturating loss, DiffAugment
`{DIFFAUGMENT}`, EMA 0.99), {p.gan_steps} generator steps and as many discriminator steps, batch
{p.batch_size}. TransferGAN and FreezeD start from `{SOURCES['dcgan']}` (unconditional, classes 0-4; the
labels enter with zero weight); FreezeD keeps `discriminator.blocks.0` frozen. The final EMA generator is
tested: FID and KID of {n_test_gan:,} class-matched samples against the first {n_test_gan:,} target test
images, in the penultimate features of `{SOURCES['extractor']}` (comparable only inside this project, at
these sizes). FID:

{seed_table(rows[1], seeds)}

Real vs real through the same extractor (what a perfect generator would score): {floor['what']},
{floor['num_a']:,} vs {floor['num_b']:,} images: FID {floor['fid']:.2f}, KID ×10³ {1e3 * floor['kid_mean']:.2f}.

{gan_extra}

## 3. VAE: transfer vs scratch, in nats

`VAE` (latent 16, widths 32, Bernoulli likelihood on pixels binarised at one half), {p.vae_steps} Adam steps
(LR 1e-3, batch {p.batch_size}), validation ELBO every {p.vae_val_every} steps on {val_images(p.shots)} images; each arm's
best-on-validation checkpoint (steps {min(steps)}-{max(steps)}) is tested on the first {n_test_vae:,} target
test images: the importance-weighted bound on -log p(x) ({p.iw_samples} samples), nats per image.
Transfer: from `{SOURCES['vae']}`.

{seed_table(rows[2], seeds)}

## 4. GAN-augmented classification: real only vs real + G

`GANAugmentedClassifier`, the classifier recipe of section 1 fine-tuned from the source (with
`synthetic_ratio=0` it is the real-only baseline, the same code); real + G adds
{p.aug_ratio:g} class-balanced samples per real image to every batch, drawn from that seed's TransferGAN EMA
generator of section 2, which was trained on the same {5 * p.shots} real images and no other target image.
Selection and test as in section 1.

{seed_table(rows[3], seeds)}

## Setup

{setup}
"""


def figure(results: dict, path: Path, title: str) -> None:
    """Sample grids (source G, the three fine-tuned G arms, VAE samples and reconstructions; first seed),
    then one bar chart per comparison with every seed's point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lit_finetune.callbacks import SampleImages

    grids = SampleImages(nrow=GRID_COLUMNS, upscale=3)  # the library's grid: [-1, 1] -> [0, 1], upscaled
    first = results["per_seed"][results["seeds"][0]]
    panels = [("source G (classes 0-4)", results["source_samples"])]
    panels += [(f"{arm} (rows: {', '.join(CLASS_NAMES)})", first["dcgan"][arm].samples)
               for arm in ("scratch", "TransferGAN", "FreezeD")]  # fmt: skip
    for arm in ("scratch", "transfer"):
        panels.append((f"VAE {arm}: samples", first["vae"][arm].samples))
        panels.append((f"VAE {arm}: test image | reconstruction", first["vae"][arm].reconstructions))
    rows = comparisons(results)
    fig = plt.figure(figsize=(16, 8.6), layout="constrained")
    spec = fig.add_gridspec(3, 4, height_ratios=[1.3, 0.6, 1.1])
    for i, (name, images) in enumerate(panels):
        ax = fig.add_subplot(spec[i // 4, i % 4])
        if images is not None:
            ax.imshow(grids.make_grid(name, images).permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_title(name, fontsize=8)
        ax.axis("off")
    colors = ["#8c8c8c", "#4c72b0", "#dd8452"]
    for j, c in enumerate(rows):
        ax = fig.add_subplot(spec[2, j])
        arms = list(c.values)
        means = [statistics.mean(v) for v in c.values.values()]
        ax.bar(range(len(arms)), means, color=colors[: len(arms)], alpha=0.8)
        for s in range(len(results["seeds"])):  # one line per seed: the pairing
            ax.plot(range(len(arms)), [c.values[a][s] for a in arms], "o-", color="black", ms=3, lw=0.6, alpha=0.7)
        bottom = 0.8 * min(min(v) for v in c.values.values())
        ax.set_ylim(bottom=bottom)
        for k, m in enumerate(means):  # the mean at the bar's foot, clear of the seeds' points
            ax.text(k, bottom, f"mean {m:{c.fmt}}\n", ha="center", va="bottom", fontsize=8, color="white")
        ax.set_xticks(range(len(arms)), arms, fontsize=8)
        ax.set_title(f"{c.section}: {c.metric}\n({c.better} is better; lines: one seed each)", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------------------
def numbers(arms: dict) -> dict:
    """An arm -> result dict without its images (the .json holds the numbers, tour.png the images)."""
    drop = ("samples", "reconstructions")
    return {a: {k: v for k, v in asdict(r).items() if k not in drop} if hasattr(r, "fid") or hasattr(r, "nll") else r
            for a, r in arms.items()}  # fmt: skip


def built_note(build: dict) -> str:
    return "cached" if build["cached"] else f"built in {build['seconds']:.0f} s"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the zoo builds), user + system."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> dict:
    run = provenance.Run.start(__file__, argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", help="run exactly these seeds (default: as many as fit)")
    parser.add_argument("--budget-min", type=float, help="wall-clock budget that decides how many seeds run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (fixed: GAN numbers depend on it)")
    parser.add_argument("--lanes", type=int, default=2, help="zoo builds at a time (one torch thread each)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "tour")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    p = PROFILES[args.profile]
    budget_s = 60 * (args.budget_min if args.budget_min is not None else p.budget_min)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    start, load_start = time.perf_counter(), provenance.load_1min()

    def say(line: str) -> None:
        print(line, flush=True)

    say(f"tour: lit_finetune's four modules on Fashion-MNIST 5-9, {p.shots} images per class (profile "
        f"{args.profile}); a reduced tour: the full benchmarks (benchmarks/*.py) remain the source of the README's "
        "claims")  # fmt: skip
    say(f"[1/3] zoo sources ({', '.join(SOURCES.values())}): built on first use, {args.lanes} at a time")
    built = build_sources(list(SOURCES.values()), args.lanes, args.workdir / "zoo_logs", say)
    for name, b in built.items():
        say(f"      {name}: {built_note(b)}")
    sources_s = time.perf_counter() - start

    from lit_finetune.modules.augmented import load_generator
    from lit_finetune.zoo import resolve_source

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        source_g = load_generator(SOURCES["dcgan"], ema=True).cpu()
        source_samples = source_g(torch.randn(5 * GRID_COLUMNS, source_g.latent_dim), None).detach()
    shown = shown_images()

    fixed = args.seeds is not None
    seeds = list(args.seeds) if fixed else list(range(p.max_seeds))
    say(f"[2/3] four comparisons, seed-major ({'seeds ' + str(seeds) if fixed else f'at least {p.min_seeds} seeds, more while the {budget_s / 60:.0f}-minute budget allows'})")
    per_seed: dict[int, dict] = {}
    seed_seconds: list[float] = []
    reserve_s = 20.0  # the floor, the report and the figure
    note = "fixed with --seeds" if fixed else f"the most this profile runs, inside the {budget_s / 60:g}-minute budget"
    for i, seed in enumerate(seeds):
        if not fixed and i >= p.min_seeds:  # another seed only if it is projected to end inside the budget
            projected = time.perf_counter() - start + max(seed_seconds) + reserve_s
            if projected > budget_s:
                note = (f"as many as fit the {budget_s / 60:g}-minute budget: another would have ended at about "
                        f"{projected / 60:.1f} min")  # fmt: skip
                break
        t0 = time.perf_counter()
        work = args.workdir / f"seed{seed}"
        keep = i == 0
        r: dict = {"classifier": classifier_arms(p, seed, work)}
        say(f"  seed {seed} classifier  " + "  ".join(f"{a} {100 * v:.1f} %" for a, v in r["classifier"].items()))
        r["dcgan"], generator = gan_arms(p, seed, work, keep)
        say(f"  seed {seed} DCGAN FID   " + "  ".join(f"{a} {v.fid:.1f}" for a, v in r["dcgan"].items()))
        r["vae"] = vae_arms(p, seed, work, keep, shown)
        say(f"  seed {seed} VAE nats    " + "  ".join(f"{a} {v.nll:.1f}" for a, v in r["vae"].items()))
        r["augmented"] = augmented_arms(p, seed, work, generator)
        say(f"  seed {seed} GAN-aug     " + "  ".join(f"{a} {100 * v:.1f} %" for a, v in r["augmented"].items()))
        per_seed[seed] = r
        seed_seconds.append(time.perf_counter() - t0)
        say(f"  seed {seed} done in {seed_seconds[-1]:.0f} s ({(time.perf_counter() - start) / 60:.1f} min so far)")
    seeds = list(per_seed)

    extractor = resolve_source(SOURCES["extractor"])
    floor = asdict(real_floor(Path(extractor), p.gan_test_batches * p.batch_size)[0])
    results = {"profile": args.profile, "seeds": seeds, "seed_note": note, "per_seed": per_seed, "floor": floor,
               "source_samples": source_samples, "seed_seconds": seed_seconds, "sources": built}  # fmt: skip
    comparisons_s = time.perf_counter() - start - sources_s
    timing = {"wall_s": time.perf_counter() - start, "sources_s": sources_s, "comparisons_s": comparisons_s,
              "cpu_s": cpu_seconds(), "load_start": load_start, "load_end": provenance.load_1min(),
              "threads": torch.get_num_threads(), "machine": machine()}  # fmt: skip
    setup = (
        "Zoo sources: " + "; ".join(f"`{n}` {built_note(b)}" for n, b in built.items())
        + f" ({args.lanes} builds at a time). Seconds per seed: {', '.join(f'{s:.0f}' for s in seed_seconds)}. "
        "Every arm of a comparison has the same steps, batch, data and seed; only the treatment differs. "
        "Selection is on validation only (classifier, GAN-augmented, VAE) or none (the DCGAN's final EMA "
        "generator); the test split chooses nothing."
    )  # fmt: skip
    text = markdown(results, p, timing, setup)
    args.results.mkdir(parents=True, exist_ok=True)
    title = (f"lit_finetune tour (profile {args.profile}): Fashion-MNIST 5-9 from {p.shots} images/class, "
             f"seeds {seeds}; grids from seed {seeds[0]}")  # fmt: skip
    figure(results, args.results / "tour.png", title)
    timing["wall_s"] = time.perf_counter() - start  # the report's own time included
    timing["cpu_s"] = cpu_seconds()
    text = markdown(results, p, timing, setup)
    data = {**{k: v for k, v in results.items() if k not in ("source_samples", "per_seed")}, "timing": timing,
            "per_seed": {s: {k: numbers(v) for k, v in r.items()} for s, r in per_seed.items()}}  # fmt: skip
    run.write(args.results / "tour.md", text, {name: b["path"] for name, b in built.items()}, data=data,
              config={"profile": args.profile, **asdict(p)}, timing=timing)  # fmt: skip

    say("[3/3] summary (a reduced tour; the full benchmarks, benchmarks/*.py, remain the source of the README's claims)\n")
    say(summary_table(comparisons(results), len(seeds)))
    say(f"\n{len(seeds)} seeds ({note}). Wall time {timing['wall_s'] / 60:.1f} min ({sources_s:.0f} s zoo sources, "
        f"{comparisons_s:.0f} s comparisons); CPU {timing['cpu_s']:.0f} s; 1-min load {load_start} -> "
        f"{timing['load_end']}; {timing['threads']} torch thread(s).")  # fmt: skip
    say(f"wrote {args.results / 'tour.md'} and {args.results / 'tour.png'}")
    return results


if __name__ == "__main__":
    main()
