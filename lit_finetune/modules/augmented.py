"""GAN-augmented classification: an :class:`ImageClassifier` trained on real images plus labelled
samples of a frozen class-conditional generator ``G(z, y)``."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_finetune.modules.base import NoiseStream
from lit_finetune.modules.classifier import ImageClassifier
from lit_finetune.modules.loading import CheckpointLoadError, load_module_checkpoint

#: checkpoint key of the synthetic-sample stream (its seed and how many batches it has drawn)
SYNTHETIC_STATE_KEY = "lit_finetune_synthetic_state"


def balanced_labels(n: int, num_classes: int, offset: int) -> torch.Tensor:
    """``n`` labels cycling through the classes from ``offset``: class counts differ by at most one."""
    return (torch.arange(n) + offset) % num_classes


def load_generator(source: str | Path, ema: bool | None = None) -> nn.Module:
    """The ``G(z, y)`` network of a generative module's checkpoint (a :class:`~lit_finetune.DCGAN`)."""
    module = load_module_checkpoint(source, role="generator (--model.generator)")
    if not hasattr(module, "generator_network"):
        raise CheckpointLoadError(
            f"The generator {str(source)!r} is a {type(module).__name__} checkpoint, which has no G(z, y); "
            "pass a conditional DCGAN checkpoint (lit-finetune fit --config configs/augmented/cdcgan_target.yaml)."
        )
    return module.generator_network(ema)


def load_teacher(source: str | Path) -> nn.Module:
    """The classifier of an :class:`ImageClassifier` checkpoint, for the confidence filter."""
    module = load_module_checkpoint(source, role="teacher (--model.teacher)")
    if not isinstance(module, ImageClassifier):
        raise CheckpointLoadError(
            f"The teacher {str(source)!r} is a {type(module).__name__} checkpoint; pass an ImageClassifier's "
            "(e.g. the real-only baseline trained on the same images)."
        )
    return module


class GANAugmentedClassifier(ImageClassifier):
    """An :class:`ImageClassifier` whose training batches add samples of a frozen generator ``G(z, y)``.

    Each training batch of ``B`` real images gets ``round(synthetic_ratio * B)`` synthetic images
    with class-balanced labels (counts differ by at most one), and the classifier's loss runs on
    the concatenation. ``synthetic_only=True`` trains on ``B`` synthetic images per batch and drops
    the real ones (the real loader only sets the batch size and the epoch length): a classifier
    trained that way and tested on real data gives the Classification Accuracy Score (CAS,
    Ravuri & Vinyals 2019). ``synthetic_ratio=0`` is the real-only baseline with the same code.

    Everything else is :class:`ImageClassifier`'s: network, metrics, pretrained loading (augment and
    fine-tune together), L2-SP, parameter groups. Validation, test and predict see real images only.

    The generator is frozen: in eval mode, gradients off, held outside the module's children so it is
    in no optimizer, no DDP wrapper and no checkpoint. A generator or teacher passed as an ``nn.Module``
    is used as it is, not copied: it is changed in place, put in eval mode with ``requires_grad=False``
    and moved (every parameter and buffer) to the classifier's device; pass a ``copy.deepcopy`` to keep
    your own module as it was. A path is read when a fit starts (also
    ``fit --ckpt_path`` resumes, which need the file); testing and predicting never read it.
    Synthetic images are not passed through the datamodule's augmentation; the real ones are.

    The synthetic stream is seeded per batch from ``synthetic_seed``, the global rank and a batch
    counter kept in the checkpoint, so each DDP rank draws different samples and a resumed fit
    draws what the uninterrupted one would have.

    Args:
        num_classes: classes of the real data; the generator must be conditioned on the same.
        generator: a conditional generator's checkpoint (a :class:`~lit_finetune.DCGAN` trained with
            ``conditional: true``), or any ``nn.Module`` mapping ``(z (B, latent_dim), y (B,))`` to
            ``[-1, 1]`` images ``(B, C, H, W)``. Needed to fit unless ``synthetic_ratio=0``.
        synthetic_ratio: synthetic images per real image in a training batch.
        synthetic_only: train on synthetic images only (CAS).
        generator_ema: for a DCGAN checkpoint, sample from its EMA generator (``True``) or its raw one
            (``False``); ``None`` uses the checkpoint's own ``evaluate_ema``.
        latent_dim: size of ``z``; ``None`` reads the generator's ``latent_dim`` attribute.
        teacher: an :class:`ImageClassifier` checkpoint (or a module returning logits) for the
            confidence filter: a sample is kept only if the teacher gives its label a probability
            of at least ``confidence_threshold``. Rejected slots are redrawn (same label, new ``z``)
            up to ``filter_max_rounds`` times, so the kept samples stay class-balanced; logs
            ``train/synthetic_acceptance`` (kept / drawn) and ``train/synthetic_filled``
            (kept / asked for).
        confidence_threshold: the filter's threshold τ. A teacher trained with label smoothing ε over
            K classes gives its top class at most about ``1 - ε + ε / K`` (0.92 for ε = 0.1, K = 5), so
            τ near that cap rejects nearly everything; the benchmark uses 0.8.
        filter_max_rounds: draws per slot before a slot is left empty. With ``synthetic_only``, a batch whose
            slots are all left empty is skipped with a warning (on one process) or stops the fit with the fix
            (under DDP, where one rank cannot skip a step alone).
        synthetic_seed: seed of the synthetic stream; ``None`` draws one from the global RNG at the
            first fit (so ``seed_everything`` fixes it).
        **classifier_args: :class:`ImageClassifier`'s arguments (``backbone``, ``pretrained``,
            ``l2sp_alpha``, ``optimizer``...).
    """

    hparams_ignore = (*ImageClassifier.hparams_ignore, "generator", "teacher")
    noise_stream_key = SYNTHETIC_STATE_KEY
    runtime_options = ("generator", "teacher", "generator_ema", "latent_dim", "compile_mode")

    def __init__(
        self,
        num_classes: int,
        generator: str | nn.Module | None = None,
        synthetic_ratio: float = 0.5,
        synthetic_only: bool = False,
        generator_ema: bool | None = None,
        latent_dim: int | None = None,
        teacher: str | nn.Module | None = None,
        confidence_threshold: float = 0.9,
        filter_max_rounds: int = 10,
        synthetic_seed: int | None = None,
        **classifier_args: Any,
    ) -> None:
        # Lightning's records in a checkpoint's hyper-parameters (the class, LightningCLI's instantiator), which
        # load_from_checkpoint hands back as keyword arguments: not ImageClassifier's
        for key in ("_class_path", "_instantiator"):
            classifier_args.pop(key, None)
        super().__init__(num_classes, **classifier_args)
        if synthetic_ratio < 0:
            raise ValueError(f"synthetic_ratio must be >= 0, got {synthetic_ratio}")
        if not 0 <= confidence_threshold <= 1 or filter_max_rounds < 1:
            raise ValueError(
                f"need 0 <= confidence_threshold <= 1 and filter_max_rounds >= 1, got {confidence_threshold} "
                f"and {filter_max_rounds}"
            )
        # the checkpoint keeps the paths (provenance), never the networks, and never needs them
        self.hparams["generator"] = str(generator) if isinstance(generator, (str, Path)) else None
        self.hparams["teacher"] = str(teacher) if isinstance(teacher, (str, Path)) else None
        # A plain dict, not submodules: outside parameters(), state_dict(), optimizers and DDP.
        self._frozen: dict[str, nn.Module] = {}
        self._sources = {"generator": generator, "teacher": teacher}
        # the synthetic stream (started at fit start only when it is used, so real-only fits draw nothing)
        self.noise_stream = NoiseStream(synthetic_seed) if self.uses_synthetic else None

    # -- the frozen networks -----------------------------------------------------------------------
    @property
    def uses_synthetic(self) -> bool:
        return self.hparams.synthetic_only or self.hparams.synthetic_ratio > 0

    def _resolve(self, name: str) -> nn.Module | None:
        if name not in self._frozen:
            source = self._sources[name]
            if source is None:
                return None
            if isinstance(source, nn.Module):
                net = source
            elif name == "generator":
                net = load_generator(source, self.hparams.generator_ema)
            else:
                net = load_teacher(source)
            self._frozen[name] = net.requires_grad_(False).eval()
        net = self._frozen[name]
        # every tensor, buffers too: a generator without parameters, or one spread over devices, must move as well
        if any(t.device != self.device for t in itertools.chain(net.parameters(), net.buffers())):
            net.to(self.device)
        return net.eval()

    @property
    def generator(self) -> nn.Module | None:
        """The frozen ``G(z, y)`` (read from its checkpoint on first use), or ``None``."""
        return self._resolve("generator")

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher of the confidence filter, or ``None``."""
        return self._resolve("teacher")

    def _latent_dim(self, generator: nn.Module) -> int:
        latent_dim = self.hparams.latent_dim or getattr(generator, "latent_dim", None)
        if not latent_dim:
            raise ValueError(
                f"{type(generator).__name__} has no latent_dim attribute; pass latent_dim= (the size of its z)."
            )
        return int(latent_dim)

    def check_generator(self) -> None:
        """Fail before training, with the fix, when ``G(z, y)`` cannot feed this classifier."""
        generator = self.generator
        if generator is None:
            raise ValueError(
                f"{type(self).__name__} needs a generator to fit with synthetic_ratio={self.hparams.synthetic_ratio}"
                f"{' and synthetic_only=True' if self.hparams.synthetic_only else ''}: pass --model.generator "
                "<conditional DCGAN .ckpt> (or generator=<nn.Module>), or synthetic_ratio=0 for real-only training."
            )
        classes = getattr(generator, "num_classes", "unknown")
        if classes is None:
            raise ValueError(
                "The generator is unconditional (num_classes=None); synthetic labels need G(z, y). Train it with "
                "conditional: true (configs/augmented/cdcgan_target.yaml)."
            )
        if classes != "unknown" and classes != self.num_classes:
            raise ValueError(
                f"The generator was trained on {classes} classes, the classifier has num_classes={self.num_classes}. "
                "Train the generator on the classifier's data (same classes, same order)."
            )
        names = getattr(generator, "class_names", None)  # a DCGAN's generator_network() knows its data's names
        if names and self.class_names_from_data and list(names) != self.class_names:
            raise ValueError(
                f"The generator's labels 0..{len(names) - 1} are the classes {list(names)}, the classifier's data has "
                f"{self.class_names}: its samples would carry other classes' labels. Train the generator on the "
                "classifier's data (same classes, same order)."
            )
        z = torch.zeros(self.num_classes, self._latent_dim(generator), device=self.device)
        try:
            with torch.no_grad():
                images = generator(z, torch.arange(self.num_classes, device=self.device))
        except (IndexError, RuntimeError) as err:
            raise ValueError(
                f"The generator failed on labels 0..{self.num_classes - 1} ({type(err).__name__}: {err}); is it "
                f"conditioned on num_classes={self.num_classes}?"
            ) from err
        expected = (self.num_classes, self.in_channels, self.image_size, self.image_size)
        if tuple(images.shape) != expected:
            raise ValueError(
                f"The generator makes images of shape {tuple(images.shape)[1:]}, the classifier takes "
                f"{expected[1:]}. Train the generator on the same data (channels, image_size)."
            )
        if self.teacher is not None and getattr(self.teacher, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(
                f"The teacher has {self.teacher.num_classes} classes, the classifier num_classes={self.num_classes}."
            )

    # -- lifecycle -------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.uses_synthetic:
            self.check_generator()  # before any training, with the fix

    def on_fit_start(self) -> None:
        super().on_fit_start()  # starts the synthetic stream
        if not self.uses_synthetic:
            return
        mode = (
            "synthetic images only (CAS)"
            if self.hparams.synthetic_only
            else (f"{self.hparams.synthetic_ratio} synthetic images per real image")
        )
        if self.teacher is not None:
            mode += f", kept if the teacher's probability of their label >= {self.hparams.confidence_threshold}"
        rank_zero_info(f"{type(self).__name__}: training on {mode}")

    # -- synthetic images -----------------------------------------------------------------------------
    def _stream(self) -> torch.Generator:
        """This batch's random stream: different on every rank and batch, the same after a resume."""
        if self.noise_stream is None:  # drawn from outside a fit in real-only mode
            self.noise_stream = NoiseStream(self.hparams.synthetic_seed)
        return self.noise_generator()

    @torch.no_grad()
    def draw_synthetic(self, n: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """``n`` class-balanced synthetic images and their labels (fewer if the filter rejects
        a slot ``filter_max_rounds`` times), plus the filter's statistics."""
        generator = self.generator
        if generator is None:
            raise ValueError("draw_synthetic needs a generator (generator=...).")
        stream = self._stream()
        latent_dim = self._latent_dim(generator)
        offset = int(torch.randint(0, self.num_classes, (), generator=stream, device=self.device).item())
        labels = balanced_labels(n, self.num_classes, offset).to(self.device)
        images = generator(torch.randn(n, latent_dim, generator=stream, device=self.device), labels)
        teacher = self.teacher
        if teacher is None or n == 0:
            return images, labels, {}
        threshold = self.hparams.confidence_threshold
        accepted = torch.zeros(n, dtype=torch.bool, device=self.device)
        drawn = 0
        for round_index in range(self.hparams.filter_max_rounds):
            slots = (~accepted).nonzero().squeeze(1)
            if len(slots) == 0:
                break
            if round_index > 0:  # redraw the rejected slots: same labels, new noise
                z = torch.randn(len(slots), latent_dim, generator=stream, device=self.device)
                images[slots] = generator(z, labels[slots]).to(images.dtype)
            drawn += len(slots)
            probs = teacher(images[slots]).float().softmax(dim=-1)
            accepted[slots] = probs.gather(1, labels[slots, None]).squeeze(1) >= threshold
        kept = int(accepted.sum())
        stats = {"synthetic_acceptance": kept / drawn, "synthetic_filled": kept / n}
        return images[accepted], labels[accepted], stats

    def _skip_empty_synthetic_batch(self) -> None:
        """The teacher rejected every draw of a synthetic-only batch: nothing to train on (a mean over no image
        is NaN). Lightning skips the step when training_step returns None, on one process only."""
        fix = (f"lower confidence_threshold (now {self.hparams.confidence_threshold}) or raise filter_max_rounds "
               f"(now {self.hparams.filter_max_rounds})")  # fmt: skip
        if self.trainer.world_size > 1:
            raise RuntimeError(f"The teacher rejected every synthetic image of a batch (synthetic_only): {fix}.")
        rank_zero_warn(f"The teacher rejected every synthetic image of a batch, which is skipped: {fix}.")
        return None

    # -- training ------------------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if not self.uses_synthetic:
            return super().training_step(batch, batch_idx)
        n = len(x) if self.hparams.synthetic_only else round(self.hparams.synthetic_ratio * len(x))
        x_syn, y_syn, stats = self.draw_synthetic(n)
        x_syn = x_syn.to(x.dtype)
        if stats:
            self.log_train_step(lambda: {f"train/{k}": v for k, v in stats.items()}, batch_idx, batch_size=n)
        if self.hparams.synthetic_only:
            if len(x_syn) == 0:
                return self._skip_empty_synthetic_batch()
            return super().training_step((x_syn, y_syn), batch_idx)
        return super().training_step((torch.cat([x, x_syn]), torch.cat([y, y_syn])), batch_idx)
