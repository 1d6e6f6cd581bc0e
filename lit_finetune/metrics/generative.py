"""FID, KID and class statistics of generated images, in the feature space of :class:`FeatureExtractor`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lit_finetune.metrics.diversity import IntraClusterDiversity
from lit_finetune.metrics.feature_extractor import DEFAULT_EXTRACTOR_PATH, FeatureExtractor


def one_hot_counts(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Occurrences of each class in ``pred``; ``bincount`` has no deterministic CUDA kernel
    (it raises under ``Trainer(deterministic=True)``), a one-hot sum has."""
    return F.one_hot(pred, num_classes).sum(dim=0)


class PrecomputedFeatures(nn.Module):
    """The ``feature`` module handed to torchmetrics: the identity on features already extracted.

    Deliberately not the extractor itself: :class:`GenerativeMetrics` runs the extractor once per
    image and feeds the same features to FID, KID and the classifier head (instead of three
    passes), and the extractor stays out of the metrics' module tree (see :class:`GenerativeMetrics`).
    torchmetrics still does all the statistics and the cross-process synchronisation.
    """

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class SampleStats(Metric):
    """Counts summed over processes: real and fake images, fake images per predicted class, label agreement."""

    full_state_update = False

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("num_real", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("num_fake", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("fake_class_counts", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("agree", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("labelled", torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self, num_real: int = 0, fake_pred: torch.Tensor | None = None, fake_labels: torch.Tensor | None = None
    ) -> None:
        self.num_real += num_real
        if fake_pred is not None:
            self.num_fake += fake_pred.numel()
            self.fake_class_counts += one_hot_counts(fake_pred, self.fake_class_counts.numel())
            if fake_labels is not None:
                self.agree += (fake_pred == fake_labels).sum()
                self.labelled += fake_labels.numel()

    def compute(self) -> dict[str, torch.Tensor]:
        return {
            "num_real": self.num_real,
            "num_fake": self.num_fake,
            "fake_class_counts": self.fake_class_counts,
            "agree": self.agree,
            "labelled": self.labelled,
        }


class GenerativeMetrics(nn.Module):
    """FID and KID of generated ("fake") against real images, plus class statistics of the fakes.

    Built on torchmetrics' :class:`~torchmetrics.image.fid.FrechetInceptionDistance` and
    :class:`~torchmetrics.image.kid.KernelInceptionDistance`, in the feature space of a
    :class:`FeatureExtractor`. Typical use in a LightningModule::

        self.gen_metrics = GenerativeMetrics(extractor_path, classes=datamodule.classes)
        # validation_step:        self.gen_metrics.update(real=x, fake=G(z, y), fake_labels=y)
        # on_validation_epoch_end: self.log_dict(self.gen_metrics.compute()); self.gen_metrics.reset()

    **Processes.** The states are torchmetrics states: ``compute()`` sums (FID, counts) or gathers
    (KID) them over all processes and returns the same values on every rank, so it must be called
    on every rank, and its values are logged without ``sync_dist``.

    **Devices and checkpoints.** ``.to()`` / ``.cuda()`` of a parent module move everything. The
    extractor is read from its own file and is deliberately not a submodule: it adds no
    parameters (to optimizers, DDP, weight averaging), no keys to a parent's ``state_dict``
    (checkpoints stay small and load strictly whether or not metrics were built), and a parent's
    ``train()`` cannot touch it. It stays float32 whatever dtype the parent is cast to.

    **Memorisation.** After :meth:`set_training_images` (the few training images of a few-shot
    run), ``compute()`` also returns the intra-cluster diversity of the fakes and of the real
    images around those training images (:class:`~lit_finetune.metrics.diversity.IntraClusterDiversity`,
    on the same features: no extra extractor pass).

    **Sample sizes.** FID is biased upward at small sample sizes: compare runs only at equal
    numbers of real and fake images. KID is unbiased; its subsets hold
    ``min(kid_subset_size, #real, #fake)`` images, so it works for any count >= 2 (when a subset
    is a whole set, ``kid_std`` only reflects the resampling of the larger set; 0 if both are
    that size). KID's subsets are drawn from a seeded generator that leaves the global RNG as it
    was, so the value is reproducible and training randomness is untouched.

    Args:
        extractor: a :class:`FeatureExtractor` or the path of its checkpoint.
        classes: the extractor's class id of each label the generator is conditioned on (a
            datamodule's ``classes``, e.g. ``[5, 6, 7, 8, 9]`` for the target); ``None``: labels
            are extractor class ids already.
        kid_subset_size: images per KID subset (at most; see above).
        kid_subsets: number of KID subsets.
        kid_seed: seed of the KID subset draws.
        chunk_size: images per extractor forward (bounds memory for large updates).
    """

    def __init__(
        self,
        extractor: FeatureExtractor | str | Path = DEFAULT_EXTRACTOR_PATH,
        classes: Sequence[int] | None = None,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        kid_seed: int = 0,
        chunk_size: int = 500,
    ) -> None:
        super().__init__()
        if not isinstance(extractor, FeatureExtractor):
            extractor = FeatureExtractor.from_checkpoint(extractor)
        if kid_subset_size < 2:
            raise ValueError(f"kid_subset_size must be >= 2, got {kid_subset_size}")
        self._extractor = (extractor,)  # a tuple: not registered as a submodule (see the class docstring)
        self.num_classes = extractor.num_classes
        label_map = torch.arange(self.num_classes) if classes is None else torch.as_tensor(list(classes))
        if label_map.ndim != 1 or len(label_map) == 0 or label_map.min() < 0 or label_map.max() >= self.num_classes:
            raise ValueError(f"classes must be extractor class ids in 0..{self.num_classes - 1}; got {classes}")
        self.register_buffer("label_map", label_map, persistent=False)
        self.kid_subset_size, self.kid_seed, self.chunk_size = kid_subset_size, kid_seed, chunk_size

        features = PrecomputedFeatures(extractor.num_features)
        self.fid = FrechetInceptionDistance(feature=features)
        with warnings.catch_warnings():
            # KID warns that it keeps every feature vector: N x num_features floats, small here (128 per image)
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            self.kid = KernelInceptionDistance(feature=features, subsets=kid_subsets, subset_size=kid_subset_size)
        self.stats = SampleStats(self.num_classes)
        self.diversity = IntraClusterDiversity()

    @property
    def extractor(self) -> FeatureExtractor:
        return self._extractor[0]

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> GenerativeMetrics:
        # what .to() / .cuda() / .double() of a parent call: move the unregistered extractor too, keep it float32
        super()._apply(fn, recurse)
        self.extractor._apply(fn, recurse)
        self.extractor.float()
        return self

    def set_training_images(self, images: torch.Tensor) -> None:
        """The training images (``[-1, 1]``) whose clusters the intra-cluster diversity is measured in."""
        features = torch.cat([self._extract(chunk)[0] for chunk in images.split(self.chunk_size)])
        self.diversity.set_anchors(features)

    # -- accumulating, synced over processes ----------------------------------------------------
    def update(
        self,
        real: torch.Tensor | None = None,
        fake: torch.Tensor | None = None,
        fake_labels: torch.Tensor | None = None,
    ) -> None:
        """Add real and/or generated ``[-1, 1]`` images; ``fake_labels`` (the generator's
        conditioning labels, in the datamodule's numbering) also count label agreement."""
        if fake_labels is not None and (fake is None or len(fake_labels) != len(fake)):
            raise ValueError("fake_labels needs fake images, one label per image")
        if real is not None:
            for chunk in real.split(self.chunk_size):
                features, _ = self._extract(chunk)
                self.fid.update(features, real=True)
                self.kid.update(features, real=True)
                self.stats.update(num_real=len(chunk))
                if self.diversity.has_anchors:
                    self.diversity.update(features, real=True)
        if fake is not None:
            labels = None if fake_labels is None else self._to_extractor_classes(fake_labels).split(self.chunk_size)
            for i, chunk in enumerate(fake.split(self.chunk_size)):
                features, pred = self._extract(chunk, classify=True)
                self.fid.update(features, real=False)
                self.kid.update(features, real=False)
                self.stats.update(fake_pred=pred, fake_labels=None if labels is None else labels[i])
                if self.diversity.has_anchors:
                    self.diversity.update(features)

    def compute(self) -> dict[str, torch.Tensor]:
        """``{"fid", "kid_mean", "kid_std"}`` over everything added on all processes, plus
        ``"label_agreement"`` (fraction of fakes the extractor classifies as their label) when
        fake labels were given, and ``"intra_cluster_distance"``, ``"clusters_occupied"`` (and their
        ``_real`` twins) after :meth:`set_training_images`. Scalars, equal on every rank."""
        stats = self.stats.compute()
        num_real, num_fake = int(stats["num_real"]), int(stats["num_fake"])
        if num_real < 2 or num_fake < 2:
            raise ValueError(f"FID/KID need at least 2 real and 2 fake images; got {num_real} real, {num_fake} fake")
        self.kid.subset_size = min(self.kid_subset_size, num_real, num_fake)
        # never under autocast (e.g. called from a bf16-mixed step): KID's kernel sums in bf16 round to 0
        with torch.autocast(self.label_map.device.type, enabled=False), torch.random.fork_rng(devices=[]):
            out = {"fid": self.fid.compute()}
            torch.default_generator.manual_seed(self.kid_seed)  # CPU generator: KID draws subsets with randperm on CPU
            out["kid_mean"], out["kid_std"] = self.kid.compute()
        if stats["labelled"] > 0:
            out["label_agreement"] = stats["agree"].float() / stats["labelled"]
        if self.diversity.has_anchors:
            out.update({k: v.to(out["fid"].device) for k, v in self.diversity.compute().items()})
        return out

    def compute_class_counts(self) -> torch.Tensor:
        """How many of the fakes added (on all processes) the extractor assigns to each class ``(num_classes,)``."""
        return self.stats.compute()["fake_class_counts"].clone()

    def reset(self) -> None:
        """Forget everything added (real images included; the training images of the diversity stay)."""
        self.fid.reset()
        self.kid.reset()
        self.stats.reset()
        self.diversity.reset()

    # -- one-off, on this process's images only --------------------------------------------------
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The extractor's class id ``(B,)`` of each ``[-1, 1]`` image."""
        preds = [self._extract(chunk, classify=True)[1] for chunk in images.split(self.chunk_size)]
        return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long, device=self.label_map.device)

    def class_counts(self, images: torch.Tensor) -> torch.Tensor:
        """Number of ``images`` the extractor assigns to each of its classes ``(num_classes,)``."""
        return one_hot_counts(self.predict(images), self.num_classes)

    def label_agreement(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of ``images`` the extractor classifies as their ``labels`` (datamodule numbering)."""
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"need one label per image and at least one image; got {len(images)} and {len(labels)}")
        pred = self.predict(images)
        return (pred == self._to_extractor_classes(labels)).double().mean().item()

    def _extract(self, images: torch.Tensor, classify: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features and (with ``classify``) predicted classes, on the metrics' device (also when a
        caller-owned extractor lives on another one)."""
        features = self.extractor(images)
        pred = self.extractor.classify_features(features).argmax(dim=1) if classify else None
        device = self.label_map.device
        return features.to(device), None if pred is None else pred.to(device)

    def _to_extractor_classes(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.label_map.device, torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.label_map)):
            raise ValueError(f"labels must lie in 0..{len(self.label_map) - 1} (one per entry of classes)")
        return self.label_map[labels]
