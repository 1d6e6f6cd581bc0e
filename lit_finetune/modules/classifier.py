"""ResNet classifier fine-tuning."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities import rank_zero_info

from lit_finetune.callbacks.freezing import LayerFreezing
from lit_finetune.callbacks.image_logging import figure_to_array, log_image
from lit_finetune.checkpoint_io import atomic_write
from lit_finetune.modules.base import TransferModule
from lit_finetune.nets.resnet import TORCHVISION_RESNETS, build_resnet, normalize_input
from lit_finetune.transfer.l2sp import L2SP
from lit_finetune.transfer.param_groups import block_groups, module_group, trainable_only, weight_decay_groups
from lit_finetune.transfer.peft import PEFT, delta_state_dict, merge_into_state
from lit_finetune.transfer.pretrained import LoadReport, is_torchvision_weight_name, load_pretrained, read_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: how torchvision ResNet keys map onto this module (the head is ``head``, not ``fc``)
TORCHVISION_KEY_MAP = {"": "backbone.", "fc.": "head."}


#: the statistics that make input normalisation the identity on ``[-1, 1]`` images
IDENTITY_MEAN, IDENTITY_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
INPUT_STATS = ("input_mean", "input_std")


def _stats_to_channels(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor | None:
    """``(1, C, 1, 1)`` input statistics of a source with another channel count: one channel repeated,
    or several averaged into one (as the input conv's adaptation treats the filters)."""
    if source.shape[0] != 1 or source.ndim != 4 or target.ndim != 4:
        return None
    if source.shape[1] == 1:
        return source.expand_as(target).clone()
    if target.shape[1] == 1:
        return source.mean(dim=1, keepdim=True)
    return None


def _per_channel(rgb_stats: tuple[float, float, float], channels: int) -> torch.Tensor:
    """RGB statistics as a ``(1, C, 1, 1)`` tensor; other channel counts get their mean."""
    stats = torch.tensor(rgb_stats)
    return (stats if channels == 3 else stats.mean().repeat(channels)).view(1, -1, 1, 1)


class ImageClassifier(TransferModule):
    """A ResNet backbone and a linear head, trained with cross-entropy.

    ``ImageClassifier(num_classes=5)`` alone is a working CPU-sized model for 28x28 grayscale
    images. Inputs are ``[-1, 1]`` images (the package convention).

    Args:
        num_classes: output classes.
        backbone: ``resnet_small`` (CPU), ``resnet10``, ``resnet18/34/50/101/152``.
        in_channels: input channels.
        image_size: input side; sizes <= 64 use the small-input stem unless ``small_input`` says otherwise.
        pretrained: path of a lit-finetune checkpoint or state dict, or a torchvision weight
            name such as ``IMAGENET1K_V1`` (needs a torchvision backbone and a network or cache).
            Read when a fit (or test...) starts without a checkpoint to restore, or by
            :meth:`load_pretrained_weights`; ``load_report`` then says what was loaded.
        load_head: also load the pretrained head when its shape fits (off: a new task gets a new head).
        small_input: force the small-input stem on or off (``None``: by ``image_size``).
        label_smoothing: cross-entropy label smoothing.
        l2sp_alpha: L2-SP coefficient toward the pretrained backbone (0 disables it); weights the
            source lacks (a new stem) are not pulled. The anchored backbone gets no weight decay (L2-SP
            replaces it); see
            :func:`~lit_finetune.transfer.weight_decay_groups`.
        backbone_lr_ratio: backbone LR as a fraction of the head's (discriminative LR).
        layer_decay: extra LR factor per backbone block below the top one (1 disables it).
        dropout: dropout before the head.
        input_normalization: ``"auto"`` (ImageNet statistics for torchvision weights, the source's
            own statistics for a lit-finetune checkpoint, else none), ``"imagenet"`` or ``"none"``.
            The resolved statistics are buffers, so they travel in every checkpoint.
        peft: parameter-efficient fine-tuning of the backbone: ``bn_only``, ``bitfit``, ``adapters`` or
            ``lora`` (see :mod:`lit_finetune.transfer.peft`); ``None`` trains everything. The head always
            trains. The selection is fixed from the first step; ``LayerFreezing`` composes with it (what it
            unfreezes is the selection, e.g. head alone first, then the PEFT parameters: name ``peft`` too to
            hold back adapters / LoRA). With ``l2sp_alpha`` the penalty covers the added modules' weight
            updates too. :meth:`save_delta` stores only what trained. A PEFT model's checkpoint given as
            ``pretrained`` loads with its updates merged into the weights.
        peft_rank, peft_alpha: LoRA's rank and scale numerator (default ``alpha = rank``).
        optimizer, lr_scheduler, scheduler_interval, scheduler_monitor, compile_mode: see :class:`TransferModule`.
    """

    compiled_networks = ("backbone", "head")
    runtime_options = ("compile_mode",)  # how the networks run, not what they are
    #: constructor arguments kept out of the checkpoint's hyper-parameters (callables, modules: not
    #: plain types, so ``weights_only`` loading could not read them); subclasses extend it
    hparams_ignore: tuple[str, ...] = ("optimizer", "lr_scheduler")

    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet_small",
        in_channels: int = 1,
        image_size: int = 28,
        pretrained: str | None = None,
        load_head: bool = False,
        small_input: bool | None = None,
        label_smoothing: float = 0.0,
        l2sp_alpha: float = 0.0,
        backbone_lr_ratio: float = 1.0,
        layer_decay: float = 1.0,
        dropout: float = 0.0,
        input_normalization: str = "auto",
        peft: str | None = None,
        peft_rank: int = 4,
        peft_alpha: float | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: str = "epoch",
        scheduler_monitor: str = "val/loss",
        compile_mode: str | None = None,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels,
            image_size,
            optimizer,
            lr_scheduler,
            scheduler_interval,
            scheduler_monitor,
            pretrained,
            compile_mode,
        )
        self.save_hyperparameters(ignore=list(self.hparams_ignore))
        if input_normalization not in ("auto", "imagenet", "none"):
            raise ValueError(f"input_normalization must be auto, imagenet or none; got {input_normalization!r}")
        self.small_input = image_size <= 64 if small_input is None else small_input
        self.backbone, num_features = build_resnet(backbone, in_channels, small_input=self.small_input)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)

        if pretrained is not None and is_torchvision_weight_name(pretrained) and backbone not in TORCHVISION_RESNETS:
            raise ValueError(f"Torchvision weights {pretrained!r} need a torchvision backbone {TORCHVISION_RESNETS}.")
        imagenet = input_normalization == "imagenet"
        for name, stats in zip(
            INPUT_STATS, (IMAGENET_MEAN, IMAGENET_STD) if imagenet else (IDENTITY_MEAN, IDENTITY_STD)
        ):
            self.register_buffer(name, _per_channel(stats, in_channels))
        # a torchvision source and the small-input stem: the stem is new (not loaded), so it must train
        new_stem = ("conv1",) if pretrained and is_torchvision_weight_name(pretrained) and self.small_input else ()
        self._new_stem = bool(new_stem)
        self.peft = PEFT(self.backbone, peft, peft_rank, peft_alpha, trainable=new_stem) if peft else None
        # under peft only what trains is anchored: the rest never moves, so its terms are 0
        self.l2sp = L2SP(self.backbone, l2sp_alpha, trainable_only=peft is not None) if l2sp_alpha > 0 else None

        metrics = MetricCollection(
            {
                "acc": MulticlassAccuracy(num_classes, average="micro"),
                "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        for metric in self.train_metrics.values():
            # training labels come from the datamodule (0..k-1 by construction); the argument check's
            # torch.unique would make every training step wait for the GPU
            metric.validate_args = False
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        #: this epoch's training predictions and labels (class indices), for the training metrics at its end
        self._train_predictions: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.test_per_class = MulticlassAccuracy(num_classes, average=None)
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters new by design, which no source fills: the small-input stem under torchvision weights.
        Freezing callbacks (``LayerFreezing``) keep them training: frozen at their random start they would only
        feed noise to the pretrained layers above."""
        return list(self.backbone.conv1.parameters()) if self._new_stem else []

    # -- pretrained weights ---------------------------------------------------------------------
    def read_pretrained(self, source: str) -> LoadReport:
        """Load backbone (and, with ``load_head``, head) weights, then derive the L2-SP anchor and
        the input statistics from them."""
        weight_name = is_torchvision_weight_name(source)
        exclude = ["l2sp.", "peft."]  # the anchor is re-taken below, from the loaded weights; PEFT's modules are new
        if not self.hparams.load_head:
            exclude.append("head.")
        if self.hparams.input_normalization != "auto" or weight_name:
            exclude += INPUT_STATS  # fixed by the setting, or ImageNet's for torchvision weights
        # the input statistics follow the input conv when the channel count differs (gray source, RGB target);
        # the small-input stem (3x3) is new by design when the source has torchvision's 7x7 one: kept fresh, reported;
        # a head of another size (load_head) too: "when its shape fits"
        adapt = {name: ("per channel", _stats_to_channels) for name in INPUT_STATS}
        skip = ["head.", *(["backbone.conv1."] if self.small_input else [])]
        state: str | dict[str, torch.Tensor] = source
        if not weight_name:  # a PEFT model's checkpoint: its updates into its weights, as the model computes
            state, merged = merge_into_state(read_state_dict(source))
            if merged:
                rank_zero_info(f"{source}: merged {merged} parameter-efficient updates into the source's weights")
        report = load_pretrained(
            self, state, key_map=TORCHVISION_KEY_MAP, arch=self.hparams.backbone, exclude=exclude, adapt=adapt,
            skip_mismatched=skip, label=source,
        )  # fmt: skip
        if weight_name and self.hparams.input_normalization == "auto":
            for name, stats in zip(INPUT_STATS, (IMAGENET_MEAN, IMAGENET_STD)):
                getattr(self, name).copy_(_per_channel(stats, self.in_channels))
        if self.l2sp is not None:  # the small-input stem is new with torchvision weights: not pulled back
            self.l2sp.reset_anchor(report.parameters_from_source(self))
        return report

    # -- model ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for ``[-1, 1]`` images ``(B, C, H, W)``."""
        self.check_input(x)
        return self.head(self.dropout(self.backbone(self.normalize_input(x))))

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``((x + 1) / 2 - mean) / std`` with the resolved statistics (exactly ``x`` when there are none)."""
        return normalize_input(x, self.input_mean, self.input_std)

    def param_groups(self) -> list[dict[str, Any]]:
        ratio, decay = self.hparams.backbone_lr_ratio, self.hparams.layer_decay
        groups = [module_group(self.head, "head"), *block_groups(self.backbone, "backbone", ratio, decay)]
        if self.peft is not None:  # only what PEFT trains, plus its added modules at the head's LR
            groups = trainable_only([*groups, module_group(self.peft, "peft")])
        # L2-SP anchors the backbone and, under peft, the added modules' updates (l2sp_penalty)
        return weight_decay_groups(groups, anchored=["backbone", "peft"] if self.l2sp is not None else [])

    def l2sp_penalty(self) -> torch.Tensor:
        """L2-SP's ``alpha/2 sum ||theta - theta_0||^2`` over the effective backbone weights: the backbone's
        own and, under ``peft``, the updates adapters / LoRA add to them (``||delta W||^2``), which would
        otherwise escape it (their base weights never move)."""
        assert self.l2sp is not None
        penalty = self.l2sp()
        if self.peft is not None and self.peft.added:
            penalty = penalty + 0.5 * self.l2sp.alpha * self.peft.update_sq_norm()
        return penalty

    # -- parameter-efficient fine-tuning ---------------------------------------------------------
    @property
    def trainable_parameters(self) -> int:
        """Elements of the parameters that fine-tuning trains: all of them without ``peft``, else the head and
        the PEFT selection (whatever a freezing callback holds back for a while)."""
        total = sum(p.numel() for p in self.parameters())
        return total - (self.peft.fixed_count if self.peft is not None else 0)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.peft is not None:
            total = sum(p.numel() for p in self.parameters())
            rank_zero_info(
                f"{type(self).__name__}: peft={self.hparams.peft} trains {self.trainable_parameters:,} of {total:,} "
                f"parameters ({100 * self.trainable_parameters / total:.2f} %)"
            )

    def save_delta(self, path: str | Path) -> Path:
        """Write only what fine-tuning changed (trained parameters and buffers) with the hyper-parameters that
        rebuild the rest from the source; :meth:`from_delta` reads it back. Written atomically."""
        fixed = self.peft.fixed_parameters() if self.peft is not None else []
        # the L2-SP anchor is the source's weights: rebuilt from the source by from_delta
        delta = delta_state_dict(self, fixed=fixed, exclude=["l2sp."])
        if self.peft is not None and self.peft.merged:
            # the stored updates are the unmerged ones (merged base weights are not stored): the model
            # rebuilt on the source's weights must add them
            delta["peft.merged_flag"] = torch.zeros((), dtype=torch.bool)
        hparams = dict(self.hparams)
        source = hparams.get("pretrained")
        if source is not None and Path(source).is_file():  # a relative path would only work from this folder
            hparams["pretrained"] = str(Path(source).resolve())
        state = {
            "lit_finetune_delta": 1, "hyper_parameters": hparams, "state_dict": delta,
            **self.class_names_record(),
        }  # fmt: skip
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(state, f))
        return path

    @classmethod
    def from_delta(cls, path: str | Path, source: str | None = None) -> ImageClassifier:
        """The model :meth:`save_delta` stored: built from its hyper-parameters, its source loaded (``source``
        overrides the recorded one, e.g. after a move), then the delta on top. Read with ``weights_only=True``."""
        try:
            state = torch.load(Path(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise FileNotFoundError(f"No delta checkpoint at {path}: write one with ImageClassifier.save_delta") from None
        if not isinstance(state, dict) or "lit_finetune_delta" not in state:
            raise ValueError(f"{path} is not a delta checkpoint of ImageClassifier.save_delta")
        hparams = dict(state["hyper_parameters"])
        hparams.pop("_class_path", None)
        if source is not None:
            hparams["pretrained"] = source
        if hparams.get("pretrained") is None:
            raise ValueError(f"{path} records no source to apply the delta to: pass source=<checkpoint or zoo name>")
        model = cls(**hparams)
        model.load_pretrained_weights()
        missing = set(state["state_dict"]) - set(model.state_dict())
        if missing:
            raise ValueError(f"{path} holds keys this model lacks: {sorted(missing)[:5]}")
        model.load_state_dict(state["state_dict"], strict=False)
        model.restore_class_names(state)
        return model

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.peft is not None and stage == "fit":
            for callback in self.trainer.callbacks:
                # LayerFreezing leaves PEFT's fixed parameters frozen when it unfreezes; other BaseFinetuning
                # callbacks (e.g. BackboneFinetuning) make a whole module trainable and would undo the selection
                if isinstance(callback, BaseFinetuning) and not isinstance(callback, LayerFreezing):
                    raise ValueError(
                        f"ImageClassifier(peft={self.hparams.peft!r}) decides what trains in the backbone from the first "
                        f"step, and {type(callback).__name__} would make all of a module trainable when it unfreezes: "
                        "use lit_finetune.callbacks.LayerFreezing (which keeps the selection) or set peft=None."
                    )

    # -- steps ----------------------------------------------------------------------------------
    def _shared_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if metrics is not None:
            metrics.update(logits, y)
        return loss, logits

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, logits = self._shared_step(batch, None)
        # The training metrics are updated once per epoch from these predictions: torchmetrics' update runs a
        # bincount, which waits for the GPU (it reads the largest label back), and costs ~0.2 ms a step on a CPU.
        self._train_predictions.append((logits.detach().argmax(dim=-1), batch[1]))
        # logged on the steps that are read (log_train_step); train/acc and f1 once per epoch (on_train_epoch_end)
        data_loss = loss.detach()
        self.log_train_step(lambda: {"train/loss": data_loss}, batch_idx, prog_bar=True)
        if self.l2sp is not None:
            penalty = self.l2sp_penalty()
            l2sp = penalty.detach()
            self.log_train_step(lambda: {"train/l2sp": l2sp}, batch_idx)
            loss = loss + penalty
        return loss

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        # The epoch's accuracy and F1, logged here once: Lightning computes (syncing processes) and resets them as
        # when they are logged from training_step with on_epoch=True, where they would cost it ~0.3 ms a key a step.
        predictions, self._train_predictions = self._train_predictions, []
        if predictions:
            self.train_metrics.update(torch.cat([p for p, _ in predictions]), torch.cat([y for _, y in predictions]))
            self.log_dict(self.train_metrics)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._train_predictions = []  # none left from an epoch that did not end (an interrupted fit)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, _ = self._shared_step(batch, self.val_metrics)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self._shared_step(batch, self.test_metrics)
        self.test_per_class.update(logits, batch[1])
        self.test_confusion.update(logits, batch[1])
        self.log("test/loss", loss, sync_dist=True)
        self.log_dict(self.test_metrics)

    def on_test_epoch_end(self) -> None:
        per_class = self.test_per_class.compute()
        for name, value in zip(self.class_names, per_class):
            self.log(f"test/acc_class/{re.sub(r'[^A-Za-z0-9_-]+', '_', name)}", value)
        confusion = self.test_confusion.compute()
        self.test_per_class.reset()
        self.test_confusion.reset()
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            fig, _ = self.test_confusion.plot(val=confusion.cpu(), labels=self.class_names)
            fig.set_size_inches(6, 6)
            log_image(self.trainer, "test/confusion_matrix", figure_to_array(fig))

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return label_and_confidence(self(batch[0]))


def label_and_confidence(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """What a classifier's ``predict_step`` returns (and :class:`~lit_finetune.callbacks.PredictionWriter` writes):
    the most probable ``label`` and its softmax ``confidence``, on the CPU."""
    confidence, label = logits.softmax(dim=-1).max(dim=-1)
    return {"label": label.cpu(), "confidence": confidence.cpu()}
