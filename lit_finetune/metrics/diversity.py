"""Intra-cluster diversity of generated images: does a few-shot generator draw variations or copies?

FID rewards a generator that reproduces its few training images well; few-shot GANs fail by
memorising them. Ojha et al. (2021) measure this with *intra-cluster LPIPS*: assign each generated
image to its nearest training image (the clusters), then average the pairwise LPIPS distance
within each cluster, and average over clusters. Copies of the training images give 0.

Here the distance is LPIPS-like but taken in the feature space of the FID/KID extractor
(:class:`~lit_finetune.metrics.FeatureExtractor`; no LPIPS network exists offline for 28x28
grayscale images): the Euclidean distance between unit-normalised feature vectors (LPIPS too
compares unit-normalised features), in ``[0, 2]``. Numbers are comparable inside this project
only, at equal numbers of generated images and training images. The same measure on real
held-out images, clustered to the same training images, is the reference a generator as diverse
as the data would reach.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def intra_cluster_distance(
    features: torch.Tensor, anchors: torch.Tensor, chunk_size: int = 1024
) -> tuple[float, torch.Tensor]:
    """Mean intra-cluster distance of ``features`` around ``anchors``, and the cluster sizes.

    Each row of ``features`` (N, D) joins the cluster of its nearest anchor (K, D) (both
    unit-normalised, so nearest = most cosine-similar); within each cluster of at least 2 members
    the mean pairwise distance ``||f_i - f_j||`` (i != j) is taken; the result is the mean over
    those clusters (``nan`` when no cluster has 2 members). Returns ``(distance, sizes (K,))``.
    """
    if features.ndim != 2 or anchors.ndim != 2 or features.shape[1] != anchors.shape[1]:
        raise ValueError(
            f"need features (N, D) and anchors (K, D) of the same D; got {tuple(features.shape)} and "
            f"{tuple(anchors.shape)}"
        )
    feats = F.normalize(features.double(), dim=1)
    anchor = F.normalize(anchors.double().to(feats.device), dim=1)
    assign = torch.cat([(chunk @ anchor.T).argmax(dim=1) for chunk in feats.split(chunk_size)])
    sizes = torch.bincount(assign.cpu(), minlength=len(anchor))
    means = []
    for k in torch.nonzero(sizes >= 2).flatten().tolist():
        members = feats[assign == k]
        m = len(members)
        total = sum(torch.cdist(chunk, members).sum() for chunk in members.split(chunk_size))
        means.append(total / (m * (m - 1)))  # the diagonal is 0: the sum over i != j
    distance = float(torch.stack(means).mean()) if means else float("nan")
    return distance, sizes


class IntraClusterDiversity(Metric):
    """Intra-cluster diversity (an intra-LPIPS-like measure, see the module docstring) as a torchmetrics Metric.

    :meth:`set_anchors` takes the features of the training images (the cluster centres, the same
    on every process); :meth:`update` adds features of generated images (and, with ``real=True``,
    of real held-out images); :meth:`compute` gathers them over processes and returns
    ``intra_cluster_distance`` (generated), ``clusters_occupied`` (the share of training images
    that at least one generated image is nearest to: memorising a few of them lowers it) and, when
    real features were added, ``intra_cluster_distance_real`` and ``clusters_occupied_real``.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.register_buffer("anchors", torch.zeros(0, 0), persistent=False)

    @property
    def has_anchors(self) -> bool:
        return self.anchors.numel() > 0

    def set_anchors(self, features: torch.Tensor) -> None:
        """The training images' features ``(K, D)``: one cluster per image."""
        if features.ndim != 2 or len(features) < 1:
            raise ValueError(f"anchors must be features (K, D) with K >= 1, got {tuple(features.shape)}")
        self.anchors = features.detach().to(self.anchors.device, torch.float32).clone()

    def update(self, features: torch.Tensor, real: bool = False) -> None:
        (self.real_features if real else self.fake_features).append(features.detach().float())

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.has_anchors:
            raise ValueError("IntraClusterDiversity needs the training images' features first: call set_anchors(...)")
        out = {}
        for suffix, state in (("", self.fake_features), ("_real", self.real_features)):
            features = dim_zero_cat(state) if (isinstance(state, torch.Tensor) or state) else None
            if features is None or len(features) == 0:
                continue
            distance, sizes = intra_cluster_distance(features, self.anchors)
            out[f"intra_cluster_distance{suffix}"] = torch.tensor(distance)
            out[f"clusters_occupied{suffix}"] = (sizes > 0).float().mean()
        return out
