"""DCGAN pretraining and fine-tuning: TransferGAN, FreezeD, L2-SP, CDC, EWC, DiffAugment, an EMA generator."""

from __future__ import annotations

import copy
import warnings
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim.swa_utils import update_bn

from lit_finetune.data.tensor_dataset import to_signed_float
from lit_finetune.metrics import EXTRACTOR_COMMAND, GenerativeMetrics
from lit_finetune.modules.base import Network, NoiseStream, TransferModule
from lit_finetune.nets.dcgan import DCGANDiscriminator, DCGANGenerator
from lit_finetune.transfer.cdc import DistanceConsistency, anchor_noise
from lit_finetune.transfer.diffaugment import DiffAugment
from lit_finetune.transfer.ewc import EWC, generator_fisher
from lit_finetune.transfer.l2sp import L2SP
from lit_finetune.transfer.param_groups import block_groups, weight_decay_groups
from lit_finetune.transfer.pretrained import LoadReport, input_conv_keys, load_pretrained

LOSSES = ("nonsaturating", "hinge")
#: how the EMA generator's BatchNorm statistics are obtained (see ``DCGAN``'s ``ema_batchnorm``)
EMA_BATCHNORM = ("recompute", "average", "copy")
#: the DCGAN paper's optimizer, used where a config names none
DCGAN_ADAM = partial(torch.optim.Adam, lr=2e-4, betas=(0.5, 0.999))


#: seed of the evaluation noise (ints only: Python salts the hash of strings per process)
EVALUATION_NOISE_SEED = 20_201_005
#: the intra-cluster diversity is measured around the training images when there are at most this many
#: (a few-shot measure: with more, extracting their features at every setup costs more than it tells)
DIVERSITY_MAX_TRAIN_IMAGES = 1000
#: keys of a DCGAN that belong to this run, never to a source it loads
RUN_STATE_PREFIXES = ("generator_ema.", "ema_updates", "l2sp_g.", "l2sp_d.", "ewc_g.", "cdc.", "cdc_anchor_z", "fixed_")

#: mixed with a run's noise seed into the seed of CDC's anchors (ints only: Python salts the hash of strings)
CDC_ANCHOR_SEED = 20_210_617


def cdc_anchors_for(noise_seed: int, num_anchors: int, latent_dim: int) -> torch.Tensor:
    """CDC's anchor latents for a run with noise seed ``noise_seed``: the same in every process."""
    rng = torch.Generator().manual_seed(hash((CDC_ANCHOR_SEED, int(noise_seed))) % (2**63))
    return torch.randn(num_anchors, latent_dim, generator=rng)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; training stopped before the update that would spread it."""


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Logit forms (no sigmoid + BCE), safe under bf16 autocast."""
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating ``-log D(G(z))`` or hinge ``-D(G(z))``."""
    return -fake_logits.mean() if kind == "hinge" else F.softplus(-fake_logits).mean()


def _zero_extended(source: torch.Tensor, target: torch.Tensor, dim: int, keep: int) -> torch.Tensor | None:
    """A weight whose input grew by label inputs: the source's ``keep`` slices along ``dim`` first, unchanged,
    and zeros for the rest, so the labels start with no effect (``None``: the source is not of that kind)."""
    others = [i for i in range(target.ndim) if i != dim]
    if source.ndim != target.ndim or source.shape[dim] != keep:
        return None
    if any(source.shape[i] != target.shape[i] for i in others):
        return None
    adapted = torch.zeros_like(target)
    adapted.narrow(dim, 0, keep).copy_(source)
    return adapted


class DCGAN(TransferModule):
    """A DCGAN, trained from scratch or fine-tuned from a pretrained one, with manual optimisation.

    Each training batch runs ``n_critic`` discriminator steps on the real batch and fresh fakes,
    then one generator step; each network has its own optimizer and scheduler (``generator_*``,
    ``discriminator_*``). Fine-tuning strategies are switches that combine:

    * full fine-tune (TransferGAN): ``pretrained=<DCGAN checkpoint>``;
    * FreezeD: freeze the lowest discriminator blocks with
      ``LayerFreezing(["discriminator.blocks.0", ...], unfreeze_at_epoch=None)``;
    * L2-SP toward the pretrained weights: ``l2sp_generator`` / ``l2sp_discriminator``;
    * EWC on G (Li et al. 2020): ``ewc_generator``, an L2-SP pull weighted by each parameter's
      Fisher information on the source, estimated when the source is read (the source D's
      ``log sigmoid D(G(z))`` on ``ewc_fisher_samples`` samples) and kept in the checkpoint
      (see :mod:`lit_finetune.transfer.ewc`);
    * CDC (Ojha et al. 2021): ``cdc_weight``, cross-domain distance consistency against a frozen
      copy of the source G (kept in the checkpoint; :mod:`lit_finetune.transfer.cdc`), and, with
      ``cdc_patch_block``, its anchor-based discriminator: every ``cdc_anchor_every``-th batch draws
      ``z`` near ``cdc_anchors`` fixed anchors and uses the image-level D; the others draw ``z`` as
      usual and use a patch-level D on ``discriminator.blocks[cdc_patch_block]``'s map (real and
      fake, D and G steps alike);
    * DiffAugment: ``diffaugment="color,translation,cutout"``, the same random differentiable
      augmentation on real and fake images, in both the D and the G step.

    An exponential moving average of the generator (``generator_ema``) samples and is evaluated;
    it is part of the checkpoint. It is updated inside ``training_step``, right after the
    generator's update, so a checkpoint written by any callback (a mid-epoch
    ``ModelCheckpoint(every_n_train_steps=k)`` included) holds G, D, the EMA and step-interval
    schedulers of the same step, and resuming from it is exact. Two things make the average
    worth sampling from:

    * a decay warm-up, ``min(ema_decay, (1 + t) / (10 + t))`` after ``t`` updates (TensorFlow's
      ``ExponentialMovingAverage(num_updates=t)`` rule; timm's EMA warms up in another form): with a
      constant 0.999 a short run's EMA is mostly its first, random weights;
    * BatchNorm statistics that belong to the averaged weights (``ema_batchnorm``):
      ``"recompute"`` (default) runs the EMA generator in train mode over ``ema_bn_batches``
      batches of fresh, fixed-seed noise before it is used (BigGAN's "standing statistics",
      through ``torch.optim.swa_utils.update_bn``); ``"average"`` averages the running
      statistics like the weights (timm); ``"copy"`` copies the raw generator's statistics
      (the old behaviour, kept to measure what the others are worth).

    Lightning's ``EMAWeightAveraging`` is not used: it averages the whole LightningModule (the
    discriminator too) and swaps the average into the module for validation and checkpoints,
    while a GAN keeps training the raw generator and samples from its average.

    Gradient clipping and accumulation are module arguments (``gradient_clip_val``,
    ``accumulate_grad_batches``), not the Trainer's: Lightning supports neither under manual
    optimisation, and the DCGAN asks for them by name when the Trainer is given them. Clipping
    runs in ``on_before_optimizer_step``: after mixed precision's ``GradScaler`` has unscaled the
    gradients (so fp16, bf16 and fp32 clip the same true norm) and after ``LayerFreezing`` has
    dropped frozen blocks' gradients (so they never count toward the norm, under DDP either).

    Args:
        latent_dim: size of the noise ``z``.
        in_channels, image_size: image shape (linked from the datamodule by the CLI).
        num_classes: classes of the data (linked); used when ``conditional``.
        conditional: class-conditional ``G(z, y)`` and ``D(x, y)``.
        generator_width, discriminator_width: channel widths of the nets.
        conditioning: how D sees labels, ``"projection"`` or ``"concat"``.
        spectral_norm: spectral normalisation in D.
        loss: ``"nonsaturating"`` or ``"hinge"``.
        n_critic: discriminator steps per generator step.
        pretrained: a DCGAN checkpoint (or state dict) to fine-tune from; read at fit start.
        l2sp_generator, l2sp_discriminator: L2-SP coefficients toward the pretrained weights (layers the
            source lacks, e.g. label embeddings or CDC's patch head, are not pulled).
        ewc_generator: EWC's lambda: ``lambda * sum F (theta - theta_src)^2`` over G (0: off; needs ``pretrained``).
            The Fisher's scale depends on the source (Li et al. use 5e8 for StyleGAN); ``finetune_ewc.yaml``'s
            20 makes the penalty about the adversarial loss (1) where plain fine-tuning ends.
        ewc_fisher_samples: samples of ``z`` the Fisher is estimated from.
        cdc_weight: weight of CDC's distance consistency loss (the reference code's ``kl_wt``, 1000; 0: off;
            needs ``pretrained``).
        cdc_batch: extra samples per generator step the loss compares pairwise (reference: 4; at least 3).
            They join the generator step's batch (one forward, one set of BatchNorm statistics), and the
            source copy runs on the same batch.
        cdc_patch_block: the discriminator block whose output map the patch-level head reads (e.g. -1, the
            last); ``None``: no anchor-based patch discriminator (the image-level D throughout).
        cdc_anchor_every: with the patch discriminator, every n-th batch samples the anchor regions (reference: 4).
        cdc_anchors: number of anchor latents (reference: 10, one per training image there); drawn when a fit
            starts, from the run's noise seed, and kept in the checkpoint.
        cdc_anchor_std: std of the anchor regions around each anchor (reference: 0.1).
        diffaugment: DiffAugment policy, e.g. ``"color,translation,cutout"`` (empty: off).
        ema_decay: decay of the generator's moving average (0: the EMA copies G every step).
        ema_warmup: warm the decay up as ``min(ema_decay, (1 + t) / (10 + t))``.
        ema_batchnorm: ``"recompute"``, ``"average"`` or ``"copy"``: where the EMA generator's
            BatchNorm statistics come from (see above).
        ema_bn_batches: batches of noise (of ``num_sample_images``, at least 64) for ``"recompute"``.
        gradient_clip_val: clip each network's gradient norm (``self.clip_gradients``, after unscaling).
        accumulate_grad_batches: sum the gradients of this many batches before each D and G update
            (one update per ``k`` batches; needs ``n_critic=1``). ``global_step`` counts updates.
        num_sample_images: size of the fixed-noise grid of :meth:`image_samples`.
        feature_extractor: checkpoint of the FID/KID feature extractor (see :mod:`lit_finetune.metrics`;
            ``lit-finetune fit --config configs/metrics/feature_extractor.yaml`` writes it). With it,
            validation (every ``metrics_every_n_epochs`` validated epochs) and test log FID, KID,
            the extractor's count of generated samples per class and, when conditional, how often
            it assigns a sample the label it was generated for; with at most
            ``DIVERSITY_MAX_TRAIN_IMAGES`` (1000) training images also the intra-cluster diversity
            (``intra_cluster_distance``, ``clusters_occupied`` and their ``_real`` twins for the real
            images; :mod:`lit_finetune.metrics.diversity`): few-shot GANs fail by memorising. As many
            fakes as real images are drawn from the EMA generator (class-matched when conditional).
            ``None``: no metrics.
        metrics_every_n_epochs: compute validation metrics in every n-th validated epoch (with
            ``check_val_every_n_epoch=None``: in every n-th validation).
        evaluate_ema: evaluate (and sample from) the EMA generator; ``False`` uses the raw one, e.g. to
            measure what the EMA is worth (set ``model.hparams.evaluate_ema`` before ``trainer.test``).
        generator_optimizer, discriminator_optimizer: default Adam(lr=2e-4, betas=(0.5, 0.999)).
        generator_lr_scheduler, discriminator_lr_scheduler, scheduler_interval: optional schedulers.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` steps on (e.g. ``"val/fid"``).
        compile_mode: ``torch.compile`` G and D (see :meth:`TransferModule.compile_networks`).
    """

    runtime_options = ("feature_extractor", "metrics_every_n_epochs", "evaluate_ema", "compile_mode")
    # the trained networks; the EMA generator only samples (and is recomputed through BatchNorm passes)
    compiled_networks = ("generator", "discriminator")

    def __init__(
        self,
        latent_dim: int = 100,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int | None = None,
        conditional: bool = False,
        generator_width: int = 64,
        discriminator_width: int = 64,
        conditioning: str = "projection",
        spectral_norm: bool = False,
        loss: str = "nonsaturating",
        n_critic: int = 1,
        pretrained: str | None = None,
        l2sp_generator: float = 0.0,
        l2sp_discriminator: float = 0.0,
        ewc_generator: float = 0.0,
        ewc_fisher_samples: int = 512,
        cdc_weight: float = 0.0,
        cdc_batch: int = 4,
        cdc_patch_block: int | None = None,
        cdc_anchor_every: int = 4,
        cdc_anchors: int = 10,
        cdc_anchor_std: float = 0.1,
        diffaugment: str = "",
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        ema_batchnorm: str = "recompute",
        ema_bn_batches: int = 16,
        gradient_clip_val: float | None = None,
        accumulate_grad_batches: int = 1,
        num_sample_images: int = 64,
        feature_extractor: str | None = None,
        metrics_every_n_epochs: int = 1,
        evaluate_ema: bool = True,
        generator_optimizer: OptimizerCallable | None = None,
        discriminator_optimizer: OptimizerCallable | None = None,
        generator_lr_scheduler: LRSchedulerCallable | None = None,
        discriminator_lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/d_loss",
        compile_mode: str | None = None,
    ) -> None:
        if conditional and num_classes is None:
            raise ValueError("A conditional DCGAN needs num_classes (the CLI links it from the datamodule).")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if n_critic < 1 or not 0 <= ema_decay < 1:
            raise ValueError(f"need n_critic >= 1 and 0 <= ema_decay < 1, got {n_critic} and {ema_decay}")
        if ema_batchnorm not in EMA_BATCHNORM:
            raise ValueError(f"ema_batchnorm must be one of {EMA_BATCHNORM}, got {ema_batchnorm!r}")
        if ema_bn_batches < 1:
            raise ValueError(f"ema_bn_batches must be >= 1, got {ema_bn_batches}")
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate_grad_batches}")
        if (ewc_generator > 0 or cdc_weight > 0) and pretrained is None:
            raise ValueError(
                f"ewc_generator={ewc_generator} / cdc_weight={cdc_weight} regularise toward a source generator, and "
                "pretrained is None: set pretrained=<source DCGAN checkpoint or zoo name>, or set both to 0."
            )
        if ewc_generator < 0 or cdc_weight < 0 or ewc_fisher_samples < 1:
            raise ValueError(
                f"need ewc_generator >= 0, cdc_weight >= 0 and ewc_fisher_samples >= 1; got {ewc_generator}, "
                f"{cdc_weight} and {ewc_fisher_samples}"
            )
        if cdc_batch < 3:
            raise ValueError(f"cdc_batch must be >= 3 (each sample is compared with 2 others or more), got {cdc_batch}")
        if cdc_patch_block is not None and (cdc_anchor_every < 2 or cdc_anchors < 1 or cdc_anchor_std < 0):
            raise ValueError(
                f"the anchor-based patch discriminator needs cdc_anchor_every >= 2 (1 would never use the patch "
                f"level), cdc_anchors >= 1 and cdc_anchor_std >= 0; got {cdc_anchor_every}, {cdc_anchors} and "
                f"{cdc_anchor_std}"
            )
        if accumulate_grad_batches > 1 and n_critic > 1:
            raise ValueError(
                f"accumulate_grad_batches={accumulate_grad_batches} needs n_critic=1 (got {n_critic}): with several "
                "D steps per batch it is ambiguous which ones to accumulate. Use one of the two."
            )
        super().__init__(
            num_classes if conditional else None, in_channels, image_size,
            scheduler_interval=scheduler_interval, scheduler_monitor=scheduler_monitor, pretrained=pretrained,
            compile_mode=compile_mode,
        )  # fmt: skip
        # optimizers and schedulers are callables, not plain types: kept out of the checkpoint's hyper-parameters
        self.save_hyperparameters(
            ignore=[
                "generator_optimizer",
                "discriminator_optimizer",
                "generator_lr_scheduler",
                "discriminator_lr_scheduler",
            ]
        )
        self.optimizer_factories = {
            "generator": generator_optimizer or DCGAN_ADAM,
            "discriminator": discriminator_optimizer or DCGAN_ADAM,
        }
        self.scheduler_factories = {"generator": generator_lr_scheduler, "discriminator": discriminator_lr_scheduler}
        self.automatic_optimization = False
        classes = num_classes if conditional else None
        self.generator = DCGANGenerator(latent_dim, image_size, in_channels, generator_width, classes)
        self.discriminator = DCGANDiscriminator(
            image_size, in_channels, discriminator_width, classes, conditioning, spectral_norm, cdc_patch_block
        )
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False).eval()
        #: EMA updates so far (the decay warm-up's clock); a buffer, so checkpoints resume it
        self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        # "recompute": the EMA's BatchNorm statistics are refreshed before the EMA is next used
        self._ema_bn_stale = ema_batchnorm == "recompute"
        self.augment = DiffAugment(diffaugment)  # an empty policy is the identity
        self.noise_stream = NoiseStream()  # z and DiffAugment: each DDP rank draws its own
        self.l2sp_g = L2SP(self.generator, l2sp_generator) if l2sp_generator > 0 else None
        self.l2sp_d = L2SP(self.discriminator, l2sp_discriminator) if l2sp_discriminator > 0 else None
        self.ewc_g = EWC(self.generator, ewc_generator) if ewc_generator > 0 else None
        self.cdc = DistanceConsistency(self.generator, cdc_weight) if cdc_weight > 0 else None
        if cdc_patch_block is not None:
            # the anchors of the image-level D's regions; redrawn from the noise seed when a fit starts
            anchors = torch.randn(cdc_anchors, latent_dim, generator=torch.Generator().manual_seed(0))
            self.register_buffer("cdc_anchor_z", anchors)
        # fixed noise (and labels) so sample grids are comparable across epochs and runs
        fixed = torch.Generator().manual_seed(0)
        self.register_buffer("fixed_z", torch.randn(num_sample_images, latent_dim, generator=fixed))
        fixed_y = (
            torch.arange(num_sample_images) % classes if classes else torch.zeros(num_sample_images, dtype=torch.long)
        )
        self.register_buffer("fixed_y", fixed_y)
        #: FID / KID, built at setup from ``feature_extractor`` (it holds no state-dict keys)
        self.generative_metrics: GenerativeMetrics | None = None

    # -- networks and optimizers -------------------------------------------------------------------
    def networks(self) -> list[Network]:
        networks = []
        for name, net, anchored in (
            ("generator", self.generator, self.l2sp_g is not None or self.ewc_g is not None),
            ("discriminator", self.discriminator, self.l2sp_d is not None),
        ):
            groups = block_groups(net, name, expand=["blocks"])  # one group per block: FreezeD freezes by block
            groups = weight_decay_groups(groups, anchored=[name] if anchored else [])
            networks.append(
                Network(
                    name,
                    groups,
                    self.optimizer_factories[name],
                    self.scheduler_factories[name],
                    self.scheduler_interval,
                    self.scheduler_monitor,
                )
            )
        return networks

    # -- pretrained weights ------------------------------------------------------------------------
    def read_pretrained(self, source: str) -> LoadReport:
        """Load G and D (TransferGAN); the EMA starts from the loaded G, L2-SP and EWC anchor at it (EWC's
        Fisher is estimated here, with the loaded D), CDC's frozen copy is taken from it.

        A conditional module may start from an unconditional source (the usual case: pretrain on
        unlabelled source images, then learn ``G(z, y)`` on few labelled target images). The label
        then enters with zero weight: G's first layer keeps the source's weights for ``z`` and gets
        zeros for the label embedding, and D's projection term starts at zero (its embedding, or under
        spectral norm its gain), so the module starts as exactly the source G and D and learns to use
        labels (reported as ``adapted``).
        With ``conditioning="concat"`` D's first convolution keeps the source's image filters
        unscaled and gets zero weights for the label channels, so D(x, y) = source D(x) too.
        """
        adapt = {}
        if self.hparams.conditional:
            # G's project conv is transposed: dimension 0 is its input (z, then the label embedding)
            label_rows = partial(_zero_extended, dim=0, keep=self.hparams.latent_dim)
            adapt["generator.project.conv.weight"] = ("label rows zero", label_rows)
            if self.hparams.conditioning == "concat":  # D's input channels: the image's, then one per class
                for entry in input_conv_keys(self.discriminator):  # the weight (and spectral norm's _v)
                    keep = self.hparams.in_channels * entry.per_channel
                    label_channels = partial(_zero_extended, dim=entry.dim, keep=keep)
                    adapt[f"discriminator.{entry.key}"] = ("label channels zero", label_channels)
        report = load_pretrained(self, source, exclude=list(RUN_STATE_PREFIXES), adapt=adapt)
        embed, gain = self.discriminator.embed, self.discriminator.embed_gain
        if embed is not None and not any(k.startswith("discriminator.embed.") for k in report.filled):
            with torch.no_grad():  # the projection term <embed(y), features> starts at 0
                if gain is not None:
                    gain.zero_()  # spectral norm keeps the embedding itself at norm 1
                else:
                    embed.weight.zero_()
        self.reset_ema()
        for l2sp in (self.l2sp_g, self.l2sp_d):  # new layers (label embedding, CDC's patch head) are not pulled
            if l2sp is not None:
                l2sp.reset_anchor(report.parameters_from_source(self))
        if self.ewc_g is not None:
            self.ewc_g.reset_anchor()
            self.ewc_g.set_fisher(self.estimate_generator_fisher(), self.hparams.ewc_fisher_samples)
        if self.cdc is not None:
            self.cdc.reset_source(self.generator)
        return report

    def estimate_generator_fisher(self) -> dict[str, torch.Tensor]:
        """EWC's Fisher of G's parameters at their current values, from D's ``log sigmoid D(G(z))``
        (:func:`~lit_finetune.transfer.ewc.generator_fisher`; labels cycle over the classes when conditional)."""
        classes = self.hparams.num_classes if self.hparams.conditional else None
        return generator_fisher(
            self.generator, self.discriminator, self.hparams.latent_dim, self.hparams.ewc_fisher_samples, classes
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.hparams.feature_extractor and self.generative_metrics is None:
            # the generator's labels are the datamodule's 0..k-1; the extractor knows the dataset's original ids
            classes = getattr(self.trainer.datamodule, "classes", None) if self.hparams.conditional else None
            self.generative_metrics = GenerativeMetrics(self.hparams.feature_extractor, classes=classes)
        elif not self.hparams.feature_extractor and stage in ("fit", "validate", "test"):
            rank_zero_warn(
                f"DCGAN: FID/KID skipped at {getattr(stage, 'value', stage)}: no feature_extractor is set, so only "
                "d_loss is logged. Pass "
                "--model.init_args.feature_extractor <classifier checkpoint> (it wins over a --ckpt_path's "
                f"hyper-parameters) or DCGAN(feature_extractor=...); make one with: {EXTRACTOR_COMMAND}"
            )
        strategy = self.trainer.strategy
        if (
            stage == "fit"
            and isinstance(strategy, DDPStrategy)
            and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        ):
            # each backward reaches only G or only D; plain DDP would wait for the other's gradients forever
            raise ValueError(
                "DCGAN under DDP needs find_unused_parameters: pass --trainer.strategy ddp_find_unused_parameters_true "
                "(or ddp_spawn_find_unused_parameters_true)."
            )

    # -- sampling ----------------------------------------------------------------------------------
    def _labels(self, n: int, labels: torch.Tensor | None) -> torch.Tensor | None:
        if not self.hparams.conditional:
            return None
        if labels is None:
            labels = torch.randint(0, self.hparams.num_classes, (n,), device=self.device)
        return labels.to(self.device)

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, ema: bool | None = None) -> torch.Tensor:
        """``n`` images in [-1, 1] from the EMA generator (or the raw one; default: ``evaluate_ema``);
        labels random if not given."""
        generator = self.generator_network(ema)
        z = torch.randn(n, self.hparams.latent_dim, device=self.device)
        return generator(z, self._labels(n, labels))

    def generator_network(self, ema: bool | None = None) -> DCGANGenerator:
        """The network ``G(z, y)`` that samples: the EMA generator or the raw one (default: ``evaluate_ema``).

        The EMA generator comes with BatchNorm statistics of its own weights (``ema_batchnorm``).
        It is what :class:`~lit_finetune.GANAugmentedClassifier` draws its synthetic images from; its
        ``class_names`` attribute says what its labels mean (the training data's class names, or ``None``).
        """
        self.warn_if_source_unread()
        if not (self.hparams.evaluate_ema if ema is None else ema):
            network = self.generator
        else:
            self.refresh_ema_batchnorm()
            network = self.generator_ema
        # what its labels mean, for a classifier that takes its samples (None: not trained on named data)
        network.class_names = list(self.class_names) if self.class_names_from_data else None
        return network

    def image_samples(self) -> dict[str, torch.Tensor]:
        """Fixed-noise grids for :class:`~lit_finetune.callbacks.SampleImages`."""
        y = self.fixed_y if self.hparams.conditional else None
        return {"samples_ema": self.generator_network(True)(self.fixed_z, y), "samples": self.generator(self.fixed_z, y)}

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The EMA generator: ``G_ema(z, y)``."""
        return self.generator_network(True)(z, y)

    # -- training ----------------------------------------------------------------------------------
    def _check_finite(self, name: str, value: torch.Tensor) -> None:
        if not torch.isfinite(value):
            raise TrainingDiverged(
                f"{name} is {value.item()} at global step {self.global_step} (epoch {self.current_epoch}); training "
                "stopped before the update, and the last checkpoint is kept as it was. Lower the learning rates, "
                "set gradient_clip_val, or try loss='hinge' / spectral_norm=True."
            )

    def _update(self, optimizer: Any, loss: torch.Tensor, step: bool) -> None:
        """Backward ``loss`` into the gradients being accumulated; ``step``: update and start afresh."""
        self.manual_backward(loss / self.hparams.accumulate_grad_batches)
        if step:
            optimizer.step()  # clipping: on_before_optimizer_step, after unscaling and frozen gradients dropped
            optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        super().on_before_optimizer_step(optimizer)
        if self.hparams.gradient_clip_val:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.hparams.gradient_clip_val, gradient_clip_algorithm="norm"
            )

    # -- the generator's moving average ---------------------------------------------------------
    def ema_decay_now(self) -> float:
        """The decay of the next EMA update: ``ema_decay``, warmed up as ``(1 + t) / (10 + t)``."""
        decay = self.hparams.ema_decay
        if self.hparams.ema_warmup:
            t = int(self.ema_updates)
            decay = min(decay, (1 + t) / (10 + t))
        return decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """``ema = decay * ema + (1 - decay) * G`` for the weights; BatchNorm statistics per ``ema_batchnorm``."""
        weight = 1 - self.ema_decay_now()
        ema_params = list(self.generator_ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.generator.parameters()], weight)
        mode = self.hparams.ema_batchnorm
        for ema_buffer, buffer in zip(self.generator_ema.buffers(), self.generator.buffers()):
            if mode == "copy" or (mode == "average" and not ema_buffer.is_floating_point()):
                ema_buffer.copy_(buffer)
            elif mode == "average":
                ema_buffer.lerp_(buffer, weight)
        self.ema_updates += 1
        self._ema_bn_stale = mode == "recompute"

    @torch.no_grad()
    def reset_ema(self) -> None:
        """Start the average afresh from the raw generator (after loading pretrained weights)."""
        self.generator_ema.load_state_dict(self.generator.state_dict())
        self.ema_updates.zero_()
        self._ema_bn_stale = self.hparams.ema_batchnorm == "recompute"

    @torch.no_grad()
    def refresh_ema_batchnorm(self) -> None:
        """``ema_batchnorm="recompute"``: BatchNorm statistics for the EMA weights, if they changed since.

        The EMA generator runs in train mode over ``ema_bn_batches`` batches of noise (and labels
        cycling over the classes) from a private generator seeded with 0, with cumulative
        statistics (``torch.optim.swa_utils.update_bn``). The result is a function of the EMA
        weights only: the global random state is untouched, every rank gets the same statistics,
        and recomputing after a resume gives the same numbers.
        """
        if not self._ema_bn_stale:
            return
        device = self.fixed_z.device
        rng = torch.Generator(device=device).manual_seed(0)
        batch = max(64, self.hparams.num_sample_images)
        classes = self.hparams.num_classes if self.hparams.conditional else None
        batches = []
        for _ in range(self.hparams.ema_bn_batches):
            z = torch.randn(batch, self.hparams.latent_dim, generator=rng, device=device)
            y = torch.arange(batch, device=device) % classes if classes else None
            batches.append(((z, y),))  # update_bn feeds a batch's first element to the model
        update_bn(batches, _NoiseBatchToImage(self.generator_ema))
        self.generator_ema.eval()
        self._ema_bn_stale = False

    # -- training ----------------------------------------------------------------------------------
    def configure_callbacks(self) -> list:
        # Lightning calls this before it validates the Trainer's configuration, so the user gets the
        # module argument to use instead of "not supported for manual optimization"
        trainer = self.trainer
        if trainer.gradient_clip_val:
            raise ValueError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) does not apply to the DCGAN (manual "
                "optimisation, two optimizers): set DCGAN(gradient_clip_val=...) instead "
                "(--model.init_args.gradient_clip_val on the command line) and leave the Trainer's unset."
            )
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) does not apply to the DCGAN "
                "(manual optimisation, two optimizers): set DCGAN(accumulate_grad_batches=...) instead "
                "(--model.init_args.accumulate_grad_batches on the command line) and leave the Trainer's at 1."
            )
        return super().configure_callbacks()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.cdc_patch_block is not None:
            # a function of the run's noise seed: a resumed fit (same seed, restored stream) draws the same anchors
            self.cdc_anchor_z.copy_(cdc_anchors_for(self.noise_stream.state["seed"], *self.cdc_anchor_z.shape))
        # The EMA copy is in eval mode on purpose (it is never trained); say nothing about it, but let
        # Lightning's warning through when any other module is in eval mode at the start of training.
        in_eval = [name for name, module in self.named_modules() if not module.training]
        if in_eval and all(name.startswith("generator_ema") for name in in_eval):
            warnings.filterwarnings(
                "ignore", message=rf"Found {len(in_eval)} module\(s\) in eval mode", category=PossibleUserWarning
            )

    def _latents(self, n: int, noise: torch.Generator, anchored: bool) -> torch.Tensor:
        """``n`` latents: from CDC's anchor regions when ``anchored``, else from N(0, I)."""
        if anchored:
            return anchor_noise(self.cdc_anchor_z, n, self.hparams.cdc_anchor_std, noise)
        return torch.randn(n, self.hparams.latent_dim, device=self.device, generator=noise)

    def _critic(self, images: torch.Tensor, y: torch.Tensor | None, patch: bool) -> torch.Tensor:
        """D's logits: image-level ``(B,)``, or patch-level ``(B, h, w)`` (CDC's patch discriminator)."""
        return self.discriminator.patch_logits(images, y) if patch else self.discriminator(images, y)

    def _generator_step_loss(
        self, n: int, y: torch.Tensor | None, noise: torch.Generator, anchored: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's loss (adversarial + regularisers) and the regularisers' values, for logging."""
        z = self._latents(n, noise, anchored)
        extra: dict[str, torch.Tensor] = {}
        if self.cdc is None:
            fake = self.generator(z, y)
        else:
            # CDC's samples join the batch: one forward, and the source copy sees the same batch statistics
            k = self.hparams.cdc_batch
            z_all = torch.cat([z, torch.randn(k, self.hparams.latent_dim, device=self.device, generator=noise)])
            y_all = None
            if y is not None:
                y_cdc = torch.randint(self.hparams.num_classes, (k,), device=self.device, generator=noise)
                y_all = torch.cat([y, y_cdc])
            images, features = self.generator(z_all, y_all, return_features=True)
            fake = images[:n]
            layer = torch.randint(len(features), (k,), device=self.device, generator=noise)  # one layer per anchor
            extra["train/cdc"] = self.cdc(features, z_all, y_all, layer, rows=slice(n, None))
        patch = self.hparams.cdc_patch_block is not None and not anchored
        g_loss = generator_loss(self.hparams.loss, self._critic(self.augment(fake, noise), y, patch))
        if self.l2sp_g is not None:
            g_loss = g_loss + self.l2sp_g()
        if self.ewc_g is not None:
            extra["train/ewc"] = self.ewc_g()
        return g_loss + sum(extra.values()), extra

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        real, labels = batch
        self.check_input(real)
        y = labels if self.hparams.conditional else None
        opt_g, opt_d = self.optimizers()
        kind, n = self.hparams.loss, real.shape[0]
        accumulate = self.hparams.accumulate_grad_batches
        step = (batch_idx + 1) % accumulate == 0 or self.trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        noise = self.noise_generator()
        # CDC's anchor-based D: every cdc_anchor_every-th batch (counted by the checkpointed noise stream, so a
        # resumed fit keeps the rhythm) samples the anchor regions with the image-level D, the rest the patch level
        anchored = patch = False
        if self.hparams.cdc_patch_block is not None:
            anchored = (self.noise_stream.state["batches"] - 1) % self.hparams.cdc_anchor_every == 0
            patch = not anchored
        # each update runs with only its own network's parameters requiring gradients (toggled before the
        # forward, so the graph holds no gradient path into the other network's weights)
        for _ in range(self.hparams.n_critic):
            with self.toggled_optimizer(opt_d):
                z = self._latents(n, noise, anchored)
                with torch.no_grad():
                    fake = self.generator(z, y)
                real_logits = self._critic(self.augment(real, noise), y, patch)
                d_loss = discriminator_loss(kind, real_logits, self._critic(self.augment(fake, noise), y, patch))
                if self.l2sp_d is not None:
                    d_loss = d_loss + self.l2sp_d()
                self._check_finite("discriminator loss", d_loss)
                self._update(opt_d, d_loss, step)
        with self.toggled_optimizer(opt_g):
            g_loss, regularisers = self._generator_step_loss(n, y, noise, anchored)
            self._check_finite("generator loss", g_loss)
            self._update(opt_g, g_loss, step)
        if step:
            # here, not in on_train_batch_end: callbacks' on_train_batch_end (a mid-epoch ModelCheckpoint)
            # runs before the module's, and must see G, D, the EMA and the schedulers of the same step
            if self.trainer.world_size > 1:
                self._average_batchnorm_statistics()
            self.update_ema()
            self.step_schedulers("step")
        losses = {"train/d_loss": d_loss.detach(), "train/g_loss": g_loss.detach()}
        self.log_train_step(lambda: losses, batch_idx, prog_bar=True, batch_size=n)  # on the steps that are read
        if regularisers:
            values = {k: v.detach() for k, v in regularisers.items()}
            self.log_train_step(lambda: values, batch_idx, batch_size=n)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._ema_bn_stale:  # only ever set with ema_batchnorm="recompute"
            # the state dict was taken before this hook: put the EMA's own statistics into it, so the
            # checkpoint's generator_ema is usable as it is, by anyone
            self.refresh_ema_batchnorm()
            state = checkpoint.get("state_dict")
            if state is not None:
                for name, buffer in self.generator_ema.named_buffers():
                    if f"generator_ema.{name}" in state:
                        state[f"generator_ema.{name}"] = buffer.detach().clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        if "ema_updates" not in state and any(k.startswith("generator_ema.") for k in state):
            # written before the decay warm-up existed: its EMA is past any warm-up
            state["ema_updates"] = torch.tensor(10**9, dtype=torch.long)
        # recomputing is cheap and a function of the weights: do it rather than trust a file's statistics
        self._ema_bn_stale = self.hparams.ema_batchnorm == "recompute"

    @torch.no_grad()
    def _average_batchnorm_statistics(self) -> None:
        """Average BatchNorm running statistics over ranks after each step.

        DDP broadcasts buffers once per ``training_step``, but D runs several forwards in one (real,
        fake, ``n_critic`` times), each on its rank's own data: without this, the ranks' statistics
        (and so D in eval mode, and the EMA generator) would drift apart. ``SyncBatchNorm`` is no
        alternative on CPUs (gloo) and costs a sync per layer per forward.
        """
        world = self.trainer.world_size
        for net in (self.generator, self.discriminator):
            for module in net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                    for buffer in (module.running_mean, module.running_var):
                        torch.distributed.all_reduce(buffer)
                        buffer.div_(world)

    # -- evaluation --------------------------------------------------------------------------------
    def _metrics_on(self) -> bool:
        if self.generative_metrics is None or self.trainer.sanity_checking:
            return False
        if self.trainer.testing or self.trainer.state.fn != TrainerFn.FITTING:  # test, or a standalone validate
            return True
        return self._validation_index() % self.hparams.metrics_every_n_epochs == 0

    def _validation_index(self) -> int:
        """Which validation of the fit this is: by epoch, or, when validation runs every ``val_check_interval``
        training batches (``check_val_every_n_epoch=None``), by batch; both survive a resume."""
        every = self.trainer.check_val_every_n_epoch
        if every is not None:
            return self.current_epoch // every
        return (self.trainer.fit_loop.epoch_loop.total_batch_idx + 1) // self.trainer.val_check_batch - 1

    def evaluation_noise(self, n: int, batch_idx: int) -> torch.Tensor:
        """The ``z`` of validation/test batch ``batch_idx``: the same at every validation (so checkpoints chosen
        by FID are compared on the same noise) and different on every DDP rank (the global RNG, seeded alike
        by ``seed_everything``, would give every rank the same fakes and shrink FID's sample)."""
        rank = self.trainer.global_rank if self._trainer is not None else 0
        noise = torch.Generator(device=self.device).manual_seed(hash((EVALUATION_NOISE_SEED, rank, batch_idx)) % (2**63))
        return torch.randn(n, self.hparams.latent_dim, device=self.device, generator=noise)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, prefix: str) -> None:
        real, labels = batch
        self.check_input(real)
        y = labels if self.hparams.conditional else None
        generator = self.generator_network()
        fake = generator(self.evaluation_noise(real.shape[0], batch_idx), y)
        d_loss = discriminator_loss(self.hparams.loss, self.discriminator(real, y), self.discriminator(fake, y))
        self.log(f"{prefix}/d_loss", d_loss, sync_dist=True, batch_size=real.shape[0])
        if self._metrics_on():
            self.generative_metrics.update(real=real, fake=fake, fake_labels=y)

    def _log_metrics(self, prefix: str) -> None:
        if not self._metrics_on():
            return
        values = self.generative_metrics.compute()  # synced over processes: equal on every rank
        self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, sync_dist=False)
        if prefix == "test":
            counts = self.generative_metrics.compute_class_counts()
            self.log_dict({f"test/class_count/{i}": c.float() for i, c in enumerate(counts)}, sync_dist=False)
        self.generative_metrics.reset()

    def _training_images(self) -> torch.Tensor | None:
        """The datamodule's training images in ``[-1, 1]`` (``None``: too many, or a datamodule without them)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "train_set"):
            return None
        if datamodule.train_set is None:
            # a test (or validate) run of a fitted module: its clusters are its training images, which
            # datamodules read only for "fit" (a cheap read for the in-memory datasets this measure is for)
            datamodule.setup("fit")
        images = getattr(datamodule.train_set, "images", None)
        if images is None or len(images) > DIVERSITY_MAX_TRAIN_IMAGES:
            return None
        return to_signed_float(images).to(self.device)

    def _prepare_diversity(self) -> None:
        """Give the metrics the training images (once per training set): the intra-cluster diversity's clusters."""
        datamodule = getattr(self.trainer, "datamodule", None)
        train_set = getattr(datamodule, "train_set", None)
        if train_set is not None and train_set is getattr(self, "_diversity_train_set", None):
            return
        images = self._training_images()
        train_set = getattr(datamodule, "train_set", None)
        self._diversity_train_set = train_set
        if images is None:
            if not getattr(self, "_diversity_skip_said", False):
                rank_zero_info(
                    "DCGAN: intra-cluster diversity not measured (it needs a datamodule with in-memory training "
                    f"images, at most {DIVERSITY_MAX_TRAIN_IMAGES}: a few-shot measure)."
                )
                self._diversity_skip_said = True
            return
        self.generative_metrics.set_training_images(images)

    def on_validation_epoch_start(self) -> None:
        if self._metrics_on():
            self._prepare_diversity()

    def on_test_epoch_start(self) -> None:
        if self._metrics_on():
            self._prepare_diversity()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")


class _NoiseBatchToImage(nn.Module):
    """``(z, y)`` batches for ``torch.optim.swa_utils.update_bn``, which passes one input to the model."""

    def __init__(self, generator: nn.Module) -> None:
        super().__init__()
        self.generator = generator

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        return self.generator(*batch)
