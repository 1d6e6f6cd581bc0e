"""Speed: ``ImageClassifier``, ``DCGAN`` and ``VAE`` under ``lightning.Trainer`` vs hand-written PyTorch loops.

The "Speed" protocol of docs/ARCHITECTURE.md, in one process, for three modules:

* **Same model, data and batch.** Each arm builds fresh networks from the same seed and trains
  them on the same ``FashionMNISTDataModule(classes=[0, 1, 2, 3, 4])`` train loader (the batches
  come in the same order).

  - Classifier: ``ImageClassifier(num_classes=5)`` (resnet_small, 28x28 grayscale), batch 128,
    augmentation on, with the AdamW over named groups that ``configure_optimizers()`` builds. The
    hand-written arm calls ``model(x)`` + ``F.cross_entropy``; the Trainer arm runs the module's
    own ``training_step`` (which also updates its torchmetrics and calls ``self.log``).
  - DCGAN: ``DCGAN`` with the sizes of ``configs/dcgan/pretrain.yaml`` (latent 64, widths 32,
    non-saturating loss, EMA decay 0.999), batch 128, no augmentation. A step is one batch: one
    D update (real batch and fresh fakes) and one G update, then the EMA update of G. The Trainer
    arm runs the module (manual optimisation: ``toggle_optimizer``, ``manual_backward``, the
    finite-loss checks, ``self.log_dict``, the EMA in ``on_train_batch_end``); the hand-written
    arm runs ``DCGANGenerator`` / ``DCGANDiscriminator`` with the module's loss functions, two
    ``Adam(lr=2e-4, betas=(0.5, 0.999))`` and the same EMA update, as the PyTorch DCGAN tutorial
    writes it, except that it switches D's ``requires_grad`` off around the G step as the module's
    ``toggle_optimizer`` does (the tutorial computes D's unused weight gradients there): the same work.
    Both arms seed the global RNG the same way when training starts, so they draw
    the same noise.
  - VAE: ``VAE`` with the sizes of ``configs/vae/pretrain.yaml`` (latent 16, widths 32, KL
    warm-up over 500 steps), batch 128, no augmentation, automatic optimisation with the
    module's default ``Adam(lr=1e-3)``. The Trainer arm runs the module as it is: its
    ``training_step`` logs ``train/rec``, ``kl``, ``elbo`` and ``beta`` on the steps Lightning writes
    to loggers (every ``log_every_n_steps``, 50 here), an epoch's last batch and the fit's last step
    (see ``VAE``'s docstring), so once in the timed window (the last step). The hand-written arm
    runs ``ConvEncoder`` / ``ConvDecoder``: reparameterised ``z``, Bernoulli ``rec`` on the binarised batch, ``kl``,
    loss ``(rec + beta * kl).mean()`` with the same linear warm-up of ``beta``, one ``Adam``.
    Both arms seed the global RNG the same way when training starts (the reparameterisation noise).
* **Same timing.** A step is timed from the end of one step to the end of the next, so it holds
  fetching the batch, forward, backward and the optimizer step(s) (and, for the DCGAN, one EMA
  update): for the Trainer through a callback's ``on_train_batch_end``, for the hand-written
  loop at the end of its step. Warm-up steps are excluded; Trainer construction and ``fit``
  setup fall outside the window.
* **Interleaved repeats.** Each repeat times the data path, then both arms, alternating which
  arm goes first. The headline is Trainer / hand-written from the CPU time the process spent
  (which leaves out waiting for a busy core on a shared machine): the median over repeats of the
  ratio within a repeat (its two runs are back to back), with its range; the same ratio from wall
  time, from median step times (robust to bursts of other processes) follows.
* **Every run shown.** Each run written to ``--output`` is appended to the runs in the JSON beside
  it (``speed.json``) and the report's "Every run" table lists them all (commit, load, ratios), so
  no run made for the table is dropped. Both arms
  run with the same ``torch.set_num_threads`` (``--threads``, default 1: steadiest on a small
  or shared CPU).
* **Same computation.** Both arms start from the same weights and see the same batches (and,
  for the DCGAN and the VAE, the same noise), so they must compute the same losses at every step
  and end with the same weights (for the DCGAN: G, D and the EMA of G); the report shows the largest
  difference of each (a loop that skipped a step or fed other data would show it).
* **Data path alone** (classifier): the same train loader iterated without a model (batches/s,
  images/s), compared with the model step alone (the hand-written step minus its batch fetch).
* **Overhead floor** (``--models overhead``): ``configs/classifier/fashion_mnist_full.yaml`` with its
  ResNet replaced by one ``nn.Linear(784, 10)`` (``TinyClassifier``), so a step is almost nothing but
  framework, timed in ms per step on a ladder whose every rung adds one layer: a hand-written loop
  (AdamW + per-step OneCycleLR over the module's groups, plain torch), ``Trainer`` + a minimal
  LightningModule (Lightning's own cost), ``Trainer`` + the module (our ``training_step``, torchmetrics,
  ``self.log``, the LR-factor wrapper), then the config's callbacks and CSV logger. All rungs compute
  the same losses and weights. ``--overhead-profile FILE`` adds a cProfile of the bare and the config
  rungs (per package, then the top functions).

    python benchmarks/speed.py            # ~4 min on an idle 2-core CPU; writes benchmarks/results/speed.md
    python benchmarks/speed.py --models dcgan --output /tmp/gan.md   # one module only
    python benchmarks/speed.py --quick    # a smoke test of a few steps (no file unless --output)
    python benchmarks/speed.py --models overhead --output benchmarks/results/overhead.md \
        --overhead-profile benchmarks/results/overhead_profile.md    # the overhead floor alone (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import sys
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lit_finetune import DCGAN, VAE, ImageClassifier
from lit_finetune.data import FashionMNISTDataModule
from lit_finetune.data.fashion_mnist import DEBIAN_ROOT
from lit_finetune.modules.dcgan import discriminator_loss, generator_loss
from lit_finetune.modules.base import NoiseStream
from lit_finetune.modules.vae import binarize
from lit_finetune.nets import ConvDecoder, ConvEncoder, DCGANDiscriminator, DCGANGenerator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "speed.md"
CLASSES = [0, 1, 2, 3, 4]
MODELS = ("classifier", "dcgan", "vae", "overhead")
TARGET_TRAINER_RATIO = 0.95  # Trainer steps/s >= 0.95 x hand-written loop
TARGET_DATA_RATIO = 10.0  # data path batches/s >= 10 x model steps/s
#: both arms run the same computation: per-step losses and final weights agree to float rounding
AGREEMENT_TOLERANCE = 1e-4
#: the DCGAN's optimizer (the module's default, the DCGAN paper's) and loss in both arms
GAN_LR, GAN_BETAS, GAN_LOSS, GAN_EMA_DECAY = 2e-4, (0.5, 0.999), "nonsaturating", 0.999
#: the VAE's optimizer learning rate (``torch.optim.Adam``'s default, the module's default optimizer)
VAE_LR = 1e-3
TIMING_METHOD = (
    "per-step wall time (`time.perf_counter`) from the end of one step to the end of the next, "
    "after the warm-up steps: Trainer arm via a callback's `on_train_batch_end`, hand-written arm at the end of its "
    "step; both include fetching the batch"
)


@dataclass
class ArmTiming:
    """Wall seconds of each timed step of one arm in one repeat, and the batch-fetch part of each (if known)."""

    step_s: list[float]
    fetch_s: list[float] = field(default_factory=list)
    threads: int = 0
    #: the training losses of every step, warm-up included (DCGAN: D's then G's, per step)
    losses: list[float] = field(default_factory=list)
    #: CPU seconds of this process (``time.process_time``) in each timed step: no time spent waiting for a core
    cpu_s: list[float] = field(default_factory=list)
    #: the trained networks and their optimizers (dropped once the arms were compared)
    model: torch.nn.Module | None = field(default=None, repr=False)
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list, repr=False)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The one optimizer of a single-network arm."""
        (optimizer,) = self.optimizers
        return optimizer

    @property
    def steps_per_s(self) -> float:
        """Timed steps over their total wall time."""
        return len(self.step_s) / sum(self.step_s)

    @property
    def median_steps_per_s(self) -> float:
        """One over the median step time: robust to bursts of other processes on the machine."""
        return 1.0 / statistics.median(self.step_s)

    @property
    def cpu_steps_per_s(self) -> float:
        """Timed steps over the CPU time this process spent on them."""
        return len(self.cpu_s) / sum(self.cpu_s)

    @property
    def compute_steps_per_s(self) -> float:
        """Steps/s without the batch fetch: the model step alone."""
        return len(self.step_s) / (sum(self.step_s) - sum(self.fetch_s))

    @property
    def fetch_share(self) -> float:
        """Fraction of the step time spent fetching the batch."""
        return sum(self.fetch_s) / sum(self.step_s)


class StepTimer(L.Callback):
    """Records the wall and CPU clocks and the loss at the end of every training batch, and the thread count."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.losses: list[float] = []
        self.threads = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.threads = torch.get_num_threads()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, *args: object) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        self.losses.append(float(outputs["loss"]))  # the loss of the step that just ended


class SeededStepTimer(StepTimer):
    """A :class:`StepTimer` that seeds the global RNG when training starts: the module draws its noise from it."""

    def __init__(self, noise_seed: int) -> None:
        super().__init__()
        self.noise_seed = noise_seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        torch.manual_seed(self.noise_seed)


class GANStepTimer(SeededStepTimer):
    """A :class:`SeededStepTimer` for manual optimisation: records every back-propagated loss.

    ``training_step`` returns nothing under manual optimisation, so the losses are taken where
    ``manual_backward`` hands them to the callbacks (``on_before_backward``): D's, then G's.
    Lightning calls the callbacks' ``on_train_batch_end`` before the module's, so a timestamp
    falls before that step's EMA update; every timed interval still holds exactly one step and
    one EMA update, as in the hand-written loop.
    """

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.losses.append(loss.item())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: object, *args: object) -> None:
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())


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


def quiet_trainer(max_steps: int, timer: StepTimer) -> L.Trainer:
    """A CPU Trainer that does nothing besides training: no logger, checkpoints, progress bar, summary, validation."""
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )


# -- classifier ------------------------------------------------------------------------------------
def fresh_model(seed: int) -> ImageClassifier:
    """The benchmarked model, with the same initial weights in every arm."""
    torch.manual_seed(seed)
    return ImageClassifier(num_classes=len(CLASSES))


def time_trainer(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """``Trainer.fit`` for ``warmup + steps`` steps; steps/s over the steps after warm-up."""
    torch.set_num_threads(args.threads)
    timer = StepTimer()
    trainer = quiet_trainer(args.warmup + args.steps, timer)
    model = fresh_model(args.seed)
    trainer.fit(model, datamodule=dm)
    durations = step_durations(timer.times, args.warmup, args.steps)
    return ArmTiming(
        durations, threads=timer.threads, losses=timer.losses, model=model, optimizers=trainer.optimizers,
        cpu_s=step_durations(timer.cpu_times, args.warmup, args.steps),
    )  # fmt: skip


def time_plain(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """A hand-written loop of the same model, optimizer, loader and step count."""
    torch.set_num_threads(args.threads)
    model = fresh_model(args.seed).train()
    optimizer = model.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    batches = endless(dm.train_dataloader())
    times, cpu_times, fetches, losses = [], [], [], []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        x, y = next(batches)
        fetches.append(time.perf_counter() - start)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
        losses.append(loss.item())
    fetch = fetches[args.warmup : args.warmup + args.steps]
    durations = step_durations(times, args.warmup, args.steps)
    cpu = step_durations(cpu_times, args.warmup, args.steps)
    return ArmTiming(durations, fetch, torch.get_num_threads(), losses, cpu, model, [optimizer])


# -- DCGAN -----------------------------------------------------------------------------------------
def fresh_gan(args: argparse.Namespace) -> DCGAN:
    """The benchmarked ``DCGAN`` module (unconditional, 28x28x1), seeded like :func:`fresh_gan_nets`."""
    torch.manual_seed(args.seed)
    model = DCGAN(
        latent_dim=args.gan_latent_dim, generator_width=args.gan_width, discriminator_width=args.gan_width,
        loss=GAN_LOSS, ema_decay=GAN_EMA_DECAY,
    )  # fmt: skip
    model.noise_stream = NoiseStream(args.seed)  # the noise the hand-written loop draws too
    return model


def fresh_gan_nets(args: argparse.Namespace) -> tuple[DCGANGenerator, DCGANDiscriminator]:
    """The same G and D as :func:`fresh_gan`'s: built in the module's order from the same seed."""
    torch.manual_seed(args.seed)
    generator = DCGANGenerator(args.gan_latent_dim, image_size=28, channels=1, width=args.gan_width)
    discriminator = DCGANDiscriminator(image_size=28, channels=1, width=args.gan_width)
    return generator, discriminator


def gan_nets(generator: nn.Module, discriminator: nn.Module, generator_ema: nn.Module) -> nn.ModuleDict:
    """The three networks an arm trains, under the ``DCGAN`` module's names (for comparing weights)."""
    return nn.ModuleDict({"generator": generator, "discriminator": discriminator, "generator_ema": generator_ema})


def gan_datamodule(args: argparse.Namespace) -> FashionMNISTDataModule:
    """The DCGAN's data: source classes, no augmentation, as in ``configs/dcgan/pretrain.yaml``."""
    return FashionMNISTDataModule(
        root=args.root, classes=CLASSES, batch_size=args.gan_batch_size, augment=False, seed=args.seed
    )


def time_gan_trainer(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """``Trainer.fit`` of ``DCGAN`` for ``warmup + gan_steps`` batches (one D and one G step each)."""
    torch.set_num_threads(args.threads)
    timer = GANStepTimer(noise_seed=args.seed)
    trainer = quiet_trainer(2 * (args.warmup + args.gan_steps), timer)  # global_step counts both optimizers' steps
    model = fresh_gan(args)
    trainer.fit(model, datamodule=dm)
    durations = step_durations(timer.times, args.warmup, args.gan_steps)
    nets = gan_nets(model.generator, model.discriminator, model.generator_ema)
    return ArmTiming(
        durations, threads=timer.threads, losses=timer.losses, model=nets, optimizers=trainer.optimizers,
        cpu_s=step_durations(timer.cpu_times, args.warmup, args.gan_steps),
    )  # fmt: skip


def time_gan_plain(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """The DCGAN's hand-written loop (the PyTorch DCGAN tutorial's): same nets, losses, optimizers, data, noise, EMA."""
    torch.set_num_threads(args.threads)
    generator, discriminator = fresh_gan_nets(args)
    generator_ema = copy.deepcopy(generator).requires_grad_(False)
    opt_g = torch.optim.Adam(generator.parameters(), lr=GAN_LR, betas=GAN_BETAS)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=GAN_LR, betas=GAN_BETAS)
    batches = endless(dm.train_dataloader())
    torch.manual_seed(args.seed)  # as GANStepTimer seeds it for the Trainer arm
    noise_stream = NoiseStream(args.seed)  # the module's per-batch noise generators, drawn alike
    noise_stream.start_fit()
    times, cpu_times, fetches, losses = [], [], [], []
    ema_updates = 0
    for _ in range(args.warmup + args.gan_steps):
        start = time.perf_counter()
        real, _ = next(batches)
        fetches.append(time.perf_counter() - start)
        n = real.shape[0]
        noise = noise_stream.next(0, "cpu")
        # D step: the real batch and fresh fakes
        z = torch.randn(n, args.gan_latent_dim, generator=noise)
        with torch.no_grad():
            fake = generator(z)
        d_loss = discriminator_loss(GAN_LOSS, discriminator(real), discriminator(fake))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
        # G step: D's parameters stop requiring gradients before the forward, as the module's
        # toggle_optimizer does, so the backward computes no gradient for D's weights
        discriminator.requires_grad_(False)
        z = torch.randn(n, args.gan_latent_dim, generator=noise)
        g_loss = generator_loss(GAN_LOSS, discriminator(generator(z)))
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        discriminator.requires_grad_(True)
        # EMA of G with the decay warmed up; its BatchNorm statistics are recomputed only when the EMA is
        # used (the DCGAN's default ema_batchnorm="recompute"), which neither arm does while timed
        decay = min(GAN_EMA_DECAY, (1 + ema_updates) / (10 + ema_updates))
        with torch.no_grad():
            torch._foreach_lerp_(list(generator_ema.parameters()), list(generator.parameters()), 1 - decay)
        ema_updates += 1
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
        losses += [d_loss.item(), g_loss.item()]
    fetch = fetches[args.warmup : args.warmup + args.gan_steps]
    durations = step_durations(times, args.warmup, args.gan_steps)
    cpu = step_durations(cpu_times, args.warmup, args.gan_steps)
    nets = gan_nets(generator, discriminator, generator_ema)
    return ArmTiming(durations, fetch, torch.get_num_threads(), losses, cpu, nets, [opt_g, opt_d])


# -- VAE -------------------------------------------------------------------------------------------
def fresh_vae(args: argparse.Namespace) -> VAE:
    """The benchmarked ``VAE`` module (28x28x1), seeded like :func:`fresh_vae_nets`; default optimizer Adam(1e-3)."""
    torch.manual_seed(args.seed)
    model = VAE(
        latent_dim=args.vae_latent_dim, encoder_width=args.vae_width, decoder_width=args.vae_width,
        kl_warmup_steps=args.vae_kl_warmup,
    )  # fmt: skip
    model.noise_stream = NoiseStream(args.seed)  # the noise the hand-written loop draws too
    return model


def fresh_vae_nets(args: argparse.Namespace) -> tuple[ConvEncoder, ConvDecoder]:
    """The same encoder and decoder as :func:`fresh_vae`'s: built in the module's order from the same seed."""
    torch.manual_seed(args.seed)
    encoder = ConvEncoder(28, 1, args.vae_latent_dim, args.vae_width)
    decoder = ConvDecoder(28, 1, args.vae_latent_dim, args.vae_width)
    return encoder, decoder


def vae_nets(encoder: nn.Module, decoder: nn.Module) -> nn.ModuleDict:
    """The two networks an arm trains, under the ``VAE`` module's names (for comparing weights)."""
    return nn.ModuleDict({"encoder": encoder, "decoder": decoder})


def vae_datamodule(args: argparse.Namespace) -> FashionMNISTDataModule:
    """The VAE's data: source classes, no augmentation, as in ``configs/vae/pretrain.yaml``."""
    return FashionMNISTDataModule(
        root=args.root, classes=CLASSES, batch_size=args.vae_batch_size, augment=False, seed=args.seed
    )


def vae_beta(step: int, warmup: int) -> float:
    """The KL weight of optimizer step ``step`` (0-based): ``VAE.kl_weight``'s linear warm-up to beta = 1."""
    return 1.0 * (1.0 if warmup == 0 else min(1.0, step / warmup))


def time_vae_trainer(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """``Trainer.fit`` of ``VAE`` (automatic optimisation) for ``warmup + vae_steps`` steps."""
    torch.set_num_threads(args.threads)
    timer = SeededStepTimer(noise_seed=args.seed)
    trainer = quiet_trainer(args.warmup + args.vae_steps, timer)
    model = fresh_vae(args)
    trainer.fit(model, datamodule=dm)
    durations = step_durations(timer.times, args.warmup, args.vae_steps)
    return ArmTiming(
        durations, threads=timer.threads, losses=timer.losses, model=vae_nets(model.encoder, model.decoder),
        optimizers=trainer.optimizers, cpu_s=step_durations(timer.cpu_times, args.warmup, args.vae_steps),
    )  # fmt: skip


def time_vae_plain(dm: FashionMNISTDataModule, args: argparse.Namespace) -> ArmTiming:
    """The VAE's hand-written loop: same nets, loss, KL warm-up, Adam, data and reparameterisation noise."""
    torch.set_num_threads(args.threads)
    encoder, decoder = fresh_vae_nets(args)
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=VAE_LR)
    batches = endless(dm.train_dataloader())
    torch.manual_seed(args.seed)  # as SeededStepTimer seeds it for the Trainer arm
    noise_stream = NoiseStream(args.seed)  # the module's per-batch noise generators, drawn alike
    noise_stream.start_fit()
    times, cpu_times, fetches, losses = [], [], [], []
    for step in range(args.warmup + args.vae_steps):
        start = time.perf_counter()
        x, _ = next(batches)
        fetches.append(time.perf_counter() - start)
        mu, logvar = encoder(x)
        eps = torch.randn(mu.shape, generator=noise_stream.next(0, "cpu"), dtype=mu.dtype)
        z = mu + eps * (0.5 * logvar).exp()
        rec = F.binary_cross_entropy_with_logits(decoder(z), binarize(x), reduction="none").flatten(1).sum(1)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        loss = (rec + vae_beta(step, args.vae_kl_warmup) * kl).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
        losses.append(loss.item())
    fetch = fetches[args.warmup : args.warmup + args.vae_steps]
    durations = step_durations(times, args.warmup, args.vae_steps)
    cpu = step_durations(cpu_times, args.warmup, args.vae_steps)
    return ArmTiming(durations, fetch, torch.get_num_threads(), losses, cpu, vae_nets(encoder, decoder), [optimizer])


# -- the overhead floor: a one-layer model, so a step is almost nothing but framework ----------------
#: the shipped config whose model settings (optimizer, scheduler, loss), data and trainer pieces the tiny arm takes
OVERHEAD_CONFIG = REPO / "configs" / "classifier" / "fashion_mnist_full.yaml"
#: the rungs of the overhead ladder, each adding one layer to the one before
RUNGS = ("bare", "lightning", "module", "config")
RUNG_TITLES = {
    "bare": "Hand-written loop (one `nn.Linear`, AdamW + OneCycleLR)",
    "lightning": "`Trainer` + a minimal LightningModule (`training_step` returns the loss)",
    "module": "`Trainer` + `ImageClassifier` (our `training_step`, metrics, `self.log`, LR-factor wrapper)",
    "config": "... + the config's callbacks and CSV logger",
}
#: our per-step cost (module and config rungs over Lightning's own) at most this multiple of Lightning's own
TARGET_OURS_VS_LIGHTNING = 1.0


def load_class(path: str) -> type:
    """The class named by a dotted ``class_path`` of a config."""
    module, _, name = path.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def overhead_config() -> dict:
    """:data:`OVERHEAD_CONFIG` as a dict."""
    import yaml

    return yaml.safe_load(OVERHEAD_CONFIG.read_text())


def config_partial(spec: dict) -> Callable:
    """``functools.partial`` of a config's ``{class_path, init_args}`` (an optimizer or a scheduler)."""
    import functools

    return functools.partial(load_class(spec["class_path"]), **spec.get("init_args", {}))


class TinyClassifier(ImageClassifier):
    """``ImageClassifier`` with one ``nn.Linear`` on the flattened image instead of a ResNet.

    Everything per step that is not arithmetic stays: ``training_step``, input check and normalisation,
    torchmetrics, ``self.log``, the named groups and the LR-factor wrapper of the optimizer.
    """

    def __init__(self, num_classes: int, image_size: int = 28, in_channels: int = 1, **kwargs) -> None:
        super().__init__(num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
        self.backbone = nn.Flatten()
        self.head = nn.Linear(in_channels * image_size**2, num_classes)


def fresh_tiny(args: argparse.Namespace) -> TinyClassifier:
    """The tiny model with the optimizer, scheduler and loss of :data:`OVERHEAD_CONFIG`, seeded alike in every rung."""
    model = overhead_config()["model"]["init_args"]
    torch.manual_seed(args.seed)
    return TinyClassifier(
        num_classes=10, label_smoothing=model["label_smoothing"], optimizer=config_partial(model["optimizer"]),
        lr_scheduler=config_partial(model["lr_scheduler"]), scheduler_interval=model["scheduler_interval"],
    )  # fmt: skip


def tiny_datamodule(args: argparse.Namespace) -> FashionMNISTDataModule:
    """The data of :data:`OVERHEAD_CONFIG`: all of Fashion-MNIST's classes, its split, batch size, augmentation."""
    data = overhead_config()["data"]["init_args"]
    return FashionMNISTDataModule(
        root=args.root, classes=data["classes"], val_split=data["val_split"], batch_size=data["batch_size"],
        seed=args.seed,
    )  # fmt: skip


class MinimalModule(L.LightningModule):
    """The least a LightningModule can be: the tiny model's layer, its loss, a plain AdamW + OneCycleLR."""

    def __init__(self, tiny: TinyClassifier) -> None:
        super().__init__()
        self.net = nn.Sequential(tiny.backbone, tiny.head)
        self.tiny = [tiny]  # not a submodule: only for its groups and factories
        self.label_smoothing = tiny.hparams.label_smoothing

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y, label_smoothing=self.label_smoothing)

    def configure_optimizers(self) -> dict:
        optimizer, scheduler = plain_optimizer(self.tiny[0])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def plain_optimizer(tiny: TinyClassifier) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The tiny model's optimizer and scheduler as plain torch builds them: its named groups, no LR-factor wrapper."""
    optimizer = tiny.optimizer_factory(tiny.param_groups())
    return optimizer, tiny.scheduler_factory(optimizer)


def config_trainer_pieces(log_dir: Path) -> dict:
    """The :data:`OVERHEAD_CONFIG` trainer's callbacks and logger (its paths moved into ``log_dir``) and logging
    interval. Not taken: ``deterministic`` (a process-wide torch switch, which would leak into the other rungs)
    and the progress bar (Lightning's, drawing to a terminal; the shipped config leaves it on)."""
    trainer = overhead_config()["trainer"]

    def build(spec: dict) -> object:
        init = dict(spec.get("init_args") or {})
        for key, folder in (("dirpath", "checkpoints"), ("save_dir", "logs")):
            if key in init:
                init[key] = str(log_dir / folder)
        return load_class(spec["class_path"])(**init)

    return {
        "callbacks": [build(spec) for spec in trainer.get("callbacks", [])],
        "logger": build(trainer["logger"]) if trainer.get("logger") else False,
        "log_every_n_steps": trainer.get("log_every_n_steps", 50),
    }


def time_rung(rung: str, dm: FashionMNISTDataModule, args: argparse.Namespace, profiler=None) -> ArmTiming:
    """One rung of the overhead ladder for ``overhead_warmup + overhead_steps`` steps (``profiler``: enabled over
    the timed steps)."""
    import tempfile

    torch.set_num_threads(args.threads)
    warmup, steps = args.overhead_warmup, args.overhead_steps
    if rung == "bare":
        return time_tiny_plain(dm, args, profiler)
    model = fresh_tiny(args)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="speed_overhead_") as log_dir:
        options: dict = {"logger": False, "enable_checkpointing": False, "callbacks": []}
        if rung == "config":
            options = {**config_trainer_pieces(Path(log_dir)), "enable_checkpointing": True}
        callbacks = [timer, *options.pop("callbacks")]
        if profiler is not None:
            callbacks.append(ProfileSteps(profiler, warmup))
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=warmup + steps, limit_val_batches=0, num_sanity_val_steps=0,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **options,
        )  # fmt: skip
        module = MinimalModule(model) if rung == "lightning" else model
        trainer.fit(module, datamodule=dm)
    if profiler is not None:
        profiler.disable()
    return ArmTiming(
        step_durations(timer.times, warmup, steps), threads=timer.threads, losses=timer.losses,
        model=nn.ModuleDict({"head": model.head}), optimizers=trainer.optimizers,
        cpu_s=step_durations(timer.cpu_times, warmup, steps),
    )  # fmt: skip


class ProfileSteps(L.Callback):
    """Starts ``profiler`` at the end of the ``warmup``-th training batch (the caller stops it after the fit)."""

    def __init__(self, profiler, warmup: int) -> None:
        self.profiler, self.warmup, self.batches = profiler, warmup, 0

    def on_train_batch_end(self, *args: object) -> None:
        self.batches += 1
        if self.batches == self.warmup:
            self.profiler.enable()


def time_tiny_plain(dm: FashionMNISTDataModule, args: argparse.Namespace, profiler=None) -> ArmTiming:
    """The bare rung: the tiny model's layer, loss, AdamW and OneCycleLR in a hand-written loop on the same loader."""
    torch.set_num_threads(args.threads)
    model = fresh_tiny(args)
    optimizer, scheduler = plain_optimizer(model)
    net, smoothing = nn.Sequential(model.backbone, model.head).train(), model.hparams.label_smoothing
    batches = endless(dm.train_dataloader())
    times, cpu_times, fetches, losses = [], [], [], []
    for i in range(args.overhead_warmup + args.overhead_steps):
        if i == args.overhead_warmup and profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        x, y = next(batches)
        fetches.append(time.perf_counter() - start)
        loss = F.cross_entropy(net(x), y, label_smoothing=smoothing)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        times.append(time.perf_counter())
        cpu_times.append(time.process_time())
        losses.append(loss.item())
    if profiler is not None:
        profiler.disable()
    warmup, steps = args.overhead_warmup, args.overhead_steps
    return ArmTiming(
        step_durations(times, warmup, steps), fetches[warmup:], torch.get_num_threads(), losses,
        step_durations(cpu_times, warmup, steps), nn.ModuleDict({"head": model.head}), [optimizer],
    )  # fmt: skip


@dataclass
class Ladder:
    """The overhead ladder's repeats: per rung, one :class:`ArmTiming` per repeat; agreement with the bare rung."""

    rungs: dict[str, list[ArmTiming]] = field(default_factory=lambda: {rung: [] for rung in RUNGS})
    agreement: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def ms(self, rung: str, cpu: bool = False) -> float:
        """Median over repeats of the rung's ms per step: its median step (wall) or its mean CPU time per step."""
        values = [1000 * (statistics.mean(a.cpu_s) if cpu else statistics.median(a.step_s)) for a in self.rungs[rung]]
        return statistics.median(values)

    def summary(self) -> dict[str, object]:
        """What the JSON keeps of a run: ms per step of every rung and repeat (wall median, CPU mean)."""
        return {
            rung: {
                "wall_ms": [1000 * statistics.median(a.step_s) for a in arms],
                "cpu_ms": [1000 * statistics.mean(a.cpu_s) for a in arms],
            }
            for rung, arms in self.rungs.items()
        }


def run_ladder_repeat(ladder: Ladder, dm: FashionMNISTDataModule, args: argparse.Namespace, repeat: int) -> None:
    """One repeat of every rung, the order rotated by one rung per repeat; each compared with the bare rung."""
    started = time.perf_counter()
    order = RUNGS[repeat % len(RUNGS) :] + RUNGS[: repeat % len(RUNGS)]
    for rung in order:
        gc.collect()
        ladder.rungs[rung].append(time_rung(rung, dm, args))
    bare = ladder.rungs["bare"][-1]
    differences = [arm_difference(ladder.rungs[rung][-1], bare) for rung in RUNGS[1:]]
    ladder.agreement.append((max(d[0] for d in differences), max(d[1] for d in differences)))
    for rung in RUNGS:
        ladder.rungs[rung][-1].model, ladder.rungs[rung][-1].optimizers = None, []
    ladder.seconds += time.perf_counter() - started
    parts = ", ".join(
        f"{rung} {1000 * statistics.median(ladder.rungs[rung][-1].step_s):.2f}" for rung in RUNGS
    )
    print(
        f"overhead repeat {repeat + 1}/{args.repeats} (ms/step, median step): {parts}; rungs differ from bare by "
        f"{ladder.agreement[-1][0]:.1e} (loss) / {ladder.agreement[-1][1]:.1e} (weights)",
        flush=True,
    )


def ladder_ratios(ladder: Ladder) -> dict[str, float | list[float]]:
    """Trainer (config rung) / bare steps/s per repeat, as :func:`ratios` gives Trainer / hand-written."""
    return ratios(Comparison(trainer=ladder.rungs["config"], plain=ladder.rungs["bare"]))


def package_of(filename: str) -> str:
    """Which package a profiled function belongs to, from its file name."""
    for marker, name in (
        ("/lit_finetune/data/", "lit_finetune.data (ours; the same in every rung)"),
        ("/lit_finetune/", "lit_finetune modules, callbacks, transfer (ours)"),
        ("/benchmarks/", "the benchmark's own loop and timers"),
        ("/lightning_utilities/", "lightning_utilities"), ("/lightning/", "lightning"),
        ("/torchmetrics/", "torchmetrics"), ("/torch/", "torch (Python)"),
    ):  # fmt: skip
        if marker in filename:
            return name
    if filename == "~" or filename.startswith("<built-in"):
        return "C functions (torch kernels and Python built-ins)"
    return "Python standard library and other"


def profile_overhead(dm: FashionMNISTDataModule, args: argparse.Namespace) -> str:
    """cProfile of the bare and the config rungs over their timed steps: per package, then the top functions."""
    import cProfile
    import io
    import pstats

    sections = []
    totals = {}
    for rung in ("bare", "config"):
        profiler = cProfile.Profile()
        time_rung(rung, dm, args, profiler)
        stats = pstats.Stats(profiler)
        total = sum(entry[2] for entry in stats.stats.values())  # internal times add up to the whole
        totals[rung] = total
        per_package: dict[str, float] = {}
        for (filename, _, _), entry in stats.stats.items():
            per_package[package_of(filename)] = per_package.get(package_of(filename), 0.0) + entry[2]
        lines = [
            f"#### {RUNG_TITLES[rung]}: {1000 * total / args.overhead_steps:.2f} ms per step under cProfile",
            "",
            "| Package | ms per step (internal time) | Share |",
            "|---|---|---|",
        ]
        for name, seconds in sorted(per_package.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {name} | {1000 * seconds / args.overhead_steps:.3f} | {100 * seconds / total:.1f}% |")
        ours = sorted(
            ((entry[3], entry[1], f"{Path(filename).parent.name}/{Path(filename).name}:{line}({name})")
             for (filename, line, name), entry in stats.stats.items() if "/lit_finetune/" in filename),
            reverse=True,
        )[:15]  # fmt: skip
        if ours:
            lines += ["", "Our functions by cumulative time (what they call included):", "",
                      "| Function | Calls | ms per step |", "|---|---|---|"]  # fmt: skip
            lines += [f"| `{name}` | {calls} | {1000 * cum / args.overhead_steps:.3f} |" for cum, calls, name in ours]
        for order, count in (("tottime", 25), ("cumulative", 40)):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).strip_dirs().sort_stats(order).print_stats(count)
            body = text.getvalue().split("\n", 1)[1].strip() if "\n" in text.getvalue() else text.getvalue()
            lines += ["", f"Top {count} by {'internal' if order == 'tottime' else 'cumulative'} time "
                      f"({args.overhead_steps} steps):", "", "```", body, "```"]  # fmt: skip
        sections.append("\n".join(lines))
    head = (
        f"cProfile of the overhead ladder's bare and config rungs (`benchmarks/speed.py --models overhead "
        f"--overhead-profile ...`), {args.overhead_steps} timed steps each after {args.overhead_warmup} warm-up steps, "
        f"torch threads {args.threads}, on {cpu_model()}. The profiler slows Python code several times over, so "
        "the ms here are larger than the timed ladder's; what counts is where the time goes. The Trainer rung spends "
        f"{1000 * (totals['config'] - totals['bare']) / args.overhead_steps:.2f} ms per step more than the bare loop "
        "under the profiler."
    )
    return head + "\n\n" + "\n\n".join(sections) + "\n"


def overhead_section(args: argparse.Namespace, ladder: Ladder) -> list[str]:
    """The overhead table: ms per step of every rung, what each adds, and our share against Lightning's."""
    bare, lightning = ladder.ms("bare", cpu=True), ladder.ms("lightning", cpu=True)
    ours = ladder.ms("config", cpu=True) - lightning
    lightning_share = lightning - bare
    ok = ours <= TARGET_OURS_VS_LIGHTNING * lightning_share
    fetch = statistics.median(1000 * statistics.median(a.fetch_s) for a in ladder.rungs["bare"])
    r = ladder_ratios(ladder)
    lines = [
        "#### Overhead floor (one `nn.Linear`)",
        "",
        f"Setup: `{OVERHEAD_CONFIG.relative_to(REPO)}` with its ResNet replaced by one `nn.Linear(784, 10)` on the "
        "flattened image (`TinyClassifier`): its data (all 10 classes, augmentation on), batch size, optimizer, "
        "per-step OneCycleLR and label smoothing, so a step holds almost no arithmetic and the ladder shows what "
        "each layer of framework costs. Each rung adds one layer to the one before; all compute the same losses "
        f"and weights. {args.repeats} repeat(s) x {args.overhead_steps} timed steps after {args.overhead_warmup} "
        f"warm-up steps per rung, the order rotated by one rung per repeat. {ladder.seconds:.0f} s. "
        "ms per step: the CPU time this process spent per timed step (`time.process_time`, mean over the steps: "
        "it leaves out waiting for a busy core and keeps the steps that log) and the median step's wall time; "
        "medians over repeats.",
        "",
        "| Rung | ms/step (CPU) | Adds (CPU ms) | Over the bare loop (CPU ms) | ms/step (wall, median step) |",
        "|---|---|---|---|---|",
    ]
    previous = None
    for rung in RUNGS:
        wall, cpu = ladder.ms(rung), ladder.ms(rung, cpu=True)
        adds = "" if previous is None else f"{cpu - previous:+.3f}"
        lines.append(f"| {RUNG_TITLES[rung]} | {cpu:.3f} | {adds} | {cpu - bare:+.3f} | {wall:.3f} |")
        previous = cpu
    loss_diff = max(a[0] for a in ladder.agreement)
    weight_diff = max(a[1] for a in ladder.agreement)
    lines += [
        "",
        "| Figure | Measured (median of repeats) | Target | Met |",
        "|---|---|---|---|",
        f"| Ours per step (module and config rungs over the minimal LightningModule, CPU ms) | {ours:.3f} | "
        f"<= {TARGET_OURS_VS_LIGHTNING:g} x Lightning's own ({lightning_share:.3f}) | {met(ok)} |",
        f"| Trainer (config rung) / bare loop steps/s, from CPU time | {r['cpu_ratio']:.3f} | | |",
        f"| Trainer (config rung) / bare loop steps/s, from CPU time, range over repeats | {r['cpu_range'][0]:.3f} "
        f"to {r['cpu_range'][1]:.3f} | | |",
        f"| Batch fetch of the bare loop (ms, median) | {fetch:.3f} | | |",
        f"| Rungs agree with the bare loop: largest per-step loss difference | {loss_diff:.1e} | "
        f"<= {AGREEMENT_TOLERANCE:g} | {met(loss_diff <= AGREEMENT_TOLERANCE)} |",
        f"| Rungs agree with the bare loop: largest final weight difference | {weight_diff:.1e} | "
        f"<= {AGREEMENT_TOLERANCE:g} | {met(weight_diff <= AGREEMENT_TOLERANCE)} |",
        "",
        "Per repeat (ms/step from CPU time; the median step's wall time in brackets):",
        "",
        "| Repeat | " + " | ".join(RUNGS) + " |",
        "|---|" + "---|" * len(RUNGS),
    ]
    for i in range(len(ladder.agreement)):
        cells = [
            f"{1000 * statistics.mean(ladder.rungs[rung][i].cpu_s):.3f} "
            f"({1000 * statistics.median(ladder.rungs[rung][i].step_s):.3f})"
            for rung in RUNGS
        ]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return lines


# -- comparing and timing --------------------------------------------------------------------------
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


Arm = Callable[[FashionMNISTDataModule, argparse.Namespace], ArmTiming]


@dataclass
class Comparison:
    """The repeats of one module's two arms (and, for the classifier, of the data path)."""

    trainer: list[ArmTiming] = field(default_factory=list)
    plain: list[ArmTiming] = field(default_factory=list)
    agreement: list[tuple[float, float]] = field(default_factory=list)
    data: list[tuple[float, float]] = field(default_factory=list)
    seconds: float = 0.0


def run_repeat(
    name: str, result: Comparison, dm: FashionMNISTDataModule, args: argparse.Namespace,
    trainer_arm: Arm, plain_arm: Arm, repeat: int,
) -> None:  # fmt: skip
    """One repeat: both arms back to back (Trainer first in even repeats), compared, then freed."""
    started = time.perf_counter()
    arms = [(trainer_arm, result.trainer), (plain_arm, result.plain)]
    for arm, results in arms if repeat % 2 == 0 else arms[::-1]:
        gc.collect()
        results.append(arm(dm, args))
    result.agreement.append(arm_difference(result.trainer[-1], result.plain[-1]))
    for timing in (result.trainer[-1], result.plain[-1]):
        timing.model, timing.optimizers = None, []  # compared; free them before the next repeat
    result.seconds += time.perf_counter() - started
    data = f", data {result.data[-1][0]:.1f} batches/s" if len(result.data) > repeat else ""
    t, p = result.trainer[-1], result.plain[-1]
    print(
        f"{name} repeat {repeat + 1}/{args.repeats}: hand-written {result.plain[-1].steps_per_s:.3f} steps/s, "
        f"Trainer {result.trainer[-1].steps_per_s:.3f} steps/s{data}, ratio {t.steps_per_s / p.steps_per_s:.3f} "
        f"(CPU time {t.cpu_steps_per_s / p.cpu_steps_per_s:.3f}), arms differ by "
        f"{result.agreement[-1][0]:.1e} (loss) / {result.agreement[-1][1]:.1e} (weights)",
        flush=True,
    )


# -- the report ------------------------------------------------------------------------------------
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


def met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def ratios(result: Comparison) -> dict[str, float | list[float]]:
    """Trainer / hand-written per repeat, from CPU time and from wall time; their medians and ranges."""
    cpu = [t.cpu_steps_per_s / p.cpu_steps_per_s for t, p in zip(result.trainer, result.plain)]
    wall = [t.steps_per_s / p.steps_per_s for t, p in zip(result.trainer, result.plain)]
    return {
        "cpu_ratio": statistics.median(cpu), "cpu_range": [min(cpu), max(cpu)], "cpu_per_repeat": cpu,
        "wall_ratio": statistics.median(wall), "wall_range": [min(wall), max(wall)], "wall_per_repeat": wall,
    }  # fmt: skip


def trainer_rows(result: Comparison) -> list[str]:
    """The Trainer-vs-hand-written rows of a figures table; the CPU-time ratio and its range come first."""
    med = statistics.median
    trainer_sps = med(t.steps_per_s for t in result.trainer)
    plain_sps = med(p.steps_per_s for p in result.plain)
    r = ratios(result)
    cpu_ratio, (cpu_low, cpu_high) = r["cpu_ratio"], r["cpu_range"]
    robust = med(t.median_steps_per_s / p.median_steps_per_s for t, p in zip(result.trainer, result.plain))
    overhead_ms = med(
        1000 * (statistics.median(t.step_s) - statistics.median(p.step_s)) for t, p in zip(result.trainer, result.plain)
    )
    return [
        "| Figure | Measured (median of repeats) | Target | Met |",
        "|---|---|---|---|",
        f"| Trainer / hand-written, from CPU time (`time.process_time`) | {cpu_ratio:.3f} | "
        f">= {TARGET_TRAINER_RATIO} | {met(cpu_ratio >= TARGET_TRAINER_RATIO)} |",
        f"| Trainer / hand-written, from CPU time, range over repeats | {cpu_low:.3f} to {cpu_high:.3f} | | |",
        f"| Hand-written loop (steps/s) | {fmt(plain_sps)} | | |",
        f"| Trainer.fit (steps/s) | {fmt(trainer_sps)} | | |",
        f"| Trainer / hand-written, wall time | {r['wall_ratio']:.3f} | | |",
        f"| Trainer / hand-written, wall time, range over repeats | {r['wall_range'][0]:.3f} to "
        f"{r['wall_range'][1]:.3f} | | |",
        f"| Trainer / hand-written, from median step times | {robust:.3f} | | |",
        f"| Trainer / hand-written, ratio of the steps/s above | {trainer_sps / plain_sps:.3f} | | |",
        f"| Trainer step time minus hand-written step time (ms, median step times) | {overhead_ms:+.1f} | | |",
        f"| Batch fetch share of a hand-written step | {100 * med(p.fetch_share for p in result.plain):.1f}% | | |",
    ]


def agreement_rows(result: Comparison) -> list[str]:
    loss_diff = max(a[0] for a in result.agreement)
    weight_diff = max(a[1] for a in result.agreement)
    return [
        f"| Arms agree: largest per-step loss difference | {loss_diff:.1e} | <= {AGREEMENT_TOLERANCE:g} | "
        f"{met(loss_diff <= AGREEMENT_TOLERANCE)} |",
        f"| Arms agree: largest final weight difference | {weight_diff:.1e} | <= {AGREEMENT_TOLERANCE:g} | "
        f"{met(weight_diff <= AGREEMENT_TOLERANCE)} |",
    ]


def repeat_rows(result: Comparison) -> list[str]:
    """The per-repeat table (the arm that ran first is marked *)."""
    with_data = bool(result.data)
    lines = [
        "Per repeat (the arm that ran first in a repeat is marked *):",
        "",
        "| Repeat | Hand-written (steps/s) | Trainer (steps/s) | Trainer / hand-written | Same, from CPU time |"
        + (" Data (batches/s) |" if with_data else ""),
        "|---|---|---|---|---|" + ("---|" if with_data else ""),
    ]
    for i, (t, p) in enumerate(zip(result.trainer, result.plain)):
        t_mark, p_mark = ("*", "") if i % 2 == 0 else ("", "*")
        data = f" {fmt(result.data[i][0])} |" if with_data else ""
        ratios = f"{t.steps_per_s / p.steps_per_s:.3f} | {t.cpu_steps_per_s / p.cpu_steps_per_s:.3f}"
        lines.append(f"| {i + 1} | {fmt(p.steps_per_s)}{p_mark} | {fmt(t.steps_per_s)}{t_mark} | {ratios} |{data}")
    return lines


def classifier_section(args: argparse.Namespace, result: Comparison) -> list[str]:
    med = statistics.median
    model_sps = med(p.compute_steps_per_s for p in result.plain)
    data_bps = med(d[0] for d in result.data)
    data_ratio = data_bps / model_sps
    return [
        "#### `ImageClassifier`",
        "",
        f"Setup: `ImageClassifier(num_classes={len(CLASSES)})` (resnet_small, 28x28x1), "
        f"`FashionMNISTDataModule(classes={CLASSES}, batch_size={args.batch_size})` train loader "
        "(augmentation on, `num_workers=0`), AdamW from `configure_optimizers()`. "
        f"{args.repeats} repeat(s) x {args.steps} timed steps after {args.warmup} warm-up step(s) per arm; "
        f"data path: {args.data_batches} batches after {args.warmup} warm-up batch(es). "
        f"{result.seconds:.0f} s. A step: one batch, one optimizer step. The Trainer arm runs the module's "
        "`training_step` (torchmetrics update and `self.log` included); the hand-written arm only `model(x)` + "
        "`F.cross_entropy`. Both arms start from the same weights and see the same batches, so they compute the "
        "same losses and end with the same weights (the 'Arms agree' rows, over every step and repeat).",
        "",
        *trainer_rows(result),
        f"| Data path (batches/s) | {fmt(data_bps)} | | |",
        f"| Data path (images/s) | {fmt(med(d[1] for d in result.data))} | | |",
        f"| Model step alone (steps/s, hand-written minus batch fetch) | {fmt(model_sps)} | | |",
        f"| Data path / model step | {data_ratio:.1f} | >= {TARGET_DATA_RATIO:g} | "
        f"{met(data_ratio >= TARGET_DATA_RATIO)} |",
        *agreement_rows(result),
        "",
        *repeat_rows(result),
    ]


def gan_section(args: argparse.Namespace, result: Comparison) -> list[str]:
    width, latent = args.gan_width, args.gan_latent_dim
    return [
        "#### `DCGAN`",
        "",
        f"Setup: `DCGAN(latent_dim={latent}, generator_width={width}, discriminator_width={width}, "
        f"loss='{GAN_LOSS}', ema_decay={GAN_EMA_DECAY})` (28x28x1, unconditional, the sizes of "
        "`configs/dcgan/pretrain.yaml`), "
        f"`FashionMNISTDataModule(classes={CLASSES}, batch_size={args.gan_batch_size}, augment=False)` train loader; "
        f"Adam(lr={GAN_LR:g}, betas={GAN_BETAS}) for G and for D. "
        f"{args.repeats} repeat(s) x {args.gan_steps} timed steps after {args.warmup} warm-up step(s) per arm. "
        f"{result.seconds:.0f} s. A step: one batch, i.e. one D update (real batch and fresh fakes) and one G update, "
        "then the EMA update of G, in both arms. The Trainer arm runs the module under manual optimisation "
        "(`toggle_optimizer`, `manual_backward`, finite-loss checks, `self.log_dict`, the EMA in "
        "`on_train_batch_end`); the hand-written arm runs `DCGANGenerator` and `DCGANDiscriminator` with "
        "`discriminator_loss` / `generator_loss` and two `torch.optim.Adam`, as the PyTorch DCGAN tutorial does. "
        "Both arms do the same work in the G step: D's parameters stop requiring gradients before the G forward "
        "(the module's `toggle_optimizer`, the hand-written loop's `discriminator.requires_grad_(False)`), so "
        "neither computes D's weight gradients there; in the D step G runs under `torch.no_grad()` in both. "
        "Both arms start from the same weights, see the same batches and seed the global RNG the same way when "
        "training starts (the noise), so they compute the same D and G losses and end with the same G, D and EMA "
        "weights (the 'Arms agree' rows).",
        "",
        *trainer_rows(result),
        *agreement_rows(result),
        "",
        *repeat_rows(result),
    ]


def vae_section(args: argparse.Namespace, result: Comparison) -> list[str]:
    width, latent = args.vae_width, args.vae_latent_dim
    return [
        "#### `VAE`",
        "",
        f"Setup: `VAE(latent_dim={latent}, encoder_width={width}, decoder_width={width}, "
        f"kl_warmup_steps={args.vae_kl_warmup})` (28x28x1, Bernoulli likelihood on the binarised pixels, the sizes "
        "of `configs/vae/pretrain.yaml`), "
        f"`FashionMNISTDataModule(classes={CLASSES}, batch_size={args.vae_batch_size}, augment=False)` train loader; "
        f"Adam(lr={VAE_LR:g}) over the encoder and decoder (the module's default optimizer, over its named groups). "
        f"{args.repeats} repeat(s) x {args.vae_steps} timed steps after {args.warmup} warm-up step(s) per arm. "
        f"{result.seconds:.0f} s. A step: one batch, one optimizer step. The Trainer arm runs the module under "
        "automatic optimisation (its `training_step` logs train/rec, kl, elbo and beta with `self.log_dict` on the "
        "steps Lightning writes to loggers, every `log_every_n_steps` = 50, an epoch's last batch and the fit's last "
        "step, as for every user (see `VAE`'s docstring): once in the timed window, at the last step); "
        "the hand-written arm runs `ConvEncoder` and `ConvDecoder` with the same loss, "
        "`(rec + beta * kl).mean()` (reparameterised `z`, `binary_cross_entropy_with_logits` on the binarised "
        "batch, the Gaussian KL, beta warmed up linearly as `kl_weight()` does) and one `torch.optim.Adam`. "
        "Both arms start from the same weights, see the same batches and seed the global RNG the same way when "
        "training starts (the reparameterisation noise), so they compute the same losses and end with the same "
        "encoder and decoder weights (the 'Arms agree' rows).",
        "",
        *trainer_rows(result),
        *agreement_rows(result),
        "",
        *repeat_rows(result),
    ]


def settings(args: argparse.Namespace) -> dict[str, object]:
    """The run's settings that decide its figures (not where files are read or written)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in ("output", "root", "overhead_profile")}


def previous_runs(output: Path | None) -> list[dict]:
    """The runs recorded in ``output``'s JSON (every run written there before), oldest first."""
    if output is None or not output.with_suffix(".json").is_file():
        return []
    data = json.loads(output.with_suffix(".json").read_text()).get("data") or {}
    return list(data.get("runs", []))


TITLES = {"classifier": "ImageClassifier", "dcgan": "DCGAN", "vae": "VAE", "overhead": "one-layer overhead floor"}


def headline(results: dict[str, Comparison], ladder: Ladder | None = None) -> str:
    """The headline: per module, Trainer / hand-written from CPU time, with its range over repeats."""
    titles = TITLES
    parts = []
    everything = {name: ratios(result) for name, result in results.items()}
    if ladder is not None:
        everything["overhead"] = ladder_ratios(ladder)
    for name, r in everything.items():
        count = len(ladder.agreement) if name == "overhead" else len(results[name].trainer)
        parts.append(
            f"`{titles[name]}` {r['cpu_ratio']:.3f} ({r['cpu_range'][0]:.3f} to {r['cpu_range'][1]:.3f} over "
            f"{count} repeat(s))"
        )
    if ladder is not None:
        ours = ladder.ms("config", cpu=True) - ladder.ms("lightning", cpu=True)
        parts[-1] += (
            f", i.e. {ladder.ms('bare', cpu=True):.2f} CPU ms per bare step against {ladder.ms('config', cpu=True):.2f} "
            f"ms under the Trainer with our module and callbacks, {ours:.2f} ms of them ours"
        )
    return "**Trainer / hand-written steps/s from CPU time, median (range over repeats):** " + "; ".join(parts) + "."


def history_rows(runs: list[dict], current: dict[str, object]) -> list[str]:
    """Every run recorded for this table (this one last), none dropped: when, commit, load, ratios per module."""
    titles = TITLES
    lines = [
        f"All {len(runs)} run(s) written to this file (from its JSON; this run last; 'same settings' compares the "
        "options with this run's). Trainer / hand-written from CPU time, median (range), then from wall time:",
        "",
        "| Run | Finished (UTC) | Commit | Load start / end | Same settings | Module | CPU time | Wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, run in enumerate(runs, 1):
        record = run["provenance"]
        commit = record["commit"][:10] + ("+dirty" if record["dirty"] else "")
        load = f"{record['load_1min_start']} / {record['load_1min_end']}"
        same = "yes" if record.get("config") == current else "**no**"
        for name, r in run["ratios"].items():
            lines.append(
                f"| {i} | {record['finished_utc']} | {commit} | {load} | {same} | {titles[name]} | "
                f"{r['cpu_ratio']:.3f} ({r['cpu_range'][0]:.3f} to {r['cpu_range'][1]:.3f}) | "
                f"{r['wall_ratio']:.3f} ({r['wall_range'][0]:.3f} to {r['wall_range'][1]:.3f}) |"
            )
    overhead = [(i, run) for i, run in enumerate(runs, 1) if run.get("overhead")]
    if overhead:
        lines += [
            "",
            "Overhead floor of every run that measured it: CPU ms per step (median over repeats; the median step's "
            "wall time in brackets), 'ours' = config rung minus the minimal LightningModule, from CPU time:",
            "",
            "| Run | Commit | " + " | ".join(RUNGS) + " | Ours |",
            "|---|---|" + "---|" * (len(RUNGS) + 1),
        ]
        for i, run in overhead:
            record, ladder = run["provenance"], run["overhead"]
            commit = record["commit"][:10] + ("+dirty" if record["dirty"] else "")
            cpu = {rung: statistics.median(ladder[rung]["cpu_ms"]) for rung in RUNGS}
            cells = [f"{cpu[rung]:.3f} ({statistics.median(ladder[rung]['wall_ms']):.3f})" for rung in RUNGS]
            lines.append(f"| {i} | {commit} | " + " | ".join(cells) + f" | {cpu['config'] - cpu['lightning']:.3f} |")
    return lines


def report(
    args: argparse.Namespace, results: dict[str, Comparison], loads: tuple[str, str], elapsed: float,
    runs: list[dict] | None = None, ladder: Ladder | None = None,
) -> str:  # fmt: skip
    """The markdown report: headline; machine and timing; per module its setup, figures, every repeat; every run."""
    arms = [a for result in results.values() for a in result.trainer + result.plain]
    arms += [a for rung in (ladder.rungs.values() if ladder else []) for a in rung]
    threads = ", ".join(map(str, sorted({a.threads for a in arms})))
    titles = TITLES
    quoted = [f"`{titles[name]}`" for name in results] + (["the one-layer overhead floor"] if ladder else [])
    names = " and ".join(quoted) if len(quoted) < 3 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
    lines = [
        headline(results, ladder),
        "",
        f"{names} under `lightning.Trainer` against hand-written PyTorch loops of the same networks, data and batch. "
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch threads {threads}; torch {torch.__version__}, "
        f"lightning {L.__version__}, Python {platform.python_version()}; CPU, fp32. 1-minute load average {loads[0]} "
        f"at start, {loads[1]} at end (other processes on the machine slow both arms; the ratios are the figures). "
        f"Total run {elapsed:.0f} s.{' **--quick: a smoke test, not a measurement.**' if args.quick else ''}",
        "",
        f"Timing: {TIMING_METHOD}. Steps/s of a run: timed steps over their total time. Trainer / hand-written: "
        "the median over repeats of the ratio within each repeat (the two arms of a repeat run back to back, so "
        "they share the machine's load); 'from median step times' uses each run's median step time instead, "
        "which ignores bursts of other processes; 'from CPU time' divides by the CPU seconds this process "
        "spent in the timed steps (`time.process_time`, one torch thread), which leaves out the time spent waiting "
        "for a core (other processes still slow it through shared caches and memory bandwidth). "
        "Trainer: no logger, no checkpointing, no progress bar, no model summary, no validation.",
    ]
    sections = {"classifier": classifier_section, "dcgan": gan_section, "vae": vae_section}
    for name, result in results.items():
        lines += ["", *sections[name](args, result)]
    if ladder is not None:
        lines += ["", *overhead_section(args, ladder)]
    if runs:
        lines += ["", "#### Every run", "", *history_rows(runs, settings(args))]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="modules to benchmark")
    parser.add_argument("--steps", type=int, default=25, help="timed classifier steps per arm and repeat")
    parser.add_argument("--gan-steps", type=int, default=20, help="timed DCGAN steps (batches) per arm and repeat")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (and data batches) first, >= 1")
    parser.add_argument("--repeats", type=int, default=6, help="repeats of every arm, order alternating")
    parser.add_argument("--data-batches", type=int, default=150, help="timed batches of the data path")
    parser.add_argument("--batch-size", type=int, default=128, help="classifier batch size")
    parser.add_argument("--gan-batch-size", type=int, default=128, help="DCGAN batch size")
    parser.add_argument("--gan-width", type=int, default=32, help="DCGAN generator and discriminator width")
    parser.add_argument("--gan-latent-dim", type=int, default=64, help="DCGAN noise size")
    parser.add_argument("--vae-steps", type=int, default=25, help="timed VAE steps per arm and repeat")
    parser.add_argument("--vae-batch-size", type=int, default=128, help="VAE batch size")
    parser.add_argument("--vae-width", type=int, default=32, help="VAE encoder and decoder width")
    parser.add_argument("--vae-latent-dim", type=int, default=16, help="VAE latent size")
    parser.add_argument("--vae-kl-warmup", type=int, default=500, help="VAE KL warm-up steps (beta 0 -> 1)")
    parser.add_argument("--overhead-steps", type=int, default=300, help="timed steps per overhead rung and repeat")
    parser.add_argument("--overhead-warmup", type=int, default=20, help="untimed steps first in each overhead rung")
    parser.add_argument(
        "--overhead-profile", type=Path, default=None,
        help="also cProfile the overhead floor's bare and config rungs and write the summary here (markdown)",
    )  # fmt: skip
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
        args.steps, args.gan_steps, args.vae_steps, args.warmup, args.repeats, args.data_batches = 2, 2, 2, 1, 1, 5
        args.overhead_steps, args.overhead_warmup = 3, 2
    if args.output is None and not args.quick:
        args.output = DEFAULT_OUTPUT
    counts = (args.steps, args.gan_steps, args.vae_steps, args.warmup, args.repeats, args.data_batches, args.threads,
              args.overhead_steps, args.overhead_warmup)  # fmt: skip
    if min(counts) < 1:
        parser.error(
            "--steps, --gan-steps, --vae-steps, --warmup, --repeats, --data-batches, --threads, --overhead-steps and "
            "--overhead-warmup must be >= 1"
        )
    if args.vae_kl_warmup < 0:
        parser.error("--vae-kl-warmup must be >= 0")
    args.models = [name for name in MODELS if name in args.models]  # report order, no duplicates
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark, print the markdown and write it to ``--output``; return it."""
    run = provenance.Run.start(__file__, argv)
    args = parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)  # torch 2.14 vs lightning 2.6, once per fit
    # the DCGAN keeps its EMA generator in eval mode on purpose (it is never trained, only averaged)
    warnings.filterwarnings("ignore", ".*module\\(s\\) in eval mode at the start of training.*")
    # the overhead floor's config rung keeps the config's best-by-val/acc checkpoint but times no validation
    warnings.filterwarnings("ignore", ".*could not find the monitored key.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    started, load_start = time.perf_counter(), load_average()

    results: dict[str, Comparison] = {}
    if "classifier" in args.models:
        dm = FashionMNISTDataModule(root=args.root, classes=CLASSES, batch_size=args.batch_size, seed=args.seed)
        dm.setup("fit")  # once: the Trainer's own setup call then finds the splits built
        result = results["classifier"] = Comparison()
        for repeat in range(args.repeats):
            result.data.append(time_data(dm, args))
            run_repeat("classifier", result, dm, args, time_trainer, time_plain, repeat)
    if "dcgan" in args.models:
        dm = gan_datamodule(args)
        dm.setup("fit")
        result = results["dcgan"] = Comparison()
        for repeat in range(args.repeats):
            run_repeat("dcgan", result, dm, args, time_gan_trainer, time_gan_plain, repeat)
    if "vae" in args.models:
        dm = vae_datamodule(args)
        dm.setup("fit")
        result = results["vae"] = Comparison()
        for repeat in range(args.repeats):
            run_repeat("vae", result, dm, args, time_vae_trainer, time_vae_plain, repeat)
    ladder = None
    if "overhead" in args.models:
        dm = tiny_datamodule(args)
        dm.setup("fit")
        ladder = Ladder()
        for repeat in range(args.repeats):
            run_ladder_repeat(ladder, dm, args, repeat)
        if args.overhead_profile is not None:
            profile = profile_overhead(dm, args)
            run.write(args.overhead_profile, profile, record=run.record(config=settings(args)))
            print(f"wrote {args.overhead_profile}")

    # every run written to the output is kept in its JSON and shown in the report (none dropped)
    record = run.record(config=settings(args))
    this_run = {"provenance": record, "ratios": {n: ratios(r) for n, r in results.items()}}
    if ladder is not None:
        this_run["ratios"]["overhead"] = ladder_ratios(ladder)
        this_run["overhead"] = ladder.summary()
    runs = [*previous_runs(args.output), this_run]
    markdown = report(args, results, (load_start, load_average()), time.perf_counter() - started, runs, ladder)
    print(markdown)
    if args.output is not None:
        run.write(args.output, markdown, data={"runs": runs}, record=record)
        print(f"wrote {args.output} and {args.output.with_suffix('.json').name}")
    return markdown


if __name__ == "__main__":
    main()
